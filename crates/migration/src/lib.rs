//! Transport-independent building blocks of ringvisor's pre-copy live migration. The VMM's
//! engine glues these to a VM, a dirty tracker and a socket; nothing here touches KVM (the
//! `kvm-dirty` dependency is for its [`TrackerMode`] type only).
//!
//! Module map:
//! - [`wire`]: the versioned, framed, checksummed stream ([`wire::Encoder`],
//!   [`wire::Decoder`], [`wire::AckWriter`], [`wire::AckReader`]), the memory layout, the
//!   [`wire::PageSink`] through which pages land in guest memory, and the tracker's wire
//!   encoding ([`wire::tracker_to_wire`]).
//! - [`zero`]: fast, allocation-free [`is_zero_page`].
//! - [`digest`]: per-region memory digests, full and incremental, for the end-to-end check.
//! - [`bandwidth`]: token bucket for `max-bandwidth`, bandwidth estimator, throttled writer.
//! - [`params`]: QEMU-shaped [`MigrationParameters`], [`MigrateSetParameters`] and
//!   [`MigrationCapabilities`], with QEMU's names, units, defaults, ranges and messages.
//! - [`convergence`]: [`Convergence`], the pure, clock-free policy: switchover, refining
//!   passes, QEMU's non-convergence trigger, auto-converge, dirty limit, timeout.
//! - [`units`]: parsers for `1G`, `800MiB/s`, `300ms`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod bandwidth;
pub mod convergence;
pub mod digest;
pub mod params;
pub mod units;
pub mod wire;
pub mod zero;

pub use convergence::{
    AbortReason, Action, Convergence, Decision, DirtyLimitMode, PassReport, PolicyConfig, Step,
    SwitchoverReason,
};
pub use digest::{IncrementalDigest, MemoryDigest};
pub use kvm_dirty::TrackerMode;
pub use params::{
    MigrateSetParameters, MigrationCapabilities, MigrationCapability, MigrationParameters,
    OnTimeout, ParamError,
};
pub use zero::is_zero_page;

/// Guest page size the protocol and digests work in (4 KiB).
pub const PAGE_SIZE: u64 = 4096;
