//! One migration connection, plain TCP or TLS, split into a reader and a writer.
//!
//! Plain TCP is a bare `TcpStream` in each half: the bytes on the wire are the migration
//! stream itself and the only cost is one branch per (buffered) read or write.
//!
//! TLS: a rustls connection is one state machine for both directions and cannot be cloned,
//! yet the engine reads and writes through separate halves (the reader may even sit on
//! another thread than the writer). Both halves share the connection behind a mutex and
//! each keeps its own clone of the socket; **no blocking socket I/O ever happens while the
//! connection is locked**, so a writer blocked on a full socket never stalls the reader
//! (and the reader waiting for bytes never stalls the writer):
//!
//! - reading: raw bytes are read from the socket outside the lock, then fed to
//!   `read_tls` + `process_new_packets` under it, and plaintext is taken with `reader()`;
//! - writing: under a write mutex (which orders records on the wire), the plaintext is
//!   encrypted and drained with `write_tls` into a buffer under the connection lock, and
//!   that buffer is written to the socket after the connection lock is released. Records
//!   the reader side produces (alerts, key-update answers) go out the same way.
//!
//! Socket timeouts apply as on plain TCP: each raw read honours the socket's read timeout,
//! and [`ChannelReader::read_before`] bounds a whole read by a deadline (a peer trickling
//! partial TLS records cannot stretch it).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::Connection;

use crate::identity::PeerIdentity;
use crate::{Result, TlsError};

/// Raw bytes read from the socket at a time (a TLS record is at most ~16 KiB).
const RAW_CHUNK: usize = 32 << 10;

/// One connection, before it is split.
pub struct Channel {
    sock: TcpStream,
    tls: Option<(Connection, PeerIdentity)>,
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

    pub(crate) fn tls(sock: TcpStream, mut conn: Connection) -> Result<Channel> {
        // Each write is drained right away, so the buffer holds at most one write's records;
        // without a limit a 1 MiB write is encrypted in one call instead of 16.
        conn.set_buffer_limit(None);
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(PeerIdentity::from_cert)
            .unwrap_or_default();
        Ok(Channel {
            sock,
            tls: Some((conn, peer)),
        })
    }

    /// Whether the channel is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The verified peer's identity (TLS only).
    pub fn peer(&self) -> Option<&PeerIdentity> {
        self.tls.as_ref().map(|(_, p)| p)
    }

    /// The socket (for timeouts, `TCP_NODELAY`, and `shutdown` to wake a blocked reader).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Splits into a reader and a writer over clones of the socket.
    pub fn split(self) -> io::Result<(ChannelReader, ChannelWriter)> {
        let rsock = self.sock.try_clone()?;
        match self.tls {
            None => Ok((
                ChannelReader {
                    sock: rsock,
                    tls: None,
                },
                ChannelWriter {
                    sock: self.sock,
                    tls: None,
                },
            )),
            Some((conn, _)) => {
                let shared = Arc::new(Shared {
                    conn: Mutex::new(conn),
                    out: Mutex::new(Vec::new()),
                });
                Ok((
                    ChannelReader {
                        sock: rsock,
                        tls: Some(TlsRead {
                            shared: shared.clone(),
                            raw: vec![0; RAW_CHUNK],
                            pos: 0,
                            end: 0,
                            eof: false,
                        }),
                    },
                    ChannelWriter {
                        sock: self.sock,
                        tls: Some(shared),
                    },
                ))
            }
        }
    }
}

/// The rustls connection both halves share, and the ciphertext waiting to go out.
struct Shared {
    conn: Mutex<Connection>,
    /// Held for the whole of draining and writing, so records reach the socket in the order
    /// rustls made them.
    out: Mutex<Vec<u8>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic under the lock leaves a connection that errors on its next use: still safe.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Shared {
    /// Encrypts `plain` (if any) and writes every pending record to `sock`; the socket write
    /// happens with only the write mutex held.
    fn send(&self, sock: &TcpStream, plain: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.out);
        let n = {
            let mut c = lock(&self.conn);
            let n = if plain.is_empty() {
                0
            } else {
                c.writer().write(plain)?
            };
            while c.wants_write() {
                c.write_tls(&mut *out)?;
            }
            n
        };
        let r = (&*sock).write_all(&out);
        out.clear();
        r.map(|()| n)
    }
}

struct TlsRead {
    shared: Arc<Shared>,
    /// Ciphertext read from the socket; `pos..end` not yet given to rustls.
    raw: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
}

/// The reading half (`Read`).
pub struct ChannelReader {
    sock: TcpStream,
    tls: Option<TlsRead>,
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
    /// (`TimedOut` once it has passed). The socket's read timeout is changed to fit.
    pub fn read_before(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        self.read_inner(buf, Some(deadline))
    }

    fn read_inner(&mut self, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
        let set_timeout = |sock: &TcpStream| -> io::Result<()> {
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                sock.set_read_timeout(Some(left))?;
            }
            Ok(())
        };
        // A socket read timeout shows as WouldBlock on Linux: under a deadline it is TimedOut.
        let raw_read = |sock: &mut TcpStream, buf: &mut [u8]| -> io::Result<usize> {
            set_timeout(sock)?;
            match sock.read(buf) {
                Err(e) if deadline.is_some() && is_timeout(&e) => {
                    Err(io::ErrorKind::TimedOut.into())
                }
                r => r,
            }
        };
        let Some(t) = self.tls.as_mut() else {
            return raw_read(&mut self.sock, buf);
        };
        loop {
            match lock(&t.shared.conn).reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if t.pos == t.end && !t.eof {
                let n = raw_read(&mut self.sock, &mut t.raw)?;
                (t.pos, t.end, t.eof) = (0, n, n == 0);
            }
            let (state, wants_write) = {
                let mut c = lock(&t.shared.conn);
                let mut rd = &t.raw[t.pos..t.end];
                let k = c.read_tls(&mut rd)?;
                t.pos += k;
                let state = c.process_new_packets();
                (state, c.wants_write())
            };
            if wants_write {
                // An alert after an error, or an answer the peer asked for: best effort
                // when the connection is already failing.
                let sent = t.shared.send(&self.sock, &[]);
                if state.is_ok() {
                    sent?;
                }
            }
            state.map_err(tls_err)?;
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf, None)
    }
}

/// The writing half (`Write`).
pub struct ChannelWriter {
    sock: TcpStream,
    tls: Option<Arc<Shared>>,
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

    /// TLS: sends `close_notify` (best effort); plain: nothing.
    pub fn close_notify(&mut self) {
        if let Some(s) = &self.tls {
            lock(&s.conn).send_close_notify();
            let _ = s.send(&self.sock, &[]);
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.tls {
            None => self.sock.write(buf),
            Some(_) if buf.is_empty() => Ok(0),
            Some(s) => match s.send(&self.sock, buf)? {
                0 => Err(io::ErrorKind::WriteZero.into()),
                n => Ok(n),
            },
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
pub(crate) fn handshake(conn: &mut Connection, sock: &TcpStream, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut s = sock;
    sock.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    loop {
        while conn.wants_write() {
            match conn.write_tls(&mut s) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(TlsError::HandshakeTimeout(timeout)),
                Err(e) => return Err(e.into()),
            }
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::HandshakeTimeout(timeout));
        }
        sock.set_read_timeout(Some(left))?;
        match conn.read_tls(&mut s) {
            Ok(0) => return Err(TlsError::HandshakeEof),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Err(TlsError::HandshakeTimeout(timeout)),
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = conn.process_new_packets() {
            let _ = conn.write_tls(&mut s);
            return Err(TlsError::Handshake(e));
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
