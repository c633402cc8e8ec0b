//! Helpers of the CLI tests: ringvisor VM processes with a QMP monitor, killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qmp::QmpClient;
use serde_json::Value;

pub const EXE: &str = env!("CARGO_BIN_EXE_ringvisor");

pub fn have_kvm(what: &str) -> bool {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; {what} not run");
        return false;
    }
    true
}

/// A per-test directory, removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("rv-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        Dir(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM process; killed on drop if still running.
pub struct Vm {
    pub child: Child,
    pub qmp: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The small workload guest of these tests: 64 MiB, 2 vCPUs dirtying `rate` over 16 MiB.
pub fn guest_args(rate: &str) -> Vec<String> {
    [
        "run",
        "--memory",
        "64M",
        "--vcpus",
        "2",
        "--working-set",
        "16M",
        "--dirty-rate",
        rate,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts `ringvisor ARGS --qmp unix:SOCK` and waits for its monitor.
pub fn spawn_vm(dir: &Dir, name: &str, args: &[String]) -> Vm {
    let qmp = dir.path(&format!("{name}.qmp"));
    let log = std::fs::File::create(dir.path(&format!("{name}.log"))).expect("log");
    let child = Command::new(EXE)
        .args(args)
        .arg("--qmp")
        .arg(format!("unix:{}", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn ringvisor");
    let mut vm = Vm { child, qmp };
    let t0 = Instant::now();
    while !vm.qmp.exists() {
        if let Ok(Some(st)) = vm.child.try_wait() {
            let log = std::fs::read_to_string(dir.path(&format!("{name}.log"))).unwrap_or_default();
            panic!("{name} exited with {st} before its monitor came up:\n{log}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{name}: no monitor");
        std::thread::sleep(Duration::from_millis(20));
    }
    vm
}

/// A destination `ringvisor incoming --incoming tcp:127.0.0.1:0`; returns it and its address.
pub fn spawn_destination(extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(EXE)
        .args([
            "incoming",
            "--incoming",
            "tcp:127.0.0.1:0",
            "--tracker",
            "ring",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn destination");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("listening line");
    let addr = first
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("destination said {first:?}"))
        .to_string();
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in out.lines() {});
    (child, addr)
}

pub fn client(vm: &Vm) -> QmpClient {
    QmpClient::connect(&vm.qmp, Duration::from_secs(10)).expect("QMP connect")
}

/// `ringvisor ARGS` to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ringvisor")
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Sum of the workload guest's write counters.
pub fn writes(c: &mut QmpClient) -> u64 {
    let g = c
        .execute("x-ringvisor-query-guest", Value::Null)
        .expect("query-guest");
    g["writes"]
        .as_array()
        .expect("writes")
        .iter()
        .filter_map(Value::as_u64)
        .sum()
}

/// Whether the guest's counters grow: polled until they do, for up to 60 s (a hang guard; on
/// a busy host a vCPU may wait any length of time for a core, so no fixed window is enough).
pub fn guest_runs(c: &mut QmpClient) -> bool {
    let a = writes(c);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
        if writes(c) > a {
            return true;
        }
    }
    false
}

/// Polls `query-migrate` until `status` is one of `want` (a hang guard, not a time bound).
pub fn wait_status(c: &mut QmpClient, want: &[&str]) -> Value {
    let t0 = Instant::now();
    loop {
        let info = c
            .execute("query-migrate", Value::Null)
            .expect("query-migrate");
        if want.contains(&info["status"].as_str().unwrap_or("")) {
            return info;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "stuck: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a process to exit (bounded) and returns its code.
pub fn exit_code(child: &mut Child) -> Option<i32> {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
