//! `ringvisor selftest`: the dirty_log_test port, one or all modes.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kvm_dirty::TrackerMode;
use vmm::selftest::{self, SelftestParams, SelftestReport};

use crate::ModeArg;

/// Options of the subcommand.
pub struct Opts {
    pub mode: ModeArg,
    pub iterations: u32,
    pub interval_ms: u64,
    pub ring_entries: u32,
    pub vcpus: usize,
    pub slot_pages: u64,
    pub seed: u64,
    pub json: bool,
}

pub fn run(o: Opts) -> Result<bool> {
    if !vmm::kvm_available() {
        anyhow::bail!("/dev/kvm is absent: the selftest needs real KVM");
    }
    let modes: Vec<TrackerMode> = match o.mode {
        ModeArg::All => vec![
            TrackerMode::Bitmap,
            TrackerMode::ClearLog,
            TrackerMode::Ring,
        ],
        m => vec![m.mode().expect("not all")],
    };
    let mut reports: Vec<SelftestReport> = Vec::new();
    for mode in modes {
        let p = SelftestParams {
            mode,
            iterations: o.iterations,
            interval_ms: o.interval_ms,
            slot_pages: o.slot_pages,
            ring_entries: o.ring_entries,
            vcpus: o.vcpus,
            seed: o.seed,
            force_ring_full: false,
        };
        let pb = if o.json {
            ProgressBar::hidden()
        } else {
            println!(
                "== mode {} | {} iterations | slot {} pages ({} MiB, not 64-page aligned: {}) | {} vCPU(s){}",
                mode.name(),
                p.iterations,
                p.slot_pages,
                (p.slot_pages * 4096) >> 20,
                !p.slot_pages.is_multiple_of(64),
                p.vcpus,
                if mode == TrackerMode::Ring {
                    format!(" | ring {} entries", p.ring_entries)
                } else {
                    String::new()
                }
            );
            let pb = ProgressBar::new(u64::from(p.iterations));
            pb.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} iterations {elapsed}")
                    .expect("static template"),
            );
            pb
        };
        let json = o.json;
        let r = selftest::run(&p, |it| {
            pb.inc(1);
            if !json {
                let line = format!(
                    "iter {:>3}: dirty {:>7} clean {:>7} writes {:>9} ring-full exits {:>5} ring entries {:>7}",
                    it.iteration, it.dirty, it.clean, it.writes, it.ring_full_exits, it.ring_entries
                );
                if pb.is_hidden() {
                    println!("{line}");
                } else {
                    pb.println(line);
                }
            }
        })
        .with_context(|| format!("selftest mode {}", mode.name()))?;
        pb.finish_and_clear();
        if !o.json {
            let t = r.totals();
            println!(
                "total   : dirty {:>7} clean {:>7} writes {:>9} ring-full exits {:>5} ring entries {:>7} ({:.1} s)",
                t.dirty, t.clean, t.writes, t.ring_full_exits, t.ring_entries, r.seconds
            );
            match &r.failure {
                None => println!("mode {}: PASSED", mode.name()),
                Some(f) => println!("mode {}: FAILED: {f}", mode.name()),
            }
        }
        reports.push(r);
    }
    let passed = reports.iter().filter(|r| r.passed()).count();
    let failed = reports.len() - passed;
    if o.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            passed: usize,
            failed: usize,
            pvm_host: bool,
            modes: &'a [SelftestReport],
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Out {
                passed,
                failed,
                pvm_host: kvm_dirty::is_pvm_host(),
                modes: &reports
            })?
        );
    } else {
        println!("{passed} passed, {failed} failed");
    }
    Ok(failed == 0)
}
