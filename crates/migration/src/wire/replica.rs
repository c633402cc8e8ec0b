//! The replication stream: a running guest checkpointed continuously to a hot standby (COLO /
//! Remus style). The format and the standby's rules are in `docs/replication.md`.
//!
//! It reuses the migration stream's framing (16-byte header, sequence numbers, CRC-32C,
//! per-tag payload limits checked before anything is read or allocated) under its own magic
//! (`RVREPLIC`), so a migration peer and a replication peer refuse each other at the
//! preamble. After Hello, Layout and the seed (the initial full copy, sent while the guest
//! runs), the primary sends checkpoints: `Begin` (epoch, pages, bytes, state blobs), page
//! batches, state blobs, and `End` (epoch and a CRC-32C over the payloads of every frame
//! of the checkpoint). [`ReplicaReader`] returns `End` only once the checkpoint is complete
//! and every count and the checksum agree; a standby applies its staged pages only then.

use std::collections::HashMap;
use std::io::{Read, Write};

use super::frame::{Cursor, FrameReader, FrameWriter};
use super::{
    Hello, MemoryLayout, WireError, HEADER_LEN, MAX_BATCH_PAGES, MAX_REASON_LEN, MAX_STATE_BLOB,
    PAGE_FLAG_MASK, PAGE_ZERO_FLAG,
};
use crate::zero::is_zero_page;
use crate::PAGE_SIZE;

/// First 8 bytes of each direction of a replication stream.
pub const REPLICA_MAGIC: [u8; 8] = *b"RVREPLIC";
/// Replication protocol version this build speaks (and the only one it accepts). Version 2
/// carries each epoch's guest output inside its checkpoint (`Output`, Begin's `output`).
pub const REPLICA_VERSION: u32 = 2;
/// Most state blobs in one checkpoint (one per vCPU up to 1024, plus devices).
pub const MAX_CHECKPOINT_STATES: u32 = 1024 + 16;
/// Most guest output one checkpoint carries (the VMM's console capture holds as much in
/// all); a primary keeps the first this many bytes of an epoch's output.
pub const MAX_CHECKPOINT_OUTPUT: u32 = 64 << 20;
/// Most output bytes in one `Output` frame.
pub const MAX_OUTPUT_FRAME: usize = 1 << 20;

/// Frame tags of the replication stream (primary to standby below 0xc0, answers above).
pub mod rtag {
    /// Hello (same payload as the migration Hello).
    pub const HELLO: u8 = 0x41;
    /// Memory layout (same payload as the migration Layout).
    pub const LAYOUT: u8 = 0x42;
    /// A batch of pages of the initial copy, written straight into the standby's image.
    pub const SEED_PAGES: u8 = 0x43;
    /// End of the initial copy: `pages u64`.
    pub const SEED_DONE: u8 = 0x44;
    /// A checkpoint begins: `epoch u64, pages u64, bytes u64, states u32, output u32`.
    pub const BEGIN: u8 = 0x45;
    /// A batch of a checkpoint's pages (staged on the standby).
    pub const PAGES: u8 = 0x46;
    /// A state blob of a checkpoint: `kind u32, instance u32, bytes`.
    pub const STATE: u8 = 0x47;
    /// A checkpoint ends: `epoch u64, crc32c u32, reserved u32`.
    pub const END: u8 = 0x48;
    /// The primary is alive: `epoch u64` (last checkpoint sent), `unix_ns u64`.
    pub const HEARTBEAT: u8 = 0x49;
    /// The primary ends replication on purpose (the standby must not take over): reason.
    pub const SHUTDOWN: u8 = 0x4a;
    /// Part of a checkpoint's guest output (what the guest sent out during the epoch the
    /// checkpoint ends, held on the primary until the standby applied it): bytes.
    pub const OUTPUT: u8 = 0x4b;
    /// Standby: image built, send the seed.
    pub const READY: u8 = 0xc1;
    /// Standby: checkpoint `epoch u64` applied.
    pub const APPLIED: u8 = 0xc2;
    /// Standby: failed, reason.
    pub const ERROR: u8 = 0xc3;
}

/// What a checkpoint's `Begin` announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// Epoch number: 1 for the first checkpoint, +1 for each one after.
    pub epoch: u64,
    /// Pages the checkpoint carries (zero markers included).
    pub pages: u64,
    /// Payload bytes of all its page batches and state blobs.
    pub bytes: u64,
    /// State blobs it carries.
    pub states: u32,
    /// Bytes of guest output it carries.
    pub output: u32,
}

