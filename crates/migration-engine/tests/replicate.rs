//! Continuous replication on the fake VM (no `/dev/kvm`): a real primary loop and a real
//! standby over loopback TCP, with a frame-aware proxy between them that corrupts, cuts,
//! delays or drops the stream. The primary's memory digest is recorded at every checkpoint
//! (inside the pause, where output commit captures the guest's output), so the standby's
//! image can be compared with the primary's at the exact epoch it last applied. Assertions
//! are on outcomes and decisions, never on how long something took.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_dirty::TrackerMode;
use migration::digest::MemoryDigest;
use migration::wire::replica::{CheckpointBuf, ReplicaWriter};
use migration::wire::{Hello, MemoryLayout, Region};
use migration_engine::fake::{FakeConfig, FakeVm};
use migration_engine::replicate::{
    replicate, run_standby, GuestOutput, Output, OutputCommit, PrimaryEnd, PrimaryOptions,
    ReplicaControl, ReplicationStatus, ReplicationSummary, StandbyOptions, StandbyReport,
};
use migration_engine::MigratableVm;

fn guest(tracker: TrackerMode) -> FakeVm {
    let vm = FakeVm::new(FakeConfig {
        regions: vec![(0, 2 << 20), (1 << 32, 4 << 20)],
        vcpus: 2,
        rate_pages_per_s: 20_000,
        working_set_pages: 768,
        tracker,
    })
    .unwrap();
    vm.start().unwrap();
    let t = Instant::now();
    while vm.writes() < 256 {
        assert!(t.elapsed() < Duration::from_secs(30), "guest warm-up");
        std::thread::sleep(Duration::from_millis(2));
    }
    vm
}

/// Guest output for the test: at every checkpoint (inside the pause) the primary's memory
/// digest is recorded and one line `epoch N` is "printed".
struct Recorder<'a> {
    vm: &'a FakeVm,
    epoch: u64,
    digests: Vec<MemoryDigest>,
    vcpu_writes: Vec<Vec<Vec<u8>>>,
}

impl GuestOutput for Recorder<'_> {
    fn drain(&mut self, out: &mut Vec<u8>) {
        self.epoch += 1;
        self.digests.push(self.vm.digest().unwrap());
        self.vcpu_writes.push(self.vm.save_vcpus().unwrap());
        out.extend_from_slice(format!("epoch {}\n", self.epoch).as_bytes());
    }
}

/// The released output, write by write.
#[derive(Clone, Default)]
struct Released(Arc<Mutex<Vec<Vec<u8>>>>);
impl Write for Released {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().push(b.to_vec());
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn standby(
    listener: TcpListener,
    heartbeat_timeout: Duration,
) -> JoinHandle<(FakeVm, StandbyReport)> {
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let opts = StandbyOptions {
            heartbeat_timeout,
            ..StandbyOptions::default()
        };
        let mut make = |h: &Hello, l: &MemoryLayout| {
            FakeVm::new(FakeConfig {
                regions: l
                    .regions()
                    .iter()
                    .map(|r| (r.guest_phys_addr, r.size))
                    .collect(),
                vcpus: h.vcpus as usize,
                rate_pages_per_s: 0,
                working_set_pages: 1,
                tracker: TrackerMode::Ring,
            })
        };
        run_standby(s, &opts, &mut make, &mut |_| {}).unwrap()
    })
}

/// What the proxy does to the stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Flip a byte in the payload of the n-th checkpoint page batch (from 1).
    CorruptBatch(u32),
    /// Forward half of the n-th checkpoint page batch, then cut both directions (the primary
    /// dies mid-checkpoint, as far as the standby can tell).
    CutInBatch(u32),
    /// Cut both directions after the n-th End (the standby dies, as far as the primary can
    /// tell).
    CloseAfterEnd(u32),
    /// Hold every chunk of the standby's answers this long (a slow standby).
    DelayAcks(Duration),
}

