//! The migration wire protocol: a versioned, framed, checksummed byte stream over any
//! `Read`/`Write` (TCP in practice). The full format and the receiver's state diagram are in
//! `docs/migration-protocol.md`.
//!
//! Each direction opens with a 16-byte preamble (magic, version) whose layout is frozen
//! across versions, so a peer of another version is rejected before any frame is parsed.
//! Then come frames: a fixed 16-byte header (tag, sequence number, payload length, CRC-32C
//! of header and payload) and a payload whose size is bounded per tag before it is read.
//!
//! - [`Encoder`] writes the source's stream; page batches are built in one reusable buffer.
//! - [`Decoder`] reads it on the destination, enforces message order, validates every page
//!   address against the announced [`MemoryLayout`], verifies a frame's checksum before any
//!   of its pages reach the [`PageSink`], and never panics on any input.
//! - [`AckWriter`] / [`AckReader`] carry the destination's answers back.

mod crc;
mod decode;
mod encode;
mod frame;
mod layout;
pub mod replica;
mod sink;

pub use decode::{AckReader, Decoder, DecoderLimits, RxState, RxStats};
pub use encode::{AckWriter, Encoder, PageKind, TxStats};
pub use layout::{check_slices, LayoutError, MemoryLayout, MemoryShapeError, Region, MAX_REGIONS};
pub use sink::{DigestingSink, GuestSlices, PageSink};

use crate::digest::MemoryDigest;
use crate::TrackerMode;

/// First 8 bytes of each direction of a migration stream.
pub const MAGIC: [u8; 8] = *b"RVMIGRAT";
/// Protocol version this build speaks (3: the memory digest's page hash is CRC-64/NVME; a
/// version-2 peer's digest would not compare).
pub const PROTOCOL_VERSION: u32 = 3;
/// Oldest peer version this build accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 3;
/// Bytes of the preamble (magic, version, reserved).
pub const PREAMBLE_LEN: usize = 16;
/// Bytes of a frame header (tag, flags, reserved, sequence, length, crc).
pub const HEADER_LEN: usize = 16;
/// Most pages in one page-batch frame (4 MiB of data).
pub const MAX_BATCH_PAGES: u32 = 1024;
/// Default cap on one device/vCPU state blob.
pub const MAX_STATE_BLOB: u32 = 1 << 20;
/// Longest abort or error reason, in bytes.
pub const MAX_REASON_LEN: usize = 4096;
/// The only page size the protocol carries.
pub const WIRE_PAGE_SIZE: u32 = crate::PAGE_SIZE as u32;
/// Bit 0 of a page entry's address word: the page is all zero and has no payload.
pub const PAGE_ZERO_FLAG: u64 = 1;
/// Low bits of a page entry's address word that are not address (page offset bits).
pub const PAGE_FLAG_MASK: u64 = crate::PAGE_SIZE - 1;

/// Frame tags. Source-to-destination tags are below 0x80, destination answers above.
pub mod tag {
    /// [`Hello`](super::Hello).
    pub const HELLO: u8 = 0x01;
    /// [`MemoryLayout`](super::MemoryLayout).
    pub const LAYOUT: u8 = 0x02;
    /// A batch of pages.
    pub const PAGES: u8 = 0x03;
    /// [`IterationMarker`](super::IterationMarker).
    pub const ITERATION: u8 = 0x04;
    /// [`StateBlob`](super::StateBlob).
    pub const STATE: u8 = 0x05;
    /// [`Complete`](super::Complete).
    pub const COMPLETE: u8 = 0x06;
    /// Abort with a reason.
    pub const ABORT: u8 = 0x07;
    /// The source gives up the guest: the destination may resume it.
    pub const COMMIT: u8 = 0x08;
    /// A barrier: the destination answers [`SYNCED`] once it has processed everything sent
    /// before it.
    pub const SYNC: u8 = 0x09;
    /// [`Ack::Accepted`](super::Ack::Accepted).
    pub const ACCEPTED: u8 = 0x81;
    /// [`Ack::ReadyToResume`](super::Ack::ReadyToResume).
    pub const READY: u8 = 0x82;
    /// [`Ack::Resumed`](super::Ack::Resumed).
    pub const RESUMED: u8 = 0x83;
    /// [`Ack::Error`](super::Ack::Error).
    pub const ERROR: u8 = 0x84;
    /// [`Ack::Synced`](super::Ack::Synced).
    pub const SYNCED: u8 = 0x85;
}

