//! The control plane over a real QMP server and client, without KVM: a destination process
//! before its guest arrives (run state, parameters, capabilities, argument errors,
//! `migrate-incoming`, a stray connection that is not a migration, `quit`).

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::{ProcessExit, ServiceConfig, VmService};
use migration_engine::DestOptions;
use qmp::{ClientError, ErrorClass, QmpClient, QmpServer, ServerConfig};
use serde_json::{json, Value};

struct Fixture {
    svc: VmService,
    _server: QmpServer,
    client: QmpClient,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn destination(tag: &str) -> Fixture {
    destination_with(tag, ServiceConfig::default())
}

fn destination_with(tag: &str, cfg: ServiceConfig) -> Fixture {
    let dir = std::env::temp_dir().join(format!("rv-control-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svc = VmService::incoming(DestOptions::default(), cfg);
    let server = QmpServer::bind(
        dir.join("qmp.sock"),
        Arc::new(svc.clone()),
        ServerConfig::default(),
    )
    .unwrap();
    svc.attach_events(server.events());
    svc.start_monitor().unwrap();
    let client = QmpClient::connect(dir.join("qmp.sock"), Duration::from_secs(10)).unwrap();
    Fixture {
        svc,
        _server: server,
        client,
        _dir: TempDir(dir),
    }
}

fn err_desc(r: Result<Value, ClientError>) -> (ErrorClass, String) {
    match r {
        Err(ClientError::Command(e)) => (e.class, e.desc),
        other => panic!("expected a command error, got {other:?}"),
    }
}

/// Events named `name` until `n` arrived (bounded wait: a hang guard only).
fn events(c: &mut QmpClient, name: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n && Instant::now() < deadline {
        if let Some(e) = c.next_event(Duration::from_millis(200)).unwrap() {
            if e.name == name {
                out.push(Value::Object(e.data));
            }
        }
    }
    out
}

#[test]
fn a_destination_waits_in_inmigrate_and_answers_qemu_shaped_queries() {
    let mut f = destination("shapes");
    let c = &mut f.client;
    assert_eq!(
        c.execute("query-status", Value::Null).unwrap(),
        json!({"status": "inmigrate", "running": false, "singlestep": false})
    );
    assert_eq!(c.execute("query-migrate", Value::Null).unwrap(), json!({}));
    let v = c.execute("query-version", Value::Null).unwrap();
    assert_eq!(
        v["package"],
        format!("ringvisor {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(v["qemu"]["major"].is_u64() && v["qemu"]["micro"].is_u64());
    let names: Vec<String> = c
        .execute("query-commands", Value::Null)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    for cmd in control::COMMANDS {
        assert!(names.iter().any(|n| n == cmd), "{cmd} not listed");
    }
    let caps = c
        .execute("query-migrate-capabilities", Value::Null)
        .unwrap();
    assert_eq!(
        caps,
        json!([{"capability": "auto-converge", "state": false},
               {"capability": "dirty-limit", "state": false}])
    );
    let d = c.execute("query-dirty-rate", Value::Null).unwrap();
    assert_eq!(d["status"], "unstarted");
    assert_eq!(d["mode"], "page-sampling");
    assert_eq!(d["sample-pages"], 512);
}

#[test]
fn commands_without_a_guest_are_refused_and_bad_arguments_get_qemus_errors() {
    let mut f = destination("refuse");
    let c = &mut f.client;
    let (class, desc) = err_desc(c.execute("migrate", json!({"uri": "tcp:127.0.0.1:1"})));
    assert_eq!(class, ErrorClass::GenericError);
    assert!(desc.contains("no guest here yet"), "{desc}");
    let (_, desc) = err_desc(c.execute("migrate", json!({"uri": "exec:cat"})));
    assert!(
        desc.starts_with("unknown migration protocol: exec:cat"),
        "{desc}"
    );
    let (_, desc) = err_desc(c.execute("migrate", json!({})));
    assert_eq!(desc, "Parameter 'uri' is missing");
    let (_, desc) = err_desc(c.execute("query-status", json!({"verbose": true})));
    assert_eq!(desc, "Parameter 'verbose' is unexpected");
    let (_, desc) = err_desc(c.execute("calc-dirty-rate", json!({"calc-time": "one"})));
    assert_eq!(
        desc,
        "Invalid parameter type for 'calc-time', expected: integer"
    );
    let (_, desc) = err_desc(c.execute("calc-dirty-rate", json!({"calc-time": 1})));
    assert!(desc.contains("no guest here yet"), "{desc}");
    let (_, desc) = err_desc(c.execute("calc-dirty-rate", json!({"calc-time": 61})));
    assert!(desc.starts_with("calc-time is out of range"), "{desc}");
    let (_, desc) = err_desc(c.execute("calc-dirty-rate", json!({"calc-time": 1, "mode": "fast"})));
    assert_eq!(desc, "Parameter 'mode' does not accept value 'fast'");
    let (_, desc) = err_desc(c.execute("set-vcpu-dirty-limit", json!({"dirty-rate": -1})));
    assert_eq!(desc, "Parameter 'dirty-rate' expects uint64");
    let (_, desc) = err_desc(c.execute("stop", Value::Null));
    assert!(desc.contains("no guest here yet"), "{desc}");
    let (class, _) = err_desc(c.execute("x-ringvisor-nonsense", Value::Null));
    assert_eq!(class, ErrorClass::CommandNotFound);
    // Nothing changed.
    assert_eq!(f.svc.run_state(), control::RunState::Inmigrate);
}

#[test]
fn parameters_and_capabilities_are_validated_whole_and_checked_against_the_tracker() {
    let mut f = destination("params");
    let c = &mut f.client;
    c.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 8388608, "downtime-limit": 100}),
    )
    .unwrap();
    let p = c.execute("query-migrate-parameters", Value::Null).unwrap();
    assert_eq!(p["max-bandwidth"], 8388608);
    assert_eq!(p["downtime-limit"], 100);
    // One bad field: nothing changes.
    let (_, desc) = err_desc(c.execute(
        "migrate-set-parameters",
        json!({"downtime-limit": 5, "cpu-throttle-initial": 0}),
    ));
    assert!(desc.contains("cpu_throttle_initial"), "{desc}");
    let p = c.execute("query-migrate-parameters", Value::Null).unwrap();
    assert_eq!(p["downtime-limit"], 100);
    // The destination's guest will have the ring: dirty-limit is fine; adding auto-converge
    // to it is QEMU's capability conflict and changes nothing.
    c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "dirty-limit", "state": true}]}),
    )
    .unwrap();
    let (_, desc) = err_desc(c.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    ));
    assert!(
        desc.starts_with("dirty-limit conflicts with auto-converge"),
        "{desc}"
    );
    assert!(f.svc.capabilities().dirty_limit);
    assert!(!f.svc.capabilities().auto_converge);
}

