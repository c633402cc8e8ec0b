//! Guest RAM: sparse anonymous mappings (`MAP_NORESERVE`, only touched pages cost host RAM)
//! managed through vm-memory, one KVM memslot per region.

use std::sync::Arc;

use kvm_dirty::{SlotId, SlotSpec, VmmWriteLog, PAGE_SIZE};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

use crate::error::{Result, VmmError};

/// One guest RAM region as the user asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionSpec {
    /// KVM slot number (address space 0).
    pub slot: u16,
    /// Guest physical base (page aligned).
    pub gpa: u64,
    /// Size in bytes (a multiple of 4 KiB; need not be 64-page aligned).
    pub bytes: u64,
    /// Trackable: registered with `KVM_MEM_LOG_DIRTY_PAGES` while a user of dirty logging
    /// runs (`Vm::dirty_logging`); without the flag otherwise.
    pub log_dirty: bool,
}

impl RegionSpec {
    /// The tracker's view of this region.
    pub fn slot_spec(&self) -> SlotSpec {
        SlotSpec {
            id: SlotId::new(0, self.slot),
            guest_phys_addr: self.gpa,
            pages: self.bytes / PAGE_SIZE,
            log_dirty: self.log_dirty,
        }
    }
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.bytes
    }
}

/// Guest RAM of a VM.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    specs: Vec<RegionSpec>,
    vmm_log: Arc<VmmWriteLog>,
}

impl GuestRam {
    /// Maps every region (sparse, private, anonymous).
    pub fn new(specs: &[RegionSpec]) -> Result<Self> {
        let mut sorted = specs.to_vec();
        sorted.sort_by_key(|s| s.gpa);
        let mut regions = Vec::with_capacity(sorted.len());
        for (i, s) in sorted.iter().enumerate() {
            let bad = |reason: &str| VmmError::Memory {
                gpa: s.gpa,
                bytes: s.bytes,
                reason: reason.to_string(),
            };
            if s.bytes == 0 || s.bytes % PAGE_SIZE != 0 || s.gpa % PAGE_SIZE != 0 {
                return Err(bad("size and address must be non-zero multiples of 4 KiB"));
            }
            if i > 0 && sorted[i - 1].end() > s.gpa {
                return Err(bad("overlaps the previous region"));
            }
            if sorted[..i].iter().any(|o| o.slot == s.slot) {
                return Err(bad("slot number used twice"));
            }
            let len = usize::try_from(s.bytes).map_err(|_| bad("too large for this host"))?;
            let region = vm_memory::mmap::MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| bad(&e.to_string()))?;
            let r = GuestRegionMmap::new(region, GuestAddress(s.gpa))
                .ok_or_else(|| bad("region wraps the address space"))?;
            regions.push(r);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| VmmError::Memory {
            gpa: 0,
            bytes: 0,
            reason: e.to_string(),
        })?;
        let slots: Vec<SlotSpec> = sorted.iter().map(|s| s.slot_spec()).collect();
        Ok(GuestRam {
            mem,
            specs: sorted,
            vmm_log: Arc::new(VmmWriteLog::new(&slots)),
        })
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[RegionSpec] {
        &self.specs
    }

    /// The tracker's view of every region.
    pub fn slot_specs(&self) -> Vec<SlotSpec> {
        self.specs.iter().map(|s| s.slot_spec()).collect()
    }

    /// The log of writes the VMM itself makes (merged into every dirty collect).
    pub fn vmm_log(&self) -> &Arc<VmmWriteLog> {
        &self.vmm_log
    }

    /// Total bytes of guest RAM.
    pub fn total_bytes(&self) -> u64 {
        self.specs.iter().map(|s| s.bytes).sum()
    }

    pub(crate) fn mmap_regions(&self) -> impl Iterator<Item = (&RegionSpec, &MmapRegion<()>)> {
        self.specs.iter().map(move |s| {
            let r = self
                .mem
                .find_region(GuestAddress(s.gpa))
                .expect("every spec has a region");
            (s, &**r)
        })
    }

