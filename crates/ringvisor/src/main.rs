//! The `ringvisor` command line. Libraries return typed errors; only this binary uses anyhow.
//!
//! Exit status: 0 success; 1 the operation failed (a migration failed or was cancelled, a
//! guest error, a QMP error reply, any other error); 2 only for command-line usage errors
//! (clap's, and flag combinations refused before anything starts). A PVH guest's process
//! exits with the status the guest powered off with.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

mod bench_cmd;
mod cli_args;
mod client_cmd;
mod misc_cmd;
mod replicate_cmd;
mod report;
mod selftest_cmd;
mod sys;
mod vm_cmd;

use cli_args::{
    delay_arg, limit_arg, output_arg, qmp_arg, seconds_arg, DestLimitArgs, GuestArgs, MigrateArgs,
    SeccompArg, TrackArgs,
};

/// Dirty tracking mode of `selftest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Every mode in turn.
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

/// `calc-dirty-rate`'s `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RateModeArg {
    PageSampling,
    DirtyRing,
    DirtyBitmap,
}

impl RateModeArg {
    fn name(self) -> &'static str {
        match self {
            RateModeArg::PageSampling => "page-sampling",
            RateModeArg::DirtyRing => "dirty-ring",
            RateModeArg::DirtyBitmap => "dirty-bitmap",
        }
    }
}

/// A usage error (exit status 2) for a flag combination clap cannot see: the message and
/// clap's usage line.
pub fn usage_error(msg: impl std::fmt::Display) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ValueValidation, msg)
        .exit()
}

#[derive(Parser)]
#[command(
    name = "ringvisor",
    version,
    about = "KVM dirty-ring tracking and live migration driven over QMP, and a GICv3/ITS model"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Per-thread seccomp filters (vCPU, migration, destination, monitor threads):
    /// `enforce` refuses a system call a thread does not need with EPERM and says so on
    /// stderr; `log` lets it run and has the kernel log it; `off` installs none. Default:
    /// $RINGVISOR_SECCOMP, else enforce. Passed on to the processes this one starts.
    #[arg(long, global = true, value_enum)]
    seccomp: Option<SeccompArg>,
}

