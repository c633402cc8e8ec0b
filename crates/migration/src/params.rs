//! Migration parameters and capabilities, shaped like QEMU's QMP (`qapi/migration.json`):
//! the same names, units, defaults, ranges and error texts wherever QEMU has the concept, and
//! ringvisor's own settings under the `x-ringvisor-` prefix.
//!
//! - [`MigrationParameters`]: every parameter with a concrete value (QEMU's
//!   `MigrationParameters`, what `query-migrate-parameters` answers).
//! - [`MigrateSetParameters`]: the same fields, each optional (QEMU's
//!   `MigrateSetParameters`, what `migrate-set-parameters` carries).
//!   [`MigrateSetParameters::apply`] applies the given fields to a copy, checks the whole
//!   result and only then commits it, so a rejected request changes nothing (QEMU's
//!   `migrate_params_test_apply` + `migrate_params_check` + `migrate_params_apply`).
//! - [`MigrationCapabilities`] / [`MigrationCapabilityStatus`]: `auto-converge` and
//!   `dirty-limit` (`migrate-set-capabilities` takes a list of `{capability, state}`).
//!
//! Every struct denies unknown fields, so a misspelt name is an error, never silently
//! ignored. Integers are unsigned, so a negative or fractional value is a type error from the
//! deserializer, before any range check.
//!
//! # The dirty limit
//!
//! QEMU's `dirty-limit` capability (8.1) turns the dirty limit on; what it does here is
//! chosen by `x-ringvisor-dirty-limit`:
//!
//! | `dirty-limit` capability | `x-ringvisor-dirty-limit` | mode ([`DirtyLimitMode`](crate::convergence::DirtyLimitMode)) |
//! |---|---|---|
//! | off | any (ignored) | `Off`: no dirty limit |
//! | on | `0` (default) | `Auto`: when pre-copy stops converging, the fastest vCPUs get a quota derived from the bandwidth |
//! | on | `N` > 0 | `Fixed(N)`: every vCPU is held to `N` bytes/s from the start of the migration |
//!
//! The dirty limit needs the dirty ring (per-vCPU dirty counts); QEMU refuses the capability
//! without it too. `vcpu-dirty-limit` and `x-vcpu-dirty-limit-period` are QEMU's parameters
//! with QEMU's ranges and defaults, kept so a QMP client can set and read them; ringvisor's
//! `Auto` mode computes its quota from the measured bandwidth instead of using
//! `vcpu-dirty-limit` (see [`convergence`](crate::convergence)).

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// QEMU's default `downtime-limit` (`DEFAULT_MIGRATE_SET_DOWNTIME`), ms.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's largest `downtime-limit` (`MAX_MIGRATE_DOWNTIME`: 2000 s), ms.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;
/// QEMU's default `max-bandwidth` (`MAX_THROTTLE`, 128 MiB/s). ringvisor's default is 0
/// (unlimited) instead: its usual link is loopback, where a cap only slows the migration.
pub const QEMU_DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// QEMU's default `throttle-trigger-threshold`, percent.
pub const DEFAULT_THROTTLE_TRIGGER_THRESHOLD: u8 = 50;
/// QEMU's default `cpu-throttle-initial`, percent.
pub const DEFAULT_CPU_THROTTLE_INITIAL: u8 = 20;
/// QEMU's default `cpu-throttle-increment`, percent.
pub const DEFAULT_CPU_THROTTLE_INCREMENT: u8 = 10;
/// QEMU's default (and largest) `max-cpu-throttle`, percent.
pub const DEFAULT_MAX_CPU_THROTTLE: u8 = 99;
/// QEMU's default `x-vcpu-dirty-limit-period`, ms.
pub const DEFAULT_VCPU_DIRTY_LIMIT_PERIOD_MS: u64 = 1000;
/// QEMU's largest `x-vcpu-dirty-limit-period`, ms.
pub const MAX_VCPU_DIRTY_LIMIT_PERIOD_MS: u64 = 1000;
/// QEMU's default `vcpu-dirty-limit`, MB/s.
pub const DEFAULT_VCPU_DIRTY_LIMIT: u64 = 1;

