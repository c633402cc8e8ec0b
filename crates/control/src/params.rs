//! QMP arguments to `migration::params` values (with QEMU's argument errors), the check of a
//! configuration against the tracker, and the engine's options from the parameters.

use migration::params::{
    MigrateSetParameters, MigrationCapabilities, MigrationCapabilityStatus, MigrationParameters,
    OnTimeout, ParamError,
};
use migration_engine::{DirtyLimitMode, SourceOptions, TimeoutAction};
use qmp::{Args, CommandError};

use kvm_dirty::TrackerMode;

use crate::error::ControlError;

/// Every `migrate-set-parameters` argument name.
pub const PARAMETER_NAMES: [&str; 16] = [
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
];

/// QEMU's `StrOrNull` parameters (`tls-creds`, `tls-hostname`, `tls-authz`): a string, or
/// `null`, which resets to `""` (off) as in QEMU.
fn str_or_null(args: &Args, name: &str) -> Result<Option<String>, CommandError> {
    if args.get(name).is_some_and(serde_json::Value::is_null) {
        return Ok(Some(String::new()));
    }
    Ok(args.optional_str(name)?.map(str::to_string))
}

fn optional_u8(args: &Args, name: &str) -> Result<Option<u8>, CommandError> {
    match args.optional_u64(name)? {
        None => Ok(None),
        Some(v) => u8::try_from(v)
            .map(Some)
            .map_err(|_| CommandError::generic(format!("Parameter '{name}' expects uint8"))),
    }
}

/// `migrate-set-parameters` arguments, read with QEMU's type errors (`Parameter 'x' expects
/// uint64`, `Invalid parameter type for 'x', expected: boolean`, `Parameter 'x' is
/// unexpected`). Ranges are checked later, by [`MigrateSetParameters::apply`].
pub fn set_parameters_from_args(args: &Args) -> Result<MigrateSetParameters, CommandError> {
    let on_timeout = match args.optional_str("x-ringvisor-on-timeout")? {
        None => None,
        Some(s) => Some(
            s.parse::<OnTimeout>()
                .map_err(|e| CommandError::generic(e.to_string()))?,
        ),
    };
    let set = MigrateSetParameters {
        downtime_limit: args.optional_u64("downtime-limit")?,
        max_bandwidth: args.optional_u64("max-bandwidth")?,
        throttle_trigger_threshold: optional_u8(args, "throttle-trigger-threshold")?,
        cpu_throttle_initial: optional_u8(args, "cpu-throttle-initial")?,
        cpu_throttle_increment: optional_u8(args, "cpu-throttle-increment")?,
        max_cpu_throttle: optional_u8(args, "max-cpu-throttle")?,
        x_vcpu_dirty_limit_period: args.optional_u64("x-vcpu-dirty-limit-period")?,
        vcpu_dirty_limit: args.optional_u64("vcpu-dirty-limit")?,
        x_ringvisor_timeout: args.optional_u64("x-ringvisor-timeout")?,
        x_ringvisor_on_timeout: on_timeout,
        x_ringvisor_verify: args.optional_bool("x-ringvisor-verify")?,
        x_ringvisor_verify_before_commit: args.optional_bool("x-ringvisor-verify-before-commit")?,
        x_ringvisor_dirty_limit: args.optional_u64("x-ringvisor-dirty-limit")?,
        tls_creds: str_or_null(args, "tls-creds")?,
        tls_hostname: str_or_null(args, "tls-hostname")?,
        tls_authz: str_or_null(args, "tls-authz")?,
    };
    args.deny_unknown(&PARAMETER_NAMES)?;
    Ok(set)
}

/// `migrate-set-capabilities` arguments: `{"capabilities": [{"capability", "state"}]}`.
pub fn capabilities_from_args(args: &Args) -> Result<Vec<MigrationCapabilityStatus>, CommandError> {
    let list = args
        .optional_array("capabilities")?
        .ok_or_else(|| CommandError::generic("Parameter 'capabilities' is missing"))?;
    args.deny_unknown(&["capabilities"])?;
    let mut out = Vec::with_capacity(list.len().min(16));
    for (i, item) in list.iter().enumerate() {
        let Some(obj) = item.as_object() else {
            return Err(CommandError::generic(format!(
                "Invalid parameter type for 'capabilities[{i}]', expected: object"
            )));
        };
        let entry = Args::new(obj.clone());
        let name = entry.required_str("capability")?;
        let state = entry.required_bool("state")?;
        entry.deny_unknown(&["capability", "state"])?;
        let capability = name
            .parse()
            .map_err(|e: ParamError| CommandError::generic(e.to_string()))?;
        out.push(MigrationCapabilityStatus { capability, state });
    }
    Ok(out)
}

