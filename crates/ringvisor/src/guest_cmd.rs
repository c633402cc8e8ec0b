//! `ringvisor run`, `incoming`, `migrate` and `demo`: a workload guest, live-migrated.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use migration_engine::{DestOptions, MigrationSummary, SourceOptions, TimeoutAction};
use serde::{Deserialize, Serialize};
use vmm::{Pattern, RegionSpec, Tracking, Vm, VmConfig};

use crate::size_arg;
use crate::ModeArg;

/// GPA of the workload's data region (slot 1).
pub const DATA_GPA: u64 = 1 << 32;

#[derive(Args, Clone, Debug)]
pub struct TrackArgs {
    /// Dirty tracker: ring (default), bitmap or clear-log.
    #[arg(long, value_enum, default_value_t = ModeArg::Ring)]
    pub tracker: ModeArg,
    /// Dirty ring entries per vCPU (power of two, 256..=host max).
    #[arg(long, default_value_t = 65536)]
    pub ring_entries: u32,
}

impl TrackArgs {
    pub fn tracking(&self) -> Result<Tracking> {
        Ok(match self.tracker {
            ModeArg::Ring => Tracking::Ring {
                entries: self.ring_entries,
            },
            ModeArg::Bitmap => Tracking::Bitmap,
            ModeArg::ClearLog => Tracking::ClearLog,
            ModeArg::All => bail!("--tracker all is only valid for selftest"),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum PatternArg {
    Random,
    Sequential,
}

#[derive(Args, Clone, Debug)]
pub struct GuestArgs {
    /// Guest memory (data region; a 4 MiB system region is added).
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    pub memory: u64,
    /// vCPUs, each dirtying its share of the working set.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub vcpus: u64,
    /// Bytes the guest dirties per second in total (0 = as fast as it can).
    #[arg(long, default_value = "200M", value_parser = crate::bandwidth_arg)]
    pub dirty_rate: u64,
    /// Hot set the guest writes to (at most --memory).
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    pub working_set: u64,
    /// Access pattern inside the working set.
    #[arg(long, value_enum, default_value_t = PatternArg::Random)]
    pub pattern: PatternArg,
    #[command(flatten)]
    pub track: TrackArgs,
}

/// Migration parameters, named as QEMU's migrate-set-parameters names them.
#[derive(Args, Clone, Debug, Serialize, Deserialize)]
pub struct MigrateArgs {
    /// downtime-limit: longest allowed pause at switchover, ms.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub downtime_limit: u64,
    /// max-bandwidth in bytes/s (e.g. 128M); 0 = unlimited.
    #[arg(long, default_value = "0", value_parser = crate::bandwidth_arg)]
    pub max_bandwidth: u64,
    /// Give up (or force the switchover) after this many seconds without converging.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// What the timeout does: abort (guest stays on the source) or force.
    #[arg(long, value_enum, default_value_t = OnTimeout::Abort)]
    pub on_timeout: OnTimeout,
    /// Skip the end-to-end memory digest comparison.
    #[arg(long)]
    pub no_verify: bool,
    /// Compare digests before committing (a mismatch aborts and keeps the guest on the
    /// source) instead of right after; the digest time then counts in the downtime.
    #[arg(long)]
    pub verify_before_commit: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum OnTimeout {
    Abort,
    Force,
}

impl MigrateArgs {
    pub fn options(&self) -> Result<SourceOptions> {
        if let Some(t) = self.timeout {
            if !(t.is_finite() && t > 0.0) {
                bail!("--timeout must be a positive number of seconds");
            }
        }
        Ok(SourceOptions {
            downtime_limit: Duration::from_millis(self.downtime_limit),
            max_bandwidth: (self.max_bandwidth > 0).then_some(self.max_bandwidth),
            timeout: self.timeout.map(Duration::from_secs_f64),
            on_timeout: match self.on_timeout {
                OnTimeout::Abort => TimeoutAction::Abort,
                OnTimeout::Force => TimeoutAction::ForceSwitchover,
            },
            verify: !self.no_verify,
            verify_before_commit: self.verify_before_commit,
            ..SourceOptions::default()
        })
    }
}

/// Builds and starts the workload guest.
pub fn start_guest(g: &GuestArgs) -> Result<Vm> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: ringvisor runs guests on real KVM");
    }
    let memory = g.memory.div_ceil(4096) * 4096;
    if memory < 4096 * g.vcpus {
        bail!("--memory must hold at least one page per vCPU");
    }
    if g.working_set > memory || g.working_set < 4096 * g.vcpus {
        bail!("--working-set must be between one page per vCPU and --memory");
    }
    let mut vm = Vm::create(&VmConfig {
        vcpus: g.vcpus as usize,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes: memory,
            log_dirty: true,
        }],
        tracking: g.track.tracking()?,
    })
    .context("creating the VM")?;
    vm.set_dirty_workload(
        DATA_GPA,
        g.working_set / 4096,
        match g.pattern {
            PatternArg::Random => Pattern::Random,
            PatternArg::Sequential => Pattern::Sequential,
        },
        g.dirty_rate / 4096,
    )?;
    vm.start(None)?;
    Ok(vm)
}

/// Guest write counters per vCPU.
pub fn writes(vm: &Vm) -> Vec<u64> {
    (0..vm.config().vcpus)
        .map(|i| vm.nr_writes(i).unwrap_or(0))
        .collect()
}

/// "vCPU writes/s" status line.
pub fn rate_line(prev: &[u64], now: &[u64], dt: f64) -> String {
    let per: Vec<String> = prev
        .iter()
        .zip(now)
        .map(|(a, b)| format!("{:.0}", b.saturating_sub(*a) as f64 / dt))
        .collect();
    let total: u64 = now
        .iter()
        .zip(prev)
        .map(|(b, a)| b.saturating_sub(*a))
        .sum();
    format!(
        "guest writes/s per vCPU [{}] = {:.1} MiB/s; total writes {}",
        per.join(", "),
        total as f64 * 4096.0 / dt / (1 << 20) as f64,
        now.iter().sum::<u64>()
    )
}

fn progress_bar(json: bool) -> ProgressBar {
    let pb = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1)
    };
    pb.set_style(
        ProgressStyle::with_template("{spinner} pass {prefix} {bar:30} {pos}/{len} pages {msg}")
            .expect("static template"),
    );
    pb
}

