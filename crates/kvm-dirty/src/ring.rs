//! Ring sizing and enabling rules, and the per-vCPU ring consumer.
//!
//! The consumer implements the userspace half of the protocol in api.rst:
//! 1. load `flags` with Acquire and require exactly `DIRTY` (anything else ends the walk);
//! 2. read `slot` and `offset` (never written by userspace);
//! 3. store `RESET` with Release, so the kernel's reset, which load-acquires `flags`, is
//!    guaranteed to see the slot/offset the kernel itself published;
//! 4. advance a persistent fetch index, never skipping an entry.
//!
//! Harvested entries are only *marked*; the kernel recycles them and re-protects their pages in
//! `KVM_RESET_DIRTY_RINGS`. Every harvest returns an [`UnresetEntries`] token that must be
//! handed to a reset before anyone reads the pages (the trackers do this for you).

use kvm_ioctls::VmFd;

use crate::abi::{
    DirtyGfn, DIRTY_GFN_SIZE, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET,
    KVM_DIRTY_RING_MAX_ENTRIES, KVM_DIRTY_RING_RSVD_ENTRIES,
};
use crate::error::{DirtyError, Result};
use crate::sync::Ordering;
use crate::PAGE_SIZE;

/// Smallest ring the kernel can accept anywhere: one host page of entries (256 on 4 KiB
/// pages), which is also above the 64 reserved entries. Hosts with PML reserve 512 more and
/// need 1024; KVM's refusal is reported as [`DirtyError::RingEnableRejected`].
pub const MIN_RING_ENTRIES: u32 = {
    let page = PAGE_SIZE as u32 / DIRTY_GFN_SIZE as u32;
    if page > KVM_DIRTY_RING_RSVD_ENTRIES {
        page
    } else {
        KVM_DIRTY_RING_RSVD_ENTRIES
    }
};

/// The ring size recommended by api.rst and QEMU (64 KiB per vCPU).
pub const DEFAULT_RING_ENTRIES: u32 = 4096;

/// Which ring capability is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingFlavor {
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: the kernel documents acquire/release pairing.
    AcqRel,
    /// `KVM_CAP_DIRTY_LOG_RING`: the original x86-only (TSO) capability.
    Plain,
}

impl RingFlavor {
    fn cap(self) -> u32 {
        match self {
            RingFlavor::AcqRel => kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            RingFlavor::Plain => kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
        }
    }
}

/// A validated ring size, in entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSize(u32);

impl RingSize {
    /// Validates `entries` against the power-of-two rule, the kernel minimum and `max_entries`.
    pub fn new(entries: u32, max_entries: u32) -> Result<Self> {
        if entries < MIN_RING_ENTRIES {
            return Err(DirtyError::RingTooSmall {
                entries,
                min: MIN_RING_ENTRIES,
            });
        }
        if !entries.is_power_of_two() {
            return Err(DirtyError::RingSizeNotPowerOfTwo { entries });
        }
        let max = max_entries.min(KVM_DIRTY_RING_MAX_ENTRIES);
        if entries > max {
            return Err(DirtyError::RingTooLarge { entries, max });
        }
        Ok(RingSize(entries))
    }
    /// Entries in the ring.
    pub fn entries(self) -> u32 {
        self.0
    }
    /// Bytes per vCPU ring (what `KVM_ENABLE_CAP` takes).
    pub fn bytes(self) -> u64 {
        self.0 as u64 * DIRTY_GFN_SIZE as u64
    }
    /// The kernel's soft limit (`size - reserved`) assuming no PML reserve.
    pub fn soft_limit(self) -> u32 {
        self.0 - KVM_DIRTY_RING_RSVD_ENTRIES
    }

    /// The lowest soft limit any host can apply to this size: x86 with PML reserves
    /// [`PML_RESERVED_ENTRIES`] more than the 64 entries every host keeps, and rings of at
    /// least 1024 entries are the only ones such a host accepts. A ring-full exit means at
    /// least this many entries are in use; overrun detection and resync rely on that bound.
    pub fn min_soft_limit(self) -> u32 {
        let rsvd = if self.0 >= 1024 {
            KVM_DIRTY_RING_RSVD_ENTRIES + PML_RESERVED_ENTRIES
        } else {
            KVM_DIRTY_RING_RSVD_ENTRIES
        };
        self.0 - rsvd
    }
}

