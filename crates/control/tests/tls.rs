//! TLS on the migration channel between two services with real guests on `/dev/kvm`:
//! one destination refuses a plaintext source, a client certificate from another CA and an
//! identity `tls-authz` does not list, keeps listening after each (the source keeps its
//! guest each time), and then receives the guest from the right source with matching
//! digests. Each test prints `SKIP(kvm)` without `/dev/kvm`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use control::{RunState, ServiceConfig, VmService};
use migration_engine::DestOptions;
use serde_json::{json, Map, Value};
use vmm::{Pattern, RegionSpec, Tracking, Vm, VmConfig};

const DATA_GPA: u64 = 1 << 32;

fn kvm() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; TLS migration test not run");
        return false;
    }
    true
}

/// A started 2-vCPU workload guest of 64 MiB dirtying 8 MiB/s over 16 MiB.
fn guest() -> Vm {
    let mut vm = Vm::create(&VmConfig {
        vcpus: 2,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes: 64 << 20,
            log_dirty: true,
        }],
        tracking: Tracking::Ring { entries: 4096 },
    })
    .unwrap();
    vm.set_split_workload(DATA_GPA, (16 << 20) / 4096, Pattern::Random, 2048, 2)
        .unwrap();
    vm.start(None).unwrap();
    vm
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

/// Whether the guest's write counters move (the bound only catches a stopped guest).
fn grows(s: &VmService) -> bool {
    let a = writes(s);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
        if writes(s) > a {
            return true;
        }
    }
    false
}

/// Polls `query-migrate` until `done` holds (a hang guard, not a time bound).
fn wait_for(s: &VmService, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let info = exec(s, "query-migrate", Value::Null).unwrap();
        if done(&info) {
            return info;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "stuck: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_final(info: &Value) -> bool {
    ["completed", "failed", "cancelled"].contains(&info["status"].as_str().unwrap_or(""))
}

fn creds(tag: &str, client: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("control-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = tls::GenerateOptions {
        client_name: client.into(),
        ..Default::default()
    };
    tls::generate(&dir, &opts).unwrap();
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Starts a migration from `src` with these TLS parameters and waits for its end; returns
/// `query-migrate` and checks the guest still runs on the source when it failed.
fn attempt(src: &VmService, uri: &str, tls_creds: &str, authz: &str) -> Value {
    exec(
        src,
        "migrate-set-parameters",
        json!({"tls-creds": tls_creds, "tls-authz": authz}),
    )
    .unwrap();
    exec(src, "migrate", json!({ "uri": uri })).unwrap();
    let info = wait_for(src, is_final);
    if info["status"] != "completed" {
        assert_eq!(src.run_state(), RunState::Running, "{info}");
        assert!(grows(src), "the guest keeps running on the source: {info}");
    }
    info
}

/// The destination has counted `n` failed connections and listens again.
fn refused(dst: &VmService, n: u64) -> String {
    let info = wait_for(dst, |i| i["x-ringvisor-failed-attempts"] == n);
    assert_eq!(dst.run_state(), RunState::Inmigrate);
    info["x-ringvisor-last-error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_tls_destination_refuses_plain_foreign_and_unauthorized_sources_then_takes_the_right_one() {
    if !kvm() {
        return;
    }
    let good = creds("good", "src-good");
    // A rogue source that trusts the destination's CA but whose own certificate comes
    // from another CA.
    let rogue = creds("rogue", "src-good");
    std::fs::copy(good.join(tls::CA_CERT), rogue.join(tls::CA_CERT)).unwrap();

    let dst = VmService::incoming(
        DestOptions {
            tracking: Tracking::Ring { entries: 4096 },
            ..DestOptions::default()
        },
        ServiceConfig::default(),
    );
    dst.start_monitor().unwrap();
    exec(
        &dst,
        "migrate-set-parameters",
        json!({"tls-creds": path(&good), "tls-authz": "someone-else"}),
    )
    .unwrap();
    let addr = dst.migrate_incoming("tcp:127.0.0.1:0").unwrap();
    let uri = format!("tcp:{addr}");
    let src = VmService::with_guest(guest(), ServiceConfig::default());
    src.start_monitor().unwrap();

    // 1. Plain text to a TLS destination.
    let info = attempt(&src, &uri, "", "");
    assert_eq!(info["status"], "failed", "{info}");
    // The destination answers with a TLS alert, which the source recognizes.
    let desc = info["error-desc"].as_str().unwrap();
    assert!(desc.contains("the destination requires TLS"), "{desc}");
    let why = refused(&dst, 1);
    assert!(why.contains("TLS handshake"), "{why}");

    // 2. A client certificate from another CA.
    let info = attempt(&src, &uri, path(&rogue), "");
    assert_eq!(info["status"], "failed", "{info}");
    let why = refused(&dst, 2);
    assert!(why.contains("TLS handshake"), "{why}");

    // 3. A valid certificate whose identity tls-authz does not list: the source is told.
    let info = attempt(&src, &uri, path(&good), "");
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap();
    assert!(desc.contains("not authorized"), "{desc}");
    let why = refused(&dst, 3);
    assert!(
        why.contains("src-good") && why.contains("not authorized"),
        "{why}"
    );

    // 4. The operator allows it (read at the next connection) and the guest arrives, its
    //    memory digest checked by both sides.
    exec(
        &dst,
        "migrate-set-parameters",
        json!({"tls-authz": "src-good"}),
    )
    .unwrap();
    let info = attempt(&src, &uri, path(&good), "localhost");
    assert_eq!(info["status"], "completed", "{info}");
    let passes = exec(&src, "x-ringvisor-query-migration-passes", Value::Null).unwrap();
    assert_eq!(passes["verified"], true, "{passes}");
    let t0 = Instant::now();
    while dst.run_state() != RunState::Running {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(grows(&dst), "the received guest runs");
    let _ = std::fs::remove_dir_all(good);
    let _ = std::fs::remove_dir_all(rogue);
}
