//! An in-memory VM for engine tests without `/dev/kvm`: guest memory in this process, a
//! software dirty tracker, and "vCPU" threads that write pages at a configured rate, so the
//! engine's passes have something to do. It is a seam for the engine, not a model of KVM:
//! the real paths are tested on real KVM (`tests/kvm.rs`, `tests/pvh.rs`).
//!
//! Also here: [`FakeDestination`], the receiving side for a fake guest (the real
//! `dest::receive` builds a `vmm::Vm`): it decodes the stream into a [`FakeVm`]'s memory with
//! the real `Decoder`, keeps the incremental digest and answers like the real destination.

use std::io::{BufReader, BufWriter};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_dirty::{
    CollectStats, DirtyPageSet, DirtyTracker, SlotId, SlotSpec, TrackerMode, PAGE_SIZE,
};
use migration::digest::IncrementalDigest;
use migration::wire::{Ack, AckWriter, Decoder, Message, PageSink};

use crate::error::{MigrationError, Result};
use crate::seam::{DirtyLimitActuator, MigratableVm, VcpuDirtyCounters};

/// The machine type a fake VM announces in its Hello ("FAKE"); a real destination refuses it.
pub const FAKE_MACHINE: u32 = 0x4641_4b45;

const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// What to build.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Memory regions as (GPA, bytes); slot ids count from 0.
    pub regions: Vec<(u64, u64)>,
    /// Guest threads ("vCPUs").
    pub vcpus: usize,
    /// Pages the guest writes per second in total (0 = idle, `u64::MAX` = as fast as it can).
    pub rate_pages_per_s: u64,
    /// The guest writes the first this many pages of memory (in GPA order), each vCPU its
    /// share.
    pub working_set_pages: u64,
    /// The tracker mode the fake VM reports: `Ring` also gives per-vCPU dirty counters and a
    /// dirty-limit actuator.
    pub tracker: TrackerMode,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            regions: vec![(0, 8 << 20)],
            vcpus: 2,
            rate_pages_per_s: 5_000,
            working_set_pages: 512,
            tracker: TrackerMode::Ring,
        }
    }
}

#[derive(Debug, Default)]
struct FakeVcpu {
    /// Pages written so far.
    writes: AtomicU64,
    /// CPU throttle, parts per million.
    throttle_ppm: AtomicU64,
    /// Dirty quota in pages/s (0 = none).
    quota: AtomicU64,
}

#[derive(Debug, Default)]
struct RunCtl {
    pause: bool,
    parked: usize,
    quit: bool,
}

#[derive(Debug)]
struct Inner {
    cfg: FakeConfig,
    slots: Vec<SlotSpec>,
    /// Memory, one word array per slot.
    mem: Vec<Vec<AtomicU64>>,
    /// Dirty bits per slot (set by guest writes while tracking).
    dirty: Vec<Vec<AtomicU64>>,
    /// Pages ever written per slot.
    populated: Vec<Vec<AtomicU64>>,
    tracking: AtomicBool,
    /// The next collect reports `tracking_lost` and drops what it found.
    lose_next: AtomicBool,
    /// Every collect from now on drops what it found without saying so, and counts a
    /// ring-full exit: ring overruns no index shows (PVM's emulator overwriting entries of a
    /// full ring).
    lose_silently: AtomicBool,
    /// Ring-full exits reported by [`MigratableVm::ring_full_exits`].
    ring_full_exits: AtomicU64,
    /// Simulated write-protect faults, reported by [`MigratableVm::guest_faults`].
    guest_faults: AtomicU64,
    collects: AtomicU64,
    /// Clear-log after a deferred start: per slot, one bit per 64-page dirty word not yet
    /// protected (all dirty, as KVM's `INITIALLY_SET` log).
    pending: Vec<Vec<AtomicU64>>,
    /// Some word is pending.
    any_pending: AtomicBool,
    /// Pages read while their word was pending (a bulk pass that reads before it protects).
    reads_unprotected: AtomicU64,
    /// `protect_before_read` calls that protected something.
    protects: AtomicU64,
    vcpus: Vec<FakeVcpu>,
    /// Fast path for the guest threads: a pause or quit is pending.
    stop_flag: AtomicBool,
    ctl: Mutex<RunCtl>,
    cv: Condvar,
}

