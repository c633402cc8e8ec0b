//! The migration summary (`--json`).

use crate::source::SourceOptions;

/// How a migration ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Outcome {
    /// Not finished.
    Running,
    /// The guest runs on the destination; the source VM is stopped.
    Completed,
    /// Deliberately abandoned (timeout); the guest keeps running on the source.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Cancelled by the operator before commit; the guest keeps running on the source and
    /// the destination was told to drop what it received.
    Cancelled,
    /// An error before commit; the guest keeps running on the source.
    Failed {
        /// The error.
        reason: String,
        /// Whether the source's vCPUs are running again.
        source_running: bool,
    },
    /// Commit was sent but the destination did not confirm the resume.
    CommittedUnconfirmed {
        /// What happened.
        reason: String,
    },
}

/// One pre-copy pass.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IterationStats {
    /// Pass number (0 = bulk, the last one ran with the source paused).
    pub iteration: u32,
    /// Pages sent.
    pub pages: u64,
    /// Of those, sent as zero markers.
    pub zero_pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Duration of the pass, ms.
    pub ms: f64,
    /// Pages dirtied per second since the previous collect (whole VM).
    pub dirty_rate_pages_per_s: f64,
    /// Ring mode: pages per second per vCPU over the last second (from the ring collector).
    pub vcpu_dirty_rates: Option<Vec<f64>>,
    /// Bandwidth estimate after this pass, bytes/s.
    pub bandwidth_bytes_per_s: f64,
    /// Dirty pages this pass left for the next collect (the tail that would fit the
    /// downtime limit, while the rest did not: `migration::convergence` rule 8).
    pub deferred_pages: u64,
    /// Page faults the guest took during this pass (from the end of the previous pass, or
    /// from just before the tracker started, to the end of this one): KVM's `pf_taken`
    /// summed over the vCPUs; null where the VM cannot count them.
    pub guest_faults: Option<u64>,
}

/// Everything `ringvisor migrate --json` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationSummary {
    /// Outcome.
    pub outcome: Outcome,
    /// Tracker used.
    pub tracker: String,
    /// `downtime-limit` in ms.
    pub downtime_limit_ms: u64,
    /// `max-bandwidth` in bytes/s (null = unlimited).
    pub max_bandwidth: Option<u64>,
    /// From start to the destination's resume (or to the failure / abort), ms; the
    /// post-commit digest check is not included.
    pub total_ms: f64,
    /// Connection, handshake and tracker start, ms.
    pub setup_ms: f64,
    /// Source pause to destination resume (one host clock, CLOCK_REALTIME), ms.
    pub downtime_ms: f64,
    /// Source pause to commit sent, ms (the source's share of the downtime).
    pub downtime_source_ms: f64,
    /// Time to digest the source's paused memory, ms (inside the downtime only with
    /// `verify_before_commit`).
    pub verify_ms: Option<f64>,
    /// Whether source and destination memory digests matched.
    pub verified: Option<bool>,
    /// Where the downtime went, in order: (step, ms) as the source saw it.
    pub downtime_breakdown_ms: Vec<(String, f64)>,
    /// Whether the switchover was forced by the timeout.
    pub forced_switchover: bool,
    /// Passes.
    pub iterations: Vec<IterationStats>,
    /// Pages sent in total.
    pub pages_sent: u64,
    /// Zero pages sent as markers.
    pub zero_pages: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Average bandwidth over the whole migration, bytes/s.
    pub bandwidth_bytes_per_s: f64,
    /// Ring-full exits during the migration (ring mode).
    pub ring_full_exits: u64,
    /// Page faults the guest took from just before the tracker started to the end of the
    /// final pass (the sum of the passes' `guest_faults`); null where the VM cannot count
    /// them.
    pub guest_faults: Option<u64>,
    /// Times a dirty limit or CPU throttle was applied or raised.
    pub dirty_limit_events: u32,
    /// The last automatic per-vCPU dirty quota, bytes/s.
    pub dirty_limit_bytes_per_s: Option<u64>,
    /// The last auto-converge CPU throttle (0..=0.99).
    pub cpu_throttle: f64,
    /// Time the source waited, before the pause, for the destination to process everything
    /// sent so far (the Sync barrier), ms. This backlog would otherwise be downtime.
    pub switchover_sync_ms: f64,
    /// Collects that reported lost dirty tracking (a ring overran); each made the next pass
    /// resend all of memory.
    pub tracking_lost_events: u32,
    /// What the engine decided and noticed, in order (switchover reason, lost tracking,
    /// problems after the commit).
    pub log: Vec<String>,
    /// Where the CPU went from the start to the destination's resume (or to the failure):
    /// the migration thread, each vCPU thread, and the host's idle time.
    pub cpu: Option<crate::cpu::CpuReport>,
    /// Whether the stream's frames carried CRC-32Cs (false: TLS with a destination that
    /// agreed the AEAD authenticates every byte).
    pub frame_crc: bool,
}

