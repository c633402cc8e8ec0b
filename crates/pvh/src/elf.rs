//! A minimal ELF32/ELF64 reader for PVH kernels (program headers and PT_NOTE notes only) and
//! the writer the test kernel uses. Every offset read from the file is bounds-checked, so a
//! hostile image yields a [`LoadError`], never a panic.

use crate::error::LoadError;

/// `PT_LOAD`.
pub const PT_LOAD: u32 = 1;
/// `PT_NOTE`.
pub const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical entry point of a PVH kernel.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `EM_386`.
const EM_386: u16 = 3;
/// `EM_X86_64`.
const EM_X86_64: u16 = 62;
/// `ET_EXEC`.
const ET_EXEC: u16 = 2;

/// ELF class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// ELFCLASS32.
    Elf32,
    /// ELFCLASS64.
    Elf64,
}

/// A loadable segment: `file[offset..offset + filesz]` goes to `paddr`, the rest up to `memsz`
/// is zeroed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address (`p_paddr`, as QEMU's PVH loader uses).
    pub paddr: u64,
    /// File offset.
    pub offset: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory.
    pub memsz: u64,
}

impl Segment {
    /// End of the segment in guest-physical memory (checked at parse time not to overflow).
    pub fn end(&self) -> u64 {
        self.paddr + self.memsz
    }
}

/// A parsed PVH kernel image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvhImage {
    /// ELF class of the file.
    pub class: Class,
    /// The `XEN_ELFNOTE_PHYS32_ENTRY` address.
    pub entry: u32,
    /// Loadable segments with a non-zero memory size, sorted by address, not overlapping.
    pub segments: Vec<Segment>,
}

fn slice<'a>(
    file: &'a [u8],
    what: &'static str,
    offset: u64,
    len: u64,
) -> Result<&'a [u8], LoadError> {
    let trunc = LoadError::Truncated {
        what,
        offset,
        len,
        file_len: file.len() as u64,
    };
    let end = offset.checked_add(len).ok_or(trunc.clone())?;
    if end > file.len() as u64 {
        return Err(trunc);
    }
    Ok(&file[offset as usize..end as usize])
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}

/// Parses `file` as a PVH kernel: checks the headers, collects the PT_LOAD segments and finds
/// the PVH entry note in the PT_NOTE segments.
pub fn parse(file: &[u8]) -> Result<PvhImage, LoadError> {
    if file.len() < 16 || &file[..4] != b"\x7fELF" {
        return Err(LoadError::NotElf);
    }
    let class = match file[4] {
        1 => Class::Elf32,
        2 => Class::Elf64,
        _ => return Err(LoadError::Unsupported("ELF class is neither 32 nor 64 bit")),
    };
    if file[5] != 1 {
        return Err(LoadError::Unsupported("not little-endian"));
    }
    let ehsize = if class == Class::Elf64 { 64 } else { 52 };
    let eh = slice(file, "ELF header", 0, ehsize)?;
    let machine = u16_at(eh, 18);
    if machine != EM_X86_64 && machine != EM_386 {
        return Err(LoadError::Unsupported("machine is not x86"));
    }
    let (phoff, phentsize, phnum, min_phent) = match class {
        Class::Elf64 => (u64_at(eh, 32), u16_at(eh, 54), u16_at(eh, 56), 56u16),
        Class::Elf32 => (
            u64::from(u32_at(eh, 28)),
            u16_at(eh, 42),
            u16_at(eh, 44),
            32,
        ),
    };
    if phnum > 0 && phentsize < min_phent {
        return Err(LoadError::Unsupported("program header entries too small"));
    }
    let table = slice(
        file,
        "program headers",
        phoff,
        u64::from(phentsize) * u64::from(phnum),
    )?;
    let mut segments = Vec::new();
    let mut entry = None;
    for i in 0..usize::from(phnum) {
        let ph = &table[i * usize::from(phentsize)..];
        let (ty, offset, paddr, filesz, memsz) = match class {
            Class::Elf64 => (
                u32_at(ph, 0),
                u64_at(ph, 8),
                u64_at(ph, 24),
                u64_at(ph, 32),
                u64_at(ph, 40),
            ),
            Class::Elf32 => (
                u32_at(ph, 0),
                u64::from(u32_at(ph, 4)),
                u64::from(u32_at(ph, 12)),
                u64::from(u32_at(ph, 16)),
                u64::from(u32_at(ph, 20)),
            ),
        };
        match ty {
            PT_LOAD => {
                if filesz > memsz {
                    return Err(LoadError::BadSegment {
                        paddr,
                        why: "file size larger than memory size",
                    });
                }
                if paddr.checked_add(memsz).is_none() {
                    return Err(LoadError::BadSegment {
                        paddr,
                        why: "address overflows",
                    });
                }
                slice(file, "segment contents", offset, filesz)?;
                if memsz > 0 {
                    segments.push(Segment {
                        paddr,
                        offset,
                        filesz,
                        memsz,
                    });
                }
            }
            PT_NOTE => {
                let notes = slice(file, "note segment", offset, filesz)?;
                if let Some(e) = find_pvh_note(notes)? {
                    entry = Some(e);
                }
            }
            _ => {}
        }
    }
    let entry = entry.ok_or(LoadError::NoPvhNote)?;
    if segments.is_empty() {
        return Err(LoadError::NoSegments);
    }
    segments.sort_by_key(|s| s.paddr);
    for w in segments.windows(2) {
        if w[1].paddr < w[0].end() {
            return Err(LoadError::Overlap {
                a_start: w[0].paddr,
                a_end: w[0].end(),
                b_start: w[1].paddr,
                b_end: w[1].end(),
            });
        }
    }
    if !segments
        .iter()
        .any(|s| u64::from(entry) >= s.paddr && u64::from(entry) < s.end())
    {
        return Err(LoadError::EntryOutsideImage(u64::from(entry)));
    }
    Ok(PvhImage {
        class,
        entry,
        segments,
    })
}

