//! Hostile streams: a deterministic corpus built from real migrations recorded at run time.
//!
//! A real source (the workload guest, then a PVH guest running the project's test kernel)
//! migrates through a recording TCP proxy to a real destination on `/dev/kvm`. The recorded
//! source-to-destination bytes are parsed into frames, mutated, re-framed with their sequence
//! numbers and CRC-32C recomputed (so the checks behind the CRC are reached), and replayed:
//!
//! - against the wire [`Decoder`] alone, where it decides: truncation at every frame
//!   boundary and inside frames, a bit flip in every frame's header and payload, huge
//!   lengths, layout extremes, vCPU counts, duplicated and swapped frames;
//! - against the real destination ([`receive`], which creates a VM), where the VM decides:
//!   state-blob mutations, page data changed under a `Complete` digest, valid reorderings,
//!   stalls, random bit flips, layouts KVM must refuse.
//!
//! Each case asserts its outcome class: a typed refusal and no guest, or (valid reorderings)
//! a guest whose memory digest equals the source's. The peak RSS is sampled against a bound.
//! Without `/dev/kvm` the tests print `SKIP(kvm)` (nothing can be recorded).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use migration::digest::{IncrementalDigest, MemoryDigest};
use migration::wire::{
    tag, Ack, AckReader, Decoder, DecoderLimits, LayoutError, Message, PageSink, WireError,
    HEADER_LEN, PREAMBLE_LEN,
};
use migration_engine::{receive, DestOptions, IncomingSummary, MigrationError, SourceOptions};
use vmm::check::{RipFault, StateError};
use vmm::{Pattern, RegionSpec, Tracking, Vm, VmConfig, VmmError};

/// Both tests run real guests on a 2-core host, and read this process's peak RSS.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn have_kvm() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; no stream can be recorded");
        return false;
    }
    true
}

// ---------------------------------------------------------------------------------------
// Recording

type Dest = std::thread::JoinHandle<Result<(Vm, IncomingSummary), MigrationError>>;

fn dest_opts() -> DestOptions {
    DestOptions {
        tracking: Tracking::Bitmap,
        progress_timeout: Duration::from_secs(30),
        ..DestOptions::default()
    }
}

fn spawn_dest(opts: DestOptions) -> (std::net::SocketAddr, Dest) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        receive(s, &opts, &mut |_| {})
    });
    (addr, h)
}

/// Migrates `src` through a recording proxy to a real destination; returns what the source
/// sent. The destination's guest is stopped.
fn record(src: &mut Vm) -> Vec<u8> {
    let (daddr, dest) = spawn_dest(dest_opts());
    let pl = TcpListener::bind("127.0.0.1:0").unwrap();
    let paddr = pl.local_addr().unwrap();
    let proxy = std::thread::spawn(move || {
        let (mut a, _) = pl.accept().unwrap();
        let mut b = TcpStream::connect(daddr).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(Shutdown::Write);
        });
        let mut rec = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    rec.extend_from_slice(&buf[..n]);
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = b.shutdown(Shutdown::Write);
        back.join().unwrap();
        rec
    });
    let sum = migration_engine::migrate(
        src,
        TcpStream::connect(paddr).unwrap(),
        &SourceOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(sum.completed(), "{}", sum.to_text());
    assert_eq!(sum.verified, Some(true));
    let (mut vm, _) = dest.join().unwrap().unwrap();
    vm.stop().unwrap();
    proxy.join().unwrap()
}

fn workload_stream() -> Vec<u8> {
    let mut vm = Vm::create(&VmConfig {
        vcpus: 2,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: 1 << 32,
            bytes: 16 << 20,
            log_dirty: true,
        }],
        tracking: Tracking::Ring { entries: 4096 },
    })
    .unwrap();
    vm.set_dirty_workload(1 << 32, 1024, Pattern::Random, 4000)
        .unwrap();
    vm.start(None).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    record(&mut vm)
}

