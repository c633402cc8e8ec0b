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
    /// Bitmap word `w` with every page of the slot it covers set (the last word of a slot
    /// whose size is not a multiple of 64 pages has only its low bits).
    pub fn word_mask(&self, w: usize) -> u64 {
        let valid = self.pages.saturating_sub(w as u64 * 64);
        if valid >= 64 {
            u64::MAX
        } else {
            (1u64 << valid) - 1
        }
    }
    /// True if `gpa` lies inside the slot.
    pub fn contains_gpa(&self, gpa: u64) -> bool {
        gpa >= self.guest_phys_addr && gpa - self.guest_phys_addr < self.bytes()
    }
}

/// A set of dirty pages, one bitmap per slot, with two summary levels (one bit per bitmap
/// word, one bit per summary word) so that merging, clearing and iterating cost
/// O(dirty words + memory / 256 Ki pages), not O(memory / 64 pages): the ring path must not
/// pay for guest size (64 GiB is 64 top-level words).
#[derive(Debug, Clone)]
pub struct DirtyPageSet {
    slots: Vec<SlotSpec>,
    bits: Vec<Words>,
    /// Bit `w` of `summary[i]` is set whenever `bits[i][w]` may be non-zero.
    summary: Vec<Vec<u64>>,
    /// Bit `s` of `top[i]` is set whenever `summary[i][s]` may be non-zero.
    top: Vec<Vec<u64>>,
}

/// Transparent huge page size on x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// Bitmaps from this size on (slots of 8 GiB and more) are padded to whole 2 MiB huge pages.
const HUGE_MIN_BYTES: usize = 256 << 10;

/// A zeroed page bitmap. From [`HUGE_MIN_BYTES`] on it starts on a 2 MiB boundary, is padded
/// to whole huge pages and is advised `MADV_HUGEPAGE`: dirty pages spread over a large slot
/// each land in a different 4 KiB page of the bitmap, and on a nested host the TLB misses of
/// 512 small pages (64 GiB) cost more than the cache misses. The padding costs at most
/// 2 MiB of host memory per slot of 8 GiB or more.
#[derive(Debug)]
struct Words {
    buf: Vec<u64>,
    off: usize,
    len: usize,
}

impl Words {
    fn zeroed(len: usize) -> Self {
        if len * 8 < HUGE_MIN_BYTES {
            return Words {
                buf: vec![0; len],
                off: 0,
                len,
            };
        }
        let huge_words = HUGE_PAGE / 8;
        // Room to align the start, and whole huge pages after it.
        let buf = vec![0u64; len.next_multiple_of(huge_words) + huge_words];
        let addr = buf.as_ptr() as usize;
        let off = (addr.next_multiple_of(HUGE_PAGE) - addr) / 8;
        let padded = len.next_multiple_of(huge_words);
        crate::sys::advise_huge_pages(&buf[off..off + padded]);
        Words { buf, off, len }
    }
}

impl Clone for Words {
    fn clone(&self) -> Self {
        let mut w = Words::zeroed(self.len);
        w.copy_from_slice(self);
        w
    }
}

