//! The QMP server against raw sockets: protocol rules, QEMU's error texts and the bounds
//! that protect it from hostile clients.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{error_of, eventually, handler, Raw, TestDir};
use qmp::{QmpError, QmpServer, ServerConfig};
use serde_json::{json, Value};

fn server(dir: &TestDir, config: ServerConfig) -> (QmpServer, Arc<common::TestHandler>) {
    let h = handler();
    let s = QmpServer::bind(dir.sock(), h.clone(), config).unwrap();
    (s, h)
}

#[test]
fn greeting_has_qemus_shape_and_no_capabilities() {
    let dir = TestDir::new("greet");
    let config = ServerConfig {
        version: qmp::QemuVersion {
            major: 9,
            minor: 2,
            micro: 3,
        },
        package: "rv-test".into(),
        ..ServerConfig::default()
    };
    let (_s, _h) = server(&dir, config);
    let mut c = Raw::connect(&dir.sock());
    assert_eq!(
        c.recv(),
        json!({"QMP": {"version": {"qemu": {"micro": 3, "minor": 2, "major": 9}, "package": "rv-test"}, "capabilities": []}})
    );
}

#[test]
fn commands_before_negotiation_get_command_not_found_and_negotiation_happens_once() {
    let dir = TestDir::new("nego");
    let (_s, _h) = server(&dir, ServerConfig::default());
    let mut c = Raw::greeted(&dir.sock());
    let r = c.call(json!({"execute": "echo", "id": 1}));
    assert_eq!(
        error_of(&r),
        (
            "CommandNotFound".into(),
            "Expecting capabilities negotiation with 'qmp_capabilities'".into()
        )
    );
    assert_eq!(r["id"], json!(1));
    // query-commands is the server's own, but not before negotiation either.
    let r = c.call(json!({"execute": "query-commands"}));
    assert_eq!(error_of(&r).0, "CommandNotFound");
    // Malformed input is still a GenericError before negotiation.
    let r = c.call(json!({"execute": "echo", "bogus": 1}));
    assert_eq!(
        error_of(&r),
        (
            "GenericError".into(),
            "QMP input member 'bogus' is unexpected".into()
        )
    );
    let r = c.call(json!({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}));
    assert_eq!(r, json!({"return": {}, "id": "n"}));
    let r = c.call(json!({"execute": "qmp_capabilities"}));
    assert_eq!(
        error_of(&r),
        (
            "CommandNotFound".into(),
            "Capabilities negotiation is already complete, command ignored".into()
        )
    );
    assert_eq!(
        c.call(json!({"execute": "echo", "arguments": {"a": 1}})),
        json!({"return": {"a": 1}})
    );
}

#[test]
fn capabilities_not_offered_cannot_be_enabled() {
    let dir = TestDir::new("oob");
    let (_s, _h) = server(&dir, ServerConfig::default());
    let mut c = Raw::greeted(&dir.sock());
    let r = c.call(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}));
    assert_eq!(
        error_of(&r),
        ("GenericError".into(), "Capability oob not available".into())
    );
    let r = c.call(json!({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}));
    assert_eq!(
        error_of(&r).1,
        "Invalid parameter type for 'enable', expected: array"
    );
    let r = c.call(json!({"execute": "qmp_capabilities", "arguments": {"x": 1}}));
    assert_eq!(error_of(&r).1, "Parameter 'x' is unexpected");
    // Failed attempts do not negotiate; a correct one still works.
    let r = c.call(json!({"execute": "echo"}));
    assert_eq!(error_of(&r).0, "CommandNotFound");
    assert_eq!(
        c.call(json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );
}

#[test]
fn id_is_echoed_verbatim_in_returns_and_errors() {
    let dir = TestDir::new("id");
    let (_s, _h) = server(&dir, ServerConfig::default());
    let mut c = Raw::negotiated(&dir.sock());
    for id in [
        json!(7),
        json!("abc"),
        json!({"nested": [1, {"x": null}]}),
        json!(null),
        json!(-1.5),
    ] {
        let r = c.call(json!({"execute": "echo", "id": id.clone()}));
        assert_eq!(r, json!({"return": {}, "id": id}));
        let r = c.call(json!({"execute": "nope", "id": id.clone()}));
        assert_eq!(r["id"], id);
        assert_eq!(
            error_of(&r),
            (
                "CommandNotFound".into(),
                "The command nope has not been found".into()
            )
        );
        // Validation errors keep the id too.
        let r = c.call(json!({"execute": "echo", "arguments": 1, "id": id.clone()}));
        assert_eq!(r["id"], id);
    }
    // A reply to a request without id has no id member.
    let r = c.call(json!({"execute": "echo"}));
    assert!(r.get("id").is_none());
}

