//! The convergence rules the pass loop asks at every collect: switch over, send another
//! pass or give up, and which throttles to apply. A pure state machine (time comes in the
//! reports); the engine applies its [`Action`]s to the VM.
//!
//! This is the engine's former inline rule set, in the shape of the shared policy
//! (`migration::convergence`), which replaces this module once it lands: the pass loop is the
//! only caller.
//!
//! - The rest fits when `dirty bytes / bandwidth <= downtime-limit`. Then another pass is
//!   sent while it makes the downtime smaller: switch over once the rest is tiny (<= 256
//!   pages or <= min(1 ms, limit / 10)), stopped halving, after 8 such passes, or when no
//!   budget is left (timeout, pass limit).
//! - Non-convergence: a collect that finds more than half of what the last pass sent, twice
//!   in a row (not while the rest fits): the auto dirty limit limits the vCPUs dirtying at or
//!   above the mean so the guest dirties at most half the bandwidth (halving the quota at
//!   each later event), or auto-converge throttles the CPU 20%, +10% per event, up to 99%.
//! - Timeout or pass limit without convergence: abort (the guest stays) or force.

use std::time::Duration;

use kvm_dirty::PAGE_SIZE;

use super::{DirtyLimitMode, SourceOptions, TimeoutAction};

const SMALL_FINAL_PAGES: u64 = 256;
const TINY_FINAL_PASS: f64 = 0.001;
const REFINE_SHRINK: f64 = 0.5;
const MAX_REFINING_PASSES: u32 = 8;
const CPU_THROTTLE_INITIAL: u8 = 20;
const CPU_THROTTLE_INCREMENT: u8 = 10;
const MAX_CPU_THROTTLE: u8 = 99;

/// The parameters the policy works from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PolicyConfig {
    pub(crate) downtime_limit: Duration,
    pub(crate) timeout: Option<Duration>,
    pub(crate) on_timeout: TimeoutAction,
    pub(crate) max_iterations: u32,
    pub(crate) auto_converge: bool,
    pub(crate) dirty_limit: DirtyLimitMode,
}

impl From<&SourceOptions> for PolicyConfig {
    fn from(o: &SourceOptions) -> Self {
        PolicyConfig {
            downtime_limit: o.downtime_limit,
            timeout: o.timeout,
            on_timeout: o.on_timeout,
            max_iterations: o.max_iterations,
            auto_converge: o.auto_converge,
            dirty_limit: o.dirty_limit,
        }
    }
}

/// What the engine reports at a collect.
#[derive(Debug, Clone, Default)]
pub(crate) struct PassReport {
    pub(crate) elapsed: Duration,
    pub(crate) dirty_pages: u64,
    pub(crate) last_pass_bytes: u64,
    pub(crate) bandwidth_bytes_per_s: f64,
    pub(crate) vcpu_dirty_rates: Option<Vec<f64>>,
}

/// The verdict at a collect.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    NextPass,
    SwitchOver { reason: String, forced: bool },
    Abort { reason: String },
}

/// Something to do to the guest.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    SetCpuThrottle {
        percent: u8,
    },
    SetDirtyLimit {
        bytes_per_s: u64,
        vcpus: Option<Vec<usize>>,
    },
    ClearDirtyLimit,
    LiftThrottles,
}

/// The answer to a collect.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) decision: Decision,
    pub(crate) actions: Vec<Action>,
    pub(crate) expected_downtime: Duration,
}

/// The convergence state of one migration.
#[derive(Debug)]
pub(crate) struct Convergence {
    cfg: PolicyConfig,
    passes: u32,
    refining_passes: u32,
    refine_prev: Option<u64>,
    streak: u32,
    throttle_percent: u8,
    dirty_limit: Option<u64>,
    auto_quota: Option<u64>,
    limited: Vec<usize>,
    events: u32,
}

impl Convergence {
    pub(crate) fn new(cfg: PolicyConfig) -> Self {
        Convergence {
            cfg,
            passes: 0,
            refining_passes: 0,
            refine_prev: None,
            streak: 0,
            throttle_percent: 0,
            dirty_limit: None,
            auto_quota: None,
            limited: Vec::new(),
            events: 0,
        }
    }

    /// What to apply before the bulk pass: a fixed dirty limit.
    pub(crate) fn start(&mut self) -> Vec<Action> {
        match self.cfg.dirty_limit {
            DirtyLimitMode::Fixed(q) => {
                self.dirty_limit = Some(q);
                self.events += 1;
                vec![Action::SetDirtyLimit {
                    bytes_per_s: q,
                    vcpus: None,
                }]
            }
            _ => Vec::new(),
        }
    }

