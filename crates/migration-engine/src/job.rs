//! A migration as a job an operator drives while it runs (QEMU's `migrate`, `query-migrate`,
//! `migrate_cancel` and `migrate-set-parameters`), over a shared, lock-protected state that
//! the engine thread updates and any thread reads.
//!
//! [`MigrationJob::start`] connects and migrates on its own thread and returns at once.
//! [`MigrationJob::info`] is a cheap snapshot in the shape of QEMU's `query-migrate` result.
//! [`MigrationJob::cancel`] works in every phase before the destination is told to commit:
//! the source keeps (or resumes) the guest and the destination is sent an Abort frame.
//!
//! Ownership: a completed job leaves the source's vCPUs *paused* (the guest now runs on the
//! destination). The job never stops the VM itself; [`MigrationStatus::Completed`] means
//! "stop me": the owner calls `Vm::stop` (or drops the VM).

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_dirty::PAGE_SIZE;

use crate::error::{MigrationError, Result};
use crate::seam::MigratableVm;
use crate::source::{run_job, SourceOptions};
use crate::summary::{MigrationSummary, Outcome};

/// How long the job thread waits for a TCP connection to the destination.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A migration's state, with QEMU's names (`MigrationStatus` in `qapi/migration.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has started.
    None,
    /// Connecting, handshake, tracker start.
    Setup,
    /// Pre-copy passes; the guest runs on the source.
    Active,
    /// The source is paused: final pass, device state, waiting for the destination's
    /// restore.
    Device,
    /// The guest runs on the destination; the source's vCPUs are paused for good (the owner
    /// stops the source VM).
    Completed,
    /// The migration failed; the guest keeps running on the source.
    Failed,
    /// A cancel was requested; the engine is winding down.
    Cancelling,
    /// Cancelled; the guest keeps running on the source.
    Cancelled,
}

impl MigrationStatus {
    /// Whether the job has ended (completed, failed or cancelled).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// What the job reports as it goes (QEMU's `MIGRATION` and `MIGRATION_PASS` events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobEvent {
    /// The status changed (`MIGRATION { status }`).
    Status(MigrationStatus),
    /// Dirty memory was synced (`MIGRATION_PASS { pass }`), once before the bulk pass and
    /// at every collect after it.
    Pass {
        /// The dirty-sync count so far (`dirty-sync-count`; 1 = the bulk pass).
        pass: u32,
    },
}

/// RAM statistics in the shape of QEMU's `MigrationStats`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes sent on the wire so far.
    pub transferred: u64,
    /// Bytes of guest memory still to send in the current pass.
    pub remaining: u64,
    /// Guest memory, bytes.
    pub total: u64,
    /// Pages sent as zero markers.
    pub duplicate: u64,
    /// Pages sent with their contents.
    pub normal: u64,
    /// Bytes of pages sent with their contents.
    pub normal_bytes: u64,
    /// Pages the guest dirtied per second, as measured at the last collect.
    pub dirty_pages_rate: u64,
    /// Throughput over the last interval, megabits per second (QEMU's `mbps`).
    pub mbps: f64,
    /// Dirty-log syncs so far (the bulk pass counts as the first).
    pub dirty_sync_count: u64,
    /// Bytes sent while the guest ran (pre-copy).
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: u64,
    /// Page size, bytes.
    pub page_size: u64,
    /// Pages sent per second over the last interval.
    pub pages_per_second: u64,
}

/// ringvisor's additions to `query-migrate` (QEMU spells vendor extensions `x-...`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RingvisorInfo {
    /// Current pass (0 = bulk).
    pub pass: u32,
    /// Pages sent in the current pass.
    pub pass_pages_sent: u64,
    /// Pages the current pass carries.
    pub pass_pages_total: u64,
    /// Ring tracker: dirty pages per second per vCPU over the last second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_rates: Option<Vec<f64>>,
    /// Auto-converge CPU throttle, percent.
    pub throttle_percent: u64,
    /// Per-vCPU dirty limit in force, bytes/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_limit_bytes_per_s: Option<u64>,
    /// Whether the source's and the destination's memory digests matched (once checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Times dirty tracking lost pages (a ring overran) and all memory was resent.
    pub tracking_lost_events: u32,
}

