//! Wire protocol: exact outcomes for valid streams and for each class of bad input.

mod common;

use common::*;
use migration::wire::{
    tag, Ack, AckReader, AckWriter, Complete, Decoder, DecoderLimits, Encoder, Hello,
    IterationMarker, Message, RxState, WireError,
};
use migration::{IncrementalDigest, MemoryDigest, TrackerMode};

fn round_trip_passes() -> Vec<Vec<u64>> {
    let l = layout();
    let all = all_pages(&l);
    vec![all.clone(), vec![all[1], all[17]], vec![all[2]]]
}

#[test]
fn valid_stream_decodes_into_identical_memory_with_zero_pages_as_markers() {
    let l = layout();
    let mem = memory();
    let bytes = encode(&l, &mem, &round_trip_passes());
    let (res, got) = decode(&bytes);
    let msgs = res.unwrap();
    assert_eq!(got, mem);
    assert_eq!(
        msgs[0],
        Message::Hello(Hello::new(TrackerMode::Ring, 2)),
        "hello round-trips"
    );
    assert_eq!(msgs[1], Message::Layout(l.clone()));
    let zero: u32 = msgs
        .iter()
        .map(|m| match m {
            Message::Pages(b) => b.zero_pages,
            _ => 0,
        })
        .sum();
    // Pages 0,3,6,... of each region are zero: 6 of 16 and 3 of 8 in the bulk pass; the
    // dirty passes resend pages 1, 17 (non-zero) and 2 (non-zero).
    assert_eq!(zero, 6 + 3);
    assert!(matches!(msgs.last(), Some(Message::Commit)));
    let complete = msgs
        .iter()
        .find_map(|m| match m {
            Message::Complete(c) => Some(c.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(complete.pages_sent, 24 + 3);
    let slices: Vec<&[u8]> = got.iter().map(|m| m.as_slice()).collect();
    assert_eq!(
        complete.digest,
        Some(MemoryDigest::compute(&l, &slices).unwrap())
    );
    assert!(msgs.contains(&Message::State(migration::wire::StateBlob {
        kind: 1,
        instance: 0,
        data: b"vcpu0".to_vec()
    })));
}

#[test]
fn zero_pages_cost_eight_bytes_on_the_wire() {
    let l = layout();
    let zero = vec![vec![0u8; 16 * PAGE], vec![0u8; 8 * PAGE]];
    let data = memory();
    let z = encode(&l, &zero, &[all_pages(&l)]).len();
    let d = encode(&l, &data, &[all_pages(&l)]).len();
    // 15 non-zero pages more in `data` (10 of 16 + 5 of 8 are non-zero there).
    assert_eq!(d - z, 15 * PAGE);
}

#[test]
fn digesting_sink_matches_the_source_digest() {
    let l = layout();
    let mem = memory();
    let bytes = encode(&l, &mem, &round_trip_passes());
    let mut inc = IncrementalDigest::new(&l);
    let mut dec = Decoder::new(bytes.as_slice());
    let mut sink = migration::wire::DigestingSink::new((), &mut inc);
    let complete = loop {
        if let Message::Complete(c) = dec.recv(&mut sink).unwrap() {
            break c;
        }
    };
    assert_eq!(dec.state(), RxState::Completed);
    complete.digest.unwrap().verify(&inc.digest()).unwrap();
}

#[test]
fn foreign_stream_is_rejected_as_bad_magic() {
    let (res, _) = decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(matches!(res, Err(WireError::BadMagic { found }) if &found == b"GET / HT"));
    let (res, _) = decode(b"RVM");
    assert!(matches!(
        res,
        Err(WireError::Truncated {
            what: "preamble",
            ..
        })
    ));
    let (res, _) = decode(b"XY");
    assert!(matches!(res, Err(WireError::BadMagic { .. })));
}

#[test]
fn other_protocol_version_is_rejected_before_any_frame() {
    let mut enc = Encoder::new(Vec::new());
    let mut hello = Hello::new(TrackerMode::Ring, 1);
    hello.version = 1;
    enc.send_hello(&hello).unwrap();
    let (res, _) = decode(&enc.into_inner());
    assert!(matches!(
        res,
        Err(WireError::VersionMismatch {
            found: 1,
            min: 3,
            max: 3
        })
    ));
}

#[test]
fn unknown_tag_is_rejected() {
    let mut s = prefix(1);
    s.extend(raw_frame(0x55, 3, &[]));
    let (res, _) = decode(&s);
    assert!(matches!(res, Err(WireError::UnknownTag(0x55))));
    // An ack tag is unknown in the source's direction.
    let mut s = prefix(1);
    s.extend(raw_frame(tag::RESUMED, 3, &[0; 8]));
    assert!(matches!(decode(&s).0, Err(WireError::UnknownTag(0x83))));
}

#[test]
fn oversize_length_is_rejected_without_reading_the_payload() {
    let mut s = prefix(1);
    let mut f = raw_frame(tag::PAGES, 3, &[]);
    f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    s.extend(f);
    assert!(matches!(
        decode(&s).0,
        Err(WireError::Oversize {
            tag: tag::PAGES,
            len: 0xffff_ffff,
            ..
        })
    ));
    let mut s = prefix(1);
    s.extend(raw_frame(tag::COMMIT, 3, &[1]));
    assert!(matches!(
        decode(&s).0,
        Err(WireError::Oversize {
            tag: tag::COMMIT,
            len: 1,
            max: 0
        })
    ));
}

#[test]
fn truncated_stream_reports_what_was_cut() {
    let l = layout();
    let bytes = encode(&l, &memory(), &[all_pages(&l)]);
    let (res, _) = decode(&bytes[..bytes.len() / 2]);
    assert!(matches!(
        res,
        Err(WireError::Truncated {
            what: "frame payload",
            ..
        })
    ));
    let (res, _) = decode(&bytes[..16 + 5]);
    assert!(matches!(
        res,
        Err(WireError::Truncated {
            what: "frame header",
            needed: 16,
            got: 5
        })
    ));
    // Cut exactly at a frame boundary: the peer closed the stream mid-migration.
    let p = prefix(1);
    assert!(matches!(
        decode(&p).0,
        Err(WireError::Closed { state: "InPass" })
    ));
}

#[test]
fn flipped_page_byte_fails_the_checksum_and_never_reaches_guest_memory() {
    let mem = memory();
    let mut bytes = prefix(1);
    let start = bytes.len();
    let page = &mem[0][PAGE..2 * PAGE];
    bytes.extend(raw_frame(
        tag::PAGES,
        3,
        &batch_payload(&[(0x1000, Some(page))]),
    ));
    bytes[start + 16 + 8 + 8 + 100] ^= 0x04;
    let (res, got) = decode(&bytes);
    assert!(matches!(
        res,
        Err(WireError::ChecksumMismatch {
            seq: 3,
            tag: tag::PAGES,
            ..
        })
    ));
    assert!(
        got.iter().all(|r| r.iter().all(|&b| b == 0)),
        "corrupt frame wrote memory"
    );
}

#[test]
fn page_outside_the_layout_is_rejected_and_nothing_of_the_batch_is_written() {
    let page = vec![0xAAu8; PAGE];
    let mut s = prefix(2);
    // First entry valid, second outside: the valid one must not be written either.
    s.extend(raw_frame(
        tag::PAGES,
        3,
        &batch_payload(&[(0x1000, Some(&page)), (0x20_0000, Some(&page))]),
    ));
    let (res, got) = decode(&s);
    assert!(matches!(
        res,
        Err(WireError::GpaOutsideLayout { gpa: 0x20_0000 })
    ));
    assert!(got.iter().all(|r| r.iter().all(|&b| b == 0)));
    // Just past the end of region 1, and in the hole between the regions.
    for gpa in [0x10_0000 + 8 * PAGE as u64, 0x8_0000] {
        let mut s = prefix(1);
        s.extend(raw_frame(tag::PAGES, 3, &batch_payload(&[(gpa | 1, None)])));
        assert!(matches!(decode(&s).0, Err(WireError::GpaOutsideLayout { gpa: g }) if g == gpa));
    }
}

#[test]
fn unaligned_page_address_is_rejected() {
    let mut s = prefix(1);
    s.extend(raw_frame(tag::PAGES, 3, &batch_payload(&[(0x1008, None)])));
    assert!(matches!(
        decode(&s).0,
        Err(WireError::GpaNotAligned { word: 0x1008 })
    ));
    // The encoder refuses too.
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    assert!(matches!(
        enc.push_zero_page(0x1001),
        Err(WireError::GpaNotAligned { .. })
    ));
    assert!(matches!(
        enc.push_zero_page(0x20_0000),
        Err(WireError::GpaOutsideLayout { .. })
    ));
    assert!(matches!(
        enc.push_page(0, &[0u8; 100]),
        Err(WireError::PageLength { len: 100, .. })
    ));
}

#[test]
fn batch_length_must_match_its_entries() {
    let page = vec![1u8; PAGE];
    let mut p = batch_payload(&[(0x1000, Some(&page))]);
    p.push(0);
    let mut s = prefix(1);
    s.extend(raw_frame(tag::PAGES, 3, &p));
    assert!(matches!(decode(&s).0, Err(WireError::Malformed { .. })));
    let mut s = prefix(1);
    s.extend(raw_frame(tag::PAGES, 3, &batch_payload(&[])));
    assert!(matches!(decode(&s).0, Err(WireError::Malformed { .. })));
}

#[test]
fn messages_out_of_protocol_order_are_rejected() {
    // Pages before any pass marker.
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    enc.push_zero_page(0).unwrap();
    enc.flush().unwrap();
    assert!(matches!(
        decode(&enc.into_inner()).0,
        Err(WireError::OutOfOrder {
            message: "Pages",
            state: "AwaitPass"
        })
    ));
    // Commit before Complete.
    let mut s = prefix(0);
    s.extend(raw_frame(tag::COMMIT, 3, &[]));
    assert!(matches!(
        decode(&s).0,
        Err(WireError::OutOfOrder {
            message: "Commit",
            state: "InPass"
        })
    ));
    // Complete after a pass that is not final.
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 0,
        pages: 0,
        final_pass: false,
    })
    .unwrap();
    enc.send_complete(&Complete {
        pages_sent: 0,
        digest: None,
    })
    .unwrap();
    assert!(matches!(
        decode(&enc.into_inner()).0,
        Err(WireError::OutOfOrder {
            message: "Complete",
            ..
        })
    ));
    // A second Hello.
    let mut s = prefix(0);
    s.extend(raw_frame(tag::HELLO, 3, &[0; 16]));
    assert!(matches!(
        decode(&s).0,
        Err(WireError::OutOfOrder {
            message: "Hello",
            ..
        })
    ));
    // Layout first (raw, after a valid preamble).
    let mut s = prefix(0)[..16].to_vec();
    s.extend(raw_frame(tag::LAYOUT, 0, &[0; 8]));
    assert!(matches!(
        decode(&s).0,
        Err(WireError::OutOfOrder {
            message: "Layout",
            state: "AwaitHello"
        })
    ));
}

#[test]
fn a_pass_must_carry_exactly_the_pages_it_announced() {
    let l = layout();
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&l).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 0,
        pages: 3,
        final_pass: false,
    })
    .unwrap();
    enc.push_zero_page(0).unwrap();
    enc.push_zero_page(0x1000).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 1,
        pages: 0,
        final_pass: true,
    })
    .unwrap();
    assert!(matches!(
        decode(&enc.into_inner()).0,
        Err(WireError::PassMismatch {
            iteration: 0,
            announced: 3,
            received: 2
        })
    ));
    // Too many pages fail as soon as the batch arrives.
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&l).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 0,
        pages: 1,
        final_pass: true,
    })
    .unwrap();
    enc.push_zero_page(0).unwrap();
    enc.push_zero_page(0x1000).unwrap();
    enc.flush().unwrap();
    assert!(matches!(
        decode(&enc.into_inner()).0,
        Err(WireError::PassMismatch {
            iteration: 0,
            announced: 1,
            received: 2
        })
    ));
}