/// Entries x86 KVM reserves on top of the 64 when PML is on (`kvm_cpu_dirty_log_size`).
pub const PML_RESERVED_ENTRIES: u32 = 512;

/// What the host offers: the preferred flavor and the maximum size in entries.
pub fn probe_ring(vm: &VmFd) -> Result<(RingFlavor, u32)> {
    for flavor in [RingFlavor::AcqRel, RingFlavor::Plain] {
        let bytes = vm.check_extension_raw(flavor.cap() as libc::c_ulong);
        if bytes > 0 {
            return Ok((flavor, (bytes as u64 / DIRTY_GFN_SIZE as u64) as u32));
        }
    }
    Err(DirtyError::RingUnsupported)
}

/// Proof that the dirty ring was enabled on a VM, with its size and flavor.
///
/// Only [`enable_dirty_ring`] creates it; the VMM's builder calls that before it creates any
/// vCPU, and the kernel refuses it afterwards.
#[derive(Debug, Clone, Copy)]
pub struct RingCapability {
    /// Size of every vCPU's ring.
    pub size: RingSize,
    /// Capability used.
    pub flavor: RingFlavor,
    /// Largest size the host would have accepted.
    pub max_entries: u32,
}

/// Enables the dirty ring with `entries` entries per vCPU (prefers `_ACQ_REL`).
///
/// Must be called after `KVM_CREATE_VM` and before any `KVM_CREATE_VCPU`; `vcpus_created` is
/// the caller's count, checked first so the error says what went wrong.
pub fn enable_dirty_ring(vm: &VmFd, entries: u32, vcpus_created: usize) -> Result<RingCapability> {
    if vcpus_created != 0 {
        return Err(DirtyError::RingAfterVcpus {
            vcpus: vcpus_created,
        });
    }
    let (flavor, max_entries) = probe_ring(vm)?;
    let size = RingSize::new(entries, max_entries)?;
    let cap = kvm_bindings::kvm_enable_cap {
        cap: flavor.cap(),
        args: [size.bytes(), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| DirtyError::RingEnableRejected {
            entries,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    Ok(RingCapability {
        size,
        flavor,
        max_entries,
    })
}

/// Memory holding a ring's entries: a vCPU mapping or a software buffer.
pub trait RingStorage: Send + Sync {
    /// The entries; the length is a power of two.
    fn entries(&self) -> &[DirtyGfn];
}

impl<T: RingStorage + ?Sized> RingStorage for std::sync::Arc<T> {
    fn entries(&self) -> &[DirtyGfn] {
        (**self).entries()
    }
}

impl<T: RingStorage + ?Sized> RingStorage for &T {
    fn entries(&self) -> &[DirtyGfn] {
        (**self).entries()
    }
}

impl RingStorage for Box<[DirtyGfn]> {
    fn entries(&self) -> &[DirtyGfn] {
        self
    }
}

/// Entries harvested (marked RESET) but not yet recycled by `KVM_RESET_DIRTY_RINGS`.
///
/// Pages named by these entries may be written again by the guest without being reported until
/// the reset re-protects them, so their contents must not be read before the reset.
#[must_use = "harvested entries must be reset (KVM_RESET_DIRTY_RINGS) before page contents are read"]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnresetEntries {
    /// Number of entries marked RESET.
    pub count: u64,
}

impl UnresetEntries {
    /// Combines tokens from several rings.
    pub fn merge(self, other: UnresetEntries) -> UnresetEntries {
        UnresetEntries {
            count: self.count + other.count,
        }
    }
}

/// Statistics of one harvest of one ring.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HarvestStats {
    /// Entries harvested.
    pub entries: u64,
    /// The last entry harvested, as `(slot, offset)`.
    pub last: Option<(u32, u64)>,
}

/// The userspace consumer of one ring. Owns the persistent fetch index.
#[derive(Debug)]
pub struct RingConsumer<S: RingStorage> {
    storage: S,
    mask: u32,
    /// Next entry to look at (free-running, wraps).
    fetch: u32,
    /// First entry harvested but not yet known to be reset (free-running).
    unreset_from: u32,
    /// Total entries harvested over the ring's life.
    total: u64,
    /// How far [`RingConsumer::peek`] has looked (free-running, never behind `fetch`).
    peek: u32,
    /// `fetch` at the last quiescent point ([`RingConsumer::set_mark`]): the end of the last
    /// ring-full handling. A ring-full exit with less progress than the soft limit since then
    /// means the kernel's indices and this consumer's are out of step.
    mark: u32,
    /// A reset stopped short of what this consumer harvested (an overrun overwrote an entry
    /// marked RESET before the reset reached it): the kernel's reset index is stuck at or
    /// after `unreset_from`, until [`RingConsumer::resync`].
    stuck: bool,
}

/// What [`RingConsumer::resync`] did to bring the consumer back in step with the kernel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resync {
    /// Entries marked RESET that held no unharvested gfn: entries the kernel counts as in use
    /// but whose flags an earlier (misaligned) reset already cleared.
    pub holes: u32,
    /// DIRTY entries found away from the fetch index and harvested (reported to the sink).
    pub harvested: u64,
    /// Entries the next `KVM_RESET_DIRTY_RINGS` must reset on this ring, from the kernel's
    /// reset index; 0 when the ring looked consistent and nothing was marked.
    pub to_reset: u64,
    /// No DIRTY entry was found and the holes were marked blind (the kernel's whole in-use
    /// region had been cleared): only `min_soft_limit` of them, so the kernel's reset index
    /// never passes its dirty index; the next ring-full exit finishes the job.
    pub blind: bool,
}

