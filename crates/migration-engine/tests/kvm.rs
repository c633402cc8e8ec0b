//! Live migration on real KVM over real TCP (loopback). Each test prints `SKIP(kvm)` without
//! `/dev/kvm`; `.ci/run` rejects skips on a machine that has it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use migration_engine::{
    receive, DestOptions, FailPoint, MigrationError, Outcome, SourceOptions, TimeoutAction,
};
use vmm::{Pattern, RegionSpec, Tracking, Vm, VmConfig};

const DATA_GPA: u64 = 1 << 32;

fn have_kvm() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; migration test not run");
        return false;
    }
    true
}

/// A running guest: `mib` MiB, 2 vCPUs dirtying a `hot_mib` hot set at `rate` pages/s.
fn guest(tracking: Tracking, mib: u64, hot_mib: u64, rate: u64) -> Vm {
    let mut vm = Vm::create(&VmConfig {
        vcpus: 2,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes: mib << 20,
            log_dirty: true,
        }],
        tracking,
    })
    .unwrap();
    vm.set_dirty_workload(DATA_GPA, (hot_mib << 20) / 4096, Pattern::Random, rate)
        .unwrap();
    vm.start(None).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vm
}

fn total_writes(vm: &Vm) -> u64 {
    (0..vm.config().vcpus)
        .map(|i| vm.nr_writes(i).unwrap())
        .sum()
}

/// Runs a destination on a thread; returns its address and the join handle.
type DestThread =
    std::thread::JoinHandle<Result<(Vm, migration_engine::IncomingSummary), MigrationError>>;

fn destination(tracking: Tracking) -> (String, DestThread) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        receive(
            s,
            &DestOptions {
                tracking,
                progress_timeout: Duration::from_secs(20),
                ..DestOptions::default()
            },
            &mut |_| {},
        )
    });
    (addr, h)
}