/// A parameter or capability that is out of range, unknown or in conflict. The texts follow
/// QEMU's (`Parameter '%s' expects %s`), with QEMU's parameter spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A value outside its range.
    #[error("Parameter '{param}' expects {expects}")]
    OutOfRange {
        /// The parameter, as QEMU's message names it.
        param: &'static str,
        /// What it accepts.
        expects: &'static str,
    },
    /// An enumerated parameter got a value it does not know.
    #[error("Parameter '{param}' does not accept value '{value}'")]
    UnknownValue {
        /// The parameter.
        param: &'static str,
        /// The value given.
        value: String,
    },
    /// QEMU's `migrate_caps_check`: the two throttling algorithms exclude each other.
    #[error("dirty-limit conflicts with auto-converge: enable at most one of them")]
    CapabilityConflict,
    /// The dirty limit needs per-vCPU dirty counts, which only the dirty ring gives.
    #[error(
        "dirty-limit requires the dirty ring tracker (the {tracker} tracker has no per-vCPU \
         dirty counts; use auto-converge instead)"
    )]
    DirtyLimitNeedsRing {
        /// The tracker in use.
        tracker: &'static str,
    },
}

/// What happens when `x-ringvisor-timeout` passes before pre-copy converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnTimeout {
    /// Abort the migration; the guest keeps running on the source (the default).
    #[default]
    Abort,
    /// Switch over anyway, accepting a downtime above `downtime-limit`.
    Force,
}

impl OnTimeout {
    /// The spelling in QMP and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            OnTimeout::Abort => "abort",
            OnTimeout::Force => "force",
        }
    }
}

impl FromStr for OnTimeout {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, ParamError> {
        match s {
            "abort" => Ok(OnTimeout::Abort),
            "force" => Ok(OnTimeout::Force),
            _ => Err(ParamError::UnknownValue {
                param: "x-ringvisor-on-timeout",
                value: s.to_owned(),
            }),
        }
    }
}

/// Every migration parameter with its value (QEMU's `MigrationParameters`). Deserializing
/// fills missing fields with the defaults and rejects unknown ones; call
/// [`validate`](Self::validate) on a value that did not come from
/// [`MigrateSetParameters::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct MigrationParameters {
    /// `downtime-limit`: the longest pause allowed at switchover, ms (0..=2 000 000;
    /// default 300).
    pub downtime_limit: u64,
    /// `max-bandwidth`: cap on the pre-copy passes, bytes/s; 0 = unlimited. ringvisor's
    /// default is 0, QEMU's is 128 MiB/s ([`QEMU_DEFAULT_MAX_BANDWIDTH`]).
    pub max_bandwidth: u64,
    /// `throttle-trigger-threshold`: a period is "high" when the bytes dirtied in it exceed
    /// this percentage of the bytes sent in it (1..=100; default 50).
    pub throttle_trigger_threshold: u8,
    /// `cpu-throttle-initial`: auto-converge's first CPU throttle, percent (1..=99;
    /// default 20).
    pub cpu_throttle_initial: u8,
    /// `cpu-throttle-increment`: auto-converge's step, percent (1..=99; default 10).
    pub cpu_throttle_increment: u8,
    /// `max-cpu-throttle`: auto-converge's ceiling, percent (`cpu-throttle-initial`..=99;
    /// default 99).
    pub max_cpu_throttle: u8,
    /// `x-vcpu-dirty-limit-period`: QEMU's dirty-rate sampling period for the dirty limit,
    /// ms (1..=1000; default 1000).
    pub x_vcpu_dirty_limit_period: u64,
    /// `vcpu-dirty-limit`: QEMU's per-vCPU dirty quota under the `dirty-limit` capability,
    /// MB/s (>= 1; default 1). Carried for QMP compatibility; ringvisor's auto mode derives
    /// its quota from the bandwidth (module docs).
    pub vcpu_dirty_limit: u64,
    /// `x-ringvisor-timeout`: give up converging after this long, ms; 0 = never (default).
    pub x_ringvisor_timeout: u64,
    /// `x-ringvisor-on-timeout`: what the timeout (or the pass limit) does: `abort`
    /// (default; the guest keeps running on the source) or `force` (switch over anyway).
    pub x_ringvisor_on_timeout: OnTimeout,
    /// `x-ringvisor-verify`: compare a digest of the source's paused memory with the
    /// destination's (default true).
    pub x_ringvisor_verify: bool,
    /// `x-ringvisor-verify-before-commit`: compare before the commit (a mismatch aborts and
    /// the source keeps the guest, at the price of the digest time inside the downtime)
    /// instead of right after it (default false).
    pub x_ringvisor_verify_before_commit: bool,
    /// `x-ringvisor-dirty-limit`: with the `dirty-limit` capability, the fixed per-vCPU
    /// dirty limit in bytes/s from the start of the migration; 0 (default) = automatic
    /// (module docs). Ignored without the capability.
    pub x_ringvisor_dirty_limit: u64,
    /// `tls-creds`: run the migration stream over TLS 1.3 with the credentials in this
    /// directory (QEMU: the id of a `tls-creds-x509` object; here its `dir=` itself);
    /// `""` (default) = plain TCP.
    pub tls_creds: String,
    /// `tls-hostname`: the name the source verifies the destination's certificate for;
    /// `""` (default) = the host of the migration URI.
    pub tls_hostname: String,
    /// `tls-authz`: the peer certificate identities (subject CN or DNS name) allowed to
    /// connect, comma-separated (QEMU: the id of an authz object); `""` (default) = any
    /// certificate from the CA.
    pub tls_authz: String,
}

