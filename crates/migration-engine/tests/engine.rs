//! The engine on the fake VM (no `/dev/kvm` needed): the same source code path as a real
//! migration (job, sender, policy, switchover, commit) over loopback TCP to a fake
//! destination (a real `Decoder` into a `FakeVm`) or a scripted peer. Assertions are on
//! outcomes and decisions, never on how long something took.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{recorder, scripted_destination, statuses, wait_for, StallAt};
use kvm_dirty::{TrackerMode, PAGE_SIZE};
use migration::wire::Message;
use migration_engine::fake::{DestFault, FakeConfig, FakeDestination, FakeIncoming, FakeVm};
use migration_engine::{
    FailPoint, MigratableVm, MigrationError, MigrationJob, MigrationStatus, MigrationSummary,
    Outcome, SourceOptions, TimeoutAction,
};

/// A fake guest with two regions (one above 4 GiB), writing `rate` pages/s over a 512-page
/// working set.
fn guest(tracker: TrackerMode, rate: u64) -> Arc<FakeVm> {
    let vm = FakeVm::new(FakeConfig {
        regions: vec![(0, 2 << 20), (1 << 32, 4 << 20)],
        vcpus: 2,
        rate_pages_per_s: rate,
        working_set_pages: 768,
        tracker,
    })
    .unwrap();
    vm.start().unwrap();
    // The working set is populated before the migration starts.
    wait_until("guest warm-up", || vm.writes() >= 256);
    Arc::new(vm)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: never happened"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The fake guest runs (not paused, still writing).
fn assert_running(vm: &FakeVm, what: &str) {
    assert!(
        vm.is_running() && !vm.is_paused(),
        "{what}: source not running"
    );
    let w = vm.writes();
    wait_until(&format!("{what}: the guest writes on"), || vm.writes() > w);
}

type DestThread = std::thread::JoinHandle<Result<FakeIncoming, MigrationError>>;

fn destination(d: FakeDestination) -> (String, DestThread) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        d.receive(s)
    });
    (addr, h)
}

fn start(vm: &Arc<FakeVm>, addr: String, opts: SourceOptions) -> MigrationJob {
    MigrationJob::start(vm.clone(), addr, opts, Box::new(|_| {})).unwrap()
}

/// A migration held in pre-copy (a 1 ms downtime limit at `max_bandwidth` never fits),
/// returned once it has sent `passes` dirty passes; raise the limit to let it finish.
fn start_held(vm: &Arc<FakeVm>, addr: String, max_bandwidth: u64, passes: u32) -> MigrationJob {
    let opts = SourceOptions {
        downtime_limit: Duration::from_millis(1),
        max_bandwidth: Some(max_bandwidth),
        ..SourceOptions::default()
    };
    let job = start(vm, addr, opts);
    wait_for(&job, "dirty passes", |i| {
        i.x_ringvisor.as_ref().is_some_and(|x| x.pass >= passes)
    });
    job
}

/// Every page of the destination equals the source's.
fn assert_same_memory(src: &FakeVm, dst: &FakeVm) {
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
    for s in src.slots() {
        for p in 0..s.pages {
            let gpa = s.guest_phys_addr + p * PAGE_SIZE;
            src.read_page(gpa, &mut a).unwrap();
            dst.read_page(gpa, &mut b).unwrap();
            assert!(a == b, "page {gpa:#x} differs");
        }
    }
    assert_eq!(src.digest().unwrap(), dst.digest().unwrap());
}

/// A completed migration: the source is paused, the destination holds its memory and vCPU
/// state.
fn check_completed(vm: &FakeVm, s: &MigrationSummary, dest: DestThread) -> FakeIncoming {
    assert_eq!(s.outcome, Outcome::Completed, "{}", s.to_text());
    assert_eq!(s.verified, Some(true), "digests match");
    assert!(
        vm.is_paused(),
        "a completed source stays paused for its owner"
    );
    let inc = dest.join().unwrap().unwrap();
    assert_same_memory(vm, &inc.vm);
    assert_eq!(inc.vcpu_states, vm.save_vcpus().unwrap());
    assert_eq!(inc.pages, s.pages_sent);
    inc
}

