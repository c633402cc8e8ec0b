//! One migration connection, plain TCP or TLS, split into a reader and a writer.
//!
//! Plain TCP is a bare `TcpStream` in each half: the bytes on the wire are the migration
//! stream itself and the only cost is one branch per (buffered) read or write.
//!
//! TLS: rustls runs the handshake (mutual x509, TLS 1.3 only), then hands over the
//! negotiated traffic keys and sequence numbers and the channel runs the TLS 1.3 record
//! layer itself, one direction per half ([`crate::record`]), as kernel TLS offload does.
//! The halves share nothing but the socket, so the reader and the writer never wait for
//! each other and may live on different threads:
//!
//! - writing: each `write` seals up to [`WRITE_BATCH`] bytes as 16 KiB records in place in
//!   one reused buffer and writes them with one `write_all`, so the next batch is encrypted
//!   while the peer decrypts this one;
//! - reading: ciphertext is read in large chunks into one reused buffer, records are
//!   opened in place there, and the plaintext is handed out from there: copied straight
//!   into the caller's buffer by `read`, or lent by [`BufRead::fill_buf`]. The reader is
//!   its own buffer (on plain TCP too), so a caller needs no `BufReader` on top, which
//!   would cost one more copy of every byte. A socket read that would block waits in
//!   `poll` only when [`ChannelReader::read_before`] has a deadline, so the socket's own
//!   read timeout (which the caller owns) is never changed and costs nothing per read.
//!
//! Neither direction updates its keys: a direction stops with [`RecordError::KeyLimit`]
//! after 2^24 records under AES-GCM (256 GiB; no limit under ChaCha20-Poly1305), and a
//! peer's key update or session ticket is refused. Any malformed, altered, reordered or
//! truncated record is a [`RecordError`] (inside an `io::Error`), and the reader stays failed
//! after it; the end of the stream is the peer's close_notify, a TCP end without it is
//! [`RecordError::NoCloseNotify`].

use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rustls::Connection;

use crate::identity::PeerIdentity;
use crate::record::{
    record_len, Opened, Opener, RecordError, Sealer, CLOSE_NOTIFY, CONTENT_ALERT,
    CONTENT_APPLICATION_DATA, HEADER_LEN, MAX_PLAINTEXT, MAX_RECORD,
};
use crate::{sys, Result, TlsError};

/// Plaintext sealed and written per socket write: large enough to keep syscalls few,
/// small enough that the peer decrypts one batch while the next is encrypted.
pub const WRITE_BATCH: usize = 256 << 10;

/// The reader's ciphertext buffer (room for many records per socket read).
const READ_BUF: usize = 256 << 10;

/// The plain reader's buffer: small reads (frame headers) are served from it; a read at
/// least this large goes from the socket straight into the caller's buffer.
const PLAIN_BUF: usize = 64 << 10;

/// Raw bytes read from the socket at a time during the handshake.
const HANDSHAKE_READ: usize = 16 << 10;

/// One connection, before it is split.
pub struct Channel {
    sock: TcpStream,
    tls: Option<Box<TlsParts>>,
}

/// The record layer's state for both directions, taken over from rustls.
struct TlsParts {
    peer: PeerIdentity,
    /// The peers agreed on [`crate::ALPN_AEAD_INTEGRITY`].
    aead_integrity: bool,
    sealer: Sealer,
    opener: Opener,
    /// Ciphertext read during the handshake after its last record (the peer's first
    /// records, when they arrived with its last handshake flight).
    cipher: Vec<u8>,
    /// Plaintext rustls decrypted during the handshake (none, normally).
    plain: Vec<u8>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("tls", &self.is_tls())
            .field("peer", &self.peer())
            .finish()
    }
}

impl Channel {
    /// A plain TCP channel.
    pub fn plain(sock: TcpStream) -> Channel {
        Channel { sock, tls: None }
    }

    /// Takes a connection whose handshake [`handshake`] completed over from rustls; `cipher`
    /// is what `handshake` read past the handshake's last record.
    pub(crate) fn tls(sock: TcpStream, mut conn: Connection, cipher: Vec<u8>) -> Result<Channel> {
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(PeerIdentity::from_cert)
            .unwrap_or_default();
        let mut plain = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match conn.reader().read(&mut chunk) {
                Ok(0) => return Err(TlsError::HandshakeEof),
                Ok(n) => plain.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        let aead_integrity = conn.alpn_protocol() == Some(crate::ALPN_AEAD_INTEGRITY);
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(TlsError::Handshake)?;
        let sealer = Sealer::new(secrets.tx.0, &secrets.tx.1)?;
        let opener = Opener::new(secrets.rx.0, &secrets.rx.1)?;
        Ok(Channel {
            sock,
            tls: Some(Box::new(TlsParts {
                peer,
                aead_integrity,
                sealer,
                opener,
                cipher,
                plain,
            })),
        })
    }

    /// Whether the channel is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether both peers agreed ([`crate::ALPN_AEAD_INTEGRITY`]) that the stream relies on
    /// the record layer's authentication alone: every byte is checked by the AEAD (an
    /// altered, dropped, replayed or reordered record is a [`RecordError::BadRecordMac`]),
    /// so the protocol on top may drop its own checksums. Always false on plain TCP and with
    /// a peer that predates the capability.
    pub fn aead_integrity(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.aead_integrity)
    }

