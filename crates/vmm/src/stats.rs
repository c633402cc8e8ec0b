//! KVM's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+): a file with a header, an id
//! string, descriptors (flags, exponent, size, offset, bucket size, name) and a data block of
//! `u64`s. The header and descriptors are read and checked once, when the file is opened;
//! each read afterwards is one `pread` of the value at `data_offset + offset`.
//!
//! The kernel writes the file, but its sizes are still checked against bounds here (a typed
//! [`StatsError`], never an unbounded allocation): a corrupted or future layout must not make
//! the VMM allocate what a header says.

use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;

/// Bytes of `struct kvm_stats_header` (flags, name_size, num_desc, id_offset, desc_offset,
/// data_offset: six `u32`s).
pub const HEADER_BYTES: usize = 24;
/// Bytes of `struct kvm_stats_desc` before its name (flags `u32`, exponent `i16`, size `u16`,
/// offset `u32`, bucket_size `u32`).
pub const DESC_BYTES: usize = 16;
/// Most name bytes a descriptor may have (the kernel's `KVM_STATS_NAME_SIZE` is 48).
pub const MAX_NAME_SIZE: u32 = 256;
/// Most descriptors a file may have (a 6.x x86 vCPU has about 50).
pub const MAX_DESCRIPTORS: u32 = 4096;
/// Most `u64`s one statistic may have (histograms have tens of buckets).
pub const MAX_VALUES: u16 = 1024;

/// `KVM_STATS_TYPE_MASK`: bits 0-3 of a descriptor's flags.
const TYPE_MASK: u32 = 0xf;

/// Why a KVM statistics file could not be used.
#[derive(Debug, Error)]
pub enum StatsError {
    /// Reading the file failed (or it ended before a part its header points to).
    #[error("reading KVM statistics at offset {offset}: {source}")]
    Read {
        /// Byte offset of the failed read.
        offset: u64,
        /// The OS error (`UnexpectedEof` for a truncated file).
        source: std::io::Error,
    },
    /// The header's name size is 0 or above [`MAX_NAME_SIZE`].
    #[error("KVM statistics name size {0} is outside 1..={MAX_NAME_SIZE}")]
    NameSize(u32),
    /// The header announces more than [`MAX_DESCRIPTORS`] descriptors.
    #[error("KVM statistics announce {0} descriptors (at most {MAX_DESCRIPTORS})")]
    TooManyDescriptors(u32),
    /// A descriptor's name is not NUL-terminated inside the name size, or not UTF-8.
    #[error("KVM statistics descriptor {index}: name is not a NUL-terminated UTF-8 string")]
    BadName {
        /// Descriptor index.
        index: usize,
    },
    /// A descriptor has no values or more than [`MAX_VALUES`].
    #[error("KVM statistic {name:?}: {size} values (expected 1..={MAX_VALUES})")]
    BadSize {
        /// Statistic name.
        name: String,
        /// The descriptor's size field.
        size: u16,
    },
    /// A descriptor's offset is not 8-byte aligned.
    #[error("KVM statistic {name:?}: data offset {offset} is not a multiple of 8")]
    Misaligned {
        /// Statistic name.
        name: String,
        /// The descriptor's offset field.
        offset: u32,
    },
    /// Opening the statistics file (`KVM_GET_STATS_FD`) failed.
    #[error("KVM_GET_STATS_FD failed: {0}")]
    Open(std::io::Error),
}

/// What a statistic counts (`KVM_STATS_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    /// Only grows (`CUMULATIVE`): a counter such as `pf_taken` or `exits`.
    Cumulative,
    /// A current value (`INSTANT`).
    Instant,
    /// The highest value seen (`PEAK`).
    Peak,
    /// A linear histogram.
    LinearHistogram,
    /// A logarithmic histogram.
    LogHistogram,
    /// A type this code does not know (a newer kernel).
    Other(u32),
}

impl StatKind {
    fn from_flags(flags: u32) -> Self {
        match flags & TYPE_MASK {
            0 => StatKind::Cumulative,
            1 => StatKind::Instant,
            2 => StatKind::Peak,
            3 => StatKind::LinearHistogram,
            4 => StatKind::LogHistogram,
            t => StatKind::Other(t),
        }
    }
}

/// One statistic's descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatDesc {
    /// Its name, e.g. `pf_taken`.
    pub name: String,
    /// What it counts.
    pub kind: StatKind,
    /// The raw flags (type, unit, base).
    pub flags: u32,
    /// Number of `u64` values (1 for a counter).
    pub size: u16,
    /// Offset of its first value from the data block.
    pub offset: u32,
}

