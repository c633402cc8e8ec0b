//! Per-vCPU dirty rates during pre-copy (ring tracker): a thread polls the VM's dirty
//! counters every few milliseconds. With the ring, polling peeks the rings (no reset) and
//! harvests a ring only at its high-water mark, so a hot page is re-protected once per pass,
//! not once per poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::rate::RateMeter;
use crate::seam::VcpuDirtyCounters;

pub(super) struct Collector {
    stop: Arc<AtomicBool>,
    meter: Arc<Mutex<RateMeter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    /// Starts polling `counters` every `poll`; a ring `high_water` full (fraction of its soft
    /// limit) is harvested early.
    pub(super) fn start(
        counters: Arc<dyn VcpuDirtyCounters>,
        poll: Duration,
        high_water: f64,
    ) -> Collector {
        let stop = Arc::new(AtomicBool::new(false));
        let meter = Arc::new(Mutex::new(RateMeter::new(Duration::from_secs(1))));
        let (s, m) = (stop.clone(), meter.clone());
        let thread = std::thread::Builder::new()
            .name("dirty-collector".into())
            .spawn(move || {
                // It reads the rings the guest writes: filtered like the migration.
                if let Err(e) = sandbox::apply(sandbox::ThreadKind::Migration) {
                    tracing::warn!(error = %e, "dirty collector: no seccomp filter; not polling");
                    return;
                }
                let mut counts = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    // A failure here resurfaces in the next collect, which reports it.
                    match counters.poll_counts(high_water, &mut counts) {
                        Ok(_) => {
                            if let Ok(mut m) = m.lock() {
                                m.sample(Instant::now(), counts.clone());
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "dirty collector: poll failed"),
                    }
                    std::thread::sleep(poll);
                }
            })
            .ok();
        Collector {
            stop,
            meter,
            thread,
        }
    }

    /// Pages/s per vCPU over the last second.
    pub(super) fn rates(&self) -> Vec<f64> {
        self.meter.lock().map(|m| m.rates()).unwrap_or_default()
    }

    /// Stops and joins the thread (up to one poll interval).
    pub(super) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}
