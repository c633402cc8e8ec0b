//! Shared by the Linux guest tests (`crates/pvh/tests/linux.rs`,
//! `crates/migration-engine/tests/linux.rs`): finding (or building) the project's Linux guest,
//! booting it, reading its console.
//!
//! The guest comes from `scripts/linux-guest/build.sh` (cached outside the repository; the
//! first run on a machine builds the kernel, several minutes), or from the directory in
//! `RINGVISOR_LINUX_GUEST_DIR` (holding `vmlinux`, `initramfs.cpio` and `cmdline`). Without
//! `/dev/kvm` the tests print `SKIP(kvm)`; with it they never skip: a guest that cannot be
//! built fails the test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The built guest.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    /// The uncompressed kernel (PVH ELF).
    pub vmlinux: PathBuf,
    /// The newc initramfs.
    pub initramfs: PathBuf,
    /// The kernel command line for this host (console, and on PVM what it cannot run).
    pub cmdline: String,
}

/// How long a boot may take to reach user space: 1-2 minutes on a PVM host, more while
/// other work shares its two cores.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(1200);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn from_dir(dir: &Path) -> LinuxGuest {
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .unwrap_or_else(|e| panic!("{}/cmdline: {e}", dir.display()));
    LinuxGuest {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        cmdline: cmdline.trim().to_string(),
    }
}

/// The guest, built on first use; `None` (and a `SKIP(kvm)` line) without `/dev/kvm`.
pub fn guest() -> Option<LinuxGuest> {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; Linux guest test not run");
        return None;
    }
    // Building the kernel takes minutes and each boot 1-2 minutes on a PVM host: these tests
    // run when asked (RINGVISOR_LINUX_TESTS=1, or a built guest in RINGVISOR_LINUX_GUEST_DIR),
    // not yet in every `cargo test`.
    if std::env::var_os("RINGVISOR_LINUX_GUEST_DIR").is_none()
        && std::env::var("RINGVISOR_LINUX_TESTS").as_deref() != Ok("1")
    {
        eprintln!(
            "SKIP(linux): set RINGVISOR_LINUX_TESTS=1 (builds the guest with \
             scripts/linux-guest/build.sh) or RINGVISOR_LINUX_GUEST_DIR to run the Linux guest tests"
        );
        return None;
    }
    static GUEST: OnceLock<LinuxGuest> = OnceLock::new();
    static BUILD: Mutex<()> = Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    Some(
        GUEST
            .get_or_init(|| {
                if let Some(d) = std::env::var_os("RINGVISOR_LINUX_GUEST_DIR") {
                    return from_dir(Path::new(&d));
                }
                let script = repo_root().join("scripts/linux-guest/build.sh");
                eprintln!(
                    "linux guest: running {} (builds once per machine)",
                    script.display()
                );
                let t = Instant::now();
                let out = std::process::Command::new("bash")
                    .arg(&script)
                    .arg("--print-dir")
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
                assert!(out.status.success(), "{} failed", script.display());
                let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
                eprintln!("linux guest: {dir} ({:.1} s)", t.elapsed().as_secs_f64());
                from_dir(Path::new(&dir))
            })
            .clone(),
    )
}

/// A PVH config for the guest with `extra` appended to its command line.
pub fn config(g: &LinuxGuest, vcpus: usize, memory: u64, extra: &str) -> pvh::PvhConfig {
    pvh::PvhConfig {
        cmdline: format!("{} {extra}", g.cmdline),
        memory,
        vcpus,
        initrd: Some(pvh::read_initrd(&g.initramfs).expect("initramfs")),
        // RINGVISOR_LINUX_CONSOLE=FILE: also append the console to FILE (to watch a boot).
        serial: match std::env::var_os("RINGVISOR_LINUX_CONSOLE") {
            Some(f) => pvh::SerialOutput::File(f.into()),
            None => pvh::SerialOutput::Capture,
        },
        ..pvh::PvhConfig::new(pvh::read_kernel(&g.vmlinux).expect("vmlinux"))
    }
}

/// One heartbeat line of the guest's /init: `heartbeat N sum HEX bad K t S.MMM`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Beat {
    /// Beat number (from 0).
    pub n: u64,
    /// Checksum of the buffer as written by this beat.
    pub sum: u64,
    /// Words that did not hold the previous beat's pattern.
    pub bad: u64,
    /// Guest CLOCK_MONOTONIC, seconds.
    pub guest_s: f64,
    /// Host time the line ended (Unix ns).
    pub at_ns: u64,
}

/// The heartbeats in a console capture (a line may carry other output before the beat).
pub fn beats(c: &vmm::Capture) -> Vec<Beat> {
    c.lines()
        .into_iter()
        .filter_map(|(at_ns, l)| {
            let i = l.find("heartbeat ")?;
            let w: Vec<&str> = l[i..].split_whitespace().collect();
            match w.as_slice() {
                ["heartbeat", n, "sum", s, "bad", b, "t", t, ..] => Some(Beat {
                    n: n.parse().ok()?,
                    sum: u64::from_str_radix(s, 16).ok()?,
                    bad: b.parse().ok()?,
                    guest_s: t.parse().ok()?,
                    at_ns,
                }),
                _ => None,
            }
        })
        .collect()
}

/// The last `n` lines of a console, for failure messages.
pub fn tail(c: &vmm::Capture, n: usize) -> String {
    let text = String::from_utf8_lossy(&c.bytes).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until `pred` holds for the console of `vm` (a running PVH-platform VM), panicking
/// with the console's tail if a vCPU fails or `timeout` passes.
pub fn wait_console(
    vm: &vmm::Vm,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&vmm::Capture) -> bool,
) -> Duration {
    let dev = vm.devices().expect("PVH devices");
    let t = Instant::now();
    loop {
        let c = dev.capture();
        if pred(&c) {
            return t.elapsed();
        }
        if let Err(e) = vm.vcpus().expect("started").check() {
            panic!(
                "guest failed while waiting for {what}: {e}\nconsole tail:\n{}",
                tail(&c, 40)
            );
        }
        if t.elapsed() > timeout {
            panic!(
                "no {what} within {timeout:?}; console tail:\n{}",
                tail(&c, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the console holds `needle` after byte offset `from`.
pub fn has_after(c: &vmm::Capture, from: usize, needle: &str) -> bool {
    c.bytes
        .get(from..)
        .is_some_and(|b| String::from_utf8_lossy(b).contains(needle))
}

/// Whether the console has a complete line containing `needle`.
pub fn has_line(c: &vmm::Capture, needle: &str) -> bool {
    c.lines().iter().any(|(_, l)| l.contains(needle))
}
