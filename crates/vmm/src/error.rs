//! Typed errors of the VMM.

use thiserror::Error;

/// Errors from building or running a VM.
#[derive(Debug, Error)]
pub enum VmmError {
    /// `/dev/kvm` is missing or cannot be opened.
    #[error("cannot open /dev/kvm ({source}); load kvm (or kvm_pvm) and check permissions")]
    NoKvm {
        /// The OS error.
        source: kvm_ioctls::Error,
    },
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// Which ioctl.
        op: &'static str,
        /// The OS error.
        source: kvm_ioctls::Error,
    },
    /// Dirty tracking setup or collection failed.
    #[error(transparent)]
    Dirty(#[from] kvm_dirty::DirtyError),
    /// Guest memory could not be mapped.
    #[error("cannot map {bytes} bytes of guest memory at {gpa:#x}: {reason}")]
    Memory {
        /// Guest physical address of the region.
        gpa: u64,
        /// Its size.
        bytes: u64,
        /// What went wrong.
        reason: String,
    },
    /// An access outside guest memory.
    #[error("guest memory access at {gpa:#x} (+{len}) is outside every region")]
    OutOfBounds {
        /// Address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The configuration is unusable.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// The page tables for the requested layout do not fit in the reserved area.
    #[error("guest page tables need {needed} pages but only {available} are reserved; use less guest memory")]
    PageTables {
        /// Pages needed.
        needed: u64,
        /// Pages available.
        available: u64,
    },
    /// The guest program could not be assembled.
    #[error("assembling the guest program failed: {0}")]
    Assemble(String),
    /// Installing the kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler: {source}")]
    Signal {
        /// The OS error.
        source: std::io::Error,
    },
    /// Spawning a vCPU thread failed.
    #[error("cannot spawn vCPU thread: {0}")]
    Thread(std::io::Error),
    /// A vCPU stopped with an error (guest crash, emulation failure, unexpected exit).
    #[error("vCPU {vcpu}: {what}")]
    VcpuFailed {
        /// vCPU index.
        vcpu: usize,
        /// What happened, with registers where known.
        what: String,
    },
    /// The guest powered off (wrote its status to the PVH platform's exit port).
    #[error("vCPU {vcpu}: the guest powered off")]
    PoweredOff {
        /// The vCPU that wrote the exit port.
        vcpu: usize,
    },
    /// Saved vCPU state could not be decoded.
    #[error("bad vCPU state blob: {0}")]
    State(String),
    /// A vCPU's KVM binary statistics could not be opened or read.
    #[error("vCPU {vcpu}'s KVM statistics: {reason}")]
    Stats {
        /// vCPU index.
        vcpu: usize,
        /// What went wrong.
        reason: String,
    },
    /// A migrated state blob was refused by its strict decoding or its sanity checks, before
    /// anything was restored.
    #[error("invalid migrated state: {0}")]
    InvalidState(#[from] crate::check::StateError),
}

/// Result alias for the VMM.
pub type Result<T> = std::result::Result<T, VmmError>;
