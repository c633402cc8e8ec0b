//! Convergence policy: when to stop the guest and switch over, with QEMU's parameters,
//! defaults and rules (see `shared/reference/kvm-dirty-ring.md` §3.4).
//!
//! - Switchover: remaining dirty bytes <= bandwidth × `downtime_limit` (QEMU's
//!   `threshold_size`); `avail_switchover_bandwidth`, when set, replaces the measured
//!   bandwidth, as in QEMU 8.2.
//! - Non-convergence: a pass whose newly dirtied bytes exceed
//!   `throttle_trigger_threshold`% of the bytes sent during it is "high"; two high passes in
//!   a row fire a throttle event (QEMU counts high passes since the last event without
//!   resetting on a low one; requiring them in a row avoids firing on two isolated spikes).
//! - Timeout: after `timeout_ms` the outcome is [`TimeoutAction`].

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::stats::IterationStats;
use crate::units::{parse_bandwidth, parse_duration_ms, UnitError};
use crate::PAGE_SIZE;

/// QEMU's default `downtime-limit` (`DEFAULT_MIGRATE_SET_DOWNTIME`), ms.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's largest accepted `downtime-limit`: 2000 s.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;
/// QEMU's default `max-bandwidth` (`MAX_THROTTLE`, 128 MiB/s). ringvisor defaults to
/// unlimited instead (0) because its primary link is loopback; this is for `--qemu-defaults`
/// style comparisons.
pub const QEMU_DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// QEMU's default `throttle-trigger-threshold`, percent.
pub const DEFAULT_THROTTLE_TRIGGER_THRESHOLD: u8 = 50;
/// Default `timeout_ms`: one minute.
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// Default dirty ring size in entries (QEMU's suggested `dirty-ring-size`).
pub const DEFAULT_DIRTY_RING_SIZE: u32 = 4096;

