//! Runs issue 14's guest profile (`bench::pvh::run_third_party`) until the CLI has its
//! `--profile third-party` flag:
//! `cargo run --release -p bench --example third_party -- RINGVISOR_EXE REPEAT TRACKERS [SCENARIO...]`
//! (TRACKERS comma-separated: ring,bitmap,clear-log; a SCENARIO is a name, or a prefix ending in `*`).

use std::path::PathBuf;

struct Notes;

impl bench::Progress for Notes {
    fn step(&mut self, what: &str) {
        eprintln!("-- {what}");
    }
    fn note(&mut self, line: &str) {
        eprintln!("note: {line}");
    }
}

fn main() -> Result<(), bench::BenchError> {
    let mut args = std::env::args().skip(1);
    let exe = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "target/release/ringvisor".into()),
    );
    let repeat = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let trackers = args
        .next()
        .unwrap_or_else(|| "ring,bitmap,clear-log".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let only: Vec<String> = args.collect();
    let o = bench::pvh::PvhOpts {
        exe,
        memory: bench::pvh::THIRD_PARTY_MEMORY,
        vcpus: 1,
        trackers,
        ring_entries: 4096,
        downtime_limit: 300,
        max_bandwidth: 10 << 30,
        timeout: 60.0,
        warmup: 3.0,
        ws_mb: 256,
        dirty_mb: 0,
        period_ticks: 0,
        repeat,
        plot: None,
    };
    let r = bench::pvh::run_third_party(&o, &only, &mut Notes)?;
    print!("{}", r.to_markdown());
    Ok(())
}
