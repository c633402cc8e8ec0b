//! The replication stream: round trip, and a checkpoint that is corrupted, truncated, out of
//! order or oversized never reaches `End` (so a standby never applies it).

use migration::wire::replica::{
    CheckpointBuf, ReplicaAck, ReplicaAckReader, ReplicaAckWriter, ReplicaLimits, ReplicaMessage,
    ReplicaReader, ReplicaSink, ReplicaState, ReplicaWriter, MAX_CHECKPOINT_OUTPUT,
    MAX_OUTPUT_FRAME,
};
use migration::wire::{Hello, MemoryLayout, Region, WireError};
use migration::TrackerMode;

mod common;

const PAGES: u64 = 64;

#[derive(Default)]
struct Sink {
    seeded: Vec<(u64, Option<Vec<u8>>)>,
    staged: Vec<(u64, Option<Vec<u8>>)>,
    output: Vec<u8>,
}

impl ReplicaSink for Sink {
    fn seed_page(&mut self, gpa: u64, data: Option<&[u8]>) {
        self.seeded.push((gpa, data.map(<[u8]>::to_vec)));
    }
    fn stage_page(&mut self, gpa: u64, data: Option<&[u8]>) {
        self.staged.push((gpa, data.map(<[u8]>::to_vec)));
    }
    fn stage_output(&mut self, data: &[u8]) {
        self.output.extend_from_slice(data);
    }
}

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![Region {
        slot: 0,
        guest_phys_addr: 0,
        size: PAGES * 4096,
    }])
    .unwrap()
}

fn page(v: u8) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    p[0] = v;
    p[4095] = v;
    p
}