/// Dirty page tracker selection, spelled as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrackerMode {
    /// Per-vCPU dirty ring.
    #[default]
    Ring,
    /// `KVM_GET_DIRTY_LOG`.
    Bitmap,
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`.
    ClearLog,
}

impl TrackerMode {
    /// Command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            TrackerMode::Ring => "ring",
            TrackerMode::Bitmap => "bitmap",
            TrackerMode::ClearLog => "clear-log",
        }
    }

    /// Wire encoding.
    pub fn to_wire(self) -> u8 {
        match self {
            TrackerMode::Ring => 0,
            TrackerMode::Bitmap => 1,
            TrackerMode::ClearLog => 2,
        }
    }

    /// Decodes the wire encoding.
    pub fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(TrackerMode::Ring),
            1 => Some(TrackerMode::Bitmap),
            2 => Some(TrackerMode::ClearLog),
            _ => None,
        }
    }
}

impl std::str::FromStr for TrackerMode {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, ParamError> {
        match s {
            "ring" => Ok(TrackerMode::Ring),
            "bitmap" => Ok(TrackerMode::Bitmap),
            "clear-log" => Ok(TrackerMode::ClearLog),
            _ => Err(ParamError::UnknownTracker(s.to_owned())),
        }
    }
}

/// What happens when `timeout_ms` passes before the migration converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutAction {
    /// Abort; the guest keeps running on the source (Cloud Hypervisor's `cancel`).
    #[default]
    AbortKeepSource,
    /// Switch over anyway, accepting a downtime above the limit (CH's `ignore`).
    ForceSwitchover,
}

impl std::str::FromStr for TimeoutAction {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, ParamError> {
        match s {
            "abort" | "abort-keep-source" | "cancel" => Ok(TimeoutAction::AbortKeepSource),
            "force" | "force-switchover" | "ignore" => Ok(TimeoutAction::ForceSwitchover),
            _ => Err(ParamError::UnknownTimeoutAction(s.to_owned())),
        }
    }
}

/// A migration parameter that is out of range or unparsable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A size, rate or duration did not parse.
    #[error("invalid {param}: {source}")]
    Unit {
        /// Parameter name.
        param: &'static str,
        /// Why.
        source: UnitError,
    },
    /// `downtime_limit_ms` is 0 or above QEMU's 2000 s.
    #[error("downtime_limit_ms {0} is out of range 1..=2000000")]
    DowntimeLimit(u64),
    /// `throttle_trigger_threshold` is outside 1..=100.
    #[error("throttle_trigger_threshold {0} is out of range 1..=100")]
    ThrottleThreshold(u8),
    /// `dirty_ring_size` is not a power of two of at least 1024 (QEMU's rule).
    #[error("dirty_ring_size {0} must be a power of two >= 1024")]
    RingSize(u32),
    /// Unknown tracker name.
    #[error("unknown tracker {0:?}: use ring, bitmap or clear-log")]
    UnknownTracker(String),
    /// Unknown timeout action.
    #[error("unknown timeout action {0:?}: use abort or force")]
    UnknownTimeoutAction(String),
}

/// Migration parameters, named as QEMU names them (`migrate-set-parameters`), in the units
/// the names say. Deserializes from partial JSON, missing fields taking the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationParams {
    /// Largest acceptable downtime (pause to resume), ms. Default 300.
    pub downtime_limit_ms: u64,
    /// Sending rate limit, bytes/s; 0 = unlimited (the default here; QEMU's is 128 MiB/s).
    pub max_bandwidth: u64,
    /// If non-zero, the bandwidth the switchover rule assumes instead of the measured one,
    /// bytes/s (QEMU 8.2). Default 0.
    pub avail_switchover_bandwidth: u64,
    /// Give up converging after this long, ms; 0 = never. Default 60 000.
    pub timeout_ms: u64,
    /// Outcome of the timeout. Default abort, keeping the guest on the source.
    pub timeout_action: TimeoutAction,
    /// Percent of the bytes sent in a pass that the bytes dirtied in it may reach before
    /// the pass counts as not converging. Default 50.
    pub throttle_trigger_threshold: u8,
    /// Dirty tracker. Default ring.
    pub tracker: TrackerMode,
    /// Dirty ring entries per vCPU (ring tracker only). Default 4096.
    pub dirty_ring_size: u32,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
            max_bandwidth: 0,
            avail_switchover_bandwidth: 0,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            timeout_action: TimeoutAction::AbortKeepSource,
            throttle_trigger_threshold: DEFAULT_THROTTLE_TRIGGER_THRESHOLD,
            tracker: TrackerMode::Ring,
            dirty_ring_size: DEFAULT_DIRTY_RING_SIZE,
        }
    }
}

impl MigrationParams {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.downtime_limit_ms == 0 || self.downtime_limit_ms > MAX_DOWNTIME_LIMIT_MS {
            return Err(ParamError::DowntimeLimit(self.downtime_limit_ms));
        }
        if !(1..=100).contains(&self.throttle_trigger_threshold) {
            return Err(ParamError::ThrottleThreshold(
                self.throttle_trigger_threshold,
            ));
        }
        if !self.dirty_ring_size.is_power_of_two() || self.dirty_ring_size < 1024 {
            return Err(ParamError::RingSize(self.dirty_ring_size));
        }
        Ok(())
    }

    /// Sets `downtime_limit_ms` from text such as `300`, `300ms`, `0.5s`.
    pub fn set_downtime_limit(&mut self, text: &str) -> Result<(), ParamError> {
        let v = parse_duration_ms(text).map_err(|source| ParamError::Unit {
            param: "downtime-limit",
            source,
        })?;
        if v == 0 || v > MAX_DOWNTIME_LIMIT_MS {
            return Err(ParamError::DowntimeLimit(v));
        }
        self.downtime_limit_ms = v;
        Ok(())
    }

    /// Sets `max_bandwidth` from text such as `800MiB/s`, `1Gbit/s`, `unlimited`.
    pub fn set_max_bandwidth(&mut self, text: &str) -> Result<(), ParamError> {
        self.max_bandwidth = parse_bandwidth(text).map_err(|source| ParamError::Unit {
            param: "max-bandwidth",
            source,
        })?;
        Ok(())
    }

    /// Sets `timeout_ms` from text such as `30s`, `2m`, `0` (never).
    pub fn set_timeout(&mut self, text: &str) -> Result<(), ParamError> {
        self.timeout_ms = parse_duration_ms(text).map_err(|source| ParamError::Unit {
            param: "timeout",
            source,
        })?;
        Ok(())
    }

    /// The downtime limit as a `Duration`.
    pub fn downtime_limit(&self) -> Duration {
        Duration::from_millis(self.downtime_limit_ms)
    }

    /// The bytes that can be sent within the downtime limit at `bandwidth` bytes/s (QEMU's
    /// `threshold_size`).
    pub fn threshold_bytes(&self, bandwidth: f64) -> u64 {
        (bandwidth.max(0.0) * self.downtime_limit_ms as f64 / 1000.0) as u64
    }
}

/// Why the policy says to switch over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum SwitchoverReason {
    /// Nothing is dirty.
    NothingDirty,
    /// The remaining bytes fit in the downtime limit at the bandwidth used.
    Converged {
        /// Predicted downtime for the remaining bytes, ms.
        expected_downtime_ms: f64,
    },
    /// The timeout passed with [`TimeoutAction::ForceSwitchover`].
    TimeoutForced {
        /// Predicted downtime, ms (`None` without a bandwidth estimate).
        expected_downtime_ms: Option<f64>,
    },
}

/// The policy's verdict between passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Run another pass. `throttle` is true when the non-convergence trigger fired at the
    /// end of the last pass (the engine may slow the guest, e.g. via dirty-ring limits).
    Continue {
        /// Non-convergence detected.
        throttle: bool,
    },
    /// Pause the guest and send the rest.
    Switchover(SwitchoverReason),
    /// Abort; keep the guest on the source. Only returned on timeout with
    /// [`TimeoutAction::AbortKeepSource`].
    AbortTimeout {
        /// Time spent, ms.
        elapsed_ms: u64,
    },
}

/// What the engine reports at the end of a pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    /// Pages sent in the pass (zero and data).
    pub pages: u64,
    /// Of those, zero pages.
    pub zero_pages: u64,
    /// Bytes written to the stream during the pass (headers included).
    pub bytes: u64,
    /// Pages the tracker collected as dirtied while this pass ran (the next pass's set).
    pub dirty_pages: u64,
    /// Pages each vCPU dirtied during the pass (ring tracker only).
    pub vcpu_dirty_pages: Option<Vec<u64>>,
    /// Bandwidth estimate at the end of the pass, bytes/s.
    pub bandwidth: Option<f64>,
}

/// Convergence bookkeeping for one migration.
#[derive(Debug, Clone)]
pub struct Convergence {
    params: MigrationParams,
    started: Instant,
    pass_start: Option<(u32, Instant)>,
    next_iteration: u32,
    high_in_a_row: u32,
    throttle_pending: bool,
    throttle_events: u32,
    iterations: Vec<IterationStats>,
}

impl Convergence {
    /// Starts the clock for a migration with `params`.
    pub fn new(params: &MigrationParams, now: Instant) -> Self {
        Convergence {
            params: params.clone(),
            started: now,
            pass_start: None,
            next_iteration: 0,
            high_in_a_row: 0,
            throttle_pending: false,
            throttle_events: 0,
            iterations: Vec::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &MigrationParams {
        &self.params
    }

    /// Marks the start of a pass; returns its iteration number (0 = bulk pass).
    pub fn begin_pass(&mut self, now: Instant) -> u32 {
        let it = self.next_iteration;
        self.pass_start = Some((it, now));
        self.next_iteration += 1;
        it
    }

    /// Records the end of the open pass and updates the non-convergence trigger. Returns
    /// the stored statistics, or `None` if no pass was open.
    pub fn end_pass(&mut self, report: PassReport, now: Instant) -> Option<&IterationStats> {
        let (iteration, start) = self.pass_start.take()?;
        let dur = now.saturating_duration_since(start);
        let secs = dur.as_secs_f64();
        let rate = |pages: u64| {
            if secs > 0.0 {
                (pages * PAGE_SIZE) as f64 / secs
            } else {
                0.0
            }
        };
        let dirty_bytes = report.dirty_pages * PAGE_SIZE;
        let budget =
            report.bytes as u128 * u128::from(self.params.throttle_trigger_threshold) / 100;
        self.throttle_pending = false;
        if u128::from(dirty_bytes) > budget {
            self.high_in_a_row += 1;
            if self.high_in_a_row >= 2 {
                self.throttle_pending = true;
                self.throttle_events += 1;
                self.high_in_a_row = 0;
            }
        } else {
            self.high_in_a_row = 0;
        }
        self.iterations.push(IterationStats {
            iteration,
            pages: report.pages,
            zero_pages: report.zero_pages,
            bytes: report.bytes,
            duration_ms: secs * 1000.0,
            dirty_pages: report.dirty_pages,
            dirty_rate_bytes_per_sec: rate(report.dirty_pages),
            vcpu_dirty_rates_bytes_per_sec: report
                .vcpu_dirty_pages
                .as_ref()
                .map(|v| v.iter().map(|&p| rate(p)).collect()),
            bandwidth_bytes_per_sec: report.bandwidth,
            not_converging: self.throttle_pending,
        });
        self.iterations.last()
    }

    /// Throttle events fired so far.
    pub fn throttle_events(&self) -> u32 {
        self.throttle_events
    }

    /// Statistics of every finished pass.
    pub fn iterations(&self) -> &[IterationStats] {
        &self.iterations
    }

    /// Consumes the bookkeeping, returning the per-pass statistics.
    pub fn into_iterations(self) -> Vec<IterationStats> {
        self.iterations
    }

    /// Time since [`new`](Self::new).
    pub fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// The bandwidth the switchover rule uses: `avail_switchover_bandwidth` if set, else
    /// `measured`.
    pub fn switchover_bandwidth(&self, measured: Option<f64>) -> Option<f64> {
        if self.params.avail_switchover_bandwidth > 0 {
            Some(self.params.avail_switchover_bandwidth as f64)
        } else {
            measured.filter(|b| *b > 0.0)
        }
    }

    /// Predicted time to send `bytes` at the switchover bandwidth.
    pub fn expected_downtime_ms(&self, bytes: u64, measured: Option<f64>) -> Option<f64> {
        self.switchover_bandwidth(measured)
            .map(|bw| bytes as f64 / bw * 1000.0)
    }

    /// Decides between passes, given the bytes still dirty and the measured bandwidth.
    pub fn decide(
        &self,
        remaining_dirty_bytes: u64,
        measured_bandwidth: Option<f64>,
        now: Instant,
    ) -> Decision {
        if remaining_dirty_bytes == 0 {
            return Decision::Switchover(SwitchoverReason::NothingDirty);
        }
        if let Some(bw) = self.switchover_bandwidth(measured_bandwidth) {
            if remaining_dirty_bytes <= self.params.threshold_bytes(bw) {
                return Decision::Switchover(SwitchoverReason::Converged {
                    expected_downtime_ms: remaining_dirty_bytes as f64 / bw * 1000.0,
                });
            }
        }
        let elapsed = self.elapsed(now);
        if self.params.timeout_ms > 0 && elapsed >= Duration::from_millis(self.params.timeout_ms) {
            return match self.params.timeout_action {
                TimeoutAction::AbortKeepSource => Decision::AbortTimeout {
                    elapsed_ms: elapsed.as_millis() as u64,
                },
                TimeoutAction::ForceSwitchover => {
                    Decision::Switchover(SwitchoverReason::TimeoutForced {
                        expected_downtime_ms: self
                            .expected_downtime_ms(remaining_dirty_bytes, measured_bandwidth),
                    })
                }
            };
        }
        Decision::Continue {
            throttle: self.throttle_pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn report(bytes: u64, dirty_pages: u64) -> PassReport {
        PassReport {
            pages: bytes / PAGE_SIZE,
            bytes,
            dirty_pages,
            ..PassReport::default()
        }
    }

    #[test]
    fn defaults_are_qemus_where_qemu_has_them() {
        let p = MigrationParams::default();
        assert_eq!(p.downtime_limit_ms, 300);
        assert_eq!(p.throttle_trigger_threshold, 50);
        assert_eq!(p.dirty_ring_size, 4096);
        assert_eq!(QEMU_DEFAULT_MAX_BANDWIDTH, 128 * MIB);
        assert_eq!(p.timeout_action, TimeoutAction::AbortKeepSource);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn params_round_trip_through_json_with_qemu_names_and_defaults() {
        let p: MigrationParams =
            serde_json::from_str(r#"{"downtime_limit_ms": 100, "timeout_action": "force-switchover", "tracker": "clear-log"}"#)
                .unwrap();
        assert_eq!(p.downtime_limit_ms, 100);
        assert_eq!(p.max_bandwidth, 0);
        assert_eq!(p.tracker, TrackerMode::ClearLog);
        assert_eq!(p.timeout_action, TimeoutAction::ForceSwitchover);
        let back: MigrationParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<MigrationParams>(r#"{"downtime_limit": 1}"#).is_err());
    }

    #[test]
    fn invalid_params_are_rejected_with_typed_errors() {
        let mut p = MigrationParams::default();
        assert_eq!(p.set_downtime_limit("0"), Err(ParamError::DowntimeLimit(0)));
        assert!(matches!(
            p.set_max_bandwidth("lots"),
            Err(ParamError::Unit {
                param: "max-bandwidth",
                ..
            })
        ));
        p.set_max_bandwidth("800MiB/s").unwrap();
        assert_eq!(p.max_bandwidth, 800 * MIB);
        p.set_timeout("30s").unwrap();
        assert_eq!(p.timeout_ms, 30_000);
        p.dirty_ring_size = 3000;
        assert_eq!(p.validate(), Err(ParamError::RingSize(3000)));
        assert_eq!("ring".parse::<TrackerMode>(), Ok(TrackerMode::Ring));
        assert!("rings".parse::<TrackerMode>().is_err());
        assert_eq!("force".parse(), Ok(TimeoutAction::ForceSwitchover));
    }

    #[test]
    fn switchover_when_remaining_bytes_fit_in_the_downtime_at_measured_bandwidth() {
        let t0 = Instant::now();
        let c = Convergence::new(&MigrationParams::default(), t0);
        // 1000 MiB/s × 300 ms = 300 MiB threshold.
        let bw = Some(1000.0 * MIB as f64);
        assert_eq!(
            c.decide(300 * MIB, bw, t0),
            Decision::Switchover(SwitchoverReason::Converged {
                expected_downtime_ms: 300.0
            })
        );
        assert_eq!(
            c.decide(300 * MIB + 1, bw, t0),
            Decision::Continue { throttle: false }
        );
        // No estimate yet: keep going.
        assert_eq!(
            c.decide(1, None, t0),
            Decision::Continue { throttle: false }
        );
        assert_eq!(
            c.decide(0, None, t0),
            Decision::Switchover(SwitchoverReason::NothingDirty)
        );
    }

    #[test]
    fn avail_switchover_bandwidth_overrides_the_measurement() {
        let t0 = Instant::now();
        let p = MigrationParams {
            avail_switchover_bandwidth: 10 * MIB,
            ..MigrationParams::default()
        };
        let c = Convergence::new(&p, t0);
        // Measured 10 GiB/s would switch over at 100 MiB; 10 MiB/s × 0.3 s = 3 MiB does not.
        assert_eq!(
            c.decide(100 * MIB, Some(10240.0 * MIB as f64), t0),
            Decision::Continue { throttle: false }
        );
        assert!(matches!(
            c.decide(3 * MIB, None, t0),
            Decision::Switchover(SwitchoverReason::Converged { .. })
        ));
    }

    #[test]
    fn non_convergence_fires_after_two_high_passes_in_a_row_only() {
        let t0 = Instant::now();
        let mut c = Convergence::new(&MigrationParams::default(), t0);
        let bw = Some(1.0);
        let sent = 100 * MIB;
        let high = (sent / 2) / PAGE_SIZE + 1; // just above 50% of the bytes sent
        let low = (sent / 2) / PAGE_SIZE; // exactly 50%: not high
        let mut t = t0;
        let mut pass = |c: &mut Convergence, dirty: u64| {
            c.begin_pass(t);
            t += Duration::from_millis(100);
            c.end_pass(report(sent, dirty), t).unwrap().not_converging
        };
        assert!(!pass(&mut c, high));
        assert!(!pass(&mut c, low)); // resets the streak
        assert!(!pass(&mut c, high));
        assert!(pass(&mut c, high)); // second in a row: fires
        assert_eq!(
            c.decide(u64::MAX, bw, t0),
            Decision::Continue { throttle: true }
        );
        assert!(!pass(&mut c, high)); // counter restarted after firing
        assert_eq!(
            c.decide(u64::MAX, bw, t0),
            Decision::Continue { throttle: false }
        );
        assert_eq!(c.throttle_events(), 1);
        assert_eq!(c.iterations().len(), 5);
        assert_eq!(c.iterations()[4].iteration, 4);
    }

    #[test]
    fn iteration_stats_record_rates_per_pass_and_per_vcpu() {
        let t0 = Instant::now();
        let mut c = Convergence::new(&MigrationParams::default(), t0);
        assert!(c.end_pass(PassReport::default(), t0).is_none());
        assert_eq!(c.begin_pass(t0), 0);
        let s = c
            .end_pass(
                PassReport {
                    pages: 10,
                    zero_pages: 4,
                    bytes: 6 * 4096,
                    dirty_pages: 256, // 1 MiB in 0.5 s
                    vcpu_dirty_pages: Some(vec![128, 128]),
                    bandwidth: Some(5.0),
                },
                t0 + Duration::from_millis(500),
            )
            .unwrap();
        assert_eq!(s.dirty_rate_bytes_per_sec, 2.0 * MIB as f64);
        assert_eq!(
            s.vcpu_dirty_rates_bytes_per_sec,
            Some(vec![MIB as f64, MIB as f64])
        );
        assert_eq!(s.duration_ms, 500.0);
    }

    #[test]
    fn timeout_outcome_follows_the_timeout_action() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(61);
        let c = Convergence::new(&MigrationParams::default(), t0);
        assert_eq!(
            c.decide(u64::MAX, Some(1.0), later),
            Decision::AbortTimeout { elapsed_ms: 61_000 }
        );
        let p = MigrationParams {
            timeout_action: TimeoutAction::ForceSwitchover,
            ..MigrationParams::default()
        };
        let c = Convergence::new(&p, t0);
        assert_eq!(
            c.decide(1000, Some(1000.0), later),
            Decision::Switchover(SwitchoverReason::TimeoutForced {
                expected_downtime_ms: Some(1000.0)
            })
        );
        let p = MigrationParams {
            timeout_ms: 0,
            ..MigrationParams::default()
        };
        let c = Convergence::new(&p, t0);
        assert_eq!(
            c.decide(u64::MAX, Some(1.0), t0 + Duration::from_secs(86400)),
            Decision::Continue { throttle: false }
        );
    }
}
