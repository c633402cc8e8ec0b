//! The destination bounds what a peer can make it do: deadlines for the handshake and for
//! every frame after it, and a guest memory bound checked before anything is mapped. Tests
//! assert the decision (the error kind, what was allocated), never how long it took. Tests
//! that build a VM print `SKIP(kvm)` without `/dev/kvm`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use migration::wire::{Ack, AckReader, Encoder, Hello, MemoryLayout, Region, WireError};
use migration::TrackerMode;
use migration_engine::{receive, DestOptions, IncomingSummary, MigrationError};
use vmm::{Tracking, Vm};

/// The RSS test reads this process's RSS: nothing else runs beside it.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

type Dest = JoinHandle<Result<(Vm, IncomingSummary), MigrationError>>;

/// A destination on a thread; returns the connected source side.
fn destination(opts: DestOptions) -> (TcpStream, Dest) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        receive(s, &opts, &mut |_| {})
    });
    (TcpStream::connect(addr).unwrap(), h)
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Resets the peak RSS (`VmHWM`) to the current RSS and returns the current RSS, KiB.
fn reset_peak_rss() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    status_kib("VmRSS")
}

/// How far the peak RSS rose above `base` (from [`reset_peak_rss`]), KiB.
fn peak_growth(base: u64) -> u64 {
    status_kib("VmHWM").saturating_sub(base)
}

fn region(slot: u32, gpa: u64, size: u64) -> Region {
    Region {
        slot,
        guest_phys_addr: gpa,
        size,
    }
}

/// Hello + Layout for `machine` (0 workload, 1 PVH) as a source would send them.
fn handshake(s: &TcpStream, machine: u32, regions: Vec<Region>) {
    let mut enc = Encoder::new(s.try_clone().unwrap());
    enc.send_hello(&Hello::new(TrackerMode::Bitmap, 1).with_machine(machine))
        .unwrap();
    enc.send_layout(&MemoryLayout::new(regions).unwrap())
        .unwrap();
    enc.flush().unwrap();
}

#[test]
fn hello_and_a_1_tib_layout_are_refused_before_anything_is_mapped() {
    let _g = one_at_a_time();
    for machine in [1, 0] {
        let base = reset_peak_rss();
        let (s, dest) = destination(DestOptions::default());
        let regions = if machine == 1 {
            vec![region(0, 0, 1 << 40)]
        } else {
            vec![region(0, 0, 4 << 20), region(1, 1 << 32, 1 << 40)]
        };
        handshake(&s, machine, regions);
        let mut acks = AckReader::new(s.try_clone().unwrap());
        assert!(
            matches!(acks.recv(), Ok(Ack::Error(e)) if e.contains("limit")),
            "the source is told why"
        );
        let r = dest.join().unwrap();
        assert!(
            matches!(
                r,
                Err(MigrationError::Wire(WireError::Layout(
                    migration::wire::LayoutError::TooLarge { .. }
                )))
            ),
            "{r:?}"
        );
        let grown = peak_growth(base);
        assert!(
            grown < 16 << 10,
            "a refused 1 TiB layout grew the peak RSS by {grown} KiB"
        );
    }
}

#[test]
fn an_accepted_layout_commits_no_memory_up_front_and_a_stalled_source_is_cut_off() {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; destination test not run");
        return;
    }
    let _g = one_at_a_time();
    let base = reset_peak_rss();
    let (s, dest) = destination(DestOptions {
        tracking: Tracking::Bitmap,
        max_guest_memory: Some(64 << 30),
        progress_timeout: Duration::from_millis(300),
        ..DestOptions::default()
    });
    // 16 GiB of guest memory: mapped MAP_NORESERVE, and the incremental digest's table
    // (32 MiB) only committed where pages arrive.
    handshake(
        &s,
        0,
        vec![region(0, 0, 4 << 20), region(1, 1 << 32, 16 << 30)],
    );
    let mut acks = AckReader::new(s.try_clone().unwrap());
    assert_eq!(acks.recv().unwrap(), Ack::Accepted);
    // Then nothing: the progress deadline ends it, the source hears why.
    let r = dest.join().unwrap();
    let grown = peak_growth(base);
    assert!(
        grown < 16 << 10,
        "accepting 16 GiB grew the peak RSS by {grown} KiB"
    );
    assert!(
        matches!(
            r,
            Err(MigrationError::Stalled {
                phase: "progress",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(matches!(acks.recv(), Ok(Ack::Error(_))));
}

#[test]
fn a_silent_peer_is_cut_off_at_the_handshake_deadline() {
    let (s, dest) = destination(DestOptions {
        handshake_timeout: Duration::from_millis(200),
        ..DestOptions::default()
    });
    let r = dest.join().unwrap();
    assert!(
        matches!(
            r,
            Err(MigrationError::Stalled {
                phase: "handshake",
                ..
            })
        ),
        "{r:?}"
    );
    drop(s);
}

#[test]
fn a_peer_sending_a_byte_now_and_then_is_cut_off_at_the_handshake_deadline() {
    let (mut s, dest) = destination(DestOptions {
        handshake_timeout: Duration::from_millis(400),
        ..DestOptions::default()
    });
    // Each byte comes well within any per-read timeout, but the handshake never completes:
    // the deadline is for the whole handshake, not for each read.
    let dripper = std::thread::spawn(move || {
        for b in b"RVMIGRAT\x02\0\0\0\0\0\0\0" {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Hold the connection open; read until the destination closes it.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let r = dest.join().unwrap();
    assert!(
        matches!(
            r,
            Err(MigrationError::Stalled {
                phase: "handshake",
                ..
            })
        ),
        "{r:?}"
    );
    dripper.join().unwrap();
}

#[test]
fn vcpu_counts_0_and_u32_max_are_refused_in_the_handshake() {
    for vcpus in [0, u32::MAX] {
        let (s, dest) = destination(DestOptions::default());
        let mut enc = Encoder::new(s.try_clone().unwrap());
        let mut hello = Hello::new(TrackerMode::Ring, 1);
        hello.vcpus = vcpus;
        enc.send_hello(&hello).unwrap();
        enc.flush().unwrap();
        let r = dest.join().unwrap();
        assert!(
            matches!(r, Err(MigrationError::Wire(WireError::Malformed { .. }))),
            "{vcpus}: {r:?}"
        );
    }
}
