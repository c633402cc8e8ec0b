//! Dirty logging only while something needs it, as QEMU does: guest RAM is registered without
//! `KVM_MEM_LOG_DIRTY_PAGES` until a user starts tracking (a migration's tracker, a dirty-rate
//! measurement, the dirty limiter) and goes back to plain memslots when the last user stops.
//! Until then a guest pays no write-protect faults and pushes nothing into the rings (its boot
//! code at emulated CPL0 cannot overrun a ring it never touches).
//!
//! Users hold a [`DirtyLogGuard`]; the flag changes on the first acquire and the last drop, by
//! re-registering every eligible slot with `KVM_SET_USER_MEMORY_REGION` and only the flag
//! changed (KVM allows that on a live slot). What each mode's tracker sees right after logging
//! comes on:
//! - bitmap: KVM allocates an empty bitmap and write-protects the slot, so the first GET
//!   reports exactly the pages written since;
//! - clear-log (`INITIALLY_SET`): the new bitmap is all ones and nothing is write-protected;
//!   `ClearLogTracker::start` GETs and CLEARs it, so its collects report pages written after
//!   `start`, as before; `start_deferred` (a migration's bulk pass) leaves it and clears one
//!   chunk at a time just before the chunk is sent, as QEMU does;
//! - ring: entries appear only for writes after the flag is set.
//!
//! When logging goes off the rings are drained and discarded, so nothing stale reaches the
//! next user. Writes the VMM itself makes are always recorded in the `VmmWriteLog`, whatever
//! the flag, and merged into every collect.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_dirty::{
    CollectStats, DirtyError, DirtyPageSet, DirtyTracker, RingSet, SlotSpec, TrackerMode,
};
use kvm_ioctls::VmFd;

use crate::error::{Result, VmmError};
use crate::memory::{GuestRam, RegionSpec};
use crate::sys;

#[derive(Debug)]
struct State {
    users: usize,
    /// `(slot, flags)` as last passed to `KVM_SET_USER_MEMORY_REGION`, per region.
    flags: Vec<(u16, u32)>,
}

/// The reference-counted switch of a VM's dirty logging.
pub(crate) struct DirtyLogging {
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    ring: Option<Arc<RingSet>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for DirtyLogging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLogging").finish_non_exhaustive()
    }
}

impl DirtyLogging {
    /// Registers every region of `ram` as a memslot with logging off.
    pub(crate) fn register(vm: Arc<VmFd>, ram: Arc<GuestRam>) -> Result<Self> {
        let mut flags = Vec::new();
        for (s, region) in ram.mmap_regions() {
            sys::register_slot(&vm, u32::from(s.slot), s.gpa, region, false)?;
            flags.push((s.slot, 0));
        }
        Ok(DirtyLogging {
            vm,
            ram,
            ring: None,
            state: Mutex::new(State { users: 0, flags }),
        })
    }

