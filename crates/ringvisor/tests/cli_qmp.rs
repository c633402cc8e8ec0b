//! The CLI as a QMP client of real VM processes: `migrate --detach`, `status` during the
//! migration (pass, bytes sent, remaining, rate), `cancel` (the guest keeps running on the
//! source), a later `migrate --json` that completes, `quit`; exit statuses 0/1/2; `--json`
//! output is one JSON document. Needs /dev/kvm (else `SKIP(kvm)`).

mod common;

use common::*;
use serde_json::Value;

#[test]
fn status_during_a_migration_shows_its_progress_and_cancel_keeps_the_guest_on_the_source() {
    if !have_kvm("CLI QMP client test") {
        return;
    }
    let dir = Dir::new("status");
    let src = spawn_vm(&dir, "src", &guest_args("16M"));
    let (mut dst, addr) = spawn_destination(&[]);
    let qmp = src.qmp.to_str().expect("utf-8 path").to_string();
    let to = format!("tcp:{addr}");
    let out = cli(&[
        "migrate",
        "--qmp",
        &qmp,
        "--to",
        &to,
        "--max-bandwidth",
        "2M",
        "--detach",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut c = client(&src);
    wait_status(&mut c, &["active"]);
    let out = cli(&["status", "--qmp", &qmp]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("run state: running"), "{s}");
    let line = s
        .lines()
        .find(|l| l.starts_with("migration: active"))
        .unwrap_or_else(|| panic!("{s}"));
    for part in [" | pass ", " | sent ", " MiB | remaining ", " MiB/s"] {
        assert!(line.contains(part), "{line}");
    }
    let out = cli(&["status", "--qmp", &qmp, "--json"]);
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v["migration"]["status"], "active");
    assert!(v["migration"]["ram"]["transferred"].as_u64().unwrap() > 0);
    // Cancel: exit 0, the guest keeps running here.
    let out = cli(&["cancel", "--qmp", &qmp]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cancelled"),
        "{}",
        text(&out)
    );
    let st = c.execute("query-status", Value::Null).unwrap();
    assert_eq!(st["status"], "running");
    assert!(
        guest_runs(&mut c),
        "the source's guest keeps writing after the cancel"
    );
    // The destination dropped what it got and takes the next migration, which completes.
    let out = cli(&[
        "migrate",
        "--qmp",
        &qmp,
        "--to",
        &to,
        "--max-bandwidth",
        "0",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v["query-migrate"]["status"], "completed");
    assert_eq!(v["x-ringvisor-summary"]["verified"], true);
    assert_eq!(
        c.execute("query-status", Value::Null).unwrap()["status"],
        "postmigrate"
    );
    let out = cli(&["quit", "--qmp", &qmp]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut src = src;
    assert_eq!(exit_code(&mut src.child), Some(0));
    let _ = dst.kill();
    let _ = dst.wait();
}

#[test]
fn exit_status_is_1_for_a_failed_operation_and_2_only_for_usage_errors() {
    if !have_kvm("CLI exit status test") {
        return;
    }
    let dir = Dir::new("exit");
    let src = spawn_vm(&dir, "src", &guest_args("8M"));
    let qmp = src.qmp.to_str().expect("utf-8 path").to_string();
    // A refused destination: the migration fails (1), the reason is printed, the guest stays.
    let out = cli(&["migrate", "--qmp", &qmp, "--to", "tcp:127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("failed (connecting to 127.0.0.1:1"),
        "{}",
        text(&out)
    );
    let mut c = client(&src);
    assert_eq!(
        c.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    assert!(guest_runs(&mut c));
    // A QMP error reply is a failed operation (1); a bad value on the command line is usage (2).
    let out = cli(&["set-parameter", "--qmp", &qmp, "downtime-limit", "3000000"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("downtime_limit"),
        "{}",
        text(&out)
    );
    let out = cli(&["set-parameter", "--qmp", &qmp, "max-bandwidth", "64M"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "max-bandwidth = 67108864"
    );
    for args in [
        &["set-parameter", "--qmp", &qmp, "downtime-limit", "soon"][..],
        &["set-parameter", "--qmp", &qmp, "no-such-parameter", "1"],
        &["dirty-limit", "--qmp", &qmp, "--set", "0"],
        &["migrate", "--qmp", &qmp, "--to", "unix:/tmp/x"],
        &["status"],
        &["run", "--duration", "nan"],
        &["run", "--duration", "-1"],
        &[
            "run",
            "--migrate-after",
            "inf",
            "--migrate-to",
            "127.0.0.1:1",
        ],
        &["run", "--vcpu-dirty-limit", "0"],
        &["run", "--vcpus", "1", "--dirty-vcpus", "5"],
        &["run", "--tracker", "bitmap", "--dirty-limit", "auto"],
        &["run", "--dirty-limit", "auto", "--auto-converge"],
        &["run", "--timeout", "nan"],
        &["incoming", "--listen", "127.0.0.1:0", "--ring-entries", "3"],
        &["incoming", "--incoming", "defer"],
    ] {
        let out = cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out));
    }
    let out = cli(&["dirtyrate", "--qmp", &qmp, "--mode", "dirty-bitmap"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = cli(&["dirtyrate", "--qmp", &qmp, "--mode", "dirty-ring", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v["status"], "measured");
    assert_eq!(v["vcpu-dirty-rate"].as_array().map(Vec::len), Some(2));
    let out = cli(&[
        "dirty-limit",
        "--qmp",
        &qmp,
        "--set",
        "4M",
        "--cpu-index",
        "1",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["cpu-index"], 1);
    assert_eq!(v[0]["limit-rate"], 4);
    let out = cli(&["dirty-limit", "--qmp", &qmp, "--cancel"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no vCPU dirty limit"));
}

#[test]
fn migrate_to_an_unusable_address_keeps_the_guest_and_exit_after_migrate_says_1() {
    if !have_kvm("--migrate-to failure test") {
        return;
    }
    for to in ["127.0.0.1:1", "notanaddr"] {
        let out = cli(&[
            "run",
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--working-set",
            "16M",
            "--dirty-rate",
            "8M",
            "--migrate-to",
            to,
            "--migrate-after",
            "0",
            "--exit-after-migrate",
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(1), "{to}: {}", text(&out));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{to}: {e}: {}", text(&out)));
        assert_eq!(v["query-migrate"]["status"], "failed", "{to}");
        assert_eq!(v["outcome"]["kind"], "failed", "{to}");
        assert!(
            v["query-migrate"]["error-desc"]
                .as_str()
                .unwrap()
                .contains("connecting to"),
            "{to}"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("migration did not complete"),
            "{to}: {}",
            text(&out)
        );
    }
    // Without --exit-after-migrate the guest keeps running here; the monitor shows why.
    let dir = Dir::new("migrate-to");
    let mut args = guest_args("8M");
    args.extend(["--migrate-to", "notanaddr", "--migrate-after", "0"].map(String::from));
    let src = spawn_vm(&dir, "src", &args);
    let mut c = client(&src);
    let info = wait_status(&mut c, &["failed"]);
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap()
            .starts_with("connecting to notanaddr"),
        "{info}"
    );
    assert_eq!(
        c.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    assert!(guest_runs(&mut c));
}

#[test]
fn ctrl_c_on_migrate_leaves_the_migration_running_and_says_how_to_cancel_it() {
    if !have_kvm("Ctrl-C on migrate test") {
        return;
    }
    let dir = Dir::new("ctrlc");
    let src = spawn_vm(&dir, "src", &guest_args("16M"));
    let (mut dst, addr) = spawn_destination(&[]);
    let qmp = src.qmp.to_str().expect("utf-8 path").to_string();
    let mut cli_migrate = std::process::Command::new(EXE)
        .args(["migrate", "--qmp", &qmp, "--to", &format!("tcp:{addr}")])
        .args(["--max-bandwidth", "1M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ringvisor migrate");
    let mut c = client(&src);
    wait_status(&mut c, &["active"]);
    let st = std::process::Command::new("kill")
        .args(["-INT", &cli_migrate.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(st.success());
    assert_eq!(exit_code(&mut cli_migrate), Some(0));
    let mut err = String::new();
    std::io::Read::read_to_string(cli_migrate.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains(&format!(
            "the migration keeps running; cancel it with: ringvisor cancel --qmp {qmp}"
        )),
        "{err}"
    );
    let info = c.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(
        info["status"], "active",
        "the client's Ctrl-C left the migration running"
    );
    c.execute("migrate_cancel", Value::Null).unwrap();
    assert_eq!(
        wait_status(&mut c, &["cancelled", "failed", "completed"])["status"],
        "cancelled"
    );
    let _ = dst.kill();
    let _ = dst.wait();
}
