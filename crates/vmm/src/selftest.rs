//! A port of the kernel's `dirty_log_test` (tools/testing/selftests/kvm/dirty_log_test.c) to
//! this VMM, over the [`kvm_dirty::DirtyTracker`] API that migration uses.
//!
//! Each iteration: set the iteration number, release the vCPUs, collect once at a random tick
//! while the guest runs (ring mode: also on later ticks after ring-full exits), stop the vCPUs
//! at their guest sync point, collect again, and verify every page of the test slot:
//! 1. a reported page holds the current iteration (no exception: the kernel's test allows
//!    a 0 in clear-log's first iteration because of `INITIALLY_SET`, but our clear-log
//!    tracker discards the initial set in `start`);
//! 2. an unreported page holds a value strictly below the iteration (no page missed);
//! 3. ring mode: every reset count equals the harvested count (the ring set checks this on
//!    every reset and fails the collect otherwise);
//! 4. ring mode: every ring entry names a tracked slot and an in-range offset;
//! 5. at least 256 guest writes per iteration.
//!
//! With `force_ring_full` (ring mode) the host does not collect while the guest runs and every
//! vCPU must take a ring-full exit before the iteration ends, so the ring-full path (harvest
//! and reset on the vCPU thread) is exercised by construction, then verified like the rest.
//!
//! The kernel's test allows two more ring-mode exceptions (the last entry before a ring-full
//! stop, and the previous iteration's last page) because its vCPUs can stop at a ring-full
//! exit in the middle of a write. Here vCPUs handle ring-full exits themselves and stop only at
//! the guest's sync point, where every write has retired, so those exceptions are not needed
//! and not allowed: this port is stricter.

use std::time::{Duration, Instant};

use kvm_dirty::{DirtyPageSet, TrackerMode, PAGE_SIZE};
use rand::{Rng, SeedableRng};

use crate::error::{Result, VmmError};
use crate::guest::{Pattern, VcpuCtrl};
use crate::memory::RegionSpec;
use crate::vm::{Tracking, Vm, VmConfig};

/// Test slot GPA (slot 1).
pub const TEST_GPA: u64 = 1 << 32;
/// Minimum guest writes per iteration.
pub const MIN_WRITES: u64 = 256;

/// Parameters (defaults as the kernel's test).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelftestParams {
    /// Tracking mode.
    #[serde(serialize_with = "ser_mode")]
    pub mode: TrackerMode,
    /// Iterations (default 32).
    pub iterations: u32,
    /// Host loop interval in ms (default 10).
    pub interval_ms: u64,
    /// Test slot size in pages (default 1 GiB + 3 pages).
    pub slot_pages: u64,
    /// Entries per vCPU ring (default 65536).
    pub ring_entries: u32,
    /// vCPUs (default 1).
    pub vcpus: usize,
    /// RNG seed for the collect points.
    pub seed: u64,
    /// Ring mode: no collect while the guest runs, and each iteration lasts until every vCPU
    /// has taken a ring-full exit. Needs more test-slot pages than all rings hold together,
    /// so the guest's random writes fill the rings by construction, however fast the host.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub force_ring_full: bool,
}

fn ser_mode<S: serde::Serializer>(m: &TrackerMode, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(m.name())
}

impl Default for SelftestParams {
    fn default() -> Self {
        SelftestParams {
            mode: TrackerMode::Ring,
            iterations: 32,
            interval_ms: 10,
            slot_pages: (1 << 18) + 3,
            ring_entries: 65536,
            vcpus: 1,
            seed: 0x5eed,
            force_ring_full: false,
        }
    }
}

/// Counts of one iteration.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IterationReport {
    /// Iteration number (1-based).
    pub iteration: u64,
    /// Test-slot pages reported dirty.
    pub dirty: u64,
    /// Test-slot pages not reported.
    pub clean: u64,
    /// Guest writes.
    pub writes: u64,
    /// Ring-full exits (all vCPUs).
    pub ring_full_exits: u64,
    /// Ring entries harvested by collects (ring mode).
    pub ring_entries: u64,
    /// Collects done while the guest ran.
    pub collects_running: u64,
}

