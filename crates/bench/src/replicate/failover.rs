//! Failover time with a real standby: the benchmark's guest replicated (50 ms epochs, 1024
//! dirty pages per epoch) through a loopback proxy to a standby whose image is a real
//! `vmm::Vm` (`VmImage`); once 5 checkpoints were applied the proxy loses the primary in one
//! of two ways:
//!
//! - **link closed**: both sides are shut down, as when the primary's process dies and its
//!   kernel closes the socket: the standby sees the end of the stream at once;
//! - **silent**: the primary's bytes stop and the standby's socket stays open, as when the
//!   primary's host dies or the link is cut: only the heartbeat timeout notices.
//!
//! Measured from that moment: detection (the standby's `run_standby` returns), restore
//! (`failover`: states checked and restored, vCPUs started) and the resumed guest's first
//! progress (its compute loop's counter moves past the checkpoint's value).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_dirty::TrackerMode;
use migration_engine::replicate::{
    failover, replicate, run_standby, PrimaryEnd, PrimaryOptions, ReplicaControl, StandbyOptions,
    VmImage,
};
use serde::Serialize;
use vmm::SerialOutput;

use super::{guest, io, median_f, progress, tracking, vm_err, ReplicateOpts};
use crate::error::{BenchError, Result};
use crate::Progress;

const DIRTY: u64 = 1024;
const EPOCH_MS: u64 = 50;
const APPLIED_BEFORE_LOSS: u64 = 5;

/// How the primary is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Loss {
    /// The connection is closed (a primary process that died).
    LinkClosed,
    /// The primary's bytes stop, the connection stays open (a dead host, a cut link).
    Silent,
}

/// One guest size and way of losing the primary: medians over the runs, ms.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverRow {
    /// Tracker of both sides.
    pub tracker: String,
    /// Guest size, GiB.
    pub size_gib: u64,
    /// How the primary was lost.
    pub loss: Loss,
    /// The standby's heartbeat timeout, ms.
    pub heartbeat_timeout_ms: u64,
    /// Runs that completed.
    pub runs: usize,
    /// Loss to the standby noticing it.
    pub detect_ms: f64,
    /// `failover`: restore and start.
    pub restore_ms: f64,
    /// From the start to the resumed guest's first progress.
    pub first_progress_ms: f64,
    /// Loss to first progress.
    pub total_ms: f64,
}

/// A loopback proxy between the primary and the standby that can lose the primary.
struct Proxy {
    frozen: Arc<AtomicBool>,
    primary_side: TcpStream,
    standby_side: TcpStream,
}

fn forward(mut from: TcpStream, mut to: TcpStream, frozen: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) if frozen.load(Ordering::SeqCst) => continue,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Proxy {
    /// The primary's end of a new connection to the standby at `standby`, through the proxy.
    fn connect(standby: std::net::SocketAddr) -> Result<(Proxy, TcpStream)> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding the proxy"))?;
        let addr = l.local_addr().map_err(io("proxy address"))?;
        let primary = TcpStream::connect(addr).map_err(io("connecting to the proxy"))?;
        let (p, _) = l.accept().map_err(io("proxy accept"))?;
        let s = TcpStream::connect(standby).map_err(io("proxy to the standby"))?;
        for x in [&p, &s] {
            x.set_nodelay(true).map_err(io("proxy nodelay"))?;
        }
        let frozen = Arc::new(AtomicBool::new(false));
        let clone = |x: &TcpStream| x.try_clone().map_err(io("proxy socket clone"));
        let (p2, s2, p3, s3) = (clone(&p)?, clone(&s)?, clone(&p)?, clone(&s)?);
        let f1 = frozen.clone();
        std::thread::spawn(move || forward(p2, s2, f1));
        let f2 = frozen.clone();
        std::thread::spawn(move || forward(s3, p3, f2));
        Ok((
            Proxy {
                frozen,
                primary_side: p,
                standby_side: s,
            },
            primary,
        ))
    }

    /// Loses the primary; returns the moment.
    fn lose(&self, how: Loss) -> Instant {
        self.frozen.store(true, Ordering::SeqCst);
        let t = Instant::now();
        if how == Loss::LinkClosed {
            let _ = self.standby_side.shutdown(Shutdown::Both);
        }
        let _ = self.primary_side.shutdown(Shutdown::Both);
        t
    }
}

/// What the standby thread measured: (detected, restored, first progress) instants.
type Times = (Instant, Instant, Instant);

