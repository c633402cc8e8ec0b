//! Continuous replication on real KVM over real TCP (loopback): a workload guest dirtying
//! memory is checkpointed to a standby `vmm::Vm`; the primary's link is cut; the standby's
//! image equals the primary's memory at the last applied checkpoint (digests, taken inside
//! the primary's pause) and the guest resumes there from that checkpoint. Prints
//! `SKIP(kvm)` without `/dev/kvm`.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use kvm_dirty::TrackerMode;
use migration::digest::MemoryDigest;
use migration_engine::replicate::{
    failover, replicate, run_standby, GuestOutput, Output, OutputCommit, PrimaryEnd,
    PrimaryOptions, ReplicaControl, ReplicationStatus, StandbyOptions, VmImage,
};
use migration_engine::source::memory_digest;
use vmm::{Pattern, RegionSpec, SerialOutput, Tracking, Vm, VmConfig};

const DATA_GPA: u64 = 1 << 32;

fn guest(tracking: Tracking) -> Vm {
    let mut vm = Vm::create(&VmConfig {
        vcpus: 2,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: DATA_GPA,
            bytes: 64 << 20,
            log_dirty: true,
        }],
        tracking,
    })
    .unwrap();
    vm.set_dirty_workload(DATA_GPA, (8 << 20) / 4096, Pattern::Random, 4000)
        .unwrap();
    vm.start(None).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vm
}

fn writes(vm: &Vm) -> Vec<u64> {
    (0..vm.config().vcpus)
        .map(|i| vm.nr_writes(i).unwrap())
        .collect()
}

/// Inside every checkpoint's pause: the primary's digest and write counters.
struct Recorder<'a> {
    vm: &'a Vm,
    at: Vec<(MemoryDigest, Vec<u64>)>,
}

impl GuestOutput for Recorder<'_> {
    fn drain(&mut self, out: &mut Vec<u8>) {
        self.at
            .push((memory_digest(self.vm).unwrap(), writes(self.vm)));
        out.push(b'.');
    }
}

fn failover_after_the_primary_link_is_cut(tracking: Tracking) {
    let primary = guest(tracking);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let standby = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut make = |h: &migration::wire::Hello, lay: &migration::wire::MemoryLayout| {
            VmImage::create(h, lay, tracking, &SerialOutput::Capture)
        };
        run_standby(s, &StandbyOptions::default(), &mut make, &mut |_| {}).unwrap()
    });
    let stream = TcpStream::connect(addr).unwrap();
    let cut = stream.try_clone().unwrap();
    let ctl = ReplicaControl::new();
    let mut rec = Recorder {
        vm: &primary,
        at: Vec::new(),
    };
    let mut commit = OutputCommit::new(Box::new(std::io::sink()));
    let sum = std::thread::scope(|sc| {
        let ctl2 = &ctl;
        let watcher = sc.spawn(move || {
            // The primary "dies" (its link is cut) once 6 checkpoints were applied.
            let t = Instant::now();
            while ctl2.info().acked_epoch < 6 {
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "replication stalled"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            cut.shutdown(Shutdown::Both).unwrap();
        });
        let opts = PrimaryOptions {
            checkpoint_delay: Duration::from_millis(25),
            ..PrimaryOptions::default()
        };
        let sum = replicate(
            &primary,
            stream,
            &opts,
            &ctl,
            Some(Output {
                src: &mut rec,
                commit: &mut commit,
            }),
        );
        watcher.join().unwrap();
        sum
    });
    // The primary lost its standby and its guest runs on.
    assert_eq!(
        sum.info.status,
        ReplicationStatus::StandbyLost,
        "{:?}",
        sum.info
    );
    assert!(sum.info.guest_running);
    assert!(sum.info.acked_epoch >= 6);
    let (image, rep) = standby.join().unwrap();
    assert!(matches!(rep.end, PrimaryEnd::Lost { .. }), "{:?}", rep.end);
    let last = rep.last.clone().unwrap();
    assert!(last.epoch >= 6);
    let (want_digest, want_writes) = &rec.at[(last.epoch - 1) as usize];
    assert_eq!(
        &memory_digest(&image.vm).unwrap(),
        want_digest,
        "standby image vs primary at epoch {}",
        last.epoch
    );
    assert_eq!(&writes(&image.vm), want_writes);
    if tracking.mode() == TrackerMode::Ring {
        assert!(sum.checkpoints.iter().all(|c| c.pages > 0));
    }
    // Failover: the guest resumes from the last applied checkpoint and keeps writing.
    let resumed = failover(image, &last).unwrap();
    let t = Instant::now();
    loop {
        let now = writes(&resumed);
        if now.iter().zip(want_writes).all(|(n, w)| n > w) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the resumed guest does not run: {now:?} vs {want_writes:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    resumed.vcpus().unwrap().check().unwrap();
    let w = writes(&primary);
    std::thread::sleep(Duration::from_millis(50));
    assert!(writes(&primary).iter().sum::<u64>() > w.iter().sum::<u64>());
}

#[test]
fn replicated_guest_fails_over_from_the_last_applied_checkpoint_with_its_memory_exact() {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; replication test not run");
        return;
    }
    failover_after_the_primary_link_is_cut(Tracking::Ring { entries: 4096 });
    failover_after_the_primary_link_is_cut(Tracking::Bitmap);
}
