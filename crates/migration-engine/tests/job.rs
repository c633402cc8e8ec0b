//! The migration job on real KVM over loopback TCP: cancel in each phase, live
//! `max-bandwidth`, the `query-migrate` shape. Each test prints `SKIP(kvm)` without
//! `/dev/kvm`.
//!
//! Where a phase is too short to hit by waiting (setup, the Sync barrier, the paused device
//! phase, the commit), the destination is a scripted peer that speaks the protocol (a real
//! `Decoder`, pages into a null sink) and stops answering at that point.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::wire::Message;
use migration_engine::{
    receive, DestOptions, JobEvent, MigrationError, MigrationJob, MigrationStatus, Outcome,
    SourceOptions,
};
use vmm::{Pattern, RegionSpec, Tracking, Vm, VmConfig};

mod common;
use common::{recorder, scripted_destination, statuses, wait_for, StallAt};

const DATA_GPA: u64 = 1 << 32;

fn have_kvm() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; migration job test not run");
        return false;
    }
    true
}

/// A running guest: `mib` MiB, 2 vCPUs dirtying a `hot_mib` hot set at `rate` pages/s.
fn guest(tracking: Tracking, mib: u64, hot_mib: u64, rate: u64) -> Arc<Vm> {
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
    // Long enough for the hot set to be populated, so the bulk pass carries data.
    std::thread::sleep(Duration::from_millis(300));
    Arc::new(vm)
}

fn total_writes(vm: &Vm) -> u64 {
    (0..vm.config().vcpus)
        .map(|i| vm.nr_writes(i).unwrap())
        .sum()
}

/// The guest makes progress (its vCPUs run).
fn assert_running(vm: &Vm, what: &str) {
    vm.vcpus().unwrap().check().unwrap();
    let w = total_writes(vm);
    let t = Instant::now();
    while total_writes(vm) == w {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: the source guest does not run"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

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
                progress_timeout: Duration::from_secs(30),
                ..DestOptions::default()
            },
            &mut |_| {},
        )
    });
    (addr, h)
}

/// Cancels, waits and checks the invariant: cancelled, source running, the events end in
/// cancelling -> cancelled.
fn cancel_and_check(vm: &Arc<Vm>, job: MigrationJob, ev: &Mutex<Vec<JobEvent>>, what: &str) {
    job.cancel();
    assert!(
        matches!(
            job.info().status,
            MigrationStatus::Cancelling | MigrationStatus::Cancelled
        ),
        "{what}: {:?}",
        job.info()
    );
    let s = job.wait();
    assert_eq!(s.outcome, Outcome::Cancelled, "{what}");
    let st = statuses(ev);
    assert_eq!(
        &st[st.len() - 2..],
        &[MigrationStatus::Cancelling, MigrationStatus::Cancelled],
        "{what}: {st:?}"
    );
    assert_running(vm, what);
}

#[test]
fn cancel_during_setup_sends_abort_and_keeps_the_guest() {
    if !have_kvm() {
        return;
    }
    let vm = guest(Tracking::Ring { entries: 4096 }, 32, 8, 10_000);
    let (addr, reached, _go, dest) = scripted_destination(StallAt::Accept);
    let (ev, sink) = recorder();
    let job = MigrationJob::start(vm.clone(), addr, SourceOptions::default(), sink).unwrap();
    reached.recv().unwrap();
    assert_eq!(job.info().status, MigrationStatus::Setup);
    cancel_and_check(&vm, job, &ev, "setup");
    assert!(
        matches!(dest.join().unwrap(), Ok(Message::Abort(_))),
        "the destination is told"
    );
    assert_eq!(
        statuses(&ev),
        [
            MigrationStatus::Setup,
            MigrationStatus::Cancelling,
            MigrationStatus::Cancelled
        ]
    );
}

#[test]
fn a_refused_connection_is_a_failed_job_and_the_guest_keeps_running() {
    if !have_kvm() {
        return;
    }
    let vm = guest(Tracking::Bitmap, 32, 8, 10_000);
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (ev, sink) = recorder();
    let job = MigrationJob::start(vm.clone(), addr, SourceOptions::default(), sink).unwrap();
    let s = job.wait();
    assert!(
        matches!(s.outcome, Outcome::Failed { .. }),
        "{:?}",
        s.outcome
    );
    assert_eq!(
        statuses(&ev),
        [MigrationStatus::Setup, MigrationStatus::Failed]
    );
    assert_running(&vm, "refused");
}

