//! Writers: [`Encoder`] for the source's stream, [`AckWriter`] for the destination's answers.

use std::io::Write;

use super::frame::FrameWriter;
use super::{
    tag, Ack, Complete, Hello, IterationMarker, MemoryLayout, WireError, HEADER_LEN,
    MAX_BATCH_PAGES, MAX_REASON_LEN, MAX_STATE_BLOB, PAGE_FLAG_MASK, PAGE_ZERO_FLAG,
    PROTOCOL_VERSION,
};
use crate::digest::MemoryDigest;
use crate::zero::is_zero_page;
use crate::PAGE_SIZE;

/// How a page went on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// All zero: sent as an 8-byte marker.
    Zero,
    /// Sent with its 4096 bytes.
    Data,
}

/// Counters of what an [`Encoder`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxStats {
    /// Bytes written, preamble and headers included.
    pub bytes: u64,
    /// Frames written.
    pub frames: u64,
    /// Pages sent (zero and data).
    pub pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
}

/// Writes the source's side of a migration stream.
///
/// Pages are appended to an open batch in one reusable buffer (the only per-page work is
/// the zero check and, for data pages, one 4 KiB copy); a batch is written when it holds
/// `batch_pages` pages or when any other message is sent. Messages are written in the
/// order called; the destination's [`Decoder`](super::Decoder) enforces the protocol order.
///
/// ```
/// use migration::wire::{Encoder, Hello, IterationMarker, MemoryLayout, Region};
/// use migration::TrackerMode;
/// let layout = MemoryLayout::new(vec![Region { slot: 0, guest_phys_addr: 0, size: 8192 }])?;
/// let mem = vec![0u8; 8192];
/// let mut enc = Encoder::new(Vec::new());
/// enc.send_hello(&Hello::new(TrackerMode::Ring, 1))?;
/// enc.send_layout(&layout)?;
/// enc.begin_iteration(&IterationMarker { iteration: 0, pages: 2, final_pass: true })?;
/// enc.push_page(0, &mem[..4096])?;
/// enc.push_page(4096, &mem[4096..])?;
/// enc.flush()?;
/// assert_eq!(enc.stats().zero_pages, 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Encoder<W: Write> {
    fw: FrameWriter<W>,
    batch_open: bool,
    batch_pages: u32,
    /// Where the open batch's pages begin in the frame buffer (after its count words).
    batch_data: usize,
    max_batch: u32,
    layout: Option<MemoryLayout>,
    pages: u64,
    zero_pages: u64,
}

impl<W: Write> Encoder<W> {
    /// An encoder writing to `w` with batches of [`MAX_BATCH_PAGES`] pages.
    pub fn new(w: W) -> Self {
        Self::with_batch_pages(w, MAX_BATCH_PAGES)
    }

    /// An encoder whose batches hold at most `pages` pages (clamped to
    /// 1..=[`MAX_BATCH_PAGES`]). Smaller batches lower latency, larger ones overhead.
    pub fn with_batch_pages(w: W, pages: u32) -> Self {
        Encoder {
            fw: FrameWriter::new(w),
            batch_open: false,
            batch_pages: 0,
            batch_data: 0,
            max_batch: pages.clamp(1, MAX_BATCH_PAGES),
            layout: None,
            pages: 0,
            zero_pages: 0,
        }
    }

    /// Whether frames carry a CRC-32C (on by default). Turn it off only on a channel that
    /// authenticates every byte and whose peer agreed to it (TLS with the
    /// `ringvisor-migration/aead-integrity` ALPN protocol): the CRC field is then 0, and a
    /// receiver expecting CRCs refuses the stream at its first frame.
    pub fn with_frame_crc(mut self, on: bool) -> Self {
        self.fw.crc = on;
        self
    }

    /// Whether frames carry a CRC-32C.
    pub fn frame_crc(&self) -> bool {
        self.fw.crc
    }