/// Nanoseconds since the Unix epoch (`CLOCK_REALTIME`), the clock of [`Ack::Resumed`]. Both
/// processes of a same-host migration read the same clock, so the source can subtract its
/// pause time from the destination's resume time.
pub fn unix_time_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The tracker's one-byte encoding in [`Hello`]: 0 ring, 1 bitmap, 2 clear-log. Frozen: a
/// new tracker takes a new number, an old number never changes meaning.
pub fn tracker_to_wire(mode: TrackerMode) -> u8 {
    match mode {
        TrackerMode::Ring => 0,
        TrackerMode::Bitmap => 1,
        TrackerMode::ClearLog => 2,
    }
}

/// Decodes [`tracker_to_wire`]'s byte; `None` for a number this build does not know.
pub fn tracker_from_wire(v: u8) -> Option<TrackerMode> {
    match v {
        0 => Some(TrackerMode::Ring),
        1 => Some(TrackerMode::Bitmap),
        2 => Some(TrackerMode::ClearLog),
        _ => None,
    }
}

/// The source's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version (sent in the preamble); [`PROTOCOL_VERSION`] when sending.
    pub version: u32,
    /// Dirty tracker the source uses (informational, reported in the summary).
    pub tracker: TrackerMode,
    /// Guest page size; must be [`WIRE_PAGE_SIZE`].
    pub page_size: u32,
    /// Number of vCPUs the destination must create.
    pub vcpus: u32,
    /// The machine the guest runs on (0: ringvisor's workload machine, 1: the PVH platform);
    /// the destination builds the same one or refuses.
    pub machine: u32,
}

impl Hello {
    /// A Hello for this build's protocol version and page size.
    pub fn new(tracker: TrackerMode, vcpus: u32) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            tracker,
            page_size: WIRE_PAGE_SIZE,
            vcpus,
            machine: 0,
        }
    }

    /// The same Hello for another machine type.
    pub fn with_machine(mut self, machine: u32) -> Self {
        self.machine = machine;
        self
    }
}

/// Opens a pre-copy pass: the pages that follow, up to the next marker, belong to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IterationMarker {
    /// Pass number: 0 for the bulk pass, then 1, 2, ... without gaps.
    pub iteration: u32,
    /// Exactly how many pages this pass will carry; the receiver checks it.
    pub pages: u64,
    /// True for the last pass, sent with the source's vCPUs paused.
    pub final_pass: bool,
}

/// Opaque vCPU or device state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateBlob {
    /// What the bytes are (defined by the VMM, e.g. vCPU state, serial device).
    pub kind: u32,
    /// Which instance (e.g. the vCPU index).
    pub instance: u32,
    /// The serialized state.
    pub data: Vec<u8>,
}

/// End of the source's stream: everything the guest needs has been sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Complete {
    /// Pages sent over the whole migration; the receiver checks its own count.
    pub pages_sent: u64,
    /// The source's digest of its paused memory, if it computed one before completing
    /// (the receiver then verifies it before resuming).
    pub digest: Option<MemoryDigest>,
}

/// What the pages of one batch frame were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchInfo {
    /// Pages in the batch.
    pub pages: u32,
    /// Of those, pages sent as zero markers.
    pub zero_pages: u32,
}

/// A decoded source-to-destination message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Handshake.
    Hello(Hello),
    /// Guest memory layout.
    Layout(MemoryLayout),
    /// A page batch, already written to the [`PageSink`].
    Pages(BatchInfo),
    /// A new pass starts.
    Iteration(IterationMarker),
    /// vCPU or device state.
    State(StateBlob),
    /// End of the stream.
    Complete(Complete),
    /// The source abandoned the migration.
    Abort(String),
    /// The source gave up the guest; the destination may resume it.
    Commit,
    /// A barrier: answer [`Ack::Synced`] with the same token once everything before it has
    /// been processed (the source uses it so that the destination has caught up before the
    /// guest is paused, keeping the destination's backlog out of the downtime).
    Sync(u64),
}

/// A destination-to-source answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    /// Hello and layout accepted; memory is allocated; send pages.
    Accepted,
    /// All memory and state received and restored; waiting for [`Message::Commit`].
    ReadyToResume {
        /// The destination's digest of the memory it received.
        digest: Option<MemoryDigest>,
    },
    /// The guest runs on the destination.
    Resumed {
        /// When the vCPUs were resumed, in ns since the Unix epoch (see
        /// [`unix_time_ns`]).
        unix_ns: u64,
    },
    /// The destination failed; the source must keep the guest.
    Error(String),
    /// The destination processed everything up to the [`Message::Sync`] with this token.
    Synced(u64),
}

