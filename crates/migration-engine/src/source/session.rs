//! One migration from the source's side, phase by phase: [`Session::run`] = handshake ->
//! pre-copy start -> bulk pass -> pass loop -> switchover -> commit -> finish. Every
//! decision of the pass loop comes from the convergence policy; every error before the
//! commit leaves the guest on the source (the caller resumes it).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use kvm_dirty::{DirtyPageSet, DirtyTracker, PAGE_SIZE};
use migration::convergence::{Action, Convergence, Decision, PassReport};
use migration::digest::MemoryDigest;
use migration::wire::{Ack, Complete, Hello, MemoryLayout};

use super::collector::Collector;
use super::sender::{Acks, Sender};
use super::{memory_digest, BulkPages, FailPoint, Progress, SourceOptions};
use crate::cpu::CpuSpan;
use crate::error::{MigrationError, Result};
use crate::job::{Control, MigrationStatus};
use crate::seam::{DirtyLimitActuator, MigratableVm};
use crate::summary::{IterationStats, MigrationSummary, Outcome};
use crate::{unix_ns, STATE_KIND_MACHINE, STATE_KIND_VCPU};

/// How long the vCPUs may take to park at switchover.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A started tracker, stopped when dropped (so a failed or cancelled migration does not
/// leave dirty logging on).
struct TrackerGuard(Option<Box<dyn DirtyTracker>>);

impl TrackerGuard {
    fn get(&mut self) -> Result<&mut Box<dyn DirtyTracker>> {
        self.0
            .as_mut()
            .ok_or_else(|| MigrationError::Internal("the dirty tracker was stopped".into()))
    }

    fn stop(&mut self) -> Result<()> {
        match self.0.take() {
            Some(mut t) => Ok(t.stop()?),
            None => Ok(()),
        }
    }
}

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The state of pre-copy: tracker, rate collector, throttles and the policy.
struct Precopy {
    tracker: TrackerGuard,
    collector: Option<Collector>,
    limiter: Option<Box<dyn DirtyLimitActuator>>,
    policy: Convergence,
    /// The pages the last collect found (what the next pass sends).
    dirty: DirtyPageSet,
    /// All-ones bitmap words, to mark every page dirty when tracking was lost.
    ones: Vec<u64>,
    /// The number of the last pass sent (0 = bulk).
    iteration: u32,
    last_collect: Instant,
    last_pass_bytes: u64,
    /// Pages the last pass left unsent (`Step::defer_pages`); they go back into the set at
    /// the next collect. Reused.
    carried: Vec<u64>,
}

/// What the switchover hands to the commit.
struct Switched {
    pause_ns: u64,
    t_pause: Instant,
    marks: Vec<(&'static str, Instant)>,
    forced: bool,
    /// The paused memory's digest, when verified before the commit (sent in Complete).
    own: Option<MemoryDigest>,
    /// What computing `own` took, ms.
    verify_ms: f64,
}

/// How the pass loop ended.
enum LoopEnd {
    SwitchOver { forced: bool },
    Abort(String),
}

pub(super) struct Session<'a> {
    vm: &'a dyn MigratableVm,
    ctl: &'a Control,
    s: Sender<'a>,
    acks: Acks,
    summary: &'a mut MigrationSummary,
    progress: &'a mut dyn FnMut(&Progress),
    opts: SourceOptions,
    t_start: Instant,
    /// CPU accounting from the start; reported when the destination confirms the resume.
    cpu: &'a CpuSpan,
    paused: bool,
    fallback_bw: f64,
    /// Ring-full exits before this migration: one during it makes the digest check run
    /// before the commit (see [`Session::switchover`]).
    ring_full_at_open: u64,
    /// The VM's guest-fault counter at the end of the last recorded pass (or just before the
    /// tracker started): each pass's `guest_faults` is the difference to it.
    faults_mark: Option<u64>,
}

impl<'a> Session<'a> {
    pub(super) fn open(
        vm: &'a dyn MigratableVm,
        stream: TcpStream,
        host: &str,
        ctl: &'a Control,
        summary: &'a mut MigrationSummary,
        progress: &'a mut dyn FnMut(&Progress),
        cpu: &'a CpuSpan,
    ) -> Result<Self> {
        let opts = ctl.opts();
        let (s, acks) = Sender::open(vm, stream, host, ctl, &opts)?;
        summary.frame_crc = s.enc.frame_crc();
        Ok(Session {
            vm,
            ctl,
            s,
            acks,
            summary,
            progress,
            fallback_bw: opts.max_bandwidth.map(|b| b as f64).unwrap_or(1e9),
            opts,
            t_start: cpu.started(),
            cpu,
            paused: false,
            ring_full_at_open: vm.ring_full_exits(),
            faults_mark: None,
        })
    }

