//! The `ringvisor` command line. Libraries return typed errors; only this binary uses anyhow.

use std::io::Write;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

mod bench_cmd;
mod guest_cmd;
mod pvh_cmd;
mod selftest_cmd;

/// clap parser for sizes (`4096`, `256M`, `1G`, `1.5GiB`).
pub fn size_arg(s: &str) -> std::result::Result<u64, String> {
    migration::units::parse_size(s).map_err(|e| e.to_string())
}

/// clap parser for rates (`800MiB/s`, `1Gbit/s`, `128M`, `0` or `unlimited`).
pub fn bandwidth_arg(s: &str) -> std::result::Result<u64, String> {
    migration::units::parse_bandwidth(s).map_err(|e| e.to_string())
}

/// Dirty tracking mode on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Every mode in turn (selftest only).
    All,
    /// Per-vCPU dirty ring.
    Ring,
    /// KVM_GET_DIRTY_LOG.
    Bitmap,
    /// KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (manual protect).
    ClearLog,
}

impl ModeArg {
    /// The tracker mode (None for `all`).
    pub fn mode(self) -> Option<kvm_dirty::TrackerMode> {
        match self {
            ModeArg::All => None,
            ModeArg::Ring => Some(kvm_dirty::TrackerMode::Ring),
            ModeArg::Bitmap => Some(kvm_dirty::TrackerMode::Bitmap),
            ModeArg::ClearLog => Some(kvm_dirty::TrackerMode::ClearLog),
        }
    }
}