/// A frame-aware TCP proxy in front of the standby at `to`; returns its address and the
/// epoch of the checkpoint its fault hit (0 if none).
fn proxy(to: SocketAddr, fault: Fault) -> (SocketAddr, JoinHandle<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut p, _) = l.accept().unwrap();
        let mut s = TcpStream::connect(to).unwrap();
        let (mut s_back, mut p_back) = (s.try_clone().unwrap(), p.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match s_back.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Fault::DelayAcks(d) = fault {
                            std::thread::sleep(d);
                        }
                        if p_back.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = p_back.shutdown(Shutdown::Write);
        });
        let hit = forward(&mut p, &mut s, fault);
        if hit.1 {
            let _ = p.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        } else {
            let _ = s.shutdown(Shutdown::Write);
        }
        let _ = back.join();
        hit.0
    });
    (addr, h)
}

/// Forwards frames from `p` to `s`, applying `fault`; returns (epoch hit, cut).
fn forward(p: &mut TcpStream, s: &mut TcpStream, fault: Fault) -> (u64, bool) {
    let mut pre = [0u8; 16];
    if p.read_exact(&mut pre).is_err() || s.write_all(&pre).is_err() {
        return (0, false);
    }
    let (mut batches, mut ends, mut epoch, mut hit) = (0u32, 0u32, 0u64, 0u64);
    loop {
        let mut h = [0u8; 16];
        if p.read_exact(&mut h).is_err() {
            return (hit, false);
        }
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        if p.read_exact(&mut payload).is_err() {
            return (hit, false);
        }
        match h[0] {
            0x45 => epoch = u64::from_le_bytes(payload[..8].try_into().unwrap()),
            0x46 => batches += 1,
            0x48 => ends += 1,
            _ => {}
        }
        match fault {
            Fault::CorruptBatch(n) if h[0] == 0x46 && batches == n => {
                payload[len / 2] ^= 0x01;
                hit = epoch;
            }
            Fault::CutInBatch(n) if h[0] == 0x46 && batches == n => {
                let _ = s.write_all(&h);
                let _ = s.write_all(&payload[..len / 2]);
                return (epoch, true);
            }
            _ => {}
        }
        if s.write_all(&h).is_err() || s.write_all(&payload).is_err() {
            return (hit, false);
        }
        if matches!(fault, Fault::CloseAfterEnd(n) if h[0] == 0x48 && ends == n) {
            return (epoch, true);
        }
    }
}

struct Run {
    sum: ReplicationSummary,
    standby: StandbyReport,
    image: FakeVm,
    digests: Vec<MemoryDigest>,
    vcpu_writes: Vec<Vec<Vec<u8>>>,
    released: Vec<Vec<u8>>,
    hit: u64,
}

fn run(vm: &FakeVm, opts: PrimaryOptions, fault: Fault) -> Run {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let sb = standby(l.try_clone().unwrap(), Duration::from_secs(2));
    let (addr, px) = proxy(l.local_addr().unwrap(), fault);
    let released = Released::default();
    let mut commit = OutputCommit::new(Box::new(released.clone()));
    let mut rec = Recorder {
        vm,
        epoch: 0,
        digests: Vec::new(),
        vcpu_writes: Vec::new(),
    };
    let ctl = ReplicaControl::new();
    let sum = replicate(
        vm,
        TcpStream::connect(addr).unwrap(),
        &opts,
        &ctl,
        Some(Output {
            src: &mut rec,
            commit: &mut commit,
        }),
    );
    let (image, standby) = sb.join().unwrap();
    let hit = px.join().unwrap();
    let released = released.0.lock().unwrap().clone();
    Run {
        sum,
        standby,
        image,
        digests: rec.digests,
        vcpu_writes: rec.vcpu_writes,
        released,
        hit,
    }
}

fn opts(n: u64) -> PrimaryOptions {
    PrimaryOptions {
        checkpoint_delay: Duration::from_millis(10),
        max_checkpoints: Some(n),
        ..PrimaryOptions::default()
    }
}

