//! The QEMU comparison row of `ringvisor bench migrate`: live-migrates the project's PVH test
//! kernel between two `qemu-system-x86_64` processes over loopback TCP, driven through QMP,
//! and reports QEMU's own numbers (`query-migrate`).
//!
//! Owns: launching both QEMU processes (always killed again, on every path), the QMP client
//! (JSON lines over a unix socket), the migration state machine on the source, and the check
//! that the guest keeps running on the destination. It does not touch `/dev/kvm` itself.
//!
//! Machine: `microvm` with its qboot firmware (the PVH entry is reached ~40 ms after QEMU
//! starts, where the `pc` machine's SeaBIOS takes ~3 s under PVM, which emulates every CPL0
//! instruction), without PIT, PIC and RTC, which the test kernel does not use. See
//! `docs/qemu.md`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use qmp::ClientError;
use serde_json::{json, Value};

/// Why a QEMU migration could not be measured (a migration that fails or times out is a
/// [`QemuResult`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A parameter QEMU would reject or misread.
    #[error("{0}")]
    Invalid(String),
    /// An operating-system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// QMP misbehaved: invalid JSON, an unexpected reply, a command's error, a closed
    /// connection.
    #[error("{0}")]
    Qmp(String),
    /// A QEMU process exited: its status, the serial tail and the stderr tail.
    #[error("{0}")]
    Exited(String),
    /// QEMU did not get somewhere in time (QMP socket, the kernel's first progress line).
    #[error("{0}")]
    Timeout(String),
    /// A step of the migration failed.
    #[error("{step}")]
    Step {
        /// The step (`source: migrate`) or the state of the process.
        step: String,
        /// Why.
        #[source]
        source: Box<QemuError>,
    },
}

/// Result with [`QemuError`].
pub type Result<T> = std::result::Result<T, QemuError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// Wraps an error in the step that failed.
trait Step<T> {
    fn step(self, step: impl Into<String>) -> Result<T>;
}

impl<T> Step<T> for Result<T> {
    fn step(self, step: impl Into<String>) -> Result<T> {
        self.map_err(|e| QemuError::Step {
            step: step.into(),
            source: Box::new(e),
        })
    }
}

macro_rules! fail {
    ($kind:ident, $($arg:tt)*) => {
        return Err(QemuError::$kind(format!($($arg)*)))
    };
}

/// The QEMU binary looked up in `PATH`.
pub const QEMU: &str = "qemu-system-x86_64";
/// microvm without the legacy timer and interrupt controllers (the kernel uses the LAPIC).
const MACHINE: &str = "microvm,pit=off,pic=off,rtc=off";
/// The exit device the test kernel writes its power-off status to (QEMU exits with
/// `(status << 1) | 1`).
const EXIT_DEVICE: &str = "isa-debug-exit,iobase=0x501,iosize=1";
/// Launch to QMP and to the first progress line of the source's kernel.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// One QMP command's reply.
const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// `query-migrate` polling period on the source.
const POLL: Duration = Duration::from_millis(20);
/// How long the destination gets to show every CPU making progress after the switchover.
const DEST_CHECK: Duration = Duration::from_secs(5);
/// `migrate_cancel` to `cancelled`, and `quit` to process exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// QEMU's largest `downtime-limit` (ms).
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;
/// `max-bandwidth` when the caller sets none: 1 TiB/s, i.e. unlimited on any link. (QEMU 7.2's
/// default is 128 MiB/s; 0 is not "unlimited" there.)
const UNLIMITED_BANDWIDTH: u64 = 1 << 40;

/// One QEMU migration: the guest and the migration parameters.
#[derive(Debug, Clone)]
pub struct QemuRun {
    /// A PVH ELF kernel (the project's test kernel: `ringvisor boot --write-test-kernel`).
    pub kernel: PathBuf,
    /// Its command line. The kernel must keep running until migrated (test kernel:
    /// `reports=0`) and print `cpu I progress R ...` lines on COM1.
    pub cmdline: String,
    /// Guest memory (MiB).
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Dirty ring entries per vCPU (`-accel kvm,dirty-ring-size=N`); `None` = the bitmap.
    pub dirty_ring: Option<u32>,
    /// `downtime-limit` (ms).
    pub downtime_limit_ms: u64,
    /// `max-bandwidth` in bytes/s; `None` = unlimited.
    pub max_bandwidth: Option<u64>,
    /// Time the guest runs on the source, after its first progress line, before `migrate`.
    pub warmup: Duration,
    /// Bound on the migration itself (`migrate` to `completed`); past it the migration is
    /// cancelled and reported as not completed.
    pub timeout: Duration,
}

/// What QEMU reported for one migration.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuResult {
    /// `query-migrate` reached `completed`.
    pub completed: bool,
    /// `completed`, `failed: <QEMU's error>`, `cancelled`, or `timeout after S s (cancelled)`.
    pub status: String,
    /// QEMU's `total-time` (ms; whole milliseconds), or the wall time until the cancel.
    pub total_ms: f64,
    /// QEMU's `downtime` (ms; whole milliseconds; 0 when not completed).
    pub downtime_ms: f64,
    /// QEMU's `setup-time` (ms).
    pub setup_ms: f64,
    /// Bytes of the migration stream as QEMU accounts them: `precopy-bytes + downtime-bytes +
    /// postcopy-bytes` (RAM pages, their headers and zero-page markers; QEMU 7.2 counts no
    /// device state), or `ram.transferred` where those fields are missing (QEMU < 7.1).
    pub bytes_sent: u64,
    /// QEMU's `ram.transferred`.
    pub ram_transferred: u64,
    /// QEMU's `ram.dirty-sync-count` (dirty-log syncs, i.e. pre-copy passes + the final one).
    pub passes: u64,
    /// After the switchover the destination was `running` and every CPU that reported on the
    /// source printed a later report on the destination within 5 s.
    pub dest_progress_ok: bool,
    /// From the source's QMP greeting, e.g. `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    pub qemu_version: String,
    /// CPU time (user + system) the source QEMU process used from its start until the
    /// migration ended, seconds (`/proc/PID/stat`); `None` where it could not be read.
    pub source_cpu_s: Option<f64>,
    /// The part of [`QemuResult::source_cpu_s`] its vCPU threads (`CPU N/KVM`) used; the
    /// rest is the migration thread's, the main loop's and the boot's.
    pub source_vcpu_cpu_s: Option<f64>,
    /// CPU time the destination QEMU process used from its start, its vCPU threads' left out
    /// (they run the guest after the switchover), seconds.
    pub dest_cpu_s: Option<f64>,
    /// The source guest's console at the end of the migration.
    pub source_console: String,
    /// Page faults the source's vCPUs took from just before `migrate` to its end: KVM's
    /// `pf_taken` summed over the vCPUs, from `query-stats` (QEMU 7.1+) before and after
    /// ([`guest_faults`]); `None` where the source does not answer it.
    pub guest_faults: Option<u64>,
}

