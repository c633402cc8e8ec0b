//! Real TCP on loopback between the two sides of the channel, with credentials written by
//! `generate`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tls::{generate, Channel, ClientTls, GenerateOptions, ServerTls, TlsError};

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
