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
    /// The guest's write rate during the migration, MiB/s, from its progress reports on the
    /// source console ([`guest_rate`]).
    pub guest_mib_s: Option<f64>,
    /// Host time from the guest's last heartbeat line on the source console to its next one on
    /// the destination's, ms (the Linux rows: [`crate::linux`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_gap_ms: Option<f64>,
}

/// The guest's write rate over the last `window_ms` of the source console (the migration):
/// pages between the last progress report and the first report at least `window_ms` of timer
/// ticks before it, over those ticks (`tick_us` each). MiB/s; `None` with fewer than two
/// reports in the window.
pub fn guest_rate(console: &str, window_ms: f64, tick_us: u64) -> Option<f64> {
    let reports: Vec<(u64, u64)> = console
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_ascii_whitespace().collect();
            match w.as_slice() {
                ["cpu", "0", "progress", _, "pages", p, "ticks", t] => {
                    Some((p.parse().ok()?, t.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect();
    let &(p1, t1) = reports.last()?;
    let window_ticks = (window_ms * 1e3 / tick_us.max(1) as f64) as u64;
    let &(p0, t0) = reports.iter().find(|(_, t)| *t + window_ticks >= t1)?;
    if t1 <= t0 {
        return None;
    }
    let secs = (t1 - t0) as f64 * tick_us as f64 / 1e6;
    Some((p1 - p0) as f64 * 4096.0 / secs / f64::from(1u32 << 20))
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
    tick_us: u64,
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
    reap_destination(&mut dest);
    let v = source_summary(&out?)?;
    let kind = v["outcome"]["kind"].as_str().unwrap_or("?").to_string();
    let verified = v["verified"].as_bool();
    let total_ms = v["total_ms"].as_f64().unwrap_or(0.0);
    let guest = std::fs::read_to_string(&src_console)
        .ok()
        .and_then(|c| guest_rate(&c, total_ms, tick_us));
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
            mib_sent: v["bytes_sent"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            passes: v["iterations"]
                .as_array()
                .map(|a| a.len() as u64)
                .unwrap_or(0),
            // The destination ran 1 s after the resume: at least 2 reports per vCPU.
            dest_progress: progress_lines(&console) >= 2 * o.vcpus as usize,
            verified,
            source_cpu_s: cpu,
            guest_mib_s: guest,
            heartbeat_gap_ms: None,
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
    tick_us: u64,
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
    let guest = guest_rate(&r.source_console, r.total_ms, tick_us);
    Ok(Row {
        vmm: "qemu".into(),
        scenario: String::new(),
        tracker: tracker.into(),
        completed: r.completed,
        outcome: r.status.clone(),
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms,
        downtime_source_ms: r.downtime_ms,
        mib_sent: r.bytes_sent as f64 / (1 << 20) as f64,
        passes: r.passes,
        dest_progress: r.dest_progress_ok,
        verified: None,
        source_cpu_s: r.source_cpu_s,
        guest_mib_s: guest,
        heartbeat_gap_ms: None,
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
            "qemu" => qemu_one(o, &kernel, &line, tracker, &Default::default(), TICK_US),
            _ => ringvisor_one(o, &kernel, &line, tracker, &dir, &[], TICK_US).map(|(r, bad)| {
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
    mib_sent: f64,
    dest_progress: bool,
    passes: f64,
    guest_mib_s: Option<f64>,
    source_cpu_s: Option<f64>,
    heartbeat_gap_ms: Option<f64>,
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
                mib_sent: med(rs.iter().map(|r| r.mib_sent).collect()),
                dest_progress: rs.iter().all(|r| r.dest_progress),
                passes: med(rs.iter().map(|r| r.passes as f64).collect()),
                guest_mib_s: median(rs.iter().filter_map(|r| r.guest_mib_s).collect()),
                source_cpu_s: median(rs.iter().filter_map(|r| r.source_cpu_s).collect()),
                heartbeat_gap_ms: median(rs.iter().filter_map(|r| r.heartbeat_gap_ms).collect()),
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
         QEMU: {}\n\n",
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
    s += &table(&rep.rows);
    s += "\nCells are medians over the repeats. ringvisor's downtime runs from the pause until the destination reports the guest resumed (its two-phase commit waits for the destination's restore); its source-side downtime ends at the commit. QEMU's `downtime` ends when the source has sent the last state, without waiting for the destination. QEMU's `bitmap` uses KVM_CLEAR_DIRTY_LOG (manual protect) when the host has it, so ringvisor's clear-log row is compared with it too. QEMU 7.2 reports RAM bytes only (`ram.transferred`).\n";
    s
}

/// The migration table: one line per (scenario, tracker, VMM) with the medians of its rows,
/// ringvisor's against QEMU's for the same scenario and tracker (clear-log against QEMU's
/// bitmap). A heartbeat-gap column appears when a row has one; a value no row of a cell has
/// is `-`.
pub(crate) fn table(rows: &[Row]) -> String {
    let m = medians(rows);
    let gap = m.iter().any(|c| c.heartbeat_gap_ms.is_some());
    let mut s = format!(
        "| scenario | tracker | VMM | completed | total ms | downtime ms | source-side downtime ms | MiB sent | passes | {}guest MiB/s during | source CPU s | dest progress | total vs QEMU | downtime vs QEMU |\n\
         |---|---|---|---|---|---|---|---|---|---|{}---|---|---|---|\n",
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
        let (rt, rd) = match (q, c.vmm.as_str()) {
            (Some(q), "ringvisor") => (
                format!("{:.2}x", c.total_ms / q.total_ms),
                format!("{:.2}x", c.downtime_ms / q.downtime_ms.max(0.1)),
            ),
            _ => (String::new(), String::new()),
        };
        s += &format!(
            "| {} | {} | {} | {}/{} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {}{} | {} | {} | {rt} | {rd} |\n",
            c.scenario,
            c.tracker,
            c.vmm,
            c.completed,
            c.runs,
            c.total_ms,
            c.downtime_ms,
            c.downtime_source_ms,
            c.mib_sent,
            c.passes,
            if gap {
                format!("{} | ", opt(c.heartbeat_gap_ms, 0))
            } else {
                String::new()
            },
            opt(c.guest_mib_s, 0),
            opt(c.source_cpu_s, 2),
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
    }
    .render()
}

/// `bench migrate --pvh --profile third-party`: issue 14's guest (1 vCPU, 4 GiB, the test
/// kernel with CPL0 boot stores, an ISR store per tick, the TSC-deadline timer at 2 ms with
/// HLT between ticks) in every scenario of [`third_party_scenarios`] named in `only` (a name
/// ending in `*` is a prefix; all when empty), for ringvisor's ring (4096 and 65536 entries), bitmap and
/// clear-log trackers (those named in `o.trackers`) and QEMU's ring (4096, 65536) and bitmap.
/// `o.memory`, `o.vcpus`, `o.ring_entries`, `o.ws_mb`, `o.dirty_mb` and `o.period_ticks` are
/// replaced by the profile's.
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
            "qemu" => qemu_one(&oo, &kernel, &line, mode, &s.qemu, THIRD_PARTY_TICK_US),
            _ => ringvisor_one(
                &oo,
                &kernel,
                &line,
                mode,
                &dir,
                &s.ringvisor_args,
                THIRD_PARTY_TICK_US,
            )
            .map(|(r, bad)| {
                if bad {
                    progress.note(&format!("WARNING: memory digest mismatch in {r:?}"));
                }
                r
            }),
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
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_rate_uses_the_reports_inside_the_window() {
        // 2 ms ticks; 256 pages (1 MiB) per 10 ticks (20 ms) = 50 MiB/s, then a stall.
        let mut c = String::from("ringvisor PVH test kernel v1\nboot writes 5\n");
        for r in 1..=100u64 {
            c += &format!("cpu 0 progress {r} pages {} ticks {}\n", r * 256, r * 10);
        }
        // The last 200 ms (100 ticks) of a steady 50 MiB/s.
        let rate = guest_rate(&c, 200.0, 2000).unwrap();
        assert!((rate - 50.0).abs() < 1e-9, "{rate}");
        // Half the rate over the last 20 reports: 128 pages per 10 ticks.
        for r in 101..=120u64 {
            c += &format!(
                "cpu 0 progress {r} pages {} ticks {}\n",
                100 * 256 + (r - 100) * 128,
                r * 10
            );
        }
        let rate = guest_rate(&c, 400.0, 2000).unwrap();
        assert!((rate - 25.0).abs() < 1e-9, "{rate}");
        assert_eq!(
            guest_rate("cpu 0 progress 1 pages 5 ticks 3\n", 100.0, 2000),
            None
        );
    }
}
