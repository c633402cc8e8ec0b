//! The only unsafe code of the VMM: memslot registration, the `immediate_exit` byte of a
//! vCPU's `kvm_run` mapping, the kick signal and `KVM_GET_STATS_FD`. Safe wrappers only leave
//! this module.

use std::os::unix::thread::JoinHandleExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;

use kvm_bindings::{kvm_run, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::MmapRegion;

use crate::error::{Result, VmmError};

/// Registers `region` (which the caller keeps alive for as long as the VM exists) as memslot
/// `slot` at `gpa`.
pub(crate) fn register_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    region: &MmapRegion<()>,
    log_dirty: bool,
) -> Result<()> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: gpa,
        memory_size: region.size() as u64,
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: `region` is a live anonymous mapping of `memory_size` bytes. Whoever registers it
    // (`Vm`, and `logging::DirtyLogging` when it toggles the flag) holds the `GuestRam` that owns
    // the region alongside the VmFd and drops the VmFd (and every vCPU) first (field order), so
    // KVM never accesses the mapping after it is unmapped.
    unsafe { vm.set_user_memory_region(r) }.map_err(|source| VmmError::Kvm {
        op: "KVM_SET_USER_MEMORY_REGION",
        source,
    })
}

/// A pointer to the `immediate_exit` byte of a vCPU's `kvm_run` page. Valid while the
/// `VcpuFd` it came from lives; [`crate::vcpu`] keeps that `VcpuFd` in the same `Arc` as this.
#[derive(Debug)]
pub(crate) struct ImmediateExit(NonNull<u8>);

// SAFETY: the byte is only accessed through `AtomicU8` operations (see `byte`), and the kernel
// reads it once at KVM_RUN entry; sharing the pointer between threads is sound.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    pub(crate) fn of(vcpu: &mut VcpuFd) -> Self {
        let run: &mut kvm_run = vcpu.get_kvm_run();
        ImmediateExit(NonNull::from(&mut run.immediate_exit))
    }

    fn byte(&self) -> &AtomicU8 {
        // SAFETY: the pointer targets a u8 inside the vCPU's kvm_run mapping, which outlives
        // `self` (the owner keeps the VcpuFd alive), is suitably aligned (align 1), and is
        // only accessed atomically from userspace.
        unsafe { AtomicU8::from_ptr(self.0.as_ptr()) }
    }

    pub(crate) fn set(&self, v: bool) {
        self.byte().store(u8::from(v), Ordering::SeqCst);
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub(crate) fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR, and the kicker has already set
    // `immediate_exit` for the case where the thread was not inside KVM_RUN yet.
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| {
            VmmError::Signal {
                source: std::io::Error::from_raw_os_error(e.errno()),
            }
        });
    });
    res
}

/// Sends the kick signal to a vCPU thread that has not been joined yet.
pub(crate) fn kick_thread<T>(h: &std::thread::JoinHandle<T>) {
    let t = h.as_pthread_t();
    // SAFETY: `h` is an unjoined JoinHandle, so the pthread_t is still valid (a thread that has
    // exited but is not joined yields ESRCH, which is harmless). The signal has a handler.
    unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
}

/// The pthread id of a spawned thread, for [`kick_pthread`].
pub(crate) fn pthread_id<T>(h: &std::thread::JoinHandle<T>) -> u64 {
    #[allow(clippy::unnecessary_cast)] // pthread_t is u64 on x86_64 glibc, not everywhere
    let id = h.as_pthread_t() as u64;
    id
}

/// Sends the kick signal to a thread by pthread id. The caller guarantees the thread has not
/// been joined (the throttle ticker is joined before the vCPU threads).
pub(crate) fn kick_pthread(id: u64) {
    // SAFETY: `id` came from `pthread_id` of a vCPU thread that is joined only after the
    // caller (the throttle ticker) has stopped, so it names a live or exited-unjoined thread
    // (ESRCH, harmless). The signal has a handler installed.
    unsafe { libc::pthread_kill(id as libc::pthread_t, kick_signal()) };
}

/// `KVM_SET_XSAVE` with the size check kvm-ioctls leaves to the caller: the kernel copies
/// `KVM_CAP_XSAVE2` bytes, which must not exceed the 4 KiB `kvm_xsave` we pass (true unless
/// this process enabled dynamic XSAVE features such as AMX, which it never does).
pub(crate) fn set_xsave(
    fd: &VcpuFd,
    xsave: &kvm_bindings::kvm_xsave,
    xsave2_bytes: usize,
) -> Result<()> {
    if xsave2_bytes > std::mem::size_of::<kvm_bindings::kvm_xsave>() {
        return Err(VmmError::State(format!(
            "this host's XSAVE area is {xsave2_bytes} bytes (> 4096); dynamic XSAVE features are not supported"
        )));
    }
    // SAFETY: checked above that the kernel reads at most size_of::<kvm_xsave>() bytes from
    // `xsave`, which is a valid, initialised kvm_xsave borrowed for the call.
    unsafe { fd.set_xsave(xsave) }.map_err(|source| VmmError::Kvm {
        op: "KVM_SET_XSAVE",
        source,
    })
}

