//! ringvisor's live-migration engine: pre-copy over TCP driven by a [`kvm_dirty`] tracker,
//! on top of the [`migration`] wire protocol, for any VM behind the [`seam::MigratableVm`]
//! trait (a [`vmm::Vm`], or the in-memory [`fake::FakeVm`] of the engine tests).
//!
//! - [`job`]: a migration as a job an operator drives while it runs (start, `query-migrate`
//!   info, cancel, live parameters, QEMU's statuses and events).
//! - [`source`]: the source side, phase by phase, and the blocking [`source::migrate`].
//! - [`seam`]: what the engine needs from a VM; [`fake`]: a VM in memory for tests.
//! - [`dest`]: the destination ([`dest::receive`] into a `vmm::Vm`).
//! - [`dirtyrate`], [`dirtylimit`], [`rate`]: dirty-rate measurement and the dirty limit.
//! - [`replicate`]: continuous replication to a hot standby (checkpoints, failover, output
//!   commit).
//! - [`summary`], [`error`]: what a migration reports, and why one failed; [`cpu`]: the
//!   per-thread CPU time and host idle time the summaries carry.
//!
//! The ring path peeks the rings continuously from a collector thread (per-vCPU dirty
//! rates, no reset) and harvests and resets a ring only at a high-water mark or at a pass
//! boundary, so a hot page costs one write-protect fault per pass, as with the bitmap.
#![deny(missing_docs)]

pub mod cpu;
pub mod dest;
pub mod dirtylimit;
pub mod dirtyrate;
pub mod error;
pub mod fake;
pub mod job;
pub mod rate;
pub mod replicate;
pub mod seam;
pub mod source;
pub mod summary;

pub use dest::{receive, DestOptions, IncomingSummary};
pub use dirtylimit::{DirtyLimiter, LimiterConfig};
pub use error::{MigrationError, Result};
pub use job::{JobEvent, MigrationInfo, MigrationJob, MigrationStatus, RamStats, RingvisorInfo};
pub use seam::MigratableVm;
pub use source::{
    migrate, migrate_over, DirtyLimitMode, FailPoint, Progress, SourceOptions, TimeoutAction,
};
pub use summary::{IterationStats, MigrationSummary, Outcome};

/// State blob kind of a vCPU.
pub const STATE_KIND_VCPU: u32 = 1;
/// State blob kind: the PVH platform's VM-wide device state (`vmm::MachineState`: PICs,
/// IOAPIC, PIT, KVM clock, UART), instance 0.
pub const STATE_KIND_MACHINE: u32 = 2;

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME, the same clock on both sides of a
/// same-host migration).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
