//! The source side: a migration of a running VM (any [`MigratableVm`]) over TCP, as a job
//! (see [`crate::job`]) or blocking ([`migrate`]).
//!
//! The phases live in `session`: handshake, bulk pass, the pass loop (whose every
//! decision comes from `migration::convergence`), switchover, commit, finish.
//! `sender` writes passes to the stream; `collector` samples the per-vCPU dirty rates.

mod collector;
mod sender;
mod session;

/// The dirty limit during a migration (ring tracker only): off, fixed per vCPU from the start,
/// or applied automatically to the fastest vCPUs when pre-copy stops converging.
pub use migration::convergence::DirtyLimitMode;

use std::net::TcpStream;
use std::time::Duration;

use kvm_dirty::PAGE_SIZE;
use migration::convergence::PolicyConfig;
use migration::params::OnTimeout;
use migration::wire::MemoryLayout;
use vmm::Vm;

use crate::error::{MigrationError, Result};
use crate::job::{Control, MigrationStatus};
use crate::seam::MigratableVm;
use crate::summary::{MigrationSummary, Outcome};

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
    /// QEMU's auto-converge capability: throttle the vCPUs' CPU time when pre-copy does not
    /// converge (`cpu-throttle-initial`, then `cpu-throttle-increment` per event, at most
    /// `max-cpu-throttle`).
    pub auto_converge: bool,
    /// `throttle-trigger-threshold`: a period that dirties more than this percentage of the
    /// bytes it sent counts as not converging (two such periods fire a throttle event).
    pub throttle_trigger_threshold: u8,
    /// `cpu-throttle-initial`, percent.
    pub cpu_throttle_initial: u8,
    /// `cpu-throttle-increment`, percent.
    pub cpu_throttle_increment: u8,
    /// `max-cpu-throttle`, percent.
    pub max_cpu_throttle: u8,
    /// Fault injection for tests: drop the TCP connection at this point.
    #[serde(skip)]
    pub fail_at: Option<FailPoint>,
    /// `tls-creds` (+ `tls-hostname`, `tls-authz`): run the stream over TLS 1.3 with this
    /// client certificate, verifying the destination's; `None` = plain TCP. Read once, at
    /// the start.
    #[serde(skip)]
    pub tls: Option<tls::ClientTls>,
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
        let policy = PolicyConfig::default();
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
            throttle_trigger_threshold: policy.throttle_trigger_threshold,
            cpu_throttle_initial: policy.cpu_throttle_initial,
            cpu_throttle_increment: policy.cpu_throttle_increment,
            max_cpu_throttle: policy.max_cpu_throttle,
            fail_at: None,
            tls: None,
        }
    }
}

impl SourceOptions {
    /// The convergence policy's configuration for these options.
    pub fn policy_config(&self) -> PolicyConfig {
        PolicyConfig {
            downtime_limit: self.downtime_limit,
            timeout: self.timeout,
            on_timeout: match self.on_timeout {
                TimeoutAction::Abort => OnTimeout::Abort,
                TimeoutAction::ForceSwitchover => OnTimeout::Force,
            },
            max_iterations: self.max_iterations,
            throttle_trigger_threshold: self.throttle_trigger_threshold,
            auto_converge: self.auto_converge,
            cpu_throttle_initial: self.cpu_throttle_initial,
            cpu_throttle_increment: self.cpu_throttle_increment,
            max_cpu_throttle: self.max_cpu_throttle,
            dirty_limit: self.dirty_limit,
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

/// Pages per populated query in the bulk pass (64 MiB, 128 KiB of pagemap).
pub(crate) const POPULATED_CHUNK: u64 = 16384;

/// The layout of a VM's memory for the wire.
pub fn layout_of(vm: &dyn MigratableVm) -> Result<MemoryLayout> {
    vm.layout()
}

/// Digest of the VM's memory as it is now (the vCPUs must be paused). The work is split in
/// [`POPULATED_CHUNK`] pieces over up to [`DIGEST_THREADS`] threads (the paused vCPUs leave
/// the cores free; a digest before the commit is inside the downtime): partial sums add up.
pub fn memory_digest(vm: &dyn MigratableVm) -> Result<migration::digest::MemoryDigest> {
    let slots = vm.slots();
    let mut chunks = Vec::new();
    for (i, r) in slots.iter().enumerate() {
        let mut p = 0;
        while p < r.pages {
            let n = (r.pages - p).min(POPULATED_CHUNK);
            chunks.push((i, r.guest_phys_addr + p * PAGE_SIZE, n));
            p += n;
        }
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, DIGEST_THREADS)
        .min(chunks.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || digest_chunks(vm, slots.len(), &chunks, &next);
    let partials: Vec<Result<Vec<u64>>> = if threads == 1 {
        vec![work()]
    } else {
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads).map(|_| sc.spawn(work)).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(MigrationError::Internal("a digest thread panicked".into()))
                    })
                })
                .collect()
        })
    };
    let mut regions = vec![0u64; slots.len()];
    for p in partials {
        for (sum, part) in regions.iter_mut().zip(p?) {
            *sum = sum.wrapping_add(part);
        }
    }
    Ok(migration::digest::MemoryDigest { regions })
}