impl MigrationSummary {
    pub(crate) fn new(tracker: &str, o: &SourceOptions) -> Self {
        MigrationSummary {
            outcome: Outcome::Running,
            tracker: tracker.to_string(),
            downtime_limit_ms: o.downtime_limit.as_millis() as u64,
            max_bandwidth: o.max_bandwidth,
            total_ms: 0.0,
            setup_ms: 0.0,
            downtime_ms: 0.0,
            downtime_source_ms: 0.0,
            verify_ms: None,
            verified: None,
            downtime_breakdown_ms: Vec::new(),
            forced_switchover: false,
            iterations: Vec::new(),
            pages_sent: 0,
            zero_pages: 0,
            bytes_sent: 0,
            bandwidth_bytes_per_s: 0.0,
            ring_full_exits: 0,
            guest_faults: None,
            dirty_limit_events: 0,
            dirty_limit_bytes_per_s: None,
            cpu_throttle: 0.0,
            switchover_sync_ms: 0.0,
            tracking_lost_events: 0,
            log: Vec::new(),
            cpu: None,
            frame_crc: true,
        }
    }

    pub(crate) fn push_iteration(&mut self, it: IterationStats) {
        self.iterations.push(it);
    }

    /// Whether the guest now runs on the destination.
    pub fn completed(&self) -> bool {
        self.outcome == Outcome::Completed
    }

    /// A short human summary.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "outcome: {}\ntracker: {} | total {:.0} ms | setup {:.0} ms | downtime {:.1} ms (limit {} ms) | digest check {} | {} passes\n",
            match &self.outcome {
                Outcome::Completed => "completed (the guest runs on the destination)".to_string(),
                o => format!("{o:?}"),
            },
            self.tracker,
            self.total_ms,
            self.setup_ms,
            self.downtime_ms,
            self.downtime_limit_ms,
            self.verify_ms
                .map(|v| format!("{v:.1} ms"))
                .unwrap_or_else(|| "off".into()),
            self.iterations.len()
        );
        s.push_str(&format!(
            "sent {} pages ({} zero markers), {:.1} MiB, average {:.0} MB/s; ring-full exits {}; memory verified: {}\n",
            self.pages_sent,
            self.zero_pages,
            self.bytes_sent as f64 / (1 << 20) as f64,
            self.bandwidth_bytes_per_s / 1e6,
            self.ring_full_exits,
            match self.verified {
                Some(true) => "yes (digests match)",
                Some(false) => "NO",
                None => "not checked",
            }
        ));
        if !self.downtime_breakdown_ms.is_empty() {
            s.push_str(&format!(
                "before the pause: destination caught up in {:.1} ms\n",
                self.switchover_sync_ms
            ));
            s.push_str("downtime: ");
            s.push_str(
                &self
                    .downtime_breakdown_ms
                    .iter()
                    .map(|(w, ms)| format!("{w} {ms:.1} ms"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            s.push('\n');
        }
        for l in &self.log {
            s.push_str(&format!("note: {l}\n"));
        }
        if let Some(f) = self.guest_faults {
            s.push_str(&format!("guest page faults during pre-copy: {f}\n"));
        }
        s.push_str(
            "pass | pages | zero | MiB | ms | dirty pages/s | guest faults | per-vCPU pages/s\n",
        );
        for it in &self.iterations {
            s.push_str(&format!(
                "{:>4} | {:>8} | {:>8} | {:>7.1} | {:>7.1} | {:>10.0} | {:>8} | {}\n",
                it.iteration,
                it.pages,
                it.zero_pages,
                it.bytes as f64 / (1 << 20) as f64,
                it.ms,
                it.dirty_rate_pages_per_s,
                it.guest_faults
                    .map(|f| f.to_string())
                    .unwrap_or_else(|| "-".into()),
                it.vcpu_dirty_rates
                    .as_ref()
                    .map(|v| v
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect::<Vec<_>>()
                        .join(" "))
                    .unwrap_or_else(|| "-".into())
            ));
        }
        s
    }
}