fn align4(n: u64) -> u64 {
    (n + 3) & !3
}

/// Walks the notes of one PT_NOTE segment and returns the PVH entry if present.
fn find_pvh_note(notes: &[u8]) -> Result<Option<u32>, LoadError> {
    let mut off = 0u64;
    let len = notes.len() as u64;
    while off + 12 <= len {
        let h = &notes[off as usize..];
        let namesz = u64::from(u32_at(h, 0));
        let descsz = u64::from(u32_at(h, 4));
        let ty = u32_at(h, 8);
        let name_off = off + 12;
        let desc_off = name_off + align4(namesz);
        let next = desc_off + align4(descsz);
        if next > len {
            return Err(LoadError::Truncated {
                what: "note",
                offset: off,
                len: next - off,
                file_len: len,
            });
        }
        let name = &notes[name_off as usize..(name_off + namesz) as usize];
        if ty == XEN_ELFNOTE_PHYS32_ENTRY && (name == b"Xen\0" || name == b"Xen") {
            let d = &notes[desc_off as usize..(desc_off + descsz) as usize];
            let v = match descsz {
                4 => u64::from(u32_at(d, 0)),
                8 => u64_at(d, 0),
                _ => return Err(LoadError::BadPvhNote("descriptor is not 4 or 8 bytes")),
            };
            return u32::try_from(v)
                .map(Some)
                .map_err(|_| LoadError::BadPvhNote("entry above 4 GiB"));
        }
        off = next;
    }
    Ok(None)
}

/// A segment for [`fn@write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutSegment {
    /// Load address (both `p_vaddr` and `p_paddr`).
    pub paddr: u64,
    /// Contents.
    pub data: Vec<u8>,
    /// Memory size (at least `data.len()`; the rest is zeroed by the loader).
    pub memsz: u64,
}