/// Result of one mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SelftestReport {
    /// Mode name.
    pub mode: &'static str,
    /// Parameters.
    pub params: SelftestParams,
    /// Per-iteration counts.
    pub iterations: Vec<IterationReport>,
    /// The first invariant violation, if any.
    pub failure: Option<String>,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl SelftestReport {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
    /// Sums over iterations.
    pub fn totals(&self) -> IterationReport {
        let mut t = IterationReport::default();
        for i in &self.iterations {
            t.dirty += i.dirty;
            t.clean += i.clean;
            t.writes += i.writes;
            t.ring_full_exits += i.ring_full_exits;
            t.ring_entries += i.ring_entries;
            t.collects_running += i.collects_running;
        }
        t.iteration = self.iterations.len() as u64;
        t
    }
}

fn tracking(p: &SelftestParams) -> Tracking {
    match p.mode {
        TrackerMode::Ring => Tracking::Ring {
            entries: p.ring_entries,
        },
        TrackerMode::Bitmap => Tracking::Bitmap,
        TrackerMode::ClearLog => Tracking::ClearLog,
    }
}

/// Runs the test in one mode. `on_iter` sees each iteration's counts as it completes.
/// Setup failures are errors; invariant violations end the run with `failure` set.
pub fn run(
    p: &SelftestParams,
    mut on_iter: impl FnMut(&IterationReport),
) -> Result<SelftestReport> {
    if p.iterations == 0 || p.slot_pages == 0 || p.interval_ms == 0 {
        return Err(VmmError::Config(
            "iterations, interval and slot size must be > 0".into(),
        ));
    }
    let force_full = p.force_ring_full && p.mode == TrackerMode::Ring;
    if force_full && p.slot_pages <= u64::from(p.ring_entries) * p.vcpus as u64 {
        return Err(VmmError::Config(format!(
            "forcing ring-full exits needs more than {} x {} test pages",
            p.ring_entries, p.vcpus
        )));
    }
    let t0 = Instant::now();
    let slot = RegionSpec {
        slot: 1,
        gpa: TEST_GPA,
        bytes: p.slot_pages * PAGE_SIZE,
        log_dirty: true,
    };
    let mut vm = Vm::create(&VmConfig {
        vcpus: p.vcpus,
        memory: vec![slot],
        tracking: tracking(p),
    })?;
    for i in 0..p.vcpus {
        vm.set_workload(
            i,
            &VcpuCtrl {
                base: TEST_GPA,
                pages: p.slot_pages,
                stride: 1,
                pattern: Pattern::Random,
                unique_values: false,
                burst_pages: 0,
                burst_tsc: 0,
                sleep_min_tsc: 0,
            },
        )?;
    }
    let specs = vm.ram().slot_specs();
    let test_idx = specs
        .iter()
        .position(|s| s.id.0 == 1)
        .expect("test slot exists");
    let mut bmap = [DirtyPageSet::new(&specs), DirtyPageSet::new(&specs)];
    let mut tracker = vm.tracker()?;
    tracker.start()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let mut report = SelftestReport {
        mode: p.mode.name(),
        params: p.clone(),
        iterations: Vec::new(),
        failure: None,
        seconds: 0.0,
    };
    let park_timeout = Duration::from_secs(30);
    let ring_full = |vm: &Vm| -> Vec<u64> {
        vm.vcpus()
            .map(|v| {
                v.iter()
                    .map(|c| {
                        c.counters
                            .ring_full
                            .load(std::sync::atomic::Ordering::Relaxed)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let ring_full_total = |vm: &Vm| -> u64 { ring_full(vm).iter().sum() };
    for it in 1..=u64::from(p.iterations) {
        let reap_i = rng.gen_range(0..p.interval_ms);
        vm.set_iteration(it)?;
        for i in 0..p.vcpus {
            vm.reset_nr_writes(i)?;
        }
        bmap[0].clear();
        bmap[1].clear();
        let mut rep = IterationReport {
            iteration: it,
            ..Default::default()
        };
        let rf0 = ring_full_total(&vm);
        let rf0_each = ring_full(&vm);
        if it == 1 {
            vm.start(None)?;
        } else {
            vm.vcpus()?.resume_all();
        }
        let mut i = 0u64;
        let mut seen_rf = rf0;
        loop {
            let writes: u64 = (0..p.vcpus).map(|v| vm.nr_writes(v).unwrap_or(0)).sum();
            // (Before the first start there are no vCPU threads: their counts were 0.)
            let now = ring_full(&vm);
            let filled = !force_full
                || (0..p.vcpus).all(|v| {
                    now.get(v).copied().unwrap_or(0) > rf0_each.get(v).copied().unwrap_or(0)
                });
            if i >= p.interval_ms && writes >= MIN_WRITES && filled {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            vm.vcpus()?.check()?;
            let rf = ring_full_total(&vm);
            let ring_extra = p.mode == TrackerMode::Ring && i > reap_i && rf != seen_rf;
            if !force_full && (i == reap_i || ring_extra) {
                let st = tracker.collect(&mut bmap[0])?;
                rep.ring_entries += st.ring_entries;
                rep.collects_running += 1;
                seen_rf = rf;
            }
            i += 1;
            if i > 600_000 {
                return Err(VmmError::VcpuFailed {
                    vcpu: 0,
                    what: format!(
                        "fewer than {MIN_WRITES} writes (or, forced, no ring-full exit on some vCPU) in 10 minutes"
                    ),
                });
            }
        }
        vm.set_stop(true)?;
        vm.vcpus()?.wait_all_synced(park_timeout)?;
        vm.set_stop(false)?;
        rep.writes = (0..p.vcpus).map(|v| vm.nr_writes(v).unwrap_or(0)).sum();
        let st = tracker.collect(&mut bmap[1])?;
        rep.ring_entries += st.ring_entries;
        rep.ring_full_exits = ring_full_total(&vm) - rf0;
        let failure = verify(&vm, p, it, test_idx, &bmap, &mut rep)?;
        on_iter(&rep);
        report.iterations.push(rep);
        if let Some(f) = failure {
            report.failure = Some(f);
            break;
        }
    }
    tracker.stop()?;
    vm.stop()?;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

fn verify(
    vm: &Vm,
    p: &SelftestParams,
    it: u64,
    test_idx: usize,
    bmap: &[DirtyPageSet; 2],
    rep: &mut IterationReport,
) -> Result<Option<String>> {
    if let Some(rs) = vm.ring_set() {
        if rs.bad_entries() != 0 {
            return Ok(Some(format!(
                "{} ring entries named an untracked slot or an out-of-range offset",
                rs.bad_entries()
            )));
        }
    }
    if rep.writes < MIN_WRITES {
        return Ok(Some(format!(
            "iteration {it}: only {} guest writes (< {MIN_WRITES})",
            rep.writes
        )));
    }
    let (w0, w1) = (bmap[0].words(test_idx), bmap[1].words(test_idx));
    let mut failure = None;
    for page in 0..p.slot_pages {
        let w = (page / 64) as usize;
        let bit = 1u64 << (page % 64);
        let in0 = w0[w] & bit != 0;
        let in1 = w1[w] & bit != 0;
        let val = vm.ram().read_u64(TEST_GPA + page * PAGE_SIZE)?;
        if in0 || in1 {
            rep.dirty += 1;
            if val != it && failure.is_none() {
                failure = Some(format!(
                    "iteration {it}: dirty page {page} holds {val}, expected {it} (a stale or spurious report)"
                ));
            }
        } else {
            rep.clean += 1;
            if val >= it && failure.is_none() {
                failure = Some(format!(
                    "iteration {it}: page {page} holds {val} (>= {it}) but was not reported dirty: a MISSED page"
                ));
            }
        }
    }
    Ok(failure)
}
