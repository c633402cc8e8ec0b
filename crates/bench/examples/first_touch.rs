//! Prints the first-touch table: `cargo run --release -p bench --example first_touch [MiB] [runs]`
//! (the `ringvisor bench first-touch` subcommand calls the same function).

fn main() -> Result<(), bench::BenchError> {
    let mut args = std::env::args().skip(1);
    let mib = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let runs = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let r = bench::sync::first_touch(
        &bench::sync::TouchOpts { mib, runs },
        &mut bench::NoProgress,
    )?;
    print!("{}", r.to_markdown());
    Ok(())
}
