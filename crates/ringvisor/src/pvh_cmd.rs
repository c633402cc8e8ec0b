//! `ringvisor run --kernel FILE`: a PVH kernel on the PVH platform, its console on stdout,
//! live-migratable like the workload guest (`--migrate-to`, or `ringvisor migrate --control`);
//! and the destination side of such a migration (`ringvisor incoming` hands a received PVH
//! guest to [`run_received`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest_cmd::{migrate_vm, print_summary, ControlRequest, MigrateArgs, TrackArgs};

/// What `run --kernel` boots.
pub struct PvhRunOpts {
    pub kernel: std::path::PathBuf,
    pub cmdline: String,
    pub console: Option<std::path::PathBuf>,
    pub memory: u64,
    pub vcpus: u64,
    pub track: TrackArgs,
    pub control: Option<std::path::PathBuf>,
    pub migrate_to: Option<String>,
    pub migrate_after: f64,
    pub params: MigrateArgs,
    pub duration: Option<f64>,
    pub exit_after_migrate: bool,
    pub dirty_limit: Option<u64>,
    pub json: bool,
}

/// How a PVH run ends, as a process exit code: the guest's power-off status, or 0 when it
/// migrated away or the duration passed.
fn status_code(s: &pvh::ExitStatus) -> Result<i32> {
    match s {
        pvh::ExitStatus::PowerOff(code) => {
            eprintln!("guest powered off with status {code}");
            Ok(i32::from(*code))
        }
        pvh::ExitStatus::TimedOut => Ok(0),
        pvh::ExitStatus::Crashed { vcpu, detail } => {
            bail!("the guest crashed on vCPU {vcpu}: {detail}")
        }
    }
}

/// The control socket: each connection sends one JSON request line; requests reach the
/// supervising loop through the channel with the connection to answer on.
pub(crate) fn control_listener(
    path: &std::path::Path,
) -> Result<mpsc::Receiver<(ControlRequest, std::os::unix::net::UnixStream)>> {
    let (tx, rx) = mpsc::channel();
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
    Ok(rx)
}

/// Runs a started PVH-platform VM until it powers off, crashes, migrates away (exit code 0)
/// or `duration` passes, serving control requests and an automatic migration.
fn supervise(
    vm: &mut vmm::Vm,
    control: Option<mpsc::Receiver<(ControlRequest, std::os::unix::net::UnixStream)>>,
    mut auto_migrate: Option<(String, f64, MigrateArgs, bool)>,
    duration: Option<f64>,
    mut limiter: Option<migration_engine::DirtyLimiter>,
    json: bool,
) -> Result<i32> {
    let t0 = Instant::now();
    loop {
        let slice = Duration::from_millis(50);
        if let Some(dev) = vm.devices().cloned() {
            if dev.wait_power_off(slice).is_some() {
                return status_code(&pvh::wait_exit(vm, Some(Duration::ZERO))?);
            }
        }
        if let Err(e) = vm.vcpus()?.check() {
            if !matches!(e, vmm::VmmError::PoweredOff { .. }) {
                return status_code(&pvh::wait_exit(vm, Some(Duration::ZERO))?);
            }
        }
        if let Some((to, after, params, exit_after)) = auto_migrate.clone() {
            if t0.elapsed().as_secs_f64() >= after {
                auto_migrate = None;
                // A standing dirty limit would fight the migration's own policy.
                if let Some(mut l) = limiter.take() {
                    l.stop();
                }
                let s = migrate_vm(vm, &to, &params.options()?, json)?;
                print_summary(&s, json)?;
                if s.completed() {
                    eprintln!("migrated to {to}; the guest runs there now");
                    return Ok(0);
                }
                if exit_after {
                    vm.stop()?;
                    bail!("the migration did not complete");
                }
                eprintln!("migration did not complete; the guest keeps running here");
            }
        }
        if let Some(rx) = &control {
            while let Ok((req, mut c)) = rx.try_recv() {
                let reply = match req {
                    ControlRequest::Migrate { to, params } => {
                        if let Some(mut l) = limiter.take() {
                            l.stop();
                        }
                        match params.options().and_then(|o| migrate_vm(vm, &to, &o, true)) {
                            Ok(s) => {
                                let _ = writeln!(c, "{}", serde_json::to_string(&s)?);
                                if s.completed() {
                                    eprintln!("migrated to {to}; the guest runs there now");
                                    return Ok(0);
                                }
                                continue;
                            }
                            Err(e) => serde_json::json!({"error": format!("{e:#}")}),
                        }
                    }
                    ControlRequest::Quit => {
                        let _ = writeln!(c, "{}", serde_json::json!({"ok": true}));
                        vm.stop()?;
                        return Ok(0);
                    }
                    ControlRequest::Status => serde_json::json!({"status": {
                        "machine": "pvh",
                        "tracker": vm.config().tracking.mode().name(),
                        "console_bytes": vm.devices().map(|d| d.serial_output().len()),
                        "throttle": vm.vcpu_handles().iter().map(|v| v.throttle()).collect::<Vec<_>>(),
                        "ring_dirty_pages_per_s": limiter.as_ref().map(|l| l.rates()),
                    }}),
                    req @ (ControlRequest::Dirtyrate { .. }
                    | ControlRequest::SetDirtyLimit { .. }) => {
                        crate::guest_cmd::answer_dirty_request(vm, &req, &mut limiter)
                    }
                };
                let _ = writeln!(c, "{reply}");
            }
        }
        if duration.is_some_and(|d| t0.elapsed().as_secs_f64() >= d) {
            vm.stop()?;
            return Ok(0);
        }
    }
}