    /// The verified peer's identity (TLS only).
    pub fn peer(&self) -> Option<&PeerIdentity> {
        self.tls.as_ref().map(|t| &t.peer)
    }

    /// The socket (for timeouts, `TCP_NODELAY`, and `shutdown` to wake a blocked reader).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Splits into a reader and a writer over clones of the socket.
    pub fn split(self) -> io::Result<(ChannelReader, ChannelWriter)> {
        let rsock = self.sock.try_clone()?;
        let Some(t) = self.tls else {
            return Ok((
                ChannelReader {
                    sock: rsock,
                    tls: None,
                    plain: PlainRead::default(),
                },
                ChannelWriter {
                    sock: self.sock,
                    tls: None,
                },
            ));
        };
        let TlsParts {
            sealer,
            opener,
            cipher,
            plain,
            ..
        } = *t;
        Ok((
            ChannelReader {
                sock: rsock,
                tls: Some(Box::new(TlsRead::new(opener, &plain, &cipher))),
                plain: PlainRead::default(),
            },
            ChannelWriter {
                sock: self.sock,
                tls: Some(TlsWrite {
                    sealer,
                    out: Vec::with_capacity(WRITE_BATCH / MAX_PLAINTEXT * MAX_RECORD),
                    unusable: None,
                }),
            },
        ))
    }
}

/// The receiving direction's record layer.
struct TlsRead {
    opener: Opener,
    /// `plain` (decrypted, not yet delivered) lies before `start..end` (ciphertext not yet
    /// opened); the rest is free.
    buf: Vec<u8>,
    plain: (usize, usize),
    start: usize,
    end: usize,
    /// The socket reached its end.
    eof: bool,
    /// The peer's close_notify arrived.
    closed: bool,
    /// A record failed: every later read fails the same way.
    failed: Option<RecordError>,
}

impl TlsRead {
    fn new(opener: Opener, plain: &[u8], cipher: &[u8]) -> TlsRead {
        let mut buf = vec![0u8; READ_BUF.max(plain.len() + cipher.len() + MAX_RECORD)];
        let p = plain.len();
        buf[..p].copy_from_slice(plain);
        buf[p..p + cipher.len()].copy_from_slice(cipher);
        TlsRead {
            opener,
            buf,
            plain: (0, p),
            start: p,
            end: p + cipher.len(),
            eof: false,
            closed: false,
            failed: None,
        }
    }

    /// Opens the next record if it is all in the buffer: `Ok(false)` if it is not.
    fn next_record(&mut self) -> std::result::Result<bool, RecordError> {
        let avail = &mut self.buf[self.start..self.end];
        let Some(header) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(false);
        };
        let len = record_len(header)?;
        let Some(record) = avail.get_mut(..len) else {
            return Ok(false);
        };
        let at = self.start;
        match self.opener.open(record)? {
            Opened::Data(n) => self.plain = (at + HEADER_LEN, at + HEADER_LEN + n),
            Opened::CloseNotify => self.closed = true,
        }
        self.start += len;
        Ok(true)
    }

    /// Reads more ciphertext (only when no plaintext is pending), moving a partial record
    /// to the front first.
    fn fill(&mut self, sock: &TcpStream, deadline: Option<Instant>) -> io::Result<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            self.plain = (0, 0);
        }
        // A partial record is under MAX_RECORD and the buffer over it: never empty.
        let n = raw_read(sock, &mut self.buf[self.end..], deadline)?;
        if n == 0 {
            self.eof = true;
        }
        self.end += n;
        Ok(())
    }

    /// Opens records (reading the socket as needed) until plaintext is pending; returns
    /// its range in `buf`, empty at the peer's close_notify.
    fn fill_buf(
        &mut self,
        sock: &TcpStream,
        deadline: Option<Instant>,
    ) -> io::Result<(usize, usize)> {
        loop {
            if self.plain.0 < self.plain.1 {
                return Ok(self.plain);
            }
            if let Some(e) = &self.failed {
                return Err(e.clone().into());
            }
            if self.closed {
                return Ok((0, 0));
            }
            match self.next_record() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.failed = Some(e);
                    continue;
                }
            }
            if self.eof {
                self.failed = Some(match self.end - self.start {
                    0 => RecordError::NoCloseNotify,
                    partial => RecordError::Truncated(partial),
                });
                continue;
            }
            self.fill(sock, deadline)?;
        }
    }

    /// Copies as much plaintext as `out` holds and is available without waiting; waits
    /// for the socket only when nothing has been copied yet.
    fn read(
        &mut self,
        sock: &TcpStream,
        out: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        let mut n = 0;
        while n < out.len() {
            let (a, b) = self.plain;
            if a < b {
                let k = (b - a).min(out.len() - n);
                out[n..n + k].copy_from_slice(&self.buf[a..a + k]);
                self.plain.0 += k;
                n += k;
                continue;
            }
            if let Some(e) = &self.failed {
                return if n > 0 { Ok(n) } else { Err(e.clone().into()) };
            }
            if self.closed {
                break;
            }
            match self.next_record() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.failed = Some(e);
                    continue;
                }
            }
            if n > 0 {
                break;
            }
            if self.eof {
                self.failed = Some(match self.end - self.start {
                    0 => RecordError::NoCloseNotify,
                    partial => RecordError::Truncated(partial),
                });
                continue;
            }
            self.fill(sock, deadline)?;
        }
        Ok(n)
    }
}