/// A checkpoint held on the primary: the dirty pages and the state captured while the guest
/// was paused, sent after it resumed. Built in place and reused from one epoch to the next:
/// its page area only grows (and is written once when it does, so it is faulted in before
/// any pause needs it), so after the first few epochs a checkpoint neither allocates nor
/// zero-fills: a page is read straight into its place. A page can be put again (its copy
/// replaced in place), so pages can be copied while the guest runs and copied again in the
/// pause only if the guest wrote them since.
#[derive(Debug, Default)]
pub struct CheckpointBuf {
    epoch: u64,
    /// One address word per page: GPA, bit 0 set for a zero page.
    words: Vec<u64>,
    /// Per word: its page's slot in `data` (meaningful for a data page only).
    slots: Vec<u32>,
    /// Page slots; `data[..data_len]` is in use, the rest is room already faulted in.
    data: Vec<u8>,
    data_len: usize,
    /// Data pages (words without the zero bit).
    live: u64,
    /// GPA to word index, for putting a page again.
    index: HashMap<u64, u32>,
    /// (kind, instance, bytes); vectors beyond `nstates` are kept for reuse.
    states: Vec<(u32, u32, Vec<u8>)>,
    nstates: usize,
    /// The epoch's guest output (at most [`MAX_CHECKPOINT_OUTPUT`] bytes).
    output: Vec<u8>,
}

const PAGE: usize = PAGE_SIZE as usize;

impl CheckpointBuf {
    /// An empty buffer with room for `pages` data pages, faulted in now.
    pub fn with_capacity(pages: usize) -> Self {
        CheckpointBuf {
            words: Vec::with_capacity(pages),
            slots: Vec::with_capacity(pages),
            // Written (not calloc'd zero pages), so no pause takes the first-touch faults.
            data: vec![0xa5; pages * PAGE],
            index: HashMap::with_capacity(pages),
            ..Self::default()
        }
    }

    /// Empties the buffer (keeping its memory) for checkpoint `epoch`.
    pub fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.words.clear();
        self.slots.clear();
        self.index.clear();
        self.data_len = 0;
        self.live = 0;
        self.nstates = 0;
        self.output.clear();
    }

    /// The checkpoint's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Pages held (zero markers included).
    pub fn pages(&self) -> u64 {
        self.words.len() as u64
    }

    /// Pages held as zero markers.
    pub fn zero_pages(&self) -> u64 {
        self.words.len() as u64 - self.live
    }

    /// Bytes of memory this buffer holds (data pages and state), for capacity reports.
    pub fn held_bytes(&self) -> u64 {
        let st: usize = self.states[..self.nstates].iter().map(|s| s.2.len()).sum();
        self.live * PAGE_SIZE + st as u64
    }

    /// The next free slot, growing the page area if needed (at least doubling, so growth is
    /// rare and its new room is faulted in once).
    fn free_slot(&mut self) -> usize {
        let end = self.data_len + PAGE;
        if self.data.len() < end {
            let want = end.max(self.data.len() * 2);
            self.data.resize(want, 0xa5);
        }
        self.data_len / PAGE
    }

    /// Reads into slot `slot`; whether the page is all zero.
    fn fill<E>(
        &mut self,
        slot: usize,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let page = &mut self.data[slot * PAGE..(slot + 1) * PAGE];
        read(page)?;
        Ok(is_zero_page(page))
    }

    /// Adds the page at `gpa`, filled by `read` (4096 bytes) straight into the buffer; an
    /// all-zero page is kept as a marker only. (A page added twice goes out twice; see
    /// [`CheckpointBuf::put_page_with`].)
    pub fn push_page_with<E>(
        &mut self,
        gpa: u64,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let slot = self.free_slot();
        let zero = self.fill(slot, read)?;
        self.index.insert(gpa, self.words.len() as u32);
        if zero {
            self.words.push(gpa | PAGE_ZERO_FLAG);
            self.slots.push(0);
        } else {
            self.words.push(gpa);
            self.slots.push(slot as u32);
            self.data_len += PAGE;
            self.live += 1;
        }
        Ok(())
    }

    /// Adds the page at `gpa` like [`CheckpointBuf::push_page_with`], or, if the buffer
    /// already holds it, replaces its copy in place. After an error the buffer must be
    /// reset (the page's old copy may be half overwritten).
    pub fn put_page_with<E>(
        &mut self,
        gpa: u64,
        read: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(&i) = self.index.get(&gpa) else {
            return self.push_page_with(gpa, read);
        };
        let i = i as usize;
        let had_data = self.words[i] & PAGE_ZERO_FLAG == 0;
        let slot = if had_data {
            self.slots[i] as usize
        } else {
            self.free_slot()
        };
        let zero = self.fill(slot, read)?;
        match (had_data, zero) {
            // Its slot stays allocated (unused) until the next reset.
            (true, true) => {
                self.words[i] |= PAGE_ZERO_FLAG;
                self.live -= 1;
            }
            (false, false) => {
                self.words[i] &= !PAGE_ZERO_FLAG;
                self.slots[i] = slot as u32;
                self.data_len += PAGE;
                self.live += 1;
            }
            _ => {}
        }
        Ok(())
    }

    /// Adds a zero marker for `gpa`.
    pub fn push_zero(&mut self, gpa: u64) {
        self.index.insert(gpa, self.words.len() as u32);
        self.words.push(gpa | PAGE_ZERO_FLAG);
        self.slots.push(0);
    }

    /// Adds a state blob (copied into a reused vector).
    pub fn push_state(&mut self, kind: u32, instance: u32, data: &[u8]) {
        if self.nstates == self.states.len() {
            self.states.push((0, 0, Vec::new()));
        }
        let s = &mut self.states[self.nstates];
        s.0 = kind;
        s.1 = instance;
        s.2.clear();
        s.2.extend_from_slice(data);
        self.nstates += 1;
    }

    /// Adds the guest's output of the epoch (kept up to [`MAX_CHECKPOINT_OUTPUT`] bytes in
    /// all; returns false if some was left out).
    pub fn push_output(&mut self, data: &[u8]) -> bool {
        let room = MAX_CHECKPOINT_OUTPUT as usize - self.output.len();
        let n = data.len().min(room);
        self.output.extend_from_slice(&data[..n]);
        n == data.len()
    }

    /// The guest output held.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// The state blobs held.
    pub fn states(&self) -> impl Iterator<Item = (u32, u32, &[u8])> {
        self.states[..self.nstates]
            .iter()
            .map(|(k, i, d)| (*k, *i, d.as_slice()))
    }

    /// The pages held: (GPA, `Some(data)` or `None` for a zero page).
    pub fn iter_pages(&self) -> impl Iterator<Item = (u64, Option<&[u8]>)> {
        self.words.iter().zip(&self.slots).map(move |(&w, &slot)| {
            if w & PAGE_ZERO_FLAG != 0 {
                (w & !PAGE_FLAG_MASK, None)
            } else {
                let at = slot as usize * PAGE;
                (w, Some(&self.data[at..at + PAGE]))
            }
        })
    }

    /// The header this checkpoint goes out with, for batches of `batch` pages.
    pub fn header(&self, batch: u32) -> CheckpointHeader {
        let pages = self.words.len() as u64;
        let batches = pages.div_ceil(u64::from(batch.max(1)));
        let states: u64 = self.states[..self.nstates]
            .iter()
            .map(|s| 8 + s.2.len() as u64)
            .sum();
        CheckpointHeader {
            epoch: self.epoch,
            pages,
            bytes: batches * 8
                + pages * 8
                + self.live * PAGE_SIZE
                + states
                + self.output.len() as u64,
            states: self.nstates as u32,
            output: self.output.len() as u32,
        }
    }
}

