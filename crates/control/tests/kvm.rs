//! The control plane driving real guests on `/dev/kvm`: a migration between two services,
//! a destination that cannot be reached, stop/cont, and the standing dirty limit across
//! migrations. Each test prints `SKIP(kvm)` without `/dev/kvm`.

use std::time::{Duration, Instant};

use control::{RunState, ServiceConfig, VmService};
use migration::params::{MigrateSetParameters, MigrationCapabilityStatus};
use migration_engine::{DestOptions, MigrationStatus};
use serde_json::{json, Map, Value};
use vmm::{Pattern, RegionSpec, Tracking, Vm, VmConfig};

const DATA_GPA: u64 = 1 << 32;

fn kvm() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; control-plane KVM test not run");
        return false;
    }
    true
}

/// A started 2-vCPU workload guest of 64 MiB dirtying `rate` bytes/s over 16 MiB.
fn guest(tracking: Tracking, rate: u64) -> Vm {
    let mut vm = Vm::create(&VmConfig {
        vcpus: 2,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes: 64 << 20,
            log_dirty: true,
        }],
        tracking,
    })
    .unwrap();
    vm.set_split_workload(DATA_GPA, (16 << 20) / 4096, Pattern::Random, rate / 4096, 2)
        .unwrap();
    vm.start(None).unwrap();
    vm
}

fn ring() -> Tracking {
    Tracking::Ring { entries: 4096 }
}

