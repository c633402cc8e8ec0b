//! Memory digests for the end-to-end check that the destination's memory equals the source's
//! memory at the moment of pause.
//!
//! A region's digest is the wrapping sum over its pages of `mix(gpa, crc64(page))` (CRC-64/NVME
//! by `crc-fast`, which uses the carry-less multiply the CPU has at run time, where xxh3 gets
//! only the build's baseline SSE2; the destination hashes every page it receives). A sum
//! is order independent and can be updated one page at a time, which is what lets the
//! destination keep its digest current while pages arrive ([`IncrementalDigest`]) instead of
//! hashing all of guest memory inside the downtime window. The source hashes its real
//! (paused) memory with [`digest_pages`], which checks the dirty tracker, not just the
//! transport: a page the tracker missed differs on the two sides. Partial sums over disjoint
//! page ranges add up, so the source can split the work across threads.
//!
//! This is a corruption check, not a cryptographic one.

use serde::{Deserialize, Serialize};

use crate::wire::{check_slices, MemoryLayout, MemoryShapeError};
use crate::PAGE_SIZE;

/// The digest of each region of a layout, in layout order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryDigest {
    /// One 64-bit digest per region, in [`MemoryLayout::regions`] order.
    pub regions: Vec<u64>,
}

/// Why a digest could not be computed or did not match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The memory slices do not match the layout.
    #[error(transparent)]
    Shape(#[from] MemoryShapeError),
    /// The two digests cover a different number of regions.
    #[error("digest covers {got} regions, expected {expected}")]
    RegionCount {
        /// Regions in the source digest.
        expected: usize,
        /// Regions in the destination digest.
        got: usize,
    },
    /// The digests differ: guest memory on the two sides is not the same.
    #[error("memory digest mismatch in region {index}: source {source_digest:#018x}, destination {destination:#018x}")]
    Mismatch {
        /// First differing region.
        index: usize,
        /// Source's digest of it.
        source_digest: u64,
        /// Destination's digest of it.
        destination: u64,
    },
}

/// Mixes a page's address into its content hash so that swapped pages change the sum.
fn mix(gpa: u64, h: u64) -> u64 {
    // splitmix64 finaliser over the combined word.
    let mut z = h ^ gpa.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Content hash of one page (CRC-64/NVME).
pub fn page_hash(data: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, data)
}

/// Content hash of an all-zero page.
pub fn zero_page_hash() -> u64 {
    page_hash(&[0u8; PAGE_SIZE as usize])
}

/// Digest contribution of the page at `gpa` whose content hash is `hash`.
pub fn page_term(gpa: u64, hash: u64) -> u64 {
    mix(gpa, hash)
}

/// Partial digest of the pages of `mem`, whose first byte is at guest address `base_gpa`.
///
/// `mem.len()` should be a multiple of [`PAGE_SIZE`]; a trailing partial page is hashed as
/// it is. Partial digests of disjoint ranges of one region add up (wrapping) to the region's
/// digest.
pub fn digest_pages(base_gpa: u64, mem: &[u8]) -> u64 {
    mem.chunks(PAGE_SIZE as usize)
        .enumerate()
        .fold(0u64, |acc, (i, page)| {
            acc.wrapping_add(mix(base_gpa + i as u64 * PAGE_SIZE, page_hash(page)))
        })
}

impl MemoryDigest {
    /// Digest of `memory`, one slice per region of `layout` in layout order.
    pub fn compute(layout: &MemoryLayout, memory: &[&[u8]]) -> Result<Self, DigestError> {
        check_slices(layout, memory.iter().map(|m| m.len()))?;
        Ok(MemoryDigest {
            regions: layout
                .regions()
                .iter()
                .zip(memory)
                .map(|(r, m)| digest_pages(r.guest_phys_addr, m))
                .collect(),
        })
    }

    /// Ok if `destination` equals `self` (the source's digest), else the first differing
    /// region.
    pub fn verify(&self, destination: &MemoryDigest) -> Result<(), DigestError> {
        if self.regions.len() != destination.regions.len() {
            return Err(DigestError::RegionCount {
                expected: self.regions.len(),
                got: destination.regions.len(),
            });
        }
        match self
            .regions
            .iter()
            .zip(&destination.regions)
            .position(|(a, b)| a != b)
        {
            None => Ok(()),
            Some(index) => Err(DigestError::Mismatch {
                index,
                source_digest: self.regions[index],
                destination: destination.regions[index],
            }),
        }
    }
}

/// A digest kept current page by page, for a receiver whose memory starts all zero and
/// changes only through received pages.
///
/// Keeps one 64-bit content hash per page and one running sum per region; updates are O(1)
/// and allocation free. The hashes are stored XOR the zero page's hash, so all-zero memory is
/// an all-zero table: it is allocated zeroed in [`new`](Self::new) (fresh anonymous memory
/// for large layouts) and its pages are committed only as received pages land in them, never
/// up front for the whole layout.
#[derive(Debug, Clone)]
pub struct IncrementalDigest {
    layout: MemoryLayout,
    hashes: Vec<Vec<u64>>,
    sums: Vec<u64>,
    zero_hash: u64,
}