/// Migrates a running VM to `to`, with a progress bar; keeps the guest on failure.
pub fn migrate_vm(
    vm: &mut Vm,
    to: &str,
    opts: &SourceOptions,
    json: bool,
) -> Result<MigrationSummary> {
    let stream = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    let pb = progress_bar(json);
    let s = migration_engine::migrate(vm, stream, opts, &mut |p| {
        pb.set_prefix(p.iteration.to_string());
        pb.set_length(p.pass_pages.max(1));
        pb.set_position(p.pass_sent);
        pb.set_message(format!("{:.0} MB/s", p.bandwidth / 1e6));
    })?;
    pb.finish_and_clear();
    Ok(s)
}

pub fn print_summary(s: &MigrationSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
    } else {
        print!("{}", s.to_text());
    }
    Ok(())
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlRequest {
    Migrate { to: String, params: MigrateArgs },
    Status,
    Quit,
}

/// `ringvisor run`.
pub struct RunOpts {
    pub guest: GuestArgs,
    pub control: Option<std::path::PathBuf>,
    pub migrate_to: Option<String>,
    pub migrate_after: f64,
    pub params: MigrateArgs,
    pub duration: Option<f64>,
    pub exit_after_migrate: bool,
    pub json: bool,
}

pub fn run(o: RunOpts) -> Result<()> {
    let opts = o.params.options()?;
    let mut vm = start_guest(&o.guest)?;
    eprintln!(
        "guest running: {} vCPU(s), {} MiB, working set {} MiB, dirty rate {} MiB/s, tracker {}",
        o.guest.vcpus,
        o.guest.memory >> 20,
        o.guest.working_set >> 20,
        o.guest.dirty_rate >> 20,
        vm.config().tracking.mode().name()
    );
    let (tx, rx) = mpsc::channel::<(ControlRequest, UnixStream)>();
    if let Some(path) = &o.control {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        eprintln!("control socket: {}", path.display());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let mut line = String::new();
                if BufReader::new(&c).read_line(&mut line).is_err() {
                    continue;
                }
                match serde_json::from_str::<ControlRequest>(&line) {
                    Ok(req) => {
                        if tx.send((req, c)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let mut c = c;
                        let _ = writeln!(c, "{}", serde_json::json!({"error": e.to_string()}));
                    }
                }
            }
        });
    }
    let t0 = Instant::now();
    let mut prev = writes(&vm);
    let mut last = Instant::now();
    let mut auto_migrate = o.migrate_to.clone();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        vm.vcpus()?.check().context("guest failed")?;
        if last.elapsed() >= Duration::from_secs(1) {
            let now = writes(&vm);
            if !o.json {
                eprintln!(
                    "[source] {}",
                    rate_line(&prev, &now, last.elapsed().as_secs_f64())
                );
            }
            prev = now;
            last = Instant::now();
        }
        if let Some(to) = auto_migrate.clone() {
            if t0.elapsed().as_secs_f64() >= o.migrate_after {
                auto_migrate = None;
                let s = migrate_vm(&mut vm, &to, &opts, o.json)?;
                print_summary(&s, o.json)?;
                if s.completed() {
                    return Ok(());
                }
                if o.exit_after_migrate {
                    vm.stop()?;
                    return Ok(());
                }
                eprintln!("migration did not complete; the guest keeps running here");
            }
        }
        while let Ok((req, mut c)) = rx.try_recv() {
            match req {
                ControlRequest::Status => {
                    let w = writes(&vm);
                    writeln!(
                        c,
                        "{}",
                        serde_json::json!({"status": {"writes": w, "tracker": vm.config().tracking.mode().name()}})
                    )?;
                }
                ControlRequest::Quit => {
                    writeln!(c, "{}", serde_json::json!({"ok": true}))?;
                    vm.stop()?;
                    return Ok(());
                }
                ControlRequest::Migrate { to, params } => {
                    let s = params
                        .options()
                        .and_then(|opts| migrate_vm(&mut vm, &to, &opts, true));
                    match s {
                        Ok(s) => {
                            writeln!(c, "{}", serde_json::to_string(&s)?)?;
                            if s.completed() {
                                eprintln!("migrated to {to}; exiting");
                                return Ok(());
                            }
                        }
                        Err(e) => {
                            writeln!(c, "{}", serde_json::json!({"error": format!("{e:#}")}))?;
                        }
                    }
                }
            }
        }
        if o.duration.is_some_and(|d| t0.elapsed().as_secs_f64() >= d) {
            vm.stop()?;
            return Ok(());
        }
    }
}

