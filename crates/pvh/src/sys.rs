//! The only unsafe code of this crate: memslot registration, the `immediate_exit` byte of a
//! vCPU's `kvm_run` page, and the kick signal.

use std::os::unix::thread::JoinHandleExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::MmapRegion;

use crate::error::{PvhError, Result};

/// Registers `region` as memslot `slot` at `gpa`. The caller keeps `region` mapped for as long
/// as `vm` exists (the `PvhVm` drops its VM fd and vCPUs before its guest RAM).
pub(crate) fn register_slot(vm: &VmFd, slot: u32, gpa: u64, region: &MmapRegion<()>) -> Result<()> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: region.size() as u64,
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: `region` is a live anonymous mapping of exactly `memory_size` bytes, and the
    // owner of `vm` keeps it mapped until after `vm` and every vCPU fd are closed (field order
    // of `PvhVm`), so KVM never touches the mapping after it is gone.
    unsafe { vm.set_user_memory_region(r) }.map_err(|source| PvhError::Kvm {
        op: "KVM_SET_USER_MEMORY_REGION",
        source,
    })
}

/// Pointer to the `immediate_exit` byte of one vCPU's `kvm_run` page. Valid while the `VcpuFd`
/// it came from is open; `vm::VcpuSlot` holds both, so the pointer never outlives the mapping.
#[derive(Debug)]
pub(crate) struct ImmediateExit(NonNull<u8>);

// SAFETY: the byte is only accessed with atomic operations (`byte`), and the kernel reads it
// at KVM_RUN entry; sharing the pointer between threads is sound.
unsafe impl Send for ImmediateExit {}
// SAFETY: as for Send.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    pub(crate) fn of(vcpu: &mut VcpuFd) -> Self {
        ImmediateExit(NonNull::from(&mut vcpu.get_kvm_run().immediate_exit))
    }

    fn byte(&self) -> &AtomicU8 {
        // SAFETY: the pointer targets a u8 in the vCPU's kvm_run mapping, which lives as long as
        // `self` (see the type's docs); u8 has alignment 1; userspace only accesses it atomically.
        unsafe { AtomicU8::from_ptr(self.0.as_ptr()) }
    }

    pub(crate) fn set(&self, v: bool) {
        self.byte().store(u8::from(v), Ordering::SeqCst);
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Delivery alone makes KVM_RUN return EINTR; `immediate_exit` covers a thread that was
    // about to enter KVM_RUN.
}

/// Installs the kick handler (once per process).
pub(crate) fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| PvhError::Host(format!("installing the kick handler: {e}")));
    });
    res
}

/// Sends the kick signal to a vCPU thread that has not been joined.
pub(crate) fn kick_thread<T>(h: &std::thread::JoinHandle<T>) {
    let t = h.as_pthread_t();
    // SAFETY: `h` is not joined, so its pthread_t is valid (an exited, unjoined thread gives
    // ESRCH, which is harmless); the signal has a handler installed.
    unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
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