/// Migration settings beyond [`QemuRun`] (for the comparisons with ringvisor's throttles).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QemuExtras {
    /// The `auto-converge` capability.
    pub auto_converge: bool,
    /// QEMU 7.2's per-vCPU dirty limit (`set-vcpu-dirty-limit`, `dirty-rate` in MB/s; the
    /// dirty ring only), set before `migrate`.
    pub vcpu_dirty_limit_mb: Option<u64>,
}

/// QEMU's version (`7.2.22 (Debian ...)`) if `qemu-system-x86_64` runs here with `-accel kvm`
/// and the microvm machine; probed once per process.
pub fn available() -> Option<String> {
    static PROBE: OnceLock<Option<String>> = OnceLock::new();
    PROBE.get_or_init(probe).clone()
}

fn probe() -> Option<String> {
    let out = Command::new(QEMU)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let version = version_from_banner(&String::from_utf8_lossy(&out.stdout))?;
    // A paused microvm with KVM, told to quit over QMP on stdio: fails fast without KVM.
    let mut child = Command::new(QEMU)
        .args([
            "-accel",
            "kvm",
            "-M",
            MACHINE,
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-S", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let quit = b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n";
    let wrote = child.stdin.take().map(|mut s| s.write_all(quit));
    let status = wait_timeout(&mut child, STOP_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    match (wrote, status) {
        (Some(Ok(())), Some(s)) if s.success() => Some(version),
        _ => None,
    }
}

/// `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)` -> `7.2.22 (Debian ...)`.
fn version_from_banner(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let v = line.split_once("version ")?.1.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// Checks the parameters QEMU would otherwise reject late (or misread).
fn validate(run: &QemuRun) -> Result<()> {
    if run.vcpus == 0 || run.vcpus > 255 {
        fail!(Invalid, "vcpus must be 1..=255, got {}", run.vcpus);
    }
    if run.memory_mib < 16 {
        fail!(
            Invalid,
            "memory must be at least 16 MiB, got {} MiB",
            run.memory_mib
        );
    }
    if let Some(n) = run.dirty_ring {
        if !n.is_power_of_two() || n < 256 {
            fail!(
                Invalid,
                "dirty ring entries must be a power of two >= 256 (QEMU/KVM), got {n}"
            );
        }
    }
    if run.downtime_limit_ms > MAX_DOWNTIME_LIMIT_MS {
        fail!(
            Invalid,
            "downtime limit {} ms exceeds QEMU's maximum of {MAX_DOWNTIME_LIMIT_MS} ms",
            run.downtime_limit_ms
        );
    }
    if run.max_bandwidth == Some(0) {
        fail!(
            Invalid,
            "max bandwidth 0 would stall QEMU's migration; use None for unlimited"
        );
    }
    if !run.kernel.is_file() {
        fail!(Invalid, "kernel {} is not a file", run.kernel.display());
    }
    Ok(())
}

/// QEMU's command line for one side (`incoming`: the destination, waiting for
/// `migrate-incoming`).
fn qemu_args(run: &QemuRun, qmp: &Path, serial: &Path, incoming: bool) -> Vec<String> {
    guest_args(
        &QemuGuest {
            machine: MACHINE,
            // The TSC-deadline timer, as ringvisor's PVH platform offers it (CPUID.1:ECX[24]);
            // the test kernel's `timer=tsc-deadline` needs it.
            cpu: "qemu64,+tsc-deadline",
            kernel: &run.kernel,
            initrd: None,
            cmdline: &run.cmdline,
            memory_mib: run.memory_mib,
            vcpus: run.vcpus,
            dirty_ring: run.dirty_ring,
        },
        qmp,
        serial,
        incoming,
    )
}

/// The guest and platform of one QEMU process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QemuGuest<'a> {
    /// `-M` value.
    pub machine: &'a str,
    /// `-cpu` value.
    pub cpu: &'a str,
    /// `-kernel` (a PVH ELF).
    pub kernel: &'a Path,
    /// `-initrd`.
    pub initrd: Option<&'a Path>,
    /// `-append`.
    pub cmdline: &'a str,
    /// `-m`, MiB.
    pub memory_mib: u64,
    /// `-smp`.
    pub vcpus: u32,
    /// `-accel kvm,dirty-ring-size=N`; `None` = the bitmap.
    pub dirty_ring: Option<u32>,
}

/// QEMU's command line for a guest (`incoming`: `-incoming defer`, waiting for
/// `migrate-incoming`): no default devices, QMP on a unix socket, COM1 to a file, the exit
/// device on port 0x501.
pub(crate) fn guest_args(g: &QemuGuest, qmp: &Path, serial: &Path, incoming: bool) -> Vec<String> {
    let accel = match g.dirty_ring {
        Some(n) => format!("kvm,dirty-ring-size={n}"),
        None => "kvm".to_string(),
    };
    let mut a: Vec<String> = [
        "-accel",
        &accel,
        "-M",
        g.machine,
        "-cpu",
        g.cpu,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        // Thread names (`CPU 0/KVM`, `live_migration`), so the vCPUs' CPU time can be told
        // apart from the migration's.
        "-name",
        "debug-threads=on",
        "-device",
        EXIT_DEVICE,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "-m".into(),
        format!("{}M", g.memory_mib),
        "-smp".into(),
        g.vcpus.to_string(),
        "-kernel".into(),
        g.kernel.display().to_string(),
    ]);
    if let Some(initrd) = g.initrd {
        a.extend(["-initrd".into(), initrd.display().to_string()]);
    }
    a.extend([
        "-append".into(),
        g.cmdline.to_string(),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            opt_escape(&qmp.display().to_string())
        ),
        "-serial".into(),
        format!("file:{}", serial.display()),
    ]);
    if incoming {
        a.extend(["-incoming".into(), "defer".into()]);
    }
    a
}

/// QEMU option syntax: a literal comma is written twice.
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Live-migrates `run.kernel` from one QEMU to another over loopback TCP and returns QEMU's
/// numbers. A migration that fails or times out is a result (`completed: false`); errors are
/// for runs that could not be measured (QEMU missing or crashing, the guest not booting,
/// QMP not answering).
pub fn migrate(run: &QemuRun) -> Result<QemuResult> {
    migrate_with(run, &QemuExtras::default())
}

/// [`migrate`] with `extras` applied on the source before `migrate`.
pub fn migrate_with(run: &QemuRun, extras: &QemuExtras) -> Result<QemuResult> {
    validate(run)?;
    // Declared first so it is dropped last, after both processes are dead.
    let scratch = Scratch::new()?;
    let spawn = |name: &str, incoming| {
        let (qmp, serial) = scratch.paths(name);
        VmProcess::spawn(
            name,
            QEMU,
            &qemu_args(run, &qmp, &serial, incoming),
            &scratch,
            ExitCode::QemuDebugExit,
        )
    };
    let mut dest = spawn("destination", true)?;
    let mut src = spawn("source", false)?;
    let boot_deadline = Instant::now() + BOOT_TIMEOUT;
    let (mut dq, _) = dest.connect(boot_deadline)?;
    let (mut sq, greeting) = src.connect(boot_deadline)?;
    let qemu_version = version_from_greeting(&greeting)
        .ok_or_else(|| QemuError::Qmp(format!("source QMP greeting has no version: {greeting}")))?;
    let port = incoming(&mut dq)?;

    src.wait_for_progress(boot_deadline)?;
    std::thread::sleep(run.warmup);
    src.check_running()?;

    let driven = drive(
        &mut sq,
        &mut src,
        port,
        &Drive {
            downtime_limit_ms: run.downtime_limit_ms,
            max_bandwidth: run.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH),
            timeout: run.timeout,
            extras: *extras,
        },
    )?;
    let info = driven.info;
    if let Some(waited) = driven.timed_out {
        let result = QemuResult {
            completed: info.status == "completed",
            status: if info.status == "completed" {
                "completed".into()
            } else {
                format!(
                    "timeout after {:.1} s ({})",
                    waited.as_secs_f64(),
                    info.status
                )
            },
            total_ms: info
                .total_ms
                .map_or(waited.as_secs_f64() * 1e3, |t| t as f64),
            guest_faults: driven.guest_faults,
            ..info.result(qemu_version, false)
        };
        dq.quit();
        sq.quit();
        return Ok(result);
    }
    let mut dest_progress_ok = false;
    if info.status == "completed" {
        let before = latest_reports(&src.serial());
        let deadline = Instant::now() + DEST_CHECK;
        let status = dq.execute("query-status", json!({}))?;
        let running = status.get("status").and_then(Value::as_str) == Some("running");
        while running && Instant::now() < deadline {
            if all_advanced(&before, &latest_reports(&dest.serial())) {
                dest_progress_ok = true;
                break;
            }
            std::thread::sleep(POLL);
        }
    }
    let mut result = info.result(qemu_version, dest_progress_ok);
    result.guest_faults = driven.guest_faults;
    result.source_cpu_s = crate::procs::process_cpu_s(src.child.id());
    let is_vcpu = |c: &str| c.starts_with("CPU ") && c.ends_with("/KVM");
    result.dest_cpu_s = crate::procs::process_cpu_s(dest.child.id())
        .zip(crate::procs::vcpu_threads_cpu_s(dest.child.id(), is_vcpu))
        .map(|(all, vcpus)| all - vcpus);
    result.source_vcpu_cpu_s = crate::procs::vcpu_threads_cpu_s(src.child.id(), is_vcpu);
    result.source_console = src.serial();
    sq.quit();
    dq.quit();
    src.reap(STOP_TIMEOUT);
    dest.reap(STOP_TIMEOUT);
    Ok(result)
}