    /// Writes the preamble and the Hello frame. Must be the first call.
    pub fn send_hello(&mut self, hello: &Hello) -> Result<(), WireError> {
        self.fw.write_preamble(hello.version)?;
        self.fw.start(tag::HELLO);
        self.fw.buf.push(super::tracker_to_wire(hello.tracker));
        self.fw.buf.extend_from_slice(&[0u8; 3]);
        self.fw.put_u32(hello.page_size);
        self.fw.put_u32(hello.vcpus);
        self.fw.put_u32(hello.machine);
        self.fw.finish()
    }

    fn require_open(&self, message: &'static str) -> Result<(), WireError> {
        if self.fw.preamble_sent() {
            Ok(())
        } else {
            Err(WireError::OutOfOrder {
                message,
                state: "before Hello",
            })
        }
    }

    /// Writes the memory layout; later pages are checked against it before being sent.
    pub fn send_layout(&mut self, layout: &MemoryLayout) -> Result<(), WireError> {
        self.require_open("Layout")?;
        self.flush_batch()?;
        self.fw.start(tag::LAYOUT);
        self.fw.put_layout(layout);
        self.fw.finish()?;
        self.layout = Some(layout.clone());
        Ok(())
    }

    /// Writes a pass marker (after flushing any open batch).
    pub fn begin_iteration(&mut self, m: &IterationMarker) -> Result<(), WireError> {
        self.require_open("IterationMarker")?;
        self.flush_batch()?;
        self.fw.start(tag::ITERATION);
        self.fw.put_u32(m.iteration);
        self.fw.put_u32(u32::from(m.final_pass));
        self.fw.put_u64(m.pages);
        self.fw.finish()
    }

    fn check_gpa(&self, gpa: u64) -> Result<(), WireError> {
        check_gpa(self.layout.as_ref(), gpa)
    }

    fn open_batch(&mut self) {
        if !self.batch_open {
            self.fw.start(tag::PAGES);
            self.fw.put_u32(0); // count, patched by flush_batch
            self.fw.put_u32(0);
            self.batch_data = self.fw.buf.len();
            self.batch_open = true;
            self.batch_pages = 0;
        }
    }

