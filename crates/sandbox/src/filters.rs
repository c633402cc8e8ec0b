//! The allow lists, one per [`ThreadKind`], and their compilation to BPF.
//!
//! Found by reading the code and by `strace -f` over the KVM migration tests, the QMP tests
//! and real `ringvisor run`/`incoming` migrations (see docs/security.md); the comments say
//! who needs each group.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::{Mode, SandboxError, ThreadKind};

/// KVM's ioctl type byte (`KVMIO`, bits 8..15 of every KVM request number).
const KVMIO: u64 = 0xAE;
/// Mask of an ioctl request's type byte.
const IOC_TYPE_MASK: u64 = 0xFF00;
/// `FIONBIO` (std's `set_nonblocking` on sockets).
const FIONBIO: u64 = 0x5421;
/// `FIOCLEX` (close-on-exec on an fd).
const FIOCLEX: u64 = 0x5451;

/// Every thread: what the Rust runtime and glibc need to run, allocate, lock, sleep, log to
/// stderr and end a thread.
const RUNTIME: &[i64] = &[
    libc::SYS_futex,
    // The allocator and thread stacks.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    // Signals: std's stack-overflow guard, masks around thread exit, signal returns.
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    // HashMap keys; rustls (the `tls` work) draws its randomness from getrandom too.
    libc::SYS_getrandom,
    // Logs (tracing to stderr), a PVH guest's console, the SIGSYS diagnostic.
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    // Stacking a thread kind's filter on an inherited one (a new thread applies its own);
    // filters only ever narrow what is allowed.
    libc::SYS_seccomp,
];

/// Threads that start threads (`clone` only with `CLONE_THREAD`; `clone3` is answered
/// `ENOSYS` by a second filter so glibc falls back to `clone`, whose flags BPF can see).
const SPAWN: &[i64] = &[libc::SYS_clone3];

/// Socket I/O on an already connected or accepted stream (std: recv/send, timeouts via
/// SO_RCVTIMEO/SO_SNDTIMEO, try_clone via F_DUPFD_CLOEXEC).
const STREAM_IO: &[i64] = &[
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_fcntl,
];

/// Migration threads (source and destination): renice while sending/receiving, read
/// `/proc/self/pagemap` (populated pages) and host memory figures, stat files.
const MIGRATION_EXTRA: &[i64] = &[
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_pread64,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
];

/// The destination: the next connection after a failed one, and building the VM (open
/// `/dev/kvm`, the vCPU kick handler).
const INCOMING_EXTRA: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_rt_sigaction,
    libc::SYS_prlimit64,
    libc::SYS_sched_setaffinity,
    // The PVH machine's irqfds and the serial port's event fds.
    libc::SYS_eventfd2,
];

/// The monitor: accepting clients.
const MONITOR_EXTRA: &[i64] = &[libc::SYS_accept, libc::SYS_accept4];

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    len: SeccompCmpArgLen,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, len, op, value)
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(conds)
}