/// Threads a memory digest uses at most.
pub const DIGEST_THREADS: usize = 4;

/// Takes chunks `(region, gpa, pages)` off `next` until none is left; returns the per-region
/// partial sums.
fn digest_chunks(
    vm: &dyn MigratableVm,
    regions: usize,
    chunks: &[(usize, u64, u64)],
    next: &std::sync::atomic::AtomicUsize,
) -> Result<Vec<u64>> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let zero_hash = migration::digest::page_hash(&page);
    let mut populated = Populated::new(vm);
    let mut sums = vec![0u64; regions];
    while let Some(&(r, gpa0, pages)) =
        chunks.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    {
        let mut sum = 0u64;
        for p in 0..pages {
            let gpa = gpa0 + p * PAGE_SIZE;
            // A page never populated is zero: hashed without faulting it in.
            let h = if populated.may_hold_data(gpa)? {
                vm.read_page(gpa, &mut page)?;
                migration::digest::page_hash(&page)
            } else {
                zero_hash
            };
            sum = sum.wrapping_add(migration::digest::page_term(gpa, h));
        }
        sums[r] = sums[r].wrapping_add(sum);
    }
    Ok(sums)
}

/// Which pages were ever populated, a chunk at a time: the bulk pass sends a
/// never-populated page as a zero marker without reading (and so faulting in) it.
pub(crate) struct Populated<'a> {
    vm: &'a dyn MigratableVm,
    slots: Vec<kvm_dirty::SlotSpec>,
    start: u64,
    pages: u64,
    bits: Vec<u64>,
}

impl<'a> Populated<'a> {
    pub(crate) fn new(vm: &'a dyn MigratableVm) -> Self {
        Populated {
            vm,
            slots: vm.slots(),
            start: 0,
            pages: 0,
            bits: Vec::new(),
        }
    }

    pub(crate) fn may_hold_data(&mut self, gpa: u64) -> Result<bool> {
        if gpa < self.start || gpa >= self.start + self.pages * PAGE_SIZE {
            let r = self
                .slots
                .iter()
                .find(|r| r.contains_gpa(gpa))
                .ok_or_else(|| MigrationError::Internal(format!("{gpa:#x} is not guest RAM")))?;
            let end = r.guest_phys_addr + r.pages * PAGE_SIZE;
            let pages = ((end - gpa) / PAGE_SIZE).min(POPULATED_CHUNK);
            self.vm.populated(gpa, pages, &mut self.bits)?;
            self.start = gpa;
            self.pages = pages;
        }
        let i = (gpa - self.start) / PAGE_SIZE;
        Ok(self
            .bits
            .get((i / 64) as usize)
            .is_none_or(|w| w >> (i % 64) & 1 == 1))
    }
}

/// The bulk pass's pages in GPA order, telling the tracker before the first page of each
/// [`POPULATED_CHUNK`] is read, so a tracker started deferred (clear-log) re-protects memory
/// a chunk at a time just before it is sent, as QEMU clears its dirty log per chunk.
pub(crate) struct BulkPages<'a> {
    tracker: &'a mut dyn kvm_dirty::DirtyTracker,
    /// `(first gpa, pages)` per region.
    regions: Vec<(u64, u64)>,
    region: usize,
    page: u64,
    /// Pages of the current region before this one are protected.
    protected: u64,
    /// The tracker's error, if it failed: the iteration stopped there.
    pub(crate) error: Option<kvm_dirty::DirtyError>,
}

impl<'a> BulkPages<'a> {
    pub(crate) fn new(
        tracker: &'a mut dyn kvm_dirty::DirtyTracker,
        regions: impl IntoIterator<Item = (u64, u64)>,
    ) -> Self {
        BulkPages {
            tracker,
            regions: regions.into_iter().collect(),
            region: 0,
            page: 0,
            protected: 0,
            error: None,
        }
    }
}

impl Iterator for BulkPages<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        loop {
            let &(gpa, pages) = self.regions.get(self.region)?;
            if self.page >= pages {
                self.region += 1;
                self.page = 0;
                self.protected = 0;
                continue;
            }
            if self.error.is_some() {
                return None;
            }
            if self.page >= self.protected {
                let n = (pages - self.page).min(POPULATED_CHUNK);
                if let Err(e) = self
                    .tracker
                    .protect_before_read(gpa + self.page * PAGE_SIZE, n)
                {
                    self.error = Some(e);
                    return None;
                }
                self.protected = self.page + n;
            }
            self.page += 1;
            return Some(gpa + (self.page - 1) * PAGE_SIZE);
        }
    }
}

