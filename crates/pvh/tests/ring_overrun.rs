//! The dirty ring on this project's host (see `pvm-host.md`): guest stores at CPL0 go through
//! PVM's instruction emulator in batches that do not stop at the ring's soft limit, so the
//! kernel pushes more entries than the ring holds. These tests force that overrun with the test
//! kernel's `boot_writes` (CPL0 stores before the guest's first report) and `isr_writes` (CPL0
//! stores in every timer interrupt) while a tracker runs, on every ring size the host supports,
//! and check that the guest is never livelocked and that the loss is reported.
//! Without `/dev/kvm` each test prints a `SKIP(kvm)` line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_dirty::DirtyPageSet;
use pvh::test_kernel::{self, Cmdline, TestKernelParams};
use pvh::{ExitStatus, PvhConfig};
use vmm::Tracking;

fn kvm_available() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; ring overrun test not run");
        return false;
    }
    true
}

/// The two tests run one at a time: on a 2-core host a second guest changes how PVM batches
/// the first one's emulated stores and how many timer ticks it gets.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// The largest ring the host offers, in entries.
fn max_ring_entries() -> u32 {
    let kvm = vmm::open_kvm().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    kvm_dirty::probe_ring(&vm).expect("the dirty ring").1
}

struct Run {
    status: ExitStatus,
    out: String,
    overruns: u64,
    resyncs: u64,
    ring_full: u64,
    lost: bool,
    collects: u64,
}