#[test]
fn a_migration_completes_and_the_destination_memory_equals_the_source() {
    for tracker in [
        TrackerMode::Ring,
        TrackerMode::Bitmap,
        TrackerMode::ClearLog,
    ] {
        let vm = guest(tracker, 20_000);
        let (addr, dest) = destination(FakeDestination::default());
        let (ev, sink) = recorder();
        let job = MigrationJob::start(vm.clone(), addr, SourceOptions::default(), sink).unwrap();
        let s = job.wait();
        let inc = check_completed(&vm, &s, dest);
        assert_eq!(inc.passes as usize, s.iterations.len());
        assert_eq!(
            statuses(&ev),
            [
                MigrationStatus::Setup,
                MigrationStatus::Active,
                MigrationStatus::Device,
                MigrationStatus::Completed
            ]
        );
        vm.stop();
    }
}

#[test]
fn a_clear_log_bulk_pass_protects_each_chunk_just_before_reading_it() {
    // 2 MiB + 72 MiB: one 64 MiB chunk in the first region, two in the second.
    let vm = Arc::new(
        FakeVm::new(FakeConfig {
            regions: vec![(0, 2 << 20), (1 << 32, 72 << 20)],
            vcpus: 1,
            rate_pages_per_s: 0,
            working_set_pages: 0,
            tracker: TrackerMode::ClearLog,
        })
        .unwrap(),
    );
    vm.start().unwrap();
    for gpa in [0x3000, (1 << 32) + (70 << 20)] {
        vm.write_page(gpa, &[0xa5; 4096]).unwrap();
    }
    let (addr, dest) = destination(FakeDestination::default());
    let s = start(&vm, addr, SourceOptions::default()).wait();
    check_completed(&vm, &s, dest);
    assert_eq!(
        vm.reads_before_protect(),
        0,
        "no page is read before its chunk is protected"
    );
    assert_eq!(vm.protected_chunks(), 3, "one protect per 64 MiB chunk");
    assert_eq!(
        s.pages_sent,
        (74 << 20) / PAGE_SIZE,
        "every page sent once: the log's initial set never reached a collect"
    );
    vm.stop();
}

/// Cancels and checks the invariant: cancelled, the guest still writing on the source.
fn cancel_and_check(vm: &FakeVm, job: MigrationJob, what: &str) {
    job.cancel();
    let s = job.wait();
    assert_eq!(s.outcome, Outcome::Cancelled, "{what}: {}", s.to_text());
    assert_running(vm, what);
    assert_eq!(vm.throttle_percent(0), 0, "{what}: no throttle left");
}

#[test]
fn cancel_in_each_phase_leaves_the_source_running_and_the_guest_writing() {
    let vm = guest(TrackerMode::Ring, 20_000);
    // Setup, the Sync barrier and the paused device phase: a scripted peer stalls there.
    for (at, want) in [
        (StallAt::Accept, MigrationStatus::Setup),
        (StallAt::Sync, MigrationStatus::Active),
        (StallAt::Ready, MigrationStatus::Device),
    ] {
        let (addr, reached, _go, dest) = scripted_destination(at);
        let job = start(&vm, addr, SourceOptions::default());
        reached.recv().unwrap();
        wait_for(&job, "stall", |i| i.status == want);
        cancel_and_check(&vm, job, &format!("{at:?}"));
        assert!(
            matches!(dest.join().unwrap(), Ok(Message::Abort(_))),
            "{at:?}: the destination is told"
        );
    }
    // The bulk pass and a dirty pass: a real (fake-VM) destination drops what it received.
    let slow = SourceOptions {
        max_bandwidth: Some(256 << 10),
        downtime_limit: Duration::from_millis(1),
        ..SourceOptions::default()
    };
    for (what, min_pass) in [("bulk pass", 0), ("dirty pass", 2)] {
        let (addr, dest) = destination(FakeDestination::default());
        let opts = SourceOptions {
            max_bandwidth: Some(if min_pass == 0 { 256 << 10 } else { 16 << 20 }),
            ..slow.clone()
        };
        let job = start(&vm, addr, opts);
        wait_for(&job, what, |i| {
            i.x_ringvisor
                .as_ref()
                .is_some_and(|x| x.pass >= min_pass && x.pass_pages_sent > 0)
        });
        cancel_and_check(&vm, job, what);
        assert!(
            matches!(dest.join().unwrap(), Err(MigrationError::SourceAborted(_))),
            "{what}: the destination drops it"
        );
    }
}

