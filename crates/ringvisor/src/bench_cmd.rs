//! `ringvisor bench dirtylimit|migrate|sync`: clap arguments -> `bench` options -> run ->
//! print. The benchmarks themselves live in the `bench` crate.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::cli_args::{bandwidth_arg, limit_arg, mib_arg, ring_entries_arg, seconds_arg, size_arg};
use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr (hidden with `--json` or when stderr is not a terminal); notes go
/// above it, or to stderr when it is hidden.
pub struct Bar {
    pb: ProgressBar,
    hidden: bool,
}

impl Bar {
    /// A bar, hidden when the output is JSON.
    pub fn new(json: bool) -> Bar {
        Bar {
            pb: ProgressBar::hidden(),
            hidden: json,
        }
    }
}

impl bench::Progress for Bar {
    fn start(&mut self, total: u64, unit: &'static str) {
        if self.hidden {
            return;
        }
        self.pb = ProgressBar::new(total);
        let template = match unit {
            "collects" => "{bar:30} {pos}/{len} collects {elapsed}".to_string(),
            u => format!("{{bar:30}} {{pos}}/{{len}} {u} {{elapsed}} {{msg}}"),
        };
        if let Ok(style) = ProgressStyle::with_template(&template) {
            self.pb.set_style(style);
        }
    }

    fn step(&mut self, what: &str) {
        self.pb.set_message(what.to_string());
    }

    fn inc(&mut self) {
        self.pb.inc(1);
    }

    fn note(&mut self, line: &str) {
        if self.pb.is_hidden() {
            eprintln!("{line}");
        } else {
            self.pb.println(line);
        }
    }

    fn finish(&mut self) {
        self.pb.finish_and_clear();
    }
}

/// Prints a report as pretty JSON or as its markdown.
pub fn print<T: serde::Serialize>(
    json: bool,
    value: &T,
    markdown: impl FnOnce() -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", markdown());
    }
    Ok(())
}

/// `ringvisor bench migrate` (without `--pvh`).
pub fn migrate(o: bench::migrate::MigrateOpts, json: bool) -> Result<()> {
    let r = bench::migrate::run(&o, &mut Bar::new(json))?;
    print(json, &r, || r.to_markdown())
}

/// `ringvisor bench migrate --pvh [--profile third-party [--scenarios A;B*]]`.
pub fn pvh(profile: &str, scenarios: &[String], o: bench::pvh::PvhOpts, json: bool) -> Result<()> {
    let r = if profile == "third-party" {
        bench::pvh::run_third_party(&o, scenarios, &mut Bar::new(json))?
    } else {
        bench::pvh::run(&o, &mut Bar::new(json))?
    };
    print(json, &r, || r.to_markdown())
}

/// The Linux rows' options but the guest, which is looked up first.
pub struct LinuxArgs {
    exe: std::path::PathBuf,
    memory: u64,
    vcpus: u64,
    trackers: Vec<String>,
    ring_entries: u32,
    downtime_limit: u64,
    max_bandwidth: u64,
    timeout: f64,
    period_ms: u64,
    dirty_kb: u64,
    repeat: u32,
    boots: u32,
    idle: bool,
    dirtying: bool,
}

