//! `ringvisor gic-qtest --gic-version 4`: the CLI builds the GICv4.0 configuration (QEMU's
//! `virt,gic-version=4` layout) and answers qtest lines on stdin/stdout; bad versions are
//! usage errors.

use std::io::Write;
use std::process::{Command, Stdio};

fn run(args: &[&str], input: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringvisor"))
        .arg("gic-qtest")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringvisor");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn gic_qtest_accepts_gic_version_4_with_v40_layouts() {
    // GITS_TYPER (Virtual = 1, VMOVP = 1, no GICv4.1 bits), GICD_TYPER2 (0), RD 1 at the
    // 256 KiB stride with its VLPI frame (v4.0 VPENDBASER keeps a VPT address).
    let input = "readq 0x08080008\nreadl 0x0800000c\nreadq 0x080e0008\n\
                 writeq 0x08100078 0x44300000\nreadq 0x08100078\n";
    let (code, out, err) = run(&["--gic-version", "4", "--pes", "2"], input);
    assert_eq!(code, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    let typer = u64::from_str_radix(&lines[0][5..], 16).expect("hex");
    assert_eq!(typer & 2, 2, "GITS_TYPER.Virtual");
    assert_eq!(typer & (1 << 37), 1 << 37, "GITS_TYPER.VMOVP");
    assert_eq!(
        typer & ((1 << 39) | (1 << 40) | (3 << 41)),
        0,
        "no GICv4.1 bits"
    );
    assert_eq!(lines[1], "OK 0x0000000000000000", "GICD_TYPER2");
    let rd1 = u64::from_str_radix(&lines[2][5..], 16).expect("hex");
    assert_eq!(rd1 >> 32, 1, "RD 1's affinity: the 256 KiB stride");
    assert_eq!(rd1 & 2, 2, "GICR_TYPER.VLPIS");
    assert_eq!(lines[4], "OK 0x0000000044300000");
}

#[test]
fn gic_qtest_refuses_unknown_versions_and_v41_options_with_version_4() {
    let (code, _, err) = run(&["--gic-version", "5"], "");
    assert_eq!(code, 2, "a usage error");
    assert!(err.contains("--gic-version"), "{err}");
    let (code, _, err) = run(&["--gic-version", "4", "--svpet", "1"], "");
    assert_eq!(code, 2, "a usage error");
    assert!(err.contains("--svpet"), "{err}");
}