    /// Whether the source's vCPUs are paused and must be resumed after a failure (false
    /// once the commit was sent: the guest then belongs to the destination).
    pub(super) fn paused(&self) -> bool {
        self.paused
    }

    /// Best effort: tells the destination to drop everything.
    pub(super) fn abort(&mut self, reason: &str) {
        self.s.abort(reason);
    }

    /// The whole migration. `Ok` also for a deliberate abort (timeout), with the outcome in
    /// the summary.
    pub(super) fn run(&mut self) -> Result<()> {
        let layout = self.handshake()?;
        let mut pre = self.start_precopy(&layout)?;
        self.bulk_pass(&mut pre, &layout)?;
        let forced = match self.pass_loop(&mut pre)? {
            LoopEnd::SwitchOver { forced } => forced,
            LoopEnd::Abort(reason) => {
                self.give_up(pre, reason)?;
                return Ok(());
            }
        };
        let mut sw = self.switchover(&mut pre, forced)?;
        let dest_digest = self.commit(&mut sw)?;
        self.finish(pre, dest_digest);
        Ok(())
    }

    /// Hello + Layout, then the destination's Accepted.
    fn handshake(&mut self) -> Result<MemoryLayout> {
        let layout = self.vm.layout()?;
        let hello = Hello::new(self.vm.tracker_mode(), self.vm.vcpu_count() as u32)
            .with_machine(self.vm.machine());
        self.s.enc.send_hello(&hello)?;
        self.s.enc.send_layout(&layout)?;
        self.s.enc.flush()?;
        if self.s.fail_at == Some(FailPoint::Handshake) {
            self.s.cut();
        }
        let ack = self.acks.recv().map_err(|e| match e {
            // A TLS alert record (content type 21, version 3.x) where Accepted should be: a
            // plaintext source talking to a destination that requires TLS.
            migration::wire::WireError::BadMagic { found } if found[..2] == [0x15, 0x03] => {
                MigrationError::DestinationRequiresTls
            }
            e => e.into(),
        })?;
        match ack {
            Ack::Accepted => Ok(layout),
            Ack::Error(e) => Err(MigrationError::Destination(e)),
            other => Err(MigrationError::Protocol(format!(
                "expected Accepted, got {other:?}"
            ))),
        }
    }

    /// Starts the tracker (before the bulk pass: a page written during it is sent again
    /// later), the rate collector and the policy's initial actions.
    fn start_precopy(&mut self, layout: &MemoryLayout) -> Result<Precopy> {
        let mut tracker = TrackerGuard(Some(self.vm.tracker()?));
        self.faults_mark = self.vm.guest_faults();
        // Deferred: a clear-log tracker protects each chunk just before the bulk pass sends it.
        tracker.get()?.start_deferred()?;
        let collector = self
            .vm
            .dirty_counters()
            .map(|c| Collector::start(c, self.opts.poll_interval, self.opts.high_water));
        let slots = self.vm.slots();
        let words = slots.iter().map(|s| s.bitmap_words()).max().unwrap_or(0);
        let mut pre = Precopy {
            tracker,
            collector,
            limiter: None,
            policy: Convergence::new(self.opts.policy_config()),
            dirty: DirtyPageSet::new(&slots),
            ones: vec![u64::MAX; words],
            iteration: 0,
            last_collect: Instant::now(),
            last_pass_bytes: 0,
            carried: Vec::new(),
        };
        let actions = pre.policy.start();
        self.apply(&mut pre, actions)?;
        self.summary.setup_ms = self.t_start.elapsed().as_secs_f64() * 1e3;
        let setup_ms = self.summary.setup_ms as u64;
        self.ctl.update(|l, _| {
            l.setup_ms = Some(setup_ms);
            l.ram.total = layout.total_bytes();
            l.ram.page_size = PAGE_SIZE;
        });
        self.ctl.set_status(MigrationStatus::Active);
        Ok(pre)
    }

