//! The migration channel alone, without the engine: one thread writes `--gib` GiB in 1 MiB
//! writes over loopback TCP, another reads it, plain TCP and then TLS 1.3 (mutual x509 from
//! fresh `generate`d credentials), and the MiB/s of each is printed.
//!
//! `cargo run --release -p tls --example throughput -- [--gib N] [--runs N] [--handshakes N]
//! [--aead 1]`: `--handshakes` times N handshakes alone, `--aead 1` each TLS 1.3 AEAD's
//! sealing speed on one core.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tls::{generate, Channel, ClientTls, GenerateOptions, ServerTls};

const WRITE: usize = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Moves `total` bytes from a writer thread to this thread; returns MiB/s (first byte
/// written to last byte read) and the client's connect (and handshake) time in ms.
fn run(total: u64, tls: Option<(&ServerTls, &ClientTls)>) -> (f64, f64) {
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
        while sent < total {
            w.write_all(&chunk).expect("write");
            sent += WRITE as u64;
        }
        w.close_notify();
        (t, connect_ms)
    });
    let s = l.accept().expect("accept").0;
    s.set_nodelay(true).expect("nodelay");
    let ch = match tls {
        Some((srv, _)) => srv.accept(s, T).expect("TLS accept"),
        None => Channel::plain(s),
    };
    let (mut r, _w) = ch.split().expect("split");
    let mut buf = vec![0u8; WRITE];
    let mut got = 0u64;
    while got < total {
        let n = r.read(&mut buf).expect("read");
        assert!(n > 0, "stream ended after {got} of {total} bytes");
        got += n as u64;
    }
    let end = Instant::now();
    let (start, connect_ms) = writer.join().expect("writer");
    (
        total as f64 / (1u64 << 20) as f64 / (end - start).as_secs_f64(),
        connect_ms,
    )
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
    println!("| run | plain MiB/s | TLS MiB/s | TLS / plain | TCP connect ms | TLS connect + handshake ms |");
    println!("|---|---|---|---|---|---|");
    for i in 0..runs {
        let (p, pc) = run(total, None);
        let (t, tc) = run(total, Some((&server, &client)));
        println!(
            "| {} | {p:.0} | {t:.0} | {:.2} | {pc:.2} | {tc:.2} |",
            i + 1,
            t / p
        );
    }
    if arg("--aead", 0) > 0 {
        aead_speed();
    }
    let n = arg("--handshakes", 0);
    if n > 0 {
        let mut ms: Vec<f64> = (0..n).map(|_| run(0, Some((&server, &client))).1).collect();
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
