//! Transport-independent building blocks of ringvisor's pre-copy live migration. The VMM's
//! engine glues these to a VM, a dirty tracker and a socket; nothing here touches KVM.
//!
//! Module map:
//! - [`wire`]: the versioned, framed, checksummed stream ([`wire::Encoder`],
//!   [`wire::Decoder`], [`wire::AckWriter`], [`wire::AckReader`]), the memory layout and
//!   the [`wire::PageSink`] through which pages land in guest memory.
//! - [`zero`]: fast, allocation-free [`is_zero_page`].
//! - [`digest`]: per-region memory digests, full and incremental, for the end-to-end check.
//! - [`bandwidth`]: token bucket for `max-bandwidth`, bandwidth estimator, throttled writer.
//! - [`policy`]: [`MigrationParams`] (QEMU names and defaults) and [`Convergence`], the
//!   switchover / non-convergence / timeout rules.
//! - [`units`]: parsers for `1G`, `800MiB/s`, `300ms`.
//! - [`stats`]: the serializable `--json` summary.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod bandwidth;
pub mod digest;
pub mod policy;
pub mod stats;
pub mod units;
pub mod wire;
pub mod zero;

pub use digest::{IncrementalDigest, MemoryDigest};
pub use policy::{
    Convergence, Decision, MigrationParams, PassReport, SwitchoverReason, TimeoutAction,
    TrackerMode,
};
pub use stats::{IterationStats, MigrationSummary, Outcome};
pub use zero::is_zero_page;

/// Guest page size the protocol and digests work in (4 KiB).
pub const PAGE_SIZE: u64 = 4096;