#[test]
fn a_failure_at_each_fail_point_or_in_the_destination_keeps_the_source() {
    let vm = guest(TrackerMode::Ring, 20_000);
    for fp in [
        FailPoint::Handshake,
        FailPoint::BulkPass,
        FailPoint::DirtyPass,
        FailPoint::Switchover,
        FailPoint::BeforeFinalAck,
    ] {
        let (addr, dest) = destination(FakeDestination::default());
        let opts = SourceOptions {
            fail_at: Some(fp),
            // At least one dirty pass (the guest rewrites its working set during a paced bulk
            // pass), then a forced switchover.
            downtime_limit: Duration::from_millis(1),
            max_bandwidth: Some(8 << 20),
            max_iterations: 3,
            on_timeout: TimeoutAction::ForceSwitchover,
            ..SourceOptions::default()
        };
        let s = start(&vm, addr, opts).wait();
        assert!(
            matches!(
                s.outcome,
                Outcome::Failed {
                    source_running: true,
                    ..
                }
            ),
            "{fp:?}: {:?}",
            s.outcome
        );
        assert!(dest.join().unwrap().is_err(), "{fp:?}: no guest there");
        assert_running(&vm, &format!("{fp:?}"));
    }
    for fault in [DestFault::Refuse, DestFault::Restore] {
        let (addr, dest) = destination(FakeDestination { fault: Some(fault) });
        let s = start(&vm, addr, SourceOptions::default()).wait();
        match &s.outcome {
            Outcome::Failed {
                source_running: true,
                reason,
            } => assert!(reason.contains("on purpose"), "{fault:?}: {reason}"),
            o => panic!("{fault:?}: {o:?}"),
        }
        assert!(dest.join().unwrap().is_err());
        assert_running(&vm, &format!("{fault:?}"));
    }
    // And it still migrates.
    let (addr, dest) = destination(FakeDestination::default());
    let s = start(&vm, addr, SourceOptions::default()).wait();
    check_completed(&vm, &s, dest);
}

#[test]
fn a_live_downtime_limit_change_lets_a_non_converging_migration_switch_over() {
    let vm = guest(TrackerMode::Ring, 100_000);
    let (addr, dest) = destination(FakeDestination::default());
    // A 1 ms limit at 8 MiB/s with a guest rewriting 3 MiB at 100k pages/s: never fits.
    let job = start_held(&vm, addr, 8 << 20, 3);
    assert_eq!(job.info().status, MigrationStatus::Active, "not converged");
    job.set_options(|o| o.downtime_limit = Duration::from_secs(600));
    let s = job.wait();
    assert!(!s.forced_switchover);
    assert!(
        s.log.iter().any(|l| l.starts_with("converged")),
        "{:?}",
        s.log
    );
    assert_eq!(
        s.downtime_limit_ms, 1,
        "the summary keeps the starting parameters"
    );
    check_completed(&vm, &s, dest);
}

#[test]
fn lost_dirty_tracking_resends_all_memory() {
    let vm = guest(TrackerMode::Ring, 20_000);
    let total_pages: u64 = vm.slots().iter().map(|s| s.pages).sum();
    let (addr, dest) = destination(FakeDestination::default());
    let job = start_held(&vm, addr, 32 << 20, 1);
    // The next collect drops what it found and reports the loss.
    vm.lose_tracking_once();
    wait_for(&job, "the loss noticed", |i| {
        i.x_ringvisor
            .as_ref()
            .is_some_and(|x| x.tracking_lost_events == 1)
    });
    job.set_options(|o| o.downtime_limit = Duration::from_secs(600));
    let s = job.wait();
    assert_eq!(s.tracking_lost_events, 1);
    assert!(
        s.log.iter().any(|l| l.contains("lost")),
        "logged: {:?}",
        s.log
    );
    // Every page, sent by that pass or (the tail that would fit, rule 8) by the next.
    assert!(
        s.iterations[1..]
            .iter()
            .any(|i| i.pages + i.deferred_pages == total_pages),
        "a pass after the loss resends every page: {:?}",
        s.iterations
            .iter()
            .map(|i| (i.pages, i.deferred_pages))
            .collect::<Vec<_>>()
    );
    // Only a full resend makes the memory equal: the lost pages were never reported.
    check_completed(&vm, &s, dest);
}

