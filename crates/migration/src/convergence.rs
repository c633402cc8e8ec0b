//! The convergence policy: a pure, clock-free state machine that the engine asks, at every
//! collect of the dirty tracker, whether to send another pass, switch over or give up, and
//! which throttles to apply. Time comes in the reports ([`PassReport::elapsed`]), so tests
//! drive it with synthetic time.
//!
//! # Protocol
//!
//! [`Convergence::new`] at the start of the migration, then [`Convergence::start`] (the
//! actions to apply before the bulk pass), then [`Convergence::on_collect`] after each pass's
//! collect until it returns [`Decision::SwitchOver`] or [`Decision::Abort`]. The engine
//! applies the [`Step::actions`]; [`Convergence::set_config`] changes the parameters while
//! the migration runs (`migrate-set-parameters`).
//!
//! # Rules
//!
//! Notation: `pages` = the pages this collect found dirty, `bw` = the measured bandwidth
//! (bytes/s), `expected = pages × 4 KiB / bw` (the downtime a switchover now would take),
//! `limit` = `downtime-limit`. "Passes" counts the dirty passes sent so far (the bulk pass
//! not included).
//!
//! 1. **Fits**: the rest fits when `expected <= limit` (QEMU's `threshold_size` =
//!    bandwidth × downtime limit).
//! 2. **Refining**: the limit is a ceiling, not a target. Once the rest fits, another pass
//!    is still sent while it makes the downtime smaller. Switch over (not forced) as soon as
//!    one of these holds:
//!    - the rest is tiny: `pages <= 256` ([`SMALL_FINAL_PAGES`], 1 MiB) or
//!      `expected <= min(1 ms, limit / 10)` ([`TINY_FINAL_PASS`]);
//!    - it stopped shrinking: this collect did not find less than half
//!      ([`REFINE_SHRINK`]) of the previous refining collect (the first collect that fits
//!      always gets one refining pass);
//!    - [`MAX_REFINING_PASSES`] (8) refining passes were sent;
//!    - no budget is left for another pass: `passes + 2 >= max_iterations` or the timeout
//!      has passed.
//! 3. **Non-convergence trigger** (QEMU 7.2's `migration_bitmap_sync` and
//!    `migration_trigger_throttle`, `migration/ram.c`): dirty bytes and sent bytes are
//!    summed over a *period*; a collect that ends more than 1 s ([`THROTTLE_PERIOD`]) after
//!    the period began closes it (QEMU: `end_time > rs->time_last_bitmap_sync + 1000`). The
//!    first period begins at the start of the migration (QEMU starts it at the setup
//!    sync). A closed period is *high* when `bytes_dirty_period > bytes_xfer_period ×
//!    throttle-trigger-threshold / 100` (integer arithmetic, as QEMU's
//!    `bytes_dirty_threshold`). The trigger fires on the second high period
//!    (`++dirty_rate_high_cnt >= 2`), after which the count restarts from 0; as in QEMU a
//!    low period does not reset the count. ringvisor's one addition: a collect whose rest
//!    already fits the limit (rule 1) resets the count and restarts the period, because a
//!    guest that is converging is never throttled.
//!    This is the one deliberate change from the engine's former inline rule, which
//!    compared each pass with the one before and fired on two high passes in a row: with
//!    short passes that fired many times per second; with 1 s periods the throttle rises
//!    as often as QEMU raises it.
//! 4. **What the trigger does** (the first that applies):
//!    - dirty limit `Auto` (ring only): every vCPU dirtying at or above the mean of the
//!      per-vCPU rates joins the limited set (a vCPU once limited stays limited until the
//!      switchover); the quota per limited vCPU is what leaves the guest dirtying at most
//!      half the bandwidth ([`DIRTY_LIMIT_BANDWIDTH_SHARE`]) after the unlimited vCPUs'
//!      share, at least 256 KiB/s ([`DIRTY_LIMIT_FLOOR`]); from the second event on the
//!      quota is at most half the previous one, and at least 64 KiB/s
//!      ([`DIRTY_LIMIT_MIN`]). Emits [`Action::SetDirtyLimit`] for the limited set.
//!    - `auto-converge`: QEMU's `mig_throttle_guest_down`: the first event sets the CPU
//!      throttle to `cpu-throttle-initial`, each later one adds `cpu-throttle-increment`,
//!      capped at `max-cpu-throttle` (20, 30, ..., 90, 99 with the defaults). Emits
//!      [`Action::SetCpuThrottle`].
//! 5. **Fixed dirty limit**: [`DirtyLimitMode::Fixed`] is applied to every vCPU by
//!    [`Convergence::start`], before the bulk pass.
//! 6. **Timeout and pass limit**: if the rest does not fit and the timeout has passed, or
//!    `passes + 1 >= max_iterations`, the outcome is `x-ringvisor-on-timeout`: abort (the
//!    guest keeps running on the source) or a forced switchover. A terminal decision
//!    carries [`Action::LiftThrottles`] when a throttle or dirty limit is in force; for a
//!    switchover the engine lifts them after pausing the vCPUs, so no unthrottled burst
//!    lands in the final pass. A step that ends pre-copy does not evaluate the trigger (the
//!    former inline code raised a throttle there and lifted it at once).
//!
//! 7. **Pass pacing while not converging** (QEMU's throttle period is 1 s): when the rest
//!    does not fit and the guest dirties memory at least as fast as the link sends it (the
//!    dirty rate, the larger of this collect's pages over the time since the previous collect
//!    and the sum of the per-vCPU rates the ring reports, is at least the bandwidth), short
//!    passes cannot converge: the next collect comes no sooner than [`MIN_PASS_PERIOD`]
//!    after this one ([`Step::next_collect_at`]; the engine sends the pass, then waits). Short
//!    passes over a hot set would otherwise re-protect it several times a second, and every
//!    first write after a re-protect is a write-protect fault that slows the guest, for no
//!    gain. A dirty rate below the bandwidth is never held (shorter passes find fewer pages
//!    and converge), nor past the timeout.
//!
//! 8. **The tail waits for the next collect** (QEMU's `ram_save_pending`, which syncs the
//!    dirty bitmap as soon as what is left of the pass is below `threshold_size`): while the
//!    rest does not fit, a pass sends all but its last `bw × limit / 2 / 4 KiB` pages
//!    ([`Step::defer_pages`], [`DEFER_SHARE`] of what would fit). They stay dirty and join
//!    the next collect's set, so a page the guest writes again meanwhile is sent once
//!    instead of twice; on a hot set at a link's rate that saves up to half a threshold's
//!    worth of bytes per pass. Only half: the carried pages count in the next collect, and
//!    the other half is the room the guest's new dirt needs for the rest to fit at all
//!    (deferring a whole threshold left a throttled guest unable to converge until the
//!    throttle reached 99%). Pages carried over are not new dirt for rule 3
//!    ([`PassReport::carried_pages`]).
//!
//! Rules 1, 2, 4, 5 and 6 are the engine's former inline rules, unchanged.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::params::{MigrationCapabilities, MigrationParameters, OnTimeout, ParamError};
use crate::{TrackerMode, PAGE_SIZE};

/// A rest of at most this many pages (1 MiB) is sent as the final pass (rule 2).
pub const SMALL_FINAL_PAGES: u64 = 256;
/// Nor is one expected to take at most this long (or a tenth of the limit, if smaller).
pub const TINY_FINAL_PASS: Duration = Duration::from_millis(1);
/// Once the rest fits, refining continues while each collect finds less than this fraction
/// of the previous one.
pub const REFINE_SHRINK: f64 = 0.5;
/// Rule 8: the share of what would fit the limit that a non-fitting pass leaves for the
/// next collect.
pub const DEFER_SHARE: f64 = 0.5;
/// At most this many refining passes.
pub const MAX_REFINING_PASSES: u32 = 8;
/// The non-convergence trigger's period: QEMU evaluates it at a bitmap sync more than
/// 1000 ms after the previous evaluation.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(1000);
/// While not converging, collects are at least this far apart (rule 7).
pub const MIN_PASS_PERIOD: Duration = Duration::from_millis(1000);
/// High periods that fire the trigger (QEMU's `dirty_rate_high_cnt >= 2`).
pub const HIGH_PERIODS_TO_FIRE: u32 = 2;
/// The auto dirty limit leaves the guest this share of the bandwidth.
pub const DIRTY_LIMIT_BANDWIDTH_SHARE: f64 = 0.5;
/// The first auto quota is at least this (bytes/s per vCPU).
pub const DIRTY_LIMIT_FLOOR: u64 = 256 * 1024;
/// Halving never goes below this (bytes/s per vCPU).
pub const DIRTY_LIMIT_MIN: u64 = 64 * 1024;
/// Default pass limit, a safety net behind the timeout.
pub const DEFAULT_MAX_ITERATIONS: u32 = 10_000;