fn pvh_stream() -> Vec<u8> {
    use pvh::test_kernel::{self, Cmdline, TestKernelParams};
    let kernel = test_kernel::build(&TestKernelParams::default()).unwrap();
    let cmdline = Cmdline {
        ws_mb: 4,
        dirty_mb: 1,
        reports: 0,
        cpus: 2,
        exit: 0x2a,
        tick_us: 1000,
        period_ticks: 40,
        tsc_pace: true,
        ..Cmdline::default()
    };
    let mut vm = pvh::boot(&pvh::PvhConfig {
        cmdline: cmdline.render(),
        memory: 32 << 20,
        vcpus: 2,
        tracking: Some(Tracking::Bitmap),
        ..pvh::PvhConfig::new(kernel)
    })
    .unwrap();
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    record(vm.vm_mut())
}

// ---------------------------------------------------------------------------------------
// Frames

#[derive(Clone, Debug)]
struct Frame {
    tag: u8,
    payload: Vec<u8>,
}

/// A parsed stream: the preamble and the frames, re-encoded on demand with sequence numbers
/// and CRCs recomputed.
#[derive(Clone)]
struct Stream {
    preamble: Vec<u8>,
    frames: Vec<Frame>,
}

fn header(tag: u8, seq: u32, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = tag;
    h[4..8].copy_from_slice(&seq.to_le_bytes());
    h[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    seal(&mut h, payload);
    h
}

/// Recomputes a header's CRC over its first 12 bytes and `payload`.
fn seal(h: &mut [u8; HEADER_LEN], payload: &[u8]) {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..12]), payload);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
}

impl Stream {
    fn parse(b: &[u8]) -> Stream {
        let mut frames = Vec::new();
        let mut at = PREAMBLE_LEN;
        while at < b.len() {
            let len = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
            frames.push(Frame {
                tag: b[at],
                payload: b[at + HEADER_LEN..at + HEADER_LEN + len].to_vec(),
            });
            at += HEADER_LEN + len;
        }
        assert_eq!(at, b.len());
        Stream {
            preamble: b[..PREAMBLE_LEN].to_vec(),
            frames,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.preamble.clone();
        for (seq, f) in self.frames.iter().enumerate() {
            out.extend_from_slice(&header(f.tag, seq as u32, &f.payload));
            out.extend_from_slice(&f.payload);
        }
        out
    }

    /// Byte offset of each frame in [`Stream::bytes`], and the end.
    fn offsets(&self) -> Vec<usize> {
        let mut v = vec![PREAMBLE_LEN];
        for f in &self.frames {
            v.push(v[v.len() - 1] + HEADER_LEN + f.payload.len());
        }
        v
    }

    fn position(&self, t: u8) -> usize {
        self.frames.iter().position(|f| f.tag == t).unwrap()
    }

    fn edit(&self, f: impl FnOnce(&mut Vec<Frame>)) -> Stream {
        let mut s = self.clone();
        f(&mut s.frames);
        s
    }

    /// The same stream with the source's memory digest in its Complete frame.
    fn with_digest(&self, d: &MemoryDigest) -> Stream {
        self.edit(|fr| {
            let c = fr.iter_mut().find(|f| f.tag == tag::COMPLETE).unwrap();
            let pages_sent = c.payload[8..16].to_vec();
            let mut p = Vec::new();
            p.extend_from_slice(&1u32.to_le_bytes());
            p.extend_from_slice(&(d.regions.len() as u32).to_le_bytes());
            p.extend_from_slice(&pages_sent);
            for r in &d.regions {
                p.extend_from_slice(&r.to_le_bytes());
            }
            c.payload = p;
        })
    }

    /// Index of the State frame of `kind`/`instance`.
    fn state(&self, kind: u32, instance: u32) -> usize {
        self.frames
            .iter()
            .position(|f| {
                f.tag == tag::STATE
                    && f.payload[..4] == kind.to_le_bytes()
                    && f.payload[4..8] == instance.to_le_bytes()
            })
            .unwrap()
    }

    /// The stream with the JSON of one state blob edited.
    fn edit_state(
        &self,
        kind: u32,
        instance: u32,
        f: impl FnOnce(&mut serde_json::Value),
    ) -> Stream {
        let i = self.state(kind, instance);
        self.edit(|fr| {
            let mut v: serde_json::Value = serde_json::from_slice(&fr[i].payload[8..]).unwrap();
            f(&mut v);
            fr[i].payload.truncate(8);
            fr[i]
                .payload
                .extend_from_slice(&serde_json::to_vec(&v).unwrap());
        })
    }
}

// ---------------------------------------------------------------------------------------
// The decoder alone

#[derive(Debug)]
enum Outcome {
    /// Commit reached: the destination would run a guest with this memory.
    Guest(MemoryDigest),
    /// The source aborted (no guest).
    Aborted,
    /// A typed refusal (no guest).
    Refused(WireError),
}

#[derive(Default)]
struct DigestSink(Option<IncrementalDigest>);

impl PageSink for DigestSink {
    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        if let Some(d) = &mut self.0 {
            d.record_page(gpa, data);
        }
    }
    fn zero_page(&mut self, gpa: u64) {
        if let Some(d) = &mut self.0 {
            d.record_zero(gpa);
        }
    }
}

