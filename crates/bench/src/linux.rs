//! `ringvisor bench migrate --linux`: the project's Linux guest (`scripts/linux-guest/build.sh`)
//! under ringvisor and under QEMU, side by side, on the same kernel, initramfs and command
//! line, memory and vCPUs, downtime limit and bandwidth.
//!
//! Per (VMM, workload) the guest boots once and is live-migrated along a chain of processes on
//! loopback, `P0 -> P1 -> P2 -> ...`: the destination of one migration is the source of the
//! next, and every process is driven over QMP with QEMU's commands (`migrate-incoming` on a
//! `--incoming defer` / `-incoming defer` destination, `migrate-set-parameters`, `migrate`,
//! `query-migrate`). The trackers alternate along the chain (a hop is tracked by its source's
//! tracker), so one boot gives `repeat` migrations per tracker.
//!
//! The guest's `/init` prints `heartbeat N sum HEX bad K t S` every period after checking
//! every word of a buffer it rewrites each beat ([`parse_beat`]). After each hop the
//! destination's console must continue the heartbeat: the next numbers in order, no word lost
//! (`bad 0`) and the checksum the pattern gives ([`beat_sum`]); the host-clock gap between
//! the source's last beat and the destination's first is the guest's outage as its own
//! output shows it. Consoles are files (ringvisor's `--console`, QEMU's `-serial file:`),
//! read by a thread every 2 ms that stamps each line with the host clock ([`Console`]).
//!
//! Time to user space: from the process start to the `/init` banner on its console, for
//! every boot.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{error_chain, BenchError, Result};
use crate::migrate::check_trackers;
use crate::pvh::Row;
use crate::qemu::{self, Drive, ExitCode, Qmp, Scratch, VmProcess};
use crate::Progress;

/// The files of a built Linux guest (`scripts/linux-guest/build.sh --print-dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxGuest {
    /// The directory they came from.
    pub dir: PathBuf,
    /// The uncompressed kernel (a PVH ELF).
    pub vmlinux: PathBuf,
    /// The newc initramfs.
    pub initramfs: PathBuf,
    /// The kernel command line for the host the guest was built for.
    pub cmdline: String,
}

impl LinuxGuest {
    /// The guest in `dir` (`vmlinux`, `initramfs.cpio`, `cmdline`).
    pub fn from_dir(dir: &Path) -> Result<LinuxGuest> {
        let missing =
            |what: &str| BenchError::NoLinuxGuest(format!("{} has no {what}", dir.display()));
        let vmlinux = dir.join("vmlinux");
        let initramfs = dir.join("initramfs.cpio");
        if !vmlinux.is_file() {
            return Err(missing("vmlinux"));
        }
        if !initramfs.is_file() {
            return Err(missing("initramfs.cpio"));
        }
        let cmdline =
            std::fs::read_to_string(dir.join("cmdline")).map_err(|_| missing("cmdline"))?;
        Ok(LinuxGuest {
            dir: dir.to_path_buf(),
            vmlinux,
            initramfs,
            cmdline: cmdline.trim().to_string(),
        })
    }
}

/// `scripts/linux-guest/build.sh` of this repository.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/linux-guest/build.sh")
}

