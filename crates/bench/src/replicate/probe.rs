//! The copy probe: why copying a checkpoint's dirty pages costs what it costs inside the
//! pause. The benchmark's guest (ring tracker) runs an epoch; in the pause its dirty pages
//! are collected and copied several ways, each timed per page:
//!
//! - `raw first`: a plain read of each guest page into a reused buffer faulted in beforehand
//!   (the first host read of pages the guest just wrote);
//! - `engine first`: the primary's own path (`CheckpointBuf::push_page_with` and
//!   `MigratableVm::read_page`, the zero-page check included);
//! - `second`: the same pages read again right after (whichever path went first), so cache
//!   and TLB are warm;
//! - `memcpy`: the buffer copied to a second faulted-in buffer (no guest memory at all).
//!
//! Rounds alternate which path reads first. The minor page faults this thread took during
//! the first read (from `/proc/thread-self/stat`) tell whether the host faults on it.

use std::time::{Duration, Instant};

use kvm_dirty::{DirtyPageSet, TrackerMode, PAGE_SIZE};
use migration::wire::replica::CheckpointBuf;
use migration_engine::seam::MigratableVm;
use serde::Serialize;

use super::{guest, median_f, vm_err, ReplicateOpts};
use crate::error::{BenchError, Result};
use crate::Progress;

/// One guest size and dirty set: medians over the rounds, µs per page.
#[derive(Debug, Clone, Serialize)]
pub struct CopyProbeRow {
    /// Guest size, GiB.
    pub size_gib: u64,
    /// Target dirty pages per epoch.
    pub dirty_target: u64,
    /// Epoch, ms.
    pub epoch_ms: u64,
    /// Rounds measured.
    pub rounds: usize,
    /// Dirty pages per round (median).
    pub pages: u64,
    /// First read of the guest's pages into a faulted-in buffer.
    pub raw_first_us: f64,
    /// The engine's path, reading first.
    pub engine_first_us: f64,
    /// A second read of the same pages (after either path).
    pub second_us: f64,
    /// The engine's path reading the pages a second time.
    pub engine_second_us: f64,
    /// Buffer to buffer.
    pub memcpy_us: f64,
    /// Minor faults per page during the first read.
    pub faults_per_page: f64,
}

/// This thread's minor faults so far (`/proc/thread-self/stat`, field 10).
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

/// A buffer of `pages` pages, every page written once so none faults later.
fn faulted(pages: usize) -> Vec<u8> {
    let mut b = vec![0u8; pages * PAGE_SIZE as usize];
    for p in b.chunks_mut(PAGE_SIZE as usize) {
        p[0] = 1;
    }
    b
}

#[derive(Default)]
struct Samples {
    pages: Vec<u64>,
    raw_first: Vec<f64>,
    engine_first: Vec<f64>,
    second: Vec<f64>,
    engine_second: Vec<f64>,
    memcpy: Vec<f64>,
    faults: Vec<f64>,
}

fn per_page(t: Instant, n: usize) -> f64 {
    t.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64
}

/// Reads `gpas` into `buf`, page after page.
fn raw_read(vm: &vmm::Vm, gpas: &[u64], buf: &mut [u8]) -> Result<()> {
    for (gpa, page) in gpas.iter().zip(buf.chunks_mut(PAGE_SIZE as usize)) {
        vm.read_page(*gpa, page)
            .map_err(|e| BenchError::Invalid(format!("reading {gpa:#x}: {e}")))?;
    }
    Ok(())
}

fn engine_copy(vm: &vmm::Vm, gpas: &[u64], cp: &mut CheckpointBuf, epoch: u64) -> Result<()> {
    cp.reset(epoch);
    for &gpa in gpas {
        cp.push_page_with(gpa, |b| vm.read_page(gpa, b))
            .map_err(|e| BenchError::Invalid(format!("reading {gpa:#x}: {e}")))?;
    }
    Ok(())
}

