//! From each thread kind, calls the kind must never make are refused with EPERM (and
//! counted by the SIGSYS handler on that thread), while what the kind needs still works.
//! Runs in enforce mode (the default); `RINGVISOR_SECCOMP=off` would make these fail.

use std::io;
use std::thread;

use sandbox::{apply, refused_on_this_thread, ThreadKind};

const ALL: [ThreadKind; 4] = [
    ThreadKind::Vcpu,
    ThreadKind::Migration,
    ThreadKind::Incoming,
    ThreadKind::Monitor,
];

mod sys {
    //! Raw system calls std has no wrapper for; none passes a pointer the kernel writes.

    /// `ptrace(PTRACE_TRACEME)`: -1 and errno, or 0.
    pub fn ptrace_traceme() -> std::io::Result<()> {
        // SAFETY: PTRACE_TRACEME takes no pointers (the other arguments are ignored).
        let rc = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `mount("none", "/mnt", "tmpfs", MS_RDONLY, NULL)`.
    pub fn mount_tmpfs() -> std::io::Result<()> {
        // SAFETY: the three strings are NUL-terminated literals that outlive the call; the
        // data pointer is NULL, which mount(2) accepts.
        let rc = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/mnt".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `fork()` as glibc makes it: `clone(SIGCHLD)`, without `CLONE_THREAD`. A child, if the
    /// filter failed to refuse, exits at once.
    pub fn fork_raw() -> std::io::Result<i64> {
        // SAFETY: clone with a NULL stack behaves as fork; the child (rc == 0) only calls
        // _exit, which is async-signal-safe.
        let rc =
            unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
        if rc == 0 {
            // SAFETY: _exit ends the child without touching the parent's state.
            unsafe { libc::_exit(0) };
        }
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// `execve("/bin/true", NULL, NULL)`.
    pub fn execve_true() -> std::io::Result<()> {
        // SAFETY: the path is a NUL-terminated literal; NULL argv/envp are accepted by Linux.
        let rc = unsafe { libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null()) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `ioctl(fd, FIONREAD, &n)`: a non-KVM ioctl.
    pub fn fionread(fd: i32) -> std::io::Result<i32> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which points to `n`.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n)
        }
    }

    /// `ioctl(fd, KVM_GET_API_VERSION)`.
    pub fn kvm_api_version(fd: i32) -> std::io::Result<i32> {
        // SAFETY: KVM_GET_API_VERSION (_IO(0xAE, 0)) takes no argument.
        let rc = unsafe { libc::ioctl(fd, 0xAE00, 0) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
}

/// Runs `f` on a new thread filtered as `kind` and returns its result.
fn on_filtered_thread<T: Send + 'static>(
    kind: ThreadKind,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    // The name marks the refusals this test provokes on purpose: .ci/run fails on any other
    // "seccomp refused" line in the test log.
    thread::Builder::new()
        .name("sandbox-probe".into())
        .spawn(move || {
            apply(kind).expect("the filter installs");
            f()
        })
        .expect("spawn")
        .join()
        .expect("the filtered thread did not panic")
}

/// Asserts `r` failed with EPERM because the filter refused it (counted on this thread).
fn assert_refused<T: std::fmt::Debug>(what: &str, kind: ThreadKind, r: io::Result<T>) {
    match r {
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "{what} on a {} thread: expected EPERM, got {e}",
            kind.name()
        ),
        Ok(v) => panic!("{what} on a {} thread was allowed: {v:?}", kind.name()),
    }
}

#[test]
fn socket_exec_fork_ptrace_and_mount_are_refused_on_every_thread_kind() {
    for kind in ALL {
        let refused = on_filtered_thread(kind, move || {
            let n0 = refused_on_this_thread();
            // socket(2): no thread kind opens sockets after its filter is on.
            assert_refused("socket", kind, std::net::UdpSocket::bind("127.0.0.1:0"));
            // fork and exec. (std's Command is not used: posix_spawn blocks every signal
            // around its clone, and a trapped call with SIGSYS blocked kills the process:
            // refused too, but not observable from inside.)
            assert_refused("fork", kind, sys::fork_raw());
            assert_refused("execve", kind, sys::execve_true());
            assert_refused("ptrace", kind, sys::ptrace_traceme());
            assert_refused("mount", kind, sys::mount_tmpfs());
            refused_on_this_thread() - n0
        });
        // Each refusal went through the filter's trap, not a permission check elsewhere.
        assert!(
            refused >= 5,
            "{}: only {refused} refusals were trapped by the filter",
            kind.name()
        );
    }
}

#[test]
fn a_vcpu_thread_may_issue_kvm_ioctls_but_no_other_ioctl() {
    let (r, w) = std::io::pipe().expect("pipe");
    let kvm = std::fs::File::open("/dev/kvm").ok();
    use std::os::fd::{AsRawFd, IntoRawFd};
    let rfd = r.into_raw_fd();
    let kfd = kvm.map(|f| f.into_raw_fd());
    let (non_kvm, kvm_res, refused) = on_filtered_thread(ThreadKind::Vcpu, move || {
        let n0 = refused_on_this_thread();
        let a = sys::fionread(rfd);
        let b = kfd.map(sys::kvm_api_version);
        (a, b, refused_on_this_thread() - n0)
    });
    assert_refused("FIONREAD", ThreadKind::Vcpu, non_kvm);
    assert_eq!(refused, 1, "exactly the non-KVM ioctl was trapped");
    match kvm_res {
        // KVM_API_VERSION is 12 since Linux 2.6.22.
        Some(r) => assert_eq!(r.expect("KVM_GET_API_VERSION is allowed"), 12),
        None => eprintln!("SKIP(kvm): no /dev/kvm; the KVM ioctl half was not checked"),
    }
    let _ = w.as_raw_fd();
}

#[test]
fn threads_start_on_spawning_kinds_and_openat_is_read_only_on_migration_threads() {
    for kind in [
        ThreadKind::Migration,
        ThreadKind::Incoming,
        ThreadKind::Monitor,
    ] {
        let got = on_filtered_thread(kind, || {
            thread::Builder::new()
                .name("child".into())
                .spawn(|| 7)
                .map(|h| h.join().unwrap_or(0))
        });
        assert_eq!(got.expect("a thread starts"), 7, "{}", kind.name());
    }
    // (A vCPU thread may not start threads, but glibc blocks every signal around its
    // clone, so the trap cannot be delivered and the kernel kills the process: not
    // testable in-process.)
    let dir = std::env::temp_dir().join(format!("sandbox-test-{}", std::process::id()));
    let path = dir.clone();
    let (read, create) = on_filtered_thread(ThreadKind::Migration, move || {
        let read = std::fs::File::open("/proc/self/status").map(|_| ());
        let create = std::fs::File::create(&path).map(|_| ());
        (read, create)
    });
    read.expect("a read-only open is allowed on a migration thread");
    assert_refused("creating a file", ThreadKind::Migration, create);
    assert!(!dir.exists());
}

#[test]
fn a_thread_keeps_its_kind_and_the_monitor_may_not_open_files() {
    let r = on_filtered_thread(ThreadKind::Monitor, || {
        let again = apply(ThreadKind::Monitor);
        let other = apply(ThreadKind::Vcpu);
        let open = std::fs::File::open("/proc/self/status").map(|_| ());
        (again.is_ok(), other.is_err(), open)
    });
    assert!(r.0, "applying the same kind twice is a no-op");
    assert!(r.1, "a filtered thread cannot switch kinds");
    // Refused quietly (glibc probes files on its own when a thread starts an arena).
    assert_eq!(
        r.2.expect_err("a monitor thread opens no file")
            .raw_os_error(),
        Some(libc::EACCES)
    );
}