/// Counters of what a [`ReplicaWriter`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaTxStats {
    /// Bytes written, preambles and headers included.
    pub bytes: u64,
    /// Seed pages sent.
    pub seed_pages: u64,
    /// Checkpoints sent.
    pub checkpoints: u64,
}

/// Writes the primary's side of a replication stream.
#[derive(Debug)]
pub struct ReplicaWriter<W: Write> {
    fw: FrameWriter<W>,
    layout: Option<MemoryLayout>,
    batch: u32,
    seed_open: bool,
    seed_batch: u32,
    seed_pages: u64,
    checkpoints: u64,
}

impl<W: Write> ReplicaWriter<W> {
    /// A writer over `w` with batches of [`MAX_BATCH_PAGES`] pages.
    pub fn new(w: W) -> Self {
        Self::with_batch_pages(w, MAX_BATCH_PAGES)
    }

    /// A writer whose page batches hold at most `pages` pages (1..=[`MAX_BATCH_PAGES`]).
    pub fn with_batch_pages(w: W, pages: u32) -> Self {
        ReplicaWriter {
            fw: FrameWriter::new(w),
            layout: None,
            batch: pages.clamp(1, MAX_BATCH_PAGES),
            seed_open: false,
            seed_batch: 0,
            seed_pages: 0,
            checkpoints: 0,
        }
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.fw.w
    }

    /// What was written so far.
    pub fn stats(&self) -> ReplicaTxStats {
        ReplicaTxStats {
            bytes: self.fw.bytes,
            seed_pages: self.seed_pages,
            checkpoints: self.checkpoints,
        }
    }

    /// Writes the preamble, Hello and the layout. Must be the first call.
    pub fn open(&mut self, hello: &Hello, layout: &MemoryLayout) -> Result<(), WireError> {
        self.fw
            .write_preamble_with(&REPLICA_MAGIC, REPLICA_VERSION)?;
        self.fw.start(rtag::HELLO);
        self.fw.buf.push(super::tracker_to_wire(hello.tracker));
        self.fw.buf.extend_from_slice(&[0u8; 3]);
        self.fw.put_u32(hello.page_size);
        self.fw.put_u32(hello.vcpus);
        self.fw.put_u32(hello.machine);
        self.fw.finish()?;
        self.fw.start(rtag::LAYOUT);
        self.fw.put_layout(layout);
        self.fw.finish()?;
        self.layout = Some(layout.clone());
        self.flush()
    }

    fn check_gpa(&self, gpa: u64) -> Result<(), WireError> {
        super::encode::check_gpa(self.layout.as_ref(), gpa)
    }

    fn seed_entry(&mut self, gpa: u64, data: Option<&[u8]>) -> Result<(), WireError> {
        self.check_gpa(gpa)?;
        if !self.seed_open {
            self.fw.start(rtag::SEED_PAGES);
            self.fw.put_u32(0);
            self.fw.put_u32(0);
            self.seed_open = true;
            self.seed_batch = 0;
        }
        match data {
            Some(d) if !is_zero_page(d) => {
                self.fw.put_u64(gpa);
                self.fw.buf.extend_from_slice(d);
            }
            _ => self.fw.put_u64(gpa | PAGE_ZERO_FLAG),
        }
        self.seed_batch += 1;
        self.seed_pages += 1;
        if self.seed_batch >= self.batch {
            self.flush_seed()?;
        }
        Ok(())
    }

