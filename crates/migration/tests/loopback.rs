//! End to end over a real TCP connection on 127.0.0.1: a sender thread streams a few MiB of
//! synthetic guest memory (with zero pages and two dirty passes) and the receiver decodes it
//! straight into its own memory; the digests and the bytes must match.

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

use migration::bandwidth::ThrottledWriter;
use migration::wire::unix_time_ns;
use migration::wire::{
    Ack, AckReader, AckWriter, Complete, Decoder, DigestingSink, Encoder, GuestSlices, Hello,
    IterationMarker, MemoryLayout, Message, Region, RxState, WireError,
};
use migration::{IncrementalDigest, MemoryDigest, TrackerMode, PAGE_SIZE};
use rand::{Rng, SeedableRng};

const PAGE: usize = PAGE_SIZE as usize;

fn layout() -> MemoryLayout {
    MemoryLayout::new(vec![
        Region {
            slot: 0,
            guest_phys_addr: 0,
            size: 3 << 20,
        },
        Region {
            slot: 1,
            guest_phys_addr: 1 << 32,
            size: 1 << 20,
        },
    ])
    .unwrap()
}

/// Half the pages random, half zero.
fn synthetic_memory(l: &MemoryLayout, rng: &mut impl Rng) -> Vec<Vec<u8>> {
    l.regions()
        .iter()
        .map(|r| {
            let mut m = vec![0u8; r.size as usize];
            for page in m.chunks_mut(PAGE) {
                if rng.gen_bool(0.5) {
                    rng.fill(page);
                }
            }
            m
        })
        .collect()
}

fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = thread::spawn(move || TcpStream::connect(addr).unwrap());
    let (server, _) = listener.accept().unwrap();
    (client.join().unwrap(), server)
}

fn page_of(l: &MemoryLayout, gpa: u64) -> std::ops::Range<usize> {
    let (_, off) = l.locate(gpa).unwrap();
    off as usize..off as usize + PAGE
}

struct SourceResult {
    memory: Vec<Vec<u8>>,
    source_digest: MemoryDigest,
    dest_digest: Option<MemoryDigest>,
    paused_ns: u64,
    resumed_ns: u64,
    zero_pages: u64,
}

fn source(tcp: TcpStream, seed: u64) -> Result<SourceResult, WireError> {
    let l = layout();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut mem = synthetic_memory(&l, &mut rng);
    let mut acks = AckReader::new(BufReader::new(tcp.try_clone()?));
    let mut enc = Encoder::new(ThrottledWriter::new(tcp, 0));
    enc.send_hello(&Hello::new(TrackerMode::Ring, 2))?;
    enc.send_layout(&l)?;
    enc.flush()?;
    assert_eq!(acks.recv()?, Ack::Accepted);

    let all: Vec<u64> = l
        .regions()
        .iter()
        .flat_map(|r| (0..r.pages()).map(move |p| r.guest_phys_addr + p * PAGE_SIZE))
        .collect();
    let mut pass: Vec<u64> = all.clone();
    let mut paused_ns = 0;
    for iteration in 0..3u32 {
        let final_pass = iteration == 2;
        if final_pass {
            paused_ns = unix_time_ns();
        }
        enc.begin_iteration(&IterationMarker {
            iteration,
            pages: pass.len() as u64,
            final_pass,
        })?;
        for &gpa in &pass {
            let (idx, _) = l.locate(gpa).unwrap();
            let range = page_of(&l, gpa);
            enc.push_page(gpa, &mem[idx][range])?;
        }
        // The "guest" dirties 300 random pages (some to zero) while the pass ran.
        let mut dirty: Vec<u64> = (0..300).map(|_| all[rng.gen_range(0..all.len())]).collect();
        dirty.sort_unstable();
        dirty.dedup();
        if !final_pass {
            for &gpa in &dirty {
                let (idx, _) = l.locate(gpa).unwrap();
                let range = page_of(&l, gpa);
                if rng.gen_bool(0.3) {
                    mem[idx][range].fill(0);
                } else {
                    rng.fill(&mut mem[idx][range]);
                }
            }
        }
        pass = dirty;
    }
    enc.send_state(1, 0, &[1, 2, 3])?;
    enc.send_state(1, 1, &[4, 5, 6])?;
    let pages_sent = enc.stats().pages;
    enc.send_complete(&Complete {
        pages_sent,
        digest: None,
    })?;
    let Ack::ReadyToResume { digest } = acks.recv()? else {
        panic!("expected ReadyToResume");
    };
    // Memory is frozen now: hash it while the destination waits for Commit.
    let slices: Vec<&[u8]> = mem.iter().map(|m| m.as_slice()).collect();
    let source_digest = MemoryDigest::compute(&l, &slices).unwrap();
    enc.send_commit()?;
    let Ack::Resumed { unix_ns } = acks.recv()? else {
        panic!("expected Resumed");
    };
    Ok(SourceResult {
        memory: mem,
        source_digest,
        dest_digest: digest,
        paused_ns,
        resumed_ns: unix_ns,
        zero_pages: enc.stats().zero_pages,
    })
}

