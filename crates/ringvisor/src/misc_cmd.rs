//! The subcommands outside the VM processes and their clients: `caps`, `boot`, `gic-sim`,
//! `gic-qtest`, `selftest`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::cli_args::{seconds_arg, size_arg};
use crate::{selftest_cmd, usage_error, ModeArg};

#[derive(Serialize)]
struct Caps {
    pvm: bool,
    ring_flavor: Option<String>,
    ring_max_entries: Option<u32>,
    manual_protect2: i32,
    ring_with_bitmap: i32,
}

/// The capability a ring flavor stands for, as the kernel names it.
fn flavor_name(f: kvm_dirty::RingFlavor) -> &'static str {
    match f {
        kvm_dirty::RingFlavor::AcqRel => "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
        kvm_dirty::RingFlavor::Plain => "KVM_CAP_DIRTY_LOG_RING",
    }
}

/// `ringvisor caps`.
pub fn caps(json: bool) -> Result<i32> {
    let kvm = kvm_ioctls::Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let ring = kvm_dirty::probe_ring(&vm).ok();
    let c = Caps {
        pvm: kvm_dirty::is_pvm_host(),
        ring_flavor: ring.map(|(f, _)| flavor_name(f).to_string()),
        ring_max_entries: ring.map(|(_, m)| m),
        manual_protect2: vm
            .check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as libc::c_ulong),
        ring_with_bitmap: vm
            .check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP as libc::c_ulong),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        println!(
            "host KVM:               {}",
            if c.pvm {
                "PVM (kvm_pvm, nested)"
            } else {
                "not PVM"
            }
        );
        match ring {
            Some((f, m)) => println!(
                "dirty ring:             {}, up to {m} entries per vCPU",
                flavor_name(f)
            ),
            None => println!("dirty ring:             not offered"),
        }
        println!("manual protect 2 flags: {:#x}", c.manual_protect2);
        println!("ring with bitmap:       {}", c.ring_with_bitmap);
    }
    Ok(0)
}

/// `ringvisor boot`.
#[derive(Args, Debug)]
pub struct BootArgs {
    /// PVH kernel (ELF32 or ELF64 with a XEN_ELFNOTE_PHYS32_ENTRY note); default: the
    /// built-in test kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line (test kernel keys: ws_mb, dirty_mb, reports, cpus, exit, tick_us,
    /// period_ticks).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// An initial ramdisk (e.g. a newc cpio), passed as PVH module 0.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Feed stdin to the guest's COM1 (an interactive serial console).
    #[arg(long)]
    pub serial_stdin: bool,
    /// Guest memory.
    #[arg(long, default_value = "128M", value_parser = size_arg)]
    pub memory: u64,
    /// vCPUs (APs are started by the guest with INIT/SIPI).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    pub vcpus: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value = "60", value_parser = seconds_arg)]
    pub timeout: f64,
    /// Write the built-in test kernel to this file and exit.
    #[arg(long)]
    pub write_test_kernel: Option<PathBuf>,
}

/// `ringvisor boot`: exits with the guest's power-off status.
pub fn boot(a: BootArgs) -> Result<i32> {
    if let Some(out) = a.write_test_kernel {
        let k = pvh::test_kernel::build(&Default::default()).context("building the test kernel")?;
        std::fs::write(&out, k).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote the PVH test kernel to {}", out.display());
        return Ok(0);
    }
    let mut cfg = pvh::PvhConfig::new(Vec::new());
    cfg.serial = pvh::SerialOutput::Stdout;
    cfg.cmdline = a.cmdline;
    cfg.memory = a.memory;
    cfg.vcpus = a.vcpus as usize;
    cfg.kernel = match a.kernel {
        Some(k) => pvh::read_kernel(&k).with_context(|| format!("reading {}", k.display()))?,
        None => pvh::test_kernel::build(&Default::default()).context("building the test kernel")?,
    };
    if let Some(p) = &a.initrd {
        cfg.initrd = Some(
            pvh::read_initrd(p).with_context(|| format!("reading the initrd {}", p.display()))?,
        );
    }
    let mut vm = pvh::boot(&cfg).context("booting the PVH kernel")?;
    if a.serial_stdin {
        vm.serial_input()
            .forward_stdin()
            .context("starting the serial input thread")?;
    }
    match vm
        .run_until_exit(Some(std::time::Duration::from_secs_f64(a.timeout)))
        .context("running the guest")?
    {
        pvh::ExitStatus::PowerOff(code) => {
            eprintln!("guest powered off with status {code}");
            Ok(i32::from(code))
        }
        pvh::ExitStatus::TimedOut => {
            anyhow::bail!("the guest did not power off within {} s", a.timeout)
        }
        pvh::ExitStatus::Crashed { vcpu, detail } => {
            anyhow::bail!("the guest crashed on vCPU {vcpu}: {detail}")
        }
    }
}

fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a probability from 0 to 1")),
    }
}