#[test]
fn a_ring_overrun_no_index_shows_fails_before_the_commit_and_the_guest_stays() {
    // From some point every collect loses its pages silently and counts a ring-full exit
    // (PVM's emulator overwriting a full ring). The guest writes 20,000 pages a second, so
    // pages written after that point never reach the destination, whatever the timing: only
    // the digest can tell. It is checked before the commit, the destination refuses, and
    // the source's guest runs on.
    let vm = guest(TrackerMode::Ring, 20_000);
    let (addr, dest) = destination(FakeDestination::default());
    let job = start_held(&vm, addr, 32 << 20, 1);
    vm.lose_silently();
    let writes = vm.writes();
    wait_until("the guest writes after the loss", || vm.writes() > writes);
    job.set_options(|o| o.downtime_limit = Duration::from_secs(600));
    let s = job.wait();
    assert!(
        matches!(s.outcome, Outcome::Failed { .. }),
        "{}",
        s.to_text()
    );
    assert!(
        s.log
            .iter()
            .any(|l| l.contains("checked before the commit")),
        "logged: {:?}",
        s.log
    );
    assert!(!vm.is_paused(), "the source's guest runs on");
    let before = vm.writes();
    wait_until("the guest writes on", || vm.writes() > before);
    assert!(
        dest.join().unwrap().is_err(),
        "the destination discarded it"
    );
}

#[test]
fn auto_converge_throttles_a_non_converging_guest_and_cancel_lifts_it() {
    // As in QEMU, the throttle does not depend on the tracker: the ring gets it too.
    for tracker in [TrackerMode::Bitmap, TrackerMode::Ring] {
        let vm = guest(tracker, 100_000);
        let (addr, _dest) = destination(FakeDestination::default());
        let opts = SourceOptions {
            downtime_limit: Duration::from_millis(1),
            max_bandwidth: Some(8 << 20),
            auto_converge: true,
            cpu_throttle_initial: 40,
            ..SourceOptions::default()
        };
        let job = start(&vm, addr, opts);
        wait_for(&job, "a throttle", |i| i.cpu_throttle_percentage.is_some());
        let p = vm.throttle_percent(1);
        assert!(
            p >= 40 && (p - 40).is_multiple_of(10),
            "{tracker:?}: cpu-throttle-initial first, then +10% steps: {p}"
        );
        cancel_and_check(&vm, job, "auto-converge");
    }
}

#[test]
fn a_live_dirty_limit_change_reaches_the_vcpus_at_the_next_pass() {
    let vm = guest(TrackerMode::Ring, 20_000);
    let (addr, dest) = destination(FakeDestination::default());
    let opts = SourceOptions {
        downtime_limit: Duration::from_millis(1),
        max_bandwidth: Some(16 << 20),
        ..SourceOptions::default()
    };
    let job = start(&vm, addr, opts);
    wait_for(&job, "a dirty pass", |i| {
        i.x_ringvisor.as_ref().is_some_and(|x| x.pass >= 1)
    });
    assert_eq!(vm.dirty_quota(0), None);
    // Above what the guest dirties, so pre-copy still does not converge.
    job.set_options(|o| o.dirty_limit = migration_engine::DirtyLimitMode::Fixed(64 << 20));
    wait_for(&job, "the limit", |i| {
        i.x_ringvisor
            .as_ref()
            .is_some_and(|x| x.dirty_limit_bytes_per_s == Some(64 << 20))
    });
    assert_eq!(vm.dirty_quota(0), Some(16384), "64 MiB/s = 16384 pages/s");
    assert_eq!(vm.dirty_quota(1), Some(16384));
    job.set_options(|o| o.dirty_limit = migration_engine::DirtyLimitMode::Off);
    wait_for(&job, "the limit lifted", |i| {
        i.x_ringvisor
            .as_ref()
            .is_some_and(|x| x.dirty_limit_bytes_per_s.is_none())
    });
    assert_eq!(vm.dirty_quota(0), None);
    job.set_options(|o| o.downtime_limit = Duration::from_secs(600));
    let s = job.wait();
    check_completed(&vm, &s, dest);
}

#[test]
fn a_completed_fake_migration_never_resumes_the_source_even_if_cancelled_after_commit() {
    let vm = guest(TrackerMode::Ring, 5_000);
    let (addr, reached, go, dest) = scripted_destination(StallAt::Resumed);
    let opts = SourceOptions {
        verify: false,
        ..SourceOptions::default()
    };
    let job = start(&vm, addr, opts);
    reached.recv().unwrap();
    job.cancel();
    go.send(()).unwrap();
    let s = job.wait();
    assert_eq!(s.outcome, Outcome::Completed);
    assert!(matches!(dest.join().unwrap(), Ok(Message::Commit)));
    assert!(vm.is_paused(), "completed: the source stays paused");
}

