//! The outgoing migration: `migrate`, `query-migrate`, `migrate_cancel`, parameters and
//! capabilities, the job's events (`MIGRATION`, `MIGRATION_PASS`, `STOP`/`RESUME` around
//! the switchover) and what happens when a job ends (reaping).

use migration::params::{MigrateSetParameters, MigrationCapabilityStatus};
use migration_engine::{JobEvent, MigrationInfo, MigrationJob, MigrationStatus, MigrationSummary};
use qmp::{Args, CommandError};
use serde_json::{json, Value};

use crate::error::ControlError;
use crate::params::{
    apply_to_options, capabilities_from_args, check_capabilities, set_parameters_from_args,
    source_options,
};
use crate::service::{Core, Inner, Notify, VmService};
use crate::state::{ProcessExit, RunState};
use crate::uri::tcp_addr;

/// The outgoing migration: running, or the last one that ended.
pub(crate) enum JobSlot {
    /// On its thread.
    Running {
        job: Box<MigrationJob>,
        /// A standing dirty limit was lifted for this migration (its own limit works
        /// instead); it is restored unless the guest leaves.
        limits_suspended: bool,
    },
    /// Ended: its last state and summary.
    Finished(Box<(MigrationInfo, MigrationSummary)>),
}

impl JobSlot {
    pub(crate) fn info(&self) -> MigrationInfo {
        match self {
            JobSlot::Running { job, .. } => job.info(),
            JobSlot::Finished(f) => f.0.clone(),
        }
    }

    pub(crate) fn summary(&self) -> Option<MigrationSummary> {
        match self {
            JobSlot::Running { .. } => None,
            JobSlot::Finished(f) => Some(f.1.clone()),
        }
    }

    /// Running and not yet in a final status.
    pub(crate) fn is_active(&self) -> bool {
        match self {
            JobSlot::Running { job, .. } => !job.info().status.is_final(),
            JobSlot::Finished(_) => false,
        }
    }
}

/// Moves the run state along with the job's status; the caller that wins a transition emits
/// its event, so the job thread and a query racing it never emit twice.
pub(crate) fn follow_job_status(n: &Notify, s: MigrationStatus) {
    match s {
        MigrationStatus::Device if n.transition(RunState::Running, RunState::FinishMigrate) => {
            n.emit("STOP", None);
        }
        MigrationStatus::Completed => {
            n.transition(RunState::FinishMigrate, RunState::Postmigrate);
        }
        MigrationStatus::Failed | MigrationStatus::Cancelled
            if n.transition(RunState::FinishMigrate, RunState::Running) =>
        {
            n.emit("RESUME", None);
        }
        _ => {}
    }
}

fn on_job_event(n: &Notify, ev: JobEvent) {
    match ev {
        JobEvent::Status(s) => {
            follow_job_status(n, s);
            n.emit("MIGRATION", Some(json!({ "status": s })));
        }
        JobEvent::Pass { pass } => n.emit("MIGRATION_PASS", Some(json!({ "pass": pass }))),
    }
}

impl Core {
    /// Collects a job whose thread has ended: its summary is kept, a suspended standing dirty
    /// limit comes back (unless the guest left), and the process ends if configured to.
    pub(crate) fn reap(&self, g: &mut Inner) {
        let ended = matches!(&g.job, Some(JobSlot::Running { job, .. }) if job.is_finished());
        if !ended {
            return;
        }
        let Some(JobSlot::Running {
            job,
            limits_suspended,
        }) = g.job.take()
        else {
            return;
        };
        let info = job.info();
        let summary = job.wait();
        follow_job_status(&self.notify, info.status);
        let completed = info.status == MigrationStatus::Completed;
        let reason = info
            .error_desc
            .clone()
            .unwrap_or_else(|| format!("the migration ended {}", status_name(info.status)));
        if completed {
            tracing::info!(
                total_ms = summary.total_ms,
                downtime_ms = summary.downtime_ms,
                "migration completed: the guest runs on the destination"
            );
            g.limits.stop();
        } else {
            tracing::warn!(status = status_name(info.status), reason = %reason,
                "migration did not complete: the guest keeps running here");
            if limits_suspended {
                if let Some(vm) = g.vm.clone() {
                    g.limits.resume(&vm);
                }
            }
        }
        g.job = Some(JobSlot::Finished(Box::new((info, summary))));
        match (
            completed,
            self.cfg.exit_when_migrated,
            self.cfg.exit_after_migration,
        ) {
            (true, true, _) | (true, _, true) => self.notify.finish(ProcessExit::MigratedAway),
            (false, _, true) => self.notify.finish(ProcessExit::MigrationFailed(reason)),
            _ => {}
        }
    }

    /// Brings the run state up to the job's status (the job's event may still be on its way).
    pub(crate) fn sync_run_state(&self, g: &Inner) {
        if let Some(job) = &g.job {
            follow_job_status(&self.notify, job.info().status);
        }
    }
}

/// QEMU's name of a migration status.
pub fn status_name(s: MigrationStatus) -> &'static str {
    match s {
        MigrationStatus::None => "none",
        MigrationStatus::Setup => "setup",
        MigrationStatus::Active => "active",
        MigrationStatus::Device => "device",
        MigrationStatus::Completed => "completed",
        MigrationStatus::Failed => "failed",
        MigrationStatus::Cancelling => "cancelling",
        MigrationStatus::Cancelled => "cancelled",
    }
}

