//! VMM tests on real `/dev/kvm` (a `SKIP(kvm)` line without it; `.ci/run` rejects skips on a
//! machine that has `/dev/kvm`).

use std::time::Duration;

use kvm_dirty::DirtyPageSet;
use vmm::{Pattern, RegionSpec, Tracking, VcpuCtrl, Vm, VmConfig};

const DATA_GPA: u64 = 1 << 32;

fn have_kvm() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; VMM test not run");
        return false;
    }
    true
}

/// Liveness bound of the waits here: only a guest that does not run takes this long. The
/// tests wait for what the guest does (its write counters), never for a fixed time: on a
/// busy host a vCPU thread may wait for a core for any length of time.
const PATIENCE: Duration = Duration::from_secs(60);

/// Waits until `done()` holds, failing with `what` after [`PATIENCE`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !done() {
        assert!(t.elapsed() < PATIENCE, "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// vCPU 0's workload over `pages` pages from `DATA_GPA`: every `stride`-th page in
/// `pattern` order, unpaced.
fn writer(pages: u64, stride: u64, pattern: Pattern, unique_values: bool) -> VcpuCtrl {
    VcpuCtrl {
        base: DATA_GPA,
        pages,
        stride,
        pattern,
        unique_values,
        burst_pages: 0,
        burst_tsc: 0,
        sleep_min_tsc: 0,
    }
}

/// Starts vCPU 0 writing the first 256 pages at `DATA_GPA` over and over (unique values,
/// unpaced).
fn write_256_pages_over_and_over(vm: &mut Vm) {
    vm.set_workload(0, &writer(256, 1, Pattern::Sequential, true))
        .unwrap();
    vm.start(None).unwrap();
}

fn config(vcpus: usize, tracking: Tracking, bytes: u64) -> VmConfig {
    VmConfig {
        vcpus,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes,
            log_dirty: true,
        }],
        tracking,
    }
}

#[test]
fn cpl3_guest_writes_pages_syncs_and_the_ring_reports_them() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vm::create(&config(1, Tracking::Ring { entries: 4096 }, 16 << 20)).unwrap();
    vm.set_workload(0, &writer(64, 1, Pattern::Sequential, false))
        .unwrap();
    vm.set_iteration(7).unwrap();
    let mut tracker = vm.tracker().unwrap();
    tracker.start().unwrap();
    vm.start(None).unwrap();
    let vcpus = vm.vcpus().unwrap();
    wait_until("the guest ran a full sweep", || {
        vm.nr_writes(0).unwrap() >= 64
    });
    vm.set_stop(true).unwrap();
    vcpus.wait_all_synced(PATIENCE).unwrap();
    assert!(vm.nr_writes(0).unwrap() >= 64, "the guest ran a full sweep");
    // Peeking counts the entries per vCPU without harvesting (no reset, so no re-protect).
    let rs = vm.ring_set().unwrap();
    assert_eq!(rs.poll(u32::MAX).unwrap(), 0);
    assert!(rs.vcpu_dirty_seen(0) >= 64, "{}", rs.vcpu_dirty_seen(0));
    assert_eq!(rs.vcpu_entries(0), 0, "nothing harvested yet");
    let mut out = DirtyPageSet::new(&vm.ram().slot_specs());
    let st = tracker.collect(&mut out).unwrap();
    assert_eq!(
        st.ring_entries,
        rs.vcpu_dirty_seen(0),
        "harvest takes exactly the peeked entries"
    );
    assert_eq!(st.reset, st.ring_entries, "{st:?}");
    let data: Vec<u64> = out.iter_gpa().filter(|&g| g >= DATA_GPA).collect();
    assert_eq!(data.len(), 64, "exactly the 64 written pages are dirty");
    for g in data {
        assert_eq!(vm.ram().read_u64(g).unwrap(), 7);
    }
    drop(out);
    // Pause by kick works while the guest spins (not at its sync point).
    vm.set_stop(false).unwrap();
    let vcpus = vm.vcpus().unwrap();
    let synced = vm.nr_writes(0).unwrap();
    vcpus.resume_all();
    wait_until("a resumed vCPU writes", || {
        vm.nr_writes(0).unwrap() > synced
    });
    vcpus.pause_all(PATIENCE).unwrap();
    let before = vm.nr_writes(0).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        vm.nr_writes(0).unwrap(),
        before,
        "a paused vCPU does not write"
    );
    vcpus.resume_all();
    wait_until("a resumed vCPU writes again", || {
        vm.nr_writes(0).unwrap() > before
    });
    vm.stop().unwrap();
}