impl<S: RingStorage> RingConsumer<S> {
    /// A consumer starting at entry 0 (where the kernel starts pushing).
    pub fn new(storage: S) -> Self {
        let n = storage.entries().len();
        debug_assert!(n.is_power_of_two());
        RingConsumer {
            storage,
            mask: (n as u32).wrapping_sub(1),
            fetch: 0,
            unreset_from: 0,
            total: 0,
            peek: 0,
            mark: 0,
            stuck: false,
        }
    }

    /// Counts entries the kernel published since the last peek, without harvesting them:
    /// a cheap per-vCPU dirty-rate probe that leaves pages write-enabled (no reset, so a hot
    /// page costs no new write-protect fault). Returns the number of newly seen entries.
    pub fn peek(&mut self) -> u32 {
        let len = self.len();
        if self.peek.wrapping_sub(self.fetch) > len {
            self.peek = self.fetch;
        }
        let entries = self.storage.entries();
        let mut n = 0;
        while self.peek.wrapping_sub(self.fetch) < len {
            let e = &entries[(self.peek & self.mask) as usize];
            // Acquire as in `harvest`; only the flags are read here.
            if e.flags.load(Ordering::Acquire) != KVM_DIRTY_GFN_F_DIRTY {
                break;
            }
            self.peek = self.peek.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Entries published but not yet harvested, as of the last peek or harvest.
    pub fn pending(&self) -> u32 {
        let d = self.peek.wrapping_sub(self.fetch);
        if d > self.len() {
            0
        } else {
            d
        }
    }

    /// Entries ever seen (harvested, or peeked and waiting): monotonic.
    pub fn seen(&self) -> u64 {
        self.total + u64::from(self.pending())
    }

    /// Entries in this ring.
    pub fn len(&self) -> u32 {
        self.mask.wrapping_add(1)
    }

    /// Never true: a ring has at least one entry. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Total entries harvested so far.
    pub fn total_harvested(&self) -> u64 {
        self.total
    }

    /// The persistent fetch index (free-running).
    pub fn fetch_index(&self) -> u32 {
        self.fetch
    }

    /// Harvests every consecutive DIRTY entry from the fetch index, calling `sink(slot, offset)`
    /// for each in ring order. Allocates nothing. A harvest of a whole lap
    /// (`stats.entries == len()`) means the ring was completely full, past the kernel's
    /// reserve: on a host with the overrun defect, entries may have been overwritten.
    pub fn harvest(&mut self, sink: impl FnMut(u32, u64)) -> (HarvestStats, UnresetEntries) {
        let limit = self.len();
        let stats = self.harvest_up_to(limit, sink);
        (
            stats,
            UnresetEntries {
                count: stats.entries,
            },
        )
    }

    /// The harvest loop, at most `limit` entries (at most one lap: after it, the next entry
    /// is one this consumer marked RESET itself).
    fn harvest_up_to(&mut self, limit: u32, mut sink: impl FnMut(u32, u64)) -> HarvestStats {
        let entries = self.storage.entries();
        let mut stats = HarvestStats::default();
        for _ in 0..limit.min(self.len()) {
            let e = &entries[(self.fetch & self.mask) as usize];
            // Acquire pairs with the producer's `smp_wmb(); flags = DIRTY`: slot/offset read
            // below are the ones published with this DIRTY.
            if e.flags.load(Ordering::Acquire) != KVM_DIRTY_GFN_F_DIRTY {
                break;
            }
            let slot = e.slot.load(Ordering::Relaxed);
            let offset = e.offset.load(Ordering::Relaxed);
            sink(slot, offset);
            // Release pairs with the reset's acquire of RESET: it must observe slot/offset.
            e.flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            stats.entries += 1;
            stats.last = Some((slot, offset));
        }
        self.total += stats.entries;
        stats
    }

    /// Records the current fetch index as a quiescent point (call at the end of each
    /// ring-full handling, when the vCPU is out of the guest and its ring is consistent).
    pub fn set_mark(&mut self) {
        self.mark = self.fetch;
    }

    /// Entries harvested (by anyone) since [`RingConsumer::set_mark`].
    pub fn progress(&self) -> u32 {
        self.fetch.wrapping_sub(self.mark)
    }

    /// True after a reset stopped short of this ring's harvested entries (see
    /// [`RingConsumer::resync`]).
    pub fn is_stuck(&self) -> bool {
        self.stuck
    }

    /// Brings the consumer back in step with the kernel after an overrun. Call only while
    /// nothing can push to this ring (its vCPU is out of `KVM_RUN`), after a harvest and a
    /// reset, then reset again (`to_reset` entries) and [`RingConsumer::confirm_resync`].
    ///
    /// The kernel keeps two private indices: `reset` (next entry to recycle) and `dirty` (next
    /// entry to fill); `dirty - reset` entries are in use. An overrun (more pushes than the
    /// ring holds) leaves the kernel's `dirty` ahead of where this consumer expects it: after
    /// the next harvest and reset, the entries from the fetch index on that the kernel still
    /// counts as in use read 0 (holes), followed by the DIRTY entries pushed since. The
    /// consumer waits at its fetch index for a DIRTY that never comes and the kernel's reset
    /// waits there for a RESET: every `KVM_RUN` exits ring-full, nothing is harvested or reset.
    ///
    /// Resync, in ring order from the kernel's reset index (store-release of RESET on every
    /// entry, acquire of flags before slot/offset, nothing skipped):
    /// 1. after a reset that stopped short (`is_stuck`), the kernel's reset index is
    ///    `unreset_from` (advanced by exactly the count each reset of this ring returned); every
    ///    entry from there to the fetch index that lacks RESET is marked (a DIRTY one,
    ///    overwritten before the reset reached it, is also reported);
    /// 2. from the fetch index, the holes up to the first DIRTY entry are marked RESET and the
    ///    DIRTY run is harvested: the kernel's dirty index is the end of that run;
    /// 3. if no entry is DIRTY, `blind_holes` holes (0 = none) are marked: the caller passes
    ///    the host's minimum soft limit only when a ring-full exit happened with no progress
    ///    since the last quiescent point, which proves at least that many entries are in use.
    pub fn resync(&mut self, blind_holes: u32, mut sink: impl FnMut(u32, u64)) -> Resync {
        let n = self.len();
        let entries = self.storage.entries();
        let mut out = Resync::default();
        // 1. The kernel's reset index is `unreset_from` (kept exact by the per-ring reset
        // counts); an entry there lacking RESET stopped the last reset.
        let r = self.unreset_from;
        let behind = self.fetch.wrapping_sub(r).min(n);
        for k in 0..behind {
            let e = &entries[(r.wrapping_add(k) & self.mask) as usize];
            let f = e.flags.load(Ordering::Acquire);
            if f & KVM_DIRTY_GFN_F_RESET != 0 {
                continue;
            }
            if f == KVM_DIRTY_GFN_F_DIRTY {
                sink(
                    e.slot.load(Ordering::Relaxed),
                    e.offset.load(Ordering::Relaxed),
                );
                out.harvested += 1;
            } else {
                out.holes += 1;
            }
            e.flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
        }
        self.total += out.harvested;
        // 2. Holes, then the DIRTY run, within what is left of one lap from `r`.
        let room = n - behind;
        let mut h = 0u32;
        while h < room
            && entries[(self.fetch.wrapping_add(h) & self.mask) as usize]
                .flags
                .load(Ordering::Acquire)
                != KVM_DIRTY_GFN_F_DIRTY
        {
            h += 1;
        }
        let holes = if h < room {
            h
        } else {
            out.blind = blind_holes > 0;
            blind_holes.min(room)
        };
        for _ in 0..holes {
            let e = &entries[(self.fetch & self.mask) as usize];
            // Release like a harvest: the reset reads (stale) slot/offset after acquiring it.
            e.flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
        }
        out.holes += holes;
        if h < room {
            out.harvested += self.harvest_up_to(room - h, &mut sink).entries;
        }
        out.to_reset = u64::from(self.fetch.wrapping_sub(r));
        self.peek = self.fetch;
        out
    }

    /// After the reset that follows [`RingConsumer::resync`]: true when the kernel recycled
    /// every entry the resync marked (all read 0 or were re-published), i.e. the kernel's
    /// reset index is at the fetch index again and the consumer is in step.
    pub fn confirm_resync(&mut self) -> bool {
        self.confirm_reset();
        self.stuck = self.unreset() != 0;
        !self.stuck
    }

    /// Records a reset of this ring that returned `reset` entries, fewer than
    /// [`RingConsumer::unreset`]: the kernel's reset index moved exactly that far and stopped
    /// at an entry an overrun overwrote; the ring is stuck until a resync.
    pub(crate) fn reset_short(&mut self, reset: u64) {
        self.unreset_from = self.unreset_from.wrapping_add(reset as u32);
        self.stuck = true;
    }

    /// Records a reset that recycled every harvested entry.
    pub(crate) fn reset_complete(&mut self) {
        self.unreset_from = self.fetch;
        self.stuck = false;
    }

    /// Number of entries harvested since the last confirmed reset.
    pub fn unreset(&self) -> u32 {
        self.fetch.wrapping_sub(self.unreset_from)
    }

    /// After a reset, checks that every entry this consumer harvested was recycled (flags back
    /// to 0) and returns how many were; entries still marked RESET are left for the next reset.
    pub fn confirm_reset(&mut self) -> u64 {
        let entries = self.storage.entries();
        let mut n = 0;
        while self.unreset_from != self.fetch {
            let e = &entries[(self.unreset_from & self.mask) as usize];
            // The kernel clears with a store-release; anything but a cleared (or already
            // re-published) entry means the reset has not reached it.
            let f = e.flags.load(Ordering::Acquire);
            if f & KVM_DIRTY_GFN_F_RESET != 0 {
                break;
            }
            self.unreset_from = self.unreset_from.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// The underlying storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn ring_size_rejects_non_power_of_two() {
        assert!(matches!(
            RingSize::new(1000, 65536),
            Err(DirtyError::RingSizeNotPowerOfTwo { entries: 1000 })
        ));
    }

    #[test]
    fn ring_size_rejects_below_minimum_and_above_maximum() {
        assert!(matches!(
            RingSize::new(128, 65536),
            Err(DirtyError::RingTooSmall { .. })
        ));
        assert!(matches!(
            RingSize::new(0, 65536),
            Err(DirtyError::RingTooSmall { .. })
        ));
        assert!(matches!(
            RingSize::new(131072, 65536),
            Err(DirtyError::RingTooLarge { max: 65536, .. })
        ));
        assert!(matches!(
            RingSize::new(8192, 4096),
            Err(DirtyError::RingTooLarge { max: 4096, .. })
        ));
        let s = RingSize::new(1024, 65536).unwrap();
        assert_eq!(s.bytes(), 16384);
        assert_eq!(s.soft_limit(), 960);
    }
}