/// `ringvisor bench migrate --linux`: a guest that is not built is a skip (a note, exit
/// status 0), not a failure.
pub fn linux(dir: Option<&std::path::Path>, a: LinuxArgs, json: bool) -> Result<()> {
    let mut bar = Bar::new(json);
    let guest = match bench::linux::find_guest(dir, &mut bar) {
        Ok(g) => g,
        Err(e @ bench::BenchError::NoLinuxGuest(_)) => {
            eprintln!("SKIP(linux): bench migrate --linux: {e}; build it with scripts/linux-guest/build.sh");
            if json {
                println!("{}", serde_json::json!({ "skipped": e.to_string() }));
            }
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let o = bench::linux::LinuxOpts {
        exe: a.exe,
        guest,
        memory: a.memory,
        vcpus: a.vcpus,
        trackers: a.trackers,
        ring_entries: a.ring_entries,
        downtime_limit: a.downtime_limit,
        max_bandwidth: a.max_bandwidth,
        timeout: a.timeout,
        period_ms: a.period_ms,
        dirty_kb: a.dirty_kb,
        repeat: a.repeat,
        boots: a.boots,
        idle: a.idle,
        dirtying: a.dirtying,
        // Two minutes on a quiet PVM host, several times that on a loaded one.
        boot_timeout: 1200.0,
    };
    let r = bench::linux::run(&o, &mut bar)?;
    print(json, &r, || r.to_markdown())
}

/// `ringvisor bench first-touch`.
pub fn first_touch(mib: u64, runs: u32, json: bool) -> Result<()> {
    let o = bench::sync::TouchOpts {
        mib,
        runs: runs as usize,
    };
    let r = bench::sync::first_touch(&o, &mut Bar::new(json))?;
    print(json, &r, || r.to_markdown())
}

/// `ringvisor bench dirtylimit` (its JSON is the rows only).
pub fn dirtylimit(o: bench::migrate::LimitOpts, json: bool) -> Result<()> {
    let r = bench::migrate::run_dirtylimit(&o, &mut Bar::new(json))?;
    print(json, &r.rows, || r.to_markdown())
}

/// `ringvisor bench sync`.
pub fn sync(o: bench::sync::SyncOpts, json: bool) -> Result<()> {
    let r = bench::sync::run(&o, &mut Bar::new(json))?;
    print(json, &r, || bench::sync::to_markdown(&r, o.plot.as_deref()))
}

/// `--max-bandwidth` of `bench migrate`: checked here (a usage error), passed on as given.
fn checked_bandwidth(s: &str) -> Result<String, String> {
    bandwidth_arg(s).map(|_| s.to_string())
}

/// `--dirty-limit` of `bench migrate`: `off`, `auto` or a per-vCPU rate of at least 1 MiB/s.
fn checked_dirty_limit(s: &str) -> Result<String, String> {
    match s {
        "off" | "auto" => Ok(s.to_string()),
        _ => limit_arg(s)
            .map(|_| s.to_string())
            .map_err(|e| format!("{e}; or off, auto")),
    }
}

/// The `bench` subcommands. Parsed once per process, so the size difference between the
/// variants (`Migrate` has many flags) costs nothing worth a `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum BenchCmd {
    /// QEMU's dirty-limit table shape: migration time versus dirty rate with `--dirty-limit
    /// auto` (ring), `--auto-converge` (bitmap) and no throttle, on a shaped link, plus the
    /// slowdown of a vCPU that does not dirty.
    Dirtylimit {
        /// Dirty rates of vCPU 0 in MB/s.
        #[arg(long, value_delimiter = ',', default_values_t = [60u64, 70, 90, 110], value_parser = clap::value_parser!(u64).range(0..=100_000))]
        rates: Vec<u64>,
        /// Guest memory in GiB (vCPU 0 dirties random pages over all of it).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
        memory_gib: u64,
        /// `loopback` or a tc rate for two namespaces joined by a veth pair.
        #[arg(long, default_value = "1gbit")]
        link: String,
        /// Seconds before a non-converging migration is aborted.
        #[arg(long, default_value = "60", value_parser = seconds_arg)]
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
    Migrate(MigrateArgs),
    /// Dirty-log sync cost versus guest size: one collect + re-protect per mode (real KVM).
    Sync {
        /// Guest memory sizes in GiB (sparse; only touched pages cost RAM).
        #[arg(long, value_delimiter = ',', default_values_t = [1u64, 4, 16, 64], value_parser = clap::value_parser!(u64).range(1..=1024))]
        sizes_gib: Vec<u64>,
        /// Dirty pages per collect, spread evenly over the slot.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=(1 << 28)))]
        dirty_pages: u64,
        /// Measured collects per cell (median reported).
        #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u64).range(1..=1000))]
        runs: u64,
        /// Dirty ring entries per vCPU.
        #[arg(long, default_value_t = 65536, value_parser = ring_entries_arg)]
        ring_entries: u32,
        /// Write an SVG plot here.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// First touch of guest RAM from inside a guest: 4 KiB pages versus transparent huge
    /// pages (real KVM).
    FirstTouch {
        /// Guest memory to touch (whole MiB).
        #[arg(long = "memory", default_value = "1G", value_parser = mib_arg)]
        memory_mib: u64,
        /// Guests per backing (median reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
        runs: u32,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Continuous replication per checkpoint (real KVM, in process, loopback standby that
    /// verifies and discards): pause (median, p99; collect/copy/state), pause-to-ack latency,
    /// bytes, stalls, the guest's progress versus unreplicated; per tracker, guest size
    /// (sparse), dirty pages per epoch and epoch. Then failover times with a real standby.
    Replicate {
        /// Trackers.
        #[arg(long, value_delimiter = ',', default_values_t = ["ring".to_string(), "bitmap".to_string(), "clear-log".to_string()])]
        trackers: Vec<String>,
        /// Guest sizes in GiB (sparse).
        #[arg(long, value_delimiter = ',', default_values_t = [1u64, 4, 16])]
        sizes_gib: Vec<u64>,
        /// Target dirty pages per epoch.
        #[arg(long, value_delimiter = ',', default_values_t = [64u64, 1024])]
        dirty_pages: Vec<u64>,
        /// Epochs (checkpoint-delay), ms.
        #[arg(long, value_delimiter = ',', default_values_t = [25u64])]
        epochs_ms: Vec<u64>,
        /// Measured checkpoints per cell (more where they would take less than 1 s, so the
        /// progress windows are at least 1 s long).
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=100000))]
        checkpoints: u64,
        /// Dirty ring entries per vCPU.
        #[arg(long, default_value_t = 65536)]
        ring_entries: u32,
        /// Failovers per guest size and way of losing the primary (link closed, silent),
        /// with a real standby; 0: no failover table.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
        failover_runs: u32,
        /// The standby's heartbeat timeout in the failover runs, ms.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600000))]
        heartbeat_timeout_ms: u64,
        /// Also run the copy probe: the dirty pages' copy timed several ways (ring).
        #[arg(long)]
        copy_probe: bool,
        /// Write an SVG plot of the pause versus guest size here.
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
        #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        its_commands: u64,
        /// LPIs to deliver end to end.
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        lpis: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `ringvisor bench migrate` arguments.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// Guest memory sizes in GiB.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 4], value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub memory_gib: Vec<u64>,
    /// Guest dirty rates in MB/s (10^6 bytes).
    #[arg(long, value_delimiter = ',', default_values_t = [0u64, 50, 200, 800], value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub rates: Vec<u64>,
    /// Written sets: `all` (random over all memory) and/or a hot-set size like `256M`.
    #[arg(long, value_delimiter = ',', default_values_t = ["all".to_string(), "256M".to_string()])]
    pub sets: Vec<String>,
    /// Trackers to compare [default: ring,bitmap,clear-log; with --linux: ring,bitmap].
    #[arg(long, value_delimiter = ',')]
    pub trackers: Option<Vec<String>>,
    /// Dirty ring entries per vCPU.
    #[arg(long, default_value_t = 65536, value_parser = ring_entries_arg)]
    pub ring_entries: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub vcpus: u64,
    /// `loopback`, or a tc rate (`1gbit`, `10gbit`) for two namespaces joined by a veth pair.
    #[arg(long, default_value = "loopback")]
    pub link: String,
    /// Seconds before a non-converging migration is aborted [default: 30; with
    /// `--profile third-party` or `--linux`: 60].
    #[arg(long, value_parser = seconds_arg)]
    pub timeout: Option<f64>,
    /// downtime-limit in ms (0..=2000000, QEMU's range).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=2_000_000))]
    pub downtime_limit: u64,
    /// Write an SVG plot here.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    /// max-bandwidth for every migration (e.g. 128M) [--pvh and --linux default: 10^9 bytes/s, so
    /// that QEMU, whose 0 is not "unlimited", gets the same].
    #[arg(long, value_parser = checked_bandwidth)]
    pub max_bandwidth: Option<String>,
    /// dirty-limit for every migration: off, auto or a per-vCPU rate.
    #[arg(long, value_parser = checked_dirty_limit)]
    pub dirty_limit: Option<String>,
    /// auto-converge (any tracker, as in QEMU).
    #[arg(long)]
    pub auto_converge: bool,
    /// Run every cell twice, plain TCP then TLS 1.3 with fresh credentials, and add a
    /// table of the TLS cost (total-time ratio and throughput).
    #[arg(long, conflicts_with_all = ["pvh", "linux"])]
    pub tls: bool,
    /// The PVH-guest rows instead of the matrix: the project's PVH test kernel under
    /// ringvisor and under QEMU (`qemu-system-x86_64 -accel kvm[,dirty-ring-size=N]
    /// -kernel`), idle and dirtying, per tracker, with the same downtime-limit and
    /// max-bandwidth (default 1G for this comparison).
    #[arg(long)]
    pub pvh: bool,
    /// PVH rows: guest memory.
    #[arg(long, default_value = "512M", value_parser = size_arg)]
    pub pvh_memory: u64,
    /// PVH rows: working set per vCPU in MiB (test kernel `ws_mb`).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub pvh_ws_mb: u64,
    /// PVH rows, dirtying: MiB each vCPU writes per report (`dirty_mb`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub pvh_dirty_mb: u64,
    /// PVH rows: 1 ms timer ticks per report (`period_ticks`).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub pvh_period_ticks: u64,
    /// PVH rows: seconds the guest runs before the migration [default: 1; with
    /// `--profile third-party`: 3, and longer where a scenario must populate memory].
    #[arg(long, value_parser = seconds_arg)]
    pub pvh_warmup: Option<f64>,
    /// PVH and Linux rows: migrations per cell (the table shows medians); Linux: hops per
    /// tracker along each chain.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub repeat: u32,
    /// PVH rows: `default` (the rows above) or `third-party`, a guest shaped like one we
    /// did not write (1 vCPU, 4 GiB, CPL0 boot stores, an interrupt handler store per
    /// tick, the TSC-deadline timer with HLT between ticks) in issue 14's scenarios,
    /// against QEMU's ring and bitmap, auto-converge and dirty limit.
    #[arg(long, default_value = "default", requires = "pvh",
          value_parser = ["default", "third-party"])]
    pub profile: String,
    /// `--profile third-party`: only these scenarios (a name, or a prefix ending in `*`).
    #[arg(long, value_delimiter = ';', requires = "pvh")]
    pub scenarios: Vec<String>,
    /// The Linux-guest rows instead of the matrix: the project's Linux guest
    /// (`scripts/linux-guest/build.sh`) under ringvisor and under QEMU (`-M pc -kernel
    /// vmlinux -initrd ... -append ...`), idle and dirtying, one boot per (VMM, workload)
    /// migrated along a chain of processes (`--repeat` hops per tracker), the heartbeat
    /// checked after every hop; and the time to user space. Skipped, with a note, when the
    /// guest is not built; the QEMU rows when QEMU is missing.
    #[arg(long, conflicts_with = "pvh")]
    pub linux: bool,
    /// Linux rows: the guest's build directory [default: RINGVISOR_LINUX_GUEST_DIR, else
    /// what `scripts/linux-guest/build.sh --print-dir --no-install` prints].
    #[arg(long, requires = "linux")]
    pub linux_guest: Option<std::path::PathBuf>,
    /// Linux rows: guest memory.
    #[arg(long, default_value = "128M", value_parser = size_arg)]
    pub linux_memory: u64,
    /// Linux rows: the heartbeat period in ms (`rv_period_ms`).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub linux_period_ms: u64,
    /// Linux rows, dirtying: the buffer the guest rewrites every period (`rv_buf_kb`);
    /// rate = this / the period. /init maps it with MAP_POPULATE, at emulated kernel speed
    /// on a PVM host (seconds per MiB on a loaded one).
    #[arg(long, default_value = "8M", value_parser = size_arg)]
    pub linux_dirty: u64,
    /// Linux rows: boots per VMM for the time to user space [default: one per workload,
    /// its chain's]; boots beyond the chains' stop at the banner.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub linux_boots: Option<u32>,
    /// Linux rows: the workloads, `idle` and/or `dirtying`.
    #[arg(long, value_delimiter = ',', default_values_t = ["idle".to_string(), "dirtying".to_string()],
          value_parser = ["idle", "dirtying"])]
    pub linux_workloads: Vec<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `ringvisor bench migrate [--pvh [--profile third-party]]`.
