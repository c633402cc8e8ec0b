//! The source side: pre-copy passes driven by a dirty tracker, switchover, two-phase commit.

use std::io::BufWriter;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_dirty::{DirtyPageSet, RingSet, TrackerMode, PAGE_SIZE};
use migration::wire::{
    Ack, AckReader, Complete, Encoder, Hello, IterationMarker, MemoryLayout, PageKind, Region,
};
use vmm::Vm;

use crate::dirtylimit::{DirtyLimiter, LimiterConfig};
use crate::error::{MigrationError, Result};
use crate::job::{Control, MigrationStatus};
use crate::rate::RateMeter;
use crate::summary::{IterationStats, MigrationSummary, Outcome};
use crate::{unix_ns, STATE_KIND_MACHINE, STATE_KIND_VCPU};

/// What to do when `timeout` passes before the migration converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TimeoutAction {
    /// Abort: the guest keeps running on the source.
    Abort,
    /// Switch over now, whatever the downtime.
    ForceSwitchover,
}

/// Source parameters (QEMU names where QEMU has them).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceOptions {
    /// `downtime-limit`: the longest pause allowed at switchover.
    pub downtime_limit: Duration,
    /// `max-bandwidth` in bytes/s (None = unlimited). It caps the pre-copy passes; the final
    /// pass, with the guest paused, goes at full speed (as in QEMU).
    pub max_bandwidth: Option<u64>,
    /// Give up (or force) after this long.
    pub timeout: Option<Duration>,
    /// What `timeout` does.
    pub on_timeout: TimeoutAction,
    /// Compare a digest of the source's paused memory with the destination's.
    pub verify: bool,
    /// Do that comparison before committing (a mismatch then aborts and the source keeps the
    /// guest), at the price of the digest time inside the downtime. By default it runs right
    /// after the commit, when the source's memory is still frozen, and only reports.
    pub verify_before_commit: bool,
    /// Ring mode: how often the collector thread peeks the rings.
    pub poll_interval: Duration,
    /// Ring mode: harvest and reset a ring early once this fraction of its soft limit is used
    /// (high, so a hot set is re-protected once per pass rather than mid-pass; the collector
    /// polls every few ms, well before the soft limit is reached).
    pub high_water: f64,
    /// Give up after this many passes (a safety net behind `timeout`).
    pub max_iterations: u32,
    /// `dirty-limit`: per-vCPU dirty quota (ring tracker only), fixed or applied automatically
    /// to the fastest vCPUs when pre-copy does not converge.
    pub dirty_limit: DirtyLimitMode,
    /// Bitmap trackers: QEMU's auto-converge (CPU throttle 20%, +10% per non-converging
    /// check, at most 99%) when pre-copy does not converge.
    pub auto_converge: bool,
    /// Fault injection for tests: drop the TCP connection at this point.
    #[serde(skip)]
    pub fail_at: Option<FailPoint>,
}

/// The dirty limit during a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DirtyLimitMode {
    /// No limit.
    Off,
    /// This many bytes/s per vCPU, from the start of the migration.
    Fixed(u64),
    /// When pre-copy stops converging (the dirty bytes of a pass exceed half of what the
    /// previous pass sent, twice in a row), limit the vCPUs dirtying faster than average so
    /// the guest dirties at most half the measured bandwidth; lifted at switchover.
    Auto,
}

/// Where [`SourceOptions::fail_at`] drops the connection (a real `shutdown(2)` of the socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// Right after sending Hello and Layout.
    Handshake,
    /// In the middle of the bulk pass.
    BulkPass,
    /// In the middle of the first dirty pass.
    DirtyPass,
    /// After pausing the vCPUs, during the final pass.
    Switchover,
    /// After Complete, before the destination's ReadyToResume arrives.
    BeforeFinalAck,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            timeout: None,
            on_timeout: TimeoutAction::Abort,
            verify: true,
            verify_before_commit: false,
            poll_interval: Duration::from_millis(5),
            high_water: 0.95,
            max_iterations: 10_000,
            dirty_limit: DirtyLimitMode::Off,
            auto_converge: false,
            fail_at: None,
        }
    }
}

/// A snapshot for progress displays.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Current pass (0 = bulk).
    pub iteration: u32,
    /// Pages sent in this pass so far.
    pub pass_sent: u64,
    /// Pages this pass carries.
    pub pass_pages: u64,
    /// Bytes sent so far.
    pub bytes: u64,
    /// Measured bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Pages dirty at the last collect.
    pub dirty_pages: u64,
}

