//! [`VmService`]: the VM process's control plane. It owns the guest (or waits for one), its
//! run state, the migration job, the parameters and capabilities, the dirty limiter and the
//! dirty-rate measurement, and answers QMP commands for all of them ([`qmp::Handler`]).
//!
//! Locking: `Core::inner` (VM, job, parameters, limits) is held while a command runs;
//! `Notify` (run state, events, the process end) is a separate small lock, because the
//! migration job reports on its own thread and from inside `migrate_cancel`, and must never
//! wait for a command to finish.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_dirty::TrackerMode;
use migration::params::{MigrationCapabilities, MigrationParameters};
use migration_engine::{DestOptions, MigrationInfo, MigrationSummary};
use qmp::{Args, ClientCtx, CommandError, EventSink, Handler};
use serde_json::{json, Map, Value};
use vmm::{Platform, Vm};

use crate::dirty::{DirtyLimits, RateState};
use crate::error::ControlError;
use crate::incoming::IncomingState;
use crate::migrate::JobSlot;
use crate::state::{ProcessExit, RunState};

/// How long `stop` waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the monitor thread checks the guest and the job.
const MONITOR_PERIOD: Duration = Duration::from_millis(50);

/// Every command the service answers (`query-commands` adds `qmp_capabilities` and itself).
pub const COMMANDS: [&str; 23] = [
    "query-status",
    "stop",
    "cont",
    "quit",
    "query-version",
    "migrate",
    "query-migrate",
    "migrate_cancel",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-incoming",
    "calc-dirty-rate",
    "query-dirty-rate",
    "set-vcpu-dirty-limit",
    "cancel-vcpu-dirty-limit",
    "query-vcpu-dirty-limit",
    "x-ringvisor-query-guest",
    "x-ringvisor-query-migration-passes",
    "x-ringvisor-replicate",
    "x-ringvisor-query-replication",
    "x-ringvisor-replicate-stop",
];

/// What the process does around migrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceConfig {
    /// End the process ([`ProcessExit::MigratedAway`]) once the guest has migrated away.
    /// Without it the source stays in `postmigrate` until `quit`, as QEMU does.
    pub exit_when_migrated: bool,
    /// End the process after the first migration attempt whatever its outcome
    /// ([`ProcessExit::MigrationFailed`] if it did not complete).
    pub exit_after_migration: bool,
    /// A destination drops a connection that sends nothing for this long (a stray client
    /// must not hold the listener for the migration's idle timeout).
    pub incoming_first_byte_timeout: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            exit_when_migrated: false,
            exit_after_migration: false,
            incoming_first_byte_timeout: Duration::from_secs(10),
        }
    }
}

/// Run state, event sink and the process end: what the job thread may touch.
pub(crate) struct Notify {
    run_state: Mutex<RunState>,
    events: OnceLock<EventSink>,
    done: Mutex<Option<ProcessExit>>,
    done_cv: Condvar,
}

pub(crate) fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every value behind these locks stays consistent across a panic (plain fields).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Notify {
    fn new(state: RunState) -> Self {
        Notify {
            run_state: Mutex::new(state),
            events: OnceLock::new(),
            done: Mutex::new(None),
            done_cv: Condvar::new(),
        }
    }

    /// Emits a QMP event (dropped when no monitor is attached).
    pub(crate) fn emit(&self, name: &str, data: Option<Value>) {
        tracing::debug!(event = name, data = ?data, "QMP event");
        if let Some(sink) = self.events.get() {
            let data = match data {
                Some(Value::Object(m)) => Some(m),
                _ => None,
            };
            sink.emit(name, data);
        }
    }

    pub(crate) fn state(&self) -> RunState {
        *relock(&self.run_state)
    }

    /// Sets the run state; returns the previous one.
    pub(crate) fn set_state(&self, s: RunState) -> RunState {
        std::mem::replace(&mut *relock(&self.run_state), s)
    }

    /// Sets the run state to `to` only if it is `from`; returns whether it did.
    pub(crate) fn transition(&self, from: RunState, to: RunState) -> bool {
        let mut g = relock(&self.run_state);
        if *g == from {
            *g = to;
            true
        } else {
            false
        }
    }

    /// Records how the process ends (the first reason wins) and wakes the owner.
    pub(crate) fn finish(&self, exit: ProcessExit) {
        let mut d = relock(&self.done);
        if d.is_none() {
            tracing::info!(%exit, "the VM process ends");
            *d = Some(exit);
            self.done_cv.notify_all();
        }
    }

    fn is_done(&self) -> bool {
        relock(&self.done).is_some()
    }
}

