//! `ringvisor bench migrate --pvh`: the PVH-guest rows. The project's PVH test kernel, written
//! once to a file, boots with the same command line, memory and vCPUs under ringvisor (a
//! `run --kernel` source process and an `incoming` destination process) and, where
//! `qemu-system-x86_64` works, under QEMU (`-accel kvm[,dirty-ring-size=N] -kernel FILE`, two
//! processes driven over QMP); each is live-migrated on loopback with the same downtime limit
//! and bandwidth, at idle and while dirtying, for each tracker. One run, side by side.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::error::{error_chain, BenchError, Result};
use crate::migrate::check_trackers;
use crate::procs::{reap_destination, source_summary, spawn_destination};
use crate::{qemu, Progress};
use ::pvh::test_kernel::Progress as KernelReport;

/// Options of the PVH rows.
#[derive(Debug, Clone)]
pub struct PvhOpts {
    /// The `ringvisor` binary.
    pub exe: PathBuf,
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// Trackers (`ring`, `bitmap`, `clear-log`; QEMU has no clear-log row of its own).
    pub trackers: Vec<String>,
    /// Dirty ring entries per vCPU.
    pub ring_entries: u32,
    /// `downtime-limit` in ms.
    pub downtime_limit: u64,
    /// `max-bandwidth` in bytes/s (finite: QEMU's 0 is not "unlimited").
    pub max_bandwidth: u64,
    /// Seconds before a migration is aborted.
    pub timeout: f64,
    /// Seconds the guest runs before the migration.
    pub warmup: f64,
    /// Test kernel `ws_mb`.
    pub ws_mb: u64,
    /// Test kernel `dirty_mb` (dirtying scenario).
    pub dirty_mb: u64,
    /// Test kernel `period_ticks`.
    pub period_ticks: u64,
    /// Migrations per cell (the table shows medians).
    pub repeat: u32,
    /// Write an SVG plot here.
    pub plot: Option<PathBuf>,
}

/// One migration.
#[derive(Serialize, Clone, Debug)]
pub struct Row {
    /// `ringvisor` or `qemu`.
    pub vmm: String,
    /// `idle` or `dirtying`.
    pub scenario: String,
    /// Tracker.
    pub tracker: String,
    /// The migration completed.
    pub completed: bool,
    /// The outcome.
    pub outcome: String,
    /// Total migration time (ms).
    pub total_ms: f64,
    /// ringvisor: from the pause to the destination's Resumed (the guest runs again); QEMU:
    /// its `downtime` (from the stop until the source has sent everything).
    pub downtime_ms: f64,
    /// ringvisor: from the pause until the source commits (after the destination restored
    /// and answered ReadyToResume); QEMU: same as `downtime_ms`.
    pub downtime_source_ms: f64,
    /// Downtime on QEMU's definition, from the pause until the source has sent the last
    /// state: ringvisor's breakdown up to (not including) the destination's restore
    /// ([`sent_downtime_ms`]); QEMU: same as `downtime_ms`.
    pub downtime_sent_ms: f64,
    /// MiB sent.
    pub mib_sent: f64,
    /// Passes.
    pub passes: u64,
    /// The destination's console kept printing progress after the resume.
    pub dest_progress: bool,
    /// ringvisor compares memory digests after every migration; QEMU does not.
    pub verified: Option<bool>,
    /// CPU seconds (user + system) of the source process, boot and warm-up included.
    pub source_cpu_s: Option<f64>,
    /// CPU seconds of the source's migration side: ringvisor's migration thread over the
    /// migration (scheduler run time); QEMU's process minus its vCPU threads, from its start.
    pub migration_cpu_s: Option<f64>,
    /// CPU seconds of the destination's receive side: ringvisor's receive thread; QEMU's
    /// destination process minus its vCPU threads.
    pub dest_cpu_s: Option<f64>,
    /// The guest's write rate during the migration, from its progress reports on the source
    /// console.
    #[serde(flatten)]
    pub guest: GuestRate,
    /// Host time from the guest's last heartbeat line on the source console to its next one on
    /// the destination's, ms (the Linux rows: [`crate::linux`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_gap_ms: Option<f64>,
    /// Page faults the source's vCPUs took during the migration, KVM's `pf_taken` summed
    /// over them (each first write to a page after dirty tracking re-protected it is one):
    /// ringvisor's from its summary (`guest_faults`, from just before the tracker started
    /// to the final pass); QEMU's from `query-stats` just before `migrate` and after its
    /// end.
    pub guest_faults: Option<u64>,
}

/// The guest's write rate during the migration, from cpu 0's progress reports on the source
/// console (the last report there is the one before the pause), two ways.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct GuestRate {
    /// MiB/s with the reports' TSC as the clock, converted with the host's TSC rate
    /// ([`guest_rate_tsc`]): the same clock under both VMMs.
    pub guest_mib_s: Option<f64>,
    /// MiB/s with the guest's timer ticks as the clock ([`guest_rate_ticks`]): biased
    /// upwards wherever ticks are coalesced (a vCPU that was not running when its timer
    /// fired); kept as a check.
    pub guest_mib_s_ticks: Option<f64>,
    /// The guest's own TSC rate, Hz: its `pace=1` calibration (TSC ticks per timer tick)
    /// times its ticks per second, against which it paces its writes. Beside the host's
    /// rate it shows the guest runs at it and the rate it was asked for is the one it aims
    /// at: with `timer=tsc-deadline` (the third-party profile) the kernel measures it
    /// against the LAPIC timer's count, without ticks; in periodic mode on ticks, where a
    /// coalesced tick biases it upwards and the guest then writes below its nominal rate.
    pub guest_tsc_hz: Option<f64>,
}

/// The clocks the guest's reports are read with.
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    /// The guest's timer period, µs.
    pub tick_us: u64,
    /// The host's TSC rate, Hz ([`crate::tsc::host_tsc_hz`]); `None` leaves the TSC-based
    /// rate out.
    pub tsc_hz: Option<f64>,
}

