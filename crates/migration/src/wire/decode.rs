//! Readers: [`Decoder`] for the source's stream (the destination's receive state machine) and
//! [`AckReader`] for the destination's answers.

use std::io::Read;

use super::frame::{Cursor, FrameReader};
use super::{
    tag, Ack, BatchInfo, Complete, Hello, IterationMarker, LayoutError, MemoryLayout, Message,
    Region, StateBlob, WireError, MAX_BATCH_PAGES, MAX_REASON_LEN, MAX_REGIONS, MAX_STATE_BLOB,
    PAGE_FLAG_MASK, PAGE_ZERO_FLAG, WIRE_PAGE_SIZE,
};
use crate::digest::MemoryDigest;
use crate::wire::PageSink;
use crate::PAGE_SIZE;

/// Most vCPUs a Hello may announce.
pub const MAX_VCPUS: u32 = 1024;

/// What a receiver is willing to accept from a stream, so that a hostile source cannot make
/// it allocate without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderLimits {
    /// Largest total guest memory a layout may announce (default 1 TiB).
    pub max_guest_bytes: u64,
    /// Largest single state blob (default [`MAX_STATE_BLOB`]).
    pub max_state_blob: u32,
    /// Largest sum of all state blobs (default 64 MiB).
    pub max_total_state: u64,
}

impl Default for DecoderLimits {
    fn default() -> Self {
        DecoderLimits {
            max_guest_bytes: 1 << 40,
            max_state_blob: MAX_STATE_BLOB,
            max_total_state: 64 << 20,
        }
    }
}

/// The receiver's state (see the diagram in `docs/migration-protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// Waiting for the preamble and Hello.
    AwaitHello,
    /// Waiting for the memory layout.
    AwaitLayout,
    /// Layout known, no pass open yet; state blobs allowed.
    AwaitPass,
    /// A pass is open: pages, state blobs, the next marker or (after the final pass)
    /// Complete.
    InPass,
    /// Complete received and checked; waiting for Commit.
    Completed,
    /// Commit received: the destination may resume the guest.
    Committed,
    /// The source aborted.
    Aborted,
    /// An error occurred; the stream is unusable.
    Failed,
}

impl RxState {
    /// Name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            RxState::AwaitHello => "AwaitHello",
            RxState::AwaitLayout => "AwaitLayout",
            RxState::AwaitPass => "AwaitPass",
            RxState::InPass => "InPass",
            RxState::Completed => "Completed",
            RxState::Committed => "Committed",
            RxState::Aborted => "Aborted",
            RxState::Failed => "Failed",
        }
    }
}

fn tag_name(t: u8) -> &'static str {
    match t {
        tag::HELLO => "Hello",
        tag::LAYOUT => "Layout",
        tag::PAGES => "Pages",
        tag::ITERATION => "IterationMarker",
        tag::STATE => "StateBlob",
        tag::COMPLETE => "Complete",
        tag::ABORT => "Abort",
        tag::COMMIT => "Commit",
        tag::SYNC => "Sync",
        tag::SYNCED => "Synced",
        tag::ACCEPTED => "Accepted",
        tag::READY => "ReadyToResume",
        tag::RESUMED => "Resumed",
        tag::ERROR => "Error",
        _ => "unknown",
    }
}

/// Counters of what a [`Decoder`] accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxStats {
    /// Bytes read, preamble and headers included.
    pub bytes: u64,
    /// Frames read.
    pub frames: u64,
    /// Pages written to the sink.
    pub pages: u64,
    /// Of those, zero pages.
    pub zero_pages: u64,
    /// Bytes of state blobs received.
    pub state_bytes: u64,
    /// Passes opened.
    pub passes: u32,
}

#[derive(Debug, Clone, Copy)]
struct Pass {
    iteration: u32,
    announced: u64,
    received: u64,
    final_pass: bool,
}

/// Reads and validates the source's stream on the destination.
///
/// [`recv`](Self::recv) returns one message at a time; page batches are written straight
/// into the caller's [`PageSink`] and reported as [`Message::Pages`]. A batch is checked
/// completely (checksum, every address inside the layout and aligned, the pass's page
/// budget) before its first page is written, so a corrupt frame never touches guest memory.
/// After any error the decoder is poisoned and returns [`WireError::Poisoned`].
#[derive(Debug)]
pub struct Decoder<R: Read> {
    fr: FrameReader<R>,
    state: RxState,
    limits: DecoderLimits,
    hello: Option<Hello>,
    layout: Option<MemoryLayout>,
    pass: Option<Pass>,
    next_iteration: u32,
    stats: RxStats,
}