impl Default for MigrationParameters {
    fn default() -> Self {
        MigrationParameters {
            downtime_limit: DEFAULT_DOWNTIME_LIMIT_MS,
            max_bandwidth: 0,
            throttle_trigger_threshold: DEFAULT_THROTTLE_TRIGGER_THRESHOLD,
            cpu_throttle_initial: DEFAULT_CPU_THROTTLE_INITIAL,
            cpu_throttle_increment: DEFAULT_CPU_THROTTLE_INCREMENT,
            max_cpu_throttle: DEFAULT_MAX_CPU_THROTTLE,
            x_vcpu_dirty_limit_period: DEFAULT_VCPU_DIRTY_LIMIT_PERIOD_MS,
            vcpu_dirty_limit: DEFAULT_VCPU_DIRTY_LIMIT,
            x_ringvisor_timeout: 0,
            x_ringvisor_on_timeout: OnTimeout::Abort,
            x_ringvisor_verify: true,
            x_ringvisor_verify_before_commit: false,
            x_ringvisor_dirty_limit: 0,
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_authz: String::new(),
        }
    }
}

fn out_of_range(param: &'static str, expects: &'static str) -> ParamError {
    ParamError::OutOfRange { param, expects }
}

impl MigrationParameters {
    /// Checks every range, in QEMU's order and with QEMU's texts (`migrate_params_check`).
    pub fn validate(&self) -> Result<(), ParamError> {
        if !(1..=100).contains(&self.throttle_trigger_threshold) {
            return Err(out_of_range(
                "throttle_trigger_threshold",
                "an integer in the range of 1 to 100",
            ));
        }
        if !(1..=99).contains(&self.cpu_throttle_initial) {
            return Err(out_of_range(
                "cpu_throttle_initial",
                "an integer in the range of 1 to 99",
            ));
        }
        if !(1..=99).contains(&self.cpu_throttle_increment) {
            return Err(out_of_range(
                "cpu_throttle_increment",
                "an integer in the range of 1 to 99",
            ));
        }
        if self.downtime_limit > MAX_DOWNTIME_LIMIT_MS {
            return Err(out_of_range(
                "downtime_limit",
                "an integer in the range of 0 to 2000000 ms",
            ));
        }
        if self.max_cpu_throttle < self.cpu_throttle_initial || self.max_cpu_throttle > 99 {
            return Err(out_of_range(
                "max_cpu_throttle",
                "an integer in the range of cpu_throttle_initial to 99",
            ));
        }
        if !(1..=MAX_VCPU_DIRTY_LIMIT_PERIOD_MS).contains(&self.x_vcpu_dirty_limit_period) {
            return Err(out_of_range(
                "x-vcpu-dirty-limit-period",
                "a value between 1 and 1000",
            ));
        }
        if self.vcpu_dirty_limit < 1 {
            return Err(out_of_range(
                "vcpu_dirty_limit",
                "an integer of at least 1 MB/s",
            ));
        }
        Ok(())
    }

