//! Command-line arguments shared by the subcommands, and their parsers. A value out of range
//! is a usage error (clap, exit status 2) whose message gives the valid range.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use migration::params::{
    MigrateSetParameters, MigrationCapabilities, MigrationCapability, MigrationCapabilityStatus,
    MigrationParameters, OnTimeout,
};
use vmm::Tracking;

/// Sizes: `4096`, `256M`, `1G`, `1.5GiB` (K/M/G binary, as QEMU).
pub fn size_arg(s: &str) -> Result<u64, String> {
    migration::units::parse_size(s).map_err(|e| e.to_string())
}

/// A size in whole MiB from 1 MiB to 64 GiB, returned in MiB.
pub fn mib_arg(s: &str) -> Result<u64, String> {
    let b = size_arg(s)?;
    if b % (1 << 20) != 0 || b == 0 || b > 64 << 30 {
        return Err(format!("{s}: a whole number of MiB from 1M to 64G"));
    }
    Ok(b >> 20)
}

/// Rates in bytes/s: `800MiB/s`, `128M`, `1Gbit/s`; `0` or `unlimited`.
pub fn bandwidth_arg(s: &str) -> Result<u64, String> {
    migration::units::parse_bandwidth(s).map_err(|e| e.to_string())
}

/// A guest dirty rate: a rate, or `max` (as fast as the vCPUs can).
fn dirty_rate_arg(s: &str) -> Result<u64, String> {
    match s {
        "max" => Ok(u64::MAX),
        _ => bandwidth_arg(s),
    }
}

/// Seconds in (0, 1e6]: a finite, positive duration.
pub fn seconds_arg(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if v.is_finite() && v > 0.0 && v <= 1e6 {
        Ok(v)
    } else {
        Err(format!(
            "{s} is out of range: give a number of seconds greater than 0 and at most 1000000"
        ))
    }
}

/// Seconds in [0, 1e6].
pub fn delay_arg(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=1e6).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is out of range: give a number of seconds from 0 to 1000000"
        )),
    }
}

/// A console text to wait for: 1 to 256 bytes.
pub fn output_arg(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 256 {
        return Err("give 1 to 256 bytes of console text".into());
    }
    Ok(s.to_string())
}

/// A positive rate (a dirty limit): `0` is not a limit.
pub fn limit_arg(s: &str) -> Result<u64, String> {
    match bandwidth_arg(s)? {
        0 => Err("a dirty limit must be at least 1 MiB/s (e.g. 50M)".into()),
        v if v < (1 << 20) => Err(format!(
            "{s} is below 1 MiB/s, the smallest dirty limit (QEMU's unit is 1 MB/s = 2^20 bytes/s)"
        )),
        v => Ok(v),
    }
}

/// Dirty ring entries per vCPU: a power of two from 256 to 1048576 (the host may allow
/// fewer; `ringvisor caps` shows its maximum).
pub fn ring_entries_arg(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(v) if v.is_power_of_two() && (256..=1 << 20).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s} is not a power of two from 256 to 1048576 (the host may allow fewer; see `ringvisor caps`)"
        )),
    }
}

/// Smallest `--max-guest-memory`: one 2 MiB-aligned RAM block.
const MIN_GUEST_LIMIT: u64 = 2 << 20;
/// Largest `--max-guest-memory`: 64 TiB (what the decoder's layout checks allow).
const MAX_GUEST_LIMIT: u64 = 1 << 46;

/// `--max-guest-memory`: a size from 2M to 64T.
pub fn guest_limit_arg(s: &str) -> Result<u64, String> {
    match size_arg(s)? {
        v if (MIN_GUEST_LIMIT..=MAX_GUEST_LIMIT).contains(&v) => Ok(v),
        _ => Err(format!("{s} is out of range: give a size from 2M to 64T")),
    }
}

/// The destination's limits on what a source may make it do (issue 13: a destination that
/// cannot be held or flooded).
#[derive(Args, Clone, Debug)]
pub struct DestLimitArgs {
    /// Most guest memory a source may announce (2M..=64T); default: what this host can hold
    /// now (MemAvailable, swap, the overcommit policy). A larger layout is refused before
    /// anything is mapped.
    #[arg(long, value_parser = guest_limit_arg)]
    pub max_guest_memory: Option<u64>,
    /// Seconds the preamble, Hello and Layout may take after a connection (0 < s <= 1000000).
    #[arg(long, default_value = "10", value_parser = seconds_arg)]
    pub handshake_timeout: f64,
    /// Seconds between complete frames after the handshake before a stalled source is cut
    /// off (0 < s <= 1000000).
    #[arg(long, default_value = "10", value_parser = seconds_arg)]
    pub progress_timeout: f64,
}