    /// Pass 0: all of memory.
    fn bulk_pass(&mut self, pre: &mut Precopy, layout: &MemoryLayout) -> Result<()> {
        self.ctl.dirty_synced();
        pre.last_collect = Instant::now();
        let total = layout.total_pages();
        let regions = layout
            .regions()
            .iter()
            .map(|r| (r.guest_phys_addr, r.size / PAGE_SIZE));
        let mut all = BulkPages::new(&mut **pre.tracker.get()?, regions);
        let sent = self.s.pass(0, total, false, &mut all, self.progress, total);
        if let Some(e) = all.error.take() {
            return Err(e.into());
        }
        let (n, z, b, secs) = sent?;
        pre.last_pass_bytes = b;
        let vcpu_rates = pre.collector.as_ref().map(|c| c.rates());
        self.record_pass(0, (n, z, b, secs), 0.0, vcpu_rates, 0);
        Ok(())
    }

    fn record_pass(
        &mut self,
        iteration: u32,
        (pages, zero_pages, bytes, secs): (u64, u64, u64, f64),
        rate: f64,
        vcpu_dirty_rates: Option<Vec<f64>>,
        deferred_pages: u64,
    ) {
        let faults_now = self.vm.guest_faults();
        let guest_faults = self
            .faults_mark
            .zip(faults_now)
            .map(|(a, b)| b.wrapping_sub(a));
        self.faults_mark = faults_now;
        if let Some(f) = guest_faults {
            *self.summary.guest_faults.get_or_insert(0) += f;
        }
        self.summary.push_iteration(IterationStats {
            iteration,
            pages,
            zero_pages,
            bytes,
            ms: secs * 1e3,
            dirty_rate_pages_per_s: rate,
            vcpu_dirty_rates,
            bandwidth_bytes_per_s: self.s.bandwidth(self.fallback_bw),
            deferred_pages,
            guest_faults,
        });
    }

    /// Collects the dirty pages into `pre.dirty` (emptied first unless `keep`); returns how
    /// many there are. A collect that lost track of pages (a ring overran) makes every page
    /// dirty, so the next pass resends all of memory.
    fn collect(&mut self, pre: &mut Precopy, keep: bool) -> Result<u64> {
        if !keep {
            pre.dirty.clear();
        }
        // The tail the last pass deferred is still dirty: back into the set first.
        for &gpa in &pre.carried {
            pre.dirty.insert_gpa(gpa);
        }
        pre.carried.clear();
        let st = pre.tracker.get()?.collect(&mut pre.dirty)?;
        self.ctl.dirty_synced();
        if st.tracking_lost {
            for i in 0..pre.dirty.slots().len() {
                pre.dirty.or_words(i, &pre.ones);
            }
            self.summary.tracking_lost_events += 1;
            self.summary.log.push(format!(
                "after pass {}: dirty tracking lost pages (ring overrun); all memory is sent again",
                pre.iteration
            ));
            let n = self.summary.tracking_lost_events;
            self.ctl.update(|l, _| l.x.tracking_lost_events = n);
        }
        Ok(pre.dirty.count())
    }

    /// Applies live parameter changes (`set_options`) at a pass boundary.
    fn retune(&mut self, pre: &mut Precopy) -> Result<()> {
        let cfg = self.ctl.opts().policy_config();
        if &cfg != pre.policy.config() {
            let actions = pre.policy.set_config(cfg);
            self.apply(pre, actions)?;
        }
        Ok(())
    }

    /// Applies the policy's actions to the VM.
    fn apply(&mut self, pre: &mut Precopy, actions: Vec<Action>) -> Result<()> {
        for a in actions {
            match a {
                Action::SetCpuThrottle { percent } => {
                    self.vm.set_cpu_throttle(percent);
                    if percent > 0 {
                        self.summary.dirty_limit_events += 1;
                        self.summary.log.push(format!(
                            "after pass {} ({:.1} s): cpu throttle {percent}%",
                            pre.iteration,
                            self.t_start.elapsed().as_secs_f64()
                        ));
                    }
                }
                Action::SetDirtyLimit { bytes_per_s, vcpus } => {
                    if pre.limiter.is_none() {
                        pre.limiter = Some(self.vm.start_dirty_limiter()?);
                    }
                    if let Some(l) = &pre.limiter {
                        l.set_quota(Some(bytes_per_s), vcpus);
                    }
                    self.summary.dirty_limit_events += 1;
                }
                Action::ClearDirtyLimit => {
                    if let Some(l) = &pre.limiter {
                        l.set_quota(None, None);
                    }
                }
                Action::LiftThrottles => {
                    pre.limiter = None;
                    self.vm.set_cpu_throttle(0);
                }
            }
        }
        self.summary.dirty_limit_bytes_per_s = pre.policy.dirty_limit();
        self.summary.cpu_throttle = f64::from(pre.policy.throttle_percent()) / 100.0;
        Ok(())
    }

