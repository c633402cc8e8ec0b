//! The VM processes: `ringvisor run` (the workload guest, or a PVH kernel with `--kernel`),
//! `ringvisor incoming` (a destination) and `ringvisor demo`. Each builds the VM, a
//! `control::VmService` and, with `--qmp unix:PATH`, a QMP monitor, then waits until the
//! service says the process is done.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use control::{ProcessExit, RunState, ServiceConfig, VmService};
use indicatif::{ProgressBar, ProgressStyle};
use migration_engine::{DestOptions, MigrationInfo, MigrationStatus, MigrationSummary};
use qmp::{QmpServer, ServerConfig};
use vmm::{Pattern, Platform, RegionSpec, Vm, VmConfig};

use crate::cli_args::{DestLimitArgs, GuestArgs, MigrateArgs, PatternArg, TrackArgs};
use crate::report;
use crate::usage_error;

/// GPA of the workload's data region (slot 1).
pub const DATA_GPA: u64 = 1 << 32;

fn need_kvm() -> Result<()> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: ringvisor runs guests on real KVM");
    }
    Ok(())
}

/// Checks the guest flags against each other (usage errors, exit 2).
pub fn check_guest(g: &GuestArgs) {
    let memory = g.memory.div_ceil(4096) * 4096;
    if memory < 4096 * g.vcpus {
        usage_error(format!(
            "--memory {} is too small: at least one 4 KiB page per vCPU ({} bytes)",
            g.memory,
            4096 * g.vcpus
        ));
    }
    if g.working_set > memory || g.working_set < 4096 * g.vcpus {
        usage_error(format!(
            "--working-set must be from {} bytes (one page per vCPU) to --memory ({memory} bytes)",
            4096 * g.vcpus
        ));
    }
    if let Some(d) = g.dirty_vcpus {
        if d > g.vcpus {
            usage_error(format!(
                "--dirty-vcpus {d} is out of range: 1 to --vcpus ({})",
                g.vcpus
            ));
        }
    }
}