/// `--seccomp`: what the per-thread system call filters do (docs/security.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompArg {
    /// A forbidden call fails with EPERM and is reported on stderr (default).
    Enforce,
    /// A forbidden call runs and the kernel logs it (audit log / dmesg).
    Log,
    /// No filters.
    Off,
}

impl From<SeccompArg> for sandbox::Mode {
    fn from(a: SeccompArg) -> Self {
        match a {
            SeccompArg::Enforce => sandbox::Mode::Enforce,
            SeccompArg::Log => sandbox::Mode::Log,
            SeccompArg::Off => sandbox::Mode::Off,
        }
    }
}

/// A QMP socket: `unix:PATH` (QEMU's spelling) or a plain path.
pub fn qmp_arg(s: &str) -> Result<PathBuf, String> {
    let p = s.strip_prefix("unix:").unwrap_or(s);
    if p.is_empty() {
        return Err("give the QMP socket as unix:PATH".into());
    }
    if s.contains(':') && !s.starts_with("unix:") {
        return Err(format!(
            "{s}: only unix:PATH monitors are supported (QEMU's `-qmp unix:PATH`)"
        ));
    }
    Ok(PathBuf::from(p))
}

/// A `--tls-authz` identity: a certificate name (no commas: the QMP parameter is a
/// comma-separated list).
fn authz_arg(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains(',') {
        Err(format!(
            "{s:?}: give one certificate name (subject CN or DNS name) per --tls-authz, without commas"
        ))
    } else {
        Ok(s.to_string())
    }
}

/// TLS on the migration channel (QEMU's `tls-creds` and `tls-authz`).
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// TLS 1.3 with mutual certificate authentication, from this credentials directory
    /// (QEMU's tls-creds-x509 layout: ca-cert.pem, server-cert.pem, server-key.pem,
    /// client-cert.pem, client-key.pem; `ringvisor tls-creds` writes one).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Only peers whose certificate names this identity (subject CN or DNS name) may
    /// connect; repeatable. Default: any certificate from the CA.
    #[arg(long, value_name = "NAME", value_parser = authz_arg, requires = "tls_creds")]
    pub tls_authz: Vec<String>,
}

impl TlsArgs {
    /// `tls-creds` as an absolute path (the VM process that reads it may run elsewhere
    /// than this client) and `tls-authz` as QMP's comma-separated list; `None` when not
    /// given.
    pub fn parameters(&self) -> (Option<String>, Option<String>) {
        let creds = self.tls_creds.as_ref().map(|p| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        });
        let authz = (!self.tls_authz.is_empty()).then(|| self.tls_authz.join(","));
        (creds, authz)
    }
}

/// The dirty tracker of a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TrackerArg {
    /// Per-vCPU dirty ring.
    Ring,
    /// KVM_GET_DIRTY_LOG.
    Bitmap,
    /// KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (manual protect).
    ClearLog,
}

impl TrackerArg {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TrackerArg::Ring => "ring",
            TrackerArg::Bitmap => "bitmap",
            TrackerArg::ClearLog => "clear-log",
        }
    }
}

/// Dirty tracking of a guest.
#[derive(Args, Clone, Debug)]
pub struct TrackArgs {
    /// Dirty tracker.
    #[arg(long, value_enum, default_value_t = TrackerArg::Ring)]
    pub tracker: TrackerArg,
    /// Dirty ring entries per vCPU (a power of two, 256..=1048576, at most the host's).
    #[arg(long, default_value_t = 65536, value_parser = ring_entries_arg)]
    pub ring_entries: u32,
}

impl TrackArgs {
    /// The VMM's tracking setting.
    pub fn tracking(&self) -> Tracking {
        match self.tracker {
            TrackerArg::Ring => Tracking::Ring {
                entries: self.ring_entries,
            },
            TrackerArg::Bitmap => Tracking::Bitmap,
            TrackerArg::ClearLog => Tracking::ClearLog,
        }
    }
}

/// Access pattern of the workload guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PatternArg {
    /// Random pages of the working set.
    Random,
    /// The working set in order.
    Sequential,
}

