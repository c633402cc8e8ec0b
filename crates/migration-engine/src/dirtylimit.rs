//! Per-vCPU dirty-rate measurement from the ring and a dirty-limit controller that delays
//! only the vCPUs over their quota.
//!
//! QEMU sleeps a vCPU after each ring-full exit and retunes the sleep once a second, which
//! cannot work once the ring is large (a 65536-entry ring rarely fills). Here measurement and
//! enforcement are independent of the ring size. A controller thread peeks every ring every
//! 10 ms: the ring says exactly how many pages each vCPU dirtied, without a reset. Each
//! limited vCPU has a token bucket of pages (refilled at the quota, burst 100 ms worth);
//! a vCPU that has spent its tokens is held (its thread sleeps instead of entering the guest,
//! within one 10 ms kick period) until the bucket is positive again. The pages it dirtied in
//! the meantime are debt, so the long-run rate is the quota exactly. All rings are harvested
//! and reset once per second, so a hot page is counted (and throttled) again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_dirty::{RingSet, PAGE_SIZE};
use vmm::VcpuShared;

use crate::rate::RateMeter;

/// Controller settings.
#[derive(Debug, Clone, Copy)]
pub struct LimiterConfig {
    /// How often the rings are peeked and the throttles retuned.
    pub interval: Duration,
    /// Rate window.
    pub window: Duration,
    /// How often all rings are harvested and reset (so a hot page is counted again).
    pub reset_interval: Duration,
    /// A ring holding this many pending entries is harvested early.
    pub high_water: u32,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            interval: Duration::from_millis(5),
            window: Duration::from_millis(1000),
            reset_interval: Duration::from_secs(1),
            high_water: 16384,
        }
    }
}

/// A limited vCPU's page budget: refilled at the quota, capped at a burst of 100 ms worth of
/// it; pages dirtied beyond it are debt, paid back while the vCPU is held. Tokens are lost
/// only to the cap, so the pages a vCPU is let dirty over any span are at most the quota times
/// the span plus what it dirtied between the last tick and its hold taking effect.
#[derive(Debug, Default, Clone, Copy)]
struct TokenBucket {
    tokens: f64,
}

impl TokenBucket {
    /// Accounts `dt` seconds at `quota` pages/s in which the vCPU dirtied `used` pages;
    /// returns whether it must be held.
    fn tick(&mut self, quota: f64, dt: f64, used: f64) -> bool {
        let burst = quota * 0.1;
        self.tokens = (self.tokens + quota * dt - used).min(burst);
        self.tokens < 0.0
    }
}

#[derive(Debug, Default)]
struct State {
    /// Pages/s per limited vCPU (None = no limit).
    quota: Option<f64>,
    /// Which vCPUs the quota applies to (None = all).
    only: Option<Vec<usize>>,
    rates: Vec<f64>,
    held: Vec<f64>,
}

/// A running dirty-rate meter and (optional) dirty limit over a VM's rings.
pub struct DirtyLimiter {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    vcpus: Vec<Arc<VcpuShared>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for DirtyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLimiter").finish()
    }
}

impl DirtyLimiter {
    /// Starts measuring (no limit yet).
    pub fn start(rs: Arc<RingSet>, vcpus: Vec<Arc<VcpuShared>>, cfg: LimiterConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(State {
            rates: vec![0.0; vcpus.len()],
            held: vec![0.0; vcpus.len()],
            ..State::default()
        }));
        let (st, s2, v2) = (stop.clone(), state.clone(), vcpus.clone());
        let thread = std::thread::Builder::new()
            .name("dirty-limit".into())
            .spawn(move || control_loop(rs, v2, cfg, st, s2))
            .inspect_err(|e| tracing::warn!(error = %e, "dirty limit: no controller thread"))
            .ok();
        DirtyLimiter {
            stop,
            state,
            vcpus,
            thread,
        }
    }

    /// Sets (or with `None` cancels) the per-vCPU quota in bytes/s, for the vCPUs in `only`
    /// (None = every vCPU). Cancelling removes every throttle at once.
    pub fn set_quota(&self, bytes_per_s: Option<u64>, only: Option<Vec<usize>>) {
        if let Ok(mut s) = self.state.lock() {
            s.quota = bytes_per_s.map(|b| b as f64 / PAGE_SIZE as f64);
            s.only = only;
        }
        if bytes_per_s.is_none() {
            self.vcpus.iter().for_each(|v| v.set_hold(false));
        }
    }

    /// Dirty pages per second per vCPU over the last window.
    pub fn rates(&self) -> Vec<f64> {
        self.state
            .lock()
            .map(|s| s.rates.clone())
            .unwrap_or_default()
    }

    /// Current throttle fraction per vCPU.
    pub fn throttles(&self) -> Vec<f64> {
        self.vcpus.iter().map(|v| v.throttle()).collect()
    }

    /// Fraction of the last second each vCPU was held (a measure of how hard it is limited).
    pub fn held_fraction(&self) -> Vec<f64> {
        self.state
            .lock()
            .map(|s| s.held.clone())
            .unwrap_or_default()
    }

    /// Stops the controller and removes every throttle.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.vcpus.iter().for_each(|v| v.set_hold(false));
    }
}

