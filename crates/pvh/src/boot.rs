//! The PVH boot protocol: where the loader puts `hvm_start_info`, the e820 memory map and the
//! command line, and loading an image's segments into guest RAM.
//!
//! Layout (all below the first kernel segment a sane PVH kernel uses):
//! - [`START_INFO_GPA`]: `struct hvm_start_info` (Xen `start_info.h`, version 1, 56 bytes)
//! - [`MEMMAP_GPA`]: `struct hvm_memmap_table_entry[]` (24 bytes each)
//! - [`MODLIST_GPA`]: `struct hvm_modlist_entry` of the initrd (module 0), when there is one
//! - [`CMDLINE_GPA`]: the NUL-terminated command line (at most [`CMDLINE_MAX`] bytes)
//! - [`crate::mptable::MPTABLE_GPA`]: the MP tables (every vCPU, the IOAPIC, ISA routing)
//! - the initrd: page-aligned at the top of RAM below the 3 GiB hole (and below
//!   [`INITRD_MAX_END`]), above the kernel's last segment.

use crate::elf::PvhImage;
use crate::error::{LoadError, Result};
use crate::memory::{GuestRam, RamRange};
use crate::mptable;

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_MAGIC: u32 = 0x336e_c578;
/// Address of `hvm_start_info`.
pub const START_INFO_GPA: u64 = 0x6000;
/// Address of the memory map.
pub const MEMMAP_GPA: u64 = 0x6040;
/// Address of the module list (`hvm_modlist_entry`, 32 bytes each; only the initrd).
pub const MODLIST_GPA: u64 = 0x6e00;
/// Address of the command line.
pub const CMDLINE_GPA: u64 = 0x7000;
/// The initrd ends at or below this address (as QEMU's loader caps it for Linux: the top of
/// the kernel's 896 MiB direct map on 32-bit, harmless on 64-bit).
pub const INITRD_MAX_END: u64 = 0x3800_0000;
/// Longest command line, without its NUL.
pub const CMDLINE_MAX: usize = 4095;
/// End of the boot data.
pub const BOOT_DATA_END: u64 = 0x8000;
/// End of conventional memory (the 640 KiB - 1 MiB legacy range is not RAM in the map).
pub const LOW_RAM_END: u64 = 0xa_0000;
/// Start of extended memory.
pub const EXT_RAM_START: u64 = 0x10_0000;
/// `XEN_HVM_MEMMAP_TYPE_RAM` (e820 type 1).
pub const E820_RAM: u32 = 1;

/// One memory map entry (`hvm_memmap_table_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// Type (1 = RAM).
    pub ty: u32,
}

/// The memory map the guest sees for RAM `ranges` (`GuestRam::ranges` or
/// `memory::ram_ranges`): conventional memory, extended memory up to the hole, and RAM above
/// 4 GiB when there is any.
pub fn memory_map(ranges: &[RamRange]) -> Vec<E820Entry> {
    let mut v = Vec::new();
    for r in ranges {
        if r.gpa == 0 {
            v.push(E820Entry {
                addr: 0,
                size: r.bytes.min(LOW_RAM_END),
                ty: E820_RAM,
            });
            if r.end() > EXT_RAM_START {
                v.push(E820Entry {
                    addr: EXT_RAM_START,
                    size: r.end() - EXT_RAM_START,
                    ty: E820_RAM,
                });
            }
        } else {
            v.push(E820Entry {
                addr: r.gpa,
                size: r.bytes,
                ty: E820_RAM,
            });
        }
    }
    v
}

fn is_ram(map: &[E820Entry], start: u64, end: u64) -> bool {
    map.iter()
        .any(|e| e.ty == E820_RAM && start >= e.addr && end <= e.addr + e.size)
}