/// Everything that can go wrong reading or writing a migration stream.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// An I/O error other than end of stream.
    #[error("migration stream I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the stream cleanly between frames.
    #[error("peer closed the migration stream while the receiver was in state {state}")]
    Closed {
        /// Receiver state at the time.
        state: &'static str,
    },
    /// The stream ended inside a preamble, header or payload.
    #[error("migration stream truncated: {what} needs {needed} bytes, got {got}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes received before end of stream.
        got: usize,
    },
    /// The stream does not start with [`MAGIC`]: not a ringvisor migration peer.
    #[error("bad magic {found:02x?}: the peer is not a ringvisor migration stream")]
    BadMagic {
        /// The 8 bytes found.
        found: [u8; 8],
    },
    /// The peer speaks a protocol version this build does not accept.
    #[error("peer speaks migration protocol version {found}; this build accepts {min}..={max}")]
    VersionMismatch {
        /// Peer's version.
        found: u32,
        /// Oldest accepted.
        min: u32,
        /// Newest accepted.
        max: u32,
    },
    /// A frame tag that is unknown, or not valid in this direction.
    #[error("unknown frame tag {0:#04x}")]
    UnknownTag(u8),
    /// A frame claims a payload longer than its type allows; nothing was allocated.
    #[error("frame {tag:#04x} claims {len} payload bytes, more than the limit of {max}")]
    Oversize {
        /// Frame tag.
        tag: u8,
        /// Claimed length.
        len: u64,
        /// Limit for this tag.
        max: u64,
    },
    /// A frame's CRC-32C does not match its contents.
    #[error("checksum mismatch in frame #{seq} (tag {tag:#04x}): header says {expected:#010x}, contents give {found:#010x}")]
    ChecksumMismatch {
        /// Sequence number as received.
        seq: u32,
        /// Tag as received.
        tag: u8,
        /// CRC in the header.
        expected: u32,
        /// CRC computed.
        found: u32,
    },
    /// A frame's sequence number is not the next one: a frame was lost or replayed.
    #[error("frame sequence gap: expected #{expected}, got #{found}")]
    SequenceGap {
        /// Expected number.
        expected: u32,
        /// Received number.
        found: u32,
    },
    /// A payload or header field is inconsistent.
    #[error("malformed {what}")]
    Malformed {
        /// What was wrong.
        what: &'static str,
    },
    /// The Hello announces a page size other than [`WIRE_PAGE_SIZE`].
    #[error("peer uses page size {0}; only 4096 is supported")]
    UnsupportedPageSize(u32),
    /// The layout was rejected.
    #[error("invalid memory layout: {0}")]
    Layout(#[from] LayoutError),
    /// A page address outside every announced region.
    #[error("page address {gpa:#x} is outside the announced guest memory layout")]
    GpaOutsideLayout {
        /// The address.
        gpa: u64,
    },
    /// A page address with low bits set other than the zero flag.
    #[error("page address word {word:#x} is not page aligned")]
    GpaNotAligned {
        /// The raw address word.
        word: u64,
    },
    /// A page buffer that is not exactly one page long (sender side).
    #[error("page at {gpa:#x} is {len} bytes, expected 4096")]
    PageLength {
        /// The page's address.
        gpa: u64,
        /// Its length.
        len: usize,
    },
    /// A message that is valid but not allowed in the receiver's current state.
    #[error("{message} received in state {state}")]
    OutOfOrder {
        /// The message.
        message: &'static str,
        /// The receiver's state.
        state: &'static str,
    },
    /// A pass carried more or fewer pages than its marker announced.
    #[error("pass {iteration} announced {announced} pages but carried {received}")]
    PassMismatch {
        /// Pass number.
        iteration: u32,
        /// Pages announced.
        announced: u64,
        /// Pages received so far.
        received: u64,
    },
    /// Iteration markers must count 0, 1, 2, ...
    #[error("iteration marker {found} out of sequence, expected {expected}")]
    IterationGap {
        /// Expected number.
        expected: u32,
        /// Received number.
        found: u32,
    },
    /// The Complete frame's page count differs from what was received.
    #[error("source says it sent {claimed} pages, {received} arrived")]
    PageCountMismatch {
        /// Source's count.
        claimed: u64,
        /// Receiver's count.
        received: u64,
    },
    /// Device/vCPU state exceeded the receiver's total budget.
    #[error("state blobs total more than the limit of {max} bytes")]
    StateBudget {
        /// The limit.
        max: u64,
    },
    /// The digest sent with Complete does not match the received memory.
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    /// A previous error left the stream at an unknown position.
    #[error("migration stream unusable after an earlier error")]
    Poisoned,
}
