//! Boots PVH ELF kernels on real KVM: the boot protocol QEMU (`-kernel`), Cloud Hypervisor and
//! Firecracker-style VMMs use, with the platform such kernels rely on, plus the project's own
//! PVH test kernel. See `docs/pvh.md`.
//!
//! - [`elf`]: ELF32/ELF64 program headers, the `XEN_ELFNOTE_PHYS32_ENTRY` note; the writer.
//! - [`mod@boot`]: the PVH boot protocol (start info, e820 map, command line) and image loading.
//! - [`memory`]: guest RAM below the 3 GiB MMIO hole and above 4 GiB.
//! - [`mptable`]: the MP tables (vCPUs, IOAPIC, ISA interrupt routing) for guests without ACPI.
//! - [`vm`]: the PVH VM: a `vmm::Vm` on the PVH platform (in-kernel irqchip and PIT, COM1 and
//!   the exit port in `vmm::devices`, vCPU threads), the kernel loaded, the boot vCPU at the
//!   PVH entry and the APs waiting for INIT/SIPI. Being a `vmm::Vm`, it has dirty tracking
//!   and live-migrates with `migration-engine` like any other ringvisor guest.
//! - [`test_kernel`]: the run-time assembled PVH test kernel (iced-x86; ring-3 workload).
//!
//! This crate has no `unsafe` code: KVM access goes through `vmm`.
//!
//! ```no_run
//! use std::time::Duration;
//! use pvh::test_kernel::{self, Cmdline, TestKernelParams};
//!
//! let kernel = test_kernel::build(&TestKernelParams::default())?;
//! let cfg = pvh::PvhConfig {
//!     cmdline: Cmdline { cpus: 2, exit: 3, ..Cmdline::default() }.render(),
//!     vcpus: 2,
//!     ..pvh::PvhConfig::new(kernel)
//! };
//! let mut vm = pvh::boot(&cfg)?;
//! let status = vm.run_until_exit(Some(Duration::from_secs(10)))?;
//! assert_eq!(status, pvh::ExitStatus::PowerOff(3));
//! print!("{}", String::from_utf8_lossy(&vm.serial_output()));
//! # Ok::<(), pvh::PvhError>(())
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod boot;
pub mod elf;
pub mod error;
pub mod memory;
pub mod mptable;
pub mod test_kernel;
/// COM1 (the 16550 UART model lives in `vmm::devices`).
pub mod serial {
    pub use vmm::devices::{COM1_GSI, COM1_LEN, COM1_PORT};
    pub use vmm::SerialOutput;
}
pub mod vm;

pub use error::{LoadError, PvhError, Result};
pub use vm::{
    boot, read_initrd, read_kernel, wait_exit, ExitStatus, PvhConfig, PvhVm, SerialInput,
    EXIT_PORT, MAX_VCPUS,
};
pub use vmm::SerialOutput;