impl VmService {
    /// `migrate`: starts migrating the guest to `uri` (`tcp:HOST:PORT`) as a job and returns
    /// at once. Refused (nothing connects) while a migration runs, without a running guest,
    /// or when the capabilities do not fit the tracker. A destination that cannot be reached
    /// is a failed job; the guest keeps running here.
    pub fn migrate(&self, uri: &str) -> Result<(), ControlError> {
        let addr = tcp_addr(uri)?.to_string();
        let mut g = self.core.lock();
        let vm = g.outgoing_guest(self.core.notify.state())?;
        if crate::dirty::bitmap_measurement_running(&self.core) {
            return Err(ControlError::DirtyLogBusy("dirty-bitmap measurement"));
        }
        check_capabilities(g.tracker, &g.caps)?;
        let mut opts = source_options(&g.params, &g.caps);
        opts.tls = crate::params::client_tls(&g.params)?;
        let suspend = g.caps.dirty_limit && g.limits.any();
        if suspend {
            g.limits.suspend();
        }
        let n = self.core.notify.clone();
        match MigrationJob::start(vm, addr, opts, Box::new(move |ev| on_job_event(&n, ev))) {
            Ok(job) => {
                tracing::info!(uri, "migration started");
                g.job = Some(JobSlot::Running {
                    job: Box::new(job),
                    limits_suspended: suspend,
                });
                Ok(())
            }
            Err(e) => {
                if suspend {
                    if let Some(vm) = g.vm.clone() {
                        g.limits.resume(&vm);
                    }
                }
                Err(e.into())
            }
        }
    }

    /// `migrate_cancel`: the guest keeps running here and the destination drops what it
    /// received. No effect without a running migration or after its commit.
    pub fn cancel_migration(&self) {
        let g = self.core.lock();
        if let Some(JobSlot::Running { job, .. }) = &g.job {
            tracing::info!("migration cancel requested");
            job.cancel();
        }
    }

    /// `migrate-set-parameters`: checks every field, then applies them, also to a running
    /// job (downtime limit, bandwidth, timeout and dirty limit take effect while it runs).
    pub fn set_parameters(&self, set: &MigrateSetParameters) -> Result<(), ControlError> {
        let mut g = self.core.lock();
        let g = &mut *g;
        set.apply(&mut g.params)?;
        if let Some(JobSlot::Running { job, .. }) = &g.job {
            let (p, c) = (&g.params, &g.caps);
            job.set_options(|o| apply_to_options(p, c, o));
        }
        Ok(())
    }

    /// `migrate-set-capabilities`: refused while a migration runs and when the result does
    /// not fit the tracker.
    pub fn set_capabilities(&self, list: &[MigrationCapabilityStatus]) -> Result<(), ControlError> {
        let mut g = self.core.lock();
        if g.job.as_ref().is_some_and(JobSlot::is_active) {
            return Err(ControlError::MigrationActive);
        }
        let mut next = g.caps;
        next.apply(list)?;
        check_capabilities(g.tracker, &next)?;
        g.caps = next;
        Ok(())
    }

    fn query_migrate(&self) -> Value {
        let g = self.core.lock();
        self.core.sync_run_state(&g);
        match &g.job {
            Some(job) => serde_json::to_value(job.info()).unwrap_or_else(|_| json!({})),
            None => self.incoming_info(),
        }
    }

    fn query_passes(&self) -> Value {
        let g = self.core.lock();
        match &g.job {
            None => json!({}),
            Some(JobSlot::Running { job, .. }) => {
                let info = job.info();
                json!({"status": info.status, "current": info.x_ringvisor})
            }
            Some(JobSlot::Finished(f)) => {
                let (info, summary) = &**f;
                json!({
                    "status": info.status,
                    "passes": summary.iterations,
                    "verified": summary.verified,
                    "summary": summary,
                })
            }
        }
    }

    pub(crate) fn migration_command(&self, name: &str, args: &Args) -> Result<Value, CommandError> {
        let done = |r: Result<(), ControlError>| r.map(|()| json!({})).map_err(CommandError::from);
        match name {
            "migrate" => {
                let uri = args.required_str("uri")?;
                let _detach = args.optional_bool("detach")?;
                if args.optional_bool("resume")? == Some(true) {
                    return Err(CommandError::generic(
                        "ringvisor has no postcopy: 'resume' is not supported",
                    ));
                }
                args.deny_unknown(&["uri", "detach", "resume"])?;
                done(self.migrate(uri))
            }
            "query-migrate" => {
                args.deny_unknown(&[])?;
                Ok(self.query_migrate())
            }
            "migrate_cancel" => {
                args.deny_unknown(&[])?;
                self.cancel_migration();
                Ok(json!({}))
            }
            "migrate-set-parameters" => {
                let set = set_parameters_from_args(args)?;
                done(self.set_parameters(&set))
            }
            "query-migrate-parameters" => {
                args.deny_unknown(&[])?;
                Ok(serde_json::to_value(self.parameters()).unwrap_or_else(|_| json!({})))
            }
            "migrate-set-capabilities" => {
                let list = capabilities_from_args(args)?;
                done(self.set_capabilities(&list))
            }
            "query-migrate-capabilities" => {
                args.deny_unknown(&[])?;
                Ok(
                    serde_json::to_value(self.capabilities().status())
                        .unwrap_or_else(|_| json!([])),
                )
            }
            "x-ringvisor-query-migration-passes" => {
                args.deny_unknown(&[])?;
                Ok(self.query_passes())
            }
            _ => Err(CommandError::command_not_found(name)),
        }
    }
}