    /// `downtime-limit` as a duration.
    pub fn downtime_limit(&self) -> Duration {
        Duration::from_millis(self.downtime_limit)
    }

    /// `x-ringvisor-timeout` as a duration; `None` for 0 (never).
    pub fn timeout(&self) -> Option<Duration> {
        (self.x_ringvisor_timeout > 0).then(|| Duration::from_millis(self.x_ringvisor_timeout))
    }

    /// `max-bandwidth`; `None` for 0 (unlimited).
    pub fn max_bandwidth(&self) -> Option<u64> {
        (self.max_bandwidth > 0).then_some(self.max_bandwidth)
    }

    /// `tls-authz` as a list: the comma-separated names, trimmed, empty ones dropped.
    pub fn tls_authz_list(&self) -> Vec<String> {
        self.tls_authz
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The set form with every field present (what `query-migrate-parameters` answers,
    /// and a request that restores all of these values).
    pub fn to_set(&self) -> MigrateSetParameters {
        MigrateSetParameters {
            downtime_limit: Some(self.downtime_limit),
            max_bandwidth: Some(self.max_bandwidth),
            throttle_trigger_threshold: Some(self.throttle_trigger_threshold),
            cpu_throttle_initial: Some(self.cpu_throttle_initial),
            cpu_throttle_increment: Some(self.cpu_throttle_increment),
            max_cpu_throttle: Some(self.max_cpu_throttle),
            x_vcpu_dirty_limit_period: Some(self.x_vcpu_dirty_limit_period),
            vcpu_dirty_limit: Some(self.vcpu_dirty_limit),
            x_ringvisor_timeout: Some(self.x_ringvisor_timeout),
            x_ringvisor_on_timeout: Some(self.x_ringvisor_on_timeout),
            x_ringvisor_verify: Some(self.x_ringvisor_verify),
            x_ringvisor_verify_before_commit: Some(self.x_ringvisor_verify_before_commit),
            x_ringvisor_dirty_limit: Some(self.x_ringvisor_dirty_limit),
            tls_creds: Some(self.tls_creds.clone()),
            tls_hostname: Some(self.tls_hostname.clone()),
            tls_authz: Some(self.tls_authz.clone()),
        }
    }
}

/// `migrate-set-parameters`: the parameters to change, each optional (QEMU's
/// `MigrateSetParameters`). Units and ranges as in [`MigrationParameters`].
///
/// ```
/// use migration::params::{MigrateSetParameters, MigrationParameters};
/// let mut p = MigrationParameters::default();
/// let set = MigrateSetParameters { downtime_limit: Some(50), ..Default::default() };
/// set.apply(&mut p)?;
/// assert_eq!(p.downtime_limit, 50);
/// // One bad field and nothing changes.
/// let bad = MigrateSetParameters {
///     downtime_limit: Some(10),
///     cpu_throttle_initial: Some(0),
///     ..Default::default()
/// };
/// assert!(bad.apply(&mut p).is_err());
/// assert_eq!(p.downtime_limit, 50);
/// # Ok::<(), migration::params::ParamError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MigrateSetParameters {
    /// `downtime-limit`, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// `max-bandwidth`, bytes/s (0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// `throttle-trigger-threshold`, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u8>,
    /// `cpu-throttle-initial`, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    /// `cpu-throttle-increment`, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
    /// `max-cpu-throttle`, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u8>,
    /// `x-vcpu-dirty-limit-period`, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_vcpu_dirty_limit_period: Option<u64>,
    /// `vcpu-dirty-limit`, MB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_limit: Option<u64>,
    /// `x-ringvisor-timeout`, ms (0 = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_ringvisor_timeout: Option<u64>,
    /// `x-ringvisor-on-timeout`: `abort` or `force`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_ringvisor_on_timeout: Option<OnTimeout>,
    /// `x-ringvisor-verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_ringvisor_verify: Option<bool>,
    /// `x-ringvisor-verify-before-commit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_ringvisor_verify_before_commit: Option<bool>,
    /// `x-ringvisor-dirty-limit`, bytes/s per vCPU (0 = automatic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_ringvisor_dirty_limit: Option<u64>,
    /// `tls-creds`: a credentials directory, `""` = plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// `tls-hostname`, `""` = the URI's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// `tls-authz`: comma-separated identities, `""` = any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}

impl MigrateSetParameters {
    /// Applies the given fields to `params`: first to a copy, which is checked as a whole
    /// ([`MigrationParameters::validate`]); `params` changes only if every field is valid.
    pub fn apply(&self, params: &mut MigrationParameters) -> Result<(), ParamError> {
        let mut next = params.clone();
        self.overlay(&mut next);
        next.validate()?;
        *params = next;
        Ok(())
    }

    /// True if no field is given.
    pub fn is_empty(&self) -> bool {
        *self == MigrateSetParameters::default()
    }

    fn overlay(&self, p: &mut MigrationParameters) {
        fn set<T: Copy>(dst: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *dst = v;
            }
        }
        set(&mut p.downtime_limit, self.downtime_limit);
        set(&mut p.max_bandwidth, self.max_bandwidth);
        set(
            &mut p.throttle_trigger_threshold,
            self.throttle_trigger_threshold,
        );
        set(&mut p.cpu_throttle_initial, self.cpu_throttle_initial);
        set(&mut p.cpu_throttle_increment, self.cpu_throttle_increment);
        set(&mut p.max_cpu_throttle, self.max_cpu_throttle);
        set(
            &mut p.x_vcpu_dirty_limit_period,
            self.x_vcpu_dirty_limit_period,
        );
        set(&mut p.vcpu_dirty_limit, self.vcpu_dirty_limit);
        set(&mut p.x_ringvisor_timeout, self.x_ringvisor_timeout);
        set(&mut p.x_ringvisor_on_timeout, self.x_ringvisor_on_timeout);
        set(&mut p.x_ringvisor_verify, self.x_ringvisor_verify);
        set(
            &mut p.x_ringvisor_verify_before_commit,
            self.x_ringvisor_verify_before_commit,
        );
        set(&mut p.x_ringvisor_dirty_limit, self.x_ringvisor_dirty_limit);
        for (dst, v) in [
            (&mut p.tls_creds, &self.tls_creds),
            (&mut p.tls_hostname, &self.tls_hostname),
            (&mut p.tls_authz, &self.tls_authz),
        ] {
            if let Some(v) = v {
                dst.clone_from(v);
            }
        }
    }
}

/// A migration capability (QEMU's `MigrationCapability`; only the ones ringvisor has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    /// `auto-converge`: throttle the guest's CPUs when pre-copy does not converge.
    AutoConverge,
    /// `dirty-limit`: limit the vCPUs' dirty rate (dirty ring only); see the module docs.
    DirtyLimit,
}

