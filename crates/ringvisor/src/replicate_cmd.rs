//! Continuous replication from the command line: `ringvisor run ... --replicate-to
//! HOST:PORT --checkpoint-ms N` (the primary, on a thread of the VM process) and `ringvisor
//! standby --listen HOST:PORT` (receives checkpoints; on primary loss fails over and runs the
//! guest from the last applied checkpoint). See docs/replication.md.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use control::{ProcessExit, ServiceConfig, VmService};
use migration_engine::replicate::{
    failover, run_standby, PrimaryEnd, ReplicationSummary, StandbyOptions, VmImage,
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

/// The primary: replicates the service's guest to `addr` (through the service, so QMP's
/// `x-ringvisor-query-replication` sees it); prints the summary line when it ends (a lost
/// standby is reported, the guest runs on). `console`: a PVH guest's console, released only
/// as checkpoints are applied (output commit).
pub fn start_primary(
    svc: &VmService,
    addr: &str,
    checkpoint_ms: u64,
    console: Option<Box<dyn Write + Send>>,
    json: bool,
) -> Result<()> {
    let uri = control::uri::with_scheme(addr);
    svc.replicate(&uri, checkpoint_ms, console)
        .with_context(|| format!("replicating to {addr}"))?;
    eprintln!("replicating to {addr} every {checkpoint_ms} ms");
    let svc = svc.clone();
    std::thread::Builder::new()
        .name("replicate-watch".into())
        .spawn(move || loop {
            if let Some(sum) = svc.replication_summary() {
                eprintln!("{}", summary_line(&sum));
                if json {
                    if let Ok(s) = serde_json::to_string(&sum) {
                        println!("{s}");
                    }
                }
                return;
            }
            if svc.wait_done(Some(Duration::from_millis(100))).is_some() {
                return;
            }
        })
        .context("starting the replication watcher")?;
    Ok(())
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
        // A primary larger than this host can hold is refused before anything is mapped.
        max_guest_memory: Some(vmm::host::guest_memory_limit()?),
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
        "[standby] primary lost ({reason}); resumed the guest from checkpoint {} ({} applied{}) in {:.1} ms, after replaying its epoch's {} bytes of output",
        last.epoch,
        rep.applied,
        if rep.dropped_partial {
            ", a partial one dropped"
        } else {
            ""
        },
        t.elapsed().as_secs_f64() * 1e3,
        last.output.len()
    );
    if o.json {
        let mut r = report;
        r["resumed_epoch"] = serde_json::json!(last.epoch);
        r["replayed_output_bytes"] = serde_json::json!(last.output.len());
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
