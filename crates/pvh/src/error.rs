//! Typed errors of the loader and the VM.

use thiserror::Error;

/// Why a kernel image was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// The file does not start with the ELF magic.
    #[error("not an ELF file (bad magic)")]
    NotElf,
    /// ELF class, byte order, type or machine this loader does not boot.
    #[error("unsupported ELF: {0}")]
    Unsupported(&'static str),
    /// A header, program header, note or segment lies (partly) past the end of the file.
    #[error("truncated ELF: {what} at file offset {offset:#x} + {len:#x} exceeds the file size {file_len:#x}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// File offset.
        offset: u64,
        /// Bytes needed.
        len: u64,
        /// File size.
        file_len: u64,
    },
    /// A segment's file size is larger than its memory size, or an address overflows.
    #[error("malformed segment at {paddr:#x}: {why}")]
    BadSegment {
        /// Physical load address.
        paddr: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// The ELF has no `XEN_ELFNOTE_PHYS32_ENTRY` note, so it is not a PVH kernel.
    #[error("no XEN_ELFNOTE_PHYS32_ENTRY note: not a PVH kernel")]
    NoPvhNote,
    /// The PVH entry note does not hold a 32-bit physical address.
    #[error("bad XEN_ELFNOTE_PHYS32_ENTRY note: {0}")]
    BadPvhNote(&'static str),
    /// The ELF has no loadable segment.
    #[error("no PT_LOAD segment")]
    NoSegments,
    /// Two loadable segments overlap in guest-physical memory.
    #[error("segments overlap: [{a_start:#x}, {a_end:#x}) and [{b_start:#x}, {b_end:#x})")]
    Overlap {
        /// First range start.
        a_start: u64,
        /// First range end.
        a_end: u64,
        /// Second range start.
        b_start: u64,
        /// Second range end.
        b_end: u64,
    },
    /// A segment overlaps the boot data the loader places in low memory.
    #[error("segment [{start:#x}, {end:#x}) overlaps the boot data (start info, memory map, command line) at [{boot_start:#x}, {boot_end:#x})")]
    OverlapsBootData {
        /// Segment start.
        start: u64,
        /// Segment end.
        end: u64,
        /// Boot data start.
        boot_start: u64,
        /// Boot data end.
        boot_end: u64,
    },
    /// A segment is not inside guest RAM (in the PCI hole or above the end of memory).
    #[error("segment [{start:#x}, {end:#x}) lies outside guest RAM")]
    OutsideMemory {
        /// Segment start.
        start: u64,
        /// Segment end.
        end: u64,
    },
    /// The image is larger than guest memory.
    #[error("kernel needs {needed:#x} bytes but the guest has {memory:#x} bytes of RAM")]
    DoesNotFit {
        /// Sum of the segments' memory sizes.
        needed: u64,
        /// Guest RAM.
        memory: u64,
    },
    /// The entry point is not inside a loaded segment.
    #[error("PVH entry {0:#x} is not inside a loaded segment")]
    EntryOutsideImage(u64),
    /// The command line is too long or contains a NUL byte.
    #[error("command line rejected: {0}")]
    Cmdline(&'static str),
    /// The initrd does not fit between the kernel and the top of low RAM (or is empty).
    #[error("initrd of {size:#x} bytes does not fit between the kernel's end {floor:#x} and the top of low RAM {top:#x} (or is empty)")]
    InitrdDoesNotFit {
        /// Initrd size.
        size: u64,
        /// Lowest address it may use (the kernel's end).
        floor: u64,
        /// Highest end it may use.
        top: u64,
    },
    /// The MP table cannot describe this many vCPUs.
    #[error("the MP table cannot describe {0} vCPUs")]
    MpTable(usize),
}

/// Errors of building or running a PVH VM.
#[derive(Debug, Error)]
pub enum PvhError {
    /// The kernel image was rejected.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// KVM could not emulate a guest instruction (on PVM: CPL0 code it cannot handle).
    #[error("vCPU {vcpu}: KVM internal error (emulation failure): {detail}")]
    Emulation {
        /// vCPU index.
        vcpu: usize,
        /// Registers and the KVM sub-error.
        detail: String,
    },
    /// KVM refused to enter the guest.
    #[error("vCPU {vcpu}: {detail}")]
    VcpuFailed {
        /// vCPU index.
        vcpu: usize,
        /// What happened.
        detail: String,
    },
    /// A thread or signal operation failed.
    #[error("host: {0}")]
    Host(String),
    /// The test kernel could not be assembled.
    #[error("assembling the test kernel: {0}")]
    Assemble(String),
}

/// Result with [`PvhError`].
pub type Result<T> = std::result::Result<T, PvhError>;