/// `ringvisor migrate`: ask a running `ringvisor run --control PATH` to migrate.
pub fn migrate_cmd(
    control: &std::path::Path,
    to: &str,
    params: MigrateArgs,
    json: bool,
) -> Result<bool> {
    let mut c = UnixStream::connect(control)
        .with_context(|| format!("connecting to the control socket {}", control.display()))?;
    let req = ControlRequest::Migrate {
        to: to.to_string(),
        params,
    };
    writeln!(c, "{}", serde_json::to_string(&req)?)?;
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).context("reading the reply")?;
    if let Some(e) = v.get("error") {
        bail!("migration failed: {e}");
    }
    let completed = v["outcome"]["kind"] == "completed";
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let s: serde_json::Value = v;
        println!(
            "outcome {} | total {:.0} ms | downtime {:.1} ms | passes {} | sent {} pages ({} zero)",
            s["outcome"]["kind"],
            s["total_ms"].as_f64().unwrap_or(0.0),
            s["downtime_ms"].as_f64().unwrap_or(0.0),
            s["iterations"].as_array().map(|a| a.len()).unwrap_or(0),
            s["pages_sent"],
            s["zero_pages"]
        );
        if let Some(r) = s["outcome"].get("reason") {
            println!("reason: {r}");
        }
    }
    Ok(completed)
}

/// `ringvisor incoming`.
pub struct IncomingOpts {
    pub listen: String,
    pub track: TrackArgs,
    pub duration: Option<f64>,
    pub json: bool,
}