impl<R: Read> Decoder<R> {
    /// A decoder with default [`DecoderLimits`].
    pub fn new(r: R) -> Self {
        Self::with_limits(r, DecoderLimits::default())
    }

    /// A decoder with explicit limits.
    pub fn with_limits(r: R, limits: DecoderLimits) -> Self {
        Decoder {
            fr: FrameReader::new(r),
            state: RxState::AwaitHello,
            limits,
            hello: None,
            layout: None,
            pass: None,
            next_iteration: 0,
            stats: RxStats::default(),
        }
    }

    /// Whether frames carry a CRC-32C to check (on by default). Off only on a channel that
    /// authenticates every byte and whose peer agreed to it (see
    /// [`Encoder::with_frame_crc`](super::Encoder::with_frame_crc)); every frame's CRC field
    /// must then be 0.
    pub fn with_frame_crc(mut self, on: bool) -> Self {
        self.fr.crc = on;
        self
    }

    /// Whether frames carry a CRC-32C that is checked.
    pub fn frame_crc(&self) -> bool {
        self.fr.crc
    }

    /// Current receive state.
    pub fn state(&self) -> RxState {
        self.state
    }

    /// The Hello, once received.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// The layout, once received.
    pub fn layout(&self) -> Option<&MemoryLayout> {
        self.layout.as_ref()
    }

    /// What was accepted so far.
    pub fn stats(&self) -> RxStats {
        RxStats {
            bytes: self.fr.bytes,
            frames: self.fr.frames,
            ..self.stats
        }
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.fr.r
    }

