//! The dirty ring ABI shared with the kernel: `struct kvm_dirty_gfn` and its flag state machine.
//!
//! Entry states (api.rst): `00` empty, `01` dirty (published by KVM), `1X` harvested (userspace
//! set RESET; KVM ignores DIRTY then), back to `00` after `KVM_RESET_DIRTY_RINGS`.

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty gfn published by KVM.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: userspace harvested the entry; KVM may recycle it on reset.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// `KVM_DIRTY_GFN_F_MASK`: the bits of `flags` that carry state.
pub const KVM_DIRTY_GFN_F_MASK: u32 = 0x3;
/// Page offset (in host pages) of the ring inside the vCPU fd mapping (x86 and arm64).
pub const KVM_DIRTY_LOG_PAGE_OFFSET: u64 = 64;
/// Size of one ring entry in bytes.
pub const DIRTY_GFN_SIZE: usize = 16;
/// Entries the kernel keeps in reserve above the soft limit (`KVM_DIRTY_RING_RSVD_ENTRIES`).
pub const KVM_DIRTY_RING_RSVD_ENTRIES: u32 = 64;
/// Largest ring the kernel accepts, in entries (`KVM_DIRTY_RING_MAX_ENTRIES`).
pub const KVM_DIRTY_RING_MAX_ENTRIES: u32 = 65536;

/// One ring entry, laid out exactly as `struct kvm_dirty_gfn { u32 flags; u32 slot; u64 offset; }`.
///
/// Every field is an atomic so that concurrent access by the kernel (or a software producer)
/// and by userspace threads is free of data races; only `flags` carries ordering.
#[repr(C)]
#[derive(Debug, Default)]
pub struct DirtyGfn {
    /// State bits, see the `KVM_DIRTY_GFN_F_*` constants.
    pub(crate) flags: AtomicU32,
    /// `(as_id << 16) | slot_id`.
    pub(crate) slot: AtomicU32,
    /// Page offset of the dirty gfn inside the memslot.
    pub(crate) offset: AtomicU64,
}

// Compile-time ABI checks: size and field offsets must match the kernel's struct.
#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<DirtyGfn>() == DIRTY_GFN_SIZE);
    assert!(std::mem::align_of::<DirtyGfn>() == 8);
    assert!(std::mem::offset_of!(DirtyGfn, flags) == 0);
    assert!(std::mem::offset_of!(DirtyGfn, slot) == 4);
    assert!(std::mem::offset_of!(DirtyGfn, offset) == 8);
    assert!(std::mem::size_of::<DirtyGfn>() == std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>());
};

impl DirtyGfn {
    /// A snapshot of the raw fields (relaxed loads; for diagnostics and tests only).
    pub fn snapshot(&self) -> (u32, u32, u64) {
        (
            self.flags.load(Ordering::Relaxed),
            self.slot.load(Ordering::Relaxed),
            self.offset.load(Ordering::Relaxed),
        )
    }
}

/// A memslot identifier as the ring encodes it: `(as_id << 16) | slot_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(pub u32);

impl SlotId {
    /// Encodes an address-space id and a slot id.
    pub const fn new(as_id: u16, slot_id: u16) -> Self {
        SlotId(((as_id as u32) << 16) | slot_id as u32)
    }
    /// The address space (1 is SMM on x86).
    pub const fn as_id(self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// The slot number inside its address space.
    pub const fn slot_id(self) -> u16 {
        self.0 as u16
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn slot_encoding_round_trips_as_id_and_slot() {
        let s = SlotId::new(1, 7);
        assert_eq!(s.0, 0x0001_0007);
        assert_eq!(s.as_id(), 1);
        assert_eq!(s.slot_id(), 7);
        assert_eq!(SlotId(0xffff_ffff).slot_id(), 0xffff);
    }
}