#[test]
fn iteration_numbers_and_frame_sequence_have_no_gaps() {
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 1,
        pages: 0,
        final_pass: false,
    })
    .unwrap();
    assert!(matches!(
        decode(&enc.into_inner()).0,
        Err(WireError::IterationGap {
            expected: 0,
            found: 1
        })
    ));
    let mut s = prefix(1);
    s.extend(raw_frame(tag::PAGES, 4, &batch_payload(&[(1, None)])));
    assert!(matches!(
        decode(&s).0,
        Err(WireError::SequenceGap {
            expected: 3,
            found: 4
        })
    ));
}

#[test]
fn complete_page_count_must_match_what_arrived() {
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 0,
        pages: 1,
        final_pass: true,
    })
    .unwrap();
    enc.push_zero_page(0).unwrap();
    enc.send_complete(&Complete {
        pages_sent: 2,
        digest: None,
    })
    .unwrap();
    assert!(matches!(
        decode(&enc.into_inner()).0,
        Err(WireError::PageCountMismatch {
            claimed: 2,
            received: 1
        })
    ));
}

#[test]
fn state_blobs_are_capped_per_blob_and_in_total() {
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    assert!(matches!(
        enc.send_state(1, 0, &vec![0u8; (1 << 20) + 1]),
        Err(WireError::Oversize {
            tag: tag::STATE,
            ..
        })
    ));
    enc.send_state(1, 0, &[7u8; 600]).unwrap();
    enc.send_state(1, 1, &[7u8; 600]).unwrap();
    let bytes = enc.into_inner();
    let limits = DecoderLimits {
        max_total_state: 1000,
        ..DecoderLimits::default()
    };
    let mut dec = Decoder::with_limits(bytes.as_slice(), limits);
    assert!(matches!(dec.recv(&mut ()), Ok(Message::Hello(_))));
    assert!(matches!(dec.recv(&mut ()), Ok(Message::Layout(_))));
    assert!(matches!(dec.recv(&mut ()), Ok(Message::State(_))));
    assert!(matches!(
        dec.recv(&mut ()),
        Err(WireError::StateBudget { max: 1000 })
    ));
    assert!(matches!(dec.recv(&mut ()), Err(WireError::Poisoned)));
    assert_eq!(dec.state(), RxState::Failed);
}

