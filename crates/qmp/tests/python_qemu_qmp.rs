//! The real PyPI client `qemu.qmp` (QEMU's own Python library, used by its tests and
//! qmp-shell) against the server: connect and negotiate, `query-commands`, a command with
//! arguments, an error, and an event, through both its async API and its legacy sync API;
//! and QEMU's `qmp-shell` (shipped in the same package) fed commands on stdin.
//!
//! Needs `python3` with `qemu.qmp`; without them the test prints `SKIP(qmp-py)` and passes,
//! unless `RINGVISOR_REQUIRE_QMP_PY=1` makes it fail.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{handler, TestDir};
use qmp::{QemuVersion, QmpServer, ServerConfig};
use serde_json::{json, Value};

fn python_with_qemu_qmp() -> bool {
    Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn qemu_qmp_python_client_works_against_the_server() {
    if !python_with_qemu_qmp() {
        if std::env::var("RINGVISOR_REQUIRE_QMP_PY").as_deref() == Ok("1") {
            panic!("python3 with qemu.qmp is required (RINGVISOR_REQUIRE_QMP_PY=1) but missing");
        }
        eprintln!(
            "SKIP(qmp-py): python3 with the qemu.qmp package is missing \
             (pip install qemu.qmp); the QEMU client compatibility test did not run"
        );
        return;
    }
    let dir = TestDir::new("py");
    let config = ServerConfig {
        version: QemuVersion {
            major: 9,
            minor: 2,
            micro: 0,
        },
        package: "ringvisor-test".into(),
        ..ServerConfig::default()
    };
    let _server = QmpServer::bind(dir.sock(), handler(), config).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qemu_qmp_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(dir.sock())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed:\n{stdout}\n{stderr}");
    let got: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("python printed no JSON ({e}):\n{stdout}\n{stderr}"));

    assert_eq!(
        got["greeting"],
        json!({"version": {"qemu": {"micro": 0, "minor": 2, "major": 9}, "package": "ringvisor-test"}, "capabilities": []})
    );
    let commands: Vec<&str> = got["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for c in ["qmp_capabilities", "query-commands", "echo", "emit"] {
        assert!(commands.contains(&c), "{c} missing from {commands:?}");
    }
    assert_eq!(
        got["echo"],
        json!({"uri": "tcp:127.0.0.1:4444", "n": 5, "nested": {"a": [1]}})
    );
    assert_eq!(
        got["unknown"],
        json!({"class": "CommandNotFound", "desc": "The command no-such-command has not been found"})
    );
    assert_eq!(got["event"]["event"], "TEST_EVENT");
    assert_eq!(got["event"]["data"], json!({"k": "v"}));
    assert!(got["event"]["timestamp"]["seconds"].as_i64().unwrap() > 0);
    assert_eq!(got["legacy_echo"], json!({"x": 1}));
    assert_eq!(
        got["legacy_event"],
        json!({"event": "TEST_EVENT", "data": {"y": 2}})
    );

    // qmp-shell, QEMU's interactive tool, reads commands from a pipe too.
    let mut shell = Command::new("python3")
        .args(["-m", "qemu.qmp.qmp_shell"])
        .arg(dir.sock())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(mut stdin) = shell.stdin.take() {
        stdin.write_all(b"echo a=1 b=two\nnope\n").unwrap();
    }
    let out = shell.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qmp-shell failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#"{"return": {"a": 1, "b": "two"}}"#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#),
        "{stdout}"
    );
}
