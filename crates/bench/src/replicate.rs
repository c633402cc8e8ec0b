//! `ringvisor bench replicate`: the cost of continuous replication per checkpoint, per
//! tracker, guest size, dirty set and epoch. Each cell runs in this process on real KVM: a
//! sparse workload guest (vCPU 0 dirties about the given pages per epoch, vCPU 1 runs a
//! compute loop whose counter is the guest's progress), the engine's real primary loop, and a
//! real standby (`run_standby`: the stream is decoded and every checkpoint verified) on
//! loopback TCP whose image discards the pages, so the numbers are the primary's pause and
//! the protocol's latency, not the standby's memory writes. Per cell the guest's progress is
//! measured unreplicated, replicated and unreplicated again over the same wall time.
//!
//! Besides the cells: [`failover`] (a real `VmImage` standby, the primary's link cut or gone
//! silent, time to detection, restore and the resumed guest's first progress) and
//! [`probe`] (why copying the dirty pages costs what it costs inside the pause).

pub mod failover;
pub mod probe;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_dirty::TrackerMode;
use migration_engine::replicate::{
    replicate, run_standby, CheckpointStats, PrimaryOptions, ReplicaControl, ReplicaImage,
    ReplicationStatus, StandbyOptions,
};
use serde::Serialize;
use vmm::{Pattern, RegionSpec, Tracking, Vm, VmConfig};

use crate::error::{BenchError, Result};
use crate::plot::{line_plot_log_x, Series};
use crate::Progress;

const DATA_GPA: u64 = 1 << 32;
/// The vCPU whose loop counter is the guest's progress.
const COMPUTE_VCPU: usize = 1;
/// Checkpoints before the measured ones.
const WARMUP: u64 = 3;
/// The progress windows last at least this long (short epochs measure more checkpoints).
const MIN_WINDOW_MS: u64 = 1000;

/// Options of the replication benchmark.
#[derive(Debug, Clone)]
pub struct ReplicateOpts {
    /// Trackers to compare.
    pub trackers: Vec<TrackerMode>,
    /// Guest sizes in GiB (1..=256; sparse).
    pub sizes_gib: Vec<u64>,
    /// Target dirty pages per epoch (the guest writes this many per epoch over a working set
    /// 16 times larger, so most writes hit a new page).
    pub dirty_pages: Vec<u64>,
    /// Epoch lengths (`checkpoint-delay`), ms.
    pub epochs_ms: Vec<u64>,
    /// Measured checkpoints per cell (after 3 warm-up checkpoints; more where they would
    /// take less than 1 s, so the progress windows are at least 1 s long).
    pub checkpoints: u64,
    /// Dirty ring entries per vCPU.
    pub ring_entries: u32,
    /// Failovers per guest size and way of losing the primary (0: no failover table).
    pub failover_runs: u32,
    /// The standby's heartbeat timeout in the failover runs.
    pub heartbeat_timeout: Duration,
    /// Also run the copy probe (why the copy costs what it does) for the ring.
    pub copy_probe: bool,
    /// Write an SVG plot of the pause versus guest size here.
    pub plot: Option<PathBuf>,
}

/// One cell: medians and 99th percentiles over its checkpoints, µs.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicateCell {
    /// Tracker.
    pub tracker: String,
    /// Guest size, GiB.
    pub size_gib: u64,
    /// Target dirty pages per epoch.
    pub dirty_target: u64,
    /// Epoch, ms.
    pub epoch_ms: u64,
    /// Checkpoints measured.
    pub checkpoints: usize,
    /// Pages per checkpoint (median).
    pub pages: u64,
    /// Of those, copied inside the pause (median; the ring copies the others while the
    /// guest runs).
    pub pause_pages: u64,
    /// Pause per checkpoint: median, p99.
    pub pause_us: (u64, u64),
    /// Of the pause, median: parking the vCPUs, collect, copy, state (the rest is the
    /// resume).
    pub split_us: (u64, u64, u64, u64),
    /// Pause to the standby's ack: median, p99.
    pub latency_us: (u64, u64),
    /// Bytes per checkpoint on the wire (median).
    pub bytes: u64,
    /// Pauses that waited for the previous ack.
    pub stalls: u64,
    /// The compute vCPU's loop iterations per second: unreplicated (the mean of a window
    /// before and one after replication, each as long as the replicated one), replicated.
    pub progress_per_s: (f64, f64),
    /// Replicated progress in percent of unreplicated.
    pub progress_pct: f64,
}

