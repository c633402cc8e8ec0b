//! Bandwidth: a token bucket for `max-bandwidth`, a continuous estimator of the bytes/s the
//! link actually carries, and a `Write` wrapper that applies both to a stream.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Token-bucket rate limiter; a rate of 0 means unlimited.
///
/// Tokens may go negative: a write larger than the bucket is allowed and the debt is paid
/// by waiting, so any write size works and the long-run rate is exact.
///
/// ```
/// use std::time::{Duration, Instant};
/// use migration::bandwidth::TokenBucket;
/// let t0 = Instant::now();
/// let mut tb = TokenBucket::new(10_000_000); // 10 MB/s, 200 KB burst
/// assert_eq!(tb.reserve(200_000, t0), Duration::ZERO);
/// assert_eq!(tb.reserve(5_000_000, t0), Duration::from_millis(500));
/// ```
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// Smallest burst, so tiny rates still let a frame header through without a wait.
    pub const MIN_BURST: u64 = 64 << 10;

    /// A limiter for `rate` bytes/s (0 = unlimited) with a burst of 20 ms worth of bytes (short, so the
    /// bandwidth estimator's first window is not inflated by it).
    pub fn new(rate: u64) -> Self {
        let burst = (rate / 50).max(Self::MIN_BURST) as f64;
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// The configured rate in bytes/s (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// True when no limit applies.
    pub fn is_unlimited(&self) -> bool {
        self.rate == 0
    }

    /// Changes the rate, keeping the current balance (clamped to the new burst).
    pub fn set_rate(&mut self, rate: u64) {
        self.rate = rate;
        self.burst = (rate / 50).max(Self::MIN_BURST) as f64;
        self.tokens = self.tokens.min(self.burst);
    }

    /// Takes `bytes` tokens at time `now` and returns how long the caller must wait before
    /// sending more (zero if the bucket still has credit).
    pub fn reserve(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst);
        }
        self.last = Some(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }

    /// [`reserve`](Self::reserve) at the current time, then sleeps the returned delay.
    pub fn throttle(&mut self, bytes: u64) {
        let d = self.reserve(bytes, Instant::now());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

/// Continuous bandwidth estimate: bytes per window of at least `window`, folded into an
/// exponentially weighted moving average. Idle gaps longer than a window (e.g. between
/// passes) close the current window instead of diluting it, so the estimate is the rate the
/// link sustains while sending, which is what the switchover rule needs.
#[derive(Debug, Clone)]
pub struct BandwidthEstimator {
    window: Duration,
    alpha: f64,
    start: Option<Instant>,
    last_end: Option<Instant>,
    window_bytes: u64,
    estimate: Option<f64>,
    total: u64,
}

impl Default for BandwidthEstimator {
    /// 100 ms windows (QEMU's `BUFFER_DELAY`), weight 0.5 on the newest window.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), 0.5)
    }
}

impl BandwidthEstimator {
    /// Shortest window that counts when an idle gap closes it early.
    const MIN_WINDOW: Duration = Duration::from_millis(10);

    /// An estimator with windows of `window` and EWMA weight `alpha` (clamped to 0..=1) on
    /// the newest window.
    pub fn new(window: Duration, alpha: f64) -> Self {
        BandwidthEstimator {
            window: window.max(Duration::from_millis(1)),
            alpha: alpha.clamp(0.0, 1.0),
            start: None,
            last_end: None,
            window_bytes: 0,
            estimate: None,
            total: 0,
        }
    }

    fn close_window(&mut self, end: Instant) {
        if let Some(start) = self.start {
            let secs = end.saturating_duration_since(start).as_secs_f64();
            if secs > 0.0 {
                let rate = self.window_bytes as f64 / secs;
                self.estimate = Some(match self.estimate {
                    None => rate,
                    Some(e) => self.alpha * rate + (1.0 - self.alpha) * e,
                });
            }
        }
        self.start = None;
        self.window_bytes = 0;
    }