#[test]
fn bare_ring_harvest_lists_exactly_the_written_pages_and_leaves_the_tracker_in_step() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vm::create(&config(1, Tracking::Ring { entries: 4096 }, 16 << 20)).unwrap();
    vm.set_workload(0, &writer(64, 3, Pattern::Sequential, true))
        .unwrap();
    let mut tracker = vm.tracker().unwrap();
    tracker.start().unwrap();
    vm.start(None).unwrap();
    let sweep = |vm: &Vm| {
        let start = vm.nr_writes(0).unwrap();
        vm.set_stop(false).unwrap();
        vm.vcpus().unwrap().resume_all();
        wait_until("the guest ran a full sweep", || {
            vm.nr_writes(0).unwrap() >= start + 64
        });
        vm.set_stop(true).unwrap();
        vm.vcpus().unwrap().wait_all_synced(PATIENCE).unwrap();
    };
    sweep(&vm);
    let rs = vm.ring_set().unwrap().clone();
    let mut list = Vec::with_capacity(256);
    let n = rs.harvest_bare(&mut list).unwrap();
    assert_eq!(n, list.len() as u64);
    let mut data: Vec<u64> = list
        .iter()
        .filter(|&&e| e >> 48 == 1)
        .map(|&e| e & ((1 << 48) - 1))
        .collect();
    data.sort_unstable();
    assert_eq!(data, (0..64).map(|i| i * 3).collect::<Vec<_>>());
    list.clear();
    assert_eq!(
        rs.harvest_bare(&mut list).unwrap(),
        0,
        "everything was reset"
    );
    // The consumer is still in step: the tracker's next collect resets exactly what it
    // harvests and reports the next sweep's pages.
    sweep(&vm);
    let mut out = DirtyPageSet::new(&vm.ram().slot_specs());
    let st = tracker.collect(&mut out).unwrap();
    assert_eq!(st.reset, st.ring_entries, "{st:?}");
    assert!(!st.tracking_lost);
    let pages: Vec<u64> = out.iter_gpa().filter(|&g| g >= DATA_GPA).collect();
    assert_eq!(pages.len(), 64);
    vm.stop().unwrap();
}

fn selftest(
    mode: kvm_dirty::TrackerMode,
    ring_entries: u32,
    vcpus: usize,
    force_ring_full: bool,
) -> vmm::selftest::SelftestReport {
    let p = vmm::selftest::SelftestParams {
        mode,
        iterations: 6,
        slot_pages: (16 << 20) / 4096 + 3,
        ring_entries,
        vcpus,
        force_ring_full,
        ..Default::default()
    };
    let r = vmm::selftest::run(&p, |_| {}).unwrap();
    let t = r.totals();
    eprintln!(
        "{} ring={ring_entries} vcpus={vcpus}: {t:?} {:?}",
        r.mode, r.failure
    );
    assert!(r.passed(), "{:?}", r.failure);
    assert_eq!(r.iterations.len(), 6);
    assert!(t.dirty > 0 && t.writes >= 6 * 256);
    r
}

#[test]
fn dirty_log_test_bitmap_and_clear_log() {
    if !have_kvm() {
        return;
    }
    selftest(kvm_dirty::TrackerMode::Bitmap, 0, 1, false);
    selftest(kvm_dirty::TrackerMode::ClearLog, 0, 2, false);
}

#[test]
fn dirty_log_test_ring_tiny_ring_two_vcpus_forces_ring_full_exits() {
    if !have_kvm() {
        return;
    }
    // 1024 entries per vCPU against a 4099-page slot, and no collect while the guest runs:
    // each iteration lasts until both rings have filled, and no page may be missed.
    let r = selftest(kvm_dirty::TrackerMode::Ring, 1024, 2, true);
    for it in &r.iterations {
        assert!(it.ring_full_exits >= 2, "{it:?}");
        assert_eq!(it.collects_running, 0, "{it:?}");
    }
    // Without forcing, the port's own schedule (random collect points) still passes.
    selftest(kvm_dirty::TrackerMode::Ring, 1024, 2, false);
}