/// Everything one run of the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicateReport {
    /// Whether the host's KVM is PVM (nested, shadow paging).
    pub pvm_host: bool,
    /// The cells.
    pub cells: Vec<ReplicateCell>,
    /// The failover rows (empty with `failover_runs` 0).
    pub failover: Vec<failover::FailoverRow>,
    /// The copy probe's rows (empty unless asked).
    pub copy_probe: Vec<probe::CopyProbeRow>,
    /// Where the plot went.
    pub plot: Option<PathBuf>,
}

/// A standby image that verifies and discards (the benchmark measures the primary).
struct Discard;
impl ReplicaImage for Discard {
    fn write_page(&mut self, _: u64, _: &[u8]) -> migration_engine::Result<()> {
        Ok(())
    }
    fn zero_page(&mut self, _: u64) -> migration_engine::Result<()> {
        Ok(())
    }
}

pub(crate) fn med_p99(mut v: Vec<u64>) -> (u64, u64) {
    if v.is_empty() {
        return (0, 0);
    }
    v.sort_unstable();
    let p99 = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
    (v[v.len() / 2], v[p99])
}

pub(crate) fn median_f(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn tracking(t: TrackerMode, entries: u32) -> Tracking {
    match t {
        TrackerMode::Ring => Tracking::Ring { entries },
        TrackerMode::Bitmap => Tracking::Bitmap,
        TrackerMode::ClearLog => Tracking::ClearLog,
    }
}

pub(crate) fn io(what: &str) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        what: what.to_string(),
        source,
    }
}

pub(crate) fn vm_err(e: vmm::VmmError) -> BenchError {
    BenchError::Invalid(format!("guest: {e}"))
}

/// The benchmark's guest, started: `gib` GiB of sparse memory at 4 GiB, vCPU 0 dirtying
/// about `dirty` pages per `epoch_ms` over a working set 16 times larger, vCPU 1 a compute
/// loop (rewriting one page of its own) whose counter measures the CPU the guest gets.
pub(crate) fn guest(
    t: TrackerMode,
    entries: u32,
    gib: u64,
    dirty: u64,
    epoch_ms: u64,
) -> Result<Vm> {
    let mut vm = Vm::create(&VmConfig {
        vcpus: 2,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes: gib << 30,
            log_dirty: true,
        }],
        tracking: tracking(t, entries),
    })
    .map_err(vm_err)?;
    let ws = (dirty * 16).clamp(64, (gib << 30) / 4096);
    let rate = (dirty * 1000 / epoch_ms.max(1)).max(1);
    vm.set_split_workload(DATA_GPA, ws, Pattern::Random, rate, 1)
        .map_err(vm_err)?;
    vm.start(None).map_err(vm_err)?;
    Ok(vm)
}

/// The compute vCPU's counter.
pub(crate) fn progress(vm: &Vm) -> Result<u64> {
    vm.nr_writes(COMPUTE_VCPU).map_err(vm_err)
}

/// The compute vCPU's iterations per second over `window`, unreplicated.
fn unreplicated_rate(vm: &Vm, window: Duration) -> Result<f64> {
    let (t0, w0) = (Instant::now(), progress(vm)?);
    std::thread::sleep(window);
    let (t1, w1) = (Instant::now(), progress(vm)?);
    Ok(w1.saturating_sub(w0) as f64 / t1.duration_since(t0).as_secs_f64())
}