impl Clocks {
    /// The guest's write rate over the last `window_ms` of `console`, both ways.
    pub fn guest_rate(&self, console: &str, window_ms: f64) -> GuestRate {
        crate::procs::keep_file("source-console", "txt", console);
        let reports = cpu0_reports(console);
        GuestRate {
            guest_mib_s: self.tsc_hz.and_then(|hz| rate_tsc(&reports, window_ms, hz)),
            guest_mib_s_ticks: rate_ticks(&reports, window_ms, self.tick_us),
            guest_tsc_hz: ::pvh::test_kernel::tsc_per_tick(console, 0)
                .map(|n| n as f64 * 1e6 / self.tick_us.max(1) as f64),
        }
    }
}

fn cpu0_reports(console: &str) -> Vec<KernelReport> {
    KernelReport::all(console)
        .into_iter()
        .filter(|p| p.cpu == 0)
        .collect()
}

/// MiB/s for `pages` written over `secs`.
fn mib_s(pages: u64, secs: f64) -> f64 {
    pages as f64 * 4096.0 / secs / f64::from(1u32 << 20)
}

/// The guest's write rate over the last `window_ms` of the source console (the migration),
/// on the TSC: pages between cpu 0's last progress report and its first report whose TSC is
/// at most `window_ms` before the last one's, over the TSC between them in seconds at
/// `tsc_hz`. MiB/s; `None` with fewer than two such reports, reports without a TSC, or a
/// `tsc_hz` that is not a positive rate.
pub fn guest_rate_tsc(console: &str, window_ms: f64, tsc_hz: f64) -> Option<f64> {
    rate_tsc(&cpu0_reports(console), window_ms, tsc_hz)
}

fn rate_tsc(reports: &[KernelReport], window_ms: f64, tsc_hz: f64) -> Option<f64> {
    if !(tsc_hz.is_finite() && tsc_hz > 0.0) {
        return None;
    }
    let last = reports.last()?;
    let x1 = last.tsc?;
    let window = (window_ms.max(0.0) / 1e3 * tsc_hz) as u64;
    let first = reports
        .iter()
        .find(|p| p.tsc.is_some_and(|x| x.saturating_add(window) >= x1))?;
    let x0 = first.tsc?;
    if x1 <= x0 || last.pages < first.pages {
        return None;
    }
    Some(mib_s(last.pages - first.pages, (x1 - x0) as f64 / tsc_hz))
}

/// The guest's write rate over the last `window_ms` of the source console, on its timer
/// ticks: pages between cpu 0's last progress report and the first report at least
/// `window_ms` of ticks (`tick_us` each) before it, over those ticks. MiB/s; `None` with
/// fewer than two reports in the window.
pub fn guest_rate_ticks(console: &str, window_ms: f64, tick_us: u64) -> Option<f64> {
    rate_ticks(&cpu0_reports(console), window_ms, tick_us)
}

fn rate_ticks(reports: &[KernelReport], window_ms: f64, tick_us: u64) -> Option<f64> {
    let last = reports.last()?;
    let window_ticks = (window_ms.max(0.0) * 1e3 / tick_us.max(1) as f64) as u64;
    let first = reports
        .iter()
        .find(|p| p.ticks.saturating_add(window_ticks) >= last.ticks)?;
    if last.ticks <= first.ticks || last.pages < first.pages {
        return None;
    }
    let secs = (last.ticks - first.ticks) as f64 * tick_us as f64 / 1e6;
    Some(mib_s(last.pages - first.pages, secs))
}

/// The PVH rows.
#[derive(Serialize, Debug)]
pub struct Report {
    /// The host's KVM is PVM.
    pub pvm_host: bool,
    /// QEMU's version, if it was usable.
    pub qemu: Option<String>,
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
    /// The idle scenario's kernel command line.
    pub idle_cmdline: String,
    /// The dirtying scenario's kernel command line.
    pub dirty_cmdline: String,
    /// The host's TSC rate (Hz) the guest's TSC-stamped reports were converted with,
    /// measured by [`crate::tsc::host_tsc_hz`] at the start of the run.
    pub host_tsc_hz: Option<f64>,
    /// Every migration that was measured.
    pub rows: Vec<Row>,
}

/// The test kernel's timer period in the default rows, µs.
const TICK_US: u64 = 1000;

fn cmdline(o: &PvhOpts, dirty: bool) -> String {
    ::pvh::test_kernel::Cmdline {
        ws_mb: o.ws_mb,
        dirty_mb: if dirty { o.dirty_mb } else { 0 },
        reports: 0,
        cpus: o.vcpus,
        exit: 0,
        tick_us: TICK_US,
        period_ticks: o.period_ticks,
        tsc_pace: true,
        ..pvh::test_kernel::Cmdline::default()
    }
    .render()
}

fn progress_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter(|l| l.contains(" progress ")).count())
        .unwrap_or(0)
}

