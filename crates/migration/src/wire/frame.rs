//! Framing shared by both directions: preamble, fixed header, CRC-32C, bounded payloads.
//!
//! Header layout (little endian):
//! `tag u8 | flags u8 (0) | reserved u16 (0) | seq u32 | len u32 | crc32c u32`;
//! the CRC covers the first 12 header bytes and then the payload. On a stream whose every
//! byte is authenticated underneath (a TLS channel whose peers agreed on it, see
//! `docs/migration-protocol.md`) both ends turn the CRC off: it is sent as 0 and a non-zero
//! one is refused.

use std::io::{self, Read, Write};

use super::{WireError, HEADER_LEN, MAGIC, MIN_PROTOCOL_VERSION, PREAMBLE_LEN, PROTOCOL_VERSION};

/// A frame under construction: a byte vector whose storage is never shrunk between frames,
/// so space handed out by [`FrameBuf::grow_stale`] is not zeroed again for every page (the
/// source fills it from guest memory at once). Derefs to the frame's bytes.
#[derive(Debug, Default)]
pub(crate) struct FrameBuf {
    /// Storage; only `v[..len]` is the frame.
    v: Vec<u8>,
    len: usize,
}

impl FrameBuf {
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b]);
    }

    pub(crate) fn extend_from_slice(&mut self, data: &[u8]) {
        let end = self.len + data.len();
        if self.v.len() < end {
            self.v.truncate(self.len);
            self.v.extend_from_slice(data);
        } else {
            self.v[self.len..end].copy_from_slice(data);
        }
        self.len = end;
    }

    /// Appends `n` bytes whose contents are unspecified (stale bytes of earlier frames, or
    /// zeros) and returns them; the caller overwrites all of them or truncates them away.
    pub(crate) fn grow_stale(&mut self, n: usize) -> &mut [u8] {
        let start = self.len;
        let end = start + n;
        if self.v.len() < end {
            self.v.resize(end, 0);
        }
        self.len = end;
        &mut self.v[start..end]
    }
}

impl std::ops::Deref for FrameBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v[..self.len]
    }
}

impl std::ops::DerefMut for FrameBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v[..self.len]
    }
}

/// Builds frames in one reusable buffer and writes each with a single `write_all`.
#[derive(Debug)]
pub(crate) struct FrameWriter<W> {
    pub(crate) w: W,
    pub(crate) buf: FrameBuf,
    seq: u32,
    pub(crate) bytes: u64,
    pub(crate) frames: u64,
    preamble_sent: bool,
    /// Payload bytes `fold_start..fold_end` of the frame being built are already in
    /// `fold_crc` (checksummed while they were hot in cache; see [`FrameWriter::fold`]).
    fold_start: usize,
    fold_end: usize,
    fold_crc: u32,
    /// Frames carry a CRC-32C (false: the field is 0, nothing is checksummed).
    pub(crate) crc: bool,
}

impl<W: Write> FrameWriter<W> {
    pub(crate) fn new(w: W) -> Self {
        FrameWriter {
            w,
            buf: FrameBuf::default(),
            seq: 0,
            bytes: 0,
            frames: 0,
            preamble_sent: false,
            fold_start: HEADER_LEN,
            fold_end: HEADER_LEN,
            fold_crc: 0,
            crc: true,
        }
    }

    pub(crate) fn write_preamble(&mut self, version: u32) -> Result<(), WireError> {
        self.write_preamble_with(&MAGIC, version)
    }

    /// Writes a preamble with another protocol's magic (the replication stream's).
    pub(crate) fn write_preamble_with(
        &mut self,
        magic: &[u8; 8],
        version: u32,
    ) -> Result<(), WireError> {
        if self.preamble_sent {
            return Err(WireError::OutOfOrder {
                message: "preamble",
                state: "stream already opened",
            });
        }
        let mut p = [0u8; PREAMBLE_LEN];
        p[..8].copy_from_slice(magic);
        p[8..12].copy_from_slice(&version.to_le_bytes());
        self.w.write_all(&p)?;
        self.bytes += PREAMBLE_LEN as u64;
        self.preamble_sent = true;
        Ok(())
    }