    fn page_added(&mut self) -> Result<(), WireError> {
        // Checksum the page now, while it is in cache.
        self.fw.fold(self.batch_data);
        self.batch_pages += 1;
        self.pages += 1;
        if self.batch_pages >= self.max_batch {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Adds the page at `gpa` with contents `data` (exactly 4096 bytes) to the open batch,
    /// as a zero marker if it is all zero. Writes the batch when it is full.
    pub fn push_page(&mut self, gpa: u64, data: &[u8]) -> Result<PageKind, WireError> {
        if data.len() as u64 != PAGE_SIZE {
            return Err(WireError::PageLength {
                gpa,
                len: data.len(),
            });
        }
        self.check_gpa(gpa)?;
        self.open_batch();
        let kind = if is_zero_page(data) {
            self.fw.put_u64(gpa | PAGE_ZERO_FLAG);
            self.zero_pages += 1;
            PageKind::Zero
        } else {
            self.fw.put_u64(gpa);
            self.fw.buf.extend_from_slice(data);
            PageKind::Data
        };
        self.page_added()?;
        Ok(kind)
    }

    /// Like [`Encoder::push_page`], but `fill` writes the page's 4096 bytes straight into the
    /// batch (one copy from guest memory instead of two). An error from `fill` leaves the
    /// batch as it was.
    pub fn push_page_with<E: From<WireError>>(
        &mut self,
        gpa: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<PageKind, E> {
        self.check_gpa(gpa)?;
        self.open_batch();
        let at = self.fw.buf.len();
        self.fw.put_u64(gpa);
        // Stale bytes, not zeros: `fill` overwrites the whole page (no memset per page).
        let page = self.fw.buf.grow_stale(PAGE_SIZE as usize);
        if let Err(e) = fill(page) {
            self.fw.buf.truncate(at);
            return Err(e);
        }
        let kind = if is_zero_page(&self.fw.buf[at + 8..]) {
            self.fw.buf.truncate(at);
            self.fw.put_u64(gpa | PAGE_ZERO_FLAG);
            self.zero_pages += 1;
            PageKind::Zero
        } else {
            PageKind::Data
        };
        self.page_added()?;
        Ok(kind)
    }

    /// Adds a zero marker for `gpa` without looking at memory (e.g. a page known never to
    /// have been written).
    pub fn push_zero_page(&mut self, gpa: u64) -> Result<(), WireError> {
        self.check_gpa(gpa)?;
        self.open_batch();
        self.fw.put_u64(gpa | PAGE_ZERO_FLAG);
        self.zero_pages += 1;
        self.page_added()
    }

    /// Pages in the open batch, not yet written.
    pub fn pending_pages(&self) -> u32 {
        if self.batch_open {
            self.batch_pages
        } else {
            0
        }
    }

    /// Writes the open batch, if any.
    pub fn flush_batch(&mut self) -> Result<(), WireError> {
        if !self.batch_open {
            return Ok(());
        }
        self.batch_open = false;
        let count = self.batch_pages.to_le_bytes();
        self.fw.buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&count);
        self.fw.finish()
    }

    /// Writes one vCPU or device state blob of at most [`MAX_STATE_BLOB`] bytes.
    pub fn send_state(&mut self, kind: u32, instance: u32, data: &[u8]) -> Result<(), WireError> {
        self.require_open("StateBlob")?;
        if data.len() > MAX_STATE_BLOB as usize {
            return Err(WireError::Oversize {
                tag: tag::STATE,
                len: data.len() as u64,
                max: u64::from(MAX_STATE_BLOB),
            });
        }
        self.flush_batch()?;
        self.fw.start(tag::STATE);
        self.fw.put_u32(kind);
        self.fw.put_u32(instance);
        self.fw.buf.extend_from_slice(data);
        self.fw.finish()
    }

    /// Writes Complete and flushes the writer.
    pub fn send_complete(&mut self, c: &Complete) -> Result<(), WireError> {
        self.require_open("Complete")?;
        self.flush_batch()?;
        self.fw.start(tag::COMPLETE);
        put_digest_head(&mut self.fw, c.digest.as_ref());
        self.fw.put_u64(c.pages_sent);
        put_digest_body(&mut self.fw, c.digest.as_ref());
        self.fw.finish()?;
        self.fw.w.flush()?;
        Ok(())
    }

    /// Writes Abort with `reason` (cut to [`MAX_REASON_LEN`] bytes) and flushes. Pending
    /// pages are dropped: the destination discards everything anyway.
    pub fn send_abort(&mut self, reason: &str) -> Result<(), WireError> {
        self.require_open("Abort")?;
        self.batch_open = false;
        self.fw.start(tag::ABORT);
        self.fw.buf.extend_from_slice(cut_reason(reason).as_bytes());
        self.fw.finish()?;
        self.fw.w.flush()?;
        Ok(())
    }

    /// Writes Commit (the source will not resume the guest) and flushes.
    pub fn send_commit(&mut self) -> Result<(), WireError> {
        self.require_open("Commit")?;
        self.flush_batch()?;
        self.fw.start(tag::COMMIT);
        self.fw.finish()?;
        self.fw.w.flush()?;
        Ok(())
    }

    /// Writes a Sync barrier with `token` and flushes (the destination answers
    /// [`Ack::Synced`] once it has processed everything before it).
    pub fn send_sync(&mut self, token: u64) -> Result<(), WireError> {
        self.require_open("Sync")?;
        self.flush_batch()?;
        self.fw.start(tag::SYNC);
        self.fw.put_u64(token);
        self.fw.finish()?;
        self.fw.w.flush()?;
        Ok(())
    }

    /// Writes the open batch and flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.flush_batch()?;
        self.fw.w.flush()?;
        Ok(())
    }

    /// What was written so far.
    pub fn stats(&self) -> TxStats {
        TxStats {
            bytes: self.fw.bytes,
            frames: self.fw.frames,
            pages: self.pages,
            zero_pages: self.zero_pages,
        }
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.fw.w
    }

    /// The underlying writer, mutably (writing to it directly corrupts the stream).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.fw.w
    }

