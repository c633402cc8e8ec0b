//! Dirty page tracking for KVM guests: the per-vCPU dirty ring, the classic dirty bitmap and
//! the manual clear-log bitmap, behind one [`DirtyTracker`] trait.
//!
//! Module map:
//! - [`abi`]: the `struct kvm_dirty_gfn` entry layout, flag constants and slot encoding.
//! - [`ring`]: ring sizing rules and the per-vCPU ring *consumer* (harvest protocol).
//! - [`producer`]: a software ring *producer* with the kernel's push/reset semantics.
//! - [`pageset`]: [`DirtyPageSet`], the reusable per-slot page bitmap that collections fill.
//! - [`bitmap`]: `KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG` collection into caller buffers.
//! - [`tracker`]: the [`DirtyTracker`] trait and its three KVM-backed implementations.
//! - [`vmm_log`]: tracking of writes the VMM itself makes to guest memory.
//! - `sys` (private): the only module with `unsafe`: ioctls and the ring mmap.
//!
//! The ring protocol (see `docs/ARCHITECTURE.md`): load `flags` with Acquire and require
//! exactly DIRTY; read slot/offset; store RESET with Release; never rewrite slot/offset; never
//! skip an entry; call `KVM_RESET_DIRTY_RINGS` before anyone reads the pages' contents.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod abi;
pub mod bitmap;
mod error;
pub mod pageset;
pub mod producer;
pub mod ring;
mod sync;
mod sys;
pub mod tracker;
pub mod vmm_log;

pub use abi::{DirtyGfn, SlotId};
pub use error::{DirtyError, Result};
pub use pageset::DirtyPageSet;
pub use ring::{
    enable_dirty_ring, probe_ring, HarvestStats, Resync, RingCapability, RingConsumer, RingFlavor,
    RingSize, RingStorage, UnresetEntries,
};
pub use sys::{is_pvm_host, MmapRing};
pub use tracker::{
    BitmapTracker, ClearLogTracker, CollectStats, DirtyTracker, RingCollect, RingSet, RingTracker,
    SlotSpec, TrackerMode,
};
pub use vmm_log::VmmWriteLog;

/// Size of a guest page tracked by KVM on x86-64 (4 KiB).
pub const PAGE_SIZE: u64 = 4096;
