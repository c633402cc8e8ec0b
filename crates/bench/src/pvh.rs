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

fn cmdline(o: &PvhOpts, dirty: bool) -> String {
    ::pvh::test_kernel::Cmdline {
        ws_mb: o.ws_mb,
        dirty_mb: if dirty { o.dirty_mb } else { 0 },
        reports: 0,
        cpus: o.vcpus,
        exit: 0,
        tick_us: 1000,
        period_ticks: o.period_ticks,
        tsc_pace: true,
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
) -> Result<(Row, bool)> {
    let console = dir.join(format!("dest-{tracker}.console"));
    let _ = std::fs::remove_file(&console);
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
            "/dev/null",
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
        .stderr(Stdio::piped())
        .output()
        .map_err(BenchError::io("running the source"));
    reap_destination(&mut dest);
    let v = source_summary(&out?)?;
    let kind = v["outcome"]["kind"].as_str().unwrap_or("?").to_string();
    let verified = v["verified"].as_bool();
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
        },
        verified == Some(false),
    ))
}

fn qemu_one(o: &PvhOpts, kernel: &Path, cmdline: &str, tracker: &str) -> Result<Row> {
    let r = qemu::migrate(&qemu::QemuRun {
        kernel: kernel.to_path_buf(),
        cmdline: cmdline.to_string(),
        memory_mib: o.memory >> 20,
        vcpus: o.vcpus as u32,
        dirty_ring: (tracker == "ring").then_some(o.ring_entries),
        downtime_limit_ms: o.downtime_limit,
        max_bandwidth: Some(o.max_bandwidth),
        warmup: Duration::from_secs_f64(o.warmup),
        timeout: Duration::from_secs_f64(o.timeout),
    })?;
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
            "qemu" => qemu_one(o, &kernel, &line, tracker),
            _ => ringvisor_one(o, &kernel, &line, tracker, &dir).map(|(r, bad)| {
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
}

fn medians(rep: &Report) -> Vec<Med> {
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in &rep.rows {
        let k = (r.scenario.clone(), r.tracker.clone(), r.vmm.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    keys.into_iter()
        .map(|(scenario, tracker, vmm)| {
            let rs: Vec<&Row> = rep
                .rows
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
         QEMU: {}\n\n\
         | scenario | tracker | VMM | completed | total ms | downtime ms | source-side downtime ms | MiB sent | dest progress | total vs QEMU | downtime vs QEMU |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
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
    let m = medians(rep);
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
            "| {} | {} | {} | {}/{} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {rt} | {rd} |\n",
            c.scenario,
            c.tracker,
            c.vmm,
            c.completed,
            c.runs,
            c.total_ms,
            c.downtime_ms,
            c.downtime_source_ms,
            c.mib_sent,
            if c.dest_progress { "yes" } else { "NO" }
        );
    }
    s += "\nCells are medians over the repeats. ringvisor's downtime runs from the pause until the destination reports the guest resumed (its two-phase commit waits for the destination's restore); its source-side downtime ends at the commit. QEMU's `downtime` ends when the source has sent the last state, without waiting for the destination. QEMU's `bitmap` uses KVM_CLEAR_DIRTY_LOG (manual protect) when the host has it, so ringvisor's clear-log row is compared with it too. QEMU 7.2 reports RAM bytes only (`ram.transferred`).\n";
    s
}

fn plot(rep: &Report, path: &std::path::Path) -> Result<()> {
    use crate::plot::plot_err;
    use plotters::prelude::*;
    let m = medians(rep);
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