    /// Marks in `out` (bit i of word i / 64) which of the `pages` pages from `gpa` (inside one
    /// region) may hold data: those present in this process's page tables or swapped out,
    /// from `/proc/self/pagemap`. A clear bit is a page never populated since the mapping was
    /// made, which reads as zero: migration sends it as a zero marker without touching it
    /// (reading it would fault in the zero page, ~1 us a page on a nested host). Returns
    /// false (with every page marked) where pagemap cannot be read.
    pub fn populated(&self, gpa: u64, pages: u64, out: &mut Vec<u64>) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        self.check(gpa, pages * PAGE_SIZE)?;
        out.clear();
        out.resize(pages.div_ceil(64) as usize, 0);
        let all = |out: &mut Vec<u64>| {
            for i in 0..pages as usize {
                out[i / 64] |= 1u64 << (i % 64);
            }
        };
        let Some(region) = self.mem.find_region(GuestAddress(gpa)) else {
            return Err(VmmError::OutOfBounds {
                gpa,
                len: pages * PAGE_SIZE,
            });
        };
        let host =
            region.as_ptr() as u64 + (gpa - vm_memory::GuestMemoryRegion::start_addr(region).0);
        let Ok(f) = std::fs::File::open("/proc/self/pagemap") else {
            all(out);
            return Ok(false);
        };
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let mut raw = vec![0u8; 8 * pages as usize];
        if f.read_exact_at(&mut raw, host / PAGE_SIZE * 8).is_err() {
            all(out);
            return Ok(false);
        }
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
            if v & (PRESENT | SWAPPED) != 0 {
                out[i / 64] |= 1u64 << (i % 64);
            }
        }
        Ok(true)
    }

    fn check(&self, gpa: u64, len: u64) -> Result<()> {
        let ok = self
            .specs
            .iter()
            .any(|s| gpa >= s.gpa && gpa.checked_add(len).is_some_and(|e| e <= s.end()));
        if ok {
            Ok(())
        } else {
            Err(VmmError::OutOfBounds { gpa, len })
        }
    }

    /// Reads `buf.len()` bytes at `gpa` (within one region).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.check(gpa, buf.len() as u64)?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| VmmError::OutOfBounds {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        self.check(gpa, 8)?;
        self.mem
            .read_obj::<u64>(GuestAddress(gpa))
            .map_err(|_| VmmError::OutOfBounds { gpa, len: 8 })
    }

    /// Writes `data` at `gpa` and records the write in the VMM write log, so the next dirty
    /// collect reports it (KVM never sees writes made by the VMM).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.write_untracked(gpa, data)?;
        self.vmm_log.mark(gpa, data.len() as u64);
        Ok(())
    }

    /// Writes a u64 at `gpa`, tracked like [`GuestRam::write`].
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Writes without recording the write: for restoring memory on a migration destination,
    /// where no dirty tracking is running.
    pub fn write_untracked(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.check(gpa, data.len() as u64)?;
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| VmmError::OutOfBounds {
                gpa,
                len: data.len() as u64,
            })
    }

    /// Fills `len` bytes at `gpa` with zeros, untracked (destination side; `MAP_NORESERVE`
    /// memory that was never touched is already zero, so callers can skip fresh pages).
    pub fn zero_untracked(&self, gpa: u64, len: u64) -> Result<()> {
        self.check(gpa, len)?;
        const ZERO: [u8; 4096] = [0; 4096];
        let mut a = gpa;
        while a < gpa + len {
            let n = (gpa + len - a).min(4096);
            self.write_untracked(a, &ZERO[..n as usize])?;
            a += n;
        }
        Ok(())
    }

    /// A 64-bit FNV-1a style digest of every byte of every region (for end-to-end migration
    /// checks). Reads untouched sparse pages as zeros.
    pub fn digest(&self) -> Result<u64> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for s in &self.specs {
            for p in 0..s.bytes / PAGE_SIZE {
                self.read(s.gpa + p * PAGE_SIZE, &mut page)?;
                h = digest_page(h, s.gpa + p * PAGE_SIZE, &page);
            }
        }
        Ok(h)
    }
}

/// Folds one page into a running digest (word-wise, position-dependent).
pub fn digest_page(mut h: u64, gpa: u64, page: &[u8]) -> u64 {
    let mut acc = gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for c in page.chunks_exact(8) {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        acc = (acc ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    h ^= acc;
    h.wrapping_mul(0x0000_0100_0000_01b3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(slot: u16, gpa: u64, bytes: u64) -> RegionSpec {
        RegionSpec {
            slot,
            gpa,
            bytes,
            log_dirty: true,
        }
    }

    #[test]
    fn sparse_regions_read_write_and_bounds() {
        let ram = GuestRam::new(&[spec(1, 1 << 32, 1 << 30), spec(0, 0, 4 << 20)]).unwrap();
        assert_eq!(ram.regions()[0].slot, 0);
        ram.write_u64((1 << 32) + 4096 * 7, 42).unwrap();
        assert_eq!(ram.read_u64((1 << 32) + 4096 * 7).unwrap(), 42);
        assert!(matches!(
            ram.read_u64(5 << 20),
            Err(VmmError::OutOfBounds { .. })
        ));
        assert!(ram.read_u64((1 << 32) + (1 << 30) - 4).is_err());
        let mut out = kvm_dirty::DirtyPageSet::new(&ram.slot_specs());
        ram.vmm_log().drain_into(&mut out);
        assert_eq!(
            out.iter_gpa().collect::<Vec<_>>(),
            vec![(1 << 32) + 4096 * 7]
        );
    }

    #[test]
    fn populated_reports_written_pages_and_only_those() {
        let base = 1u64 << 32;
        let ram = GuestRam::new(&[spec(1, base, 1 << 20)]).unwrap();
        let mut bits = Vec::new();
        assert!(ram.populated(base, 256, &mut bits).unwrap());
        assert!(bits.iter().all(|&w| w == 0), "fresh memory: {bits:x?}");
        for p in [0u64, 63, 64, 200] {
            ram.write_untracked(base + p * 4096 + 8, &[1]).unwrap();
        }
        assert!(ram.populated(base, 256, &mut bits).unwrap());
        let set: Vec<u64> = (0..256u64)
            .filter(|&i| bits[(i / 64) as usize] & (1 << (i % 64)) != 0)
            .collect();
        assert_eq!(set, vec![0, 63, 64, 200]);
        // A window inside the region, not starting at its base.
        assert!(ram.populated(base + 63 * 4096, 2, &mut bits).unwrap());
        assert_eq!(bits, vec![0b11]);
        assert!(ram.populated(base + (1 << 20), 1, &mut bits).is_err());
    }

    #[test]
    fn bad_layouts_are_typed_errors() {
        assert!(GuestRam::new(&[spec(0, 0, 100)]).is_err());
        assert!(GuestRam::new(&[spec(0, 0, 8192), spec(1, 4096, 8192)]).is_err());
        assert!(GuestRam::new(&[spec(0, 0, 8192), spec(0, 8192, 8192)]).is_err());
    }

    #[test]
    fn digest_changes_with_content_and_position() {
        let a = digest_page(1, 0, &[0u8; 4096]);
        let b = digest_page(1, 4096, &[0u8; 4096]);
        let mut p = [0u8; 4096];
        p[4095] = 1;
        let c = digest_page(1, 0, &p);
        assert!(a != b && a != c && b != c);
    }
}
