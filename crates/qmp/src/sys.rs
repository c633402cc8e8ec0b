//! The crate's only `unsafe`: what std's unix sockets cannot do.
//!
//! - [`bind_owner_only`]: `socket` + `bind` + `chmod 0600` + `listen`. std's
//!   `UnixListener::bind` binds and listens in one call, so the socket would accept
//!   connections with the umask's mode before a `chmod` could restrict it; `fchmod` on a
//!   socket fd changes the sockfs inode, not the file, and `umask` is process-wide.
//! - [`connect_with_deadline`]: a non-blocking `connect`; a blocking one to a server that
//!   stopped accepting (full backlog) never returns.
//! - [`shutdown_listener`]: `shutdown(2)` on the listening socket, which wakes a blocked
//!   `accept` on Linux so the accept thread can be joined.
//! - [`peer_uid`]: `getsockopt(SO_PEERCRED)` (std's `peer_cred` is unstable).
//! - [`write_all_nosignal`]: `send(MSG_NOSIGNAL)`, so a peer that hung up makes a write
//!   fail with `EPIPE` instead of killing a process whose SIGPIPE is not ignored (Rust
//!   binaries ignore it by default, a C host embedding this need not).

use std::ffi::OsStr;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// Backlog of the listening socket; clients beyond `max_clients` are refused after accept.
const BACKLOG: libc::c_int = 16;
/// Pause between connect attempts while the server's backlog is full.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

/// `sockaddr_un` for `path`, or `InvalidInput` if it has a NUL byte or does not fit.
fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = OsStr::as_bytes(path.as_os_str());
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    // One byte stays 0 as the terminator.
    if bytes.is_empty() || bytes.contains(&0) || bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path is empty, contains NUL or is too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // `len` <= size_of::<sockaddr_un>() (checked above), far below socklen_t::MAX.
    Ok((addr, len as libc::socklen_t))
}

fn new_socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates a listening unix socket at `path` with mode 0600 whatever the umask. The path
/// must not exist.
pub(crate) fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    let (addr, len) = sockaddr(path)?;
    let fd = new_socket(0)?;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes that outlives the call;
    // `fd` is an open socket.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // Not listening yet: nobody can connect while the mode is still the umask's.
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: `fd` is an open, bound socket; listen(2) takes no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// Connects to `path`, retrying while the server's backlog is full, until `deadline`.
pub(crate) fn connect_with_deadline(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    let (addr, len) = sockaddr(path)?;
    let fd = new_socket(libc::SOCK_NONBLOCK)?;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes that outlives the
        // call; `fd` is an open socket.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // AF_UNIX answers EAGAIN (not EINPROGRESS) when the backlog is full.
            Some(libc::EAGAIN) if Instant::now() < deadline => thread::sleep(CONNECT_RETRY),
            Some(libc::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "server does not accept",
                ))
            }
            _ => return Err(e),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Wakes a thread blocked in `accept` on `listener` (it then fails with `EINVAL`).
pub(crate) fn shutdown_listener(listener: &UnixListener) {
    // SAFETY: the fd is open for the lifetime of `listener`; shutdown(2) takes no pointers.
    // A failure leaves the accept thread blocked, which the caller's stop flag and a
    // wake-up connection cover.
    unsafe {
        libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// Writes all of `buf` to `stream` without raising SIGPIPE. The socket's write timeout
/// applies: a send that times out fails with `WouldBlock`.
pub(crate) fn write_all_nosignal(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid readable slice of `buf.len()` bytes for the call; the fd
        // is open for the lifetime of `stream`.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // 0 < n <= buf.len(), as send(2) guarantees.
        buf = buf.get(n as usize..).unwrap_or_default();
    }
    Ok(())
}

/// The uid of the process at the other end of a connected unix socket, as the kernel
/// recorded it when that process connected (`SO_PEERCRED`).
pub(crate) fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    // SAFETY: ucred is plain old data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of `len` bytes and outlive the call;
    // the fd is open for the lifetime of `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != mem::size_of::<libc::ucred>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_PEERCRED returned a short ucred",
        ));
    }
    Ok(cred.uid)
}

/// This process's effective uid (the owner of the sockets it creates).
pub(crate) fn own_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_and_nul_paths_are_invalid_input() {
        let long = "/tmp/".to_string() + &"x".repeat(200);
        assert_eq!(
            sockaddr(Path::new(&long)).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            sockaddr(Path::new("/tmp/a\0b")).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(sockaddr(Path::new("/tmp/ok.sock")).is_ok());
    }
}