/// The workload guest.
#[derive(Args, Clone, Debug)]
pub struct GuestArgs {
    /// Guest memory (data region; a 4 MiB system region is added).
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    pub memory: u64,
    /// vCPUs, each dirtying its share of the working set (1..=64; 1..=8 with --kernel).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub vcpus: u64,
    /// Bytes the guest dirties per second in total; `max` = as fast as it can, 0 = idle.
    #[arg(long, default_value = "200M", value_parser = dirty_rate_arg)]
    pub dirty_rate: u64,
    /// Hot set the guest writes to (one page per vCPU up to --memory).
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    pub working_set: u64,
    /// Access pattern inside the working set.
    #[arg(long, value_enum, default_value_t = PatternArg::Random)]
    pub pattern: PatternArg,
    /// Only the first N vCPUs dirty memory (1..=--vcpus); the others run a compute loop whose
    /// progress shows how much a throttle slows a vCPU that does not dirty.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub dirty_vcpus: Option<u64>,
    #[command(flatten)]
    pub track: TrackArgs,
}

/// `--dirty-limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLimitArg {
    /// No dirty limit.
    Off,
    /// Applied automatically when pre-copy stops converging.
    Auto,
    /// This many bytes/s per vCPU from the start.
    Rate(u64),
}

fn dirty_limit_arg(s: &str) -> Result<DirtyLimitArg, String> {
    match s {
        "off" => Ok(DirtyLimitArg::Off),
        "auto" => Ok(DirtyLimitArg::Auto),
        r => limit_arg(r)
            .map(DirtyLimitArg::Rate)
            .map_err(|e| format!("{e} (or off / auto)")),
    }
}

/// `--on-timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnTimeoutArg {
    /// The guest stays on the source.
    Abort,
    /// Switch over anyway.
    Force,
}

/// Migration parameters and capabilities (QEMU's names); each flag left out keeps the value
/// in force (the defaults for a new VM process).
#[derive(Args, Clone, Debug, Default)]
pub struct MigrateArgs {
    /// downtime-limit: longest pause allowed at switchover, ms (0..=2000000; default 300).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=2_000_000))]
    pub downtime_limit: Option<u64>,
    /// max-bandwidth of the pre-copy passes, bytes/s (e.g. 128M = 128 MiB/s); 0 = unlimited
    /// (the default).
    #[arg(long, value_parser = bandwidth_arg)]
    pub max_bandwidth: Option<u64>,
    /// Give up (or force the switchover, --on-timeout) after this many seconds without
    /// converging (x-ringvisor-timeout).
    #[arg(long, value_parser = seconds_arg)]
    pub timeout: Option<f64>,
    /// What the timeout does: abort (the guest stays on the source; default) or force.
    #[arg(long, value_enum)]
    pub on_timeout: Option<OnTimeoutArg>,
    /// Skip the end-to-end memory digest comparison (x-ringvisor-verify false).
    #[arg(long)]
    pub no_verify: bool,
    /// Compare digests before committing (a mismatch aborts and keeps the guest on the
    /// source); the digest time then counts in the downtime.
    #[arg(long)]
    pub verify_before_commit: bool,
    /// The dirty-limit capability (ring tracker): `off`, `auto` (applied to the fastest vCPUs
    /// when pre-copy stops converging, lifted at switchover) or a per-vCPU rate (e.g. 50M).
    #[arg(long, value_parser = dirty_limit_arg)]
    pub dirty_limit: Option<DirtyLimitArg>,
    /// The auto-converge capability (any tracker: CPU throttle 20%, +10% steps, up to 99%)
    /// when pre-copy stops converging.
    #[arg(long)]
    pub auto_converge: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// tls-hostname: verify the destination's certificate for this name instead of the host
    /// of the migration URI.
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    pub tls_hostname: Option<String>,
}

