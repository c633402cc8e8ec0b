//! A blocking QMP client for ringvisor's own CLI. Every call has a deadline and every
//! message read is bounded, because the server at the other end may be hung, dead or
//! hostile. Events that arrive while waiting for a reply are queued (up to
//! [`ClientConfig::max_queued_events`]; the oldest are dropped and counted beyond it).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::error::{ClientError, CommandError, ErrorClass};
use crate::framer::{Framer, TooLarge};
use crate::proto::{self, Timestamp};
use crate::sys;

/// Bounds of a [`QmpClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline of connecting, of the greeting and negotiation, and of each `execute`.
    pub timeout: Duration,
    /// Largest message accepted from the server (QEMU's `query-qmp-schema` is ~200 KiB).
    pub max_message_bytes: usize,
    /// Events kept while nobody calls [`QmpClient::next_event`].
    pub max_queued_events: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            timeout: Duration::from_secs(10),
            max_message_bytes: 16 << 20,
            max_queued_events: 4096,
        }
    }
}

/// An asynchronous event received from the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The `event` member, e.g. `MIGRATION`.
    pub name: String,
    /// The `data` member (empty if absent).
    pub data: Map<String, Value>,
    /// When the server emitted it.
    pub timestamp: Timestamp,
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    config: ClientConfig,
    framer: Framer,
    rbuf: Box<[u8]>,
    rpos: usize,
    rlen: usize,
    greeting: Value,
    events: VecDeque<Event>,
    dropped_events: u64,
    next_id: u64,
    broken: bool,
}

/// A message from the server, classified.
enum Incoming {
    Event(Event),
    Reply {
        id: Option<Value>,
        result: Result<Value, CommandError>,
    },
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

fn parse_event(mut obj: Map<String, Value>) -> Result<Event, ClientError> {
    let name = match obj.remove("event") {
        Some(Value::String(s)) => s,
        _ => return Err(protocol("event name is not a string")),
    };
    let data = match obj.remove("data") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(protocol("event data is not an object")),
    };
    let ts = obj.get("timestamp");
    let field = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_i64);
    let timestamp = match (field("seconds"), field("microseconds")) {
        (Some(seconds), Some(microseconds)) => Timestamp {
            seconds,
            microseconds,
        },
        _ => return Err(protocol("event timestamp is malformed")),
    };
    Ok(Event {
        name,
        data,
        timestamp,
    })
}

fn parse_error_object(v: &Value) -> Result<CommandError, ClientError> {
    match (
        v.get("class").and_then(Value::as_str),
        v.get("desc").and_then(Value::as_str),
    ) {
        (Some(class), Some(desc)) => Ok(CommandError::new(ErrorClass::from_wire(class), desc)),
        _ => Err(protocol("error object lacks class or desc")),
    }
}

fn classify(value: Value) -> Result<Incoming, ClientError> {
    let Value::Object(mut obj) = value else {
        return Err(protocol("message is not a JSON object"));
    };
    if obj.contains_key("event") {
        return parse_event(obj).map(Incoming::Event);
    }
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Ok(Incoming::Reply {
            id,
            result: Ok(ret),
        });
    }
    if let Some(err) = obj.get("error") {
        let err = parse_error_object(err)?;
        return Ok(Incoming::Reply {
            id,
            result: Err(err),
        });
    }
    Err(protocol("message is neither an event nor a reply"))
}