fn limits() -> DecoderLimits {
    DecoderLimits {
        max_guest_bytes: vmm::host::guest_memory_limit().unwrap(),
        ..DecoderLimits::default()
    }
}

fn decode(r: impl Read, limits: DecoderLimits) -> Outcome {
    let mut dec = Decoder::with_limits(r, limits);
    let mut sink = DigestSink::default();
    loop {
        match dec.recv(&mut sink) {
            Ok(Message::Layout(l)) => sink.0 = Some(IncrementalDigest::new(&l)),
            Ok(Message::Commit) => {
                return Outcome::Guest(sink.0.as_ref().map(|d| d.digest()).unwrap())
            }
            Ok(Message::Abort(_)) => return Outcome::Aborted,
            Ok(_) => {}
            Err(e) => return Outcome::Refused(e),
        }
    }
}

fn refused(o: &Outcome) -> bool {
    matches!(o, Outcome::Refused(_) | Outcome::Aborted)
}

/// A deterministic sequence (splitmix64) for positions and bits.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Byte `at` of frame `i`'s payload is page data (not an entry word) in a Pages frame.
fn is_page_data(f: &Frame, at: usize) -> bool {
    let mut pos = 8;
    while pos < f.payload.len() {
        let word = u64::from_le_bytes(f.payload[pos..pos + 8].try_into().unwrap());
        if at < pos + 8 {
            return false;
        }
        pos += 8;
        if word & 1 == 0 {
            if at < pos + 4096 {
                return true;
            }
            pos += 4096;
        }
    }
    false
}

/// Truncation at every frame boundary and inside every frame's header and payload.
fn truncations(s: &Stream, bytes: &[u8]) -> usize {
    let offs = s.offsets();
    let lim = limits();
    let mut n = 0;
    for (k, &end) in offs.iter().enumerate() {
        let o = decode(&bytes[..end], lim);
        if k == offs.len() - 1 {
            assert!(matches!(o, Outcome::Guest(_)), "the whole stream: {o:?}");
        } else {
            assert!(
                matches!(o, Outcome::Refused(WireError::Closed { .. })),
                "cut after {k} frames: {o:?}"
            );
        }
        n += 1;
        if k + 1 < offs.len() {
            let next = offs[k + 1];
            for cut in [end + HEADER_LEN / 2, (end + HEADER_LEN + next) / 2] {
                if cut > end && cut < next {
                    let o = decode(&bytes[..cut], lim);
                    assert!(
                        matches!(o, Outcome::Refused(WireError::Truncated { .. })),
                        "cut inside frame {k} at {cut}: {o:?}"
                    );
                    n += 1;
                }
            }
        }
    }
    n
}