/// Checks that `image` fits RAM `ranges` and does not collide with the boot data (needs no
/// guest memory, so a VM is built only for an image that loads).
pub fn check_placement(
    image: &PvhImage,
    ranges: &[RamRange],
) -> std::result::Result<(), LoadError> {
    let needed: u64 = image.segments.iter().map(|s| s.memsz).sum();
    let memory: u64 = ranges.iter().map(|r| r.bytes).sum();
    if needed > memory {
        return Err(LoadError::DoesNotFit { needed, memory });
    }
    let map = memory_map(ranges);
    for s in &image.segments {
        if s.paddr < BOOT_DATA_END && s.end() > START_INFO_GPA {
            return Err(LoadError::OverlapsBootData {
                start: s.paddr,
                end: s.end(),
                boot_start: START_INFO_GPA,
                boot_end: BOOT_DATA_END,
            });
        }
        if !is_ram(&map, s.paddr, s.end()) {
            return Err(LoadError::OutsideMemory {
                start: s.paddr,
                end: s.end(),
            });
        }
    }
    Ok(())
}

/// What the loader passes to the kernel besides the image.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootData<'a> {
    /// The command line.
    pub cmdline: &'a str,
    /// The initial ramdisk (module 0), if any.
    pub initrd: Option<&'a [u8]>,
    /// vCPUs listed in the MP table (0: no MP table).
    pub vcpus: usize,
}

/// Where an initrd of `size` bytes goes for `image` in RAM `ranges`: page-aligned at the top
/// of the RAM below the hole (capped at [`INITRD_MAX_END`]), above every kernel segment.
pub fn initrd_placement(
    image: &PvhImage,
    ranges: &[RamRange],
    size: u64,
) -> std::result::Result<u64, LoadError> {
    let kernel_end = image.segments.iter().map(|s| s.end()).max().unwrap_or(0);
    let floor = kernel_end.max(EXT_RAM_START).next_multiple_of(4096);
    let top = memory_map(ranges)
        .iter()
        .filter(|e| e.addr >= EXT_RAM_START && e.addr < INITRD_MAX_END)
        .map(|e| (e.addr + e.size).min(INITRD_MAX_END))
        .max()
        .unwrap_or(0);
    let start = top.checked_sub(size).map(|s| s & !0xfff);
    match start {
        Some(s) if s >= floor && size > 0 => Ok(s),
        _ => Err(LoadError::InitrdDoesNotFit { size, floor, top }),
    }
}

/// Loads `image` (parsed from `file`) into `ram` and writes the start info, memory map and
/// command line. Returns the address of `hvm_start_info` (the guest's EBX).
pub fn load(image: &PvhImage, file: &[u8], ram: &GuestRam, cmdline: &str) -> Result<u64> {
    load_with(
        image,
        file,
        ram,
        &BootData {
            cmdline,
            ..BootData::default()
        },
    )
}