/// Migrates `vm` (running) over `stream`, blocking. On success the source VM is stopped and
/// the guest runs on the destination. On any failure before commit the guest keeps running
/// here, and the summary says why (`Outcome::Aborted` / `Outcome::Failed`). For a migration
/// an operator can watch, cancel or retune while it runs, use
/// [`MigrationJob`](crate::job::MigrationJob).
pub fn migrate(
    vm: &mut Vm,
    stream: TcpStream,
    opts: &SourceOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationSummary> {
    let summary = migrate_over(&*vm, stream, opts, progress);
    if summary.completed() {
        // A completed source stays paused; its owner (here) stops it.
        vm.stop()?;
    }
    Ok(summary)
}

/// Migrates any [`MigratableVm`] over `stream`, blocking. A completed source stays paused
/// (the caller stops it); after a failure or an abort it keeps running.
pub fn migrate_over(
    vm: &dyn MigratableVm,
    stream: TcpStream,
    opts: &SourceOptions,
    progress: &mut dyn FnMut(&Progress),
) -> MigrationSummary {
    let ctl = Control::new(opts.clone(), Box::new(|_| {}));
    ctl.set_status(MigrationStatus::Setup);
    // With TLS the destination's certificate is verified for its IP address (or
    // `tls-hostname`): a connected socket carries no host name.
    let host = stream
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let vcpus: Vec<u32> = crate::cpu::vcpu_threads()
        .into_iter()
        .map(|(_, tid)| tid)
        .collect();
    run_job(vm, Ok(stream), &host, &ctl, progress, &vcpus)
}

/// Runs a whole migration on the calling thread and returns its summary; the job's status
/// ends `completed`, `failed` or `cancelled`. A completed source stays paused. `host` is
/// what a TLS handshake verifies the destination's certificate for (unless `tls-hostname`
/// is set). `vcpu_tids` are the vCPU threads whose CPU time the summary reports
/// ([`crate::cpu::vcpu_threads`], listed before this thread's seccomp filter is on).
pub(crate) fn run_job(
    vm: &dyn MigratableVm,
    stream: Result<TcpStream>,
    host: &str,
    ctl: &Control,
    progress: &mut dyn FnMut(&Progress),
    vcpu_tids: &[u32],
) -> MigrationSummary {
    let cpu = crate::cpu::CpuSpan::start(vcpu_tids);
    let t_start = cpu.started();
    let opts = ctl.opts();
    let mut summary = MigrationSummary::new(vm.tracker_mode().name(), &opts);
    // This thread keeps the process's priority, as QEMU's migration thread does. (It used to
    // run at nice 10 to leave the vCPUs their CPU; on a busy host that starved the migration:
    // a guest dirtying 800 MiB/s never converged while QEMU's did. Throttles and the dirty
    // limit are the tools that trade guest speed for convergence.)
    let mut paused = false;
    let r = stream.and_then(|stream| {
        let mut s = session::Session::open(vm, stream, host, ctl, &mut summary, progress, &cpu)?;
        let r = s.run();
        paused = s.paused();
        if r.is_err() && (ctl.cancelled() || matches!(r, Err(MigrationError::Cancelled))) {
            s.abort("cancelled on the source (migrate_cancel)");
        }
        r
    });
    // A completed migration's total ends at the destination's Resumed (set there), not after
    // the source's post-commit digest check.
    if summary.total_ms == 0.0 {
        summary.total_ms = t_start.elapsed().as_secs_f64() * 1e3;
    }
    if summary.cpu.is_none() {
        summary.cpu = Some(cpu.finish());
    }
    // An operator's cancel that raced with a timeout abort is reported as the cancel.
    if matches!(r, Ok(())) && ctl.cancelled() && matches!(summary.outcome, Outcome::Aborted { .. })
    {
        summary.outcome = Outcome::Cancelled;
    }
    if let Err(e) = r {
        tracing::info!(error = %e, cancelled = ctl.cancelled(), "migration ended before the commit; the guest keeps running on the source");
        // Nothing lost: the guest continues on the source, unthrottled.
        vm.set_cpu_throttle(0);
        if paused {
            vm.resume();
        }
        summary.outcome = if ctl.cancelled() || matches!(e, MigrationError::Cancelled) {
            Outcome::Cancelled
        } else {
            Outcome::Failed {
                reason: e.to_string(),
                source_running: vm.is_running(),
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
        l.x.tracking_lost_events = summary.tracking_lost_events;
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
