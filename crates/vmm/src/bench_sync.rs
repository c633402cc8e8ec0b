//! Sync cost versus guest size: one full collect + re-protect cycle per tracking mode, with a
//! fixed set of dirty pages spread evenly over a sparse slot of growing size.
//!
//! Per measurement: the guest sweeps its page set once (every page written since the previous
//! collect), stops at its sync point, and the host times `DirtyTracker::collect` (GET, or
//! GET + CLEAR, or ring harvest + `KVM_RESET_DIRTY_RINGS`). The guest is stopped while the
//! collect runs, so only the host-side cost is measured.
//!
//! Next to it, in the same VM and run, alternating with the tracker's collects (so both see
//! the same guest and the same dirty pages), the *raw* kernel sequence is timed: ring: read
//! the entries into a preallocated page list and one `KVM_RESET_DIRTY_RINGS`
//! ([`RingSet::harvest_bare`]: the consumer loop alone, no timers or overrun checks); bitmap: `KVM_GET_DIRTY_LOG` per slot and a scan of
//! the words into the page list; clear-log: the same plus `KVM_CLEAR_DIRTY_LOG` of what the
//! GET returned. The raw column is what any VMM must pay; the difference is the tracker's own.

use std::time::{Duration, Instant};

use kvm_dirty::{bitmap, DirtyPageSet, RingSet, SlotSpec, TrackerMode, PAGE_SIZE};
use kvm_ioctls::VmFd;

use crate::error::{Result, VmmError};
use crate::guest::{Pattern, VcpuCtrl};
use crate::memory::{RamBacking, RegionSpec};
use crate::vm::{Tracking, Vm, VmConfig};

/// Data slot GPA.
const GPA: u64 = 1 << 32;

/// Benchmark parameters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncBenchParams {
    /// Slot sizes in GiB.
    pub sizes_gib: Vec<u64>,
    /// Dirty pages per cycle.
    pub dirty_pages: u64,
    /// Measured cycles per cell (the median is reported).
    pub runs: usize,
    /// Ring entries per vCPU.
    pub ring_entries: u32,
}

impl Default for SyncBenchParams {
    fn default() -> Self {
        SyncBenchParams {
            sizes_gib: vec![1, 4, 16, 64],
            dirty_pages: 4096,
            runs: 9,
            ring_entries: 65536,
        }
    }
}

/// One (size, mode) cell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncCell {
    /// Slot size in GiB.
    pub size_gib: u64,
    /// Mode name.
    pub mode: &'static str,
    /// Median collect + re-protect time, microseconds.
    pub median_us: f64,
    /// Median of the raw kernel sequence (see the module docs), microseconds.
    pub raw_median_us: f64,
    /// Pages the raw sequence listed (median run; equals `pages` when both see the same set).
    pub raw_pages: u64,
    /// Fastest, microseconds.
    pub min_us: f64,
    /// Slowest, microseconds.
    pub max_us: f64,
    /// Dirty pages reported in the data slot per cycle (median run).
    pub pages: u64,
    /// Ring only: median harvest cost per entry, ns.
    pub harvest_ns_per_entry: Option<f64>,
    /// Ring only: median `KVM_RESET_DIRTY_RINGS` cost per entry, ns.
    pub reset_ns_per_entry: Option<f64>,
    /// Ring only: median of the collect's time outside its harvest and reset (marking the
    /// pages in the caller's set, merging staged pages, draining the VMM write log, the lock),
    /// microseconds: ringvisor's own work beyond the kernel sequence.
    pub own_us: Option<f64>,
}

