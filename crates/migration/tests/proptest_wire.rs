//! Property tests: any byte input yields `Err`, never a panic; valid streams round-trip.

mod common;

use common::*;
use migration::is_zero_page;
use migration::units::{parse_bandwidth, parse_duration_ms, parse_size};
use migration::wire::{
    AckReader, Decoder, Encoder, GuestSlices, Hello, IterationMarker, MemoryLayout, Message,
    Region, StateBlob,
};
use migration::{IncrementalDigest, MemoryDigest, TrackerMode};
use proptest::prelude::*;

/// Decodes until Commit/Abort/error, at most `limit` messages; true if Commit was reached.
fn run_decoder(bytes: &[u8]) -> Result<bool, migration::wire::WireError> {
    let (res, _) = decode(bytes);
    res.map(|m| matches!(m.last(), Some(Message::Commit)))
}

fn valid_stream() -> Vec<u8> {
    let l = layout();
    let all = all_pages(&l);
    encode(&l, &memory(), &[all.clone(), vec![all[4], all[20]]])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(run_decoder(&bytes).is_err());
        let mut acks = AckReader::new(bytes.as_slice());
        for _ in 0..8 {
            if acks.recv().is_err() { break; }
        }
    }

    #[test]
    fn random_frames_after_a_valid_prefix_are_an_error_not_a_panic(
        cut in 0usize..200,
        tail in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut s = prefix(3);
        s.truncate(s.len().saturating_sub(cut));
        s.extend(tail);
        prop_assert!(run_decoder(&s).is_err());
    }

    #[test]
    fn any_single_byte_corruption_is_detected(pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut s = valid_stream();
        let i = pos.index(s.len());
        s[i] ^= flip;
        // Every byte is covered by the magic, the version, a reserved-zero check or a CRC.
        prop_assert!(run_decoder(&s).is_err(), "flip {:#x} at {} accepted", flip, i);
    }

    #[test]
    fn multi_byte_corruption_never_panics(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
    ) {
        let mut s = valid_stream();
        for (pos, v) in edits {
            let i = pos.index(s.len());
            s[i] = v;
        }
        let _ = run_decoder(&s);
    }

    #[test]
    fn every_truncation_is_an_error(cut in any::<prop::sample::Index>()) {
        let s = valid_stream();
        let n = cut.index(s.len());
        prop_assert!(run_decoder(&s[..n]).is_err());
    }

    #[test]
    fn streams_round_trip_into_identical_memory(
        regions in proptest::collection::vec((1u64..6, 0u64..4), 1..4),
        fill in proptest::collection::vec(any::<(u8, bool)>(), 64),
        dirty in proptest::collection::vec(proptest::collection::vec(any::<prop::sample::Index>(), 0..12), 0..4),
        batch in 1u32..9,
        blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..3),
    ) {
        // Regions of 1..6 pages separated by 0..4-page holes.
        let mut gpa = 0x4000u64;
        let mut rs = Vec::new();
        for (i, (pages, hole)) in regions.iter().enumerate() {
            rs.push(Region { slot: i as u32, guest_phys_addr: gpa, size: pages * PAGE as u64 });
            gpa += (pages + hole) * PAGE as u64;
        }
        let l = MemoryLayout::new(rs).unwrap();
        let gpas: Vec<u64> = l.regions().iter()
            .flat_map(|r| (0..r.pages()).map(move |p| r.guest_phys_addr + p * PAGE as u64))
            .collect();
        let mut src: Vec<Vec<u8>> = l.regions().iter().map(|r| vec![0u8; r.size as usize]).collect();
        let mut k = 0usize;
        let mut write = |src: &mut Vec<Vec<u8>>, gpa: u64| {
            let (idx, off) = l.locate(gpa).unwrap();
            let (v, zero) = fill[k % fill.len()];
            k += 1;
            let page = &mut src[idx][off as usize..off as usize + PAGE];
            page.fill(if zero { 0 } else { v });
            page[(k * 7) % PAGE] = v;
        };
        for &g in &gpas { write(&mut src, g); }

        let mut enc = Encoder::with_batch_pages(Vec::new(), batch);
        enc.send_hello(&Hello::new(TrackerMode::ClearLog, 3)).unwrap();
        enc.send_layout(&l).unwrap();
        let mut passes: Vec<Vec<u64>> = vec![gpas.clone()];
        for d in &dirty {
            let mut p: Vec<u64> = d.iter().map(|i| gpas[i.index(gpas.len())]).collect();
            p.sort_unstable();
            p.dedup();
            passes.push(p);
        }
        let n = passes.len();
        for (i, pass) in passes.iter().enumerate() {
            // The guest dirties the pass's pages before they are sent.
            if i > 0 { for &g in pass { write(&mut src, g); } }
            enc.begin_iteration(&IterationMarker { iteration: i as u32, pages: pass.len() as u64, final_pass: i + 1 == n }).unwrap();
            for &g in pass {
                let (idx, off) = l.locate(g).unwrap();
                enc.push_page(g, &src[idx][off as usize..off as usize + PAGE]).unwrap();
            }
        }
        for (i, b) in blobs.iter().enumerate() {
            enc.send_state(9, i as u32, b).unwrap();
        }
        let slices: Vec<&[u8]> = src.iter().map(|m| m.as_slice()).collect();
        let digest = MemoryDigest::compute(&l, &slices).unwrap();
        let pages_sent = enc.stats().pages;
        enc.send_complete(&migration::wire::Complete { pages_sent, digest: Some(digest.clone()) }).unwrap();
        enc.send_commit().unwrap();
        let bytes = enc.into_inner();

        let mut dst: Vec<Vec<u8>> = l.regions().iter().map(|r| vec![0u8; r.size as usize]).collect();
        let mut inc = IncrementalDigest::new(&l);
        let mut dec = Decoder::new(bytes.as_slice());
        let mut got_blobs = Vec::new();
        {
            let sl: Vec<&mut [u8]> = dst.iter_mut().map(|m| m.as_mut_slice()).collect();
            let mut sink = migration::wire::DigestingSink::new(GuestSlices::new(&l, sl).unwrap(), &mut inc);
            loop {
                match dec.recv(&mut sink).unwrap() {
                    Message::Commit => break,
                    Message::State(StateBlob { data, .. }) => got_blobs.push(data),
                    Message::Complete(c) => prop_assert_eq!(c.digest.as_ref(), Some(&digest)),
                    _ => {}
                }
            }
        }
        prop_assert_eq!(&dst, &src);
        prop_assert_eq!(got_blobs, blobs);
        prop_assert_eq!(inc.digest(), digest);
        prop_assert_eq!(dec.stats().pages, pages_sent);
    }

    #[test]
    fn zero_check_agrees_with_a_byte_loop(len in 0usize..600, set in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255))) {
        let mut v = vec![0u8; len];
        if let (Some((i, b)), true) = (set, len > 0) {
            v[i.index(len)] = b;
        }
        prop_assert_eq!(is_zero_page(&v), v.iter().all(|&b| b == 0));
    }

    #[test]
    fn unit_parsers_never_panic(s in "\\PC{0,24}") {
        let _ = parse_size(&s);
        let _ = parse_bandwidth(&s);
        let _ = parse_duration_ms(&s);
    }

    #[test]
    fn sizes_round_trip_through_their_suffixes(n in 0u64..1_000_000, suffix in 0usize..5) {
        let (s, mul) = [("", 1u64), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("MB", 1 << 20)][suffix];
        prop_assert_eq!(parse_size(&format!("{n}{s}")), Ok(n * mul));
    }
}