    fn flush_seed(&mut self) -> Result<(), WireError> {
        if self.seed_open {
            self.seed_open = false;
            let n = self.seed_batch.to_le_bytes();
            self.fw.buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&n);
            self.fw.finish()?;
        }
        Ok(())
    }

    /// Adds a page of the initial copy (4096 bytes; all zero goes as a marker).
    pub fn push_seed_page(&mut self, gpa: u64, data: &[u8]) -> Result<(), WireError> {
        if data.len() as u64 != PAGE_SIZE {
            return Err(WireError::PageLength {
                gpa,
                len: data.len(),
            });
        }
        self.seed_entry(gpa, Some(data))
    }

    /// Adds a zero marker to the initial copy (a page never populated).
    pub fn push_seed_zero(&mut self, gpa: u64) -> Result<(), WireError> {
        self.seed_entry(gpa, None)
    }

    /// Ends the initial copy with the number of pages it carried, and flushes.
    pub fn finish_seed(&mut self) -> Result<(), WireError> {
        self.flush_seed()?;
        self.fw.start(rtag::SEED_DONE);
        self.fw.put_u64(self.seed_pages);
        self.fw.finish()?;
        self.flush()
    }

    /// Writes a whole checkpoint (Begin, page batches, state blobs, End) and flushes.
    /// Returns the bytes it took on the wire.
    pub fn send_checkpoint(&mut self, cp: &CheckpointBuf) -> Result<u64, WireError> {
        if self.layout.is_none() {
            return Err(WireError::OutOfOrder {
                message: "checkpoint",
                state: "before Layout",
            });
        }
        let b0 = self.fw.bytes;
        let h = cp.header(self.batch);
        self.fw.start(rtag::BEGIN);
        self.fw.put_u64(h.epoch);
        self.fw.put_u64(h.pages);
        self.fw.put_u64(h.bytes);
        self.fw.put_u32(h.states);
        self.fw.put_u32(h.output);
        self.fw.finish()?;
        let mut crc = 0u32;
        let mut pages = cp.iter_pages().peekable();
        while pages.peek().is_some() {
            self.fw.start(rtag::PAGES);
            self.fw.put_u32(0);
            self.fw.put_u32(0);
            let mut n = 0u32;
            for (gpa, data) in pages.by_ref().take(self.batch as usize) {
                self.check_gpa(gpa)?;
                match data {
                    Some(d) => {
                        self.fw.put_u64(gpa);
                        self.fw.buf.extend_from_slice(d);
                    }
                    None => self.fw.put_u64(gpa | PAGE_ZERO_FLAG),
                }
                n += 1;
            }
            self.fw.buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&n.to_le_bytes());
            crc = super::crc::append(crc, &self.fw.buf[HEADER_LEN..]);
            self.fw.finish()?;
        }
        for (kind, instance, data) in cp.states() {
            if data.len() > MAX_STATE_BLOB as usize {
                return Err(WireError::Oversize {
                    tag: rtag::STATE,
                    len: data.len() as u64,
                    max: u64::from(MAX_STATE_BLOB),
                });
            }
            self.fw.start(rtag::STATE);
            self.fw.put_u32(kind);
            self.fw.put_u32(instance);
            self.fw.buf.extend_from_slice(data);
            crc = super::crc::append(crc, &self.fw.buf[HEADER_LEN..]);
            self.fw.finish()?;
        }
        for chunk in cp.output().chunks(MAX_OUTPUT_FRAME) {
            self.fw.start(rtag::OUTPUT);
            self.fw.buf.extend_from_slice(chunk);
            crc = super::crc::append(crc, &self.fw.buf[HEADER_LEN..]);
            self.fw.finish()?;
        }
        self.fw.start(rtag::END);
        self.fw.put_u64(h.epoch);
        self.fw.put_u32(crc);
        self.fw.put_u32(0);
        self.fw.finish()?;
        self.flush()?;
        self.checkpoints += 1;
        Ok(self.fw.bytes - b0)
    }

    /// Writes a heartbeat (the last epoch sent, the time) and flushes (during the seed, after
    /// the seed batch being built, which goes out first).
    pub fn send_heartbeat(&mut self, epoch: u64, unix_ns: u64) -> Result<(), WireError> {
        self.flush_seed()?;
        self.fw.start(rtag::HEARTBEAT);
        self.fw.put_u64(epoch);
        self.fw.put_u64(unix_ns);
        self.fw.finish()?;
        self.flush()
    }

    /// Writes Shutdown (replication ended on purpose; reason cut to [`MAX_REASON_LEN`]
    /// bytes) and flushes.
    pub fn send_shutdown(&mut self, reason: &str) -> Result<(), WireError> {
        self.flush_seed()?;
        self.fw.start(rtag::SHUTDOWN);
        self.fw.buf.extend_from_slice(cut(reason).as_bytes());
        self.fw.finish()?;
        self.flush()
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), WireError> {
        Ok(self.fw.w.flush()?)
    }
}

