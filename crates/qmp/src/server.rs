//! The QMP server: an owner-only unix socket, an accept thread and, per client, a reader
//! thread (framing, validation, negotiation) and a writer thread draining a bounded queue
//! of replies and events; each command runs on a thread of its own, started by the
//! dispatch thread, which calls the [`Handler`].
//!
//! The accept, reader and writer threads read or write what clients send and run under the
//! `sandbox::ThreadKind::Monitor` seccomp filter (socket I/O, no open, no ioctl, no exec);
//! the dispatch thread and the command threads it starts see only parsed, validated
//! commands and are not filtered, because commands start migrations, listeners and VMs,
//! whose threads inherit the filter of the thread that starts them.
//!
//! Access: the socket is created mode 0600 and, after accept, a client whose uid
//! (`SO_PEERCRED`) is neither the server's effective uid nor root is told so and closed
//! ([`peer_allowed`]).
//!
//! Bounds, all in [`ServerConfig`]: at most `max_clients` connections (one more is told
//! `GenericError` and closed); a message larger than `max_message_bytes` is answered with
//! an error and the client is disconnected (the buffer never grows past the limit); a
//! message begun and not finished within `partial_message_timeout` disconnects its client;
//! a client that does not read is dropped when a write blocks for `write_timeout` or when
//! its queue of `queue_len` messages is full at an event, so [`EventSink::emit`] never
//! blocks. A client's reader waits for its command's reply, so replies keep their order,
//! and a slow command delays only that client.
//!
//! The server itself answers `qmp_capabilities` and `query-commands` (the handler's
//! [`Handler::commands`] plus those two); every other name the handler lists is passed to
//! [`Handler::execute`], and names it does not list are `CommandNotFound`.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::args::Args;
use crate::error::{CommandError, ErrorClass, QmpError};
use crate::framer::{Framer, TooLarge};
use crate::proto::{self, Timestamp};
use crate::sys;

/// The commands of a QMP server. Implemented by whoever owns the VM; this crate only
/// transports.
pub trait Handler: Send + Sync + 'static {
    /// Names for `query-commands` and dispatch (`qmp_capabilities` and `query-commands`
    /// are added by the server). Called for every command, so keep it cheap.
    fn commands(&self) -> Vec<String>;

    /// Runs one command; called on a thread of its own per command; must not block for long (long
    /// work runs as a job and reports by events). `Ok(Value)` is the `return` member
    /// (QEMU returns `{}` for commands without a result).
    fn execute(
        &self,
        name: &str,
        args: Map<String, Value>,
        ctx: &ClientCtx,
    ) -> Result<Value, CommandError>;
}

/// The `qemu` member of the greeting's `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// Greeting contents and bounds of a [`QmpServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The version in the greeting (tools compare it with QEMU releases).
    pub version: QemuVersion,
    /// The greeting's `package` string.
    pub package: String,
    /// Connections served at once; one more gets a `GenericError` and is closed.
    pub max_clients: usize,
    /// Largest accepted JSON text in bytes; a larger one disconnects its client.
    pub max_message_bytes: usize,
    /// Time a message may take from its first byte to its last.
    pub partial_message_timeout: Duration,
    /// Time one write to a client may block before the client is dropped.
    pub write_timeout: Duration,
    /// Replies and events queued per client; an event that finds the queue full drops
    /// the client.
    pub queue_len: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            version: QemuVersion {
                major: 0,
                minor: 1,
                micro: 0,
            },
            package: concat!("ringvisor-", env!("CARGO_PKG_VERSION")).to_string(),
            max_clients: 16,
            max_message_bytes: 1 << 20,
            partial_message_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(5),
            queue_len: 256,
        }
    }
}

/// The registry entry of one connected client.
struct Entry {
    tx: SyncSender<Arc<[u8]>>,
    negotiated: Arc<AtomicBool>,
    /// A handle to the socket, to disconnect the client from other threads.
    stream: UnixStream,
}

/// Connected clients, shared by the server, its threads and every [`EventSink`].
#[derive(Default)]
struct Clients {
    map: Mutex<HashMap<u64, Entry>>,
}

impl Clients {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // The map stays consistent under a panic (single inserts/removes), so keep going.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Emits QMP events to every negotiated client. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct EventSink {
    clients: Arc<Clients>,
}