/// The whole benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncBenchReport {
    /// Parameters.
    pub params: SyncBenchParams,
    /// Whether the host KVM is PVM.
    pub pvm_host: bool,
    /// Cells in (size, mode) order.
    pub cells: Vec<SyncCell>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn wait_writes(vm: &Vm, target: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while vm.nr_writes(0)? < target {
        vm.vcpus()?.check()?;
        if Instant::now() > deadline {
            return Err(VmmError::VcpuFailed {
                vcpu: 0,
                what: "guest made no progress for 120 s".into(),
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// The raw kernel sequence of one mode: what it lists goes to `list` (cleared first).
struct Raw<'a> {
    mode: TrackerMode,
    vm: &'a VmFd,
    ring: Option<&'a RingSet>,
    slots: Vec<SlotSpec>,
    buf: Vec<u64>,
    list: Vec<u64>,
}

impl<'a> Raw<'a> {
    fn new(vm: &'a Vm, mode: TrackerMode, max_pages: u64) -> Self {
        let slots: Vec<SlotSpec> = vm
            .ram()
            .slot_specs()
            .into_iter()
            .filter(|s| s.log_dirty)
            .collect();
        let words = slots.iter().map(|s| s.bitmap_words()).max().unwrap_or(0);
        Raw {
            mode,
            vm: vm.fd(),
            ring: vm.ring_set().map(|r| &**r),
            slots,
            buf: vec![0; words],
            list: Vec::with_capacity(max_pages as usize),
        }
    }

    /// One raw collect; returns the pages listed.
    fn collect(&mut self) -> Result<u64> {
        self.list.clear();
        let list = &mut self.list;
        if let (TrackerMode::Ring, Some(rs)) = (self.mode, self.ring) {
            rs.harvest_bare(list)?;
            return Ok(list.len() as u64);
        }
        for s in &self.slots {
            let words = s.bitmap_words();
            bitmap::get_dirty_log(self.vm, s, &mut self.buf)?;
            if self.mode == TrackerMode::ClearLog {
                bitmap::clear_dirty_log(self.vm, s, &self.buf[..words])?;
            }
            let tag = u64::from(s.id.0) << 48;
            for (wi, &w) in self.buf[..words].iter().enumerate() {
                let mut m = w;
                while m != 0 {
                    list.push(tag | (wi as u64 * 64 + u64::from(m.trailing_zeros())));
                    m &= m - 1;
                }
            }
        }
        Ok(list.len() as u64)
    }
}

/// Lets the guest sweep its page set once more (every page dirty again), then parks it.
fn sweep(vm: &Vm, pages: u64, park: Duration) -> Result<()> {
    let start = vm.nr_writes(0)?;
    vm.set_stop(false)?;
    vm.vcpus()?.resume_all();
    wait_writes(vm, start + pages + 1)?;
    vm.set_stop(true)?;
    vm.vcpus()?.wait_all_synced(park)?;
    Ok(())
}

/// Measures one cell. `tick` is called after every measured run.
pub fn measure(
    p: &SyncBenchParams,
    size_gib: u64,
    mode: TrackerMode,
    mut tick: impl FnMut(),
) -> Result<SyncCell> {
    let bytes = size_gib << 30;
    let pages = bytes / PAGE_SIZE;
    if p.dirty_pages == 0 || p.dirty_pages > pages || p.runs == 0 {
        return Err(VmmError::Config(format!(
            "dirty pages must be in 1..={pages} and runs > 0"
        )));
    }
    let tracking = match mode {
        TrackerMode::Ring => Tracking::Ring {
            entries: p.ring_entries,
        },
        TrackerMode::Bitmap => Tracking::Bitmap,
        TrackerMode::ClearLog => Tracking::ClearLog,
    };
    // 4 KiB backing: the dirty pages are spread sparsely on purpose, and huge pages would
    // populate 2 MiB of host memory for each of them.
    let mut vm = Vm::create_with_backing(
        &VmConfig {
            vcpus: 1,
            memory: vec![RegionSpec {
                slot: 1,
                gpa: GPA,
                bytes,
                log_dirty: true,
            }],
            tracking,
        },
        RamBacking::Small,
    )?;
    vm.set_workload(
        0,
        &VcpuCtrl {
            base: GPA,
            pages: p.dirty_pages,
            stride: pages / p.dirty_pages,
            pattern: Pattern::Sequential,
            unique_values: true,
            burst_pages: 0,
            burst_tsc: 0,
            sleep_min_tsc: 0,
        },
    )?;
    let specs = vm.ram().slot_specs();
    let mut set = DirtyPageSet::new(&specs);
    let mut tracker = vm.tracker()?;
    tracker.start()?;
    vm.start(None)?;
    let park = Duration::from_secs(60);
    // Warm-up: touch every page twice (first touch is expensive on this host), then discard.
    wait_writes(&vm, 2 * p.dirty_pages)?;
    vm.set_stop(true)?;
    vm.vcpus()?.wait_all_synced(park)?;
    tracker.collect(&mut set)?;
    let (mut us, mut h, mut r, mut counts) = (vec![], vec![], vec![], vec![]);
    let mut own = vec![];
    let (mut raw_us, mut raw_counts) = (vec![], vec![]);
    let mut raw = Raw::new(&vm, mode, p.dirty_pages + 64);
    for run in 0..p.runs {
        // Each side after its own full sweep, in an order that alternates from run to run:
        // the second collect of a pair is systematically slower (the raw sequence timed in
        // both places: +0.6-0.9 us of 3-5 us at 64 pages), so a fixed order favours one side.
        for raw_side in [run % 2 == 0, run % 2 == 1] {
            if raw_side {
                sweep(&vm, p.dirty_pages, park)?;
                let t = Instant::now();
                let n = raw.collect()?;
                raw_us.push(t.elapsed().as_secs_f64() * 1e6);
                raw_counts.push(n);
                if let Some(rs) = vm.ring_set() {
                    // Pages the ring-full handler staged during the raw sweep are not the
                    // tracker's.
                    rs.discard()?;
                }
                continue;
            }
            set.clear();
            sweep(&vm, p.dirty_pages, park)?;
            let t = Instant::now();
            let st = tracker.collect(&mut set)?;
            let dt = t.elapsed();
            us.push(dt.as_secs_f64() * 1e6);
            counts.push(set.count());
            if st.ring_entries > 0 {
                h.push(st.harvest_ns as f64 / st.ring_entries as f64);
                r.push(st.reset_ns as f64 / st.ring_entries as f64);
                own.push((dt.as_nanos() as f64 - (st.harvest_ns + st.reset_ns) as f64) / 1e3);
            }
        }
        tick();
    }
    drop(raw);
    vm.stop()?;
    let min = us.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = us.iter().cloned().fold(0.0, f64::max);
    counts.sort_unstable();
    raw_counts.sort_unstable();
    Ok(SyncCell {
        size_gib,
        mode: mode.name(),
        median_us: median(&mut us),
        raw_median_us: median(&mut raw_us),
        raw_pages: raw_counts[raw_counts.len() / 2],
        min_us: min,
        max_us: max,
        pages: counts[counts.len() / 2],
        harvest_ns_per_entry: (!h.is_empty()).then(|| median(&mut h)),
        reset_ns_per_entry: (!r.is_empty()).then(|| median(&mut r)),
        own_us: (!own.is_empty()).then(|| median(&mut own)),
    })
}

/// Runs every (size, mode) cell.
pub fn run(p: &SyncBenchParams, mut tick: impl FnMut()) -> Result<SyncBenchReport> {
    let mut cells = Vec::new();
    for &s in &p.sizes_gib {
        for m in [
            TrackerMode::Bitmap,
            TrackerMode::ClearLog,
            TrackerMode::Ring,
        ] {
            cells.push(measure(p, s, m, &mut tick)?);
        }
    }
    Ok(SyncBenchReport {
        params: p.clone(),
        pvm_host: kvm_dirty::is_pvm_host(),
        cells,
    })
}

impl SyncBenchReport {
    fn cell(&self, size: u64, mode: &str) -> Option<&SyncCell> {
        self.cells
            .iter()
            .find(|c| c.size_gib == size && c.mode == mode)
    }

    /// A markdown table, one row per size, each mode as raw kernel sequence / ringvisor's
    /// tracker / their ratio, then the ring's per-entry costs. When the ring is smaller than
    /// the dirty set, ring-full exits harvest most entries during the sweep (staged, merged by
    /// the collect) and the raw sequence sees only the rest: "raw ring pages" shows it.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from(
            "| guest memory | raw bitmap | bitmap | x | raw clear-log | clear-log | x | raw ring | ring | x | bitmap / ring | ring harvest ns/entry | ring reset ns/entry | ring own us | dirty pages | raw ring pages |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for &g in &self.params.sizes_gib {
            let (Some(b), Some(c), Some(r)) = (
                self.cell(g, "bitmap"),
                self.cell(g, "clear-log"),
                self.cell(g, "ring"),
            ) else {
                continue;
            };
            s.push_str(&format!("| {g} GiB "));
            for x in [b, c, r] {
                s.push_str(&format!(
                    "| {:.1} us | {:.1} us | {:.2} ",
                    x.raw_median_us,
                    x.median_us,
                    x.median_us / x.raw_median_us
                ));
            }
            s.push_str(&format!(
                "| {:.2}x | {:.0} | {:.0} | {:.1} | {} | {} |\n",
                b.median_us / r.median_us,
                r.harvest_ns_per_entry.unwrap_or(0.0),
                r.reset_ns_per_entry.unwrap_or(0.0),
                r.own_us.unwrap_or(0.0),
                r.pages,
                r.raw_pages
            ));
        }
        s
    }
}

/// Time for a 1-vCPU guest to first-touch `mib` MiB (one write per 4 KiB page, ascending) of
/// fresh guest RAM backed as `backing`, with dirty logging off (as from boot): the host's
/// page-fault cost that transparent huge pages cut. Seconds, from the vCPU's start to the
/// last page's write.
pub fn first_touch(mib: u64, backing: RamBacking) -> Result<f64> {
    let pages = (mib << 20) / PAGE_SIZE;
    if pages == 0 {
        return Err(VmmError::Config(
            "first-touch size must be at least 1 MiB".into(),
        ));
    }
    let mut vm = Vm::create_with_backing(
        &VmConfig {
            vcpus: 1,
            memory: vec![RegionSpec {
                slot: 1,
                gpa: GPA,
                bytes: pages * PAGE_SIZE,
                log_dirty: true,
            }],
            tracking: Tracking::Bitmap,
        },
        backing,
    )?;
    vm.set_workload(
        0,
        &VcpuCtrl {
            base: GPA,
            pages,
            stride: 1,
            pattern: Pattern::Sequential,
            unique_values: true,
            burst_pages: 0,
            burst_tsc: 0,
            sleep_min_tsc: 0,
        },
    )?;
    let t = Instant::now();
    vm.start(None)?;
    wait_writes(&vm, pages)?;
    let dt = t.elapsed().as_secs_f64();
    vm.stop()?;
    Ok(dt)
}
