//! The `--json` migration summary and the per-pass statistics it is built from.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::MemoryDigest;
use crate::policy::{MigrationParams, SwitchoverReason, TrackerMode};

/// Nanoseconds since the Unix epoch (`CLOCK_REALTIME`). Both processes of a loopback
/// migration read the same clock, so the source can subtract its pause time from the
/// destination's [`Ack::Resumed`](crate::wire::Ack::Resumed) timestamp.
pub fn unix_time_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One pre-copy pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterationStats {
    /// Pass number (0 = bulk pass).
    pub iteration: u32,
    /// Pages sent (zero and data).
    pub pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Bytes written to the stream.
    pub bytes: u64,
    /// Wall time of the pass, ms.
    pub duration_ms: f64,
    /// Pages dirtied while the pass ran.
    pub dirty_pages: u64,
    /// Dirty rate seen during the pass, bytes/s.
    pub dirty_rate_bytes_per_sec: f64,
    /// Per-vCPU dirty rates, bytes/s (ring tracker only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vcpu_dirty_rates_bytes_per_sec: Option<Vec<f64>>,
    /// Bandwidth estimate at the end of the pass, bytes/s.
    pub bandwidth_bytes_per_sec: Option<f64>,
    /// The non-convergence trigger fired at the end of this pass.
    pub not_converging: bool,
}

/// How the migration ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum Outcome {
    /// The guest runs on the destination.
    Completed {
        /// Why the source switched over.
        switchover: SwitchoverReason,
    },
    /// Aborted on timeout; the guest kept running on the source.
    TimedOut {
        /// Time spent, ms.
        elapsed_ms: u64,
    },
    /// Failed; the guest kept running on the source.
    Failed {
        /// What failed.
        error: String,
    },
}

/// Where the downtime went, ms, measured on the source except `resume_ms`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// vCPU pause, kick and final harvest.
    pub final_harvest_ms: f64,
    /// Sending the last dirty pages.
    pub final_pages_ms: f64,
    /// Saving and sending vCPU and device state.
    pub state_ms: f64,
    /// From Complete sent until the destination reported Resumed.
    pub resume_ms: f64,
}

/// The end-to-end memory check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DigestReport {
    /// The source's digest of its memory at pause.
    pub source: MemoryDigest,
    /// The destination's digest of what it received, if it sent one.
    pub destination: Option<MemoryDigest>,
    /// `destination == Some(source)`.
    pub matches: bool,
}

impl DigestReport {
    /// Builds the report, comparing the two digests.
    pub fn new(source: MemoryDigest, destination: Option<MemoryDigest>) -> Self {
        let matches = destination.as_ref() == Some(&source);
        DigestReport {
            source,
            destination,
            matches,
        }
    }
}

/// The summary `--json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationSummary {
    /// Final outcome.
    pub outcome: Outcome,
    /// Tracker used.
    pub tracker: TrackerMode,
    /// Parameters in force.
    pub params: MigrationParams,
    /// Guest memory size, bytes.
    pub guest_memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Start of migration to destination resumed (or to abort), ms.
    pub total_ms: f64,
    /// Start to first page sent (connect, handshake, enabling tracking), ms.
    pub setup_ms: f64,
    /// Source pause to destination resume on one clock, ms (`None` if it did not resume).
    pub downtime_ms: Option<f64>,
    /// Where the downtime went.
    pub downtime_breakdown: Option<DowntimeBreakdown>,
    /// Every pass, the final one included.
    pub iterations: Vec<IterationStats>,
    /// Pages sent over all passes.
    pub pages_sent: u64,
    /// Zero pages sent as markers.
    pub zero_pages: u64,
    /// Bytes written to the stream.
    pub bytes_sent: u64,
    /// Average bandwidth over the whole transfer, bytes/s.
    pub bandwidth_bytes_per_sec: f64,
    /// Times the non-convergence trigger fired.
    pub throttle_events: u32,
    /// Memory digest comparison.
    pub digest: Option<DigestReport>,
}

impl MigrationSummary {
    /// Sums pages, zero pages and bytes over `iterations` into the totals.
    pub fn fill_totals(&mut self) {
        self.pages_sent = self.iterations.iter().map(|i| i.pages).sum();
        self.zero_pages = self.iterations.iter().map(|i| i.zero_pages).sum();
        self.bytes_sent = self.iterations.iter().map(|i| i.bytes).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_serializes_with_tagged_outcome_and_skips_missing_vcpu_rates() {
        let it = IterationStats {
            iteration: 0,
            pages: 10,
            zero_pages: 3,
            bytes: 7 * 4104,
            duration_ms: 1.5,
            dirty_pages: 2,
            dirty_rate_bytes_per_sec: 5.0,
            vcpu_dirty_rates_bytes_per_sec: None,
            bandwidth_bytes_per_sec: Some(1e9),
            not_converging: false,
        };
        let mut s = MigrationSummary {
            outcome: Outcome::Completed {
                switchover: SwitchoverReason::Converged {
                    expected_downtime_ms: 12.0,
                },
            },
            tracker: TrackerMode::Ring,
            params: MigrationParams::default(),
            guest_memory_bytes: 1 << 30,
            vcpus: 2,
            total_ms: 100.0,
            setup_ms: 2.0,
            downtime_ms: Some(20.0),
            downtime_breakdown: Some(DowntimeBreakdown::default()),
            iterations: vec![it.clone(), it],
            pages_sent: 0,
            zero_pages: 0,
            bytes_sent: 0,
            bandwidth_bytes_per_sec: 1e9,
            throttle_events: 0,
            digest: Some(DigestReport::new(
                MemoryDigest { regions: vec![1] },
                Some(MemoryDigest { regions: vec![1] }),
            )),
        };
        s.fill_totals();
        assert_eq!((s.pages_sent, s.zero_pages), (20, 6));
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["outcome"]["result"], "completed");
        assert_eq!(v["outcome"]["switchover"]["reason"], "converged");
        assert_eq!(v["tracker"], "ring");
        assert_eq!(v["digest"]["matches"], true);
        assert!(v["iterations"][0]
            .get("vcpu_dirty_rates_bytes_per_sec")
            .is_none());
        let back: MigrationSummary = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn digest_report_flags_a_missing_or_different_destination_digest() {
        let a = MemoryDigest {
            regions: vec![1, 2],
        };
        assert!(!DigestReport::new(a.clone(), None).matches);
        assert!(
            !DigestReport::new(
                a.clone(),
                Some(MemoryDigest {
                    regions: vec![1, 3]
                })
            )
            .matches
        );
    }
}