fn cut(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Where a [`ReplicaReader`] puts pages: seed pages go straight into the image (it is not
/// a consistent guest before the first checkpoint), checkpoint pages into a staging area.
pub trait ReplicaSink {
    /// A page of the initial copy (`None`: all zero).
    fn seed_page(&mut self, gpa: u64, data: Option<&[u8]>);
    /// A page of the open checkpoint (`None`: all zero).
    fn stage_page(&mut self, gpa: u64, data: Option<&[u8]>);
    /// Part of the open checkpoint's guest output, in order.
    fn stage_output(&mut self, _data: &[u8]) {}
}

/// One message of the replication stream, as [`ReplicaReader::recv`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaMessage {
    /// The primary's Hello.
    Hello(Hello),
    /// Its memory layout.
    Layout(MemoryLayout),
    /// A batch of seed pages went to the sink.
    SeedPages(u32),
    /// The initial copy is complete (pages it carried).
    SeedDone(u64),
    /// A checkpoint begins.
    Begin(CheckpointHeader),
    /// A batch of the open checkpoint's pages went to the sink.
    Pages(u32),
    /// A state blob of the open checkpoint.
    State {
        /// Kind (the engine's `STATE_KIND_*`).
        kind: u32,
        /// Instance (vCPU index).
        instance: u32,
        /// Its bytes.
        data: Vec<u8>,
    },
    /// Part of the open checkpoint's guest output (this many bytes) went to the sink.
    Output(u32),
    /// The open checkpoint arrived completely and verified: it may be applied.
    End(CheckpointHeader),
    /// The primary is alive.
    Heartbeat {
        /// The last epoch it sent.
        epoch: u64,
        /// Its clock, ns since the Unix epoch.
        unix_ns: u64,
    },
    /// The primary ended replication on purpose.
    Shutdown(String),
}

/// Bounds a [`ReplicaReader`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaLimits {
    /// Largest total guest memory a layout may announce.
    pub max_guest_bytes: u64,
    /// Largest checkpoint (payload bytes as `Begin` announces them); `None`: all of guest
    /// memory plus its address words and 64 MiB of state.
    pub max_checkpoint_bytes: Option<u64>,
}

impl Default for ReplicaLimits {
    fn default() -> Self {
        ReplicaLimits {
            max_guest_bytes: 1 << 40,
            max_checkpoint_bytes: None,
        }
    }
}

/// Where a [`ReplicaReader`] is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Waiting for Hello.
    AwaitHello,
    /// Waiting for the layout.
    AwaitLayout,
    /// Receiving the initial copy.
    Seeding,
    /// Between checkpoints.
    Idle,
    /// Inside a checkpoint.
    InCheckpoint,
    /// The primary shut replication down.
    Closed,
    /// An error ended the stream.
    Failed,
}

