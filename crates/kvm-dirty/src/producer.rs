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
        Ok(self.push_overrun(slot, offset))
    }

    /// Publishes one dirty gfn even into a completely full ring, overwriting whatever the
    /// entry holds (unharvested or harvested-but-not-reset): what the host in
    /// `pvm-host.md` does when its instruction emulator pushes past the soft limit and the
    /// reserve (the kernel only WARNs). Tests use it to reproduce the overrun.
    pub fn push_overrun(&mut self, slot: u32, offset: u64) -> PushOutcome {
        let e = &self.shared.entries[(self.dirty_index & self.mask) as usize];
        e.slot.store(slot, Ordering::Relaxed);
        e.offset.store(offset, Ordering::Relaxed);
        // Release: the consumer's acquire of DIRTY must see slot/offset (kernel: smp_wmb()).
        e.flags.store(KVM_DIRTY_GFN_F_DIRTY, Ordering::Release);
        self.dirty_index = self.dirty_index.wrapping_add(1);
        PushOutcome {
            soft_full: self.is_soft_full(),
        }
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

    /// The ring-full handling of `RingSet::handle_ring_full` on a software ring (the producer
    /// is quiescent while it runs, as a vCPU out of KVM_RUN is): harvest, reset with the
    /// kernel's count, and resync when less than `min_soft` entries came since the last one.
    /// Returns the offsets reported, in order, and whether a resync marked anything.
    fn ring_full(
        c: &mut RingConsumer<Arc<SoftRingShared>>,
        r: &mut SoftRingResetter,
        min_soft: u32,
    ) -> (Vec<u64>, bool) {
        let mut got = Vec::new();
        let _ = c.harvest(|_, o| got.push(o));
        let reset_kernel = |c: &mut RingConsumer<Arc<SoftRingShared>>, r: &mut SoftRingResetter| {
            let expected = u64::from(c.unreset());
            let n = r.reset(|_, _| {});
            if n == expected {
                c.reset_complete();
            } else {
                c.reset_short(n);
            }
        };
        reset_kernel(c, r);
        let mut resynced = false;
        if c.is_stuck() || c.progress() < min_soft {
            let blind = if c.progress() == 0 && c.unreset() == 0 && !c.is_stuck() {
                min_soft
            } else {
                0
            };
            let rs = c.resync(blind, |_, o| got.push(o));
            if rs.to_reset > 0 {
                resynced = true;
                reset_kernel(c, r);
            }
        }
        c.set_mark();
        (got, resynced)
    }

    #[test]
    fn overrun_puts_the_consumer_out_of_step_and_resync_brings_it_back() {
        // 256 entries, 64 reserved: soft limit 192. The "emulator" pushes 35 entries past a
        // completely full ring before the vCPU exits, as the host in pvm-host.md does.
        let (mut p, mut c, mut r) = soft_ring(256, 64).unwrap();
        let min_soft = 192;
        let mut next = 0u64;
        while !p.is_soft_full() {
            p.push(1, next).unwrap();
            next += 1;
        }
        while p.used() < 256 + 35 {
            p.push_overrun(1, next);
            next += 1;
        }
        let (got, resynced) = ring_full(&mut c, &mut r, min_soft);
        assert_eq!(got.len(), 256, "a whole lap: the overrun's sign");
        assert!(
            !resynced,
            "nothing to resync yet: the kernel's 35 extra entries read 0"
        );
        assert_eq!(
            got[..35],
            (256..291).collect::<Vec<_>>()[..],
            "entries 0..35 were overwritten"
        );
        assert_eq!(
            p.used(),
            35,
            "the kernel counts 35 entries in use whose flags it cleared"
        );
        // The guest runs on until the ring is soft-full again.
        let resumed_at = next;
        while !p.is_soft_full() {
            p.push(1, next).unwrap();
            next += 1;
        }
        // The old consumer: nothing at the fetch index, nothing reset, the vCPU exits forever.
        let (stats, _) = c.harvest(|_, _| {});
        assert_eq!(
            stats.entries, 0,
            "out of step: the fetch index sits on a hole"
        );
        assert_eq!(r.reset(|_, _| {}), 0);
        assert!(p.is_soft_full(), "livelock without a resync");
        // The new handler resyncs: the holes are marked, the DIRTY run is reported in order.
        let (got, resynced) = ring_full(&mut c, &mut r, min_soft);
        assert!(resynced);
        assert_eq!(got, (resumed_at..next).collect::<Vec<_>>());
        assert_eq!(
            p.used(),
            0,
            "the kernel's reset index caught up with its dirty index"
        );
        // In step again: a normal cycle reports every entry and resets it.
        for i in 0..100 {
            p.push(2, 1000 + i).unwrap();
        }
        let (got, resynced) = ring_full(&mut c, &mut r, 0);
        assert!(!resynced);
        assert_eq!(got, (1000..1100).collect::<Vec<_>>());
        assert_eq!(p.used(), 0);
    }

    #[test]
    fn overrun_by_more_than_the_soft_limit_is_resynced_blind_without_passing_the_dirty_index() {
        // The emulator pushed 200 entries past a full ring: after the harvest of the lap and
        // its reset the kernel still counts 200 >= 192 in use, all of them cleared, so the vCPU
        // exits again at once with nothing new in the ring.
        let (mut p, mut c, mut r) = soft_ring(256, 64).unwrap();
        let min_soft = 192;
        let mut next = 0u64;
        while p.used() < 256 + 200 {
            p.push_overrun(1, next);
            next += 1;
        }
        let (got, _) = ring_full(&mut c, &mut r, min_soft);
        assert_eq!(got.len(), 256);
        assert_eq!(p.used(), 200);
        assert!(p.is_soft_full());
        let (got, resynced) = ring_full(&mut c, &mut r, min_soft);
        assert!(got.is_empty());
        assert!(resynced, "no progress since the last exit: marked blind");
        assert_eq!(
            p.used(),
            200 - 192,
            "exactly the minimum soft limit, never more"
        );
        assert!(!p.is_soft_full(), "the guest runs again");
        let resumed_at = next;
        while !p.is_soft_full() {
            p.push(1, next).unwrap();
            next += 1;
        }
        let (got, resynced) = ring_full(&mut c, &mut r, min_soft);
        assert!(resynced, "8 holes, then the new entries");
        assert_eq!(got, (resumed_at..next).collect::<Vec<_>>());
        assert_eq!(p.used(), 0);
    }

    #[test]
    fn reset_stopped_by_an_overwritten_entry_is_resynced_from_the_exact_reset_index() {
        // A collector harvests 100 entries while the vCPU runs; before its reset, the emulator
        // overruns the ring and overwrites entries it had marked RESET. The reset stops there.
        let (mut p, mut c, mut r) = soft_ring(256, 64).unwrap();
        let min_soft = 192;
        let mut next = 0u64;
        for _ in 0..100 {
            p.push(1, next).unwrap();
            next += 1;
        }
        let _ = c.harvest(|_, _| {});
        while p.used() < 256 + 40 {
            p.push_overrun(1, next);
            next += 1;
        }
        assert_eq!(
            r.reset(|_, _| {}),
            0,
            "entry 0 was overwritten (DIRTY): the reset stops"
        );
        c.reset_short(0);
        assert!(c.is_stuck());
        // The vCPU's ring-full exit: harvest, reset, resync until in step.
        let mut reported = Vec::new();
        for _ in 0..3 {
            let (got, _) = ring_full(&mut c, &mut r, min_soft);
            reported.extend(got);
            if p.used() == 0 && !c.is_stuck() {
                break;
            }
        }
        assert!(!c.is_stuck());
        assert_eq!(p.used(), 0, "in step with the kernel again");
        // Every entry pushed after the collector's harvest that survived is reported.
        for o in 256..next {
            assert!(reported.contains(&o), "entry {o} reported");
        }
        for i in 0..10 {
            p.push(3, i).unwrap();
        }
        let (got, resynced) = ring_full(&mut c, &mut r, 0);
        assert!(!resynced);
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        assert_eq!(p.used(), 0);
    }
}
