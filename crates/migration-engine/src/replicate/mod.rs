//! Continuous replication (COLO / Remus style): a hot standby kept current by checkpoints of
//! the running guest taken many times a second from its dirty pages, with failover from the
//! last complete checkpoint and output commit. Protocol, rules and failure model:
//! `docs/replication.md`; the wire format: `migration::wire::replica`.
//!
//! - [`primary`]: [`replicate`] a running [`MigratableVm`](crate::seam::MigratableVm).
//! - [`standby`]: [`run_standby`] receives into a [`ReplicaImage`] (a staged checkpoint
//!   touches the image only once complete and verified); [`failover`] restores the last
//!   applied checkpoint into a `vmm::Vm` and resumes it.
//! - [`output`]: output commit.

pub mod output;
pub mod primary;
pub mod standby;

pub use output::{GuestOutput, OutputCommit, VmConsole};
pub use primary::{replicate, Output, PrimaryOptions, ReplicaControl};
pub use standby::{
    failover, run_standby, AppliedCheckpoint, PrimaryEnd, ReplicaImage, StandbyOptions,
    StandbyReport, VmImage,
};

/// Per-checkpoint records kept in a summary (the oldest half is dropped beyond this).
pub const MAX_KEPT_CHECKPOINTS: usize = 100_000;

/// Where a replication is (QEMU's COLO has no such query; the names follow `query-migrate`'s
/// status style).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationStatus {
    /// Not started.
    #[default]
    None,
    /// Connecting, handshake.
    Setup,
    /// The initial copy.
    Seeding,
    /// Checkpointing.
    Active,
    /// Ended on purpose (stop, or `max_checkpoints`); the guest runs here.
    Stopped,
    /// The standby failed, closed or stopped answering; the guest runs here.
    StandbyLost,
    /// The VM failed (pause, memory, state); the guest was resumed if it could be.
    Failed,
}

/// The live counters of a replication (`x-ringvisor-query-replication`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplicationInfo {
    /// Status.
    pub status: ReplicationStatus,
    /// Last checkpoint taken.
    pub epoch: u64,
    /// Last checkpoint the standby applied.
    pub acked_epoch: u64,
    /// Pauses that had to wait for the standby's ack of the previous checkpoint.
    pub stalls: u64,
    /// Total time those pauses waited past their due time, µs.
    pub stall_us: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Why it ended, if it did not end on purpose.
    pub reason: Option<String>,
    /// At the end: whether the guest still runs on the primary.
    pub guest_running: bool,
}

/// One checkpoint, measured on the primary.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CheckpointStats {
    /// Its epoch.
    pub epoch: u64,
    /// Pages it carried (zero markers included).
    pub pages: u64,
    /// Of which zero markers.
    pub zero_pages: u64,
    /// Page copies made while the guest ran (ring pre-copy; a page the guest wrote again
    /// after its copy is copied again).
    pub precopy_pages: u64,
    /// Pages copied inside the pause.
    pub pause_copy_pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Pause to resume, µs.
    pub pause_us: u64,
    /// Pausing the vCPUs until all are parked, µs.
    pub park_us: u64,
    /// The final collect, µs.
    pub collect_us: u64,
    /// Copying the dirty pages not copied yet (ring: those written since the last harvest)
    /// into the checkpoint buffer, µs.
    pub copy_us: u64,
    /// vCPU and device state (and the output capture), µs.
    pub state_us: u64,
    /// Pause to the standby's ack, µs (0: never acked).
    pub latency_us: u64,
}

/// What a replication did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplicationSummary {
    /// The final counters and status.
    pub info: ReplicationInfo,
    /// Pages of the initial copy.
    pub seed_pages: u64,
    /// Collects that reported lost tracking (all memory went into the next checkpoint).
    pub tracking_lost_events: u64,
    /// The checkpoints, oldest first (at most [`MAX_KEPT_CHECKPOINTS`]).
    pub checkpoints: Vec<CheckpointStats>,
    /// From start to end, ms.
    pub total_ms: f64,
}