#[test]
fn malformed_inputs_get_generic_errors_and_the_connection_stays_usable() {
    let dir = TestDir::new("malformed");
    let (_s, _h) = server(&dir, ServerConfig::default());
    let mut c = Raw::negotiated(&dir.sock());
    let cases: &[(&str, &str)] = &[
        (r#"{"execute": "echo", }"#, "JSON parse error, "),
        (r#"{"execute" "echo"}"#, "JSON parse error, "),
        ("}", "JSON parse error, "),
        ("nonsense", "JSON parse error, "),
        (
            r#"{"execute": "a", "execute": "b"}"#,
            "JSON parse error, duplicate key 'execute'",
        ),
        ("[1, 2]", "QMP input must be a JSON object"),
        ("42", "QMP input must be a JSON object"),
        (r#""str{""#, "QMP input must be a JSON object"),
        (r#"{"arguments": {}}"#, "QMP input lacks member 'execute'"),
        (
            r#"{"execute": "echo", "xyz": 1}"#,
            "QMP input member 'xyz' is unexpected",
        ),
        (
            r#"{"execute": "echo", "arguments": [1]}"#,
            "QMP input member 'arguments' must be an object",
        ),
        (
            r#"{"execute": ["echo"]}"#,
            "QMP input member 'execute' must be a string",
        ),
        (
            r#"{"exec-oob": "echo"}"#,
            "QMP input member 'exec-oob' is unexpected",
        ),
    ];
    for (input, want) in cases {
        c.send(input.as_bytes());
        c.send(b"\n");
        let r = c.recv();
        let (class, desc) = error_of(&r);
        assert_eq!(class, "GenericError", "input {input}");
        assert!(
            desc.starts_with(want),
            "input {input}: got {desc:?}, want {want:?}"
        );
        assert_eq!(
            c.call(json!({"execute": "echo", "arguments": {"ok": true}})),
            json!({"return": {"ok": true}}),
            "connection unusable after {input}"
        );
    }
    // Invalid UTF-8 inside a string is a parse error, not a panic.
    c.send(b"{\"execute\": \"\xff\xfe\"}");
    assert!(error_of(&c.recv()).1.starts_with("JSON parse error, "));
    assert_eq!(c.call(json!({"execute": "echo"})), json!({"return": {}}));
}

#[test]
fn handler_argument_helpers_give_qemus_texts() {
    let dir = TestDir::new("args");
    let (_s, _h) = server(&dir, ServerConfig::default());
    let mut c = Raw::negotiated(&dir.sock());
    let cases = [
        (json!({}), "Parameter 'uri' is missing"),
        (
            json!({"uri": 5}),
            "Invalid parameter type for 'uri', expected: string",
        ),
        (
            json!({"uri": "u", "cpu-index": "0"}),
            "Invalid parameter type for 'cpu-index', expected: integer",
        ),
        (
            json!({"uri": "u", "size": -1}),
            "Parameter 'size' expects uint64",
        ),
        (
            json!({"uri": "u", "detach": "yes"}),
            "Invalid parameter type for 'detach', expected: boolean",
        ),
        (
            json!({"uri": "u", "foo": 1}),
            "Parameter 'foo' is unexpected",
        ),
    ];
    for (args, want) in cases {
        let r = c.call(json!({"execute": "typed", "arguments": args}));
        assert_eq!(error_of(&r), ("GenericError".into(), want.into()));
    }
    let r = c.call(json!({"execute": "typed", "arguments": {"uri": "tcp:x", "cpu-index": 1, "size": 8, "detach": true}}));
    assert_eq!(
        r,
        json!({"return": {"uri": "tcp:x", "cpu-index": 1, "size": 8, "detach": true}})
    );
    let r = c.call(json!({"execute": "fail"}));
    assert_eq!(
        error_of(&r),
        ("DeviceNotFound".into(), "Device 'x' not found".into())
    );
}

#[test]
fn query_commands_lists_the_servers_and_the_handlers_commands() {
    let dir = TestDir::new("qc");
    let (_s, _h) = server(&dir, ServerConfig::default());
    let mut c = Raw::negotiated(&dir.sock());
    let r = c.call(json!({"execute": "query-commands"}));
    let names: Vec<&str> = r["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "qmp_capabilities",
            "query-commands",
            "echo",
            "block",
            "emit",
            "typed",
            "fail",
            "panic"
        ]
    );
    let r = c.call(json!({"execute": "query-commands", "arguments": {"x": 1}}));
    assert_eq!(error_of(&r).1, "Parameter 'x' is unexpected");
}

#[test]
fn several_objects_in_one_write_and_one_object_over_many_writes() {
    let dir = TestDir::new("framing");
    let (_s, _h) = server(&dir, ServerConfig::default());
    let mut c = Raw::negotiated(&dir.sock());
    c.send(br#"{"execute":"echo","id":1}{"execute":"echo","id":2} {"execute":"echo","id":3}"#);
    for id in 1..=3 {
        assert_eq!(c.recv(), json!({"return": {}, "id": id}));
    }
    let msg = br#"{"execute": "echo", "arguments": {"s": "}{\"\\"}, "id": 4}"#;
    for piece in msg.chunks(3) {
        c.send(piece);
        c.stream.flush().unwrap();
        // Separate reads on the server side are likely, not required: either way one
        // reply must come.
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.recv(), json!({"return": {"s": "}{\"\\"}, "id": 4}));
}

#[test]
fn a_message_over_the_size_limit_gets_an_error_and_a_disconnect() {
    let dir = TestDir::new("size");
    let (s, _h) = server(&dir, ServerConfig::default());
    let mut big = Raw::negotiated(&dir.sock());
    let mut other = Raw::negotiated(&dir.sock());
    // 1 MiB + a bit, inside one string so it is one unfinished message.
    let mut msg = br#"{"execute": "echo", "arguments": {"s": ""#.to_vec();
    msg.resize(msg.len() + (1 << 20) + 16, b'a');
    // The server may close before reading everything; a failed write is fine.
    let _ = big.stream.write_all(&msg);
    let rest = big.drains_to_eof();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(
        error_of(&rest[0]),
        (
            "GenericError".into(),
            "QMP input exceeds the limit of 1048576 bytes; closing the connection".into()
        )
    );
    assert_eq!(
        other.call(json!({"execute": "echo"})),
        json!({"return": {}})
    );
    eventually("the big client is removed", || s.client_count() == 1);
}

#[test]
fn a_message_exactly_at_the_size_limit_is_accepted() {
    let dir = TestDir::new("size-ok");
    let config = ServerConfig {
        max_message_bytes: 4096,
        ..ServerConfig::default()
    };
    let (_s, _h) = server(&dir, config);
    let mut c = Raw::negotiated(&dir.sock());
    let head = r#"{"execute": "echo", "arguments": {"s": ""#;
    let tail = r#""}}"#;
    let fill = "b".repeat(4096 - head.len() - tail.len());
    let r = c.call(serde_json::from_str::<Value>(&format!("{head}{fill}{tail}")).unwrap());
    assert_eq!(r["return"]["s"].as_str().map(str::len), Some(fill.len()));
}

#[test]
fn a_stalled_half_message_disconnects_only_its_client() {
    let dir = TestDir::new("stall");
    let config = ServerConfig {
        partial_message_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    };
    let (s, _h) = server(&dir, config);
    let mut staller = Raw::negotiated(&dir.sock());
    let mut other = Raw::negotiated(&dir.sock());
    staller.send(br#"{"execute": "echo", "argu"#);
    // While the staller's deadline runs (and after), the other client is served: at least
    // once whatever the timing (on a busy host the deadline may pass before the first call),
    // then until the staller is dropped.
    let mut served = 0;
    loop {
        assert_eq!(
            other.call(json!({"execute": "echo", "id": served})),
            json!({"return": {}, "id": served})
        );
        served += 1;
        if s.client_count() != 2 {
            break;
        }
        thread::sleep(Duration::from_millis(20));
        assert!(served < 2000, "the stalled client was never dropped");
    }
    let rest = staller.drains_to_eof();
    assert_eq!(rest.len(), 1, "{rest:?}");
    let (class, desc) = error_of(&rest[0]);
    assert_eq!(class, "GenericError");
    assert!(desc.starts_with("QMP input incomplete after"), "{desc}");
    assert_eq!(
        other.call(json!({"execute": "echo"})),
        json!({"return": {}})
    );
}

#[test]
fn an_idle_client_between_messages_is_not_disconnected() {
    let dir = TestDir::new("idle");
    let config = ServerConfig {
        partial_message_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let (_s, _h) = server(&dir, config);
    let mut c = Raw::negotiated(&dir.sock());
    // Idle with nothing pending: the half-message deadline does not apply.
    thread::sleep(Duration::from_millis(400));
    assert_eq!(c.call(json!({"execute": "echo"})), json!({"return": {}}));
}

#[test]
fn a_slow_command_delays_only_its_own_client() {
    let dir = TestDir::new("slow");
    let (_s, h) = server(&dir, ServerConfig::default());
    let mut slow = Raw::negotiated(&dir.sock());
    let mut other = Raw::negotiated(&dir.sock());
    slow.send(br#"{"execute": "block", "id": "slow"}"#);
    h.gate.wait_waiters(1);
    for i in 0..5 {
        assert_eq!(
            other.call(json!({"execute": "echo", "id": i})),
            json!({"return": {}, "id": i})
        );
    }
    h.gate.open();
    assert_eq!(slow.recv(), json!({"return": {}, "id": "slow"}));
}

#[test]
fn a_client_disconnecting_mid_command_does_not_harm_the_server() {
    let dir = TestDir::new("midcmd");
    let (s, h) = server(&dir, ServerConfig::default());
    let mut other = Raw::negotiated(&dir.sock());
    {
        let mut gone = Raw::negotiated(&dir.sock());
        gone.send(br#"{"execute": "block"}"#);
        h.gate.wait_waiters(1);
    }
    h.gate.open();
    eventually("the gone client is removed", || s.client_count() == 1);
    assert_eq!(
        other.call(json!({"execute": "echo"})),
        json!({"return": {}})
    );
    let mut fresh = Raw::negotiated(&dir.sock());
    assert_eq!(
        fresh.call(json!({"execute": "echo"})),
        json!({"return": {}})
    );
}

#[test]
fn a_panicking_command_is_a_generic_error_and_the_connection_survives() {
    let dir = TestDir::new("panic");
    let (_s, _h) = server(&dir, ServerConfig::default());
    let mut c = Raw::negotiated(&dir.sock());
    let r = c.call(json!({"execute": "panic", "id": 1}));
    assert_eq!(
        error_of(&r),
        (
            "GenericError".into(),
            "Command panic failed internally".into()
        )
    );
    assert_eq!(c.call(json!({"execute": "echo"})), json!({"return": {}}));
}

#[test]
fn events_reach_every_negotiated_client_only() {
    let dir = TestDir::new("events");
    let (s, _h) = server(&dir, ServerConfig::default());
    let mut a = Raw::negotiated(&dir.sock());
    let mut b = Raw::negotiated(&dir.sock());
    let mut unnegotiated = Raw::greeted(&dir.sock());
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(s.events().emit("STOP", None), 2);
    let data = json!({"status": "active"}).as_object().cloned();
    assert_eq!(s.events().emit("MIGRATION", data), 2);
    for c in [&mut a, &mut b] {
        let stop = c.recv();
        assert_eq!(stop["event"], "STOP");
        assert!(stop.get("data").is_none());
        let secs = stop["timestamp"]["seconds"].as_i64().unwrap();
        let us = stop["timestamp"]["microseconds"].as_i64().unwrap();
        assert!(secs >= before && (0..1_000_000).contains(&us), "{stop}");
        let mig = c.recv();
        assert_eq!(mig["event"], "MIGRATION");
        assert_eq!(mig["data"], json!({"status": "active"}));
    }
    // The unnegotiated client got nothing: its next line is the reply to its command.
    let r = unnegotiated.call(json!({"execute": "qmp_capabilities", "id": "late"}));
    assert_eq!(r, json!({"return": {}, "id": "late"}));
    // A command's event goes to everyone, including the caller (before its reply).
    let r = a.call(json!({"execute": "emit", "arguments": {"k": 1}}));
    assert_eq!(r["event"], "TEST_EVENT");
    assert_eq!(a.recv(), json!({"return": {"clients": 3}}));
    assert_eq!(b.recv()["data"], json!({"k": 1}));
}

#[test]
fn a_client_that_does_not_read_is_dropped_and_never_blocks_events_to_others() {
    let dir = TestDir::new("nonreader");
    let config = ServerConfig {
        queue_len: 8,
        write_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    };
    let (s, _h) = server(&dir, config);
    let deaf = Raw::negotiated(&dir.sock());
    let mut reader = Raw::negotiated(&dir.sock());
    let blob = "x".repeat(16 * 1024);
    let mut sent = 0u64;
    // Each event is read by `reader` before the next; `deaf` reads nothing, so its socket
    // buffer and then its queue fill up and the server drops it.
    while s.client_count() == 2 {
        let data = json!({"n": sent, "blob": blob}).as_object().cloned();
        s.events().emit("BIG", data);
        let ev = reader.recv();
        assert_eq!(ev["data"]["n"], json!(sent));
        sent += 1;
        assert!(sent < 100_000, "the deaf client was never dropped");
    }
    // Emitting goes on for the reader alone.
    for _ in 0..10 {
        assert_eq!(s.events().emit("SMALL", None), 1);
        assert_eq!(reader.recv()["event"], "SMALL");
    }
    drop(deaf);
    assert_eq!(
        reader.call(json!({"execute": "echo"})),
        json!({"return": {}})
    );
}

#[test]
fn the_socket_is_owner_only_even_under_umask_000() {
    // umask is process-wide, so the server runs in a child process started under
    // `umask 000` (this same test binary, selecting the helper test below).
    let dir = TestDir::new("umask");
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" --exact umask_child --nocapture --test-threads=1")
        .arg(&exe)
        .env("QMP_UMASK_CHILD_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("umask-child: file 666 socket 600"),
        "child did not report: {stdout}"
    );
}

/// Helper for the test above; does nothing unless started by it.
#[test]
fn umask_child() {
    let Some(dir) = std::env::var_os("QMP_UMASK_CHILD_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    // Proves the umask really is 000 here.
    let probe = dir.join("probe");
    std::fs::File::create(&probe).unwrap();
    let file_mode = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    let sock = dir.join("qmp.sock");
    let _s = QmpServer::bind(&sock, handler(), ServerConfig::default()).unwrap();
    let sock_mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    println!("umask-child: file {file_mode:o} socket {sock_mode:o}");
}

#[test]
fn the_client_over_the_limit_gets_an_error_and_is_closed() {
    let dir = TestDir::new("maxc");
    let config = ServerConfig {
        max_clients: 2,
        ..ServerConfig::default()
    };
    let (s, _h) = server(&dir, config);
    let a = Raw::negotiated(&dir.sock());
    let mut b = Raw::negotiated(&dir.sock());
    let mut third = Raw::connect(&dir.sock());
    let rest = third.drains_to_eof();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(
        error_of(&rest[0]),
        (
            "GenericError".into(),
            "Too many QMP clients connected (limit 2)".into()
        )
    );
    assert_eq!(b.call(json!({"execute": "echo"})), json!({"return": {}}));
    drop(a);
    eventually("a slot frees up", || s.client_count() == 1);
    let mut fourth = Raw::negotiated(&dir.sock());
    assert_eq!(
        fourth.call(json!({"execute": "echo"})),
        json!({"return": {}})
    );
}

#[test]
fn bind_refuses_a_non_socket_and_a_live_server_and_replaces_a_stale_socket() {
    let dir = TestDir::new("bind");
    let path = dir.sock();
    std::fs::write(&path, b"precious").unwrap();
    let err = QmpServer::bind(&path, handler(), ServerConfig::default()).unwrap_err();
    assert!(matches!(err, QmpError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();

    // A stale socket (its listener is gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let live = QmpServer::bind(&path, handler(), ServerConfig::default()).unwrap();
    let err = QmpServer::bind(&path, handler(), ServerConfig::default()).unwrap_err();
    assert!(matches!(err, QmpError::InUse(_)), "{err}");
    let mut c = Raw::negotiated(&path);
    assert_eq!(c.call(json!({"execute": "echo"})), json!({"return": {}}));

    let long = dir.path().join("x".repeat(200));
    let err = QmpServer::bind(&long, handler(), ServerConfig::default()).unwrap_err();
    assert!(matches!(err, QmpError::BadPath(_)), "{err}");
    drop(live);
}

#[test]
fn dropping_the_server_disconnects_clients_and_removes_the_socket() {
    let dir = TestDir::new("drop");
    let (s, _h) = server(&dir, ServerConfig::default());
    let mut c = Raw::negotiated(&dir.sock());
    drop(s);
    assert!(!dir.sock().exists());
    assert!(c.drains_to_eof().is_empty());
    assert!(UnixStream::connect(dir.sock()).is_err());
}
