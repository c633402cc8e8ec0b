//! ringvisor's live-migration engine: pre-copy over TCP driven by a [`kvm_dirty`] tracker,
//! on top of the [`migration`] wire protocol and the [`vmm`] VMM.
//!
//! Source: [`job::MigrationJob`] (a controllable job on its own thread) or the blocking
//! [`source::migrate`]. Destination: [`dest::receive`]. The ring path peeks the
//! rings continuously from a collector thread (per-vCPU dirty rates, no reset) and harvests
//! and resets a ring only at a high-water mark or at a pass boundary, so a hot page costs
//! one write-protect fault per pass, as with the bitmap.
#![deny(missing_docs)]

pub mod dest;
pub mod dirtylimit;
pub mod dirtyrate;
pub mod error;
pub mod job;
pub mod rate;
pub mod source;
pub mod summary;

pub use dest::{receive, DestOptions, IncomingSummary};
pub use dirtylimit::{DirtyLimiter, LimiterConfig};
pub use error::{MigrationError, Result};
pub use job::{JobEvent, MigrationInfo, MigrationJob, MigrationStatus, RamStats, RingvisorInfo};
pub use source::{migrate, DirtyLimitMode, FailPoint, Progress, SourceOptions, TimeoutAction};
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
