//! Prints the model benchmark as a markdown table (the same function `ringvisor bench gic`
//! calls): `cargo run --release -p gic --example bench_gic [pes] [its_commands] [lpis]`.

use gic::bench::{run, BenchParams};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mut p = BenchParams::default();
    if let Some(v) = args.first() {
        p.pes = *v as usize;
    }
    if let Some(v) = args.get(1) {
        p.its_commands = *v;
    }
    if let Some(v) = args.get(2) {
        p.lpis = *v;
    }
    match run(&p) {
        Ok(r) => print!("{}", r.to_markdown()),
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
