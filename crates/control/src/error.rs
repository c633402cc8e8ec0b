//! Why a control-plane operation was refused or failed. Each variant's text is what a QMP
//! client reads in the `desc` of a `GenericError` (QEMU's wording where QEMU has the case).

use std::io;

use migration::params::ParamError;

/// A refused or failed control operation.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A migration URI with a scheme other than `tcp:`.
    #[error("unknown migration protocol: {0} (ringvisor migrates over tcp:HOST:PORT)")]
    UnsupportedUri(String),
    /// A `tcp:` URI without `HOST:PORT`.
    #[error("invalid migration URI {0}: expected tcp:HOST:PORT")]
    BadUri(String),
    /// The process has no guest yet (a destination before its migration arrived).
    #[error("there is no guest here yet: this process waits for an incoming migration")]
    NoGuest,
    /// A migration is running.
    #[error("There's a migration process in progress")]
    MigrationActive,
    /// `migrate` on a paused guest.
    #[error("the guest is paused: 'cont' first (ringvisor migrates running guests)")]
    GuestPaused,
    /// The guest already runs on the destination.
    #[error("the guest has migrated away (run state postmigrate)")]
    GuestMigrated,
    /// The guest has stopped for good (powered off or crashed).
    #[error("the guest is no longer running (run state {0})")]
    GuestGone(&'static str),
    /// A migration parameter or capability is out of range, unknown or in conflict.
    #[error(transparent)]
    Param(#[from] ParamError),
    /// `migrate-incoming` in a process that was not started to receive one.
    #[error("this process was not started with --incoming defer: it has no incoming migration")]
    NotIncoming,
    /// `migrate-incoming` twice.
    #[error("The incoming migration has already been started")]
    IncomingStarted,
    /// The listening socket could not be created.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The TLS credentials (`tls-creds`) could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The migration job could not be started.
    #[error("cannot start the migration: {0}")]
    Migration(#[from] migration_engine::MigrationError),
    /// A `cpu-index` outside the VM.
    #[error("incorrect cpu index specified: {index} (the guest has {vcpus} vCPUs)")]
    CpuIndex {
        /// The index given.
        index: i64,
        /// vCPUs of the guest.
        vcpus: usize,
    },
    /// `calc-dirty-rate` while a measurement runs.
    #[error("the dirty rate is already being measured")]
    DirtyRateMeasuring,
    /// A dirty-rate mode the tracker cannot serve.
    #[error("mode {mode} is not enabled with the {tracker} tracker, use another method instead")]
    DirtyRateMode {
        /// The mode asked for.
        mode: &'static str,
        /// The VM's tracker.
        tracker: &'static str,
    },
    /// `calc-time` out of range.
    #[error(
        "calc-time is out of range [1, 60] s (or [100, 60000] ms with calc-time-unit millisecond)"
    )]
    CalcTime,
    /// `sample-pages` out of range.
    #[error("sample-pages is out of range [128, 4096]")]
    SamplePages,
    /// An unknown enumeration value.
    #[error("Parameter '{param}' does not accept value '{value}'")]
    BadValue {
        /// The parameter.
        param: &'static str,
        /// The value given.
        value: String,
    },
    /// A dirty limit without the dirty ring.
    #[error(
        "the vCPU dirty limit requires the dirty ring tracker (this guest uses {0}); \
         QEMU likewise requires dirty-ring-size"
    )]
    DirtyLimitNeedsRing(&'static str),
    /// A zero dirty limit.
    #[error("Parameter 'dirty-rate' expects a rate of at least 1 MB/s")]
    DirtyLimitZero,
    /// Two different per-vCPU limits at once.
    #[error(
        "ringvisor holds every limited vCPU to one dirty-rate limit ({current} MB/s now); \
         cancel-vcpu-dirty-limit first to use another value"
    )]
    MixedDirtyLimits {
        /// The limit in force, MB/s.
        current: u64,
    },
    /// The dirty log is in use by the other of a dirty-bitmap measurement and a migration
    /// or replication.
    #[error(
        "a dirty-bitmap measurement and a migration or replication cannot share the dirty \
         log; wait for the {0} to finish"
    )]
    DirtyLogBusy(&'static str),
    /// The VMM failed (pausing vCPUs).
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    /// `x-ringvisor-replicate` while a replication runs, or `migrate` during one.
    #[error("a replication is in progress (x-ringvisor-replicate-stop ends it)")]
    ReplicationActive,
    /// `checkpoint-delay` out of range.
    #[error("Parameter 'checkpoint-delay' is out of range [1, 60000] ms (got {0})")]
    CheckpointDelay(u64),
    /// A helper thread could not be started.
    #[error("cannot start a thread: {0}")]
    Spawn(io::Error),
}

impl From<ControlError> for qmp::CommandError {
    fn from(e: ControlError) -> Self {
        qmp::CommandError::generic(e.to_string())
    }
}