impl MigrationCapability {
    /// Every capability, in QMP order.
    pub const ALL: [MigrationCapability; 2] = [
        MigrationCapability::AutoConverge,
        MigrationCapability::DirtyLimit,
    ];

    /// The QMP name.
    pub fn name(self) -> &'static str {
        match self {
            MigrationCapability::AutoConverge => "auto-converge",
            MigrationCapability::DirtyLimit => "dirty-limit",
        }
    }
}

impl FromStr for MigrationCapability {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, ParamError> {
        MigrationCapability::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| ParamError::UnknownValue {
                param: "capability",
                value: s.to_owned(),
            })
    }
}

/// One entry of `migrate-set-capabilities` / `query-migrate-capabilities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// On or off.
    pub state: bool,
}

/// The capabilities' states (all off by default, as in QEMU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct MigrationCapabilities {
    /// `auto-converge`.
    pub auto_converge: bool,
    /// `dirty-limit`.
    pub dirty_limit: bool,
}

impl MigrationCapabilities {
    /// The state of `cap`.
    pub fn get(&self, cap: MigrationCapability) -> bool {
        match cap {
            MigrationCapability::AutoConverge => self.auto_converge,
            MigrationCapability::DirtyLimit => self.dirty_limit,
        }
    }

    fn set(&mut self, cap: MigrationCapability, state: bool) {
        match cap {
            MigrationCapability::AutoConverge => self.auto_converge = state,
            MigrationCapability::DirtyLimit => self.dirty_limit = state,
        }
    }

