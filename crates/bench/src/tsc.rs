//! The host's TSC rate: the clock that turns the PVH test kernel's TSC-stamped progress
//! reports into seconds, the same for ringvisor's guest and QEMU's.
//!
//! Both VMMs' guests read the host's TSC at its own rate: on this host a guest's ring-3
//! `rdtsc` runs natively (PVM), and neither VMM scales the guest TSC (`KVM_SET_TSC_KHZ` to
//! a different rate). Timer ticks are no such clock: a tick that fires while the vCPU is
//! not running is coalesced with the next one, more often under one VMM than the other.

use std::time::{Duration, Instant};

/// How long [`host_tsc_hz`] measures by default: long enough that the few microseconds
/// between reading the TSC and the monotonic clock are below 10^-4 of it.
pub const MEASURE: Duration = Duration::from_millis(200);

/// Tries per sample: the pair whose TSC reads lie closest together around the clock read
/// wins, so a preemption between the two reads does not skew the result.
const TRIES: usize = 32;

/// One (TSC, monotonic time) pair: the TSC read before and after `Instant::now()`
/// (`CLOCK_MONOTONIC` on Linux), its midpoint, from the narrowest of [`TRIES`] pairs.
fn sample() -> Option<(u64, Instant)> {
    let mut best: Option<(u64, u64, Instant)> = None;
    for _ in 0..TRIES {
        let t0 = crate::sys::rdtsc()?;
        let now = Instant::now();
        let t1 = crate::sys::rdtsc()?;
        let width = t1.checked_sub(t0)?;
        if best.is_none_or(|(w, _, _)| width < w) {
            best = Some((width, t0 + width / 2, now));
        }
    }
    best.map(|(_, tsc, now)| (tsc, now))
}

/// The host's TSC rate in Hz: TSC ticks over `CLOCK_MONOTONIC` across `span` (sleeping in
/// between). `None` without a TSC (not x86-64), or when the TSC did not advance.
pub fn host_tsc_hz(span: Duration) -> Option<f64> {
    let (t0, i0) = sample()?;
    std::thread::sleep(span);
    let (t1, i1) = sample()?;
    let secs = i1.duration_since(i0).as_secs_f64();
    let ticks = t1.checked_sub(t0)?;
    (secs > 0.0 && ticks > 0).then(|| ticks as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::{RegionSpec, Tracking, Vm, VmConfig};

    #[test]
    fn host_tsc_rate_is_the_rate_kvm_gives_its_guests() {
        if !vmm::kvm_available() {
            println!("SKIP(kvm): /dev/kvm is absent; KVM_GET_TSC_KHZ needs it");
            return;
        }
        let vm = Vm::create(&VmConfig {
            vcpus: 1,
            memory: vec![RegionSpec {
                slot: 1,
                gpa: 1 << 30,
                bytes: 1 << 20,
                log_dirty: false,
            }],
            tracking: Tracking::Bitmap,
        })
        .expect("a 1-vCPU VM");
        let khz = vm.tsc_khz().expect("KVM_GET_TSC_KHZ");
        let hz = host_tsc_hz(MEASURE).expect("an x86-64 host has a TSC");
        // KVM's rate for its vCPUs is the host's calibrated TSC rate, which is also what
        // drives CLOCK_MONOTONIC where the TSC is the clocksource: the two agree to far
        // better than 1% unless the guest TSC is scaled, which the bench's conversion
        // assumes it is not.
        let ratio = hz / (f64::from(khz) * 1e3);
        assert!(
            (ratio - 1.0).abs() < 0.01,
            "host TSC {hz:.0} Hz against KVM's {khz} kHz"
        );
    }
}