/// A destination started with `-incoming defer` (QEMU) or `--incoming defer` (ringvisor):
/// `migrate-incoming` on a free loopback port; returns the port.
pub(crate) fn incoming(dq: &mut Qmp) -> Result<u16> {
    dq.execute("migrate-incoming", json!({ "uri": "tcp:127.0.0.1:0" }))
        .step(format!("{}: migrate-incoming", dq.name))?;
    let listening = dq.execute("query-migrate", json!({}))?;
    listen_port(&listening).ok_or_else(|| {
        QemuError::Qmp(format!(
            "{} reports no listening port in query-migrate: {listening}",
            dq.name
        ))
    })
}

/// The migration settings [`drive`] applies on the source.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drive {
    /// `downtime-limit` (ms).
    pub downtime_limit_ms: u64,
    /// `max-bandwidth` (bytes/s; finite: QEMU's 0 stalls).
    pub max_bandwidth: u64,
    /// Bound on `migrate` to a final status; past it the migration is cancelled.
    pub timeout: Duration,
    /// Capabilities and limits.
    pub extras: QemuExtras,
}

/// How a driven migration ended.
#[derive(Debug, Clone)]
pub(crate) struct Driven {
    /// The last `query-migrate` (final, except after a cancel that did not finish in time).
    pub info: MigrateInfo,
    /// The migration ran past [`Drive::timeout`] and was cancelled after this long.
    pub timed_out: Option<Duration>,
    /// Page faults the source's vCPUs took from just before `migrate` to its end
    /// ([`guest_faults`] before and after); `None` where the source does not answer
    /// `query-stats`.
    pub guest_faults: Option<u64>,
}

