//! Dirty rate and dirty limits: `calc-dirty-rate` / `query-dirty-rate` (a measurement is a
//! job of its own, on its own thread) and `set-vcpu-dirty-limit` /
//! `cancel-vcpu-dirty-limit` / `query-vcpu-dirty-limit` (a standing per-vCPU limit held by
//! the engine's `DirtyLimiter`).
//!
//! Units are QEMU's: dirty rates and limits in "MB/s", which QEMU computes as 2^20 bytes
//! per second (`dirtyrate.c`, `dirtylimit.c`).
//!
//! A standing limit is kept while a migration runs; only a migration with the `dirty-limit`
//! capability (whose own limiter would fight it for the same vCPUs) lifts it, and it comes
//! back when that migration fails or is cancelled.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_dirty::PAGE_SIZE;
use migration_engine::dirtyrate::{self, DirtyRate};
use migration_engine::{DirtyLimiter, LimiterConfig};
use qmp::{Args, CommandError};
use serde_json::{json, Value};
use vmm::Vm;

use crate::error::ControlError;
use crate::migrate::JobSlot;
use crate::service::{Core, VmService};

const MIB: f64 = (1u64 << 20) as f64;
/// QEMU's default `sample-pages`.
pub const DEFAULT_SAMPLE_PAGES: u64 = 512;

/// How `calc-dirty-rate` measures (QEMU's `DirtyRateMeasureMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateMode {
    /// Hash a random sample of pages at the start and the end (an estimate, per VM).
    PageSampling,
    /// Count ring entries per vCPU (exact, per vCPU; the ring tracker).
    DirtyRing,
    /// Count dirty-log bits (exact, per VM; the bitmap and clear-log trackers).
    DirtyBitmap,
}