/// `ringvisor run --kernel FILE`. Returns the process exit code.
pub fn run(o: PvhRunOpts) -> Result<i32> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: ringvisor runs guests on real KVM");
    }
    if let Some(d) = o.duration {
        if !(d.is_finite() && d > 0.0) {
            bail!("--duration must be a positive number of seconds");
        }
    }
    let kernel = pvh::read_kernel(&o.kernel)
        .with_context(|| format!("reading the kernel {}", o.kernel.display()))?;
    let cfg = pvh::PvhConfig {
        cmdline: o.cmdline.clone(),
        memory: o.memory,
        vcpus: o.vcpus as usize,
        serial: match &o.console {
            Some(p) => pvh::SerialOutput::File(p.clone()),
            None => pvh::SerialOutput::Stdout,
        },
        tracking: Some(o.track.tracking()?),
        ..pvh::PvhConfig::new(kernel)
    };
    let mut vm = pvh::boot(&cfg).context("booting the PVH kernel")?;
    eprintln!(
        "PVH guest: {} ({:#x} entry), {} vCPU(s), {} MiB, tracker {}",
        o.kernel.display(),
        vm.entry(),
        o.vcpus,
        o.memory >> 20,
        vm.vm().config().tracking.mode().name()
    );
    let control = match &o.control {
        Some(p) => Some(control_listener(p)?),
        None => None,
    };
    vm.start().context("starting the guest")?;
    let limiter = match o.dirty_limit {
        Some(q) => {
            let l = crate::guest_cmd::start_limiter(vm.vm())?;
            l.set_quota(Some(q), None);
            eprintln!("dirty limit: {} MB/s per vCPU", q as f64 / 1e6);
            Some(l)
        }
        None => None,
    };
    let auto = o
        .migrate_to
        .clone()
        .map(|to| (to, o.migrate_after, o.params.clone(), o.exit_after_migrate));
    supervise(vm.vm_mut(), control, auto, o.duration, limiter, o.json)
}

/// Keeps a PVH guest received by `ringvisor incoming` running; returns the exit code.
pub fn run_received(vm: &mut vmm::Vm, duration: Option<f64>, json: bool) -> Result<i32> {
    supervise(vm, None, None, duration, None, json)
}