/// Something statistics can be read from at an offset (the stats file; a byte buffer in
/// tests).
pub trait ReadAt {
    /// Fills `buf` from byte `offset`; an error if the source ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        buf.copy_from_slice(self.get(start..end).ok_or_else(eof)?);
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn read_at<R: ReadAt + ?Sized>(r: &R, buf: &mut [u8], offset: u64) -> Result<(), StatsError> {
    r.read_exact_at(buf, offset)
        .map_err(|source| StatsError::Read { offset, source })
}

/// The parsed layout of a statistics file: its descriptors and where the data starts.
#[derive(Debug, Clone)]
pub struct StatsLayout {
    descs: Vec<StatDesc>,
    data_offset: u64,
}

impl StatsLayout {
    /// Reads and checks the header and every descriptor of `r`.
    pub fn parse<R: ReadAt + ?Sized>(r: &R) -> Result<Self, StatsError> {
        let mut h = [0u8; HEADER_BYTES];
        read_at(r, &mut h, 0)?;
        let name_size = u32_at(&h, 4);
        let num_desc = u32_at(&h, 8);
        let desc_offset = u64::from(u32_at(&h, 16));
        let data_offset = u64::from(u32_at(&h, 20));
        if name_size == 0 || name_size > MAX_NAME_SIZE {
            return Err(StatsError::NameSize(name_size));
        }
        if num_desc > MAX_DESCRIPTORS {
            return Err(StatsError::TooManyDescriptors(num_desc));
        }
        // Bounded by the checks above: at most 4096 * (16 + 256) bytes.
        let each = DESC_BYTES + name_size as usize;
        let mut raw = vec![0u8; each * num_desc as usize];
        read_at(r, &mut raw, desc_offset)?;
        let mut descs = Vec::with_capacity(num_desc as usize);
        for (index, d) in raw.chunks_exact(each).enumerate() {
            let name = &d[DESC_BYTES..];
            let name = name
                .iter()
                .position(|&c| c == 0)
                .and_then(|end| std::str::from_utf8(&name[..end]).ok())
                .ok_or(StatsError::BadName { index })?
                .to_string();
            let flags = u32_at(d, 0);
            let size = u16::from_le_bytes([d[6], d[7]]);
            let offset = u32_at(d, 8);
            if size == 0 || size > MAX_VALUES {
                return Err(StatsError::BadSize { name, size });
            }
            if !offset.is_multiple_of(8) {
                return Err(StatsError::Misaligned { name, offset });
            }
            descs.push(StatDesc {
                kind: StatKind::from_flags(flags),
                name,
                flags,
                size,
                offset,
            });
        }
        Ok(StatsLayout { descs, data_offset })
    }

    /// The descriptors, in the file's order.
    pub fn descriptors(&self) -> &[StatDesc] {
        &self.descs
    }

    /// The statistic called `name`, if the file has it.
    pub fn find(&self, name: &str) -> Option<StatId> {
        self.descs.iter().position(|d| d.name == name).map(StatId)
    }

    /// The first value of statistic `id` read from `r`.
    pub fn value<R: ReadAt + ?Sized>(&self, r: &R, id: StatId) -> Result<u64, StatsError> {
        let off = self
            .descs
            .get(id.0)
            .map(|d| self.data_offset + u64::from(d.offset))
            .unwrap_or(u64::MAX);
        let mut v = [0u8; 8];
        read_at(r, &mut v, off)?;
        Ok(u64::from_le_bytes(v))
    }
}

/// A statistic's index in one [`StatsLayout`] (look it up once, read it often).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatId(usize);

/// The binary statistics of one vCPU (or VM): the file `KVM_GET_STATS_FD` returned, opened
/// once, and its parsed layout.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    layout: StatsLayout,
}

impl KvmStats {
    /// Opens the statistics of the vCPU `fd` and parses their layout.
    pub fn open_vcpu(fd: &kvm_ioctls::VcpuFd) -> Result<Self, StatsError> {
        Self::from_file(crate::sys::stats_fd(fd).map_err(StatsError::Open)?)
    }

    /// Opens the VM-wide statistics of `fd` and parses their layout.
    pub fn open_vm(fd: &kvm_ioctls::VmFd) -> Result<Self, StatsError> {
        Self::from_file(crate::sys::stats_fd(fd).map_err(StatsError::Open)?)
    }

    /// Parses the layout of an open statistics file.
    pub fn from_file(file: File) -> Result<Self, StatsError> {
        let layout = StatsLayout::parse(&file)?;
        Ok(KvmStats { file, layout })
    }

