//! Real TCP on loopback between the two sides of the channel, with credentials written by
//! `generate`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tls::channel::WRITE_BATCH;
use tls::{generate, Channel, ClientTls, GenerateOptions, RecordError, ServerTls, TlsError};

const T: Duration = Duration::from_secs(10);

fn creds(tag: &str, client: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tls-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = GenerateOptions {
        client_name: client.into(),
        ..GenerateOptions::default()
    };
    generate(&dir, &opts).expect("generate credentials");
    dir
}

/// Accepts one connection on a thread and runs `f` on it; returns the client socket and
/// the thread.
fn serve<R: Send + 'static>(
    f: impl FnOnce(TcpStream) -> R + Send + 'static,
) -> (TcpStream, std::thread::JoinHandle<R>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || f(l.accept().unwrap().0));
    (TcpStream::connect(addr).unwrap(), h)
}

#[test]
fn mutual_tls_carries_a_large_stream_one_way_and_acks_the_other_from_another_thread() {
    let dir = creds("ok", "src-a");
    let server = ServerTls::load(&dir, &["src-a".into()]).unwrap();
    let client = ClientTls::load(&dir, &[], None).unwrap();
    let data: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i * 7 + i / 4099) as u8)
        .collect();
    let expect = data.clone();
    let (sock, h) = serve(move |s| {
        let ch = server.accept(s, T).unwrap();
        server.authorize(ch.peer()).unwrap();
        assert_eq!(ch.peer().unwrap().common_name.as_deref(), Some("src-a"));
        let (mut r, mut w) = ch.split().unwrap();
        let mut got = vec![0u8; expect.len()];
        r.read_exact(&mut got).unwrap();
        w.write_all(b"ack").unwrap();
        got == expect
    });
    let ch = client.connect(sock, "127.0.0.1", T).unwrap();
    assert!(ch.is_tls());
    assert_eq!(ch.peer().unwrap().common_name.as_deref(), Some("localhost"));
    let (mut r, mut w) = ch.split().unwrap();
    // The reader waits on its own thread while the writer sends.
    let reader = std::thread::spawn(move || {
        let mut ack = [0u8; 3];
        r.read_exact(&mut ack).map(|()| ack)
    });
    for chunk in data.chunks(1 << 20) {
        w.write_all(chunk).unwrap();
    }
    assert_eq!(&reader.join().unwrap().unwrap(), b"ack");
    assert!(
        h.join().unwrap(),
        "the destination read exactly what was sent"
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_by_the_server() {
    let dir = creds("ca1", "src");
    let other = creds("ca2", "src");
    let server = ServerTls::load(&dir, &[]).unwrap();
    // The rogue client trusts the right CA (it knows the server's) but its own
    // certificate comes from another CA.
    std::fs::copy(dir.join(tls::CA_CERT), other.join(tls::CA_CERT)).unwrap();
    let client = ClientTls::load(&other, &[], None).unwrap();
    let (sock, h) = serve(move |s| server.accept(s, T).map(|_| ()));
    let r = client.connect(sock, "localhost", T);
    let server_err = h.join().unwrap().unwrap_err();
    assert!(
        matches!(server_err, TlsError::Handshake(_)),
        "server: {server_err}"
    );
    // TLS 1.3: the client's handshake ends before the server has checked its certificate;
    // the refusal reaches it as an alert on its first read.
    if let Ok(ch) = r {
        let (mut rd, _w) = ch.split().unwrap();
        let mut b = [0u8; 1];
        assert!(rd.read(&mut b).is_err(), "the client sees the alert");
    }
}

#[test]
fn a_server_whose_name_does_not_match_is_refused_by_the_client() {
    let dir = creds("name", "src");
    let server = ServerTls::load(&dir, &[]).unwrap();
    let client = ClientTls::load(&dir, &[], Some("dest.example")).unwrap();
    let (sock, h) = serve(move |s| server.accept(s, T).map(|_| ()));
    let e = client.connect(sock, "127.0.0.1", T).unwrap_err();
    assert!(matches!(e, TlsError::Handshake(_)), "{e}");
    assert!(h.join().unwrap().is_err());
}

#[test]
fn authz_refuses_a_valid_certificate_with_another_name() {
    let dir = creds("authz", "src-b");
    let server = ServerTls::load(&dir, &["src-a".into()]).unwrap();
    let client = ClientTls::load(&dir, &[], None).unwrap();
    let (sock, h) = serve(move |s| {
        let ch = server.accept(s, T).unwrap();
        server.authorize(ch.peer())
    });
    let _ch = client.connect(sock, "127.0.0.1", T).unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(
        matches!(&e, TlsError::NotAuthorized { presented, .. } if presented[0] == "src-b"),
        "{e}"
    );
}

#[test]
fn a_plaintext_peer_fails_the_handshake_and_a_silent_one_times_out() {
    let dir = creds("plain", "src");
    let server = ServerTls::load(&dir, &[]).unwrap();
    let s2 = server.clone();
    let (mut sock, h) = serve(move |s| s2.accept(s, T).map(|_| ()));
    sock.write_all(b"RVMIG\0\0\0 hello in plain text").unwrap();
    let e = h.join().unwrap().unwrap_err();
    assert!(matches!(e, TlsError::Handshake(_)), "{e}");

    let (_silent, h) = serve(move |s| server.accept(s, Duration::from_millis(200)).map(|_| ()));
    let e = h.join().unwrap().unwrap_err();
    assert!(matches!(e, TlsError::HandshakeTimeout(_)), "{e}");
}

#[test]
fn read_before_honours_its_deadline_on_a_tls_channel() {
    let dir = creds("deadline", "src");
    let server = ServerTls::load(&dir, &[]).unwrap();
    let client = ClientTls::load(&dir, &[], None).unwrap();
    let (sock, h) = serve(move |s| {
        let (mut r, _w) = server.accept(s, T).unwrap().split().unwrap();
        let mut b = [0u8; 16];
        r.read_before(&mut b, Instant::now() + Duration::from_millis(200))
            .map_err(|e| e.kind())
    });
    let _ch = client.connect(sock, "127.0.0.1", T).unwrap();
    assert_eq!(h.join().unwrap(), Err(std::io::ErrorKind::TimedOut));
}

#[test]
fn plain_channels_pass_bytes_unchanged() {
    let (sock, h) = serve(|s| {
        let (mut r, _w) = Channel::plain(s).split().unwrap();
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    });
    let (_r, mut w) = Channel::plain(sock).split().unwrap();
    w.write_all(b"exact bytes").unwrap();
    drop(w);
    drop(_r);
    assert_eq!(h.join().unwrap(), b"exact bytes");
}

#[test]
fn generate_refuses_to_overwrite_without_force_and_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = creds("gen", "src");
    let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(tls::SERVER_KEY), 0o600);
    assert_eq!(mode(tls::CLIENT_KEY), 0o600);
    let e = generate(&dir, &GenerateOptions::default()).unwrap_err();
    assert!(matches!(e, TlsError::Exists { .. }), "{e}");
    let before = std::fs::read(dir.join(tls::CA_CERT)).unwrap();
    let opts = GenerateOptions {
        force: true,
        ..GenerateOptions::default()
    };
    generate(&dir, &opts).unwrap();
    assert_ne!(before, std::fs::read(dir.join(tls::CA_CERT)).unwrap());
}