/// QEMU's `query-migrate` result (`MigrationInfo`); absent fields are skipped.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Status.
    pub status: MigrationStatus,
    /// RAM statistics (once the migration has started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram: Option<RamStats>,
    /// Milliseconds since the start (up to the end once finished).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Expected downtime at the last collect, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// Measured downtime, ms (completed migrations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Setup time (connect, handshake, tracker start), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// Auto-converge throttle, percent (QEMU's `cpu-throttle-percentage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u64>,
    /// Why the migration failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// ringvisor's extras.
    #[serde(rename = "x-ringvisor", skip_serializing_if = "Option::is_none")]
    pub x_ringvisor: Option<RingvisorInfo>,
}

/// The live counters behind [`MigrationInfo`].
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub(crate) ram: RamStats,
    pub(crate) x: RingvisorInfo,
    pub(crate) setup_ms: Option<u64>,
    pub(crate) total_ms: Option<u64>,
    pub(crate) expected_downtime_ms: Option<u64>,
    pub(crate) downtime_ms: Option<u64>,
    /// Whether the source is paused (bytes count as downtime bytes).
    pub(crate) paused: bool,
    /// Start of the current throughput window: (time, bytes, pages).
    window: Option<(Instant, u64, u64)>,
}

struct Shared {
    status: MigrationStatus,
    opts: SourceOptions,
    live: Live,
    error: Option<String>,
    /// A clone of the migration socket, so a cancel can wake a blocked read.
    sock: Option<TcpStream>,
    /// Commit sent: too late to cancel.
    committed: bool,
}

/// The state shared by a job's thread and its handle. The engine reads its options here
/// (so `set_options` takes effect while it runs) and publishes its progress.
pub(crate) struct Control {
    cancel: AtomicBool,
    shared: Mutex<Shared>,
    cv: Condvar,
    start: Instant,
    events: Box<dyn Fn(JobEvent) + Send + Sync>,
    /// Held across a status change and its `MIGRATION` event (taken before `shared`), so
    /// events go out in the order the status changed: a job that ends right after a cancel
    /// never reports `cancelled` before `cancelling`.
    status_order: Mutex<()>,
}

impl Control {
    pub(crate) fn new(opts: SourceOptions, events: Box<dyn Fn(JobEvent) + Send + Sync>) -> Self {
        Control {
            cancel: AtomicBool::new(false),
            shared: Mutex::new(Shared {
                status: MigrationStatus::None,
                opts,
                live: Live::default(),
                error: None,
                sock: None,
                committed: false,
            }),
            cv: Condvar::new(),
            start: Instant::now(),
            events,
            status_order: Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves plain counters behind: still readable.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a cancel was requested.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// `Err(Cancelled)` once a cancel was requested.
    pub(crate) fn check(&self) -> Result<()> {
        if self.cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Sleeps `d`, or less if a cancel arrives.
    pub(crate) fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut g = self.lock();
        while !self.cancelled() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub(crate) fn set_status(&self, s: MigrationStatus) {
        let _order = self.status_order.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut g = self.lock();
            // Cancelling is sticky until the job ends.
            if g.status == s
                || (g.status == MigrationStatus::Cancelling && !s.is_final())
                || g.status.is_final()
            {
                return;
            }
            g.status = s;
        }
        (self.events)(JobEvent::Status(s));
    }

    pub(crate) fn status(&self) -> MigrationStatus {
        self.lock().status
    }

    pub(crate) fn set_error(&self, e: String) {
        self.lock().error = Some(e);
    }

    /// The options as they are now.
    pub(crate) fn opts(&self) -> SourceOptions {
        self.lock().opts.clone()
    }

    pub(crate) fn set_options(&self, f: impl FnOnce(&mut SourceOptions)) {
        f(&mut self.lock().opts);
    }

    /// Updates the live counters under the lock; returns what `f` returns.
    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut Live, &SourceOptions) -> T) -> T {
        let mut g = self.lock();
        let g = &mut *g;
        f(&mut g.live, &g.opts)
    }