/// One bit flipped in every frame's header (CRC resealed) and one in every payload.
fn bit_flips(s: &Stream, bytes: &[u8], d0: &MemoryDigest, rng: &mut Rng) -> usize {
    let offs = s.offsets();
    let lim = limits();
    let final_pass = s
        .frames
        .iter()
        .rposition(|f| f.tag == tag::ITERATION)
        .unwrap();
    let mut n = 0;
    for (i, f) in s.frames.iter().enumerate() {
        let (start, end) = (offs[i], offs[i + 1]);
        let mut h: [u8; HEADER_LEN] = bytes[start..start + HEADER_LEN].try_into().unwrap();
        // Header: tag, flags, reserved, sequence or length (not the CRC, resealed below).
        let at = rng.below(12);
        h[at] ^= 1 << rng.below(8);
        seal(&mut h, &f.payload);
        let o = decode(
            bytes[..start]
                .chain(&h[..])
                .chain(&bytes[start + HEADER_LEN..]),
            lim,
        );
        let ok_abort = matches!(o, Outcome::Aborted);
        assert!(
            matches!(o, Outcome::Refused(_)) || ok_abort,
            "frame {i} (tag {:#x}) header byte {at} flipped: {o:?}",
            f.tag
        );
        n += 1;
        if f.payload.is_empty() {
            continue;
        }
        let at = rng.below(f.payload.len());
        let mut p = f.payload.clone();
        p[at] ^= 1 << rng.below(8);
        let h = header(f.tag, i as u32, &p);
        let o = decode(
            bytes[..start]
                .chain(&h[..])
                .chain(&p[..])
                .chain(&bytes[end..]),
            lim,
        );
        match f.tag {
            // Whatever the flip, the pass bookkeeping or the framing no longer adds up (the
            // Complete digest's values, from byte 16, are the destination's to check).
            tag::ITERATION => assert!(refused(&o), "frame {i} (iteration) byte {at}: {o:?}"),
            tag::COMPLETE if at < 16 => {
                assert!(refused(&o), "frame {i} tag {:#x} byte {at}: {o:?}", f.tag)
            }
            // Page data: the stream is still valid. In the final pass the memory then differs,
            // which the destination's Complete-digest check refuses (destination cases); an
            // earlier pass's copy of a page may be overwritten by a later one.
            tag::PAGES if is_page_data(f, at) => assert!(
                matches!(&o, Outcome::Guest(d) if i < final_pass || d != d0),
                "page data flipped in frame {i}: {o:?}"
            ),
            // Address words, Sync tokens, opaque state, Hello and Layout fields: the decoder
            // refuses, or the destination decides (unknown machine, slot mismatch, strict
            // state decoding); never a panic or a hang.
            _ => {}
        }
        n += 1;
    }
    n
}

/// Frames duplicated and neighbours swapped.
fn duplicates_and_swaps(s: &Stream, d0: &MemoryDigest) -> usize {
    let lim = limits();
    let mut n = 0;
    for i in 0..s.frames.len() {
        let t = s.frames[i].tag;
        // Every control frame, and the first page batch of each run of them.
        if t == tag::PAGES && i > 0 && s.frames[i - 1].tag == tag::PAGES {
            continue;
        }
        let dup = s.edit(|fr| fr.insert(i, fr[i].clone()));
        let o = decode(&dup.bytes()[..], lim);
        match t {
            // A barrier twice is harmless; a state blob twice is the destination's to refuse;
            // nothing after Commit is read.
            tag::SYNC | tag::STATE | tag::COMMIT => assert!(
                matches!(&o, Outcome::Guest(d) if d == d0),
                "duplicated {t:#x}: {o:?}"
            ),
            _ => assert!(refused(&o), "duplicated frame {i} ({t:#x}): {o:?}"),
        }
        n += 1;
        if i + 1 < s.frames.len() {
            let sw = s.edit(|fr| fr.swap(i, i + 1));
            let o = decode(&sw.bytes()[..], lim);
            // A swap is refused, or it was a valid reordering with the same memory.
            assert!(
                refused(&o) || matches!(&o, Outcome::Guest(d) if d == d0),
                "frames {i} and {} swapped: {o:?}",
                i + 1
            );
            n += 1;
        }
    }
    n
}