/// One socket read into `buf`. With a deadline: bytes already queued are taken without a
/// wait, else it waits in `poll` at most until the deadline (`TimedOut` once it has
/// passed). Without one: a blocking read that honours the socket's read timeout.
fn raw_read(sock: &TcpStream, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
    let Some(deadline) = deadline else {
        if let Some(n) = sys::recv_nowait(sock, buf)? {
            return Ok(n);
        }
        return (&*sock).read(buf);
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if let Some(n) = sys::recv_nowait(sock, buf)? {
            return Ok(n);
        }
        if !sys::wait_readable(sock, left)? {
            return Err(io::ErrorKind::TimedOut.into());
        }
    }
}

/// The plain direction's read buffer: `buf[pos..end]` is read and not yet delivered.
#[derive(Default)]
struct PlainRead {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl PlainRead {
    /// Reads the socket into the empty buffer (allocated on first use).
    fn fill(&mut self, sock: &TcpStream, deadline: Option<Instant>) -> io::Result<()> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; PLAIN_BUF];
        }
        let n = raw_read(sock, &mut self.buf, deadline)?;
        self.pos = 0;
        self.end = n;
        Ok(())
    }

    fn read(
        &mut self,
        sock: &TcpStream,
        out: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        if self.pos == self.end {
            // A large read skips the buffer: the socket writes into the caller's memory.
            if out.len() >= PLAIN_BUF {
                return raw_read(sock, out, deadline);
            }
            self.fill(sock, deadline)?;
        }
        let k = (self.end - self.pos).min(out.len());
        out[..k].copy_from_slice(&self.buf[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k)
    }
}

/// The reading half (`Read`, and `BufRead` over its own buffer: no `BufReader` needed on
/// top).
pub struct ChannelReader {
    sock: TcpStream,
    tls: Option<Box<TlsRead>>,
    plain: PlainRead,
}

impl std::fmt::Debug for ChannelReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelReader")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ChannelReader {
    /// The socket under this half.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Reads like [`Read::read`], but no blocking socket read waits past `deadline`
    /// (`TimedOut` once it has passed); bytes already buffered are returned without a
    /// wait. Both kinds wait in `poll` and leave the socket's read timeout alone.
    pub fn read_before(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        match self.tls.as_mut() {
            Some(t) => t.read(&self.sock, buf, Some(deadline)),
            None => self.plain.read(&self.sock, buf, Some(deadline)),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.as_mut() {
            Some(t) => t.read(&self.sock, buf, None),
            None => self.plain.read(&self.sock, buf, None),
        }
    }
}

impl BufRead for ChannelReader {
    /// TLS: the plaintext of the record being read, opened in place in the record buffer
    /// (no copy); plain: the read buffer.
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        match self.tls.as_mut() {
            Some(t) => {
                let (a, b) = t.fill_buf(&self.sock, None)?;
                Ok(&t.buf[a..b])
            }
            None => {
                let p = &mut self.plain;
                if p.pos == p.end {
                    p.fill(&self.sock, None)?;
                }
                Ok(&p.buf[p.pos..p.end])
            }
        }
    }

    fn consume(&mut self, amt: usize) {
        match self.tls.as_mut() {
            Some(t) => t.plain.0 = (t.plain.0 + amt).min(t.plain.1),
            None => self.plain.pos = (self.plain.pos + amt).min(self.plain.end),
        }
    }
}

