//! CPU time for the summaries: where a migration's time goes, per thread, and how much of
//! the host stayed idle meanwhile (is a slow migration CPU on top of a saturated machine, or
//! waiting?).
//!
//! Thread times are the scheduler's exact run time (`/proc/.../schedstat`, first field, in
//! ns), not the 10 ms ticks of `stat`'s utime + stime: a migration of a few hundred ms would
//! otherwise round to a handful of ticks. Host figures come from `/proc/stat`'s `cpu` line
//! (USER_HZ ticks summed over every CPU). Everything here only opens and reads files under
//! `/proc`, which the migration threads' seccomp filters allow; listing a directory
//! ([`vcpu_threads`]) is not allowed there, so it is done before the migration thread starts.
//! A figure that cannot be read is `None`, never an error: accounting never fails a
//! migration.

use std::time::Instant;

/// Clock ticks per second of `/proc/stat` (`USER_HZ`, fixed at 100 by the Linux ABI).
const USER_HZ: f64 = 100.0;

/// The calling thread's CPU time so far, ns.
pub fn thread_cpu_ns() -> Option<u64> {
    schedstat_ns("/proc/thread-self/schedstat")
}

/// CPU time so far of thread `tid` of this process, ns (`None` once it has exited).
pub fn task_cpu_ns(tid: u32) -> Option<u64> {
    schedstat_ns(&format!("/proc/self/task/{tid}/schedstat"))
}

fn schedstat_ns(path: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.split_ascii_whitespace().next()?.parse().ok()
}

/// The vCPU threads of this process (named `vcpuN` by `vmm`), as (index, tid) in index
/// order; empty if `/proc/self/task` cannot be listed (e.g. on a filtered thread).
pub fn vcpu_threads() -> Vec<(usize, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut v: Vec<(usize, u32)> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let index = comm.trim_end().strip_prefix("vcpu")?.parse().ok()?;
            Some((index, tid))
        })
        .collect();
    v.sort_unstable();
    v
}

/// The host's CPU time so far, summed over every CPU, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostTicks {
    /// Idle and I/O wait.
    pub idle: u64,
    /// Stolen by the hypervisor (other guests of the host this one runs on).
    pub steal: u64,
    /// Everything, idle and steal included (the guest columns are part of user and nice).
    pub total: u64,
}

impl HostTicks {
    /// Reads `/proc/stat`'s `cpu` line.
    pub fn now() -> Option<HostTicks> {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        Self::parse(s.lines().next()?)
    }

    /// Parses a `cpu  user nice system idle iowait irq softirq steal guest guest_nice` line.
    pub fn parse(line: &str) -> Option<HostTicks> {
        let mut f = line.split_ascii_whitespace();
        if f.next()? != "cpu" {
            return None;
        }
        let v: Vec<u64> = f.map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Some(HostTicks {
            idle: at(3) + at(4),
            steal: at(7),
            // guest and guest_nice are already counted in user and nice.
            total: v.iter().take(8).sum(),
        })
    }
}

/// CPUs the host has online (what `/proc/stat`'s totals are summed over).
fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(0, |n| n.get() as u32)
}

/// Where the CPU went over a span of a migration.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CpuReport {
    /// Wall-clock seconds of the span.
    pub wall_s: f64,
    /// CPU seconds of the thread that ran the span (the source's migration thread: gather
    /// pages, frame, seal, write; the destination's receive thread: read, open, check,
    /// apply).
    pub thread_s: Option<f64>,
    /// CPU seconds of each vCPU thread over the span, in vCPU order (empty on the
    /// destination, whose vCPUs start after it).
    pub vcpu_s: Vec<f64>,
    /// CPUs of the host.
    pub host_cpus: u32,
    /// Idle CPU-seconds of the host over the span, all CPUs together (10 ms ticks).
    pub host_idle_s: Option<f64>,
    /// CPU-seconds the hypervisor gave to others over the span (10 ms ticks).
    pub host_steal_s: Option<f64>,
}

/// A span being measured: started on the thread it accounts for.
#[derive(Debug)]
pub struct CpuSpan {
    t0: Instant,
    thread0: Option<u64>,
    vcpus: Vec<(u32, Option<u64>)>,
    host0: Option<HostTicks>,
}

impl CpuSpan {
    /// Starts measuring the calling thread, the given vCPU threads (tids, in vCPU order)
    /// and the host.
    pub fn start(vcpu_tids: &[u32]) -> CpuSpan {
        CpuSpan {
            t0: Instant::now(),
            thread0: thread_cpu_ns(),
            vcpus: vcpu_tids.iter().map(|&t| (t, task_cpu_ns(t))).collect(),
            host0: HostTicks::now(),
        }
    }

    /// When the span started.
    pub fn started(&self) -> Instant {
        self.t0
    }

    /// The report from the start to now (call it on the same thread).
    pub fn finish(&self) -> CpuReport {
        let secs = |a: Option<u64>, b: Option<u64>| Some(b?.checked_sub(a?)? as f64 / 1e9);
        let host1 = HostTicks::now();
        let ticks = |f: fn(&HostTicks) -> u64| {
            let (a, b) = (self.host0.as_ref()?, host1.as_ref()?);
            Some(f(b).checked_sub(f(a))? as f64 / USER_HZ)
        };
        CpuReport {
            wall_s: self.t0.elapsed().as_secs_f64(),
            thread_s: secs(self.thread0, thread_cpu_ns()),
            vcpu_s: self
                .vcpus
                .iter()
                .map(|&(tid, a)| secs(a, task_cpu_ns(tid)).unwrap_or(0.0))
                .collect(),
            host_cpus: host_cpus(),
            host_idle_s: ticks(|h| h.idle),
            host_steal_s: ticks(|h| h.steal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_cpu_line_sums_idle_iowait_and_leaves_guest_columns_out() {
        let h = HostTicks::parse("cpu  100 5 50 1000 20 1 2 7 30 0").unwrap();
        assert_eq!(h.idle, 1020);
        assert_eq!(h.steal, 7);
        assert_eq!(h.total, 100 + 5 + 50 + 1000 + 20 + 1 + 2 + 7);
        assert_eq!(HostTicks::parse("cpu0 1 2 3 4"), None);
        assert_eq!(HostTicks::parse("cpu 1 x 3"), None);
    }

    #[test]
    fn a_busy_thread_accounts_its_own_cpu_time_and_an_idle_one_does_not() {
        let span = CpuSpan::start(&[]);
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 50 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let busy = span.finish();
        let cpu = busy.thread_s.expect("schedstat readable");
        // Spinning for 50 ms of wall time is at least some ms of CPU even on a loaded host,
        // and never more CPU than wall time.
        assert!(cpu > 0.0 && cpu <= busy.wall_s + 1e-3, "{busy:?}");
        let span = CpuSpan::start(&[]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let idle = span.finish();
        assert!(
            idle.thread_s.expect("schedstat readable") < 0.02,
            "{idle:?}"
        );
        assert!(idle.host_cpus >= 1);
    }
}
