//! QEMU's own QMP client library (PyPI `qemu.qmp`) drives ringvisor VM processes exactly as
//! a QEMU user's script would (`tests/qmp/qmp_client_test.py`): a migration with a
//! mid-migration `max-bandwidth` change and its `MIGRATION` events, a cancelled migration
//! that leaves the guest running on the source and a later one that completes, and
//! `calc-dirty-rate` / `query-dirty-rate` in dirty-ring mode.
//!
//! Needs `/dev/kvm` (else `SKIP(kvm)`) and `python3` with `qemu.qmp` (else `SKIP(qmp-py)`,
//! which fails the test under `RINGVISOR_REQUIRE_QMP_PY=1`, as `.ci/run` sets it).

use std::path::Path;
use std::process::Command;

fn python_with_qemu_qmp() -> bool {
    Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn qemu_qmp_client_migrates_cancels_and_measures_the_dirty_rate() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; the qemu.qmp scenarios need guests");
        return;
    }
    if !python_with_qemu_qmp() {
        if std::env::var("RINGVISOR_REQUIRE_QMP_PY").as_deref() == Ok("1") {
            panic!("python3 with qemu.qmp is required (RINGVISOR_REQUIRE_QMP_PY=1) but missing");
        }
        eprintln!(
            "SKIP(qmp-py): python3 with the qemu.qmp package is missing \
             (pip install qemu.qmp); the qemu.qmp client test did not run"
        );
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp/qmp_client_test.py");
    let out = Command::new("python3")
        .arg(&script)
        .env("RINGVISOR_BIN", env!("CARGO_BIN_EXE_ringvisor"))
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the qemu.qmp scenarios failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("qemu.qmp: all checks passed"),
        "{stdout}\n{stderr}"
    );
}