/// The Linux guest: `dir` if given, else `RINGVISOR_LINUX_GUEST_DIR`, else what
/// `scripts/linux-guest/build.sh --print-dir --no-install` prints (it builds the guest the
/// first time on a machine: 10-17 minutes on 2 cores). A guest that cannot be found or built
/// is [`BenchError::NoLinuxGuest`], which the CLI reports as a skip.
pub fn find_guest(dir: Option<&Path>, progress: &mut dyn Progress) -> Result<LinuxGuest> {
    if let Some(d) = dir {
        return LinuxGuest::from_dir(d);
    }
    if let Some(d) = std::env::var_os("RINGVISOR_LINUX_GUEST_DIR") {
        return LinuxGuest::from_dir(Path::new(&d));
    }
    let script = build_script();
    if !script.is_file() {
        return Err(BenchError::NoLinuxGuest(format!(
            "no --linux-guest DIR, no RINGVISOR_LINUX_GUEST_DIR and no {}",
            script.display()
        )));
    }
    progress.note(&format!(
        "linux guest: {} --print-dir --no-install (cached: a second; the first build on a machine takes 10-17 minutes)",
        script.display()
    ));
    let out = Command::new("bash")
        .arg(&script)
        .args(["--print-dir", "--no-install"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(BenchError::io(format!("running {}", script.display())))?;
    if !out.status.success() {
        return Err(BenchError::NoLinuxGuest(format!(
            "{} failed ({}); its packages may be missing (run it without --no-install)",
            script.display(),
            out.status
        )));
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    LinuxGuest::from_dir(Path::new(&dir))
}

/// Options of the Linux rows.
#[derive(Debug, Clone)]
pub struct LinuxOpts {
    /// The `ringvisor` binary.
    pub exe: PathBuf,
    /// The guest.
    pub guest: LinuxGuest,
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// Trackers, in chain order (QEMU has ring and bitmap; its chain leaves clear-log out).
    pub trackers: Vec<String>,
    /// Dirty ring entries per vCPU (both VMMs).
    pub ring_entries: u32,
    /// `downtime-limit` in ms.
    pub downtime_limit: u64,
    /// `max-bandwidth` in bytes/s (finite: QEMU's 0 is not "unlimited").
    pub max_bandwidth: u64,
    /// Seconds before a migration is cancelled.
    pub timeout: f64,
    /// The heartbeat period (`rv_period_ms`).
    pub period_ms: u64,
    /// The buffer the dirtying workload rewrites every period (`rv_buf_kb`), KiB.
    pub dirty_kb: u64,
    /// Migrations per tracker and chain (the table shows medians).
    pub repeat: u32,
    /// Boots per VMM for the time to user space: each workload's chain boots once; boots
    /// beyond those stop at the banner (fewer than the chains' adds none).
    pub boots: u32,
    /// Run the idle workload.
    pub idle: bool,
    /// Run the dirtying workload.
    pub dirtying: bool,
    /// Seconds a boot may take to reach the first heartbeat.
    pub boot_timeout: f64,
}

/// The idle workload's buffer (`rv_buf_kb`): the smallest /init takes, one page.
const IDLE_KB: u64 = 4;
/// Heartbeats each destination must print (checked) before it becomes the next source.
const BEATS_AFTER_HOP: usize = 3;
/// Heartbeats the first source prints before its first migration.
const BEATS_BEFORE_FIRST_HOP: usize = 3;
/// How often the console files are read.
const CONSOLE_POLL: Duration = Duration::from_millis(2);
/// The line `/init` prints once user space runs.
const BANNER: &str = "ringvisor-guest: v1 up";
/// QEMU's machine for the Linux guest: microvm, whose qboot firmware writes an MP table with
/// every vCPU from fw_cfg (the kernel has no ACPI), with its PIC, PIT, RTC and IOAPIC as
/// ringvisor's PVH platform has them. (`pc`'s SeaBIOS counts the vCPUs by starting them,
/// which fails at this host's emulated CPL0: its MP table lists one.)
const QEMU_MACHINE: &str = "microvm,acpi=off";
/// QEMU's CPU for the Linux guest on this host (pvm-host.md): `-pni` and `-cx16` (PVM cannot
/// emulate `cmpxchg16b` at CPL0; ringvisor clears the same bit), the TSC-deadline timer and
/// x2APIC as ringvisor's PVH platform offers them.
const QEMU_CPU: &str = "qemu64,-pni,-cx16,+x2apic,+tsc-deadline";

/// One workload: a name and the /init parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `idle` or `dirtying N MiB/s`.
    pub name: String,
    /// `rv_buf_kb`.
    pub buf_kb: u64,
}

/// The two workloads: idle (a one-page heartbeat) and a buffer of `o.dirty_kb` rewritten
/// every period.
pub fn workloads(o: &LinuxOpts) -> Vec<Workload> {
    let rate = o.dirty_kb as f64 / 1024.0 * 1000.0 / o.period_ms.max(1) as f64;
    let mut v = Vec::new();
    if o.idle {
        v.push(Workload {
            name: "idle".into(),
            buf_kb: IDLE_KB,
        });
    }
    if o.dirtying {
        v.push(Workload {
            name: format!("dirtying {rate:.0} MiB/s"),
            buf_kb: o.dirty_kb,
        });
    }
    v
}

/// The kernel command line of a workload: the guest's own, then the /init parameters (no
/// shell: nothing but the heartbeat runs in user space).
pub fn cmdline(o: &LinuxOpts, w: &Workload) -> String {
    format!(
        "{} rv_period_ms={} rv_buf_kb={} rv_shell=0",
        o.guest.cmdline, o.period_ms, w.buf_kb
    )
}

/// One heartbeat line of the guest's /init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// Beat number (from 0).
    pub n: u64,
    /// The checksum of the buffer as this beat wrote it.
    pub sum: u64,
    /// Words that did not hold the previous beat's pattern.
    pub bad: u64,
}

/// Parses `heartbeat N sum HEX bad K t S` (other output may precede it on the line).
pub fn parse_beat(line: &str) -> Option<Beat> {
    let i = line.find("heartbeat ")?;
    let w: Vec<&str> = line[i..].split_ascii_whitespace().collect();
    match w.as_slice() {
        ["heartbeat", n, "sum", s, "bad", b, "t", _, ..] => Some(Beat {
            n: n.parse().ok()?,
            sum: u64::from_str_radix(s, 16).ok()?,
            bad: b.parse().ok()?,
        }),
        _ => None,
    }
}

/// /init's pattern word `i` of beat `beat` (scripts/linux-guest/init.c).
fn pattern(beat: u64, i: u64) -> u64 {
    let mut x = beat.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 31;
    x | 1
}

/// The checksum /init prints for beat `n` with a buffer of `buf_kb` KiB (at least 4, as
/// /init clamps it): an FNV-style fold of every word it wrote.
pub fn beat_sum(n: u64, buf_kb: u64) -> u64 {
    let words = buf_kb.max(4) * 1024 / 8;
    (0..words).fold(0u64, |sum, i| {
        (sum ^ pattern(n, i)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A console line and the host time it was seen complete.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// When the reader saw its newline.
    pub at: Instant,
    /// The text, without `\r\n`.
    pub text: String,
}

/// What a console file holds so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConsoleText {
    /// Complete lines.
    pub lines: Vec<Line>,
    /// The bytes after the last newline (a line the guest has not finished).
    pub partial: String,
}

/// Most lines kept per console (a guest printing for hours drops its oldest).
const MAX_LINES: usize = 100_000;

impl ConsoleText {
    /// Appends `bytes` read at `at`: complete lines get that time.
    fn push(&mut self, bytes: &[u8], at: Instant) {
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let mut text = std::mem::take(&mut self.partial);
            text.push_str(&String::from_utf8_lossy(&rest[..end]));
            let text = text.trim_end_matches('\r').to_string();
            self.lines.push(Line { at, text });
            rest = &rest[end + 1..];
        }
        self.partial.push_str(&String::from_utf8_lossy(rest));
        if self.lines.len() > MAX_LINES {
            self.lines.drain(..MAX_LINES / 2);
        }
    }

    /// The heartbeats and when each was seen.
    pub fn beats(&self) -> Vec<(Instant, Beat)> {
        self.lines
            .iter()
            .filter_map(|l| Some((l.at, parse_beat(&l.text)?)))
            .collect()
    }

    /// When the first line containing `needle` was seen.
    pub fn find(&self, needle: &str) -> Option<Instant> {
        self.lines
            .iter()
            .find(|l| l.text.contains(needle))
            .map(|l| l.at)
    }
}

/// A console file read by a thread every [`CONSOLE_POLL`], each complete line stamped with
/// the host clock.
pub struct Console {
    state: Arc<Mutex<Reader>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The file (once it exists) and what was read from it.
struct Reader {
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
    text: ConsoleText,
}

impl Reader {
    /// Reads what the VM process appended since the last call.
    fn poll(&mut self) {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(f) = self.file.as_mut() else {
            return;
        };
        self.buf.clear();
        if f.read_to_end(&mut self.buf).is_ok() && !self.buf.is_empty() {
            let now = Instant::now();
            self.text.push(&self.buf, now);
        }
    }
}

impl Console {
    /// Starts reading `path` (created by the VM process; read from its start once it exists).
    pub fn watch(path: PathBuf) -> Console {
        let state = Arc::new(Mutex::new(Reader {
            path,
            file: None,
            buf: Vec::with_capacity(1 << 16),
            text: ConsoleText::default(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, s) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                lock(&st).poll();
                std::thread::sleep(CONSOLE_POLL);
            }
        });
        Console {
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Everything the file holds now (read up to its end first).
    pub fn text(&self) -> ConsoleText {
        self.with(Clone::clone)
    }

    /// `f` of everything the file holds now (read up to its end first).
    fn with<R>(&self, f: impl FnOnce(&ConsoleText) -> R) -> R {
        let mut r = lock(&self.state);
        r.poll();
        f(&r.text)
    }
}

fn lock(m: &Mutex<Reader>) -> MutexGuard<'_, Reader> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The destination's heartbeats after a migration: its console, with the source's unfinished
/// last line (cut by the pause, finished by the destination) put in front of its first line.
pub fn continued_beats(src: &ConsoleText, dest: &ConsoleText) -> Vec<(Instant, Beat)> {
    let mut lines = dest.lines.clone();
    if let Some(first) = lines.first_mut() {
        first.text = format!("{}{}", src.partial, first.text);
    }
    ConsoleText {
        lines,
        partial: String::new(),
    }
    .beats()
}

/// Judges the heartbeats after a hop: `dest` must continue `last` (the source's last complete
/// beat) with the next numbers in order, no word lost and the pattern's checksum. Returns the
/// gap between `last` and the first destination beat (ms), or what was wrong.
pub fn judge_hop(
    last: (Instant, Beat),
    dest: &[(Instant, Beat)],
    buf_kb: u64,
) -> std::result::Result<f64, String> {
    let Some(&(first_at, _)) = dest.first() else {
        return Err(format!(
            "no heartbeat on the destination after {}",
            last.1.n
        ));
    };
    for (j, (_, b)) in dest.iter().enumerate() {
        let want = last.1.n + 1 + j as u64;
        if b.n != want {
            return Err(format!("heartbeat {} where {want} was due", b.n));
        }
        if b.bad != 0 {
            return Err(format!(
                "heartbeat {}: the guest found {} words of its buffer changed",
                b.n, b.bad
            ));
        }
        let sum = beat_sum(b.n, buf_kb);
        if b.sum != sum {
            return Err(format!(
                "heartbeat {}: checksum {:016x}, the pattern gives {sum:016x}",
                b.n, b.sum
            ));
        }
    }
    Ok(first_at.saturating_duration_since(last.0).as_secs_f64() * 1e3)
}

/// One boot: how long the guest took to reach user space.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Boot {
    /// `ringvisor` or `qemu`.
    pub vmm: String,
    /// The workload it was booted with (`boot only` for the extra boots).
    pub workload: String,
    /// From the process start to the /init banner on the console, s.
    pub user_space_s: f64,
    /// From the process start to the first heartbeat, s (after /init has mapped and filled
    /// its buffer); `None` for boots that stop at the banner.
    pub first_beat_s: Option<f64>,
}

/// The Linux rows.
#[derive(Serialize, Debug)]
pub struct Report {
    /// The host's KVM is PVM.
    pub pvm_host: bool,
    /// QEMU's version, if it was usable.
    pub qemu: Option<String>,
    /// The guest's build directory.
    pub guest_dir: String,
    /// Guest memory (MiB).
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// Ring entries per vCPU.
    pub ring_entries: u32,
    /// `downtime-limit` (ms).
    pub downtime_limit_ms: u64,
    /// `max-bandwidth` (bytes/s).
    pub max_bandwidth: u64,
    /// Heartbeat period (ms).
    pub period_ms: u64,
    /// The workloads and their kernel command lines.
    pub workloads: Vec<(String, String)>,
    /// Every migration that was measured (`heartbeat_gap_ms` set; `dest_progress`: the
    /// destination continued the heartbeat with the next numbers, `bad 0` and the pattern's
    /// checksum).
    pub rows: Vec<Row>,
    /// Every boot.
    pub boots: Vec<Boot>,
    /// Cells and chains that failed, and other notes.
    pub notes: Vec<String>,
    /// Wall time of the whole run, s.
    pub run_s: f64,
}

/// The VMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ringvisor,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ringvisor => "ringvisor",
            Vmm::Qemu => "qemu",
        }
    }
}

/// One VM process of a chain: the process, its monitor, its console, its tracker.
struct Node {
    proc: VmProcess,
    qmp: Qmp,
    console: Console,
    tracker: String,
    started: Instant,
}

impl Node {
    /// Starts a process: the source booting the guest, or (`incoming`) a destination
    /// waiting for `migrate-incoming`; connects to its monitor.
    fn start(
        o: &LinuxOpts,
        vmm: Vmm,
        scratch: &Scratch,
        name: &str,
        tracker: &str,
        line: &str,
        incoming: bool,
    ) -> Result<Node> {
        let (qmp, serial) = scratch.paths(name);
        let started = Instant::now();
        let mut proc = match vmm {
            Vmm::Ringvisor => {
                let args = ringvisor_args(o, tracker, line, &qmp, &serial, incoming);
                VmProcess::spawn(name, &o.exe, &args, scratch, ExitCode::Direct)?
            }
            Vmm::Qemu => {
                let g = qemu::QemuGuest {
                    machine: QEMU_MACHINE,
                    cpu: QEMU_CPU,
                    kernel: &o.guest.vmlinux,
                    initrd: Some(&o.guest.initramfs),
                    cmdline: line,
                    memory_mib: o.memory >> 20,
                    vcpus: o.vcpus as u32,
                    dirty_ring: (tracker == "ring").then_some(o.ring_entries),
                };
                let args = qemu::guest_args(&g, &qmp, &serial, incoming);
                VmProcess::spawn(name, qemu::QEMU, &args, scratch, ExitCode::QemuDebugExit)?
            }
        };
        let console = Console::watch(serial);
        let (qmp, _) = proc.connect(Instant::now() + Duration::from_secs(30))?;
        Ok(Node {
            proc,
            qmp,
            console,
            tracker: tracker.to_string(),
            started,
        })
    }

    /// Waits until `pred` holds for the console, failing if the process exits or `limit`
    /// passes; returns what it returned.
    fn wait<R>(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&ConsoleText) -> Option<R>,
    ) -> Result<R> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = self.console.with(&pred) {
                return Ok(r);
            }
            self.proc.check_running()?;
            if Instant::now() >= deadline {
                let t = self.console.text();
                let tail: Vec<&str> = t
                    .lines
                    .iter()
                    .rev()
                    .take(10)
                    .map(|l| l.text.as_str())
                    .collect();
                return Err(BenchError::Linux(format!(
                    "{}: no {what} within {limit:?}; console tail:\n{}",
                    self.proc.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the process (`quit`, then killed if it does not exit).
    fn quit(mut self) {
        self.qmp.quit();
        self.proc.reap(Duration::from_secs(5));
    }
}

/// `ringvisor run --kernel ...` (source) or `ringvisor incoming --incoming defer ...`.
fn ringvisor_args(
    o: &LinuxOpts,
    tracker: &str,
    line: &str,
    qmp: &Path,
    console: &Path,
    incoming: bool,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    if incoming {
        a.extend(["incoming".into(), "--incoming".into(), "defer".into()]);
    } else {
        a.extend([
            "run".into(),
            "--kernel".into(),
            o.guest.vmlinux.display().to_string(),
            "--initrd".into(),
            o.guest.initramfs.display().to_string(),
            "--cmdline".into(),
            line.to_string(),
            "--memory".into(),
            o.memory.to_string(),
            "--vcpus".into(),
            o.vcpus.to_string(),
        ]);
    }
    a.extend([
        "--tracker".into(),
        tracker.to_string(),
        "--ring-entries".into(),
        o.ring_entries.to_string(),
        "--qmp".into(),
        format!("unix:{}", qmp.display()),
        "--console".into(),
        console.display().to_string(),
    ]);
    a
}

/// The trackers of `vmm`'s chain, in order (QEMU has no clear-log of its own).
fn chain_trackers(o: &LinuxOpts, vmm: Vmm) -> Vec<String> {
    o.trackers
        .iter()
        .filter(|t| vmm == Vmm::Ringvisor || t.as_str() != "clear-log")
        .cloned()
        .collect()
}

/// What one chain produced.
struct ChainOut {
    rows: Vec<Row>,
    boot: Option<Boot>,
}

/// Seconds from `start` to `at`.
fn secs(start: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(start).as_secs_f64()
}

/// Boots the guest under `vmm` with workload `w` and migrates it along a chain, one hop per
/// tracker and repeat. Rows measured before an error are kept in `out`.
fn chain(
    o: &LinuxOpts,
    vmm: Vmm,
    w: &Workload,
    scratch: &Scratch,
    progress: &mut dyn Progress,
    out: &mut ChainOut,
) -> Result<()> {
    let trackers = chain_trackers(o, vmm);
    let line = cmdline(o, w);
    let tag = format!(
        "{}-{}",
        vmm.name(),
        if w.buf_kb == IDLE_KB { "idle" } else { "dirty" }
    );
    let boot_limit = Duration::from_secs_f64(o.boot_timeout);
    progress.step(&format!("{} {}: boot", vmm.name(), w.name));
    let mut cur = Node::start(
        o,
        vmm,
        scratch,
        &format!("{tag}-0"),
        &trackers[0],
        &line,
        false,
    )?;
    let banner = cur.wait("/init banner", boot_limit, |c| c.find(BANNER))?;
    let first = cur.wait("heartbeat", boot_limit, |c| c.beats().first().map(|b| b.0))?;
    out.boot = Some(Boot {
        vmm: vmm.name().into(),
        workload: w.name.clone(),
        user_space_s: secs(cur.started, banner),
        first_beat_s: Some(secs(cur.started, first)),
    });
    progress.inc();
    let beat_limit = Duration::from_millis(30_000 + 20 * o.period_ms);
    cur.wait("heartbeats", beat_limit, |c| {
        (c.beats().len() >= BEATS_BEFORE_FIRST_HOP).then_some(())
    })?;
    let hops = trackers.len() * o.repeat as usize;
    for h in 0..hops {
        let next_tracker = &trackers[(h + 1) % trackers.len()];
        progress.step(&format!("{} {}: {}", vmm.name(), w.name, cur.tracker));
        let mut next = Node::start(
            o,
            vmm,
            scratch,
            &format!("{tag}-{}", h + 1),
            next_tracker,
            &line,
            true,
        )?;
        let port = qemu::incoming(&mut next.qmp)?;
        let driven = qemu::drive(
            &mut cur.qmp,
            &mut cur.proc,
            port,
            &Drive {
                downtime_limit_ms: o.downtime_limit,
                max_bandwidth: o.max_bandwidth,
                timeout: Duration::from_secs_f64(o.timeout),
                extras: Default::default(),
            },
        )?;
        let mut row = match vmm {
            Vmm::Ringvisor if driven.info.status == "completed" => ringvisor_row(&mut cur.qmp)?,
            _ => qemu_row(&driven),
        };
        row.vmm = vmm.name().into();
        row.scenario = w.name.clone();
        row.tracker = cur.tracker.clone();
        if !row.completed {
            progress.note(&format!(
                "{} {} {}: {}",
                vmm.name(),
                w.name,
                cur.tracker,
                row.outcome
            ));
            out.rows.push(row);
            next.quit();
            progress.inc();
            continue;
        }
        let src = cur.console.text();
        let Some(&last) = src.beats().last() else {
            return Err(BenchError::Linux(format!(
                "{}: no heartbeat before the migration",
                cur.proc.name
            )));
        };
        let have = next.wait("heartbeats after the migration", beat_limit, |c| {
            let b = continued_beats(&src, c);
            (b.len() >= BEATS_AFTER_HOP).then_some(b)
        });
        let beats = match have {
            Ok(b) => b,
            // Judged below with what arrived (none: the chain cannot go on).
            Err(_) => continued_beats(&src, &next.console.text()),
        };
        match judge_hop(last, &beats[..beats.len().min(BEATS_AFTER_HOP)], w.buf_kb) {
            Ok(gap) => {
                row.dest_progress = beats.len() >= BEATS_AFTER_HOP;
                row.heartbeat_gap_ms = Some(gap);
            }
            Err(why) => {
                row.dest_progress = false;
                progress.note(&format!("{} {} {}: {why}", vmm.name(), w.name, cur.tracker));
            }
        }
        if row.verified == Some(false) {
            progress.note(&format!("WARNING: memory digest mismatch: {row:?}"));
        }
        let stop = beats.is_empty();
        out.rows.push(row);
        progress.inc();
        let prev = std::mem::replace(&mut cur, next);
        prev.quit();
        if stop {
            return Err(BenchError::Linux(format!(
                "{}: the guest printed no heartbeat after the migration",
                cur.proc.name
            )));
        }
    }
    cur.quit();
    Ok(())
}

/// A ringvisor source's row from its summary (`x-ringvisor-query-migration-passes`; it is
/// there once the job has finished, shortly after `completed`).
fn ringvisor_row(q: &mut Qmp) -> Result<Row> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v = q.execute("x-ringvisor-query-migration-passes", json!({}))?;
        if v.get("summary").is_some() || Instant::now() >= deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(ringvisor_row_from(&v))
}

/// [`ringvisor_row`] from the reply.
fn ringvisor_row_from(v: &Value) -> Row {
    let s = &v["summary"];
    let kind = s["outcome"]["kind"].as_str().unwrap_or("?").to_string();
    Row {
        vmm: String::new(),
        scenario: String::new(),
        tracker: String::new(),
        completed: kind == "completed",
        outcome: kind,
        total_ms: s["total_ms"].as_f64().unwrap_or(0.0),
        downtime_ms: s["downtime_ms"].as_f64().unwrap_or(0.0),
        downtime_source_ms: s["downtime_source_ms"].as_f64().unwrap_or(0.0),
        downtime_sent_ms: crate::pvh::sent_downtime_ms(s),
        mib_sent: s["bytes_sent"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20),
        passes: s["iterations"].as_array().map_or(0, |a| a.len() as u64),
        dest_progress: false,
        verified: s["verified"].as_bool(),
        source_cpu_s: None,
        migration_cpu_s: None,
        dest_cpu_s: None,
        guest: crate::pvh::GuestRate::default(),
        heartbeat_gap_ms: None,
        guest_faults: s["guest_faults"].as_u64(),
    }
}

/// A row from `query-migrate` (QEMU's, and ringvisor's when the migration did not
/// complete).
fn qemu_row(d: &qemu::Driven) -> Row {
    let r = d.info.result(String::new(), false);
    let outcome = match d.timed_out {
        Some(w) => format!("timeout after {:.1} s ({})", w.as_secs_f64(), r.status),
        None => r.status.clone(),
    };
    Row {
        vmm: String::new(),
        scenario: String::new(),
        tracker: String::new(),
        completed: r.completed,
        outcome,
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        downtime_source_ms: r.downtime_ms,
        downtime_sent_ms: r.downtime_ms,
        mib_sent: r.bytes_sent as f64 / f64::from(1u32 << 20),
        passes: r.passes,
        dest_progress: false,
        verified: None,
        source_cpu_s: None,
        migration_cpu_s: None,
        dest_cpu_s: None,
        guest: crate::pvh::GuestRate::default(),
        heartbeat_gap_ms: None,
        guest_faults: d.guest_faults,
    }
}

/// A boot that stops at the banner (the extra time-to-user-space samples).
fn boot_only(o: &LinuxOpts, vmm: Vmm, scratch: &Scratch, i: u32) -> Result<Boot> {
    let w = Workload {
        name: "boot only".into(),
        buf_kb: IDLE_KB,
    };
    let tracker = &chain_trackers(o, vmm)[0];
    let name = format!("{}-boot-{i}", vmm.name());
    let mut n = Node::start(o, vmm, scratch, &name, tracker, &cmdline(o, &w), false)?;
    let banner = n.wait(
        "/init banner",
        Duration::from_secs_f64(o.boot_timeout),
        |c| c.find(BANNER),
    )?;
    let b = Boot {
        vmm: vmm.name().into(),
        workload: "boot only".into(),
        user_space_s: secs(n.started, banner),
        first_beat_s: None,
    };
    n.quit();
    Ok(b)
}

fn check(o: &LinuxOpts) -> Result<()> {
    if !vmm::kvm_available() {
        return Err(BenchError::NoKvm("bench migrate --linux"));
    }
    if o.max_bandwidth == 0 {
        return Err(BenchError::Invalid(
            "--max-bandwidth must be a finite rate for the QEMU comparison".into(),
        ));
    }
    if o.trackers.is_empty() {
        return Err(BenchError::Invalid("--trackers: none given".into()));
    }
    if !(o.idle || o.dirtying) {
        return Err(BenchError::Invalid("no workload selected".into()));
    }
    if o.period_ms == 0 || o.dirty_kb < 4 || o.repeat == 0 {
        return Err(BenchError::Invalid(
            "the heartbeat period, the dirtying buffer (>= 4 KiB) and --repeat must be positive"
                .into(),
        ));
    }
    if !(o.timeout.is_finite()
        && o.timeout > 0.0
        && o.boot_timeout.is_finite()
        && o.boot_timeout > 0.0)
    {
        return Err(BenchError::Invalid(
            "timeouts must be positive seconds".into(),
        ));
    }
    check_trackers(&o.trackers)
}

/// Runs the Linux rows: ringvisor always, QEMU where it is usable (else a note, and the
/// report's `qemu` is `None`). A chain that fails ends with a note; what it measured stays.
pub fn run(o: &LinuxOpts, progress: &mut dyn Progress) -> Result<Report> {
    check(o)?;
    let t0 = Instant::now();
    let mut notes = Vec::new();
    let mut note = |progress: &mut dyn Progress, n: String| {
        progress.note(&n);
        notes.push(n);
    };
    let qemu_version = qemu::available();
    let mut vmms = vec![Vmm::Ringvisor];
    match &qemu_version {
        Some(_) => vmms.push(Vmm::Qemu),
        None => note(
            progress,
            format!(
                "{} is not usable here: the QEMU rows are left out",
                qemu::QEMU
            ),
        ),
    }
    let ws = workloads(o);
    let chain_boots = ws.len() as u32;
    let steps: usize = vmms
        .iter()
        .map(|&v| {
            let hops = chain_trackers(o, v).len() * o.repeat as usize;
            ws.len() * (1 + hops) + o.boots.saturating_sub(chain_boots) as usize
        })
        .sum();
    progress.start(steps as u64, "steps");
    let scratch = Scratch::new()?;
    let mut rows = Vec::new();
    let mut boots = Vec::new();
    for w in &ws {
        for &v in &vmms {
            let mut out = ChainOut {
                rows: Vec::new(),
                boot: None,
            };
            if let Err(e) = chain(o, v, w, &scratch, progress, &mut out) {
                note(
                    progress,
                    format!("{} {}: {}", v.name(), w.name, error_chain(&e)),
                );
            }
            rows.append(&mut out.rows);
            boots.extend(out.boot);
        }
    }
    for i in chain_boots..o.boots {
        for &v in &vmms {
            progress.step(&format!("{}: boot {}", v.name(), i + 1));
            match boot_only(o, v, &scratch, i) {
                Ok(b) => boots.push(b),
                Err(e) => note(
                    progress,
                    format!("{} boot {}: {}", v.name(), i + 1, error_chain(&e)),
                ),
            }
            progress.inc();
        }
    }
    progress.finish();
    Ok(Report {
        pvm_host: kvm_dirty::is_pvm_host(),
        qemu: qemu_version,
        guest_dir: o.guest.dir.display().to_string(),
        memory_mib: o.memory >> 20,
        vcpus: o.vcpus,
        ring_entries: o.ring_entries,
        downtime_limit_ms: o.downtime_limit,
        max_bandwidth: o.max_bandwidth,
        period_ms: o.period_ms,
        workloads: ws.iter().map(|w| (w.name.clone(), cmdline(o, w))).collect(),
        rows,
        boots,
        notes,
        run_s: t0.elapsed().as_secs_f64(),
    })
}

impl Report {
    /// The tables as markdown, with their header lines and notes.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "Linux guest ({}), {} MiB, {} vCPU(s), downtime-limit {} ms, max-bandwidth {} MB/s, ring {} entries/vCPU, heartbeat every {} ms, loopback{}; run time {:.0} s\n",
            self.guest_dir,
            self.memory_mib,
            self.vcpus,
            self.downtime_limit_ms,
            self.max_bandwidth / 1_000_000,
            self.ring_entries,
            self.period_ms,
            if self.pvm_host { ", PVM host" } else { "" },
            self.run_s,
        );
        for (name, line) in &self.workloads {
            s += &format!("{name}: `{line}`\n");
        }
        s += &format!(
            "QEMU: {}\n\n",
            self.qemu.as_deref().unwrap_or("not available")
        );
        s += &crate::pvh::table(&self.rows);
        s += "\nCells are medians over the hops of one boot per (VMM, workload): the guest migrates along a chain of processes, each destination the next source, the tracker of a hop its source's. ringvisor's downtime runs from the pause until the destination reports the guest resumed; QEMU's `downtime` ends when the source has sent the last state. The heartbeat gap is the host time between the guest's last heartbeat line on the source's console and its next on the destination's, for both VMMs (a period plus the outage); `dest progress` = the destination continued the heartbeat with the next numbers, no word of the buffer lost and the checksum right.\n\n";
        s += &boot_table(&self.boots);
        for n in &self.notes {
            s += &format!("\nnote: {n}");
        }
        if !self.notes.is_empty() {
            s += "\n";
        }
        s
    }
}

/// Time to user space per VMM: the median over its boots, and each boot.
pub fn boot_table(boots: &[Boot]) -> String {
    let mut s = String::from(
        "| VMM | boots | time to user space s (median) | each boot s (workload) | first heartbeat s (median) |\n|---|---|---|---|---|\n",
    );
    let mut vmms: Vec<&str> = Vec::new();
    for b in boots {
        if !vmms.contains(&b.vmm.as_str()) {
            vmms.push(&b.vmm);
        }
    }
    for v in vmms {
        let bs: Vec<&Boot> = boots.iter().filter(|b| b.vmm == v).collect();
        let med = crate::pvh::median(bs.iter().map(|b| b.user_space_s).collect());
        let first = crate::pvh::median(bs.iter().filter_map(|b| b.first_beat_s).collect());
        let each: Vec<String> = bs
            .iter()
            .map(|b| format!("{:.1} ({})", b.user_space_s, b.workload))
            .collect();
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
        s += &format!(
            "| {v} | {} | {} | {} | {} |\n",
            bs.len(),
            f(med),
            each.join(", "),
            f(first)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_lines_parse_also_after_other_output() {
        assert_eq!(
            parse_beat("heartbeat 17 sum 00ff00ff00ff00ff bad 0 t 12.345"),
            Some(Beat {
                n: 17,
                sum: 0x00ff_00ff_00ff_00ff,
                bad: 0
            })
        );
        assert_eq!(
            parse_beat("[   3.1] random: crng initheartbeat 2 sum 1 bad 5 t 1.0")
                .map(|b| (b.n, b.bad)),
            Some((2, 5))
        );
        for bad in [
            "heartbeat 1 sum zz bad 0 t 1.0",
            "heartbeat 1 sum 12 bad",
            "ringvisor-guest: heartbeat stopped",
            "heartbeat -1 sum 1 bad 0 t 0",
        ] {
            assert_eq!(parse_beat(bad), None, "{bad}");
        }
    }

    /// The checksum is /init's (init.c), checked against a line a guest printed on this
    /// host (`rv_buf_kb=4`: 512 words).
    #[test]
    fn beat_sum_matches_the_guest() {
        assert_eq!(beat_sum(0, 4), GUEST_SUM_0_4K);
        assert_eq!(beat_sum(1, 4), GUEST_SUM_1_4K);
        // /init clamps the buffer to 4 KiB.
        assert_eq!(beat_sum(1, 1), beat_sum(1, 4));
        assert_ne!(beat_sum(1, 8), beat_sum(1, 4));
    }

    /// `heartbeat 0 sum ...` and `heartbeat 1 sum ...` of a boot with `rv_buf_kb=4`.
    const GUEST_SUM_0_4K: u64 = 0x24f7_bfc1_5c2b_a434;
    const GUEST_SUM_1_4K: u64 = 0x2574_033c_e3ce_1074;

    #[test]
    fn console_text_stamps_complete_lines_and_keeps_the_unfinished_one() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(5);
        let mut c = ConsoleText::default();
        c.push(b"boot\r\nheartbeat 0 su", t0);
        assert_eq!(c.lines.len(), 1);
        assert_eq!(c.lines[0].text, "boot");
        assert_eq!(c.partial, "heartbeat 0 su");
        c.push(b"m 5 bad 0 t 1.0\r\nx", t1);
        assert_eq!(c.lines[1].text, "heartbeat 0 sum 5 bad 0 t 1.0");
        assert_eq!(c.lines[1].at, t1);
        assert_eq!(c.partial, "x");
        assert_eq!(
            c.beats(),
            vec![(
                t1,
                Beat {
                    n: 0,
                    sum: 5,
                    bad: 0
                }
            )]
        );
        assert_eq!(c.find("boot"), Some(t0));
        assert_eq!(c.find("nothing"), None);
    }

    fn beat_line(n: u64, kb: u64, bad: u64) -> String {
        format!(
            "heartbeat {n} sum {:016x} bad {bad} t 1.000",
            beat_sum(n, kb)
        )
    }

    #[test]
    fn a_line_cut_by_the_pause_is_finished_on_the_destination() {
        let t0 = Instant::now();
        let mut src = ConsoleText::default();
        let l7 = beat_line(7, 4, 0);
        let l8 = beat_line(8, 4, 0);
        src.push(format!("{l7}\n{}", &l8[..12]).as_bytes(), t0);
        let mut dest = ConsoleText::default();
        let t1 = t0 + Duration::from_millis(230);
        dest.push(
            format!("{}\n{}\n", &l8[12..], beat_line(9, 4, 0)).as_bytes(),
            t1,
        );
        let beats = continued_beats(&src, &dest);
        assert_eq!(beats.iter().map(|b| b.1.n).collect::<Vec<_>>(), vec![8, 9]);
        let last = *src.beats().last().unwrap();
        assert_eq!(last.1.n, 7);
        let gap = judge_hop(last, &beats, 4).unwrap();
        assert!((gap - 230.0).abs() < 1e-6, "{gap}");
    }

    #[test]
    fn judge_refuses_a_lost_beat_a_changed_word_and_a_wrong_checksum() {
        let t0 = Instant::now();
        let b = |n: u64, sum: u64, bad: u64| (t0, Beat { n, sum, bad });
        let last = b(4, beat_sum(4, 8), 0);
        let good = [b(5, beat_sum(5, 8), 0), b(6, beat_sum(6, 8), 0)];
        assert_eq!(judge_hop(last, &good, 8), Ok(0.0));
        let skipped = [b(6, beat_sum(6, 8), 0)];
        assert!(judge_hop(last, &skipped, 8)
            .unwrap_err()
            .contains("6 where 5"));
        let repeated = [b(4, beat_sum(4, 8), 0)];
        assert!(judge_hop(last, &repeated, 8).is_err());
        let changed = [b(5, beat_sum(5, 8), 3)];
        assert!(judge_hop(last, &changed, 8)
            .unwrap_err()
            .contains("3 words"));
        let wrong = [b(5, beat_sum(5, 8) ^ 1, 0)];
        assert!(judge_hop(last, &wrong, 8).unwrap_err().contains("checksum"));
        assert!(judge_hop(last, &[], 8)
            .unwrap_err()
            .contains("no heartbeat"));
    }

    fn opts(dir: &Path) -> LinuxOpts {
        LinuxOpts {
            exe: "/bin/ringvisor".into(),
            guest: LinuxGuest {
                dir: dir.to_path_buf(),
                vmlinux: dir.join("vmlinux"),
                initramfs: dir.join("initramfs.cpio"),
                cmdline: "console=ttyS0 rdinit=/init".into(),
            },
            memory: 128 << 20,
            vcpus: 2,
            trackers: vec!["ring".into(), "clear-log".into(), "bitmap".into()],
            ring_entries: 65536,
            downtime_limit: 300,
            max_bandwidth: 1_000_000_000,
            timeout: 60.0,
            period_ms: 200,
            dirty_kb: 32 << 10,
            repeat: 3,
            boots: 2,
            idle: true,
            dirtying: true,
            boot_timeout: 900.0,
        }
    }

    #[test]
    fn workloads_and_command_lines_carry_the_init_parameters() {
        let o = opts(Path::new("/g"));
        let ws = workloads(&o);
        assert_eq!(ws[0].name, "idle");
        assert_eq!(ws[1].name, "dirtying 160 MiB/s");
        assert_eq!(
            cmdline(&o, &ws[1]),
            "console=ttyS0 rdinit=/init rv_period_ms=200 rv_buf_kb=32768 rv_shell=0"
        );
        assert_eq!(chain_trackers(&o, Vmm::Qemu), vec!["ring", "bitmap"]);
        let only = LinuxOpts {
            idle: false,
            ..o.clone()
        };
        assert_eq!(workloads(&only).len(), 1);
        assert_eq!(chain_trackers(&o, Vmm::Ringvisor).len(), 3);
    }

    #[test]
    fn ringvisor_processes_get_the_same_guest_and_their_own_tracker() {
        let o = opts(Path::new("/g"));
        let src = ringvisor_args(&o, "ring", "L", Path::new("/s/q"), Path::new("/s/c"), false);
        let after = |a: &[String], f: &str| a[a.iter().position(|x| x == f).unwrap() + 1].clone();
        assert_eq!(src[0], "run");
        assert_eq!(after(&src, "--kernel"), "/g/vmlinux");
        assert_eq!(after(&src, "--initrd"), "/g/initramfs.cpio");
        assert_eq!(after(&src, "--cmdline"), "L");
        assert_eq!(after(&src, "--memory"), (128u64 << 20).to_string());
        assert_eq!(after(&src, "--qmp"), "unix:/s/q");
        let dst = ringvisor_args(
            &o,
            "bitmap",
            "L",
            Path::new("/s/q"),
            Path::new("/s/c"),
            true,
        );
        assert_eq!(dst[..3], ["incoming", "--incoming", "defer"]);
        assert_eq!(after(&dst, "--tracker"), "bitmap");
        assert_eq!(after(&dst, "--console"), "/s/c");
        assert!(!dst.contains(&"--kernel".to_string()));
    }

    #[test]
    fn the_summary_of_a_ringvisor_source_becomes_a_row() {
        let v = json!({"status": "completed", "summary": {"outcome": {"kind": "completed"},
            "total_ms": 120.5, "downtime_ms": 4.25, "downtime_source_ms": 3.0,
            "bytes_sent": 3 << 20, "iterations": [{}, {}, {}], "verified": true}});
        let r = ringvisor_row_from(&v);
        assert!(r.completed);
        assert_eq!(
            (r.total_ms, r.downtime_ms, r.downtime_source_ms),
            (120.5, 4.25, 3.0)
        );
        assert_eq!((r.mib_sent, r.passes, r.verified), (3.0, 3, Some(true)));
        let r = ringvisor_row_from(&json!({}));
        assert!(!r.completed);
        assert_eq!(r.outcome, "?");
    }

    #[test]
    fn the_boot_table_has_a_median_per_vmm() {
        let b = |vmm: &str, s: f64, f: Option<f64>| Boot {
            vmm: vmm.into(),
            workload: "idle".into(),
            user_space_s: s,
            first_beat_s: f,
        };
        let t = boot_table(&[
            b("ringvisor", 100.0, Some(101.0)),
            b("qemu", 90.0, None),
            b("ringvisor", 80.0, Some(99.0)),
            b("ringvisor", 120.0, None),
        ]);
        assert!(
            t.contains(
                "| ringvisor | 3 | 100.0 | 100.0 (idle), 80.0 (idle), 120.0 (idle) | 101.0 |"
            ),
            "{t}"
        );
        assert!(t.contains("| qemu | 1 | 90.0 | 90.0 (idle) | - |"), "{t}");
    }

    #[test]
    fn a_guest_directory_without_its_files_is_no_guest() {
        let dir = std::env::temp_dir().join(format!("rv-linux-guest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = LinuxGuest::from_dir(&dir).unwrap_err();
        assert!(matches!(e, BenchError::NoLinuxGuest(_)), "{e}");
        assert!(e.to_string().contains("vmlinux"), "{e}");
        std::fs::write(dir.join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.join("initramfs.cpio"), b"i").unwrap();
        std::fs::write(dir.join("cmdline"), b"console=ttyS0\n").unwrap();
        let g = LinuxGuest::from_dir(&dir).unwrap();
        assert_eq!(g.cmdline, "console=ttyS0");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