/// The subcommands. Parsed once per process, so the size difference between the variants
/// (`bench migrate` has many flags) costs nothing worth a `Box`.
#[allow(clippy::large_enum_variant)]
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
    GicSim(misc_cmd::GicSimArgs),
    /// Serve QEMU's qtest line protocol on stdin/stdout against the GICv3/v4 ITS model.
    GicQtest {
        /// Model configuration (docs/gic.md): --gic-version 3|4|4.1 (4 = GICv4.0 laid out
        /// like QEMU's virt,gic-version=4), --pes N, --its N, --affinities, frame bases,
        /// --spis, --lpi-bits, for v4.x --vpeid-bits, --no-vmovp, and for v4.1
        /// --common-lpi-aff, --svpet, --no-dirty, --no-vsgi, ...
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The main demo: start a destination process and a guest that dirties memory, live-migrate
    /// it over loopback TCP with the dirty ring, print the summary.
    Demo {
        #[command(flatten)]
        guest: GuestArgs,
        #[command(flatten)]
        params: MigrateArgs,
        /// Machine-readable summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run a guest (the workload guest, or a PVH kernel with --kernel) as a VM process,
    /// driven over QMP (--qmp unix:PATH) and/or migrated once (--migrate-to).
    Run(Box<RunArgs>),
    /// Boot a PVH ELF kernel (or the project's own PVH test kernel) with a serial console,
    /// the in-kernel LAPIC/IOAPIC/PIT and several vCPUs; exit with the guest's power-off status
    /// (written to port 0x501).
    Boot(misc_cmd::BootArgs),
    /// A destination VM process: wait for an incoming migration (at once with --incoming
    /// tcp:HOST:PORT, or after QMP's migrate-incoming with --incoming defer), then run the guest.
    Incoming {
        /// tcp:HOST:PORT to listen on at once (port 0 picks a free port; the address is the
        /// first stdout line `listening HOST:PORT`, on stderr with --json), or `defer` to wait
        /// for QMP's migrate-incoming.
        #[arg(long, conflicts_with = "listen")]
        incoming: Option<String>,
        /// HOST:PORT: the same as --incoming tcp:HOST:PORT.
        #[arg(long)]
        listen: Option<String>,
        /// QMP monitor socket (unix:PATH).
        #[arg(long, value_parser = qmp_arg)]
        qmp: Option<PathBuf>,
        #[command(flatten)]
        track: TrackArgs,
        #[command(flatten)]
        limits: DestLimitArgs,
        /// Stop this many seconds after the guest resumed here (default: run until quit).
        #[arg(long, value_parser = seconds_arg)]
        duration: Option<f64>,
        /// A received PVH guest's console is appended to this file (default: stdout).
        #[arg(long)]
        console: Option<PathBuf>,
        #[command(flatten)]
        tls: cli_args::TlsArgs,
        /// Machine-readable output: one JSON document (what was received) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// A hot standby for `ringvisor run --replicate-to`: receives the full copy and the
    /// checkpoints (each applied only once complete and verified); when the primary is lost
    /// (connection closed, or silent past --heartbeat-timeout-ms) it resumes the guest from
    /// the last applied checkpoint and runs it here.
    Standby {
        /// HOST:PORT to listen on (port 0 picks one; the first stdout line is `listening
        /// HOST:PORT`, on stderr with --json).
        #[arg(long)]
        listen: String,
        /// The primary is lost after this long without a checkpoint or heartbeat, ms.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
        heartbeat_timeout_ms: u64,
        #[command(flatten)]
        track: TrackArgs,
        /// A resumed PVH guest's console is appended to this file (default: stdout).
        #[arg(long)]
        console: Option<PathBuf>,
        /// Stop this many seconds after the guest resumed here (default: run until it ends).
        #[arg(long, value_parser = seconds_arg)]
        duration: Option<f64>,
        /// Machine-readable output: one JSON document (what was applied, where it resumed).
        #[arg(long)]
        json: bool,
    },
    /// Write a fresh test CA and the five credential files of QEMU's tls-creds-x509 layout
    /// (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem; keys
    /// 0600) for --tls-creds. The CA's key is not kept.
    TlsCreds {
        /// The directory to write (created 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
        /// The source's certificate name (its CN; what --tls-authz lists).
        #[arg(long, default_value = "ringvisor-client")]
        client_name: String,
        /// A name (DNS name or IP address) the destination's certificate is valid for;
        /// repeatable (default: localhost, 127.0.0.1 and ::1).
        #[arg(long)]
        server_name: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Migrate the guest of a VM process (QMP client): set the given parameters, start the
    /// migration, show its progress until it ends. Exit status 0 only if it completed.
    Migrate {
        /// The VM process's QMP socket.
        #[arg(long, value_parser = qmp_arg)]
        qmp: PathBuf,
        /// Destination: tcp:HOST:PORT (or HOST:PORT) of a `ringvisor incoming`.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        params: MigrateArgs,
        /// Return once the migration started (follow it with `status`, stop it with `cancel`).
        #[arg(long)]
        detach: bool,
        /// Machine-readable result: one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Run state and migration progress of a VM process (pass, bytes sent, remaining, rate).
    Status {
        /// The VM process's QMP socket.
        #[arg(long, value_parser = qmp_arg)]
        qmp: PathBuf,
        /// Machine-readable: {"status": query-status, "migration": query-migrate}.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a VM process's migration; the guest keeps running there.
    Cancel {
        /// The VM process's QMP socket.
        #[arg(long, value_parser = qmp_arg)]
        qmp: PathBuf,
    },
    /// Set one migration parameter (QEMU's name; sizes and rates as K/M/G, binary), also
    /// during a migration.
    SetParameter {
        /// The VM process's QMP socket.
        #[arg(long, value_parser = qmp_arg)]
        qmp: PathBuf,
        /// e.g. max-bandwidth, downtime-limit, x-ringvisor-timeout.
        name: String,
        /// e.g. 64M, 300, true.
        value: String,
    },
    /// Dirty rate of a VM process's guest (QMP calc-dirty-rate / query-dirty-rate); without
    /// --qmp, of a fresh workload guest run once with the ring and once with the bitmap.
    Dirtyrate {
        /// The VM process's QMP socket.
        #[arg(long, value_parser = qmp_arg)]
        qmp: Option<PathBuf>,
        /// Measurement time, s (1..=60).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
        calc_time: u64,
        /// Method (with --qmp): page-sampling (QEMU's default), dirty-ring, dirty-bitmap.
        #[arg(long, value_enum, default_value_t = RateModeArg::PageSampling)]
        mode: RateModeArg,
        /// Pages sampled per GiB (page-sampling; 128..=4096; default 512).
        #[arg(long, value_parser = clap::value_parser!(u64).range(128..=4096))]
        sample_pages: Option<u64>,
        /// Without --qmp: repeat this many times.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        watch: u32,
        #[command(flatten)]
        guest: GuestArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Set or cancel the per-vCPU dirty limit of a VM process (ring tracker).
    DirtyLimit {
        /// The VM process's QMP socket.
        #[arg(long, value_parser = qmp_arg)]
        qmp: PathBuf,
        /// Limit, bytes/s (e.g. 50M = 50 MiB/s; at least 1M).
        #[arg(long, value_parser = limit_arg, conflicts_with = "cancel", required_unless_present = "cancel")]
        set: Option<u64>,
        /// Remove the limit.
        #[arg(long)]
        cancel: bool,
        /// Only this vCPU (default: all).
        #[arg(long)]
        cpu_index: Option<u64>,
        /// Machine-readable: the limits now (query-vcpu-dirty-limit).
        #[arg(long)]
        json: bool,
    },
    /// End a VM process (QMP quit).
    Quit {
        /// The VM process's QMP socket.
        #[arg(long, value_parser = qmp_arg)]
        qmp: PathBuf,
    },
    /// Port of the kernel's dirty_log_test: a guest writes the iteration number into random
    /// pages; every page must be reported exactly when it holds the current iteration.
    Selftest(misc_cmd::SelftestArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench_cmd::BenchCmd,
    },
}

/// `ringvisor run`.
#[derive(clap::Args)]
struct RunArgs {
    /// Boot this PVH kernel (ELF32/ELF64 with a XEN_ELFNOTE_PHYS32_ENTRY note) on the PVH
    /// platform instead of the workload guest; its console goes to stdout, and the process
    /// exits with the guest's power-off status. Uses --memory, --vcpus (1..=8), --tracker
    /// and the migration flags; the workload flags do not apply.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Kernel command line (with --kernel).
    #[arg(long, default_value = "", requires = "kernel")]
    cmdline: String,
    /// With --kernel: append the guest console to this file instead of stdout.
    #[arg(long, requires = "kernel")]
    console: Option<PathBuf>,
    /// With --kernel: an initial ramdisk (e.g. a newc cpio), passed as PVH module 0.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// With --kernel: feed stdin to the guest's COM1 (an interactive serial console).
    #[arg(long, requires = "kernel")]
    serial_stdin: bool,
    #[command(flatten)]
    guest: GuestArgs,
    /// QMP monitor socket (unix:PATH): `ringvisor migrate/status/cancel/... --qmp PATH` and
    /// any QMP client drive the process.
    #[arg(long, value_parser = qmp_arg)]
    qmp: Option<PathBuf>,
    /// Migrate to this destination (tcp:HOST:PORT or HOST:PORT) after --migrate-after seconds.
    #[arg(long)]
    migrate_to: Option<String>,
    /// Seconds to run before migrating (0..=1000000).
    #[arg(long, default_value = "2", value_parser = delay_arg)]
    migrate_after: f64,
    /// Start the --migrate-after clock when the guest's console first prints this text (e.g.
    /// its first progress line, or "login:"), not at start.
    #[arg(long, requires_all = ["migrate_to", "kernel"], value_parser = output_arg)]
    migrate_after_output: Option<String>,
    #[command(flatten)]
    params: MigrateArgs,
    /// Stop after this many seconds (default: run until migrated away, quit or killed).
    #[arg(long, value_parser = seconds_arg)]
    duration: Option<f64>,
    /// With --migrate-to: exit after the migration attempt (status 0 if it completed, 1 if
    /// not); without it a failed attempt leaves the guest running here.
    #[arg(long, requires = "migrate_to")]
    exit_after_migrate: bool,
    /// Per-vCPU dirty limit from the start (QEMU's set-vcpu-dirty-limit; ring tracker), e.g.
    /// 50M; change it with `ringvisor dirty-limit --qmp PATH`.
    #[arg(long = "vcpu-dirty-limit", value_parser = limit_arg)]
    vcpu_dirty_limit: Option<u64>,
    /// Replicate the guest continuously to a `ringvisor standby` at HOST:PORT: a full copy,
    /// then a checkpoint every --checkpoint-ms (a PVH guest's console is held until the
    /// checkpoint after it is applied). A lost standby is reported; the guest runs on.
    #[arg(long, conflicts_with = "migrate_to")]
    replicate_to: Option<String>,
    /// With --replicate-to: how long the guest runs between checkpoints, ms (QEMU's
    /// x-checkpoint-delay), 1..=60000.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60000), requires = "replicate_to")]
    checkpoint_ms: u64,
    /// Machine-readable output: with --migrate-to, the migration summary as one JSON document.
    #[arg(long)]
    json: bool,
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

fn run(r: RunArgs) -> Result<i32> {
    vm_cmd::run(vm_cmd::RunOpts {
        kernel: r.kernel,
        cmdline: r.cmdline,
        console: r.console,
        initrd: r.initrd,
        serial_stdin: r.serial_stdin,
        guest: r.guest,
        qmp: r.qmp,
        migrate_to: r.migrate_to,
        migrate_after: r.migrate_after,
        migrate_after_output: r.migrate_after_output,
        params: r.params,
        duration: r.duration,
        exit_after_migrate: r.exit_after_migrate,
        vcpu_dirty_limit: r.vcpu_dirty_limit,
        replicate_to: r.replicate_to,
        checkpoint_ms: r.checkpoint_ms,
        json: r.json,
    })
}

fn dispatch(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Caps { json } => misc_cmd::caps(json),
        Cmd::GicSim(a) => misc_cmd::gic_sim(a),
        Cmd::GicQtest { args } => misc_cmd::gic_qtest(&args),
        Cmd::Boot(a) => misc_cmd::boot(a),
        Cmd::Selftest(a) => misc_cmd::selftest(a),
        Cmd::Demo {
            guest,
            params,
            json,
        } => vm_cmd::demo(guest, params, json),
        Cmd::Run(r) => run(*r),
        Cmd::Incoming {
            incoming,
            listen,
            qmp,
            track,
            limits,
            duration,
            console,
            tls,
            json,
        } => vm_cmd::incoming(vm_cmd::IncomingOpts {
            incoming,
            listen,
            qmp,
            track,
            limits,
            duration,
            console,
            tls,
            json,
        }),
        Cmd::Standby {
            listen,
            heartbeat_timeout_ms,
            track,
            console,
            duration,
            json,
        } => replicate_cmd::standby(replicate_cmd::StandbyOpts {
            listen,
            heartbeat_timeout_ms,
            track,
            console,
            duration,
            json,
        }),
        Cmd::TlsCreds {
            dir,
            client_name,
            server_name,
            force,
        } => misc_cmd::tls_creds(&dir, client_name, server_name, force),
        Cmd::Migrate {
            qmp,
            to,
            params,
            detach,
            json,
        } => client_cmd::migrate(client_cmd::MigrateOpts {
            qmp,
            to,
            params,
            detach,
            json,
        }),
        Cmd::Status { qmp, json } => client_cmd::status(&qmp, json),
        Cmd::Cancel { qmp } => client_cmd::cancel(&qmp),
        Cmd::SetParameter { qmp, name, value } => client_cmd::set_parameter(&qmp, &name, &value),
        Cmd::Dirtyrate {
            qmp: Some(qmp),
            calc_time,
            mode,
            sample_pages,
            json,
            ..
        } => client_cmd::dirtyrate(&qmp, calc_time, mode.name(), sample_pages, json),
        Cmd::Dirtyrate {
            qmp: None,
            calc_time,
            sample_pages,
            watch,
            guest,
            json,
            ..
        } => client_cmd::dirtyrate_standalone(
            &guest,
            calc_time,
            sample_pages.unwrap_or(control::DEFAULT_SAMPLE_PAGES),
            watch,
            json,
        ),
        Cmd::DirtyLimit {
            qmp,
            set,
            cancel,
            cpu_index,
            json,
        } => client_cmd::dirty_limit(&qmp, set, cancel, cpu_index, json),
        Cmd::Quit { qmp } => client_cmd::quit(&qmp),
        Cmd::Bench { which } => bench_cmd::run(which),
    }
}

fn main() {
    sys::default_sigpipe();
    init_tracing();
    let cli = Cli::parse();
    if let Some(m) = cli.seccomp {
        sandbox::set_mode(m.into());
        // Child processes (demo's destination, the benchmarks' VM processes) follow suit.
        // Still single-threaded here, so changing the environment is sound.
        let name = match m {
            SeccompArg::Enforce => "enforce",
            SeccompArg::Log => "log",
            SeccompArg::Off => "off",
        };
        std::env::set_var("RINGVISOR_SECCOMP", name);
    }
    let code = match dispatch(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringvisor: error: {e:#}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