/// The syscall numbers `kind` may make (some only with the arguments [`compile`] checks:
/// `ioctl`, `clone`, `openat`, `tgkill`, `prctl`).
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<i64> {
    let mut v: Vec<i64> = RUNTIME.to_vec();
    v.extend([libc::SYS_prctl, libc::SYS_tgkill]);
    match kind {
        ThreadKind::Vcpu => v.push(libc::SYS_ioctl),
        ThreadKind::Migration => {
            v.extend(SPAWN.iter().chain(STREAM_IO).chain(MIGRATION_EXTRA));
            v.extend([libc::SYS_clone, libc::SYS_ioctl, libc::SYS_openat]);
        }
        ThreadKind::Incoming => {
            v.extend(
                SPAWN
                    .iter()
                    .chain(STREAM_IO)
                    .chain(MIGRATION_EXTRA)
                    .chain(INCOMING_EXTRA),
            );
            v.extend([libc::SYS_clone, libc::SYS_ioctl, libc::SYS_openat]);
        }
        ThreadKind::Monitor => {
            v.extend(SPAWN.iter().chain(STREAM_IO).chain(MONITOR_EXTRA));
            v.push(libc::SYS_clone);
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn rules_for(
    kind: ThreadKind,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let conditional = [
        libc::SYS_ioctl,
        libc::SYS_clone,
        libc::SYS_openat,
        libc::SYS_tgkill,
        libc::SYS_prctl,
    ];
    for nr in allowed_syscalls(kind) {
        if !conditional.contains(&nr) {
            rules.insert(nr, vec![]);
        }
    }
    let has = |nr| allowed_syscalls(kind).contains(&nr);
    if has(libc::SYS_ioctl) {
        // Any KVM ioctl (the type byte is KVMIO); the source/destination also switch
        // sockets to non-blocking and set close-on-exec.
        let mut r = vec![rule(vec![cond(
            1,
            MaskedEq(IOC_TYPE_MASK),
            Dword,
            KVMIO << 8,
        )?])?];
        if kind != ThreadKind::Vcpu {
            r.push(rule(vec![cond(1, Eq, Dword, FIONBIO)?])?);
            r.push(rule(vec![cond(1, Eq, Dword, FIOCLEX)?])?);
        }
        rules.insert(libc::SYS_ioctl, r);
    }
    if has(libc::SYS_clone) {
        let t = libc::CLONE_THREAD as u64;
        rules.insert(
            libc::SYS_clone,
            vec![rule(vec![cond(0, MaskedEq(t), Qword, t)?])?],
        );
    }
    if has(libc::SYS_openat) {
        let r = if kind == ThreadKind::Incoming {
            // /dev/kvm is opened read-write; files are never created (no O_CREAT).
            vec![rule(vec![cond(
                2,
                MaskedEq(libc::O_CREAT as u64),
                Dword,
                0,
            )?])?]
        } else {
            vec![rule(vec![cond(
                2,
                MaskedEq((libc::O_ACCMODE | libc::O_CREAT) as u64),
                Dword,
                libc::O_RDONLY as u64,
            )?])?]
        };
        rules.insert(libc::SYS_openat, r);
    }
    // Signals only to threads of this process (vCPU kicks, abort).
    let pid = std::process::id() as u64;
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, Eq, Dword, pid)?])?],
    );
    // Thread names (a new thread names itself); no_new_privs before stacking a filter.
    rules.insert(
        libc::SYS_prctl,
        vec![
            rule(vec![cond(0, Eq, Dword, libc::PR_SET_NAME as u64)?])?,
            rule(vec![cond(0, Eq, Dword, libc::PR_GET_NAME as u64)?])?,
            rule(vec![cond(0, Eq, Dword, libc::PR_SET_NO_NEW_PRIVS as u64)?])?,
        ],
    );
    Ok(rules)
}

/// Calls refused quietly (an errno, no trap, no diagnostic) because glibc makes them on
/// its own and copes with the failure: `clone3` (it falls back to `clone`, whose flags the
/// allow list checks) and, on threads that never open files, `openat` (glibc reads
/// `/proc/stat` or `/sys` when a new thread creates its malloc arena).
fn quiet(kind: ThreadKind) -> Vec<(i64, i32)> {
    let mut q = Vec::new();
    if allowed_syscalls(kind).contains(&libc::SYS_clone3) {
        q.push((libc::SYS_clone3, libc::ENOSYS));
    }
    if matches!(kind, ThreadKind::Vcpu | ThreadKind::Monitor) {
        q.push((libc::SYS_openat, libc::EACCES));
    }
    q
}

/// `kind`'s filters in installation order: the allow list (which lets the quiet calls
/// through), then one filter per quiet call answering its errno (an errno outranks allow
/// when the kernel combines filters).
pub(crate) fn compile(kind: ThreadKind, mode: Mode) -> Result<Vec<BpfProgram>, SandboxError> {
    let err = |source| SandboxError::Compile {
        kind: kind.name(),
        source,
    };
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let mut rules = rules_for(kind).map_err(err)?;
    let quiet = quiet(kind);
    for (nr, _) in &quiet {
        rules.entry(*nr).or_insert_with(Vec::new);
    }
    let mut out = Vec::with_capacity(1 + quiet.len());
    let allow = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    out.push(BpfProgram::try_from(allow).map_err(err)?);
    for (nr, errno) in quiet {
        let mut r = BTreeMap::new();
        r.insert(nr, vec![]);
        let f = SeccompFilter::new(
            r,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            TargetArch::x86_64,
        )
        .map_err(err)?;
        out.push(BpfProgram::try_from(f).map_err(err)?);
    }
    Ok(out)
}
