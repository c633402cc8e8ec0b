//! `ringvisor run --replicate-to` and `ringvisor standby` as real processes on real KVM: a
//! PVH guest that dirties memory and prints per-CPU progress reports is replicated every
//! 50 ms; the primary is SIGKILLed at random moments; every time the standby resumes the
//! guest from its last applied checkpoint, and the console output the primary released
//! (output commit) is a prefix of the resumed guest's: no report released by the primary is
//! printed again by the standby (the resumed state is never behind what the outside saw),
//! and the standby continues the numbering. Needs /dev/kvm (else `SKIP(kvm)`).
//! `RINGVISOR_REPLICATE_KILLS=N` sets the number of kills (default 5).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const EXE: &str = env!("CARGO_BIN_EXE_ringvisor");

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ringvisor-repl-cli-{}-{name}", std::process::id()))
}

/// Report numbers of `cpu`, in console order.
fn reports(text: &str, cpu: u64) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            match w.as_slice() {
                ["cpu", c, "progress", r, ..] if c.parse::<u64>().ok()? == cpu => r.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

fn one_kill(kernel: &std::path::Path, kill_after: Duration, i: u32) {
    let (pc, sc) = (tmp(&format!("{i}.primary")), tmp(&format!("{i}.standby")));
    let _ = std::fs::remove_file(&pc);
    let _ = std::fs::remove_file(&sc);
    let mut standby = Command::new(EXE)
        .args([
            "standby",
            "--listen",
            "127.0.0.1:0",
            "--heartbeat-timeout-ms",
            "500",
        ])
        .args([
            "--tracker",
            "ring",
            "--ring-entries",
            "4096",
            "--duration",
            "2",
            "--json",
        ])
        .arg("--console")
        .arg(&sc)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the standby");
    let mut err = BufReader::new(standby.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    let log = std::thread::spawn(move || err.lines().map_while(Result::ok).collect::<Vec<_>>());
    let addr = first
        .trim()
        .strip_prefix("listening ")
        .expect("listening line")
        .to_string();
    let mut primary = Command::new(EXE)
        .args(["run", "--kernel"])
        .arg(kernel)
        .args([
            "--cmdline",
            "cpus=2 reports=0 ws_mb=16 dirty_mb=1 period_ticks=40 pace=1",
        ])
        .args(["--vcpus", "2", "--memory", "128M", "--tracker", "ring"])
        .args(["--ring-entries", "4096", "--console"])
        .arg(&pc)
        .args(["--replicate-to", &addr, "--checkpoint-ms", "50"])
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the primary");
    std::thread::sleep(kill_after);
    // SIGKILL: no chance to flush, shut down or release anything.
    primary.kill().unwrap();
    primary.wait().unwrap();
    let t = Instant::now();
    let out = standby.wait_with_output().expect("standby");
    let log = log.join().unwrap().join("\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "standby failed: {log}");
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text} {log}"));
    let resumed = v["resumed_epoch"]
        .as_u64()
        .unwrap_or_else(|| panic!("{v} {log}"));
    assert!(resumed >= 1);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "standby took {:?}",
        t.elapsed()
    );
    let a = std::fs::read_to_string(&pc).unwrap_or_default();
    let b = std::fs::read_to_string(&sc).unwrap_or_default();
    eprintln!(
        "kill {i} at {kill_after:?}: resumed from checkpoint {resumed}; released {} bytes; standby printed {} bytes",
        a.len(),
        b.len()
    );
    // Output is released up to a checkpoint, which may fall inside a console line: only the
    // complete lines of what was released are counted (the resumed guest completes the cut
    // line, and its own first line may start in the middle of one).
    let released_lines = &a[..a.rfind('\n').map_or(0, |i| i + 1)];
    for cpu in 0..2 {
        let (ra, rb) = (reports(released_lines, cpu), reports(&b, cpu));
        assert!(
            ra.iter().enumerate().all(|(k, r)| *r == k as u64 + 1),
            "cpu {cpu}: released reports are not 1, 2, 3...: {ra:?}"
        );
        assert!(
            !rb.is_empty(),
            "cpu {cpu}: the resumed guest printed nothing:\n{b}\n{log}"
        );
        assert!(
            rb.windows(2).all(|w| w[1] == w[0] + 1),
            "cpu {cpu}: standby reports {rb:?}"
        );
        let released = ra.last().copied().unwrap_or(0);
        assert!(
            rb[0] > released,
            "cpu {cpu}: the primary released report {released}, the resumed guest printed {} again",
            rb[0]
        );
    }
    let _ = std::fs::remove_file(pc);
    let _ = std::fs::remove_file(sc);
}

#[test]
fn primary_sigkilled_at_random_moments_the_standby_resumes_and_released_output_is_a_prefix() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; replication CLI test not run");
        return;
    }
    let kernel = tmp("kernel.elf");
    let st = Command::new(EXE)
        .args(["boot", "--write-test-kernel"])
        .arg(&kernel)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let kills: u32 = std::env::var("RINGVISOR_REPLICATE_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut x = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("seed {x}");
    for i in 0..kills {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Between 0.8 s (the seed is through, a few checkpoints in) and 2.8 s.
        one_kill(&kernel, Duration::from_millis(800 + x % 2000), i);
    }
    let _ = std::fs::remove_file(kernel);
}