/// A connected, handshaken TLS pair over loopback: (client channel, server channel).
fn tls_pair(tag: &str) -> (Channel, Channel) {
    let dir = creds(tag, "src");
    let server = ServerTls::load(&dir, &[]).unwrap();
    let client = ClientTls::load(&dir, &[], None).unwrap();
    let (sock, h) = serve(move |s| server.accept(s, T).unwrap());
    let c = client.connect(sock, "127.0.0.1", T).unwrap();
    (c, h.join().unwrap())
}

fn record_error(e: &std::io::Error) -> Option<&RecordError> {
    e.get_ref().and_then(|i| i.downcast_ref::<RecordError>())
}

#[test]
fn writes_of_every_size_arrive_whole_and_in_order_through_reads_of_every_size() {
    let (c, s) = tls_pair("sizes");
    let sizes = [
        0usize,
        1,
        2,
        100,
        16383,
        16384,
        16385,
        65536,
        WRITE_BATCH - 1,
        WRITE_BATCH,
        WRITE_BATCH + 1,
        (1 << 20) + 7,
    ];
    let total: usize = sizes.iter().sum();
    let data: Vec<u8> = (0..total).map(|i| (i * 13 + i / 251) as u8).collect();
    let expect = data.clone();
    let reader = std::thread::spawn(move || {
        let (mut r, _w) = s.split().unwrap();
        let mut got = Vec::with_capacity(total);
        // Read sizes that cut records at every kind of place.
        for (i, len) in [1usize, 7, 4096, 16384, 16385, 100_000, 1 << 20]
            .iter()
            .cycle()
            .enumerate()
        {
            let mut b = vec![0u8; *len];
            let n = r.read(&mut b).unwrap();
            if n == 0 {
                return (got, i);
            }
            got.extend_from_slice(&b[..n]);
        }
        unreachable!()
    });
    let (_r, mut w) = c.split().unwrap();
    let mut at = 0;
    for len in sizes {
        w.write_all(&data[at..at + len]).unwrap();
        at += len;
    }
    w.close_notify();
    let (got, _) = reader.join().unwrap();
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "the bytes read are the bytes written");
    // After close_notify the writer refuses to send.
    let e = w.write(b"late").unwrap_err();
    assert!(
        matches!(record_error(&e), Some(RecordError::Unusable(_))),
        "{e}"
    );
}

