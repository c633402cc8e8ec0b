//! Runs a qtest script through a real `qemu-system-aarch64` (shared by the differential
//! tests).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// Runs `script` (one qtest command per line) through `qemu` with `-M machine` and `smp`
/// PEs; returns exactly one answer (`OK ...`, `FAIL ...`, `ERR ...`) per command. QEMU
/// keeps running after its qtest input closes: one answer per command is read, then it is
/// killed.
pub fn run(qemu: &str, machine: &str, smp: usize, script: &[String]) -> Vec<String> {
    let mut child = Command::new(qemu)
        .args([
            "-M",
            machine,
            "-cpu",
            "max",
            "-accel",
            "tcg",
            "-S",
            "-qtest",
            "stdio",
            "-display",
            "none",
            "-nodefaults",
            "-smp",
            &smp.to_string(),
            "-m",
            "128M",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let want = script.len();
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) if l.starts_with("OK") || l.starts_with("FAIL") || l.starts_with("ERR") => {
                    out.push(l)
                }
                Ok(_) => {}
                Err(_) => break,
            }
            if out.len() == want {
                break;
            }
        }
        let _ = tx.send(out);
    });
    let mut text = script.join("\n");
    text.push('\n');
    stdin.write_all(text.as_bytes()).expect("write script");
    drop(stdin);
    let out = rx.recv_timeout(Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let out = out.expect("QEMU answered within 60 s");
    assert_eq!(out.len(), script.len(), "QEMU answered every command");
    out
}
