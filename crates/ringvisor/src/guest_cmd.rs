//! `ringvisor run`, `incoming`, `migrate` and `demo`: a workload guest, live-migrated.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
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
    /// Bytes the guest dirties per second in total; `max` = as fast as it can, 0 = idle.
    #[arg(long, default_value = "200M", value_parser = dirty_rate_arg)]
    pub dirty_rate: u64,
    /// Hot set the guest writes to (at most --memory).
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    pub working_set: u64,
    /// Access pattern inside the working set.
    #[arg(long, value_enum, default_value_t = PatternArg::Random)]
    pub pattern: PatternArg,
    /// Only the first N vCPUs dirty memory; the others run a compute loop whose progress
    /// shows how much a throttle slows a vCPU that does not dirty (default: all dirty).
    #[arg(long)]
    pub dirty_vcpus: Option<u64>,
    #[command(flatten)]
    pub track: TrackArgs,
}

fn dirty_rate_arg(s: &str) -> std::result::Result<u64, String> {
    match s {
        "max" => Ok(u64::MAX),
        _ => crate::bandwidth_arg(s),
    }
}

fn rate_text(r: u64) -> String {
    if r == u64::MAX {
        "max".into()
    } else {
        format!("{} MiB/s", r >> 20)
    }
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
    /// dirty-limit during the migration (ring tracker): `off`, `auto` (applied to the fastest
    /// vCPUs when pre-copy stops converging, lifted at switchover) or a per-vCPU rate.
    #[arg(long, default_value = "off")]
    pub dirty_limit: String,
    /// Bitmap trackers: auto-converge (CPU throttle 20%, +10% steps, up to 99%) when pre-copy
    /// stops converging.
    #[arg(long)]
    pub auto_converge: bool,
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
            dirty_limit: match self.dirty_limit.as_str() {
                "off" => migration_engine::DirtyLimitMode::Off,
                "auto" => migration_engine::DirtyLimitMode::Auto,
                r => migration_engine::DirtyLimitMode::Fixed(
                    crate::bandwidth_arg(r)
                        .map_err(|e| anyhow::anyhow!("--dirty-limit: {e} (or off / auto)"))?,
                ),
            },
            auto_converge: self.auto_converge,
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
    vm.set_split_workload(
        DATA_GPA,
        g.working_set / 4096,
        match g.pattern {
            PatternArg::Random => Pattern::Random,
            PatternArg::Sequential => Pattern::Sequential,
        },
        if g.dirty_rate == u64::MAX {
            vmm::UNPACED
        } else {
            g.dirty_rate / 4096
        },
        g.dirty_vcpus.unwrap_or(g.vcpus) as usize,
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
    Migrate {
        to: String,
        params: MigrateArgs,
    },
    Status,
    Quit,
    Dirtyrate {
        window_ms: u64,
        samples_per_gib: u64,
    },
    SetDirtyLimit {
        bytes_per_s: Option<u64>,
    },
}

/// Measures the applicable methods on a running VM: the ring (per vCPU) or the bitmap, and
/// page sampling, in parallel over the same window.
pub fn measure_rates(
    vm: &Vm,
    window: Duration,
    samples_per_gib: u64,
) -> Result<Vec<migration_engine::dirtyrate::DirtyRate>> {
    use migration_engine::dirtyrate as dr;
    let ring = vm.ring_set().is_some();
    std::thread::scope(|sc| {
        let exact = sc.spawn(|| {
            if ring {
                dr::measure_ring(vm, window)
            } else {
                dr::measure_bitmap(vm, window)
            }
        });
        let sample = dr::measure_sample(vm, window, samples_per_gib, 7);
        let exact = exact
            .join()
            .map_err(|_| anyhow::anyhow!("measurement thread panicked"))?;
        Ok(vec![exact?, sample?])
    })
}

/// Answers a control request about dirtying (`Dirtyrate`, `SetDirtyLimit`), the same for
/// every guest: the measurement, or the per-vCPU limit started, changed or lifted. Any other
/// request is answered with an error (callers handle those themselves).
pub(crate) fn answer_dirty_request(
    vm: &Vm,
    req: &ControlRequest,
    limiter: &mut Option<migration_engine::DirtyLimiter>,
) -> serde_json::Value {
    let err = |e: anyhow::Error| serde_json::json!({"error": format!("{e:#}")});
    match *req {
        ControlRequest::Dirtyrate {
            window_ms,
            samples_per_gib,
        } => match measure_rates(
            vm,
            Duration::from_millis(window_ms.clamp(10, 60_000)),
            samples_per_gib.clamp(1, 1 << 20),
        ) {
            Ok(r) => serde_json::json!({ "rates": r }),
            Err(e) => err(e),
        },
        ControlRequest::SetDirtyLimit { bytes_per_s } => {
            let r = match (bytes_per_s, limiter.as_ref()) {
                (None, Some(l)) => {
                    l.set_quota(None, None);
                    Ok(())
                }
                (None, None) => Ok(()),
                (Some(q), Some(l)) => {
                    l.set_quota(Some(q), None);
                    Ok(())
                }
                (Some(q), None) => start_limiter(vm).map(|l| {
                    l.set_quota(Some(q), None);
                    *limiter = Some(l);
                }),
            };
            match r {
                Ok(()) => serde_json::json!({"ok": true, "dirty_limit": bytes_per_s}),
                Err(e) => err(e),
            }
        }
        _ => serde_json::json!({"error": "not a dirty-rate or dirty-limit request"}),
    }
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
    pub dirty_limit: Option<u64>,
    pub json: bool,
}

pub(crate) fn start_limiter(vm: &Vm) -> Result<migration_engine::DirtyLimiter> {
    vm.ring_set()
        .context("the dirty limit needs the ring tracker (--tracker ring)")?;
    Ok(migration_engine::DirtyLimiter::start(
        vm,
        migration_engine::LimiterConfig::default(),
    )?)
}

pub fn run(o: RunOpts) -> Result<()> {
    let opts = o.params.options()?;
    let mut vm = start_guest(&o.guest)?;
    eprintln!(
        "guest running: {} vCPU(s), {} MiB, working set {} MiB, dirty rate {}, tracker {}",
        o.guest.vcpus,
        o.guest.memory >> 20,
        o.guest.working_set >> 20,
        rate_text(o.guest.dirty_rate),
        vm.config().tracking.mode().name()
    );
    // Without --control, a channel nobody sends on.
    let rx = match &o.control {
        Some(path) => crate::pvh_cmd::control_listener(path)?,
        None => mpsc::channel().1,
    };
    let mut limiter = None;
    if let Some(q) = o.dirty_limit {
        let l = start_limiter(&vm)?;
        l.set_quota(Some(q), None);
        eprintln!("dirty limit: {} MB/s per vCPU", q as f64 / 1e6);
        limiter = Some(l);
    }
    let t0 = Instant::now();
    let mut prev = writes(&vm);
    let napped = |vm: &Vm| -> Vec<u64> {
        vm.vcpu_handles()
            .iter()
            .map(|v| {
                v.counters
                    .throttle_ns
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .collect()
    };
    let mut prev_nap = napped(&vm);
    let mut last = Instant::now();
    let mut auto_migrate = o.migrate_to.clone();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        vm.vcpus()?.check().context("guest failed")?;
        if last.elapsed() >= Duration::from_secs(1) {
            let now = writes(&vm);
            if !o.json {
                let dt = last.elapsed().as_secs_f64();
                let nap = napped(&vm);
                let th = vm
                    .vcpu_handles()
                    .iter()
                    .zip(nap.iter().zip(&prev_nap))
                    .map(|(v, (a, b))| {
                        format!(
                            "{:.0}% (slept {:.0}%)",
                            v.throttle() * 100.0,
                            (a - b) as f64 / 1e9 / dt * 100.0
                        )
                    })
                    .collect::<Vec<_>>();
                prev_nap = nap;
                eprintln!(
                    "[source] {} | throttle [{}]",
                    rate_line(&prev, &now, dt),
                    th.join(", ")
                );
            }
            prev = now;
            last = Instant::now();
        }
        if let Some(to) = auto_migrate.clone() {
            if t0.elapsed().as_secs_f64() >= o.migrate_after {
                auto_migrate = None;
                if let Some(mut l) = limiter.take() {
                    l.stop();
                }
                // Guest progress (writes/s per vCPU) in the last second before and during the
                // migration: what the migration's throttling costs each vCPU.
                let b0 = writes(&vm);
                std::thread::sleep(Duration::from_secs(1));
                let b1 = writes(&vm);
                let before: Vec<f64> = b0.iter().zip(&b1).map(|(a, b)| (b - a) as f64).collect();
                let tm = Instant::now();
                let m0 = writes(&vm);
                let s = migrate_vm(&mut vm, &to, &opts, o.json)?;
                // Until the pause: the counters at the source's stop are its last values.
                let m1 = writes(&vm);
                let secs = (tm.elapsed().as_secs_f64() - s.downtime_ms / 1e3).max(1e-3);
                let during: Vec<f64> = m0
                    .iter()
                    .zip(&m1)
                    .map(|(a, b)| b.saturating_sub(*a) as f64 / secs)
                    .collect();
                if o.json {
                    let mut v = serde_json::to_value(&s)?;
                    v["progress_before"] = serde_json::json!(before);
                    v["progress_during"] = serde_json::json!(during);
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print_summary(&s, false)?;
                    eprintln!(
                        "guest progress (writes/s per vCPU): before {before:?}, during the migration {:?}",
                        during.iter().map(|x| x.round()).collect::<Vec<_>>()
                    );
                }
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
            let err = |e: anyhow::Error| serde_json::json!({"error": format!("{e:#}")});
            // A client that went away does not take the guest down: reply errors are ignored.
            let reply = match req {
                ControlRequest::Status => {
                    let th: Vec<f64> = vm.vcpu_handles().iter().map(|v| v.throttle()).collect();
                    serde_json::json!({"status": {
                        "writes": writes(&vm),
                        "tracker": vm.config().tracking.mode().name(),
                        "throttle": th,
                        "ring_dirty_pages_per_s": limiter.as_ref().map(|l| l.rates()),
                    }})
                }
                req @ (ControlRequest::Dirtyrate { .. } | ControlRequest::SetDirtyLimit { .. }) => {
                    answer_dirty_request(&vm, &req, &mut limiter)
                }
                ControlRequest::Quit => {
                    let _ = writeln!(c, "{}", serde_json::json!({"ok": true}));
                    vm.stop()?;
                    return Ok(());
                }
                ControlRequest::Migrate { to, params } => {
                    // A standing dirty limit would fight the migration's own policy.
                    if let Some(mut l) = limiter.take() {
                        l.stop();
                    }
                    match params
                        .options()
                        .and_then(|opts| migrate_vm(&mut vm, &to, &opts, true))
                    {
                        Ok(s) => {
                            let _ = writeln!(c, "{}", serde_json::to_string(&s)?);
                            if s.completed() {
                                eprintln!("migrated to {to}; exiting");
                                return Ok(());
                            }
                            continue;
                        }
                        Err(e) => err(e),
                    }
                }
            };
            let _ = writeln!(c, "{reply}");
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
    pub console: Option<std::path::PathBuf>,
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
        // A PVH guest's console continues on this process's stdout (or the --console file).
        serial: match &o.console {
            Some(p) => vmm::SerialOutput::File(p.clone()),
            None => vmm::SerialOutput::Stdout,
        },
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
            "[dest] guest resumed: {} passes, {} pages ({} zero), {:.1} MiB received, restore {:.1} ms ({})",
            sum.iterations,
            sum.pages,
            sum.zero_pages,
            sum.bytes as f64 / (1 << 20) as f64,
            sum.restore_ms,
            sum.restore_breakdown_ms
                .iter()
                .map(|(w, ms)| format!("{w} {ms:.1} ms"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if vm.platform() == vmm::Platform::Pvh {
        let code = crate::pvh_cmd::run_received(&mut vm, o.duration, o.json)?;
        std::process::exit(code);
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
        "demo: source guest running ({} vCPUs, {} MiB, dirtying {} over a {} MiB hot set); warming up 1.5 s",
        g.vcpus,
        g.memory >> 20,
        rate_text(g.dirty_rate),
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

/// Sends one control request and returns the JSON reply.
pub fn control(path: &std::path::Path, req: &ControlRequest) -> Result<serde_json::Value> {
    let mut c = UnixStream::connect(path)
        .with_context(|| format!("connecting to the control socket {}", path.display()))?;
    writeln!(c, "{}", serde_json::to_string(req)?)?;
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).context("reading the reply")?;
    if let Some(e) = v.get("error") {
        bail!("{}", e.as_str().unwrap_or("error"));
    }
    Ok(v)
}

/// `ringvisor dirtyrate`.
pub struct DirtyrateOpts {
    pub guest: GuestArgs,
    pub control: Option<std::path::PathBuf>,
    pub window_ms: u64,
    pub samples_per_gib: u64,
    pub watch: u32,
    pub json: bool,
}

pub fn dirtyrate(o: DirtyrateOpts) -> Result<()> {
    let window = Duration::from_millis(o.window_ms);
    let mut all: Vec<serde_json::Value> = Vec::new();
    let mut show = |label: &str, v: serde_json::Value| -> Result<()> {
        if o.json {
            all.push(serde_json::json!({"vm": label, "rates": v}));
        } else {
            for x in v.as_array().into_iter().flatten() {
                let per = x["vcpu_pages_per_s"]
                    .as_array()
                    .map(|a| {
                        format!(
                            " | per vCPU MB/s [{}]",
                            a.iter()
                                .map(|p| format!("{:.1}", p.as_f64().unwrap_or(0.0) * 4096.0 / 1e6))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
                    .unwrap_or_default();
                println!(
                    "[{label}] {:>7}: {:>10.0} pages/s = {:>8.1} MB/s{per}",
                    x["method"].as_str().unwrap_or("?"),
                    x["pages_per_s"].as_f64().unwrap_or(0.0),
                    x["mb_per_s"].as_f64().unwrap_or(0.0),
                );
            }
        }
        Ok(())
    };
    if let Some(path) = &o.control {
        for _ in 0..o.watch.max(1) {
            let v = control(
                path,
                &ControlRequest::Dirtyrate {
                    window_ms: o.window_ms,
                    samples_per_gib: o.samples_per_gib,
                },
            )?;
            show("running guest", v["rates"].clone())?;
        }
    } else {
        // Standalone: the same workload on a ring VM (ring + sampling) and on a bitmap VM
        // (bitmap + sampling): KVM cannot give both the ring and the bitmap to one VM here.
        for t in [ModeArg::Ring, ModeArg::Bitmap] {
            let mut g = o.guest.clone();
            g.track.tracker = t;
            let mut vm = start_guest(&g)?;
            std::thread::sleep(Duration::from_millis(1000));
            for _ in 0..o.watch.max(1) {
                let r = measure_rates(&vm, window, o.samples_per_gib)?;
                show(
                    &format!("{} VM", if t == ModeArg::Ring { "ring" } else { "bitmap" }),
                    serde_json::to_value(&r)?,
                )?;
            }
            vm.stop()?;
        }
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}