/// KVM's statistic QEMU's `query-stats` is asked for: the one ringvisor's summary sums
/// ([`vmm::GUEST_FAULTS_STAT`], `pf_taken`).
const FAULTS_STAT: &str = vmm::GUEST_FAULTS_STAT;

/// KVM's `pf_taken` summed over the vCPUs of the process behind `q`, with the raw reply:
/// `query-stats` `{"target": "vcpu", "providers": [{"provider": "kvm", "names":
/// ["pf_taken"]}]}` (QEMU 7.1+). `None` where it does not answer (a ringvisor VM process,
/// an older QEMU) or a vCPU has no such value.
pub(crate) fn guest_faults(q: &mut Qmp) -> Option<(u64, Value)> {
    let reply = q
        .execute(
            "query-stats",
            json!({
                "target": "vcpu",
                "providers": [{ "provider": "kvm", "names": [FAULTS_STAT] }],
            }),
        )
        .ok()?;
    Some((sum_vcpu_stat(&reply, FAULTS_STAT)?, reply))
}

/// The sum over the vCPUs of a `query-stats` reply (`[{"provider": "kvm", "qom-path": ...,
/// "stats": [{"name": N, "value": V}]}]`) of the integer statistic `name`; `None` for no
/// vCPU or one without it.
fn sum_vcpu_stat(reply: &Value, name: &str) -> Option<u64> {
    let vcpus = reply.as_array()?;
    if vcpus.is_empty() {
        return None;
    }
    vcpus.iter().try_fold(0u64, |sum, v| {
        let value = v
            .get("stats")?
            .as_array()?
            .iter()
            .find(|s| s.get("name").and_then(Value::as_str) == Some(name))?
            .get("value")?
            .as_u64()?;
        sum.checked_add(value)
    })
}

/// Runs one migration from the VM process behind `sq` (QEMU or ringvisor: the commands are
/// QEMU's) to `127.0.0.1:port`: sets the parameters and capabilities, `migrate`, polls
/// `query-migrate` until a final status or the timeout (then `migrate_cancel`, waiting up to
/// 5 s for it to take effect).
pub(crate) fn drive(sq: &mut Qmp, src: &mut VmProcess, port: u16, d: &Drive) -> Result<Driven> {
    let name = sq.name.clone();
    sq.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": d.downtime_limit_ms, "max-bandwidth": d.max_bandwidth }),
    )
    .step(format!("{name}: migrate-set-parameters"))?;
    if d.extras.auto_converge {
        sq.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "auto-converge", "state": true }] }),
        )
        .step(format!("{name}: migrate-set-capabilities auto-converge"))?;
    }
    if let Some(mb) = d.extras.vcpu_dirty_limit_mb {
        sq.execute("set-vcpu-dirty-limit", json!({ "dirty-rate": mb }))
            .step(format!("{name}: set-vcpu-dirty-limit"))?;
    }
    let faults_before = guest_faults(sq);
    let started = Instant::now();
    sq.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))
        .step(format!("{name}: migrate"))?;

    let mut info;
    // Every reply with its time, kept with RINGVISOR_BENCH_SUMMARY_DIR (throttle and passes
    // over time, for explaining a cell).
    let mut timeline = String::new();
    loop {
        let reply = match sq.execute("query-migrate", json!({})) {
            Ok(r) => r,
            Err(e) => return Err(e).step(src.describe_exit()),
        };
        info = parse_migrate_info(&reply)?;
        let t_ms = started.elapsed().as_secs_f64() * 1e3;
        timeline.push_str(&json!({ "t_ms": t_ms, "reply": reply }).to_string());
        timeline.push('\n');
        if info.is_final() {
            crate::procs::keep_file(&format!("{name}-timeline"), "jsonl", &timeline);
            break;
        }
        if started.elapsed() >= d.timeout {
            let waited = started.elapsed();
            sq.execute("migrate_cancel", json!({}))
                .step(format!("{name}: migrate_cancel"))?;
            let cancel_deadline = Instant::now() + STOP_TIMEOUT;
            while !info.is_final() && Instant::now() < cancel_deadline {
                std::thread::sleep(POLL);
                info = parse_migrate_info(&sq.execute("query-migrate", json!({}))?)?;
            }
            return Ok(Driven {
                info,
                timed_out: Some(waited),
                guest_faults: faults_since(sq, faults_before),
            });
        }
        std::thread::sleep(POLL);
    }
    // QEMU 7.2 sets `completed` before it computes total-time and downtime (both read 0 in
    // that window, seen under load): poll until total-time is set.
    let settle_deadline = Instant::now() + STOP_TIMEOUT;
    while info.status == "completed"
        && info.total_ms.unwrap_or(0) == 0
        && Instant::now() < settle_deadline
    {
        std::thread::sleep(Duration::from_millis(2));
        info = parse_migrate_info(&sq.execute("query-migrate", json!({}))?)?;
    }
    Ok(Driven {
        info,
        timed_out: None,
        guest_faults: faults_since(sq, faults_before),
    })
}

