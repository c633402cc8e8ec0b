//! The processes a migration benchmark runs: `ringvisor incoming` destinations (started here,
//! their address read from their first stdout line, reaped with a bound), `ringvisor run`
//! sources (their JSON summary parsed), and the network namespaces of a shaped link
//! (`scripts/netns.sh`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};

/// Where one side of a migration runs: a network namespace (or none) and its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// `ip netns exec` this namespace; `None` = the current one.
    pub netns: Option<&'static str>,
    /// The address the destination listens on.
    pub ip: &'static str,
}

impl Endpoint {
    /// A command running `exe` on this endpoint.
    pub fn command(&self, exe: &Path) -> Command {
        match self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }
}

/// A started destination process.
#[derive(Debug)]
pub struct Destination {
    /// The process.
    pub child: Child,
    /// The rest of its stdout.
    pub stdout: BufReader<ChildStdout>,
    /// The `ADDR:PORT` it listens on.
    pub addr: String,
}

/// Starts a destination process (`ringvisor incoming --listen ADDR:0 --json ...`, its stdout
/// piped here for the JSON summary) and reads the address it listens on from its first
/// stderr line (with `--json`, stdout carries only the JSON document); the rest of its
/// stderr is drained on a thread.
pub fn spawn_destination(mut cmd: Command) -> Result<Destination> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(BenchError::io("starting the destination"))?;
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(BenchError::DestinationStart("no stdout or stderr".into()));
    };
    let stdout = BufReader::new(out);
    let mut err = BufReader::new(err);
    let mut first = String::new();
    if let Err(e) = err.read_line(&mut first) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(BenchError::io("reading the destination's first line")(e));
    }
    std::thread::spawn(move || for _ in err.lines() {});
    // `listening ADDR:PORT` (the former CLI) or `[dest] waiting for a migration on ADDR:PORT`.
    let line = first.trim();
    let addr = line.strip_prefix("listening ").or_else(|| {
        line.contains("waiting for a migration on ")
            .then(|| line.rsplit(' ').next())
            .flatten()
    });
    match addr {
        Some(addr) => {
            tracing::debug!(addr, "destination listening");
            Ok(Destination {
                child,
                stdout,
                addr: addr.to_string(),
            })
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(BenchError::DestinationStart(first))
        }
    }
}

/// Waits for a destination process: it exits on its own after a resume, or with an error after
/// an abort; if the source never reached it, it would wait forever: 10 s, then it is killed.
/// The rest of its stdout (with `--json`, the destination's summary) is returned.
pub fn reap_destination(dest: &mut Destination) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match dest.child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                tracing::warn!("destination still running 10 s after its source ended: killed");
                let _ = dest.child.kill();
                let _ = dest.child.wait();
                break;
            }
        }
    }
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut dest.stdout, &mut rest);
    rest
}

/// The JSON summary a `ringvisor run --json` source printed, or why there is none.
///
/// With `RINGVISOR_BENCH_SUMMARY_DIR` set, each summary is also kept there as
/// `<n>-source.json` (per-pass numbers for explaining a cell).
pub fn source_summary(out: &Output) -> Result<serde_json::Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    keep_file("source", "json", &text);
    serde_json::from_str(text.trim()).map_err(|_| {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        BenchError::NoSummary {
            status: out.status,
            stderr_tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        }
    })
}

/// With `RINGVISOR_BENCH_SUMMARY_DIR` set, writes `text` there as `<n>-<kind>.<ext>`, `n`
/// counting the files already there (best effort: an aid for explaining a cell).
pub(crate) fn keep_file(kind: &str, ext: &str, text: &str) {
    let Some(dir) = std::env::var_os("RINGVISOR_BENCH_SUMMARY_DIR") else {
        return;
    };
    let dir = Path::new(&dir);
    let _ = std::fs::create_dir_all(dir);
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let kind: String = kind
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let _ = std::fs::write(dir.join(format!("{n:03}-{kind}.{ext}")), text);
}

/// `scripts/netns.sh` of this repository.
pub fn netns_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/netns.sh")
}

/// Checks a `--link` value: `loopback` or a tc rate such as `1gbit`.
pub fn check_link(link: &str) -> Result<()> {
    if link != "loopback" && !link.ends_with("bit") {
        return Err(BenchError::Invalid(
            "--link must be `loopback` or a tc rate such as 1gbit".into(),
        ));
    }
    Ok(())
}

/// Source and destination endpoints: loopback, or two namespaces joined by a veth pair shaped
/// to `link` (set up here with scripts/netns.sh; [`netns_down`] removes them).
pub fn endpoints(link: &str) -> Result<(Endpoint, Endpoint)> {
    check_link(link)?;
    if link == "loopback" {
        let lo = Endpoint {
            netns: None,
            ip: "127.0.0.1",
        };
        return Ok((lo, lo));
    }
    let script = netns_script();
    let st = Command::new("bash")
        .arg(&script)
        .args(["up", link])
        .stdout(Stdio::null())
        .status()
        .map_err(BenchError::io(format!("running {}", script.display())))?;
    if !st.success() {
        return Err(BenchError::Netns(link.to_string()));
    }
    Ok((
        Endpoint {
            netns: Some("rv-src"),
            ip: "10.77.0.1",
        },
        Endpoint {
            netns: Some("rv-dst"),
            ip: "10.77.0.2",
        },
    ))
}

/// Removes the namespaces [`endpoints`] made for a shaped link (nothing for loopback).
pub fn netns_down(link: &str) {
    if link != "loopback" {
        let _ = Command::new("bash")
            .arg(netns_script())
            .arg("down")
            .status();
    }
}

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Fields after the parenthesised command name of a `/proc/*/stat` line.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split(' ').collect())
}

/// User + system CPU seconds process `pid` has used so far (`/proc/PID/stat` utime, stime).
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = stat_fields(&stat)?;
    let t = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(t as f64 / USER_HZ)
}

/// User + system CPU seconds the threads of process `pid` whose name `is_vcpu` accepts have
/// used so far (`/proc/PID/task/TID/stat`); `None` if the process cannot be read.
pub fn vcpu_threads_cpu_s(pid: u32, is_vcpu: impl Fn(&str) -> bool) -> Option<f64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !is_vcpu(comm.trim_end()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some(f) = stat_fields(&stat) else {
            continue;
        };
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += t(11) + t(12);
    }
    Some(total as f64 / USER_HZ)
}

/// User + system CPU seconds of this process's reaped children so far (`/proc/self/stat`
/// cutime, cstime): the difference around one child's run is that child's CPU time.
pub fn reaped_children_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let f = stat_fields(&stat)?;
    let t = f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?;
    Some(t as f64 / USER_HZ)
}