    /// Counts a dirty-log sync (the start of the bulk pass is the first) and emits the
    /// `Pass` event QEMU emits at each sync.
    pub(crate) fn dirty_synced(&self) {
        let pass = self.update(|l, _| {
            l.ram.dirty_sync_count += 1;
            l.ram.dirty_sync_count
        });
        (self.events)(JobEvent::Pass {
            pass: u32::try_from(pass).unwrap_or(u32::MAX),
        });
    }

    pub(crate) fn attach_socket(&self, s: TcpStream) -> Result<()> {
        let mut g = self.lock();
        if self.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        g.sock = Some(s);
        Ok(())
    }

    /// The point of no return: fails if a cancel came first; afterwards cancels are ignored.
    pub(crate) fn commit_point(&self) -> Result<()> {
        let mut g = self.lock();
        if self.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        g.committed = true;
        g.sock = None;
        Ok(())
    }

    /// Requests a cancel. Returns false when it is too late (committed or finished).
    pub(crate) fn cancel(&self) -> bool {
        let _order = self.status_order.lock().unwrap_or_else(|p| p.into_inner());
        let emit = {
            let mut g = self.lock();
            if g.committed || g.status.is_final() {
                return false;
            }
            self.cancel.store(true, Ordering::SeqCst);
            // Wake a read blocked on the destination (Accepted, Synced, ReadyToResume); the
            // write side stays open for the Abort frame.
            if let Some(s) = &g.sock {
                let _ = s.shutdown(std::net::Shutdown::Read);
            }
            self.cv.notify_all();
            let emit = g.status != MigrationStatus::Cancelling;
            g.status = MigrationStatus::Cancelling;
            emit
        };
        if emit {
            (self.events)(JobEvent::Status(MigrationStatus::Cancelling));
        }
        true
    }

    /// Records progress inside a pass (every few hundred pages): counters, and the
    /// throughput over windows of at least 100 ms.
    pub(crate) fn on_pages(&self, tx: migration::wire::TxStats, pass_sent: u64) -> Option<u64> {
        self.update(|l, o| {
            l.record_tx(tx);
            l.x.pass_pages_sent = pass_sent;
            l.ram.remaining = l.x.pass_pages_total.saturating_sub(pass_sent) * PAGE_SIZE;
            let now = Instant::now();
            match l.window {
                Some((t, b, p)) if now.duration_since(t) >= Duration::from_millis(100) => {
                    let dt = now.duration_since(t).as_secs_f64();
                    l.ram.mbps = (tx.bytes - b) as f64 * 8.0 / dt / 1e6;
                    l.ram.pages_per_second = ((tx.pages - p) as f64 / dt) as u64;
                    l.window = Some((now, tx.bytes, tx.pages));
                }
                Some(_) => {}
                None => l.window = Some((now, tx.bytes, tx.pages)),
            }
            o.max_bandwidth
        })
    }

    /// Milliseconds since the job started.
    pub(crate) fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub(crate) fn info(&self) -> MigrationInfo {
        let g = self.lock();
        let started = g.status != MigrationStatus::None;
        let l = &g.live;
        MigrationInfo {
            status: g.status,
            ram: started.then(|| l.ram.clone()),
            total_time: started.then(|| l.total_ms.unwrap_or_else(|| self.elapsed_ms())),
            expected_downtime: l.expected_downtime_ms,
            downtime: l.downtime_ms,
            setup_time: l.setup_ms,
            cpu_throttle_percentage: (l.x.throttle_percent > 0).then_some(l.x.throttle_percent),
            error_desc: g.error.clone(),
            x_ringvisor: started.then(|| l.x.clone()),
        }
    }
}