#[test]
fn cancel_during_the_bulk_pass_and_a_dirty_pass_keeps_the_guest_and_the_destination_drops_it() {
    if !have_kvm() {
        return;
    }
    let tracking = Tracking::Ring { entries: 4096 };
    let vm = guest(tracking, 64, 32, 20_000);
    // Bulk pass: 32 MiB of data at 4 MiB/s lasts seconds.
    let (addr, dest) = destination(tracking);
    let (ev, sink) = recorder();
    let opts = SourceOptions {
        max_bandwidth: Some(4 << 20),
        ..SourceOptions::default()
    };
    let job = MigrationJob::start(vm.clone(), addr, opts, sink).unwrap();
    let i = wait_for(&job, "bulk pass", |i| {
        i.status == MigrationStatus::Active
            && i.x_ringvisor
                .as_ref()
                .is_some_and(|x| x.pass == 0 && x.pass_pages_sent > 0)
    });
    assert_eq!(i.ram.as_ref().unwrap().dirty_sync_count, 1);
    cancel_and_check(&vm, job, &ev, "bulk pass");
    assert!(
        matches!(dest.join().unwrap(), Err(MigrationError::SourceAborted(_))),
        "the destination drops what it received"
    );
    // A dirty pass: a 1 ms downtime limit never converges with a guest dirtying 16 MiB.
    let (addr, dest) = destination(tracking);
    let (ev, sink) = recorder();
    let opts = SourceOptions {
        downtime_limit: Duration::from_millis(1),
        max_bandwidth: Some(64 << 20),
        ..SourceOptions::default()
    };
    let job = MigrationJob::start(vm.clone(), addr, opts, sink).unwrap();
    wait_for(&job, "dirty pass", |i| {
        i.x_ringvisor
            .as_ref()
            .is_some_and(|x| x.pass >= 2 && x.pass_pages_sent > 0)
    });
    cancel_and_check(&vm, job, &ev, "dirty pass");
    assert!(matches!(
        dest.join().unwrap(),
        Err(MigrationError::SourceAborted(_))
    ));
    let passes: Vec<u32> = ev
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            JobEvent::Pass { pass } => Some(*pass),
            _ => None,
        })
        .collect();
    assert!(passes.len() >= 3, "{passes:?}");
    assert!(
        passes.iter().enumerate().all(|(i, p)| *p == i as u32 + 1),
        "MIGRATION_PASS counts 1, 2, 3, ...: {passes:?}"
    );
}

#[test]
fn cancel_while_waiting_for_synced_and_while_paused_keeps_the_guest() {
    if !have_kvm() {
        return;
    }
    let tracking = Tracking::Ring { entries: 4096 };
    let vm = guest(tracking, 32, 4, 2_000);
    for at in [StallAt::Sync, StallAt::Ready] {
        let (addr, reached, _go, dest) = scripted_destination(at);
        let (ev, sink) = recorder();
        let job = MigrationJob::start(vm.clone(), addr, SourceOptions::default(), sink).unwrap();
        reached.recv().unwrap();
        let want = match at {
            StallAt::Sync => MigrationStatus::Active,
            _ => MigrationStatus::Device,
        };
        wait_for(&job, "stall", |i| i.status == want);
        cancel_and_check(&vm, job, &ev, &format!("{at:?}"));
        assert!(
            matches!(dest.join().unwrap(), Ok(Message::Abort(_))),
            "{at:?}: the destination is told"
        );
    }
}

#[test]
fn cancel_after_commit_is_too_late_and_the_source_stays_paused() {
    if !have_kvm() {
        return;
    }
    let tracking = Tracking::Bitmap;
    let vm = guest(tracking, 32, 4, 2_000);
    let (addr, reached, go, dest) = scripted_destination(StallAt::Resumed);
    let (ev, sink) = recorder();
    let opts = SourceOptions {
        verify: false,
        ..SourceOptions::default()
    };
    let job = MigrationJob::start(vm.clone(), addr, opts, sink).unwrap();
    reached.recv().unwrap();
    job.cancel();
    assert_eq!(job.info().status, MigrationStatus::Device, "cancel ignored");
    go.send(()).unwrap();
    let s = job.wait();
    assert_eq!(s.outcome, Outcome::Completed);
    assert!(matches!(dest.join().unwrap(), Ok(Message::Commit)));
    assert_eq!(
        statuses(&ev),
        [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::Device,
            MigrationStatus::Completed
        ]
    );
    // Completed means "stop me": the vCPUs are parked, the owner stops the VM.
    let w = total_writes(&vm);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(total_writes(&vm), w, "the source stays paused");
    let mut vm = Arc::try_unwrap(vm).expect("the job released the VM");
    vm.stop().unwrap();
}