/// The VM, the job and the settings: what commands change.
pub(crate) struct Inner {
    pub(crate) vm: Option<Arc<Vm>>,
    /// The guest's tracker (a destination's: the one its received guest will get).
    pub(crate) tracker: TrackerMode,
    pub(crate) job: Option<JobSlot>,
    pub(crate) params: MigrationParameters,
    pub(crate) caps: MigrationCapabilities,
    pub(crate) limits: DirtyLimits,
    /// The guest's replication to a standby, if one was started.
    pub(crate) replication: Option<crate::replicate::ReplicationSlot>,
}

impl Inner {
    /// The guest, if it may start an outgoing stream (a migration or a replication): it is
    /// running (`state`), and neither a migration nor a replication is active.
    pub(crate) fn outgoing_guest(&self, state: RunState) -> Result<Arc<Vm>, ControlError> {
        let vm = self.vm.clone().ok_or(ControlError::NoGuest)?;
        match state {
            RunState::Running => {}
            RunState::Paused => return Err(ControlError::GuestPaused),
            RunState::FinishMigrate => return Err(ControlError::MigrationActive),
            RunState::Postmigrate => return Err(ControlError::GuestMigrated),
            RunState::Inmigrate => return Err(ControlError::NoGuest),
            s @ (RunState::Shutdown | RunState::InternalError) => {
                return Err(ControlError::GuestGone(s.name()))
            }
        }
        if self.job.as_ref().is_some_and(JobSlot::is_active) {
            return Err(ControlError::MigrationActive);
        }
        if self
            .replication
            .as_ref()
            .is_some_and(crate::replicate::ReplicationSlot::is_active)
        {
            return Err(ControlError::ReplicationActive);
        }
        Ok(vm)
    }
}

/// Everything shared by the service handle and its threads.
pub(crate) struct Core {
    pub(crate) cfg: ServiceConfig,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) notify: Arc<Notify>,
    pub(crate) rate: Arc<Mutex<RateState>>,
    pub(crate) incoming: Mutex<IncomingState>,
}

impl Core {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = relock(&self.inner);
        self.reap(&mut g);
        g
    }

    /// The monitor's periodic check: a finished job is reaped (under `lock`), then the
    /// guest's health.
    fn tick(&self) {
        let vm = self.lock().vm.clone();
        let Some(vm) = vm else { return };
        let state = self.notify.state();
        if matches!(state, RunState::Shutdown | RunState::InternalError) {
            return;
        }
        if let Some(code) = vm.devices().and_then(|d| d.powered_off()) {
            self.notify.set_state(RunState::Shutdown);
            self.notify.emit(
                "SHUTDOWN",
                Some(json!({"guest": true, "reason": "guest-shutdown"})),
            );
            self.notify.finish(ProcessExit::GuestPoweredOff(code));
            return;
        }
        if let Ok(Err(e)) = vm.vcpus().map(|v| v.check()) {
            if !matches!(e, vmm::VmmError::PoweredOff { .. }) {
                tracing::error!(error = %e, "the guest crashed");
                self.notify.set_state(RunState::InternalError);
                self.notify.emit(
                    "GUEST_PANICKED",
                    Some(json!({"action": "pause", "x-ringvisor-reason": e.to_string()})),
                );
                self.notify.finish(ProcessExit::GuestCrashed(e.to_string()));
            }
        }
    }
}

/// A VM process's control plane; cheap to clone (a handle). Register it as the
/// [`qmp::Handler`] of a `QmpServer`, then [`attach_events`](Self::attach_events) the
/// server's sink.
#[derive(Clone)]
pub struct VmService {
    pub(crate) core: Arc<Core>,
}

impl std::fmt::Debug for VmService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmService")
            .field("run_state", &self.core.notify.state())
            .finish_non_exhaustive()
    }
}

impl VmService {
    fn build(
        vm: Option<Vm>,
        tracker: TrackerMode,
        incoming: Option<DestOptions>,
        cfg: ServiceConfig,
    ) -> Self {
        let state = if vm.is_some() {
            RunState::Running
        } else {
            RunState::Inmigrate
        };
        VmService {
            core: Arc::new(Core {
                cfg,
                inner: Mutex::new(Inner {
                    vm: vm.map(Arc::new),
                    tracker,
                    job: None,
                    params: MigrationParameters::default(),
                    caps: MigrationCapabilities::default(),
                    limits: DirtyLimits::default(),
                    replication: None,
                }),
                notify: Arc::new(Notify::new(state)),
                rate: Arc::new(Mutex::new(RateState::default())),
                incoming: Mutex::new(IncomingState::new(incoming)),
            }),
        }
    }