fn layout_payload(regions: &[(u32, u64, u64)], count: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&count.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for &(slot, gpa, size) in regions {
        p.extend_from_slice(&slot.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&gpa.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
    }
    p
}

fn many_regions(n: u32) -> Vec<(u32, u64, u64)> {
    (0..n).map(|i| (i, u64::from(i) * 0x2000, 0x1000)).collect()
}

/// Layouts and Hellos no destination may accept; lengths no decoder may allocate.
fn extremes(s: &Stream) -> usize {
    let lim = limits();
    let li = s.position(tag::LAYOUT);
    let with_layout = |p: Vec<u8>| decode(&s.edit(|fr| fr[li].payload = p).bytes()[..], lim);
    let too_large = |o: &Outcome| {
        matches!(
            o,
            Outcome::Refused(WireError::Layout(LayoutError::TooLarge { .. }))
        )
    };
    let o = with_layout(layout_payload(&[], 0));
    assert!(
        matches!(o, Outcome::Refused(WireError::Layout(LayoutError::Empty))),
        "{o:?}"
    );
    let o = with_layout(layout_payload(&[(0, 0, 1 << 40)], 1));
    assert!(too_large(&o), "1 TiB: {o:?}");
    let o = with_layout(layout_payload(&[(0, 0, 1 << 63)], 1));
    assert!(too_large(&o), "2^63: {o:?}");
    let o = with_layout(layout_payload(&[(0, 0, 1 << 62), (1, 1 << 62, 1 << 62)], 2));
    assert!(too_large(&o), "2 x 2^62: {o:?}");
    let o = with_layout(layout_payload(&[(0, u64::MAX - 0xfff, 0x2000)], 1));
    assert!(
        matches!(
            o,
            Outcome::Refused(WireError::Layout(LayoutError::Overflow { .. }))
        ),
        "wrapping: {o:?}"
    );
    // 512 small regions are a valid layout; the recorded passes then do not fit it.
    let o = with_layout(layout_payload(&many_regions(512), 512));
    assert!(
        matches!(
            o,
            Outcome::Refused(WireError::GpaOutsideLayout { .. } | WireError::Malformed { .. })
        ),
        "512: {o:?}"
    );
    let o = with_layout(layout_payload(&many_regions(513), 513));
    assert!(matches!(o, Outcome::Refused(_)), "513: {o:?}");
    let o = with_layout(layout_payload(&many_regions(3), 512));
    assert!(
        matches!(o, Outcome::Refused(WireError::Malformed { .. })),
        "count 512 of 3: {o:?}"
    );
    // vCPU counts 0 and 2^32-1 in the Hello.
    let hi = s.position(tag::HELLO);
    for vcpus in [0u32, u32::MAX] {
        let e = s.edit(|fr| fr[hi].payload[8..12].copy_from_slice(&vcpus.to_le_bytes()));
        let o = decode(&e.bytes()[..], lim);
        assert!(
            matches!(o, Outcome::Refused(WireError::Malformed { .. })),
            "{vcpus}: {o:?}"
        );
    }
    // Huge lengths on every kind of frame: refused before anything is read or allocated.
    let mut n = 11;
    let bytes = s.bytes();
    let offs = s.offsets();
    let mut seen = Vec::new();
    for (i, f) in s.frames.iter().enumerate() {
        if seen.contains(&f.tag) {
            continue;
        }
        seen.push(f.tag);
        for len in [u32::MAX, 1 << 31, 8 + 1024 * 4104 + 1] {
            let mut h: [u8; HEADER_LEN] = bytes[offs[i]..offs[i] + HEADER_LEN].try_into().unwrap();
            h[8..12].copy_from_slice(&len.to_le_bytes());
            seal(&mut h, &f.payload);
            let o = decode(
                bytes[..offs[i]]
                    .chain(&h[..])
                    .chain(&bytes[offs[i] + HEADER_LEN..]),
                lim,
            );
            assert!(
                matches!(o, Outcome::Refused(WireError::Oversize { .. })),
                "frame {i} ({:#x}) claiming {len} bytes: {o:?}",
                f.tag
            );
            n += 1;
        }
    }
    n
}

// ---------------------------------------------------------------------------------------
// The real destination

/// Replays `bytes` to a real destination; with `hold`, the connection stays open after the
/// bytes (a stalled source). Returns the destination's result and the acks it sent.
fn replay(
    bytes: Vec<u8>,
    hold: bool,
    opts: DestOptions,
) -> (Result<(Vm, IncomingSummary), MigrationError>, Vec<Ack>) {
    let (addr, dest) = spawn_dest(opts);
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&bytes);
        if !hold {
            let _ = s.shutdown(Shutdown::Write);
        }
        let mut acks = AckReader::new(s);
        let mut got = Vec::new();
        while let Ok(a) = acks.recv() {
            got.push(a);
        }
        got
    });
    let r = dest.join().unwrap();
    let r = match r {
        Ok((mut vm, sum)) => {
            // The guest runs; stop it so that the client sees the connection close.
            vm.vcpus().unwrap().check().unwrap();
            vm.stop().unwrap();
            Ok((vm, sum))
        }
        Err(e) => Err(e),
    };
    (r, client.join().unwrap())
}

fn ready_digest(acks: &[Ack]) -> Option<&MemoryDigest> {
    acks.iter().find_map(|a| match a {
        Ack::ReadyToResume { digest } => digest.as_ref(),
        _ => None,
    })
}

