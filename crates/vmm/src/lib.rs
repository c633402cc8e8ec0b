//! A small VMM on real KVM: guest memory through vm-memory (sparse, `MAP_NORESERVE`), memslots
//! with dirty logging only while a user needs it (`logging`), vCPUs started directly in 64-bit long mode at CPL3 (see
//! `../shared/reference/pvm-host.md` for why), a run-time assembled workload program, and vCPU
//! threads with a reliable kick.
//!
//! Unsafe code lives only in [`sys`] (memslot registration, the `immediate_exit` byte, the kick
//! signal, `KVM_GET_STATS_FD`).
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bench_sync;
pub mod check;
pub mod devices;
pub mod error;
pub mod guest;
pub mod host;
mod logging;
pub mod machine;
pub mod memory;
pub mod selftest;
pub mod state;
pub mod stats;
mod sys;
pub mod vcpu;
pub mod vm;
pub mod x86;

pub use devices::{Capture, Devices, SerialOutput, EXIT_PORT};
pub use error::{Result, VmmError};
pub use guest::{Pattern, VcpuCtrl};
pub use logging::DirtyLogGuard;
pub use machine::{MachineState, Platform};
pub use memory::{GuestRam, RamBacking, RegionSpec, ThpMode};
pub use stats::{KvmStats, StatsError};
pub use vcpu::{Parked, VcpuShared, Vcpus};
pub use vm::{open_kvm, Tracking, Vm, VmConfig, GUEST_FAULTS_STAT, UNPACED};

/// Lowers (or restores) the calling thread's CPU priority (the source's after-commit digest
/// check runs at nice 19, off the resumed guest's way). Returns the previous nice value, or
/// `None` if it could not be changed.
pub fn renice_current_thread(nice: i32) -> Option<i32> {
    sys::renice_current_thread(nice)
}

/// Whether `/dev/kvm` exists (tests print a `SKIP(kvm)` line and return when it does not).
pub fn kvm_available() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}