    /// The underlying reader, mutably (e.g. to move a read deadline between frames).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.fr.r
    }

    /// Reads the next message, writing any pages it carries into `sink`.
    pub fn recv<S: PageSink + ?Sized>(&mut self, sink: &mut S) -> Result<Message, WireError> {
        if self.state == RxState::Failed {
            return Err(WireError::Poisoned);
        }
        let r = self.next_inner(sink);
        if r.is_err() {
            self.state = RxState::Failed;
        }
        r
    }

    fn max_len(&self) -> impl Fn(u8) -> Option<usize> {
        let blob = self.limits.max_state_blob.min(MAX_STATE_BLOB) as usize;
        move |t| match t {
            tag::HELLO => Some(16),
            tag::LAYOUT => Some(8 + MAX_REGIONS * 24),
            tag::PAGES => Some(8 + MAX_BATCH_PAGES as usize * (8 + PAGE_SIZE as usize)),
            tag::ITERATION => Some(16),
            tag::STATE => Some(8 + blob),
            tag::COMPLETE => Some(16 + MAX_REGIONS * 8),
            tag::ABORT => Some(MAX_REASON_LEN),
            tag::COMMIT => Some(0),
            tag::SYNC => Some(8),
            _ => None,
        }
    }

    fn out_of_order(&self, t: u8) -> WireError {
        WireError::OutOfOrder {
            message: tag_name(t),
            state: self.state.name(),
        }
    }

    fn next_inner<S: PageSink + ?Sized>(&mut self, sink: &mut S) -> Result<Message, WireError> {
        let name = self.state.name();
        if self.state == RxState::AwaitHello {
            self.fr.read_preamble(name)?;
        }
        let max = self.max_len();
        let t = self.fr.read_frame(name, max)?;
        match (t, self.state) {
            (tag::HELLO, RxState::AwaitHello) => self.on_hello(),
            (_, RxState::AwaitHello) => Err(self.out_of_order(t)),
            (tag::LAYOUT, RxState::AwaitLayout) => self.on_layout(),
            (tag::ITERATION, RxState::AwaitPass | RxState::InPass) => self.on_iteration(),
            (tag::PAGES, RxState::InPass) => self.on_pages(sink),
            (tag::STATE, RxState::AwaitPass | RxState::InPass) => self.on_state(),
            (tag::COMPLETE, RxState::InPass) => self.on_complete(),
            (
                tag::ABORT,
                RxState::AwaitLayout | RxState::AwaitPass | RxState::InPass | RxState::Completed,
            ) => {
                let reason = std::str::from_utf8(&self.fr.buf)
                    .map_err(|_| WireError::Malformed {
                        what: "abort reason is not UTF-8",
                    })?
                    .to_owned();
                self.state = RxState::Aborted;
                Ok(Message::Abort(reason))
            }
            (tag::COMMIT, RxState::Completed) => {
                self.state = RxState::Committed;
                Ok(Message::Commit)
            }
            (tag::SYNC, RxState::AwaitPass | RxState::InPass) => {
                let mut c = Cursor::new(&self.fr.buf, "Sync payload");
                let token = c.u64()?;
                c.end()?;
                Ok(Message::Sync(token))
            }
            _ => Err(self.out_of_order(t)),
        }
    }

    fn on_hello(&mut self) -> Result<Message, WireError> {
        let hello = hello_payload(&self.fr.buf, super::PROTOCOL_VERSION)?;
        self.hello = Some(hello);
        self.state = RxState::AwaitLayout;
        Ok(Message::Hello(hello))
    }

    fn on_layout(&mut self) -> Result<Message, WireError> {
        let layout = layout_payload(&self.fr.buf, self.limits.max_guest_bytes)?;
        self.layout = Some(layout.clone());
        self.state = RxState::AwaitPass;
        Ok(Message::Layout(layout))
    }

    fn on_iteration(&mut self) -> Result<Message, WireError> {
        let what = "IterationMarker payload";
        let mut c = Cursor::new(&self.fr.buf, what);
        let iteration = c.u32()?;
        let flags = c.u32()?;
        let pages = c.u64()?;
        c.end()?;
        if flags & !1 != 0 {
            return Err(WireError::Malformed { what });
        }
        if let Some(p) = self.pass {
            if p.final_pass {
                return Err(WireError::OutOfOrder {
                    message: "IterationMarker",
                    state: "InPass (final pass)",
                });
            }
            if p.received != p.announced {
                return Err(WireError::PassMismatch {
                    iteration: p.iteration,
                    announced: p.announced,
                    received: p.received,
                });
            }
        }
        if iteration != self.next_iteration {
            return Err(WireError::IterationGap {
                expected: self.next_iteration,
                found: iteration,
            });
        }
        let total = self.layout.as_ref().map_or(0, |l| l.total_pages());
        if pages > total {
            return Err(WireError::Malformed {
                what: "IterationMarker: more pages than guest memory holds",
            });
        }
        let m = IterationMarker {
            iteration,
            pages,
            final_pass: flags & 1 != 0,
        };
        self.pass = Some(Pass {
            iteration,
            announced: pages,
            received: 0,
            final_pass: m.final_pass,
        });
        self.next_iteration = iteration.wrapping_add(1);
        self.stats.passes += 1;
        self.state = RxState::InPass;
        Ok(Message::Iteration(m))
    }

    fn on_pages<S: PageSink + ?Sized>(&mut self, sink: &mut S) -> Result<Message, WireError> {
        let what = "page batch payload";
        let (Some(layout), Some(pass)) = (self.layout.as_ref(), self.pass.as_mut()) else {
            return Err(WireError::OutOfOrder {
                message: "Pages",
                state: "no pass open",
            });
        };
        let payload = &self.fr.buf;
        let mut c = Cursor::new(payload, what);
        let count = c.u32()?;
        if c.u32()? != 0 || count == 0 || count > MAX_BATCH_PAGES {
            return Err(WireError::Malformed { what });
        }
        // First walk: validate everything, write nothing.
        let mut zero = 0u32;
        for _ in 0..count {
            let word = c.u64()?;
            let flags = word & PAGE_FLAG_MASK;
            let gpa = word & !PAGE_FLAG_MASK;
            if flags & !PAGE_ZERO_FLAG != 0 {
                return Err(WireError::GpaNotAligned { word });
            }
            if layout.locate(gpa).is_none() {
                return Err(WireError::GpaOutsideLayout { gpa });
            }
            if flags == PAGE_ZERO_FLAG {
                zero += 1;
            } else {
                c.bytes(PAGE_SIZE as usize)?;
            }
        }
        c.end()?;
        let received = pass.received + u64::from(count);
        if received > pass.announced {
            return Err(WireError::PassMismatch {
                iteration: pass.iteration,
                announced: pass.announced,
                received,
            });
        }
        // Second walk: apply. Cannot fail: the first walk checked every bound.
        let mut c = Cursor::new(payload, what);
        c.bytes(8)?;
        for _ in 0..count {
            let word = c.u64()?;
            let gpa = word & !PAGE_FLAG_MASK;
            if word & PAGE_ZERO_FLAG != 0 {
                sink.zero_page(gpa);
            } else {
                sink.write_page(gpa, c.bytes(PAGE_SIZE as usize)?);
            }
        }
        pass.received = received;
        self.stats.pages += u64::from(count);
        self.stats.zero_pages += u64::from(zero);
        Ok(Message::Pages(BatchInfo {
            pages: count,
            zero_pages: zero,
        }))
    }

    fn on_state(&mut self) -> Result<Message, WireError> {
        let mut c = Cursor::new(&self.fr.buf, "StateBlob payload");
        let kind = c.u32()?;
        let instance = c.u32()?;
        let data = c.rest();
        let total = self.stats.state_bytes + data.len() as u64;
        if total > self.limits.max_total_state {
            return Err(WireError::StateBudget {
                max: self.limits.max_total_state,
            });
        }
        self.stats.state_bytes = total;
        Ok(Message::State(StateBlob {
            kind,
            instance,
            data: data.to_vec(),
        }))
    }

    fn on_complete(&mut self) -> Result<Message, WireError> {
        match self.pass {
            Some(p) if !p.final_pass => {
                return Err(WireError::OutOfOrder {
                    message: "Complete",
                    state: "InPass (not the final pass)",
                })
            }
            Some(p) if p.received != p.announced => {
                return Err(WireError::PassMismatch {
                    iteration: p.iteration,
                    announced: p.announced,
                    received: p.received,
                })
            }
            _ => {}
        }
        let regions = self.layout.as_ref().map_or(0, |l| l.regions().len());
        let mut c = Cursor::new(&self.fr.buf, "Complete payload");
        let digest = read_digest(&mut c, |n| n == regions, true)?;
        c.end()?;
        let Some((digest, pages_sent)) = digest else {
            return Err(WireError::Malformed {
                what: "Complete payload",
            });
        };
        if pages_sent != self.stats.pages {
            return Err(WireError::PageCountMismatch {
                claimed: pages_sent,
                received: self.stats.pages,
            });
        }
        self.state = RxState::Completed;
        Ok(Message::Complete(Complete { pages_sent, digest }))
    }
}

