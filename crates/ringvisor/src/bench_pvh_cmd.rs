//! `ringvisor bench migrate --pvh`: the PVH-guest rows. The project's PVH test kernel, written
//! once to a file, boots with the same command line, memory and vCPUs under ringvisor (a
//! `run --kernel` source process and an `incoming` destination process) and, where
//! `qemu-system-x86_64` works, under QEMU (`-accel kvm[,dirty-ring-size=N] -kernel FILE`, two
//! processes driven over QMP); each is live-migrated on loopback with the same downtime limit
//! and bandwidth, at idle and while dirtying, for each tracker. One run, side by side.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::qemu;

pub struct Opts {
    pub memory: u64,
    pub vcpus: u64,
    pub trackers: Vec<String>,
    pub ring_entries: u32,
    pub downtime_limit: u64,
    pub max_bandwidth: u64,
    pub timeout: f64,
    pub warmup: f64,
    pub ws_mb: u64,
    pub dirty_mb: u64,
    pub period_ticks: u64,
    pub repeat: u32,
    pub plot: Option<std::path::PathBuf>,
    pub json: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct Row {
    pub vmm: String,
    pub scenario: String,
    pub tracker: String,
    pub completed: bool,
    pub outcome: String,
    pub total_ms: f64,
    /// ringvisor: from the pause to the destination's Resumed (the guest runs again); QEMU:
    /// its `downtime` (from the stop until the source has sent everything).
    pub downtime_ms: f64,
    /// ringvisor: from the pause until the source commits (after the destination restored
    /// and answered ReadyToResume); QEMU: same as `downtime_ms`.
    pub downtime_source_ms: f64,
    pub mib_sent: f64,
    pub passes: u64,
    /// The destination's console kept printing progress after the resume.
    pub dest_progress: bool,
    /// ringvisor compares memory digests after every migration; QEMU does not.
    pub verified: Option<bool>,
}

#[derive(Serialize)]
pub struct Report {
    pub pvm_host: bool,
    pub qemu: Option<String>,
    pub memory_mib: u64,
    pub vcpus: u64,
    pub ring_entries: u32,
    pub downtime_limit_ms: u64,
    pub max_bandwidth: u64,
    pub idle_cmdline: String,
    pub dirty_cmdline: String,
    pub rows: Vec<Row>,
}

fn cmdline(o: &Opts, dirty: bool) -> String {
    pvh::test_kernel::Cmdline {
        ws_mb: o.ws_mb,
        dirty_mb: if dirty { o.dirty_mb } else { 0 },
        reports: 0,
        cpus: o.vcpus,
        exit: 0,
        tick_us: 1000,
        period_ticks: o.period_ticks,
        tsc_pace: true,
        ..pvh::test_kernel::Cmdline::default()
    }
    .render()
}

fn progress_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter(|l| l.contains(" progress ")).count())
        .unwrap_or(0)
}

/// One ringvisor migration: destination and source processes on loopback.
fn ringvisor_one(
    exe: &std::path::Path,
    o: &Opts,
    kernel: &std::path::Path,
    cmdline: &str,
    tracker: &str,
    dir: &std::path::Path,
) -> Result<(Row, bool)> {
    let console = dir.join(format!("dest-{tracker}.console"));
    let _ = std::fs::remove_file(&console);
    let mut cmd = Command::new(exe);
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
    let (mut dest, mut dout, addr) = crate::bench_migrate_cmd::spawn_destination(cmd)?;
    let addr = addr.as_str();
    let out = Command::new(exe)
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
            addr,
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
        .context("running the source")?;
    crate::bench_migrate_cmd::reap_destination(&mut dest);
    let mut rest = String::new();
    let _ = dout.read_to_string(&mut rest);
    let v = crate::bench_migrate_cmd::source_summary(&out)?;
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

fn qemu_one(o: &Opts, kernel: &std::path::Path, cmdline: &str, tracker: &str) -> Result<Row> {
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

pub fn run(o: Opts) -> Result<()> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: bench migrate needs real KVM");
    }
    if !(o.warmup.is_finite() && o.warmup > 0.0) {
        bail!("--pvh-warmup must be a positive number of seconds");
    }
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("ringvisor-bench-pvh-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kernel = dir.join("test-kernel.elf");
    std::fs::write(
        &kernel,
        pvh::test_kernel::build(&Default::default()).context("building the test kernel")?,
    )?;
    let qemu_version = qemu::available();
    if qemu_version.is_none() {
        eprintln!("qemu-system-x86_64 is not usable here: the QEMU rows are left out");
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
    let pb = if o.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(cells.len() as u64)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} migrations {elapsed} {msg}")
            .expect("static template"),
    );
    let mut rows = Vec::new();
    for (name, dirty, tracker, which) in cells {
        pb.set_message(format!("{which} {name} {tracker}"));
        let line = cmdline(&o, dirty);
        let r = match which {
            "qemu" => qemu_one(&o, &kernel, &line, tracker),
            _ => ringvisor_one(&exe, &o, &kernel, &line, tracker, &dir).map(|(r, bad)| {
                if bad {
                    crate::bench_migrate_cmd::say(
                        &pb,
                        format!("WARNING: memory digest mismatch in {r:?}"),
                    );
                }
                r
            }),
        };
        match r {
            Ok(mut r) => {
                r.scenario = name.into();
                rows.push(r);
            }
            Err(e) => {
                crate::bench_migrate_cmd::say(&pb, format!("{which} {name} {tracker}: {e:#}"))
            }
        }
        pb.inc(1);
        std::thread::sleep(Duration::from_millis(200));
    }
    pb.finish_and_clear();
    let _ = std::fs::remove_dir_all(&dir);
    let rep = Report {
        pvm_host: kvm_dirty::is_pvm_host(),
        qemu: qemu_version,
        memory_mib: o.memory >> 20,
        vcpus: o.vcpus,
        ring_entries: o.ring_entries,
        downtime_limit_ms: o.downtime_limit,
        max_bandwidth: o.max_bandwidth,
        idle_cmdline: cmdline(&o, false),
        dirty_cmdline: cmdline(&o, true),
        rows,
    };
    if let Some(p) = &o.plot {
        plot(&rep, p)?;
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print!("{}", markdown(&rep));
    }
    Ok(())
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
    use plotters::prelude::*;
    let m = medians(rep);
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
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
        .build_cartesian_2d((0..m.len()).into_segmented(), 0f64..max)?;
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
        .draw()?;
    chart.draw_series(m.iter().enumerate().map(|(i, x)| {
        let color = if x.vmm == "qemu" { RED } else { BLUE };
        Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), x.downtime_ms),
            ],
            color.mix(0.6).filled(),
        )
    }))?;
    root.present()?;
    Ok(())
}
