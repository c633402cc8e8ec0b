//! `ringvisor bench sync`: collect + re-protect cost per mode versus guest size (in this
//! process, on real KVM; `vmm::bench_sync` measures).

use std::path::PathBuf;

use vmm::bench_sync::{self, SyncBenchParams, SyncBenchReport};

use crate::error::{BenchError, Result};
use crate::plot::{line_plot_log_x, Series};
use crate::Progress;

/// Options of the sync benchmark.
#[derive(Debug, Clone)]
pub struct SyncOpts {
    /// Guest memory sizes in GiB (1..=256; sparse).
    pub sizes_gib: Vec<u64>,
    /// Dirty pages per collect, spread evenly over the slot.
    pub dirty_pages: u64,
    /// Measured collects per cell (the median is reported).
    pub runs: usize,
    /// Dirty ring entries per vCPU.
    pub ring_entries: u32,
    /// Write an SVG plot here.
    pub plot: Option<PathBuf>,
}

/// Runs the sync benchmark (and writes the plot if asked).
pub fn run(o: &SyncOpts, progress: &mut dyn Progress) -> Result<SyncBenchReport> {
    if !vmm::kvm_available() {
        return Err(BenchError::NoKvm("bench sync"));
    }
    if let Some(bad) = o.sizes_gib.iter().find(|&&g| g == 0 || g > 256) {
        return Err(BenchError::Invalid(format!(
            "--sizes-gib: {bad} is out of range (1..=256 GiB)"
        )));
    }
    let p = SyncBenchParams {
        sizes_gib: o.sizes_gib.clone(),
        dirty_pages: o.dirty_pages,
        runs: o.runs,
        ring_entries: o.ring_entries,
    };
    progress.start((p.sizes_gib.len() * 3 * p.runs) as u64, "collects");
    let r = bench_sync::run(&p, || progress.inc()).map_err(BenchError::Sync)?;
    progress.finish();
    if let Some(path) = &o.plot {
        let mut series: Vec<Series> = Vec::new();
        for m in ["bitmap", "clear-log", "ring"] {
            for raw in [false, true] {
                series.push(Series {
                    name: if raw {
                        format!("raw {m}")
                    } else {
                        m.to_string()
                    },
                    points: r
                        .cells
                        .iter()
                        .filter(|c| c.mode == m)
                        .map(|c| {
                            let us = if raw { c.raw_median_us } else { c.median_us };
                            (c.size_gib as f64, us)
                        })
                        .collect(),
                });
            }
        }
        line_plot_log_x(
            path,
            &format!(
                "collect + re-protect, {} dirty pages ({})",
                p.dirty_pages,
                if r.pvm_host { "PVM host" } else { "KVM host" }
            ),
            "guest memory (GiB)",
            "median time (us)",
            &series,
        )?;
    }
    Ok(r)
}

/// The report as the CLI prints it: a header line, the table, the plot's path.
pub fn to_markdown(r: &SyncBenchReport, plot: Option<&std::path::Path>) -> String {
    let mut s = format!(
        "sync cost: one collect + re-protect, {} dirty pages spread over the slot, median of {} runs, host KVM {}; raw = the bare kernel sequence into a page list, same VM and run, alternating with ringvisor's collect; x = ringvisor / raw\n\n",
        r.params.dirty_pages,
        r.params.runs,
        if r.pvm_host { "PVM (kvm_pvm, nested, shadow paging)" } else { "not PVM" }
    );
    s.push_str(&r.to_markdown());
    if let Some(path) = plot {
        s.push_str(&format!("\nplot: {}\n", path.display()));
    }
    s
}

/// Options of the first-touch benchmark.
#[derive(Debug, Clone)]
pub struct TouchOpts {
    /// Guest RAM to touch, MiB.
    pub mib: u64,
    /// Runs per backing (the median is reported).
    pub runs: usize,
}

/// First-touch time of fresh guest RAM, 4 KiB pages versus transparent huge pages.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TouchReport {
    /// MiB touched.
    pub mib: u64,
    /// The host's THP mode (`always`, `madvise`, `never`).
    pub thp_mode: String,
    /// Median seconds with 4 KiB pages.
    pub small_s: f64,
    /// Median seconds with guest RAM advised `MADV_HUGEPAGE`.
    pub huge_s: f64,
}

impl TouchReport {
    /// One markdown table.
    pub fn to_markdown(&self) -> String {
        format!(
            "first touch of {} MiB by a 1-vCPU guest (one write per 4 KiB page), host THP {}\n\n| backing | time | MiB/s |\n|---|---|---|\n| 4 KiB pages | {:.3} s | {:.0} |\n| MADV_HUGEPAGE | {:.3} s | {:.0} |\n",
            self.mib,
            self.thp_mode,
            self.small_s,
            self.mib as f64 / self.small_s,
            self.huge_s,
            self.mib as f64 / self.huge_s,
        )
    }
}

/// Runs the first-touch benchmark (`runs` alternating pairs, medians).
pub fn first_touch(o: &TouchOpts, progress: &mut dyn Progress) -> Result<TouchReport> {
    if !vmm::kvm_available() {
        return Err(BenchError::NoKvm("bench first-touch"));
    }
    if o.mib == 0 || o.mib > 64 << 10 || o.runs == 0 {
        return Err(BenchError::Invalid(
            "first touch: size must be 1 MiB..64 GiB and runs > 0".into(),
        ));
    }
    progress.start(2 * o.runs as u64, "guests");
    let (mut small, mut huge) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        for (backing, out) in [
            (vmm::RamBacking::Small, &mut small),
            (vmm::RamBacking::HugeWhereOffered, &mut huge),
        ] {
            out.push(bench_sync::first_touch(o.mib, backing).map_err(BenchError::Sync)?);
            progress.inc();
        }
    }
    progress.finish();
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok(TouchReport {
        mib: o.mib,
        thp_mode: format!("{:?}", vmm::ThpMode::host()).to_lowercase(),
        small_s: med(&mut small),
        huge_s: med(&mut huge),
    })
}