/// Reads `flags u32 | count u32 | [u64 extra] | count × u64`; returns the digest and the
/// extra word (0 when `with_extra` is false).
fn read_digest(
    c: &mut Cursor<'_>,
    count_ok: impl Fn(usize) -> bool,
    with_extra: bool,
) -> Result<Option<(Option<MemoryDigest>, u64)>, WireError> {
    let malformed = WireError::Malformed {
        what: "digest fields",
    };
    let flags = c.u32()?;
    let count = c.u32()? as usize;
    let extra = if with_extra { c.u64()? } else { 0 };
    match flags {
        0 if count == 0 => Ok(Some((None, extra))),
        1 if count_ok(count) && count <= MAX_REGIONS => {
            let mut regions = Vec::with_capacity(count);
            for _ in 0..count {
                regions.push(c.u64()?);
            }
            Ok(Some((Some(MemoryDigest { regions }), extra)))
        }
        _ => Err(malformed),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckState {
    AwaitAccepted,
    AwaitReady,
    AwaitResumed,
    Done,
    Failed,
}

impl AckState {
    fn name(self) -> &'static str {
        match self {
            AckState::AwaitAccepted => "awaiting Accepted",
            AckState::AwaitReady => "awaiting ReadyToResume",
            AckState::AwaitResumed => "awaiting Resumed",
            AckState::Done => "done",
            AckState::Failed => "failed",
        }
    }
}

/// Reads the destination's answers on the source, enforcing Accepted → (Synced)* →
/// ReadyToResume → Resumed (an Error may come at any point and ends the exchange).
#[derive(Debug)]
pub struct AckReader<R: Read> {
    fr: FrameReader<R>,
    state: AckState,
    preamble_read: bool,
}

impl<R: Read> AckReader<R> {
    /// An ack reader over `r`.
    pub fn new(r: R) -> Self {
        AckReader {
            fr: FrameReader::new(r),
            state: AckState::AwaitAccepted,
            preamble_read: false,
        }
    }

    /// Whether frames carry a CRC-32C to check (on by default). Off only on a channel that
    /// authenticates every byte and whose peer agreed to it (see
    /// [`Encoder::with_frame_crc`](super::Encoder::with_frame_crc)); every frame's CRC field
    /// must then be 0.
    pub fn with_frame_crc(mut self, on: bool) -> Self {
        self.fr.crc = on;
        self
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.fr.r
    }

    /// Reads the next answer.
    pub fn recv(&mut self) -> Result<Ack, WireError> {
        if self.state == AckState::Failed {
            return Err(WireError::Poisoned);
        }
        let r = self.next_inner();
        if r.is_err() {
            self.state = AckState::Failed;
        }
        r
    }

    fn next_inner(&mut self) -> Result<Ack, WireError> {
        let name = self.state.name();
        if !self.preamble_read {
            self.fr.read_preamble(name)?;
            self.preamble_read = true;
        }
        let t = self.fr.read_frame(name, |t| match t {
            tag::ACCEPTED => Some(0),
            tag::READY => Some(8 + MAX_REGIONS * 8),
            tag::RESUMED => Some(8),
            tag::ERROR => Some(MAX_REASON_LEN),
            tag::SYNCED => Some(8),
            _ => None,
        })?;
        let mut c = Cursor::new(&self.fr.buf, "ack payload");
        let (ack, next) = match (t, self.state) {
            (tag::ERROR, s) if s != AckState::Done => {
                let reason = std::str::from_utf8(c.rest())
                    .map_err(|_| WireError::Malformed {
                        what: "error reason is not UTF-8",
                    })?
                    .to_owned();
                (Ack::Error(reason), AckState::Done)
            }
            (tag::ACCEPTED, AckState::AwaitAccepted) => (Ack::Accepted, AckState::AwaitReady),
            (tag::READY, AckState::AwaitReady) => {
                let d = read_digest(&mut c, |_| true, false)?;
                let digest = d.and_then(|(d, _)| d);
                (Ack::ReadyToResume { digest }, AckState::AwaitResumed)
            }
            (tag::RESUMED, AckState::AwaitResumed) => {
                (Ack::Resumed { unix_ns: c.u64()? }, AckState::Done)
            }
            (tag::SYNCED, AckState::AwaitReady) => (Ack::Synced(c.u64()?), AckState::AwaitReady),
            _ => {
                return Err(WireError::OutOfOrder {
                    message: tag_name(t),
                    state: name,
                })
            }
        };
        c.end()?;
        self.state = next;
        Ok(ack)
    }
}

/// Decodes a Hello payload: the tracker byte, 3 zero bytes, page size, vCPU count and machine,
/// nothing more; the page size must be the wire's and the vCPU count 1..=`MAX_VCPUS`.
/// `version` is the preamble's, recorded in the result.
pub(super) fn hello_payload(buf: &[u8], version: u32) -> Result<Hello, WireError> {
    let what = "Hello payload";
    let mut c = Cursor::new(buf, what);
    let tracker = super::tracker_from_wire(c.u8()?).ok_or(WireError::Malformed {
        what: "Hello: unknown tracker mode",
    })?;
    if c.bytes(3)? != [0, 0, 0] {
        return Err(WireError::Malformed { what });
    }
    let page_size = c.u32()?;
    let vcpus = c.u32()?;
    let machine = c.u32()?;
    c.end()?;
    if page_size != WIRE_PAGE_SIZE {
        return Err(WireError::UnsupportedPageSize(page_size));
    }
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(WireError::Malformed {
            what: "Hello: vCPU count must be 1..=1024",
        });
    }
    Ok(Hello {
        version,
        tracker,
        page_size,
        vcpus,
        machine,
    })
}