#[test]
fn layout_larger_than_the_receiver_allows_is_rejected() {
    let bytes = prefix(0);
    let limits = DecoderLimits {
        max_guest_bytes: 4096,
        ..DecoderLimits::default()
    };
    let mut dec = Decoder::with_limits(bytes.as_slice(), limits);
    dec.recv(&mut ()).unwrap();
    assert!(matches!(
        dec.recv(&mut ()),
        Err(WireError::Layout(
            migration::wire::LayoutError::TooLarge { .. }
        ))
    ));
}

#[test]
fn abort_ends_the_stream_with_the_reason() {
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 0,
        pages: 5,
        final_pass: false,
    })
    .unwrap();
    enc.push_zero_page(0).unwrap();
    enc.send_abort("timeout").unwrap();
    let (res, _) = decode(&enc.into_inner());
    assert_eq!(res.unwrap().last(), Some(&Message::Abort("timeout".into())));
}

#[test]
fn batches_split_at_the_batch_size() {
    let mut enc = Encoder::with_batch_pages(Vec::new(), 4);
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    let frames0 = enc.stats().frames;
    for p in 0..10u64 {
        enc.push_zero_page(p * 4096).unwrap();
    }
    assert_eq!(enc.stats().frames - frames0, 2);
    assert_eq!(enc.pending_pages(), 2);
    enc.flush().unwrap();
    assert_eq!(enc.stats().frames - frames0, 3);
    assert_eq!(
        Encoder::with_batch_pages(Vec::<u8>::new(), 0).pending_pages(),
        0
    );
}