    /// A service for a running guest (`vm` started): run state `running`.
    pub fn with_guest(vm: Vm, cfg: ServiceConfig) -> Self {
        let tracker = vm.config().tracking.mode();
        VmService::build(Some(vm), tracker, None, cfg)
    }

    /// A destination without a guest (run state `inmigrate`): it receives one after
    /// `migrate-incoming` ([`VmService::migrate_incoming`]) into a VM built with `dest`.
    pub fn incoming(dest: DestOptions, cfg: ServiceConfig) -> Self {
        let tracker = dest.tracking.mode();
        VmService::build(None, tracker, Some(dest), cfg)
    }

    /// Sends events to a QMP server's clients from now on (once; later calls are ignored).
    pub fn attach_events(&self, sink: EventSink) {
        let _ = self.core.notify.events.set(sink);
    }

    /// Starts the thread that watches the guest (power-off, crash) and reaps finished
    /// migration jobs; it ends when the process is done.
    pub fn start_monitor(&self) -> Result<(), ControlError> {
        let core = Arc::clone(&self.core);
        std::thread::Builder::new()
            .name("vm-monitor".into())
            .spawn(move || {
                while !core.notify.is_done() {
                    core.tick();
                    std::thread::sleep(MONITOR_PERIOD);
                }
            })
            .map(drop)
            .map_err(ControlError::Spawn)
    }