impl MigrateArgs {
    /// The parameters given on the command line, and only those.
    pub fn set_parameters(&self) -> MigrateSetParameters {
        MigrateSetParameters {
            downtime_limit: self.downtime_limit,
            max_bandwidth: self.max_bandwidth,
            x_ringvisor_timeout: self
                .timeout
                .map(|t| Duration::from_secs_f64(t).as_millis() as u64),
            x_ringvisor_on_timeout: self.on_timeout.map(|t| match t {
                OnTimeoutArg::Abort => OnTimeout::Abort,
                OnTimeoutArg::Force => OnTimeout::Force,
            }),
            x_ringvisor_verify: self.no_verify.then_some(false),
            x_ringvisor_verify_before_commit: self.verify_before_commit.then_some(true),
            x_ringvisor_dirty_limit: match self.dirty_limit {
                Some(DirtyLimitArg::Rate(r)) => Some(r),
                Some(DirtyLimitArg::Auto) => Some(0),
                _ => None,
            },
            tls_creds: self.tls.parameters().0,
            tls_authz: self.tls.parameters().1,
            tls_hostname: self.tls_hostname.clone(),
            ..MigrateSetParameters::default()
        }
    }

    /// The capabilities given on the command line, and only those.
    pub fn capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        let mut v = Vec::new();
        if let Some(d) = self.dirty_limit {
            v.push(MigrationCapabilityStatus {
                capability: MigrationCapability::DirtyLimit,
                state: d != DirtyLimitArg::Off,
            });
        }
        if self.auto_converge {
            v.push(MigrationCapabilityStatus {
                capability: MigrationCapability::AutoConverge,
                state: true,
            });
        }
        v
    }

    /// The defaults with the given flags applied (a new VM process's settings).
    pub fn resolve(&self) -> Result<(MigrationParameters, MigrationCapabilities), String> {
        let mut p = MigrationParameters::default();
        self.set_parameters()
            .apply(&mut p)
            .map_err(|e| e.to_string())?;
        let mut caps = MigrationCapabilities::default();
        caps.apply(&self.capabilities())
            .map_err(|e| e.to_string())?;
        Ok((p, caps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_numbers_are_refused_with_the_valid_range() {
        for bad in ["nan", "inf", "-1", "0", "x"] {
            assert!(seconds_arg(bad).is_err(), "{bad}");
        }
        assert_eq!(seconds_arg("1.5"), Ok(1.5));
        assert!(delay_arg("nan").unwrap_err().contains("from 0 to 1000000"));
        assert_eq!(delay_arg("0"), Ok(0.0));
        assert!(limit_arg("0").is_err());
        assert!(limit_arg("1000").is_err());
        assert_eq!(limit_arg("50M"), Ok(50 << 20));
        assert!(ring_entries_arg("3").unwrap_err().contains("power of two"));
        assert!(ring_entries_arg("128").is_err());
        assert_eq!(ring_entries_arg("4096"), Ok(4096));
        assert_eq!(qmp_arg("unix:/tmp/q"), Ok(PathBuf::from("/tmp/q")));
        assert_eq!(qmp_arg("/tmp/q"), Ok(PathBuf::from("/tmp/q")));
        assert!(qmp_arg("tcp:1.2.3.4:5").is_err());
    }

    #[test]
    fn only_given_migration_flags_become_parameters() {
        let a = MigrateArgs::default();
        assert!(a.set_parameters().is_empty());
        assert!(a.capabilities().is_empty());
        let a = MigrateArgs {
            max_bandwidth: Some(8 << 20),
            timeout: Some(2.5),
            dirty_limit: Some(DirtyLimitArg::Rate(50 << 20)),
            ..MigrateArgs::default()
        };
        let s = a.set_parameters();
        assert_eq!(s.max_bandwidth, Some(8 << 20));
        assert_eq!(s.x_ringvisor_timeout, Some(2500));
        assert_eq!(s.x_ringvisor_dirty_limit, Some(50 << 20));
        assert_eq!(s.downtime_limit, None);
        let (p, caps) = a.resolve().unwrap();
        assert_eq!(p.downtime_limit, 300);
        assert!(caps.dirty_limit && !caps.auto_converge);
        let both = MigrateArgs {
            dirty_limit: Some(DirtyLimitArg::Auto),
            auto_converge: true,
            ..MigrateArgs::default()
        };
        assert!(both.resolve().is_err());
        let t = MigrateArgs {
            tls: TlsArgs {
                tls_creds: Some(PathBuf::from("creds")),
                tls_authz: vec!["a".into(), "b".into()],
            },
            ..MigrateArgs::default()
        };
        let s = t.set_parameters();
        let creds = s.tls_creds.unwrap();
        assert!(
            creds.starts_with('/') && creds.ends_with("/creds"),
            "{creds}"
        );
        assert_eq!(s.tls_authz.as_deref(), Some("a,b"));
        assert!(authz_arg("a,b").is_err() && authz_arg("").is_err());
    }
}