/// A stream: open, seed of 4 pages, then `epochs` checkpoints of 3 pages (one zero), two
/// state blobs and the output `out N` each. Returns the bytes and where each checkpoint
/// starts and ends.
fn stream(epochs: u64) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut w = ReplicaWriter::with_batch_pages(Vec::new(), 2);
    w.open(&Hello::new(TrackerMode::Ring, 2), &layout())
        .unwrap();
    for p in 0..4u64 {
        w.push_seed_page(p * 4096, &page(p as u8 + 1)).unwrap();
    }
    w.push_seed_zero(4 * 4096).unwrap();
    w.finish_seed().unwrap();
    let mut cp = CheckpointBuf::with_capacity(8);
    let mut bounds = Vec::new();
    for e in 1..=epochs {
        cp.reset(e);
        for p in [1u64, 2] {
            cp.push_page_with(p * 4096, |b: &mut [u8]| {
                b.copy_from_slice(&page((e * 10 + p) as u8));
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        cp.push_zero(3 * 4096);
        cp.push_state(1, 0, b"vcpu0");
        cp.push_state(1, 1, b"vcpu1-state");
        assert!(cp.push_output(format!("out {e}\n").as_bytes()));
        let start = w.get_ref().len();
        w.send_checkpoint(&cp).unwrap();
        bounds.push((start, w.get_ref().len()));
        w.send_heartbeat(e, 7).unwrap();
    }
    w.send_shutdown("done").unwrap();
    (w.get_ref().clone(), bounds)
}

/// Reads `bytes` to the end or the first error; returns the epochs that reached `End`
/// (what a standby would have applied) and the error.
fn read_all(bytes: &[u8]) -> (Vec<u64>, Option<WireError>, Sink) {
    let mut r = ReplicaReader::new(bytes, ReplicaLimits::default());
    let mut sink = Sink::default();
    let mut applied = Vec::new();
    loop {
        match r.recv(&mut sink) {
            Ok(ReplicaMessage::End(h)) => applied.push(h.epoch),
            Ok(ReplicaMessage::Shutdown(_)) => return (applied, None, sink),
            Ok(_) => {}
            Err(e) => return (applied, Some(e), sink),
        }
    }
}

#[test]
fn checkpoints_round_trip_with_their_pages_states_and_epochs() {
    let (bytes, _) = stream(3);
    let mut r = ReplicaReader::new(&bytes[..], ReplicaLimits::default());
    let mut sink = Sink::default();
    let mut msgs = Vec::new();
    loop {
        let m = r.recv(&mut sink).unwrap();
        let end = matches!(m, ReplicaMessage::Shutdown(_));
        msgs.push(m);
        if end {
            break;
        }
    }
    assert_eq!(r.state(), ReplicaState::Closed);
    assert_eq!(r.last_epoch(), 3);
    assert!(matches!(msgs[0], ReplicaMessage::Hello(h) if h.vcpus == 2));
    assert!(msgs.contains(&ReplicaMessage::SeedDone(5)));
    assert_eq!(sink.seeded.len(), 5);
    assert_eq!(sink.seeded[4], (4 * 4096, None));
    assert_eq!(sink.seeded[2], (2 * 4096, Some(page(3))));
    assert_eq!(sink.staged.len(), 9);
    assert_eq!(sink.staged[3], (4096, Some(page(21))));
    assert_eq!(sink.staged[5], (3 * 4096, None));
    let states: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            ReplicaMessage::State { instance, data, .. } => Some((*instance, data.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(states.len(), 6);
    assert_eq!(states[1], (1, b"vcpu1-state".to_vec()));
    let ends: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            ReplicaMessage::End(h) => Some(h.epoch),
            _ => None,
        })
        .collect();
    assert_eq!(ends, vec![1, 2, 3]);
    assert_eq!(sink.output, b"out 1\nout 2\nout 3\n");
    assert_eq!(
        msgs.iter()
            .filter(|m| matches!(m, ReplicaMessage::Output(6)))
            .count(),
        3
    );
}

/// Checkpoint `k`'s Begin frame in `bytes` rewritten with `output` announced (and its
/// `bytes` adjusted by as much), its frame CRC recomputed.
fn with_begin_output(bytes: &[u8], start: usize, output: u32) -> Vec<u8> {
    let hdr = &bytes[start..start + 16];
    assert_eq!(hdr[0], 0x45, "a Begin frame");
    let seq = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
    let mut payload = bytes[start + 16..start + 16 + 32].to_vec();
    let old = u32::from_le_bytes(payload[28..32].try_into().unwrap());
    let total = u64::from_le_bytes(payload[16..24].try_into().unwrap());
    let total = total - u64::from(old) + u64::from(output);
    payload[16..24].copy_from_slice(&total.to_le_bytes());
    payload[28..32].copy_from_slice(&output.to_le_bytes());
    let mut b = bytes[..start].to_vec();
    b.extend_from_slice(&common::raw_frame(0x45, seq, &payload));
    b.extend_from_slice(&bytes[start + 16 + 32..]);
    b
}

#[test]
fn a_checkpoint_with_less_output_than_its_begin_announced_never_ends() {
    let (bytes, bounds) = stream(2);
    let b = with_begin_output(&bytes, bounds[1].0, 7);
    let (applied, err, _) = read_all(&b);
    assert_eq!(applied, vec![1]);
    assert!(
        matches!(err, Some(WireError::Malformed { what }) if what.contains("less than")),
        "{err:?}"
    );
}

#[test]
fn a_checkpoint_with_more_output_than_its_begin_announced_fails_at_that_frame() {
    let (bytes, bounds) = stream(2);
    let b = with_begin_output(&bytes, bounds[1].0, 5);
    let (applied, err, _) = read_all(&b);
    assert_eq!(applied, vec![1]);
    assert!(
        matches!(err, Some(WireError::Malformed { what }) if what.contains("more than its Begin")),
        "{err:?}"
    );
}

#[test]
fn a_begin_announcing_more_output_than_a_checkpoint_may_carry_is_refused() {
    let (bytes, bounds) = stream(2);
    let b = with_begin_output(&bytes, bounds[1].0, MAX_CHECKPOINT_OUTPUT + 1);
    let (applied, err, _) = read_all(&b);
    assert_eq!(applied, vec![1]);
    assert!(
        matches!(err, Some(WireError::Malformed { what }) if what.contains("guest output")),
        "{err:?}"
    );
}

#[test]
fn output_larger_than_a_frame_goes_in_several_and_arrives_whole() {
    let mut w = ReplicaWriter::new(Vec::new());
    w.open(&Hello::new(TrackerMode::Ring, 1), &layout())
        .unwrap();
    w.finish_seed().unwrap();
    let mut cp = CheckpointBuf::with_capacity(1);
    cp.reset(1);
    let out: Vec<u8> = (0..MAX_OUTPUT_FRAME * 2 + 10).map(|i| i as u8).collect();
    assert!(cp.push_output(&out));
    w.send_checkpoint(&cp).unwrap();
    w.send_shutdown("done").unwrap();
    let (applied, err, sink) = read_all(w.get_ref());
    assert_eq!(applied, vec![1]);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(sink.output, out);
}

#[test]
fn a_byte_flipped_anywhere_in_a_checkpoint_means_that_checkpoint_never_ends() {
    let (bytes, bounds) = stream(3);
    let (start, end) = bounds[1];
    for i in start..end {
        let mut b = bytes.clone();
        b[i] ^= 0x20;
        let (applied, err, _) = read_all(&b);
        assert_eq!(applied, vec![1], "byte {i}: only epoch 1 may be applied");
        assert!(err.is_some(), "byte {i}: the corruption must be an error");
    }
}

#[test]
fn a_checkpoint_cut_anywhere_is_never_ended() {
    let (bytes, bounds) = stream(2);
    let (start, end) = bounds[1];
    for cut in start..end {
        let (applied, err, _) = read_all(&bytes[..cut]);
        assert_eq!(applied, vec![1], "cut at {cut}");
        assert!(
            matches!(
                err,
                Some(WireError::Truncated { .. } | WireError::Closed { .. })
            ),
            "cut at {cut}: {err:?}"
        );
    }
}

#[test]
fn a_checkpoint_missing_a_frame_fails_at_the_next_frame_not_at_end() {
    // Drop checkpoint 2 entirely: the stream's sequence numbers expose the gap.
    let (bytes, bounds) = stream(3);
    let (s, e) = bounds[1];
    let mut b = bytes[..s].to_vec();
    b.extend_from_slice(&bytes[e..]);
    let (applied, err, _) = read_all(&b);
    assert_eq!(applied, vec![1]);
    assert!(
        matches!(err, Some(WireError::SequenceGap { .. })),
        "{err:?}"
    );
}

#[test]
fn a_checkpoint_larger_than_the_limit_is_refused_at_its_begin() {
    let (bytes, _) = stream(1);
    let limits = ReplicaLimits {
        max_checkpoint_bytes: Some(100),
        ..ReplicaLimits::default()
    };
    let mut r = ReplicaReader::new(&bytes[..], limits);
    let mut sink = Sink::default();
    let err = loop {
        match r.recv(&mut sink) {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(matches!(err, WireError::Oversize { len, max: 100, .. } if len > 100));
    assert!(sink.staged.is_empty());
}

#[test]
fn a_migration_stream_is_refused_at_the_preamble() {
    let mut enc = migration::wire::Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    let (applied, err, _) = read_all(enc.get_ref());
    assert!(applied.is_empty());
    assert!(matches!(err, Some(WireError::BadMagic { .. })), "{err:?}");
}

#[test]
fn acks_must_start_with_ready_and_count_epochs_in_order() {
    let mut w = ReplicaAckWriter::new(Vec::new());
    w.send(&ReplicaAck::Ready).unwrap();
    w.send(&ReplicaAck::Applied(1)).unwrap();
    w.send(&ReplicaAck::Applied(2)).unwrap();
    w.send(&ReplicaAck::Applied(4)).unwrap();
    let bytes = w_bytes(w);
    let mut r = ReplicaAckReader::new(&bytes[..]);
    assert_eq!(r.recv().unwrap(), ReplicaAck::Ready);
    assert_eq!(r.recv().unwrap(), ReplicaAck::Applied(1));
    assert_eq!(r.recv().unwrap(), ReplicaAck::Applied(2));
    assert!(r.recv().is_err(), "epoch 4 after 2 is out of order");
    assert!(matches!(r.recv(), Err(WireError::Poisoned)));
}

fn w_bytes(w: ReplicaAckWriter<Vec<u8>>) -> Vec<u8> {
    w.get_ref().clone()
}

fn fill(v: u8) -> impl FnOnce(&mut [u8]) -> Result<(), ()> {
    move |b: &mut [u8]| {
        b.copy_from_slice(&page(v));
        if v == 0 {
            b.fill(0);
        }
        Ok(())
    }
}

#[test]
fn a_page_put_again_replaces_its_copy_and_goes_out_once() {
    let mut cp = CheckpointBuf::with_capacity(1);
    cp.reset(1);
    cp.put_page_with(4096, fill(1)).unwrap();
    cp.put_page_with(2 * 4096, fill(0)).unwrap();
    cp.put_page_with(3 * 4096, fill(3)).unwrap();
    // Copied again after the guest wrote them: data to data, zero to data, data to zero.
    cp.put_page_with(4096, fill(9)).unwrap();
    cp.put_page_with(2 * 4096, fill(8)).unwrap();
    cp.put_page_with(3 * 4096, fill(0)).unwrap();
    let pages: Vec<(u64, Option<Vec<u8>>)> = cp
        .iter_pages()
        .map(|(g, d)| (g, d.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(
        pages,
        vec![
            (4096, Some(page(9))),
            (2 * 4096, Some(page(8))),
            (3 * 4096, None)
        ]
    );
    assert_eq!((cp.pages(), cp.zero_pages()), (3, 1));
    let mut w = ReplicaWriter::new(Vec::new());
    w.open(&Hello::new(TrackerMode::Ring, 1), &layout())
        .unwrap();
    w.finish_seed().unwrap();
    w.send_checkpoint(&cp).unwrap();
    w.send_shutdown("done").unwrap();
    let (applied, err, sink) = read_all(w.get_ref());
    assert_eq!(applied, vec![1], "{err:?}");
    assert_eq!(sink.staged, pages);
}
