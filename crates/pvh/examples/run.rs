//! Boots a PVH kernel (or the built-in test kernel) and echoes its serial output:
//! `cargo run -p pvh --example run -- [--kernel FILE] [--cmdline STR] [--memory-mib N]
//!  [--vcpus N] [--timeout-s N]`. Exits with the guest's power-off status.

use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = pvh::PvhConfig::new(Vec::new());
    cfg.serial = pvh::SerialOutput::Stdout;
    let mut kernel = None;
    let mut timeout = 60u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--kernel" => kernel = Some(val()?),
            "--cmdline" => cfg.cmdline = val()?,
            "--memory-mib" => cfg.memory = val()?.parse::<u64>()? << 20,
            "--vcpus" => cfg.vcpus = val()?.parse()?,
            "--timeout-s" => timeout = val()?.parse()?,
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    cfg.kernel = match kernel {
        Some(k) => pvh::read_kernel(std::path::Path::new(&k))?,
        None => pvh::test_kernel::build(&Default::default())?,
    };
    let t = Instant::now();
    let mut vm = pvh::boot(&cfg)?;
    let st = vm.run_until_exit(Some(Duration::from_secs(timeout)))?;
    eprintln!("{st:?} after {:?}", t.elapsed());
    match st {
        pvh::ExitStatus::PowerOff(s) => std::process::exit(i32::from(s)),
        _ => std::process::exit(255),
    }
}
