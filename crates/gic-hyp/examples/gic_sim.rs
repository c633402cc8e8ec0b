//! Runs the default `gic-sim` and prints its markdown table (and JSON with `--json`).
//! `cargo run -p gic-hyp --example gic_sim -- [seed]`

fn main() {
    let mut p = gic_hyp::sim::SimParams::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(seed) = args.iter().find_map(|a| a.parse::<u64>().ok()) {
        p.seed = seed;
    }
    match gic_hyp::sim::run(&p) {
        Ok(r) => {
            print!("{}", r.to_markdown());
            if args.iter().any(|a| a == "--json") {
                match serde_json::to_string_pretty(&r) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("json: {e}"),
                }
            }
            if !r.ok() {
                eprintln!("CHECK FAILED");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("gic-sim: {e}");
            std::process::exit(2);
        }
    }
}