    pub(crate) fn preamble_sent(&self) -> bool {
        self.preamble_sent
    }

    /// Clears the buffer and reserves the header for a frame of type `tag`.
    pub(crate) fn start(&mut self, tag: u8) {
        self.buf.clear();
        self.buf.push(tag);
        self.buf.extend_from_slice(&[0u8; HEADER_LEN - 1]);
        self.fold_start = HEADER_LEN;
        self.fold_end = HEADER_LEN;
        self.fold_crc = 0;
    }

    /// Checksums the bytes appended since the last fold now, while they are in cache, instead
    /// of in one pass over the whole frame in [`FrameWriter::finish`]. `from` is where the
    /// final bytes begin (bytes before it, such as a batch's count that is patched later,
    /// are checksummed at the finish); every later fold must continue where this one ended,
    /// and folded bytes must not change.
    pub(crate) fn fold(&mut self, from: usize) {
        if !self.crc {
            return;
        }
        if self.fold_end == self.fold_start {
            self.fold_start = from.clamp(HEADER_LEN, self.buf.len());
            self.fold_end = self.fold_start;
        }
        self.fold_crc = super::crc::append(self.fold_crc, &self.buf[self.fold_end..]);
        self.fold_end = self.buf.len();
    }

    /// The frame's CRC-32C: the first 12 header bytes, then the payload, with the folded
    /// stretch combined in rather than read again.
    fn crc(&self) -> u32 {
        let mut crc = super::crc::crc32c(&self.buf[..12]);
        crc = super::crc::append(crc, &self.buf[HEADER_LEN..self.fold_start]);
        crc = super::crc::combine(crc, self.fold_crc, (self.fold_end - self.fold_start) as u64);
        super::crc::append(crc, &self.buf[self.fold_end..])
    }

    /// Fills in the header of the frame in the buffer and writes it.
    pub(crate) fn finish(&mut self) -> Result<(), WireError> {
        let len = u32::try_from(self.buf.len() - HEADER_LEN).map_err(|_| WireError::Malformed {
            what: "frame longer than 4 GiB",
        })?;
        self.buf[4..8].copy_from_slice(&self.seq.to_le_bytes());
        self.buf[8..12].copy_from_slice(&len.to_le_bytes());
        let crc = if self.crc { self.crc() } else { 0 };
        self.buf[12..16].copy_from_slice(&crc.to_le_bytes());
        self.w.write_all(&self.buf)?;
        self.seq = self.seq.wrapping_add(1);
        self.bytes += self.buf.len() as u64;
        self.frames += 1;
        Ok(())
    }

    pub(crate) fn put_u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Writes a Layout payload: region count, a zero word, then slot, zero, address and
    /// size per region.
    pub(crate) fn put_layout(&mut self, layout: &super::MemoryLayout) {
        self.put_u32(layout.regions().len() as u32);
        self.put_u32(0);
        for r in layout.regions() {
            self.put_u32(r.slot);
            self.put_u32(0);
            self.put_u64(r.guest_phys_addr);
            self.put_u64(r.size);
        }
    }

    pub(crate) fn put_u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// Reads `buf.len()` bytes unless the stream ends first; returns how many were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads frames into one reusable buffer, checking bounds, checksum and sequence.
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    pub(crate) r: R,
    pub(crate) buf: Vec<u8>,
    seq: u32,
    pub(crate) bytes: u64,
    pub(crate) frames: u64,
    /// Frames carry a CRC-32C to check (false: the field must be 0).
    pub(crate) crc: bool,
}

impl<R: Read> FrameReader<R> {
    pub(crate) fn new(r: R) -> Self {
        FrameReader {
            r,
            buf: Vec::new(),
            seq: 0,
            bytes: 0,
            frames: 0,
            crc: true,
        }
    }

