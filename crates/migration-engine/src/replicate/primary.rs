//! The primary: a running guest checkpointed to a standby every `checkpoint_delay`.
//!
//! Handshake (Hello, Layout, the standby's Ready), the tracker started, the seed (all of
//! memory, sent while the guest runs), then epochs: the guest runs; with the ring the dirty
//! pages are harvested every `harvest_interval` meanwhile and copied into the reused
//! checkpoint buffer at once (pre-copy: the harvest re-protected them before the copy, so a
//! later write shows up in a later harvest and the page is copied again), so the pause only
//! takes and copies what the guest wrote since the last harvest; pause; final collect; those
//! pages and the vCPU and device state copied into the checkpoint buffer; the guest's output
//! of the epoch captured (output commit); resume; the checkpoint sent while the guest runs.
//! The bitmap trackers collect only in the pause, so they copy every page there. One
//! checkpoint is in flight: the next pause waits for the standby's ack of the previous one
//! (counted and timed as a stall), nothing is dropped. A standby that fails, closes, or does not ack within `ack_timeout`
//! is reported lost and the guest runs on here.

use std::io::BufWriter;
use std::net::TcpStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_dirty::{DirtyPageSet, DirtyTracker, TrackerMode, PAGE_SIZE};
use migration::wire::replica::{CheckpointBuf, ReplicaAck, ReplicaAckReader, ReplicaWriter};
use migration::wire::Hello;

use super::output::{GuestOutput, OutputCommit};
use super::{CheckpointStats, ReplicationInfo, ReplicationStatus, ReplicationSummary};
use crate::error::MigrationError;
use crate::seam::MigratableVm;
use crate::source::Populated;
use crate::{unix_ns, STATE_KIND_MACHINE, STATE_KIND_VCPU};

/// Ring: at most this many harvest-and-copy rounds right before a pause ...
const FINAL_HARVESTS: u32 = 3;
/// ... stopping after a round that copied no more than this many pages.
const FINAL_HARVEST_ENOUGH: u64 = 64;

/// Primary parameters (QEMU's COLO calls the epoch `x-checkpoint-delay`).
#[derive(Debug, Clone)]
pub struct PrimaryOptions {
    /// How long the guest runs between two checkpoints (`x-checkpoint-delay`).
    pub checkpoint_delay: Duration,
    /// A heartbeat goes out when nothing else was sent for this long.
    pub heartbeat_interval: Duration,
    /// The standby is lost when it does not answer the handshake, or apply a checkpoint
    /// this long after it was sent, or stops reading for this long.
    pub ack_timeout: Duration,
    /// Ring tracker: how often the dirty rings are harvested between checkpoints.
    pub harvest_interval: Duration,
    /// How long the vCPUs may take to park.
    pub pause_timeout: Duration,
    /// Stop replicating (Shutdown, the standby does not take over) after this many
    /// checkpoints were applied; `None`: until stopped.
    pub max_checkpoints: Option<u64>,
}

impl Default for PrimaryOptions {
    fn default() -> Self {
        PrimaryOptions {
            checkpoint_delay: Duration::from_millis(100),
            heartbeat_interval: Duration::from_millis(100),
            ack_timeout: Duration::from_secs(5),
            harvest_interval: Duration::from_millis(5),
            pause_timeout: Duration::from_secs(10),
            max_checkpoints: None,
        }
    }
}

/// The operator's handle on a replication: its live info, and a stop.
#[derive(Debug, Default)]
pub struct ReplicaControl {
    stop: std::sync::atomic::AtomicBool,
    info: Mutex<ReplicationInfo>,
}