    /// QEMU's `migrate_caps_check`: `dirty-limit` and `auto-converge` exclude each other.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.dirty_limit && self.auto_converge {
            return Err(ParamError::CapabilityConflict);
        }
        Ok(())
    }

    /// `migrate-set-capabilities`: applies `list` to a copy, checks it, then commits it.
    pub fn apply(&mut self, list: &[MigrationCapabilityStatus]) -> Result<(), ParamError> {
        let mut next = *self;
        for s in list {
            next.set(s.capability, s.state);
        }
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// `query-migrate-capabilities`: every capability with its state.
    pub fn status(&self) -> Vec<MigrationCapabilityStatus> {
        MigrationCapability::ALL
            .into_iter()
            .map(|capability| MigrationCapabilityStatus {
                capability,
                state: self.get(capability),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_json(s: &str) -> Result<MigrateSetParameters, serde_json::Error> {
        serde_json::from_str(s)
    }

    fn apply_json(p: &mut MigrationParameters, s: &str) -> Result<(), String> {
        set_json(s)
            .map_err(|e| e.to_string())?
            .apply(p)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn tls_parameters_are_strings_empty_by_default_and_authz_splits_on_commas() {
        let mut p = MigrationParameters::default();
        assert_eq!((p.tls_creds.as_str(), p.tls_hostname.as_str()), ("", ""));
        assert!(p.tls_authz_list().is_empty());
        apply_json(
            &mut p,
            r#"{"tls-creds": "/etc/rv", "tls-hostname": "dst", "tls-authz": "a, b,,"}"#,
        )
        .unwrap();
        assert_eq!(p.tls_creds, "/etc/rv");
        assert_eq!(p.tls_hostname, "dst");
        assert_eq!(p.tls_authz_list(), ["a", "b"]);
        let j = serde_json::to_value(p.to_set()).unwrap();
        assert_eq!(j["tls-creds"], "/etc/rv");
        apply_json(&mut p, r#"{"tls-creds": ""}"#).unwrap();
        assert_eq!(p.tls_creds, "", "an empty string turns TLS off, as in QEMU");
        assert!(apply_json(&mut p, r#"{"tls-creds": 1}"#).is_err());
    }

    #[test]
    fn defaults_are_qemus_where_qemu_has_the_parameter() {
        let p = MigrationParameters::default();
        assert_eq!(p.downtime_limit, 300);
        assert_eq!(p.max_bandwidth, 0);
        assert_eq!(p.max_bandwidth(), None);
        assert_eq!(QEMU_DEFAULT_MAX_BANDWIDTH, 134_217_728);
        assert_eq!(p.throttle_trigger_threshold, 50);
        assert_eq!(p.cpu_throttle_initial, 20);
        assert_eq!(p.cpu_throttle_increment, 10);
        assert_eq!(p.max_cpu_throttle, 99);
        assert_eq!(p.x_vcpu_dirty_limit_period, 1000);
        assert_eq!(p.vcpu_dirty_limit, 1);
        assert_eq!(p.timeout(), None);
        assert_eq!(p.x_ringvisor_on_timeout, OnTimeout::Abort);
        assert!(p.x_ringvisor_verify);
        assert!(!p.x_ringvisor_verify_before_commit);
        assert_eq!(p.x_ringvisor_dirty_limit, 0);
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(MigrationCapabilities::default().status().len(), 2);
    }

    #[test]
    fn json_uses_qemus_kebab_case_names_and_round_trips() {
        let p = MigrationParameters::default();
        let v = serde_json::to_value(&p).unwrap();
        for name in [
            "downtime-limit",
            "max-bandwidth",
            "throttle-trigger-threshold",
            "cpu-throttle-initial",
            "cpu-throttle-increment",
            "max-cpu-throttle",
            "x-vcpu-dirty-limit-period",
            "vcpu-dirty-limit",
            "x-ringvisor-timeout",
            "x-ringvisor-on-timeout",
            "x-ringvisor-verify",
            "x-ringvisor-verify-before-commit",
            "x-ringvisor-dirty-limit",
            "tls-creds",
            "tls-hostname",
            "tls-authz",
        ] {
            assert!(v.get(name).is_some(), "{name} missing from {v}");
        }
        assert_eq!(v.as_object().unwrap().len(), 16);
        assert_eq!(v["x-ringvisor-on-timeout"], "abort");
        let back: MigrationParameters = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
        // The full set form restores every value.
        let mut q = MigrationParameters {
            downtime_limit: 1,
            x_ringvisor_verify: false,
            ..p.clone()
        };
        p.to_set().apply(&mut q).unwrap();
        assert_eq!(q, p);
        // A partial set form serializes only its fields.
        let s = MigrateSetParameters {
            max_bandwidth: Some(5),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"max-bandwidth":5}"#);
    }

    #[test]
    fn set_parameters_changes_only_the_given_fields() {
        let mut p = MigrationParameters::default();
        apply_json(
            &mut p,
            r#"{"downtime-limit": 100, "x-ringvisor-on-timeout": "force", "x-ringvisor-timeout": 30000}"#,
        )
        .unwrap();
        assert_eq!(p.downtime_limit, 100);
        assert_eq!(p.downtime_limit(), Duration::from_millis(100));
        assert_eq!(p.x_ringvisor_on_timeout, OnTimeout::Force);
        assert_eq!(p.timeout(), Some(Duration::from_secs(30)));
        assert_eq!(p.max_cpu_throttle, 99);
        let empty = set_json("{}").unwrap();
        assert!(empty.is_empty());
        let before = p.clone();
        empty.apply(&mut p).unwrap();
        assert_eq!(p, before);
    }

    #[test]
    fn every_range_is_checked_with_qemus_message() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"downtime-limit": 2000001}"#,
                "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms",
            ),
            (
                r#"{"throttle-trigger-threshold": 0}"#,
                "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100",
            ),
            (
                r#"{"throttle-trigger-threshold": 101}"#,
                "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100",
            ),
            (
                r#"{"cpu-throttle-initial": 0}"#,
                "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99",
            ),
            (
                r#"{"cpu-throttle-initial": 100}"#,
                "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99",
            ),
            (
                r#"{"cpu-throttle-increment": 0}"#,
                "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99",
            ),
            (
                r#"{"cpu-throttle-increment": 100}"#,
                "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99",
            ),
            (
                r#"{"max-cpu-throttle": 100}"#,
                "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99",
            ),
            (
                r#"{"max-cpu-throttle": 19}"#,
                "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99",
            ),
            (
                r#"{"cpu-throttle-initial": 50, "max-cpu-throttle": 40}"#,
                "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99",
            ),
            (
                r#"{"x-vcpu-dirty-limit-period": 0}"#,
                "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000",
            ),
            (
                r#"{"x-vcpu-dirty-limit-period": 1001}"#,
                "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000",
            ),
            (
                r#"{"vcpu-dirty-limit": 0}"#,
                "Parameter 'vcpu_dirty_limit' expects an integer of at least 1 MB/s",
            ),
        ];
        for (json, msg) in cases {
            let mut p = MigrationParameters::default();
            assert_eq!(apply_json(&mut p, json), Err(msg.to_string()), "{json}");
            assert_eq!(
                p,
                MigrationParameters::default(),
                "{json} changed something"
            );
        }
        // The edges are accepted.
        let mut p = MigrationParameters::default();
        apply_json(
            &mut p,
            r#"{"downtime-limit": 0, "throttle-trigger-threshold": 100, "cpu-throttle-initial": 99,
                "cpu-throttle-increment": 99, "max-cpu-throttle": 99,
                "x-vcpu-dirty-limit-period": 1, "vcpu-dirty-limit": 1}"#,
        )
        .unwrap();
        apply_json(&mut p, r#"{"downtime-limit": 2000000}"#).unwrap();
        assert_eq!(p.downtime_limit, MAX_DOWNTIME_LIMIT_MS);
    }

    #[test]
    fn a_request_with_one_bad_field_changes_nothing() {
        let mut p = MigrationParameters::default();
        let r = apply_json(
            &mut p,
            r#"{"downtime-limit": 5, "max-bandwidth": 1000, "cpu-throttle-increment": 0}"#,
        );
        assert!(r.is_err());
        assert_eq!(p, MigrationParameters::default());
    }

    #[test]
    fn unknown_names_and_wrong_types_are_rejected_by_the_deserializer() {
        for bad in [
            r#"{"downtime_limit": 100}"#,   // QEMU's C spelling is not the QMP name
            r#"{"downtime-limt": 100}"#,    // misspelt
            r#"{"x-ringvisor-bogus": 1}"#,  // unknown ringvisor extension
            r#"{"downtime-limit": -1}"#,    // negative
            r#"{"downtime-limit": 1.5}"#,   // fractional
            r#"{"downtime-limit": "300"}"#, // string
            r#"{"cpu-throttle-initial": 256}"#, // does not fit the type
            r#"{"x-ringvisor-verify": 1}"#, // not a bool
            r#"{"x-ringvisor-on-timeout": "cancel"}"#, // unknown value
            r#""downtime-limit""#,
        ] {
            assert!(set_json(bad).is_err(), "{bad} was accepted");
        }
        assert!(serde_json::from_str::<MigrationParameters>(r#"{"bogus": 1}"#).is_err());
        // Missing fields of the full form take the defaults.
        let p: MigrationParameters = serde_json::from_str(r#"{"downtime-limit": 7}"#).unwrap();
        assert_eq!(p.downtime_limit, 7);
        assert_eq!(p.cpu_throttle_initial, 20);
    }

    #[test]
    fn on_timeout_parses_its_two_spellings_only() {
        assert_eq!("abort".parse(), Ok(OnTimeout::Abort));
        assert_eq!("force".parse(), Ok(OnTimeout::Force));
        assert_eq!(
            "ignore".parse::<OnTimeout>().unwrap_err().to_string(),
            "Parameter 'x-ringvisor-on-timeout' does not accept value 'ignore'"
        );
        assert_eq!(OnTimeout::Force.name(), "force");
    }

    #[test]
    fn capabilities_use_qemu_names_reject_unknown_ones_and_conflicts() {
        let list: Vec<MigrationCapabilityStatus> = serde_json::from_str(
            r#"[{"capability": "auto-converge", "state": true}, {"capability": "dirty-limit", "state": false}]"#,
        )
        .unwrap();
        let mut caps = MigrationCapabilities::default();
        caps.apply(&list).unwrap();
        assert!(caps.auto_converge && !caps.dirty_limit);
        assert!(caps.get(MigrationCapability::AutoConverge));
        // Unknown capability names fail to parse, from JSON and from text.
        assert!(serde_json::from_str::<MigrationCapabilityStatus>(
            r#"{"capability": "xbzrle", "state": true}"#
        )
        .is_err());
        assert!(serde_json::from_str::<MigrationCapabilityStatus>(
            r#"{"capability": "auto-converge", "state": true, "extra": 1}"#
        )
        .is_err());
        assert_eq!(
            "postcopy-ram"
                .parse::<MigrationCapability>()
                .unwrap_err()
                .to_string(),
            "Parameter 'capability' does not accept value 'postcopy-ram'"
        );
        assert_eq!("dirty-limit".parse(), Ok(MigrationCapability::DirtyLimit));
        // Both throttles at once: rejected, nothing changes.
        let on = MigrationCapabilityStatus {
            capability: MigrationCapability::DirtyLimit,
            state: true,
        };
        assert_eq!(caps.apply(&[on]), Err(ParamError::CapabilityConflict));
        assert!(caps.auto_converge && !caps.dirty_limit);
        // Switching one off and the other on in the same request is fine.
        let off = MigrationCapabilityStatus {
            capability: MigrationCapability::AutoConverge,
            state: false,
        };
        caps.apply(&[off, on]).unwrap();
        assert!(!caps.auto_converge && caps.dirty_limit);
        let status = serde_json::to_string(&caps.status()).unwrap();
        assert_eq!(
            status,
            r#"[{"capability":"auto-converge","state":false},{"capability":"dirty-limit","state":true}]"#
        );
        let as_struct: MigrationCapabilities =
            serde_json::from_str(r#"{"dirty-limit": true}"#).unwrap();
        assert_eq!(as_struct, caps);
        assert!(serde_json::from_str::<MigrationCapabilities>(r#"{"xbzrle": true}"#).is_err());
    }
}