pub fn incoming(o: IncomingOpts) -> Result<()> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: ringvisor runs guests on real KVM");
    }
    let l = TcpListener::bind(&o.listen).with_context(|| format!("listening on {}", o.listen))?;
    // First stdout line: the bound address (the demo reads it; port 0 picks a free port).
    println!("listening {}", l.local_addr()?);
    std::io::stdout().flush()?;
    eprintln!("[dest] waiting for a migration on {}", l.local_addr()?);
    let (stream, peer) = l.accept()?;
    eprintln!("[dest] migration from {peer}");
    let dopts = DestOptions {
        tracking: o.track.tracking()?,
        ..DestOptions::default()
    };
    let json = o.json;
    let (mut vm, sum) = migration_engine::receive(stream, &dopts, &mut |e| {
        if !json {
            eprintln!("[dest] {e}");
        }
    })
    .context("incoming migration")?;
    if o.json {
        println!("{}", serde_json::to_string(&sum)?);
    } else {
        eprintln!(
            "[dest] guest resumed: {} passes, {} pages ({} zero), {:.1} MiB received, restore {:.1} ms",
            sum.iterations,
            sum.pages,
            sum.zero_pages,
            sum.bytes as f64 / (1 << 20) as f64,
            sum.restore_ms
        );
    }
    let t0 = Instant::now();
    let mut prev = writes(&vm);
    eprintln!("[dest] guest write counters at resume: {prev:?}");
    loop {
        std::thread::sleep(Duration::from_secs(1));
        vm.vcpus()?
            .check()
            .context("guest failed on the destination")?;
        let now = writes(&vm);
        eprintln!("[dest] {}", rate_line(&prev, &now, 1.0));
        prev = now;
        if o.duration.is_some_and(|d| t0.elapsed().as_secs_f64() >= d) {
            vm.stop()?;
            return Ok(());
        }
    }
}

/// `ringvisor demo`: a destination process and a source guest on loopback, migrated with the
/// chosen tracker, with a summary. Returns whether the migration completed.
pub fn demo(g: GuestArgs, params: MigrateArgs, json: bool) -> Result<bool> {
    let opts = params.options()?;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args([
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "3",
            "--tracker",
            match g.track.tracker {
                ModeArg::Bitmap => "bitmap",
                ModeArg::ClearLog => "clear-log",
                _ => "ring",
            },
            "--ring-entries",
            &g.track.ring_entries.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the destination process")?;
    let mut out = BufReader::new(child.stdout.take().context("child stdout")?);
    let mut first = String::new();
    out.read_line(&mut first)?;
    let Some(addr) = first.trim().strip_prefix("listening ") else {
        let _ = child.kill();
        bail!("the destination did not start (said {first:?})");
    };
    let addr = addr.to_string();
    let fwd = std::thread::spawn(move || {
        let mut dest_json = String::new();
        for line in out.lines().map_while(|l| l.ok()) {
            dest_json = line;
        }
        dest_json
    });
    eprintln!(
        "demo: destination process {} listening on {addr}",
        child.id()
    );
    let mut vm = start_guest(&g)?;
    eprintln!(
        "demo: source guest running ({} vCPUs, {} MiB, dirtying {} MiB/s over a {} MiB hot set); warming up 1.5 s",
        g.vcpus,
        g.memory >> 20,
        g.dirty_rate >> 20,
        g.working_set >> 20
    );
    let w0 = writes(&vm);
    std::thread::sleep(Duration::from_millis(1500));
    eprintln!("demo: [source] {}", rate_line(&w0, &writes(&vm), 1.5));
    eprintln!(
        "demo: migrating with the {} tracker to {addr}",
        vm.config().tracking.mode().name()
    );
    let s = migrate_vm(&mut vm, &addr, &opts, json);
    let s = match s {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            return Err(e);
        }
    };
    print_summary(&s, json)?;
    if s.completed() && s.verified == Some(false) {
        let _ = child.kill();
        bail!("memory digests differ between source and destination");
    }
    if !s.completed() {
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("demo: migration did not complete; the source guest kept running");
        return Ok(false);
    }
    let status = child.wait()?;
    let _ = fwd.join();
    if !status.success() {
        bail!("the destination process failed ({status})");
    }
    eprintln!(
        "demo: done: the guest ran on the destination after the switchover (see its [dest] lines)"
    );
    Ok(true)
}