impl EventSink {
    /// Sends `{"event": NAME, "data": DATA, "timestamp": NOW}` (CLOCK_REALTIME) to every
    /// client that completed negotiation. A client whose queue is full is disconnected
    /// instead of waited for. Returns how many clients the event was queued for.
    pub fn emit(&self, name: &str, data: Option<Map<String, Value>>) -> usize {
        let bytes: Arc<[u8]> = proto::encode_event(name, data.as_ref(), Timestamp::now()).into();
        let map = self.clients.lock();
        let mut queued = 0;
        for entry in map.values() {
            if !entry.negotiated.load(Ordering::Acquire) {
                continue;
            }
            match entry.tx.try_send(Arc::clone(&bytes)) {
                Ok(()) => queued += 1,
                Err(TrySendError::Full(_)) => {
                    // Not reading: drop it rather than stall the emitter or others.
                    let _ = entry.stream.shutdown(Shutdown::Both);
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        queued
    }
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink").finish_non_exhaustive()
    }
}

/// What a command learns about the client that sent it.
#[derive(Debug, Clone)]
pub struct ClientCtx {
    id: u64,
    events: EventSink,
}

impl ClientCtx {
    /// The connection's number (unique within the server's lifetime).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The server's event sink.
    pub fn events(&self) -> &EventSink {
        &self.events
    }
}

/// State shared by the server handle, the accept thread and the client threads.
struct Shared {
    handler: Arc<dyn Handler>,
    config: ServerConfig,
    clients: Arc<Clients>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The server's effective uid, read before the accept thread is filtered.
    uid: u32,
    /// Commands to the dispatch thread; taken (closed) when the server is dropped.
    dispatch: Mutex<Option<mpsc::Sender<Call>>>,
}

/// One command for the dispatch thread and where its result goes.
struct Call {
    name: String,
    args: Map<String, Value>,
    ctx: ClientCtx,
    reply: SyncSender<Result<Value, CommandError>>,
}

/// Starts one thread per command (named `qmp-cmd`), so a slow command delays only the
/// client that sent it. The threads are started here, on an unfiltered thread, because
/// whatever a command starts (a migration, a listener, a VM's vCPUs) inherits the seccomp
/// filter of the thread that starts it. A panicking command is a bug in the handler; it
/// costs that command, not the client's connection or the server.
fn dispatch_loop(handler: &Arc<dyn Handler>, rx: Receiver<Call>) {
    for call in rx {
        let h = Arc::clone(handler);
        let failed = call.reply.clone();
        let name = call.name.clone();
        let spawned = thread::Builder::new()
            .name("qmp-cmd".into())
            .spawn(move || {
                let Call {
                    name,
                    args,
                    ctx,
                    reply,
                } = call;
                let r = panic::catch_unwind(AssertUnwindSafe(|| h.execute(&name, args, &ctx)))
                    .unwrap_or_else(|_| {
                        Err(CommandError::generic(format!(
                            "Command {name} failed internally"
                        )))
                    });
                let _ = reply.send(r);
            });
        if spawned.is_err() {
            let _ = failed.send(Err(CommandError::generic(format!(
                "Command {name} could not start: out of threads"
            ))));
        }
    }
}

/// A running QMP server. Dropping it stops accepting, disconnects every client, waits for
/// their threads (so a command still running finishes first) and removes the socket file.
pub struct QmpServer {
    path: PathBuf,
    /// (device, inode) of the socket file, so drop removes only our own file.
    file_id: (u64, u64),
    listener: Arc<UnixListener>,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    dispatch: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Makes `path` free for a new socket: absent, or a stale socket nobody answers on.
fn clear_path(path: &Path) -> Result<(), QmpError> {
    let socket_err = |source| QmpError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(socket_err(e)),
        Ok(m) if !m.file_type().is_socket() => Err(QmpError::NotASocket(path.to_path_buf())),
        Ok(_) => {
            let probe_deadline = Instant::now() + Duration::from_millis(500);
            match sys::connect_with_deadline(path, probe_deadline) {
                // Someone accepts (or has a full backlog): a live server owns the path.
                Ok(_) => Err(QmpError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    Err(QmpError::InUse(path.to_path_buf()))
                }
                Err(_) => std::fs::remove_file(path).map_err(socket_err),
            }
        }
    }
}

impl QmpServer {
    /// Creates the socket at `path` (mode 0600 whatever the umask; a stale socket there is
    /// replaced, anything else is refused) and starts accepting clients.
    pub fn bind(
        path: impl AsRef<Path>,
        handler: Arc<dyn Handler>,
        config: ServerConfig,
    ) -> Result<QmpServer, QmpError> {
        let path = path.as_ref().to_path_buf();
        clear_path(&path)?;
        let listener = sys::bind_owner_only(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::InvalidInput {
                QmpError::BadPath(path.clone())
            } else {
                QmpError::Socket {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let meta = std::fs::symlink_metadata(&path).map_err(|source| QmpError::Socket {
            path: path.clone(),
            source,
        })?;
        let listener = Arc::new(listener);
        let (dispatch_tx, dispatch_rx) = mpsc::channel::<Call>();
        let dispatch = {
            let handler = Arc::clone(&handler);
            thread::Builder::new()
                .name("qmp-dispatch".into())
                .spawn(move || dispatch_loop(&handler, dispatch_rx))
        };
        let dispatch = match dispatch {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(QmpError::Spawn(e));
            }
        };
        let shared = Arc::new(Shared {
            handler,
            config,
            clients: Arc::new(Clients::default()),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
            dispatch: Mutex::new(Some(dispatch_tx)),
            uid: sys::own_uid(),
        });
        // The accept thread reports whether its filter is on before it accepts anyone.
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let accept = {
            let listener = Arc::clone(&listener);
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || {
                    let r = sandbox::apply(sandbox::ThreadKind::Monitor);
                    let ok = r.is_ok();
                    let _ = ready_tx.send(r);
                    if ok {
                        accept_loop(&listener, &shared);
                    }
                })
        };
        let mut server = QmpServer {
            path,
            file_id: (meta.dev(), meta.ino()),
            listener,
            shared,
            accept: None,
            dispatch: Some(dispatch),
        };
        match accept {
            Ok(h) => server.accept = Some(h),
            Err(e) => return Err(QmpError::Spawn(e)),
        }
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(QmpError::Sandbox(e)),
            Err(_) => Err(QmpError::Spawn(io::Error::other("the accept thread ended"))),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sink for events to every negotiated client.
    pub fn events(&self) -> EventSink {
        EventSink {
            clients: Arc::clone(&self.shared.clients),
        }
    }

    /// How many clients are connected now.
    pub fn client_count(&self) -> usize {
        self.shared.clients.lock().len()
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        sys::shutdown_listener(&self.listener);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for entry in self.shared.clients.lock().values() {
            let _ = entry.stream.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for h in threads {
            let _ = h.join();
        }
        // Every reader is gone: closing the queue ends the dispatch thread.
        self.shared
            .dispatch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = self.dispatch.take() {
            let _ = h.join();
        }
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.file_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    loop {
        let conn = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok((stream, _)) => admit(shared, stream),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Out of fds or similar: back off instead of spinning, keep serving.
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Tells a connection over the limit why it is closed. Runs on the accept thread, so the
/// write is bounded by a short timeout (a fresh socket's buffer is empty anyway).
fn refuse(stream: &UnixStream, limit: usize) {
    let err = CommandError::generic(format!("Too many QMP clients connected (limit {limit})"));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = sys::write_all_nosignal(stream, &proto::encode_error(&err, None));
    let _ = stream.shutdown(Shutdown::Both);
}

/// Whether a client whose process runs as `peer_uid` may use a server running as
/// `server_uid`: only the same user, or root (who could reach the guest anyway). The socket
/// is also created 0600; this holds if its mode is loosened (chmod, a bind mount, a socket
/// directory shared by mistake).
pub fn peer_allowed(peer_uid: u32, server_uid: u32) -> bool {
    peer_uid == server_uid || peer_uid == 0
}

/// Tells a client of another user it may not connect, and closes it.
fn deny(stream: &UnixStream, uid: Option<u32>) {
    let who = uid.map_or_else(|| "unknown uid".to_string(), |u| format!("uid {u}"));
    let err = CommandError::generic(format!(
        "QMP access denied: {who} is neither this VM's user nor root"
    ));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = sys::write_all_nosignal(stream, &proto::encode_error(&err, None));
    let _ = stream.shutdown(Shutdown::Both);
}

fn admit(shared: &Arc<Shared>, stream: UnixStream) {
    let cfg = &shared.config;
    // SO_PEERCRED: the uid the peer had when it connected.
    match sys::peer_uid(&stream) {
        Ok(uid) if peer_allowed(uid, shared.uid) => {}
        Ok(uid) => return deny(&stream, Some(uid)),
        Err(_) => return deny(&stream, None),
    }
    let mut threads = shared
        .threads
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    threads.retain(|h| !h.is_finished());
    let mut map = shared.clients.lock();
    if map.len() >= cfg.max_clients {
        drop(map);
        refuse(&stream, cfg.max_clients);
        return;
    }
    let (Ok(writer_stream), Ok(registry_stream)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::sync_channel::<Arc<[u8]>>(cfg.queue_len.max(1));
    let greeting = proto::encode_greeting(
        cfg.version.major,
        cfg.version.minor,
        cfg.version.micro,
        &cfg.package,
    );
    // The queue is new and holds at least one message: the greeting goes first.
    let _ = tx.try_send(greeting.into());
    let negotiated = Arc::new(AtomicBool::new(false));
    map.insert(
        id,
        Entry {
            tx: tx.clone(),
            negotiated: Arc::clone(&negotiated),
            stream: registry_stream,
        },
    );
    drop(map);
    let conn = Conn {
        shared: Arc::clone(shared),
        id,
        stream,
        tx,
        negotiated,
    };
    let spawned = thread::Builder::new()
        .name(format!("qmp-client-{id}"))
        .spawn(move || conn.run(writer_stream, rx));
    match spawned {
        Ok(h) => threads.push(h),
        Err(_) => {
            shared.clients.lock().remove(&id);
        }
    }
}

/// Drains one client's queue onto its socket. A write that fails or blocks longer than
/// the write timeout ends the connection (the shutdown wakes the reader).
fn write_loop(stream: UnixStream, rx: Receiver<Arc<[u8]>>, timeout: Duration) {
    if stream
        .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
        .is_err()
    {
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    for msg in rx.iter() {
        if sys::write_all_nosignal(&stream, &msg).is_err() {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// One client's reader side.
struct Conn {
    shared: Arc<Shared>,
    id: u64,
    stream: UnixStream,
    tx: SyncSender<Arc<[u8]>>,
    negotiated: Arc<AtomicBool>,
}

/// Why the read loop ended.
enum End {
    /// The peer closed, the socket failed or the writer is gone.
    Closed,
    /// A final error to send before closing.
    Fatal(CommandError),
}

impl Conn {
    fn run(self, writer_stream: UnixStream, rx: Receiver<Arc<[u8]>>) {
        // Inherited from the accept thread already; applied again so the thread is known
        // as a monitor thread (diagnostics) whoever started it.
        if sandbox::apply(sandbox::ThreadKind::Monitor).is_err() {
            self.shared.clients.lock().remove(&self.id);
            return;
        }
        let timeout = self.shared.config.write_timeout;
        let writer = thread::Builder::new()
            .name(format!("qmp-write-{}", self.id))
            .spawn(move || {
                if sandbox::apply(sandbox::ThreadKind::Monitor).is_ok() {
                    write_loop(writer_stream, rx, timeout);
                }
            });
        if let Ok(writer) = writer {
            if let End::Fatal(err) = self.read_loop() {
                let _ = self.tx.send(proto::encode_error(&err, None).into());
            }
            // Last senders gone -> the writer flushes what is queued and returns.
            self.shared.clients.lock().remove(&self.id);
            let Conn { stream, tx, .. } = self;
            drop(tx);
            let _ = writer.join();
            let _ = stream.shutdown(Shutdown::Both);
        } else {
            self.shared.clients.lock().remove(&self.id);
        }
    }

    fn read_loop(&self) -> End {
        let cfg = &self.shared.config;
        let mut framer = Framer::new(cfg.max_message_bytes);
        let mut chunk = [0u8; 8192];
        let mut partial_since: Option<Instant> = None;
        let mut negotiated = false;
        loop {
            let timeout = match partial_since {
                None => None,
                Some(t) => {
                    let left = cfg.partial_message_timeout.saturating_sub(t.elapsed());
                    if left.is_zero() {
                        return End::Fatal(CommandError::generic(format!(
                            "QMP input incomplete after {:?}; closing the connection",
                            cfg.partial_message_timeout
                        )));
                    }
                    Some(left.max(Duration::from_millis(1)))
                }
            };
            if self.stream.set_read_timeout(timeout).is_err() {
                return End::Closed;
            }
            let n = match (&self.stream).read(&mut chunk) {
                Ok(0) => return End::Closed,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return End::Closed,
            };
            let mut rest = &chunk[..n];
            while !rest.is_empty() {
                let (used, done) = match framer.feed(rest) {
                    Ok(r) => r,
                    Err(TooLarge) => {
                        return End::Fatal(CommandError::generic(format!(
                            "QMP input exceeds the limit of {} bytes; closing the connection",
                            cfg.max_message_bytes
                        )))
                    }
                };
                rest = &rest[used..];
                if done {
                    let (reply, now_negotiated) = self.handle(framer.frame(), negotiated);
                    framer.reset();
                    partial_since = None;
                    if now_negotiated {
                        negotiated = true;
                        if !self.queue_reply_and_enable_events(reply.into()) {
                            return End::Closed;
                        }
                    } else if self.tx.send(reply.into()).is_err() {
                        return End::Closed;
                    }
                }
            }
            if framer.is_partial() && partial_since.is_none() {
                partial_since = Some(Instant::now());
            }
        }
    }

    /// Answers one JSON text; the flag says negotiation completed with it.
    /// Queues the reply to `qmp_capabilities` and turns events on for this client as one
    /// step under the clients lock that [`EventSink::emit`] holds: no event overtakes the
    /// reply, and none emitted after the client has read the reply is missed. Returns false
    /// if the connection is gone.
    fn queue_reply_and_enable_events(&self, reply: Arc<[u8]>) -> bool {
        let map = self.shared.clients.lock();
        match self.tx.try_send(reply) {
            Ok(()) => {
                self.negotiated.store(true, Ordering::Release);
                true
            }
            Err(TrySendError::Full(reply)) => {
                // A client that queued up unread replies: wait for room without holding the
                // lock (every other client's events go through it).
                drop(map);
                if self.tx.send(reply).is_err() {
                    return false;
                }
                self.negotiated.store(true, Ordering::Release);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    fn handle(&self, frame: &[u8], negotiated: bool) -> (Vec<u8>, bool) {
        let req = match proto::parse_request(frame) {
            Ok(r) => r,
            Err(rej) => return (proto::encode_error(&rej.error, rej.id.as_ref()), false),
        };
        let id = req.id.as_ref();
        match self.dispatch(&req.name, req.args, negotiated) {
            Ok(value) => {
                let done = !negotiated && req.name == "qmp_capabilities";
                (proto::encode_return(&value, id), done)
            }
            Err(err) => (proto::encode_error(&err, id), false),
        }
    }

    fn dispatch(
        &self,
        name: &str,
        args: Map<String, Value>,
        negotiated: bool,
    ) -> Result<Value, CommandError> {
        if !negotiated {
            if name == "qmp_capabilities" {
                return capabilities(Args::new(args)).map(|()| json!({}));
            }
            return Err(CommandError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        match name {
            "qmp_capabilities" => Err(CommandError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            "query-commands" => {
                Args::new(args).deny_unknown(&[])?;
                Ok(self.query_commands())
            }
            _ => self.execute(name, args),
        }
    }

    fn query_commands(&self) -> Value {
        let mut names = vec!["qmp_capabilities".to_string(), "query-commands".to_string()];
        for name in self.shared.handler.commands() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Value::Array(names.into_iter().map(|n| json!({ "name": n })).collect())
    }

    fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
        let handler = &self.shared.handler;
        if !handler.commands().iter().any(|c| c == name) {
            return Err(CommandError::command_not_found(name));
        }
        let ctx = ClientCtx {
            id: self.id,
            events: EventSink {
                clients: Arc::clone(&self.shared.clients),
            },
        };
        let (reply, result) = mpsc::sync_channel(1);
        let queue = self
            .shared
            .dispatch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let call = Call {
            name: name.to_string(),
            args,
            ctx,
            reply,
        };
        match queue.map(|q| q.send(call)) {
            Some(Ok(())) => result.recv().unwrap_or_else(|_| {
                Err(CommandError::generic(format!(
                    "Command {name} failed internally"
                )))
            }),
            _ => Err(CommandError::generic("The QMP server is shutting down")),
        }
    }
}

/// `qmp_capabilities`: `enable` may only name capabilities the greeting offered (none).
fn capabilities(args: Args) -> Result<(), CommandError> {
    let enable = args.optional_str_list("enable")?;
    args.deny_unknown(&["enable"])?;
    match enable.as_deref().and_then(|caps| caps.first()) {
        None => Ok(()),
        Some(&"oob") => Err(CommandError::generic("Capability oob not available")),
        Some(other) => Err(CommandError::generic(format!(
            "Parameter 'enable' does not accept value '{other}'"
        ))),
    }
}
