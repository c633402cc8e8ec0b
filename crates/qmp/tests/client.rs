//! The blocking client against the real server and against scripted, misbehaving servers.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{handler, TestDir};
use qmp::{ClientConfig, ClientError, ErrorClass, QmpClient, QmpServer, ServerConfig};
use serde_json::json;

const GREETING: &[u8] =
    b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 9}, \"package\": \"\"}, \"capabilities\": []}}\r\n";

/// A scripted server for one connection: `script` gets the accepted stream and a line
/// reader over it.
fn fake_server(
    path: &Path,
    script: impl FnOnce(UnixStream, &mut dyn FnMut() -> String) + Send + 'static,
) -> JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut next_line = move || {
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            line
        };
        script(stream, &mut next_line);
    })
}

/// Reads the client's request and returns its `id`.
fn request_id(line: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(line).unwrap()["id"].clone()
}

fn short() -> ClientConfig {
    ClientConfig {
        timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    }
}

#[test]
fn client_negotiates_executes_and_maps_errors() {
    let dir = TestDir::new("cl-basic");
    let _s = QmpServer::bind(dir.sock(), handler(), ServerConfig::default()).unwrap();
    let mut c = QmpClient::connect(dir.sock(), Duration::from_secs(10)).unwrap();
    assert!(c.greeting()["QMP"]["version"]["qemu"].is_object());
    assert_eq!(
        c.execute("echo", json!({"a": [1, 2]})).unwrap(),
        json!({"a": [1, 2]})
    );
    assert_eq!(
        c.execute("echo", serde_json::Value::Null).unwrap(),
        json!({})
    );
    match c.execute("nope", json!({})) {
        Err(ClientError::Command(e)) => {
            assert_eq!(e.class, ErrorClass::CommandNotFound);
            assert_eq!(e.desc, "The command nope has not been found");
        }
        other => panic!("{other:?}"),
    }
    match c.execute("fail", json!({})) {
        Err(ClientError::Command(e)) => assert_eq!(e.class, ErrorClass::DeviceNotFound),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.execute("echo", json!([1])),
        Err(ClientError::ArgumentsNotObject)
    ));
    // Still usable after errors.
    assert_eq!(c.execute("echo", json!({"b": 1})).unwrap(), json!({"b": 1}));
}