impl Inner {
    fn ctl(&self) -> MutexGuard<'_, RunCtl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (slot index, page index in the slot) of `gpa`.
    fn locate(&self, gpa: u64) -> Result<(usize, usize)> {
        self.slots
            .iter()
            .position(|s| s.contains_gpa(gpa))
            .map(|i| {
                let s = &self.slots[i];
                (i, ((gpa - s.guest_phys_addr) / PAGE_SIZE) as usize)
            })
            .ok_or_else(|| MigrationError::Internal(format!("{gpa:#x} is not fake guest RAM")))
    }

    /// The `n`-th page of memory in GPA order.
    fn nth_page(&self, mut n: u64) -> (usize, usize) {
        for (i, s) in self.slots.iter().enumerate() {
            if n < s.pages {
                return (i, n as usize);
            }
            n -= s.pages;
        }
        (0, 0)
    }

    fn write(&self, slot: usize, page: usize, words: &[u64]) {
        let base = page * WORDS_PER_PAGE;
        for (i, w) in words.iter().enumerate().take(WORDS_PER_PAGE) {
            self.mem[slot][base + i].store(*w, Ordering::Relaxed);
        }
        let (word, bit) = (page / 64, 1u64 << (page % 64));
        self.populated[slot][word].fetch_or(bit, Ordering::Relaxed);
        if self.tracking.load(Ordering::Relaxed) {
            // Release: a collect that sees the bit sees the data.
            let old = self.dirty[slot][word].fetch_or(bit, Ordering::Release);
            // As KVM: the first write to a page since tracking started or a collect
            // re-protected it is a write-protect fault.
            if old & bit == 0 {
                self.guest_faults.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn is_pending(&self, slot: usize, word: usize) -> bool {
        self.pending[slot][word / 64].load(Ordering::SeqCst) >> (word % 64) & 1 == 1
    }

    fn clear_pending(&self) {
        self.any_pending.store(false, Ordering::SeqCst);
        for p in self.pending.iter().flatten() {
            p.store(0, Ordering::SeqCst);
        }
    }

    /// Parks the calling guest thread while a pause is requested; false to quit.
    fn park_if_asked(&self) -> bool {
        if !self.stop_flag.load(Ordering::Acquire) {
            return true;
        }
        let mut c = self.ctl();
        if c.pause && !c.quit {
            c.parked += 1;
            self.cv.notify_all();
            while c.pause && !c.quit {
                c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
            }
            c.parked -= 1;
        }
        !c.quit
    }
}

fn words(slot: &SlotSpec) -> Vec<AtomicU64> {
    (0..slot.pages as usize * WORDS_PER_PAGE)
        .map(|_| AtomicU64::new(0))
        .collect()
}

fn bits(slot: &SlotSpec) -> Vec<AtomicU64> {
    (0..slot.bitmap_words())
        .map(|_| AtomicU64::new(0))
        .collect()
}

/// An in-memory VM with a guest that writes pages; see the module docs.
#[derive(Debug)]
pub struct FakeVm {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl FakeVm {
    /// Builds the VM (memory zero, guest not started).
    pub fn new(cfg: FakeConfig) -> Result<FakeVm> {
        let slots: Vec<SlotSpec> = cfg
            .regions
            .iter()
            .enumerate()
            .map(|(i, &(gpa, bytes))| SlotSpec {
                id: SlotId(i as u32),
                guest_phys_addr: gpa,
                pages: bytes / PAGE_SIZE,
                log_dirty: true,
            })
            .collect();
        if slots
            .iter()
            .any(|s| s.pages == 0 || s.guest_phys_addr % PAGE_SIZE != 0)
        {
            return Err(MigrationError::Internal(
                "fake regions must be page aligned and not empty".into(),
            ));
        }
        let pending = slots
            .iter()
            .map(|s| {
                (0..s.bitmap_words().div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        let inner = Inner {
            mem: slots.iter().map(words).collect(),
            dirty: slots.iter().map(bits).collect(),
            populated: slots.iter().map(bits).collect(),
            vcpus: (0..cfg.vcpus).map(|_| FakeVcpu::default()).collect(),
            slots,
            cfg,
            tracking: AtomicBool::new(false),
            lose_next: AtomicBool::new(false),
            lose_silently: AtomicBool::new(false),
            ring_full_exits: AtomicU64::new(0),
            guest_faults: AtomicU64::new(0),
            collects: AtomicU64::new(0),
            pending,
            any_pending: AtomicBool::new(false),
            reads_unprotected: AtomicU64::new(0),
            protects: AtomicU64::new(0),
            stop_flag: AtomicBool::new(false),
            ctl: Mutex::new(RunCtl::default()),
            cv: Condvar::new(),
        };
        Ok(FakeVm {
            inner: Arc::new(inner),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Starts the guest threads.
    pub fn start(&self) -> Result<()> {
        let mut t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if !t.is_empty() {
            return Err(MigrationError::Internal(
                "fake guest already started".into(),
            ));
        }
        for i in 0..self.inner.cfg.vcpus {
            let inner = self.inner.clone();
            t.push(
                std::thread::Builder::new()
                    .name(format!("fake-vcpu{i}"))
                    .spawn(move || guest_loop(&inner, i))?,
            );
        }
        Ok(())
    }

    /// Stops and joins the guest threads.
    pub fn stop(&self) {
        {
            let mut c = self.inner.ctl();
            c.quit = true;
            self.inner.stop_flag.store(true, Ordering::Release);
            self.inner.cv.notify_all();
        }
        let mut t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for h in t.drain(..) {
            let _ = h.join();
        }
    }

    /// Pages the guest has written so far (all vCPUs).
    pub fn writes(&self) -> u64 {
        self.inner
            .vcpus
            .iter()
            .map(|v| v.writes.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether the guest is paused (every thread parked).
    pub fn is_paused(&self) -> bool {
        let threads = self.thread_count();
        let c = self.inner.ctl();
        c.pause && c.parked == threads
    }

    fn thread_count(&self) -> usize {
        self.threads.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// The CPU throttle in force on vCPU `i`, percent.
    pub fn throttle_percent(&self, i: usize) -> u8 {
        self.inner
            .vcpus
            .get(i)
            .map(|v| (v.throttle_ppm.load(Ordering::Relaxed) / 10_000) as u8)
            .unwrap_or(0)
    }

    /// The dirty quota in force on vCPU `i`, pages/s (`None` = no limit).
    pub fn dirty_quota(&self, i: usize) -> Option<u64> {
        let q = self.inner.vcpus.get(i)?.quota.load(Ordering::Relaxed);
        (q > 0).then_some(q)
    }

    /// Makes the next collect report `tracking_lost` and drop the pages it found, as a ring
    /// that overran does.
    pub fn lose_tracking_once(&self) {
        self.inner.lose_next.store(true, Ordering::SeqCst);
    }

    /// Makes every later collect drop the pages it found without reporting a loss, and count
    /// a ring-full exit, as overruns of a full ring that no index shows would: every page the
    /// guest writes from now on is lost to the tracker.
    pub fn lose_silently(&self) {
        self.inner.lose_silently.store(true, Ordering::SeqCst);
    }

    /// Pages read for sending while still unprotected after a deferred start (a bulk pass
    /// must protect a chunk before it reads it).
    pub fn reads_before_protect(&self) -> u64 {
        self.inner.reads_unprotected.load(Ordering::SeqCst)
    }

    /// `protect_before_read` calls that protected pending pages (clear-log).
    pub fn protected_chunks(&self) -> u64 {
        self.inner.protects.load(Ordering::SeqCst)
    }

    /// Collects so far (by any tracker of this VM).
    pub fn collects(&self) -> u64 {
        self.inner.collects.load(Ordering::SeqCst)
    }

    /// Writes `data` (one page) at `gpa`, as the VMM would (tracked).
    pub fn write_page(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let (slot, page) = self.inner.locate(gpa)?;
        if data.len() != PAGE_SIZE as usize {
            return Err(MigrationError::Internal("not one page".into()));
        }
        let mut w = [0u64; WORDS_PER_PAGE];
        for (i, c) in data.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            w[i] = u64::from_le_bytes(b);
        }
        self.inner.write(slot, page, &w);
        Ok(())
    }

    /// Digest of all memory (pause the guest first for a stable answer).
    pub fn digest(&self) -> Result<migration::digest::MemoryDigest> {
        crate::source::memory_digest(self)
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One guest thread: writes a unique value into pages of its share of the working set,
/// paced to its rate, its dirty quota and its CPU throttle.
fn guest_loop(inner: &Inner, i: usize) {
    let cfg = &inner.cfg;
    let n = cfg.vcpus.max(1) as u64;
    let total: u64 = inner.slots.iter().map(|s| s.pages).sum();
    let ws = cfg.working_set_pages.clamp(1, total.max(1));
    let share = (ws / n).max(1);
    let first = (i as u64 * share).min(ws - 1);
    let per_vcpu_rate = if cfg.rate_pages_per_s == u64::MAX {
        u64::MAX
    } else {
        cfg.rate_pages_per_s / n
    };
    let v = &inner.vcpus[i];
    let mut seq = 0u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
    let mut page_words = [0u64; WORDS_PER_PAGE];
    let mut window = Instant::now();
    let mut in_window = 0u64;
    let mut ran_since_sleep = Instant::now();
    while inner.park_if_asked() {
        let quota = v.quota.load(Ordering::Relaxed);
        let rate = match quota {
            0 => per_vcpu_rate,
            q => q.min(per_vcpu_rate),
        };
        if rate == 0 {
            // Idle: check for a pause now and then.
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        // xorshift: a pseudo-random page of the share.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (slot, page) = inner.nth_page(first + x % share);
        seq += 1;
        let value = (i as u64) << 48 | seq;
        page_words[0] = value;
        page_words[1 + (seq as usize % (WORDS_PER_PAGE - 1))] = value;
        inner.write(slot, page, &page_words);
        v.writes.fetch_add(1, Ordering::Relaxed);
        in_window += 1;
        pace(rate, &mut window, &mut in_window);
        throttle(inner, v, &mut ran_since_sleep);
    }
}

/// Sleeps when the thread is ahead of `rate` pages/s (windows of 10 ms).
fn pace(rate: u64, window: &mut Instant, in_window: &mut u64) {
    if rate == u64::MAX {
        return;
    }
    let allowed = (rate as f64 * 0.01).max(1.0) as u64;
    if *in_window >= allowed {
        let elapsed = window.elapsed();
        let slot = Duration::from_secs_f64(*in_window as f64 / rate as f64);
        if slot > elapsed {
            std::thread::sleep(slot - elapsed);
        }
        *window = Instant::now();
        *in_window = 0;
    }
}

/// Sleeps `f / (1 - f)` of the time run since the last sleep, once per 10 ms of running (a
/// pause request cuts the sleep short, as a kick does for a real vCPU).
fn throttle(inner: &Inner, v: &FakeVcpu, ran: &mut Instant) {
    let r = ran.elapsed();
    if r < Duration::from_millis(10) {
        return;
    }
    let ppm = v.throttle_ppm.load(Ordering::Relaxed);
    if ppm > 0 {
        let f = (ppm as f64 / 1e6).min(0.99);
        let until = Instant::now() + r.mul_f64(f / (1.0 - f));
        while Instant::now() < until && !inner.stop_flag.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1).min(until - Instant::now()));
        }
    }
    *ran = Instant::now();
}

/// The fake VM's software dirty tracker.
struct FakeTracker {
    inner: Arc<Inner>,
    started: bool,
    buf: Vec<u64>,
}

impl DirtyTracker for FakeTracker {
    fn mode(&self) -> TrackerMode {
        self.inner.cfg.tracker
    }
    fn start(&mut self) -> kvm_dirty::Result<()> {
        self.inner.clear_pending();
        for d in &self.inner.dirty {
            d.iter().for_each(|w| w.store(0, Ordering::Relaxed));
        }
        self.inner.tracking.store(true, Ordering::SeqCst);
        self.started = true;
        Ok(())
    }
    /// Clear-log: KVM's `INITIALLY_SET` log, every page dirty and pending until protected.
    fn start_deferred(&mut self) -> kvm_dirty::Result<()> {
        if self.inner.cfg.tracker != TrackerMode::ClearLog {
            return self.start();
        }
        for (s, (d, p)) in self
            .inner
            .slots
            .iter()
            .zip(self.inner.dirty.iter().zip(&self.inner.pending))
        {
            for (w, word) in d.iter().enumerate() {
                word.store(s.word_mask(w), Ordering::SeqCst);
                p[w / 64].fetch_or(1 << (w % 64), Ordering::SeqCst);
            }
        }
        self.inner.any_pending.store(true, Ordering::SeqCst);
        self.inner.tracking.store(true, Ordering::SeqCst);
        self.started = true;
        Ok(())
    }
    fn protect_before_read(&mut self, gpa: u64, pages: u64) -> kvm_dirty::Result<()> {
        if !self.started {
            return Err(kvm_dirty::DirtyError::NotStarted);
        }
        if !self.inner.any_pending.load(Ordering::SeqCst) {
            return Ok(());
        }
        let end = gpa.saturating_add(pages.saturating_mul(PAGE_SIZE));
        let mut protected = false;
        for (i, s) in self.inner.slots.iter().enumerate() {
            let hi = s.guest_phys_addr + s.bytes();
            if end <= s.guest_phys_addr || gpa >= hi {
                continue;
            }
            let first = (gpa.max(s.guest_phys_addr) - s.guest_phys_addr) / PAGE_SIZE / 64;
            let last = (end.min(hi) - s.guest_phys_addr).div_ceil(PAGE_SIZE * 64);
            for w in first as usize..last as usize {
                if self.inner.is_pending(i, w) {
                    // Protect (the dirty bits go), then no longer pending.
                    self.inner.dirty[i][w].store(0, Ordering::SeqCst);
                    self.inner.pending[i][w / 64].fetch_and(!(1 << (w % 64)), Ordering::SeqCst);
                    protected = true;
                }
            }
        }
        if protected {
            self.inner.protects.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
    fn collect(&mut self, out: &mut DirtyPageSet) -> kvm_dirty::Result<CollectStats> {
        if !self.started {
            return Err(kvm_dirty::DirtyError::NotStarted);
        }
        self.inner.collects.fetch_add(1, Ordering::SeqCst);
        // Pending words are still all dirty in `dirty`: this collect reports and protects
        // them.
        self.inner.clear_pending();
        let lost = self.inner.lose_next.swap(false, Ordering::SeqCst);
        let silent = self.inner.lose_silently.load(Ordering::SeqCst);
        if silent {
            self.inner.ring_full_exits.fetch_add(1, Ordering::SeqCst);
        }
        let mut st = CollectStats {
            tracking_lost: lost,
            ..CollectStats::default()
        };
        for (s, d) in self.inner.slots.iter().zip(&self.inner.dirty) {
            self.buf.clear();
            self.buf
                .extend(d.iter().map(|w| w.swap(0, Ordering::Acquire)));
            // A lost ring drops what it held: those pages are not reported.
            if lost || silent {
                continue;
            }
            st.ring_entries += self
                .buf
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>();
            if let Some(i) = out.slot_index(s.id.0) {
                out.or_words(i, &self.buf);
            }
        }
        Ok(st)
    }
    fn stop(&mut self) -> kvm_dirty::Result<()> {
        self.inner.clear_pending();
        self.inner.tracking.store(false, Ordering::SeqCst);
        self.started = false;
        Ok(())
    }
}

struct FakeCounters(Arc<Inner>);

impl VcpuDirtyCounters for FakeCounters {
    fn poll_counts(&self, _high_water: f64, out: &mut Vec<u64>) -> Result<()> {
        out.clear();
        out.extend(
            self.0
                .vcpus
                .iter()
                .map(|v| v.writes.load(Ordering::Relaxed)),
        );
        Ok(())
    }
}

struct FakeLimiter(Arc<Inner>);

impl DirtyLimitActuator for FakeLimiter {
    fn set_quota(&self, bytes_per_s: Option<u64>, vcpus: Option<Vec<usize>>) {
        for (i, v) in self.0.vcpus.iter().enumerate() {
            let on = vcpus.as_ref().is_none_or(|o| o.contains(&i));
            let q = match bytes_per_s {
                Some(b) if on => (b / PAGE_SIZE).max(1),
                _ => 0,
            };
            v.quota.store(q, Ordering::Relaxed);
        }
    }
}

impl Drop for FakeLimiter {
    fn drop(&mut self) {
        self.set_quota(None, None);
    }
}

impl MigratableVm for FakeVm {
    fn machine(&self) -> u32 {
        FAKE_MACHINE
    }
    fn ring_full_exits(&self) -> u64 {
        self.inner.ring_full_exits.load(Ordering::SeqCst)
    }
    fn guest_faults(&self) -> Option<u64> {
        Some(self.inner.guest_faults.load(Ordering::SeqCst))
    }
    fn tracker_mode(&self) -> TrackerMode {
        self.inner.cfg.tracker
    }
    fn vcpu_count(&self) -> usize {
        self.inner.cfg.vcpus
    }
    fn slots(&self) -> Vec<SlotSpec> {
        self.inner.slots.clone()
    }
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let (slot, page) = self.inner.locate(gpa)?;
        if self.inner.any_pending.load(Ordering::SeqCst) && self.inner.is_pending(slot, page / 64) {
            self.inner.reads_unprotected.fetch_add(1, Ordering::SeqCst);
        }
        let base = page * WORDS_PER_PAGE;
        for (i, c) in buf.chunks_exact_mut(8).enumerate().take(WORDS_PER_PAGE) {
            c.copy_from_slice(
                &self.inner.mem[slot][base + i]
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            );
        }
        Ok(())
    }
    fn populated(&self, gpa: u64, pages: u64, out: &mut Vec<u64>) -> Result<()> {
        let (slot, first) = self.inner.locate(gpa)?;
        let bits = &self.inner.populated[slot];
        out.clear();
        out.resize(pages.div_ceil(64) as usize, 0);
        for p in 0..pages as usize {
            let q = first + p;
            if bits
                .get(q / 64)
                .is_some_and(|w| w.load(Ordering::Relaxed) >> (q % 64) & 1 == 1)
            {
                out[p / 64] |= 1 << (p % 64);
            }
        }
        Ok(())
    }
    fn tracker(&self) -> Result<Box<dyn DirtyTracker>> {
        Ok(Box::new(FakeTracker {
            inner: self.inner.clone(),
            started: false,
            buf: Vec::new(),
        }))
    }
    fn pause(&self, timeout: Duration) -> Result<()> {
        let threads = self.thread_count();
        let deadline = Instant::now() + timeout;
        let mut c = self.inner.ctl();
        c.pause = true;
        self.inner.stop_flag.store(true, Ordering::Release);
        while c.parked < threads && !c.quit {
            let now = Instant::now();
            if now >= deadline {
                return Err(MigrationError::Internal("fake vCPUs did not park".into()));
            }
            c = self
                .inner
                .cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }
    fn resume(&self) {
        let mut c = self.inner.ctl();
        c.pause = false;
        if !c.quit {
            self.inner.stop_flag.store(false, Ordering::Release);
        }
        self.inner.cv.notify_all();
    }
    fn is_running(&self) -> bool {
        let threads = self.thread_count();
        threads > 0 && !self.inner.ctl().quit
    }
    fn dirty_counters(&self) -> Option<Arc<dyn VcpuDirtyCounters>> {
        (self.inner.cfg.tracker == TrackerMode::Ring)
            .then(|| Arc::new(FakeCounters(self.inner.clone())) as Arc<dyn VcpuDirtyCounters>)
    }
    fn start_dirty_limiter(&self) -> Result<Box<dyn DirtyLimitActuator>> {
        if self.inner.cfg.tracker != TrackerMode::Ring {
            return Err(MigrationError::Protocol(
                "dirty-limit needs the ring tracker (use auto-converge with the bitmap)".into(),
            ));
        }
        Ok(Box::new(FakeLimiter(self.inner.clone())))
    }
    fn set_cpu_throttle(&self, percent: u8) {
        for v in &self.inner.vcpus {
            v.throttle_ppm
                .store(u64::from(percent.min(99)) * 10_000, Ordering::Relaxed);
        }
    }
    fn save_vcpus(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .inner
            .vcpus
            .iter()
            .map(|v| v.writes.load(Ordering::Relaxed).to_le_bytes().to_vec())
            .collect())
    }
    fn save_machine(&self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
}

/// Where a [`FakeDestination`] fails on purpose (it then answers `Error`, as the real
/// destination does when it cannot go on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestFault {
    /// Refuses the Hello.
    Refuse,
    /// Fails when the vCPU state arrives (the source is paused by then).
    Restore,
    /// Stores the first page it receives with one bit flipped (a fault past the stream's
    /// checksums: memory, a bug), which only the Complete digest can catch.
    CorruptPage,
}

/// What a [`FakeDestination`] received.
#[derive(Debug)]
pub struct FakeIncoming {
    /// The restored VM (guest not started: its memory is what the stream carried).
    pub vm: FakeVm,
    /// The vCPU blobs, in index order.
    pub vcpu_states: Vec<Vec<u8>>,
    /// Passes received.
    pub passes: u32,
    /// Pages received (zero markers included).
    pub pages: u64,
}

/// The receiving side for a fake guest; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct FakeDestination {
    /// Fail on purpose.
    pub fault: Option<DestFault>,
}

struct FakeSink<'a> {
    vm: &'a FakeVm,
    digest: IncrementalDigest,
    err: Option<MigrationError>,
    /// A page still to corrupt ([`DestFault::CorruptPage`]).
    corrupt: bool,
}

impl PageSink for FakeSink<'_> {
    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        if std::mem::take(&mut self.corrupt) {
            let mut bad = [0u8; PAGE_SIZE as usize];
            let n = data.len().min(bad.len());
            bad[..n].copy_from_slice(&data[..n]);
            bad[0] ^= 1;
            if let Err(e) = self.vm.write_page(gpa, &bad) {
                self.err.get_or_insert(e);
            }
            self.digest.record_page(gpa, &bad);
            return;
        }
        if let Err(e) = self.vm.write_page(gpa, data) {
            self.err.get_or_insert(e);
        }
        self.digest.record_page(gpa, data);
    }
    fn zero_page(&mut self, gpa: u64) {
        if let Err(e) = self.vm.write_page(gpa, &[0u8; PAGE_SIZE as usize]) {
            self.err.get_or_insert(e);
        }
        self.digest.record_zero(gpa);
    }
}

struct NoSink;
impl PageSink for NoSink {
    fn write_page(&mut self, _: u64, _: &[u8]) {}
    fn zero_page(&mut self, _: u64) {}
}

impl FakeDestination {
    /// Receives one migration from `stream` into a new [`FakeVm`] and answers Resumed after
    /// the Commit. An error before Commit is reported to the source.
    pub fn receive(&self, stream: TcpStream) -> Result<FakeIncoming> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut acks = AckWriter::new(BufWriter::new(stream.try_clone()?));
        let mut dec = Decoder::new(BufReader::new(stream));
        let r = self.receive_inner(&mut dec, &mut acks);
        if let Err(e) = &r {
            let _ = acks.send(&Ack::Error(e.to_string()));
        }
        r
    }

    fn receive_inner(
        &self,
        dec: &mut Decoder<BufReader<TcpStream>>,
        acks: &mut AckWriter<BufWriter<TcpStream>>,
    ) -> Result<FakeIncoming> {
        let vcpus = match dec.recv(&mut NoSink)? {
            Message::Hello(h) if h.machine == FAKE_MACHINE => h.vcpus as usize,
            m => {
                return Err(MigrationError::Protocol(format!(
                    "expected a fake Hello, got {m:?}"
                )))
            }
        };
        let layout = match dec.recv(&mut NoSink)? {
            Message::Layout(l) => l,
            m => {
                return Err(MigrationError::Protocol(format!(
                    "expected Layout, got {m:?}"
                )))
            }
        };
        if self.fault == Some(DestFault::Refuse) {
            return Err(MigrationError::Destination("refused on purpose".into()));
        }
        let vm = FakeVm::new(FakeConfig {
            regions: layout
                .regions()
                .iter()
                .map(|r| (r.guest_phys_addr, r.size))
                .collect(),
            vcpus,
            rate_pages_per_s: 0,
            working_set_pages: 1,
            tracker: TrackerMode::Ring,
        })?;
        acks.send(&Ack::Accepted)?;
        let mut sink = FakeSink {
            vm: &vm,
            digest: IncrementalDigest::new(&layout),
            err: None,
            corrupt: self.fault == Some(DestFault::CorruptPage),
        };
        let mut states = vec![Vec::new(); vcpus];
        let mut passes = 0;
        loop {
            match dec.recv(&mut sink)? {
                Message::Pages(_) => {
                    if let Some(e) = sink.err.take() {
                        return Err(e);
                    }
                }
                Message::Iteration(m) => passes = m.iteration + 1,
                Message::State(b) => {
                    if self.fault == Some(DestFault::Restore) {
                        return Err(MigrationError::Destination(
                            "restore failed on purpose".into(),
                        ));
                    }
                    let slot = states.get_mut(b.instance as usize).ok_or_else(|| {
                        MigrationError::Protocol(format!("state for vCPU {}", b.instance))
                    })?;
                    *slot = b.data;
                }
                Message::Sync(t) => acks.send(&Ack::Synced(t))?,
                Message::Complete(c) => {
                    // As the real destination: the source's digest, when it sent one, is
                    // checked before ReadyToResume.
                    if let Some(src) = &c.digest {
                        src.verify(&sink.digest.digest())
                            .map_err(MigrationError::Digest)?;
                    }
                    break;
                }
                Message::Abort(reason) => return Err(MigrationError::SourceAborted(reason)),
                m => return Err(MigrationError::Protocol(format!("unexpected {m:?}"))),
            }
        }
        acks.send(&Ack::ReadyToResume {
            digest: Some(sink.digest.digest()),
        })?;
        match dec.recv(&mut NoSink)? {
            Message::Commit => {}
            Message::Abort(reason) => return Err(MigrationError::SourceAborted(reason)),
            m => {
                return Err(MigrationError::Protocol(format!(
                    "expected Commit, got {m:?}"
                )))
            }
        }
        acks.send(&Ack::Resumed {
            unix_ns: crate::unix_ns(),
        })?;
        Ok(FakeIncoming {
            vm,
            vcpu_states: states,
            passes,
            pages: dec.stats().pages,
        })
    }
}