/// `KVM_GET_STATS_FD` (`_IO(KVMIO, 0xce)`): a file with a vCPU's or VM's binary statistics.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;

/// The KVM file descriptors `KVM_GET_STATS_FD` is defined on (a vCPU and a VM), so
/// [`stats_fd`] never issues the ioctl on another kind of file.
pub(crate) trait StatsSource: std::os::fd::AsRawFd {}
impl StatsSource for VcpuFd {}
impl StatsSource for kvm_ioctls::VmFd {}

/// Opens the binary statistics file of a vCPU or VM (Linux 5.14+).
pub(crate) fn stats_fd(fd: &impl StatsSource) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new file descriptor (or
    // -1); `fd` is a live vCPU or VM fd (`StatsSource`) for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `r` is a new descriptor the kernel just created for us; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(r) })
}

/// The calling thread's nice value, then sets it to `nice` (Linux: per thread). Returns the
/// old value, or `None` if either call failed (the thread keeps running as it was).
pub(crate) fn renice_current_thread(nice: i32) -> Option<i32> {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // getpriority can return -1 legitimately: clear errno first and check it after.
    // SAFETY: __errno_location returns this thread's errno slot, valid for writes.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: plain syscalls on this thread's own id; no memory is passed.
    let old = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    // SAFETY: as above, reading this thread's errno slot.
    if old == -1 && unsafe { *libc::__errno_location() } != 0 {
        return None;
    }
    // SAFETY: plain syscall on this thread's own id.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    (r == 0).then_some(old)
}

/// `kvm_run.internal` after a `KVM_EXIT_INTERNAL_ERROR`: the sub-error (1 = emulation
/// failure) and up to 16 data words (for emulation failures, the instruction bytes and more).
pub(crate) fn internal_error(vcpu: &mut VcpuFd) -> (u32, Vec<u64>) {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        return (0, Vec::new());
    }
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled the `internal`
    // member of the exit union; every bit pattern is a valid value of its integer fields.
    let i = unsafe { run.__bindgen_anon_1.internal };
    let n = (i.ndata as usize).min(i.data.len());
    (i.suberror, i.data[..n].to_vec())
}

/// A private anonymous mapping (`MAP_NORESERVE`, read-write) whose start is aligned to
/// `align` bytes, unmapped on drop: guest RAM, aligned so that transparent huge pages can back
/// it from its first byte.
pub(crate) struct AnonMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; guest RAM accesses go through
// vm-memory's volatile accessors, and the pointer itself carries no thread affinity.
unsafe impl Send for AnonMapping {}
// SAFETY: as above; `&AnonMapping` only hands out the address and length.
unsafe impl Sync for AnonMapping {}

impl std::fmt::Debug for AnonMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnonMapping")
            .field("addr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl AnonMapping {
    /// Maps `len` bytes (non-zero) at an `align`-aligned address (`align` a power of two, a
    /// multiple of the page size): reserves `len + align`, then unmaps the unaligned head and
    /// the tail.
    pub(crate) fn new(len: usize, align: usize) -> std::io::Result<Self> {
        let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
        if len == 0 || !align.is_power_of_two() {
            return Err(bad());
        }
        let total = len.checked_add(align).ok_or_else(bad)?;
        // SAFETY: a fresh anonymous private mapping at an address the kernel picks; no
        // existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(align);
        let head = aligned - start;
        let tail = total - head - len;
        // SAFETY: both ranges lie inside the mapping just made and nothing refers to them; a
        // zero-length range is skipped (munmap rejects it).
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let ptr = NonNull::new(aligned as *mut u8).ok_or_else(bad)?;
        Ok(AnonMapping { ptr, len })
    }

    /// `madvise(MADV_HUGEPAGE)` over the whole mapping: the kernel backs it with transparent
    /// huge pages when THP is `always` or `madvise`.
    pub(crate) fn advise_huge_pages(&self) -> std::io::Result<()> {
        // SAFETY: the range is exactly this live mapping; the advice changes no contents.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_HUGEPAGE) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// A vm-memory region over the mapping (not owning it: this value unmaps it, and the
    /// caller keeps this value alive longer than the region).
    pub(crate) fn region(
        &self,
    ) -> std::result::Result<MmapRegion<()>, vm_memory::mmap::MmapRegionError> {
        // SAFETY: the pointer and length describe a live read-write private anonymous mapping
        // owned by `self`, which `GuestRam` drops only after every region built on it (field
        // order), so the region never outlives the memory.
        unsafe {
            MmapRegion::build_raw(
                self.ptr.as_ptr(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` and is unmapped exactly once, here; no region
        // built on it is alive any more (see `region`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn kick_signal_is_realtime() {
        assert!(kick_signal() > libc::SIGSYS);
    }
}