/// Decodes a Layout payload (region count, a zero word, then slot, zero, address and size per
/// region, nothing more) into a validated layout of at most `max_guest_bytes`.
pub(super) fn layout_payload(buf: &[u8], max_guest_bytes: u64) -> Result<MemoryLayout, WireError> {
    let what = "Layout payload";
    let mut c = Cursor::new(buf, what);
    let count = c.u32()? as usize;
    if c.u32()? != 0 {
        return Err(WireError::Malformed { what });
    }
    if count > MAX_REGIONS {
        return Err(LayoutError::TooManyRegions {
            count,
            max: MAX_REGIONS,
        }
        .into());
    }
    if c.remaining() != count * 24 {
        return Err(WireError::Malformed { what });
    }
    let mut regions = Vec::with_capacity(count);
    for _ in 0..count {
        let slot = c.u32()?;
        if c.u32()? != 0 {
            return Err(WireError::Malformed { what });
        }
        let guest_phys_addr = c.u64()?;
        let size = c.u64()?;
        regions.push(Region {
            slot,
            guest_phys_addr,
            size,
        });
    }
    c.end()?;
    let layout = MemoryLayout::new(regions)?;
    if layout.total_bytes() > max_guest_bytes {
        return Err(LayoutError::TooLarge {
            bytes: layout.total_bytes(),
            max: max_guest_bytes,
        }
        .into());
    }
    Ok(layout)
}
