//! Guest RAM: one region below the 32-bit MMIO hole and, for guests larger than the hole's
//! start, one above 4 GiB. Backed by anonymous `MAP_NORESERVE` mappings through vm-memory.

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

use crate::error::{PvhError, Result};

/// Start of the 32-bit MMIO hole (LAPIC at 0xfee00000 and IOAPIC at 0xfec00000 live in it).
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// Start of RAM above the hole.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// Smallest guest this loader builds.
pub const MIN_MEMORY: u64 = 2 << 20;

/// A RAM range in guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Start.
    pub gpa: u64,
    /// Length in bytes.
    pub bytes: u64,
}

impl RamRange {
    /// End (exclusive).
    pub fn end(&self) -> u64 {
        self.gpa + self.bytes
    }
}

/// Where `memory` bytes of RAM go: below the hole first, the rest above 4 GiB.
pub fn ram_ranges(memory: u64) -> Vec<RamRange> {
    let low = memory.min(MMIO_HOLE_START);
    let mut v = vec![RamRange { gpa: 0, bytes: low }];
    if memory > low {
        v.push(RamRange {
            gpa: HIGH_RAM_START,
            bytes: memory - low,
        });
    }
    v
}

/// Guest RAM.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    ranges: Vec<RamRange>,
}

impl GuestRam {
    /// Maps `memory` bytes (a multiple of 4 KiB, at least [`MIN_MEMORY`]).
    pub fn new(memory: u64) -> Result<GuestRam> {
        if memory < MIN_MEMORY || memory & 0xfff != 0 {
            return Err(PvhError::Config(format!(
                "memory must be a multiple of 4 KiB and at least {MIN_MEMORY} bytes, got {memory}"
            )));
        }
        let ranges = ram_ranges(memory);
        let mut regions = Vec::new();
        for r in &ranges {
            let len = usize::try_from(r.bytes)
                .map_err(|_| PvhError::Memory(format!("{} bytes is too large", r.bytes)))?;
            let region = vm_memory::mmap::MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| PvhError::Memory(e.to_string()))?;
            let g = GuestRegionMmap::new(region, GuestAddress(r.gpa))
                .ok_or_else(|| PvhError::Memory("region wraps the address space".into()))?;
            regions.push(g);
        }
        let mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| PvhError::Memory(e.to_string()))?;
        Ok(GuestRam { mem, ranges })
    }

    /// The RAM ranges, ascending.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.bytes).sum()
    }

    /// Whether `[gpa, gpa + len)` lies inside one RAM range.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len)
            .is_some_and(|end| self.ranges.iter().any(|r| gpa >= r.gpa && end <= r.end()))
    }

    /// Copies `data` to `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem.write_slice(data, GuestAddress(gpa)).map_err(|e| {
            PvhError::Memory(format!("write of {} bytes at {gpa:#x}: {e}", data.len()))
        })
    }

    /// Fills `buf` from `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| PvhError::Memory(format!("read of {} bytes at {gpa:#x}: {e}", buf.len())))
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The host mappings with their guest addresses, for memslot registration.
    pub(crate) fn mappings(&self) -> Vec<(u64, &MmapRegion<()>)> {
        self.ranges
            .iter()
            .filter_map(|r| {
                self.mem
                    .find_region(GuestAddress(r.gpa))
                    .map(|g| (r.gpa, &**g))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_have_only_low_ram_and_large_ones_split_at_the_hole() {
        assert_eq!(
            ram_ranges(64 << 20),
            vec![RamRange {
                gpa: 0,
                bytes: 64 << 20
            }]
        );
        assert_eq!(
            ram_ranges(5 << 30),
            vec![
                RamRange {
                    gpa: 0,
                    bytes: 3 << 30
                },
                RamRange {
                    gpa: 4 << 30,
                    bytes: 2 << 30
                }
            ]
        );
    }
}