#[test]
fn sync_is_a_barrier_between_passes_and_synced_comes_before_ready() {
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    enc.send_sync(7).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 0,
        pages: 1,
        final_pass: false,
    })
    .unwrap();
    enc.push_zero_page(0).unwrap();
    enc.send_sync(8).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 1,
        pages: 0,
        final_pass: true,
    })
    .unwrap();
    enc.send_complete(&Complete {
        pages_sent: 1,
        digest: None,
    })
    .unwrap();
    enc.send_commit().unwrap();
    let (res, _) = decode(&enc.into_inner());
    let msgs = res.unwrap();
    let syncs: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            Message::Sync(t) => Some(*t),
            _ => None,
        })
        .collect();
    assert_eq!(syncs, vec![7, 8]);
    // Not before the layout.
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    enc.send_sync(1).unwrap();
    assert!(matches!(
        decode(&enc.into_inner()).0,
        Err(WireError::OutOfOrder {
            message: "Sync",
            state: "AwaitLayout"
        })
    ));
    // Acks: Synced any number of times between Accepted and ReadyToResume, not after.
    let mut w = AckWriter::new(Vec::new());
    w.send(&Ack::Accepted).unwrap();
    w.send(&Ack::Synced(7)).unwrap();
    w.send(&Ack::Synced(8)).unwrap();
    w.send(&Ack::ReadyToResume { digest: None }).unwrap();
    w.send(&Ack::Synced(9)).unwrap();
    let bytes = w.into_inner();
    let mut r = AckReader::new(bytes.as_slice());
    assert_eq!(r.recv().unwrap(), Ack::Accepted);
    assert_eq!(r.recv().unwrap(), Ack::Synced(7));
    assert_eq!(r.recv().unwrap(), Ack::Synced(8));
    assert_eq!(r.recv().unwrap(), Ack::ReadyToResume { digest: None });
    assert!(matches!(
        r.recv(),
        Err(WireError::OutOfOrder {
            message: "Synced",
            state: "awaiting Resumed"
        })
    ));
}

