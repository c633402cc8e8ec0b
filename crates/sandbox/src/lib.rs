//! Per-thread seccomp filters for ringvisor: one allow list per kind of thread, installed by
//! the thread on itself before it reads anything from outside the process.
//!
//! ```no_run
//! // On a freshly spawned thread, before its first read of untrusted input:
//! sandbox::apply(sandbox::ThreadKind::Monitor).expect("seccomp filter");
//! ```
//!
//! Filters are inherited by threads the filtered thread spawns and stack with theirs (the
//! kernel runs every filter; the strictest answer wins), so a kind that spawns threads allows
//! what its children need. The mode is process-wide ([`set_mode`]); [`apply`] is idempotent
//! per thread and kind.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod filters;
mod sys;

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

pub use filters::allowed_syscalls;

/// What a thread does, which decides what it may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the exits it handles (port I/O devices, ring-full
    /// harvests), nothing that opens, connects or spawns.
    Vcpu,
    /// A migration source thread (the job, the sender, the dirty collector, the dirty
    /// limiter it starts): socket I/O on the connected stream, KVM ioctls (dirty logs,
    /// state), signals to this process's vCPUs, new threads.
    Migration,
    /// The destination's receive thread: socket I/O, accepting the next connection, and
    /// building the received VM (opening `/dev/kvm`, mapping guest memory, KVM ioctls,
    /// starting vCPU threads).
    Incoming,
    /// The monitor's accept, reader and writer threads: unix socket I/O and new threads;
    /// no ioctl, no open, no KVM (commands run on the server's dispatch thread).
    Monitor,
}

impl ThreadKind {
    /// The kind's name, as `--seccomp` diagnostics print it.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Migration => "migration",
            ThreadKind::Incoming => "incoming",
            ThreadKind::Monitor => "monitor",
        }
    }

    fn code(self) -> u8 {
        match self {
            ThreadKind::Vcpu => 1,
            ThreadKind::Migration => 2,
            ThreadKind::Incoming => 3,
            ThreadKind::Monitor => 4,
        }
    }
}

/// What a filter does with a system call that is not on its kind's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The call fails with `EPERM`; a line on stderr names the thread kind and the call
    /// number (a `SIGSYS` trap, handled in-process). The default.
    Enforce,
    /// The call runs and the kernel logs it (`SECCOMP_RET_LOG`, in the audit log / dmesg):
    /// for finding what a new code path needs.
    Log,
    /// No filter is installed.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = SandboxError;
    fn from_str(s: &str) -> Result<Mode, SandboxError> {
        match s {
            "enforce" => Ok(Mode::Enforce),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(SandboxError::BadMode(other.to_string())),
        }
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// An allow list did not compile to BPF (a bug in this crate).
    #[error("seccomp filter for {kind} threads does not compile: {source}")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's reason.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter (no seccomp support, or the thread's filter budget is
    /// spent).
    #[error("installing the seccomp filter for {kind} threads failed: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's reason.
        source: seccompiler::Error,
    },
    /// Installing the `SIGSYS` handler failed.
    #[error("installing the SIGSYS handler failed: {0}")]
    Handler(std::io::Error),
    /// A thread already filtered as one kind asked for another.
    #[error("this thread is already filtered as {have}; it cannot become {want}")]
    KindChange {
        /// The kind applied first.
        have: &'static str,
        /// The kind asked for now.
        want: &'static str,
    },
    /// Not a mode name.
    #[error("seccomp mode must be enforce, log or off, not {0:?}")]
    BadMode(String),
}

/// 0: not decided yet (read `RINGVISOR_SECCOMP`, else enforce); then 1 + Mode index.
static MODE: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// The kind applied on this thread (0: none), also read by the SIGSYS handler.
    static APPLIED: Cell<u8> = const { Cell::new(0) };
    /// Calls refused on this thread (the SIGSYS handler counts them).
    static REFUSED_HERE: Cell<u64> = const { Cell::new(0) };
}

fn mode_code(m: Mode) -> u8 {
    match m {
        Mode::Enforce => 1,
        Mode::Log => 2,
        Mode::Off => 3,
    }
}

/// Sets the process-wide mode for filters applied from now on (threads already filtered
/// keep theirs). The CLI calls it once at start from `--seccomp`.
pub fn set_mode(m: Mode) {
    MODE.store(mode_code(m), Ordering::SeqCst);
}

/// The mode [`apply`] uses: the last [`set_mode`], else `RINGVISOR_SECCOMP`
/// (`enforce|log|off`), else [`Mode::Enforce`].
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        1 => Mode::Enforce,
        2 => Mode::Log,
        3 => Mode::Off,
        _ => {
            let m = std::env::var("RINGVISOR_SECCOMP")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(Mode::Enforce);
            // A concurrent set_mode wins over the environment.
            let _ = MODE.compare_exchange(0, mode_code(m), Ordering::SeqCst, Ordering::SeqCst);
            mode()
        }
    }
}

/// Installs `kind`'s filter on the calling thread (and so on every thread it spawns from
/// now on). A second call with the same kind is a no-op; a different kind is an error
/// (filters only ever narrow). In [`Mode::Off`] nothing is installed.
pub fn apply(kind: ThreadKind) -> Result<(), SandboxError> {
    let have = APPLIED.with(Cell::get);
    if have == kind.code() {
        return Ok(());
    }
    if have != 0 {
        let have = [
            ThreadKind::Vcpu,
            ThreadKind::Migration,
            ThreadKind::Incoming,
            ThreadKind::Monitor,
        ]
        .into_iter()
        .find(|k| k.code() == have)
        .map_or("?", ThreadKind::name);
        return Err(SandboxError::KindChange {
            have,
            want: kind.name(),
        });
    }
    let m = mode();
    if m == Mode::Off {
        return Ok(());
    }
    if m == Mode::Enforce {
        sys::install_sigsys_handler().map_err(SandboxError::Handler)?;
    }
    let progs = filters::compile(kind, m)?;
    for p in &progs {
        seccompiler::apply_filter(p).map_err(|source| SandboxError::Install {
            kind: kind.name(),
            source,
        })?;
        // Once one filter is on, the thread is that kind (for the diagnostic and for
        // a retry after a failure, which then installs only what is missing).
        APPLIED.with(|a| a.set(kind.code()));
    }
    Ok(())
}

/// The kind filtering the calling thread, if [`apply`] ran on it.
pub fn current() -> Option<ThreadKind> {
    let c = APPLIED.with(Cell::get);
    [
        ThreadKind::Vcpu,
        ThreadKind::Migration,
        ThreadKind::Incoming,
        ThreadKind::Monitor,
    ]
    .into_iter()
    .find(|k| k.code() == c)
}

/// How many forbidden calls were refused (trapped) in this process so far, in
/// [`Mode::Enforce`].
pub fn refused_count() -> u64 {
    sys::refused_count()
}

/// The number of the last system call refused in this process (0: none yet).
pub fn last_refused() -> i64 {
    sys::last_refused()
}

/// How many forbidden calls were refused on the calling thread, in [`Mode::Enforce`].
pub fn refused_on_this_thread() -> u64 {
    REFUSED_HERE.with(Cell::get)
}

/// The kind code the SIGSYS handler reads (0 if none); counts the refusal on this thread.
fn on_refusal() -> u8 {
    REFUSED_HERE.with(|c| c.set(c.get() + 1));
    APPLIED.with(Cell::get)
}