/// Save a running guest's vCPU and memory, restore both into a fresh VM, and check the guest
/// continues from where it was (its write counter keeps growing from the saved value).
#[test]
fn vcpu_state_and_memory_move_to_a_fresh_vm_and_the_guest_continues() {
    if !have_kvm() {
        return;
    }
    let cfg = config(1, Tracking::Bitmap, 8 << 20);
    let mut a = Vm::create(&cfg).unwrap();
    a.set_workload(0, &writer(2048, 1, Pattern::Random, true))
        .unwrap();
    a.start(None).unwrap();
    wait_until("the guest writes", || a.nr_writes(0).unwrap() > 0);
    a.vcpus().unwrap().pause_all(PATIENCE).unwrap();
    let states = a.save_vcpus().unwrap();
    let blob = states[0].encode();
    assert!(vmm::state::VcpuState::decode(&blob[..blob.len() / 2]).is_err());
    let writes = a.nr_writes(0).unwrap();
    assert!(writes > 0);
    let b = Vm::create(&cfg).unwrap();
    let mut page = vec![0u8; 4096];
    for r in a.ram().regions() {
        for p in 0..r.bytes / 4096 {
            a.ram().read(r.gpa + p * 4096, &mut page).unwrap();
            b.ram().write_untracked(r.gpa + p * 4096, &page).unwrap();
        }
    }
    assert_eq!(a.ram().digest().unwrap(), b.ram().digest().unwrap());
    let decoded = vmm::state::VcpuState::decode(&blob).unwrap();
    b.restore_vcpus(&[decoded]).unwrap();
    a.stop().unwrap();
    drop(a);
    let mut b = b;
    b.start(None).unwrap();
    wait_until("the guest continues on the new VM", || {
        b.vcpus().unwrap().check().unwrap();
        b.nr_writes(0).unwrap() > writes
    });
    b.stop().unwrap();
}

/// What KVM itself says about a slot's dirty logging, without trusting the VMM's record: with
/// the ring, whether guest writes produce ring entries; with a bitmap, whether
/// `KVM_GET_DIRTY_LOG` finds a bitmap (KVM answers ENOENT for a slot without the flag).
fn kernel_logs(vm: &Vm, mode: kvm_dirty::TrackerMode) -> bool {
    let data = vm
        .ram()
        .slot_specs()
        .into_iter()
        .find(|s| s.guest_phys_addr == DATA_GPA)
        .unwrap();
    match mode {
        kvm_dirty::TrackerMode::Ring => {
            let rs = vm.ring_set().unwrap();
            // Harvest and reset first: the reset re-protects the pages, so a logged slot
            // produces new entries as the guest writes them again.
            rs.harvest_and_reset(None, |_, _, _| {}).unwrap();
            rs.poll(u32::MAX).unwrap();
            let before = rs.vcpu_dirty_seen(0);
            // Then a full sweep: every one of the guest's 256 pages written again, so a
            // logged slot has pushed entries by then (whenever the vCPU got to run).
            let w0 = vm.nr_writes(0).unwrap();
            wait_until("the guest sweeps its 256 pages again", || {
                vm.nr_writes(0).unwrap() >= w0 + 256
            });
            rs.poll(u32::MAX).unwrap();
            rs.vcpu_dirty_seen(0) > before
        }
        _ => {
            let mut buf = vec![0u64; data.bitmap_words()];
            match kvm_dirty::bitmap::get_dirty_log(vm.fd(), &data, &mut buf) {
                Ok(()) => true,
                Err(kvm_dirty::DirtyError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    false
                }
                Err(e) => panic!("KVM_GET_DIRTY_LOG: {e}"),
            }
        }
    }
}

