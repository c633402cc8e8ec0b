//! Writes the VMM itself makes to guest memory. KVM never sees them (no vCPU faults), so
//! every tracker ORs this log into `collect`, as Cloud Hypervisor and Firecracker do.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::pageset::{DirtyPageSet, SlotSpec};
use crate::PAGE_SIZE;

/// A lock-free page bitmap per slot that VMM code marks after writing guest memory.
#[derive(Debug)]
pub struct VmmWriteLog {
    slots: Vec<SlotSpec>,
    bits: Vec<Box<[AtomicU64]>>,
    /// One bit per word of `bits`, set after the word's bits.
    summary: Vec<Box<[AtomicU64]>>,
    /// One bit per word of `summary`, set after the summary bit, so draining costs
    /// O(marked words + memory / 256 Ki pages): 64 loads for 64 GiB when nothing was marked.
    top: Vec<Box<[AtomicU64]>>,
    /// Bit `i` (`i < 63`) is set after a mark of slot `i`; bit 63 after a mark of any slot
    /// from 63 on. A drain visits only the slots flagged here, so with nothing marked it
    /// costs one load, and a mark in one slot does not make it scan every other slot's top.
    marked: AtomicU64,
}

/// The bit of [`VmmWriteLog::marked`] that stands for slot index `i`.
fn marked_bit(i: usize) -> u64 {
    1 << i.min(63)
}

fn zeroed(words: usize) -> Box<[AtomicU64]> {
    (0..words).map(|_| AtomicU64::new(0)).collect()
}

impl VmmWriteLog {
    /// An empty log over `slots`.
    pub fn new(slots: &[SlotSpec]) -> Self {
        VmmWriteLog {
            slots: slots.to_vec(),
            bits: slots.iter().map(|s| zeroed(s.bitmap_words())).collect(),
            summary: slots
                .iter()
                .map(|s| zeroed(s.bitmap_words().div_ceil(64)))
                .collect(),
            top: slots
                .iter()
                .map(|s| zeroed(s.bitmap_words().div_ceil(64 * 64)))
                .collect(),
            marked: AtomicU64::new(0),
        }
    }

    /// Records a write of `len` bytes at guest physical address `gpa`. Parts outside every
    /// slot are ignored (they are not RAM this log covers).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = gpa.saturating_add(len - 1);
        for (i, s) in self.slots.iter().enumerate() {
            let s_end = s.guest_phys_addr + s.bytes();
            if end < s.guest_phys_addr || gpa >= s_end {
                continue;
            }
            let first = (gpa.max(s.guest_phys_addr) - s.guest_phys_addr) / PAGE_SIZE;
            let last = (end.min(s_end - 1) - s.guest_phys_addr) / PAGE_SIZE;
            for p in first..=last {
                let wi = (p / 64) as usize;
                self.bits[i][wi].fetch_or(1 << (p % 64), Ordering::Release);
                let si = wi / 64;
                self.summary[i][si].fetch_or(1 << (wi % 64), Ordering::Release);
                self.top[i][si / 64].fetch_or(1 << (si % 64), Ordering::Release);
            }
            // Last, so a drain that sees this bit sees the levels below it.
            self.marked.fetch_or(marked_bit(i), Ordering::Release);
        }
    }

    /// Moves every recorded page into `out` and clears the log; returns the pages moved.
    pub fn drain_into(&self, out: &mut DirtyPageSet) -> u64 {
        let mut n = 0;
        // Swapped to 0 before the levels are read: a mark racing with this drain sets its bit
        // again after its levels, so whatever this drain misses, the next one visits.
        let marked = self.marked.swap(0, Ordering::Acquire);
        if marked == 0 {
            return 0;
        }
        for (i, s) in self.slots.iter().enumerate() {
            if marked & marked_bit(i) == 0 {
                continue;
            }
            let Some(dst) = out.slot_index(s.id.0) else {
                continue;
            };
            // Top down, each level swapped to 0 before the one below is read: a mark sets the
            // levels bottom up, so a bit this drain misses keeps its upper bits for the next.
            for (ti, tw) in self.top[i].iter().enumerate() {
                if tw.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let mut t = tw.swap(0, Ordering::Acquire);
                while t != 0 {
                    let si = ti * 64 + t.trailing_zeros() as usize;
                    t &= t - 1;
                    let mut m = self.summary[i][si].swap(0, Ordering::Acquire);
                    while m != 0 {
                        let wi = si * 64 + m.trailing_zeros() as usize;
                        m &= m - 1;
                        let mut v = self.bits[i][wi].swap(0, Ordering::Acquire);
                        n += v.count_ones() as u64;
                        while v != 0 {
                            let b = v.trailing_zeros() as u64;
                            v &= v - 1;
                            out.insert_at(dst, wi as u64 * 64 + b);
                        }
                    }
                }
            }
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::abi::SlotId;

    #[test]
    fn mark_covers_every_page_touched_and_drain_empties_the_log() {
        let slots = [SlotSpec {
            id: SlotId::new(0, 3),
            guest_phys_addr: 0x10000,
            pages: 16,
            log_dirty: true,
        }];
        let log = VmmWriteLog::new(&slots);
        log.mark(0x10ff8, 16); // straddles pages 0 and 1
        log.mark(0x0, 0x10001); // ends in page 0 of the slot
        log.mark(0x1f000, 0x5000); // page 15 then past the end
        let mut out = DirtyPageSet::new(&slots);
        assert_eq!(log.drain_into(&mut out), 3);
        let pages: Vec<u64> = out.iter().map(|(_, p)| p).collect();
        assert_eq!(pages, vec![0, 1, 15]);
        out.clear();
        assert_eq!(log.drain_into(&mut out), 0);
    }

    #[test]
    fn drain_visits_the_marked_slots_including_those_past_the_flag_bits() {
        // 66 one-page slots: slots 63, 64 and 65 share the last flag bit.
        let slots: Vec<SlotSpec> = (0..66u16)
            .map(|i| SlotSpec {
                id: SlotId::new(0, i),
                guest_phys_addr: u64::from(i) << 20,
                pages: 1,
                log_dirty: true,
            })
            .collect();
        let log = VmmWriteLog::new(&slots);
        let mut out = DirtyPageSet::new(&slots);
        assert_eq!(log.drain_into(&mut out), 0, "nothing marked");
        for i in [2u64, 62, 64, 65] {
            log.mark(i << 20, 1);
        }
        assert_eq!(log.drain_into(&mut out), 4);
        let got: Vec<u64> = out.iter_gpa().collect();
        assert_eq!(got, vec![2 << 20, 62 << 20, 64 << 20, 65 << 20]);
        out.clear();
        assert_eq!(log.drain_into(&mut out), 0, "the drain emptied the log");
        log.mark(63 << 20, 1);
        assert_eq!(log.drain_into(&mut out), 1);
        assert!(out.contains_gpa(63 << 20));
    }
}