    /// Collect, ask the policy, send another pass, until it says switch over or give up.
    fn pass_loop(&mut self, pre: &mut Precopy) -> Result<LoopEnd> {
        loop {
            self.ctl.check()?;
            self.retune(pre)?;
            let carried_pages = pre.carried.len() as u64;
            let pages = self.collect(pre, false)?;
            let now = Instant::now();
            let rate = pages as f64 / now.duration_since(pre.last_collect).as_secs_f64().max(1e-6);
            pre.last_collect = now;
            let vcpu_rates = pre.collector.as_ref().map(|c| c.rates());
            let step = pre.policy.on_collect(&PassReport {
                elapsed: self.t_start.elapsed(),
                dirty_pages: pages,
                last_pass_bytes: pre.last_pass_bytes,
                bandwidth_bytes_per_s: self.s.bandwidth(self.fallback_bw),
                vcpu_dirty_rates: vcpu_rates.clone(),
                carried_pages,
            });
            let expected_ms = (step.expected_downtime.as_secs_f64() * 1e3).round() as u64;
            let (throttle, limit) = (pre.policy.throttle_percent(), pre.policy.dirty_limit());
            let rates = vcpu_rates.clone();
            self.ctl.update(|l, _| {
                l.ram.dirty_pages_rate = rate as u64;
                l.expected_downtime_ms = Some(expected_ms);
                l.x.vcpu_dirty_rates = rates;
                l.x.throttle_percent = u64::from(throttle);
                l.x.dirty_limit_bytes_per_s = limit;
            });
            let hold = step.next_collect_at;
            match step.decision {
                Decision::NextPass => self.apply(pre, step.actions)?,
                // Throttles are lifted once the vCPUs are paused (no unthrottled burst lands
                // in the final pass).
                Decision::SwitchOver { forced, reason } => {
                    self.summary.log.push(reason.to_string());
                    return Ok(LoopEnd::SwitchOver { forced });
                }
                Decision::Abort { reason } => {
                    self.apply(pre, step.actions)?;
                    return Ok(LoopEnd::Abort(reason.to_string()));
                }
            }
            pre.iteration += 1;
            // Rule 8: the last `defer_pages` pages wait for the next collect.
            let send = pages - step.defer_pages.min(pages);
            let mut it = pre.dirty.iter_gpa();
            let r = self.s.pass(
                pre.iteration,
                send,
                false,
                &mut it.by_ref().take(send as usize),
                self.progress,
                pages,
            )?;
            pre.carried.extend(it);
            pre.last_pass_bytes = r.2;
            let deferred = pre.carried.len() as u64;
            self.record_pass(pre.iteration, r, rate, vcpu_rates, deferred);
            if let Some(at) = hold {
                self.hold_until(self.t_start + at)?;
            }
        }
    }

