//! The migration channel alone, without the engine: one thread writes `--gib` GiB in 1 MiB
//! writes over loopback TCP, another reads it, plain TCP and then TLS 1.3 (mutual x509 from
//! fresh `generate`d credentials), and the MiB/s of each is printed, with each thread's CPU
//! time per MiB (the scheduler's run time, `/proc/thread-self/schedstat`).
//!
//! The reader reads either 1 MiB at a time, or as the migration's frame decoder does: a
//! 16-byte header, then the rest of a 1 MiB frame, through a 1 MiB `BufReader` (the
//! destination's layering before the channel reader was its own buffer) or straight from
//! the channel reader (after).
//!
//! `cargo run --release -p tls --example throughput -- [--gib N] [--runs N] [--handshakes N]
//! [--aead 1]`: `--handshakes` times N handshakes alone, `--aead 1` each TLS 1.3 AEAD's
//! sealing speed on one core.

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tls::{generate, Channel, ClientTls, GenerateOptions, ServerTls};

const WRITE: usize = 1 << 20;
const T: Duration = Duration::from_secs(30);
/// A frame header of the migration stream.
const HEADER: usize = 16;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The calling thread's CPU time so far, s.
fn thread_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

/// How the reader reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reads {
    /// 1 MiB reads on the channel reader.
    Whole,
    /// Header, then payload, through a 1 MiB `BufReader`.
    FramedBufReader,
    /// Header, then payload, straight from the channel reader.
    FramedDirect,
}

/// What one transfer measured.
struct Measured {
    mib_s: f64,
    connect_ms: f64,
    reader_ms_per_mib: f64,
    writer_ms_per_mib: f64,
}

fn read_all(r: &mut impl Read, total: u64, reads: Reads) {
    let mut buf = vec![0u8; WRITE];
    let mut got = 0u64;
    while got < total {
        if reads == Reads::Whole {
            let n = r.read(&mut buf).expect("read");
            assert!(n > 0, "stream ended after {got} of {total} bytes");
            got += n as u64;
        } else {
            r.read_exact(&mut buf[..HEADER]).expect("header");
            r.read_exact(&mut buf[HEADER..]).expect("payload");
            got += WRITE as u64;
        }
    }
}

/// Moves `total` bytes from a writer thread to this thread; MiB/s (first byte written to
/// last byte read), the client's connect (and handshake) time, and each side's CPU.
fn run(total: u64, tls: Option<(&ServerTls, &ClientTls)>, reads: Reads) -> Measured {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let client = tls.map(|(_, c)| c.clone());
    let writer = std::thread::spawn(move || {
        let t0 = Instant::now();
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        let ch = match &client {
            Some(c) => c.connect(s, "127.0.0.1", T).expect("TLS connect"),
            None => Channel::plain(s),
        };
        let connect_ms = t0.elapsed().as_secs_f64() * 1e3;
        let (_r, mut w) = ch.split().expect("split");
        let chunk: Vec<u8> = (0..WRITE).map(|i| (i * 31 + i / 4096) as u8).collect();
        let mut sent = 0u64;
        let t = Instant::now();
        let cpu0 = thread_cpu_s();
        while sent < total {
            w.write_all(&chunk).expect("write");
            sent += WRITE as u64;
        }
        w.close_notify();
        (t, connect_ms, thread_cpu_s() - cpu0)
    });
    let s = l.accept().expect("accept").0;
    s.set_nodelay(true).expect("nodelay");
    let ch = match tls {
        Some((srv, _)) => srv.accept(s, T).expect("TLS accept"),
        None => Channel::plain(s),
    };
    let (r, _w) = ch.split().expect("split");
    let cpu0 = thread_cpu_s();
    match reads {
        Reads::FramedBufReader => read_all(&mut BufReader::with_capacity(WRITE, r), total, reads),
        _ => read_all(&mut { r }, total, reads),
    }
    let end = Instant::now();
    let reader_cpu = thread_cpu_s() - cpu0;
    let (start, connect_ms, writer_cpu) = writer.join().expect("writer");
    let mib = (total as f64 / (1u64 << 20) as f64).max(1e-9);
    Measured {
        mib_s: mib / (end - start).as_secs_f64(),
        connect_ms,
        reader_ms_per_mib: reader_cpu * 1e3 / mib,
        writer_ms_per_mib: writer_cpu * 1e3 / mib,
    }
}

fn main() {
    let total = arg("--gib", 2) << 30;
    let runs = arg("--runs", 3);
    let dir = std::env::temp_dir().join(format!("tls-throughput-{}", std::process::id()));
    let opts = GenerateOptions {
        force: true,
        ..GenerateOptions::default()
    };
    generate(&dir, &opts).expect("generate credentials");
    let server = ServerTls::load(&dir, &[]).expect("server credentials");
    let client = ClientTls::load(&dir, &[], None).expect("client credentials");
    println!(
        "channel throughput, {} GiB in {} KiB writes over loopback",
        total >> 30,
        WRITE >> 10
    );
    println!("| run | channel | reads | MiB/s | reader CPU ms/MiB | writer CPU ms/MiB | connect (+ handshake) ms |");
    println!("|---|---|---|---|---|---|---|");
    for i in 0..runs {
        for reads in [Reads::Whole, Reads::FramedBufReader, Reads::FramedDirect] {
            for tls in [None, Some((&server, &client))] {
                let m = run(total, tls, reads);
                println!(
                    "| {} | {} | {:?} | {:.0} | {:.3} | {:.3} | {:.2} |",
                    i + 1,
                    if tls.is_some() { "TLS" } else { "plain" },
                    reads,
                    m.mib_s,
                    m.reader_ms_per_mib,
                    m.writer_ms_per_mib,
                    m.connect_ms
                );
            }
        }
    }
    if arg("--aead", 0) > 0 {
        aead_speed();
    }
    let n = arg("--handshakes", 0);
    if n > 0 {
        let mut ms: Vec<f64> = (0..n)
            .map(|_| run(0, Some((&server, &client)), Reads::Whole).connect_ms)
            .collect();
        ms.sort_by(f64::total_cmp);
        println!(
            "{n} TLS handshakes: median {:.2} ms, min {:.2} ms",
            ms[ms.len() / 2],
            ms[0]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seals 256 MiB in 16 KiB records with each TLS 1.3 AEAD (one core, in place), GB/s.
fn aead_speed() {
    use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
    let algs = [
        ("AES-128-GCM", &aead::AES_128_GCM),
        ("AES-256-GCM", &aead::AES_256_GCM),
        ("ChaCha20-Poly1305", &aead::CHACHA20_POLY1305),
    ];
    let mut rec = vec![0x5au8; 1 << 14];
    for (name, alg) in algs {
        let key = vec![7u8; alg.key_len()];
        let key = LessSafeKey::new(UnboundKey::new(alg, &key).expect("key"));
        let n = 1u64 << 14;
        let t = Instant::now();
        for i in 0..n {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&i.to_be_bytes());
            let nonce = Nonce::assume_unique_for_key(nonce);
            let tag = key
                .seal_in_place_separate_tag(nonce, Aad::from(&[23u8, 3, 3, 64, 17]), &mut rec)
                .expect("seal");
            let _ = std::hint::black_box(tag);
        }
        let gbs = (n << 14) as f64 / 1e9 / t.elapsed().as_secs_f64();
        println!("{name}: {gbs:.2} GB/s sealing 16 KiB records");
    }
}
