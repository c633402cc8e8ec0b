//! Integration tests on real `/dev/kvm`. Without it each test prints a loud SKIP line (which
//! `.ci/run` treats as a failure on a machine that has `/dev/kvm`).

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_dirty::bitmap::{enable_manual_protect, get_dirty_log};
use kvm_dirty::{
    enable_dirty_ring, ClearLogTracker, DirtyError, DirtyPageSet, DirtyTracker, MmapRing,
    RingConsumer, RingSet, RingTracker, SlotId, SlotSpec,
};
use kvm_ioctls::{Kvm, VmFd};

fn kvm() -> Option<Kvm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; KVM integration test not run");
        return None;
    }
    Some(Kvm::new().expect("/dev/kvm exists but cannot be opened"))
}

/// Anonymous host memory for a memslot, unmapped on drop.
struct HostMem {
    ptr: *mut libc::c_void,
    len: usize,
}

impl HostMem {
    fn new(len: usize) -> Self {
        // SAFETY: fresh anonymous private mapping, no MAP_FIXED; result checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        HostMem { ptr, len }
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped; the VM using it is dropped first in every test.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

fn add_slot(vm: &VmFd, slot: u32, gpa: u64, mem: &HostMem, log: bool) -> SlotSpec {
    let region = kvm_userspace_memory_region {
        slot,
        flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: gpa,
        memory_size: mem.len as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the host mapping outlives the VM in each test (declared before it).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    SlotSpec {
        id: SlotId::new(0, slot as u16),
        guest_phys_addr: gpa,
        pages: mem.len as u64 / 4096,
        log_dirty: log,
    }
}

#[test]
fn ring_enable_validates_size_and_rejects_enabling_after_vcpus() {
    let Some(kvm) = kvm() else { return };
    let vm = kvm.create_vm().unwrap();
    assert!(matches!(
        enable_dirty_ring(&vm, 1000, 0),
        Err(DirtyError::RingSizeNotPowerOfTwo { entries: 1000 })
    ));
    assert!(matches!(
        enable_dirty_ring(&vm, 64, 0),
        Err(DirtyError::RingTooSmall { .. })
    ));
    let (_, max) = kvm_dirty::probe_ring(&vm).unwrap();
    assert!(matches!(
        enable_dirty_ring(&vm, max * 2, 0),
        Err(DirtyError::RingTooLarge { .. })
    ));
    assert!(matches!(
        enable_dirty_ring(&vm, 4096, 1),
        Err(DirtyError::RingAfterVcpus { vcpus: 1 })
    ));
    // The kernel itself refuses once a vCPU exists, and we report it as a typed error.
    let vm2 = kvm.create_vm().unwrap();
    let _vcpu = vm2.create_vcpu(0).unwrap();
    let e = enable_dirty_ring(&vm2, 4096, 0).unwrap_err();
    assert!(
        matches!(e, DirtyError::RingEnableRejected { entries: 4096, .. }),
        "{e}"
    );
    // A valid size on a fresh VM works and prefers ACQ_REL.
    let cap = enable_dirty_ring(&vm, 4096, 0).unwrap();
    assert_eq!(cap.size.entries(), 4096);
    // Enabling twice is refused by the kernel.
    assert!(matches!(
        enable_dirty_ring(&vm, 4096, 0),
        Err(DirtyError::RingEnableRejected { .. })
    ));
}

/// Minor page faults taken by the calling thread so far.
fn thread_minor_faults() -> i64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD is valid on Linux and the pointer outlives the call.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

#[test]
fn mapped_ring_is_populated_so_reading_it_takes_no_page_fault() {
    let Some(kvm) = kvm() else { return };
    let vm = kvm.create_vm().unwrap();
    let cap = enable_dirty_ring(&vm, 4096, 0).unwrap();
    let v0 = vm.create_vcpu(0).unwrap();
    let r = MmapRing::map(&v0, cap.size.entries()).unwrap();
    use kvm_dirty::RingStorage;
    let before = thread_minor_faults();
    // One entry per host page of the ring (16 pages): each would fault if not populated.
    let flags: u32 = r
        .entries()
        .iter()
        .step_by(256)
        .map(|e| e.snapshot().0)
        .sum();
    let faults = thread_minor_faults() - before;
    assert_eq!(flags, 0, "a fresh ring holds no entry");
    assert_eq!(
        faults, 0,
        "the ring's pages were faulted in by the harvest, not by map"
    );
}

#[test]
fn fresh_ring_maps_empty_and_harvest_of_empty_rings_resets_nothing() {
    let Some(kvm) = kvm() else { return };
    let mem = HostMem::new(16 * 4096);
    let vm = Arc::new(kvm.create_vm().unwrap());
    let cap = enable_dirty_ring(&vm, 1024, 0).unwrap();
    let slot = add_slot(&vm, 0, 0x10_0000, &mem, true);
    let v0 = vm.create_vcpu(0).unwrap();
    let v1 = vm.create_vcpu(1).unwrap();
    let r0 = MmapRing::map(&v0, cap.size.entries()).unwrap();
    {
        let mut c = RingConsumer::new(&r0);
        let (st, tok) = c.harvest(|_, _| panic!("no entry expected"));
        assert_eq!((st.entries, tok.count), (0, 0));
    }
    let r1 = MmapRing::map(&v1, cap.size.entries()).unwrap();
    let set = Arc::new(RingSet::new(vm.clone(), cap, &[slot], vec![r0, r1], None).unwrap());
    let r = set
        .harvest_and_reset(None, |_, _, _| panic!("no entry expected"))
        .unwrap();
    assert_eq!((r.entries, r.reset), (0, 0));
    let mut t = RingTracker::new(set.clone());
    let mut out = DirtyPageSet::new(&[slot]);
    assert!(matches!(t.collect(&mut out), Err(DirtyError::NotStarted)));
    t.start().unwrap();
    t.collect(&mut out).unwrap();
    assert!(out.is_empty(), "no guest ran, so nothing is dirty");
    // With the ring on and no backup bitmap, the bitmap ioctl is refused (ENXIO).
    let mut buf = vec![0u64; 1];
    let e = get_dirty_log(&vm, &slot, &mut buf).unwrap_err();
    assert!(
        matches!(
            e,
            DirtyError::Ioctl {
                op: "KVM_GET_DIRTY_LOG",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn clear_log_initially_set_covers_an_unaligned_slot_and_start_clears_it_exactly() {
    let Some(kvm) = kvm() else { return };
    // 67 pages: not a multiple of 64, so the CLEAR of the tail must pass the exact length.
    let mem = HostMem::new(67 * 4096);
    let vm = Arc::new(kvm.create_vm().unwrap());
    let proof = enable_manual_protect(&vm).unwrap();
    let slot = add_slot(&vm, 1, 0x1_0000_0000, &mem, true);
    // INITIALLY_SET: the raw log reports every page, and only those (no bit past the tail).
    let mut buf = vec![0u64; slot.bitmap_words()];
    get_dirty_log(&vm, &slot, &mut buf).unwrap();
    let set: u32 = buf.iter().map(|w| w.count_ones()).sum();
    assert_eq!(set, 67, "INITIALLY_SET reports every page exactly");
    // start() collects and clears that initial set, exactly (the CLEAR of the 3-page tail
    // would fail with EINVAL if its length were rounded to 64).
    let mut t = ClearLogTracker::new(vm.clone(), proof, &[slot], None).unwrap();
    t.start().unwrap();
    get_dirty_log(&vm, &slot, &mut buf).unwrap();
    assert!(buf.iter().all(|w| *w == 0), "start cleared every bit");
    let mut out = DirtyPageSet::new(&[slot]);
    let st = t.collect(&mut out).unwrap();
    assert_eq!(
        out.count(),
        0,
        "after start nothing is dirty until the guest writes"
    );
    assert_eq!(st.ioctls, 1, "one GET; nothing to CLEAR");
}

#[test]
fn trackers_refuse_slots_without_the_dirty_log_flag() {
    let Some(kvm) = kvm() else { return };
    let mem = HostMem::new(8 * 4096);
    let vm = Arc::new(kvm.create_vm().unwrap());
    let slot = add_slot(&vm, 0, 0, &mem, false);
    let e = kvm_dirty::BitmapTracker::new(vm.clone(), &[slot], None).unwrap_err();
    assert!(matches!(e, DirtyError::SlotNotLogged { slot: 0 }), "{e}");
    let mut buf = vec![0u64; 1];
    assert!(matches!(
        get_dirty_log(&vm, &slot, &mut buf),
        Err(DirtyError::SlotNotLogged { .. })
    ));
}

#[test]
fn clear_log_deferred_start_protects_only_what_is_about_to_be_read() {
    let Some(kvm) = kvm() else { return };
    // 200 pages: words 0-2 full, word 3 holds 8 pages.
    let mem = HostMem::new(200 * 4096);
    let vm = Arc::new(kvm.create_vm().unwrap());
    let proof = enable_manual_protect(&vm).unwrap();
    let base = 0x1_0000_0000;
    let slot = add_slot(&vm, 1, base, &mem, true);
    let mut t = ClearLogTracker::new(vm.clone(), proof, &[slot], None).unwrap();
    let count = |buf: &mut Vec<u64>| {
        get_dirty_log(&vm, &slot, buf).unwrap();
        buf.iter().map(|w| w.count_ones()).sum::<u32>()
    };
    let mut buf = vec![0u64; slot.bitmap_words()];
    t.start_deferred().unwrap();
    assert_eq!(
        count(&mut buf),
        200,
        "a deferred start clears (protects) nothing"
    );
    // Pages 70-79 lie in word 1: that whole word is cleared, nothing else.
    t.protect_before_read(base + 70 * 4096, 10).unwrap();
    assert_eq!(count(&mut buf), 136);
    assert_eq!(buf[1], 0, "word 1 cleared");
    assert_eq!(buf[0], u64::MAX);
    // Outside the slot: ignored.
    t.protect_before_read(0, 16).unwrap();
    t.protect_before_read(base + 200 * 4096, 64).unwrap();
    assert_eq!(count(&mut buf), 136);
    // A collect before the rest was read reports the pending pages (still dirty: never
    // read since the start) and protects them.
    let mut out = DirtyPageSet::new(&[slot]);
    t.collect(&mut out).unwrap();
    assert_eq!(
        out.count(),
        136,
        "words 0, 2 and 3 (its 8 pages), not word 1"
    );
    assert!(!out.contains_gpa(base + 70 * 4096));
    assert!(out.contains_gpa(base + 199 * 4096));
    assert_eq!(count(&mut buf), 0, "the collect cleared every pending word");
    out.clear();
    t.collect(&mut out).unwrap();
    assert_eq!(out.count(), 0, "nothing pending any more");
    // A plain start after a stop clears everything at once, as before.
    t.stop().unwrap();
    t.start_deferred().unwrap();
    t.stop().unwrap();
    assert!(matches!(
        t.protect_before_read(base, 64),
        Err(DirtyError::NotStarted)
    ));
}