/// The dirty limit during a migration (ring tracker only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyLimitMode {
    /// No dirty limit.
    #[default]
    Off,
    /// Every vCPU is held to this many bytes/s from the start of the migration.
    Fixed(u64),
    /// Applied to the fastest vCPUs when pre-copy stops converging (rule 4).
    Auto,
}

/// What the policy works from: built from the parameters, the capabilities and the tracker
/// ([`PolicyConfig::new`]), or field by field.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// `downtime-limit`.
    pub downtime_limit: Duration,
    /// `x-ringvisor-timeout` (`None` = never).
    pub timeout: Option<Duration>,
    /// `x-ringvisor-on-timeout`, also what the pass limit does.
    pub on_timeout: OnTimeout,
    /// Give up (or force) after this many passes.
    pub max_iterations: u32,
    /// `throttle-trigger-threshold`, percent.
    pub throttle_trigger_threshold: u8,
    /// The `auto-converge` capability.
    pub auto_converge: bool,
    /// `cpu-throttle-initial`, percent.
    pub cpu_throttle_initial: u8,
    /// `cpu-throttle-increment`, percent.
    pub cpu_throttle_increment: u8,
    /// `max-cpu-throttle`, percent.
    pub max_cpu_throttle: u8,
    /// The dirty limit.
    pub dirty_limit: DirtyLimitMode,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let p = MigrationParameters::default();
        PolicyConfig {
            downtime_limit: p.downtime_limit(),
            timeout: p.timeout(),
            on_timeout: p.x_ringvisor_on_timeout,
            max_iterations: DEFAULT_MAX_ITERATIONS,
            throttle_trigger_threshold: p.throttle_trigger_threshold,
            auto_converge: false,
            cpu_throttle_initial: p.cpu_throttle_initial,
            cpu_throttle_increment: p.cpu_throttle_increment,
            max_cpu_throttle: p.max_cpu_throttle,
            dirty_limit: DirtyLimitMode::Off,
        }
    }
}

impl PolicyConfig {
    /// The policy for `params` and `caps` with `tracker`. Checks the parameters, the
    /// capabilities, and that the dirty limit has the ring; `max_iterations` is
    /// [`DEFAULT_MAX_ITERATIONS`].
    pub fn new(
        params: &MigrationParameters,
        caps: &MigrationCapabilities,
        tracker: TrackerMode,
    ) -> Result<Self, ParamError> {
        params.validate()?;
        caps.validate()?;
        let dirty_limit = match (caps.dirty_limit, params.x_ringvisor_dirty_limit) {
            (false, _) => DirtyLimitMode::Off,
            (true, 0) => DirtyLimitMode::Auto,
            (true, q) => DirtyLimitMode::Fixed(q),
        };
        if dirty_limit != DirtyLimitMode::Off && tracker != TrackerMode::Ring {
            return Err(ParamError::DirtyLimitNeedsRing {
                tracker: tracker.name(),
            });
        }
        Ok(PolicyConfig {
            downtime_limit: params.downtime_limit(),
            timeout: params.timeout(),
            on_timeout: params.x_ringvisor_on_timeout,
            max_iterations: DEFAULT_MAX_ITERATIONS,
            throttle_trigger_threshold: params.throttle_trigger_threshold,
            auto_converge: caps.auto_converge,
            cpu_throttle_initial: params.cpu_throttle_initial,
            cpu_throttle_increment: params.cpu_throttle_increment,
            max_cpu_throttle: params.max_cpu_throttle,
            dirty_limit,
        })
    }
}

/// What the engine reports at a collect.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassReport {
    /// Time since the start of the migration.
    pub elapsed: Duration,
    /// Pages this collect found dirty (what the next pass would send).
    pub dirty_pages: u64,
    /// Bytes the pass before this collect wrote to the stream (the bulk pass for the first
    /// collect).
    pub last_pass_bytes: u64,
    /// Measured bandwidth, bytes/s.
    pub bandwidth_bytes_per_s: f64,
    /// Per-vCPU dirty rates, pages/s (ring tracker; the auto dirty limit needs them).
    pub vcpu_dirty_rates: Option<Vec<f64>>,
    /// Of `dirty_pages`, those the previous pass left unsent ([`Step::defer_pages`]): still
    /// dirty, so not new dirt for rule 3 (QEMU counts only bits a sync newly sets).
    pub carried_pages: u64,
}

/// The state of a migration that did not converge, for the messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unconverged {
    /// Time since the start.
    pub elapsed: Duration,
    /// Passes sent, the bulk pass included.
    pub passes: u32,
    /// Pages still dirty.
    pub dirty_pages: u64,
    /// What sending them would take at `bandwidth_bytes_per_s`.
    pub expected_downtime: Duration,
    /// Measured bandwidth, bytes/s.
    pub bandwidth_bytes_per_s: f64,
    /// `downtime-limit`.
    pub downtime_limit: Duration,
}

impl fmt::Display for Unconverged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not converged after {:.1} s ({} passes): {} dirty pages need {:.0} ms at {:.1} MiB/s, limit {} ms",
            self.elapsed.as_secs_f64(),
            self.passes,
            self.dirty_pages,
            self.expected_downtime.as_secs_f64() * 1e3,
            self.bandwidth_bytes_per_s / f64::from(1u32 << 20),
            self.downtime_limit.as_millis()
        )
    }
}

/// Why the policy switches over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SwitchoverReason {
    /// The rest fits the limit and is tiny.
    Tiny {
        /// Pages left.
        dirty_pages: u64,
        /// Expected downtime.
        expected_downtime: Duration,
    },
    /// The rest fits the limit and another pass no longer halves it.
    StoppedShrinking {
        /// Pages left.
        dirty_pages: u64,
        /// Pages the previous refining collect found.
        previous_pages: u64,
        /// Expected downtime.
        expected_downtime: Duration,
    },
    /// The rest fits the limit after [`MAX_REFINING_PASSES`] refining passes.
    RefiningDone {
        /// Pages left.
        dirty_pages: u64,
        /// Expected downtime.
        expected_downtime: Duration,
    },
    /// The rest fits the limit and the timeout or pass limit leaves no room for another
    /// refining pass.
    NoTimeToRefine {
        /// Pages left.
        dirty_pages: u64,
        /// Expected downtime.
        expected_downtime: Duration,
    },
    /// The timeout passed with `x-ringvisor-on-timeout` = `force`.
    TimeoutForced(Unconverged),
    /// The pass limit was reached with `x-ringvisor-on-timeout` = `force`.
    MaxIterationsForced(Unconverged),
}

impl SwitchoverReason {
    /// True if the rest did not fit the limit.
    pub fn forced(&self) -> bool {
        matches!(
            self,
            SwitchoverReason::TimeoutForced(_) | SwitchoverReason::MaxIterationsForced(_)
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for SwitchoverReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchoverReason::Tiny {
                dirty_pages,
                expected_downtime,
            } => write!(
                f,
                "converged: the last {dirty_pages} dirty pages take about {:.1} ms to send",
                ms(*expected_downtime)
            ),
            SwitchoverReason::StoppedShrinking {
                dirty_pages,
                previous_pages,
                expected_downtime,
            } => write!(
                f,
                "converged: {dirty_pages} dirty pages ({:.1} ms) fit the downtime limit and \
                 another pass would not halve them (the previous one left {previous_pages})",
                ms(*expected_downtime)
            ),
            SwitchoverReason::RefiningDone {
                dirty_pages,
                expected_downtime,
            } => write!(
                f,
                "converged: {dirty_pages} dirty pages ({:.1} ms) fit the downtime limit after \
                 {MAX_REFINING_PASSES} refining passes",
                ms(*expected_downtime)
            ),
            SwitchoverReason::NoTimeToRefine {
                dirty_pages,
                expected_downtime,
            } => write!(
                f,
                "converged: {dirty_pages} dirty pages ({:.1} ms) fit the downtime limit and \
                 the timeout or pass limit leaves no time for another pass",
                ms(*expected_downtime)
            ),
            SwitchoverReason::TimeoutForced(u) => write!(
                f,
                "timed out, {u}; switching over anyway (x-ringvisor-on-timeout=force), the \
                 downtime will exceed the limit"
            ),
            SwitchoverReason::MaxIterationsForced(u) => write!(
                f,
                "pass limit reached, {u}; switching over anyway (x-ringvisor-on-timeout=force), \
                 the downtime will exceed the limit"
            ),
        }
    }
}

