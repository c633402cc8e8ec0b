//! The [`DirtyTracker`] trait and its three KVM implementations.
//!
//! `collect` is additive: it ORs the pages dirtied since the previous collect (or `start`) into
//! a caller-owned [`DirtyPageSet`], plus the pages the VMM wrote itself ([`VmmWriteLog`]). When
//! `collect` returns, every page it reported has been re-protected, so the caller may read page
//! contents: a later guest write to such a page is reported by a later collect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;

use crate::bitmap::{self, ManualProtect};
use crate::error::{DirtyError, Result};
use crate::pageset::DirtyPageSet;
pub use crate::pageset::SlotSpec;
use crate::ring::{RingCapability, RingConsumer};
use crate::sys::{self, MmapRing};
use crate::vmm_log::VmmWriteLog;

/// The three tracking modes: the workspace's one name for a dirty tracker. Serialized in
/// kebab-case (`ring`, `bitmap`, `clear-log`), as the CLI spells them; the migration stream
/// carries its own one-byte encoding (`migration::wire::tracker_to_wire`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerMode {
    /// Per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`).
    Ring,
    /// `KVM_GET_DIRTY_LOG`, which also re-protects.
    Bitmap,
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` (manual protect, initially set).
    ClearLog,
}

impl TrackerMode {
    /// Lower-case name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            TrackerMode::Ring => "ring",
            TrackerMode::Bitmap => "bitmap",
            TrackerMode::ClearLog => "clear-log",
        }
    }
}

/// What one collect did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CollectStats {
    /// Ring entries harvested (ring mode), including those harvested by ring-full handlers
    /// since the previous collect.
    pub ring_entries: u64,
    /// Entries `KVM_RESET_DIRTY_RINGS` reported reset.
    pub reset: u64,
    /// Pages taken from the VMM write log.
    pub vmm_pages: u64,
    /// Dirty-log ioctls issued (GET, CLEAR, RESET).
    pub ioctls: u64,
    /// Nanoseconds spent reading ring entries (ring mode, this collect's own harvest).
    pub harvest_ns: u64,
    /// Nanoseconds spent in `KVM_RESET_DIRTY_RINGS` (ring mode, this collect's own reset).
    pub reset_ns: u64,
    /// Tracking was lost since the previous collect (a ring overran: the kernel pushed more
    /// entries than the ring holds, so some were overwritten before they were read). The
    /// pages in `out` are then not the whole dirty set: the caller must treat every page as
    /// dirty (a migration resends all of memory).
    pub tracking_lost: bool,
}

/// Dirty page tracking over a VM's memslots.
pub trait DirtyTracker: Send {
    /// The mode.
    fn mode(&self) -> TrackerMode;
    /// Begins tracking: later collects report every page written from now on.
    fn start(&mut self) -> Result<()>;
    /// ORs the pages dirtied since the last collect into `out`; see the module docs.
    fn collect(&mut self, out: &mut DirtyPageSet) -> Result<CollectStats>;
    /// Ends tracking.
    fn stop(&mut self) -> Result<()>;
    /// Begins tracking for a caller that will read every page once, after this call (a
    /// migration's bulk pass): a tracker may then leave pages unprotected until
    /// [`protect_before_read`](Self::protect_before_read) covers them, reporting them dirty in
    /// any collect before that. QEMU does this with `KVM_DIRTY_LOG_INITIALLY_SET`, clearing the
    /// log one chunk at a time just before it sends the chunk, so a guest pays no write-protect
    /// fault on memory not sent yet and a page it writes before its first send is sent once.
    /// The default is [`start`](Self::start).
    fn start_deferred(&mut self) -> Result<()> {
        self.start()
    }
    /// The caller is about to read the `pages` pages from `gpa` (guest-physical; pages outside
    /// the tracked slots are ignored): a write to them from now on is reported by a later
    /// collect; a write before need not be, since the read sees it. The default does nothing:
    /// the tracker protected every page when it started.
    fn protect_before_read(&mut self, gpa: u64, pages: u64) -> Result<()> {
        let _ = (gpa, pages);
        Ok(())
    }
}

fn check_logged(slots: &[SlotSpec]) -> Result<()> {
    match slots.iter().find(|s| !s.log_dirty) {
        Some(s) => Err(DirtyError::SlotNotLogged { slot: s.id.0 }),
        None => Ok(()),
    }
}

/// State shared by the two bitmap-based trackers.
#[derive(Debug)]
struct LogCore {
    vm: Arc<VmFd>,
    slots: Vec<SlotSpec>,
    buf: Vec<u64>,
    vmm_log: Option<Arc<VmmWriteLog>>,
    started: bool,
}

impl LogCore {
    fn new(vm: Arc<VmFd>, slots: &[SlotSpec], vmm_log: Option<Arc<VmmWriteLog>>) -> Result<Self> {
        check_logged(slots)?;
        let words = slots.iter().map(|s| s.bitmap_words()).max().unwrap_or(0);
        Ok(LogCore {
            vm,
            slots: slots.to_vec(),
            buf: vec![0; words],
            vmm_log,
            started: false,
        })
    }

    /// GET every slot (and CLEAR what it returned when `clear`), then OR into `out`. The
    /// 64-page words `pending` marks (per slot, one bit per word) count as wholly dirty.
    fn collect(
        &mut self,
        out: &mut DirtyPageSet,
        clear: bool,
        pending: Option<&[Vec<u64>]>,
    ) -> Result<CollectStats> {
        if !self.started {
            return Err(DirtyError::NotStarted);
        }
        let mut st = CollectStats::default();
        for (i, s) in self.slots.iter().enumerate() {
            let words = s.bitmap_words();
            bitmap::get_dirty_log(&self.vm, s, &mut self.buf)?;
            st.ioctls += 1;
            if let Some(p) = pending.and_then(|p| p.get(i)) {
                for (w, word) in self.buf[..words].iter_mut().enumerate() {
                    if p[w / 64] >> (w % 64) & 1 == 1 {
                        *word = s.word_mask(w);
                    }
                }
            }
            if clear {
                // Re-protect before publishing: a write after this point is reported next time.
                st.ioctls += bitmap::clear_dirty_log(&self.vm, s, &self.buf[..words])?;
            }
            if let Some(i) = out.slot_index(s.id.0) {
                out.or_words(i, &self.buf[..words]);
            }
        }
        if let Some(l) = &self.vmm_log {
            st.vmm_pages = l.drain_into(out);
        }
        Ok(st)
    }
}

/// `KVM_GET_DIRTY_LOG` tracking (get-and-reprotect in one ioctl).
#[derive(Debug)]
pub struct BitmapTracker(LogCore);

impl BitmapTracker {
    /// A tracker over `slots` (each registered with `KVM_MEM_LOG_DIRTY_PAGES`).
    pub fn new(
        vm: Arc<VmFd>,
        slots: &[SlotSpec],
        vmm_log: Option<Arc<VmmWriteLog>>,
    ) -> Result<Self> {
        Ok(BitmapTracker(LogCore::new(vm, slots, vmm_log)?))
    }
}

impl DirtyTracker for BitmapTracker {
    fn mode(&self) -> TrackerMode {
        TrackerMode::Bitmap
    }
    fn start(&mut self) -> Result<()> {
        // Discard what accumulated before start; the GET re-protects everything it returns.
        let c = &mut self.0;
        for s in &c.slots {
            bitmap::get_dirty_log(&c.vm, s, &mut c.buf)?;
        }
        c.started = true;
        Ok(())
    }
    /// Nothing is discarded: the first collect may report pages written before the start
    /// as well (a superset). A slot whose logging goes on after this starts with an empty log
    /// (KVM allocates it), which is how a VMM defers logging to the bulk pass.
    fn start_deferred(&mut self) -> Result<()> {
        self.0.started = true;
        Ok(())
    }
    fn collect(&mut self, out: &mut DirtyPageSet) -> Result<CollectStats> {
        self.0.collect(out, false, None)
    }
    fn stop(&mut self) -> Result<()> {
        self.0.started = false;
        Ok(())
    }
}

/// Manual-protect tracking: GET (no side effect) then CLEAR exactly the pages returned.
///
/// The slots start with every bit set (`INITIALLY_SET`, which spares KVM write-protecting all
/// memory when logging is enabled). `start` collects and clears that initial set, so later
/// collects report only pages written after `start`, as in the other modes. `start_deferred`
/// leaves it: every 64-page word stays *pending* (unprotected, reported dirty) until
/// `protect_before_read` or a collect clears it, QEMU's lazy clear of the bulk pass.
#[derive(Debug)]
pub struct ClearLogTracker {
    core: LogCore,
    /// Per slot, one bit per 64-page word of its dirty log: not yet cleared since
    /// `start_deferred`.
    pending: Vec<Vec<u64>>,
    /// Some word is pending.
    any_pending: bool,
    /// All ones, one slot's worth of words: the mask that clears pending words.
    ones: Vec<u64>,
}

impl ClearLogTracker {
    /// A tracker over `slots`; `_proof` shows manual protect was enabled before the slots.
    pub fn new(
        vm: Arc<VmFd>,
        _proof: ManualProtect,
        slots: &[SlotSpec],
        vmm_log: Option<Arc<VmmWriteLog>>,
    ) -> Result<Self> {
        let core = LogCore::new(vm, slots, vmm_log)?;
        let words = core.buf.len();
        Ok(ClearLogTracker {
            pending: slots
                .iter()
                .map(|s| vec![0; s.bitmap_words().div_ceil(64)])
                .collect(),
            any_pending: false,
            ones: vec![u64::MAX; words],
            core,
        })
    }

    fn clear_pending(&mut self) {
        self.pending.iter_mut().for_each(|p| p.fill(0));
        self.any_pending = false;
    }

    /// CLEARs the pending words of slot `i` in `[w0, w1)` and marks them done; returns the
    /// ioctls issued.
    fn protect_words(&mut self, i: usize, w0: usize, w1: usize) -> Result<u64> {
        let s = self.core.slots[i];
        let pending = &mut self.pending[i];
        let mut calls = 0;
        let mut w = w0;
        while w < w1 {
            if pending[w / 64] >> (w % 64) & 1 == 0 {
                w += 1;
                continue;
            }
            // A run of pending words: one CLEAR with an all-ones mask. Only pending words:
            // clearing a word cleared before would drop the writes logged since.
            let start = w;
            while w < w1 && pending[w / 64] >> (w % 64) & 1 == 1 {
                pending[w / 64] &= !(1 << (w % 64));
                w += 1;
            }
            calls += bitmap::clear_words(&self.core.vm, &s, start, &self.ones[..w - start])?;
        }
        Ok(calls)
    }
}

impl DirtyTracker for ClearLogTracker {
    fn mode(&self) -> TrackerMode {
        TrackerMode::ClearLog
    }
    fn start(&mut self) -> Result<()> {
        // Discard the initially-set bits (and everything dirtied before start): GET, then
        // CLEAR exactly what was returned, which write-protects those pages. Without this the
        // first collect would report every page, and a migration would resend all of memory
        // right after its bulk pass.
        self.clear_pending();
        let c = &mut self.core;
        for s in &c.slots {
            let words = s.bitmap_words();
            bitmap::get_dirty_log(&c.vm, s, &mut c.buf)?;
            bitmap::clear_dirty_log(&c.vm, s, &c.buf[..words])?;
        }
        c.started = true;
        Ok(())
    }
    fn start_deferred(&mut self) -> Result<()> {
        // Nothing is cleared: with INITIALLY_SET the pages are unprotected and logged dirty
        // (and a page cleared by an earlier user is protected, so a write to it is logged).
        for (p, s) in self.pending.iter_mut().zip(&self.core.slots) {
            let words = s.bitmap_words();
            p.fill(0);
            for w in 0..words {
                p[w / 64] |= 1 << (w % 64);
            }
        }
        self.any_pending = self.core.slots.iter().any(|s| s.pages > 0);
        self.core.started = true;
        Ok(())
    }
    fn protect_before_read(&mut self, gpa: u64, pages: u64) -> Result<()> {
        if !self.core.started {
            return Err(DirtyError::NotStarted);
        }
        if !self.any_pending {
            return Ok(());
        }
        let end = gpa.saturating_add(pages.saturating_mul(crate::PAGE_SIZE));
        for i in 0..self.core.slots.len() {
            let s = self.core.slots[i];
            let (lo, hi) = (
                s.guest_phys_addr,
                s.guest_phys_addr + s.pages * crate::PAGE_SIZE,
            );
            if end <= lo || gpa >= hi {
                continue;
            }
            // Whole words: the CLEAR works on 64-page words, and a word protected early is
            // still read afterwards by the caller, who reads every page.
            let first = (gpa.max(lo) - lo) / crate::PAGE_SIZE;
            let last = (end.min(hi) - lo).div_ceil(crate::PAGE_SIZE);
            self.protect_words(i, (first / 64) as usize, last.div_ceil(64) as usize)?;
        }
        Ok(())
    }
    fn collect(&mut self, out: &mut DirtyPageSet) -> Result<CollectStats> {
        // Words still pending are reported dirty, and cleared (protected) with the rest.
        let pending = self.any_pending.then_some(&self.pending[..]);
        let st = self.core.collect(out, true, pending)?;
        self.clear_pending();
        Ok(st)
    }
    fn stop(&mut self) -> Result<()> {
        self.clear_pending();
        self.core.started = false;
        Ok(())
    }
}

/// Whether a poll should harvest a ring holding `pending` entries, `previous` at the poll
/// before: it holds `high_water` already, or would by the poll after next at the rate it
/// filled since the previous one.
fn harvest_early(pending: u32, previous: u32, high_water: u32) -> bool {
    let growth = pending.saturating_sub(previous);
    pending.saturating_add(growth.saturating_mul(2)) >= high_water
}

/// Result of one harvest-and-reset over a [`RingSet`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingCollect {
    /// Entries harvested.
    pub entries: u64,
    /// Entries the kernel reset (equal to `entries`, checked).
    pub reset: u64,
    /// Entries whose slot/offset lay outside every tracked slot (counted, never trusted).
    pub bad_entries: u64,
    /// Whether `KVM_RESET_DIRTY_RINGS` was interrupted and retried.
    pub interrupted: bool,
    /// Nanoseconds spent reading entries.
    pub harvest_ns: u64,
    /// Nanoseconds spent in `KVM_RESET_DIRTY_RINGS` (with retries).
    pub reset_ns: u64,
}

struct RingInner {
    consumers: Vec<RingConsumer<MmapRing>>,
    staged: DirtyPageSet,
    staged_entries: u64,
    /// `staged` may hold pages: only then does a collect merge and clear it (both read the
    /// set's summary words, cold by then: a fixed cost a collect need not pay).
    staged_pages: bool,
    /// `(slot, offset)` of the entries the current collect harvested, in ring order: reused,
    /// so a collect allocates only while the largest harvest so far grows.
    scratch: Vec<(u32, u64)>,
    /// An overrun was detected since the last collect (or discard).
    lost: bool,
    /// Per ring, the pending entries the previous `poll` left there (its fill rate per poll).
    polled: Vec<u32>,
}

/// All vCPU rings of a VM, shareable between the vCPU threads (ring-full exits) and a collector
/// thread. One lock serialises harvest + reset so the kernel's reset count can be checked
/// exactly against what was harvested.
pub struct RingSet {
    vm: Arc<VmFd>,
    cap: RingCapability,
    inner: Mutex<RingInner>,
    per_vcpu: Vec<AtomicU64>,
    ring_full_exits: Vec<AtomicU64>,
    seen: Vec<AtomicU64>,
    overruns: Vec<AtomicU64>,
    resyncs: Vec<AtomicU64>,
    bad_entries: AtomicU64,
    vmm_log: Option<Arc<VmmWriteLog>>,
}

impl std::fmt::Debug for RingSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingSet")
            .field("cap", &self.cap)
            .field("vcpus", &self.per_vcpu.len())
            .finish()
    }
}

impl RingSet {
    /// Builds the set from each vCPU's mapped ring, in vCPU order.
    pub fn new(
        vm: Arc<VmFd>,
        cap: RingCapability,
        slots: &[SlotSpec],
        rings: Vec<MmapRing>,
        vmm_log: Option<Arc<VmmWriteLog>>,
    ) -> Result<Self> {
        check_logged(slots)?;
        let n = rings.len();
        Ok(RingSet {
            vm,
            cap,
            inner: Mutex::new(RingInner {
                consumers: rings.into_iter().map(RingConsumer::new).collect(),
                staged: DirtyPageSet::new(slots),
                staged_entries: 0,
                staged_pages: false,
                scratch: Vec::new(),
                lost: false,
                polled: vec![0; n],
            }),
            per_vcpu: (0..n).map(|_| AtomicU64::new(0)).collect(),
            ring_full_exits: (0..n).map(|_| AtomicU64::new(0)).collect(),
            seen: (0..n).map(|_| AtomicU64::new(0)).collect(),
            overruns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            resyncs: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bad_entries: AtomicU64::new(0),
            vmm_log,
        })
    }

    /// The ring capability in use.
    pub fn capability(&self) -> RingCapability {
        self.cap
    }

    /// Number of vCPU rings.
    pub fn vcpus(&self) -> usize {
        self.per_vcpu.len()
    }

    /// Total entries ever harvested from vCPU `i`'s ring (monotonic; a dirty-rate source).
    pub fn vcpu_entries(&self, i: usize) -> u64 {
        self.per_vcpu
            .get(i)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Ring-full exits handled for vCPU `i`.
    pub fn vcpu_ring_full_exits(&self, i: usize) -> u64 {
        self.ring_full_exits
            .get(i)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Overruns detected on vCPU `i`'s ring: a harvest of a whole lap (the ring was full past
    /// the kernel's reserve), a reset that stopped short of what was harvested, or a ring-full
    /// exit with the consumer out of step with the kernel (then resynchronised). One overrun
    /// by the host often shows as two of these (the full lap, then the resync).
    pub fn vcpu_overruns(&self, i: usize) -> u64 {
        self.overruns
            .get(i)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Resynchronisations of vCPU `i`'s consumer with the kernel (see
    /// [`RingConsumer::resync`]); each is also counted in [`RingSet::vcpu_overruns`].
    pub fn vcpu_resyncs(&self, i: usize) -> u64 {
        self.resyncs
            .get(i)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Entries ever published by vCPU `i`'s ring and seen by a peek or a harvest (monotonic):
    /// the per-vCPU dirty-page counter, cheap to poll often.
    pub fn vcpu_dirty_seen(&self, i: usize) -> u64 {
        self.seen
            .get(i)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Peeks every ring (counting new entries without harvesting them) and harvests-and-resets
    /// only the rings that hold, or by the poll after next would hold at the rate they filled
    /// since the previous poll, at least `high_water` pending entries: a small ring filled fast
    /// is harvested early enough that it never reaches its soft limit (no ring-full exit),
    /// while a ring that holds a whole hot set is re-protected only when needed.
    /// Returns the number of rings harvested.
    pub fn poll(&self, high_water: u32) -> Result<usize> {
        let mut over = Vec::new();
        {
            let mut g = self.lock();
            let RingInner {
                consumers, polled, ..
            } = &mut *g;
            for (i, c) in consumers.iter_mut().enumerate() {
                c.peek();
                self.seen[i].store(c.seen(), Ordering::Relaxed);
                let pending = c.pending();
                if harvest_early(pending, polled.get(i).copied().unwrap_or(0), high_water) {
                    over.push(i);
                    if let Some(p) = polled.get_mut(i) {
                        *p = 0;
                    }
                } else if let Some(p) = polled.get_mut(i) {
                    *p = pending;
                }
            }
        }
        for &i in &over {
            self.harvest_to_staged(Some(i))?;
        }
        Ok(over.len())
    }

    /// Entries ever harvested whose slot/offset lay outside every tracked slot (must stay 0;
    /// such entries are counted and dropped, never trusted).
    pub fn bad_entries(&self) -> u64 {
        self.bad_entries.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, RingInner> {
        // A panic while holding the lock cannot leave the rings inconsistent (the kernel owns
        // their state), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Harvests the ring of vCPU `only` (or every ring), calling `sink(vcpu, slot, offset)` per
    /// entry in ring order, then resets. `sink` may record page numbers but must not read page
    /// contents: those are only safe to read after this returns.
    pub fn harvest_and_reset(
        &self,
        only: Option<usize>,
        mut sink: impl FnMut(usize, u32, u64),
    ) -> Result<RingCollect> {
        let mut g = self.lock();
        self.harvest_locked(&mut g, only, &mut sink)
    }

    fn harvest_locked(
        &self,
        g: &mut RingInner,
        only: Option<usize>,
        sink: &mut dyn FnMut(usize, u32, u64),
    ) -> Result<RingCollect> {
        let mut out = RingCollect::default();
        for i in 0..g.consumers.len() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let t0 = std::time::Instant::now();
            let c = &mut g.consumers[i];
            let (st, tok) = c.harvest(|slot, off| sink(i, slot, off));
            if let Some(p) = g.polled.get_mut(i) {
                *p = 0;
            }
            self.per_vcpu[i].fetch_add(st.entries, Ordering::Relaxed);
            self.seen[i].store(c.seen(), Ordering::Relaxed);
            out.harvest_ns += t0.elapsed().as_nanos() as u64;
            out.entries += tok.count;
            if st.entries == u64::from(c.len()) {
                // A whole lap at once: the ring was full past the kernel's reserve, which the
                // kernel never lets happen unless its emulator overran the soft limit; entries
                // may have been overwritten before anyone read them.
                self.overrun(g, i, "the ring was completely full");
            }
            if g.consumers[i].unreset() > 0 {
                let t1 = std::time::Instant::now();
                let (reset, interrupted) = self.reset_ring(g, i)?;
                out.reset += reset;
                out.interrupted |= interrupted;
                out.reset_ns += t1.elapsed().as_nanos() as u64;
            }
        }
        Ok(out)
    }

    /// Records an overrun of vCPU `i`'s ring: counted, tracking since the last good collect is
    /// lost (the next collect says so), and logged (rate-limited: the 1st, 2nd, 4th, ...).
    fn overrun(&self, g: &mut RingInner, i: usize, why: &str) {
        g.lost = true;
        let n = self.overruns[i].fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            eprintln!(
                "kvm-dirty: dirty ring of vCPU {i} overran ({why}; overrun {n} of this vCPU): \
                 the host pushed more entries than the ring holds; dirty tracking since the \
                 last collect is incomplete and is reported lost"
            );
        }
    }

    /// `KVM_RESET_DIRTY_RINGS` for the entries vCPU `i`'s consumer harvested (every other ring
    /// has none waiting, so the kernel's count is this ring's alone), retried on EINTR.
    ///
    /// A signal can cut the reset short: the kernel then returns `EINTR` (the count of what it
    /// did reset is lost) or (measured on Linux 6.18) a partial count; the ioctl is repeated
    /// until the count adds up or a call resets nothing. After an EINTR the flags decide.
    /// A reset that stops short without a signal stopped at an entry an overrun overwrote
    /// after it was harvested: the ring is recorded as stuck (resynchronised at its vCPU's
    /// next ring-full exit) and tracking is lost. More than was harvested is an error:
    /// someone else marks or resets these rings.
    fn reset_ring(&self, g: &mut RingInner, i: usize) -> Result<(u64, bool)> {
        let expected = u64::from(g.consumers[i].unreset());
        let mut interrupted = false;
        let mut eintr = false;
        let mut reported = 0u64;
        while reported < expected {
            match sys::reset_dirty_rings(&*self.vm) {
                Ok(0) => break,
                Ok(n) => {
                    reported += n;
                    if reported < expected {
                        interrupted = true;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    interrupted = true;
                    eintr = true;
                }
                Err(source) => {
                    return Err(DirtyError::Ioctl {
                        op: "KVM_RESET_DIRTY_RINGS",
                        source,
                    })
                }
            }
        }
        if reported > expected {
            return Err(DirtyError::ResetCountMismatch {
                harvested: expected,
                reset: reported,
            });
        }
        let c = &mut g.consumers[i];
        if eintr {
            let confirmed = c.confirm_reset();
            if c.unreset() == 0 {
                c.reset_complete();
                return Ok((confirmed, true));
            }
            c.reset_short(0);
            self.overrun(
                g,
                i,
                "a reset interrupted by a signal left harvested entries",
            );
            return Ok((confirmed, true));
        }
        if reported == expected {
            c.reset_complete();
        } else {
            c.reset_short(reported);
            self.overrun(
                g,
                i,
                "a reset stopped at an entry overwritten after it was harvested",
            );
        }
        Ok((reported, interrupted))
    }

    /// Harvests into the internal staged page set (what the next `collect` returns).
    /// Called by the collector thread and by vCPU threads on `KVM_EXIT_DIRTY_RING_FULL`.
    pub fn harvest_to_staged(&self, only: Option<usize>) -> Result<RingCollect> {
        let mut g = self.lock();
        self.harvest_staged_locked(&mut g, only)
    }

    fn harvest_staged_locked(
        &self,
        inner: &mut RingInner,
        only: Option<usize>,
    ) -> Result<RingCollect> {
        let mut staged = std::mem::replace(&mut inner.staged, DirtyPageSet::new(&[]));
        let mut bad = 0u64;
        let r = self.harvest_locked(
            inner,
            only,
            &mut |_, slot, off| match staged.slot_index(slot) {
                Some(i) if staged.insert_at(i, off).is_some() => {}
                _ => bad += 1,
            },
        );
        inner.staged = staged;
        let mut r = r?;
        inner.staged_entries += r.entries;
        inner.staged_pages |= r.entries > 0;
        r.bad_entries = bad;
        self.bad_entries.fetch_add(bad, Ordering::Relaxed);
        Ok(r)
    }

    /// Handles `KVM_EXIT_DIRTY_RING_FULL` of vCPU `vcpu` on its own thread (so nothing can
    /// push to its ring meanwhile): harvest its ring and reset, so the vCPU can re-enter the
    /// guest. Then checks that the consumer is in step with the kernel: a ring-full exit means
    /// at least the host's minimum soft limit of entries are in use, so less progress than
    /// that since the previous ring-full handling (or a ring stuck after a short reset) means
    /// an overrun put the kernel's indices out of step with the consumer's. The ring is then
    /// resynchronised ([`RingConsumer::resync`]), the overrun counted and tracking reported lost.
    pub fn handle_ring_full(&self, vcpu: usize) -> Result<RingCollect> {
        let Some(c) = self.ring_full_exits.get(vcpu) else {
            return Ok(RingCollect::default());
        };
        c.fetch_add(1, Ordering::Relaxed);
        let mut g = self.lock();
        let mut r = self.harvest_staged_locked(&mut g, Some(vcpu))?;
        let min_soft = self.cap.size.min_soft_limit();
        let c = &g.consumers[vcpu];
        if c.is_stuck() || c.progress() < min_soft {
            let blind = if c.progress() == 0 && c.unreset() == 0 && !c.is_stuck() {
                min_soft
            } else {
                0
            };
            let rs = self.resync_locked(&mut g, vcpu, blind)?;
            r.entries += rs.harvested;
            r.reset += rs.to_reset;
        }
        g.consumers[vcpu].set_mark();
        Ok(r)
    }

    /// Resynchronises vCPU `i`'s consumer with the kernel (its vCPU is out of the guest), then
    /// resets; the pages of DIRTY entries found on the way are staged.
    fn resync_locked(
        &self,
        g: &mut RingInner,
        i: usize,
        blind: u32,
    ) -> Result<crate::ring::Resync> {
        let inner = &mut *g;
        let staged = &mut inner.staged;
        let mut bad = 0u64;
        let rs = inner.consumers[i].resync(blind, |slot, off| match staged.slot_index(slot) {
            Some(k) if staged.insert_at(k, off).is_some() => {}
            _ => bad += 1,
        });
        self.bad_entries.fetch_add(bad, Ordering::Relaxed);
        inner.staged_pages |= rs.harvested > 0;
        if rs.to_reset == 0 {
            // Consistent after all (another thread harvested and reset this ring first).
            return Ok(rs);
        }
        inner.staged_entries += rs.harvested;
        self.per_vcpu[i].fetch_add(rs.harvested, Ordering::Relaxed);
        self.resyncs[i].fetch_add(1, Ordering::Relaxed);
        self.overrun(
            g,
            i,
            "its indices were out of step with the kernel's; resynchronised",
        );
        self.reset_ring(g, i)?;
        Ok(rs)
    }

    /// Moves the staged pages (from ring-full handlers and polls) into `out`, then harvests
    /// every ring and resets, under one lock, and marks the harvested pages in `out`. Costs
    /// O(entries + staged words), plus a scan of the set's top level (64 words for 64 GiB)
    /// when something was staged: nothing proportional to guest size. `tracking_lost` is set
    /// when an overrun was detected since the previous collect.
    ///
    /// The harvest appends to a reused list, as the bare kernel sequence does, and prefetches
    /// each page's bitmap words, so their cache misses complete while the kernel resets; the
    /// pages go into `out` after the reset in one tight batch
    /// ([`DirtyPageSet::insert_entries`]). `out` is not readable before this returns, so
    /// marking its pages after the reset changes nothing for the caller.
    pub fn collect_into(&self, out: &mut DirtyPageSet) -> Result<CollectStats> {
        let mut g = self.lock();
        if std::mem::take(&mut g.staged_pages) {
            out.merge(&g.staged);
            g.staged.clear();
        }
        let mut list = std::mem::take(&mut g.scratch);
        list.clear();
        let seen: &DirtyPageSet = out;
        let mut cache: Option<(u32, usize)> = None;
        let r = self.harvest_locked(&mut g, None, &mut |_, slot, off| {
            list.push((slot, off));
            // The page's bitmap words arrive while the kernel resets.
            let idx = match cache {
                Some((s, i)) if s == slot => Some(i),
                _ => seen.slot_index(slot),
            };
            if let Some(i) = idx {
                seen.prefetch(i, off);
                cache = Some((slot, i));
            }
        });
        let bad = out.insert_entries(&list);
        g.scratch = list;
        let r = r?;
        self.bad_entries.fetch_add(bad, Ordering::Relaxed);
        let mut st = CollectStats {
            ring_entries: g.staged_entries + r.entries,
            reset: r.reset,
            vmm_pages: 0,
            ioctls: u64::from(r.entries > 0),
            harvest_ns: r.harvest_ns,
            reset_ns: r.reset_ns,
            tracking_lost: std::mem::take(&mut g.lost),
        };
        g.staged_entries = 0;
        drop(g);
        if let Some(l) = &self.vmm_log {
            st.vmm_pages = l.drain_into(out);
        }
        Ok(st)
    }

    /// The bare kernel sequence, for benchmarks: every ring's DIRTY entries appended to `list`
    /// as `slot << 48 | offset` (the consumer loop of api.rst and nothing else: no timers, no
    /// overrun checks), then one `KVM_RESET_DIRTY_RINGS` for all rings, repeated only while
    /// it resets something and entries remain. What any VMM pays for a page list;
    /// `ringvisor bench sync` times it next to [`RingSet::collect_into`] on the same rings.
    /// Returns the entries harvested. If the rings' flags show a harvested entry the kernel
    /// did not recycle, the ring is out of step: [`DirtyError::ResetCountMismatch`] (use the
    /// tracker, which resynchronises).
    pub fn harvest_bare(&self, list: &mut Vec<u64>) -> Result<u64> {
        let mut g = self.lock();
        let mut total = 0u64;
        for (i, c) in g.consumers.iter_mut().enumerate() {
            let (st, tok) = c.harvest(|slot, off| list.push(u64::from(slot) << 48 | off));
            total += tok.count;
            self.per_vcpu[i].fetch_add(st.entries, Ordering::Relaxed);
        }
        let mut reset = 0u64;
        while reset < total {
            match sys::reset_dirty_rings(&*self.vm) {
                Ok(0) => break,
                Ok(n) => reset += n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(source) => {
                    return Err(DirtyError::Ioctl {
                        op: "KVM_RESET_DIRTY_RINGS",
                        source,
                    })
                }
            }
        }
        if reset == total {
            g.consumers.iter_mut().for_each(|c| c.reset_complete());
            return Ok(total);
        }
        // Short (a signal can cut the count): the flags decide.
        let mut recycled = 0u64;
        for c in g.consumers.iter_mut() {
            recycled += c.confirm_reset();
            if c.unreset() == 0 {
                c.reset_complete();
            }
        }
        if recycled != total {
            return Err(DirtyError::ResetCountMismatch {
                harvested: total,
                reset: recycled,
            });
        }
        Ok(total)
    }

    /// Drops every staged page and harvests-and-discards what is in the rings.
    /// Tracking starts afresh, so an overrun detected before is forgotten (one detected later
    /// is reported by the next collect).
    pub fn discard(&self) -> Result<()> {
        self.harvest_to_staged(None)?;
        let mut g = self.lock();
        g.staged.clear();
        g.staged_entries = 0;
        g.staged_pages = false;
        g.lost = false;
        Ok(())
    }
}

/// Dirty-ring tracking through a shared [`RingSet`].
#[derive(Debug)]
pub struct RingTracker {
    set: Arc<RingSet>,
    started: bool,
}

impl RingTracker {
    /// A tracker over the set (shared with vCPU threads for ring-full handling).
    pub fn new(set: Arc<RingSet>) -> Self {
        RingTracker {
            set,
            started: false,
        }
    }
    /// The underlying ring set.
    pub fn set(&self) -> &Arc<RingSet> {
        &self.set
    }
}

impl DirtyTracker for RingTracker {
    fn mode(&self) -> TrackerMode {
        TrackerMode::Ring
    }
    fn start(&mut self) -> Result<()> {
        self.set.discard()?;
        self.started = true;
        Ok(())
    }
    fn collect(&mut self, out: &mut DirtyPageSet) -> Result<CollectStats> {
        if !self.started {
            return Err(DirtyError::NotStarted);
        }
        self.set.collect_into(out)
    }
    fn stop(&mut self) -> Result<()> {
        self.started = false;
        Ok(())
    }
}

#[cfg(test)]
mod early_harvest_tests {
    use super::harvest_early;

    #[test]
    fn a_ring_filling_fast_is_harvested_before_it_reaches_the_mark() {
        // 4096-entry ring, mark at 3800: 1000 entries a poll (800 MiB/s, 5 ms polls).
        assert!(!harvest_early(1000, 0, 3800), "1000 + 2 x 1000 < 3800");
        assert!(harvest_early(2000, 1000, 3800), "2000 + 2 x 1000 >= 3800");
        // A ring holding a hot set that grows slowly waits for the mark itself.
        assert!(!harvest_early(60_000, 59_900, 62_000));
        assert!(harvest_early(62_000, 62_000, 62_000));
        // A ring emptied by a collect since (fewer than before) grows by nothing.
        assert!(!harvest_early(10, 3000, 3800));
        // Never harvests on a mark no ring can reach.
        assert!(!harvest_early(65_536, 0, u32::MAX));
    }
}