fn migrate_cmd(args: MigrateArgs) -> Result<()> {
    let MigrateArgs {
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
        tls,
        pvh,
        pvh_memory,
        pvh_ws_mb,
        pvh_dirty_mb,
        pvh_period_ticks,
        pvh_warmup,
        repeat,
        profile,
        scenarios,
        linux,
        linux_guest,
        linux_memory,
        linux_period_ms,
        linux_dirty,
        linux_boots,
        linux_workloads,
        json,
    } = args;
    let exe = std::env::current_exe()?;
    let all = || {
        vec![
            "ring".to_string(),
            "bitmap".to_string(),
            "clear-log".to_string(),
        ]
    };
    if linux {
        let bw = match &max_bandwidth {
            Some(b) => bandwidth_arg(b).map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?,
            None => 1_000_000_000,
        };
        return self::linux(
            linux_guest.as_deref(),
            LinuxArgs {
                exe,
                memory: linux_memory,
                vcpus,
                trackers: trackers.unwrap_or_else(|| vec!["ring".into(), "bitmap".into()]),
                ring_entries,
                downtime_limit,
                max_bandwidth: bw,
                timeout: timeout.unwrap_or(60.0),
                period_ms: linux_period_ms,
                dirty_kb: linux_dirty >> 10,
                repeat,
                boots: linux_boots.unwrap_or(0),
                idle: linux_workloads.iter().any(|w| w == "idle"),
                dirtying: linux_workloads.iter().any(|w| w == "dirtying"),
            },
            json,
        );
    }
    let trackers = trackers.unwrap_or_else(all);
    if pvh {
        // The third-party profile's defaults are issue 14's: 10 GiB/s, 3 s of warm-up,
        // 60 s before a migration that does not converge is aborted.
        let third = profile == "third-party";
        let bw = match &max_bandwidth {
            Some(b) => bandwidth_arg(b).map_err(|e| anyhow::anyhow!("--max-bandwidth: {e}"))?,
            None if third => 10 << 30,
            None => 1_000_000_000,
        };
        let pvh_warmup = pvh_warmup.unwrap_or(if third { 3.0 } else { 1.0 });
        let timeout = timeout.unwrap_or(if third { 60.0 } else { 30.0 });
        return self::pvh(
            &profile,
            &scenarios,
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
    migrate(
        bench::migrate::MigrateOpts {
            exe,
            memory_gib,
            rates_mb: rates,
            sets,
            trackers,
            ring_entries,
            vcpus,
            link,
            timeout: timeout.unwrap_or(30.0),
            downtime_limit,
            plot,
            max_bandwidth,
            dirty_limit,
            auto_converge,
            tls,
        },
        json,
    )
}

/// Runs one benchmark; its exit status.
pub fn run(which: BenchCmd) -> Result<i32> {
    match which {
        BenchCmd::Dirtylimit {
            rates,
            memory_gib,
            link,
            timeout,
            plot,
            json,
        } => dirtylimit(
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
        BenchCmd::Migrate(args) => migrate_cmd(args),
        BenchCmd::Sync {
            sizes_gib,
            dirty_pages,
            runs,
            ring_entries,
            plot,
            json,
        } => sync(
            bench::sync::SyncOpts {
                sizes_gib,
                dirty_pages,
                runs: runs as usize,
                ring_entries,
                plot,
            },
            json,
        ),
        BenchCmd::FirstTouch {
            memory_mib,
            runs,
            json,
        } => first_touch(memory_mib, runs, json),
        BenchCmd::Replicate {
            trackers,
            sizes_gib,
            dirty_pages,
            epochs_ms,
            checkpoints,
            ring_entries,
            failover_runs,
            heartbeat_timeout_ms,
            copy_probe,
            plot,
            json,
        } => {
            let trackers = trackers
                .iter()
                .map(|t| match t.as_str() {
                    "ring" => kvm_dirty::TrackerMode::Ring,
                    "bitmap" => kvm_dirty::TrackerMode::Bitmap,
                    "clear-log" => kvm_dirty::TrackerMode::ClearLog,
                    other => crate::usage_error(format!(
                        "--trackers: unknown tracker {other:?} (ring, bitmap, clear-log)"
                    )),
                })
                .collect();
            let o = bench::replicate::ReplicateOpts {
                trackers,
                sizes_gib,
                dirty_pages,
                epochs_ms,
                checkpoints,
                ring_entries,
                failover_runs,
                heartbeat_timeout: std::time::Duration::from_millis(heartbeat_timeout_ms),
                copy_probe,
                plot,
            };
            let r = bench::replicate::run(&o, &mut Bar::new(json))?;
            print(json, &r, || r.to_markdown())
        }
        BenchCmd::Gic {
            pes,
            its_commands,
            lpis,
            json,
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
    .map(|()| 0)
}