fn migrate_ok(tracking: Tracking, rate: u64) {
    let mut src = guest(tracking, 64, 16, rate);
    let before = total_writes(&src);
    let (addr, dest) = destination(tracking);
    let s = migration_engine::migrate(
        &mut src,
        TcpStream::connect(&addr).unwrap(),
        &SourceOptions {
            // A hang guard: a niced migration thread starved on a busy host switches over
            // at 60 s instead of chasing the guest for ever.
            timeout: Some(Duration::from_secs(60)),
            on_timeout: TimeoutAction::ForceSwitchover,
            ..SourceOptions::default()
        },
        &mut |_| {},
    )
    .unwrap();
    eprintln!("{}", s.to_text());
    assert_eq!(s.outcome, Outcome::Completed, "{:?}", s.outcome);
    assert_eq!(s.verified, Some(true), "memory digests must match");
    // A switchover happened (its length is the benchmarks' to measure).
    assert!(s.downtime_ms > 0.0, "{}", s.downtime_ms);
    // KVM counts the guest's page faults for every pass (vmm::Vm::guest_faults); a dirtying
    // guest takes write-protect faults on the pages each collect re-protected.
    assert!(s.iterations.iter().all(|it| it.guest_faults.is_some()));
    if rate > 0 {
        assert!(
            s.guest_faults.is_some_and(|f| f > 0),
            "{:?}",
            s.guest_faults
        );
    }
    assert!(
        src.vcpus().is_err(),
        "the source VM stopped after the commit"
    );
    let (vm, sum) = dest.join().unwrap().unwrap();
    assert_eq!(sum.pages, s.pages_sent);
    let at_resume = total_writes(&vm);
    assert!(
        at_resume >= before,
        "the destination continues from the source's state"
    );
    vm.vcpus().unwrap().check().unwrap();
    if rate > 0 {
        // The guest makes progress on the destination: wait for its counter to move (how
        // soon depends on the CPU it gets on a busy host; the bound only catches a hang).
        let t = std::time::Instant::now();
        while total_writes(&vm) <= at_resume {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the guest made no progress on the destination in 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vm.vcpus().unwrap().check().unwrap();
    }
}

#[test]
fn migrate_ring_dirtying_guest() {
    if !have_kvm() {
        return;
    }
    migrate_ok(Tracking::Ring { entries: 4096 }, 20_000);
}

#[test]
fn migrate_bitmap_and_clear_log_dirtying_guests_and_an_idle_one() {
    if !have_kvm() {
        return;
    }
    migrate_ok(Tracking::Bitmap, 20_000);
    migrate_ok(Tracking::ClearLog, 20_000);
    migrate_ok(Tracking::Ring { entries: 65536 }, 0);
}

#[test]
fn connection_dropped_at_each_point_keeps_the_source_running_and_it_can_migrate_again() {
    if !have_kvm() {
        return;
    }
    let tracking = Tracking::Ring { entries: 4096 };
    let mut src = guest(tracking, 32, 8, 20_000);
    for fp in [
        FailPoint::Handshake,
        FailPoint::BulkPass,
        FailPoint::DirtyPass,
        FailPoint::Switchover,
        FailPoint::BeforeFinalAck,
    ] {
        let (addr, dest) = destination(tracking);
        let opts = SourceOptions {
            fail_at: Some(fp),
            // Keep at least one dirty pass so DirtyPass is reached: a 1 ms limit and a
            // 50 MB/s cap (the bulk pass then lasts long enough for the guest to dirty its
            // hot set again).
            downtime_limit: Duration::from_millis(1),
            max_bandwidth: Some(50_000_000),
            timeout: Some(Duration::from_secs(3)),
            on_timeout: TimeoutAction::ForceSwitchover,
            ..SourceOptions::default()
        };
        let s = migration_engine::migrate(
            &mut src,
            TcpStream::connect(&addr).unwrap(),
            &opts,
            &mut |_| {},
        )
        .unwrap();
        match &s.outcome {
            Outcome::Failed {
                source_running: true,
                reason,
            } => eprintln!("{fp:?}: source kept the guest: {reason}"),
            o => panic!("{fp:?}: expected a failure with the source running, got {o:?}"),
        }
        let d = dest.join().unwrap();
        assert!(d.is_err(), "{fp:?}: no guest may run on the destination");
        eprintln!("{fp:?}: destination: {}", d.err().unwrap());
        let w = total_writes(&src);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            total_writes(&src) > w,
            "{fp:?}: the source guest still runs"
        );
    }
    // And it can still migrate.
    let (addr, dest) = destination(tracking);
    let s = migration_engine::migrate(
        &mut src,
        TcpStream::connect(&addr).unwrap(),
        &SourceOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(s.outcome, Outcome::Completed);
    assert_eq!(s.verified, Some(true));
    dest.join().unwrap().unwrap();
}

#[test]
fn timeout_abort_keeps_the_guest_on_the_source() {
    if !have_kvm() {
        return;
    }
    let tracking = Tracking::Bitmap;
    // 1 MiB/s link, a guest dirtying 16 MiB as fast as it can: never converges.
    let mut src = guest(tracking, 32, 16, vmm::UNPACED);
    let (addr, dest) = destination(tracking);
    let s = migration_engine::migrate(
        &mut src,
        TcpStream::connect(&addr).unwrap(),
        &SourceOptions {
            max_bandwidth: Some(8 << 20),
            timeout: Some(Duration::from_millis(1500)),
            on_timeout: TimeoutAction::Abort,
            ..SourceOptions::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(
        matches!(s.outcome, Outcome::Aborted { .. }),
        "{:?}",
        s.outcome
    );
    assert!(
        dest.join().unwrap().is_err(),
        "the destination saw the abort"
    );
    let w = total_writes(&src);
    std::thread::sleep(Duration::from_millis(50));
    assert!(total_writes(&src) > w);
}

/// A proxy that flips one byte of the source's stream: the destination rejects the frame
/// (checksum), tells the source, and the source keeps its guest.
#[test]
fn a_flipped_byte_is_rejected_and_the_source_keeps_running() {
    if !have_kvm() {
        return;
    }
    let tracking = Tracking::Ring { entries: 4096 };
    let mut src = guest(tracking, 32, 8, 10_000);
    let (dest_addr, dest) = destination(tracking);
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    let p = std::thread::spawn(move || {
        let (mut from_src, _) = proxy.accept().unwrap();
        let mut to_dest = TcpStream::connect(dest_addr).unwrap();
        let mut back_src = from_src.try_clone().unwrap();
        let mut back_dest = to_dest.try_clone().unwrap();
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dest, &mut back_src);
        });
        let mut buf = [0u8; 65536];
        let mut off = 0u64;
        let flip_at = 300_000u64;
        loop {
            let n = match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if off <= flip_at && flip_at < off + n as u64 {
                buf[(flip_at - off) as usize] ^= 0x10;
            }
            off += n as u64;
            if to_dest.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_dest.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
    });
    let s = migration_engine::migrate(
        &mut src,
        TcpStream::connect(&proxy_addr).unwrap(),
        &SourceOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let d = dest.join().unwrap();
    let e = d.expect_err("the destination rejects the stream");
    assert!(e.to_string().contains("checksum"), "{e}");
    assert!(
        matches!(
            s.outcome,
            Outcome::Failed {
                source_running: true,
                ..
            }
        ),
        "{:?}",
        s.outcome
    );
    let _ = p.join();
}

/// A peer speaking another protocol version, and garbage: typed errors, no guest.
#[test]
fn version_mismatch_and_garbage_are_typed_errors_on_the_destination() {
    if !have_kvm() {
        return;
    }
    for bytes in [
        {
            let mut v = migration::wire::MAGIC.to_vec();
            v.extend_from_slice(&99u32.to_le_bytes());
            v.extend_from_slice(&[0u8; 4]);
            v
        },
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ] {
        let (addr, dest) = destination(Tracking::Bitmap);
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&bytes).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let e = dest.join().unwrap().expect_err("rejected");
        eprintln!("{e}");
        assert!(matches!(e, MigrationError::Wire(_)), "{e:?}");
        // The destination told us why.
        let mut reply = Vec::new();
        let _ = c.read_to_end(&mut reply);
    }
}

/// With a 50 MB/s per-vCPU quota, a vCPU dirtying 400 MB/s is held by the dirty limit and a
/// computing vCPU never is (no hold, no throttle time, zero held fraction), with a small and a
/// large ring; cancelling releases at once. Decisions only: how much the quota slows each
/// vCPU is `ringvisor bench dirtylimit`'s to measure, and the token bucket's page bound is
/// unit-tested in `dirtylimit`.
#[test]
fn dirty_limit_holds_the_quota_at_any_ring_size_and_spares_slow_vcpus() {
    if !have_kvm() {
        return;
    }
    use migration_engine::{DirtyLimiter, LimiterConfig};
    use std::sync::atomic::Ordering::Relaxed;
    for entries in [4096u32, 65536] {
        let mut vm = Vm::create(&VmConfig {
            vcpus: 2,
            memory: vec![RegionSpec {
                slot: 1,
                gpa: DATA_GPA,
                bytes: 1 << 30,
                log_dirty: true,
            }],
            tracking: Tracking::Ring { entries },
        })
        .unwrap();
        // vCPU 0 dirties 400 MB/s (97656 pages/s) sequentially over 512 MiB; vCPU 1 computes.
        vm.set_split_workload(DATA_GPA, (512 << 20) / 4096, Pattern::Sequential, 97_656, 1)
            .unwrap();
        vm.start(None).unwrap();
        let quota = 50_000_000u64; // 50 MB/s = 12207 pages/s
        assert_eq!(vm.dirty_logging_users(), 0, "dirty logging is off at boot");
        let mut l = DirtyLimiter::start(&vm, LimiterConfig::default()).unwrap();
        assert_eq!(
            vm.dirty_logging_users(),
            1,
            "the limiter holds dirty logging"
        );
        l.set_quota(Some(quota), None);
        let v = vm.vcpu_handles().to_vec();
        // Liveness bound, not a measurement: the fast vCPU exceeds its budget within
        // ~125 ms of running at its pace.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while v[0].counters.holds.load(Relaxed) < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Keep both running under the limit for a while: the computing vCPU must stay free.
        let c0 = vm.nr_writes(1).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let computed = vm.nr_writes(1).unwrap() - c0;
        let held = l.held_fraction();
        eprintln!(
            "ring {entries}: holds {} / {}, throttle ns {} / {}, held fraction {held:?}, vCPU1 computed {computed}",
            v[0].counters.holds.load(Relaxed),
            v[1].counters.holds.load(Relaxed),
            v[0].counters.throttle_ns.load(Relaxed),
            v[1].counters.throttle_ns.load(Relaxed),
        );
        assert!(
            v[0].counters.holds.load(Relaxed) >= 3,
            "ring {entries}: the vCPU over its quota was not held"
        );
        assert!(v[0].counters.throttle_ns.load(Relaxed) > 0);
        assert_eq!(
            v[1].counters.holds.load(Relaxed),
            0,
            "a vCPU under quota is never held"
        );
        assert_eq!(v[1].counters.throttle_ns.load(Relaxed), 0);
        assert_eq!(v[1].throttle(), 0.0, "a vCPU under quota is not throttled");
        assert_eq!(
            held.get(1),
            Some(&0.0),
            "held fraction of the computing vCPU"
        );
        assert!(computed > 0, "the computing vCPU kept running");
        // Cancelling lifts the throttle at once.
        l.set_quota(None, None);
        assert_eq!(v[0].throttle(), 0.0);
        l.stop();
        assert_eq!(
            vm.dirty_logging_users(),
            0,
            "off again once the limiter stops"
        );
        vm.stop().unwrap();
    }
}

/// On a slow link a guest dirtying faster than the link: `dirty-limit auto` (ring) and
/// auto-converge (bitmap) throttle it, the migration ends with the guest on the destination
/// and equal memory, and the throttle is gone after the switchover. Whether it converged
/// before the (forcing) timeout is printed; how fast it converges is `bench dirtylimit`'s.
#[test]
fn auto_dirty_limit_and_auto_converge_throttle_a_slow_link_migration_that_ends_on_the_destination_with_nothing_lost(
) {
    if !have_kvm() {
        return;
    }
    for (tracking, limit, ac) in [
        (
            Tracking::Ring { entries: 65536 },
            migration_engine::DirtyLimitMode::Auto,
            false,
        ),
        (
            Tracking::Bitmap,
            migration_engine::DirtyLimitMode::Off,
            true,
        ),
    ] {
        let mut src = guest(tracking, 64, 32, 15_000); // ~60 MB/s over 32 MiB
        let (addr, dest) = destination(tracking);
        let s = migration_engine::migrate(
            &mut src,
            TcpStream::connect(&addr).unwrap(),
            &SourceOptions {
                max_bandwidth: Some(16 << 20),
                // Whether pre-copy converges before this depends on the CPU the guest and
                // the (niced) migration thread get on a busy host: the benchmarks measure
                // it. The test asserts the decisions: the throttle was applied, and the
                // migration ends with the guest on the destination and nothing lost.
                timeout: Some(Duration::from_secs(40)),
                on_timeout: migration_engine::TimeoutAction::ForceSwitchover,
                dirty_limit: limit,
                auto_converge: ac,
                ..SourceOptions::default()
            },
            &mut |_| {},
        )
        .unwrap();
        eprintln!("{}", s.to_text());
        eprintln!("converged without forcing: {}", !s.forced_switchover);
        assert_eq!(s.outcome, Outcome::Completed, "{:?}", s.outcome);
        assert!(s.dirty_limit_events >= 1, "the throttle was applied");
        assert_eq!(s.verified, Some(true));
        let (vm, _) = dest.join().unwrap().unwrap();
        assert!(vm.vcpu_handles().iter().all(|v| v.throttle() == 0.0));
    }
}

/// Dirty-rate accuracy: vCPU 0 dirties 10000 pages/s, vCPU 1 only computes. The ring reports
/// that rate within 5% on vCPU 0 and near zero on vCPU 1; the bitmap (on a bitmap VM) and page
/// sampling estimates are reported beside it.
#[test]
fn ring_dirty_rate_is_exact_per_vcpu_and_bitmap_and_sampling_agree() {
    if !have_kvm() {
        return;
    }
    use migration_engine::dirtyrate::{self, BitmapWindow, RingWindow};
    // vCPU 0 writes one new page per write (sequential over 64Ki pages: no page twice in the
    // windows here) and counts its writes; vCPU 1 computes, rewriting one page of its own.
    // Each window opens and closes with the vCPUs paused, so the guest's own counters say
    // exactly which data pages were dirtied in it. Besides those, a vCPU dirties its control
    // page (its counter) and its own page in the system region, and its accesses set the
    // accessed/dirty bits in the guest's page tables: the page-table pages the sweep crosses
    // (one per 512 pages) and the levels above them (directory, PDPT, PML4).
    // Those extra pages are few but not exactly predictable (where a sweep starts in a table,
    // host-side page splits, the window's count coming back as rate x seconds, rounded): the
    // bound allows 32 of them per vCPU, against thousands of data pages.
    const SYSTEM_PAGES: u64 = 32;
    let table_updates = |data: u64| data.div_ceil(512) + 1 + 3;
    let mk = |tracking| {
        let mut vm = Vm::create(&VmConfig {
            vcpus: 2,
            memory: vec![RegionSpec {
                slot: 1,
                gpa: DATA_GPA,
                bytes: 256 << 20,
                log_dirty: true,
            }],
            tracking,
        })
        .unwrap();
        vm.set_split_workload(DATA_GPA, (256 << 20) / 4096, Pattern::Sequential, 10_000, 1)
            .unwrap();
        vm.start(None).unwrap();
        vm
    };
    let pause = |vm: &Vm| {
        vm.vcpus()
            .unwrap()
            .pause_all(Duration::from_secs(10))
            .unwrap()
    };
    let writes = |vm: &Vm| [vm.nr_writes(0).unwrap(), vm.nr_writes(1).unwrap()];
    let run = |vm: &Vm| {
        vm.vcpus().unwrap().resume_all();
        std::thread::sleep(Duration::from_millis(500));
        pause(vm);
    };
    let count = |pps: f64, secs: f64| (pps * secs).round() as u64;

    let mut vm = mk(Tracking::Ring { entries: 65536 });
    pause(&vm);
    let w0 = writes(&vm);
    let win = RingWindow::open(&vm).unwrap();
    run(&vm);
    let r = win.close().unwrap();
    let w1 = writes(&vm);
    assert_eq!(
        vm.dirty_logging_users(),
        0,
        "the measurement released dirty logging"
    );
    let per = r.vcpu_pages_per_s.clone().unwrap();
    let ring = [count(per[0], r.window_s), count(per[1], r.window_s)];
    let data = w1[0] - w0[0];
    eprintln!("ring: {ring:?} pages; vCPU 0 wrote {data} pages, vCPU 1 computed");
    assert!(data > 0, "vCPU 0 wrote nothing");
    assert!(
        (data..=data + SYSTEM_PAGES + table_updates(data)).contains(&ring[0]),
        "vCPU 0: the ring saw {} pages, the guest wrote {data}",
        ring[0]
    );
    assert!(
        ring[1] <= SYSTEM_PAGES + table_updates(0),
        "vCPU 1 dirties only its own pages: {}",
        ring[1]
    );
    // Sampling (an estimate) against the guest's counter over a window that contains it: the
    // error is statistical, within five standard deviations of the sample.
    vm.vcpus().unwrap().resume_all();
    let w0 = writes(&vm);
    let s = dirtyrate::measure_sample(&vm, Duration::from_millis(500), 8192, 3).unwrap();
    let data = (writes(&vm)[0] - w0[0]) as f64;
    vm.stop().unwrap();
    let est = s.pages_per_s * s.window_s;
    let total = ((256u64 << 20) + vmm::x86::SYSTEM_BYTES) as f64 / 4096.0;
    let n = s.sampled_pages.unwrap() as f64;
    let p = (data / total).clamp(0.0, 1.0);
    let sigma = total * (p * (1.0 - p) / n).sqrt();
    eprintln!(
        "sampling: {est:.0} pages from {n} samples; the guest wrote {data} (sigma {sigma:.0})"
    );
    // The counter's window contains the sampling window (how much larger depends on the
    // CPU this thread gets), so the estimate is bounded above by it, and it sees writes.
    assert!(
        est <= data + 5.0 * sigma + SYSTEM_PAGES as f64,
        "sampling estimate {est:.0} pages, the guest wrote {data}"
    );
    assert!(
        est > 0.0,
        "sampling saw no dirty page; the guest wrote {data}"
    );

    let mut vm = mk(Tracking::Bitmap);
    pause(&vm);
    let w0 = writes(&vm);
    let win = BitmapWindow::open(&vm).unwrap();
    run(&vm);
    let b = win.close().unwrap();
    let w1 = writes(&vm);
    vm.stop().unwrap();
    let bitmap = count(b.pages_per_s, b.window_s);
    let data = w1[0] - w0[0];
    eprintln!("bitmap: {bitmap} pages; vCPU 0 wrote {data}");
    assert!(data > 0, "vCPU 0 wrote nothing");
    assert!(
        (data..=data + 2 * SYSTEM_PAGES + table_updates(data) + table_updates(0)).contains(&bitmap),
        "the bitmap saw {bitmap} pages, the guest wrote {data}"
    );
}