impl Drop for DirtyLimiter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn control_loop(
    rs: Arc<RingSet>,
    vcpus: Vec<Arc<VcpuShared>>,
    cfg: LimiterConfig,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
) {
    let n = vcpus.len();
    let mut meter = RateMeter::new(cfg.window);
    let mut held_meter = RateMeter::new(cfg.window);
    let mut held_ns = vec![0u64; n];
    let mut last_reset = Instant::now();
    let mut last = Instant::now();
    // Entries already waiting in the rings were dirtied before the limit: not charged.
    let _ = rs.poll(u32::MAX);
    let mut prev_seen: Vec<u64> = (0..n).map(|i| rs.vcpu_dirty_seen(i)).collect();
    let mut buckets = vec![TokenBucket::default(); n];
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(cfg.interval);
        if last_reset.elapsed() >= cfg.reset_interval {
            // Into the ring set's staged pages, so a concurrent migration still sees them.
            if let Err(e) = rs.harvest_to_staged(None) {
                tracing::warn!(error = %e, "dirty limit: periodic harvest failed");
            }
            last_reset = Instant::now();
        }
        if let Err(e) = rs.poll(cfg.high_water) {
            tracing::warn!(error = %e, "dirty limit: ring poll failed");
        }
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        let seen: Vec<u64> = (0..n).map(|i| rs.vcpu_dirty_seen(i)).collect();
        meter.sample(now, seen.clone());
        let Ok(mut s) = state.lock() else { return };
        let rates = meter.rates();
        if !rates.is_empty() {
            s.rates = rates;
        }
        for (i, v) in vcpus.iter().enumerate() {
            let used = seen[i].saturating_sub(prev_seen[i]) as f64;
            let limited = s.quota.is_some() && s.only.as_ref().is_none_or(|o| o.contains(&i));
            match (s.quota, limited) {
                (Some(q), true) => {
                    let hold = buckets[i].tick(q, dt, used);
                    if hold {
                        held_ns[i] += (dt * 1e9) as u64;
                    }
                    if hold != v.held() {
                        v.set_hold(hold);
                    }
                }
                _ => {
                    buckets[i] = TokenBucket::default();
                    if v.held() {
                        v.set_hold(false);
                    }
                }
            }
        }
        prev_seen = seen;
        held_meter.sample(now, held_ns.clone());
        let h = held_meter.rates();
        if !h.is_empty() {
            s.held = h.iter().map(|x| x / 1e9).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBucket;

    /// A vCPU that would dirty `native` pages/s, ticked every `dt` s for `secs` s under
    /// `quota`; a hold decided at one tick takes effect for the next one (the kick latency).
    /// Returns the pages it was let dirty and the ticks it was held.
    fn simulate(quota: f64, native: f64, dt: f64, secs: f64) -> (f64, u32) {
        let mut b = TokenBucket::default();
        let (mut total, mut held, mut holding) = (0.0, 0u32, false);
        for _ in 0..(secs / dt).round() as u32 {
            let used = if holding { 0.0 } else { native * dt };
            total += used;
            holding = b.tick(quota, dt, used);
            held += u32::from(holding);
        }
        (total, held)
    }

    #[test]
    fn a_vcpu_over_its_quota_dirties_the_quota_within_one_tick_and_the_burst() {
        let (quota, dt, secs) = (12_207.0, 0.005, 10.0);
        for native in [24_414.0, 97_656.0, 1e6] {
            let (total, held) = simulate(quota, native, dt, secs);
            let one_tick = native * dt;
            assert!(total <= quota * secs + one_tick, "{native}: {total}");
            assert!(
                total >= quota * secs - quota * 0.1 - one_tick,
                "{native}: {total}"
            );
            assert!(held > 0, "{native}: never held");
        }
    }

    #[test]
    fn a_vcpu_under_its_quota_is_never_held() {
        for native in [0.0, 1.0, 6_000.0, 12_206.0] {
            assert_eq!(simulate(12_207.0, native, 0.005, 10.0).1, 0, "{native}");
        }
    }

    #[test]
    fn uneven_ticks_still_bound_the_pages_by_the_quota() {
        // Ticks of 1 to 40 ms (a busy controller thread), a vCPU at 400 MB/s.
        let (quota, native) = (12_207.0, 97_656.0);
        let mut b = TokenBucket::default();
        let (mut total, mut elapsed, mut holding, mut max_tick) = (0.0, 0.0, false, 0.0f64);
        for k in 0..2_000u32 {
            let dt = 0.001 * f64::from(1 + (k * 7919) % 40);
            let used = if holding { 0.0 } else { native * dt };
            total += used;
            elapsed += dt;
            max_tick = max_tick.max(used);
            holding = b.tick(quota, dt, used);
        }
        assert!(
            total <= quota * elapsed + max_tick,
            "{total} > {}",
            quota * elapsed
        );
    }
}
