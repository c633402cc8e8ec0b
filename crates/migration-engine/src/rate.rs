//! Per-vCPU dirty-rate measurement from monotonic counters sampled over time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples of one monotonic counter per vCPU; rates over a trailing window.
#[derive(Debug)]
pub struct RateMeter {
    window: Duration,
    samples: VecDeque<(Instant, Vec<u64>)>,
}

impl RateMeter {
    /// A meter reporting rates over `window`.
    pub fn new(window: Duration) -> Self {
        RateMeter {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records the counters at `now`.
    pub fn sample(&mut self, now: Instant, counters: Vec<u64>) {
        self.samples.push_back((now, counters));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
    }

    /// Per-counter rate (units per second) between the oldest and newest sample in the window.
    pub fn rates(&self) -> Vec<f64> {
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, a)), Some((t1, b))) if t1 > t0 => {
                let dt = t1.duration_since(*t0).as_secs_f64();
                a.iter()
                    .zip(b)
                    .map(|(x, y)| y.saturating_sub(*x) as f64 / dt)
                    .collect()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_over_the_window() {
        let t = Instant::now();
        let mut m = RateMeter::new(Duration::from_secs(1));
        assert!(m.rates().is_empty());
        m.sample(t, vec![0, 10]);
        m.sample(t + Duration::from_millis(500), vec![50, 10]);
        assert_eq!(m.rates(), vec![100.0, 0.0]);
        m.sample(t + Duration::from_millis(2500), vec![250, 30]);
        let r = m.rates();
        assert!(
            (r[0] - 100.0).abs() < 1e-9 && (r[1] - 10.0).abs() < 1e-9,
            "{r:?}"
        );
    }
}
