//! Dirty-rate measurement three ways: exactly per vCPU from the ring, per VM from the dirty
//! bitmap, and by page sampling (hash a random sample of pages at the start and the end of a
//! window, as QEMU's `calc-dirty-rate` does by default). All three count distinct pages
//! dirtied during the window.

use std::time::{Duration, Instant};

use kvm_dirty::{DirtyPageSet, TrackerMode, PAGE_SIZE};
use rand::{Rng, SeedableRng};
use vmm::Vm;

use crate::error::{MigrationError, Result};

/// How a rate was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Ring entries per vCPU (exact, per vCPU).
    Ring,
    /// `KVM_GET_DIRTY_LOG` bits (exact, per VM).
    Bitmap,
    /// Changed hashes of sampled pages (an estimate, per VM).
    Sample,
}

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DirtyRate {
    /// Method.
    pub method: Method,
    /// Window length, seconds.
    pub window_s: f64,
    /// Distinct pages dirtied per second, whole VM.
    pub pages_per_s: f64,
    /// The same in MB/s (10^6 bytes).
    pub mb_per_s: f64,
    /// Per vCPU (ring only).
    pub vcpu_pages_per_s: Option<Vec<f64>>,
    /// Sample only: pages sampled.
    pub sampled_pages: Option<u64>,
}

fn rate(
    method: Method,
    pages: f64,
    secs: f64,
    per: Option<Vec<f64>>,
    sampled: Option<u64>,
) -> DirtyRate {
    let pps = pages / secs.max(1e-9);
    DirtyRate {
        method,
        window_s: secs,
        pages_per_s: pps,
        mb_per_s: pps * PAGE_SIZE as f64 / 1e6,
        vcpu_pages_per_s: per,
        sampled_pages: sampled,
    }
}

/// A ring measurement window: [`open`](Self::open) resets every ring (pages re-protected,
/// staged for any running tracker) and notes each vCPU's count; [`close`](Self::close) counts
/// the entries each vCPU's ring received since. Dirty logging is on while the window is open
/// (if nothing else holds it), so entries come from writes made during the window.
/// [`measure_ring`] is open, sleep, close.
pub struct RingWindow<'a> {
    vm: &'a Vm,
    rs: &'a std::sync::Arc<kvm_dirty::RingSet>,
    _logging: vmm::DirtyLogGuard,
    before: Vec<u64>,
    t: Instant,
}

impl<'a> RingWindow<'a> {
    /// Starts a window on a ring-tracked VM.
    pub fn open(vm: &'a Vm) -> Result<Self> {
        let rs = vm.ring_set().ok_or_else(|| {
            MigrationError::Protocol("the ring method needs a ring-tracked VM".into())
        })?;
        let logging = vm.dirty_logging()?;
        rs.harvest_to_staged(None)?;
        rs.poll(u32::MAX)?;
        let before = (0..rs.vcpus()).map(|i| rs.vcpu_dirty_seen(i)).collect();
        Ok(RingWindow {
            vm,
            rs,
            _logging: logging,
            before,
            t: Instant::now(),
        })
    }

    /// Ends the window: distinct pages each vCPU dirtied, as rates over its length.
    pub fn close(self) -> Result<DirtyRate> {
        // A kick makes sure no dirty gfn waits in a per-CPU buffer (PML on hardware KVM).
        if let Ok(v) = self.vm.vcpus() {
            (0..v.len()).for_each(|i| v.kick(i));
        }
        self.rs.poll(u32::MAX)?;
        let secs = self.t.elapsed().as_secs_f64();
        let per: Vec<f64> = (0..self.before.len())
            .map(|i| (self.rs.vcpu_dirty_seen(i) - self.before[i]) as f64 / secs)
            .collect();
        let total: f64 = per.iter().sum::<f64>() * secs;
        Ok(rate(Method::Ring, total, secs, Some(per), None))
    }
}

/// Ring: reset every ring, wait, count the entries each vCPU's ring received.
pub fn measure_ring(vm: &Vm, window: Duration) -> Result<DirtyRate> {
    let w = RingWindow::open(vm)?;
    std::thread::sleep(window);
    w.close()
}

/// A bitmap measurement window: [`open`](Self::open) collects and discards,
/// [`close`](Self::close) collects and counts. The tracker holds dirty logging on from its
/// start to its stop. [`measure_bitmap`] is open, sleep, close.
pub struct BitmapWindow {
    tracker: Box<dyn kvm_dirty::DirtyTracker>,
    set: DirtyPageSet,
    t: Instant,
}

impl BitmapWindow {
    /// Starts a window on a bitmap or clear-log VM.
    pub fn open(vm: &Vm) -> Result<Self> {
        if vm.config().tracking.mode() == TrackerMode::Ring {
            return Err(MigrationError::Protocol(
                "the bitmap method needs a bitmap or clear-log VM (KVM refuses GET_DIRTY_LOG with the ring on)"
                    .into(),
            ));
        }
        let mut tracker = vm.tracker()?;
        tracker.start()?;
        let mut set = DirtyPageSet::new(&vm.ram().slot_specs());
        tracker.collect(&mut set)?;
        set.clear();
        Ok(BitmapWindow {
            tracker,
            set,
            t: Instant::now(),
        })
    }

    /// Ends the window: distinct pages the VM dirtied, as a rate over its length.
    pub fn close(mut self) -> Result<DirtyRate> {
        self.tracker.collect(&mut self.set)?;
        let secs = self.t.elapsed().as_secs_f64();
        self.tracker.stop()?;
        Ok(rate(
            Method::Bitmap,
            self.set.count() as f64,
            secs,
            None,
            None,
        ))
    }
}

/// Bitmap: collect (discard), wait, collect and count. The tracker holds dirty logging on
/// from its start to its stop.
pub fn measure_bitmap(vm: &Vm, window: Duration) -> Result<DirtyRate> {
    let w = BitmapWindow::open(vm)?;
    std::thread::sleep(window);
    w.close()
}

/// Sampling: hash `samples_per_gib` random pages per GiB at the start and at the end.
pub fn measure_sample(
    vm: &Vm,
    window: Duration,
    samples_per_gib: u64,
    seed: u64,
) -> Result<DirtyRate> {
    let regions = vm.ram().regions().to_vec();
    let total_pages: u64 = regions.iter().map(|r| r.bytes / PAGE_SIZE).sum();
    let n = ((vm.ram().total_bytes() as f64 / (1u64 << 30) as f64) * samples_per_gib as f64)
        .ceil()
        .max(1.0) as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut gpas = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let mut p = rng.gen_range(0..total_pages);
        for r in &regions {
            let rp = r.bytes / PAGE_SIZE;
            if p < rp {
                gpas.push(r.gpa + p * PAGE_SIZE);
                break;
            }
            p -= rp;
        }
    }
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut hash = |gpa: u64| -> Result<u64> {
        vm.ram().read(gpa, &mut page)?;
        Ok(migration::digest::page_hash(&page))
    };
    let before = gpas.iter().map(|&g| hash(g)).collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    std::thread::sleep(window);
    let mut changed = 0u64;
    for (g, h) in gpas.iter().zip(&before) {
        if hash(*g)? != *h {
            changed += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let est = changed as f64 / gpas.len() as f64 * total_pages as f64;
    Ok(rate(
        Method::Sample,
        est,
        secs,
        None,
        Some(gpas.len() as u64),
    ))
}