    /// Records `bytes` sent between `start` and `end`.
    pub fn record_interval(&mut self, bytes: u64, start: Instant, end: Instant) {
        if let (Some(ws), Some(last)) = (self.start, self.last_end) {
            if start.saturating_duration_since(last) > self.window {
                if last.saturating_duration_since(ws) >= Self::MIN_WINDOW {
                    self.close_window(last);
                } else {
                    self.start = None;
                    self.window_bytes = 0;
                }
            }
        }
        if self.start.is_none() {
            self.start = Some(start);
        }
        self.window_bytes += bytes;
        self.total += bytes;
        self.last_end = Some(end);
        if let Some(ws) = self.start {
            if end.saturating_duration_since(ws) >= self.window {
                self.close_window(end);
            }
        }
    }

    /// Records `bytes` sent at `now` (a write that returned immediately).
    pub fn record(&mut self, bytes: u64, now: Instant) {
        self.record_interval(bytes, now, now);
    }

    /// Current estimate in bytes/s; `None` until the first window closes.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        self.estimate
    }

    /// Bytes recorded so far.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }
}

/// Bandwidth figures shared between the sending thread and any other (policy, progress
/// bar), plus a limit another thread may change while the migration runs.
#[derive(Debug, Default)]
pub struct BandwidthGauge {
    total: AtomicU64,
    rate_bits: AtomicU64,
    limit: AtomicU64,
}

