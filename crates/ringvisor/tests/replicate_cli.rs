//! `ringvisor run --replicate-to` and `ringvisor standby` as real processes on real KVM: a
//! PVH guest that dirties memory and prints per-CPU progress reports is replicated every
//! 50 ms; the primary is SIGKILLed at random moments; every time the standby resumes the
//! guest from its last applied checkpoint, and the console output the primary released
//! (output commit) followed by the standby's (the replayed output of the last applied
//! checkpoint, then the resumed guest's) is the guest's output with no report missing: at
//! least once, the last epoch's lines possibly twice. Needs /dev/kvm (else `SKIP(kvm)`).
//! `RINGVISOR_REPLICATE_KILLS=N` sets the number of kills (default 20, the count).

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

/// Whether `text` (complete lines only) holds each CPU's reports as 1, 2, 3, ... with none
/// missing or repeated.
fn consecutive(text: &str) -> bool {
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    (0..2).all(|cpu| {
        reports(whole, cpu)
            .iter()
            .enumerate()
            .all(|(k, r)| *r == k as u64 + 1)
    })
}

/// The length of the standby output's start that repeats the end of the released output,
/// such that released + the rest of the standby's output is seamless (`None`: there is a gap
/// or a repeat that is not one).
fn seamless_overlap(released: &str, standby: &str) -> Option<usize> {
    let (a, b) = (released.as_bytes(), standby.as_bytes());
    (0..=a.len().min(b.len())).rev().find(|&o| {
        a.ends_with(&b[..o])
            && consecutive(&(released.to_string() + &String::from_utf8_lossy(&b[o..])))
    })
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
    // The standby first replays the output of the last checkpoint it applied (the primary
    // may have died before releasing it), then the resumed guest continues. So the console
    // the outside saw, released + standby, is the guest's output with nothing missing: the
    // standby's output starts either right where the released output ends or with a repeat
    // of its end (the last epoch's output, if the primary had released it).
    let repeat = seamless_overlap(&a, &b).unwrap_or_else(|| {
        panic!("released + standby output is not the guest's output without a gap:\n--- released\n{a}\n--- standby\n{b}\n{log}")
    });
    let resumed_part = &b[repeat..];
    for cpu in 0..2 {
        assert!(
            !reports(resumed_part, cpu).is_empty(),
            "cpu {cpu}: the resumed guest printed nothing:\n{b}\n{log}"
        );
    }
    eprintln!("kill {i}: the standby repeated {repeat} bytes the primary had released");
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
        .unwrap_or(20);
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
