//! The secure set-up of the README between real processes: `ringvisor tls-creds` writes the
//! credentials, `ringvisor incoming --tls-creds --tls-authz` waits, a source whose client
//! certificate comes from another CA is refused (its guest keeps running, the destination
//! keeps waiting), and `ringvisor migrate --tls-creds` then completes with matching digests.
//! Needs /dev/kvm (else `SKIP(kvm)`).

mod common;

use common::*;
use serde_json::Value;

#[test]
fn tls_creds_then_a_tls_migration_between_processes_refuses_a_foreign_certificate_and_completes() {
    let dir = Dir::new("tls");
    let creds = dir.path("creds");
    let creds_s = creds.to_str().expect("utf-8 path").to_string();
    let out = cli(&["tls-creds", "--dir", &creds_s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for f in [
        "ca-cert.pem",
        "server-cert.pem",
        "server-key.pem",
        "client-cert.pem",
        "client-key.pem",
    ] {
        assert!(creds.join(f).exists(), "{f} missing: {}", text(&out));
    }
    // Existing credentials are never overwritten silently.
    let out = cli(&["tls-creds", "--dir", &creds_s]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    if !have_kvm("CLI TLS migration test") {
        return;
    }
    // A rogue source: trusts the destination's CA, but its certificate is from another.
    let rogue = dir.path("rogue");
    let rogue_s = rogue.to_str().expect("utf-8 path").to_string();
    let out = cli(&["tls-creds", "--dir", &rogue_s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::fs::copy(creds.join("ca-cert.pem"), rogue.join("ca-cert.pem")).expect("copy CA");

    let (mut dst, addr) =
        spawn_destination(&["--tls-creds", &creds_s, "--tls-authz", "ringvisor-client"]);
    let src = spawn_vm(&dir, "src", &guest_args("8M"));
    let qmp = src.qmp.to_str().expect("utf-8 path").to_string();
    let to = format!("tcp:{addr}");
    let mut c = client(&src);

    let out = cli(&[
        "migrate",
        "--qmp",
        &qmp,
        "--to",
        &to,
        "--tls-creds",
        &rogue_s,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v["query-migrate"]["status"], "failed", "{v}");
    assert!(guest_runs(&mut c), "the guest keeps running on the source");
    assert_eq!(
        exit_code_now(&mut dst),
        None,
        "the destination keeps waiting"
    );

    let out = cli(&[
        "migrate",
        "--qmp",
        &qmp,
        "--to",
        &to,
        "--tls-creds",
        &creds_s,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v["query-migrate"]["status"], "completed", "{v}");
    assert_eq!(v["x-ringvisor-summary"]["verified"], true, "{v}");
    let p = c
        .execute("query-migrate-parameters", Value::Null)
        .expect("query-migrate-parameters");
    assert_eq!(p["tls-creds"], creds_s.as_str(), "{p}");
    let _ = dst.kill();
    let _ = dst.wait();
}

/// The exit code if the process has already exited, `None` while it runs.
fn exit_code_now(child: &mut std::process::Child) -> Option<i32> {
    child
        .try_wait()
        .ok()
        .flatten()
        .map(|s| s.code().unwrap_or(-1))
}