impl std::ops::Deref for Words {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for Words {
    fn deref_mut(&mut self) -> &mut [u64] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// Calls `f(index)` for each set bit of `words` (bit `b` of word `i` is index `64 i + b`).
fn for_each_bit(words: &[u64], mut f: impl FnMut(usize)) {
    for (i, &w) in words.iter().enumerate() {
        let mut m = w;
        while m != 0 {
            let b = m.trailing_zeros() as usize;
            m &= m - 1;
            f(i * 64 + b);
        }
    }
}

/// Calls `f(word index)` for each bitmap word flagged through `top` and `summary`.
fn for_each_flagged(top: &[u64], summary: &[u64], mut f: impl FnMut(usize)) {
    for_each_bit(top, |si| {
        if let Some(&sw) = summary.get(si) {
            for_each_bit(&[sw], |b| f(si * 64 + b));
        }
    });
}

/// Sets bit `i` of `words`.
fn flag(words: &mut [u64], i: usize) {
    words[i / 64] |= 1u64 << (i % 64);
}

impl DirtyPageSet {
    /// An empty set over `slots`.
    pub fn new(slots: &[SlotSpec]) -> Self {
        DirtyPageSet {
            slots: slots.to_vec(),
            bits: slots
                .iter()
                .map(|s| Words::zeroed(s.bitmap_words()))
                .collect(),
            summary: slots
                .iter()
                .map(|s| vec![0u64; s.bitmap_words().div_ceil(64)])
                .collect(),
            top: slots
                .iter()
                .map(|s| vec![0u64; s.bitmap_words().div_ceil(64 * 64)])
                .collect(),
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
        let wi = (offset / 64) as usize;
        let w = &mut self.bits[idx][wi];
        let m = 1u64 << (offset % 64);
        let new = *w & m == 0;
        *w |= m;
        flag(&mut self.summary[idx], wi);
        flag(&mut self.top[idx], wi / 64);
        Some(new)
    }

    /// Marks every `(slot, offset)` of `entries` (ring entries, in ring order); returns how many
    /// named no page of the set (those are skipped).
    ///
    /// The hot loop of a ring collect: each run of entries of one slot is marked through that
    /// slot's three levels directly (one slot lookup per run, no per-entry indirection), a
    /// few instructions per page; the cache misses of a cold bitmap are the caller's to hide
    /// with [`prefetch`](Self::prefetch).
    pub fn insert_entries(&mut self, entries: &[(u32, u64)]) -> u64 {
        let mut bad = 0u64;
        let mut rest = entries;
        while let Some(&(slot, _)) = rest.first() {
            let run = rest
                .iter()
                .position(|&(s, _)| s != slot)
                .unwrap_or(rest.len());
            let (now, next) = rest.split_at(run);
            rest = next;
            let Some(i) = self.slot_index(slot) else {
                bad += now.len() as u64;
                continue;
            };
            let pages = self.slots[i].pages;
            let (bits, sum, top) = (&mut self.bits[i], &mut self.summary[i], &mut self.top[i]);
            for &(_, off) in now {
                if off >= pages {
                    bad += 1;
                    continue;
                }
                let wi = (off / 64) as usize;
                bits[wi] |= 1u64 << (off % 64);
                flag(sum, wi);
                flag(top, wi / 64);
            }
        }
        bad
    }

    /// Hints the CPU to fetch the bitmap and summary words of page `offset` of the slot at
    /// `idx` (nothing if out of range): issued while a harvest runs, the misses complete
    /// during the reset that follows, before [`insert_entries`](Self::insert_entries) needs them.
    pub fn prefetch(&self, idx: usize, offset: u64) {
        let wi = (offset / 64) as usize;
        if let (Some(w), Some(s)) = (
            self.bits.get(idx).and_then(|b| b.get(wi)),
            self.summary.get(idx).and_then(|b| b.get(wi / 64)),
        ) {
            crate::sys::prefetch(w);
            crate::sys::prefetch(s);
        }
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

    /// Whether the page holding guest physical address `gpa` is in the set.
    pub fn contains_gpa(&self, gpa: u64) -> bool {
        self.slots
            .iter()
            .position(|s| s.contains_gpa(gpa))
            .is_some_and(|i| {
                let off = (gpa - self.slots[i].guest_phys_addr) / PAGE_SIZE;
                self.bits[i][(off / 64) as usize] & (1u64 << (off % 64)) != 0
            })
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
        self.bits.get(idx).map(|v| &v[..]).unwrap_or(&[])
    }

    /// ORs `words` (bit 0 = page 0) into the slot at `idx`, ignoring bits past the slot's end.
    pub fn or_words(&mut self, idx: usize, words: &[u64]) {
        let Some(spec) = self.slots.get(idx) else {
            return;
        };
        let tail = spec.pages % 64;
        let dst = &mut self.bits[idx];
        let sum = &mut self.summary[idx];
        let top = &mut self.top[idx];
        let n = dst.len().min(words.len());
        for (wi, (d, s)) in dst[..n].iter_mut().zip(words).enumerate() {
            if *s != 0 {
                *d |= *s;
                flag(sum, wi);
                flag(top, wi / 64);
            }
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
                let src = &other.bits[i];
                let dst = &mut self.bits[j];
                let sum = &mut self.summary[j];
                let top = &mut self.top[j];
                for_each_flagged(&other.top[i], &other.summary[i], |wi| {
                    if let (Some(d), Some(&s)) = (dst.get_mut(wi), src.get(wi)) {
                        if s != 0 {
                            *d |= s;
                            flag(sum, wi);
                            flag(top, wi / 64);
                        }
                    }
                });
            }
        }
    }

    /// Removes every page (touching only the words that were set).
    pub fn clear(&mut self) {
        for ((b, sum), top) in self
            .bits
            .iter_mut()
            .zip(&mut self.summary)
            .zip(&mut self.top)
        {
            for_each_bit(top, |si| {
                for_each_bit(&[sum[si]], |k| b[si * 64 + k] = 0);
                sum[si] = 0;
            });
            top.iter_mut().for_each(|w| *w = 0);
        }
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        let mut n = 0u64;
        for ((b, sum), top) in self.bits.iter().zip(&self.summary).zip(&self.top) {
            for_each_flagged(top, sum, |wi| n += u64::from(b[wi].count_ones()));
        }
        n
    }

    /// True when no page is set.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// Iterates `(slot index, page offset)` of every dirty page in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.bits.iter().enumerate().flat_map(move |(si, words)| {
            let sum = &self.summary[si];
            let top = &self.top[si];
            bits_of(top).flat_map(move |swi| {
                let mut m = sum.get(swi).copied().unwrap_or(0);
                std::iter::from_fn(move || {
                    if m == 0 {
                        return None;
                    }
                    let b = m.trailing_zeros() as usize;
                    m &= m - 1;
                    Some(swi * 64 + b)
                })
                .flat_map(move |wi| {
                    let mut w = words[wi];
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
        })
    }

    /// Iterates the guest physical address of every dirty page.
    pub fn iter_gpa(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter()
            .map(|(si, off)| self.slots[si].guest_phys_addr + off * PAGE_SIZE)
    }
}

/// The indices of the set bits of `words`, ascending.
fn bits_of(words: &[u64]) -> impl Iterator<Item = usize> + '_ {
    words.iter().enumerate().flat_map(|(i, &w)| {
        let mut m = w;
        std::iter::from_fn(move || {
            if m == 0 {
                return None;
            }
            let b = m.trailing_zeros() as usize;
            m &= m - 1;
            Some(i * 64 + b)
        })
    })
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

    #[test]
    fn insert_entries_marks_every_valid_entry_and_counts_the_rest() {
        let slots = [spec(0, 0, 300_000), spec(7, 1 << 32, 1000)];
        let mut s = DirtyPageSet::new(&slots);
        // Runs of two slots, with bad entries in the middle.
        let mut entries: Vec<(u32, u64)> = (0..100).map(|i| (0, i * 2999)).collect();
        entries.insert(10, (7, 999));
        entries.insert(20, (7, 1000)); // past the slot's end
        entries.insert(30, (3, 5)); // no such slot
        entries.push((0, 300_000)); // past the slot's end
        entries.push((0, 0)); // again
        assert_eq!(s.insert_entries(&entries), 3);
        let got: Vec<(usize, u64)> = s.iter().collect();
        let mut want: Vec<(usize, u64)> = (0..100).map(|i| (0, i * 2999)).collect();
        want.push((1, 999));
        assert_eq!(got, want);
        assert_eq!(s.insert_entries(&[]), 0);
    }

    #[test]
    fn a_huge_page_bitmap_behaves_like_a_small_one_and_clones_exactly() {
        // 8 GiB + 5 pages: 256 KiB of bitmap and a partial last word, on the huge-page path.
        let pages = (8u64 << 18) + 5;
        let slots = [spec(1, 0, pages)];
        assert!(slots[0].bitmap_words() * 8 >= HUGE_MIN_BYTES);
        let mut s = DirtyPageSet::new(&slots);
        assert_eq!(s.words(0).len(), slots[0].bitmap_words());
        assert_eq!(
            s.words(0).as_ptr() as usize % HUGE_PAGE,
            0,
            "starts on a huge page"
        );
        let want = [0u64, 4096 * 64 - 1, pages / 2, pages - 1];
        let entries: Vec<(u32, u64)> = want.iter().map(|&o| (1, o)).collect();
        assert_eq!(s.insert_entries(&entries), 0);
        assert_eq!(s.insert_at(0, pages), None, "past the slot's end");
        let c = s.clone();
        s.clear();
        assert!(s.is_empty());
        assert_eq!(c.iter().map(|(_, o)| o).collect::<Vec<_>>(), want);
        assert!(c.contains(1, pages - 1) && !c.contains(1, pages - 2));
    }

    proptest::proptest! {
        /// The summary levels never hide a page (slot 0 spans two top-level words):
        /// insert / or_words / merge / clear agree with
        /// a plain set model, across slots with unaligned tails.
        #[test]
        fn two_level_set_matches_a_plain_model(
            ops in proptest::collection::vec((0u8..5, 0usize..2, 0u64..310_000, proptest::num::u64::ANY), 1..200)
        ) {
            let slots = [spec(0, 0, 300_000 + 3), spec(1, 1 << 32, 64 * 64 + 1)];
            let mut a = DirtyPageSet::new(&slots);
            let mut b = DirtyPageSet::new(&slots);
            let mut model = std::collections::BTreeSet::new();
            for (op, slot, off, word) in ops {
                let pages = slots[slot].pages;
                match op {
                    0 | 1 => {
                        if a.insert_at(slot, off).is_some() {
                            model.insert((slot, off));
                        } else {
                            proptest::prop_assert!(off >= pages);
                        }
                    }
                    2 => {
                        let wi = (off % slots[slot].bitmap_words() as u64) as usize;
                        let mut words = vec![0u64; slots[slot].bitmap_words()];
                        words[wi] = word;
                        a.or_words(slot, &words);
                        for bit in 0..64 {
                            let p = wi as u64 * 64 + bit;
                            if word & (1 << bit) != 0 && p < pages {
                                model.insert((slot, p));
                            }
                        }
                    }
                    3 => {
                        b.clear();
                        b.merge(&a);
                        a.clear();
                        proptest::prop_assert!(a.is_empty());
                        a.merge(&b);
                    }
                    _ => {
                        proptest::prop_assert_eq!(a.count(), model.len() as u64);
                    }
                }
            }
            let got: Vec<(usize, u64)> = a.iter().collect();
            let want: Vec<(usize, u64)> = model.into_iter().collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
