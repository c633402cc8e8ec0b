//! Error types returned by the model's public API. Each variant's message says what failed
//! and why; none of them is ever produced by a panic path.

use thiserror::Error;

/// A guest-memory access made by the model failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MemError {
    /// The access touches guest-physical addresses that no memory region backs.
    #[error("guest-physical range {addr:#x}+{len:#x} is not backed by guest memory")]
    Unbacked {
        /// First guest-physical address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: u64,
    },
}

/// An MMIO access that the model rejects. Callers that emulate a bus usually turn these into
/// read-as-zero / write-ignored, which is what the model's own qtest front end does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MmioError {
    /// The access width is not 1, 2, 4 or 8 bytes.
    #[error("access width {width} is not 1, 2, 4 or 8 bytes")]
    BadWidth {
        /// Width in bytes as requested.
        width: u8,
    },
    /// The address is not aligned to the access width.
    #[error("address {addr:#x} is not aligned to the access width {width}")]
    Unaligned {
        /// Address of the access.
        addr: u64,
        /// Width in bytes.
        width: u8,
    },
    /// The address is not inside any GIC frame.
    #[error("address {addr:#x} is not inside any GIC register frame")]
    Unmapped {
        /// Address of the access.
        addr: u64,
    },
    /// The register at this offset does not accept an access of this width (the architecture
    /// makes such accesses UNPREDICTABLE; the model treats them as RAZ/WI and reports it).
    #[error("register at frame offset {offset:#x} does not support {width}-byte accesses")]
    WidthNotPermitted {
        /// Offset of the access inside its 64 KiB frame.
        offset: u64,
        /// Width in bytes.
        width: u8,
    },
}

/// A configuration that cannot describe a GICv3.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// At least one PE is required.
    #[error("a GIC needs at least one PE")]
    NoPes,
    /// GICR_TYPER.Processor_Number is 16 bits wide.
    #[error("{0} PEs exceed the 65536 that GICR_TYPER.Processor_Number can number")]
    TooManyPes(usize),
    /// The redistributor regions do not hold exactly one redistributor per PE.
    #[error("redistributor regions hold {covered} redistributors for {pes} PEs")]
    RedistCount {
        /// Redistributors the regions hold.
        covered: usize,
        /// PEs configured.
        pes: usize,
    },
    /// Two PEs have the same affinity.
    #[error("PEs {first} and {second} share affinity {affinity:#x}")]
    DuplicateAffinity {
        /// Index of the first PE.
        first: usize,
        /// Index of the second PE.
        second: usize,
        /// The shared affinity value (Aff3.Aff2.Aff1.Aff0).
        affinity: u32,
    },
    /// The SPI count must be a multiple of 32 and leave INTIDs 1020..1023 alone.
    #[error("{0} SPIs: the count must be a multiple of 32 and at most 988")]
    BadSpiCount(u32),
    /// LPI INTID bits must be between 14 and 16 in this model.
    #[error("{0} LPI ID bits: the model supports 14 to 16")]
    BadLpiIdBits(u8),
    /// ITS DeviceID / EventID bit counts must be between 1 and 20 in this model.
    #[error("ITS {its}: {what} bits {bits} outside 1..=20")]
    BadItsBits {
        /// ITS index.
        its: usize,
        /// Which field ("device" or "event").
        what: &'static str,
        /// The value given.
        bits: u8,
    },
    /// A GICv4.1 parameter is out of range.
    #[error("GICv4.1 {what} = {value} is out of range")]
    BadV41 {
        /// Which parameter.
        what: &'static str,
        /// The value given.
        value: u32,
    },
    /// Two frames overlap.
    #[error("frames {a} and {b} overlap")]
    Overlap {
        /// Name of the first frame.
        a: String,
        /// Name of the second frame.
        b: String,
    },
    /// A frame base is not 64 KiB aligned.
    #[error("frame {name} base {base:#x} is not 64 KiB aligned")]
    Misaligned {
        /// Frame name.
        name: String,
        /// Base address.
        base: u64,
    },
}

/// Restoring a saved state failed: the state does not fit the configuration it carries.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    /// The state was written by an incompatible version of the model.
    #[error("saved state has layout version {got}, this model reads version {want}")]
    Version {
        /// Version found.
        got: u32,
        /// Version supported.
        want: u32,
    },
    /// The embedded configuration is invalid.
    #[error("saved configuration is invalid: {0}")]
    Config(#[from] ConfigError),
    /// A per-PE or per-ITS vector has the wrong length.
    #[error("saved {what} has {got} entries, configuration needs {want}")]
    Length {
        /// Which vector.
        what: &'static str,
        /// Entries found.
        got: usize,
        /// Entries required.
        want: usize,
    },
    /// A saved value is out of range for its field.
    #[error("saved {what} value {value:#x} is out of range")]
    Range {
        /// Which field.
        what: &'static str,
        /// The offending value.
        value: u64,
    },
}