/// The standby's image equals the primary's memory as it was at the standby's last applied
/// checkpoint, and its state blobs are the primary's at that checkpoint.
fn assert_image_is_epoch(r: &Run) {
    let last = r.standby.last.as_ref().expect("a checkpoint was applied");
    let i = (last.epoch - 1) as usize;
    assert_eq!(
        r.image.digest().unwrap(),
        r.digests[i],
        "standby image vs primary at epoch {}",
        last.epoch
    );
    let blobs: Vec<Vec<u8>> = last.states.iter().map(|s| s.2.clone()).collect();
    assert_eq!(blobs, r.vcpu_writes[i]);
    // The checkpoint carried its epoch's output (what a failover replays).
    assert_eq!(
        String::from_utf8_lossy(&last.output),
        format!("epoch {}\n", last.epoch)
    );
}

fn guest_runs_on(vm: &FakeVm) {
    assert!(vm.is_running() && !vm.is_paused());
    let w = vm.writes();
    let t = Instant::now();
    while vm.writes() == w {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the primary's guest stopped"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn twenty_checkpoints_are_applied_and_the_standby_image_is_the_primary_at_the_last_one() {
    for tracker in [
        TrackerMode::Ring,
        TrackerMode::Bitmap,
        TrackerMode::ClearLog,
    ] {
        let vm = guest(tracker);
        let r = run(&vm, opts(20), Fault::None);
        assert_eq!(r.sum.info.status, ReplicationStatus::Stopped, "{tracker:?}");
        assert_eq!(r.sum.info.acked_epoch, 20);
        assert_eq!(r.sum.checkpoints.len(), 20);
        assert!(r.sum.checkpoints.iter().all(|c| c.latency_us > 0));
        assert!(r.sum.checkpoints.iter().any(|c| c.pages - c.zero_pages > 0));
        assert!(matches!(r.standby.end, PrimaryEnd::Shutdown { .. }));
        assert!(r.standby.seeded && !r.standby.dropped_partial);
        assert_eq!(r.standby.applied, 20);
        assert_eq!(r.standby.last.as_ref().unwrap().epoch, 20);
        assert_image_is_epoch(&r);
        let cps = &r.sum.checkpoints;
        if tracker == TrackerMode::Ring {
            // Pre-copy ran (pages copied while the guest ran, some copied again) and the
            // image is still the primary at the pause, above.
            assert!(cps.iter().map(|c| c.precopy_pages).sum::<u64>() > 0);
        } else {
            // The bitmap trackers collect only in the pause: everything is copied there.
            assert!(cps
                .iter()
                .all(|c| c.precopy_pages == 0 && c.pause_copy_pages == c.pages));
        }
        // Output commit: every line of every epoch came out, in order.
        let all: Vec<u8> = r.released.concat();
        let want: String = (1..=20).map(|e| format!("epoch {e}\n")).collect();
        assert!(String::from_utf8(all).unwrap().starts_with(&want));
        guest_runs_on(&vm);
    }
}

#[test]
fn a_corrupted_checkpoint_is_never_applied_and_the_primary_runs_on() {
    let vm = guest(TrackerMode::Ring);
    let r = run(&vm, opts(1000), Fault::CorruptBatch(4));
    assert!(r.hit >= 1, "the fault hit a checkpoint");
    assert!(
        matches!(&r.standby.end, PrimaryEnd::Invalid { .. }),
        "{:?}",
        r.standby.end
    );
    assert_eq!(r.standby.last.as_ref().unwrap().epoch, r.hit - 1);
    assert_eq!(r.standby.applied, r.hit - 1);
    assert_image_is_epoch(&r);
    assert_eq!(r.sum.info.status, ReplicationStatus::StandbyLost);
    assert!(r
        .sum
        .info
        .reason
        .as_deref()
        .unwrap()
        .contains("standby failed"));
    assert!(r.sum.info.guest_running);
    guest_runs_on(&vm);
}

#[test]
fn a_checkpoint_cut_short_is_never_applied_and_the_standby_fails_over_from_the_one_before() {
    let vm = guest(TrackerMode::Ring);
    let r = run(&vm, opts(1000), Fault::CutInBatch(3));
    assert!(r.hit >= 1);
    assert!(
        matches!(&r.standby.end, PrimaryEnd::Lost { .. }),
        "{:?}",
        r.standby.end
    );
    assert!(r.standby.dropped_partial);
    assert_eq!(r.standby.last.as_ref().unwrap().epoch, r.hit - 1);
    assert_image_is_epoch(&r);
    // Output commit: what was released while replicating (every write before the final
    // release-all of a lost standby) is output of applied epochs only, in order.
    let before: String = r.released[..r.released.len() - 1]
        .iter()
        .map(|c| String::from_utf8(c.clone()).unwrap())
        .collect();
    let lines: Vec<&str> = before.lines().collect();
    let applied = r.standby.last.as_ref().unwrap().epoch as usize;
    assert!(
        lines.len() <= applied,
        "{} lines released, {applied} applied",
        lines.len()
    );
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("epoch {}", i + 1));
    }
    assert_eq!(r.sum.info.status, ReplicationStatus::StandbyLost);
    guest_runs_on(&vm);
}

