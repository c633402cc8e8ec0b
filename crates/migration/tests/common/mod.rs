//! Helpers shared by the wire tests: build valid streams, decode them into memory.
#![allow(dead_code)]

use migration::wire::{
    Complete, Decoder, Encoder, GuestSlices, Hello, IterationMarker, MemoryLayout, Message, Region,
    WireError,
};
use migration::{MemoryDigest, TrackerMode};

pub const PAGE: usize = 4096;

pub fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        Region {
            slot: 0,
            guest_phys_addr: 0,
            size: 16 * PAGE as u64,
        },
        Region {
            slot: 1,
            guest_phys_addr: 0x10_0000,
            size: 8 * PAGE as u64,
        },
    ])
    .unwrap()
}

/// Memory for `layout()` with a recognizable pattern and some zero pages.
pub fn memory() -> Vec<Vec<u8>> {
    layout()
        .regions()
        .iter()
        .enumerate()
        .map(|(ri, r)| {
            let mut m = vec![0u8; r.size as usize];
            for (pi, page) in m.chunks_mut(PAGE).enumerate() {
                if pi % 3 != 0 {
                    page.fill((ri * 31 + pi + 1) as u8);
                }
            }
            m
        })
        .collect()
}

/// A passes is a list of page gpas; the last pass is the final one.
pub fn encode(layout: &MemoryLayout, mem: &[Vec<u8>], passes: &[Vec<u64>]) -> Vec<u8> {
    encode_with(layout, mem, passes, true)
}

/// [`encode`] with or without frame CRCs.
pub fn encode_with(
    layout: &MemoryLayout,
    mem: &[Vec<u8>],
    passes: &[Vec<u64>],
    crc: bool,
) -> Vec<u8> {
    let mut enc = Encoder::with_batch_pages(Vec::new(), 5).with_frame_crc(crc);
    enc.send_hello(&Hello::new(TrackerMode::Ring, 2)).unwrap();
    enc.send_layout(layout).unwrap();
    for (i, pass) in passes.iter().enumerate() {
        enc.begin_iteration(&IterationMarker {
            iteration: i as u32,
            pages: pass.len() as u64,
            final_pass: i + 1 == passes.len(),
        })
        .unwrap();
        for &gpa in pass {
            let (idx, off) = layout.locate(gpa).unwrap();
            let off = off as usize;
            enc.push_page(gpa, &mem[idx][off..off + PAGE]).unwrap();
        }
    }
    enc.send_state(1, 0, b"vcpu0").unwrap();
    let slices: Vec<&[u8]> = mem.iter().map(|m| m.as_slice()).collect();
    let digest = MemoryDigest::compute(layout, &slices).unwrap();
    let pages_sent = enc.stats().pages;
    enc.send_complete(&Complete {
        pages_sent,
        digest: Some(digest),
    })
    .unwrap();
    enc.send_commit().unwrap();
    enc.into_inner()
}

pub fn all_pages(layout: &MemoryLayout) -> Vec<u64> {
    layout
        .regions()
        .iter()
        .flat_map(|r| (0..r.pages()).map(move |p| r.guest_phys_addr + p * PAGE as u64))
        .collect()
}

/// Decodes until Commit, Abort or an error; returns the messages and the memory.
pub fn decode(bytes: &[u8]) -> (Result<Vec<Message>, WireError>, Vec<Vec<u8>>) {
    decode_with(bytes, true)
}

/// [`decode`] expecting frame CRCs or not.
pub fn decode_with(bytes: &[u8], crc: bool) -> (Result<Vec<Message>, WireError>, Vec<Vec<u8>>) {
    let l = layout();
    let mut mem: Vec<Vec<u8>> = l
        .regions()
        .iter()
        .map(|r| vec![0u8; r.size as usize])
        .collect();
    let mut dec = Decoder::new(bytes).with_frame_crc(crc);
    let mut msgs = Vec::new();
    let res = {
        let slices: Vec<&mut [u8]> = mem.iter_mut().map(|m| m.as_mut_slice()).collect();
        let mut sink = GuestSlices::new(&l, slices).unwrap();
        loop {
            match dec.recv(&mut sink) {
                Ok(m) => {
                    let end = matches!(m, Message::Commit | Message::Abort(_));
                    msgs.push(m);
                    if end {
                        break Ok(msgs);
                    }
                }
                Err(e) => break Err(e),
            }
        }
    };
    (res, mem)
}

/// A raw frame with the given sequence number (for crafting hostile streams).
pub fn raw_frame(tag: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![tag, 0, 0, 0];
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f), payload);
    f.extend_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Hello + layout + iteration 0 announcing `pages`: frames 0..=2.
pub fn prefix(pages: u64) -> Vec<u8> {
    let mut enc = Encoder::new(Vec::new());
    enc.send_hello(&Hello::new(TrackerMode::Bitmap, 1)).unwrap();
    enc.send_layout(&layout()).unwrap();
    enc.begin_iteration(&IterationMarker {
        iteration: 0,
        pages,
        final_pass: false,
    })
    .unwrap();
    enc.into_inner()
}

/// A page-batch payload of `(word, data)` entries.
pub fn batch_payload(entries: &[(u64, Option<&[u8]>)]) -> Vec<u8> {
    let mut p = (entries.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&[0u8; 4]);
    for (word, data) in entries {
        p.extend_from_slice(&word.to_le_bytes());
        if let Some(d) = data {
            p.extend_from_slice(d);
        }
    }
    p
}