/// Boots the test kernel with `entries`-entry rings and a tracker started before boot (dirty
/// logging on from the first instruction). Once the guest's CPL0 boot stores are done (only
/// ring-full exits harvest during them, as when nothing else is collecting), another thread
/// collects every `collect_every` as a migration does, until the guest powers off.
fn run(entries: u32, c: &Cmdline, collect_every: Duration) -> Run {
    let kernel = test_kernel::build(&TestKernelParams::default()).unwrap();
    let cfg = PvhConfig {
        cmdline: c.render(),
        memory: 64 << 20,
        vcpus: 1,
        tracking: Some(Tracking::Ring { entries }),
        ..PvhConfig::new(kernel)
    };
    let mut pvm = pvh::boot(&cfg).expect("boot");
    let mut tracker = pvm.vm().tracker().unwrap();
    tracker.start().unwrap();
    let rs = pvm.vm().ring_set().unwrap().clone();
    let mut set = DirtyPageSet::new(&pvm.vm().ram().slot_specs());
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let devices = pvm.vm().devices().unwrap().clone();
    let wait_boot = c.boot_writes > 0;
    let collector = std::thread::spawn(move || {
        let (mut lost, mut n) = (false, 0u64);
        while !stop2.load(Ordering::Relaxed) {
            if wait_boot
                && !String::from_utf8_lossy(&devices.serial_output()).contains("boot writes")
            {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let st = tracker.collect(&mut set).expect("collect");
            lost |= st.tracking_lost;
            n += 1;
            set.clear();
            let t = std::time::Instant::now();
            while t.elapsed() < collect_every && !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // A last collect after power-off, as a migration's final pass.
        lost |= tracker.collect(&mut set).expect("collect").tracking_lost;
        tracker.stop().unwrap();
        (lost, n)
    });
    let status = pvm.run_until_exit(Some(Duration::from_secs(120)));
    stop.store(true, Ordering::Relaxed);
    let (lost, collects) = collector.join().unwrap();
    let out = String::from_utf8_lossy(&pvm.serial_output()).into_owned();
    let status = status.unwrap_or_else(|e| panic!("run failed: {e}\nserial:\n{out}"));
    Run {
        status,
        out,
        overruns: rs.vcpu_overruns(0),
        resyncs: rs.vcpu_resyncs(0),
        ring_full: rs.vcpu_ring_full_exits(0),
        lost,
        collects,
    }
}

/// `cpu 0 progress R ...` report numbers, in order.
fn reports(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("cpu 0 progress "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn cpl0_stores_overrun_every_ring_size_yet_the_guest_boots_reports_and_the_loss_is_reported() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    let max = max_ring_entries();
    let mut forced = 0u64;
    for entries in [256u32, 1024, 4096, 65536] {
        if entries > max {
            eprintln!("SKIP(ring {entries}): the host's maximum is {max} entries");
            continue;
        }
        // Eight laps of the ring in CPL0 stores: a soft-limit crossing inside an emulator
        // batch with more than the reserve left in it overruns the ring.
        let c = Cmdline {
            ws_mb: 8,
            dirty_mb: 1,
            reports: 8,
            tick_us: 1000,
            period_ticks: 2,
            exit: 5,
            boot_writes: u64::from(entries) * 8,
            isr_writes: 16,
            ..Cmdline::default()
        };
        let r = run(entries, &c, Duration::from_millis(20));
        eprintln!(
            "ring {entries}: {:?} overruns {} resyncs {} ring-full exits {} lost {} collects {}",
            r.status, r.overruns, r.resyncs, r.ring_full, r.lost, r.collects
        );
        assert_eq!(
            r.status,
            ExitStatus::PowerOff(5),
            "ring {entries}:\n{}",
            r.out
        );
        assert!(
            r.out.contains(&format!("boot writes {}\n", c.boot_writes)),
            "ring {entries}: the CPL0 boot stores completed:\n{}",
            r.out
        );
        assert_eq!(
            reports(&r.out),
            (1..=8).collect::<Vec<_>>(),
            "ring {entries}: every report, in order (no livelock):\n{}",
            r.out
        );
        // Whether a given run overruns depends on where the host's emulator batches end
        // (about 1 run in 6 of one size did not): an overrun detected is reported as lost
        // tracking, and over all sizes the overrun is forced.
        eprintln!("ring {entries}: {} overruns, lost {}", r.overruns, r.lost);
        if r.overruns > 0 {
            assert!(r.lost, "ring {entries}: a collect reported tracking lost");
        }
        forced += r.overruns;
    }
    assert!(forced > 0, "the CPL0 stores overran a ring at some size");
}

#[test]
fn guest_dirtying_fast_with_a_65536_ring_and_cpl0_interrupt_stores_never_stalls() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
    if max_ring_entries() < 65536 {
        eprintln!("SKIP(ring 65536): not offered by this host");
        return;
    }
    // CPL3 writes over 48 MiB, 16 MiB per report and one report per 4 ms timer tick, sleeping
    // in HLT until the tick (like the third-party guest of issue 14), plus 128 CPL0 stores in
    // every timer interrupt (an interrupt handler much longer than the tick would leave no
    // time for ring 3 at all); collected only every 4 s, so the ring fills and exits
    // ring-full, with interrupt-handler stores landing past the soft limit.
    let c = Cmdline {
        ws_mb: 48,
        dirty_mb: 16,
        reports: 600,
        tick_us: 4000,
        period_ticks: 1,
        exit: 9,
        isr_writes: 128,
        ..Cmdline::default()
    };
    let r = run(65536, &c, Duration::from_secs(4));
    eprintln!(
        "ring 65536: {:?} overruns {} resyncs {} ring-full exits {} lost {} collects {}",
        r.status, r.overruns, r.resyncs, r.ring_full, r.lost, r.collects
    );
    assert_eq!(r.status, ExitStatus::PowerOff(9), "{}", r.out);
    assert_eq!(
        reports(&r.out),
        (1..=600).collect::<Vec<_>>(),
        "the report counter advanced to the end (no stall):\n{}",
        r.out
    );
    assert!(
        r.ring_full > 0,
        "the ring filled (the regime under test was reached):\n{}",
        r.out
    );
    assert_eq!(
        r.lost,
        r.overruns > 0,
        "tracking is reported lost exactly when an overrun was detected"
    );
}
