//! Continuous replication of the guest (`x-ringvisor-replicate`,
//! `x-ringvisor-query-replication`, `x-ringvisor-replicate-stop`): the engine's primary loop
//! (`migration_engine::replicate`) on its own thread, one at a time, never beside a
//! migration. The checkpoint interval is `checkpoint-delay` in ms, after QEMU's COLO
//! parameter `x-checkpoint-delay`.

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration_engine::replicate::{
    replicate, Output, OutputCommit, PrimaryOptions, ReplicaControl, ReplicationInfo,
    ReplicationSummary, VmConsole,
};
use qmp::{Args, CommandError};
use serde_json::{json, Value};

use crate::error::ControlError;
use crate::service::{relock, VmService};
use crate::uri::tcp_addr;

/// Default `checkpoint-delay`, ms.
pub const DEFAULT_CHECKPOINT_DELAY_MS: u64 = 100;

/// The replication of this process's guest (running or ended).
pub(crate) struct ReplicationSlot {
    ctl: Arc<ReplicaControl>,
    uri: String,
    checkpoint_delay_ms: u64,
    /// Set when it ended.
    summary: Arc<Mutex<Option<ReplicationSummary>>>,
}

impl ReplicationSlot {
    pub(crate) fn is_active(&self) -> bool {
        relock(&self.summary).is_none()
    }
}

impl VmService {
    /// Starts replicating the guest to the standby at `uri` (`tcp:HOST:PORT`), a checkpoint
    /// every `checkpoint_delay_ms`. With `console`, the guest's console (PVH platform, its
    /// capture) is released there only as checkpoints are applied (output commit), and
    /// straight through once replication ended.
    pub fn replicate(
        &self,
        uri: &str,
        checkpoint_delay_ms: u64,
        console: Option<Box<dyn Write + Send>>,
    ) -> Result<(), ControlError> {
        let addr = tcp_addr(uri)?.to_string();
        if !(1..=60_000).contains(&checkpoint_delay_ms) {
            return Err(ControlError::CheckpointDelay(checkpoint_delay_ms));
        }
        let mut g = self.core.lock();
        let vm = g.outgoing_guest(self.core.notify.state())?;
        let ctl = ReplicaControl::new();
        let summary = Arc::new(Mutex::new(None));
        let opts = PrimaryOptions {
            checkpoint_delay: Duration::from_millis(checkpoint_delay_ms),
            ..PrimaryOptions::default()
        };
        let (ctl2, done) = (ctl.clone(), summary.clone());
        std::thread::Builder::new()
            .name("replicate".into())
            .spawn(move || {
                let mut src = VmConsole::new(vm.clone(), true);
                let mut sink = console;
                let sum = match TcpStream::connect(&addr) {
                    Ok(stream) => {
                        let mut commit = sink.take().map(OutputCommit::new);
                        let output = commit.as_mut().map(|c| Output {
                            src: &mut src,
                            commit: c,
                        });
                        let sum = replicate(&*vm, stream, &opts, &ctl2, output);
                        sink = commit.map(OutputCommit::into_sink);
                        sum
                    }
                    Err(e) => {
                        let mut s = ReplicationSummary::default();
                        s.info.status = migration_engine::replicate::ReplicationStatus::StandbyLost;
                        s.info.reason = Some(format!("connecting to {addr}: {e}"));
                        s.info.guest_running = true;
                        s
                    }
                };
                tracing::info!(status = ?sum.info.status, reason = ?sum.info.reason, "replication ended");
                *relock(&done) = Some(sum);
                // Unreplicated from here on: the console flows straight out.
                if let Some(mut out) = sink {
                    pump(&mut src, &mut *out);
                }
            })
            .map_err(ControlError::Spawn)?;
        g.replication = Some(ReplicationSlot {
            ctl,
            uri: uri.to_string(),
            checkpoint_delay_ms,
            summary,
        });
        tracing::info!(uri, checkpoint_delay_ms, "replication started");
        Ok(())
    }

    /// The replication's live counters (`None`: never started).
    pub fn replication_info(&self) -> Option<ReplicationInfo> {
        let g = self.core.lock();
        let r = g.replication.as_ref()?;
        let ended = relock(&r.summary).as_ref().map(|s| s.info.clone());
        Some(ended.unwrap_or_else(|| r.ctl.info()))
    }

    /// The summary of the last replication, once it ended.
    pub fn replication_summary(&self) -> Option<ReplicationSummary> {
        let g = self.core.lock();
        let r = g.replication.as_ref()?;
        let s = relock(&r.summary).clone();
        s
    }

    /// Ends the replication at its next step (the standby does not take over).
    pub fn stop_replication(&self) {
        if let Some(r) = self.core.lock().replication.as_ref() {
            r.ctl.stop();
        }
    }

    pub(crate) fn replication_command(
        &self,
        name: &str,
        args: &Args,
    ) -> Result<Value, CommandError> {
        match name {
            "x-ringvisor-replicate" => {
                args.deny_unknown(&["uri", "checkpoint-delay"])?;
                let uri = args.required_str("uri")?;
                let delay = args
                    .optional_u64("checkpoint-delay")?
                    .unwrap_or(DEFAULT_CHECKPOINT_DELAY_MS);
                self.replicate(uri, delay, None)?;
                Ok(json!({}))
            }
            "x-ringvisor-replicate-stop" => {
                args.deny_unknown(&[])?;
                self.stop_replication();
                Ok(json!({}))
            }
            _ => {
                args.deny_unknown(&[])?;
                let g = self.core.lock();
                let Some(r) = g.replication.as_ref() else {
                    return Ok(json!({"status": "none"}));
                };
                let info = relock(&r.summary)
                    .as_ref()
                    .map(|s| s.info.clone())
                    .unwrap_or_else(|| r.ctl.info());
                let mut v = serde_json::to_value(info).unwrap_or_else(|_| json!({}));
                v["uri"] = json!(r.uri);
                v["checkpoint-delay"] = json!(r.checkpoint_delay_ms);
                Ok(v)
            }
        }
    }
}

/// Copies the guest's console to `out` every 20 ms, for as long as the process runs.
fn pump(src: &mut VmConsole, out: &mut dyn Write) {
    use migration_engine::replicate::GuestOutput;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        src.drain(&mut buf);
        if !buf.is_empty() && (out.write_all(&buf).is_err() || out.flush().is_err()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
