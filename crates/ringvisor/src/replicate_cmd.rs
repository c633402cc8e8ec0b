//! Continuous replication from the command line: `ringvisor run ... --replicate-to
//! HOST:PORT --checkpoint-ms N` (the primary, on a thread of the VM process) and `ringvisor
//! standby --listen HOST:PORT` (receives checkpoints; on primary loss fails over and runs the
//! guest from the last applied checkpoint). See docs/replication.md.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use control::{ProcessExit, ServiceConfig, VmService};
use migration_engine::replicate::{
    failover, replicate, run_standby, Output, OutputCommit, PrimaryEnd, PrimaryOptions,
    ReplicaControl, ReplicationSummary, StandbyOptions, VmConsole, VmImage,
};

use crate::cli_args::TrackArgs;

/// Median and 99th percentile of `v` (sorted in place).
fn median_p99(v: &mut [u64]) -> (u64, u64) {
    if v.is_empty() {
        return (0, 0);
    }
    v.sort_unstable();
    let p99 = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
    (v[v.len() / 2], v[p99])
}

/// One line about a replication that ended.
pub fn summary_line(s: &ReplicationSummary) -> String {
    let mut pause: Vec<u64> = s.checkpoints.iter().map(|c| c.pause_us).collect();
    let mut lat: Vec<u64> = s.checkpoints.iter().map(|c| c.latency_us).collect();
    let (pm, p99) = median_p99(&mut pause);
    let (lm, l99) = median_p99(&mut lat);
    format!(
        "replication {:?}{}: {} checkpoints ({} applied), pause median {:.2} ms p99 {:.2} ms, checkpoint latency median {:.2} ms p99 {:.2} ms, {} stalls ({:.1} ms), {:.1} MiB sent",
        s.info.status,
        s.info
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        s.info.epoch,
        s.info.acked_epoch,
        pm as f64 / 1e3,
        p99 as f64 / 1e3,
        lm as f64 / 1e3,
        l99 as f64 / 1e3,
        s.info.stalls,
        s.info.stall_us as f64 / 1e3,
        s.info.bytes_sent as f64 / (1 << 20) as f64
    )
}

/// The primary: replicates the service's guest to `addr` on its own thread; a lost standby
/// is reported and the guest runs on. `console`: a PVH guest's console, released to `sink`
/// only as checkpoints are applied (output commit).
pub fn start_primary(
    svc: &VmService,
    addr: String,
    checkpoint_ms: u64,
    console: Option<Box<dyn Write + Send>>,
    json: bool,
) -> Result<Arc<ReplicaControl>> {
    let vm = svc.vm().context("no guest to replicate")?;
    let ctl = ReplicaControl::new();
    let ctl2 = ctl.clone();
    let opts = PrimaryOptions {
        checkpoint_delay: Duration::from_millis(checkpoint_ms),
        ..PrimaryOptions::default()
    };
    std::thread::Builder::new()
        .name("replicate".into())
        .spawn(move || {
            let mut src = VmConsole::new(vm.clone(), true);
            let mut sink = console;
            match TcpStream::connect(&addr) {
                Err(e) => {
                    eprintln!("ringvisor: replicate to {addr}: {e}; the guest runs unreplicated")
                }
                Ok(stream) => {
                    eprintln!("replicating to {addr} every {checkpoint_ms} ms");
                    let mut commit = sink.take().map(OutputCommit::new);
                    let output = commit.as_mut().map(|c| Output {
                        src: &mut src,
                        commit: c,
                    });
                    let sum = replicate(&*vm, stream, &opts, &ctl2, output);
                    eprintln!("{}", summary_line(&sum));
                    if json {
                        if let Ok(s) = serde_json::to_string(&sum) {
                            println!("{s}");
                        }
                    }
                    sink = commit.map(OutputCommit::into_sink);
                }
            }
            // Unreplicated from here on: the console flows straight out.
            if let Some(mut out) = sink {
                pump(&mut src, &mut *out);
            }
        })
        .context("starting the replication thread")?;
    Ok(ctl)
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

/// `ringvisor standby`.
pub struct StandbyOpts {
    pub listen: String,
    pub heartbeat_timeout_ms: u64,
    pub track: TrackArgs,
    pub console: Option<PathBuf>,
    pub duration: Option<f64>,
    pub json: bool,
}

pub fn standby(o: StandbyOpts) -> Result<i32> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: ringvisor runs guests on real KVM");
    }
    let l = TcpListener::bind(&o.listen).with_context(|| format!("listening on {}", o.listen))?;
    let addr = l.local_addr()?;
    if o.json {
        eprintln!("listening {addr}");
    } else {
        println!("listening {addr}");
        std::io::stdout().flush()?;
    }
    let (s, peer) = l.accept()?;
    eprintln!("[standby] primary {peer} connected");
    let opts = StandbyOptions {
        heartbeat_timeout: Duration::from_millis(o.heartbeat_timeout_ms),
        ..StandbyOptions::default()
    };
    let serial = match (&o.console, o.json) {
        (Some(p), _) => vmm::SerialOutput::File(p.clone()),
        (None, false) => vmm::SerialOutput::Stdout,
        (None, true) => vmm::SerialOutput::Stderr,
    };
    let tracking = o.track.tracking();
    let mut make = |h: &migration::wire::Hello, l: &migration::wire::MemoryLayout| {
        VmImage::create(h, l, tracking, &serial)
    };
    let (image, rep) = run_standby(s, &opts, &mut make, &mut |m| eprintln!("[standby] {m}"))?;
    let report = serde_json::json!({
        "applied": rep.applied,
        "last_epoch": rep.last.as_ref().map(|c| c.epoch),
        "dropped_partial": rep.dropped_partial,
        "heartbeats": rep.heartbeats,
        "bytes": rep.bytes,
        "end": format!("{:?}", rep.end),
    });
    let reason = match &rep.end {
        PrimaryEnd::Lost { reason } => reason.clone(),
        PrimaryEnd::Shutdown { reason } => {
            eprintln!("[standby] the primary ended replication ({reason}); no failover");
            if o.json {
                println!("{report}");
            }
            return Ok(0);
        }
        PrimaryEnd::Invalid { reason } => {
            if o.json {
                println!("{report}");
            }
            bail!(
                "the replication stream was invalid ({reason}); no failover, the primary runs on"
            );
        }
    };
    let Some(last) = rep.last.clone() else {
        bail!("primary lost ({reason}) before the first checkpoint: nothing to resume");
    };
    let t = std::time::Instant::now();
    let vm = failover(image, &last).context("failing over")?;
    eprintln!(
        "[standby] primary lost ({reason}); resumed the guest from checkpoint {} ({} applied{}) in {:.1} ms",
        last.epoch,
        rep.applied,
        if rep.dropped_partial {
            ", a partial one dropped"
        } else {
            ""
        },
        t.elapsed().as_secs_f64() * 1e3
    );
    if o.json {
        let mut r = report;
        r["resumed_epoch"] = serde_json::json!(last.epoch);
        println!("{r}");
    }
    std::io::stdout().flush()?;
    let svc = VmService::with_guest(vm, ServiceConfig::default());
    svc.start_monitor()?;
    if !o.json {
        crate::vm_cmd::spawn_status_lines(svc.clone(), "standby");
    }
    let exit = svc
        .wait_done(o.duration.map(Duration::from_secs_f64))
        .unwrap_or(ProcessExit::Finished);
    if let ProcessExit::GuestPoweredOff(code) = exit {
        eprintln!("guest powered off with status {code}");
    }
    Ok(exit.code())
}