impl IncrementalDigest {
    /// A digest of all-zero memory over `layout`.
    pub fn new(layout: &MemoryLayout) -> Self {
        let zero_hash = zero_page_hash();
        let mut sums = Vec::with_capacity(layout.regions().len());
        let mut hashes = Vec::with_capacity(layout.regions().len());
        for r in layout.regions() {
            let pages = r.pages();
            hashes.push(vec![0u64; pages as usize]);
            sums.push((0..pages).fold(0u64, |acc, i| {
                acc.wrapping_add(mix(r.guest_phys_addr + i * PAGE_SIZE, zero_hash))
            }));
        }
        IncrementalDigest {
            layout: layout.clone(),
            hashes,
            sums,
            zero_hash,
        }
    }

    fn set(&mut self, gpa: u64, hash: u64) -> bool {
        let Some((idx, off)) = self.layout.locate(gpa) else {
            return false;
        };
        let page_gpa = gpa - off % PAGE_SIZE;
        let slot = &mut self.hashes[idx][(off / PAGE_SIZE) as usize];
        let old = std::mem::replace(slot, hash ^ self.zero_hash) ^ self.zero_hash;
        self.sums[idx] = self.sums[idx]
            .wrapping_sub(mix(page_gpa, old))
            .wrapping_add(mix(page_gpa, hash));
        true
    }

    /// Records that the page at `gpa` now holds `data`; false if `gpa` is outside the layout.
    pub fn record_page(&mut self, gpa: u64, data: &[u8]) -> bool {
        self.set(gpa, page_hash(data))
    }

    /// Records that the page at `gpa` is now all zero; false if `gpa` is outside the layout.
    pub fn record_zero(&mut self, gpa: u64) -> bool {
        let z = self.zero_hash;
        self.set(gpa, z)
    }

    /// The current digest.
    pub fn digest(&self) -> MemoryDigest {
        MemoryDigest {
            regions: self.sums.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Region;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![
            Region {
                slot: 0,
                guest_phys_addr: 0,
                size: 16 * PAGE_SIZE,
            },
            Region {
                slot: 1,
                guest_phys_addr: 0x10_0000,
                size: 4 * PAGE_SIZE,
            },
        ])
        .unwrap()
    }

    #[test]
    fn incremental_digest_equals_full_digest_of_the_same_memory() {
        let l = layout();
        let mut a = vec![0u8; 16 * 4096];
        let mut b = vec![0u8; 4 * 4096];
        let mut inc = IncrementalDigest::new(&l);
        assert_eq!(
            inc.digest(),
            MemoryDigest::compute(&l, &[&a, &b]).unwrap(),
            "fresh digest must equal the digest of zeroed memory"
        );
        a[3 * 4096 + 5] = 9;
        assert!(inc.record_page(3 * 4096, &a[3 * 4096..4 * 4096]));
        b[4096] = 1;
        assert!(inc.record_page(0x10_1000, &b[4096..8192]));
        // Overwrite then zero again: the sum must return to the zero-page term.
        b[4096] = 0;
        assert!(inc.record_zero(0x10_1000));
        assert!(!inc.record_zero(0x20_0000));
        assert_eq!(inc.digest(), MemoryDigest::compute(&l, &[&a, &b]).unwrap());
    }

    #[test]
    fn swapping_two_pages_changes_the_digest() {
        let l = layout();
        let mut a = vec![0u8; 16 * 4096];
        a[0] = 1;
        a[4096] = 2;
        let d1 = MemoryDigest::compute(&l, &[&a, &[0u8; 4 * 4096]]).unwrap();
        a[0] = 2;
        a[4096] = 1;
        let d2 = MemoryDigest::compute(&l, &[&a, &[0u8; 4 * 4096]]).unwrap();
        assert_eq!(
            d1.verify(&d2),
            Err(DigestError::Mismatch {
                index: 0,
                source_digest: d1.regions[0],
                destination: d2.regions[0]
            })
        );
    }

    #[test]
    fn partial_digests_add_up_to_the_region_digest() {
        let mem: Vec<u8> = (0..8 * 4096).map(|i| (i * 7 % 251) as u8).collect();
        let whole = digest_pages(0x4000, &mem);
        let split = digest_pages(0x4000, &mem[..3 * 4096])
            .wrapping_add(digest_pages(0x7000, &mem[3 * 4096..]));
        assert_eq!(whole, split);
    }

    #[test]
    fn compute_rejects_wrong_slice_shapes() {
        let l = layout();
        assert_eq!(
            MemoryDigest::compute(&l, &[&[0u8; 4096]]),
            Err(DigestError::Shape(MemoryShapeError::RegionCount {
                expected: 2,
                got: 1
            }))
        );
        assert!(matches!(
            MemoryDigest::compute(&l, &[&[0u8; 4096], &[0u8; 4 * 4096]]),
            Err(DigestError::Shape(MemoryShapeError::RegionSize {
                index: 0,
                ..
            }))
        ));
    }
}
