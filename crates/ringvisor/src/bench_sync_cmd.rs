//! `ringvisor bench sync`: collect + re-protect cost per mode versus guest size.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use vmm::bench_sync::{self, SyncBenchParams};

use crate::plot::{line_plot_log_x, Series};

pub struct Opts {
    pub sizes_gib: Vec<u64>,
    pub dirty_pages: u64,
    pub runs: usize,
    pub ring_entries: u32,
    pub plot: Option<std::path::PathBuf>,
    pub json: bool,
}

pub fn run(o: Opts) -> Result<()> {
    if !vmm::kvm_available() {
        anyhow::bail!("/dev/kvm is absent: bench sync needs real KVM");
    }
    let p = SyncBenchParams {
        sizes_gib: o.sizes_gib,
        dirty_pages: o.dirty_pages,
        runs: o.runs,
        ring_entries: o.ring_entries,
    };
    let total = (p.sizes_gib.len() * 3 * p.runs) as u64;
    let pb = if o.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} collects {elapsed}")
            .expect("static template"),
    );
    let r = bench_sync::run(&p, || pb.inc(1)).context("bench sync")?;
    pb.finish_and_clear();
    if let Some(path) = &o.plot {
        let series: Vec<Series> = ["bitmap", "clear-log", "ring"]
            .iter()
            .map(|m| Series {
                name: m.to_string(),
                points: r
                    .cells
                    .iter()
                    .filter(|c| c.mode == *m)
                    .map(|c| (c.size_gib as f64, c.median_us))
                    .collect(),
            })
            .collect();
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
        )
        .with_context(|| format!("writing plot {}", path.display()))?;
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "sync cost: one collect + re-protect, {} dirty pages spread over the slot, median of {} runs, host KVM {}",
            p.dirty_pages,
            p.runs,
            if r.pvm_host { "PVM (kvm_pvm, nested, shadow paging)" } else { "not PVM" }
        );
        println!();
        print!("{}", r.to_markdown());
        if let Some(path) = &o.plot {
            println!("\nplot: {}", path.display());
        }
    }
    Ok(())
}