/// One ringvisor migration: destination and source processes on loopback.
fn ringvisor_one(
    o: &PvhOpts,
    kernel: &Path,
    cmdline: &str,
    tracker: &str,
    dir: &Path,
    extra: &[&str],
    clocks: &Clocks,
) -> Result<(Row, bool)> {
    let console = dir.join(format!("dest-{tracker}.console"));
    let _ = std::fs::remove_file(&console);
    let src_console = dir.join(format!("source-{tracker}.console"));
    let _ = std::fs::remove_file(&src_console);
    let mut cmd = Command::new(&o.exe);
    cmd.args([
        "incoming",
        "--listen",
        "127.0.0.1:0",
        "--duration",
        "1",
        "--json",
        "--tracker",
        tracker,
        "--ring-entries",
        &o.ring_entries.to_string(),
        "--console",
    ])
    .arg(&console);
    let mut dest = spawn_destination(cmd)?;
    let cpu0 = crate::procs::reaped_children_cpu_s();
    let out = Command::new(&o.exe)
        .args(["run", "--kernel"])
        .arg(kernel)
        .args([
            "--cmdline",
            cmdline,
            "--memory",
            &o.memory.to_string(),
            "--vcpus",
            &o.vcpus.to_string(),
            "--tracker",
            tracker,
            "--ring-entries",
            &o.ring_entries.to_string(),
            "--console",
        ])
        .arg(&src_console)
        .args([
            "--migrate-to",
            &dest.addr,
            "--migrate-after",
            &o.warmup.to_string(),
            // From the guest's first progress report, as the QEMU rows count their warm-up.
            "--migrate-after-output",
            " progress 1 ",
            "--downtime-limit",
            &o.downtime_limit.to_string(),
            "--max-bandwidth",
            &o.max_bandwidth.to_string(),
            "--timeout",
            &o.timeout.to_string(),
            "--on-timeout",
            "abort",
            "--exit-after-migrate",
            "--json",
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .output()
        .map_err(BenchError::io("running the source"));
    let cpu = match (cpu0, crate::procs::reaped_children_cpu_s()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let dest_out = reap_destination(&mut dest);
    let v = source_summary(&out?)?;
    // `incoming --json` prints its summary as one line once the guest resumed.
    let dv: serde_json::Value = dest_out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .unwrap_or_default();
    let kind = v["outcome"]["kind"].as_str().unwrap_or("?").to_string();
    let verified = v["verified"].as_bool();
    let total_ms = v["total_ms"].as_f64().unwrap_or(0.0);
    let guest = std::fs::read_to_string(&src_console)
        .map(|c| clocks.guest_rate(&c, total_ms))
        .unwrap_or_default();
    Ok((
        Row {
            vmm: "ringvisor".into(),
            scenario: String::new(),
            tracker: tracker.into(),
            completed: kind == "completed",
            outcome: kind,
            total_ms: v["total_ms"].as_f64().unwrap_or(0.0),
            downtime_ms: v["downtime_ms"].as_f64().unwrap_or(0.0),
            downtime_source_ms: v["downtime_source_ms"].as_f64().unwrap_or(0.0),
            downtime_sent_ms: sent_downtime_ms(&v),
            mib_sent: v["bytes_sent"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            passes: v["iterations"]
                .as_array()
                .map(|a| a.len() as u64)
                .unwrap_or(0),
            // The destination ran 1 s after the resume: at least 2 reports per vCPU.
            dest_progress: progress_lines(&console) >= 2 * o.vcpus as usize,
            verified,
            source_cpu_s: cpu,
            migration_cpu_s: v["cpu"]["thread_s"].as_f64(),
            dest_cpu_s: dv["cpu"]["thread_s"].as_f64(),
            guest,
            heartbeat_gap_ms: None,
            guest_faults: v["guest_faults"].as_u64(),
        },
        verified == Some(false),
    ))
}

fn qemu_one(
    o: &PvhOpts,
    kernel: &Path,
    cmdline: &str,
    tracker: &str,
    extras: &qemu::QemuExtras,
    clocks: &Clocks,
) -> Result<Row> {
    let r = qemu::migrate_with(
        &qemu::QemuRun {
            kernel: kernel.to_path_buf(),
            cmdline: cmdline.to_string(),
            memory_mib: o.memory >> 20,
            vcpus: o.vcpus as u32,
            dirty_ring: (tracker == "ring").then_some(o.ring_entries),
            downtime_limit_ms: o.downtime_limit,
            max_bandwidth: Some(o.max_bandwidth),
            warmup: Duration::from_secs_f64(o.warmup),
            timeout: Duration::from_secs_f64(o.timeout),
        },
        extras,
    )?;
    let guest = clocks.guest_rate(&r.source_console, r.total_ms);
    Ok(Row {
        vmm: "qemu".into(),
        scenario: String::new(),
        tracker: tracker.into(),
        completed: r.completed,
        outcome: r.status.clone(),
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        downtime_source_ms: r.downtime_ms,
        downtime_sent_ms: r.downtime_ms,
        mib_sent: r.bytes_sent as f64 / (1 << 20) as f64,
        passes: r.passes,
        dest_progress: r.dest_progress_ok,
        verified: None,
        source_cpu_s: r.source_cpu_s,
        migration_cpu_s: r
            .source_cpu_s
            .zip(r.source_vcpu_cpu_s)
            .map(|(all, vcpus)| all - vcpus),
        dest_cpu_s: r.dest_cpu_s,
        guest,
        heartbeat_gap_ms: None,
        guest_faults: r.guest_faults,
    })
}

fn check(o: &PvhOpts) -> Result<()> {
    if !vmm::kvm_available() {
        return Err(BenchError::NoKvm("bench migrate"));
    }
    if !(o.warmup.is_finite() && o.warmup > 0.0) {
        return Err(BenchError::Invalid(
            "--pvh-warmup must be a positive number of seconds".into(),
        ));
    }
    if o.max_bandwidth == 0 {
        return Err(BenchError::Invalid(
            "--max-bandwidth must be a finite rate for the QEMU comparison".into(),
        ));
    }
    check_trackers(&o.trackers)
}

/// Runs the PVH rows: ringvisor always, QEMU where it is usable (else a note, and the report's
/// `qemu` is `None`).
pub fn run(o: &PvhOpts, progress: &mut dyn Progress) -> Result<Report> {
    check(o)?;
    let dir = std::env::temp_dir().join(format!("ringvisor-bench-pvh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
    let kernel = dir.join("test-kernel.elf");
    let image = ::pvh::test_kernel::build(&Default::default()).map_err(BenchError::TestKernel)?;
    std::fs::write(&kernel, image)
        .map_err(BenchError::io(format!("writing {}", kernel.display())))?;
    let qemu_version = qemu::available();
    if qemu_version.is_none() {
        progress.note("qemu-system-x86_64 is not usable here: the QEMU rows are left out");
    }
    let clocks = Clocks {
        tick_us: TICK_US,
        tsc_hz: crate::tsc::host_tsc_hz(crate::tsc::MEASURE),
    };
    let scenarios = [("idle", false), ("dirtying", true)];
    let mut cells = Vec::new();
    for (name, dirty) in scenarios {
        for t in &o.trackers {
            for _ in 0..o.repeat {
                cells.push((name, dirty, t.as_str(), "ringvisor"));
                if qemu_version.is_some() && t != "clear-log" {
                    cells.push((name, dirty, t.as_str(), "qemu"));
                }
            }
        }
    }
    progress.start(cells.len() as u64, "migrations");
    let mut rows = Vec::new();
    for (name, dirty, tracker, which) in cells {
        progress.step(&format!("{which} {name} {tracker}"));
        let line = cmdline(o, dirty);
        let r = match which {
            "qemu" => qemu_one(o, &kernel, &line, tracker, &Default::default(), &clocks),
            _ => ringvisor_one(o, &kernel, &line, tracker, &dir, &[], &clocks).map(|(r, bad)| {
                if bad {
                    progress.note(&format!("WARNING: memory digest mismatch in {r:?}"));
                }
                r
            }),
        };
        match r {
            Ok(mut r) => {
                r.scenario = name.into();
                rows.push(r);
            }
            Err(e) => progress.note(&format!("{which} {name} {tracker}: {}", error_chain(&e))),
        }
        progress.inc();
        std::thread::sleep(Duration::from_millis(200));
    }
    progress.finish();
    let _ = std::fs::remove_dir_all(&dir);
    let rep = Report {
        pvm_host: kvm_dirty::is_pvm_host(),
        qemu: qemu_version,
        memory_mib: o.memory >> 20,
        vcpus: o.vcpus,
        ring_entries: o.ring_entries,
        downtime_limit_ms: o.downtime_limit,
        max_bandwidth: o.max_bandwidth,
        idle_cmdline: cmdline(o, false),
        dirty_cmdline: cmdline(o, true),
        host_tsc_hz: clocks.tsc_hz,
        rows,
    };
    if let Some(p) = &o.plot {
        plot(&rep, p)?;
    }
    Ok(rep)
}

/// One table cell: medians over the repeats of (scenario, tracker, VMM).
struct Med {
    scenario: String,
    tracker: String,
    vmm: String,
    completed: usize,
    runs: usize,
    total_ms: f64,
    downtime_ms: f64,
    downtime_source_ms: f64,
    downtime_sent_ms: f64,
    mib_sent: f64,
    dest_progress: bool,
    passes: f64,
    guest_mib_s: Option<f64>,
    guest_mib_s_ticks: Option<f64>,
    source_cpu_s: Option<f64>,
    migration_cpu_s: Option<f64>,
    dest_cpu_s: Option<f64>,
    heartbeat_gap_ms: Option<f64>,
    guest_faults: Option<f64>,
}

/// The median (the upper one of an even count); `None` for no values.
pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

fn medians(rows: &[Row]) -> Vec<Med> {
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in rows {
        let k = (r.scenario.clone(), r.tracker.clone(), r.vmm.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let med = |v: Vec<f64>| median(v).unwrap_or(f64::NAN);
    keys.into_iter()
        .map(|(scenario, tracker, vmm)| {
            let rs: Vec<&Row> = rows
                .iter()
                .filter(|r| r.scenario == scenario && r.tracker == tracker && r.vmm == vmm)
                .collect();
            Med {
                completed: rs.iter().filter(|r| r.completed).count(),
                runs: rs.len(),
                total_ms: med(rs.iter().map(|r| r.total_ms).collect()),
                downtime_ms: med(rs.iter().map(|r| r.downtime_ms).collect()),
                downtime_source_ms: med(rs.iter().map(|r| r.downtime_source_ms).collect()),
                downtime_sent_ms: med(rs.iter().map(|r| r.downtime_sent_ms).collect()),
                mib_sent: med(rs.iter().map(|r| r.mib_sent).collect()),
                dest_progress: rs.iter().all(|r| r.dest_progress),
                passes: med(rs.iter().map(|r| r.passes as f64).collect()),
                guest_mib_s: median(rs.iter().filter_map(|r| r.guest.guest_mib_s).collect()),
                guest_mib_s_ticks: median(
                    rs.iter()
                        .filter_map(|r| r.guest.guest_mib_s_ticks)
                        .collect(),
                ),
                source_cpu_s: median(rs.iter().filter_map(|r| r.source_cpu_s).collect()),
                migration_cpu_s: median(rs.iter().filter_map(|r| r.migration_cpu_s).collect()),
                dest_cpu_s: median(rs.iter().filter_map(|r| r.dest_cpu_s).collect()),
                heartbeat_gap_ms: median(rs.iter().filter_map(|r| r.heartbeat_gap_ms).collect()),
                guest_faults: median(
                    rs.iter()
                        .filter_map(|r| r.guest_faults.map(|f| f as f64))
                        .collect(),
                ),
                scenario,
                tracker,
                vmm,
            }
        })
        .collect()
}

impl Report {
    /// The table as markdown, with its header lines and notes.
    pub fn to_markdown(&self) -> String {
        markdown(self)
    }
}

fn markdown(rep: &Report) -> String {
    let mut s = format!(
        "PVH test kernel, {} MiB, {} vCPU(s), downtime-limit {} ms, max-bandwidth {} MB/s, ring {} entries/vCPU, loopback{}\n\
         idle: `{}`; dirtying: `{}`\n\
         QEMU: {}\n",
        rep.memory_mib,
        rep.vcpus,
        rep.downtime_limit_ms,
        rep.max_bandwidth / 1_000_000,
        rep.ring_entries,
        if rep.pvm_host { ", PVM host" } else { "" },
        rep.idle_cmdline,
        rep.dirty_cmdline,
        rep.qemu.as_deref().unwrap_or("not available"),
    );
    s += &tsc_line(rep);
    s += &table(&rep.rows);
    s += "\nCells are medians over the repeats. ringvisor's downtime runs from the pause until the destination reports the guest resumed (its two-phase commit waits for the destination's restore); its source-side downtime ends at the commit. QEMU's `downtime` ends when the source has sent the last state, without waiting for the destination, in whole ms; \"downtime to last state sent\" is ringvisor's on that definition (its stages up to the destination's restore). QEMU's `bitmap` uses KVM_CLEAR_DIRTY_LOG (manual protect) when the host has it, so ringvisor's clear-log row is compared with it too. QEMU 7.2 reports RAM bytes only (`ram.transferred`). \"source migration CPU s\": ringvisor's migration thread over the migration; QEMU's source process minus its vCPU threads (main loop and boot included). \"destination CPU s\": ringvisor's receive thread; QEMU's destination process minus its vCPU threads. \"guest MiB/s during\" is cpu 0's write rate over the migration from its progress reports on the source console: (TSC) with the reports' TSC as the clock at the host's TSC rate, the same clock for both VMMs; (ticks) with its timer ticks, which overstates the rate wherever ticks were coalesced. \"guest faults during\": page faults the source's vCPUs took during the migration, KVM's `pf_taken` summed over the vCPUs (every first write to a page after dirty tracking re-protected it is one; on a PVM host also every fault the guest's own page tables cause): ringvisor's from just before its tracker started to the final pass (its summary's `guest_faults`, per pass in `iterations`), QEMU's from `query-stats` just before `migrate` to its end.\n";
    s
}

/// The TSC line under the header: the host's rate the reports were converted with, and
/// each VMM's guests' own calibration (medians), which should agree with it.
fn tsc_line(rep: &Report) -> String {
    let mhz = |v: Option<f64>| match v {
        Some(hz) => format!("{:.1} MHz", hz / 1e6),
        None => "-".to_string(),
    };
    let guest = |vmm: &str| {
        median(
            rep.rows
                .iter()
                .filter(|r| r.vmm == vmm)
                .filter_map(|r| r.guest.guest_tsc_hz)
                .collect(),
        )
    };
    format!(
        "TSC: host {} (rdtsc against CLOCK_MONOTONIC over {} ms); the guests' own calibrations (median): ringvisor {}, QEMU {}\n\n",
        mhz(rep.host_tsc_hz),
        crate::tsc::MEASURE.as_millis(),
        mhz(guest("ringvisor")),
        mhz(guest("qemu")),
    )
}

/// The migration table: one line per (scenario, tracker, VMM) with the medians of its rows,
/// ringvisor's against QEMU's for the same scenario and tracker (clear-log against QEMU's
/// bitmap). A heartbeat-gap column appears when a row has one; a value no row of a cell has
/// is `-`.
pub(crate) fn table(rows: &[Row]) -> String {
    let m = medians(rows);
    let gap = m.iter().any(|c| c.heartbeat_gap_ms.is_some());
    let mut s = format!(
        "| scenario | tracker | VMM | completed | total ms | downtime ms | source-side downtime ms | downtime to last state sent ms | MiB sent | passes | {}guest MiB/s during (TSC) | guest MiB/s during (ticks) | guest faults during | source CPU s | source migration CPU s | destination CPU s | dest progress | total vs QEMU | downtime vs QEMU | downtime to last state sent vs QEMU |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|{}---|---|---|---|---|\n",
        if gap { "heartbeat gap ms | " } else { "" },
        if gap { "---|" } else { "" },
    );
    let opt = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".to_string(),
    };
    for c in &m {
        let q = m.iter().find(|x| {
            x.scenario == c.scenario
                && (x.tracker == c.tracker || (c.tracker == "clear-log" && x.tracker == "bitmap"))
                && x.vmm == "qemu"
        });
        // QEMU reports downtime in whole ms (a 0 is under 1 ms): ratios against at least 0.1.
        let (rt, rd, rs) = match (q, c.vmm.as_str()) {
            (Some(q), "ringvisor") => (
                format!("{:.2}x", c.total_ms / q.total_ms),
                format!("{:.2}x", c.downtime_ms / q.downtime_ms.max(0.1)),
                format!("{:.2}x", c.downtime_sent_ms / q.downtime_ms.max(0.1)),
            ),
            _ => (String::new(), String::new(), String::new()),
        };
        s += &format!(
            "| {} | {} | {} | {}/{} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {}{} | {} | {} | {} | {} | {} | {} | {rt} | {rd} | {rs} |\n",
            c.scenario,
            c.tracker,
            c.vmm,
            c.completed,
            c.runs,
            c.total_ms,
            c.downtime_ms,
            c.downtime_source_ms,
            c.downtime_sent_ms,
            c.mib_sent,
            c.passes,
            if gap {
                format!("{} | ", opt(c.heartbeat_gap_ms, 0))
            } else {
                String::new()
            },
            opt(c.guest_mib_s, 0),
            opt(c.guest_mib_s_ticks, 0),
            opt(c.guest_faults, 0),
            opt(c.source_cpu_s, 2),
            opt(c.migration_cpu_s, 2),
            opt(c.dest_cpu_s, 2),
            if c.dest_progress { "yes" } else { "NO" }
        );
    }
    s
}

fn plot(rep: &Report, path: &std::path::Path) -> Result<()> {
    use crate::plot::plot_err;
    use plotters::prelude::*;
    let m = medians(&rep.rows);
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let max = m.iter().map(|x| x.downtime_ms).fold(1.0f64, f64::max) * 1.15;
    let labels: Vec<String> = m
        .iter()
        .map(|x| format!("{} {} {}", x.scenario, x.tracker, x.vmm))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "PVH guest migration downtime (ms, median)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(90)
        .y_label_area_size(50)
        .build_cartesian_2d((0..m.len()).into_segmented(), 0f64..max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_label_style(
            ("sans-serif", 10)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .y_desc("downtime ms")
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(m.iter().enumerate().map(|(i, x)| {
            let color = if x.vmm == "qemu" { RED } else { BLUE };
            Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), x.downtime_ms),
                ],
                color.mix(0.6).filled(),
            )
        }))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Downtime on QEMU's definition from a ringvisor summary: the `downtime_breakdown_ms`
/// stages before the destination's restore (pause, final collect, final pass, state and
/// Complete), ms; the whole source-side downtime when there is no breakdown.
pub fn sent_downtime_ms(summary: &serde_json::Value) -> f64 {
    let Some(stages) = summary["downtime_breakdown_ms"].as_array() else {
        return summary["downtime_source_ms"].as_f64().unwrap_or(0.0);
    };
    stages
        .iter()
        .take_while(|st| !st[0].as_str().is_some_and(|n| n.starts_with("destination")))
        .filter_map(|st| st[1].as_f64())
        .sum::<f64>()
        // An empty sum is -0.0.
        + 0.0
}

/// One scenario of the third-party guest profile.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name (the table's scenario column).
    pub name: String,
    /// Test kernel `ws_mb`.
    pub ws_mb: u64,
    /// Test kernel `dirty_mb` per 20 ms report (rate = 50 × this MiB/s).
    pub dirty_mb: u64,
    /// Seconds the guest runs before the migration (at least [`PvhOpts::warmup`]).
    pub warmup: f64,
    /// `max-bandwidth` for this scenario (`None` = [`PvhOpts::max_bandwidth`]).
    pub max_bandwidth: Option<u64>,
    /// Extra `ringvisor run` migration options.
    pub ringvisor_args: Vec<&'static str>,
    /// QEMU's settings for the same scenario.
    pub qemu: qemu::QemuExtras,
    /// Only the dirty ring can run it (a dirty limit).
    pub ring_only: bool,
}

/// Bytes of the third-party profile's guest.
pub const THIRD_PARTY_MEMORY: u64 = 4 << 30;
/// The test kernel's working set over all of a 4 GiB guest's RAM past its first 16 MiB (it
/// continues across the MMIO hole into the RAM above 4 GiB).
pub const THIRD_PARTY_ALL_WS_MB: u64 = 4080;
/// Timer period of the profile's guest (the guest ticks every 2 ms).
const THIRD_PARTY_TICK_US: u64 = 2000;
/// Ticks per report: a report every 20 ms, so `dirty_mb` = rate / 50.
const THIRD_PARTY_PERIOD_TICKS: u64 = 10;
/// CPL0 stores at boot (the guest builds 64 GiB of identity page tables: ~33,000).
const THIRD_PARTY_BOOT_WRITES: u64 = 33_000;

/// The scenarios of issue 14's guest profile, in table order.
pub fn third_party_scenarios(o: &PvhOpts) -> Vec<Scenario> {
    let base = |name: &str, ws_mb: u64, rate_mib: u64| Scenario {
        name: name.to_string(),
        ws_mb,
        dirty_mb: rate_mib / 50,
        warmup: o.warmup,
        max_bandwidth: None,
        ringvisor_args: Vec::new(),
        qemu: qemu::QemuExtras::default(),
        ring_only: false,
    };
    let mut v = vec![
        base("idle", 256, 0),
        base("50 MiB/s over 256 MiB", 256, 50),
        base("200 MiB/s over 256 MiB", 256, 200),
        base("800 MiB/s over 256 MiB", 256, 800),
    ];
    // All memory, warmed up until populated: the whole working set written once at 800 MiB/s
    // plus 25% and the boot.
    let mut all = base("800 MiB/s over all memory", THIRD_PARTY_ALL_WS_MB, 800);
    all.warmup = o
        .warmup
        .max(THIRD_PARTY_ALL_WS_MB as f64 / 800.0 * 1.25 + 2.0);
    v.push(all);
    let shaped = |name: &str, rv: Vec<&'static str>, q: qemu::QemuExtras, ring_only| {
        let mut s = base(
            &format!("200 MiB/s over 256 MiB, 128 MiB/s link, {name}"),
            256,
            200,
        );
        s.max_bandwidth = Some(128 << 20);
        s.ringvisor_args = rv;
        s.qemu = q;
        s.ring_only = ring_only;
        s
    };
    v.push(shaped(
        "auto-converge",
        vec!["--auto-converge"],
        qemu::QemuExtras {
            auto_converge: true,
            vcpu_dirty_limit_mb: None,
        },
        false,
    ));
    v.push(shaped(
        "dirty-limit auto (QEMU: dirty limit 50 MB/s)",
        vec!["--dirty-limit", "auto"],
        qemu::QemuExtras {
            auto_converge: false,
            vcpu_dirty_limit_mb: Some(50),
        },
        true,
    ));
    v.push(shaped(
        "dirty-limit 50M (QEMU: dirty limit 50 MB/s)",
        vec!["--dirty-limit", "50M"],
        qemu::QemuExtras {
            auto_converge: false,
            vcpu_dirty_limit_mb: Some(50),
        },
        true,
    ));
    v
}

fn third_party_cmdline(s: &Scenario) -> String {
    ::pvh::test_kernel::Cmdline {
        ws_mb: s.ws_mb,
        dirty_mb: s.dirty_mb,
        reports: 0,
        cpus: 1,
        exit: 0,
        tick_us: THIRD_PARTY_TICK_US,
        period_ticks: THIRD_PARTY_PERIOD_TICKS,
        tsc_pace: true,
        boot_writes: THIRD_PARTY_BOOT_WRITES,
        isr_writes: 1,
        tsc_deadline: true,
        // The guest writes at random over its working set.
        random: true,
    }
    .render()
}

/// `bench migrate --pvh --profile third-party`: issue 14's guest (1 vCPU, 4 GiB, the test
/// kernel with CPL0 boot stores, an ISR store per tick, the TSC-deadline timer at 2 ms with
/// HLT between ticks, writes at random over its working set) in every scenario of
/// [`third_party_scenarios`] named in `only` (a name ending in `*` is a prefix; all when
/// empty), for ringvisor's ring (4096 and 65536 entries), bitmap and clear-log trackers (those
/// named in `o.trackers`) and QEMU's ring (4096, 65536) and bitmap. `o.memory`, `o.vcpus`,
/// `o.ring_entries`, `o.ws_mb`, `o.dirty_mb` and `o.period_ticks` are replaced by the
/// profile's.
pub fn run_third_party(
    o: &PvhOpts,
    only: &[String],
    progress: &mut dyn Progress,
) -> Result<Report> {
    check(o)?;
    let dir = std::env::temp_dir().join(format!("ringvisor-bench-3p-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
    let kernel = dir.join("test-kernel.elf");
    let image = ::pvh::test_kernel::build(&Default::default()).map_err(BenchError::TestKernel)?;
    std::fs::write(&kernel, image)
        .map_err(BenchError::io(format!("writing {}", kernel.display())))?;
    let qemu_version = qemu::available();
    if qemu_version.is_none() {
        progress.note("qemu-system-x86_64 is not usable here: the QEMU rows are left out");
    }
    let clocks = Clocks {
        tick_us: THIRD_PARTY_TICK_US,
        tsc_hz: crate::tsc::host_tsc_hz(crate::tsc::MEASURE),
    };
    let scenarios: Vec<Scenario> = third_party_scenarios(o)
        .into_iter()
        .filter(|s| {
            only.is_empty()
                || only.iter().any(|n| match n.strip_suffix('*') {
                    Some(prefix) => s.name.starts_with(prefix),
                    None => s.name == *n,
                })
        })
        .collect();
    let trackers: [(&str, &str, u32); 4] = [
        ("ring-4096", "ring", 4096),
        ("ring-65536", "ring", 65536),
        ("bitmap", "bitmap", 4096),
        ("clear-log", "clear-log", 4096),
    ];
    let mut cells = Vec::new();
    for s in &scenarios {
        for &(name, mode, entries) in &trackers {
            if !o.trackers.iter().any(|t| t == mode) || (s.ring_only && mode != "ring") {
                continue;
            }
            for _ in 0..o.repeat {
                cells.push((s, name, mode, entries, "ringvisor"));
                if qemu_version.is_some() && mode != "clear-log" {
                    cells.push((s, name, mode, entries, "qemu"));
                }
            }
        }
    }
    progress.start(cells.len() as u64, "migrations");
    let mut rows = Vec::new();
    for (s, name, mode, entries, which) in cells {
        progress.step(&format!("{which} {} {name}", s.name));
        let oo = PvhOpts {
            memory: THIRD_PARTY_MEMORY,
            vcpus: 1,
            ring_entries: entries,
            warmup: s.warmup,
            max_bandwidth: s.max_bandwidth.unwrap_or(o.max_bandwidth),
            ..o.clone()
        };
        let line = third_party_cmdline(s);
        let r = match which {
            "qemu" => qemu_one(&oo, &kernel, &line, mode, &s.qemu, &clocks),
            _ => ringvisor_one(&oo, &kernel, &line, mode, &dir, &s.ringvisor_args, &clocks).map(
                |(r, bad)| {
                    if bad {
                        progress.note(&format!("WARNING: memory digest mismatch in {r:?}"));
                    }
                    r
                },
            ),
        };
        match r {
            Ok(mut r) => {
                r.scenario = s.name.clone();
                r.tracker = name.into();
                rows.push(r);
            }
            Err(e) => progress.note(&format!("{which} {} {name}: {}", s.name, error_chain(&e))),
        }
        progress.inc();
        std::thread::sleep(Duration::from_millis(200));
    }
    progress.finish();
    let _ = std::fs::remove_dir_all(&dir);
    let first = scenarios
        .first()
        .map(third_party_cmdline)
        .unwrap_or_default();
    let last = scenarios
        .last()
        .map(third_party_cmdline)
        .unwrap_or_default();
    Ok(Report {
        pvm_host: kvm_dirty::is_pvm_host(),
        qemu: qemu_version,
        memory_mib: THIRD_PARTY_MEMORY >> 20,
        vcpus: 1,
        ring_entries: 0,
        downtime_limit_ms: o.downtime_limit,
        max_bandwidth: o.max_bandwidth,
        idle_cmdline: first,
        dirty_cmdline: last,
        host_tsc_hz: clocks.tsc_hz,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console of cpu 0 reports: (pages, ticks, tsc) each.
    fn console(reports: &[(u64, u64, u64)]) -> String {
        let mut c = String::from(
            "ringvisor PVH test kernel v1\nboot writes 5\ncpu 0 tsc_per_tick 4200000\n",
        );
        for (i, &(pages, ticks, tsc)) in reports.iter().enumerate() {
            let p = KernelReport {
                cpu: 0,
                report: i as u64 + 1,
                pages,
                ticks,
                tsc: Some(tsc),
            };
            c += &format!("{p}\ncpu 1 progress 1 pages 9999999 ticks 1 tsc 1\n");
        }
        c
    }

    /// 2.1 GHz TSC, 2 ms ticks: 4.2 M TSC ticks per timer tick.
    const HZ: f64 = 2.1e9;
    const PER_TICK: u64 = 4_200_000;

    #[test]
    fn guest_rate_uses_the_reports_inside_the_window() {
        // 256 pages (1 MiB) per 10 ticks (20 ms) = 50 MiB/s, on both clocks.
        let mut r: Vec<(u64, u64, u64)> = (1..=100u64)
            .map(|i| (i * 256, i * 10, i * 10 * PER_TICK))
            .collect();
        let c = console(&r);
        let clocks = Clocks {
            tick_us: 2000,
            tsc_hz: Some(HZ),
        };
        let g = clocks.guest_rate(&c, 200.0);
        assert!((g.guest_mib_s.unwrap() - 50.0).abs() < 1e-9, "{g:?}");
        assert!((g.guest_mib_s_ticks.unwrap() - 50.0).abs() < 1e-9, "{g:?}");
        assert_eq!(g.guest_tsc_hz, Some(HZ));
        // Half the rate over the last 20 reports: 128 pages per 10 ticks.
        r.extend((101..=120u64).map(|i| (100 * 256 + (i - 100) * 128, i * 10, i * 10 * PER_TICK)));
        let c = console(&r);
        assert!((guest_rate_tsc(&c, 400.0, HZ).unwrap() - 25.0).abs() < 1e-9);
        assert!((guest_rate_ticks(&c, 400.0, 2000).unwrap() - 25.0).abs() < 1e-9);
        assert_eq!(
            guest_rate_tsc("cpu 0 progress 1 pages 5 ticks 3 tsc 9\n", 100.0, HZ),
            None
        );
        assert_eq!(
            guest_rate_ticks("cpu 0 progress 1 pages 5 ticks 3\n", 100.0, 2000),
            None
        );
    }

    #[test]
    fn lost_ticks_overstate_the_tick_rate_but_not_the_tsc_rate() {
        // 50 MiB/s on the TSC (a report every 20 ms of TSC), but the timer counts only 8 of
        // every 10 ticks (2 coalesced while the vCPU did not run): the tick clock runs slow
        // and the tick-based rate reads 62.5 MiB/s.
        let r: Vec<(u64, u64, u64)> = (1..=50u64)
            .map(|i| (i * 256, i * 8, i * 10 * PER_TICK))
            .collect();
        let c = console(&r);
        let g = Clocks {
            tick_us: 2000,
            tsc_hz: Some(HZ),
        }
        .guest_rate(&c, 500.0);
        assert!((g.guest_mib_s.unwrap() - 50.0).abs() < 1e-9, "{g:?}");
        assert!((g.guest_mib_s_ticks.unwrap() - 62.5).abs() < 1e-9, "{g:?}");
    }

    #[test]
    fn reports_without_a_tsc_or_a_bad_tsc_rate_give_no_tsc_rate() {
        let old = "cpu 0 progress 1 pages 256 ticks 10\ncpu 0 progress 2 pages 512 ticks 20\n";
        assert_eq!(guest_rate_tsc(old, 1e3, HZ), None);
        assert!((guest_rate_ticks(old, 1e3, 2000).unwrap() - 50.0).abs() < 1e-9);
        let c = console(&[(256, 10, 10 * PER_TICK), (512, 20, 20 * PER_TICK)]);
        for hz in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(guest_rate_tsc(&c, 1e3, hz), None, "{hz}");
        }
        let g = Clocks {
            tick_us: 2000,
            tsc_hz: None,
        }
        .guest_rate(&c, 1e3);
        assert_eq!(g.guest_mib_s, None);
        assert!(g.guest_mib_s_ticks.is_some());
        // A TSC that went backwards (not this kernel's) is no rate either.
        let back = console(&[(256, 10, 20 * PER_TICK), (512, 20, 10 * PER_TICK)]);
        assert_eq!(guest_rate_tsc(&back, 1e3, HZ), None);
    }

    #[test]
    fn the_table_shows_both_rates_and_the_header_the_tsc_rates() {
        let row = |vmm: &str, tsc: f64, ticks: f64, faults: Option<u64>| Row {
            vmm: vmm.into(),
            scenario: "50 MiB/s".into(),
            tracker: "bitmap".into(),
            completed: true,
            outcome: "completed".into(),
            total_ms: 100.0,
            downtime_ms: 1.0,
            downtime_source_ms: 1.0,
            downtime_sent_ms: 1.0,
            mib_sent: 10.0,
            passes: 3,
            dest_progress: true,
            verified: None,
            source_cpu_s: None,
            migration_cpu_s: None,
            dest_cpu_s: None,
            guest: GuestRate {
                guest_mib_s: Some(tsc),
                guest_mib_s_ticks: Some(ticks),
                guest_tsc_hz: Some(HZ),
            },
            heartbeat_gap_ms: None,
            guest_faults: faults,
        };
        let rep = Report {
            pvm_host: true,
            qemu: Some("7.2".into()),
            memory_mib: 64,
            vcpus: 1,
            ring_entries: 0,
            downtime_limit_ms: 300,
            max_bandwidth: 1 << 30,
            idle_cmdline: String::new(),
            dirty_cmdline: String::new(),
            host_tsc_hz: Some(2.1e9),
            rows: vec![
                row("ringvisor", 50.2, 52.0, Some(1234)),
                row("qemu", 50.1, 57.0, None),
            ],
        };
        let md = rep.to_markdown();
        assert!(md.contains("TSC: host 2100.0 MHz"), "{md}");
        assert!(md.contains("ringvisor 2100.0 MHz, QEMU 2100.0 MHz"), "{md}");
        assert!(
            md.contains(
                "| guest MiB/s during (TSC) | guest MiB/s during (ticks) | guest faults during |"
            ),
            "{md}"
        );
        assert!(md.contains("| 3 | 50 | 52 | 1234 | - |"), "{md}");
        assert!(md.contains("| 3 | 50 | 57 | - | - |"), "{md}");
        let v = serde_json::to_value(&rep.rows[1]).unwrap();
        assert_eq!(v["guest_mib_s"], 50.1);
        assert_eq!(v["guest_mib_s_ticks"], 57.0);
        assert_eq!(v["guest_tsc_hz"], 2.1e9);
        assert_eq!(v["guest_faults"], serde_json::Value::Null);
        let v = serde_json::to_value(&rep.rows[0]).unwrap();
        assert_eq!(v["guest_faults"], 1234);
    }

    #[test]
    fn sent_downtime_stops_before_the_destination_restore() {
        let v = serde_json::json!({
            "downtime_source_ms": 1.6,
            "downtime_breakdown_ms": [
                ["pause", 0.05], ["final collect", 0.02], ["final pass", 0.35],
                ["vCPU state + complete", 0.18],
                ["destination restore (ReadyToResume)", 0.98],
                ["commit + resume (Resumed)", 0.13]
            ]
        });
        assert!((sent_downtime_ms(&v) - 0.60).abs() < 1e-9);
        let old = serde_json::json!({ "downtime_source_ms": 1.6 });
        assert_eq!(sent_downtime_ms(&old), 1.6);
    }
}
