//! The VM seam: what the source side of the engine needs from a VM, as a trait, so the
//! engine runs the same code on a `vmm::Vm` (real KVM) and on a
//! [`FakeVm`](crate::fake::FakeVm) (memory and a guest thread in this process, for tests
//! without `/dev/kvm`).
//!
//! The engine drives: the memory layout, page reads and the populated query (the bulk pass
//! skips never-populated pages), the dirty tracker, pause/resume of the vCPUs, the per-vCPU
//! dirty counters of a ring, the CPU-throttle and dirty-limit actuators, and the state blobs
//! that go with the final pass.

use std::sync::Arc;
use std::time::Duration;

use kvm_dirty::{DirtyTracker, RingSet, SlotSpec, TrackerMode, PAGE_SIZE};
use migration::wire::{MemoryLayout, Region};
use vmm::Vm;

use crate::dirtylimit::{DirtyLimiter, LimiterConfig};
use crate::error::Result;

/// Per-vCPU dirty counters (ring tracker): how many pages each vCPU has dirtied so far.
pub trait VcpuDirtyCounters: Send + Sync {
    /// Brings the counters up to date (a ring is peeked without a reset, and harvested
    /// early once it is `high_water` full, 0..=1 of its soft limit), then writes one
    /// monotonic count per vCPU into `out` (cleared first).
    fn poll_counts(&self, high_water: f64, out: &mut Vec<u64>) -> Result<()>;
}

/// A per-vCPU dirty limit in force (ring tracker); dropping it lifts every limit.
pub trait DirtyLimitActuator: Send {
    /// Holds the vCPUs in `vcpus` (`None` = all) to `bytes_per_s` each; `None` lifts the
    /// limit of every vCPU.
    fn set_quota(&self, bytes_per_s: Option<u64>, vcpus: Option<Vec<usize>>);
}

/// A VM the source side of the engine can migrate.
///
/// Every method takes `&self`: the engine runs on its own thread while the VM's owner keeps
/// using it. The vCPUs run when a migration starts; the engine pauses them at switchover
/// and resumes them after any failure before the commit.
pub trait MigratableVm: Send + Sync {
    /// The machine type the Hello announces (`vmm::Platform::wire`).
    fn machine(&self) -> u32;
    /// How the VM tracks dirty pages.
    fn tracker_mode(&self) -> TrackerMode;
    /// Number of vCPUs.
    fn vcpu_count(&self) -> usize;
    /// The guest memory slots, in GPA order.
    fn slots(&self) -> Vec<SlotSpec>;
    /// Copies the page at `gpa` (4 KiB aligned) into `buf` (4096 bytes).
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<()>;
    /// Marks in `out` (bit i of word i / 64) which of the `pages` pages from `gpa` (inside one
    /// slot) may hold data; a clear bit is a page never populated, which reads as zero.
    fn populated(&self, gpa: u64, pages: u64, out: &mut Vec<u64>) -> Result<()>;
    /// A new dirty tracker over every slot (not started).
    fn tracker(&self) -> Result<Box<dyn DirtyTracker>>;
    /// Pauses every vCPU and waits until all are parked.
    fn pause(&self, timeout: Duration) -> Result<()>;
    /// Releases the paused vCPUs.
    fn resume(&self);
    /// Whether the vCPUs run (or are paused) without a failure.
    fn is_running(&self) -> bool;
    /// The per-vCPU dirty counters (ring tracker only).
    fn dirty_counters(&self) -> Option<Arc<dyn VcpuDirtyCounters>>;
    /// Starts a per-vCPU dirty-limit controller with no limit yet; an error for a VM without
    /// the ring tracker (or when dirty logging cannot be switched on).
    fn start_dirty_limiter(&self) -> Result<Box<dyn DirtyLimitActuator>>;
    /// Throttles every vCPU's CPU time by `percent` (0 lifts it).
    fn set_cpu_throttle(&self, percent: u8);
    /// The vCPUs' state blobs, one per vCPU in index order (vCPUs paused).
    fn save_vcpus(&self) -> Result<Vec<Vec<u8>>>;
    /// The VM-wide device state blob, if the machine has one (vCPUs paused).
    fn save_machine(&self) -> Result<Option<Vec<u8>>>;
    /// Ring-full exits so far (ring tracker).
    fn ring_full_exits(&self) -> u64 {
        0
    }
    /// Page faults the guest's vCPUs took that the hypervisor handled, summed over the vCPUs
    /// and monotonic (the real VM: KVM's `pf_taken`, which counts the write-protect fault of
    /// each first write to a page after dirty tracking re-protected it); `None` if the VM
    /// cannot count them.
    fn guest_faults(&self) -> Option<u64> {
        None
    }