struct Collector {
    stop: Arc<AtomicBool>,
    meter: Arc<Mutex<RateMeter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    /// Peeks the rings continuously (per-vCPU counts), and harvests + resets a ring only at
    /// the high-water mark, so hot pages are re-protected once per pass, not per peek.
    fn start(rs: Arc<RingSet>, poll: Duration, high_water: u32) -> Collector {
        let stop = Arc::new(AtomicBool::new(false));
        let meter = Arc::new(Mutex::new(RateMeter::new(Duration::from_secs(1))));
        let (s, m) = (stop.clone(), meter.clone());
        let thread = std::thread::Builder::new()
            .name("ring-collector".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    // A failure here resurfaces in the next collect, which reports it.
                    if let Err(e) = rs.poll(high_water) {
                        tracing::debug!(error = %e, "ring collector: poll failed");
                    }
                    let counts = (0..rs.vcpus()).map(|i| rs.vcpu_dirty_seen(i)).collect();
                    if let Ok(mut m) = m.lock() {
                        m.sample(Instant::now(), counts);
                    }
                    std::thread::sleep(poll);
                }
            })
            .ok();
        Collector {
            stop,
            meter,
            thread,
        }
    }

    fn rates(&self) -> Vec<f64> {
        self.meter.lock().map(|m| m.rates()).unwrap_or_default()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The layout of a VM's memory for the wire.
pub fn layout_of(vm: &Vm) -> Result<MemoryLayout> {
    let regions = vm
        .ram()
        .regions()
        .iter()
        .map(|r| Region {
            slot: u32::from(r.slot),
            guest_phys_addr: r.gpa,
            size: r.bytes,
        })
        .collect();
    Ok(MemoryLayout::new(regions)?)
}

/// Digest of the VM's memory as it is now (the vCPUs must be paused).
pub fn memory_digest(vm: &Vm) -> Result<migration::digest::MemoryDigest> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let zero_hash = migration::digest::page_hash(&page);
    let mut regions = Vec::new();
    let mut populated = Populated::new();
    for r in vm.ram().regions() {
        let mut sum = 0u64;
        for p in 0..r.bytes / PAGE_SIZE {
            let gpa = r.gpa + p * PAGE_SIZE;
            // A page never populated is zero: hashed without faulting it in.
            let h = if populated.may_hold_data(vm.ram(), gpa)? {
                vm.ram().read(gpa, &mut page)?;
                migration::digest::page_hash(&page)
            } else {
                zero_hash
            };
            sum = sum.wrapping_add(migration::digest::page_term(gpa, h));
        }
        regions.push(sum);
    }
    Ok(migration::digest::MemoryDigest { regions })
}

/// Nice value of the threads moving a guest (source sender, destination receiver): below the
/// vCPU threads' priority, so a co-located guest keeps its CPU while it is migrated.
pub const MIGRATION_NICE: i32 = 10;

/// A final pass of at most this many pages (1 MiB) is sent without trying another pass.
const SMALL_FINAL_PAGES: u64 = 256;
/// Nor is one expected to take at most this long (seconds; or a tenth of the limit).
const TINY_FINAL_PASS: f64 = 0.001;
/// Once the rest fits the downtime limit, another pass is sent while each collect finds at
/// most this fraction of the one before ...
const REFINE_SHRINK: f64 = 0.5;
/// ... for at most this many passes.
const MAX_REFINING_PASSES: u32 = 8;

/// Pages per `/proc/self/pagemap` query in the bulk pass (64 MiB, 128 KiB of pagemap).
pub(crate) const POPULATED_CHUNK: u64 = 16384;

/// Which pages of the bulk pass were ever populated, a chunk at a time: the bulk pass sends
/// a never-populated page as a zero marker without reading (and so faulting in) it.
struct Populated {
    start: u64,
    pages: u64,
    bits: Vec<u64>,
}

impl Populated {
    fn new() -> Self {
        Populated {
            start: 0,
            pages: 0,
            bits: Vec::new(),
        }
    }

    fn may_hold_data(&mut self, ram: &vmm::GuestRam, gpa: u64) -> Result<bool> {
        if gpa < self.start || gpa >= self.start + self.pages * PAGE_SIZE {
            let r = ram
                .regions()
                .iter()
                .find(|r| gpa >= r.gpa && gpa < r.end())
                .ok_or_else(|| MigrationError::Internal(format!("{gpa:#x} is not guest RAM")))?;
            let pages = ((r.end() - gpa) / PAGE_SIZE).min(POPULATED_CHUNK);
            ram.populated(gpa, pages, &mut self.bits)?;
            self.start = gpa;
            self.pages = pages;
        }
        let i = (gpa - self.start) / PAGE_SIZE;
        Ok(self.bits[(i / 64) as usize] >> (i % 64) & 1 == 1)
    }
}