    /// The ring set to drain when logging goes off (ring VMs; set once after vCPU creation).
    pub(crate) fn set_ring(&mut self, ring: Option<Arc<RingSet>>) {
        self.ring = ring;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a counter and a record; a panic elsewhere leaves both usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets or clears the flag on every region eligible for tracking (`RegionSpec::log_dirty`).
    fn apply(&self, st: &mut State, on: bool) -> Result<()> {
        for (s, region) in self.ram.mmap_regions() {
            if !s.log_dirty {
                continue;
            }
            sys::register_slot(&self.vm, u32::from(s.slot), s.gpa, region, on)?;
            if let Some(f) = st.flags.iter_mut().find(|(slot, _)| *slot == s.slot) {
                f.1 = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            }
        }
        Ok(())
    }

    /// Adds a user; turns logging on for every slot still without it (all of them for the
    /// first user; those a lazy first user has not reached yet otherwise).
    pub(crate) fn acquire(self: &Arc<Self>) -> Result<DirtyLogGuard> {
        let mut st = self.lock();
        if let Err(e) = self.enable_locked(&mut st, |_| true) {
            // Leave every slot as it was (off) rather than half on, unless a user holds it.
            if st.users == 0 {
                let _ = self.apply(&mut st, false);
            }
            return Err(e);
        }
        st.users += 1;
        Ok(DirtyLogGuard { ctl: self.clone() })
    }

    /// Adds a user that turns logging on one slot at a time ([`Self::enable_range`], a bulk
    /// pass reaching the slot), if it is the first user; returns the guard and whether it is
    /// lazy (false: logging was already on, as [`Self::acquire`]).
    pub(crate) fn acquire_lazy(self: &Arc<Self>) -> Result<(DirtyLogGuard, bool)> {
        {
            let mut st = self.lock();
            if st.users == 0 {
                st.users = 1;
                return Ok((DirtyLogGuard { ctl: self.clone() }, true));
            }
        }
        Ok((self.acquire()?, false))
    }

    /// Turns logging on for the eligible slots that overlap `[gpa, gpa + pages × 4 KiB)` and
    /// are still off; returns those slots.
    pub(crate) fn enable_range(&self, gpa: u64, pages: u64) -> Result<Vec<SlotSpec>> {
        let end = gpa.saturating_add(pages.saturating_mul(kvm_dirty::PAGE_SIZE));
        self.enable_where(|s| gpa < s.end() && s.gpa < end)
    }

    /// Turns logging on for every eligible slot still off; returns those slots.
    pub(crate) fn enable_all(&self) -> Result<Vec<SlotSpec>> {
        self.enable_where(|_| true)
    }

    fn enable_where(&self, pick: impl Fn(&RegionSpec) -> bool) -> Result<Vec<SlotSpec>> {
        let mut st = self.lock();
        if st.users == 0 {
            return Ok(Vec::new());
        }
        self.enable_locked(&mut st, pick)
    }

    /// Turns logging on for the eligible slots `pick` chooses that are still off; returns them.
    fn enable_locked(
        &self,
        st: &mut State,
        pick: impl Fn(&RegionSpec) -> bool,
    ) -> Result<Vec<SlotSpec>> {
        let mut enabled = Vec::new();
        for (s, region) in self.ram.mmap_regions() {
            let Some(f) = st.flags.iter_mut().find(|(slot, _)| *slot == s.slot) else {
                continue;
            };
            if !s.log_dirty || f.1 != 0 || !pick(s) {
                continue;
            }
            sys::register_slot(&self.vm, u32::from(s.slot), s.gpa, region, true)?;
            f.1 = KVM_MEM_LOG_DIRTY_PAGES;
            enabled.push(s.slot_spec());
        }
        Ok(enabled)
    }

    fn release(&self) {
        let mut st = self.lock();
        st.users = st.users.saturating_sub(1);
        if st.users > 0 {
            return;
        }
        // Off first (KVM pushes nothing for the slots once the ioctl returns), then drain, so
        // no entry made while logging was on is left for the next user. A failure leaves
        // logging on, which costs only faults: nothing is missed.
        if self.apply(&mut st, false).is_ok() {
            if let Some(rs) = &self.ring {
                let _ = rs.discard();
            }
        }
    }

    pub(crate) fn users(&self) -> usize {
        self.lock().users
    }

    pub(crate) fn slot_flags(&self) -> Vec<(u16, u32)> {
        self.lock().flags.clone()
    }
}

/// One user of a VM's dirty logging (from [`crate::Vm::dirty_logging`]): while any guard
/// lives, every trackable memslot is registered with `KVM_MEM_LOG_DIRTY_PAGES`; dropping the
/// last one turns logging off and discards what the rings hold.
#[must_use = "dirty logging goes off again when the guard is dropped"]
pub struct DirtyLogGuard {
    ctl: Arc<DirtyLogging>,
}

impl std::fmt::Debug for DirtyLogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLogGuard").finish_non_exhaustive()
    }
}

impl Drop for DirtyLogGuard {
    fn drop(&mut self) {
        self.ctl.release();
    }
}

