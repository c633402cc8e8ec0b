//! The two socket calls std does not offer: a read that never blocks (without switching the
//! shared socket to non-blocking, which would change the writer's half too) and a wait for
//! readable bytes with a timeout (without changing the socket's `SO_RCVTIMEO`, which the
//! caller owns).

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Reads what is already in the socket's receive queue: `Ok(None)` if it is empty,
/// `Ok(Some(0))` at the peer's end of stream.
pub(crate) fn recv_nowait(sock: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes for the whole call and
        // the file descriptor is owned by `sock`, which outlives the call.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            // Non-negative and at most buf.len(): fits usize.
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Waits until the socket has bytes to read (or its end, or an error) or `timeout` passes;
/// false if it passed.
pub(crate) fn wait_readable(sock: &TcpStream, timeout: Duration) -> io::Result<bool> {
    // Rounded up, so a wait never ends before the deadline it was computed from.
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd on the stack for the duration of the call, and the
    // count passed is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            // A signal: the caller checks its deadline and waits again.
            io::ErrorKind::Interrupted => Ok(true),
            _ => Err(e),
        };
    }
    Ok(n > 0)
}
