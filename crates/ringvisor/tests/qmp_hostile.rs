//! Hostile QMP clients against a real VM process: half a message then a stall, malformed
//! JSON, a 1 GiB message, a client that disconnects right after `migrate`. The monitor keeps
//! serving another client throughout and the guest keeps running. Needs /dev/kvm.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn raw(vm: &Vm) -> UnixStream {
    let s = UnixStream::connect(&vm.qmp).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 512];
    let n = (&s).read(&mut greeting).expect("greeting");
    assert!(String::from_utf8_lossy(&greeting[..n]).contains("\"QMP\""));
    s
}

fn read_reply(s: &mut UnixStream) -> String {
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).expect("reply");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn hostile_clients_neither_block_the_monitor_nor_harm_the_guest() {
    if !have_kvm("hostile QMP client test") {
        return;
    }
    let dir = Dir::new("hostile");
    let src = spawn_vm(&dir, "src", &guest_args("8M"));
    let mut good = client(&src);
    assert!(guest_runs(&mut good));

    // Half a message, then nothing: the other client is served meanwhile.
    let mut half = raw(&src);
    half.write_all(b"{\"execute\": \"qmp_capabilities\"}\r\n{\"execute\": \"query-st")
        .unwrap();
    assert!(read_reply(&mut half).contains("\"return\""));
    assert_eq!(
        good.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );

    // Malformed JSON: an error reply, and the connection stays usable.
    let mut bad = raw(&src);
    bad.write_all(b"{\"execute\": \"qmp_capabilities\"}\r\n")
        .unwrap();
    assert!(read_reply(&mut bad).contains("\"return\""));
    bad.write_all(b"{\"execute\": }\r\n").unwrap();
    let r = read_reply(&mut bad);
    assert!(
        r.contains("GenericError") && r.contains("JSON parse error"),
        "{r}"
    );
    bad.write_all(b"{\"execute\": \"query-status\"}\r\n")
        .unwrap();
    assert!(read_reply(&mut bad).contains("\"running\""));

    // A 1 GiB message: the server gives up at its bound and closes; the write fails long
    // before 1 GiB went out.
    let mut big = raw(&src);
    big.set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    big.write_all(b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"x\": \"")
        .unwrap();
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = 0u64;
    while sent < 1 << 30 {
        match big.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(_) => break,
        }
    }
    assert!(sent < 1 << 30, "the server read a whole 1 GiB message");

    // A client that starts a migration and disconnects at once: the job goes on, and the
    // guest is unharmed (cancelled by the good client, it keeps running here).
    let (mut dst, addr) = spawn_destination(&[]);
    good.execute("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}))
        .unwrap();
    let mut quitter = raw(&src);
    quitter
        .write_all(format!("{{\"execute\": \"qmp_capabilities\"}}{{\"execute\": \"migrate\", \"arguments\": {{\"uri\": \"tcp:{addr}\"}}}}").as_bytes())
        .unwrap();
    drop(quitter);
    wait_status(&mut good, &["active"]);
    assert!(guest_runs(&mut good), "the guest runs during the migration");
    good.execute("migrate_cancel", Value::Null).unwrap();
    assert_eq!(
        wait_status(&mut good, &["cancelled", "failed", "completed"])["status"],
        "cancelled"
    );
    assert_eq!(
        good.execute("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    assert!(guest_runs(&mut good));

    // The stalled client is still connected (within its 10 s), and the monitor still serves.
    assert_eq!(
        good.execute("query-version", Value::Null).unwrap()["package"]
            .as_str()
            .map(|p| p.starts_with("ringvisor")),
        Some(true)
    );
    drop(half);
    let _ = dst.kill();
    let _ = dst.wait();
}