impl QmpClient {
    /// Connects to `path`, reads the greeting and negotiates capabilities, all within
    /// `timeout`; later calls use `timeout` as their deadline too.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<QmpClient, ClientError> {
        QmpClient::connect_with(
            path,
            ClientConfig {
                timeout,
                ..ClientConfig::default()
            },
        )
    }

    /// [`QmpClient::connect`] with explicit bounds.
    pub fn connect_with(
        path: impl AsRef<Path>,
        config: ClientConfig,
    ) -> Result<QmpClient, ClientError> {
        let path = path.as_ref();
        let deadline = Instant::now() + config.timeout;
        let stream =
            sys::connect_with_deadline(path, deadline).map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let mut client = QmpClient {
            stream,
            framer: Framer::new(config.max_message_bytes),
            config,
            rbuf: vec![0u8; 8192].into_boxed_slice(),
            rpos: 0,
            rlen: 0,
            greeting: Value::Null,
            events: VecDeque::new(),
            dropped_events: 0,
            next_id: 1,
            broken: false,
        };
        let greeting = client
            .read_value(deadline)?
            .ok_or(ClientError::Timeout(client.config.timeout))?;
        match greeting.get("QMP") {
            Some(qmp)
                if qmp.get("version").is_some_and(Value::is_object)
                    && qmp.get("capabilities").is_some_and(Value::is_array) => {}
            _ => return Err(protocol(format!("not a QMP greeting: {greeting}"))),
        }
        client.greeting = greeting;
        client.execute_until("qmp_capabilities", None, deadline)?;
        Ok(client)
    }

    /// The server's greeting (`{"QMP": {"version": ..., "capabilities": [...]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Events dropped because the queue was full.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// Runs `name` with `args` (an object, or `Value::Null` for none) and returns its
    /// `return` value. Events arriving meanwhile are queued; replies with another `id`
    /// (to earlier commands that timed out) are skipped.
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value, ClientError> {
        let args = match args {
            Value::Null => None,
            Value::Object(m) => Some(m),
            _ => return Err(ClientError::ArgumentsNotObject),
        };
        let deadline = Instant::now() + self.config.timeout;
        self.execute_until(name, args, deadline)
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` if none came.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(Some(ev));
            }
            match self.read_value(deadline)? {
                None => return Ok(None),
                Some(v) => {
                    if let Incoming::Event(ev) = classify(v)? {
                        return Ok(Some(ev));
                    }
                    // A late reply to a command that timed out: nobody waits for it.
                }
            }
        }
    }

    fn execute_until(
        &mut self,
        name: &str,
        args: Option<Map<String, Value>>,
        deadline: Instant,
    ) -> Result<Value, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": name, "id": id });
        if let (Some(args), Some(obj)) = (args, req.as_object_mut()) {
            obj.insert("arguments".into(), Value::Object(args));
        }
        let mut bytes = req.to_string().into_bytes();
        bytes.extend_from_slice(b"\r\n");
        self.write_all(&bytes, deadline)?;
        loop {
            let v = self
                .read_value(deadline)?
                .ok_or(ClientError::Timeout(self.config.timeout))?;
            match classify(v)? {
                Incoming::Event(ev) => self.queue_event(ev),
                Incoming::Reply {
                    id: Some(rid),
                    result,
                } if rid == json!(id) => return result.map_err(ClientError::Command),
                Incoming::Reply {
                    id: None,
                    result: Err(e),
                } => return Err(ClientError::Rejected(e)),
                Incoming::Reply { .. } => {}
            }
        }
    }

    fn queue_event(&mut self, ev: Event) {
        if self.events.len() >= self.config.max_queued_events {
            self.events.pop_front();
            self.dropped_events += 1;
        }
        self.events.push_back(ev);
    }

    fn write_all(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), ClientError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout(self.config.timeout));
        }
        self.stream.set_write_timeout(Some(left))?;
        match sys::write_all_nosignal(&self.stream, bytes) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Part of the request may be out: the stream is no longer in sync.
                self.broken = true;
                Err(match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        ClientError::Timeout(self.config.timeout)
                    }
                    _ => ClientError::Io(e),
                })
            }
        }
    }

    /// The next complete JSON message, or `None` at the deadline.
    fn read_value(&mut self, deadline: Instant) -> Result<Option<Value>, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        loop {
            while self.rpos < self.rlen {
                let fed = self.framer.feed(&self.rbuf[self.rpos..self.rlen]);
                let (used, done) = match fed {
                    Ok(r) => r,
                    Err(TooLarge) => {
                        self.broken = true;
                        return Err(ClientError::TooLarge(self.config.max_message_bytes));
                    }
                };
                self.rpos += used;
                if done {
                    let parsed = proto::parse_json(self.framer.frame());
                    self.framer.reset();
                    return parsed
                        .map(Some)
                        .map_err(|e| protocol(format!("server sent bad JSON: {}", e.desc)));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut self.rbuf) {
                Ok(0) => {
                    self.broken = true;
                    return Err(ClientError::Closed);
                }
                Ok(n) => {
                    self.rpos = 0;
                    self.rlen = n;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    self.broken = true;
                    return Err(ClientError::Io(e));
                }
            }
        }
    }
}