impl ReplicaState {
    fn name(self) -> &'static str {
        match self {
            ReplicaState::AwaitHello => "AwaitHello",
            ReplicaState::AwaitLayout => "AwaitLayout",
            ReplicaState::Seeding => "Seeding",
            ReplicaState::Idle => "Idle",
            ReplicaState::InCheckpoint => "InCheckpoint",
            ReplicaState::Closed => "Closed",
            ReplicaState::Failed => "Failed",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Open {
    h: CheckpointHeader,
    pages: u64,
    bytes: u64,
    states: u32,
    output: u64,
    crc: u32,
}

/// Reads the primary's side of a replication stream on the standby: checks order, bounds,
/// every page address, epochs (1, 2, 3, ...) and each checkpoint's counts and checksum.
#[derive(Debug)]
pub struct ReplicaReader<R: Read> {
    fr: FrameReader<R>,
    state: ReplicaState,
    limits: ReplicaLimits,
    layout: Option<MemoryLayout>,
    seed_pages: u64,
    last_epoch: u64,
    open: Option<Open>,
}

impl<R: Read> ReplicaReader<R> {
    /// A reader over `r` with `limits`.
    pub fn new(r: R, limits: ReplicaLimits) -> Self {
        ReplicaReader {
            fr: FrameReader::new(r),
            state: ReplicaState::AwaitHello,
            limits,
            layout: None,
            seed_pages: 0,
            last_epoch: 0,
            open: None,
        }
    }

    /// Where the reader is.
    pub fn state(&self) -> ReplicaState {
        self.state
    }

    /// The last epoch received completely and verified (0: none yet).
    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.fr.bytes
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.fr.r
    }

    fn max_checkpoint(&self) -> u64 {
        let total = self.layout.as_ref().map_or(0, |l| l.total_pages());
        self.limits
            .max_checkpoint_bytes
            .unwrap_or(total * (PAGE_SIZE + 16) + (64 << 20))
    }

    /// Reads the next message, handing pages to `sink`. After an error every call fails.
    pub fn recv(&mut self, sink: &mut dyn ReplicaSink) -> Result<ReplicaMessage, WireError> {
        if self.state == ReplicaState::Failed {
            return Err(WireError::Poisoned);
        }
        let r = self.next_inner(sink);
        if r.is_err() {
            self.state = ReplicaState::Failed;
        }
        r
    }

    fn next_inner(&mut self, sink: &mut dyn ReplicaSink) -> Result<ReplicaMessage, WireError> {
        let name = self.state.name();
        if self.state == ReplicaState::AwaitHello {
            self.fr
                .read_preamble_with(&REPLICA_MAGIC, REPLICA_VERSION..=REPLICA_VERSION, name)?;
        }
        let batch = 8 + MAX_BATCH_PAGES as usize * (8 + PAGE_SIZE as usize);
        let t = self.fr.read_frame(name, |t| match t {
            rtag::HELLO => Some(16),
            rtag::LAYOUT => Some(8 + super::MAX_REGIONS * 24),
            rtag::SEED_PAGES | rtag::PAGES => Some(batch),
            rtag::SEED_DONE => Some(8),
            rtag::BEGIN => Some(32),
            rtag::STATE => Some(8 + MAX_STATE_BLOB as usize),
            rtag::END | rtag::HEARTBEAT => Some(16),
            rtag::SHUTDOWN => Some(MAX_REASON_LEN),
            rtag::OUTPUT => Some(MAX_OUTPUT_FRAME),
            _ => None,
        })?;
        use ReplicaState as S;
        match (t, self.state) {
            (rtag::HELLO, S::AwaitHello) => self.on_hello(),
            (rtag::LAYOUT, S::AwaitLayout) => self.on_layout(),
            (rtag::SEED_PAGES, S::Seeding) => {
                let n = self.on_pages(sink, true)?;
                self.seed_pages += u64::from(n);
                Ok(ReplicaMessage::SeedPages(n))
            }
            (rtag::SEED_DONE, S::Seeding) => {
                let mut c = Cursor::new(&self.fr.buf, "SeedDone payload");
                let pages = c.u64()?;
                c.end()?;
                if pages != self.seed_pages {
                    return Err(WireError::PageCountMismatch {
                        claimed: pages,
                        received: self.seed_pages,
                    });
                }
                self.state = S::Idle;
                Ok(ReplicaMessage::SeedDone(pages))
            }
            (rtag::BEGIN, S::Idle) => self.on_begin(),
            (rtag::PAGES, S::InCheckpoint) => self.on_checkpoint_pages(sink),
            (rtag::STATE, S::InCheckpoint) => self.on_state(),
            (rtag::OUTPUT, S::InCheckpoint) => self.on_output(sink),
            (rtag::END, S::InCheckpoint) => self.on_end(),
            (rtag::HEARTBEAT, S::Seeding | S::Idle) => {
                let mut c = Cursor::new(&self.fr.buf, "Heartbeat payload");
                let (epoch, unix_ns) = (c.u64()?, c.u64()?);
                c.end()?;
                Ok(ReplicaMessage::Heartbeat { epoch, unix_ns })
            }
            (rtag::SHUTDOWN, S::AwaitLayout | S::Seeding | S::Idle | S::InCheckpoint) => {
                let reason = std::str::from_utf8(&self.fr.buf)
                    .map_err(|_| WireError::Malformed {
                        what: "Shutdown reason is not UTF-8",
                    })?
                    .to_owned();
                self.open = None;
                self.state = S::Closed;
                Ok(ReplicaMessage::Shutdown(reason))
            }
            _ => Err(WireError::OutOfOrder {
                message: tag_name(t),
                state: name,
            }),
        }
    }

    fn on_hello(&mut self) -> Result<ReplicaMessage, WireError> {
        let hello = super::decode::hello_payload(&self.fr.buf, REPLICA_VERSION)?;
        self.state = ReplicaState::AwaitLayout;
        Ok(ReplicaMessage::Hello(hello))
    }

    fn on_layout(&mut self) -> Result<ReplicaMessage, WireError> {
        let layout = super::decode::layout_payload(&self.fr.buf, self.limits.max_guest_bytes)?;
        self.layout = Some(layout.clone());
        self.state = ReplicaState::Seeding;
        Ok(ReplicaMessage::Layout(layout))
    }

    /// Validates a whole batch (every address, every length) before its first page reaches
    /// the sink; returns its page count.
    fn on_pages(&mut self, sink: &mut dyn ReplicaSink, seed: bool) -> Result<u32, WireError> {
        let what = "page batch payload";
        let layout = self.layout.as_ref().ok_or(WireError::OutOfOrder {
            message: "Pages",
            state: "before Layout",
        })?;
        let payload = &self.fr.buf;
        let mut c = Cursor::new(payload, what);
        let count = c.u32()?;
        if c.u32()? != 0 || count == 0 || count > MAX_BATCH_PAGES {
            return Err(WireError::Malformed { what });
        }
        for _ in 0..count {
            let word = c.u64()?;
            let gpa = word & !PAGE_FLAG_MASK;
            if word & PAGE_FLAG_MASK & !PAGE_ZERO_FLAG != 0 {
                return Err(WireError::GpaNotAligned { word });
            }
            if layout.locate(gpa).is_none() {
                return Err(WireError::GpaOutsideLayout { gpa });
            }
            if word & PAGE_ZERO_FLAG == 0 {
                c.bytes(PAGE_SIZE as usize)?;
            }
        }
        c.end()?;
        let mut c = Cursor::new(payload, what);
        c.bytes(8)?;
        for _ in 0..count {
            let word = c.u64()?;
            let gpa = word & !PAGE_FLAG_MASK;
            let data = if word & PAGE_ZERO_FLAG != 0 {
                None
            } else {
                Some(c.bytes(PAGE_SIZE as usize)?)
            };
            if seed {
                sink.seed_page(gpa, data);
            } else {
                sink.stage_page(gpa, data);
            }
        }
        Ok(count)
    }

    fn on_begin(&mut self) -> Result<ReplicaMessage, WireError> {
        let what = "Begin payload";
        let mut c = Cursor::new(&self.fr.buf, what);
        let (epoch, pages, bytes, states) = (c.u64()?, c.u64()?, c.u64()?, c.u32()?);
        let output = c.u32()?;
        c.end()?;
        if epoch != self.last_epoch.wrapping_add(1) {
            return Err(WireError::Malformed {
                what: "Begin: epoch is not the one after the last checkpoint",
            });
        }
        let total = self.layout.as_ref().map_or(0, |l| l.total_pages());
        if pages > total || states > MAX_CHECKPOINT_STATES {
            return Err(WireError::Malformed {
                what: "Begin: more pages than guest memory or too many state blobs",
            });
        }
        if output > MAX_CHECKPOINT_OUTPUT || u64::from(output) > bytes {
            return Err(WireError::Malformed {
                what: "Begin: more guest output than a checkpoint may carry",
            });
        }
        let max = self.max_checkpoint();
        if bytes > max {
            return Err(WireError::Oversize {
                tag: rtag::BEGIN,
                len: bytes,
                max,
            });
        }
        let h = CheckpointHeader {
            epoch,
            pages,
            bytes,
            states,
            output,
        };
        self.open = Some(Open {
            h,
            pages: 0,
            bytes: 0,
            states: 0,
            output: 0,
            crc: 0,
        });
        self.state = ReplicaState::InCheckpoint;
        Ok(ReplicaMessage::Begin(h))
    }

    /// Accounts a checkpoint frame's payload against what Begin announced.
    fn account(&mut self, pages: u64, states: u32, output: u64) -> Result<(), WireError> {
        let len = self.fr.buf.len() as u64;
        let o = self.open.as_mut().ok_or(WireError::Malformed {
            what: "checkpoint frame outside a checkpoint",
        })?;
        o.pages += pages;
        o.bytes += len;
        o.states += states;
        o.output += output;
        if o.pages > o.h.pages
            || o.bytes > o.h.bytes
            || o.states > o.h.states
            || o.output > u64::from(o.h.output)
        {
            return Err(WireError::Malformed {
                what: "checkpoint carries more than its Begin announced",
            });
        }
        o.crc = super::crc::append(o.crc, &self.fr.buf);
        Ok(())
    }

    fn on_checkpoint_pages(
        &mut self,
        sink: &mut dyn ReplicaSink,
    ) -> Result<ReplicaMessage, WireError> {
        // Bounds first (the batch's count from its header word), so nothing beyond what
        // Begin announced is staged.
        let mut c = Cursor::new(&self.fr.buf, "page batch payload");
        let count = c.u32()?;
        self.account(u64::from(count), 0, 0)?;
        let n = self.on_pages(sink, false)?;
        Ok(ReplicaMessage::Pages(n))
    }

    fn on_state(&mut self) -> Result<ReplicaMessage, WireError> {
        let mut c = Cursor::new(&self.fr.buf, "State payload");
        let (kind, instance) = (c.u32()?, c.u32()?);
        let data = c.rest().to_vec();
        self.account(0, 1, 0)?;
        Ok(ReplicaMessage::State {
            kind,
            instance,
            data,
        })
    }

    fn on_output(&mut self, sink: &mut dyn ReplicaSink) -> Result<ReplicaMessage, WireError> {
        let n = self.fr.buf.len();
        if n == 0 {
            return Err(WireError::Malformed {
                what: "an empty Output frame",
            });
        }
        self.account(0, 0, n as u64)?;
        sink.stage_output(&self.fr.buf);
        Ok(ReplicaMessage::Output(n as u32))
    }

    fn on_end(&mut self) -> Result<ReplicaMessage, WireError> {
        let what = "End payload";
        let mut c = Cursor::new(&self.fr.buf, what);
        let (epoch, crc) = (c.u64()?, c.u32()?);
        if c.u32()? != 0 {
            return Err(WireError::Malformed { what });
        }
        c.end()?;
        let o = self.open.take().ok_or(WireError::Malformed { what })?;
        if epoch != o.h.epoch {
            return Err(WireError::Malformed {
                what: "End: epoch differs from its Begin",
            });
        }
        if o.pages != o.h.pages
            || o.bytes != o.h.bytes
            || o.states != o.h.states
            || o.output != u64::from(o.h.output)
        {
            return Err(WireError::Malformed {
                what: "End: the checkpoint carried less than its Begin announced",
            });
        }
        if crc != o.crc {
            return Err(WireError::Malformed {
                what: "End: the checkpoint's checksum does not match its contents",
            });
        }
        self.last_epoch = epoch;
        self.state = ReplicaState::Idle;
        Ok(ReplicaMessage::End(o.h))
    }
}

fn tag_name(t: u8) -> &'static str {
    match t {
        rtag::HELLO => "Hello",
        rtag::LAYOUT => "Layout",
        rtag::SEED_PAGES => "SeedPages",
        rtag::SEED_DONE => "SeedDone",
        rtag::BEGIN => "Begin",
        rtag::PAGES => "Pages",
        rtag::STATE => "State",
        rtag::END => "End",
        rtag::HEARTBEAT => "Heartbeat",
        rtag::SHUTDOWN => "Shutdown",
        rtag::OUTPUT => "Output",
        _ => "unknown",
    }
}