impl RateMode {
    /// The QMP name.
    pub fn name(self) -> &'static str {
        match self {
            RateMode::PageSampling => "page-sampling",
            RateMode::DirtyRing => "dirty-ring",
            RateMode::DirtyBitmap => "dirty-bitmap",
        }
    }

    /// Parses a QMP name.
    pub fn parse(s: &str) -> Result<RateMode, ControlError> {
        [
            RateMode::PageSampling,
            RateMode::DirtyRing,
            RateMode::DirtyBitmap,
        ]
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| ControlError::BadValue {
            param: "mode",
            value: s.to_string(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RateStatus {
    Unstarted,
    Measuring,
    Measured,
}

/// The last (or running) dirty-rate measurement.
#[derive(Debug, Clone)]
pub(crate) struct RateState {
    status: RateStatus,
    start_time: u64,
    calc: Duration,
    sample_pages: u64,
    mode: RateMode,
    dirty_rate: Option<u64>,
    vcpu: Option<Vec<u64>>,
    error: Option<String>,
}

impl Default for RateState {
    fn default() -> Self {
        RateState {
            status: RateStatus::Unstarted,
            start_time: 0,
            calc: Duration::ZERO,
            sample_pages: DEFAULT_SAMPLE_PAGES,
            mode: RateMode::PageSampling,
            dirty_rate: None,
            vcpu: None,
            error: None,
        }
    }
}

fn lock_rate(m: &Mutex<RateState>) -> MutexGuard<'_, RateState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Pages per second to QEMU's MB/s (2^20 bytes), rounded.
fn mib_per_s(pages_per_s: f64) -> u64 {
    (pages_per_s * PAGE_SIZE as f64 / MIB).round().max(0.0) as u64
}

/// Whether a dirty-bitmap measurement holds the dirty log now.
pub(crate) fn bitmap_measurement_running(core: &Core) -> bool {
    let s = lock_rate(&core.rate);
    s.status == RateStatus::Measuring && s.mode == RateMode::DirtyBitmap
}

fn measure(
    vm: &Vm,
    mode: RateMode,
    window: Duration,
    sample_pages: u64,
) -> Result<DirtyRate, migration_engine::MigrationError> {
    match mode {
        RateMode::DirtyRing => dirtyrate::measure_ring(vm, window),
        RateMode::DirtyBitmap => dirtyrate::measure_bitmap(vm, window),
        RateMode::PageSampling => {
            dirtyrate::measure_sample(vm, window, sample_pages, migration_engine::unix_ns())
        }
    }
}

/// The standing per-vCPU dirty limits (bytes/s; 0 = none) and the limiter enforcing them.
#[derive(Default)]
pub(crate) struct DirtyLimits {
    per_vcpu: Vec<u64>,
    limiter: Option<DirtyLimiter>,
    suspended: bool,
}

impl DirtyLimits {
    /// Whether any vCPU has a limit.
    pub(crate) fn any(&self) -> bool {
        self.per_vcpu.iter().any(|&q| q > 0)
    }

    fn quota(per_vcpu: &[u64]) -> Result<Option<u64>, u64> {
        let mut q = None;
        for &v in per_vcpu.iter().filter(|&&v| v > 0) {
            match q {
                None => q = Some(v),
                Some(c) if c != v => return Err(c),
                Some(_) => {}
            }
        }
        Ok(q)
    }

    fn apply(&self) {
        let Some(l) = &self.limiter else { return };
        match Self::quota(&self.per_vcpu) {
            Ok(Some(q)) if !self.suspended => {
                let only: Vec<usize> = (0..self.per_vcpu.len())
                    .filter(|&i| self.per_vcpu[i] > 0)
                    .collect();
                let only = (only.len() < self.per_vcpu.len()).then_some(only);
                l.set_quota(Some(q), only);
            }
            _ => l.set_quota(None, None),
        }
    }

    /// Limits vCPU `cpu` (or all) to `bytes_per_s`.
    pub(crate) fn set(
        &mut self,
        vm: &Vm,
        cpu: Option<usize>,
        bytes_per_s: u64,
    ) -> Result<(), ControlError> {
        if vm.ring_set().is_none() {
            return Err(ControlError::DirtyLimitNeedsRing(
                vm.config().tracking.mode().name(),
            ));
        }
        let n = vm.config().vcpus;
        let mut next = self.per_vcpu.clone();
        next.resize(n, 0);
        match cpu {
            Some(i) => next[i] = bytes_per_s,
            None => next.iter_mut().for_each(|q| *q = bytes_per_s),
        }
        Self::quota(&next).map_err(|current| ControlError::MixedDirtyLimits {
            current: current >> 20,
        })?;
        self.per_vcpu = next;
        if self.limiter.is_none() {
            self.limiter = Some(DirtyLimiter::start(vm, LimiterConfig::default())?);
        }
        self.apply();
        Ok(())
    }

    /// Lifts the limit of vCPU `cpu` (or all).
    pub(crate) fn cancel(&mut self, cpu: Option<usize>) {
        match cpu {
            Some(i) => {
                if let Some(q) = self.per_vcpu.get_mut(i) {
                    *q = 0;
                }
            }
            None => self.per_vcpu.iter_mut().for_each(|q| *q = 0),
        }
        self.apply();
    }

    /// Lifts every limit for now (a migration with its own dirty limit runs).
    pub(crate) fn suspend(&mut self) {
        self.suspended = true;
        self.apply();
    }

    /// Puts the limits back after [`suspend`](Self::suspend).
    pub(crate) fn resume(&mut self, _vm: &Vm) {
        self.suspended = false;
        self.apply();
        if self.any() {
            tracing::info!("the standing vCPU dirty limit is back in force");
        }
    }

    /// Drops every limit and the limiter (the guest left).
    pub(crate) fn stop(&mut self) {
        if let Some(mut l) = self.limiter.take() {
            l.stop();
        }
        self.per_vcpu.clear();
        self.suspended = false;
    }

    fn query(&self) -> Value {
        let rates = self.limiter.as_ref().map(|l| l.rates()).unwrap_or_default();
        let list: Vec<Value> = (0..self.per_vcpu.len())
            .filter(|&i| self.per_vcpu[i] > 0)
            .map(|i| {
                json!({
                    "cpu-index": i,
                    "limit-rate": self.per_vcpu[i] >> 20,
                    "current-rate": mib_per_s(rates.get(i).copied().unwrap_or(0.0)),
                })
            })
            .collect();
        Value::Array(list)
    }
}

fn cpu_index(vm: &Vm, index: Option<i64>) -> Result<Option<usize>, ControlError> {
    let n = vm.config().vcpus;
    match index {
        None => Ok(None),
        Some(i) if i >= 0 && (i as u64) < n as u64 => Ok(Some(i as usize)),
        Some(i) => Err(ControlError::CpuIndex { index: i, vcpus: n }),
    }
}

impl VmService {
    /// `calc-dirty-rate`: starts measuring over `calc` on its own thread and returns at once.
    pub fn calc_dirty_rate(
        &self,
        calc: Duration,
        sample_pages: u64,
        mode: RateMode,
    ) -> Result<(), ControlError> {
        let g = self.core.lock();
        let vm = g.vm.clone().ok_or(ControlError::NoGuest)?;
        let tracker = vm.config().tracking.mode();
        let ring = vm.ring_set().is_some();
        if (mode == RateMode::DirtyRing && !ring) || (mode == RateMode::DirtyBitmap && ring) {
            return Err(ControlError::DirtyRateMode {
                mode: mode.name(),
                tracker: tracker.name(),
            });
        }
        if mode == RateMode::DirtyBitmap && g.job.as_ref().is_some_and(JobSlot::is_active) {
            return Err(ControlError::DirtyLogBusy("migration"));
        }
        if mode == RateMode::DirtyBitmap
            && g.replication
                .as_ref()
                .is_some_and(crate::replicate::ReplicationSlot::is_active)
        {
            return Err(ControlError::DirtyLogBusy("replication"));
        }
        let mut s = lock_rate(&self.core.rate);
        if s.status == RateStatus::Measuring {
            return Err(ControlError::DirtyRateMeasuring);
        }
        let previous = std::mem::replace(
            &mut *s,
            RateState {
                status: RateStatus::Measuring,
                start_time: migration_engine::unix_ns() / 1_000_000_000,
                calc,
                sample_pages,
                mode,
                dirty_rate: None,
                vcpu: None,
                error: None,
            },
        );
        let rate = Arc::clone(&self.core.rate);
        let spawned = std::thread::Builder::new()
            .name("calc-dirty-rate".into())
            .spawn(move || {
                let r = measure(&vm, mode, calc, sample_pages);
                let mut s = lock_rate(&rate);
                match r {
                    Ok(d) => {
                        s.dirty_rate = Some(mib_per_s(d.pages_per_s));
                        s.vcpu = d
                            .vcpu_pages_per_s
                            .map(|v| v.iter().map(|&p| mib_per_s(p)).collect());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "dirty-rate measurement failed");
                        s.error = Some(e.to_string());
                    }
                }
                s.status = RateStatus::Measured;
            });
        if let Err(e) = spawned {
            *s = previous;
            return Err(ControlError::Spawn(e));
        }
        Ok(())
    }

    fn query_dirty_rate(&self, unit_ms: bool) -> Value {
        let s = lock_rate(&self.core.rate).clone();
        let calc = if unit_ms {
            s.calc.as_millis() as u64
        } else {
            s.calc.as_secs()
        };
        let mut v = json!({
            "status": match s.status {
                RateStatus::Unstarted => "unstarted",
                RateStatus::Measuring => "measuring",
                RateStatus::Measured => "measured",
            },
            "start-time": s.start_time,
            "calc-time": calc,
            "calc-time-unit": if unit_ms { "millisecond" } else { "second" },
            "sample-pages": s.sample_pages,
            "mode": s.mode.name(),
        });
        if let Some(r) = s.dirty_rate {
            v["dirty-rate"] = json!(r);
        }
        if let Some(per) = &s.vcpu {
            let list: Vec<Value> = per
                .iter()
                .enumerate()
                .map(|(i, r)| json!({"id": i, "dirty-rate": r}))
                .collect();
            v["vcpu-dirty-rate"] = Value::Array(list);
        }
        if let Some(e) = &s.error {
            v["x-ringvisor-error"] = json!(e);
        }
        v
    }

    /// `set-vcpu-dirty-limit`: holds vCPU `cpu` (or every vCPU) to `bytes_per_s` of newly
    /// dirtied memory (ring tracker).
    pub fn set_vcpu_dirty_limit(
        &self,
        cpu: Option<usize>,
        bytes_per_s: u64,
    ) -> Result<(), ControlError> {
        if bytes_per_s == 0 {
            return Err(ControlError::DirtyLimitZero);
        }
        let mut g = self.core.lock();
        let vm = g.vm.clone().ok_or(ControlError::NoGuest)?;
        if let Some(i) = cpu {
            cpu_index(&vm, i64::try_from(i).ok())?;
        }
        g.limits.set(&vm, cpu, bytes_per_s)
    }

    /// `cancel-vcpu-dirty-limit`: lifts the limit of vCPU `cpu` (or every vCPU).
    pub fn cancel_vcpu_dirty_limit(&self, cpu: Option<usize>) -> Result<(), ControlError> {
        let mut g = self.core.lock();
        let vm = g.vm.clone().ok_or(ControlError::NoGuest)?;
        if vm.ring_set().is_none() {
            return Err(ControlError::DirtyLimitNeedsRing(
                vm.config().tracking.mode().name(),
            ));
        }
        g.limits.cancel(cpu);
        Ok(())
    }

    fn calc_args(args: &Args) -> Result<(Duration, u64, RateMode), CommandError> {
        let calc = args.required_i64("calc-time")?;
        let unit_ms = Self::unit_arg(args)?;
        let sample = args.optional_i64("sample-pages")?;
        let mode = match args.optional_str("mode")? {
            None => RateMode::PageSampling,
            Some(m) => RateMode::parse(m)?,
        };
        args.deny_unknown(&["calc-time", "calc-time-unit", "sample-pages", "mode"])?;
        let calc = match unit_ms {
            false if (1..=60).contains(&calc) => Duration::from_secs(calc as u64),
            true if (100..=60_000).contains(&calc) => Duration::from_millis(calc as u64),
            _ => return Err(ControlError::CalcTime.into()),
        };
        let sample = match sample {
            None => DEFAULT_SAMPLE_PAGES,
            Some(p) if (128..=4096).contains(&p) => p as u64,
            Some(_) => return Err(ControlError::SamplePages.into()),
        };
        Ok((calc, sample, mode))
    }

    fn unit_arg(args: &Args) -> Result<bool, CommandError> {
        match args.optional_str("calc-time-unit")? {
            None | Some("second") => Ok(false),
            Some("millisecond") => Ok(true),
            Some(other) => Err(ControlError::BadValue {
                param: "calc-time-unit",
                value: other.to_string(),
            }
            .into()),
        }
    }

    fn vm_cpu_arg(&self, args: &Args) -> Result<Option<usize>, CommandError> {
        let index = args.optional_i64("cpu-index")?;
        let vm = self.core.lock().vm.clone().ok_or(ControlError::NoGuest)?;
        Ok(cpu_index(&vm, index)?)
    }

    pub(crate) fn dirty_command(&self, name: &str, args: &Args) -> Result<Value, CommandError> {
        match name {
            "calc-dirty-rate" => {
                let (calc, sample, mode) = Self::calc_args(args)?;
                self.calc_dirty_rate(calc, sample, mode)?;
                Ok(json!({}))
            }
            "query-dirty-rate" => {
                let unit_ms = Self::unit_arg(args)?;
                args.deny_unknown(&["calc-time-unit"])?;
                Ok(self.query_dirty_rate(unit_ms))
            }
            "set-vcpu-dirty-limit" => {
                let rate = args.required_u64("dirty-rate")?;
                let cpu = self.vm_cpu_arg(args)?;
                args.deny_unknown(&["cpu-index", "dirty-rate"])?;
                let bytes = rate
                    .checked_mul(1 << 20)
                    .ok_or_else(|| CommandError::generic("Parameter 'dirty-rate' is too large"))?;
                self.set_vcpu_dirty_limit(cpu, bytes)?;
                Ok(json!({}))
            }
            "cancel-vcpu-dirty-limit" => {
                let cpu = self.vm_cpu_arg(args)?;
                args.deny_unknown(&["cpu-index"])?;
                self.cancel_vcpu_dirty_limit(cpu)?;
                Ok(json!({}))
            }
            "query-vcpu-dirty-limit" => {
                args.deny_unknown(&[])?;
                Ok(self.core.lock().limits.query())
            }
            _ => Err(CommandError::command_not_found(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_limit_value_at_a_time_is_accepted() {
        assert_eq!(DirtyLimits::quota(&[0, 0]), Ok(None));
        assert_eq!(DirtyLimits::quota(&[5, 0, 5]), Ok(Some(5)));
        assert_eq!(DirtyLimits::quota(&[5, 6]), Err(5));
    }

    #[test]
    fn rates_are_qemus_mb_per_s_of_two_to_the_twenty_bytes() {
        assert_eq!(mib_per_s(256.0), 1);
        assert_eq!(mib_per_s(0.0), 0);
        assert_eq!(mib_per_s(-3.0), 0);
        assert_eq!(mib_per_s(4096.0), 16);
    }

    #[test]
    fn modes_parse_their_qemu_names_only() {
        for m in [
            RateMode::PageSampling,
            RateMode::DirtyRing,
            RateMode::DirtyBitmap,
        ] {
            assert_eq!(RateMode::parse(m.name()).unwrap(), m);
        }
        assert_eq!(
            RateMode::parse("ring").unwrap_err().to_string(),
            "Parameter 'mode' does not accept value 'ring'"
        );
    }
}