/// Writes an executable ELF of `class` with `segments` as PT_LOAD and, if `pvh_entry` is set,
/// a PT_NOTE holding `XEN_ELFNOTE_PHYS32_ENTRY` (a 4-byte descriptor).
pub fn write(class: Class, segments: &[OutSegment], pvh_entry: Option<u32>) -> Vec<u8> {
    let (ehsize, phentsize) = match class {
        Class::Elf64 => (64usize, 56usize),
        Class::Elf32 => (52, 32),
    };
    let nph = segments.len() + usize::from(pvh_entry.is_some());
    let mut note = Vec::new();
    if let Some(e) = pvh_entry {
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&e.to_le_bytes());
    }
    let note_off = ehsize + nph * phentsize;
    let mut data_off = (note_off + note.len() + 15) & !15;
    let mut offsets = Vec::new();
    for s in segments {
        offsets.push(data_off);
        data_off = (data_off + s.data.len() + 15) & !15;
    }
    let mut f = vec![0u8; data_off];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = if class == Class::Elf64 { 2 } else { 1 };
    f[5] = 1; // little-endian
    f[6] = 1; // EV_CURRENT
    let put16 = |f: &mut Vec<u8>, o: usize, v: u16| f[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |f: &mut Vec<u8>, o: usize, v: u32| f[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |f: &mut Vec<u8>, o: usize, v: u64| f[o..o + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut f, 16, ET_EXEC);
    let entry = u64::from(pvh_entry.unwrap_or(0));
    match class {
        Class::Elf64 => {
            put16(&mut f, 18, EM_X86_64);
            put32(&mut f, 20, 1);
            put64(&mut f, 24, entry);
            put64(&mut f, 32, ehsize as u64);
            put16(&mut f, 52, ehsize as u16);
            put16(&mut f, 54, phentsize as u16);
            put16(&mut f, 56, nph as u16);
        }
        Class::Elf32 => {
            put16(&mut f, 18, EM_386);
            put32(&mut f, 20, 1);
            put32(&mut f, 24, entry as u32);
            put32(&mut f, 28, ehsize as u32);
            put16(&mut f, 40, ehsize as u16);
            put16(&mut f, 42, phentsize as u16);
            put16(&mut f, 44, nph as u16);
        }
    }
    let mut ph = ehsize;
    let mut put_ph = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
        match class {
            Class::Elf64 => {
                put32(f, ph, ty);
                put32(f, ph + 4, 7); // RWX
                put64(f, ph + 8, off);
                put64(f, ph + 16, addr);
                put64(f, ph + 24, addr);
                put64(f, ph + 32, filesz);
                put64(f, ph + 40, memsz);
                put64(f, ph + 48, if ty == PT_LOAD { 0x1000 } else { 4 });
            }
            Class::Elf32 => {
                put32(f, ph, ty);
                put32(f, ph + 4, off as u32);
                put32(f, ph + 8, addr as u32);
                put32(f, ph + 12, addr as u32);
                put32(f, ph + 16, filesz as u32);
                put32(f, ph + 20, memsz as u32);
                put32(f, ph + 24, 7);
                put32(f, ph + 28, if ty == PT_LOAD { 0x1000 } else { 4 });
            }
        }
        ph += phentsize;
    };
    for (s, &o) in segments.iter().zip(&offsets) {
        put_ph(
            &mut f,
            PT_LOAD,
            o as u64,
            s.paddr,
            s.data.len() as u64,
            s.memsz.max(s.data.len() as u64),
        );
    }
    if pvh_entry.is_some() {
        put_ph(&mut f, PT_NOTE, note_off as u64, 0, note.len() as u64, 0);
        f[note_off..note_off + note.len()].copy_from_slice(&note);
    }
    for (s, &o) in segments.iter().zip(&offsets) {
        f[o..o + s.data.len()].copy_from_slice(&s.data);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(paddr: u64, len: usize, memsz: u64) -> OutSegment {
        OutSegment {
            paddr,
            data: vec![0x90; len],
            memsz,
        }
    }

    #[test]
    fn round_trip_elf64_and_elf32_find_the_note_and_segments() {
        for class in [Class::Elf64, Class::Elf32] {
            let f = write(
                class,
                &[seg(0x10_0000, 100, 0x2000), seg(0x8000, 16, 16)],
                Some(0x10_0010),
            );
            let img = parse(&f).unwrap();
            assert_eq!(img.class, class);
            assert_eq!(img.entry, 0x10_0010);
            assert_eq!(img.segments.len(), 2);
            assert_eq!(img.segments[0].paddr, 0x8000);
            assert_eq!(img.segments[1].filesz, 100);
            assert_eq!(img.segments[1].memsz, 0x2000);
        }
    }

    #[test]
    fn elf_without_the_pvh_note_is_rejected() {
        let f = write(Class::Elf64, &[seg(0x10_0000, 16, 16)], None);
        assert_eq!(parse(&f), Err(LoadError::NoPvhNote));
    }

    #[test]
    fn not_elf_and_every_truncation_give_typed_errors() {
        assert_eq!(parse(b"MZ\x90\x00"), Err(LoadError::NotElf));
        let f = write(Class::Elf64, &[seg(0x10_0000, 64, 64)], Some(0x10_0000));
        for n in 0..f.len() {
            let r = parse(&f[..n]);
            assert!(r.is_err(), "prefix of {n} bytes parsed");
        }
        match parse(&f[..f.len() - 1]) {
            Err(LoadError::Truncated { what, .. }) => assert_eq!(what, "segment contents"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn overlapping_segments_are_rejected() {
        let f = write(
            Class::Elf64,
            &[seg(0x10_0000, 16, 0x2000), seg(0x10_1000, 16, 16)],
            Some(0x10_0000),
        );
        assert!(matches!(
            parse(&f),
            Err(LoadError::Overlap {
                a_start: 0x10_0000,
                b_start: 0x10_1000,
                ..
            })
        ));
    }

    #[test]
    fn entry_outside_the_image_is_rejected() {
        let f = write(Class::Elf32, &[seg(0x10_0000, 16, 16)], Some(0x20_0000));
        assert_eq!(parse(&f), Err(LoadError::EntryOutsideImage(0x20_0000)));
    }

    #[test]
    fn corrupted_headers_never_panic() {
        let f = write(Class::Elf64, &[seg(0x10_0000, 64, 64)], Some(0x10_0000));
        for i in 0..f.len().min(200) {
            for v in [0u8, 0xff, 0x7f, 0x40] {
                let mut g = f.clone();
                g[i] = v;
                let _ = parse(&g);
            }
        }
    }
}