/// Refuses a capability set the tracker cannot honour: the dirty limit needs the ring's
/// per-vCPU counts. Auto-converge (a CPU throttle decided by the tracker-independent policy)
/// works with every tracker, as in QEMU; it conflicts only with the dirty limit.
pub fn check_capabilities(
    tracker: TrackerMode,
    caps: &MigrationCapabilities,
) -> Result<(), ControlError> {
    caps.validate()?;
    if caps.dirty_limit && tracker != TrackerMode::Ring {
        return Err(ParamError::DirtyLimitNeedsRing {
            tracker: tracker.name(),
        }
        .into());
    }
    Ok(())
}

/// The engine's dirty-limit mode for these capabilities and parameters.
pub fn dirty_limit_mode(p: &MigrationParameters, caps: &MigrationCapabilities) -> DirtyLimitMode {
    match (caps.dirty_limit, p.x_ringvisor_dirty_limit) {
        (false, _) => DirtyLimitMode::Off,
        (true, 0) => DirtyLimitMode::Auto,
        (true, q) => DirtyLimitMode::Fixed(q),
    }
}

/// Writes the parameters and capabilities into the engine's options (the fields a running
/// job reads live: downtime limit, bandwidth, timeout, dirty limit; and the rest).
pub fn apply_to_options(
    p: &MigrationParameters,
    caps: &MigrationCapabilities,
    o: &mut SourceOptions,
) {
    o.downtime_limit = p.downtime_limit();
    o.max_bandwidth = p.max_bandwidth();
    o.timeout = p.timeout();
    o.on_timeout = match p.x_ringvisor_on_timeout {
        OnTimeout::Abort => TimeoutAction::Abort,
        OnTimeout::Force => TimeoutAction::ForceSwitchover,
    };
    o.verify = p.x_ringvisor_verify;
    o.verify_before_commit = p.x_ringvisor_verify_before_commit;
    o.dirty_limit = dirty_limit_mode(p, caps);
    o.auto_converge = caps.auto_converge;
    o.throttle_trigger_threshold = p.throttle_trigger_threshold;
    o.cpu_throttle_initial = p.cpu_throttle_initial;
    o.cpu_throttle_increment = p.cpu_throttle_increment;
    o.max_cpu_throttle = p.max_cpu_throttle;
}

/// The source's TLS set-up from `tls-creds`, `tls-hostname` and `tls-authz` (`None` when
/// `tls-creds` is empty). The credentials are read now, so a bad directory refuses the
/// `migrate` command before anything connects.
pub fn client_tls(p: &MigrationParameters) -> Result<Option<tls::ClientTls>, ControlError> {
    if p.tls_creds.is_empty() {
        return Ok(None);
    }
    let host = (!p.tls_hostname.is_empty()).then_some(p.tls_hostname.as_str());
    Ok(Some(tls::ClientTls::load(
        std::path::Path::new(&p.tls_creds),
        &p.tls_authz_list(),
        host,
    )?))
}

/// The destination's TLS set-up from `tls-creds` and `tls-authz` (`None` when `tls-creds`
/// is empty).
pub fn server_tls(p: &MigrationParameters) -> Result<Option<tls::ServerTls>, ControlError> {
    if p.tls_creds.is_empty() {
        return Ok(None);
    }
    Ok(Some(tls::ServerTls::load(
        std::path::Path::new(&p.tls_creds),
        &p.tls_authz_list(),
    )?))
}

