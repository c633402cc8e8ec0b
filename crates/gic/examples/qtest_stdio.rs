//! Serves the qtest protocol on stdin/stdout (what `ringvisor gic-qtest` does):
//! `cargo run -p gic --example qtest_stdio [pes]`, then type e.g. `readl 0x08000004`.

use gic::qtest::{serve, QtestConfig};
use gic::GicConfig;

fn main() {
    let pes = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let cfg = QtestConfig {
        gic: GicConfig::virt(pes),
        ..QtestConfig::default()
    };
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    match serve(stdin.lock(), stdout.lock(), &cfg) {
        Ok(s) => eprintln!("{} commands answered OK, {} failed", s.ok, s.failed),
        Err(e) => {
            eprintln!("gic-qtest: {e}");
            std::process::exit(1);
        }
    }
}