#[test]
fn acks_round_trip_in_order_and_reject_skips() {
    let mut w = AckWriter::new(Vec::new());
    let digest = MemoryDigest {
        regions: vec![5, 6],
    };
    w.send(&Ack::Accepted).unwrap();
    w.send(&Ack::ReadyToResume {
        digest: Some(digest.clone()),
    })
    .unwrap();
    w.send(&Ack::Resumed { unix_ns: 42 }).unwrap();
    let bytes = w.into_inner();
    let mut r = AckReader::new(bytes.as_slice());
    assert_eq!(r.recv().unwrap(), Ack::Accepted);
    assert_eq!(
        r.recv().unwrap(),
        Ack::ReadyToResume {
            digest: Some(digest)
        }
    );
    assert_eq!(r.recv().unwrap(), Ack::Resumed { unix_ns: 42 });
    assert!(matches!(r.recv(), Err(WireError::Closed { .. })));

    let mut w = AckWriter::new(Vec::new());
    w.send(&Ack::Resumed { unix_ns: 1 }).unwrap();
    let bytes = w.into_inner();
    let mut r = AckReader::new(bytes.as_slice());
    assert!(matches!(
        r.recv(),
        Err(WireError::OutOfOrder {
            message: "Resumed",
            state: "awaiting Accepted"
        })
    ));

    let mut w = AckWriter::new(Vec::new());
    w.send(&Ack::Accepted).unwrap();
    w.send(&Ack::Error("no memory".into())).unwrap();
    let bytes = w.into_inner();
    let mut r = AckReader::new(bytes.as_slice());
    assert_eq!(r.recv().unwrap(), Ack::Accepted);
    assert_eq!(r.recv().unwrap(), Ack::Error("no memory".into()));
}

