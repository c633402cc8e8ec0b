//! Shared by the integration tests: a test handler, a raw socket client that sees exactly
//! what the server writes, and unique socket paths.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use qmp::{Args, ClientCtx, CommandError, ErrorClass, Handler};
use serde_json::{json, Map, Value};

/// How long a test waits for something that must happen before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A fresh directory for one test's socket (removed on drop).
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "qmp-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }

    pub fn sock(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A gate the `block` command waits at until the test opens it.
#[derive(Default)]
pub struct Gate {
    state: Mutex<(bool, usize)>,
    cv: Condvar,
}

impl Gate {
    pub fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.cv.notify_all();
    }

    /// Waits until `n` commands are blocked at the gate.
    pub fn wait_waiters(&self, n: usize) {
        let guard = self.state.lock().unwrap();
        let (guard, res) = self
            .cv
            .wait_timeout_while(guard, PATIENCE, |s| s.1 < n)
            .unwrap();
        assert!(
            !res.timed_out(),
            "only {} commands reached the gate",
            guard.1
        );
    }

    fn pass(&self) {
        let mut guard = self.state.lock().unwrap();
        guard.1 += 1;
        self.cv.notify_all();
        // Bounded, so a failing test cannot hang the server's drop.
        let _unused = self
            .cv
            .wait_timeout_while(guard, PATIENCE, |s| !s.0)
            .unwrap();
    }
}

/// Commands: `echo` (returns its arguments), `block` (waits at the gate), `emit` (emits
/// `TEST_EVENT` with its arguments as data), `typed` (QEMU-style argument checks), `fail`
/// (`DeviceNotFound`), `panic`.
#[derive(Default)]
pub struct TestHandler {
    pub gate: Gate,
}

impl Handler for TestHandler {
    fn commands(&self) -> Vec<String> {
        ["echo", "block", "emit", "typed", "fail", "panic"]
            .map(String::from)
            .to_vec()
    }

    fn execute(
        &self,
        name: &str,
        args: Map<String, Value>,
        ctx: &ClientCtx,
    ) -> Result<Value, CommandError> {
        match name {
            "echo" => Ok(Value::Object(args)),
            "block" => {
                self.gate.pass();
                Ok(json!({}))
            }
            "emit" => {
                let n = ctx.events().emit("TEST_EVENT", Some(args));
                Ok(json!({ "clients": n }))
            }
            "typed" => {
                let a = Args::new(args);
                let uri = a.required_str("uri")?;
                let cpu = a.optional_i64("cpu-index")?;
                let size = a.optional_u64("size")?;
                let detach = a.optional_bool("detach")?;
                a.deny_unknown(&["uri", "cpu-index", "size", "detach"])?;
                Ok(json!({"uri": uri, "cpu-index": cpu, "size": size, "detach": detach}))
            }
            "fail" => Err(CommandError::new(
                ErrorClass::DeviceNotFound,
                "Device 'x' not found",
            )),
            "panic" => panic!("test handler panics on purpose"),
            _ => Err(CommandError::command_not_found(name)),
        }
    }
}

/// A client on the raw socket: sends bytes, reads the server's `\r\n`-terminated lines.
pub struct Raw {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Raw { stream, reader }
    }

    /// Connects and reads the greeting.
    pub fn greeted(path: &Path) -> Raw {
        let mut raw = Raw::connect(path);
        let g = raw.recv();
        assert!(g.get("QMP").is_some(), "not a greeting: {g}");
        raw
    }

    /// Connects, reads the greeting and negotiates.
    pub fn negotiated(path: &Path) -> Raw {
        let mut raw = Raw::greeted(path);
        raw.send(br#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(raw.recv(), json!({"return": {}}));
        raw
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one line; `None` at EOF. Panics on a timeout.
    pub fn recv_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with("\r\n"), "line not CRLF-terminated: {line:?}");
                Some(line)
            }
            // A reset after the server closed with unread input counts as EOF.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("no message from the server: {e}"),
        }
    }

    pub fn recv(&mut self) -> Value {
        let line = self.recv_line().expect("server closed the connection");
        serde_json::from_str(&line).unwrap()
    }

    /// Sends a request and returns the reply.
    pub fn call(&mut self, request: Value) -> Value {
        self.send(request.to_string().as_bytes());
        self.recv()
    }

    /// True if the server closed the connection (after any further lines).
    pub fn drains_to_eof(&mut self) -> Vec<Value> {
        let mut rest = Vec::new();
        while let Some(line) = self.recv_line() {
            rest.push(serde_json::from_str(&line).unwrap());
        }
        rest
    }

    /// Reads everything left as bytes until EOF.
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = self.reader.read_to_end(&mut out);
        out
    }
}

/// The `error` object of a reply, `(class, desc)`.
pub fn error_of(reply: &Value) -> (String, String) {
    let e = reply
        .get("error")
        .unwrap_or_else(|| panic!("not an error: {reply}"));
    (
        e["class"].as_str().unwrap().to_string(),
        e["desc"].as_str().unwrap().to_string(),
    )
}

/// Waits until `cond` holds (the server acts on its own threads).
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn handler() -> Arc<TestHandler> {
    Arc::new(TestHandler::default())
}