/// The faults since `before` ([`guest_faults`] now); both replies kept with
/// RINGVISOR_BENCH_SUMMARY_DIR.
fn faults_since(sq: &mut Qmp, before: Option<(u64, Value)>) -> Option<u64> {
    let after = guest_faults(sq);
    let name = sq.name.clone();
    if let (Some(b), Some(a)) = (&before, &after) {
        let kept = json!({ "stat": FAULTS_STAT, "before": b.1, "after": a.1, "faults": a.0.wrapping_sub(b.0) });
        crate::procs::keep_file(&format!("{name}-stats"), "json", &kept.to_string());
    }
    after?.0.checked_sub(before?.0)
}

/// `{"QMP": {"version": {"qemu": {major, minor, micro}, "package": P}}}` -> `7.2.22 (P)`.
pub(crate) fn version_from_greeting(g: &Value) -> Option<String> {
    let v = g.get("QMP")?.get("version")?;
    let q = v.get("qemu")?;
    let n = |k: &str| q.get(k).and_then(Value::as_u64);
    let base = format!("{}.{}.{}", n("major")?, n("minor")?, n("micro")?);
    match v.get("package").and_then(Value::as_str).map(str::trim) {
        Some(p) if !p.is_empty() => Some(format!("{base} ({p})")),
        _ => Some(base),
    }
}

/// The port the destination listens on, from its `query-migrate` (`socket-address`; QEMU
/// sends the port as a string).
fn listen_port(reply: &Value) -> Option<u16> {
    let addrs = reply.get("socket-address")?.as_array()?;
    let port = addrs
        .iter()
        .find(|a| a.get("type").and_then(Value::as_str) == Some("inet"))?
        .get("port")?;
    match port {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        _ => None,
    }
}

/// The fields of a `query-migrate` reply this harness uses.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct MigrateInfo {
    pub(crate) status: String,
    pub(crate) total_ms: Option<u64>,
    pub(crate) downtime_ms: Option<u64>,
    setup_ms: Option<u64>,
    transferred: u64,
    phase_bytes: Option<u64>,
    dirty_sync_count: u64,
    error_desc: Option<String>,
}

impl MigrateInfo {
    /// No more changes without a new command.
    fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    pub(crate) fn result(&self, qemu_version: String, dest_progress_ok: bool) -> QemuResult {
        let status = match (&*self.status, &self.error_desc) {
            ("failed", Some(e)) => format!("failed: {e}"),
            (s, _) => s.to_string(),
        };
        QemuResult {
            completed: self.status == "completed",
            status,
            total_ms: self.total_ms.unwrap_or(0) as f64,
            downtime_ms: self.downtime_ms.unwrap_or(0) as f64,
            setup_ms: self.setup_ms.unwrap_or(0) as f64,
            bytes_sent: self.phase_bytes.unwrap_or(self.transferred),
            ram_transferred: self.transferred,
            passes: self.dirty_sync_count,
            dest_progress_ok,
            qemu_version,
            source_cpu_s: None,
            source_vcpu_cpu_s: None,
            dest_cpu_s: None,
            source_console: String::new(),
            guest_faults: None,
        }
    }
}

/// Parses the `return` value of `query-migrate` (QEMU omits fields that do not apply yet).
fn parse_migrate_info(v: &Value) -> Result<MigrateInfo> {
    let status = v
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| QemuError::Qmp(format!("query-migrate reply without a status: {v}")))?;
    let u = |o: Option<&Value>, k: &str| o.and_then(|o| o.get(k)).and_then(Value::as_u64);
    let ram = v.get("ram");
    let phases = ["precopy-bytes", "downtime-bytes", "postcopy-bytes"];
    let phase_bytes = phases
        .iter()
        .map(|k| u(ram, k))
        .try_fold(0u64, |sum, b| Some(sum + b?));
    Ok(MigrateInfo {
        status: status.to_string(),
        total_ms: u(Some(v), "total-time"),
        downtime_ms: u(Some(v), "downtime"),
        setup_ms: u(Some(v), "setup-time"),
        transferred: u(ram, "transferred").unwrap_or(0),
        phase_bytes,
        dirty_sync_count: u(ram, "dirty-sync-count").unwrap_or(0),
        error_desc: v
            .get("error-desc")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Per CPU, the last report number in complete `cpu I progress R ...` lines.
fn latest_reports(serial: &str) -> BTreeMap<u32, u64> {
    let mut last = BTreeMap::new();
    let complete = serial.rfind('\n').map_or("", |end| &serial[..end]);
    for line in complete.lines() {
        let mut w = line.split_ascii_whitespace();
        let (Some("cpu"), Some(cpu), Some("progress"), Some(r)) =
            (w.next(), w.next(), w.next(), w.next())
        else {
            continue;
        };
        if let (Ok(cpu), Ok(r)) = (cpu.parse::<u32>(), r.parse::<u64>()) {
            last.insert(cpu, r);
        }
    }
    last
}

/// Every CPU that reported before reported later after (and there was at least one).
fn all_advanced(before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>) -> bool {
    !before.is_empty()
        && before
            .iter()
            .all(|(cpu, r)| after.get(cpu).is_some_and(|a| a > r))
}

/// A QMP client for one VM process (the project's `qmp::client`), with its errors named
/// after the process and the command.
pub(crate) struct Qmp {
    pub(crate) name: String,
    client: qmp::client::QmpClient,
}

impl Qmp {
    /// Connects (greeting and capability negotiation included); returns the greeting.
    fn start(name: &str, path: &Path) -> std::result::Result<(Qmp, Value), ClientError> {
        let client = qmp::client::QmpClient::connect(path, QMP_REPLY_TIMEOUT)?;
        let greeting = client.greeting().clone();
        let name = name.to_string();
        Ok((Qmp { name, client }, greeting))
    }

    /// Runs `cmd` and returns its `return` value; a QMP error is an error.
    pub(crate) fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        self.client
            .execute(cmd, args)
            .map_err(|e| QemuError::Qmp(format!("{}: {cmd}: {e}", self.name)))
    }

    /// Asks the process to exit; errors are irrelevant here (it may be gone already).
    pub(crate) fn quit(&mut self) {
        let _ = self.client.execute("quit", Value::Null);
    }
}

/// How a VM process's exit status carries the guest's power-off status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitCode {
    /// QEMU's `isa-debug-exit`: the process exits with `(status << 1) | 1`.
    QemuDebugExit,
    /// ringvisor: the process exits with the status itself.
    Direct,
}

