//! Guest RAM: sparse anonymous mappings (`MAP_NORESERVE`, only touched pages cost host RAM)
//! managed through vm-memory, one KVM memslot per region.
//!
//! Each region is mapped 2 MiB-aligned and, where the host offers transparent huge pages
//! (`/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`), advised with
//! `MADV_HUGEPAGE`, as QEMU does: one host fault then populates 512 guest pages, and KVM maps
//! them with large pages until dirty logging starts (it splits them to 4 KiB then, and only
//! while logging is on). [`RamBacking::Small`] opts out (the sync benchmark's deliberately
//! sparse slots would otherwise populate 2 MiB per dirty page).

use std::sync::Arc;

use kvm_dirty::{SlotId, SlotSpec, VmmWriteLog, PAGE_SIZE};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

use crate::error::{Result, VmmError};
use crate::sys;

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

/// How guest RAM is backed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RamBacking {
    /// Transparent huge pages where the host's THP mode allows them (QEMU's default).
    #[default]
    HugeWhereOffered,
    /// 4 KiB pages only (no advice).
    Small,
}

/// The host's transparent huge page mode (`/sys/kernel/mm/transparent_hugepage/enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThpMode {
    /// Every anonymous mapping may get huge pages.
    Always,
    /// Only mappings advised with `MADV_HUGEPAGE`.
    Madvise,
    /// Never (or the file is missing or unreadable: no THP support).
    Never,
}

impl ThpMode {
    /// Reads the host's mode.
    pub fn host() -> ThpMode {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .map(|s| ThpMode::parse(&s))
            .unwrap_or(ThpMode::Never)
    }

    /// Parses the sysfs file's contents (the selected mode is in brackets).
    pub fn parse(s: &str) -> ThpMode {
        if s.contains("[always]") {
            ThpMode::Always
        } else if s.contains("[madvise]") {
            ThpMode::Madvise
        } else {
            ThpMode::Never
        }
    }
}

/// Alignment of every guest RAM mapping: a PMD (2 MiB), so huge pages can back it whole.
pub const HUGE_PAGE_BYTES: u64 = 2 << 20;

/// Guest RAM of a VM.
#[derive(Debug)]
pub struct GuestRam {
    // Field order: the vm-memory regions (which do not own their mappings) drop before the
    // mappings are unmapped.
    mem: GuestMemoryMmap<()>,
    specs: Vec<RegionSpec>,
    vmm_log: Arc<VmmWriteLog>,
    huge_pages: bool,
    _maps: Vec<sys::AnonMapping>,
}

impl GuestRam {
    /// Maps every region (sparse, private, anonymous) with [`RamBacking::HugeWhereOffered`].
    pub fn new(specs: &[RegionSpec]) -> Result<Self> {
        Self::with_backing(specs, RamBacking::default())
    }

    /// Maps every region (sparse, private, anonymous, 2 MiB-aligned), backed as `backing`
    /// asks and the host allows.
    pub fn with_backing(specs: &[RegionSpec], backing: RamBacking) -> Result<Self> {
        let advise = backing == RamBacking::HugeWhereOffered && ThpMode::host() != ThpMode::Never;
        let mut sorted = specs.to_vec();
        sorted.sort_by_key(|s| s.gpa);
        let mut regions = Vec::with_capacity(sorted.len());
        let mut maps = Vec::with_capacity(sorted.len());
        let mut huge_pages = advise;
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
            let map = sys::AnonMapping::new(len, HUGE_PAGE_BYTES as usize)
                .map_err(|e| bad(&e.to_string()))?;
            // An advice the kernel refuses only costs speed: the region stays on 4 KiB pages.
            if advise && map.advise_huge_pages().is_err() {
                huge_pages = false;
            }
            let region = map.region().map_err(|e| bad(&e.to_string()))?;
            maps.push(map);
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
            huge_pages,
            _maps: maps,
        })
    }

    /// Whether every region was advised with `MADV_HUGEPAGE` (the host's THP mode allowed it
    /// and the backing asked for it).
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// Host virtual address of the region holding `gpa` (for tests and diagnostics that read
    /// `/proc/self/smaps`).
    pub fn host_address(&self, gpa: u64) -> Option<u64> {
        let r = self.mem.find_region(GuestAddress(gpa))?;
        Some(r.as_ptr() as u64 + (gpa - vm_memory::GuestMemoryRegion::start_addr(r).0))
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

    /// The smaps record of the mapping starting at `addr`: (VmFlags line, THPeligible).
    fn smaps_of(addr: u64) -> (String, Option<u64>, u64) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        assert!(lines.next().is_some(), "no mapping at {addr:#x}");
        let (mut flags, mut eligible, mut anon_huge) = (String::new(), None, 0);
        for l in lines {
            let header = l.split_whitespace().next().is_some_and(|t| {
                t.contains('-') && t.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
            });
            if header {
                break;
            }
            if let Some(v) = l.strip_prefix("VmFlags:") {
                flags = v.to_string();
            } else if let Some(v) = l.strip_prefix("THPeligible:") {
                eligible = v.trim().parse().ok();
            } else if let Some(v) = l.strip_prefix("AnonHugePages:") {
                anon_huge = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            }
        }
        (flags, eligible, anon_huge)
    }

    #[test]
    fn guest_ram_is_2m_aligned_and_advised_huge_where_the_host_allows() {
        let base = 1u64 << 32;
        let mode = ThpMode::host();
        let ram = GuestRam::new(&[spec(1, base, 8 << 20)]).unwrap();
        let small = GuestRam::with_backing(&[spec(1, base, 8 << 20)], RamBacking::Small).unwrap();
        let addr = ram.host_address(base).unwrap();
        assert_eq!(addr % HUGE_PAGE_BYTES, 0, "mapping at {addr:#x}");
        assert_eq!(ram.huge_pages(), mode != ThpMode::Never);
        assert!(!small.huge_pages());
        // Populate 2 MiB so the kernel may back it with a huge page (reported, not asserted:
        // whether one is free depends on the host's fragmentation).
        ram.write_untracked(base, &vec![1u8; HUGE_PAGE_BYTES as usize])
            .unwrap();
        let (flags, eligible, anon_huge) = smaps_of(addr);
        let (small_flags, small_eligible, _) = smaps_of(small.host_address(base).unwrap());
        eprintln!("THP {mode:?}: advised VmFlags [{flags}] THPeligible {eligible:?} AnonHugePages {anon_huge} kB; small VmFlags [{small_flags}]");
        // `hg` in VmFlags is MADV_HUGEPAGE.
        assert_eq!(
            flags.split_whitespace().any(|f| f == "hg"),
            mode != ThpMode::Never
        );
        assert!(!small_flags.split_whitespace().any(|f| f == "hg"));
        if mode == ThpMode::Madvise {
            assert_eq!(eligible, Some(1));
            assert_eq!(small_eligible, Some(0));
        }
    }

    #[test]
    fn thp_mode_reads_the_bracketed_choice() {
        assert_eq!(ThpMode::parse("always [madvise] never\n"), ThpMode::Madvise);
        assert_eq!(ThpMode::parse("[always] madvise never\n"), ThpMode::Always);
        assert_eq!(ThpMode::parse("always madvise [never]\n"), ThpMode::Never);
        assert_eq!(ThpMode::parse(""), ThpMode::Never);
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