#[test]
fn tracker_wire_numbers_are_frozen_and_unknown_ones_rejected() {
    use migration::wire::{tracker_from_wire, tracker_to_wire, PREAMBLE_LEN, WIRE_PAGE_SIZE};
    for (mode, byte) in [
        (TrackerMode::Ring, 0u8),
        (TrackerMode::Bitmap, 1),
        (TrackerMode::ClearLog, 2),
    ] {
        assert_eq!(tracker_to_wire(mode), byte);
        assert_eq!(tracker_from_wire(byte), Some(mode));
        let mut enc = Encoder::new(Vec::new());
        enc.send_hello(&Hello::new(mode, 1)).unwrap();
        let bytes = enc.into_inner();
        // The tracker is the first payload byte of the Hello frame.
        assert_eq!(bytes[PREAMBLE_LEN + 16], byte);
        let mut mem = vec![0u8; 4096];
        let l = migration::wire::MemoryLayout::new(vec![migration::wire::Region {
            slot: 0,
            guest_phys_addr: 0,
            size: 4096,
        }])
        .unwrap();
        let mut sink = migration::wire::GuestSlices::new(&l, vec![mem.as_mut_slice()]).unwrap();
        let got = Decoder::new(bytes.as_slice()).recv(&mut sink);
        assert!(matches!(got, Ok(Message::Hello(h)) if h.tracker == mode));
    }
    assert_eq!(tracker_from_wire(3), None);
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Ring, 1)).unwrap();
    let mut s = enc.into_inner()[..PREAMBLE_LEN].to_vec();
    let mut payload = vec![3u8, 0, 0, 0];
    payload.extend_from_slice(&WIRE_PAGE_SIZE.to_le_bytes());
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    s.extend(raw_frame(tag::HELLO, 0, &payload));
    let (res, _) = decode(&s);
    assert!(matches!(
        res,
        Err(WireError::Malformed {
            what: "Hello: unknown tracker mode"
        })
    ));
}

/// An encoder past Hello, Layout and the marker of one final pass over every page of `l`.
fn one_pass_encoder(l: &migration::wire::MemoryLayout) -> Encoder<Vec<u8>> {
    let mut enc = Encoder::with_batch_pages(Vec::new(), 5);
    enc.send_hello(&Hello::new(TrackerMode::Ring, 2)).unwrap();
    enc.send_layout(l).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 0,
        pages: all_pages(l).len() as u64,
        final_pass: true,
    })
    .unwrap();
    enc
}

/// The encoder's stream with every page given through `push_page_with`; the page at
/// `fail` (if any) is tried first with a fill that fails.
fn encode_filled(l: &migration::wire::MemoryLayout, mem: &[Vec<u8>], fail: Option<u64>) -> Vec<u8> {
    let mut enc = one_pass_encoder(l);
    for gpa in all_pages(l) {
        if fail == Some(gpa) {
            let r = enc.push_page_with(gpa, |dst: &mut [u8]| {
                dst[..4].copy_from_slice(b"half");
                Err(WireError::Malformed {
                    what: "a read that failed",
                })
            });
            assert!(matches!(r, Err(WireError::Malformed { .. })), "{r:?}");
        }
        let (idx, off) = l.locate(gpa).unwrap();
        let off = off as usize;
        enc.push_page_with(gpa, |dst: &mut [u8]| {
            dst.copy_from_slice(&mem[idx][off..off + PAGE]);
            Ok::<(), WireError>(())
        })
        .unwrap();
    }
    enc.flush_batch().unwrap();
    enc.into_inner()
}

#[test]
fn pages_filled_in_place_make_the_same_stream_and_a_failed_fill_leaves_no_trace() {
    let l = layout();
    let mem = memory();
    let copied = {
        let mut enc = one_pass_encoder(&l);
        for gpa in all_pages(&l) {
            let (idx, off) = l.locate(gpa).unwrap();
            let off = off as usize;
            enc.push_page(gpa, &mem[idx][off..off + PAGE]).unwrap();
        }
        enc.flush_batch().unwrap();
        enc.into_inner()
    };
    // Byte for byte, zero markers and checksums (folded page by page) included.
    assert_eq!(encode_filled(&l, &mem, None), copied);
    // A fill that fails mid-page (the first of a batch, and one inside a batch) leaves the
    // batch as it was.
    let pages = all_pages(&l);
    assert_eq!(encode_filled(&l, &mem, Some(pages[0])), copied);
    assert_eq!(encode_filled(&l, &mem, Some(pages[7])), copied);
}

/// Offsets of every frame header in a stream (after the 16-byte preamble).
fn frame_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut at = 16;
    let mut v = Vec::new();
    while at + 16 <= bytes.len() {
        v.push(at);
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        at += 16 + len;
    }
    assert_eq!(at, bytes.len(), "frames tile the stream");
    v
}