/// One VM process (QEMU, or a ringvisor VM process) with its QMP socket, console file and
/// output log; killed on drop.
pub(crate) struct VmProcess {
    pub(crate) name: String,
    pub(crate) child: Child,
    qmp: PathBuf,
    serial: PathBuf,
    log: PathBuf,
    exit_code: ExitCode,
}

impl VmProcess {
    /// Starts `program args` with stdin closed and stdout and stderr in `NAME.log` of `dir`;
    /// its QMP socket and console file must be [`Scratch::paths`]`(name)`.
    pub(crate) fn spawn(
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[String],
        dir: &Scratch,
        exit_code: ExitCode,
    ) -> Result<VmProcess> {
        let (qmp, serial) = dir.paths(name);
        let log = dir.0.join(format!("{name}.log"));
        let out = File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        let program = program.as_ref();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!(
                "starting {} ({name})",
                program.to_string_lossy()
            )))?;
        Ok(VmProcess {
            name: name.to_string(),
            child,
            qmp,
            serial,
            log,
            exit_code,
        })
    }

    /// Connects to QMP once the process has created its socket.
    pub(crate) fn connect(&mut self, deadline: Instant) -> Result<(Qmp, Value)> {
        loop {
            let attempt = match Qmp::start(&self.name, &self.qmp) {
                // Not created or not listening yet: the process is still starting.
                Err(ClientError::Connect { .. }) => None,
                other => Some(other),
            };
            if let Some(attempt) = attempt {
                return match attempt {
                    Ok(q) => Ok(q),
                    // A guest that powers off at once takes QEMU down while QMP starts: the
                    // exit (with its status and serial tail) is the error, not the socket's.
                    Err(e) => match wait_timeout(&mut self.child, STOP_TIMEOUT) {
                        Some(_) => Err(QemuError::Exited(self.describe_exit())),
                        None => Err(QemuError::Qmp(format!("{}: QMP: {e}", self.name))),
                    },
                };
            }
            self.check_running()?;
            if Instant::now() >= deadline {
                fail!(Timeout, "{}: no QMP socket in time", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the kernel's first `cpu I progress` line on the serial port.
    fn wait_for_progress(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if !latest_reports(&self.serial()).is_empty() {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() >= deadline {
                fail!(
                    Timeout,
                    "{}: no progress line from the kernel within {BOOT_TIMEOUT:?}; serial:\n{}",
                    self.name,
                    tail(&self.serial(), 10)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Fails with the exit status, the serial tail and the log tail if the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            _ => Err(QemuError::Exited(self.describe_exit())),
        }
    }

    pub(crate) fn describe_exit(&mut self) -> String {
        let how = match self.child.try_wait() {
            Ok(Some(s)) => match (s.code(), self.exit_code) {
                (Some(c), ExitCode::QemuDebugExit) if c & 1 == 1 => {
                    format!("exited: the guest powered off with status {}", c >> 1)
                }
                _ => format!("exited: {s}"),
            },
            Ok(None) => "is still running".to_string(),
            Err(e) => format!("cannot be waited for: {e}"),
        };
        let program = match self.exit_code {
            ExitCode::QemuDebugExit => "QEMU",
            ExitCode::Direct => "ringvisor",
        };
        format!(
            "{program} ({}) {how}\n-- serial (last lines) --\n{}\n-- stderr (last lines) --\n{}",
            self.name,
            tail(&self.serial(), 10),
            tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 10)
        )
    }

    fn serial(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits for an exit after `quit`; the drop kills it if it does not come.
    pub(crate) fn reap(&mut self, limit: Duration) {
        let _ = wait_timeout(&mut self.child, limit);
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls for a child's exit for at most `limit`.
pub(crate) fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A private directory for sockets, serial files and logs; removed on drop.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new() -> Result<Scratch> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringvisor-qemu-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // A leftover of an earlier process with the same pid is ours to replace.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        Ok(Scratch(dir))
    }
}

impl Scratch {
    /// The QMP socket and console file of the process `name`.
    pub(crate) fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.0.join(format!("{name}.qmp")),
            self.0.join(format!("{name}.serial")),
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {

    /// QEMU is not usable: a loud skip line, or a failure where `.ci/run` installed QEMU and
    /// so requires these tests to run (`RINGVISOR_REQUIRE_QEMU=1`; libtest hides the output
    /// of passing tests, so a skip alone would go unnoticed).
    fn skip_qemu() {
        if std::env::var_os("RINGVISOR_REQUIRE_QEMU").is_some() {
            panic!("{QEMU} is required (RINGVISOR_REQUIRE_QEMU) but not usable with -accel kvm");
        }
        eprintln!("SKIP(qemu): {QEMU} with -accel kvm and -M microvm is not usable here");
    }
    use super::*;

    /// A `query-migrate` reply of QEMU 7.2 after a completed migration (as sent on this
    /// host, trimmed).
    const COMPLETED: &str = r#"{"return": {"status": "completed", "setup-time": 1,
        "downtime": 12, "total-time": 734, "ram": {"total": 134295552,
        "dirty-sync-count": 3, "downtime-bytes": 12324, "remaining": 0,
        "postcopy-bytes": 0, "transferred": 409872, "precopy-bytes": 397548,
        "duplicate": 32762, "normal-bytes": 114688, "normal": 28}}, "id": 7}"#;

    fn value_of(line: &str) -> Value {
        let v: Value = serde_json::from_str(line).unwrap();
        v["return"].clone()
    }

    #[test]
    fn completed_query_migrate_maps_to_every_result_field() {
        let info = parse_migrate_info(&value_of(COMPLETED)).unwrap();
        assert!(info.is_final());
        let r = info.result("7.2.22".into(), true);
        assert_eq!(
            r,
            QemuResult {
                completed: true,
                status: "completed".into(),
                total_ms: 734.0,
                downtime_ms: 12.0,
                setup_ms: 1.0,
                bytes_sent: 397548 + 12324,
                ram_transferred: 409872,
                passes: 3,
                dest_progress_ok: true,
                qemu_version: "7.2.22".into(),
                source_cpu_s: None,
                source_vcpu_cpu_s: None,
                dest_cpu_s: None,
                source_console: String::new(),
                guest_faults: None,
            }
        );
    }

    #[test]
    fn query_stats_faults_are_summed_over_the_vcpus_and_absent_when_any_vcpu_lacks_them() {
        // QEMU 7.2's reply on this host, with a second vCPU.
        let reply = value_of(
            r#"{"return": [{"provider": "kvm", "stats": [{"name": "pf_taken", "value": 1200}],
            "qom-path": "/machine/unattached/device[0]"}, {"provider": "kvm", "stats":
            [{"name": "pf_taken", "value": 34}], "qom-path": "/machine/unattached/device[1]"}]}"#,
        );
        assert_eq!(sum_vcpu_stat(&reply, "pf_taken"), Some(1234));
        assert_eq!(sum_vcpu_stat(&reply, "pf_fixed"), None);
        let lacking = value_of(
            r#"{"return": [{"provider": "kvm", "stats": [{"name": "pf_taken", "value": 5}]},
            {"provider": "kvm", "stats": []}]}"#,
        );
        assert_eq!(sum_vcpu_stat(&lacking, "pf_taken"), None);
        assert_eq!(sum_vcpu_stat(&json!([]), "pf_taken"), None);
        assert_eq!(sum_vcpu_stat(&json!({"error": 1}), "pf_taken"), None);
    }

    #[test]
    fn active_and_failed_replies_parse_with_missing_fields_as_absent() {
        let active = parse_migrate_info(&json!({"status": "active", "total-time": 40,
            "ram": {"transferred": 5}}))
        .unwrap();
        assert!(!active.is_final());
        assert_eq!(active.downtime_ms, None);
        assert_eq!(active.phase_bytes, None);
        assert_eq!(active.result(String::new(), false).bytes_sent, 5);
        let failed = parse_migrate_info(&json!({"status": "failed",
            "error-desc": "Unable to write to socket: Broken pipe"}))
        .unwrap();
        assert!(failed.is_final());
        let r = failed.result(String::new(), false);
        assert!(!r.completed);
        assert_eq!(r.status, "failed: Unable to write to socket: Broken pipe");
        assert!(parse_migrate_info(&json!({"ram": {}})).is_err());
    }

    #[test]
    fn the_greeting_gives_the_version() {
        let g: Value = serde_json::from_str(
            r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        assert_eq!(
            version_from_greeting(&g).as_deref(),
            Some("7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)")
        );
    }

    #[test]
    fn listening_port_is_read_from_socket_address_as_string_or_number() {
        let r = json!({"socket-address": [{"port": "40135", "ipv4": true,
            "host": "127.0.0.1", "type": "inet"}]});
        assert_eq!(listen_port(&r), Some(40135));
        let r = json!({"socket-address": [{"type": "inet", "port": 5}]});
        assert_eq!(listen_port(&r), Some(5));
        assert_eq!(listen_port(&json!({"status": "setup"})), None);
        let r = json!({"socket-address": [{"type": "inet", "port": "99999"}]});
        assert_eq!(listen_port(&r), None);
    }

    #[test]
    fn version_banner_is_reduced_to_the_version() {
        let out = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                   Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(
            version_from_banner(out).as_deref(),
            Some("7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)")
        );
        assert_eq!(version_from_banner("something else"), None);
    }

    #[test]
    fn progress_counts_only_complete_lines_and_every_cpu_must_advance() {
        let src = "ringvisor PVH test kernel v1\ncpu 1 up\ncpu 0 progress 3 pages 0 ticks 300\n\
                   cpu 1 progress 2 pages 0 ticks 200\ncpu 0 progress 4 pages 0 ti";
        let before = latest_reports(src);
        assert_eq!(before, BTreeMap::from([(0, 3), (1, 2)]));
        let one_cpu = latest_reports("cpu 0 progress 5 pages 0 ticks 500\n");
        assert!(!all_advanced(&before, &one_cpu));
        let both = latest_reports("cpu 0 progress 5 p\ncpu 1 progress 3 p\n");
        assert!(all_advanced(&before, &both));
        let stale = latest_reports("cpu 0 progress 3 p\ncpu 1 progress 3 p\n");
        assert!(!all_advanced(&before, &stale));
        assert!(!all_advanced(&BTreeMap::new(), &both));
    }

    fn run_for(kernel: &Path) -> QemuRun {
        QemuRun {
            kernel: kernel.to_path_buf(),
            cmdline: "reports=0 dirty_mb=0 period_ticks=50".into(),
            memory_mib: 128,
            vcpus: 1,
            dirty_ring: Some(4096),
            downtime_limit_ms: 300,
            max_bandwidth: None,
            warmup: Duration::from_millis(200),
            timeout: Duration::from_secs(20),
        }
    }

    #[test]
    fn bad_parameters_are_rejected_before_qemu_starts() {
        let scratch = Scratch::new().unwrap();
        let kernel = scratch.0.join("k");
        std::fs::write(&kernel, b"x").unwrap();
        let ok = run_for(&kernel);
        assert!(validate(&ok).is_ok());
        for (bad, what) in [
            (
                QemuRun {
                    vcpus: 0,
                    ..ok.clone()
                },
                "vcpus",
            ),
            (
                QemuRun {
                    memory_mib: 8,
                    ..ok.clone()
                },
                "memory",
            ),
            (
                QemuRun {
                    dirty_ring: Some(3000),
                    ..ok.clone()
                },
                "dirty ring",
            ),
            (
                QemuRun {
                    dirty_ring: Some(128),
                    ..ok.clone()
                },
                "dirty ring",
            ),
            (
                QemuRun {
                    downtime_limit_ms: 3_000_000,
                    ..ok.clone()
                },
                "downtime",
            ),
            (
                QemuRun {
                    max_bandwidth: Some(0),
                    ..ok.clone()
                },
                "bandwidth",
            ),
            (
                QemuRun {
                    kernel: scratch.0.join("missing"),
                    ..ok.clone()
                },
                "not a file",
            ),
        ] {
            let e = migrate(&bad).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
    }

    #[test]
    fn qemu_arguments_select_the_tracker_and_wait_for_incoming_only_on_the_destination() {
        let run = run_for(Path::new("/k"));
        let a = qemu_args(&run, Path::new("/d/a,b.qmp"), Path::new("/d/s"), true);
        let after = |flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
        assert_eq!(after("-accel"), "kvm,dirty-ring-size=4096");
        assert_eq!(after("-qmp"), "unix:/d/a,,b.qmp,server=on,wait=off");
        assert_eq!(after("-incoming"), "defer");
        assert_eq!(after("-m"), "128M");
        assert_eq!(after("-append"), run.cmdline);
        let bitmap = QemuRun {
            dirty_ring: None,
            ..run
        };
        let a = qemu_args(&bitmap, Path::new("/q"), Path::new("/s"), false);
        assert!(a.contains(&"kvm".to_string()));
        assert!(!a.contains(&"-incoming".to_string()));
    }

    /// Real QEMU with KVM: an idle 128 MiB, 1-vCPU guest migrated with the ring and with the
    /// bitmap completes, and the kernel keeps reporting on the destination.
    #[test]
    fn idle_guest_migrates_with_ring_and_bitmap_and_keeps_running_on_the_destination() {
        let Some(version) = available() else {
            skip_qemu();
            return;
        };
        let scratch = Scratch::new().unwrap();
        let kernel = test_kernel(&scratch);
        for ring in [Some(4096), None] {
            let run = QemuRun {
                dirty_ring: ring,
                ..run_for(&kernel)
            };
            let r = migrate(&run).unwrap();
            eprintln!("qemu {version} ring={ring:?}: {r:?}");
            assert!(r.completed, "{r:?}");
            assert_eq!(r.status, "completed");
            assert!(r.dest_progress_ok, "{r:?}");
            assert!(r.passes >= 2, "a bulk pass and the final sync: {r:?}");
            // Idle: the kernel image and a few touched pages; zero pages are markers only.
            assert!(
                r.ram_transferred > 0 && r.ram_transferred < 16 << 20,
                "{r:?}"
            );
            assert!(
                r.bytes_sent > 0 && r.bytes_sent <= r.ram_transferred,
                "{r:?}"
            );
            assert!(r.total_ms >= r.downtime_ms, "{r:?}");
            assert_eq!(r.qemu_version, version);
        }
    }

    fn test_kernel(scratch: &Scratch) -> PathBuf {
        let kernel = scratch.0.join("test-kernel.elf");
        let image = pvh::test_kernel::build(&pvh::test_kernel::TestKernelParams::default());
        std::fs::write(&kernel, image.unwrap()).unwrap();
        kernel
    }

    /// Real QEMU: a dirtying guest behind a 1 MiB/s bandwidth limit cannot finish in 1 s; the
    /// migration is cancelled and reported, not an error.
    #[test]
    fn migration_past_its_timeout_is_cancelled_and_reported_as_not_completed() {
        if available().is_none() {
            skip_qemu();
            return;
        }
        let scratch = Scratch::new().unwrap();
        let run = QemuRun {
            cmdline: "reports=0 ws_mb=8 dirty_mb=1 period_ticks=20".into(),
            max_bandwidth: Some(1 << 20),
            timeout: Duration::from_secs(1),
            ..run_for(&test_kernel(&scratch))
        };
        let r = migrate(&run).unwrap();
        assert!(!r.completed, "{r:?}");
        assert!(r.status.starts_with("timeout after 1."), "{r:?}");
        assert!(r.status.ends_with("(cancelled)"), "{r:?}");
        assert!(!r.dest_progress_ok);
        assert!(r.total_ms >= 1000.0, "{r:?}");
    }

    /// Real QEMU: a kernel that powers off before the migration is an error naming its status.
    #[test]
    fn guest_that_powers_off_before_the_migration_is_an_error_with_its_status() {
        if available().is_none() {
            skip_qemu();
            return;
        }
        let scratch = Scratch::new().unwrap();
        let run = QemuRun {
            cmdline: "reports=1 exit=5".into(),
            warmup: Duration::from_millis(500),
            ..run_for(&test_kernel(&scratch))
        };
        let e = crate::error_chain(&migrate(&run).unwrap_err());
        assert!(e.contains("the guest powered off with status 5"), "{e}");
        assert!(e.contains("poweroff 5"), "serial tail in the error: {e}");
    }
}