struct Sender<'a> {
    vm: &'a Vm,
    ctl: &'a Control,
    sock: TcpStream,
    fail_at: Option<FailPoint>,
    enc: Encoder<BufWriter<TcpStream>>,
    buf: Vec<u8>,
    limiter: migration::bandwidth::TokenBucket,
    /// Bytes and seconds spent sending data, for the bandwidth estimate.
    bw_bytes: u64,
    bw_secs: f64,
    /// Encoder byte count at the last limiter accounting.
    accounted: u64,
}

impl<'a> Sender<'a> {
    /// Sets up the socket and the encoder; returns the sender and the reader of the
    /// destination's answers.
    fn open(
        vm: &'a Vm,
        stream: TcpStream,
        ctl: &'a Control,
        opts: &SourceOptions,
    ) -> Result<(Self, AckReader<std::io::BufReader<TcpStream>>)> {
        let io_timeout = Duration::from_secs(60);
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(io_timeout))?;
        stream.set_read_timeout(Some(io_timeout))?;
        ctl.attach_socket(stream.try_clone()?)?;
        let acks = AckReader::new(std::io::BufReader::new(stream.try_clone()?));
        let s = Sender {
            vm,
            ctl,
            sock: stream.try_clone()?,
            fail_at: opts.fail_at,
            enc: Encoder::new(BufWriter::with_capacity(1 << 20, stream)),
            buf: vec![0u8; PAGE_SIZE as usize],
            limiter: migration::bandwidth::TokenBucket::new(opts.max_bandwidth.unwrap_or(0)),
            bw_bytes: 0,
            bw_secs: 0.0,
            accounted: 0,
        };
        Ok((s, acks))
    }

    fn cut(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Best effort: tells the destination to drop everything (it never waits long for a
    /// destination that stopped reading).
    fn abort(&mut self, reason: &str) {
        let _ = self.sock.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = self.enc.send_abort(reason);
    }

    fn bandwidth(&self, fallback: f64) -> f64 {
        if self.bw_secs > 0.01 && self.bw_bytes > 0 {
            self.bw_bytes as f64 / self.bw_secs
        } else {
            fallback
        }
    }

    /// Every 256 pages: publishes progress, applies a changed max-bandwidth, paces the
    /// pre-copy passes and notices a cancel.
    fn checkpoint(&mut self, final_pass: bool, n: u64) -> Result<()> {
        let tx = self.enc.stats();
        let max_bw = self.ctl.on_pages(tx, n).unwrap_or(0);
        if max_bw != self.limiter.rate() {
            self.limiter.set_rate(max_bw);
        }
        // max-bandwidth caps the pre-copy passes, which share the link with a running
        // guest; the final pass runs with the guest paused, where every millisecond is
        // downtime, so it goes at full speed (QEMU's completion stage does the same).
        if !final_pass {
            let d = self
                .limiter
                .reserve(tx.bytes - self.accounted, Instant::now());
            if !d.is_zero() {
                self.ctl.sleep(d);
            }
        }
        self.accounted = tx.bytes;
        self.ctl.check()
    }

    /// Sends one pass: a marker with the exact count, then every page. Returns
    /// (pages, zero pages, bytes, seconds).
    fn pass(
        &mut self,
        iteration: u32,
        pages: u64,
        final_pass: bool,
        gpas: &mut dyn Iterator<Item = u64>,
        progress: &mut dyn FnMut(&Progress),
        dirty_pages: u64,
    ) -> Result<(u64, u64, u64, f64)> {
        let t = Instant::now();
        tracing::debug!(iteration, pages, final_pass, "migration pass");
        let s0 = self.enc.stats();
        self.ctl.update(|l, _| {
            l.x.pass = iteration;
            l.x.pass_pages_total = pages;
            l.x.pass_pages_sent = 0;
            l.ram.remaining = pages * PAGE_SIZE;
        });
        self.enc.begin_iteration(&IterationMarker {
            iteration,
            pages,
            final_pass,
        })?;
        let mut n = 0u64;
        let mut zero = 0u64;
        let mut last_report = Instant::now();
        // The bulk pass skips reading pages never populated (they are zero); later passes
        // send pages the guest dirtied, which are populated.
        let mut populated = (iteration == 0).then(Populated::new);
        let fail_here = match self.fail_at {
            Some(FailPoint::BulkPass) => iteration == 0,
            Some(FailPoint::DirtyPass) => iteration == 1 && !final_pass,
            Some(FailPoint::Switchover) => final_pass,
            _ => false,
        };
        for gpa in gpas {
            if fail_here && n == pages / 2 {
                self.cut();
            }
            let skip = match populated.as_mut() {
                Some(p) => !p.may_hold_data(self.vm.ram(), gpa)?,
                None => false,
            };
            if skip {
                self.enc.push_zero_page(gpa)?;
                zero += 1;
            } else {
                self.vm.ram().read(gpa, &mut self.buf)?;
                if self.enc.push_page(gpa, &self.buf)? == PageKind::Zero {
                    zero += 1;
                }
            }
            n += 1;
            if n.is_multiple_of(256) {
                self.checkpoint(final_pass, n)?;
                if last_report.elapsed() > Duration::from_millis(100) {
                    last_report = Instant::now();
                    progress(&Progress {
                        iteration,
                        pass_sent: n,
                        pass_pages: pages,
                        bytes: self.accounted,
                        bandwidth: self.bandwidth(0.0),
                        dirty_pages,
                    });
                }
            }
        }
        if n != pages {
            return Err(MigrationError::Internal(format!(
                "pass {iteration} announced {pages} pages but produced {n}"
            )));
        }
        self.enc.flush()?;
        let tx = self.enc.stats();
        self.ctl.on_pages(tx, n);
        let bytes = tx.bytes - s0.bytes;
        let secs = t.elapsed().as_secs_f64();
        if pages - zero > 0 {
            self.bw_bytes += bytes;
            self.bw_secs += secs;
        }
        Ok((n, zero, bytes, secs))
    }
}

/// Migrates `vm` (running) over `stream`, blocking. On success the source VM is stopped and
/// the guest runs on the destination. On any failure before commit the guest keeps running
/// here, and the summary says why (`Outcome::Aborted` / `Outcome::Failed`). For a migration
/// an operator can watch, cancel or retune while it runs, use [`MigrationJob`](crate::job::MigrationJob).
pub fn migrate(
    vm: &mut Vm,
    stream: TcpStream,
    opts: &SourceOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationSummary> {
    let ctl = Control::new(opts.clone(), Box::new(|_| {}));
    ctl.set_status(MigrationStatus::Setup);
    let summary = run_job(vm, Ok(stream), &ctl, progress);
    if summary.completed() {
        // The job leaves a completed source paused; its owner (here) stops it.
        vm.stop()?;
    }
    Ok(summary)
}

/// Runs a whole migration on the calling thread and returns its summary; the job's status
/// ends `completed`, `failed` or `cancelled`. A completed source stays paused.
pub(crate) fn run_job(
    vm: &Vm,
    stream: Result<TcpStream>,
    ctl: &Control,
    progress: &mut dyn FnMut(&Progress),
) -> MigrationSummary {
    let t_start = Instant::now();
    let opts = ctl.opts();
    let mut summary = MigrationSummary::new(vm.config().tracking.mode().name(), &opts);
    let mut paused = false;
    // The guest's vCPUs come first: this thread yields to them when they compete for a core
    // (on a small host the migration would otherwise take CPU time the guest's timer needs).
    let old_nice = vmm::renice_current_thread(MIGRATION_NICE);
    let mut sender = None;
    let r = stream.and_then(|stream| {
        let (s, acks) = Sender::open(vm, stream, ctl, &opts)?;
        let s = sender.insert(s);
        run_source(s, acks, &mut summary, &mut paused, t_start, progress)
    });
    if let Some(n) = old_nice {
        vmm::renice_current_thread(n);
    }
    // A completed migration's total ends at the destination's Resumed (set there), not after
    // the source's post-commit digest check.
    if summary.total_ms == 0.0 {
        summary.total_ms = t_start.elapsed().as_secs_f64() * 1e3;
    }
    if let Err(e) = r {
        let cancelled = ctl.cancelled() || matches!(e, MigrationError::Cancelled);
        tracing::info!(error = %e, cancelled, "migration ended before the commit; the guest keeps running on the source");
        if cancelled {
            if let Some(s) = sender.as_mut() {
                s.abort("cancelled on the source (migrate_cancel)");
            }
        }
        drop(sender);
        // Nothing lost: the guest continues on the source, unthrottled.
        for v in vm.vcpu_handles() {
            v.set_throttle(0.0);
        }
        if paused {
            if let Ok(v) = vm.vcpus() {
                v.resume_all();
            }
        }
        summary.outcome = if cancelled {
            Outcome::Cancelled
        } else {
            Outcome::Failed {
                reason: e.to_string(),
                source_running: vm.vcpus().map(|v| v.check().is_ok()).unwrap_or(false),
            }
        };
    }
    finish_job(ctl, &summary);
    summary
}

/// Publishes the final counters and status.
fn finish_job(ctl: &Control, summary: &MigrationSummary) {
    ctl.update(|l, _| {
        l.total_ms = Some(summary.total_ms as u64);
        l.x.verified = summary.verified;
        if summary.completed() {
            l.downtime_ms = Some(summary.downtime_ms.round() as u64);
            l.ram.remaining = 0;
        }
    });
    let status = match &summary.outcome {
        Outcome::Completed => MigrationStatus::Completed,
        Outcome::Cancelled => MigrationStatus::Cancelled,
        Outcome::Running => MigrationStatus::Failed,
        Outcome::Aborted { reason }
        | Outcome::Failed { reason, .. }
        | Outcome::CommittedUnconfirmed { reason } => {
            ctl.set_error(reason.clone());
            MigrationStatus::Failed
        }
    };
    ctl.set_status(status);
}

fn run_source(
    s: &mut Sender<'_>,
    mut acks: AckReader<std::io::BufReader<TcpStream>>,
    summary: &mut MigrationSummary,
    paused: &mut bool,
    t_start: Instant,
    progress: &mut dyn FnMut(&Progress),
) -> Result<()> {
    let ctl = s.ctl;
    let opts = ctl.opts();
    let layout = layout_of(s.vm)?;
    let mode = s.vm.config().tracking.mode();
    s.enc.send_hello(
        &Hello::new(mode, s.vm.config().vcpus as u32).with_machine(s.vm.platform().wire()),
    )?;
    s.enc.send_layout(&layout)?;
    s.enc.flush()?;
    if s.fail_at == Some(FailPoint::Handshake) {
        s.cut();
    }
    match acks.recv()? {
        Ack::Accepted => {}
        Ack::Error(e) => return Err(MigrationError::Destination(e)),
        other => {
            return Err(MigrationError::Protocol(format!(
                "expected Accepted, got {other:?}"
            )))
        }
    }
    // Tracking starts before the bulk pass: a page written during it is sent again later.
    let mut tracker = s.vm.tracker()?;
    tracker.start()?;
    let mut collector = match (mode, s.vm.ring_set()) {
        (TrackerMode::Ring, Some(rs)) => {
            let soft = rs.capability().size.soft_limit();
            let hw = ((f64::from(soft) * opts.high_water) as u32).max(1);
            Some(Collector::start(rs.clone(), opts.poll_interval, hw))
        }
        _ => None,
    };
    let mut limiter = match (opts.dirty_limit, s.vm.ring_set()) {
        (DirtyLimitMode::Off, _) => None,
        (_, Some(rs)) => Some(DirtyLimiter::start(
            rs.clone(),
            s.vm.vcpu_handles().to_vec(),
            LimiterConfig::default(),
        )),
        (_, None) => {
            return Err(MigrationError::Protocol(
                "dirty-limit needs the ring tracker (use auto-converge with the bitmap)".into(),
            ))
        }
    };
    if let (DirtyLimitMode::Fixed(q), Some(l)) = (opts.dirty_limit, limiter.as_ref()) {
        l.set_quota(Some(q), None);
        summary.dirty_limit_events += 1;
        summary.dirty_limit_bytes_per_s = Some(q);
    }
    let mut applied_limit = opts.dirty_limit;
    let mut streak = 0u32;
    let mut refining_passes = 0u32;
    let mut refine_prev: Option<u64> = None;
    let mut limited: Vec<usize> = Vec::new();
    let mut last_pass_bytes = u64::MAX;
    let mut cpu_throttle = 0.0f64;
    summary.setup_ms = t_start.elapsed().as_secs_f64() * 1e3;
    ctl.update(|l, _| {
        l.setup_ms = Some(summary.setup_ms as u64);
        l.ram.total = layout.total_bytes();
        l.ram.page_size = PAGE_SIZE;
    });
    ctl.set_status(MigrationStatus::Active);
    ctl.dirty_synced();
    let specs = s.vm.ram().slot_specs();
    let mut dirty = DirtyPageSet::new(&specs);
    let total_pages = layout.total_pages();
    let fallback_bw = opts.max_bandwidth.map(|b| b as f64).unwrap_or(1e9);
    // Pass 0: all of memory.
    let t_pass = Instant::now();
    let mut all = layout
        .regions()
        .to_vec()
        .into_iter()
        .flat_map(|r| (0..r.size / PAGE_SIZE).map(move |p| r.guest_phys_addr + p * PAGE_SIZE));
    let (n, z, b, secs) = s.pass(0, total_pages, false, &mut all, progress, total_pages)?;
    summary.push_iteration(IterationStats {
        iteration: 0,
        pages: n,
        zero_pages: z,
        bytes: b,
        ms: secs * 1e3,
        dirty_rate_pages_per_s: 0.0,
        vcpu_dirty_rates: collector.as_ref().map(|c| c.rates()),
        bandwidth_bytes_per_s: s.bandwidth(fallback_bw),
    });
    let mut last_collect = t_pass;
    let mut iteration = 0u32;
    let forced;
    loop {
        ctl.check()?;
        // Parameters changed with set_options take effect here, at the next pass.
        let opts = ctl.opts();
        if opts.dirty_limit != applied_limit {
            retune_dirty_limit(s.vm, &mut limiter, opts.dirty_limit, &mut limited, summary)?;
            applied_limit = opts.dirty_limit;
        }
        dirty.clear();
        tracker.collect(&mut dirty)?;
        let now = Instant::now();
        let pages = dirty.count();
        let rate = pages as f64 / now.duration_since(last_collect).as_secs_f64().max(1e-6);
        last_collect = now;
        let bw = s.bandwidth(fallback_bw);
        let expected_downtime = (pages * PAGE_SIZE) as f64 / bw;
        ctl.dirty_synced();
        ctl.update(|l, _| {
            l.ram.dirty_pages_rate = rate as u64;
            l.expected_downtime_ms = Some((expected_downtime * 1e3).round() as u64);
            l.x.vcpu_dirty_rates = collector.as_ref().map(|c| c.rates());
            l.x.throttle_percent = (cpu_throttle * 100.0).round() as u64;
            l.x.dirty_limit_bytes_per_s = summary.dirty_limit_bytes_per_s;
        });
        let limit = opts.downtime_limit.as_secs_f64();
        let within_limit = expected_downtime <= limit;
        if within_limit {
            // The limit is a ceiling, not a target: while each pass still shrinks what is left
            // to send by half or more, one more pass makes the downtime smaller; stop once
            // the rest is tiny, stops shrinking (the guest dirties about as fast as a pass
            // sends), or after MAX_REFINING_PASSES such passes.
            let tiny = expected_downtime <= TINY_FINAL_PASS.min(limit / 10.0)
                || pages <= SMALL_FINAL_PAGES;
            // The first time the rest fits, one refining pass is always worth a try.
            let shrinking = refine_prev.is_none_or(|p| (pages as f64) < REFINE_SHRINK * p as f64);
            let out_of_passes = refining_passes >= MAX_REFINING_PASSES
                || iteration + 2 >= opts.max_iterations
                || opts.timeout.is_some_and(|t| t_start.elapsed() >= t);
            if tiny || !shrinking || out_of_passes {
                forced = false;
                break;
            }
            refining_passes += 1;
            refine_prev = Some(pages);
        }
        // Non-convergence (QEMU's rule): dirtied more than half of what the last pass sent,
        // twice in a row (not while refining a pass set that already fits the limit).
        if within_limit {
            streak = 0;
        } else if (pages * PAGE_SIZE) as f64 > 0.5 * last_pass_bytes as f64 {
            streak += 1;
        } else {
            streak = 0;
        }
        if streak >= 2 {
            streak = 0;
            if let (DirtyLimitMode::Auto, Some(l)) = (opts.dirty_limit, limiter.as_ref()) {
                // Limit the vCPUs dirtying at least the average (once limited, a vCPU stays
                // limited until the switchover), so that the guest dirties at most half the
                // bandwidth; if that still does not converge, halve the quota.
                let rates = l.rates();
                let n = rates.len().max(1) as f64;
                let mean = rates.iter().sum::<f64>() / n;
                for (i, &r) in rates.iter().enumerate() {
                    if r >= mean && !limited.contains(&i) {
                        limited.push(i);
                    }
                }
                let free_bytes: f64 = (0..rates.len())
                    .filter(|i| !limited.contains(i))
                    .map(|i| rates[i] * PAGE_SIZE as f64)
                    .sum();
                let budget = (0.5 * bw - free_bytes).max(0.0);
                let mut quota = (budget / limited.len().max(1) as f64).max(256.0 * 1024.0) as u64;
                if let Some(prev) = summary.dirty_limit_bytes_per_s {
                    quota = quota.min(prev / 2).max(64 * 1024);
                }
                l.set_quota(Some(quota), Some(limited.clone()));
                summary.dirty_limit_events += 1;
                summary.dirty_limit_bytes_per_s = Some(quota);
            } else if opts.auto_converge {
                cpu_throttle = if cpu_throttle == 0.0 {
                    0.2
                } else {
                    (cpu_throttle + 0.1).min(vmm::vcpu::MAX_THROTTLE)
                };
                for v in s.vm.vcpu_handles() {
                    v.set_throttle(cpu_throttle);
                }
                summary.dirty_limit_events += 1;
                summary.cpu_throttle = cpu_throttle;
            }
        }
        let timed_out = opts.timeout.is_some_and(|t| t_start.elapsed() >= t)
            || iteration + 1 >= opts.max_iterations;
        if timed_out {
            match opts.on_timeout {
                TimeoutAction::Abort => {
                    s.enc.send_abort("source timed out before convergence")?;
                    let st = s.enc.stats();
                    summary.pages_sent = st.pages;
                    summary.zero_pages = st.zero_pages;
                    summary.bytes_sent = st.bytes;
                    drop(collector.take());
                    drop(limiter.take());
                    s.vm.vcpu_handles().iter().for_each(|v| v.set_throttle(0.0));
                    tracker.stop()?;
                    summary.outcome = Outcome::Aborted {
                        reason: format!(
                            "not converged after {:.1} s ({} passes): {} dirty pages need {:.0} ms at {:.0} MB/s, limit {} ms; the guest keeps running on the source",
                            t_start.elapsed().as_secs_f64(),
                            iteration + 1,
                            pages,
                            expected_downtime * 1e3,
                            bw / 1e6,
                            opts.downtime_limit.as_millis()
                        ),
                    };
                    return Ok(());
                }
                TimeoutAction::ForceSwitchover => {
                    forced = true;
                    break;
                }
            }
        }
        iteration += 1;
        let mut it = dirty.iter_gpa();
        let (n, z, b, secs) = s.pass(iteration, pages, false, &mut it, progress, pages)?;
        last_pass_bytes = b;
        summary.push_iteration(IterationStats {
            iteration,
            pages: n,
            zero_pages: z,
            bytes: b,
            ms: secs * 1e3,
            dirty_rate_pages_per_s: rate,
            vcpu_dirty_rates: collector.as_ref().map(|c| c.rates()),
            bandwidth_bytes_per_s: s.bandwidth(fallback_bw),
        });
    }
    // Switchover: pause (the kick also flushes any per-CPU dirty logs into the rings), collect
    // what the last collect left plus anything since, send it with the vCPU state.
    // Barrier: wait until the destination has processed everything sent so far (decoding,
    // writing pages), so its backlog does not land in the downtime. The guest runs on; what
    // it dirties meanwhile goes into the final pass.
    ctl.check()?;
    let t_sync = Instant::now();
    s.enc.send_sync(u64::from(iteration))?;
    loop {
        match acks.recv()? {
            Ack::Synced(t) if t == u64::from(iteration) => break,
            Ack::Synced(_) => {}
            Ack::Error(e) => return Err(MigrationError::Destination(e)),
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected Synced, got {other:?}"
                )))
            }
        }
    }
    summary.switchover_sync_ms = t_sync.elapsed().as_secs_f64() * 1e3;
    // The collector thread is stopped (joined: up to one poll interval) before the pause, so
    // its exit is not downtime; a ring that fills meanwhile is handled by its vCPU thread.
    let vcpu_rates = collector.as_ref().map(|c| c.rates());
    if let Some(mut c) = collector.take() {
        c.stop();
    }
    ctl.check()?;
    let pause_ns = unix_ns();
    let t_pause = Instant::now();
    let mut marks: Vec<(&'static str, Instant)> = Vec::with_capacity(8);
    s.vm.vcpus()?.pause_all(Duration::from_secs(10))?;
    *paused = true;
    marks.push(("pause", Instant::now()));
    ctl.update(|l, _| l.paused = true);
    ctl.set_status(MigrationStatus::Device);
    // The limit ends with the switchover (the guest does not take it along); lifted only
    // now that the vCPUs are paused, so no unthrottled burst lands in the final pass.
    drop(limiter.take());
    s.vm.vcpu_handles().iter().for_each(|v| v.set_throttle(0.0));
    tracker.collect(&mut dirty)?;
    marks.push(("final collect", Instant::now()));
    let pages = dirty.count();
    iteration += 1;
    ctl.dirty_synced();
    let mut it = dirty.iter_gpa();
    let (n, z, b, secs) = s.pass(iteration, pages, true, &mut it, progress, pages)?;
    marks.push(("final pass", Instant::now()));
    summary.push_iteration(IterationStats {
        iteration,
        pages: n,
        zero_pages: z,
        bytes: b,
        ms: secs * 1e3,
        dirty_rate_pages_per_s: 0.0,
        vcpu_dirty_rates: vcpu_rates,
        bandwidth_bytes_per_s: s.bandwidth(fallback_bw),
    });
    for st in s.vm.save_vcpus()? {
        s.enc
            .send_state(STATE_KIND_VCPU, st.index as u32, &st.encode())?;
    }
    if let Some(ms) = s.vm.save_machine()? {
        s.enc.send_state(STATE_KIND_MACHINE, 0, &ms.encode())?;
    }
    let sent = s.enc.stats();
    s.enc.send_complete(&Complete {
        pages_sent: sent.pages,
        digest: None,
    })?;
    marks.push(("vCPU state + complete", Instant::now()));
    if s.fail_at == Some(FailPoint::BeforeFinalAck) {
        s.cut();
    }
    let t_verify = Instant::now();
    let own = if opts.verify && opts.verify_before_commit {
        Some(memory_digest(s.vm)?)
    } else {
        None
    };
    let verify_ms = t_verify.elapsed().as_secs_f64() * 1e3;
    let dest_digest = match acks.recv()? {
        Ack::ReadyToResume { digest } => digest,
        Ack::Error(e) => return Err(MigrationError::Destination(e)),
        other => {
            return Err(MigrationError::Protocol(format!(
                "expected ReadyToResume, got {other:?}"
            )))
        }
    };
    if let Some(own) = &own {
        match &dest_digest {
            Some(d) => own.verify(d).map_err(MigrationError::Digest)?,
            None => {
                return Err(MigrationError::Protocol(
                    "destination sent no memory digest to verify".into(),
                ))
            }
        }
        summary.verified = Some(true);
        summary.verify_ms = Some(verify_ms);
    }
    marks.push(("destination restore (ReadyToResume)", Instant::now()));
    // Point of no return: after Commit the destination owns the guest. A cancel that came
    // first wins; after this, cancels are ignored.
    ctl.commit_point()?;
    s.enc.send_commit()?;
    // The guest now lives on the destination (or, if Resumed never comes, maybe there):
    // from here on no error resumes the source.
    *paused = false;
    let t_commit = Instant::now();
    summary.forced_switchover = forced;
    match acks.recv() {
        Ok(Ack::Resumed { unix_ns: resumed }) => {
            marks.push(("commit + resume (Resumed)", Instant::now()));
            let mut prev = t_pause;
            for (what, t) in &marks {
                summary
                    .downtime_breakdown_ms
                    .push((what.to_string(), t.duration_since(prev).as_secs_f64() * 1e3));
                prev = *t;
            }
            summary.total_ms = t_start.elapsed().as_secs_f64() * 1e3;
            summary.downtime_ms = resumed.saturating_sub(pause_ns) as f64 / 1e6;
            summary.outcome = Outcome::Completed;
        }
        Ok(other) => {
            summary.outcome = Outcome::CommittedUnconfirmed {
                reason: format!("expected Resumed, got {other:?}"),
            }
        }
        Err(e) => {
            summary.outcome = Outcome::CommittedUnconfirmed {
                reason: e.to_string(),
            }
        }
    }
    summary.downtime_source_ms = t_commit.duration_since(t_pause).as_secs_f64() * 1e3;
    if opts.verify && !opts.verify_before_commit {
        // Off the critical path, and the resumed guest may share this host's cores: lowest
        // priority, so it never delays the guest's vCPUs.
        vmm::renice_current_thread(19);
        // The source's vCPUs stay paused for good, so its memory is still the memory at pause.
        let t = Instant::now();
        let own = memory_digest(s.vm)?;
        summary.verified = Some(match &dest_digest {
            Some(d) => own.verify(d).is_ok(),
            None => false,
        });
        summary.verify_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    }
    let st = s.enc.stats();
    let send_secs: f64 = summary.iterations.iter().map(|i| i.ms).sum::<f64>() / 1e3;
    summary.bandwidth_bytes_per_s = if send_secs > 0.0 {
        st.bytes as f64 / send_secs
    } else {
        0.0
    };
    summary.pages_sent = st.pages;
    summary.zero_pages = st.zero_pages;
    summary.bytes_sent = st.bytes;
    if let Some(rs) = s.vm.ring_set() {
        summary.ring_full_exits = (0..rs.vcpus()).map(|i| rs.vcpu_ring_full_exits(i)).sum();
    }
    ctl.update(|l, _| l.record_tx(st));
    tracker.stop()?;
    Ok(())
}