/// Expects a refusal: no guest, and the source told why.
fn expect_refused(what: &str, s: &Stream, check: impl Fn(&MigrationError) -> bool) {
    let (r, acks) = replay(s.bytes(), false, dest_opts());
    match r {
        Ok(_) => panic!("{what}: a guest started"),
        Err(e) => {
            assert!(check(&e), "{what}: refused for another reason: {e}");
            assert!(
                matches!(acks.last(), Some(Ack::Error(_))),
                "{what}: the source was not told: {acks:?}"
            );
            assert!(
                !acks.iter().any(|a| matches!(a, Ack::Resumed { .. })),
                "{what}: resumed"
            );
        }
    }
}

/// Expects a running guest whose memory digest is `d0`.
fn expect_guest(what: &str, s: &Stream, d0: &MemoryDigest) {
    let (r, acks) = replay(s.bytes(), false, dest_opts());
    assert!(r.is_ok(), "{what}: {:?}", r.err());
    assert_eq!(ready_digest(&acks), Some(d0), "{what}");
    assert!(
        matches!(acks.last(), Some(Ack::Resumed { .. })),
        "{what}: {acks:?}"
    );
}

fn state_error(e: &MigrationError) -> Option<&StateError> {
    match e {
        MigrationError::Vmm(VmmError::InvalidState(s)) => Some(s),
        _ => None,
    }
}

fn protocol(e: &MigrationError) -> bool {
    matches!(e, MigrationError::Protocol(_))
}

/// Cases the destination's VM decides, common to both machines.
fn destination_cases(s: &Stream, d0: &MemoryDigest, rng: &mut Rng) -> usize {
    expect_guest("the recorded stream with its digest", s, d0);
    // Valid reorderings: two page batches of one pass swapped; the state blobs reversed.
    let pages: Vec<usize> = (0..s.frames.len())
        .filter(|&i| s.frames[i].tag == tag::PAGES)
        .collect();
    let (a, b) = (pages[0], pages[1]);
    assert_eq!(
        s.frames[a + 1].tag,
        tag::PAGES,
        "two batches in the bulk pass"
    );
    expect_guest("page batches swapped", &s.edit(|fr| fr.swap(a, b)), d0);
    let st: Vec<usize> = (0..s.frames.len())
        .filter(|&i| s.frames[i].tag == tag::STATE)
        .collect();
    expect_guest(
        "state blobs reversed",
        &s.edit(|fr| fr[st[0]..=st[st.len() - 1]].reverse()),
        d0,
    );
    // Page data changed (CRC resealed): the Complete digest refuses it before any restore.
    // The last page data sent: no later copy of that page overwrites the change.
    let (p, data) = pages
        .iter()
        .rev()
        .find_map(|&p| {
            let f = &s.frames[p];
            (8..f.payload.len())
                .rev()
                .find(|&at| is_page_data(f, at))
                .map(|at| (p, at))
        })
        .unwrap();
    let flipped = s.edit(|fr| fr[p].payload[data] ^= 0x10);
    expect_refused("page data flipped under the digest", &flipped, |e| {
        matches!(e, MigrationError::Digest(_))
    });
    let ci = s.position(tag::COMPLETE);
    let wrong = s.edit(|fr| fr[ci].payload[16] ^= 1);
    expect_refused("a wrong digest in Complete", &wrong, |e| {
        matches!(e, MigrationError::Digest(_))
    });
    let mut n = 5;
    for (what, m, check) in &state_cases(s) {
        expect_refused(what, m, check);
        n += 1;
    }
    n + stalls_cuts_and_flips(s, d0, &pages, rng)
}