/// The engine's options for a new migration.
pub fn source_options(p: &MigrationParameters, caps: &MigrationCapabilities) -> SourceOptions {
    let mut o = SourceOptions::default();
    apply_to_options(p, caps, &mut o);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::time::Duration;

    fn args(v: Value) -> Args {
        Args::new(v.as_object().cloned().unwrap_or_default())
    }

    #[test]
    fn set_parameters_reads_qemu_names_and_gives_qemus_type_errors() {
        let s = set_parameters_from_args(&args(json!({
            "max-bandwidth": 8388608, "downtime-limit": 300, "x-ringvisor-on-timeout": "force",
            "x-ringvisor-verify": false, "cpu-throttle-initial": 30
        })))
        .unwrap();
        assert_eq!(s.max_bandwidth, Some(8 << 20));
        assert_eq!(s.downtime_limit, Some(300));
        assert_eq!(s.x_ringvisor_on_timeout, Some(OnTimeout::Force));
        assert_eq!(s.x_ringvisor_verify, Some(false));
        assert_eq!(s.cpu_throttle_initial, Some(30));
        assert_eq!(s.vcpu_dirty_limit, None);
        let err = |v: Value| set_parameters_from_args(&args(v)).unwrap_err().desc;
        assert_eq!(
            err(json!({"max-bandwidth": "fast"})),
            "Parameter 'max-bandwidth' expects uint64"
        );
        assert_eq!(
            err(json!({"downtime-limit": -1})),
            "Parameter 'downtime-limit' expects uint64"
        );
        assert_eq!(
            err(json!({"cpu-throttle-initial": 256})),
            "Parameter 'cpu-throttle-initial' expects uint8"
        );
        assert_eq!(
            err(json!({"x-ringvisor-verify": 1})),
            "Invalid parameter type for 'x-ringvisor-verify', expected: boolean"
        );
        assert_eq!(
            err(json!({"downtime_limit": 1})),
            "Parameter 'downtime_limit' is unexpected"
        );
        assert_eq!(
            err(json!({"x-ringvisor-on-timeout": "later"})),
            "Parameter 'x-ringvisor-on-timeout' does not accept value 'later'"
        );
    }

    #[test]
    fn capabilities_parse_and_bad_entries_are_named() {
        let list = capabilities_from_args(&args(json!({"capabilities": [
            {"capability": "auto-converge", "state": true},
            {"capability": "dirty-limit", "state": false}
        ]})))
        .unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0].state && !list[1].state);
        let err = |v: Value| capabilities_from_args(&args(v)).unwrap_err().desc;
        assert_eq!(err(json!({})), "Parameter 'capabilities' is missing");
        assert_eq!(
            err(json!({"capabilities": [1]})),
            "Invalid parameter type for 'capabilities[0]', expected: object"
        );
        assert_eq!(
            err(json!({"capabilities": [{"capability": "xbzrle", "state": true}]})),
            "Parameter 'capability' does not accept value 'xbzrle'"
        );
        assert_eq!(
            err(json!({"capabilities": [{"capability": "dirty-limit"}]})),
            "Parameter 'state' is missing"
        );
    }

    #[test]
    fn a_capability_the_tracker_cannot_honour_is_refused() {
        let dl = MigrationCapabilities {
            dirty_limit: true,
            ..Default::default()
        };
        let ac = MigrationCapabilities {
            auto_converge: true,
            ..Default::default()
        };
        assert!(check_capabilities(TrackerMode::Ring, &dl).is_ok());
        assert!(matches!(
            check_capabilities(TrackerMode::Bitmap, &dl),
            Err(ControlError::Param(ParamError::DirtyLimitNeedsRing { .. }))
        ));
        assert!(check_capabilities(TrackerMode::ClearLog, &ac).is_ok());
        // As in QEMU, auto-converge throttles with any tracker, the ring included.
        assert!(check_capabilities(TrackerMode::Ring, &ac).is_ok());
        let both = MigrationCapabilities {
            auto_converge: true,
            dirty_limit: true,
        };
        assert!(matches!(
            check_capabilities(TrackerMode::Ring, &both),
            Err(ControlError::Param(ParamError::CapabilityConflict))
        ));
        assert!(check_capabilities(TrackerMode::Ring, &MigrationCapabilities::default()).is_ok());
    }

    #[test]
    fn options_follow_parameters_and_capabilities() {
        let mut p = MigrationParameters::default();
        let mut caps = MigrationCapabilities::default();
        let o = source_options(&p, &caps);
        assert_eq!(o.downtime_limit, Duration::from_millis(300));
        assert_eq!(o.max_bandwidth, None);
        assert_eq!(o.dirty_limit, DirtyLimitMode::Off);
        p.max_bandwidth = 1 << 20;
        p.cpu_throttle_initial = 30;
        p.x_ringvisor_timeout = 5000;
        p.x_ringvisor_on_timeout = OnTimeout::Force;
        caps.dirty_limit = true;
        let o = source_options(&p, &caps);
        assert_eq!(o.max_bandwidth, Some(1 << 20));
        assert_eq!(o.timeout, Some(Duration::from_secs(5)));
        assert_eq!(o.on_timeout, TimeoutAction::ForceSwitchover);
        assert_eq!(o.dirty_limit, DirtyLimitMode::Auto);
        assert_eq!(o.cpu_throttle_initial, 30);
        assert_eq!(o.max_cpu_throttle, 99);
        p.x_ringvisor_dirty_limit = 50 << 20;
        assert_eq!(dirty_limit_mode(&p, &caps), DirtyLimitMode::Fixed(50 << 20));
    }
}