#[test]
fn memslots_log_dirty_pages_only_while_a_tracker_or_guard_is_held_recorded_and_seen_by_kvm() {
    if !have_kvm() {
        return;
    }
    let log = kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
    for tracking in [
        Tracking::Ring { entries: 4096 },
        Tracking::Bitmap,
        Tracking::ClearLog,
    ] {
        let mode = tracking.mode();
        let mut vm = Vm::create(&config(1, tracking, 16 << 20)).unwrap();
        // The guest writes 256 pages over and over (unique values, unpaced).
        write_256_pages_over_and_over(&mut vm);
        let all = |vm: &Vm, f: u32| vm.memslot_flags().iter().all(|&(_, v)| v == f);
        assert!(
            all(&vm, 0),
            "{mode:?}: off at boot: {:?}",
            vm.memslot_flags()
        );
        assert_eq!(vm.dirty_logging_users(), 0);
        assert!(
            !kernel_logs(&vm, mode),
            "{mode:?}: KVM logs nothing at boot"
        );
        let mut tracker = vm.tracker().unwrap();
        assert!(all(&vm, 0), "{mode:?}: creating a tracker is not using it");
        tracker.start().unwrap();
        assert!(
            all(&vm, log),
            "{mode:?}: on while tracking: {:?}",
            vm.memslot_flags()
        );
        assert!(kernel_logs(&vm, mode), "{mode:?}: KVM logs while tracking");
        let guard = vm.dirty_logging().unwrap();
        assert_eq!(vm.dirty_logging_users(), 2);
        tracker.stop().unwrap();
        assert!(
            all(&vm, log),
            "{mode:?}: still on while another user holds it"
        );
        assert!(kernel_logs(&vm, mode));
        drop(guard);
        assert_eq!(vm.dirty_logging_users(), 0);
        assert!(all(&vm, 0), "{mode:?}: off after the last user");
        assert!(!kernel_logs(&vm, mode), "{mode:?}: KVM stopped logging");
        // Again, through a tracker dropped without stop.
        tracker.start().unwrap();
        assert!(all(&vm, log));
        drop(tracker);
        assert!(all(&vm, 0), "{mode:?}: a dropped tracker releases logging");
        // The guest was running all along (the checks above saw a live guest): it writes.
        wait_until("the guest runs", || vm.nr_writes(0).unwrap() > 0);
        vm.stop().unwrap();
    }
}

#[test]
fn kvm_counts_a_page_fault_for_each_fresh_page_and_each_re_protected_page_the_guest_writes() {
    if !have_kvm() {
        return;
    }
    const PAGES: u64 = 256;
    let mut vm = Vm::create(&config(1, Tracking::Ring { entries: 4096 }, 16 << 20)).unwrap();
    let stats = vm.vcpu_stats(0).unwrap();
    let names: Vec<&str> = stats.names().collect();
    eprintln!("this KVM's vCPU statistics: {}", names.join(" "));
    assert!(
        names.contains(&vmm::GUEST_FAULTS_STAT),
        "{} missing from {names:?}",
        vmm::GUEST_FAULTS_STAT
    );
    vm.set_workload(0, &writer(PAGES, 1, Pattern::Sequential, false))
        .unwrap();
    let mut tracker = vm.tracker().unwrap();
    tracker.start().unwrap();
    // Held at its sync point before its first write (the workload checks the stop flag
    // before every page), so the first sweep below is the first touch of every page.
    vm.set_stop(true).unwrap();
    vm.start(None).unwrap();
    let faults = |vm: &Vm| vm.guest_faults().unwrap().unwrap();
    // One sweep of the data pages, then the guest waits at its sync point.
    let sweep = |vm: &Vm| {
        let start = vm.nr_writes(0).unwrap();
        vm.set_stop(false).unwrap();
        vm.vcpus().unwrap().resume_all();
        wait_until("the guest ran a full sweep", || {
            vm.nr_writes(0).unwrap() >= start + PAGES
        });
        vm.set_stop(true).unwrap();
        vm.vcpus().unwrap().wait_all_synced(PATIENCE).unwrap();
    };
    vm.vcpus().unwrap().wait_all_synced(PATIENCE).unwrap();
    assert_eq!(
        vm.nr_writes(0).unwrap(),
        0,
        "no write before the first sweep"
    );
    let f0 = faults(&vm);
    sweep(&vm);
    let f1 = faults(&vm);
    assert!(f1 - f0 >= PAGES, "fresh pages: {f0} -> {f1}");
    // Re-protect them (harvest + reset): each first write afterwards faults again.
    let mut out = DirtyPageSet::new(&vm.ram().slot_specs());
    tracker.collect(&mut out).unwrap();
    assert!(out.iter_gpa().filter(|&g| g >= DATA_GPA).count() as u64 >= PAGES);
    let f2 = faults(&vm);
    sweep(&vm);
    let f3 = faults(&vm);
    assert!(f3 - f2 >= PAGES, "re-protected pages: {f2} -> {f3}");
    eprintln!(
        "pf_taken: fresh sweep {}, re-protected sweep {}; pf_fast {:?} pf_fixed {:?}",
        f1 - f0,
        f3 - f2,
        vm.vcpu_stat(0, "pf_fast").unwrap(),
        vm.vcpu_stat(0, "pf_fixed").unwrap()
    );
    vm.stop().unwrap();
}