impl ReplicaControl {
    /// A handle for a replication about to start.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Asks the replication to end at its next step (Shutdown: the standby does not take
    /// over, the guest runs on here).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The live counters.
    pub fn info(&self) -> ReplicationInfo {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ReplicationInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Why the loop ended early.
enum Stop {
    /// The standby failed, closed the connection or stopped answering.
    Lost(String),
    /// The VM failed (pause, memory read, state).
    Vm(MigrationError),
}

impl From<MigrationError> for Stop {
    fn from(e: MigrationError) -> Self {
        Stop::Vm(e)
    }
}

impl From<migration::wire::WireError> for Stop {
    fn from(e: migration::wire::WireError) -> Self {
        Stop::Lost(e.to_string())
    }
}

type Ack = std::result::Result<ReplicaAck, String>;

/// The guest's output and where it goes once committed.
pub struct Output<'a> {
    /// Where the guest's output comes from.
    pub src: &'a mut dyn GuestOutput,
    /// The held output.
    pub commit: &'a mut OutputCommit,
}

struct Primary<'a> {
    vm: &'a dyn MigratableVm,
    opts: PrimaryOptions,
    ctl: &'a ReplicaControl,
    sock: TcpStream,
    w: ReplicaWriter<BufWriter<TcpStream>>,
    acks: Receiver<Ack>,
    reader: Option<JoinHandle<()>>,
    tracker: Option<Box<dyn DirtyTracker>>,
    dirty: DirtyPageSet,
    ones: Vec<u64>,
    cp: CheckpointBuf,
    /// Pages copied into `cp` while the guest ran (ring), for the checkpoint being built.
    precopied: u64,
    paused: bool,
    last_sent: Instant,
    /// The checkpoint in flight: (epoch, when its pause began, when it was sent).
    in_flight: Option<(u64, Instant, Instant)>,
    sum: ReplicationSummary,
    output: Option<Output<'a>>,
}

/// Replicates `vm` (running) over `stream` until it is stopped (`ctl.stop()`), reaches
/// `max_checkpoints`, or the standby is lost; the guest keeps running here in every case.
/// With `output`, the guest's output is released only as checkpoints are applied.
pub fn replicate<'a>(
    vm: &'a dyn MigratableVm,
    stream: TcpStream,
    opts: &PrimaryOptions,
    ctl: &'a ReplicaControl,
    output: Option<Output<'a>>,
) -> ReplicationSummary {
    let t0 = Instant::now();
    ctl.update(|i| {
        *i = ReplicationInfo {
            status: ReplicationStatus::Setup,
            ..ReplicationInfo::default()
        }
    });
    let mut p = match Primary::open(vm, stream, opts, ctl, output) {
        Ok(p) => p,
        Err(e) => {
            let mut sum = ReplicationSummary::default();
            sum.info.status = ReplicationStatus::StandbyLost;
            sum.info.reason = Some(e.to_string());
            ctl.update(|i| *i = sum.info.clone());
            return sum;
        }
    };
    let r = p.run();
    p.finish(r, t0)
}