    /// Waits (cancellable) until `until` before the next collect: the policy's pass pacing
    /// while pre-copy is not converging (`migration::convergence` rule 7).
    fn hold_until(&mut self, until: Instant) -> Result<()> {
        const SLICE: Duration = Duration::from_millis(10);
        loop {
            self.ctl.check()?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(SLICE));
        }
    }

    /// A deliberate abort (timeout): the destination drops everything, the guest stays.
    fn give_up(&mut self, pre: Precopy, reason: String) -> Result<()> {
        self.s
            .enc
            .send_abort("source timed out before convergence")?;
        self.totals();
        drop(pre);
        self.vm.set_cpu_throttle(0);
        self.summary.outcome = Outcome::Aborted { reason };
        Ok(())
    }

    /// Sync barrier, pause, final collect and pass, device state, Complete.
    fn switchover(&mut self, pre: &mut Precopy, forced: bool) -> Result<Switched> {
        // Barrier: wait until the destination has processed everything sent so far
        // (decoding, writing pages), so its backlog does not land in the downtime. The guest
        // runs on; what it dirties meanwhile goes into the final pass.
        self.ctl.check()?;
        let t_sync = Instant::now();
        let token = u64::from(pre.iteration);
        self.s.enc.send_sync(token)?;
        loop {
            match self.acks.recv()? {
                Ack::Synced(t) if t == token => break,
                Ack::Synced(_) => {}
                Ack::Error(e) => return Err(MigrationError::Destination(e)),
                other => {
                    return Err(MigrationError::Protocol(format!(
                        "expected Synced, got {other:?}"
                    )))
                }
            }
        }
        self.summary.switchover_sync_ms = t_sync.elapsed().as_secs_f64() * 1e3;
        // The collector is stopped (joined: up to one poll interval) before the pause, so its
        // exit is not downtime; a ring that fills meanwhile is handled by its vCPU thread.
        let vcpu_rates = pre.collector.as_ref().map(|c| c.rates());
        pre.collector = None;
        self.ctl.check()?;
        let pause_ns = unix_ns();
        let t_pause = Instant::now();
        let mut marks: Vec<(&'static str, Instant)> = Vec::with_capacity(8);
        self.vm.pause(PAUSE_TIMEOUT)?;
        self.paused = true;
        marks.push(("pause", Instant::now()));
        self.ctl.update(|l, _| l.paused = true);
        self.ctl.set_status(MigrationStatus::Device);
        // Limits end with the switchover (the guest does not take them along); lifted only
        // now that the vCPUs are paused.
        self.apply(pre, vec![Action::LiftThrottles])?;
        let pages = self.collect(pre, true)?;
        marks.push(("final collect", Instant::now()));
        pre.iteration += 1;
        let mut it = pre.dirty.iter_gpa();
        let r = self
            .s
            .pass(pre.iteration, pages, true, &mut it, self.progress, pages)?;
        marks.push(("final pass", Instant::now()));
        self.record_pass(pre.iteration, r, 0.0, vcpu_rates, 0);
        for (i, blob) in self.vm.save_vcpus()?.iter().enumerate() {
            self.s.enc.send_state(STATE_KIND_VCPU, i as u32, blob)?;
        }
        if let Some(m) = self.vm.save_machine()? {
            self.s.enc.send_state(STATE_KIND_MACHINE, 0, &m)?;
        }
        // Verified before the commit: the digest of the paused memory travels in Complete
        // and the destination checks it before it restores anything (ReadyToResume); it
        // also comes back in ReadyToResume for the source's own comparison.
        //
        // A dirty ring that filled up during the migration makes this check run too: on a
        // host whose instruction emulator overruns a full ring (PVM; `pvm-host.md`), entries
        // are overwritten before they are read and no index shows it, so only the digest
        // proves nothing was lost. A mismatch then fails the migration before the commit and
        // the guest keeps running here, instead of resuming on the destination with stale
        // pages.
        let ring_filled = self.vm.ring_full_exits() > self.ring_full_at_open;
        let before = self.opts.verify && (self.opts.verify_before_commit || ring_filled);
        if before && !self.opts.verify_before_commit {
            self.summary.log.push(format!(
                "a dirty ring filled up during the migration ({} ring-full exits): the memory \
                 digest is checked before the commit",
                self.vm.ring_full_exits() - self.ring_full_at_open
            ));
        }
        let t_verify = Instant::now();
        let own = if before {
            Some(memory_digest(self.vm)?)
        } else {
            None
        };
        let verify_ms = t_verify.elapsed().as_secs_f64() * 1e3;
        let sent = self.s.enc.stats();
        self.s.enc.send_complete(&Complete {
            pages_sent: sent.pages,
            digest: own.clone(),
        })?;
        self.ctl.update(|l, _| l.record_tx(sent));
        marks.push(("vCPU state + complete", Instant::now()));
        if self.s.fail_at == Some(FailPoint::BeforeFinalAck) {
            self.s.cut();
        }
        Ok(Switched {
            pause_ns,
            t_pause,
            marks,
            forced,
            own,
            verify_ms,
        })
    }

    /// Waits for the destination's restore, checks the digest before the commit if asked,
    /// commits (the point of no return) and waits for Resumed. Returns the destination's
    /// digest.
    fn commit(&mut self, sw: &mut Switched) -> Result<Option<MemoryDigest>> {
        let own = sw.own.take();
        let verify_ms = sw.verify_ms;
        let dest_digest = match self.acks.recv()? {
            Ack::ReadyToResume { digest } => digest,
            Ack::Error(e) => return Err(MigrationError::Destination(e)),
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected ReadyToResume, got {other:?}"
                )))
            }
        };
        if let Some(own) = &own {
            let d = dest_digest.as_ref().ok_or_else(|| {
                MigrationError::Protocol("destination sent no memory digest to verify".into())
            })?;
            own.verify(d).map_err(MigrationError::Digest)?;
            self.summary.verified = Some(true);
            self.summary.verify_ms = Some(verify_ms);
        }
        sw.marks
            .push(("destination restore (ReadyToResume)", Instant::now()));
        // Point of no return: after Commit the destination owns the guest. A cancel that
        // came first wins; after this, cancels are ignored.
        self.ctl.commit_point()?;
        self.s.enc.send_commit()?;
        // The guest now lives on the destination (or, if Resumed never comes, maybe there):
        // from here on nothing resumes the source.
        self.paused = false;
        let t_commit = Instant::now();
        self.summary.forced_switchover = sw.forced;
        match self.acks.recv() {
            Ok(Ack::Resumed { unix_ns: resumed }) => {
                sw.marks.push(("commit + resume (Resumed)", Instant::now()));
                let mut prev = sw.t_pause;
                for (what, t) in &sw.marks {
                    self.summary
                        .downtime_breakdown_ms
                        .push((what.to_string(), t.duration_since(prev).as_secs_f64() * 1e3));
                    prev = *t;
                }
                self.summary.total_ms = self.t_start.elapsed().as_secs_f64() * 1e3;
                self.summary.cpu = Some(self.cpu.finish());
                self.summary.downtime_ms = resumed.saturating_sub(sw.pause_ns) as f64 / 1e6;
                self.summary.outcome = Outcome::Completed;
            }
            Ok(other) => {
                self.summary.outcome = Outcome::CommittedUnconfirmed {
                    reason: format!("expected Resumed, got {other:?}"),
                }
            }
            Err(e) => {
                self.summary.outcome = Outcome::CommittedUnconfirmed {
                    reason: e.to_string(),
                }
            }
        }
        self.summary.downtime_source_ms = t_commit.duration_since(sw.t_pause).as_secs_f64() * 1e3;
        Ok(dest_digest)
    }

    /// The stream totals into the summary and the live counters.
    fn totals(&mut self) {
        let st = self.s.enc.stats();
        let send_secs: f64 = self.summary.iterations.iter().map(|i| i.ms).sum::<f64>() / 1e3;
        self.summary.bandwidth_bytes_per_s = if send_secs > 0.0 {
            st.bytes as f64 / send_secs
        } else {
            0.0
        };
        self.summary.pages_sent = st.pages;
        self.summary.zero_pages = st.zero_pages;
        self.summary.bytes_sent = st.bytes;
        self.summary.ring_full_exits = self.vm.ring_full_exits();
        self.ctl.update(|l, _| l.record_tx(st));
    }

    /// After the commit: the digest check (unless done before), the totals, the tracker
    /// stopped. Nothing here can fail the migration any more; problems are logged.
    fn finish(&mut self, pre: Precopy, dest_digest: Option<MemoryDigest>) {
        if self.opts.verify && self.summary.verified.is_none() {
            // Off the critical path, and the resumed guest may share this host's cores:
            // lowest priority, so it never delays the guest's vCPUs.
            let old_nice = vmm::renice_current_thread(19);
            // The source's vCPUs stay paused for good: its memory is the memory at pause.
            let t = Instant::now();
            match memory_digest(self.vm) {
                Ok(own) => {
                    self.summary.verified =
                        Some(dest_digest.as_ref().is_some_and(|d| own.verify(d).is_ok()));
                    self.summary.verify_ms = Some(t.elapsed().as_secs_f64() * 1e3);
                }
                Err(e) => self
                    .summary
                    .log
                    .push(format!("the source's memory digest failed: {e}")),
            }
            if let Some(n) = old_nice {
                vmm::renice_current_thread(n);
            }
        }
        self.totals();
        let mut tracker = pre.tracker;
        if let Err(e) = tracker.stop() {
            self.summary
                .log
                .push(format!("stopping the dirty tracker failed: {e}"));
        }
    }
}