/// A tracker that holds a [`DirtyLogGuard`] from `start` to `stop` (or drop), so a tracker
/// from [`crate::Vm::tracker`] turns logging on and off by itself.
pub(crate) struct LoggedTracker {
    inner: Box<dyn DirtyTracker>,
    ctl: Arc<DirtyLogging>,
    guard: Option<DirtyLogGuard>,
    /// Started deferred as the only user: slots get logging as the bulk pass reaches them.
    lazy: bool,
}

impl LoggedTracker {
    pub(crate) fn new(inner: Box<dyn DirtyTracker>, ctl: Arc<DirtyLogging>) -> Self {
        LoggedTracker {
            inner,
            ctl,
            guard: None,
            lazy: false,
        }
    }
}

impl LoggedTracker {
    /// Logging on (first), then the inner tracker's start; logging back off if that fails.
    fn start_with(
        &mut self,
        start: impl FnOnce(&mut dyn DirtyTracker) -> kvm_dirty::Result<()>,
    ) -> kvm_dirty::Result<()> {
        if self.guard.is_none() {
            self.guard = Some(self.ctl.acquire().map_err(ioctl_error)?);
        }
        let r = start(&mut *self.inner);
        if r.is_err() {
            self.guard = None;
        }
        r
    }
}

fn ioctl_error(e: VmmError) -> DirtyError {
    match e {
        VmmError::Kvm { op, source } => DirtyError::Ioctl {
            op,
            source: std::io::Error::from_raw_os_error(source.errno()),
        },
        VmmError::Dirty(d) => d,
        other => DirtyError::Ioctl {
            op: "KVM_SET_USER_MEMORY_REGION",
            source: std::io::Error::other(other.to_string()),
        },
    }
}

impl DirtyTracker for LoggedTracker {
    fn mode(&self) -> TrackerMode {
        self.inner.mode()
    }
    fn start(&mut self) -> kvm_dirty::Result<()> {
        if self.lazy {
            self.ctl.enable_all().map_err(ioctl_error)?;
            self.lazy = false;
        }
        self.start_with(|t| t.start())
    }
    /// Clear-log defers its protection itself (`INITIALLY_SET`). The ring and the bitmap,
    /// whose logging write-protects a slot when it goes on, defer logging instead: a slot gets
    /// it when the bulk pass reaches it, so the guest takes no write-protect fault on memory
    /// not sent yet (QEMU's per-chunk clear, by memslot).
    fn start_deferred(&mut self) -> kvm_dirty::Result<()> {
        if self.inner.mode() == TrackerMode::ClearLog || self.guard.is_some() {
            self.lazy = false;
            return self.start_with(|t| t.start_deferred());
        }
        let (guard, lazy) = self.ctl.acquire_lazy().map_err(ioctl_error)?;
        self.guard = Some(guard);
        self.lazy = lazy;
        let r = self.inner.start_deferred();
        if r.is_err() {
            self.guard = None;
            self.lazy = false;
        }
        r
    }
    fn protect_before_read(&mut self, gpa: u64, pages: u64) -> kvm_dirty::Result<()> {
        if self.lazy {
            self.ctl.enable_range(gpa, pages).map_err(ioctl_error)?;
        }
        self.inner.protect_before_read(gpa, pages)
    }
    fn collect(&mut self, out: &mut DirtyPageSet) -> kvm_dirty::Result<CollectStats> {
        if self.lazy {
            // Slots the bulk pass never reached were never read since the start: all dirty.
            for s in self.ctl.enable_all().map_err(ioctl_error)? {
                if let Some(i) = out.slot_index(s.id.0) {
                    let ones: Vec<u64> = (0..s.bitmap_words()).map(|w| s.word_mask(w)).collect();
                    out.or_words(i, &ones);
                }
            }
            self.lazy = false;
        }
        self.inner.collect(out)
    }
    fn stop(&mut self) -> kvm_dirty::Result<()> {
        let r = self.inner.stop();
        self.lazy = false;
        self.guard = None;
        r
    }
}