#[test]
fn a_deferred_ring_or_bitmap_tracker_turns_logging_on_one_memslot_at_a_time() {
    if !have_kvm() {
        return;
    }
    let log = kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
    const MIB4: u64 = 4 << 20;
    for tracking in [Tracking::Ring { entries: 4096 }, Tracking::Bitmap] {
        let mode = tracking.mode();
        let mut cfg = config(1, tracking, MIB4);
        for i in 1..3u16 {
            cfg.memory.push(RegionSpec {
                slot: 1 + i,
                gpa: DATA_GPA + u64::from(i) * MIB4,
                bytes: MIB4,
                log_dirty: true,
            });
        }
        let mut vm = Vm::create(&cfg).unwrap();
        // The guest writes the first 256 pages of slot 1, over and over.
        write_256_pages_over_and_over(&mut vm);
        wait_until("the guest runs", || vm.nr_writes(0).unwrap() > 0);
        let flag = |vm: &Vm, slot: u16| {
            vm.memslot_flags()
                .iter()
                .find(|f| f.0 == slot)
                .map(|f| f.1)
                .unwrap()
        };
        let mut t = vm.tracker().unwrap();
        t.start_deferred().unwrap();
        assert_eq!(vm.dirty_logging_users(), 1);
        for slot in 1..=3 {
            assert_eq!(
                flag(&vm, slot),
                0,
                "{mode:?}: slot {slot} waits for the bulk pass"
            );
        }
        // The bulk pass reaches slot 2: logging goes on there only.
        t.protect_before_read(DATA_GPA + MIB4 + 4096, 16).unwrap();
        assert_eq!(flag(&vm, 2), log, "{mode:?}");
        assert_eq!(flag(&vm, 1), 0, "{mode:?}");
        assert_eq!(flag(&vm, 3), 0, "{mode:?}");
        // A collect before the pass reached slots 1 and 3 reports all of them (never read
        // since the start), and nothing of slot 2 (nobody writes there); logging is on.
        let mut out = DirtyPageSet::new(&vm.ram().slot_specs());
        t.collect(&mut out).unwrap();
        for slot in 1..=3 {
            assert_eq!(
                flag(&vm, slot),
                log,
                "{mode:?}: slot {slot} on after a collect"
            );
        }
        let in_slot = |out: &DirtyPageSet, i: u64| {
            (0..1024)
                .filter(|p| out.contains_gpa(DATA_GPA + i * MIB4 + p * 4096))
                .count()
        };
        assert_eq!(in_slot(&out, 0), 1024, "{mode:?}: slot 1 whole");
        assert_eq!(in_slot(&out, 1), 0, "{mode:?}: slot 2 clean");
        assert_eq!(in_slot(&out, 2), 1024, "{mode:?}: slot 3 whole");
        // From now on only what the guest writes: pages of slot 1, never slot 3.
        out.clear();
        wait_until("the guest writes on", || {
            t.collect(&mut out).unwrap();
            in_slot(&out, 0) > 0
        });
        assert_eq!(in_slot(&out, 2), 0, "{mode:?}: slot 3 not reported again");
        t.stop().unwrap();
        assert!(vm.memslot_flags().iter().all(|f| f.1 == 0), "{mode:?}: off");
        // With another user holding logging, a deferred start is not lazy: all on.
        let guard = vm.dirty_logging().unwrap();
        t.start_deferred().unwrap();
        assert!(
            vm.memslot_flags()
                .iter()
                .filter(|f| f.0 >= 1)
                .all(|f| f.1 == log),
            "{mode:?}"
        );
        t.stop().unwrap();
        drop(guard);
        assert!(vm.memslot_flags().iter().all(|f| f.1 == 0), "{mode:?}: off");
        vm.stop().unwrap();
    }
}
