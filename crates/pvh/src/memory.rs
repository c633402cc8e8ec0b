//! Guest RAM: one range below the 32-bit MMIO hole and, for guests larger than the hole's
//! start, one above 4 GiB. Each range is registered as memslots of at most [`slot_bytes`]
//! (a quarter GiB, or a sixteenth of a larger guest), numbered from 0 in address order: a
//! migration turns dirty logging on one memslot at a time as its bulk pass reaches it, so the
//! guest takes no write-protect fault on memory not sent yet.

use std::sync::Arc;

use crate::error::{PvhError, Result};

/// Start of the 32-bit MMIO hole (LAPIC at 0xfee00000 and IOAPIC at 0xfec00000 live in it).
pub const MMIO_HOLE_START: u64 = vmm::machine::MMIO_HOLE_START;
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

/// Largest memslot of a guest with `memory` bytes: 256 MiB, or a sixteenth of the guest
/// (rounded up to 2 MiB, so huge pages stay whole) when that is larger; a guest has at most
/// about 17 memslots.
pub fn slot_bytes(memory: u64) -> u64 {
    (256u64 << 20).max(memory.div_ceil(16).next_multiple_of(2 << 20))
}

/// The memslot regions of a guest with `memory` bytes of RAM (the RAM ranges in
/// [`slot_bytes`] pieces, slots numbered from 0 in address order), with dirty logging when
/// `log_dirty` (for a guest that may be migrated).
pub fn region_specs(memory: u64, log_dirty: bool) -> Result<Vec<vmm::RegionSpec>> {
    if memory < MIN_MEMORY || memory & 0xfff != 0 {
        return Err(PvhError::Config(format!(
            "memory must be a multiple of 4 KiB and at least {MIN_MEMORY} bytes, got {memory}"
        )));
    }
    let piece = slot_bytes(memory);
    let mut v = Vec::new();
    for r in ram_ranges(memory) {
        let mut gpa = r.gpa;
        while gpa < r.end() {
            let bytes = piece.min(r.end() - gpa);
            v.push(vmm::RegionSpec {
                slot: v.len() as u16,
                gpa,
                bytes,
                log_dirty,
            });
            gpa += bytes;
        }
    }
    Ok(v)
}

/// Guest RAM as the loader sees it: the RAM ranges over the VM's memory.
#[derive(Debug, Clone)]
pub struct GuestRam {
    ram: Arc<vmm::GuestRam>,
    ranges: Vec<RamRange>,
}

fn mem_err(e: vmm::VmmError) -> PvhError {
    PvhError::Memory(e.to_string())
}

impl GuestRam {
    /// Maps `memory` bytes (a multiple of 4 KiB, at least [`MIN_MEMORY`]) outside any VM
    /// (for building and checking images).
    pub fn new(memory: u64) -> Result<GuestRam> {
        let specs = region_specs(memory, false)?;
        Ok(Self::of(Arc::new(
            vmm::GuestRam::new(&specs).map_err(mem_err)?,
        )))
    }

    /// The loader's view of a VM's memory.
    pub fn of(ram: Arc<vmm::GuestRam>) -> GuestRam {
        // Adjacent memslots are one RAM range (`regions` is sorted by address).
        let mut ranges: Vec<RamRange> = Vec::new();
        for r in ram.regions() {
            match ranges.last_mut() {
                Some(last) if last.end() == r.gpa => last.bytes += r.bytes,
                _ => ranges.push(RamRange {
                    gpa: r.gpa,
                    bytes: r.bytes,
                }),
            }
        }
        GuestRam { ram, ranges }
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
        self.ram.write(gpa, data).map_err(mem_err)
    }

    /// Fills `buf` from `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.ram.read(gpa, buf).map_err(mem_err)
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        self.ram.read_u64(gpa).map_err(mem_err)
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