    /// Reads and checks the preamble; returns the peer's version.
    pub(crate) fn read_preamble(&mut self, state: &'static str) -> Result<u32, WireError> {
        self.read_preamble_with(&MAGIC, MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION, state)
    }

    /// Reads and checks a preamble with another protocol's magic and versions.
    pub(crate) fn read_preamble_with(
        &mut self,
        magic: &[u8; 8],
        versions: std::ops::RangeInclusive<u32>,
        state: &'static str,
    ) -> Result<u32, WireError> {
        let mut p = [0u8; PREAMBLE_LEN];
        let got = read_full(&mut self.r, &mut p)?;
        if got == 0 {
            return Err(WireError::Closed { state });
        }
        // Check the magic on whatever arrived, so a short foreign stream says "bad magic".
        let m = got.min(8);
        if p[..m] != magic[..m] {
            let mut found = [0u8; 8];
            found[..m].copy_from_slice(&p[..m]);
            return Err(WireError::BadMagic { found });
        }
        if got < PREAMBLE_LEN {
            return Err(WireError::Truncated {
                what: "preamble",
                needed: PREAMBLE_LEN,
                got,
            });
        }
        self.bytes += PREAMBLE_LEN as u64;
        let version = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
        if !versions.contains(&version) {
            return Err(WireError::VersionMismatch {
                found: version,
                min: *versions.start(),
                max: *versions.end(),
            });
        }
        if p[12..16] != [0u8; 4] {
            return Err(WireError::Malformed {
                what: "preamble: reserved bytes are not zero",
            });
        }
        Ok(version)
    }

    /// Reads one frame; `max_len(tag)` gives the payload limit or `None` for an unknown
    /// tag. On success the payload is in `self.buf` and the tag is returned.
    pub(crate) fn read_frame(
        &mut self,
        state: &'static str,
        max_len: impl Fn(u8) -> Option<usize>,
    ) -> Result<u8, WireError> {
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(&mut self.r, &mut h)?;
        if got == 0 {
            return Err(WireError::Closed { state });
        }
        if got < HEADER_LEN {
            return Err(WireError::Truncated {
                what: "frame header",
                needed: HEADER_LEN,
                got,
            });
        }
        let tag = h[0];
        let seq = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let max = max_len(tag).ok_or(WireError::UnknownTag(tag))?;
        if len > max {
            return Err(WireError::Oversize {
                tag,
                len: len as u64,
                max: max as u64,
            });
        }
        // The buffer only grows up to the largest per-tag limit, then is reused.
        self.buf.resize(len, 0);
        let got = read_full(&mut self.r, &mut self.buf)?;
        if got < len {
            return Err(WireError::Truncated {
                what: "frame payload",
                needed: len,
                got,
            });
        }
        let found = if self.crc {
            super::crc::append(super::crc::crc32c(&h[..12]), &self.buf)
        } else {
            // No checksum on this stream: a sender that put one there disagrees about what
            // was negotiated.
            0
        };
        if found != crc {
            return Err(WireError::ChecksumMismatch {
                seq,
                tag,
                expected: crc,
                found,
            });
        }
        if seq != self.seq {
            return Err(WireError::SequenceGap {
                expected: self.seq,
                found: seq,
            });
        }
        if h[1] != 0 || h[2] != 0 || h[3] != 0 {
            return Err(WireError::Malformed {
                what: "frame header: flags or reserved bytes are not zero",
            });
        }
        self.seq = self.seq.wrapping_add(1);
        self.bytes += (HEADER_LEN + len) as u64;
        self.frames += 1;
        Ok(tag)
    }
}

/// Bounds-checked little-endian reader over a payload.
pub(crate) struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(b: &'a [u8], what: &'static str) -> Self {
        Cursor { b, pos: 0, what }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(WireError::Malformed { what: self.what })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        let s = self.bytes(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        let s = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.pos..];
        self.pos = self.b.len();
        s
    }

    pub(crate) fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }

    /// Fails unless the whole payload was consumed.
    pub(crate) fn end(&self) -> Result<(), WireError> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(WireError::Malformed { what: self.what })
        }
    }
}
