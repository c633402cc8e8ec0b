//! CLI-level migration between two network namespaces joined by a veth pair shaped to
//! 1 Gbit/s (`scripts/netns.sh`): real `ringvisor incoming` and `ringvisor run` processes.
//! Needs /dev/kvm (else `SKIP(kvm)`), root and iproute2 (else `SKIP(netns)`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const EXE: &str = env!("CARGO_BIN_EXE_ringvisor");

fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/netns.sh")
}

struct Netns;

impl Netns {
    fn up() -> Option<Netns> {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("SKIP(kvm): /dev/kvm is absent; netns migration test not run");
            return None;
        }
        let ok = Command::new("bash")
            .arg(script())
            .args(["up", "1gbit"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // `.ci/run` sets this when it could create a namespace itself: then a skip here
            // is a failure (libtest hides a passing test's output, so it would go unseen).
            if std::env::var_os("RINGVISOR_REQUIRE_NETNS").is_some() {
                panic!("network namespaces are required (RINGVISOR_REQUIRE_NETNS) but scripts/netns.sh up failed");
            }
            eprintln!("SKIP(netns): cannot create network namespaces (needs root and iproute2)");
            return None;
        }
        Some(Netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("down").status();
    }
}

/// Migrates a guest dirtying 200 MB/s over a 256 MiB hot set across the 1 Gbit/s link;
/// returns the source's JSON summary.
fn migrate(extra: &[&str], timeout: &str) -> serde_json::Value {
    let mut dest = Command::new("ip")
        .args([
            "netns",
            "exec",
            "rv-dst",
            EXE,
            "incoming",
            "--listen",
            "10.77.0.2:0",
        ])
        .args(["--duration", "0.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the destination");
    let mut out = BufReader::new(dest.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening ")
        .expect("listening line")
        .to_string();
    let src = Command::new("ip")
        .args([
            "netns", "exec", "rv-src", EXE, "run", "--memory", "1G", "--vcpus", "2",
        ])
        .args(["--dirty-rate", "200000000", "--working-set", "256M"])
        .args([
            "--migrate-to",
            &addr,
            "--migrate-after",
            "1",
            "--timeout",
            timeout,
        ])
        .args(["--exit-after-migrate", "--json"])
        .args(extra)
        .stderr(Stdio::null())
        .output()
        .expect("running the source");
    // The destination ends 0.5 s after a resume; one the source never reached would wait
    // for ever: 30 s, then it is killed.
    let t0 = std::time::Instant::now();
    while dest.try_wait().ok().flatten().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(30) {
            let _ = dest.kill();
            let _ = dest.wait();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let text = String::from_utf8_lossy(&src.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("summary: {e}: {text}"))
}

#[test]
fn one_gbit_link_does_not_converge_without_a_limit_and_converges_with_dirty_limit_auto() {
    let Some(_ns) = Netns::up() else { return };
    let free = migrate(&[], "8");
    eprintln!("no limit: {}", free["outcome"]);
    assert_eq!(free["outcome"]["kind"], "aborted", "{}", free["outcome"]);
    assert!(free["outcome"]["reason"]
        .as_str()
        .unwrap()
        .contains("not converged"));
    let limited = migrate(&["--dirty-limit", "auto"], "60");
    eprintln!(
        "dirty-limit auto: {} in {} ms, downtime {} ms, {} throttle events",
        limited["outcome"],
        limited["total_ms"],
        limited["downtime_ms"],
        limited["dirty_limit_events"]
    );
    assert_eq!(
        limited["outcome"]["kind"], "completed",
        "{}",
        limited["outcome"]
    );
    assert_eq!(limited["verified"], true);
    assert!(limited["dirty_limit_events"].as_u64().unwrap() >= 1);
}