#[test]
fn a_stray_connection_does_not_end_the_destination_which_keeps_listening() {
    let mut f = destination("stray");
    let c = &mut f.client;
    c.execute("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))
        .unwrap();
    let info = c.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(info["status"], "setup");
    let sa = &info["socket-address"][0];
    assert_eq!(sa["type"], "inet");
    assert_eq!(sa["host"], "127.0.0.1");
    let port: u16 = sa["port"].as_str().unwrap().parse().unwrap();
    assert!(port > 0);
    let (_, desc) = err_desc(c.execute("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"})));
    assert_eq!(desc, "The incoming migration has already been started");
    // Setup event of migrate-incoming, then a connection that speaks HTTP.
    assert_eq!(events(c, "MIGRATION", 1), vec![json!({"status": "setup"})]);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let seen = events(c, "MIGRATION", 3);
    assert_eq!(
        seen,
        vec![
            json!({"status": "active"}),
            json!({"status": "failed"}),
            json!({"status": "setup"})
        ]
    );
    drop(s);
    let st = c.execute("query-status", Value::Null).unwrap();
    assert_eq!(st["status"], "inmigrate");
    let info = c.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(info["status"], "setup");
    assert_eq!(info["x-ringvisor-failed-attempts"], 1);
    assert_eq!(f.svc.incoming_address().map(|a| a.port()), Some(port));
    // Still listening: a second stray connection is taken too.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&[0u8; 64]).unwrap();
    drop(s);
    assert_eq!(events(c, "MIGRATION", 3).len(), 3);
    assert_eq!(f.svc.wait_done(Some(Duration::ZERO)), None);
}

#[test]
fn quit_emits_shutdown_and_ends_the_process() {
    let mut f = destination("quit");
    assert_eq!(f.svc.wait_done(Some(Duration::from_millis(10))), None);
    f.client.execute("quit", Value::Null).unwrap();
    let ev = events(&mut f.client, "SHUTDOWN", 1);
    assert_eq!(ev, vec![json!({"guest": false, "reason": "host-qmp-quit"})]);
    assert_eq!(
        f.svc.wait_done(Some(Duration::from_secs(10))),
        Some(ProcessExit::Quit)
    );
}

#[test]
fn migrate_incoming_refuses_other_schemes_and_unbindable_addresses() {
    let mut f = destination("scheme");
    let (_, desc) = err_desc(
        f.client
            .execute("migrate-incoming", json!({"uri": "unix:/tmp/x"})),
    );
    assert!(desc.starts_with("unknown migration protocol"), "{desc}");
    let (_, desc) = err_desc(
        f.client
            .execute("migrate-incoming", json!({"uri": "tcp:300.1.1.1:0"})),
    );
    assert!(desc.starts_with("cannot listen on 300.1.1.1:0"), "{desc}");
    assert_eq!(
        f.client.execute("query-migrate", Value::Null).unwrap(),
        json!({})
    );
}

#[test]
fn a_silent_connection_is_dropped_and_does_not_hold_the_listener() {
    let mut f = destination_with(
        "silent",
        ServiceConfig {
            incoming_first_byte_timeout: Duration::from_millis(200),
            ..ServiceConfig::default()
        },
    );
    let c = &mut f.client;
    c.execute("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}))
        .unwrap();
    assert_eq!(events(c, "MIGRATION", 1), vec![json!({"status": "setup"})]);
    let port = f.svc.incoming_address().unwrap().port();
    // Connected and silent, kept open: dropped after 200 ms, never announced.
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let closed = TcpStream::connect(("127.0.0.1", port)).unwrap();
    drop(closed);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"not a migration").unwrap();
    drop(s);
    assert_eq!(
        events(c, "MIGRATION", 3),
        vec![
            json!({"status": "active"}),
            json!({"status": "failed"}),
            json!({"status": "setup"})
        ]
    );
    let info = c.execute("query-migrate", Value::Null).unwrap();
    assert_eq!(info["x-ringvisor-failed-attempts"], 1);
    drop(silent);
}