    /// Gives back the writer; an open batch is discarded.
    pub fn into_inner(self) -> W {
        self.fw.w
    }
}

fn put_digest_head<W: Write>(fw: &mut FrameWriter<W>, d: Option<&MemoryDigest>) {
    match d {
        Some(d) => {
            fw.put_u32(1);
            fw.put_u32(d.regions.len() as u32);
        }
        None => {
            fw.put_u32(0);
            fw.put_u32(0);
        }
    }
}

fn put_digest_body<W: Write>(fw: &mut FrameWriter<W>, d: Option<&MemoryDigest>) {
    if let Some(d) = d {
        for v in &d.regions {
            fw.put_u64(*v);
        }
    }
}

fn cut_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Writes the destination's answers; the preamble goes out with the first one.
#[derive(Debug)]
pub struct AckWriter<W: Write> {
    fw: FrameWriter<W>,
}

impl<W: Write> AckWriter<W> {
    /// An ack writer over `w`.
    pub fn new(w: W) -> Self {
        AckWriter {
            fw: FrameWriter::new(w),
        }
    }

    /// Whether frames carry a CRC-32C (on by default). Turn it off only on a channel that
    /// authenticates every byte and whose peer agreed to it (TLS with the
    /// `ringvisor-migration/aead-integrity` ALPN protocol): the CRC field is then 0, and a
    /// source expecting CRCs refuses the first answer.
    pub fn with_frame_crc(mut self, on: bool) -> Self {
        self.fw.crc = on;
        self
    }

    /// Writes `ack` and flushes.
    pub fn send(&mut self, ack: &Ack) -> Result<(), WireError> {
        if !self.fw.preamble_sent() {
            self.fw.write_preamble(PROTOCOL_VERSION)?;
        }
        match ack {
            Ack::Accepted => self.fw.start(tag::ACCEPTED),
            Ack::ReadyToResume { digest } => {
                self.fw.start(tag::READY);
                put_digest_head(&mut self.fw, digest.as_ref());
                put_digest_body(&mut self.fw, digest.as_ref());
            }
            Ack::Resumed { unix_ns } => {
                self.fw.start(tag::RESUMED);
                self.fw.put_u64(*unix_ns);
            }
            Ack::Error(reason) => {
                self.fw.start(tag::ERROR);
                self.fw.buf.extend_from_slice(cut_reason(reason).as_bytes());
            }
            Ack::Synced(token) => {
                self.fw.start(tag::SYNCED);
                self.fw.put_u64(*token);
            }
        }
        self.fw.finish()?;
        self.fw.w.flush()?;
        Ok(())
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.fw.w
    }

    /// Gives back the writer.
    pub fn into_inner(self) -> W {
        self.fw.w
    }
}

/// A page address the sender may send: page-aligned (no flag bits) and inside the layout
/// already sent.
pub(super) fn check_gpa(layout: Option<&MemoryLayout>, gpa: u64) -> Result<(), WireError> {
    if gpa & PAGE_FLAG_MASK != 0 {
        return Err(WireError::GpaNotAligned { word: gpa });
    }
    match layout {
        Some(l) if l.locate(gpa).is_some() => Ok(()),
        Some(_) => Err(WireError::GpaOutsideLayout { gpa }),
        None => Err(WireError::OutOfOrder {
            message: "page",
            state: "before Layout",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let s = "é".repeat(MAX_REASON_LEN);
        let c = cut_reason(&s);
        assert!(c.len() <= MAX_REASON_LEN && c.len() >= MAX_REASON_LEN - 1);
        assert!(c.chars().all(|ch| ch == 'é'));
    }
}