/// While `replicate` runs: the compute vCPU's iterations per second from the moment
/// checkpoint `from` was taken to the moment checkpoint `to` was (sampled every ms, so the
/// window is exact to about 1 ms); `None` if replication ended before `to`.
fn replicated_rate(vm: &Vm, ctl: &ReplicaControl, from: u64, to: u64) -> Option<f64> {
    let mut start = None;
    loop {
        let i = ctl.info();
        if start.is_none() && i.epoch >= from {
            start = Some((Instant::now(), progress(vm).ok()?));
        }
        if let Some((t0, w0)) = start.filter(|_| i.epoch >= to) {
            let w1 = progress(vm).ok()?;
            return Some(w1.saturating_sub(w0) as f64 / t0.elapsed().as_secs_f64());
        }
        if matches!(
            i.status,
            ReplicationStatus::Stopped | ReplicationStatus::StandbyLost | ReplicationStatus::Failed
        ) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One cell.
fn cell(
    o: &ReplicateOpts,
    t: TrackerMode,
    gib: u64,
    dirty: u64,
    epoch_ms: u64,
) -> Result<ReplicateCell> {
    let mut vm = guest(t, o.ring_entries, gib, dirty, epoch_ms)?;
    std::thread::sleep(Duration::from_millis(300));
    let n = o.checkpoints.max(MIN_WINDOW_MS.div_ceil(epoch_ms));
    let window = Duration::from_millis(epoch_ms * n);
    let before = unreplicated_rate(&vm, window)?;
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding the standby"))?;
    let addr = l.local_addr().map_err(io("standby address"))?;
    let standby = std::thread::spawn(move || -> std::result::Result<(u64, String), String> {
        let (s, _) = l.accept().map_err(|e| e.to_string())?;
        let mut make = |_: &migration::wire::Hello, _: &migration::wire::MemoryLayout| Ok(Discard);
        run_standby(s, &StandbyOptions::default(), &mut make, &mut |_| {})
            .map(|(_, r)| (r.applied, format!("{:?}", r.end)))
            .map_err(|e| e.to_string())
    });
    let opts = PrimaryOptions {
        checkpoint_delay: Duration::from_millis(epoch_ms),
        max_checkpoints: Some(n + WARMUP),
        ..PrimaryOptions::default()
    };
    let ctl = ReplicaControl::new();
    let stream = TcpStream::connect(addr).map_err(io("connecting to the standby"))?;
    let (sum, during) = std::thread::scope(|sc| {
        let (vm, ctl) = (&vm, &*ctl);
        let poll = sc.spawn(move || replicated_rate(vm, ctl, WARMUP, n + WARMUP));
        let sum = replicate(vm, stream, &opts, ctl, None);
        (sum, poll.join().ok().flatten())
    });
    let standby = standby
        .join()
        .unwrap_or_else(|_| Err("the standby thread panicked".into()));
    let applied = standby.as_ref().ok().map(|r| r.0);
    let after = unreplicated_rate(&vm, window);
    let _ = vm.stop();
    if sum.info.status != ReplicationStatus::Stopped || applied != Some(n + WARMUP) {
        return Err(BenchError::Invalid(format!(
            "replication did not complete: {:?} {:?} (checkpoint {} taken, {} ring overruns, {:.0} ms); the standby: {standby:?}",
            sum.info.status, sum.info.reason, sum.info.epoch, sum.tracking_lost_events, sum.total_ms
        )));
    }
    let base = (before + after?) / 2.0;
    let during = during.unwrap_or(0.0);
    let cps: Vec<&CheckpointStats> = sum.checkpoints.iter().skip(WARMUP as usize).collect();
    let col = |f: fn(&CheckpointStats) -> u64| cps.iter().map(|c| f(c)).collect::<Vec<u64>>();
    Ok(ReplicateCell {
        tracker: t.name().to_string(),
        size_gib: gib,
        dirty_target: dirty,
        epoch_ms,
        checkpoints: cps.len(),
        pages: med_p99(col(|c| c.pages)).0,
        pause_pages: med_p99(col(|c| c.pause_copy_pages)).0,
        pause_us: med_p99(col(|c| c.pause_us)),
        split_us: (
            med_p99(col(|c| c.park_us)).0,
            med_p99(col(|c| c.collect_us)).0,
            med_p99(col(|c| c.copy_us)).0,
            med_p99(col(|c| c.state_us)).0,
        ),
        latency_us: med_p99(col(|c| c.latency_us)),
        bytes: med_p99(col(|c| c.bytes)).0,
        stalls: sum.info.stalls,
        progress_per_s: (base, during),
        progress_pct: if base > 0.0 {
            100.0 * during / base
        } else {
            0.0
        },
    })
}

fn check(o: &ReplicateOpts) -> Result<()> {
    if !vmm::kvm_available() {
        return Err(BenchError::NoKvm("bench replicate"));
    }
    if let Some(bad) = o.sizes_gib.iter().find(|&&g| g == 0 || g > 256) {
        return Err(BenchError::Invalid(format!(
            "--sizes-gib: {bad} is out of range (1..=256 GiB)"
        )));
    }
    if o.epochs_ms.iter().any(|&e| e == 0 || e > 60_000) || o.dirty_pages.contains(&0) {
        return Err(BenchError::Invalid(
            "--epochs-ms must be 1..=60000 and --dirty-pages at least 1".into(),
        ));
    }
    if o.trackers.is_empty() || o.sizes_gib.is_empty() || o.epochs_ms.is_empty() {
        return Err(BenchError::Invalid(
            "--trackers, --sizes-gib and --epochs-ms need at least one value".into(),
        ));
    }
    Ok(())
}

/// Runs every cell, then the failover runs and the copy probe if asked, then the plot; a
/// cell that fails is reported through `progress` and left out.
pub fn run(o: &ReplicateOpts, progress: &mut dyn Progress) -> Result<ReplicateReport> {
    check(o)?;
    let n = o.trackers.len() * o.sizes_gib.len() * o.dirty_pages.len() * o.epochs_ms.len();
    let fo = if o.failover_runs > 0 {
        o.sizes_gib.len() * 2
    } else {
        0
    };
    let pr = if o.copy_probe {
        o.sizes_gib.len() * o.dirty_pages.len()
    } else {
        0
    };
    progress.start((n + fo + pr) as u64, "cells");
    let mut cells = Vec::new();
    for &t in &o.trackers {
        for &gib in &o.sizes_gib {
            for &dirty in &o.dirty_pages {
                for &e in &o.epochs_ms {
                    let name = format!("{} {gib} GiB {dirty} pages {e} ms", t.name());
                    progress.step(&name);
                    match cell(o, t, gib, dirty, e) {
                        Ok(c) => cells.push(c),
                        Err(err) => progress.note(&format!("{name}: {err}")),
                    }
                    progress.inc();
                }
            }
        }
    }
    let failover = if o.failover_runs > 0 {
        failover::run(o, progress)
    } else {
        Vec::new()
    };
    let copy_probe = if o.copy_probe {
        probe::run(o, progress)
    } else {
        Vec::new()
    };
    progress.finish();
    if let Some(path) = &o.plot {
        plot(path, &cells)?;
    }
    Ok(ReplicateReport {
        pvm_host: kvm_dirty::is_pvm_host(),
        cells,
        failover,
        copy_probe,
        plot: o.plot.clone(),
    })
}

/// Pause (median) versus guest size, a line per tracker and dirty set up to 1024 pages (the
/// larger sets' pause is the copy of their pages and would flatten the others), at the
/// shortest epoch measured.
fn plot(path: &std::path::Path, cells: &[ReplicateCell]) -> Result<()> {
    let Some(epoch) = cells.iter().map(|c| c.epoch_ms).min() else {
        return Err(BenchError::Plot("no cell to plot".into()));
    };
    let mut keys: Vec<(String, u64)> = Vec::new();
    for c in cells
        .iter()
        .filter(|c| c.epoch_ms == epoch && c.dirty_target <= 1024)
    {
        if !keys.contains(&(c.tracker.clone(), c.dirty_target)) {
            keys.push((c.tracker.clone(), c.dirty_target));
        }
    }
    let series: Vec<Series> = keys
        .iter()
        .map(|(t, d)| Series {
            name: format!("{t}, {d} pages"),
            points: cells
                .iter()
                .filter(|c| c.epoch_ms == epoch && &c.tracker == t && c.dirty_target == *d)
                .map(|c| (c.size_gib as f64, c.pause_us.0 as f64 / 1e3))
                .collect(),
        })
        .collect();
    line_plot_log_x(
        path,
        &format!(
            "pause per checkpoint, {epoch} ms epochs ({})",
            if kvm_dirty::is_pvm_host() {
                "PVM host"
            } else {
                "KVM host"
            }
        ),
        "guest memory (GiB)",
        "median pause (ms)",
        &series,
    )
}

impl ReplicateReport {
    /// The tables (cells, failover, copy probe) and the plot's path.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "host KVM: {}\n\n",
            if self.pvm_host {
                "PVM (kvm_pvm, nested, shadow paging)"
            } else {
                "not PVM"
            }
        );
        s.push_str(&to_markdown(&self.cells));
        if !self.failover.is_empty() {
            s.push('\n');
            s.push_str(&failover::to_markdown(&self.failover));
        }
        if !self.copy_probe.is_empty() {
            s.push('\n');
            s.push_str(&probe::to_markdown(&self.copy_probe));
        }
        if let Some(p) = &self.plot {
            s.push_str(&format!("\nplot: {}\n", p.display()));
        }
        s
    }
}

/// The cells' table.
pub fn to_markdown(cells: &[ReplicateCell]) -> String {
    let ms = |us: u64| format!("{:.3}", us as f64 / 1e3);
    let mut s = String::from(
        "| tracker | GiB | dirty/epoch | epoch ms | pages | in pause | pause med ms | pause p99 ms | park | collect | copy | state | latency med ms | latency p99 ms | KiB/checkpoint | stalls | progress % |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cells {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {:.1} |\n",
            c.tracker,
            c.size_gib,
            c.dirty_target,
            c.epoch_ms,
            c.pages,
            c.pause_pages,
            ms(c.pause_us.0),
            ms(c.pause_us.1),
            ms(c.split_us.0),
            ms(c.split_us.1),
            ms(c.split_us.2),
            ms(c.split_us.3),
            ms(c.latency_us.0),
            ms(c.latency_us.1),
            c.bytes as f64 / 1024.0,
            c.stalls,
            c.progress_pct
        ));
    }
    s
}