/// Builds and starts the workload guest.
pub fn start_guest(g: &GuestArgs) -> Result<Vm> {
    need_kvm()?;
    let memory = g.memory.div_ceil(4096) * 4096;
    let mut vm = Vm::create(&VmConfig {
        vcpus: g.vcpus as usize,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes: memory,
            log_dirty: true,
        }],
        tracking: g.track.tracking(),
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

/// Guest write counters per vCPU (the workload guest; empty for a PVH guest).
pub fn writes(vm: &Vm) -> Vec<u64> {
    if vm.platform() != Platform::Workload {
        return Vec::new();
    }
    (0..vm.config().vcpus)
        .map(|i| vm.nr_writes(i).unwrap_or(0))
        .collect()
}

/// "guest writes/s per vCPU [..] = X MiB/s; total writes N".
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

/// Prints the workload guest's write rate (and throttles) to stderr once a second while the
/// process runs and the guest runs here.
pub(crate) fn spawn_status_lines(svc: VmService, label: &'static str) {
    let _ = std::thread::Builder::new()
        .name("status-lines".into())
        .spawn(move || {
            let mut prev: Option<(Instant, Vec<u64>)> = None;
            while svc.wait_done(Some(Duration::from_secs(1))).is_none() {
                let Some(vm) = svc.vm() else { continue };
                if vm.platform() != Platform::Workload || svc.run_state() != RunState::Running {
                    prev = None;
                    continue;
                }
                let now = writes(&vm);
                if let Some((t, p)) = &prev {
                    let th: Vec<String> = vm
                        .vcpu_handles()
                        .iter()
                        .map(|v| format!("{:.0}%", v.throttle() * 100.0))
                        .collect();
                    eprintln!(
                        "[{label}] {} | throttle [{}]",
                        rate_line(p, &now, t.elapsed().as_secs_f64()),
                        th.join(", ")
                    );
                }
                prev = Some((Instant::now(), now));
            }
        });
}

/// The QMP monitor of a VM process.
fn serve(svc: &VmService, path: &Path) -> Result<QmpServer> {
    let server = QmpServer::bind(path, Arc::new(svc.clone()), ServerConfig::default())
        .with_context(|| format!("starting the QMP monitor on {}", path.display()))?;
    svc.attach_events(server.events());
    tracing::info!(path = %path.display(), "QMP monitor listening");
    Ok(server)
}

/// Lets a client read the last reply (e.g. to `quit`), closes the monitor, reports why the
/// process ends; returns the exit code.
fn end_process(server: Option<QmpServer>, exit: &ProcessExit) -> i32 {
    if let Some(s) = server {
        let deadline = Instant::now() + Duration::from_millis(500);
        while s.client_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(s);
    }
    match exit {
        ProcessExit::GuestPoweredOff(code) => eprintln!("guest powered off with status {code}"),
        ProcessExit::GuestCrashed(_) | ProcessExit::MigrationFailed(_) => {
            eprintln!("ringvisor: {exit}")
        }
        _ => tracing::info!(%exit, "exiting"),
    }
    exit.code()
}

/// Applies the command line's migration settings to a new service; a capability the tracker
/// cannot honour is a usage error (nothing has connected yet).
fn configure(svc: &VmService, tracking: vmm::Tracking, params: &MigrateArgs) -> Result<()> {
    let (p, caps) = params.resolve().unwrap_or_else(|e| usage_error(e));
    if let Err(e) = control::params::check_capabilities(tracking.mode(), &caps) {
        usage_error(format!("{e} (--tracker {})", tracking.mode().name()));
    }
    svc.set_parameters(&p.to_set())?;
    svc.set_capabilities(&caps.status())?;
    Ok(())
}

/// Where a PVH guest's console goes: the --console file, else stdout, except with --json,
/// whose stdout carries one JSON document: then stderr.
fn console_output(console: Option<&Path>, json: bool) -> vmm::SerialOutput {
    match (console, json) {
        (Some(p), _) => vmm::SerialOutput::File(p.to_path_buf()),
        (None, false) => vmm::SerialOutput::Stdout,
        (None, true) => vmm::SerialOutput::Stderr,
    }
}

/// `ringvisor run`.
pub struct RunOpts {
    pub kernel: Option<PathBuf>,
    pub cmdline: String,
    pub console: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub serial_stdin: bool,
    pub guest: GuestArgs,
    pub qmp: Option<PathBuf>,
    pub migrate_to: Option<String>,
    pub migrate_after: f64,
    pub migrate_after_output: Option<String>,
    pub params: MigrateArgs,
    pub duration: Option<f64>,
    pub exit_after_migrate: bool,
    pub vcpu_dirty_limit: Option<u64>,
    pub replicate_to: Option<String>,
    pub checkpoint_ms: u64,
    pub json: bool,
}

/// Where a replicated PVH guest's console is released to (output commit).
fn console_sink(o: &RunOpts) -> Result<Box<dyn Write + Send>> {
    Ok(match (&o.console, o.json) {
        (Some(p), _) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        (None, false) => Box::new(std::io::stdout()),
        (None, true) => Box::new(std::io::stderr()),
    })
}

fn boot_pvh(o: &RunOpts) -> Result<Vm> {
    need_kvm()?;
    if o.guest.vcpus > 8 {
        usage_error("--vcpus is out of range with --kernel: 1 to 8");
    }
    let kernel =
        pvh::read_kernel(o.kernel.as_deref().unwrap_or(Path::new(""))).with_context(|| {
            format!(
                "reading the kernel {}",
                o.kernel.as_deref().unwrap_or(Path::new("")).display()
            )
        })?;
    let cfg = pvh::PvhConfig {
        cmdline: o.cmdline.clone(),
        memory: o.guest.memory,
        vcpus: o.guest.vcpus as usize,
        // A replicated guest's console is held until the checkpoint after it is applied.
        serial: if o.replicate_to.is_some() {
            vmm::SerialOutput::Capture
        } else {
            console_output(o.console.as_deref(), o.json)
        },
        tracking: Some(o.guest.track.tracking()),
        initrd: o
            .initrd
            .as_deref()
            .map(|p| {
                pvh::read_initrd(p).with_context(|| format!("reading the initrd {}", p.display()))
            })
            .transpose()?,
        ..pvh::PvhConfig::new(kernel)
    };
    let mut vm = pvh::boot(&cfg).context("booting the PVH kernel")?;
    if o.serial_stdin {
        vm.serial_input()
            .forward_stdin()
            .context("starting the serial input thread")?;
    }
    vm.start().context("starting the guest")?;
    Ok(vm.into_vm())
}

pub fn run(o: RunOpts) -> Result<i32> {
    let tracking = o.guest.track.tracking();
    if o.vcpu_dirty_limit.is_some() && tracking.mode() != kvm_dirty::TrackerMode::Ring {
        usage_error("--vcpu-dirty-limit needs the dirty ring (--tracker ring)");
    }
    if o.kernel.is_none() {
        check_guest(&o.guest);
    }
    let (_, caps) = o.params.resolve().unwrap_or_else(|e| usage_error(e));
    if let Err(e) = control::params::check_capabilities(tracking.mode(), &caps) {
        usage_error(format!("{e} (--tracker {})", tracking.mode().name()));
    }
    if let Some(dir) = &o.params.tls.tls_creds {
        // Read before the guest starts: bad credentials end the process, not a migration.
        tls::ClientTls::load(
            dir,
            &o.params.tls.tls_authz,
            o.params.tls_hostname.as_deref(),
        )
        .with_context(|| format!("--tls-creds {}", dir.display()))?;
    }
    let vm = match &o.kernel {
        Some(_) => boot_pvh(&o)?,
        None => start_guest(&o.guest)?,
    };
    eprintln!(
        "guest running: {} vCPU(s), {} MiB, tracker {}{}",
        vm.config().vcpus,
        vm.ram().total_bytes() >> 20,
        tracking.mode().name(),
        match vm.platform() {
            Platform::Workload => format!(
                ", working set {} MiB, dirty rate {}",
                o.guest.working_set >> 20,
                if o.guest.dirty_rate == u64::MAX {
                    "max".to_string()
                } else {
                    format!("{:.1} MiB/s", o.guest.dirty_rate as f64 / (1 << 20) as f64)
                }
            ),
            Platform::Pvh => " (PVH kernel)".to_string(),
        }
    );
    let svc = VmService::with_guest(vm, ServiceConfig::default());
    configure(&svc, tracking, &o.params)?;
    if let Some(q) = o.vcpu_dirty_limit {
        svc.set_vcpu_dirty_limit(None, q)?;
        eprintln!(
            "dirty limit: {:.1} MiB/s per vCPU",
            q as f64 / (1 << 20) as f64
        );
    }
    let server = o.qmp.as_deref().map(|p| serve(&svc, p)).transpose()?;
    svc.start_monitor()?;
    if !o.json {
        spawn_status_lines(svc.clone(), "source");
    }
    if let Some(to) = o.replicate_to.clone() {
        let console = match o.kernel {
            Some(_) => Some(console_sink(&o)?),
            None => None,
        };
        crate::replicate_cmd::start_primary(&svc, &to, o.checkpoint_ms, console, o.json)?;
    }
    if let Some(to) = o.migrate_to.clone() {
        let auto = AutoMigrate {
            svc: svc.clone(),
            uri: control::uri::with_scheme(&to),
            after: Duration::from_secs_f64(o.migrate_after),
            after_output: o.migrate_after_output.clone(),
            exit_after: o.exit_after_migrate,
            monitor: o.qmp.is_some(),
            json: o.json,
        };
        std::thread::Builder::new()
            .name("auto-migrate".into())
            .spawn(move || auto.run())
            .context("starting the migration thread")?;
    }
    let exit = svc
        .wait_done(o.duration.map(Duration::from_secs_f64))
        .unwrap_or(ProcessExit::Finished);
    Ok(end_process(server, &exit))
}

/// `--migrate-to`: one migration after a delay, through the service (as `migrate` would).
struct AutoMigrate {
    svc: VmService,
    uri: String,
    after: Duration,
    /// Start the `after` clock when the console first prints this.
    after_output: Option<String>,
    exit_after: bool,
    /// A monitor is attached: a migrated-away source then waits in `postmigrate` for `quit`
    /// (unless --exit-after-migrate), as QEMU does.
    monitor: bool,
    json: bool,
}

impl AutoMigrate {
    fn guest_writes(&self) -> Vec<u64> {
        self.svc.vm().map(|vm| writes(&vm)).unwrap_or_default()
    }

    /// Waits until the guest's console has printed `text`; false if the VM finished first.
    fn wait_for_output(&self, text: &str) -> bool {
        let needle = text.as_bytes();
        let (mut at, mut buf) = (0usize, Vec::new());
        loop {
            if let Some(d) = self.svc.vm().and_then(|vm| vm.devices().cloned()) {
                // Keep the last needle-1 bytes, so a match split across two reads is found.
                let keep = buf.len().min(needle.len().saturating_sub(1));
                buf.drain(..buf.len() - keep);
                at = d.serial_output_since(at, &mut buf);
                if buf.windows(needle.len().max(1)).any(|w| w == needle) {
                    return true;
                }
            }
            if self.svc.wait_done(Some(Duration::from_millis(5))).is_some() {
                return false;
            }
        }
    }

    fn run(self) {
        if let Some(text) = &self.after_output {
            if !self.wait_for_output(text) {
                return;
            }
        }
        // Guest progress (writes/s per vCPU) over the last second of the wait (or all of a
        // shorter one) and during the migration: what the migration's throttling costs each
        // vCPU.
        let window = self.after.min(Duration::from_secs(1));
        if self.svc.wait_done(Some(self.after - window)).is_some() {
            return;
        }
        let b0 = self.guest_writes();
        std::thread::sleep(window);
        let b1 = self.guest_writes();
        let secs = window.as_secs_f64().max(1e-3);
        let before: Vec<f64> = b0
            .iter()
            .zip(&b1)
            .map(|(a, b)| (b - a) as f64 / secs)
            .collect();
        let t0 = Instant::now();
        let m0 = self.guest_writes();
        if let Err(e) = self.svc.migrate(&self.uri) {
            eprintln!("ringvisor: migrate {}: {e}", self.uri);
            if self.exit_after {
                self.svc.finish(ProcessExit::MigrationFailed(e.to_string()));
            }
            return;
        }
        let info = watch_job(&self.svc, self.json);
        let m1 = self.guest_writes();
        let Some(summary) = wait_summary(&self.svc) else {
            return;
        };
        let secs = (t0.elapsed().as_secs_f64() - summary.downtime_ms / 1e3).max(1e-3);
        let during: Vec<f64> = m0
            .iter()
            .zip(&m1)
            .map(|(a, b)| b.saturating_sub(*a) as f64 / secs)
            .collect();
        let info_v = serde_json::to_value(&info).unwrap_or_default();
        if self.json {
            let mut v = serde_json::to_value(&summary).unwrap_or_default();
            v["progress_before"] = serde_json::json!(before);
            v["progress_during"] = serde_json::json!(during);
            v["query-migrate"] = info_v.clone();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            let sv = serde_json::to_value(&summary).unwrap_or_default();
            print!("{}", report::summary_text(&info_v, &sv));
            if !before.is_empty() {
                let list = |v: &[f64]| {
                    v.iter()
                        .map(|x| format!("{x:.0}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                eprintln!(
                    "guest progress (writes/s per vCPU): before [{}], during the migration [{}]",
                    list(&before),
                    list(&during)
                );
            }
        }
        let _ = std::io::stdout().flush();
        let completed = info.status == MigrationStatus::Completed;
        if completed && (!self.monitor || self.exit_after) {
            self.svc.finish(ProcessExit::MigratedAway);
        } else if !completed && self.exit_after {
            let why = info
                .error_desc
                .unwrap_or_else(|| report::outcome_sentence(&info_v));
            self.svc.finish(ProcessExit::MigrationFailed(why));
        } else if !completed {
            eprintln!("the migration did not complete; the guest keeps running here");
        }
    }
}

/// Shows a live progress line (not with `json`) until the job's status is final; returns
/// the final `query-migrate` state.
pub fn watch_job(svc: &VmService, json: bool) -> MigrationInfo {
    let pb = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
        pb.set_style(style);
    }
    loop {
        if let Some(info) = svc.migration_info() {
            if info.status.is_final() {
                pb.finish_and_clear();
                return info;
            }
            pb.set_message(report::progress_line(
                &serde_json::to_value(&info).unwrap_or_default(),
            ));
            pb.tick();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The summary of the job that just ended (the monitor thread reaps it within 50 ms).
fn wait_summary(svc: &VmService) -> Option<MigrationSummary> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(s) = svc.last_summary() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `ringvisor incoming`.
pub struct IncomingOpts {
    pub incoming: Option<String>,
    pub listen: Option<String>,
    pub qmp: Option<PathBuf>,
    pub track: TrackArgs,
    pub limits: DestLimitArgs,
    pub duration: Option<f64>,
    pub console: Option<PathBuf>,
    pub tls: crate::cli_args::TlsArgs,
    pub json: bool,
}

pub fn incoming(o: IncomingOpts) -> Result<i32> {
    let uri = match (&o.incoming, &o.listen) {
        (Some(u), _) => u.clone(),
        (None, Some(l)) => control::uri::with_scheme(l),
        (None, None) => {
            usage_error("give --incoming tcp:HOST:PORT, --incoming defer or --listen HOST:PORT")
        }
    };
    if uri == "defer" && o.qmp.is_none() {
        usage_error(
            "--incoming defer needs --qmp unix:PATH (migrate-incoming comes over the monitor)",
        );
    }
    if uri != "defer" {
        if let Err(e) = control::uri::tcp_addr(&uri) {
            usage_error(format!("--incoming: {e}"));
        }
    }
    let (tls_creds, tls_authz) = o.tls.parameters();
    if let Some(dir) = &o.tls.tls_creds {
        // Read now, so bad credentials end the process before it listens.
        tls::ServerTls::load(dir, &o.tls.tls_authz)
            .with_context(|| format!("--tls-creds {}", dir.display()))?;
    }
    need_kvm()?;
    if let Some(p) = &o.console {
        // Created now: the receiving thread's seccomp filter lets it open, not create, files
        // (and a console path that cannot be written fails before anything listens).
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("--console {}", p.display()))?;
    }
    let dest = DestOptions {
        tracking: o.track.tracking(),
        // A PVH guest's console continues on this process's stdout (or the --console file).
        serial: console_output(o.console.as_deref(), o.json),
        max_guest_memory: o.limits.max_guest_memory,
        handshake_timeout: Duration::from_secs_f64(o.limits.handshake_timeout),
        progress_timeout: Duration::from_secs_f64(o.limits.progress_timeout),
        ..DestOptions::default()
    };
    let svc = VmService::incoming(dest, ServiceConfig::default());
    // As QEMU: the destination's tls-creds/tls-authz are migration parameters, set before
    // migrate-incoming (and changeable over QMP until then; tls-authz until a source
    // connects).
    svc.set_parameters(&migration::params::MigrateSetParameters {
        tls_creds,
        tls_authz,
        ..Default::default()
    })?;
    let server = o.qmp.as_deref().map(|p| serve(&svc, p)).transpose()?;
    svc.start_monitor()?;
    if uri != "defer" {
        let addr = svc.migrate_incoming(&uri)?;
        // The demo and the benchmarks read the address from this line: stdout, except with
        // --json, whose stdout carries exactly one JSON document.
        if o.json {
            eprintln!("listening {addr}");
        } else {
            println!("listening {addr}");
            std::io::stdout().flush()?;
        }
    }
    let summary = loop {
        if let Some(exit) = svc.wait_done(Some(Duration::from_millis(50))) {
            return Ok(end_process(server, &exit));
        }
        if let Some(s) = svc.incoming_summary() {
            break s;
        }
    };
    if o.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!(
            "[dest] guest resumed: {} passes, {} pages ({} zero), {:.1} MiB received, restore {:.1} ms ({})",
            summary.iterations,
            summary.pages,
            summary.zero_pages,
            summary.bytes as f64 / (1 << 20) as f64,
            summary.restore_ms,
            summary
                .restore_breakdown_ms
                .iter()
                .map(|(w, ms)| format!("{w} {ms:.1} ms"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        spawn_status_lines(svc.clone(), "dest");
    }
    let exit = svc
        .wait_done(o.duration.map(Duration::from_secs_f64))
        .unwrap_or(ProcessExit::Finished);
    Ok(end_process(server, &exit))
}

/// `ringvisor demo`: a destination process and a source guest on loopback, migrated with the
/// chosen tracker, with a summary. Exit status 0 only if the migration completed.
pub fn demo(g: GuestArgs, params: MigrateArgs, json: bool) -> Result<i32> {
    check_guest(&g);
    need_kvm()?;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["incoming", "--listen", "127.0.0.1:0", "--duration", "3"])
        .args(["--tracker", g.track.tracker.name()])
        .args(["--ring-entries", &g.track.ring_entries.to_string()])
        .args(
            params
                .tls
                .tls_creds
                .iter()
                .flat_map(|d| [std::ffi::OsStr::new("--tls-creds"), d.as_os_str()]),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the destination process")?;
    let mut out = BufReader::new(child.stdout.take().context("child stdout")?);
    let mut first = String::new();
    out.read_line(&mut first)?;
    let Some(addr) = first.trim().strip_prefix("listening ").map(str::to_string) else {
        let _ = child.kill();
        bail!("the destination did not start (it said {first:?})");
    };
    eprintln!(
        "demo: destination process {} listening on {addr}",
        child.id()
    );
    let vm = start_guest(&g)?;
    let svc = VmService::with_guest(vm, ServiceConfig::default());
    configure(&svc, g.track.tracking(), &params)?;
    svc.start_monitor()?;
    eprintln!(
        "demo: source guest running ({} vCPUs, {} MiB, dirtying {:.0} MiB/s over a {} MiB hot set); warming up 1.5 s",
        g.vcpus,
        g.memory >> 20,
        g.dirty_rate.min(1 << 50) as f64 / (1 << 20) as f64,
        g.working_set >> 20
    );
    std::thread::sleep(Duration::from_millis(1500));
    eprintln!(
        "demo: migrating with the {} tracker to {addr}",
        g.track.tracker.name()
    );
    if let Err(e) = svc.migrate(&format!("tcp:{addr}")) {
        let _ = child.kill();
        return Err(e.into());
    }
    let info = watch_job(&svc, json);
    let summary = wait_summary(&svc).context("the migration left no summary")?;
    let info_v = serde_json::to_value(&info)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!(
            "{}",
            report::summary_text(&info_v, &serde_json::to_value(&summary)?)
        );
    }
    if info.status != MigrationStatus::Completed {
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("demo: the migration did not complete; the source guest kept running");
        return Ok(1);
    }
    if summary.verified == Some(false) {
        let _ = child.kill();
        bail!("memory digests differ between source and destination");
    }
    let status = child.wait()?;
    let rest = std::io::Read::read_to_string(&mut out, &mut String::new());
    drop(rest);
    if !status.success() {
        bail!("the destination process failed ({status})");
    }
    eprintln!(
        "demo: done: the guest ran on the destination after the switchover (its [dest] lines)"
    );
    Ok(0)
}
