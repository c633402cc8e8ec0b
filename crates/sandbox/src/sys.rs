//! The crate's only `unsafe`: the `SIGSYS` handler that turns a trapped (forbidden) system
//! call into a line on stderr and an `EPERM` return.
//!
//! With `SECCOMP_RET_TRAP` the kernel does not run the call; it delivers `SIGSYS` with the
//! call number in `siginfo` and, when the handler returns, the thread resumes after the
//! `syscall` instruction with whatever `rax` holds. The handler writes `-EPERM` there, so
//! the caller sees an ordinary failure. It only uses async-signal-safe operations: a
//! stack buffer, `write(2)` to fd 2 (allowed by every filter) and atomics.

use std::io;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::Once;

static REFUSED: AtomicU64 = AtomicU64::new(0);
static LAST: AtomicI64 = AtomicI64::new(0);
static INSTALL: Once = Once::new();
static INSTALL_ERR: AtomicI32 = AtomicI32::new(0);

/// Offset of `si_syscall` in `siginfo_t` for `SIGSYS` on x86_64: `si_signo`, `si_errno`,
/// `si_code` (3 x i32), 4 bytes of padding, `si_call_addr` (a pointer), then the number.
const SI_SYSCALL_OFFSET: usize = 24;

pub(crate) fn refused_count() -> u64 {
    REFUSED.load(Ordering::SeqCst)
}

pub(crate) fn last_refused() -> i64 {
    LAST.load(Ordering::SeqCst)
}

/// Appends the decimal digits of `v` to `buf` at `*at`.
fn put_num(buf: &mut [u8], at: &mut usize, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while n > 0 && *at < buf.len() {
        n -= 1;
        buf[*at] = digits[n];
        *at += 1;
    }
}

fn put(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &b in s {
        if *at < buf.len() {
            buf[*at] = b;
            *at += 1;
        }
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS (SA_SIGINFO); for a seccomp
    // trap `si_syscall` is the i32 at SI_SYSCALL_OFFSET, inside the 128-byte structure.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    REFUSED.fetch_add(1, Ordering::SeqCst);
    LAST.store(i64::from(nr), Ordering::SeqCst);
    let kind = match crate::on_refusal() {
        1 => &b"vcpu"[..],
        2 => b"migration",
        3 => b"incoming",
        4 => b"monitor",
        _ => b"inherited-filter",
    };
    // The thread's name (the kernel's comm, at most 15 bytes): PR_GET_NAME is allowed by
    // every filter.
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into `name`.
    let named = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0;
    let name_len = if named {
        name.iter().position(|&b| b == 0).unwrap_or(name.len())
    } else {
        0
    };
    let mut buf = [0u8; 256];
    let mut at = 0;
    put(
        &mut buf,
        &mut at,
        b"ringvisor: seccomp refused system call ",
    );
    put_num(&mut buf, &mut at, nr as u64);
    put(&mut buf, &mut at, b" on thread '");
    put(&mut buf, &mut at, &name[..name_len]);
    put(&mut buf, &mut at, b"' (");
    put(&mut buf, &mut at, kind);
    put(&mut buf, &mut at, b")");
    put(
        &mut buf,
        &mut at,
        b": EPERM; if this path is legitimate, add the call to crates/sandbox (or run with --seccomp=log)\n",
    );
    // SAFETY: write(2) from a stack buffer of `at` initialized bytes; async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), at);
    }
    // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext_t;
    // setting its saved rax makes the trapped system call return -EPERM when the handler
    // returns (the kernel restores the registers from it).
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
    }
}

/// Installs [`on_sigsys`] for the process (once).
pub(crate) fn install_sigsys_handler() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain old data; all-zero is a valid empty value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `sa.sa_mask` is a valid sigset_t to initialize.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: `sa` is fully initialized and outlives the call; the handler only uses
        // async-signal-safe operations.
        let rc = unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) };
        if rc != 0 {
            let e = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL);
            INSTALL_ERR.store(e, Ordering::SeqCst);
        }
    });
    let e = INSTALL_ERR.load(Ordering::SeqCst);
    if e != 0 {
        Err(io::Error::from_raw_os_error(e))
    } else {
        Ok(())
    }
}