impl Live {
    /// Folds the encoder's counters in (bytes count as pre-copy or downtime bytes).
    pub(crate) fn record_tx(&mut self, tx: migration::wire::TxStats) {
        let prev = self.ram.transferred;
        self.ram.transferred = tx.bytes;
        let delta = tx.bytes.saturating_sub(prev);
        if self.paused {
            self.ram.downtime_bytes += delta;
        } else {
            self.ram.precopy_bytes += delta;
        }
        self.ram.duplicate = tx.zero_pages;
        self.ram.normal = tx.pages - tx.zero_pages;
        self.ram.normal_bytes = self.ram.normal * PAGE_SIZE;
    }
}

/// A migration running on its own thread.
pub struct MigrationJob {
    ctl: Arc<Control>,
    thread: Option<JoinHandle<MigrationSummary>>,
    /// Returned by [`wait`](Self::wait) if the job thread panicked.
    fallback: MigrationSummary,
}

impl std::fmt::Debug for MigrationJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationJob")
            .field("status", &self.ctl.status())
            .finish()
    }
}

impl MigrationJob {
    /// Starts a migration of `vm` (running; an `Arc<vmm::Vm>` coerces, as does an
    /// `Arc<FakeVm>`) to `addr` (`HOST:PORT`) on its own thread and
    /// returns at once. Connecting happens on the job thread (status `setup`), so a refused
    /// connection is a failed job, never a lost guest. `events` is called on the job thread
    /// (keep it short).
    ///
    /// A completed job leaves the source's vCPUs paused: the owner stops the VM.
    pub fn start(
        vm: Arc<dyn MigratableVm>,
        addr: String,
        opts: SourceOptions,
        events: Box<dyn Fn(JobEvent) + Send + Sync>,
    ) -> Result<MigrationJob> {
        let fallback = MigrationSummary::new(vm.tracker_mode().name(), &opts);
        let ctl = Arc::new(Control::new(opts, events));
        ctl.set_status(MigrationStatus::Setup);
        let c = ctl.clone();
        // Listed here: the migration thread's filter does not allow reading a directory.
        let vcpus: Vec<u32> = crate::cpu::vcpu_threads()
            .into_iter()
            .map(|(_, tid)| tid)
            .collect();
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                // The filter goes on once connected (resolving and connecting need calls
                // the rest never makes), before the first byte from the destination.
                let stream = connect(&addr, &c).and_then(|s| {
                    sandbox::apply(sandbox::ThreadKind::Migration)?;
                    Ok(s)
                });
                run_job(
                    &*vm,
                    stream,
                    tls::creds::host_of(&addr),
                    &c,
                    &mut |_| {},
                    &vcpus,
                )
            })?;
        Ok(MigrationJob {
            ctl,
            thread: Some(thread),
            fallback,
        })
    }

    /// A snapshot of the job's state (`query-migrate`); never waits for the job.
    pub fn info(&self) -> MigrationInfo {
        self.ctl.info()
    }

    /// `migrate_cancel`: the guest keeps running on the source and the destination is told
    /// to drop what it received. No effect once the commit was sent (the status then ends
    /// `completed`) or the job has ended.
    pub fn cancel(&self) {
        self.ctl.cancel();
    }

    /// Changes parameters while the job runs (`migrate-set-parameters`): `max_bandwidth`
    /// takes effect within the next 256 pages; `downtime_limit`, `dirty_limit`,
    /// `auto_converge`, `timeout`, `on_timeout` and `max_iterations` at the next collect
    /// (the next pass). The others (`verify`, the ring polling, `fail_at`) are read once at
    /// the start.
    pub fn set_options(&self, f: impl FnOnce(&mut SourceOptions)) {
        self.ctl.set_options(f);
    }

    /// The options in force.
    pub fn options(&self) -> SourceOptions {
        self.ctl.opts()
    }

    /// Whether the job thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the job to end and returns its summary.
    pub fn wait(mut self) -> MigrationSummary {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(s)) => s,
            _ => {
                let mut s = self.fallback.clone();
                s.outcome = Outcome::Failed {
                    reason: "the migration thread panicked".into(),
                    source_running: false,
                };
                self.ctl.set_error("the migration thread panicked".into());
                self.ctl.set_status(MigrationStatus::Failed);
                s
            }
        }
    }
}