/// The standby's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaAck {
    /// The standby's image exists: send the seed.
    Ready,
    /// Checkpoint `epoch` was applied to the standby's image.
    Applied(u64),
    /// The standby failed.
    Error(String),
}

/// Writes the standby's answers.
#[derive(Debug)]
pub struct ReplicaAckWriter<W: Write> {
    fw: FrameWriter<W>,
}

impl<W: Write> ReplicaAckWriter<W> {
    /// An answer writer over `w`.
    pub fn new(w: W) -> Self {
        ReplicaAckWriter {
            fw: FrameWriter::new(w),
        }
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.fw.w
    }

    /// Writes `ack` (the preamble before the first) and flushes.
    pub fn send(&mut self, ack: &ReplicaAck) -> Result<(), WireError> {
        if !self.fw.preamble_sent() {
            self.fw
                .write_preamble_with(&REPLICA_MAGIC, REPLICA_VERSION)?;
        }
        match ack {
            ReplicaAck::Ready => self.fw.start(rtag::READY),
            ReplicaAck::Applied(e) => {
                self.fw.start(rtag::APPLIED);
                self.fw.put_u64(*e);
            }
            ReplicaAck::Error(r) => {
                self.fw.start(rtag::ERROR);
                self.fw.buf.extend_from_slice(cut(r).as_bytes());
            }
        }
        self.fw.finish()?;
        Ok(self.fw.w.flush()?)
    }
}