#[test]
fn without_frame_crcs_a_stream_carries_zero_crcs_and_decodes_into_identical_memory() {
    let l = layout();
    let mem = memory();
    let bytes = encode_with(&l, &mem, &round_trip_passes(), false);
    let offsets = frame_offsets(&bytes);
    assert!(offsets.len() > 5);
    for &at in &offsets {
        assert_eq!(
            bytes[at + 12..at + 16],
            [0u8; 4],
            "frame at {at} has no CRC"
        );
    }
    let (res, got) = decode_with(&bytes, false);
    let msgs = res.unwrap();
    assert_eq!(got, mem);
    assert!(matches!(msgs.last(), Some(Message::Commit)));
    // The same stream with CRCs differs only in the CRC fields.
    let with = encode_with(&l, &mem, &round_trip_passes(), true);
    assert_eq!(with.len(), bytes.len());
    for &at in &offsets {
        assert_ne!(with[at + 12..at + 16], [0u8; 4]);
    }
}

#[test]
fn crc_expectations_that_differ_fail_at_the_first_frame() {
    let l = layout();
    let mem = memory();
    // A receiver that checks CRCs refuses a stream sent without them (what an old
    // destination would do, had the capability not been negotiated)...
    let bare = encode_with(&l, &mem, &round_trip_passes(), false);
    let (res, got) = decode_with(&bare, true);
    assert!(
        matches!(
            res,
            Err(WireError::ChecksumMismatch {
                seq: 0,
                tag: tag::HELLO,
                expected: 0,
                ..
            })
        ),
        "{res:?}"
    );
    assert!(got.iter().all(|r| r.iter().all(|&b| b == 0)));
    // ...and one that agreed to go without refuses a frame that carries one.
    let crc = encode_with(&l, &mem, &round_trip_passes(), true);
    let (res, _) = decode_with(&crc, false);
    assert!(
        matches!(
            res,
            Err(WireError::ChecksumMismatch {
                seq: 0,
                tag: tag::HELLO,
                found: 0,
                ..
            })
        ),
        "{res:?}"
    );
}

#[test]
fn without_frame_crcs_a_flipped_page_byte_is_not_caught_by_the_frame_layer() {
    // The decision this records: with CRCs off the frame layer trusts the channel (TLS
    // authenticates every byte underneath); on a plain stream the same flip is a
    // ChecksumMismatch (flipped_page_byte_fails_the_checksum_and_never_reaches_guest_memory).
    let l = layout();
    let mem = memory();
    let mut bytes = encode_with(&l, &mem, &round_trip_passes(), false);
    let pages_at = frame_offsets(&bytes)
        .into_iter()
        .find(|&at| bytes[at] == tag::PAGES)
        .unwrap();
    // The first batch holds pages 0..5 of region 0: 0 and 3 are zero markers (8 bytes),
    // 1, 2 and 4 carry data; page 4 is not resent by a later pass.
    let data = pages_at + 16 + 8 + 8 + (8 + PAGE) * 2 + 8 + 8;
    bytes[data + 100] ^= 0x04;
    let (res, got) = decode_with(&bytes, false);
    assert!(res.is_ok(), "{res:?}");
    assert_ne!(
        got, mem,
        "the flip reached memory: only the channel can catch it"
    );
}

#[test]
fn acks_without_frame_crcs_round_trip_and_an_ack_reader_expecting_crcs_refuses_them() {
    let send = |crc: bool| {
        let mut w = AckWriter::new(Vec::new()).with_frame_crc(crc);
        w.send(&Ack::Accepted).unwrap();
        w.send(&Ack::Synced(7)).unwrap();
        w.into_inner()
    };
    let bare = send(false);
    let mut r = AckReader::new(bare.as_slice()).with_frame_crc(false);
    assert_eq!(r.recv().unwrap(), Ack::Accepted);
    assert_eq!(r.recv().unwrap(), Ack::Synced(7));
    let mut r = AckReader::new(bare.as_slice());
    assert!(matches!(
        r.recv(),
        Err(WireError::ChecksumMismatch { seq: 0, .. })
    ));
    let with_crc = send(true);
    let mut r = AckReader::new(with_crc.as_slice()).with_frame_crc(false);
    assert!(matches!(
        r.recv(),
        Err(WireError::ChecksumMismatch { seq: 0, .. })
    ));
}
