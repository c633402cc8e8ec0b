//! Typed errors of the dirty-tracking library. Each message says what failed and what to do.
use std::io;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, DirtyError>;

/// Everything that can go wrong while setting up or running dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The ring size must be a power of two (the kernel rejects anything else).
    #[error(
        "dirty ring size {entries} entries is not a power of two; pick e.g. 1024, 4096 or 65536"
    )]
    RingSizeNotPowerOfTwo {
        /// Requested size in entries.
        entries: u32,
    },
    /// The ring is smaller than the kernel's minimum.
    #[error("dirty ring size {entries} entries is below the minimum of {min} entries (one host page and the kernel's reserved entries); use at least {min}")]
    RingTooSmall {
        /// Requested size in entries.
        entries: u32,
        /// Smallest accepted size in entries.
        min: u32,
    },
    /// The ring is larger than what `KVM_CHECK_EXTENSION` advertises.
    #[error("dirty ring size {entries} entries exceeds this host's maximum of {max} entries (KVM_CHECK_EXTENSION); use at most {max}")]
    RingTooLarge {
        /// Requested size in entries.
        entries: u32,
        /// Largest size the host accepts.
        max: u32,
    },
    /// Neither `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` nor `KVM_CAP_DIRTY_LOG_RING` is advertised.
    #[error("this KVM does not offer the dirty ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL] absent; Linux 5.11+ needed); use the bitmap or clear-log tracker instead")]
    RingUnsupported,
    /// `KVM_ENABLE_CAP` refused a size that passed our own checks.
    #[error("KVM refused to enable a {entries}-entry dirty ring: either vCPUs already exist or the ring was already enabled (it must be enabled once, right after VM creation), or the host reserves more entries than that (x86 with PML needs at least 1024): {source}")]
    RingEnableRejected {
        /// Requested size in entries.
        entries: u32,
        /// The errno KVM returned.
        source: io::Error,
    },
    /// The ring was requested after vCPUs had been created.
    #[error("the dirty ring must be enabled before any vCPU is created ({vcpus} exist already); enable it right after creating the VM")]
    RingAfterVcpus {
        /// Number of vCPUs already created.
        vcpus: usize,
    },
    /// The vCPU's ring could not be mapped.
    #[error("mapping the dirty ring of vCPU {vcpu} failed (was the ring enabled before the vCPU was created?): {source}")]
    RingMmap {
        /// vCPU index.
        vcpu: usize,
        /// The mmap error.
        source: io::Error,
    },
    /// `KVM_RESET_DIRTY_RINGS` reset a different number of entries than were harvested.
    #[error("KVM_RESET_DIRTY_RINGS reset {reset} entries but {harvested} were harvested; another thread is harvesting or resetting the same rings without the tracker's lock")]
    ResetCountMismatch {
        /// Entries harvested since the last reset.
        harvested: u64,
        /// Entries the kernel reports as reset.
        reset: u64,
    },
    /// An ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// Name of the ioctl.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Manual dirty-log protection is not available.
    #[error("this KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET; use the bitmap or ring tracker instead")]
    ManualProtectUnsupported,
    /// A memslot that is tracked was registered without `KVM_MEM_LOG_DIRTY_PAGES`.
    #[error("memslot {slot} is not registered with KVM_MEM_LOG_DIRTY_PAGES, so KVM never logs its writes; set the flag on the slot before tracking it")]
    SlotNotLogged {
        /// The slot id.
        slot: u32,
    },
    /// A slot id is not known to the page set or tracker.
    #[error("memslot {slot:#x} is not part of this dirty page set")]
    UnknownSlot {
        /// The encoded slot id.
        slot: u32,
    },
    /// The caller-provided buffer cannot hold the slot's bitmap.
    #[error("bitmap buffer of {got} words is too small for {needed} words")]
    BufferTooSmall {
        /// Words needed.
        needed: usize,
        /// Words provided.
        got: usize,
    },
    /// A software ring was pushed while completely full (the kernel WARNs here).
    #[error("software dirty ring is full ({size} entries used); harvest and reset before pushing")]
    RingFull {
        /// Ring size in entries.
        size: u32,
    },
    /// The tracker was used before `start` or after `stop`.
    #[error("dirty tracking is not running; call start() first")]
    NotStarted,
    /// A ring entry carried a slot or offset outside every tracked memslot.
    #[error("ring of vCPU {vcpu} held an entry for slot {slot:#x} offset {offset} outside every tracked memslot")]
    BadEntry {
        /// vCPU index.
        vcpu: usize,
        /// Encoded slot id.
        slot: u32,
        /// Page offset.
        offset: u64,
    },
}