/// One guest size and dirty set.
fn row(o: &ReplicateOpts, gib: u64, dirty: u64, epoch_ms: u64) -> Result<CopyProbeRow> {
    let mut vm = guest(TrackerMode::Ring, o.ring_entries, gib, dirty, epoch_ms)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut tracker = vm.tracker().map_err(vm_err)?;
    let trk = |e: kvm_dirty::DirtyError| BenchError::Invalid(format!("tracker: {e}"));
    tracker.start().map_err(trk)?;
    let mut set = DirtyPageSet::new(&MigratableVm::slots(&vm));
    let cap = (dirty as usize * 4).max(4096);
    let (mut a, mut b) = (faulted(cap), faulted(cap));
    let mut cp = CheckpointBuf::with_capacity(cap);
    let mut gpas: Vec<u64> = Vec::with_capacity(cap);
    let mut s = Samples::default();
    let rounds = o.checkpoints + super::WARMUP;
    let mut out = Ok(());
    for r in 0..rounds {
        std::thread::sleep(Duration::from_millis(epoch_ms));
        let paused = MigratableVm::pause(&vm, Duration::from_secs(10));
        if let Err(e) = paused {
            out = Err(BenchError::Invalid(format!("pause: {e}")));
            break;
        }
        let res = (|| -> Result<()> {
            tracker.collect(&mut set).map_err(trk)?;
            gpas.clear();
            gpas.extend(set.iter_gpa().take(cap));
            set.clear();
            let n = gpas.len();
            let f0 = minor_faults();
            let t = Instant::now();
            let (first, second) = if r % 2 == 0 {
                raw_read(&vm, &gpas, &mut a)?;
                let first = per_page(t, n);
                let t = Instant::now();
                engine_copy(&vm, &gpas, &mut cp, r)?;
                (first, per_page(t, n))
            } else {
                engine_copy(&vm, &gpas, &mut cp, r)?;
                let first = per_page(t, n);
                let t = Instant::now();
                raw_read(&vm, &gpas, &mut a)?;
                (first, per_page(t, n))
            };
            let faults = (minor_faults() - f0) as f64 / n.max(1) as f64;
            let t = Instant::now();
            b[..n * PAGE_SIZE as usize].copy_from_slice(&a[..n * PAGE_SIZE as usize]);
            let memcpy = per_page(t, n);
            if r >= super::WARMUP && n > 0 {
                s.pages.push(n as u64);
                if r % 2 == 0 {
                    s.raw_first.push(first);
                    s.engine_second.push(second);
                } else {
                    s.engine_first.push(first);
                    s.second.push(second);
                }
                s.memcpy.push(memcpy);
                s.faults.push(faults);
            }
            Ok(())
        })();
        MigratableVm::resume(&vm);
        if let Err(e) = res {
            out = Err(e);
            break;
        }
    }
    let _ = tracker.stop();
    let _ = vm.stop();
    out?;
    std::hint::black_box(&b);
    Ok(CopyProbeRow {
        size_gib: gib,
        dirty_target: dirty,
        epoch_ms,
        rounds: s.pages.len(),
        pages: super::med_p99(s.pages).0,
        raw_first_us: median_f(s.raw_first),
        engine_first_us: median_f(s.engine_first),
        second_us: median_f(s.second),
        engine_second_us: median_f(s.engine_second),
        memcpy_us: median_f(s.memcpy),
        faults_per_page: median_f(s.faults),
    })
}

/// The probe's rows: the ring tracker, every guest size and dirty set, the shortest epoch.
pub fn run(o: &ReplicateOpts, progress: &mut dyn Progress) -> Vec<CopyProbeRow> {
    let epoch = o.epochs_ms.iter().copied().min().unwrap_or(10);
    let mut rows = Vec::new();
    for &gib in &o.sizes_gib {
        for &dirty in &o.dirty_pages {
            progress.step(&format!("copy probe {gib} GiB {dirty} pages"));
            match row(o, gib, dirty, epoch) {
                Ok(r) => rows.push(r),
                Err(e) => progress.note(&format!("copy probe {gib} GiB {dirty} pages: {e}")),
            }
            progress.inc();
        }
    }
    rows
}

/// The probe's table.
pub fn to_markdown(rows: &[CopyProbeRow]) -> String {
    let mut s = String::from(
        "copy probe (ring; us per page, medians; first = the first host read of pages the guest just wrote, second = the same pages again)\n\n| GiB | dirty/epoch | epoch ms | rounds | pages | raw first | engine first | raw second | engine second | memcpy | minor faults/page |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |\n",
            r.size_gib,
            r.dirty_target,
            r.epoch_ms,
            r.rounds,
            r.pages,
            r.raw_first_us,
            r.engine_first_us,
            r.second_us,
            r.engine_second_us,
            r.memcpy_us,
            r.faults_per_page
        ));
    }
    s
}