#[test]
fn a_lost_standby_leaves_the_primary_running_and_it_replicates_again_to_a_new_one() {
    let vm = guest(TrackerMode::Ring);
    let r = run(&vm, opts(1000), Fault::CloseAfterEnd(5));
    assert_eq!(r.sum.info.status, ReplicationStatus::StandbyLost);
    assert!(r.sum.info.reason.is_some());
    assert!(r.sum.info.acked_epoch <= 5 && r.sum.info.epoch >= 5);
    assert!(r.sum.info.guest_running);
    guest_runs_on(&vm);
    let again = run(&vm, opts(5), Fault::None);
    assert_eq!(again.sum.info.status, ReplicationStatus::Stopped);
    assert_eq!(again.standby.applied, 5);
    assert_image_is_epoch(&again);
}

#[test]
fn a_slow_standby_makes_the_next_pause_wait_and_nothing_is_dropped() {
    let vm = guest(TrackerMode::Ring);
    let r = run(&vm, opts(8), Fault::DelayAcks(Duration::from_millis(40)));
    assert_eq!(r.sum.info.status, ReplicationStatus::Stopped);
    // Each ack is held 40 ms and the epoch is 10 ms: every pause after the first waited.
    assert!(r.sum.info.stalls >= 7, "stalls {}", r.sum.info.stalls);
    assert!(r.sum.info.stall_us > 0);
    assert_eq!(r.standby.applied, 8);
    let epochs: Vec<u64> = r.sum.checkpoints.iter().map(|c| c.epoch).collect();
    assert_eq!(epochs, (1..=8).collect::<Vec<_>>());
    assert_image_is_epoch(&r);
}

#[test]
fn a_silent_primary_is_declared_lost_after_the_heartbeat_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let sb = standby(l.try_clone().unwrap(), Duration::from_millis(300));
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let layout = MemoryLayout::new(vec![Region {
        slot: 0,
        guest_phys_addr: 0,
        size: 16 * 4096,
    }])
    .unwrap();
    let mut w = ReplicaWriter::new(s.try_clone().unwrap());
    w.open(&Hello::new(TrackerMode::Ring, 1), &layout).unwrap();
    w.push_seed_page(0, &[7u8; 4096]).unwrap();
    w.finish_seed().unwrap();
    let mut cp = CheckpointBuf::with_capacity(1);
    cp.reset(1);
    cp.push_page_with(4096, |b| {
        b.fill(9);
        Ok::<(), ()>(())
    })
    .unwrap();
    cp.push_state(1, 0, &5u64.to_le_bytes());
    w.send_checkpoint(&cp).unwrap();
    // Heartbeats keep it alive past the timeout...
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(100));
        w.send_heartbeat(1, 0).unwrap();
    }
    // ...then silence, with the connection open.
    let (image, rep) = sb.join().unwrap();
    assert!(
        matches!(&rep.end, PrimaryEnd::Lost { reason } if reason.contains("heartbeat")),
        "{:?}",
        rep.end
    );
    assert_eq!(rep.heartbeats, 6);
    assert_eq!(rep.last.as_ref().unwrap().epoch, 1);
    let mut page = vec![0u8; 4096];
    image.read_page(4096, &mut page).unwrap();
    assert_eq!(page, vec![9u8; 4096]);
    image.read_page(0, &mut page).unwrap();
    assert_eq!(page, vec![7u8; 4096]);
    drop(s);
}
