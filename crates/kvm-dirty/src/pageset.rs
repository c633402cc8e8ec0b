//! [`DirtyPageSet`]: one bit per guest page for every tracked memslot, reused across
//! collections so hot paths never allocate.

use crate::abi::SlotId;
use crate::error::{DirtyError, Result};
use crate::PAGE_SIZE;

/// A memslot as dirty tracking sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotSpec {
    /// Encoded slot id (`as_id << 16 | slot_id`).
    pub id: SlotId,
    /// Guest physical address of the slot's first page.
    pub guest_phys_addr: u64,
    /// Number of 4 KiB pages in the slot.
    pub pages: u64,
    /// Whether the slot was registered with `KVM_MEM_LOG_DIRTY_PAGES`.
    pub log_dirty: bool,
}

impl SlotSpec {
    /// Words of a bitmap covering the slot.
    pub fn bitmap_words(&self) -> usize {
        self.pages.div_ceil(64) as usize
    }
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }
    /// True if `gpa` lies inside the slot.
    pub fn contains_gpa(&self, gpa: u64) -> bool {
        gpa >= self.guest_phys_addr && gpa - self.guest_phys_addr < self.bytes()
    }
}

/// A set of dirty pages, one bitmap per slot.
#[derive(Debug, Clone)]
pub struct DirtyPageSet {
    slots: Vec<SlotSpec>,
    bits: Vec<Vec<u64>>,
}

impl DirtyPageSet {
    /// An empty set over `slots`.
    pub fn new(slots: &[SlotSpec]) -> Self {
        DirtyPageSet {
            slots: slots.to_vec(),
            bits: slots.iter().map(|s| vec![0u64; s.bitmap_words()]).collect(),
        }
    }

    /// The slots this set covers.
    pub fn slots(&self) -> &[SlotSpec] {
        &self.slots
    }

    /// Index of a slot in [`slots`](Self::slots).
    pub fn slot_index(&self, slot: u32) -> Option<usize> {
        self.slots.iter().position(|s| s.id.0 == slot)
    }

    /// Marks `offset` of `slot` dirty; returns whether it was newly set.
    pub fn insert(&mut self, slot: u32, offset: u64) -> Result<bool> {
        let idx = self
            .slot_index(slot)
            .ok_or(DirtyError::UnknownSlot { slot })?;
        self.insert_at(idx, offset)
            .ok_or(DirtyError::UnknownSlot { slot })
    }

    /// Marks page `offset` of the slot at `idx`; `None` if out of range.
    pub fn insert_at(&mut self, idx: usize, offset: u64) -> Option<bool> {
        let spec = self.slots.get(idx)?;
        if offset >= spec.pages {
            return None;
        }
        let w = &mut self.bits[idx][(offset / 64) as usize];
        let m = 1u64 << (offset % 64);
        let new = *w & m == 0;
        *w |= m;
        Some(new)
    }

    /// Marks the page holding guest physical address `gpa`; false if no slot holds it.
    pub fn insert_gpa(&mut self, gpa: u64) -> bool {
        match self.slots.iter().position(|s| s.contains_gpa(gpa)) {
            Some(i) => {
                let off = (gpa - self.slots[i].guest_phys_addr) / PAGE_SIZE;
                self.insert_at(i, off).is_some()
            }
            None => false,
        }
    }

    /// Whether page `offset` of `slot` is in the set.
    pub fn contains(&self, slot: u32, offset: u64) -> bool {
        match self.slot_index(slot) {
            Some(i) if offset < self.slots[i].pages => {
                self.bits[i][(offset / 64) as usize] & (1u64 << (offset % 64)) != 0
            }
            _ => false,
        }
    }

    /// The bitmap words of the slot at `idx`.
    pub fn words(&self, idx: usize) -> &[u64] {
        self.bits.get(idx).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// ORs `words` (bit 0 = page 0) into the slot at `idx`, ignoring bits past the slot's end.
    pub fn or_words(&mut self, idx: usize, words: &[u64]) {
        let Some(spec) = self.slots.get(idx) else {
            return;
        };
        let tail = spec.pages % 64;
        let dst = &mut self.bits[idx];
        let n = dst.len().min(words.len());
        for (d, s) in dst[..n].iter_mut().zip(words) {
            *d |= *s;
        }
        if tail != 0 && n == dst.len() {
            if let Some(last) = dst.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// Adds every page of `other` (which must cover the same slots) to `self`.
    pub fn merge(&mut self, other: &DirtyPageSet) {
        for (i, spec) in other.slots.iter().enumerate() {
            if let Some(j) = self.slot_index(spec.id.0) {
                let words = &other.bits[i];
                let dst = &mut self.bits[j];
                for (d, s) in dst.iter_mut().zip(words) {
                    *d |= *s;
                }
            }
        }
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        for b in &mut self.bits {
            b.iter_mut().for_each(|w| *w = 0);
        }
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.bits
            .iter()
            .flat_map(|b| b.iter())
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    /// True when no page is set.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|b| b.iter().all(|w| *w == 0))
    }

    /// Iterates `(slot index, page offset)` of every dirty page in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.bits.iter().enumerate().flat_map(|(si, words)| {
            words.iter().enumerate().flat_map(move |(wi, &w)| {
                let mut w = w;
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let b = w.trailing_zeros() as u64;
                    w &= w - 1;
                    Some((si, wi as u64 * 64 + b))
                })
            })
        })
    }

    /// Iterates the guest physical address of every dirty page.
    pub fn iter_gpa(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter()
            .map(|(si, off)| self.slots[si].guest_phys_addr + off * PAGE_SIZE)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn spec(slot: u16, gpa: u64, pages: u64) -> SlotSpec {
        SlotSpec {
            id: SlotId::new(0, slot),
            guest_phys_addr: gpa,
            pages,
            log_dirty: true,
        }
    }

    #[test]
    fn insert_rejects_out_of_range_offsets_and_unknown_slots() {
        let mut s = DirtyPageSet::new(&[spec(1, 0x1000_0000, 67)]);
        assert!(s.insert(1, 66).unwrap());
        assert!(!s.insert(1, 66).unwrap());
        assert!(s.insert(1, 67).is_err());
        assert!(matches!(
            s.insert(2, 0),
            Err(DirtyError::UnknownSlot { slot: 2 })
        ));
        assert_eq!(s.count(), 1);
    }

    #[test]
    fn or_words_masks_the_tail_beyond_the_slot() {
        let mut s = DirtyPageSet::new(&[spec(0, 0, 67)]);
        s.or_words(0, &[u64::MAX, u64::MAX]);
        assert_eq!(s.count(), 67);
        let pages: Vec<u64> = s.iter().map(|(_, o)| o).collect();
        assert_eq!(pages, (0..67).collect::<Vec<_>>());
    }

    #[test]
    fn iter_gpa_and_merge_cover_all_slots() {
        let slots = [spec(0, 0, 10), spec(1, 0x1_0000_0000, 100)];
        let mut a = DirtyPageSet::new(&slots);
        let mut b = DirtyPageSet::new(&slots);
        a.insert(0, 3).unwrap();
        b.insert(1, 99).unwrap();
        assert!(b.insert_gpa(0x2000));
        assert!(!b.insert_gpa(0x2_0000_0000));
        a.merge(&b);
        let g: Vec<u64> = a.iter_gpa().collect();
        assert_eq!(g, vec![0x2000, 0x3000, 0x1_0000_0000 + 99 * 4096]);
        a.clear();
        assert!(a.is_empty());
    }
}
