//! The engine over TLS on real KVM and loopback TCP: a job with a client certificate to a
//! destination that requires one completes with matching digests and the destination sees
//! the source's identity; a cancel while the TLS handshake waits for a silent peer keeps the
//! guest running. Each test prints `SKIP(kvm)` without `/dev/kvm`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_engine::{
    receive, DestOptions, MigrationJob, MigrationStatus, Outcome, SourceOptions,
};
use vmm::{Pattern, RegionSpec, Tracking, Vm, VmConfig};

mod common;
use common::{recorder, statuses};

const DATA_GPA: u64 = 1 << 32;

fn have_kvm() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; TLS engine test not run");
        return false;
    }
    true
}

/// A running 32 MiB guest with 2 vCPUs dirtying an 8 MiB hot set.
fn guest() -> Arc<Vm> {
    let mut vm = Vm::create(&VmConfig {
        vcpus: 2,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes: 32 << 20,
            log_dirty: true,
        }],
        tracking: Tracking::Ring { entries: 4096 },
    })
    .unwrap();
    vm.set_dirty_workload(DATA_GPA, (8 << 20) / 4096, Pattern::Random, 10_000)
        .unwrap();
    vm.start(None).unwrap();
    // Long enough for the hot set to be populated, so the bulk pass carries data.
    std::thread::sleep(Duration::from_millis(300));
    Arc::new(vm)
}

fn writes(vm: &Vm) -> u64 {
    (0..vm.config().vcpus)
        .map(|i| vm.nr_writes(i).unwrap())
        .sum()
}

fn assert_running(vm: &Vm, what: &str) {
    let w = writes(vm);
    let t = Instant::now();
    while writes(vm) == w {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: the guest does not run"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn creds(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("engine-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = tls::GenerateOptions {
        client_name: "src-1".into(),
        ..Default::default()
    };
    tls::generate(&dir, &opts).unwrap();
    dir
}

#[test]
fn a_tls_job_completes_with_matching_digests_and_the_destination_requires_the_client_cert() {
    if !have_kvm() {
        return;
    }
    let dir = creds("ok");
    let server = tls::ServerTls::load(&dir, &["src-1".into()]).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let dest = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let opts = DestOptions {
            tracking: Tracking::Ring { entries: 4096 },
            tls: Some(server),
            ..DestOptions::default()
        };
        receive(s, &opts, &mut |_| {}).map(|(_vm, sum)| sum)
    });
    let vm = guest();
    let opts = SourceOptions {
        tls: Some(tls::ClientTls::load(&dir, &[], None).unwrap()),
        ..SourceOptions::default()
    };
    let (ev, sink) = recorder();
    let job = MigrationJob::start(vm.clone(), addr, opts, sink).unwrap();
    let s = job.wait();
    assert_eq!(s.outcome, Outcome::Completed, "{:?}", s.outcome);
    assert_eq!(s.verified, Some(true), "the digests match");
    assert_eq!(statuses(&ev).last(), Some(&MigrationStatus::Completed));
    let sum = dest
        .join()
        .unwrap()
        .expect("the destination received the guest");
    assert!(sum.pages > 0 && sum.bytes > 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cancel_while_the_tls_handshake_waits_keeps_the_guest_running() {
    if !have_kvm() {
        return;
    }
    let dir = creds("cancel");
    // A peer that accepts the connection and never answers the ClientHello.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let silent = std::thread::spawn(move || l.accept().map(|(s, _)| s));
    let vm = guest();
    let opts = SourceOptions {
        tls: Some(tls::ClientTls::load(&dir, &[], None).unwrap()),
        ..SourceOptions::default()
    };
    let (ev, sink) = recorder();
    let job = MigrationJob::start(vm.clone(), addr, opts, sink).unwrap();
    let _held = silent.join().unwrap().unwrap();
    // Connected: the job thread is in (or about to enter) the TLS handshake. The cancel
    // shuts the socket's read side, which ends the handshake's wait at once.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(job.info().status, MigrationStatus::Setup);
    job.cancel();
    let s = job.wait();
    assert_eq!(s.outcome, Outcome::Cancelled, "{:?}", s.outcome);
    // `setup`, then `cancelling` before `cancelled` (a status change and its event are one
    // step, so a job that ends at once cannot report `cancelled` first).
    let st = statuses(&ev);
    assert_eq!(
        st,
        [
            MigrationStatus::Setup,
            MigrationStatus::Cancelling,
            MigrationStatus::Cancelled
        ],
        "{st:?}"
    );
    assert_running(&vm, "cancelled TLS handshake");
    let _ = std::fs::remove_dir_all(dir);
}