/// Applies a dirty-limit mode changed with `set_options` (at a pass boundary).
fn retune_dirty_limit(
    vm: &Vm,
    limiter: &mut Option<DirtyLimiter>,
    mode: DirtyLimitMode,
    limited: &mut Vec<usize>,
    summary: &mut MigrationSummary,
) -> Result<()> {
    if mode != DirtyLimitMode::Off && limiter.is_none() {
        let rs = vm.ring_set().ok_or_else(|| {
            MigrationError::Protocol(
                "dirty-limit needs the ring tracker (use auto-converge with the bitmap)".into(),
            )
        })?;
        *limiter = Some(DirtyLimiter::start(
            rs.clone(),
            vm.vcpu_handles().to_vec(),
            LimiterConfig::default(),
        ));
    }
    let Some(l) = limiter.as_ref() else {
        return Ok(());
    };
    limited.clear();
    match mode {
        DirtyLimitMode::Fixed(q) => {
            l.set_quota(Some(q), None);
            summary.dirty_limit_events += 1;
            summary.dirty_limit_bytes_per_s = Some(q);
        }
        // Auto starts again from no limit; it applies one when pre-copy stops converging.
        DirtyLimitMode::Off | DirtyLimitMode::Auto => {
            l.set_quota(None, None);
            summary.dirty_limit_bytes_per_s = None;
        }
    }
    Ok(())
}