/// `ringvisor gic-sim`.
#[derive(Args, Debug)]
pub struct GicSimArgs {
    /// vCPUs of the VM.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub vcpus: u64,
    /// Physical CPUs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub pcpus: u64,
    /// Redistributor groups sharing a vPE table (CommonLPIAff), 1..=pcpus.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub clusters: u64,
    /// Simulated ticks.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub ticks: u64,
    /// Scheduler time slice in ticks.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
    pub slice: u64,
    /// IPI probability per running vCPU per tick (0..=1).
    #[arg(long, default_value = "0.02", value_parser = probability)]
    pub ipi_prob: f64,
    /// MSI probability per vCPU per tick (0..=1).
    #[arg(long, default_value = "0.005", value_parser = probability)]
    pub msi_prob: f64,
    /// WFI probability per idle running vCPU per tick (0..=1).
    #[arg(long, default_value = "0.05", value_parser = probability)]
    pub wfi_prob: f64,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Modes to run (v3, v4.0, v4.1).
    #[arg(long, value_delimiter = ',', default_values_t = ["v3".to_string(), "v4.0".to_string(), "v4.1".to_string()])]
    pub modes: Vec<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `ringvisor gic-sim`: exit status 1 if an interrupt was lost or duplicated.
pub fn gic_sim(a: GicSimArgs) -> Result<i32> {
    let modes = a
        .modes
        .iter()
        .map(|m| {
            m.parse::<gic_hyp::sim::SimMode>().unwrap_or_else(|_| {
                usage_error(format!("--modes: unknown mode {m:?} (v3, v4.0, v4.1)"))
            })
        })
        .collect();
    let p = gic_hyp::sim::SimParams {
        vcpus: a.vcpus as usize,
        pcpus: a.pcpus as usize,
        clusters: a.clusters as usize,
        ticks: a.ticks,
        slice: a.slice,
        ipi_prob: a.ipi_prob,
        msi_prob: a.msi_prob,
        wfi_prob: a.wfi_prob,
        seed: a.seed,
        modes,
        ..gic_hyp::sim::SimParams::default()
    };
    let r = gic_hyp::sim::run(&p).context("gic-sim")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", r.to_markdown());
    }
    if !r.ok() {
        eprintln!("gic-sim: FAILED: an interrupt was lost or duplicated, or a doorbell repeated");
        return Ok(1);
    }
    Ok(0)
}

/// `ringvisor gic-qtest`.
pub fn gic_qtest(args: &[String]) -> Result<i32> {
    let cfg = match gic::qtest::QtestConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            // A bad option is a usage error, as clap's own.
            eprintln!("error: gic-qtest: {e}");
            return Ok(2);
        }
    };
    let s = gic::qtest::serve(std::io::stdin().lock(), std::io::stdout().lock(), &cfg)
        .context("gic-qtest")?;
    eprintln!(
        "gic-qtest: {} commands answered OK, {} failed",
        s.ok, s.failed
    );
    Ok(0)
}

/// `ringvisor selftest`.
#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// Tracking mode(s) to test.
    #[arg(long, value_enum, default_value_t = ModeArg::All)]
    pub mode: ModeArg,
    /// Iterations per mode.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub iterations: u32,
    /// Host loop interval per iteration, in ms (collect points are chosen within it).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub interval_ms: u64,
    /// Dirty ring entries per vCPU (power of two, 256..=host max).
    #[arg(long, default_value_t = 65536, value_parser = crate::cli_args::ring_entries_arg)]
    pub ring_entries: u32,
    /// vCPUs, each with its own ring.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub vcpus: u64,
    /// Test slot size in 4 KiB pages (default 1 GiB + 3 pages, deliberately not 64-page aligned).
    #[arg(long, default_value_t = (1 << 18) + 3, value_parser = clap::value_parser!(u64).range(1..=(1 << 26)))]
    pub slot_pages: u64,
    /// Seed of the host's random collect points.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `ringvisor selftest`: exit status 1 if a check failed.
pub fn selftest(a: SelftestArgs) -> Result<i32> {
    let ok = selftest_cmd::run(selftest_cmd::Opts {
        mode: a.mode,
        iterations: a.iterations,
        interval_ms: a.interval_ms,
        ring_entries: a.ring_entries,
        vcpus: a.vcpus as usize,
        slot_pages: a.slot_pages,
        seed: a.seed,
        json: a.json,
    })?;
    Ok(if ok { 0 } else { 1 })
}

/// `ringvisor tls-creds`: a fresh test CA and the five files for `--tls-creds`.
pub fn tls_creds(
    dir: &std::path::Path,
    client_name: String,
    server_names: Vec<String>,
    force: bool,
) -> Result<i32> {
    let mut opts = tls::GenerateOptions {
        client_name,
        force,
        ..tls::GenerateOptions::default()
    };
    if !server_names.is_empty() {
        opts.server_names = server_names;
    }
    let files = tls::generate(dir, &opts)?;
    for f in &files {
        println!("{}", f.display());
    }
    eprintln!(
        "TLS credentials for destination {} and source {} in {} (use --tls-creds {} on both sides)",
        opts.server_names.join("/"),
        opts.client_name,
        dir.display(),
        dir.display()
    );
    Ok(0)
}