/// `max-bandwidth` raised while the bulk pass runs: the throughput the job reports follows
/// (below the old cap before, above it after).
#[test]
fn live_max_bandwidth_change_is_followed_by_the_reported_throughput() {
    if !have_kvm() {
        return;
    }
    let tracking = Tracking::Ring { entries: 4096 };
    let vm = guest(tracking, 96, 64, 40_000);
    let (addr, dest) = destination(tracking);
    let (ev, sink) = recorder();
    let slow: u64 = 4 << 20;
    let fast: u64 = 16 << 20;
    let opts = SourceOptions {
        max_bandwidth: Some(slow),
        ..SourceOptions::default()
    };
    let job = MigrationJob::start(vm.clone(), addr, opts, sink).unwrap();
    let mbps = |job: &MigrationJob, n: usize| -> Vec<f64> {
        (0..n)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(150));
                job.info().ram.unwrap().mbps
            })
            .collect()
    };
    // Sampled once a throughput window has closed.
    wait_for(&job, "bulk pass", |i| {
        i.ram.as_ref().is_some_and(|r| r.mbps > 0.0)
    });
    let before = mbps(&job, 6);
    job.set_options(|o| o.max_bandwidth = Some(fast));
    // Let the window at the old rate pass.
    std::thread::sleep(Duration::from_millis(400));
    let after = mbps(&job, 6);
    // Still pre-copy (the final pass, with the guest paused, ignores the cap).
    let still_precopy = job.info().status == MigrationStatus::Active;
    cancel_and_check(&vm, job, &ev, "bandwidth");
    let _ = dest.join();
    let cap_mbps = |b: u64| b as f64 * 8.0 / 1e6;
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    eprintln!("mbps at {slow}: {before:?}; at {fast}: {after:?}");
    assert!(still_precopy, "pre-copy must still run for the comparison");
    assert!(
        med(&before) <= cap_mbps(slow) * 1.25,
        "the reported rate respects the old cap: {before:?}"
    );
    assert!(
        med(&after) > cap_mbps(slow) * 1.5,
        "the reported rate follows the raised cap: {after:?}"
    );
}

#[test]
fn a_completed_job_reports_like_query_migrate() {
    if !have_kvm() {
        return;
    }
    let tracking = Tracking::Ring { entries: 4096 };
    let vm = guest(tracking, 32, 8, 10_000);
    let (addr, dest) = destination(tracking);
    let (ev, sink) = recorder();
    let job = MigrationJob::start(vm.clone(), addr, SourceOptions::default(), sink).unwrap();
    while !job.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let info = job.info();
    let s = job.wait();
    assert_eq!(s.outcome, Outcome::Completed, "{:?}", s.outcome);
    let (dvm, _) = dest.join().unwrap().unwrap();
    assert_eq!(info.status, MigrationStatus::Completed);
    let ram = info.ram.as_ref().unwrap();
    assert_eq!(ram.transferred, s.bytes_sent);
    assert_eq!(ram.duplicate, s.zero_pages);
    assert_eq!(ram.normal, s.pages_sent - s.zero_pages);
    assert_eq!(ram.precopy_bytes + ram.downtime_bytes, ram.transferred);
    assert!(
        ram.downtime_bytes > 0,
        "the final pass and state are downtime bytes"
    );
    assert_eq!(
        ram.total,
        (32 + 4) << 20,
        "data region plus the 4 MiB system region"
    );
    // One sync per pass, plus the collect that decided to switch over.
    assert_eq!(ram.dirty_sync_count, s.iterations.len() as u64 + 1);
    assert_eq!(info.x_ringvisor.as_ref().unwrap().verified, Some(true));
    let j = serde_json::to_value(&info).unwrap();
    assert_eq!(j["status"], "completed");
    for k in [
        "total-time",
        "setup-time",
        "downtime",
        "expected-downtime",
        "x-ringvisor",
    ] {
        assert!(j.get(k).is_some(), "{k} in {j}");
    }
    assert!(j.get("error-desc").is_none());
    assert!(j["ram"].get("dirty-sync-count").is_some());
    assert_eq!(
        statuses(&ev),
        [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::Device,
            MigrationStatus::Completed
        ]
    );
    drop(dvm);
}