/// Why the policy gives up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AbortReason {
    /// The timeout passed with `x-ringvisor-on-timeout` = `abort`.
    Timeout(Unconverged),
    /// The pass limit was reached with `x-ringvisor-on-timeout` = `abort`.
    MaxIterations(Unconverged),
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbortReason::Timeout(u) => {
                write!(f, "timed out, {u}; the guest keeps running on the source")
            }
            AbortReason::MaxIterations(u) => write!(
                f,
                "pass limit reached, {u}; the guest keeps running on the source"
            ),
        }
    }
}

/// The verdict at a collect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Send the dirty pages as another pass.
    NextPass,
    /// Pause the guest and send the rest.
    SwitchOver {
        /// Why.
        reason: SwitchoverReason,
        /// The rest did not fit the limit (timeout or pass limit with `force`).
        forced: bool,
    },
    /// Give up; the guest keeps running on the source.
    Abort {
        /// Why.
        reason: AbortReason,
    },
}

/// Something the engine must do to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Throttle every vCPU's CPU time by this percentage (0 = no throttle).
    SetCpuThrottle {
        /// Percent, at most `max-cpu-throttle`.
        percent: u8,
    },
    /// Hold vCPUs to a dirty rate.
    SetDirtyLimit {
        /// Quota per vCPU, bytes/s.
        bytes_per_s: u64,
        /// The vCPUs it applies to (`None` = every vCPU); the others are not limited.
        vcpus: Option<Vec<usize>>,
    },
    /// Remove the dirty limit (a live change of the dirty-limit mode).
    ClearDirtyLimit,
    /// Remove every CPU throttle and dirty limit (pre-copy is over).
    LiftThrottles,
}

/// The answer to a collect.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// What to do next.
    pub decision: Decision,
    /// What to apply to the guest now (for a switchover: once the vCPUs are paused).
    pub actions: Vec<Action>,
    /// What a switchover now would take at the reported bandwidth (saturating).
    pub expected_downtime: Duration,
    /// For [`Decision::NextPass`] while not converging (rule 7): do not collect again before
    /// this time (since the start of the migration); send the pass, then wait. `None`: collect
    /// as soon as the pass is sent.
    pub next_collect_at: Option<Duration>,
    /// For [`Decision::NextPass`] (rule 8): send all but the last this many pages of the set;
    /// they stay dirty and go into the next collect's set.
    pub defer_pages: u64,
}

/// The convergence state of one migration.
#[derive(Debug, Clone)]
pub struct Convergence {
    cfg: PolicyConfig,
    /// Dirty passes decided so far (the engine's pass number minus the bulk pass).
    passes: u32,
    refining_passes: u32,
    refine_prev: Option<u64>,
    period_start: Duration,
    period_dirty_bytes: u64,
    period_xfer_bytes: u64,
    high_periods: u32,
    events: u32,
    throttle_percent: u8,
    dirty_limit: Option<u64>,
    auto_quota: Option<u64>,
    limited: Vec<usize>,
    /// Time of the previous collect (rule 7).
    prev_collect: Option<Duration>,
    paced_collects: u32,
}

/// `pages` at `bw` in seconds; infinite when there is something to send and no bandwidth.
fn expected_secs(pages: u64, bw: f64) -> f64 {
    let bytes = pages.saturating_mul(PAGE_SIZE);
    if bytes == 0 {
        0.0
    } else if bw > 0.0 && bw.is_finite() {
        bytes as f64 / bw
    } else {
        f64::INFINITY
    }
}

impl Convergence {
    /// A migration about to start under `cfg`.
    pub fn new(cfg: PolicyConfig) -> Self {
        Convergence {
            cfg,
            passes: 0,
            refining_passes: 0,
            refine_prev: None,
            period_start: Duration::ZERO,
            period_dirty_bytes: 0,
            period_xfer_bytes: 0,
            high_periods: 0,
            events: 0,
            throttle_percent: 0,
            dirty_limit: None,
            auto_quota: None,
            limited: Vec::new(),
            prev_collect: None,
            paced_collects: 0,
        }
    }