#[test]
fn events_arriving_before_a_reply_are_kept_for_next_event() {
    let dir = TestDir::new("cl-events");
    let s = QmpServer::bind(dir.sock(), handler(), ServerConfig::default()).unwrap();
    let mut c = QmpClient::connect(dir.sock(), Duration::from_secs(10)).unwrap();
    // The `emit` command's event is written before its reply.
    assert_eq!(
        c.execute("emit", json!({"n": 1})).unwrap(),
        json!({"clients": 1})
    );
    let ev = c.next_event(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(ev.name, "TEST_EVENT");
    assert_eq!(serde_json::Value::Object(ev.data), json!({"n": 1}));
    assert!(ev.timestamp.seconds > 0);
    // An event emitted outside any command arrives through next_event too.
    s.events().emit("STOP", None);
    let ev = c.next_event(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(ev.name, "STOP");
    assert!(ev.data.is_empty());
    assert_eq!(c.next_event(Duration::from_millis(50)).unwrap(), None);
}

#[test]
fn queued_events_are_bounded_and_the_oldest_dropped() {
    let dir = TestDir::new("cl-evbound");
    let path = dir.sock();
    let server = fake_server(&path, |mut s, next| {
        s.write_all(GREETING).unwrap();
        let id = request_id(&next());
        s.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\r\n").as_bytes())
            .unwrap();
        let id = request_id(&next());
        for n in 0..5 {
            let ev = format!("{{\"event\": \"E\", \"data\": {{\"n\": {n}}}, \"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}}}");
            s.write_all(ev.as_bytes()).unwrap();
        }
        s.write_all(format!("{{\"return\": 5, \"id\": {id}}}\r\n").as_bytes())
            .unwrap();
    });
    let config = ClientConfig {
        max_queued_events: 3,
        ..ClientConfig::default()
    };
    let mut c = QmpClient::connect_with(&path, config).unwrap();
    assert_eq!(c.execute("x", json!({})).unwrap(), json!(5));
    assert_eq!(c.dropped_events(), 2);
    for n in 2..5 {
        let ev = c.next_event(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(ev.data["n"], json!(n));
    }
    server.join().unwrap();
}

#[test]
fn replies_with_another_id_are_skipped() {
    let dir = TestDir::new("cl-ids");
    let path = dir.sock();
    let server = fake_server(&path, |mut s, next| {
        s.write_all(GREETING).unwrap();
        let id = request_id(&next());
        s.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}").as_bytes())
            .unwrap();
        let id = request_id(&next());
        // A stale reply (to a command that timed out) comes first.
        s.write_all(b"{\"return\": \"stale\", \"id\": 999}\r\n")
            .unwrap();
        s.write_all(format!("{{\"return\": \"mine\", \"id\": {id}}}\r\n").as_bytes())
            .unwrap();
    });
    let mut c = QmpClient::connect(&path, Duration::from_secs(10)).unwrap();
    assert_eq!(c.execute("x", json!({})).unwrap(), json!("mine"));
    server.join().unwrap();
}

#[test]
fn an_error_without_id_is_the_server_rejecting_the_input() {
    let dir = TestDir::new("cl-rejected");
    let path = dir.sock();
    let server = fake_server(&path, |mut s, next| {
        s.write_all(GREETING).unwrap();
        let _ = next();
        s.write_all(
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, x\"}}\r\n",
        )
        .unwrap();
    });
    match QmpClient::connect(&path, Duration::from_secs(10)) {
        Err(ClientError::Rejected(e)) => assert_eq!(e.desc, "JSON parse error, x"),
        other => panic!("{other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn a_server_that_never_greets_times_out() {
    let dir = TestDir::new("cl-silent");
    let path = dir.sock();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = fake_server(&path, move |_s, _next| {
        // Hold the connection open, silent, until the client gave up.
        let _ = rx.recv();
    });
    assert!(matches!(
        QmpClient::connect_with(&path, short()),
        Err(ClientError::Timeout(_))
    ));
    tx.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn a_server_that_never_answers_a_command_times_out() {
    let dir = TestDir::new("cl-noreply");
    let path = dir.sock();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = fake_server(&path, move |mut s, next| {
        s.write_all(GREETING).unwrap();
        let id = request_id(&next());
        s.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}").as_bytes())
            .unwrap();
        let _ = rx.recv();
    });
    let mut c = QmpClient::connect_with(&path, short()).unwrap();
    assert!(matches!(
        c.execute("x", json!({})),
        Err(ClientError::Timeout(_))
    ));
    tx.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn an_endless_message_from_the_server_is_refused_at_the_bound() {
    let dir = TestDir::new("cl-huge");
    let path = dir.sock();
    let server = fake_server(&path, |mut s, _next| {
        s.write_all(b"{\"QMP\": \"").unwrap();
        let chunk = vec![b'a'; 4096];
        // Until the client hangs up.
        while s.write_all(&chunk).is_ok() {}
    });
    let config = ClientConfig {
        max_message_bytes: 64 * 1024,
        ..ClientConfig::default()
    };
    assert!(matches!(
        QmpClient::connect_with(&path, config),
        Err(ClientError::TooLarge(65536))
    ));
    server.join().unwrap();
}

#[test]
fn a_bad_greeting_or_a_closed_connection_is_a_typed_error() {
    let dir = TestDir::new("cl-badgreet");
    let path = dir.sock();
    let server = fake_server(&path, |mut s, _next| {
        s.write_all(b"{\"hello\": 1}\r\n").unwrap();
    });
    assert!(matches!(
        QmpClient::connect(&path, Duration::from_secs(10)),
        Err(ClientError::Protocol(_))
    ));
    server.join().unwrap();
    std::fs::remove_file(&path).unwrap();

    let server = fake_server(&path, |s, _next| drop(s));
    assert!(matches!(
        QmpClient::connect(&path, Duration::from_secs(10)),
        Err(ClientError::Closed)
    ));
    server.join().unwrap();
    std::fs::remove_file(&path).unwrap();

    assert!(matches!(
        QmpClient::connect(&path, Duration::from_secs(1)),
        Err(ClientError::Connect { .. })
    ));
}
