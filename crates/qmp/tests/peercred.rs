//! SO_PEERCRED: a client of another user is refused after accept even when the socket's
//! mode would let it connect; the VM's own user (and root) are served.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Raw, TestDir};
use qmp::server::peer_allowed;
use qmp::{QmpServer, ServerConfig};
use serde_json::json;

/// nobody's uid on Debian-family systems.
const NOBODY: u32 = 65534;

#[test]
fn the_peer_decision_admits_the_same_user_and_root_only() {
    assert!(peer_allowed(1000, 1000));
    assert!(peer_allowed(0, 1000), "root may always connect");
    assert!(peer_allowed(0, 0));
    assert!(!peer_allowed(1001, 1000));
    assert!(!peer_allowed(NOBODY, 0));
    assert!(!peer_allowed(NOBODY, 1000));
}

#[test]
fn a_client_of_this_user_is_served() {
    let dir = TestDir::new("peer-same");
    let _s = QmpServer::bind(dir.sock(), common::handler(), ServerConfig::default()).unwrap();
    let mut c = Raw::negotiated(&dir.sock());
    assert_eq!(
        c.call(json!({"execute": "echo", "id": 1})),
        json!({"return": {}, "id": 1})
    );
}

mod sys {
    //! fork + setuid + connect + read in the child, with nothing that allocates or locks
    //! after the fork (the test process has other threads).
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// What the child saw: 0 the denial naming its uid, 1 a greeting (served), 2 setuid
    /// failed, 3 connect failed, 4 anything else.
    pub fn connect_as(uid: u32, path: &Path, needle: &[u8]) -> i32 {
        // SAFETY: sockaddr_un is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let p = path.as_os_str().as_bytes();
        assert!(p.len() < addr.sun_path.len());
        for (d, &s) in addr.sun_path.iter_mut().zip(p) {
            *d = s as libc::c_char;
        }
        // SAFETY: fork in a multithreaded process; the child below only makes system calls
        // on stack data and calls _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: child side: async-signal-safe calls on stack buffers only.
            unsafe {
                if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                    libc::_exit(2);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if fd < 0 || libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0
                {
                    libc::_exit(3);
                }
                let mut buf = [0u8; 1024];
                let mut n = 0usize;
                loop {
                    let r = libc::read(fd, buf.as_mut_ptr().add(n).cast(), buf.len() - n);
                    if r <= 0 {
                        break;
                    }
                    n += r as usize;
                    if n == buf.len() {
                        break;
                    }
                }
                let got = &buf[..n];
                let has = |w: &[u8]| got.windows(w.len()).any(|x| x == w);
                libc::_exit(if has(needle) {
                    0
                } else if has(b"\"QMP\"") {
                    1
                } else {
                    4
                });
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        }
    }

    pub fn euid() -> u32 {
        // SAFETY: geteuid takes no arguments and cannot fail.
        unsafe { libc::geteuid() }
    }
}

#[test]
fn a_client_of_another_user_is_refused_even_through_a_world_writable_socket() {
    if sys::euid() != 0 {
        eprintln!(
            "SKIP(root): not root; cannot connect as another user (the decision is tested above)"
        );
        return;
    }
    let dir = TestDir::new("peer-other");
    let _s = QmpServer::bind(dir.sock(), common::handler(), ServerConfig::default()).unwrap();
    // Loosen what the mode would stop, so that only SO_PEERCRED stands in the way.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.sock(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let needle = format!("QMP access denied: uid {NOBODY}");
    assert_eq!(
        sys::connect_as(NOBODY, &dir.sock(), needle.as_bytes()),
        0,
        "the nobody client must be told it is denied (1: it was greeted)"
    );
    // The server still serves its own user afterwards.
    let mut c = Raw::negotiated(&dir.sock());
    assert_eq!(c.call(json!({"execute": "echo"})), json!({"return": {}}));
}