    /// Waits until the process should end (or `timeout` passes: `None`).
    pub fn wait_done(&self, timeout: Option<Duration>) -> Option<ProcessExit> {
        let n = &self.core.notify;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut d = relock(&n.done);
        loop {
            if let Some(e) = d.clone() {
                return Some(e);
            }
            match deadline {
                None => d = n.done_cv.wait(d).unwrap_or_else(|p| p.into_inner()),
                Some(dl) => {
                    let now = Instant::now();
                    if now >= dl {
                        return None;
                    }
                    d = n
                        .done_cv
                        .wait_timeout(d, dl - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Ends the process for a reason of the owner's (e.g. a `--duration` passed).
    pub fn finish(&self, exit: ProcessExit) {
        self.core.notify.finish(exit);
    }

    /// The run state.
    pub fn run_state(&self) -> RunState {
        self.core.notify.state()
    }

    /// The guest, once there is one.
    pub fn vm(&self) -> Option<Arc<Vm>> {
        self.core.lock().vm.clone()
    }

    /// The migration parameters in force.
    pub fn parameters(&self) -> MigrationParameters {
        self.core.lock().params.clone()
    }

    /// The migration capabilities in force.
    pub fn capabilities(&self) -> MigrationCapabilities {
        self.core.lock().caps
    }

    /// `query-migrate` of the outgoing migration (`None` before the first one).
    pub fn migration_info(&self) -> Option<MigrationInfo> {
        self.core.lock().job.as_ref().map(JobSlot::info)
    }

    /// The summary of the last finished outgoing migration.
    pub fn last_summary(&self) -> Option<MigrationSummary> {
        self.core.lock().job.as_ref().and_then(JobSlot::summary)
    }

    /// Pauses every vCPU (`stop`); emits `STOP`.
    pub fn stop(&self) -> Result<(), ControlError> {
        let g = self.core.lock();
        let vm = g.vm.clone().ok_or(ControlError::NoGuest)?;
        match self.core.notify.state() {
            RunState::Running => {}
            RunState::Paused | RunState::Postmigrate | RunState::FinishMigrate => return Ok(()),
            s @ (RunState::Shutdown | RunState::InternalError | RunState::Inmigrate) => {
                return Err(ControlError::GuestGone(s.name()))
            }
        }
        if g.job.as_ref().is_some_and(JobSlot::is_active) {
            return Err(ControlError::MigrationActive);
        }
        vm.vcpus()?.pause_all(PAUSE_TIMEOUT)?;
        self.core.notify.set_state(RunState::Paused);
        self.core.notify.emit("STOP", None);
        Ok(())
    }

    /// Resumes a paused guest (`cont`); emits `RESUME`.
    pub fn cont(&self) -> Result<(), ControlError> {
        let g = self.core.lock();
        let vm = g.vm.clone().ok_or(ControlError::NoGuest)?;
        match self.core.notify.state() {
            RunState::Paused => {}
            RunState::Running => return Ok(()),
            RunState::Postmigrate | RunState::FinishMigrate => {
                return Err(ControlError::GuestMigrated)
            }
            s => return Err(ControlError::GuestGone(s.name())),
        }
        vm.vcpus()?.resume_all();
        self.core.notify.set_state(RunState::Running);
        self.core.notify.emit("RESUME", None);
        Ok(())
    }

    /// `quit`: emits `SHUTDOWN` and ends the process (exit 0).
    pub fn quit(&self) {
        self.core.notify.emit(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": "host-qmp-quit"})),
        );
        self.core.notify.finish(ProcessExit::Quit);
    }

    fn query_status(&self) -> Value {
        {
            let g = self.core.lock();
            self.core.sync_run_state(&g);
        }
        let s = self.core.notify.state();
        json!({"status": s.name(), "running": s == RunState::Running, "singlestep": false})
    }

    fn query_guest(&self) -> Result<Value, ControlError> {
        let vm = self.core.lock().vm.clone().ok_or(ControlError::NoGuest)?;
        let n = vm.config().vcpus;
        let throttle: Vec<f64> = vm.vcpu_handles().iter().map(|v| v.throttle()).collect();
        let held: Vec<bool> = vm.vcpu_handles().iter().map(|v| v.held()).collect();
        let mut v = json!({
            "machine": vm.platform().name(),
            "vcpus": n,
            "memory-bytes": vm.ram().total_bytes(),
            "tracker": vm.config().tracking.mode().name(),
            "throttle": throttle,
            "held": held,
        });
        match vm.platform() {
            Platform::Workload => {
                let writes: Vec<u64> = (0..n).map(|i| vm.nr_writes(i).unwrap_or(0)).collect();
                v["writes"] = json!(writes);
            }
            Platform::Pvh => {
                let bytes = vm.devices().map(|d| d.serial_output_len()).unwrap_or(0);
                v["console-bytes"] = json!(bytes);
            }
        }
        Ok(v)
    }

    fn query_version() -> Value {
        let v = env!("CARGO_PKG_VERSION");
        let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        let (major, minor, micro) = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        json!({
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": format!("ringvisor {v}"),
        })
    }

    /// Runs one command as the QMP server would (also for tests and in-process callers).
    pub fn execute_command(
        &self,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<Value, CommandError> {
        let args = Args::new(args);
        let none = |args: &Args| args.deny_unknown(&[]);
        let ok = |r: Result<(), ControlError>| r.map(|()| json!({})).map_err(CommandError::from);
        match name {
            "query-status" => none(&args).map(|()| self.query_status()),
            "stop" => none(&args).and_then(|()| ok(self.stop())),
            "cont" => none(&args).and_then(|()| ok(self.cont())),
            "quit" => none(&args).map(|()| {
                self.quit();
                json!({})
            }),
            "query-version" => none(&args).map(|()| Self::query_version()),
            "x-ringvisor-query-guest" => {
                none(&args)?;
                self.query_guest().map_err(CommandError::from)
            }
            "migrate"
            | "query-migrate"
            | "migrate_cancel"
            | "migrate-set-parameters"
            | "query-migrate-parameters"
            | "migrate-set-capabilities"
            | "query-migrate-capabilities"
            | "x-ringvisor-query-migration-passes" => self.migration_command(name, &args),
            "migrate-incoming" => self.cmd_migrate_incoming(&args),
            "x-ringvisor-replicate"
            | "x-ringvisor-query-replication"
            | "x-ringvisor-replicate-stop" => self.replication_command(name, &args),
            "calc-dirty-rate"
            | "query-dirty-rate"
            | "set-vcpu-dirty-limit"
            | "cancel-vcpu-dirty-limit"
            | "query-vcpu-dirty-limit" => self.dirty_command(name, &args),
            _ => Err(CommandError::command_not_found(name)),
        }
    }
}

impl Handler for VmService {
    fn commands(&self) -> Vec<String> {
        COMMANDS.iter().map(|c| c.to_string()).collect()
    }

    fn execute(
        &self,
        name: &str,
        args: Map<String, Value>,
        _ctx: &ClientCtx,
    ) -> Result<Value, CommandError> {
        self.execute_command(name, args)
    }
}
