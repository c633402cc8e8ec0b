//! A software dirty ring *producer* with the kernel's semantics and the same ABI.
//!
//! It mirrors `virt/kvm/dirty_ring.c`: `push` writes slot/offset, then publishes `DIRTY` with a
//! release store (the kernel's `smp_wmb(); flags = DIRTY`), and reports *soft full* once
//! `used >= size - reserved`; pushing into a completely full ring is refused (the kernel WARNs).
//! `reset` walks from the private reset index while entries are marked RESET (load-acquire),
//! hands each harvested gfn to a re-arm callback and clears it with a store-release.
//!
//! Uses: testing [`RingConsumer`](crate::RingConsumer) without KVM (including the loom model),
//! and logging the VMM's own guest-memory writes through the same consumer code.

use std::sync::Arc;

use crate::abi::{DirtyGfn, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET};
use crate::error::{DirtyError, Result};
use crate::ring::{RingConsumer, RingStorage};
use crate::sync::{AtomicU32, Ordering};

/// Memory shared by the producer, the consumer and the resetter of a software ring.
#[derive(Debug)]
pub struct SoftRingShared {
    entries: Box<[DirtyGfn]>,
    /// The resetter's index, published so the producer can compute `used`.
    reset_index: AtomicU32,
}

impl RingStorage for SoftRingShared {
    fn entries(&self) -> &[DirtyGfn] {
        &self.entries
    }
}

/// Result of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushOutcome {
    /// `used >= soft_limit` after this push: the kernel would now exit with
    /// `KVM_EXIT_DIRTY_RING_FULL` before re-entering the guest.
    pub soft_full: bool,
}

/// The producing side (the kernel's `kvm_dirty_ring_push`).
#[derive(Debug)]
pub struct SoftRingProducer {
    shared: Arc<SoftRingShared>,
    mask: u32,
    soft_limit: u32,
    dirty_index: u32,
}

/// The resetting side (the kernel's `kvm_dirty_ring_reset`).
#[derive(Debug)]
pub struct SoftRingResetter {
    shared: Arc<SoftRingShared>,
    mask: u32,
    reset_index: u32,
}

/// Creates a software ring of `entries` entries (a power of two) with `reserved` entries kept
/// above the soft limit; returns its producer, consumer and resetter.
pub fn soft_ring(
    entries: u32,
    reserved: u32,
) -> Result<(
    SoftRingProducer,
    RingConsumer<Arc<SoftRingShared>>,
    SoftRingResetter,
)> {
    if entries == 0 || !entries.is_power_of_two() {
        return Err(DirtyError::RingSizeNotPowerOfTwo { entries });
    }
    if reserved >= entries {
        return Err(DirtyError::RingTooSmall {
            entries,
            min: reserved + 1,
        });
    }
    let shared = Arc::new(SoftRingShared {
        entries: (0..entries).map(|_| DirtyGfn::default()).collect(),
        reset_index: AtomicU32::new(0),
    });
    let mask = entries - 1;
    Ok((
        SoftRingProducer {
            shared: shared.clone(),
            mask,
            soft_limit: entries - reserved,
            dirty_index: 0,
        },
        RingConsumer::new(shared.clone()),
        SoftRingResetter {
            shared,
            mask,
            reset_index: 0,
        },
    ))
}

impl SoftRingProducer {
    /// Entries pushed and not yet reset.
    pub fn used(&self) -> u32 {
        self.dirty_index
            .wrapping_sub(self.shared.reset_index.load(Ordering::Acquire))
    }

    /// True when the ring is at or above its soft limit.
    pub fn is_soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }

    /// Publishes one dirty gfn. Refuses to overwrite an entry that was not reset.
    pub fn push(&mut self, slot: u32, offset: u64) -> Result<PushOutcome> {
        let size = self.mask.wrapping_add(1);
        if self.used() >= size {
            return Err(DirtyError::RingFull { size });
        }
        let e = &self.shared.entries[(self.dirty_index & self.mask) as usize];
        e.slot.store(slot, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        // Release: the consumer's acquire of DIRTY must see slot/offset (kernel: smp_wmb()).
        e.flags.store(KVM_DIRTY_GFN_F_DIRTY, Ordering::Release);
        self.dirty_index = self.dirty_index.wrapping_add(1);
        Ok(PushOutcome {
            soft_full: self.is_soft_full(),
        })
    }
}

