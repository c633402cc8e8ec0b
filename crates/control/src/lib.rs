//! ringvisor's control plane: what a VM process answers on its QMP monitor.
//!
//! [`VmService`] owns the running guest (a `vmm::Vm`: the workload or a PVH guest), or
//! waits for one as a migration destination, and implements [`qmp::Handler`] with QEMU's
//! command names, argument names, units and result shapes:
//!
//! - run state: `query-status`, `stop`, `cont`, `quit`, `query-version` ([`RunState`]);
//! - outgoing migration as a job: `migrate`, `query-migrate`, `migrate_cancel`,
//!   `migrate-set-parameters` / `query-migrate-parameters` (live while a job runs),
//!   `migrate-set-capabilities` / `query-migrate-capabilities` (`migration::params`);
//! - incoming migration: `migrate-incoming` for a process started `--incoming defer`;
//! - dirty rate and limits: `calc-dirty-rate` / `query-dirty-rate`,
//!   `set-vcpu-dirty-limit` / `cancel-vcpu-dirty-limit` / `query-vcpu-dirty-limit`;
//! - ringvisor's own: `x-ringvisor-query-guest`, `x-ringvisor-query-migration-passes`;
//! - events: `MIGRATION`, `MIGRATION_PASS`, `STOP`, `RESUME`, `SHUTDOWN`.
//!
//! The data flow of a command: QMP client -> `qmp::QmpServer` (framing, negotiation, one
//! thread per client) -> [`VmService`] (checks, parameters, run state) ->
//! `migration_engine::MigrationJob` (the migration on its own thread) -> the engine. The
//! job reports back through callbacks that move the run state and emit events; nothing
//! here waits for the job.
//!
//! The process around it (the CLI) builds the VM and the server, then waits in
//! [`VmService::wait_done`] for a [`ProcessExit`]: `quit`, a guest that powered off or
//! crashed, or a migration the process was told to end after.
//!
//! Module map: `service` ([`VmService`], run state commands, the monitor thread),
//! `migrate` (the job and its commands), `incoming` (the destination), `dirty` (dirty rate
//! and limits), [`params`] (QMP arguments to `migration::params`, tracker checks), [`uri`],
//! [`state`], [`error`].
#![deny(missing_docs)]

mod dirty;
pub mod error;
mod incoming;
mod migrate;
pub mod params;
pub mod replicate;
mod service;
pub mod state;
pub mod uri;

pub use dirty::{RateMode, DEFAULT_SAMPLE_PAGES};
pub use error::ControlError;
pub use migrate::status_name;
pub use service::{ServiceConfig, VmService, COMMANDS};
pub use state::{ProcessExit, RunState};