/// `migration::convergence` rule 7: a hot set that never fits (1 ms limit; 3 MiB passes of
/// ~50 ms at 64 MiB/s, so ~20 a second unpaced) is re-collected at most once a second instead
/// of in a tight loop of short passes. (An upper bound on passes in a window: a slow machine
/// only makes fewer.)
#[test]
fn a_non_converging_hot_set_is_recollected_at_most_once_a_second() {
    let vm = guest(TrackerMode::Ring, 100_000);
    let (addr, dest) = destination(FakeDestination::default());
    let opts = SourceOptions {
        downtime_limit: Duration::from_millis(1),
        max_bandwidth: Some(64 << 20),
        ..SourceOptions::default()
    };
    let job = start(&vm, addr, opts);
    let pass = |job: &MigrationJob| job.info().x_ringvisor.map_or(0, |x| x.pass);
    wait_for(&job, "two dirty passes", |i| {
        i.x_ringvisor.as_ref().is_some_and(|x| x.pass >= 2)
    });
    let p0 = pass(&job);
    std::thread::sleep(Duration::from_millis(2500));
    let p1 = pass(&job);
    assert!(
        p1 - p0 <= 3,
        "{} passes in 2.5 s while not converging (paced: at most one a second)",
        p1 - p0
    );
    assert_eq!(job.info().status, MigrationStatus::Active, "not converged");
    job.set_options(|o| o.downtime_limit = Duration::from_secs(600));
    let s = job.wait();
    check_completed(&vm, &s, dest);
}

#[test]
fn a_page_corrupted_past_the_checksums_is_caught_by_the_complete_digest_before_resume() {
    let vm = guest(TrackerMode::Ring, 20_000);
    // Verified before the commit: the source sends its digest in Complete, and the
    // destination compares it with what it stored before answering ReadyToResume.
    let opts = SourceOptions {
        verify: true,
        verify_before_commit: true,
        ..SourceOptions::default()
    };
    let (addr, dest) = destination(FakeDestination {
        fault: Some(DestFault::CorruptPage),
    });
    let s = start(&vm, addr, opts.clone()).wait();
    match &s.outcome {
        Outcome::Failed {
            source_running: true,
            reason,
        } => assert!(reason.contains("destination failed"), "{reason}"),
        o => panic!("expected a refused migration, got {o:?}"),
    }
    let e = dest
        .join()
        .unwrap()
        .expect_err("no guest on the destination");
    assert!(matches!(e, MigrationError::Digest(_)), "{e}");
    assert_running(&vm, "after a digest mismatch");
    // Without the corruption the same options complete (the digest matches).
    let (addr, dest) = destination(FakeDestination::default());
    let s = start(&vm, addr, opts).wait();
    check_completed(&vm, &s, dest);
}

#[test]
fn each_pass_reports_the_guest_faults_taken_during_it_and_they_sum_to_the_migration_total() {
    let vm = guest(TrackerMode::Ring, 20_000);
    let before = vm.guest_faults().unwrap();
    let (addr, dest) = destination(FakeDestination::default());
    // Held in pre-copy for a few passes, each re-protecting the pages the guest rewrites.
    let job = start_held(&vm, addr, 8 << 20, 3);
    job.set_options(|o| o.downtime_limit = Duration::from_secs(600));
    let s = job.wait();
    check_completed(&vm, &s, dest);
    // The source stays paused and untracked after the commit: its counter is final.
    let taken = vm.guest_faults().unwrap() - before;
    let per_pass: Vec<u64> = s
        .iterations
        .iter()
        .map(|it| it.guest_faults.expect("the fake counts faults"))
        .collect();
    assert_eq!(
        per_pass.iter().sum::<u64>(),
        taken,
        "the passes partition the migration's faults: {per_pass:?}"
    );
    assert_eq!(s.guest_faults, Some(taken));
    // Deltas, not the running counter: several passes had faults, and their sum is still the
    // total (a running count would add the earlier passes' faults again).
    assert!(
        per_pass.iter().filter(|&&f| f > 0).count() >= 2,
        "{per_pass:?}"
    );
    vm.stop();
}
