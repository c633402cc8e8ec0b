//! The only `unsafe` in this crate: the dirty-log ioctls kvm-ioctls lacks (or implements with a
//! fresh `Vec` per call) and the mmap of a vCPU's ring. Safe wrappers only leave this module.

use std::io;
use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::abi::{DirtyGfn, DIRTY_GFN_SIZE, KVM_DIRTY_LOG_PAGE_OFFSET};
use crate::ring::RingStorage;

/// The KVM ioctl type byte.
const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Host page size used to compute the ring's mmap offset.
fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// One `KVM_RESET_DIRTY_RINGS` call; returns the number of entries the kernel reset.
pub(crate) fn reset_dirty_rings(vm: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches kernel-owned state and
    // the rings, which are shared memory the kernel owns; the fd is a valid VM fd for the call.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as u64)
    }
}

/// Hints the CPU to bring the cache line holding `x` into L1 (a no-op off x86-64). Page sets
/// use it to overlap the cache misses of scattered bitmap words.
#[inline(always)]
pub(crate) fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 (baseline on x86-64, SSE) never faults and has no architectural
    // effect; the address comes from a live reference.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (x as *const T).cast(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// Advises the kernel to back `words` with transparent huge pages (`MADV_HUGEPAGE`); a
/// refusal only costs speed, so it is ignored. `words` must not have been touched yet for the
/// advice to take effect at the first write.
pub(crate) fn advise_huge_pages(words: &[u64]) {
    let addr = words.as_ptr() as usize;
    let page = host_page_size() as usize;
    let start = addr.next_multiple_of(page);
    let end = addr + std::mem::size_of_val(words);
    if end <= start {
        return;
    }
    // SAFETY: the range lies inside `words`, memory this process owns; MADV_HUGEPAGE changes
    // only how the kernel backs it, never its contents or mapping.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
}

/// `KVM_GET_DIRTY_LOG` for `slot` into `bitmap`, which must hold one bit per page of the slot.
pub(crate) fn get_dirty_log(vm: &impl AsRawFd, slot: u32, bitmap: &mut [u64]) -> io::Result<()> {
    let mut arg = kvm_dirty_log {
        slot,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: the kernel writes ceil(npages/64) u64 words to `dirty_bitmap`; callers size
    // `bitmap` from the slot's page count (checked in `bitmap.rs`), and `arg` outlives the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `KVM_CLEAR_DIRTY_LOG` for pages `[first_page, first_page + num_pages)` of `slot`, with
/// `bitmap` holding bit 0 = `first_page`. `first_page` must be 64-aligned.
pub(crate) fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> io::Result<()> {
    let words = (num_pages as usize).div_ceil(64);
    if bitmap.len() < words {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    // The kernel only reads the bitmap for CLEAR; the pointer type is shared with GET.
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
    // SAFETY: the kernel reads ceil(num_pages/64) words from `dirty_bitmap`, checked above, and
    // never writes through it for CLEAR; `arg` outlives the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A vCPU's dirty ring mapped from its fd at page offset [`KVM_DIRTY_LOG_PAGE_OFFSET`].
///
/// The mapping is independent of the `VcpuFd` borrow: it stays valid (the kernel keeps the
/// pages alive) for as long as this object lives, so a collector thread can own it while the
/// vCPU thread keeps running the guest.
#[derive(Debug)]
pub struct MmapRing {
    ptr: *mut DirtyGfn,
    entries: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through `&[DirtyGfn]`, whose
// fields are atomics, so sharing or sending it between threads cannot cause data races.
unsafe impl Send for MmapRing {}
// SAFETY: see `Send`: only atomic accesses are possible through a shared reference.
unsafe impl Sync for MmapRing {}

impl MmapRing {
    /// Maps the ring of `entries` entries from a vCPU fd, populated up front
    /// (`MAP_POPULATE`): otherwise each of its pages is faulted in by the first harvest that
    /// reaches it, a few microseconds each on a nested host, paid inside collects for the
    /// whole first lap of the ring.
    pub fn map(vcpu: &impl AsRawFd, entries: u32) -> io::Result<Self> {
        if !entries.is_power_of_two() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let bytes = entries as usize * DIRTY_GFN_SIZE;
        let offset = (KVM_DIRTY_LOG_PAGE_OFFSET * host_page_size()) as libc::off_t;
        // SAFETY: a fresh shared mapping chosen by the kernel (no MAP_FIXED), so it cannot alias
        // any Rust object; the result is checked before use. MAP_POPULATE only prefaults it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MmapRing {
            ptr: ptr.cast(),
            entries: entries as usize,
        })
    }
}

impl RingStorage for MmapRing {
    fn entries(&self) -> &[DirtyGfn] {
        // SAFETY: `ptr` is a live mapping of `entries * 16` bytes (page aligned, so aligned for
        // DirtyGfn) that is unmapped only in Drop; every field is atomic, so concurrent kernel
        // writes are not data races from Rust's point of view.
        unsafe { std::slice::from_raw_parts(self.ptr, self.entries) }
    }
}

impl Drop for MmapRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`; no references outlive `self`
        // because `entries()` borrows `self`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.entries * DIRTY_GFN_SIZE);
        }
    }
}

/// True when `/dev/kvm` is provided by PVM (`kvm_pvm`), the nested software hypervisor whose
/// costs differ from hardware KVM; benchmark tables record it.
pub fn is_pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}