#[test]
fn close_notify_ends_the_stream_cleanly_and_a_bare_tcp_end_is_an_error() {
    let (c, s) = tls_pair("close");
    let (mut cr, mut cw) = c.split().unwrap();
    let (mut sr, mut sw) = s.split().unwrap();
    cw.write_all(b"last words").unwrap();
    cw.close_notify();
    let mut v = Vec::new();
    sr.read_to_end(&mut v).unwrap();
    assert_eq!(v, b"last words");
    assert_eq!(sr.read(&mut [0u8; 8]).unwrap(), 0, "the end stays the end");

    // The other direction ends with a TCP FIN and no close_notify: a truncation, not an end.
    sw.write_all(b"cut").unwrap();
    sw.socket().shutdown(std::net::Shutdown::Write).unwrap();
    let mut b = [0u8; 3];
    cr.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"cut");
    let e = cr.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(record_error(&e), Some(&RecordError::NoCloseNotify));
}

#[test]
fn read_before_returns_what_arrived_and_leaves_the_socket_read_timeout_alone() {
    let (c, s) = tls_pair("rb");
    let (_cr, mut cw) = c.split().unwrap();
    let (mut sr, _sw) = s.split().unwrap();
    sr.socket()
        .set_read_timeout(Some(Duration::from_secs(7)))
        .unwrap();
    cw.write_all(b"0123456789").unwrap();
    let mut b = [0u8; 64];
    let n = sr
        .read_before(&mut b, Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert_eq!(&b[..n], b"0123456789");
    let e = sr
        .read_before(&mut b, Instant::now() + Duration::from_millis(100))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert_eq!(
        sr.socket().read_timeout().unwrap(),
        Some(Duration::from_secs(7))
    );
    // A timeout is not a failure of the stream: the next record still arrives.
    cw.write_all(b"more").unwrap();
    let n = sr.read(&mut b).unwrap();
    assert_eq!(&b[..n], b"more");
}

/// What the relay does to the first record the source sends after the handshake.
#[derive(Clone, Copy)]
enum Tamper {
    FlipBodyBit,
    OuterType(u8),
    Length(u16),
    /// Forward half of it, then end the stream.
    Truncate,
    /// Drop it and forward the rest.
    Drop,
}

/// Runs a TLS connection through a relay that forwards whole records and alters the first
/// application record after the handshake; returns the destination's read error.
fn read_through_tampering_relay(tag: &str, tamper: Tamper) -> std::io::Error {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    let dir = creds(tag, "src");
    let server = ServerTls::load(&dir, &[]).unwrap();
    let client = ClientTls::load(&dir, &[], None).unwrap();
    let dl = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest_addr = dl.local_addr().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let dest = std::thread::spawn(move || {
        let ch = server.accept(dl.accept().unwrap().0, T).unwrap();
        ready_tx.send(()).unwrap();
        let (mut r, _w) = ch.split().unwrap();
        let mut got = vec![0u8; 100_000];
        r.read_exact(&mut got).unwrap_err()
    });
    let rl = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = rl.local_addr().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let armed2 = armed.clone();
    std::thread::spawn(move || {
        let mut src = rl.accept().unwrap().0;
        let mut dst = TcpStream::connect(dest_addr).unwrap();
        let (mut back_r, mut back_w) = (dst.try_clone().unwrap(), src.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back_r, &mut back_w));
        loop {
            let mut rec = vec![0u8; 5];
            if src.read_exact(&mut rec).is_err() {
                return;
            }
            let len = usize::from(u16::from_be_bytes([rec[3], rec[4]]));
            rec.resize(5 + len, 0);
            if src.read_exact(&mut rec[5..]).is_err() {
                return;
            }
            if armed2.swap(false, Ordering::SeqCst) {
                match tamper {
                    Tamper::FlipBodyBit => rec[5 + len / 2] ^= 0x10,
                    Tamper::OuterType(t) => rec[0] = t,
                    Tamper::Length(l) => rec[3..5].copy_from_slice(&l.to_be_bytes()),
                    Tamper::Truncate => {
                        let _ = dst.write_all(&rec[..rec.len() / 2]);
                        let _ = dst.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    Tamper::Drop => continue,
                }
            }
            if dst.write_all(&rec).is_err() {
                return;
            }
        }
    });
    let ch = client
        .connect(TcpStream::connect(relay_addr).unwrap(), "127.0.0.1", T)
        .unwrap();
    // The destination has finished its handshake: every handshake record went through.
    ready_rx.recv().unwrap();
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let (_r, mut w) = ch.split().unwrap();
    let _ = w.write_all(&[7u8; 100_000]);
    dest.join().unwrap()
}

#[test]
fn a_flipped_bit_on_the_wire_is_bad_record_mac_and_no_data() {
    let e = read_through_tampering_relay("flip", Tamper::FlipBodyBit);
    assert_eq!(
        record_error(&e),
        Some(&RecordError::BadRecordMac { seq: 0 })
    );
}

#[test]
fn a_dropped_record_breaks_the_sequence() {
    let e = read_through_tampering_relay("drop", Tamper::Drop);
    assert_eq!(
        record_error(&e),
        Some(&RecordError::BadRecordMac { seq: 0 })
    );
}

#[test]
fn a_wrong_record_type_or_an_oversized_length_is_refused_from_the_header() {
    let e = read_through_tampering_relay("type", Tamper::OuterType(22));
    assert_eq!(record_error(&e), Some(&RecordError::WrongOuterType(22)));
    let e = read_through_tampering_relay("len", Tamper::Length(0xffff));
    assert_eq!(record_error(&e), Some(&RecordError::Oversized(0xffff)));
}

#[test]
fn a_record_cut_off_by_the_end_of_the_stream_is_truncated() {
    let e = read_through_tampering_relay("trunc", Tamper::Truncate);
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(
        matches!(record_error(&e), Some(RecordError::Truncated(n)) if *n > 0),
        "{e}"
    );
}

/// Connects `client` to `server` and returns both channels' `aead_integrity()` (client,
/// server).
fn agreed(server: ServerTls, client: &ClientTls) -> (bool, bool) {
    let (sock, h) = serve(move |s| server.accept(s, T).unwrap().aead_integrity());
    let c = client.connect(sock, "127.0.0.1", T).unwrap();
    (c.aead_integrity(), h.join().unwrap())
}

#[test]
fn aead_integrity_holds_only_when_both_peers_offer_it_and_never_on_plain_tcp() {
    let dir = creds("alpn", "src");
    let server = ServerTls::load(&dir, &[]).unwrap();
    let client = ClientTls::load(&dir, &[], None).unwrap();
    assert_eq!(agreed(server.clone(), &client), (true, true));
    // A peer that predates the capability (it sends or answers no ALPN at all) on either
    // side: the handshake succeeds and both keep their checksums.
    assert_eq!(
        agreed(server.without_aead_integrity(), &client),
        (false, false)
    );
    assert_eq!(
        agreed(server.clone(), &client.without_aead_integrity()),
        (false, false)
    );
    let (sock, h) = serve(|s| Channel::plain(s).aead_integrity());
    assert!(!Channel::plain(sock).aead_integrity());
    assert!(!h.join().unwrap());
}

#[test]
fn the_reader_is_its_own_buffer_on_both_kinds_fill_buf_lends_and_consume_advances() {
    use std::io::BufRead;
    let plain = {
        let (sock, h) = serve(Channel::plain);
        (Channel::plain(sock), h.join().unwrap())
    };
    for (kind, (c, s)) in [("plain", plain), ("TLS", tls_pair("bufread"))] {
        let (_cr, mut cw) = c.split().unwrap();
        let (mut sr, _sw) = s.split().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        cw.write_all(&data).unwrap();
        // The end: close_notify on TLS, a FIN on plain TCP.
        cw.close_notify();
        cw.socket().shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        // A small read, then lent slices consumed in uneven steps, then the rest.
        let mut head = [0u8; 16];
        sr.read_exact(&mut head).unwrap();
        got.extend_from_slice(&head);
        for step in [1usize, 7, 4096, 30_000] {
            let buf = sr.fill_buf().unwrap();
            assert!(!buf.is_empty(), "{kind}: data pending");
            let n = step.min(buf.len());
            got.extend_from_slice(&buf[..n]);
            sr.consume(n);
        }
        sr.read_to_end(&mut got).unwrap();
        assert_eq!(got, data, "{kind}: every byte once, in order");
        assert!(sr.fill_buf().unwrap().is_empty(), "{kind}: the end");
    }
}

#[test]
fn read_before_on_plain_tcp_returns_buffered_bytes_and_leaves_the_socket_read_timeout_alone() {
    let (sock, h) = serve(Channel::plain);
    let c = Channel::plain(sock);
    let s = h.join().unwrap();
    let (_cr, mut cw) = c.split().unwrap();
    let (mut sr, _sw) = s.split().unwrap();
    sr.socket()
        .set_read_timeout(Some(Duration::from_secs(7)))
        .unwrap();
    cw.write_all(b"0123456789").unwrap();
    let mut b = [0u8; 4];
    sr.read_before(&mut b, Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert_eq!(&b, b"0123");
    // One write of 10 bytes on loopback is one segment, read whole into the buffer: the
    // rest is served from there, even with a deadline that has already passed.
    let mut rest = [0u8; 6];
    let n = sr.read_before(&mut rest, Instant::now()).unwrap();
    assert_eq!(&rest[..n], b"456789");
    let e = sr
        .read_before(&mut b, Instant::now() + Duration::from_millis(100))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert_eq!(
        sr.socket().read_timeout().unwrap(),
        Some(Duration::from_secs(7))
    );
}
