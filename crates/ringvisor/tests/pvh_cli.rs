//! `ringvisor run --kernel` and `ringvisor incoming` as real processes: a PVH guest's exit
//! status, a kernel without the PVH note refused, and a PVH guest live-migrated between two
//! processes over loopback TCP with its console continuing in the destination's file.
//! Needs /dev/kvm (else `SKIP(kvm)`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_ringvisor");

fn have_kvm() -> bool {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; PVH CLI test not run");
        return false;
    }
    true
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ringvisor-pvh-cli-{}-{name}", std::process::id()))
}

fn test_kernel(name: &str) -> std::path::PathBuf {
    let k = tmp(name);
    let st = Command::new(EXE)
        .args(["boot", "--write-test-kernel"])
        .arg(&k)
        .stdout(Stdio::null())
        .status()
        .expect("ringvisor boot --write-test-kernel");
    assert!(st.success());
    k
}

/// (cpu, report) of every progress line.
fn reports(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            match w.as_slice() {
                ["cpu", c, "progress", r, ..] => Some((c.parse().ok()?, r.parse().ok()?)),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn run_kernel_exits_with_the_guest_status_and_refuses_a_non_pvh_elf() {
    if !have_kvm() {
        return;
    }
    let k = test_kernel("exit-kernel.elf");
    let out = Command::new(EXE)
        .args(["run", "--kernel"])
        .arg(&k)
        .args(["--cmdline", "cpus=2 reports=2 exit=5", "--vcpus", "2"])
        .args(["--memory", "64M"])
        .output()
        .expect("run --kernel");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{text}");
    assert!(text.starts_with("ringvisor PVH test kernel v1\n"), "{text}");
    assert_eq!(reports(&text).len(), 4, "{text}");
    // The ringvisor binary itself is an ELF without the PVH note.
    let out = Command::new(EXE)
        .args(["run", "--kernel", EXE])
        .output()
        .expect("run --kernel");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("XEN_ELFNOTE_PHYS32_ENTRY"), "{err}");
    let _ = std::fs::remove_file(k);
}

#[test]
fn pvh_guest_migrates_between_two_processes_and_its_console_continues_there() {
    if !have_kvm() {
        return;
    }
    let k = test_kernel("migrate-kernel.elf");
    let (src_console, dst_console) = (tmp("src.console"), tmp("dst.console"));
    let _ = std::fs::remove_file(&dst_console);
    // The destination runs until it is told to quit (see below), not for a fixed time.
    let dst_qmp = format!("unix:{}", tmp("dst.qmp").display());
    let mut dest = Command::new(EXE)
        .args(["incoming", "--listen", "127.0.0.1:0", "--tracker", "ring"])
        .args(["--ring-entries", "4096", "--qmp", &dst_qmp])
        .args(["--json", "--console"])
        .arg(&dst_console)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the destination");
    // With --json the address comes on stderr: stdout carries one JSON document.
    let mut err = BufReader::new(dest.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    std::thread::spawn(move || for _ in err.lines() {});
    let out = BufReader::new(dest.stdout.take().unwrap());
    let addr = first
        .trim()
        .strip_prefix("listening ")
        .expect("listening line")
        .to_string();
    let cmdline = "cpus=2 reports=0 ws_mb=16 dirty_mb=1 period_ticks=40 pace=1";
    let src = Command::new(EXE)
        .args(["run", "--kernel"])
        .arg(&k)
        .args(["--cmdline", cmdline, "--vcpus", "2", "--memory", "256M"])
        .args(["--tracker", "ring", "--ring-entries", "4096", "--console"])
        .arg(&src_console)
        .args(["--migrate-to", &addr, "--migrate-after", "0.2"])
        // The clock starts at the guest's third report (a VMM that boots slower or faster
        // than another migrates at the same point of the guest's work).
        .args(["--migrate-after-output", " progress 3 "])
        .args(["--downtime-limit", "50", "--exit-after-migrate", "--json"])
        // The migration threads yield to the vCPUs: on a busy host they may send slower than
        // the guest dirties, and pre-copy would never end. Converged or forced, the console
        // must continue.
        .args(["--timeout", "15", "--on-timeout", "force"])
        .stderr(Stdio::null())
        .output()
        .expect("running the source");
    // Quit the destination once each CPU has printed two reports of its own there, whenever
    // the guest got a core for them (60 s: a hang guard).
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        let b = std::fs::read_to_string(&dst_console).unwrap_or_default();
        let r = reports(&b);
        if (0..2u64).all(|c| r.iter().filter(|x| x.0 == c).count() >= 2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let quit = Command::new(EXE)
        .args(["quit", "--qmp", &dst_qmp])
        .output()
        .expect("ringvisor quit");
    assert!(
        quit.status.success(),
        "quit: {}",
        String::from_utf8_lossy(&quit.stderr)
    );
    let st = dest.wait().expect("destination");
    let mut rest = String::new();
    for l in out.lines().map_while(|l| l.ok()) {
        rest = l;
    }
    let text = String::from_utf8_lossy(&src.stdout);
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("summary: {e}: {text}"));
    eprintln!(
        "{} in {} ms, downtime {} ms; destination: {rest}",
        v["outcome"], v["total_ms"], v["downtime_ms"]
    );
    assert!(src.status.success());
    assert_eq!(v["outcome"]["kind"], "completed", "{}", v["outcome"]);
    assert_eq!(v["verified"], true);
    assert!(st.success(), "destination exit {st:?}");
    let incoming: serde_json::Value = serde_json::from_str(&rest).expect("incoming summary");
    assert_eq!(incoming["machine"], "pvh");
    // Each CPU's reports continue on the destination's console where the source's stopped.
    let a = std::fs::read_to_string(&src_console).expect("source console");
    let b = std::fs::read_to_string(&dst_console).expect("destination console");
    assert!(a.starts_with("ringvisor PVH test kernel v1\n"), "{a}");
    assert!(
        a.contains(" progress 3 "),
        "the migration waited for the third report:\n{a}"
    );
    // The two files are one console: a line the pause cut is finished in the second. Every
    // CPU's reports run on without a gap or a repeat, and the destination printed some of
    // its own.
    let joined = format!("{a}{b}");
    for cpu in 0..2u64 {
        let all: Vec<u64> = reports(&joined)
            .iter()
            .filter(|r| r.0 == cpu)
            .map(|r| r.1)
            .collect();
        assert!(
            all.windows(2).all(|w| w[1] == w[0] + 1),
            "cpu {cpu}: {all:?}"
        );
        let here = reports(&b).iter().filter(|r| r.0 == cpu).count();
        assert!(
            here >= 2,
            "cpu {cpu}: {here} reports on the destination:\n{b}"
        );
    }
    for f in [k, src_console, dst_console] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn a_pvh_vm_process_answers_qmp_pauses_resumes_and_quits() {
    if !have_kvm() {
        return;
    }
    let k = test_kernel("qmp-kernel.elf");
    let sock = tmp("pvh.qmp");
    let _ = std::fs::remove_file(&sock);
    let mut vm = Command::new(EXE)
        .args(["run", "--kernel"])
        .arg(&k)
        .args([
            "--cmdline",
            "cpus=2 reports=0 period_ticks=20",
            "--vcpus",
            "2",
        ])
        .args(["--memory", "64M", "--console", "/dev/null", "--qmp"])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run --kernel --qmp");
    let t0 = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no monitor"
        );
        assert!(vm.try_wait().unwrap().is_none(), "the VM process ended");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut c = qmp::QmpClient::connect(&sock, std::time::Duration::from_secs(10)).unwrap();
    let console = |c: &mut qmp::QmpClient| {
        let g = c
            .execute("x-ringvisor-query-guest", serde_json::Value::Null)
            .unwrap();
        assert_eq!(g["machine"], "pvh");
        g["console-bytes"].as_u64().unwrap()
    };
    // The guest reports on its console every 20 ticks: the byte count grows while it runs.
    let a = console(&mut c);
    let t0 = std::time::Instant::now();
    while console(&mut c) == a {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no console output"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    c.execute("stop", serde_json::Value::Null).unwrap();
    let st = c.execute("query-status", serde_json::Value::Null).unwrap();
    assert_eq!(st["status"], "paused");
    let paused = console(&mut c);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(console(&mut c), paused, "a paused guest prints nothing");
    c.execute("cont", serde_json::Value::Null).unwrap();
    assert_eq!(
        c.execute("query-status", serde_json::Value::Null).unwrap()["status"],
        "running"
    );
    let _ = c.execute("quit", serde_json::Value::Null);
    let t0 = std::time::Instant::now();
    let st = loop {
        if let Some(st) = vm.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "quit did not end it"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0));
    assert!(!sock.exists(), "the monitor's socket is removed");
    let _ = std::fs::remove_file(k);
}

#[test]
fn boot_takes_an_initrd_and_feeds_stdin_to_the_serial_console() {
    if !have_kvm() {
        return;
    }
    let k = test_kernel("initrd-kernel.elf");
    let initrd = tmp("initrd.cpio");
    std::fs::write(&initrd, vec![0x5a; 100_000]).unwrap();
    // reports=0: the test kernel reports until a `q` arrives on COM1, then powers off.
    let mut child = Command::new(EXE)
        .args(["boot", "--kernel"])
        .arg(&k)
        .arg("--initrd")
        .arg(&initrd)
        .args([
            "--serial-stdin",
            "--cmdline",
            "reports=0 exit=6 period_ticks=10",
        ])
        .args(["--memory", "64M", "--timeout", "60"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("boot");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // Wait for the first progress report, then type `q`.
    loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "console ended early"
        );
        if line.contains("progress") {
            break;
        }
    }
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"q").unwrap();
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(6), "{rest}");
    assert!(rest.contains("poweroff 6"), "{rest}");
    // An initrd that cannot fit between the kernel and the top of RAM is refused.
    std::fs::write(&initrd, vec![0; 8 << 20]).unwrap();
    let out = Command::new(EXE)
        .args(["boot", "--kernel"])
        .arg(&k)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", "8M"])
        .output()
        .expect("boot");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("initrd"), "{err}");
    let _ = std::fs::remove_file(k);
    let _ = std::fs::remove_file(initrd);
}