fn exec(s: &VmService, name: &str, args: Value) -> Result<Value, qmp::CommandError> {
    let map = match args {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    s.execute_command(name, map)
}

fn writes(s: &VmService) -> u64 {
    let g = exec(s, "x-ringvisor-query-guest", Value::Null).unwrap();
    g["writes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_u64().unwrap())
        .sum()
}

/// Polls `query-migrate` until its status is final (a hang guard, not a time bound).
fn wait_final(s: &VmService) -> Value {
    let t0 = Instant::now();
    loop {
        let info = exec(s, "query-migrate", Value::Null).unwrap();
        let st = info["status"].as_str().unwrap_or("");
        if ["completed", "failed", "cancelled"].contains(&st) {
            return info;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "stuck: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the guest's write counters move: waits for them (a busy host may starve the vCPU
/// threads for a while; the 60 s bound only catches a guest that stopped).
fn grows(s: &VmService) -> bool {
    let a = writes(s);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
        if writes(s) > a {
            return true;
        }
    }
    false
}

#[test]
fn a_migration_between_two_services_completes_and_run_states_follow() {
    if !kvm() {
        return;
    }
    let src = VmService::with_guest(guest(ring(), 8 << 20), ServiceConfig::default());
    src.start_monitor().unwrap();
    let dst = VmService::incoming(
        DestOptions {
            tracking: ring(),
            ..DestOptions::default()
        },
        ServiceConfig::default(),
    );
    dst.start_monitor().unwrap();
    let addr = dst.migrate_incoming("tcp:127.0.0.1:0").unwrap();
    assert_eq!(dst.run_state(), RunState::Inmigrate);
    // Under a 4 MiB/s cap the 64 MiB guest takes long enough to see the job refuse a second
    // migrate and take a new bandwidth live.
    exec(
        &src,
        "migrate-set-parameters",
        json!({"max-bandwidth": 4 << 20}),
    )
    .unwrap();
    exec(&src, "migrate", json!({"uri": format!("tcp:{addr}")})).unwrap();
    let e = exec(&src, "migrate", json!({"uri": format!("tcp:{addr}")})).unwrap_err();
    assert_eq!(e.desc, "There's a migration process in progress");
    let e = exec(&src, "stop", Value::Null).unwrap_err();
    assert_eq!(e.desc, "There's a migration process in progress");
    exec(&src, "migrate-set-parameters", json!({"max-bandwidth": 0})).unwrap();
    let info = wait_final(&src);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(info["downtime"].is_u64() && info["total-time"].is_u64());
    assert_eq!(
        exec(&src, "query-status", Value::Null).unwrap()["status"],
        "postmigrate"
    );
    let e = exec(&src, "cont", Value::Null).unwrap_err();
    assert!(e.desc.contains("migrated away"), "{e:?}");
    let passes = exec(&src, "x-ringvisor-query-migration-passes", Value::Null).unwrap();
    assert_eq!(passes["status"], "completed");
    assert!(!passes["passes"].as_array().unwrap().is_empty());
    assert_eq!(passes["verified"], true);
    // The destination runs the guest, and reports what it received.
    let t0 = Instant::now();
    while dst.run_state() != RunState::Running {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = exec(&dst, "query-migrate", Value::Null).unwrap();
    assert_eq!(info["status"], "completed");
    assert!(info["ram"]["transferred"].as_u64().unwrap() > 0);
    assert!(grows(&dst), "the received guest runs");
    assert!(dst.incoming_summary().is_some());
}

#[test]
fn an_unreachable_destination_fails_the_job_and_the_guest_keeps_running_here() {
    if !kvm() {
        return;
    }
    let src = VmService::with_guest(guest(ring(), 8 << 20), ServiceConfig::default());
    src.start_monitor().unwrap();
    for uri in ["tcp:127.0.0.1:1", "tcp:notanaddr.invalid:4444"] {
        exec(&src, "migrate", json!({ "uri": uri })).unwrap();
        let info = wait_final(&src);
        assert_eq!(info["status"], "failed", "{uri}: {info}");
        let desc = info["error-desc"].as_str().unwrap();
        assert!(desc.starts_with("connecting to "), "{uri}: {desc}");
        assert_eq!(src.run_state(), RunState::Running);
        assert!(grows(&src), "{uri}: the guest keeps running on the source");
    }
}

#[test]
fn stop_pauses_the_guest_cont_resumes_it_and_a_paused_guest_is_not_migrated() {
    if !kvm() {
        return;
    }
    let src = VmService::with_guest(guest(ring(), 8 << 20), ServiceConfig::default());
    exec(&src, "stop", Value::Null).unwrap();
    let st = exec(&src, "query-status", Value::Null).unwrap();
    assert_eq!(
        st,
        json!({"status": "paused", "running": false, "singlestep": false})
    );
    let a = writes(&src);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(writes(&src), a, "a paused guest does not write");
    let e = exec(&src, "migrate", json!({"uri": "tcp:127.0.0.1:1"})).unwrap_err();
    assert!(e.desc.contains("paused"), "{e:?}");
    assert!(src.migration_info().is_none(), "nothing started");
    exec(&src, "cont", Value::Null).unwrap();
    assert_eq!(src.run_state(), RunState::Running);
    assert!(grows(&src));
}

#[test]
fn a_standing_dirty_limit_is_kept_during_a_migration_and_restored_after_one_with_its_own() {
    if !kvm() {
        return;
    }
    let src = VmService::with_guest(guest(ring(), 32 << 20), ServiceConfig::default());
    src.start_monitor().unwrap();
    exec(
        &src,
        "set-vcpu-dirty-limit",
        json!({"dirty-rate": 4, "cpu-index": 1}),
    )
    .unwrap();
    let e = exec(
        &src,
        "set-vcpu-dirty-limit",
        json!({"dirty-rate": 5, "cpu-index": 0}),
    )
    .unwrap_err();
    assert!(e.desc.contains("one dirty-rate limit"), "{e:?}");
    let want = json!([{"cpu-index": 1, "limit-rate": 4}]);
    let limits = |s: &VmService| {
        let mut v = exec(s, "query-vcpu-dirty-limit", Value::Null).unwrap();
        for e in v.as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("current-rate");
        }
        v
    };
    assert_eq!(limits(&src), want);
    // Without the dirty-limit capability the standing limit stays in force throughout.
    src.set_parameters(&MigrateSetParameters {
        max_bandwidth: Some(1 << 20),
        ..Default::default()
    })
    .unwrap();
    exec(&src, "migrate", json!({"uri": "tcp:127.0.0.1:1"})).unwrap();
    assert_eq!(limits(&src), want);
    assert_eq!(wait_final(&src)["status"], "failed");
    assert_eq!(limits(&src), want);
    // With it, the migration's own limiter takes over, and the standing limit comes back
    // when the migration fails.
    src.set_capabilities(&[MigrationCapabilityStatus {
        capability: migration::params::MigrationCapability::DirtyLimit,
        state: true,
    }])
    .unwrap();
    exec(&src, "migrate", json!({"uri": "tcp:127.0.0.1:1"})).unwrap();
    assert_eq!(wait_final(&src)["status"], "failed");
    assert_eq!(limits(&src), want);
    assert_eq!(
        src.migration_info().map(|i| i.status),
        Some(MigrationStatus::Failed)
    );
    // The limiter holds vCPU 1 to its quota again: measured over a window, not timed.
    std::thread::sleep(Duration::from_millis(1500));
    let v = exec(&src, "query-vcpu-dirty-limit", Value::Null).unwrap();
    assert!(v[0]["current-rate"].as_u64().unwrap() <= 8, "{v}");
    exec(&src, "cancel-vcpu-dirty-limit", Value::Null).unwrap();
    assert_eq!(limits(&src), json!([]));
}

#[test]
fn dirty_ring_measurement_reports_every_vcpu_and_a_wrong_mode_is_refused() {
    if !kvm() {
        return;
    }
    let src = VmService::with_guest(guest(ring(), 32 << 20), ServiceConfig::default());
    let e = exec(
        &src,
        "calc-dirty-rate",
        json!({"calc-time": 1, "mode": "dirty-bitmap"}),
    )
    .unwrap_err();
    assert!(
        e.desc.contains("not enabled with the ring tracker"),
        "{e:?}"
    );
    exec(
        &src,
        "calc-dirty-rate",
        json!({"calc-time": 500, "calc-time-unit": "millisecond", "mode": "dirty-ring"}),
    )
    .unwrap();
    let e = exec(&src, "calc-dirty-rate", json!({"calc-time": 1})).unwrap_err();
    assert!(e.desc.contains("already being measured"), "{e:?}");
    let t0 = Instant::now();
    let r = loop {
        let r = exec(
            &src,
            "query-dirty-rate",
            json!({"calc-time-unit": "millisecond"}),
        )
        .unwrap();
        if r["status"] == "measured" {
            break r;
        }
        assert_eq!(r["status"], "measuring");
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(r["calc-time"], 500);
    assert_eq!(r["mode"], "dirty-ring");
    assert!(r["dirty-rate"].as_u64().unwrap() > 0, "{r}");
    let per = r["vcpu-dirty-rate"].as_array().unwrap();
    assert_eq!(per.len(), 2);
    assert_eq!(per[1]["id"], 1);
}

#[test]
fn qmp_replicates_the_guest_to_a_standby_refuses_a_migration_meanwhile_and_stops_cleanly() {
    if !kvm() {
        return;
    }
    use migration_engine::replicate::{run_standby, PrimaryEnd, StandbyOptions, VmImage};
    let src = VmService::with_guest(guest(ring(), 8 << 20), ServiceConfig::default());
    src.start_monitor().unwrap();
    assert_eq!(
        exec(&src, "x-ringvisor-query-replication", Value::Null).unwrap()["status"],
        "none"
    );
    let e = exec(
        &src,
        "x-ringvisor-replicate",
        json!({"uri": "tcp:127.0.0.1:1", "checkpoint-delay": 0}),
    )
    .unwrap_err();
    assert!(e.desc.contains("checkpoint-delay"), "{}", e.desc);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let standby = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut make = |h: &migration::wire::Hello, lay: &migration::wire::MemoryLayout| {
            VmImage::create(h, lay, ring(), &vmm::SerialOutput::Capture)
        };
        run_standby(s, &StandbyOptions::default(), &mut make, &mut |_| {}).unwrap()
    });
    exec(
        &src,
        "x-ringvisor-replicate",
        json!({"uri": format!("tcp:{addr}"), "checkpoint-delay": 20}),
    )
    .unwrap();
    let t0 = Instant::now();
    let info = loop {
        let info = exec(&src, "x-ringvisor-query-replication", Value::Null).unwrap();
        if info["acked_epoch"].as_u64().unwrap_or(0) >= 3 {
            break info;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "stuck: {info}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(info["status"], "active");
    assert_eq!(info["checkpoint-delay"], 20);
    let e = exec(&src, "migrate", json!({"uri": "tcp:127.0.0.1:1"})).unwrap_err();
    assert!(e.desc.contains("replication is in progress"), "{}", e.desc);
    let e = exec(
        &src,
        "x-ringvisor-replicate",
        json!({"uri": format!("tcp:{addr}")}),
    )
    .unwrap_err();
    assert!(e.desc.contains("replication is in progress"), "{}", e.desc);
    exec(&src, "x-ringvisor-replicate-stop", Value::Null).unwrap();
    let (_, rep) = standby.join().unwrap();
    assert!(
        matches!(rep.end, PrimaryEnd::Shutdown { .. }),
        "{:?}",
        rep.end
    );
    let t0 = Instant::now();
    let info = loop {
        let info = exec(&src, "x-ringvisor-query-replication", Value::Null).unwrap();
        if info["status"] == "stopped" {
            break info;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "stuck: {info}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(info["acked_epoch"].as_u64(), rep.last.map(|c| c.epoch));
    assert!(grows(&src), "the guest runs on after replication stopped");
}