/// Connects on a helper thread so that a cancel need not wait for the TCP timeout.
fn connect(addr: &str, ctl: &Control) -> Result<TcpStream> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| MigrationError::Connect {
            addr: addr.to_string(),
            source: e,
        })?
        .collect();
    let (tx, rx) = mpsc::channel();
    let a = addr.to_string();
    std::thread::Builder::new()
        .name("migration-connect".into())
        .spawn(move || {
            let mut last = None;
            for sa in &addrs {
                match TcpStream::connect_timeout(sa, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        let _ = tx.send(Ok(s));
                        return;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let e = last
                .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"));
            let _ = tx.send(Err(MigrationError::Connect { addr: a, source: e }));
        })?;
    loop {
        ctl.check()?;
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => {
                let s = r?;
                ctl.check()?;
                return Ok(s);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::Internal("connect thread vanished".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_serializes_with_qemu_names_and_skips_absent_fields() {
        let ctl = Control::new(SourceOptions::default(), Box::new(|_| {}));
        let j = serde_json::to_value(ctl.info()).unwrap();
        assert_eq!(j, serde_json::json!({ "status": "none" }));
        ctl.set_status(MigrationStatus::Setup);
        ctl.set_error("connecting to x: refused".into());
        ctl.update(|l, _| {
            l.ram.dirty_pages_rate = 7;
            l.x.throttle_percent = 30;
        });
        let j = serde_json::to_value(ctl.info()).unwrap();
        assert_eq!(j["status"], "setup");
        assert_eq!(j["error-desc"], "connecting to x: refused");
        assert_eq!(j["ram"]["dirty-pages-rate"], 7);
        assert_eq!(j["cpu-throttle-percentage"], 30);
        assert_eq!(j["x-ringvisor"]["throttle-percent"], 30);
        assert!(j.get("downtime").is_none());
        let back: MigrationInfo = serde_json::from_value(j).unwrap();
        let mut now = ctl.info();
        now.total_time = back.total_time;
        assert_eq!(back, now);
    }

    #[test]
    fn status_names_are_qemus() {
        for (s, n) in [
            (MigrationStatus::None, "none"),
            (MigrationStatus::Setup, "setup"),
            (MigrationStatus::Active, "active"),
            (MigrationStatus::Device, "device"),
            (MigrationStatus::Completed, "completed"),
            (MigrationStatus::Failed, "failed"),
            (MigrationStatus::Cancelling, "cancelling"),
            (MigrationStatus::Cancelled, "cancelled"),
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), n);
        }
    }

    #[test]
    fn cancel_is_refused_after_the_commit_point_and_wins_before_it() {
        let ctl = Control::new(SourceOptions::default(), Box::new(|_| {}));
        ctl.set_status(MigrationStatus::Active);
        assert!(ctl.commit_point().is_ok());
        assert!(!ctl.cancel(), "too late after commit");
        assert!(!ctl.cancelled());
        let ctl = Control::new(SourceOptions::default(), Box::new(|_| {}));
        ctl.set_status(MigrationStatus::Device);
        assert!(ctl.cancel());
        assert_eq!(ctl.status(), MigrationStatus::Cancelling);
        assert!(matches!(ctl.commit_point(), Err(MigrationError::Cancelled)));
        // Only the final status replaces Cancelling.
        ctl.set_status(MigrationStatus::Active);
        assert_eq!(ctl.status(), MigrationStatus::Cancelling);
        ctl.set_status(MigrationStatus::Cancelled);
        assert_eq!(ctl.status(), MigrationStatus::Cancelled);
        assert!(!ctl.cancel());
    }
}