/// The sending direction's record layer.
struct TlsWrite {
    sealer: Sealer,
    /// Sealed records of one batch (reused).
    out: Vec<u8>,
    /// Why nothing more may be sent (closed, or a failed write left a record cut off).
    unusable: Option<&'static str>,
}

impl TlsWrite {
    /// Seals `plain` as records of inner type `content_type` and writes them whole.
    fn send(&mut self, sock: &TcpStream, content_type: u8, plain: &[u8]) -> io::Result<()> {
        if let Some(why) = self.unusable {
            return Err(RecordError::Unusable(why).into());
        }
        self.out.clear();
        for chunk in plain.chunks(MAX_PLAINTEXT) {
            if let Err(e) = self.sealer.seal(content_type, chunk, &mut self.out) {
                self.unusable = Some("failed (a record could not be sealed)");
                return Err(e.into());
            }
        }
        let r = (&*sock).write_all(&self.out);
        if r.is_err() {
            self.unusable = Some("broken (a failed write may have cut a record off)");
        }
        r
    }
}

/// The writing half (`Write`).
pub struct ChannelWriter {
    sock: TcpStream,
    tls: Option<TlsWrite>,
}

impl std::fmt::Debug for ChannelWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelWriter")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ChannelWriter {
    /// The socket under this half.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// TLS: sends `close_notify` (best effort), after which every write fails; plain:
    /// nothing.
    pub fn close_notify(&mut self) {
        if let Some(t) = self.tls.as_mut() {
            if t.unusable.is_none() {
                let _ = t.send(&self.sock, CONTENT_ALERT, &CLOSE_NOTIFY);
                t.unusable = Some("closed (close_notify sent)");
            }
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.tls.as_mut() {
            None => self.sock.write(buf),
            Some(_) if buf.is_empty() => Ok(0),
            Some(t) => {
                let n = buf.len().min(WRITE_BATCH);
                t.send(&self.sock, CONTENT_APPLICATION_DATA, &buf[..n])?;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.tls {
            None => self.sock.flush(),
            // Every write already went out whole.
            Some(_) => Ok(()),
        }
    }
}

/// Runs a handshake on `sock` to its end (the last flight written), within `timeout`. A
/// rustls error is sent to the peer as an alert (best effort) before it is returned. The
/// socket's timeouts are left set to what is left of `timeout`: the caller sets its own.
///
/// rustls never gets a byte past the end of the record it is reading, and nothing after
/// the record that completes the handshake: what the peer sent after it (its first records
/// under the traffic keys) is returned, for the record layer to open. (Within a record bytes
/// go to rustls as they arrive, so a header it refuses fails at once.)
pub(crate) fn handshake(
    conn: &mut Connection,
    sock: &TcpStream,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut s = sock;
    sock.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    // `pending` starts at the record being read; rustls has its first `fed` bytes.
    let mut pending = Vec::new();
    let mut fed = 0;
    let mut chunk = vec![0u8; HANDSHAKE_READ];
    loop {
        while conn.wants_write() {
            match conn.write_tls(&mut s) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(TlsError::HandshakeTimeout(timeout)),
                Err(e) => return Err(e.into()),
            }
        }
        if !conn.is_handshaking() {
            pending.drain(..fed);
            return Ok(pending);
        }
        let end = record_end(&pending);
        let avail = end.min(pending.len());
        if fed < avail {
            let mut part = &pending[fed..avail];
            while !part.is_empty() {
                if conn.read_tls(&mut part)? == 0 {
                    return Err(TlsError::Io(io::ErrorKind::InvalidData.into()));
                }
                if let Err(e) = conn.process_new_packets() {
                    let _ = conn.write_tls(&mut s);
                    return Err(TlsError::Handshake(e));
                }
            }
            fed = avail;
            if fed == end {
                pending.drain(..end);
                fed = 0;
            }
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::HandshakeTimeout(timeout));
        }
        sock.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => return Err(TlsError::HandshakeEof),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => return Err(TlsError::HandshakeTimeout(timeout)),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Where the record at the front of `bytes` ends (unknown until its header is there: any
/// record type and length, rustls judges them; the length field bounds it to 64 KiB + 5).
fn record_end(bytes: &[u8]) -> usize {
    match bytes.first_chunk::<HEADER_LEN>() {
        Some(h) => HEADER_LEN + usize::from(u16::from_be_bytes([h[3], h[4]])),
        None => usize::MAX,
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