/// Reads the standby's answers on the primary: Ready first, then Applied for epochs 1, 2,
/// 3, ... in order; Error at any point ends the exchange.
#[derive(Debug)]
pub struct ReplicaAckReader<R: Read> {
    fr: FrameReader<R>,
    preamble_read: bool,
    ready: bool,
    last: u64,
    failed: bool,
}

impl<R: Read> ReplicaAckReader<R> {
    /// An answer reader over `r`.
    pub fn new(r: R) -> Self {
        ReplicaAckReader {
            fr: FrameReader::new(r),
            preamble_read: false,
            ready: false,
            last: 0,
            failed: false,
        }
    }

    /// Reads the next answer.
    pub fn recv(&mut self) -> Result<ReplicaAck, WireError> {
        if self.failed {
            return Err(WireError::Poisoned);
        }
        let r = self.next_inner();
        if !matches!(r, Ok(ReplicaAck::Ready | ReplicaAck::Applied(_))) {
            self.failed = true;
        }
        r
    }

    fn next_inner(&mut self) -> Result<ReplicaAck, WireError> {
        let state = if self.ready {
            "awaiting Applied"
        } else {
            "awaiting Ready"
        };
        if !self.preamble_read {
            self.fr
                .read_preamble_with(&REPLICA_MAGIC, REPLICA_VERSION..=REPLICA_VERSION, state)?;
            self.preamble_read = true;
        }
        let t = self.fr.read_frame(state, |t| match t {
            rtag::READY => Some(0),
            rtag::APPLIED => Some(8),
            rtag::ERROR => Some(MAX_REASON_LEN),
            _ => None,
        })?;
        let mut c = Cursor::new(&self.fr.buf, "replication answer");
        let ack = match (t, self.ready) {
            (rtag::READY, false) => {
                self.ready = true;
                ReplicaAck::Ready
            }
            (rtag::APPLIED, true) => {
                let e = c.u64()?;
                if e != self.last + 1 {
                    return Err(WireError::Malformed {
                        what: "Applied: epoch out of order",
                    });
                }
                self.last = e;
                ReplicaAck::Applied(e)
            }
            (rtag::ERROR, _) => ReplicaAck::Error(
                std::str::from_utf8(c.rest())
                    .map_err(|_| WireError::Malformed {
                        what: "error reason is not UTF-8",
                    })?
                    .to_owned(),
            ),
            _ => {
                return Err(WireError::OutOfOrder {
                    message: "replication answer",
                    state,
                })
            }
        };
        c.end()?;
        Ok(ack)
    }
}