/// A mutated stream, and what its refusal must be.
type Case = (&'static str, Stream, fn(&MigrationError) -> bool);

/// State blobs and handshake fields only the destination's VM can judge.
fn state_cases(s: &Stream) -> Vec<Case> {
    vec![
        (
            "RIP 0xdeadbeef000",
            s.edit_state(1, 0, |v| {
                let rip = 0xdeadbeef000u64.to_le_bytes();
                for (k, b) in rip.iter().enumerate() {
                    v["regs"][128 + k] = (*b).into();
                }
            }),
            |e| {
                matches!(
                    state_error(e),
                    Some(StateError::Rip {
                        rip: 0xdeadbeef000,
                        fault: RipFault::NotMapped { .. }
                            | RipFault::OutsideRam { .. }
                            | RipFault::TooWide,
                        ..
                    })
                )
            },
        ),
        (
            "reserved CR4 bit 15",
            s.edit_state(1, 0, |v| {
                let b = v["sregs"][249].as_u64().unwrap() | 0x80;
                v["sregs"][249] = b.into();
            }),
            |e| {
                matches!(
                    state_error(e),
                    Some(StateError::ReservedBits {
                        register: "CR4",
                        ..
                    })
                )
            },
        ),
        (
            "truncated MSR list",
            s.edit_state(1, 1, |v| {
                v["msrs"].as_array_mut().unwrap().pop();
            }),
            |e| matches!(state_error(e), Some(StateError::MissingMsr { vcpu: 1, .. })),
        ),
        (
            "kvm_regs one byte short",
            s.edit_state(1, 0, |v| {
                v["regs"].as_array_mut().unwrap().pop();
            }),
            |e| {
                matches!(
                    state_error(e),
                    Some(StateError::Length {
                        what: "kvm_regs",
                        ..
                    })
                )
            },
        ),
        (
            "unknown field",
            s.edit_state(1, 0, |v| v["rogue"] = 1.into()),
            |e| matches!(state_error(e), Some(StateError::Decode { .. })),
        ),
        (
            "a vCPU state twice",
            s.edit(|fr| {
                let i = fr.iter().position(|f| f.tag == tag::STATE).unwrap();
                fr.insert(i, fr[i].clone());
            }),
            protocol,
        ),
        (
            "state for a vCPU that does not exist",
            s.edit(|fr| {
                let i = fr.iter().position(|f| f.tag == tag::STATE).unwrap();
                fr[i].payload[4..8].copy_from_slice(&7u32.to_le_bytes());
            }),
            protocol,
        ),
        (
            "state of an unknown kind",
            s.edit(|fr| {
                let i = fr.iter().position(|f| f.tag == tag::STATE).unwrap();
                fr[i].payload[..4].copy_from_slice(&3u32.to_le_bytes());
            }),
            protocol,
        ),
        (
            "a vCPU state missing",
            s.edit(|fr| {
                let i = fr.iter().position(|f| f.tag == tag::STATE).unwrap();
                fr.remove(i);
            }),
            protocol,
        ),
        (
            "unknown machine type",
            s.edit(|fr| fr[0].payload[12..16].copy_from_slice(&9u32.to_le_bytes())),
            protocol,
        ),
        (
            "512 regions",
            s.edit(|fr| fr[1].payload = layout_payload(&many_regions(512), 512)),
            |e| !matches!(e, MigrationError::Stalled { .. }),
        ),
    ]
}

/// A source that stops, a stream cut at frame boundaries, random bit flips.
fn stalls_cuts_and_flips(s: &Stream, d0: &MemoryDigest, pages: &[usize], rng: &mut Rng) -> usize {
    let a = pages[0];
    let mut n = 0;
    // A source that stops: in the handshake, in the middle of the bulk pass, and after
    // Complete (the destination restored the guest and waits for Commit).
    let complete = s.position(tag::COMPLETE) + 1;
    for (k, phase) in [(1, "handshake"), (a + 1, "progress"), (complete, "commit")] {
        let offs = s.offsets();
        let bytes = s.bytes()[..offs[k]].to_vec();
        let (r, _) = replay(
            bytes,
            true,
            DestOptions {
                handshake_timeout: Duration::from_millis(300),
                progress_timeout: Duration::from_millis(300),
                commit_timeout: Duration::from_millis(300),
                ..dest_opts()
            },
        );
        assert!(
            matches!(&r, Err(MigrationError::Stalled { phase: p, .. }) if *p == phase),
            "stalled after {k} frames: {:?}",
            r.err()
        );
        n += 1;
    }
    // Cut at a frame boundary past the handshake: refused when the connection closes.
    let offs = s.offsets();
    for k in [2, pages[pages.len() - 1], s.position(tag::COMPLETE) + 1] {
        let (r, _) = replay(s.bytes()[..offs[k]].to_vec(), false, dest_opts());
        assert!(
            matches!(r, Err(MigrationError::Wire(WireError::Closed { .. }))),
            "cut after {k} frames: {:?}",
            r.err()
        );
        n += 1;
    }
    // Random single-bit flips anywhere (CRC resealed): refused, or a guest whose memory is
    // exactly what the digest says.
    for _ in 0..6 {
        let i = rng.below(s.frames.len());
        if s.frames[i].payload.is_empty() {
            continue;
        }
        let at = rng.below(s.frames[i].payload.len());
        let bit = 1 << rng.below(8);
        let m = s.edit(|fr| fr[i].payload[at] ^= bit);
        let (r, acks) = replay(m.bytes(), false, dest_opts());
        if r.is_ok() {
            assert_eq!(ready_digest(&acks), Some(d0), "frame {i} byte {at} flipped");
        }
        n += 1;
    }
    n
}

/// Peak RSS (`VmHWM`) reset to the current RSS; returns the current RSS, KiB.
fn reset_peak_rss() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    status_kib("VmRSS")
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

fn corpus(name: &str, recorded: Vec<u8>, seed: u64) {
    let s = Stream::parse(&recorded);
    assert_eq!(
        s.bytes(),
        recorded,
        "re-framing reproduces the recorded bytes"
    );
    let Outcome::Guest(d0) = decode(&recorded[..], limits()) else {
        panic!("the recorded stream does not decode");
    };
    let s = s.with_digest(&d0);
    let bytes = s.bytes();
    let mut rng = Rng(seed);
    let base = reset_peak_rss();
    let mut n = truncations(&s, &bytes);
    n += bit_flips(&s, &bytes, &d0, &mut rng);
    n += duplicates_and_swaps(&s, &d0);
    n += extremes(&s);
    let decoder_peak = status_kib("VmHWM").saturating_sub(base);
    eprintln!(
        "{name}: {} frames, {} bytes; {n} decoder cases, peak RSS +{decoder_peak} KiB",
        s.frames.len(),
        bytes.len()
    );
    // The test holds up to three copies of the stream (a mutated Stream and its bytes); the
    // decoder adds one frame buffer (4 MiB at most) and the digest table where pages land:
    // nothing near the sizes the hostile frames announce (1 TiB, 2^63, 4 GiB lengths).
    let bound = 3 * bytes.len() as u64 / 1024 + (32 << 10);
    assert!(
        decoder_peak < bound,
        "decoder cases: peak RSS +{decoder_peak} KiB, bound {bound} KiB"
    );
    let base = reset_peak_rss();
    let m = destination_cases(&s, &d0, &mut rng);
    let dest_peak = status_kib("VmHWM").saturating_sub(base);
    eprintln!("{name}: {m} destination cases, peak RSS +{dest_peak} KiB");
    // Each case builds a VM (its RAM committed only where pages land) while the test's
    // threads hold copies of the stream (freed copies stay in their threads' malloc arenas).
    let bound = 8 * bytes.len() as u64 / 1024 + (128 << 10);
    assert!(
        dest_peak < bound,
        "destination cases: peak RSS +{dest_peak} KiB, bound {bound} KiB"
    );
}

#[test]
fn hostile_workload_streams_are_refused_or_yield_the_sources_memory() {
    if !have_kvm() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    corpus("workload", workload_stream(), 1);
}

#[test]
fn hostile_pvh_streams_are_refused_or_yield_the_sources_memory() {
    if !have_kvm() {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let recorded = pvh_stream();
    let s = Stream::parse(&recorded);
    // The PVH machine's own blob: a truncated PIT array and a missing blob are refused.
    let Outcome::Guest(d0) = decode(&recorded[..], limits()) else {
        panic!("the recorded stream does not decode");
    };
    let s = s.with_digest(&d0);
    expect_refused(
        "PIT one byte short",
        &s.edit_state(2, 0, |v| {
            v["pit"].as_array_mut().unwrap().pop();
        }),
        |e| matches!(state_error(e), Some(StateError::Length { what, .. }) if what.starts_with("PIT")),
    );
    expect_refused(
        "no machine state",
        &s.edit(|fr| {
            let i = fr
                .iter()
                .position(|f| f.tag == tag::STATE && f.payload[..4] == 2u32.to_le_bytes())
                .unwrap();
            fr.remove(i);
        }),
        protocol,
    );
    corpus("pvh", recorded, 2);
}