    pub(crate) fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// A live parameter change; returns what to apply now.
    pub(crate) fn set_config(&mut self, cfg: PolicyConfig) -> Vec<Action> {
        let mut actions = Vec::new();
        if cfg.dirty_limit != self.cfg.dirty_limit {
            self.auto_quota = None;
            self.limited.clear();
            match cfg.dirty_limit {
                DirtyLimitMode::Fixed(q) => {
                    self.dirty_limit = Some(q);
                    self.events += 1;
                    actions.push(Action::SetDirtyLimit {
                        bytes_per_s: q,
                        vcpus: None,
                    });
                }
                DirtyLimitMode::Off | DirtyLimitMode::Auto => {
                    if self.dirty_limit.take().is_some() {
                        actions.push(Action::ClearDirtyLimit);
                    }
                }
            }
        }
        if !cfg.auto_converge && self.throttle_percent > 0 {
            self.throttle_percent = 0;
            actions.push(Action::SetCpuThrottle { percent: 0 });
        }
        self.cfg = cfg;
        actions
    }

    pub(crate) fn throttle_percent(&self) -> u8 {
        self.throttle_percent
    }

    pub(crate) fn dirty_limit(&self) -> Option<u64> {
        self.dirty_limit
    }

    pub(crate) fn throttle_events(&self) -> u32 {
        self.events
    }

    fn terminal(&self, decision: Decision, expected_downtime: Duration) -> Step {
        let throttled = self.throttle_percent > 0 || self.dirty_limit.is_some();
        Step {
            decision,
            actions: if throttled {
                vec![Action::LiftThrottles]
            } else {
                Vec::new()
            },
            expected_downtime,
        }
    }

    /// Decides at a collect.
    pub(crate) fn on_collect(&mut self, r: &PassReport) -> Step {
        let pages = r.dirty_pages;
        let bw = r.bandwidth_bytes_per_s.max(1.0);
        let secs = (pages * PAGE_SIZE) as f64 / bw;
        let expected_downtime = Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX);
        let limit = self.cfg.downtime_limit.as_secs_f64();
        let within_limit = secs <= limit;
        let timed_out = self.cfg.timeout.is_some_and(|t| r.elapsed >= t);
        if within_limit {
            let tiny = secs <= TINY_FINAL_PASS.min(limit / 10.0) || pages <= SMALL_FINAL_PAGES;
            // The first time the rest fits, one refining pass is always worth a try.
            let shrinking = self
                .refine_prev
                .is_none_or(|p| (pages as f64) < REFINE_SHRINK * p as f64);
            let out_of_passes = self.refining_passes >= MAX_REFINING_PASSES
                || self.passes + 2 >= self.cfg.max_iterations
                || timed_out;
            if tiny || !shrinking || out_of_passes {
                let reason = format!(
                    "converged: {pages} dirty pages take about {:.1} ms to send",
                    secs * 1e3
                );
                let d = Decision::SwitchOver {
                    reason,
                    forced: false,
                };
                return self.terminal(d, expected_downtime);
            }
            self.refining_passes += 1;
            self.refine_prev = Some(pages);
        }
        if timed_out || self.passes + 1 >= self.cfg.max_iterations {
            let u = format!(
                "not converged after {:.1} s ({} passes): {} dirty pages need {:.0} ms at {:.0} MB/s, limit {} ms",
                r.elapsed.as_secs_f64(),
                self.passes + 1,
                pages,
                secs * 1e3,
                bw / 1e6,
                self.cfg.downtime_limit.as_millis()
            );
            let d = match self.cfg.on_timeout {
                TimeoutAction::Abort => Decision::Abort {
                    reason: format!("{u}; the guest keeps running on the source"),
                },
                TimeoutAction::ForceSwitchover => Decision::SwitchOver {
                    reason: format!("{u}; switching over anyway"),
                    forced: true,
                },
            };
            return self.terminal(d, expected_downtime);
        }
        let actions = self.trigger(r, within_limit);
        self.passes += 1;
        Step {
            decision: Decision::NextPass,
            actions,
            expected_downtime,
        }
    }

    /// Two high collects in a row fire a throttle event.
    fn trigger(&mut self, r: &PassReport, within_limit: bool) -> Vec<Action> {
        let high = (r.dirty_pages * PAGE_SIZE) as f64 > 0.5 * r.last_pass_bytes as f64;
        self.streak = if !within_limit && high {
            self.streak + 1
        } else {
            0
        };
        if self.streak < 2 {
            return Vec::new();
        }
        self.streak = 0;
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
            self.throttle_percent = if self.throttle_percent == 0 {
                CPU_THROTTLE_INITIAL
            } else {
                (self.throttle_percent + CPU_THROTTLE_INCREMENT).min(MAX_CPU_THROTTLE)
            };
            self.events += 1;
            return vec![Action::SetCpuThrottle {
                percent: self.throttle_percent,
            }];
        }
        Vec::new()
    }

    /// Limits the vCPUs dirtying at least the mean (once limited, a vCPU stays limited) so
    /// that the guest dirties at most half the bandwidth; later events halve the quota.
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
        let budget = (0.5 * r.bandwidth_bytes_per_s - free_bytes).max(0.0);
        let mut quota = (budget / self.limited.len().max(1) as f64).max(256.0 * 1024.0) as u64;
        if let Some(prev) = self.auto_quota {
            quota = quota.min(prev / 2).max(64 * 1024);
        }
        quota
    }
}