impl<'a> Primary<'a> {
    fn open(
        vm: &'a dyn MigratableVm,
        stream: TcpStream,
        opts: &PrimaryOptions,
        ctl: &'a ReplicaControl,
        output: Option<Output<'a>>,
    ) -> std::result::Result<Self, MigrationError> {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(opts.ack_timeout))?;
        let mut acks = ReplicaAckReader::new(std::io::BufReader::new(stream.try_clone()?));
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("replica-acks".into())
            .spawn(move || loop {
                let a = acks.recv().map_err(|e| e.to_string());
                let end = !matches!(a, Ok(ReplicaAck::Ready | ReplicaAck::Applied(_)));
                if tx.send(a).is_err() || end {
                    return;
                }
            })?;
        let slots = vm.slots();
        let words = slots.iter().map(|s| s.bitmap_words()).max().unwrap_or(0);
        Ok(Primary {
            vm,
            opts: opts.clone(),
            ctl,
            sock: stream.try_clone()?,
            w: ReplicaWriter::new(BufWriter::with_capacity(1 << 20, stream)),
            acks: rx,
            reader: Some(reader),
            tracker: None,
            dirty: DirtyPageSet::new(&slots),
            ones: vec![u64::MAX; words],
            cp: CheckpointBuf::with_capacity(1024),
            precopied: 0,
            paused: false,
            last_sent: Instant::now(),
            in_flight: None,
            sum: ReplicationSummary::default(),
            output,
        })
    }

    fn run(&mut self) -> std::result::Result<(), Stop> {
        let layout = self.vm.layout()?;
        let hello = Hello::new(self.vm.tracker_mode(), self.vm.vcpu_count() as u32)
            .with_machine(self.vm.machine());
        self.w.open(&hello, &layout)?;
        match self.next_ack(self.opts.ack_timeout)? {
            Some(ReplicaAck::Ready) => {}
            Some(other) => return Err(Stop::Lost(format!("expected Ready, got {other:?}"))),
            None => {
                return Err(Stop::Lost(
                    "the standby did not answer the handshake".into(),
                ))
            }
        }
        let mut t = self.vm.tracker()?;
        t.start().map_err(MigrationError::from)?;
        self.tracker = Some(t);
        self.cp.reset(1);
        self.ctl.update(|i| i.status = ReplicationStatus::Seeding);
        self.seed()?;
        self.ctl.update(|i| i.status = ReplicationStatus::Active);
        let mut epoch = 0u64;
        let mut resumed = Instant::now();
        loop {
            let due = resumed + self.opts.checkpoint_delay;
            self.wait_epoch(due)?;
            if self.ctl.stopping() || self.done() {
                self.wait_acked()?;
                self.w.send_shutdown("replication stopped on the primary")?;
                return Ok(());
            }
            epoch += 1;
            resumed = self.checkpoint(epoch)?;
        }
    }

    fn done(&self) -> bool {
        self.opts
            .max_checkpoints
            .is_some_and(|n| self.sum.info.acked_epoch >= n || self.sum.info.epoch >= n)
    }

    /// The initial copy of all of memory, while the guest runs (the tracker already runs,
    /// so what the guest writes meanwhile goes into the first checkpoint).
    fn seed(&mut self) -> std::result::Result<(), Stop> {
        let mut populated = Populated::new(self.vm);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut n = 0u64;
        for s in self.vm.slots() {
            for p in 0..s.pages {
                let gpa = s.guest_phys_addr + p * PAGE_SIZE;
                if populated.may_hold_data(gpa)? {
                    self.vm.read_page(gpa, &mut page)?;
                    self.w.push_seed_page(gpa, &page)?;
                } else {
                    self.w.push_seed_zero(gpa)?;
                }
                n += 1;
                if n.is_multiple_of(4096) {
                    if self.ctl.stopping() {
                        return Err(Stop::Lost("stopped during the initial copy".into()));
                    }
                    self.harvest()?;
                }
            }
        }
        self.w.finish_seed()?;
        self.last_sent = Instant::now();
        let bytes = self.w.stats().bytes;
        self.sum.seed_pages = n;
        self.ctl.update(|i| i.bytes_sent = bytes);
        Ok(())
    }

    /// Ring tracker: collects the pages dirtied so far and copies them into the next
    /// checkpoint while the guest runs, so the pause collects and copies only the last ones.
    fn harvest(&mut self) -> std::result::Result<(), Stop> {
        if self.vm.tracker_mode() == TrackerMode::Ring {
            self.collect()?;
            self.precopied += self.copy_dirty()?;
        }
        Ok(())
    }

    /// Copies every page of the dirty set into the checkpoint (replacing an earlier copy of
    /// the same page) and empties the set; returns the pages copied. Sound while the guest
    /// runs because the tracker re-protected the pages before `collect` returned them.
    /// Heartbeats keep going out during a long copy (all of memory after a ring overrun
    /// can take longer than the standby's heartbeat timeout).
    fn copy_dirty(&mut self) -> std::result::Result<u64, Stop> {
        let vm = self.vm;
        let mut n = 0u64;
        for gpa in self.dirty.iter_gpa() {
            self.cp.put_page_with(gpa, |b| vm.read_page(gpa, b))?;
            n += 1;
            if n.is_multiple_of(4096) && self.last_sent.elapsed() >= self.opts.heartbeat_interval {
                self.w.send_heartbeat(self.sum.info.epoch, unix_ns())?;
                self.last_sent = Instant::now();
            }
        }
        self.dirty.clear();
        Ok(n)
    }

    fn collect(&mut self) -> std::result::Result<(), Stop> {
        let t = self
            .tracker
            .as_mut()
            .ok_or_else(|| MigrationError::Internal("no tracker".into()))?;
        let st = t.collect(&mut self.dirty).map_err(MigrationError::from)?;
        if st.tracking_lost {
            // A ring overran: every page goes into the next checkpoint.
            for i in 0..self.dirty.slots().len() {
                self.dirty.or_words(i, &self.ones);
            }
            self.sum.tracking_lost_events += 1;
        }
        Ok(())
    }

    /// Waits for the next ack, at most `timeout`; `None` on timeout.
    fn next_ack(&mut self, timeout: Duration) -> std::result::Result<Option<ReplicaAck>, Stop> {
        match self.acks.recv_timeout(timeout) {
            Ok(Ok(ReplicaAck::Error(e))) => Err(Stop::Lost(format!("the standby failed: {e}"))),
            Ok(Ok(a)) => Ok(Some(a)),
            Ok(Err(e)) => Err(Stop::Lost(e)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                Err(Stop::Lost("the standby's connection ended".into()))
            }
        }
    }

    fn on_ack(&mut self, a: ReplicaAck) -> std::result::Result<(), Stop> {
        let ReplicaAck::Applied(e) = a else {
            return Err(Stop::Lost(format!("unexpected answer {a:?}")));
        };
        match self.in_flight.take() {
            Some((epoch, t_pause, _)) if epoch == e => {
                let latency = t_pause.elapsed();
                if let Some(c) = self.sum.checkpoints.last_mut().filter(|c| c.epoch == e) {
                    c.latency_us = latency.as_micros() as u64;
                }
                if let Some(o) = self.output.as_mut() {
                    if let Err(err) = o.commit.release(e) {
                        tracing::warn!(error = %err, "releasing the guest's output failed");
                    }
                }
                self.sum.info.acked_epoch = e;
                self.ctl.update(|i| i.acked_epoch = e);
                Ok(())
            }
            other => Err(Stop::Lost(format!(
                "the standby acked epoch {e}, the one in flight is {other:?}"
            ))),
        }
    }

    /// The guest runs until `due`: the ring is harvested, heartbeats go out, acks come in.
    /// If the checkpoint in flight is not acked by `due`, the next pause waits for it (a
    /// stall, counted and timed).
    fn wait_epoch(&mut self, due: Instant) -> std::result::Result<(), Stop> {
        let mut next_harvest = Instant::now() + self.opts.harvest_interval;
        loop {
            let now = Instant::now();
            if now >= due && self.in_flight.is_none() {
                return Ok(());
            }
            if self.ctl.stopping() && self.in_flight.is_none() {
                return Ok(());
            }
            if now >= due {
                return self.wait_acked_stall(due);
            }
            if now >= next_harvest {
                self.harvest()?;
                next_harvest = now + self.opts.harvest_interval;
            }
            self.heartbeat()?;
            let wake = due
                .min(next_harvest)
                .min(self.last_sent + self.opts.heartbeat_interval);
            let left = wake.saturating_duration_since(Instant::now());
            if self.in_flight.is_some() {
                if let Some(a) = self.next_ack(left)? {
                    self.on_ack(a)?;
                }
            } else if !left.is_zero() {
                std::thread::sleep(left.min(Duration::from_millis(50)));
            }
        }
    }

    fn heartbeat(&mut self) -> std::result::Result<(), Stop> {
        if self.last_sent.elapsed() >= self.opts.heartbeat_interval {
            self.w.send_heartbeat(self.sum.info.epoch, unix_ns())?;
            self.last_sent = Instant::now();
        }
        Ok(())
    }

    /// The epoch is over but the standby has not acked the checkpoint in flight: wait
    /// (harvesting, sending heartbeats) and account the stall.
    fn wait_acked_stall(&mut self, due: Instant) -> std::result::Result<(), Stop> {
        self.sum.info.stalls += 1;
        self.wait_acked()?;
        let us = due.elapsed().as_micros() as u64;
        self.sum.info.stall_us += us;
        let (n, total) = (self.sum.info.stalls, self.sum.info.stall_us);
        self.ctl.update(|i| {
            i.stalls = n;
            i.stall_us = total;
        });
        Ok(())
    }

    fn wait_acked(&mut self) -> std::result::Result<(), Stop> {
        while let Some((epoch, _, t_sent)) = self.in_flight {
            if t_sent.elapsed() > self.opts.ack_timeout {
                return Err(Stop::Lost(format!(
                    "the standby did not apply checkpoint {epoch} within {:?}",
                    self.opts.ack_timeout
                )));
            }
            let slice = self.opts.harvest_interval.min(self.opts.heartbeat_interval);
            if let Some(a) = self.next_ack(slice)? {
                self.on_ack(a)?;
            }
            self.harvest()?;
            self.heartbeat()?;
        }
        Ok(())
    }

    /// Pause, collect, copy, state, output, resume; then send. Returns when the guest
    /// resumed.
    fn checkpoint(&mut self, epoch: u64) -> std::result::Result<Instant, Stop> {
        // Ring: harvest and copy right before pausing (again while that copied many pages),
        // so the pause copies only what the guest wrote during the last of these copies.
        if self.vm.tracker_mode() == TrackerMode::Ring {
            for _ in 0..FINAL_HARVESTS {
                let before = self.precopied;
                self.harvest()?;
                if self.precopied - before <= FINAL_HARVEST_ENOUGH {
                    break;
                }
            }
        }
        let t0 = Instant::now();
        self.vm.pause(self.opts.pause_timeout)?;
        self.paused = true;
        let t_parked = Instant::now();
        self.collect()?;
        let t1 = Instant::now();
        if self.cp.epoch() != epoch {
            return Err(Stop::Vm(MigrationError::Internal(format!(
                "checkpoint buffer of epoch {} at checkpoint {epoch}",
                self.cp.epoch()
            ))));
        }
        let copied = self.copy_dirty()?;
        let t2 = Instant::now();
        for (i, blob) in self.vm.save_vcpus()?.iter().enumerate() {
            self.cp.push_state(STATE_KIND_VCPU, i as u32, blob);
        }
        if let Some(m) = self.vm.save_machine()? {
            self.cp.push_state(STATE_KIND_MACHINE, 0, &m);
        }
        if let Some(o) = self.output.as_mut() {
            o.commit.capture(&mut *o.src, epoch);
            if !self.cp.push_output(o.commit.last_captured()) {
                tracing::warn!(
                    epoch,
                    "the epoch's output exceeds what a checkpoint carries"
                );
            }
        }
        let t3 = Instant::now();
        self.vm.resume();
        self.paused = false;
        let resumed = Instant::now();
        let bytes = self.w.send_checkpoint(&self.cp)?;
        let (pages, zero_pages) = (self.cp.pages(), self.cp.zero_pages());
        // Sent (and flushed): the buffer takes the next epoch's pages from now on.
        self.cp.reset(epoch + 1);
        let precopied = std::mem::take(&mut self.precopied);
        self.last_sent = Instant::now();
        self.in_flight = Some((epoch, t0, self.last_sent));
        let us = |a: Instant, b: Instant| b.duration_since(a).as_micros() as u64;
        if self.sum.checkpoints.len() >= super::MAX_KEPT_CHECKPOINTS {
            self.sum
                .checkpoints
                .drain(..super::MAX_KEPT_CHECKPOINTS / 2);
        }
        self.sum.checkpoints.push(CheckpointStats {
            epoch,
            pages,
            zero_pages,
            precopy_pages: precopied,
            pause_copy_pages: copied,
            bytes,
            pause_us: us(t0, resumed),
            park_us: us(t0, t_parked),
            collect_us: us(t_parked, t1),
            copy_us: us(t1, t2),
            state_us: us(t2, t3),
            latency_us: 0,
        });
        self.sum.info.epoch = epoch;
        let total = self.w.stats().bytes;
        self.ctl.update(|i| {
            i.epoch = epoch;
            i.bytes_sent = total;
        });
        Ok(resumed)
    }

    fn finish(mut self, r: std::result::Result<(), Stop>, t0: Instant) -> ReplicationSummary {
        if self.paused {
            self.vm.resume();
        }
        if let Some(mut t) = self.tracker.take() {
            if let Err(e) = t.stop() {
                tracing::warn!(error = %e, "stopping the dirty tracker failed");
            }
        }
        let (status, reason) = match r {
            Ok(()) => (ReplicationStatus::Stopped, None),
            Err(Stop::Lost(reason)) => (ReplicationStatus::StandbyLost, Some(reason)),
            Err(Stop::Vm(e)) => (ReplicationStatus::Failed, Some(e.to_string())),
        };
        if let Some(reason) = &reason {
            tracing::warn!(%reason, "replication ended; the guest keeps running on the primary");
        }
        // The primary is the only copy again: its held output is the truth.
        if let Some(o) = self.output.as_mut() {
            if let Err(e) = o.commit.release_all(Some(&mut *o.src)) {
                tracing::warn!(error = %e, "releasing the guest's output failed");
            }
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        self.sum.info.status = status;
        self.sum.info.reason = reason;
        self.sum.info.bytes_sent = self.w.stats().bytes;
        self.sum.info.guest_running = self.vm.is_running();
        self.sum.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let info = self.sum.info.clone();
        self.ctl.update(|i| *i = info);
        self.sum
    }
}