    /// The actions to apply before the bulk pass: the fixed dirty limit (rule 5).
    pub fn start(&mut self) -> Vec<Action> {
        match self.cfg.dirty_limit {
            DirtyLimitMode::Fixed(q) => {
                self.dirty_limit = Some(q);
                vec![Action::SetDirtyLimit {
                    bytes_per_s: q,
                    vcpus: None,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Changes the configuration mid-migration; the next [`on_collect`](Self::on_collect)
    /// decides under it. Returns what to apply now: a changed fixed dirty limit
    /// ([`Action::SetDirtyLimit`]), a dirty limit that is no longer wanted
    /// ([`Action::ClearDirtyLimit`]), auto-converge switched off
    /// ([`Action::SetCpuThrottle`] 0) or a `max-cpu-throttle` below the throttle in force
    /// (the throttle is lowered to it).
    pub fn set_config(&mut self, cfg: PolicyConfig) -> Vec<Action> {
        let mut actions = Vec::new();
        match (self.cfg.dirty_limit, cfg.dirty_limit) {
            (old, new) if old == new => {}
            (_, DirtyLimitMode::Fixed(q)) => {
                self.dirty_limit = Some(q);
                self.auto_quota = None;
                self.limited.clear();
                actions.push(Action::SetDirtyLimit {
                    bytes_per_s: q,
                    vcpus: None,
                });
            }
            (DirtyLimitMode::Fixed(_), _) | (_, DirtyLimitMode::Off) => {
                if self.dirty_limit.take().is_some() {
                    actions.push(Action::ClearDirtyLimit);
                }
                self.auto_quota = None;
                self.limited.clear();
            }
            _ => {}
        }
        if self.throttle_percent > 0 {
            let cap = if cfg.auto_converge {
                self.throttle_percent.min(cfg.max_cpu_throttle)
            } else {
                0
            };
            if cap != self.throttle_percent {
                self.throttle_percent = cap;
                actions.push(Action::SetCpuThrottle { percent: cap });
            }
        }
        self.cfg = cfg;
        actions
    }

    /// The CPU throttle in force (or last in force), percent.
    pub fn throttle_percent(&self) -> u8 {
        self.throttle_percent
    }

    /// The dirty limit in force (or last in force), bytes/s per limited vCPU.
    pub fn dirty_limit(&self) -> Option<u64> {
        self.dirty_limit
    }

    /// The vCPUs the auto dirty limit holds.
    pub fn limited_vcpus(&self) -> &[usize] {
        &self.limited
    }

    /// Times the non-convergence trigger fired and raised a throttle or dirty limit.
    pub fn throttle_events(&self) -> u32 {
        self.events
    }

    /// Dirty passes decided so far.
    pub fn passes(&self) -> u32 {
        self.passes
    }

    /// Passes that rule 7 held back (the next collect delayed to [`MIN_PASS_PERIOD`]).
    pub fn paced_collects(&self) -> u32 {
        self.paced_collects
    }

    /// Refining passes decided so far (rule 2).
    pub fn refining_passes(&self) -> u32 {
        self.refining_passes
    }

    /// Decides at a collect.
    pub fn on_collect(&mut self, r: &PassReport) -> Step {
        let pages = r.dirty_pages;
        let bw = r.bandwidth_bytes_per_s;
        let secs = expected_secs(pages, bw);
        let expected_downtime = Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX);
        let within_limit = secs <= self.cfg.downtime_limit.as_secs_f64();
        let timed_out = self.cfg.timeout.is_some_and(|t| r.elapsed >= t);
        if within_limit {
            if let Some(reason) = self.refine_or_stop(pages, secs, expected_downtime, timed_out) {
                return self.terminal(
                    Decision::SwitchOver {
                        reason,
                        forced: false,
                    },
                    expected_downtime,
                );
            }
        }
        let out_of_passes = self.passes.saturating_add(1) >= self.cfg.max_iterations;
        if timed_out || out_of_passes {
            let u = Unconverged {
                elapsed: r.elapsed,
                passes: self.passes.saturating_add(1),
                dirty_pages: pages,
                expected_downtime,
                bandwidth_bytes_per_s: bw,
                downtime_limit: self.cfg.downtime_limit,
            };
            let decision = match (self.cfg.on_timeout, timed_out) {
                (OnTimeout::Abort, true) => Decision::Abort {
                    reason: AbortReason::Timeout(u),
                },
                (OnTimeout::Abort, false) => Decision::Abort {
                    reason: AbortReason::MaxIterations(u),
                },
                (OnTimeout::Force, true) => Decision::SwitchOver {
                    reason: SwitchoverReason::TimeoutForced(u),
                    forced: true,
                },
                (OnTimeout::Force, false) => Decision::SwitchOver {
                    reason: SwitchoverReason::MaxIterationsForced(u),
                    forced: true,
                },
            };
            return self.terminal(decision, expected_downtime);
        }
        let actions = self.trigger(r, within_limit);
        self.passes += 1;
        let next_collect_at = self.pace(r, within_limit);
        Step {
            decision: Decision::NextPass,
            actions,
            expected_downtime,
            next_collect_at,
            defer_pages: self.defer(pages, bw, within_limit),
        }
    }

    /// Rule 8: while the rest does not fit, half the tail that would fit (QEMU's
    /// `threshold_size`, bandwidth × downtime limit) waits for the next collect.
    fn defer(&self, pages: u64, bw: f64, within_limit: bool) -> u64 {
        if within_limit || !(bw > 0.0 && bw.is_finite()) {
            return 0;
        }
        let fit =
            (bw * self.cfg.downtime_limit.as_secs_f64() / PAGE_SIZE as f64 * DEFER_SHARE).floor();
        // `as` saturates; the rest does not fit, so `fit` < `pages` unless rounding says
        // otherwise: never defer the whole pass.
        (fit as u64).min(pages.saturating_sub(1))
    }

    /// Rule 7: the earliest time of the next collect while not converging.
    fn pace(&mut self, r: &PassReport, within_limit: bool) -> Option<Duration> {
        let since = self
            .prev_collect
            .map_or(r.elapsed, |t| r.elapsed.saturating_sub(t));
        self.prev_collect = Some(r.elapsed);
        if within_limit {
            return None;
        }
        let collected = if since > Duration::ZERO {
            r.dirty_pages.saturating_mul(PAGE_SIZE) as f64 / since.as_secs_f64()
        } else {
            0.0
        };
        let reported = r
            .vcpu_dirty_rates
            .as_deref()
            .map_or(0.0, |v| v.iter().sum::<f64>() * PAGE_SIZE as f64);
        if collected.max(reported) < r.bandwidth_bytes_per_s {
            return None;
        }
        let mut at = r.elapsed.saturating_add(MIN_PASS_PERIOD);
        if let Some(t) = self.cfg.timeout {
            at = at.min(t.max(r.elapsed));
        }
        self.paced_collects += 1;
        Some(at)
    }

    /// Rule 2, for a rest that fits: `Some(reason)` to switch over, or `None` after counting
    /// another refining pass.
    fn refine_or_stop(
        &mut self,
        pages: u64,
        secs: f64,
        expected_downtime: Duration,
        timed_out: bool,
    ) -> Option<SwitchoverReason> {
        let limit = self.cfg.downtime_limit.as_secs_f64();
        let tiny =
            secs <= TINY_FINAL_PASS.as_secs_f64().min(limit / 10.0) || pages <= SMALL_FINAL_PAGES;
        if tiny {
            return Some(SwitchoverReason::Tiny {
                dirty_pages: pages,
                expected_downtime,
            });
        }
        // The first time the rest fits, one refining pass is always worth a try.
        if let Some(prev) = self.refine_prev {
            if (pages as f64) >= REFINE_SHRINK * prev as f64 {
                return Some(SwitchoverReason::StoppedShrinking {
                    dirty_pages: pages,
                    previous_pages: prev,
                    expected_downtime,
                });
            }
        }
        if self.refining_passes >= MAX_REFINING_PASSES {
            return Some(SwitchoverReason::RefiningDone {
                dirty_pages: pages,
                expected_downtime,
            });
        }
        if self.passes.saturating_add(2) >= self.cfg.max_iterations || timed_out {
            return Some(SwitchoverReason::NoTimeToRefine {
                dirty_pages: pages,
                expected_downtime,
            });
        }
        self.refining_passes += 1;
        self.refine_prev = Some(pages);
        None
    }

    /// Rule 3: accounts the report in the current period and, when the trigger fires,
    /// returns rule 4's actions.
    fn trigger(&mut self, r: &PassReport, within_limit: bool) -> Vec<Action> {
        if within_limit {
            self.high_periods = 0;
            self.restart_period(r.elapsed);
            return Vec::new();
        }
        let new_pages = r.dirty_pages.saturating_sub(r.carried_pages);
        self.period_dirty_bytes = self
            .period_dirty_bytes
            .saturating_add(new_pages.saturating_mul(PAGE_SIZE));
        self.period_xfer_bytes = self.period_xfer_bytes.saturating_add(r.last_pass_bytes);
        if r.elapsed.saturating_sub(self.period_start) <= THROTTLE_PERIOD {
            return Vec::new();
        }
        let threshold = u128::from(self.period_xfer_bytes)
            * u128::from(self.cfg.throttle_trigger_threshold)
            / 100;
        let high = u128::from(self.period_dirty_bytes) > threshold;
        self.restart_period(r.elapsed);
        if !high {
            return Vec::new();
        }
        self.high_periods += 1;
        if self.high_periods < HIGH_PERIODS_TO_FIRE {
            return Vec::new();
        }
        self.high_periods = 0;
        self.throttle(r)
    }

    fn restart_period(&mut self, at: Duration) {
        self.period_start = at;
        self.period_dirty_bytes = 0;
        self.period_xfer_bytes = 0;
    }

    /// Rule 4.
    fn throttle(&mut self, r: &PassReport) -> Vec<Action> {
        if self.cfg.dirty_limit == DirtyLimitMode::Auto {
            let quota = self.auto_quota(r);
            self.auto_quota = Some(quota);
            self.dirty_limit = Some(quota);
            self.events += 1;
            return vec![Action::SetDirtyLimit {
                bytes_per_s: quota,
                vcpus: Some(self.limited.clone()),
            }];
        }
        if self.cfg.auto_converge {
            let max = self.cfg.max_cpu_throttle;
            let percent = if self.throttle_percent == 0 {
                self.cfg.cpu_throttle_initial.min(max)
            } else {
                self.throttle_percent
                    .saturating_add(self.cfg.cpu_throttle_increment)
                    .min(max)
            };
            self.throttle_percent = percent;
            self.events += 1;
            return vec![Action::SetCpuThrottle { percent }];
        }
        Vec::new()
    }

    /// The auto dirty limit's quota; adds the vCPUs at or above the mean to the limited set.
    fn auto_quota(&mut self, r: &PassReport) -> u64 {
        let rates = r.vcpu_dirty_rates.as_deref().unwrap_or(&[]);
        let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
        for (i, &rate) in rates.iter().enumerate() {
            if rate >= mean && !self.limited.contains(&i) {
                self.limited.push(i);
            }
        }
        let free_bytes: f64 = rates
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.limited.contains(i))
            .map(|(_, &rate)| rate * PAGE_SIZE as f64)
            .sum();
        let budget = (DIRTY_LIMIT_BANDWIDTH_SHARE * r.bandwidth_bytes_per_s - free_bytes).max(0.0);
        let mut quota =
            (budget / self.limited.len().max(1) as f64).max(DIRTY_LIMIT_FLOOR as f64) as u64;
        if let Some(prev) = self.auto_quota {
            quota = quota.min(prev / 2).max(DIRTY_LIMIT_MIN);
        }
        quota
    }

    /// A step that ends pre-copy: lifts whatever throttle is in force.
    fn terminal(&self, decision: Decision, expected_downtime: Duration) -> Step {
        let active = self.throttle_percent > 0 || self.dirty_limit.is_some();
        Step {
            decision,
            actions: if active {
                vec![Action::LiftThrottles]
            } else {
                Vec::new()
            },
            expected_downtime,
            next_collect_at: None,
            defer_pages: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{MigrateSetParameters, MigrationCapabilities};

    const MB: f64 = 1e6;
    const MIB: u64 = 1 << 20;

    fn at(ms: u64, pages: u64, last_pass_bytes: u64, bw: f64) -> PassReport {
        PassReport {
            elapsed: Duration::from_millis(ms),
            dirty_pages: pages,
            last_pass_bytes,
            bandwidth_bytes_per_s: bw,
            vcpu_dirty_rates: None,
            carried_pages: 0,
        }
    }

    #[test]
    fn the_tail_that_would_fit_waits_while_the_rest_does_not_fit() {
        // 100 MB/s and 300 ms: 30 MB (7324 pages) would fit; half of that waits.
        let mut c = Convergence::new(PolicyConfig::default());
        let s = c.on_collect(&at(1000, 65_536, 256 * MIB, 100.0 * MB));
        assert_eq!(s.decision, Decision::NextPass);
        assert_eq!(s.defer_pages, 3662);
        // Just above the threshold: the same half waits, and the other half of the room is
        // left for the guest's new dirt.
        let s = c.on_collect(&at(2000, 7325, 256 * MIB, 100.0 * MB));
        assert_eq!(s.defer_pages, 3662);
        // Never the whole pass (a large limit against a small rest is impossible here, as
        // the rest does not fit; the bound is kept for rounding).
        assert!(s.defer_pages < 7325);
        // Once the rest fits (refining), every page is sent.
        let s = c.on_collect(&at(2100, 4000, 30 * MIB, 100.0 * MB));
        assert_eq!(s.decision, Decision::NextPass);
        assert_eq!(s.defer_pages, 0);
        // No bandwidth estimate: nothing waits.
        let mut c = Convergence::new(PolicyConfig::default());
        assert_eq!(c.on_collect(&at(1000, 65_536, 0, 0.0)).defer_pages, 0);
    }

    #[test]
    fn carried_pages_are_not_new_dirt_for_the_trigger() {
        // Each period finds 40 MB dirty against 20 MB sent (high), but 30 MB of it is the
        // tail the last pass carried over: 10 MB of new dirt is not high (50% of 20 MB).
        let mut c = Convergence::new(auto_converge());
        let rep = |ms, carried| PassReport {
            carried_pages: carried,
            ..at(ms, 40_000_000 / PAGE_SIZE, 20_000_000, 100.0 * MB)
        };
        let carried = 30_000_000 / PAGE_SIZE;
        for ms in [1100, 2200, 3300, 4400] {
            let s = c.on_collect(&rep(ms, carried));
            assert!(s.actions.is_empty(), "at {ms} ms: {:?}", s.actions);
        }
        assert_eq!(c.throttle_percent(), 0);
        // The same reports with nothing carried fire on the second high period.
        let mut c = Convergence::new(auto_converge());
        c.on_collect(&rep(1100, 0));
        let s = c.on_collect(&rep(2200, 0));
        assert_eq!(s.actions, vec![Action::SetCpuThrottle { percent: 20 }]);
    }

    fn switched(s: &Step) -> Option<SwitchoverReason> {
        match s.decision {
            Decision::SwitchOver { reason, forced } => {
                assert_eq!(forced, reason.forced());
                Some(reason)
            }
            _ => None,
        }
    }

    fn auto_converge() -> PolicyConfig {
        PolicyConfig {
            auto_converge: true,
            ..PolicyConfig::default()
        }
    }

    /// A report that does not fit the limit and is high: 100 MB/s, 40 MB dirty (400 ms)
    /// against 20 MB sent.
    fn high(ms: u64) -> PassReport {
        at(ms, 10_000, 20_000_000, 100.0 * MB)
    }

    /// Does not fit (400 ms) but is low: 40 MB dirty against 100 MB sent.
    fn low(ms: u64) -> PassReport {
        at(ms, 10_000, 100_000_000, 100.0 * MB)
    }

    /// Drives high periods of 1.5 s each and returns the actions of the event-firing steps.
    fn fire_events(c: &mut Convergence, events: usize, rates: Option<Vec<f64>>) -> Vec<Action> {
        let mut out = Vec::new();
        let mut t = 0;
        while out.len() < events {
            t += 1500;
            let mut r = high(t);
            r.vcpu_dirty_rates = rates.clone();
            let s = c.on_collect(&r);
            assert_eq!(s.decision, Decision::NextPass);
            assert!(s.actions.len() <= 1);
            out.extend(s.actions);
        }
        out
    }

    #[test]
    fn the_rest_that_is_tiny_switches_over_at_once() {
        let mut c = Convergence::new(PolicyConfig::default());
        assert!(c.start().is_empty());
        let s = c.on_collect(&at(100, 256, 1 << 30, 100.0 * MB));
        assert_eq!(
            switched(&s),
            Some(SwitchoverReason::Tiny {
                dirty_pages: 256,
                expected_downtime: s.expected_downtime
            })
        );
        assert!(s.actions.is_empty());
        assert_eq!(c.passes(), 0);
        // More than 256 pages, but <= 1 ms at 2 GB/s.
        let mut c = Convergence::new(PolicyConfig::default());
        let s = c.on_collect(&at(100, 300, 1 << 30, 2000.0 * MB));
        assert!(matches!(switched(&s), Some(SwitchoverReason::Tiny { .. })));
        // Nothing dirty at all, even without a bandwidth estimate.
        let mut c = Convergence::new(PolicyConfig::default());
        let s = c.on_collect(&at(100, 0, 0, 0.0));
        assert_eq!(s.expected_downtime, Duration::ZERO);
        assert!(matches!(switched(&s), Some(SwitchoverReason::Tiny { .. })));
    }

    #[test]
    fn tiny_is_a_tenth_of_a_small_limit() {
        let cfg = PolicyConfig {
            downtime_limit: Duration::from_millis(5),
            ..PolicyConfig::default()
        };
        // 1000 pages = 4.096 MB: 0.41 ms at 10 GB/s is under 0.5 ms, 0.82 ms at 5 GB/s is not.
        let mut c = Convergence::new(cfg.clone());
        assert!(switched(&c.on_collect(&at(0, 1000, 0, 10_000.0 * MB))).is_some());
        let mut c = Convergence::new(cfg);
        assert_eq!(
            c.on_collect(&at(0, 1000, 0, 5000.0 * MB)).decision,
            Decision::NextPass
        );
        assert_eq!(c.refining_passes(), 1);
    }

    #[test]
    fn a_rest_that_does_not_fit_gets_another_pass_without_refining() {
        let mut c = Convergence::new(PolicyConfig::default());
        // 40 MB at 100 MB/s = 400 ms > 300 ms.
        let s = c.on_collect(&at(100, 10_000, 0, 100.0 * MB));
        assert_eq!(s.decision, Decision::NextPass);
        assert_eq!(s.expected_downtime, Duration::from_micros(409_600));
        assert_eq!(c.refining_passes(), 0);
        assert_eq!(c.passes(), 1);
    }

    #[test]
    fn refining_continues_while_each_collect_halves_the_rest_then_stops() {
        let mut c = Convergence::new(PolicyConfig::default());
        let bw = 1000.0 * MB;
        // 40 MB = 41 ms: fits, first time: one refining pass.
        assert_eq!(
            c.on_collect(&at(0, 10_000, 0, bw)).decision,
            Decision::NextPass
        );
        // 3999 < 5000: halved, another.
        assert_eq!(
            c.on_collect(&at(0, 3999, 0, bw)).decision,
            Decision::NextPass
        );
        assert_eq!(c.refining_passes(), 2);
        // 2000 >= 3999 / 2: stopped shrinking.
        let s = c.on_collect(&at(0, 2000, 0, bw));
        assert_eq!(
            switched(&s),
            Some(SwitchoverReason::StoppedShrinking {
                dirty_pages: 2000,
                previous_pages: 3999,
                expected_downtime: s.expected_downtime
            })
        );
        assert_eq!(c.passes(), 2);
    }

    #[test]
    fn refining_stops_after_eight_passes() {
        let cfg = PolicyConfig {
            downtime_limit: Duration::from_secs(2),
            ..PolicyConfig::default()
        };
        let mut c = Convergence::new(cfg);
        let bw = 4000.0 * MB;
        let mut pages = 1_000_000u64;
        for i in 1..=MAX_REFINING_PASSES {
            assert_eq!(
                c.on_collect(&at(0, pages, 0, bw)).decision,
                Decision::NextPass
            );
            assert_eq!(c.refining_passes(), i);
            pages = pages / 2 - 1;
        }
        // Still halving and not tiny (> 256 pages, > 1 ms), but eight refining passes were sent.
        assert!(pages > SMALL_FINAL_PAGES);
        let s = c.on_collect(&at(0, pages, 0, bw));
        assert!(s.expected_downtime > TINY_FINAL_PASS);
        assert!(matches!(
            switched(&s),
            Some(SwitchoverReason::RefiningDone { dirty_pages, .. }) if dirty_pages == pages
        ));
    }

    #[test]
    fn refining_stops_when_the_timeout_or_pass_limit_leaves_no_room() {
        let bw = 1000.0 * MB;
        let cfg = PolicyConfig {
            timeout: Some(Duration::from_secs(10)),
            ..PolicyConfig::default()
        };
        let mut c = Convergence::new(cfg);
        let s = c.on_collect(&at(10_000, 10_000, 0, bw));
        assert!(matches!(
            switched(&s),
            Some(SwitchoverReason::NoTimeToRefine { .. })
        ));
        assert_eq!(
            s.decision,
            Decision::SwitchOver {
                reason: switched(&s).unwrap(),
                forced: false
            }
        );
        // max_iterations 3: passes + 2 >= 3 once one dirty pass was sent.
        let cfg = PolicyConfig {
            max_iterations: 3,
            ..PolicyConfig::default()
        };
        let mut c = Convergence::new(cfg);
        assert_eq!(
            c.on_collect(&at(0, 1_000_000, 0, bw)).decision,
            Decision::NextPass
        );
        let s = c.on_collect(&at(0, 10_000, 0, bw));
        assert!(matches!(
            switched(&s),
            Some(SwitchoverReason::NoTimeToRefine { .. })
        ));
    }

    #[test]
    fn the_trigger_waits_for_a_period_longer_than_one_second() {
        let mut c = Convergence::new(auto_converge());
        // Period 1: 300, 600, 900 accumulate; exactly 1000 ms does not close it.
        for t in [300, 600, 900, 1000] {
            assert!(c.on_collect(&high(t)).actions.is_empty(), "{t}");
        }
        // 1001 ms closes period 1 (high, count 1); period 2 starts at 1001.
        assert!(c.on_collect(&high(1001)).actions.is_empty());
        for t in [1500, 2001] {
            assert!(c.on_collect(&high(t)).actions.is_empty(), "{t}");
        }
        // 2002 ms closes period 2: second high period, the trigger fires.
        let s = c.on_collect(&high(2002));
        assert_eq!(s.actions, vec![Action::SetCpuThrottle { percent: 20 }]);
        assert_eq!(c.throttle_events(), 1);
        // The count restarted: the next high period alone does not fire.
        assert!(c.on_collect(&high(3100)).actions.is_empty());
        assert_eq!(
            c.on_collect(&high(4200)).actions,
            vec![Action::SetCpuThrottle { percent: 30 }]
        );
    }

    #[test]
    fn many_high_passes_within_one_period_are_one_high_period() {
        // Ten high passes of 90 ms each: the former per-pass rule fired five times.
        let mut c = Convergence::new(auto_converge());
        for i in 1..=11 {
            assert!(c.on_collect(&high(i * 90)).actions.is_empty());
        }
        assert_eq!(c.throttle_events(), 0);
    }

    #[test]
    fn a_low_period_does_not_reset_the_count_as_in_qemu() {
        let mut c = Convergence::new(auto_converge());
        assert!(c.on_collect(&high(1100)).actions.is_empty()); // high, count 1
        assert!(c.on_collect(&low(2200)).actions.is_empty()); // low, count stays 1
        assert_eq!(
            c.on_collect(&high(3300)).actions,
            vec![Action::SetCpuThrottle { percent: 20 }]
        );
    }

    #[test]
    fn the_period_sums_dirty_and_sent_bytes_over_its_collects() {
        let mut c = Convergence::new(auto_converge());
        // Per collect 40 MB dirty: 20 MB sent is high alone, but the period's sums are
        // 80 MB dirty vs 20 + 200 MB sent: low.
        assert!(c
            .on_collect(&at(600, 10_000, 20_000_000, 100.0 * MB))
            .actions
            .is_empty());
        assert!(c
            .on_collect(&at(1100, 10_000, 200_000_000, 100.0 * MB))
            .actions
            .is_empty());
        assert!(c.on_collect(&high(2200)).actions.is_empty()); // high, count 1: so 1100 was low
        assert!(!c.on_collect(&high(3300)).actions.is_empty());
    }

    #[test]
    fn throttle_trigger_threshold_sets_the_high_mark() {
        let cfg = PolicyConfig {
            throttle_trigger_threshold: 100,
            ..auto_converge()
        };
        // 40 MB dirty vs 40 MB sent: not above 100%.
        let mut c = Convergence::new(cfg.clone());
        for t in [1100, 2200, 3300] {
            assert!(c
                .on_collect(&at(t, 10_000, 40_960_000, 100.0 * MB))
                .actions
                .is_empty());
        }
        // One byte less sent: above.
        let mut c = Convergence::new(cfg);
        assert!(c
            .on_collect(&at(1100, 10_000, 40_959_999, 100.0 * MB))
            .actions
            .is_empty());
        assert!(!c
            .on_collect(&at(2200, 10_000, 40_959_999, 100.0 * MB))
            .actions
            .is_empty());
    }

    #[test]
    fn a_rest_that_fits_resets_the_count_and_the_period() {
        let mut c = Convergence::new(auto_converge());
        assert!(c.on_collect(&high(1100)).actions.is_empty()); // count 1
                                                               // Fits (4 MB = 40 ms): refining, and the count restarts.
        assert_eq!(
            c.on_collect(&at(1500, 1000, 0, 100.0 * MB)).decision,
            Decision::NextPass
        );
        assert!(c.on_collect(&high(2600)).actions.is_empty()); // count 1 again
        assert!(!c.on_collect(&high(3700)).actions.is_empty());
    }

    #[test]
    fn auto_converge_steps_from_20_by_10_to_99() {
        let mut c = Convergence::new(auto_converge());
        let got: Vec<u8> = fire_events(&mut c, 10, None)
            .into_iter()
            .map(|a| match a {
                Action::SetCpuThrottle { percent } => percent,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(got, vec![20, 30, 40, 50, 60, 70, 80, 90, 99, 99]);
        assert_eq!(c.throttle_percent(), 99);
        assert_eq!(c.throttle_events(), 10);
    }

    #[test]
    fn auto_converge_follows_custom_initial_increment_and_max() {
        let mut p = MigrationParameters::default();
        MigrateSetParameters {
            cpu_throttle_initial: Some(5),
            cpu_throttle_increment: Some(40),
            max_cpu_throttle: Some(60),
            ..Default::default()
        }
        .apply(&mut p)
        .unwrap();
        let caps = MigrationCapabilities {
            auto_converge: true,
            dirty_limit: false,
        };
        let cfg = PolicyConfig::new(&p, &caps, TrackerMode::Bitmap).unwrap();
        let mut c = Convergence::new(cfg);
        let got = fire_events(&mut c, 4, None);
        let want: Vec<Action> = [5, 45, 60, 60]
            .into_iter()
            .map(|percent| Action::SetCpuThrottle { percent })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn no_throttle_without_auto_converge_or_dirty_limit() {
        let mut c = Convergence::new(PolicyConfig::default());
        for i in 1..=10 {
            assert!(c.on_collect(&high(i * 1500)).actions.is_empty());
        }
        assert_eq!(c.throttle_events(), 0);
        assert_eq!(c.throttle_percent(), 0);
    }

    #[test]
    fn auto_dirty_limit_limits_the_vcpus_at_or_above_the_mean_then_halves() {
        let cfg = PolicyConfig {
            dirty_limit: DirtyLimitMode::Auto,
            ..PolicyConfig::default()
        };
        let mut c = Convergence::new(cfg);
        assert!(c.start().is_empty());
        // Mean 2275 pages/s: vCPUs 1 and 3. Unlimited 0 and 2 dirty 1100 pages/s =
        // 4 505 600 B/s; half of 100 MB/s minus that, shared by two.
        let rates = vec![1000.0, 3000.0, 100.0, 5000.0];
        let got = fire_events(&mut c, 2, Some(rates));
        assert_eq!(
            got,
            vec![
                Action::SetDirtyLimit {
                    bytes_per_s: 22_747_200,
                    vcpus: Some(vec![1, 3])
                },
                Action::SetDirtyLimit {
                    bytes_per_s: 11_373_600,
                    vcpus: Some(vec![1, 3])
                },
            ]
        );
        assert_eq!(c.dirty_limit(), Some(11_373_600));
        // vCPU 0 speeds up: it joins, the others stay limited.
        let got = fire_events(&mut c, 1, Some(vec![9000.0, 0.0, 0.0, 0.0]));
        assert_eq!(
            got,
            vec![Action::SetDirtyLimit {
                bytes_per_s: 5_686_800,
                vcpus: Some(vec![1, 3, 0])
            }]
        );
        assert_eq!(c.limited_vcpus(), &[1, 3, 0]);
        assert_eq!(c.throttle_percent(), 0);
    }

    #[test]
    fn auto_dirty_limit_floor_is_256k_then_halves_down_to_64k() {
        let cfg = PolicyConfig {
            dirty_limit: DirtyLimitMode::Auto,
            // Ignored: the dirty limit comes first, as in the engine.
            auto_converge: true,
            ..PolicyConfig::default()
        };
        let mut c = Convergence::new(cfg);
        let mut t = 0;
        let mut quotas = Vec::new();
        while quotas.len() < 4 {
            t += 1500;
            // 1 MB/s: the budget is far under the floor.
            let mut r = at(t, 10_000, 200_000, MB);
            r.vcpu_dirty_rates = Some(vec![10.0, 10.0]);
            for a in c.on_collect(&r).actions {
                match a {
                    Action::SetDirtyLimit { bytes_per_s, vcpus } => {
                        assert_eq!(vcpus, Some(vec![0, 1]));
                        quotas.push(bytes_per_s);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(quotas, vec![256 * 1024, 128 * 1024, 64 * 1024, 64 * 1024]);
    }

    #[test]
    fn a_fixed_dirty_limit_is_applied_to_every_vcpu_at_start() {
        let mut c = Convergence::new(PolicyConfig {
            dirty_limit: DirtyLimitMode::Fixed(MIB),
            ..PolicyConfig::default()
        });
        assert_eq!(
            c.start(),
            vec![Action::SetDirtyLimit {
                bytes_per_s: MIB,
                vcpus: None
            }]
        );
        assert_eq!(c.dirty_limit(), Some(MIB));
        // The trigger does nothing more in fixed mode.
        for i in 1..=6 {
            assert!(c.on_collect(&high(i * 1500)).actions.is_empty());
        }
        // The switchover lifts it.
        let s = c.on_collect(&at(10_000, 1, 0, MB));
        assert!(switched(&s).is_some());
        assert_eq!(s.actions, vec![Action::LiftThrottles]);
    }

    #[test]
    fn timeout_aborts_or_forces_as_configured() {
        let cfg = PolicyConfig {
            timeout: Some(Duration::from_secs(10)),
            ..auto_converge()
        };
        let mut c = Convergence::new(cfg.clone());
        assert_eq!(c.on_collect(&high(9_999)).decision, Decision::NextPass);
        let s = c.on_collect(&high(10_000));
        let Decision::Abort { reason } = s.decision else {
            panic!("expected an abort, got {:?}", s.decision)
        };
        assert!(matches!(reason, AbortReason::Timeout(_)));
        assert_eq!(
            reason.to_string(),
            "timed out, not converged after 10.0 s (2 passes): 10000 dirty pages need 410 ms \
             at 95.4 MiB/s, limit 300 ms; the guest keeps running on the source"
        );
        // A throttle in force is lifted with the abort.
        assert!(s.actions.is_empty());
        let mut c = Convergence::new(cfg.clone());
        assert_eq!(fire_events(&mut c, 1, None).len(), 1);
        let s = c.on_collect(&high(20_000));
        assert!(matches!(s.decision, Decision::Abort { .. }));
        assert_eq!(s.actions, vec![Action::LiftThrottles]);
        // Force: a switchover marked forced.
        let mut c = Convergence::new(PolicyConfig {
            on_timeout: OnTimeout::Force,
            ..cfg
        });
        let s = c.on_collect(&high(10_000));
        assert!(matches!(
            s.decision,
            Decision::SwitchOver {
                reason: SwitchoverReason::TimeoutForced(_),
                forced: true
            }
        ));
        assert!(switched(&s)
            .unwrap()
            .to_string()
            .contains("switching over anyway"));
    }

    #[test]
    fn max_iterations_ends_pre_copy() {
        let cfg = PolicyConfig {
            max_iterations: 3,
            ..PolicyConfig::default()
        };
        let mut c = Convergence::new(cfg.clone());
        assert_eq!(c.on_collect(&high(1)).decision, Decision::NextPass);
        assert_eq!(c.on_collect(&high(2)).decision, Decision::NextPass);
        let s = c.on_collect(&high(3));
        assert!(matches!(
            s.decision,
            Decision::Abort {
                reason: AbortReason::MaxIterations(Unconverged { passes: 3, .. })
            }
        ));
        let mut c = Convergence::new(PolicyConfig {
            on_timeout: OnTimeout::Force,
            max_iterations: 1,
            ..cfg
        });
        assert!(matches!(
            c.on_collect(&high(1)).decision,
            Decision::SwitchOver {
                reason: SwitchoverReason::MaxIterationsForced(_),
                forced: true
            }
        ));
    }

    #[test]
    fn a_live_lower_downtime_limit_changes_the_next_decision() {
        // 5000 pages at 100 MB/s = 205 ms: fits 300 ms, not 100 ms.
        let r = |t| at(t, 5000, 0, 100.0 * MB);
        let mut same = Convergence::new(PolicyConfig::default());
        let mut lowered = Convergence::new(PolicyConfig::default());
        assert_eq!(same.on_collect(&r(100)).decision, Decision::NextPass);
        assert_eq!(lowered.on_collect(&r(100)).decision, Decision::NextPass);
        assert!(lowered
            .set_config(PolicyConfig {
                downtime_limit: Duration::from_millis(100),
                ..PolicyConfig::default()
            })
            .is_empty());
        // Unchanged: the rest did not halve, switch over. Lowered: it no longer fits.
        assert!(matches!(
            switched(&same.on_collect(&r(200))),
            Some(SwitchoverReason::StoppedShrinking { .. })
        ));
        assert_eq!(lowered.on_collect(&r(200)).decision, Decision::NextPass);
        assert_eq!(lowered.config().downtime_limit, Duration::from_millis(100));
    }

    #[test]
    fn live_changes_of_the_dirty_limit_and_throttle_emit_their_actions() {
        let fixed = |q| PolicyConfig {
            dirty_limit: DirtyLimitMode::Fixed(q),
            ..PolicyConfig::default()
        };
        let mut c = Convergence::new(fixed(MIB));
        c.start();
        assert!(c.set_config(fixed(MIB)).is_empty());
        assert_eq!(
            c.set_config(fixed(2 * MIB)),
            vec![Action::SetDirtyLimit {
                bytes_per_s: 2 * MIB,
                vcpus: None
            }]
        );
        assert_eq!(
            c.set_config(PolicyConfig::default()),
            vec![Action::ClearDirtyLimit]
        );
        assert_eq!(c.dirty_limit(), None);
        // Lowering max-cpu-throttle below the throttle in force lowers it; auto-converge off
        // removes it.
        let mut c = Convergence::new(auto_converge());
        fire_events(&mut c, 3, None);
        assert_eq!(c.throttle_percent(), 40);
        assert_eq!(
            c.set_config(PolicyConfig {
                max_cpu_throttle: 25,
                ..auto_converge()
            }),
            vec![Action::SetCpuThrottle { percent: 25 }]
        );
        assert_eq!(
            c.set_config(PolicyConfig::default()),
            vec![Action::SetCpuThrottle { percent: 0 }]
        );
    }

    #[test]
    fn policy_config_maps_capabilities_and_the_ringvisor_dirty_limit() {
        let p = MigrationParameters::default();
        let on = MigrationCapabilities {
            auto_converge: false,
            dirty_limit: true,
        };
        let cfg = PolicyConfig::new(&p, &on, TrackerMode::Ring).unwrap();
        assert_eq!(cfg.dirty_limit, DirtyLimitMode::Auto);
        assert_eq!(cfg.downtime_limit, Duration::from_millis(300));
        assert_eq!(cfg.timeout, None);
        let fixed = MigrationParameters {
            x_ringvisor_dirty_limit: 5 * MIB,
            x_ringvisor_timeout: 2500,
            ..p.clone()
        };
        let cfg = PolicyConfig::new(&fixed, &on, TrackerMode::Ring).unwrap();
        assert_eq!(cfg.dirty_limit, DirtyLimitMode::Fixed(5 * MIB));
        assert_eq!(cfg.timeout, Some(Duration::from_millis(2500)));
        // Without the capability the ringvisor value is ignored.
        let cfg = PolicyConfig::new(
            &fixed,
            &MigrationCapabilities::default(),
            TrackerMode::Bitmap,
        )
        .unwrap();
        assert_eq!(cfg.dirty_limit, DirtyLimitMode::Off);
        assert_eq!(
            PolicyConfig::new(&p, &on, TrackerMode::ClearLog),
            Err(ParamError::DirtyLimitNeedsRing {
                tracker: "clear-log"
            })
        );
        let both = MigrationCapabilities {
            auto_converge: true,
            dirty_limit: true,
        };
        assert_eq!(
            PolicyConfig::new(&p, &both, TrackerMode::Ring),
            Err(ParamError::CapabilityConflict)
        );
        let bad = MigrationParameters {
            cpu_throttle_initial: 0,
            ..p
        };
        assert!(
            PolicyConfig::new(&bad, &MigrationCapabilities::default(), TrackerMode::Ring).is_err()
        );
    }

    #[test]
    fn reasons_read_as_sentences() {
        let d = Duration::from_micros(1500);
        assert_eq!(
            SwitchoverReason::Tiny {
                dirty_pages: 12,
                expected_downtime: d
            }
            .to_string(),
            "converged: the last 12 dirty pages take about 1.5 ms to send"
        );
        let u = Unconverged {
            elapsed: Duration::from_millis(61_250),
            passes: 40,
            dirty_pages: 100_000,
            expected_downtime: Duration::from_millis(4096),
            bandwidth_bytes_per_s: 100.0 * MIB as f64,
            downtime_limit: Duration::from_millis(300),
        };
        assert_eq!(
            AbortReason::MaxIterations(u).to_string(),
            "pass limit reached, not converged after 61.2 s (40 passes): 100000 dirty pages \
             need 4096 ms at 100.0 MiB/s, limit 300 ms; the guest keeps running on the source"
        );
        assert!(SwitchoverReason::TimeoutForced(u).forced());
        assert!(!SwitchoverReason::RefiningDone {
            dirty_pages: 1,
            expected_downtime: d
        }
        .forced());
    }

    #[test]
    fn no_bandwidth_means_nothing_fits() {
        let mut c = Convergence::new(PolicyConfig::default());
        for bw in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let s = c.on_collect(&at(0, 1000, 0, bw));
            assert_eq!(s.decision, Decision::NextPass, "{bw}");
            assert_eq!(s.expected_downtime, Duration::MAX);
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn report() -> impl Strategy<Value = (u64, u64, u64, f64, Option<Vec<f64>>)> {
            (
                0u64..3000,
                prop_oneof![0u64..300, 0u64..2_000_000, Just(u64::MAX)],
                prop_oneof![0u64..1 << 30, Just(u64::MAX)],
                prop_oneof![Just(0.0), Just(f64::NAN), Just(f64::INFINITY), 1e3f64..1e11],
                proptest::option::of(proptest::collection::vec(
                    prop_oneof![0.0f64..1e6, Just(f64::NAN)],
                    0..8,
                )),
            )
        }

        fn config() -> impl Strategy<Value = PolicyConfig> {
            (
                0u64..2_000_000,
                proptest::option::of(0u64..100_000),
                any::<bool>(),
                1u32..50,
                1u8..=100,
                any::<bool>(),
                (1u8..=99, 1u8..=99, 1u8..=99),
                prop_oneof![
                    Just(DirtyLimitMode::Off),
                    Just(DirtyLimitMode::Auto),
                    (0u64..u64::MAX).prop_map(DirtyLimitMode::Fixed)
                ],
            )
                .prop_map(
                    |(limit, timeout, force, iters, thr, ac, (init, inc, max), dl)| PolicyConfig {
                        downtime_limit: Duration::from_millis(limit),
                        timeout: timeout.map(Duration::from_millis),
                        on_timeout: if force {
                            OnTimeout::Force
                        } else {
                            OnTimeout::Abort
                        },
                        max_iterations: iters,
                        throttle_trigger_threshold: thr,
                        auto_converge: ac,
                        cpu_throttle_initial: init,
                        cpu_throttle_increment: inc,
                        max_cpu_throttle: max,
                        dirty_limit: dl,
                    },
                )
        }

        proptest! {
            /// Any report sequence: no panic, the throttle never falls and never exceeds
            /// max-cpu-throttle, the auto dirty limit never rises, and pre-copy ends within
            /// max_iterations collects.
            #[test]
            fn any_reports_keep_the_throttle_monotone_and_capped(
                cfg in config(),
                reports in proptest::collection::vec(report(), 1..80),
            ) {
                let mut c = Convergence::new(cfg.clone());
                c.start();
                let mut t = 0u64;
                let mut last_throttle = 0u8;
                let mut last_limit: Option<u64> = None;
                let mut ended = false;
                for (i, (dt, pages, sent, bw, rates)) in reports.into_iter().enumerate() {
                    t += dt;
                    let s = c.on_collect(&PassReport {
                        elapsed: Duration::from_millis(t),
                        dirty_pages: pages,
                        last_pass_bytes: sent,
                        bandwidth_bytes_per_s: bw,
                        vcpu_dirty_rates: rates,
                        carried_pages: 0,
                    });
                    prop_assert!(c.throttle_percent() >= last_throttle);
                    prop_assert!(c.throttle_percent() <= cfg.max_cpu_throttle);
                    for a in &s.actions {
                        if let Action::SetCpuThrottle { percent } = a {
                            prop_assert!(*percent <= cfg.max_cpu_throttle);
                        }
                    }
                    if cfg.dirty_limit == DirtyLimitMode::Auto {
                        if let (Some(prev), Some(now)) = (last_limit, c.dirty_limit()) {
                            prop_assert!(now <= prev);
                        }
                        last_limit = c.dirty_limit();
                    }
                    last_throttle = c.throttle_percent();
                    if s.decision != Decision::NextPass {
                        ended = true;
                        break;
                    }
                    prop_assert!((i as u32) < cfg.max_iterations);
                }
                if !ended {
                    prop_assert!(c.passes() < cfg.max_iterations);
                }
            }
        }
    }

    /// A 256 MiB hot set rewritten at 2 GiB/s (the ring's per-vCPU rates say so) on a
    /// 1 GB/s link with a 60 ms limit: passes cannot converge, so collects are 1 s apart.
    #[test]
    fn a_hot_set_dirtied_faster_than_the_link_is_recollected_at_most_once_a_second() {
        let mut c = Convergence::new(PolicyConfig {
            downtime_limit: Duration::from_millis(60),
            ..PolicyConfig::default()
        });
        let hot = 65_536; // 256 MiB
        let bw = 1000.0 * MB;
        let rep = |ms, pages| PassReport {
            vcpu_dirty_rates: Some(vec![524_288.0]), // 2 GiB/s
            ..at(ms, pages, 256 * MIB, bw)
        };
        let s = c.on_collect(&rep(2000, hot));
        assert_eq!(s.decision, Decision::NextPass);
        assert_eq!(s.next_collect_at, Some(Duration::from_millis(3000)));
        let s = c.on_collect(&rep(3000, hot));
        assert_eq!(s.next_collect_at, Some(Duration::from_millis(4000)));
        assert_eq!(c.paced_collects(), 2);
        // Without the ring's rates, 256 MiB found 1 s apart is 268 MB/s: below the link,
        // so not held (short passes then tell).
        let s = c.on_collect(&at(4000, hot, 256 * MIB, bw));
        assert_eq!(s.next_collect_at, None);
    }

    #[test]
    fn a_dirty_rate_above_the_bandwidth_holds_even_the_first_collect() {
        let mut c = Convergence::new(PolicyConfig::default());
        // 800 MiB dirtied over a 1 s bulk pass on a 128 MiB/s link.
        let s = c.on_collect(&at(1000, 204_800, 128 * MIB, 128.0 * MIB as f64));
        assert_eq!(s.decision, Decision::NextPass);
        assert_eq!(s.next_collect_at, Some(Duration::from_millis(2000)));
    }

    #[test]
    fn a_converging_migration_is_never_held() {
        let mut c = Convergence::new(PolicyConfig {
            downtime_limit: Duration::from_millis(10),
            ..PolicyConfig::default()
        });
        let bw = 1000.0 * MB;
        // Shrinking by half each pass, dirty rate well below the bandwidth.
        let mut pages = 100_000;
        let mut t = 1000;
        for _ in 0..4 {
            let s = c.on_collect(&at(t, pages, pages * 4096 * 2, bw));
            assert_eq!(s.decision, Decision::NextPass);
            assert_eq!(s.next_collect_at, None, "at {t} ms, {pages} pages");
            pages /= 2;
            t += 400;
        }
        // Fitting the limit (refining) is not held either.
        let s = c.on_collect(&at(t, 2000, 4 * MIB, bw));
        assert_eq!(s.decision, Decision::NextPass);
        assert_eq!(s.next_collect_at, None);
        assert_eq!(c.paced_collects(), 0);
    }

    #[test]
    fn pacing_never_waits_past_the_timeout() {
        let mut c = Convergence::new(PolicyConfig {
            downtime_limit: Duration::from_millis(10),
            timeout: Some(Duration::from_millis(2500)),
            ..PolicyConfig::default()
        });
        // 200 MB found 1 s after the previous collect on a 100 MB/s link: outpaced.
        let bw = 100.0 * MB;
        c.on_collect(&at(1000, 50_000, 200 * MIB, bw));
        let s = c.on_collect(&at(2000, 50_000, 200 * MIB, bw));
        assert_eq!(s.next_collect_at, Some(Duration::from_millis(2500)));
    }

    /// 800 MiB/s over a 256 MiB set on a ~1 GB/s link: each short pass finds fewer pages
    /// than the last, so it is never held, even when a collect finds the whole set.
    #[test]
    fn a_dirty_rate_below_the_bandwidth_is_never_held() {
        let mut c = Convergence::new(PolicyConfig {
            downtime_limit: Duration::from_millis(100),
            ..PolicyConfig::default()
        });
        let bw = 1100.0 * MB;
        let rep = |ms, pages| PassReport {
            vcpu_dirty_rates: Some(vec![204_800.0]), // 800 MiB/s
            ..at(ms, pages, 256 * MIB, bw)
        };
        for (ms, pages) in [(2000, 65_536), (2250, 65_536), (2450, 52_000)] {
            let s = c.on_collect(&rep(ms, pages));
            assert_eq!(s.decision, Decision::NextPass);
            assert_eq!(s.next_collect_at, None, "at {ms} ms");
        }
    }
}