fn standby(l: TcpListener, t: TrackerMode, entries: u32, timeout: Duration) -> Result<Times> {
    let (s, _) = l.accept().map_err(io("standby accept"))?;
    let opts = StandbyOptions {
        heartbeat_timeout: timeout,
        ..StandbyOptions::default()
    };
    let mut make = |h: &migration::wire::Hello, lay: &migration::wire::MemoryLayout| {
        VmImage::create(h, lay, tracking(t, entries), &SerialOutput::Capture)
    };
    let failed = |e: migration_engine::MigrationError| BenchError::Invalid(format!("standby: {e}"));
    let (image, rep) = run_standby(s, &opts, &mut make, &mut |_| {}).map_err(failed)?;
    let detected = rep.ended_at;
    let (PrimaryEnd::Lost { .. }, Some(last)) = (&rep.end, rep.last.as_ref()) else {
        return Err(BenchError::Invalid(format!(
            "the standby did not see a lost primary after a checkpoint: {:?}",
            rep.end
        )));
    };
    let at = progress(&image.vm)?;
    let mut vm = failover(image, last).map_err(failed)?;
    let restored = Instant::now();
    while progress(&vm)? <= at {
        if restored.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Invalid(
                "the resumed guest made no progress".into(),
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let running = Instant::now();
    vm.stop().map_err(vm_err)?;
    Ok((detected, restored, running))
}

/// One failover: (detect, restore, first progress) ms.
fn once(o: &ReplicateOpts, t: TrackerMode, gib: u64, how: Loss) -> Result<(f64, f64, f64)> {
    let mut vm = guest(t, o.ring_entries, gib, DIRTY, EPOCH_MS)?;
    std::thread::sleep(Duration::from_millis(300));
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("binding the standby"))?;
    let addr = l.local_addr().map_err(io("standby address"))?;
    let (entries, timeout) = (o.ring_entries, o.heartbeat_timeout);
    let sb = std::thread::spawn(move || standby(l, t, entries, timeout));
    let (proxy, stream) = Proxy::connect(addr)?;
    let opts = PrimaryOptions {
        checkpoint_delay: Duration::from_millis(EPOCH_MS),
        ..PrimaryOptions::default()
    };
    let ctl = ReplicaControl::new();
    let lost = std::thread::scope(|sc| {
        let (vmr, c) = (&vm, &*ctl);
        let primary = sc.spawn(move || replicate(vmr, stream, &opts, c, None));
        let t0 = Instant::now();
        while ctl.info().acked_epoch < APPLIED_BEFORE_LOSS && !primary.is_finished() {
            if t0.elapsed() > Duration::from_secs(300) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let at = proxy.lose(how);
        let _ = primary.join();
        at
    });
    let _ = vm.stop();
    let (detected, restored, running) = sb
        .join()
        .map_err(|_| BenchError::Invalid("the standby thread panicked".into()))??;
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
    Ok((
        ms(lost, detected),
        ms(detected, restored),
        ms(restored, running),
    ))
}

/// The failover rows: per guest size, both ways of losing the primary, `failover_runs`
/// each, with the first tracker of the options.
pub fn run(o: &ReplicateOpts, progress: &mut dyn Progress) -> Vec<FailoverRow> {
    let t = o.trackers.first().copied().unwrap_or(TrackerMode::Ring);
    let mut rows = Vec::new();
    for &gib in &o.sizes_gib {
        for how in [Loss::LinkClosed, Loss::Silent] {
            progress.step(&format!("failover {} {gib} GiB {how:?}", t.name()));
            let mut m: (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) = Default::default();
            for _ in 0..o.failover_runs {
                match once(o, t, gib, how) {
                    Ok((d, r, f)) => {
                        m.0.push(d);
                        m.1.push(r);
                        m.2.push(f);
                        m.3.push(d + r + f);
                    }
                    Err(e) => progress.note(&format!("failover {gib} GiB {how:?}: {e}")),
                }
            }
            if !m.0.is_empty() {
                rows.push(FailoverRow {
                    tracker: t.name().to_string(),
                    size_gib: gib,
                    loss: how,
                    heartbeat_timeout_ms: o.heartbeat_timeout.as_millis() as u64,
                    runs: m.0.len(),
                    detect_ms: median_f(m.0),
                    restore_ms: median_f(m.1),
                    first_progress_ms: median_f(m.2),
                    total_ms: median_f(m.3),
                });
            }
            progress.inc();
        }
    }
    rows
}

/// The failover table.
pub fn to_markdown(rows: &[FailoverRow]) -> String {
    let mut s = String::from(
        "| tracker | GiB | primary lost | heartbeat timeout ms | runs | detect ms | restore ms | first progress ms | total ms |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            r.tracker,
            r.size_gib,
            match r.loss {
                Loss::LinkClosed => "link closed",
                Loss::Silent => "silent",
            },
            r.heartbeat_timeout_ms,
            r.runs,
            r.detect_ms,
            r.restore_ms,
            r.first_progress_ms,
            r.total_ms
        ));
    }
    s
}