impl BandwidthGauge {
    /// Bytes written so far.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Latest bandwidth estimate in bytes/s, `None` before the first window closes.
    pub fn bytes_per_sec(&self) -> Option<f64> {
        let v = f64::from_bits(self.rate_bits.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    /// The `max-bandwidth` in force, bytes/s (0 = unlimited).
    pub fn max_bandwidth(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes `max-bandwidth`; the writer picks it up on its next write.
    pub fn set_max_bandwidth(&self, rate: u64) {
        self.limit.store(rate, Ordering::Relaxed);
    }
}

/// A `Write` wrapper that enforces `max-bandwidth` and measures what it writes.
///
/// Use it under an [`Encoder`](crate::wire::Encoder): `Encoder::new(ThrottledWriter::new(tcp,
/// params.max_bandwidth))`. The limiter charges bytes after each write returns and sleeps
/// off any debt, so the long-run rate is exact whatever the write sizes.
#[derive(Debug)]
pub struct ThrottledWriter<W> {
    inner: W,
    bucket: TokenBucket,
    estimator: BandwidthEstimator,
    gauge: Arc<BandwidthGauge>,
}

impl<W: Write> ThrottledWriter<W> {
    /// Wraps `inner` with a limit of `max_bandwidth` bytes/s (0 = unlimited).
    pub fn new(inner: W, max_bandwidth: u64) -> Self {
        let gauge = Arc::new(BandwidthGauge::default());
        gauge.set_max_bandwidth(max_bandwidth);
        ThrottledWriter {
            inner,
            bucket: TokenBucket::new(max_bandwidth),
            estimator: BandwidthEstimator::default(),
            gauge,
        }
    }

    /// The shared gauge (clone the `Arc` to read it from another thread).
    pub fn gauge(&self) -> &Arc<BandwidthGauge> {
        &self.gauge
    }

    /// The estimator.
    pub fn estimator(&self) -> &BandwidthEstimator {
        &self.estimator
    }

    /// The wrapped writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Gives back the wrapped writer.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for ThrottledWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let limit = self.gauge.max_bandwidth();
        if limit != self.bucket.rate() {
            self.bucket.set_rate(limit);
        }
        let start = Instant::now();
        let n = self.inner.write(buf)?;
        self.bucket.throttle(n as u64);
        self.estimator
            .record_interval(n as u64, start, Instant::now());
        self.gauge.total.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(r) = self.estimator.bytes_per_sec() {
            self.gauge.rate_bits.store(r.to_bits(), Ordering::Relaxed);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_bucket_never_waits() {
        let mut tb = TokenBucket::new(0);
        let t = Instant::now();
        assert_eq!(tb.reserve(u64::MAX / 2, t), Duration::ZERO);
        assert!(tb.is_unlimited());
    }

    #[test]
    fn bucket_debt_is_repaid_at_the_configured_rate() {
        let t0 = Instant::now();
        let mut tb = TokenBucket::new(50 << 20); // 50 MiB/s, burst 1 MiB
        assert_eq!(tb.reserve(1 << 20, t0), Duration::ZERO);
        // 20 MiB more right away: 20 MiB of debt = 400 ms.
        let d = tb.reserve(20 << 20, t0);
        assert_eq!(d, Duration::from_millis(400));
        // After waiting exactly that long the balance is zero: the next byte waits a hair.
        let t1 = t0 + d;
        let d2 = tb.reserve(10 << 10, t1);
        assert!(
            d2 > Duration::ZERO && d2 <= Duration::from_millis(1),
            "{d2:?}"
        );
    }

    #[test]
    fn bucket_refill_is_capped_at_the_burst() {
        let t0 = Instant::now();
        let mut tb = TokenBucket::new(10 << 20); // burst = 209715 bytes (20 ms)
        tb.reserve(0, t0);
        // An hour idle refills only the burst.
        let t1 = t0 + Duration::from_secs(3600);
        assert_eq!(tb.reserve(209_715, t1), Duration::ZERO);
        assert!(tb.reserve(10 << 20, t1) > Duration::from_millis(990));
    }

    #[test]
    fn estimator_reports_the_rate_of_steady_sends() {
        let t0 = Instant::now();
        let mut e = BandwidthEstimator::default();
        assert_eq!(e.bytes_per_sec(), None);
        // 1 MB every 10 ms = 100 MB/s for one second.
        for i in 0..=100u64 {
            e.record(1_000_000, t0 + Duration::from_millis(10 * i));
        }
        let r = e.bytes_per_sec().unwrap();
        assert!((r - 100e6).abs() / 100e6 < 0.11, "{r}");
        assert_eq!(e.total_bytes(), 101_000_000);
    }

    #[test]
    fn estimator_ignores_idle_gaps_between_bursts() {
        let t0 = Instant::now();
        let mut e = BandwidthEstimator::default();
        // 50 MB in 50 ms (1 GB/s), 2 s idle, 50 MB in 50 ms again.
        for i in 0..5u64 {
            e.record_interval(
                10_000_000,
                t0 + Duration::from_millis(10 * i),
                t0 + Duration::from_millis(10 * i + 10),
            );
        }
        let t1 = t0 + Duration::from_secs(2);
        for i in 0..5u64 {
            e.record_interval(
                10_000_000,
                t1 + Duration::from_millis(10 * i),
                t1 + Duration::from_millis(10 * i + 10),
            );
        }
        e.record(0, t1 + Duration::from_secs(1));
        let r = e.bytes_per_sec().unwrap();
        assert!((r - 1e9).abs() / 1e9 < 0.01, "{r}");
    }

    #[test]
    fn throttled_writer_holds_the_limit_and_publishes_the_rate() {
        let mut w = ThrottledWriter::new(Vec::new(), 20 << 20); // 20 MiB/s
        let gauge = Arc::clone(w.gauge());
        let chunk = vec![0u8; 256 << 10];
        let t0 = Instant::now();
        for _ in 0..32 {
            w.write_all(&chunk).unwrap(); // 8 MiB: 0.4 MiB burst, then 0.38 s of debt
        }
        // The writer slept off its debt: never faster than the limit. (A busy host only
        // makes it slower, so the published rate is bounded above, not below.)
        let secs = t0.elapsed().as_secs_f64();
        assert!(secs >= 0.37, "8 MiB at 20 MiB/s took only {secs} s");
        assert_eq!(gauge.total_bytes(), 8 << 20);
        let r = gauge.bytes_per_sec().unwrap() / (20 << 20) as f64;
        assert!(r > 0.0 && r < 1.3, "estimate is {r} x the limit");
    }
}
