//! `ringvisor bench replicate`: the cost of continuous replication per checkpoint, per
//! tracker, guest size, dirty set and epoch. Each cell runs in this process on real KVM: a
//! sparse workload guest dirtying about the given pages per epoch, the engine's real primary
//! loop, and a real standby (`run_standby`: the stream is decoded and every checkpoint
//! verified) on loopback TCP whose image discards the pages, so the numbers are the primary's
//! pause and the protocol's latency, not the standby's memory writes.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use kvm_dirty::TrackerMode;
use migration_engine::replicate::{
    replicate, run_standby, CheckpointStats, PrimaryOptions, ReplicaControl, ReplicaImage,
    ReplicationStatus, StandbyOptions,
};
use serde::Serialize;
use vmm::{Pattern, RegionSpec, Tracking, Vm, VmConfig};

use crate::error::{BenchError, Result};
use crate::Progress;

const DATA_GPA: u64 = 1 << 32;

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
    /// Measured checkpoints per cell (after 3 warm-up checkpoints).
    pub checkpoints: u64,
    /// Dirty ring entries per vCPU.
    pub ring_entries: u32,
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

fn med_p99(mut v: Vec<u64>) -> (u64, u64) {
    if v.is_empty() {
        return (0, 0);
    }
    v.sort_unstable();
    let p99 = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
    (v[v.len() / 2], v[p99])
}

fn tracking(t: TrackerMode, entries: u32) -> Tracking {
    match t {
        TrackerMode::Ring => Tracking::Ring { entries },
        TrackerMode::Bitmap => Tracking::Bitmap,
        TrackerMode::ClearLog => Tracking::ClearLog,
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        what: what.to_string(),
        source,
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
    let vm_err = |e: vmm::VmmError| BenchError::Invalid(format!("guest: {e}"));
    let mut vm = Vm::create(&VmConfig {
        vcpus: 2,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes: gib << 30,
            log_dirty: true,
        }],
        tracking: tracking(t, o.ring_entries),
    })
    .map_err(vm_err)?;
    let ws = (dirty * 16).clamp(64, (gib << 30) / 4096);
    let rate = (dirty * 1000 / epoch_ms.max(1)).max(1);
    vm.set_split_workload(DATA_GPA, ws, Pattern::Random, rate, 2)
        .map_err(vm_err)?;
    vm.start(None).map_err(vm_err)?;
    std::thread::sleep(Duration::from_millis(300));
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding the standby"))?;
    let addr = l.local_addr().map_err(io("standby address"))?;
    let standby = std::thread::spawn(move || -> Option<u64> {
        let (s, _) = l.accept().ok()?;
        let mut make = |_: &migration::wire::Hello, _: &migration::wire::MemoryLayout| Ok(Discard);
        run_standby(s, &StandbyOptions::default(), &mut make, &mut |_| {})
            .ok()
            .map(|(_, r)| r.applied)
    });
    let opts = PrimaryOptions {
        checkpoint_delay: Duration::from_millis(epoch_ms),
        max_checkpoints: Some(o.checkpoints + 3),
        ..PrimaryOptions::default()
    };
    let ctl = ReplicaControl::new();
    let stream = TcpStream::connect(addr).map_err(io("connecting to the standby"))?;
    let sum = replicate(&vm, stream, &opts, &ctl, None);
    let applied = standby.join().ok().flatten();
    let _ = vm.stop();
    if sum.info.status != ReplicationStatus::Stopped || applied != Some(o.checkpoints + 3) {
        return Err(BenchError::Invalid(format!(
            "replication did not complete: {:?} {:?}, standby applied {applied:?}",
            sum.info.status, sum.info.reason
        )));
    }
    let cps: Vec<&CheckpointStats> = sum.checkpoints.iter().skip(3).collect();
    let col = |f: fn(&CheckpointStats) -> u64| cps.iter().map(|c| f(c)).collect::<Vec<u64>>();
    Ok(ReplicateCell {
        tracker: t.name().to_string(),
        size_gib: gib,
        dirty_target: dirty,
        epoch_ms,
        checkpoints: cps.len(),
        pages: med_p99(col(|c| c.pages)).0,
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
    })
}

/// Runs every cell; a cell that fails is reported through `progress` and left out.
pub fn run(o: &ReplicateOpts, progress: &mut dyn Progress) -> Result<Vec<ReplicateCell>> {
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
    let n = o.trackers.len() * o.sizes_gib.len() * o.dirty_pages.len() * o.epochs_ms.len();
    progress.start(n as u64, "cells");
    let mut out = Vec::new();
    for &t in &o.trackers {
        for &gib in &o.sizes_gib {
            for &dirty in &o.dirty_pages {
                for &e in &o.epochs_ms {
                    progress.step(&format!("{} {gib} GiB {dirty} pages {e} ms", t.name()));
                    match cell(o, t, gib, dirty, e) {
                        Ok(c) => out.push(c),
                        Err(err) => progress.note(&format!(
                            "{} {gib} GiB {dirty} pages {e} ms: {err}",
                            t.name()
                        )),
                    }
                    progress.inc();
                }
            }
        }
    }
    progress.finish();
    Ok(out)
}

/// The table.
pub fn to_markdown(cells: &[ReplicateCell]) -> String {
    let ms = |us: u64| format!("{:.3}", us as f64 / 1e3);
    let mut s = String::from(
        "| tracker | GiB | dirty/epoch | epoch ms | pages | pause med ms | pause p99 ms | park | collect | copy | state | latency med ms | latency p99 ms | KiB/checkpoint | stalls |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cells {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |\n",
            c.tracker,
            c.size_gib,
            c.dirty_target,
            c.epoch_ms,
            c.pages,
            ms(c.pause_us.0),
            ms(c.pause_us.1),
            ms(c.split_us.0),
            ms(c.split_us.1),
            ms(c.split_us.2),
            ms(c.split_us.3),
            ms(c.latency_us.0),
            ms(c.latency_us.1),
            c.bytes as f64 / 1024.0,
            c.stalls
        ));
    }
    s
}