impl SoftRingResetter {
    /// Recycles every harvested entry in order, calling `rearm(slot, offset)` for each (the
    /// kernel re-protects the page there); returns how many were reset.
    pub fn reset(&mut self, mut rearm: impl FnMut(u32, u64)) -> u64 {
        let mut n = 0;
        loop {
            let e = &self.shared.entries[(self.reset_index & self.mask) as usize];
            // Acquire pairs with the consumer's store-release of RESET.
            if e.flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_RESET == 0 {
                break;
            }
            rearm(
                e.slot.load(Ordering::Relaxed),
                e.offset.load(Ordering::Relaxed),
            );
            e.flags.store(0, Ordering::Release);
            self.reset_index = self.reset_index.wrapping_add(1);
            // Publish the freed entry to the producer.
            self.shared
                .reset_index
                .store(self.reset_index, Ordering::Release);
            n += 1;
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn push_reports_soft_full_at_size_minus_reserved_and_refuses_when_full() {
        let (mut p, mut c, mut r) = soft_ring(8, 2).unwrap();
        for i in 0..5 {
            assert!(!p.push(1, i).unwrap().soft_full, "entry {i}");
        }
        assert!(p.push(1, 5).unwrap().soft_full, "6 used = soft limit");
        p.push(1, 6).unwrap();
        p.push(1, 7).unwrap();
        assert!(matches!(
            p.push(1, 8),
            Err(DirtyError::RingFull { size: 8 })
        ));
        // Nothing is recycled before a harvest.
        assert_eq!(r.reset(|_, _| {}), 0);
        let mut seen = Vec::new();
        let (stats, tok) = c.harvest(|s, o| seen.push((s, o)));
        assert_eq!(stats.entries, 8);
        assert_eq!(tok.count, 8);
        assert_eq!(seen, (0..8).map(|o| (1, o)).collect::<Vec<_>>());
        let mut rearmed = Vec::new();
        assert_eq!(r.reset(|s, o| rearmed.push((s, o))), 8);
        assert_eq!(rearmed, seen);
        assert_eq!(c.confirm_reset(), 8);
        assert_eq!(p.used(), 0);
    }

    #[test]
    fn consumer_keeps_fetch_index_across_wraps_and_never_skips() {
        let (mut p, mut c, mut r) = soft_ring(4, 1).unwrap();
        let mut next = 0u64;
        let mut expected = 0u64;
        for round in 0..50 {
            let burst = (round % 4) + 1;
            for _ in 0..burst.min(4 - p.used() as u64) {
                p.push(0x10002, next).unwrap();
                next += 1;
            }
            let (_, tok) = c.harvest(|slot, off| {
                assert_eq!(slot, 0x10002);
                assert_eq!(off, expected, "entries come out in push order");
                expected += 1;
            });
            assert_eq!(r.reset(|_, _| {}), tok.count);
        }
        assert_eq!(expected, next);
        assert_eq!(c.total_harvested(), next);
    }

    #[test]
    fn peek_counts_without_consuming_and_harvest_takes_over() {
        let (mut p, mut c, mut r) = soft_ring(16, 4).unwrap();
        for i in 0..5 {
            p.push(1, i).unwrap();
        }
        assert_eq!(c.peek(), 5);
        assert_eq!(c.peek(), 0, "nothing new");
        assert_eq!((c.pending(), c.seen()), (5, 5));
        assert_eq!(
            r.reset(|_, _| {}),
            0,
            "peeked entries are not harvested, so not reset"
        );
        let mut got = vec![];
        let (st, _) = c.harvest(|_, o| got.push(o));
        assert_eq!(st.entries, 5);
        assert_eq!(
            got,
            vec![0, 1, 2, 3, 4],
            "harvest still sees every peeked entry in order"
        );
        assert_eq!((c.pending(), c.seen()), (0, 5));
        assert_eq!(r.reset(|_, _| {}), 5);
        for i in 0..3 {
            p.push(1, 10 + i).unwrap();
        }
        assert_eq!(c.peek(), 3);
        assert_eq!(c.seen(), 8);
    }

    #[test]
    fn reset_stops_at_first_unharvested_entry() {
        let (mut p, mut c, mut r) = soft_ring(4, 0).unwrap();
        p.push(0, 1).unwrap();
        let (_, tok) = c.harvest(|_, _| {});
        assert_eq!(tok.count, 1);
        p.push(0, 2).unwrap();
        // Entry 1 is DIRTY, not harvested: reset must recycle only entry 0.
        assert_eq!(r.reset(|_, _| {}), 1);
        assert_eq!(p.used(), 1);
    }

    #[test]
    fn bad_sizes_are_typed_errors() {
        assert!(matches!(
            soft_ring(6, 1),
            Err(DirtyError::RingSizeNotPowerOfTwo { .. })
        ));
        assert!(matches!(
            soft_ring(4, 4),
            Err(DirtyError::RingTooSmall { .. })
        ));
    }
}