    /// The statistics' names, in the file's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.layout.descs.iter().map(|d| d.name.as_str())
    }

    /// The parsed layout (descriptors with their kinds and sizes).
    pub fn layout(&self) -> &StatsLayout {
        &self.layout
    }

    /// The statistic called `name`, if this KVM has it.
    pub fn find(&self, name: &str) -> Option<StatId> {
        self.layout.find(name)
    }

    /// The current (first) value of statistic `id`: one `pread`.
    pub fn value(&self, id: StatId) -> Result<u64, StatsError> {
        self.layout.value(&self.file, id)
    }

    /// The current value of statistic `name`; `None` if this KVM does not have it.
    pub fn read(&self, name: &str) -> Result<Option<u64>, StatsError> {
        self.find(name).map(|id| self.value(id)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: usize = 48;

    /// A stats file as the kernel lays it out: header, id, descriptors, data.
    fn file(stats: &[(&str, u32, u16, u64)]) -> Vec<u8> {
        let id_offset = HEADER_BYTES;
        let desc_offset = id_offset + NAME;
        let data_offset = desc_offset + stats.len() * (DESC_BYTES + NAME);
        let mut b = Vec::new();
        for w in [
            0,
            NAME as u32,
            stats.len() as u32,
            id_offset as u32,
            desc_offset as u32,
            data_offset as u32,
        ] {
            b.extend(w.to_le_bytes());
        }
        let mut id = b"kvm-1234/vcpu-0".to_vec();
        id.resize(NAME, 0);
        b.extend(id);
        for (i, (name, flags, size, _)) in stats.iter().enumerate() {
            b.extend(flags.to_le_bytes());
            b.extend(0i16.to_le_bytes());
            b.extend(size.to_le_bytes());
            b.extend((i as u32 * 8).to_le_bytes());
            b.extend(0u32.to_le_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(NAME, 0);
            b.extend(n);
        }
        for (_, _, _, v) in stats {
            b.extend(v.to_le_bytes());
        }
        b
    }

    fn set_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Offset of descriptor `i`'s fields in a [`file`] buffer.
    fn desc_at(i: usize) -> usize {
        HEADER_BYTES + NAME + i * (DESC_BYTES + NAME)
    }

    #[test]
    fn parses_names_kinds_and_reads_each_value_at_its_offset() {
        let b = file(&[
            ("exits", 0, 1, 41),
            ("pf_taken", 0, 1, 7),
            ("blocking", 1, 1, 1),
        ]);
        let l = StatsLayout::parse(&b[..]).unwrap();
        let names: Vec<&str> = l.descriptors().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["exits", "pf_taken", "blocking"]);
        assert_eq!(l.descriptors()[2].kind, StatKind::Instant);
        let pf = l.find("pf_taken").unwrap();
        assert_eq!(l.value(&b[..], pf).unwrap(), 7);
        assert_eq!(l.value(&b[..], l.find("exits").unwrap()).unwrap(), 41);
        assert_eq!(l.find("pf_fixed"), None);
    }

    #[test]
    fn a_huge_name_size_or_descriptor_count_is_refused_before_allocating() {
        let mut b = file(&[("exits", 0, 1, 1)]);
        set_u32(&mut b, 4, 1 << 30);
        assert!(matches!(
            StatsLayout::parse(&b[..]),
            Err(StatsError::NameSize(n)) if n == 1 << 30
        ));
        set_u32(&mut b, 4, 0);
        assert!(matches!(
            StatsLayout::parse(&b[..]),
            Err(StatsError::NameSize(0))
        ));
        let mut b = file(&[("exits", 0, 1, 1)]);
        set_u32(&mut b, 8, u32::MAX);
        assert!(matches!(
            StatsLayout::parse(&b[..]),
            Err(StatsError::TooManyDescriptors(u32::MAX))
        ));
    }

    #[test]
    fn truncated_files_and_offsets_past_the_end_are_read_errors() {
        let b = file(&[("exits", 0, 1, 1), ("pf_taken", 0, 1, 2)]);
        assert!(matches!(
            StatsLayout::parse(&b[..10]),
            Err(StatsError::Read { offset: 0, .. })
        ));
        // More descriptors announced than the file holds.
        let mut more = b.clone();
        set_u32(&mut more, 8, 50);
        assert!(matches!(
            StatsLayout::parse(&more[..]),
            Err(StatsError::Read { .. })
        ));
        // A value beyond the end of the data block: the layout parses, the read fails.
        let mut far = b.clone();
        set_u32(&mut far, desc_at(1) + 8, 1 << 20);
        let l = StatsLayout::parse(&far[..]).unwrap();
        assert!(matches!(
            l.value(&far[..], l.find("pf_taken").unwrap()),
            Err(StatsError::Read { .. })
        ));
    }

    #[test]
    fn malformed_descriptors_are_typed_errors() {
        let b = file(&[("exits", 0, 1, 1), ("pf_taken", 0, 1, 2)]);
        let mut unterminated = b.clone();
        let at = desc_at(1) + DESC_BYTES;
        unterminated[at..at + NAME].fill(b'a');
        assert!(matches!(
            StatsLayout::parse(&unterminated[..]),
            Err(StatsError::BadName { index: 1 })
        ));
        let mut not_utf8 = b.clone();
        not_utf8[desc_at(0) + DESC_BYTES] = 0xff;
        assert!(matches!(
            StatsLayout::parse(&not_utf8[..]),
            Err(StatsError::BadName { index: 0 })
        ));
        let mut empty = b.clone();
        empty[desc_at(1) + 6..desc_at(1) + 8].copy_from_slice(&0u16.to_le_bytes());
        assert!(matches!(
            StatsLayout::parse(&empty[..]),
            Err(StatsError::BadSize { size: 0, .. })
        ));
        let mut huge = b.clone();
        huge[desc_at(1) + 6..desc_at(1) + 8].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            StatsLayout::parse(&huge[..]),
            Err(StatsError::BadSize { size: u16::MAX, .. })
        ));
        let mut odd = b.clone();
        set_u32(&mut odd, desc_at(0) + 8, 3);
        assert!(matches!(
            StatsLayout::parse(&odd[..]),
            Err(StatsError::Misaligned { offset: 3, .. })
        ));
    }
}