/// [`load`] with an initrd and the MP table: also places the initrd (module 0 of the start
/// info, see [`initrd_placement`]) and writes the MP tables for `boot.vcpus` vCPUs.
pub fn load_with(
    image: &PvhImage,
    file: &[u8],
    ram: &GuestRam,
    boot: &BootData<'_>,
) -> Result<u64> {
    let cmdline = boot.cmdline;
    check_placement(image, ram.ranges())?;
    let initrd_gpa = match boot.initrd {
        Some(d) => Some(initrd_placement(image, ram.ranges(), d.len() as u64)?),
        None => None,
    };
    let mp = match boot.vcpus {
        0 => None,
        n => Some(mptable::build(n).ok_or(LoadError::MpTable(n))?),
    };
    if cmdline.len() > CMDLINE_MAX {
        return Err(LoadError::Cmdline("longer than 4095 bytes").into());
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(LoadError::Cmdline("contains a NUL byte").into());
    }
    for s in &image.segments {
        // Parse-time checks guarantee these bounds lie inside `file`.
        let data = file
            .get(s.offset as usize..(s.offset + s.filesz) as usize)
            .ok_or(LoadError::Truncated {
                what: "segment contents",
                offset: s.offset,
                len: s.filesz,
                file_len: file.len() as u64,
            })?;
        ram.write(s.paddr, data)?;
        // Zero the bss in bounded chunks: `memsz` comes from the file and may be huge.
        let zeros = [0u8; 64 << 10];
        let mut at = s.paddr + s.filesz;
        while at < s.end() {
            let n = (s.end() - at).min(zeros.len() as u64);
            ram.write(at, &zeros[..n as usize])?;
            at += n;
        }
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    ram.write(CMDLINE_GPA, &c)?;
    let map = memory_map(ram.ranges());
    let mut m = Vec::with_capacity(map.len() * 24);
    for e in &map {
        m.extend_from_slice(&e.addr.to_le_bytes());
        m.extend_from_slice(&e.size.to_le_bytes());
        m.extend_from_slice(&e.ty.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
    }
    ram.write(MEMMAP_GPA, &m)?;
    let mut si = [0u8; 56];
    si[0..4].copy_from_slice(&START_MAGIC.to_le_bytes());
    si[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1: has the memory map
    if let (Some(gpa), Some(data)) = (initrd_gpa, boot.initrd) {
        ram.write(gpa, data)?;
        // hvm_modlist_entry: paddr, size, cmdline_paddr (none), reserved.
        let mut e = [0u8; 32];
        e[0..8].copy_from_slice(&gpa.to_le_bytes());
        e[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        ram.write(MODLIST_GPA, &e)?;
        si[12..16].copy_from_slice(&1u32.to_le_bytes()); // nr_modules
        si[16..24].copy_from_slice(&MODLIST_GPA.to_le_bytes());
    }
    if let Some(t) = &mp {
        ram.write(mptable::MPTABLE_GPA, t)?;
    }
    si[24..32].copy_from_slice(&CMDLINE_GPA.to_le_bytes());
    // rsdp_paddr (32): zero, no ACPI tables.
    si[40..48].copy_from_slice(&MEMMAP_GPA.to_le_bytes());
    si[48..52].copy_from_slice(&(map.len() as u32).to_le_bytes());
    ram.write(START_INFO_GPA, &si)?;
    Ok(START_INFO_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::{self, Class, OutSegment};
    use crate::error::PvhError;

    fn image(paddr: u64, memsz: u64) -> (Vec<u8>, PvhImage) {
        let f = elf::write(
            Class::Elf64,
            &[OutSegment {
                paddr,
                data: vec![0xf4; 16],
                memsz,
            }],
            Some(paddr as u32),
        );
        let img = elf::parse(&f).unwrap();
        (f, img)
    }

    #[test]
    fn start_info_has_magic_version_cmdline_and_memmap() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let (f, img) = image(0x10_0000, 0x1000);
        let si = load(&img, &f, &ram, "ws_mb=3").unwrap();
        assert_eq!(si, START_INFO_GPA);
        let mut b = [0u8; 56];
        ram.read(si, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), START_MAGIC);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(b[24..32].try_into().unwrap()),
            CMDLINE_GPA
        );
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 2);
        let mut c = [0u8; 8];
        ram.read(CMDLINE_GPA, &mut c).unwrap();
        assert_eq!(&c, b"ws_mb=3\0");
        assert_eq!(ram.read_u64(MEMMAP_GPA + 24).unwrap(), EXT_RAM_START);
        assert_eq!(
            ram.read_u64(MEMMAP_GPA + 32).unwrap(),
            (16 << 20) - EXT_RAM_START
        );
    }

    #[test]
    fn initrd_is_module_0_page_aligned_at_the_top_of_low_ram() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let (f, img) = image(0x100_0000, 0x40_0000);
        let initrd: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let si = load_with(
            &img,
            &f,
            &ram,
            &BootData {
                cmdline: "rdinit=/init",
                initrd: Some(&initrd),
                vcpus: 2,
            },
        )
        .unwrap();
        let mut b = [0u8; 56];
        ram.read(si, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 1);
        assert_eq!(
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
            MODLIST_GPA
        );
        let paddr = ram.read_u64(MODLIST_GPA).unwrap();
        assert_eq!(ram.read_u64(MODLIST_GPA + 8).unwrap(), 10_000);
        assert_eq!(ram.read_u64(MODLIST_GPA + 16).unwrap(), 0);
        assert_eq!(paddr % 4096, 0);
        assert!(paddr >= 0x140_0000 && paddr + 10_000 <= 64 << 20);
        assert!(paddr + 10_000 > (64 << 20) - 4096);
        let mut back = vec![0u8; 10_000];
        ram.read(paddr, &mut back).unwrap();
        assert_eq!(back, initrd);
        // The MP table's floating pointer is where Linux scans for it.
        let mut mp = [0u8; 4];
        ram.read(mptable::MPTABLE_GPA, &mut mp).unwrap();
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn an_initrd_that_would_overlap_the_kernel_is_rejected() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let (f, img) = image(0x100_0000, 0x80_0000);
        let big = vec![0u8; (8 << 20) + 1];
        assert!(matches!(
            load_with(
                &img,
                &f,
                &ram,
                &BootData {
                    initrd: Some(&big),
                    ..BootData::default()
                }
            ),
            Err(PvhError::Load(LoadError::InitrdDoesNotFit {
                floor: 0x180_0000,
                top: 0x200_0000,
                ..
            }))
        ));
        assert!(matches!(
            initrd_placement(&img, ram.ranges(), 0),
            Err(LoadError::InitrdDoesNotFit { size: 0, .. })
        ));
        // Exactly the room between the kernel and the top fits.
        assert_eq!(
            initrd_placement(&img, ram.ranges(), 8 << 20),
            Ok(0x180_0000)
        );
    }

    #[test]
    fn initrd_stays_below_the_cap_in_large_guests() {
        let (_, img) = image(0x100_0000, 0x1000);
        let ranges = crate::memory::ram_ranges(6 << 30);
        let at = initrd_placement(&img, &ranges, 0x1234).unwrap();
        assert_eq!(at, (INITRD_MAX_END - 0x1234) & !0xfff);
    }

    #[test]
    fn bss_is_zeroed_even_over_old_contents() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.write(0x10_0010, &[0xaa; 0x30000]).unwrap();
        let (f, img) = image(0x10_0000, 0x3_0000);
        load(&img, &f, &ram, "").unwrap();
        let mut b = vec![0u8; 0x3_0000];
        ram.read(0x10_0000, &mut b).unwrap();
        assert!(b[..16].iter().all(|&x| x == 0xf4));
        assert!(b[16..].iter().all(|&x| x == 0));
        assert_eq!(ram.read_u64(0x13_0000).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);
    }

    #[test]
    fn memory_map_covers_ram_below_and_above_the_hole() {
        let ram = GuestRam::new(5 << 30).unwrap();
        let m = memory_map(ram.ranges());
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].addr + m[1].size, 3 << 30);
        assert_eq!((m[2].addr, m[2].size), (4 << 30, 2 << 30));
    }

    #[test]
    fn segment_outside_ram_is_rejected() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let (f, img) = image(0x200_0000, 0x1000);
        assert!(matches!(
            load(&img, &f, &ram, ""),
            Err(PvhError::Load(LoadError::OutsideMemory {
                start: 0x200_0000,
                ..
            }))
        ));
        let (f, img) = image(0xa_0000, 0x1000);
        assert!(matches!(
            load(&img, &f, &ram, ""),
            Err(PvhError::Load(LoadError::OutsideMemory { .. }))
        ));
    }

    #[test]
    fn kernel_larger_than_memory_does_not_fit() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let (f, img) = image(0x10_0000, 8 << 20);
        assert!(matches!(
            load(&img, &f, &ram, ""),
            Err(PvhError::Load(LoadError::DoesNotFit { needed, memory: 0x40_0000 })) if needed == 8 << 20
        ));
    }

    #[test]
    fn segment_over_the_boot_data_is_rejected() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let (f, img) = image(0x7000, 0x100);
        assert!(matches!(
            load(&img, &f, &ram, ""),
            Err(PvhError::Load(LoadError::OverlapsBootData { .. }))
        ));
    }

    #[test]
    fn overlong_or_nul_command_lines_are_rejected() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let (f, img) = image(0x10_0000, 0x100);
        let long = "x".repeat(CMDLINE_MAX + 1);
        assert!(matches!(
            load(&img, &f, &ram, &long),
            Err(PvhError::Load(LoadError::Cmdline(_)))
        ));
        assert!(matches!(
            load(&img, &f, &ram, "a\0b"),
            Err(PvhError::Load(LoadError::Cmdline(_)))
        ));
    }
}