#[test]
fn migration_over_loopback_tcp_reproduces_memory_and_digest() {
    let (src_tcp, dst_tcp) = pair();
    let sender = thread::spawn(move || source(src_tcp, 7));

    let mut acks = AckWriter::new(dst_tcp.try_clone().unwrap());
    let mut dec = Decoder::new(BufReader::with_capacity(1 << 20, dst_tcp));
    // Hello and layout arrive first; the destination then allocates memory.
    assert!(matches!(dec.recv(&mut ()).unwrap(), Message::Hello(h) if h.vcpus == 2));
    let Message::Layout(l) = dec.recv(&mut ()).unwrap() else {
        panic!("expected layout");
    };
    assert_eq!(l, layout());
    let mut mem: Vec<Vec<u8>> = l
        .regions()
        .iter()
        .map(|r| vec![0u8; r.size as usize])
        .collect();
    let mut digest = IncrementalDigest::new(&l);
    acks.send(&Ack::Accepted).unwrap();
    let mut states = 0;
    {
        let slices: Vec<&mut [u8]> = mem.iter_mut().map(|m| m.as_mut_slice()).collect();
        let mut sink = DigestingSink::new(GuestSlices::new(&l, slices).unwrap(), &mut digest);
        loop {
            match dec.recv(&mut sink).unwrap() {
                Message::Complete(c) => {
                    assert_eq!(c.digest, None);
                    break;
                }
                Message::State(_) => states += 1,
                _ => {}
            }
        }
    }
    assert_eq!(states, 2);
    acks.send(&Ack::ReadyToResume {
        digest: Some(digest.digest()),
    })
    .unwrap();
    assert_eq!(dec.recv(&mut ()).unwrap(), Message::Commit);
    assert_eq!(dec.state(), RxState::Committed);
    acks.send(&Ack::Resumed {
        unix_ns: unix_time_ns(),
    })
    .unwrap();

    let r = sender.join().unwrap().unwrap();
    assert_eq!(
        mem, r.memory,
        "destination memory differs from the source's"
    );
    r.source_digest
        .verify(r.dest_digest.as_ref().unwrap())
        .unwrap();
    assert!(r.resumed_ns >= r.paused_ns);
    assert!(
        r.zero_pages > 400,
        "only {} zero pages detected",
        r.zero_pages
    );
    let stats = dec.stats();
    assert_eq!(stats.zero_pages, r.zero_pages);
    // Zero pages cost their 8-byte entry only: the wire carries data pages plus framing.
    let data = stats.pages - stats.zero_pages;
    let entries = data * (PAGE_SIZE + 8) + stats.zero_pages * 8;
    assert!(
        stats.bytes >= entries && stats.bytes - entries < 4096,
        "{} bytes on the wire for {entries} bytes of entries",
        stats.bytes
    );
}

#[test]
fn connection_dropped_mid_stream_is_a_clear_error_on_the_destination() {
    let (src_tcp, dst_tcp) = pair();
    let sender = thread::spawn(move || -> Result<(), WireError> {
        let l = layout();
        let mut enc = Encoder::new(src_tcp.try_clone()?);
        enc.send_hello(&Hello::new(TrackerMode::Bitmap, 1))?;
        enc.send_layout(&l)?;
        enc.begin_iteration(&IterationMarker {
            iteration: 0,
            pages: l.total_pages(),
            final_pass: false,
        })?;
        for p in 0..100u64 {
            enc.push_zero_page(p * PAGE_SIZE)?;
        }
        enc.flush()?;
        // Half a frame, then the source dies.
        let mut raw = enc.into_inner();
        raw.write_all(&[0x03, 0, 0, 0, 4, 0, 0, 0])?;
        src_tcp.shutdown(Shutdown::Both)?;
        Ok(())
    });
    let mut dec = Decoder::new(dst_tcp);
    let err = loop {
        match dec.recv(&mut ()) {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    sender.join().unwrap().unwrap();
    assert!(
        matches!(
            err,
            WireError::Truncated {
                what: "frame header",
                needed: 16,
                got: 8
            }
        ),
        "{err}"
    );
    assert_eq!(dec.state(), RxState::Failed);
    assert_eq!(dec.stats().pages, 100);
}