    /// The layout of the VM's memory for the wire.
    fn layout(&self) -> Result<MemoryLayout> {
        let regions = self
            .slots()
            .iter()
            .map(|s| Region {
                slot: s.id.0,
                guest_phys_addr: s.guest_phys_addr,
                size: s.pages * PAGE_SIZE,
            })
            .collect();
        Ok(MemoryLayout::new(regions)?)
    }
}

struct RingCounters(Arc<RingSet>);

impl VcpuDirtyCounters for RingCounters {
    fn poll_counts(&self, high_water: f64, out: &mut Vec<u64>) -> Result<()> {
        let soft = self.0.capability().size.soft_limit();
        let hw = ((f64::from(soft) * high_water) as u32).max(1);
        let r = self.0.poll(hw);
        out.clear();
        out.extend((0..self.0.vcpus()).map(|i| self.0.vcpu_dirty_seen(i)));
        Ok(r.map(|_| ())?)
    }
}

impl DirtyLimitActuator for DirtyLimiter {
    fn set_quota(&self, bytes_per_s: Option<u64>, vcpus: Option<Vec<usize>>) {
        DirtyLimiter::set_quota(self, bytes_per_s, vcpus);
    }
}

impl MigratableVm for Vm {
    fn machine(&self) -> u32 {
        self.platform().wire()
    }
    fn tracker_mode(&self) -> TrackerMode {
        self.config().tracking.mode()
    }
    fn vcpu_count(&self) -> usize {
        self.vcpu_handles().len()
    }
    fn slots(&self) -> Vec<SlotSpec> {
        self.ram().slot_specs()
    }
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.ram().read(gpa, buf)?)
    }
    fn populated(&self, gpa: u64, pages: u64, out: &mut Vec<u64>) -> Result<()> {
        self.ram().populated(gpa, pages, out)?;
        Ok(())
    }
    fn tracker(&self) -> Result<Box<dyn DirtyTracker>> {
        Ok(Vm::tracker(self)?)
    }
    fn pause(&self, timeout: Duration) -> Result<()> {
        Ok(self.vcpus()?.pause_all(timeout)?)
    }
    fn resume(&self) {
        if let Ok(v) = self.vcpus() {
            v.resume_all();
        }
    }
    fn is_running(&self) -> bool {
        self.vcpus().map(|v| v.check().is_ok()).unwrap_or(false)
    }
    fn dirty_counters(&self) -> Option<Arc<dyn VcpuDirtyCounters>> {
        self.ring_set()
            .map(|rs| Arc::new(RingCounters(rs.clone())) as Arc<dyn VcpuDirtyCounters>)
    }
    fn start_dirty_limiter(&self) -> Result<Box<dyn DirtyLimitActuator>> {
        Ok(Box::new(DirtyLimiter::start(
            self,
            LimiterConfig::default(),
        )?))
    }
    fn set_cpu_throttle(&self, percent: u8) {
        for v in self.vcpu_handles() {
            v.set_throttle(f64::from(percent) / 100.0);
        }
    }
    fn save_vcpus(&self) -> Result<Vec<Vec<u8>>> {
        Ok(Vm::save_vcpus(self)?.iter().map(|s| s.encode()).collect())
    }
    fn save_machine(&self) -> Result<Option<Vec<u8>>> {
        Ok(Vm::save_machine(self)?.map(|m| m.encode()))
    }
    fn guest_faults(&self) -> Option<u64> {
        Vm::guest_faults(self).ok().flatten()
    }
    fn ring_full_exits(&self) -> u64 {
        self.ring_set()
            .map(|rs| (0..rs.vcpus()).map(|i| rs.vcpu_ring_full_exits(i)).sum())
            .unwrap_or(0)
    }
}
