//! The guest memory layout announced by the source and the bounds check every page address
//! goes through on the destination.

use serde::{Deserialize, Serialize};

use crate::PAGE_SIZE;

/// Most regions a layout may hold (KVM allows 509 user memslots on x86; the VMM uses a few).
pub const MAX_REGIONS: usize = 512;

/// A guest RAM region: one KVM memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Memslot id (`as_id << 16 | slot`), as KVM and the dirty tracker name it.
    pub slot: u32,
    /// Guest physical address of the first byte; page aligned.
    pub guest_phys_addr: u64,
    /// Size in bytes; a non-zero multiple of [`PAGE_SIZE`].
    pub size: u64,
}

impl Region {
    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// One past the last guest physical address of the region.
    pub fn end(&self) -> u64 {
        self.guest_phys_addr + self.size
    }

    /// True if `gpa` lies inside the region.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.guest_phys_addr && gpa - self.guest_phys_addr < self.size
    }
}

/// Why a layout was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A layout needs at least one region.
    #[error("memory layout has no regions")]
    Empty,
    /// More regions than [`MAX_REGIONS`].
    #[error("memory layout has {count} regions, more than the limit of {max}")]
    TooManyRegions {
        /// Regions announced.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A region's address or size is not page aligned, or the size is zero.
    #[error("region of slot {slot} at {gpa:#x} size {size:#x} is empty or not page aligned")]
    Unaligned {
        /// Slot of the region.
        slot: u32,
        /// Its start address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// A region ends past the top of the 64-bit address space.
    #[error("region of slot {slot} at {gpa:#x} size {size:#x} wraps past 2^64")]
    Overflow {
        /// Slot of the region.
        slot: u32,
        /// Its start address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// Two regions overlap.
    #[error("regions of slots {a} and {b} overlap")]
    Overlap {
        /// One slot.
        a: u32,
        /// The other slot.
        b: u32,
    },
    /// Two regions use the same slot id.
    #[error("slot {slot} appears twice in the memory layout")]
    DuplicateSlot {
        /// The repeated slot.
        slot: u32,
    },
    /// The layout is larger than the receiver accepts.
    #[error("memory layout totals {bytes} bytes, more than the receiver's limit of {max} bytes")]
    TooLarge {
        /// Total announced.
        bytes: u64,
        /// The limit.
        max: u64,
    },
}

/// Guest memory slices that do not match a layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryShapeError {
    /// The number of memory slices differs from the number of regions.
    #[error("{got} memory slices given for a layout of {expected} regions")]
    RegionCount {
        /// Regions in the layout.
        expected: usize,
        /// Slices given.
        got: usize,
    },
    /// A slice's length differs from its region's size.
    #[error("memory slice for region {index} is {got} bytes, the region is {expected} bytes")]
    RegionSize {
        /// Region index.
        index: usize,
        /// Region size.
        expected: u64,
        /// Slice length.
        got: u64,
    },
}

/// Checks that slices of lengths `lens` match the regions of `layout`, in order.
pub fn check_slices(
    layout: &MemoryLayout,
    lens: impl ExactSizeIterator<Item = usize>,
) -> Result<(), MemoryShapeError> {
    if lens.len() != layout.regions().len() {
        return Err(MemoryShapeError::RegionCount {
            expected: layout.regions().len(),
            got: lens.len(),
        });
    }
    for (index, (r, len)) in layout.regions().iter().zip(lens).enumerate() {
        if len as u64 != r.size {
            return Err(MemoryShapeError::RegionSize {
                index,
                expected: r.size,
                got: len as u64,
            });
        }
    }
    Ok(())
}

/// A validated set of non-overlapping, page-aligned regions, kept sorted by address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Region>", into = "Vec<Region>")]
pub struct MemoryLayout {
    regions: Vec<Region>,
}

impl TryFrom<Vec<Region>> for MemoryLayout {
    type Error = LayoutError;
    fn try_from(v: Vec<Region>) -> Result<Self, LayoutError> {
        MemoryLayout::new(v)
    }
}

impl From<MemoryLayout> for Vec<Region> {
    fn from(l: MemoryLayout) -> Self {
        l.regions
    }
}

impl MemoryLayout {
    /// Validates `regions` (non-empty, at most [`MAX_REGIONS`], page aligned, no wrap, no
    /// overlap, unique slots) and sorts them by guest physical address.
    pub fn new(mut regions: Vec<Region>) -> Result<Self, LayoutError> {
        if regions.is_empty() {
            return Err(LayoutError::Empty);
        }
        if regions.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions {
                count: regions.len(),
                max: MAX_REGIONS,
            });
        }
        for r in &regions {
            if r.size == 0 || r.size % PAGE_SIZE != 0 || r.guest_phys_addr % PAGE_SIZE != 0 {
                return Err(LayoutError::Unaligned {
                    slot: r.slot,
                    gpa: r.guest_phys_addr,
                    size: r.size,
                });
            }
            if r.guest_phys_addr.checked_add(r.size).is_none() {
                return Err(LayoutError::Overflow {
                    slot: r.slot,
                    gpa: r.guest_phys_addr,
                    size: r.size,
                });
            }
        }
        regions.sort_by_key(|r| r.guest_phys_addr);
        for w in regions.windows(2) {
            if w[0].end() > w[1].guest_phys_addr {
                return Err(LayoutError::Overlap {
                    a: w[0].slot,
                    b: w[1].slot,
                });
            }
        }
        let mut slots: Vec<u32> = regions.iter().map(|r| r.slot).collect();
        slots.sort_unstable();
        if let Some(w) = slots.windows(2).find(|w| w[0] == w[1]) {
            return Err(LayoutError::DuplicateSlot { slot: w[0] });
        }
        Ok(MemoryLayout { regions })
    }

    /// The regions, sorted by guest physical address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Sum of region sizes in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Sum of region sizes in pages.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// Index of the region holding `gpa` and the byte offset of `gpa` inside it.
    pub fn locate(&self, gpa: u64) -> Option<(usize, u64)> {
        // Regions are sorted and disjoint: the candidate is the last one starting at or
        // below `gpa`.
        let idx = self
            .regions
            .partition_point(|r| r.guest_phys_addr <= gpa)
            .checked_sub(1)?;
        let r = &self.regions[idx];
        r.contains(gpa).then(|| (idx, gpa - r.guest_phys_addr))
    }

    /// Index of the region with memslot id `slot`.
    pub fn slot_index(&self, slot: u32) -> Option<usize> {
        self.regions.iter().position(|r| r.slot == slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(slot: u32, gpa: u64, size: u64) -> Region {
        Region {
            slot,
            guest_phys_addr: gpa,
            size,
        }
    }

    #[test]
    fn layout_is_sorted_and_locate_finds_offsets() {
        let l = MemoryLayout::new(vec![r(1, 0x1_0000_0000, 0x2000), r(0, 0, 0x10_0000)]).unwrap();
        assert_eq!(l.regions()[0].slot, 0);
        assert_eq!(l.locate(0x5000), Some((0, 0x5000)));
        assert_eq!(l.locate(0x1_0000_1000), Some((1, 0x1000)));
        assert_eq!(l.locate(0x10_0000), None);
        assert_eq!(l.locate(0x1_0000_2000), None);
        assert_eq!(l.total_pages(), 0x100 + 2);
    }

    #[test]
    fn invalid_layouts_are_rejected_with_the_reason() {
        assert_eq!(MemoryLayout::new(vec![]), Err(LayoutError::Empty));
        assert!(matches!(
            MemoryLayout::new(vec![r(0, 0x800, 0x1000)]),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(vec![r(0, 0, 0)]),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryLayout::new(vec![r(0, u64::MAX - 0xfff, 0x2000)]),
            Err(LayoutError::Overflow { .. })
        ));
        assert_eq!(
            MemoryLayout::new(vec![r(0, 0, 0x3000), r(1, 0x2000, 0x1000)]),
            Err(LayoutError::Overlap { a: 0, b: 1 })
        );
        assert_eq!(
            MemoryLayout::new(vec![r(4, 0, 0x1000), r(4, 0x2000, 0x1000)]),
            Err(LayoutError::DuplicateSlot { slot: 4 })
        );
    }
}