#[derive(Parser)]
#[command(
    name = "ringvisor",
    version,
    about = "KVM dirty-ring tracking and a GICv3/ITS model"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Report this host's KVM dirty-tracking capabilities (ring sizes, manual protect, PVM).
    Caps {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// GICv4.1 simulation: N vCPUs over M physical CPUs with IPIs, device MSIs and WFI, run
    /// with GICv3 software delivery, GICv4.0-style direct vLPIs and GICv4.1 (vSGIs, per-vPE
    /// doorbells); checks that no interrupt is lost or duplicated.
    GicSim {
        /// vCPUs of the VM.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64))]
        vcpus: u64,
        /// Physical CPUs.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
        pcpus: u64,
        /// Redistributor groups sharing a vPE table (CommonLPIAff), 1..=pcpus.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
        clusters: u64,
        /// Simulated ticks.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        ticks: u64,
        /// Scheduler time slice in ticks.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
        slice: u64,
        /// IPI probability per running vCPU per tick.
        #[arg(long, default_value_t = 0.02)]
        ipi_prob: f64,
        /// MSI probability per vCPU per tick.
        #[arg(long, default_value_t = 0.005)]
        msi_prob: f64,
        /// WFI probability per idle running vCPU per tick.
        #[arg(long, default_value_t = 0.05)]
        wfi_prob: f64,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Modes to run (v3, v4.0, v4.1).
        #[arg(long, value_delimiter = ',', default_values_t = ["v3".to_string(), "v4.0".to_string(), "v4.1".to_string()])]
        modes: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Serve QEMU's qtest line protocol on stdin/stdout against the GICv3/ITS model.
    GicQtest {
        /// Number of PEs (redistributors) in the model.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=512))]
        pes: u32,
    },
    /// The main demo: start a destination process and a guest that dirties memory, live-migrate
    /// it over loopback TCP with the dirty ring, print the summary.
    Demo {
        #[command(flatten)]
        guest: guest_cmd::GuestArgs,
        #[command(flatten)]
        params: guest_cmd::MigrateArgs,
        /// Machine-readable summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run the workload guest (optionally migrating it, or taking commands on a control socket).
    Run {
        /// Boot this PVH kernel (ELF32/ELF64 with a XEN_ELFNOTE_PHYS32_ENTRY note) on the PVH
        /// platform instead of the workload guest; its console goes to stdout, and the process
        /// exits with the guest's power-off status. Uses --memory, --vcpus (1..=8), --tracker
        /// and the migration flags; the workload flags do not apply.
        #[arg(long)]
        kernel: Option<std::path::PathBuf>,
        /// Kernel command line (with --kernel).
        #[arg(long, default_value = "", requires = "kernel")]
        cmdline: String,
        /// With --kernel: append the guest console to this file instead of stdout.
        #[arg(long, requires = "kernel")]
        console: Option<std::path::PathBuf>,
        #[command(flatten)]
        guest: guest_cmd::GuestArgs,
        /// Unix socket accepting commands (`ringvisor migrate --control PATH`).
        #[arg(long)]
        control: Option<std::path::PathBuf>,
        /// Migrate to this destination (ADDR:PORT) after --migrate-after seconds.
        #[arg(long)]
        migrate_to: Option<String>,
        /// Seconds to run before migrating.
        #[arg(long, default_value_t = 2.0)]
        migrate_after: f64,
        #[command(flatten)]
        params: guest_cmd::MigrateArgs,
        /// Stop after this many seconds (default: run until migrated, quit or killed).
        #[arg(long)]
        duration: Option<f64>,
        /// With --migrate-to: exit after the migration attempt even if it did not complete.
        #[arg(long)]
        exit_after_migrate: bool,
        /// Per-vCPU dirty limit from the start (QEMU's set-vcpu-dirty-limit; ring tracker),
        /// e.g. 50M; change it later with `ringvisor dirty-limit --control PATH`.
        #[arg(long = "vcpu-dirty-limit", value_parser = bandwidth_arg)]
        vcpu_dirty_limit: Option<u64>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Boot a PVH ELF kernel (or the project's own PVH test kernel) with a serial console,
    /// the in-kernel LAPIC/IOAPIC/PIT and several vCPUs; exit with the guest's power-off status
    /// (written to port 0x501).
    Boot {
        /// PVH kernel (ELF32 or ELF64 with a XEN_ELFNOTE_PHYS32_ENTRY note); default: the
        /// built-in test kernel.
        #[arg(long)]
        kernel: Option<std::path::PathBuf>,
        /// Kernel command line (test kernel keys: ws_mb, dirty_mb, reports, cpus, exit,
        /// tick_us, period_ticks).
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Guest memory.
        #[arg(long, default_value = "128M", value_parser = size_arg)]
        memory: u64,
        /// vCPUs (APs are started by the guest with INIT/SIPI).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
        vcpus: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Write the built-in test kernel to this file and exit.
        #[arg(long)]
        write_test_kernel: Option<std::path::PathBuf>,
    },
    /// Wait for one incoming migration on ADDR:PORT, resume the guest and keep running it.
    Incoming {
        /// Address to listen on (port 0 picks a free port; the first stdout line names it).
        #[arg(long)]
        listen: String,
        #[command(flatten)]
        track: guest_cmd::TrackArgs,
        /// Stop this many seconds after the resume (default: run until killed).
        #[arg(long)]
        duration: Option<f64>,
        /// A received PVH guest's console is appended to this file (default: stdout).
        #[arg(long)]
        console: Option<std::path::PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Tell a running `ringvisor run --control PATH` to migrate its guest to ADDR:PORT.
    Migrate {
        /// The source's control socket.
        #[arg(long)]
        control: std::path::PathBuf,
        /// Destination (a `ringvisor incoming --listen`).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        params: guest_cmd::MigrateArgs,
        /// Machine-readable summary.
        #[arg(long)]
        json: bool,
    },
    /// Dirty rate of a guest, measured three ways: the ring (exact, per vCPU), the bitmap (per
    /// VM) and page sampling. With --control, of a running `ringvisor run`; otherwise of a
    /// fresh workload guest run once with the ring and once with the bitmap.
    Dirtyrate {
        #[command(flatten)]
        guest: guest_cmd::GuestArgs,
        /// A running guest's control socket.
        #[arg(long)]
        control: Option<std::path::PathBuf>,
        /// Measurement window in ms.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
        window_ms: u64,
        /// Pages sampled per GiB for the sampling method (QEMU's default is 512).
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=262_144))]
        samples_per_gib: u64,
        /// Repeat this many times (continuous measurement).
        #[arg(long, default_value_t = 1)]
        watch: u32,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Set or cancel the per-vCPU dirty limit of a running `ringvisor run --control PATH`.
    DirtyLimit {
        /// The guest's control socket.
        #[arg(long)]
        control: std::path::PathBuf,
        /// Per-vCPU quota, e.g. 50M (bytes/s).
        #[arg(long, value_parser = bandwidth_arg, conflicts_with = "cancel")]
        set: Option<u64>,
        /// Remove the limit.
        #[arg(long)]
        cancel: bool,
    },
    /// Port of the kernel's dirty_log_test: a guest writes the iteration number into random
    /// pages; every page must be reported exactly when it holds the current iteration.
    Selftest {
        /// Tracking mode(s) to test.
        #[arg(long, value_enum, default_value_t = ModeArg::All)]
        mode: ModeArg,
        /// Iterations per mode.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        iterations: u32,
        /// Host loop interval per iteration, in ms (collect points are chosen within it).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        interval_ms: u64,
        /// Dirty ring entries per vCPU (power of two, 256..=host max).
        #[arg(long, default_value_t = 65536)]
        ring_entries: u32,
        /// vCPUs, each with its own ring.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
        vcpus: u64,
        /// Test slot size in 4 KiB pages (default 1 GiB + 3 pages, deliberately not 64-page aligned).
        #[arg(long, default_value_t = (1 << 18) + 3, value_parser = clap::value_parser!(u64).range(1..=(1 << 26)))]
        slot_pages: u64,
        /// Seed of the host's random collect points.
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// QEMU's dirty-limit table shape: migration time versus dirty rate with `--dirty-limit
    /// auto` (ring), `--auto-converge` (bitmap) and no throttle, on a shaped link, plus the
    /// slowdown of a vCPU that does not dirty.
    Dirtylimit {
        /// Dirty rates of vCPU 0 in MB/s.
        #[arg(long, value_delimiter = ',', default_values_t = [60u64, 70, 90, 110])]
        rates: Vec<u64>,
        /// Guest memory in GiB (vCPU 0 dirties random pages over all of it).
        #[arg(long, default_value_t = 1)]
        memory_gib: u64,
        /// `loopback` or a tc rate for two namespaces joined by a veth pair.
        #[arg(long, default_value = "1gbit")]
        link: String,
        /// Seconds before a non-converging migration is aborted.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Write an SVG plot here.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Live-migration matrix: every (memory, dirty rate, written set, tracker), each a real
    /// source and destination process, on loopback or a tc-shaped veth between namespaces.
    Migrate {
        /// Guest memory sizes in GiB.
        #[arg(long, value_delimiter = ',', default_values_t = [1u64, 4])]
        memory_gib: Vec<u64>,
        /// Guest dirty rates in MB/s (10^6 bytes).
        #[arg(long, value_delimiter = ',', default_values_t = [0u64, 50, 200, 800])]
        rates: Vec<u64>,
        /// Written sets: `all` (random over all memory) and/or a hot-set size like `256M`.
        #[arg(long, value_delimiter = ',', default_values_t = ["all".to_string(), "256M".to_string()])]
        sets: Vec<String>,
        /// Trackers to compare.
        #[arg(long, value_delimiter = ',', default_values_t = ["ring".to_string(), "bitmap".to_string(), "clear-log".to_string()])]
        trackers: Vec<String>,
        /// Dirty ring entries per vCPU.
        #[arg(long, default_value_t = 65536)]
        ring_entries: u32,
        /// Guest vCPUs.
        #[arg(long, default_value_t = 2)]
        vcpus: u64,
        /// `loopback`, or a tc rate (`1gbit`, `10gbit`) for two namespaces joined by a veth pair.
        #[arg(long, default_value = "loopback")]
        link: String,
        /// Seconds before a non-converging migration is aborted.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// downtime-limit in ms.
        #[arg(long, default_value_t = 300)]
        downtime_limit: u64,
        /// Write an SVG plot here.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// max-bandwidth for every migration (e.g. 128M).
        #[arg(long)]
        max_bandwidth: Option<String>,
        /// dirty-limit for every migration: off, auto or a per-vCPU rate.
        #[arg(long)]
        dirty_limit: Option<String>,
        /// auto-converge for bitmap trackers.
        #[arg(long)]
        auto_converge: bool,
        /// The PVH-guest rows instead of the matrix: the project's PVH test kernel under
        /// ringvisor and under QEMU (`qemu-system-x86_64 -accel kvm[,dirty-ring-size=N]
        /// -kernel`), idle and dirtying, per tracker, with the same downtime-limit and
        /// max-bandwidth (default 1G for this comparison).
        #[arg(long)]
        pvh: bool,
        /// PVH rows: guest memory.
        #[arg(long, default_value = "512M", value_parser = size_arg)]
        pvh_memory: u64,
        /// PVH rows: working set per vCPU in MiB (test kernel `ws_mb`).
        #[arg(long, default_value_t = 32)]
        pvh_ws_mb: u64,
        /// PVH rows, dirtying: MiB each vCPU writes per report (`dirty_mb`).
        #[arg(long, default_value_t = 2)]
        pvh_dirty_mb: u64,
        /// PVH rows: 1 ms timer ticks per report (`period_ticks`).
        #[arg(long, default_value_t = 20)]
        pvh_period_ticks: u64,
        /// PVH rows: seconds the guest runs before the migration.
        #[arg(long, default_value_t = 1.0)]
        pvh_warmup: f64,
        /// PVH rows: migrations per cell (the table shows medians).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
        repeat: u32,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Dirty-log sync cost versus guest size: one collect + re-protect per mode (real KVM).
    Sync {
        /// Guest memory sizes in GiB (sparse; only touched pages cost RAM).
        #[arg(long, value_delimiter = ',', default_values_t = [1u64, 4, 16, 64])]
        sizes_gib: Vec<u64>,
        /// Dirty pages per collect, spread evenly over the slot.
        #[arg(long, default_value_t = 4096)]
        dirty_pages: u64,
        /// Measured collects per cell (median reported).
        #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u64).range(1..=1000))]
        runs: u64,
        /// Dirty ring entries per vCPU.
        #[arg(long, default_value_t = 65536)]
        ring_entries: u32,
        /// Write an SVG plot here.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// GIC model throughput: ITS commands/s and LPIs delivered (MSI to IAR/EOI) per second.
    Gic {
        /// Number of PEs.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=512))]
        pes: u32,
        /// ITS commands to execute.
        #[arg(long, default_value_t = 2_000_000)]
        its_commands: u64,
        /// LPIs to deliver end to end.
        #[arg(long, default_value_t = 1_000_000)]
        lpis: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct Caps {
    pvm: bool,
    ring_flavor: Option<String>,
    ring_max_entries: Option<u32>,
    manual_protect2: i32,
    ring_with_bitmap: i32,
}

fn caps(json: bool) -> Result<()> {
    let kvm = kvm_ioctls::Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let ring = kvm_dirty::probe_ring(&vm).ok();
    let c = Caps {
        pvm: kvm_dirty::is_pvm_host(),
        ring_flavor: ring.map(|(f, _)| format!("{f:?}")),
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
            Some((f, m)) => println!("dirty ring:             {f:?}, up to {m} entries per vCPU"),
            None => println!("dirty ring:             not offered"),
        }
        println!("manual protect 2 flags: {:#x}", c.manual_protect2);
        println!("ring with bitmap:       {}", c.ring_with_bitmap);
    }
    Ok(())
}

/// Diagnostics of the libraries (`tracing`) on stderr, filtered by `RUST_LOG`; warnings and
/// errors only by default.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> Result<()> {
    // SAFETY: restoring the default SIGPIPE disposition before any thread exists, so that
    // `ringvisor ... | head` ends quietly instead of panicking on a closed stdout.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    init_tracing();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Caps { json } => caps(json),
        Cmd::Boot {
            kernel,
            cmdline,
            memory,
            vcpus,
            timeout,
            write_test_kernel,
        } => {
            if let Some(out) = write_test_kernel {
                let k = pvh::test_kernel::build(&Default::default())
                    .context("building the test kernel")?;
                std::fs::write(&out, k).with_context(|| format!("writing {}", out.display()))?;
                println!("wrote the PVH test kernel to {}", out.display());
                return Ok(());
            }
            if !(timeout.is_finite() && timeout > 0.0) {
                anyhow::bail!("--timeout must be a positive number of seconds");
            }
            let mut cfg = pvh::PvhConfig::new(Vec::new());
            cfg.serial = pvh::SerialOutput::Stdout;
            cfg.cmdline = cmdline;
            cfg.memory = memory;
            cfg.vcpus = vcpus as usize;
            cfg.kernel = match kernel {
                Some(k) => {
                    pvh::read_kernel(&k).with_context(|| format!("reading {}", k.display()))?
                }
                None => pvh::test_kernel::build(&Default::default())
                    .context("building the test kernel")?,
            };
            let mut vm = pvh::boot(&cfg).context("booting the PVH kernel")?;
            match vm
                .run_until_exit(Some(std::time::Duration::from_secs_f64(timeout)))
                .context("running the guest")?
            {
                pvh::ExitStatus::PowerOff(code) => {
                    eprintln!("guest powered off with status {code}");
                    std::process::exit(i32::from(code));
                }
                other => anyhow::bail!("guest did not power off: {other:?}"),
            }
        }
        Cmd::Dirtyrate {
            guest,
            control,
            window_ms,
            samples_per_gib,
            watch,
            json,
        } => guest_cmd::dirtyrate(guest_cmd::DirtyrateOpts {
            guest,
            control,
            window_ms,
            samples_per_gib,
            watch,
            json,
        }),
        Cmd::DirtyLimit {
            control,
            set,
            cancel,
        } => {
            if set.is_none() && !cancel {
                anyhow::bail!("give --set RATE or --cancel");
            }
            let v = guest_cmd::control(
                &control,
                &guest_cmd::ControlRequest::SetDirtyLimit { bytes_per_s: set },
            )?;
            println!("{v}");
            Ok(())
        }
        Cmd::GicSim {
            vcpus,
            pcpus,
            clusters,
            ticks,
            slice,
            ipi_prob,
            msi_prob,
            wfi_prob,
            seed,
            modes,
            json,
        } => {
            for (name, p) in [
                ("ipi-prob", ipi_prob),
                ("msi-prob", msi_prob),
                ("wfi-prob", wfi_prob),
            ] {
                if !(0.0..=1.0).contains(&p) {
                    anyhow::bail!("--{name} must be a probability in 0..=1, got {p}");
                }
            }
            let modes = modes
                .iter()
                .map(|m| {
                    m.parse::<gic_hyp::sim::SimMode>().map_err(|_| {
                        anyhow::anyhow!("--modes: unknown mode {m:?} (v3, v4.0, v4.1)")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let p = gic_hyp::sim::SimParams {
                vcpus: vcpus as usize,
                pcpus: pcpus as usize,
                clusters: clusters as usize,
                ticks,
                slice,
                ipi_prob,
                msi_prob,
                wfi_prob,
                seed,
                modes,
                ..gic_hyp::sim::SimParams::default()
            };
            let r = gic_hyp::sim::run(&p).context("gic-sim")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.to_markdown());
            }
            if !r.ok() {
                eprintln!(
                    "gic-sim: FAILED: an interrupt was lost or duplicated, or a doorbell repeated"
                );
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Demo {
            guest,
            params,
            json,
        } => {
            if !guest_cmd::demo(guest, params, json)? {
                std::process::exit(2);
            }
            Ok(())
        }
        Cmd::Run {
            kernel: Some(kernel),
            cmdline,
            console,
            guest,
            control,
            migrate_to,
            migrate_after,
            params,
            duration,
            exit_after_migrate,
            vcpu_dirty_limit,
            json,
        } => {
            let code = pvh_cmd::run(pvh_cmd::PvhRunOpts {
                kernel,
                cmdline,
                console,
                memory: guest.memory,
                vcpus: guest.vcpus,
                track: guest.track,
                control,
                migrate_to,
                migrate_after,
                params,
                duration,
                exit_after_migrate,
                dirty_limit: vcpu_dirty_limit,
                json,
            })?;
            std::process::exit(code);
        }
        Cmd::Run {
            kernel: None,
            cmdline: _,
            console: _,
            guest,
            control,
            migrate_to,
            migrate_after,
            params,
            duration,
            exit_after_migrate,
            vcpu_dirty_limit,
            json,
        } => guest_cmd::run(guest_cmd::RunOpts {
            dirty_limit: vcpu_dirty_limit,
            guest,
            control,
            migrate_to,
            migrate_after,
            params,
            duration,
            exit_after_migrate,
            json,
        }),
        Cmd::Incoming {
            listen,
            track,
            duration,
            console,
            json,
        } => guest_cmd::incoming(guest_cmd::IncomingOpts {
            listen,
            track,
            duration,
            console,
            json,
        }),
        Cmd::Migrate {
            control,
            to,
            params,
            json,
        } => {
            if !guest_cmd::migrate_cmd(&control, &to, params, json)? {
                std::process::exit(2);
            }
            Ok(())
        }
        Cmd::Selftest {
            mode,
            iterations,
            interval_ms,
            ring_entries,
            vcpus,
            slot_pages,
            seed,
            json,
        } => {
            let ok = selftest_cmd::run(selftest_cmd::Opts {
                mode,
                iterations,
                interval_ms,
                ring_entries,
                vcpus: vcpus as usize,
                slot_pages,
                seed,
                json,
            })?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::GicQtest { pes } => {
            let cfg = gic::qtest::QtestConfig {
                gic: gic::GicConfig::virt(pes as usize),
                ..gic::qtest::QtestConfig::default()
            };
            let s = gic::qtest::serve(std::io::stdin().lock(), std::io::stdout().lock(), &cfg)
                .context("gic-qtest")?;
            eprintln!(
                "gic-qtest: {} commands answered OK, {} failed",
                s.ok, s.failed
            );
            Ok(())
        }
        Cmd::Bench {
            which:
                BenchCmd::Dirtylimit {
                    rates,
                    memory_gib,
                    link,
                    timeout,
                    plot,
                    json,
                },
        } => bench_cmd::dirtylimit(
            bench::migrate::LimitOpts {
                exe: std::env::current_exe()?,
                rates_mb: rates,
                memory_gib,
                link,
                timeout,
                plot,
            },
            json,
        ),
        Cmd::Bench {
            which:
                BenchCmd::Migrate {
                    memory_gib,
                    rates,
                    sets,
                    trackers,
                    ring_entries,
                    vcpus,
                    link,
                    timeout,
                    downtime_limit,
                    plot,
                    max_bandwidth,
                    dirty_limit,
                    auto_converge,
                    pvh,
                    pvh_memory,
                    pvh_ws_mb,
                    pvh_dirty_mb,
                    pvh_period_ticks,
                    pvh_warmup,
                    repeat,
                    json,
                },
        } => {
            let exe = std::env::current_exe()?;
            if pvh {
                let bw = match &max_bandwidth {
                    Some(b) => {
                        bandwidth_arg(b).map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?
                    }
                    None => 1_000_000_000,
                };
                return bench_cmd::pvh(
                    bench::pvh::PvhOpts {
                        exe,
                        memory: pvh_memory,
                        vcpus,
                        trackers,
                        ring_entries,
                        downtime_limit,
                        max_bandwidth: bw,
                        timeout,
                        warmup: pvh_warmup,
                        ws_mb: pvh_ws_mb,
                        dirty_mb: pvh_dirty_mb,
                        period_ticks: pvh_period_ticks,
                        repeat,
                        plot,
                    },
                    json,
                );
            }
            if let Some(b) = &max_bandwidth {
                bandwidth_arg(b).map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?;
            }
            for s in &sets {
                if s != "all" {
                    size_arg(s).map_err(|e| anyhow::anyhow!("--sets: {e}"))?;
                }
            }
            bench_cmd::migrate(
                bench::migrate::MigrateOpts {
                    exe,
                    memory_gib,
                    rates_mb: rates,
                    sets,
                    trackers,
                    ring_entries,
                    vcpus,
                    link,
                    timeout,
                    downtime_limit,
                    plot,
                    max_bandwidth,
                    dirty_limit,
                    auto_converge,
                },
                json,
            )
        }
        Cmd::Bench {
            which:
                BenchCmd::Sync {
                    sizes_gib,
                    dirty_pages,
                    runs,
                    ring_entries,
                    plot,
                    json,
                },
        } => bench_cmd::sync(
            bench::sync::SyncOpts {
                sizes_gib,
                dirty_pages,
                runs: runs as usize,
                ring_entries,
                plot,
            },
            json,
        ),
        Cmd::Bench {
            which:
                BenchCmd::Gic {
                    pes,
                    its_commands,
                    lpis,
                    json,
                },
        } => {
            let p = gic::bench::BenchParams {
                pes: pes as usize,
                its_commands,
                lpis,
                ..gic::bench::BenchParams::default()
            };
            let r = gic::bench::run(&p).context("GIC benchmark")?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
            } else {
                writeln!(out, "{}", r.to_markdown())?;
            }
            Ok(())
        }
    }
}
