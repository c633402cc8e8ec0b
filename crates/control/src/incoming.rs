//! The incoming side: a destination process waits in `inmigrate` for `migrate-incoming`
//! (or listens at once with `--incoming tcp:...`), receives one guest and runs it. A
//! connection that fails (a source that aborts or cancels, a stray client that does not
//! speak the migration protocol) costs only what it sent: the half-built VM is dropped and the
//! listener takes the next connection, the run state stays `inmigrate`. A connection that
//! sends nothing within `ServiceConfig::incoming_first_byte_timeout` (10 s) is dropped
//! before it is taken for a migration.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use migration_engine::{DestOptions, IncomingSummary, MigrationStatus};
use qmp::{Args, CommandError};
use serde_json::{json, Value};
use vmm::Vm;

use crate::dirty::DirtyLimits;
use crate::error::ControlError;
use crate::migrate::status_name;
use crate::service::{Core, VmService};
use crate::state::RunState;
use crate::uri::tcp_addr;

/// The destination's state (`query-migrate` on a destination).
pub(crate) struct IncomingState {
    /// How a received guest is built; `None` in a process that runs its own guest.
    dest: Option<DestOptions>,
    listening: Option<SocketAddr>,
    status: MigrationStatus,
    last_error: Option<String>,
    failed_attempts: u32,
    summary: Option<IncomingSummary>,
}

impl IncomingState {
    pub(crate) fn new(dest: Option<DestOptions>) -> Self {
        IncomingState {
            dest,
            listening: None,
            status: MigrationStatus::None,
            last_error: None,
            failed_attempts: 0,
            summary: None,
        }
    }
}

fn lock(m: &Mutex<IncomingState>) -> MutexGuard<'_, IncomingState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_status(core: &Core, s: MigrationStatus) {
    lock(&core.incoming).status = s;
    core.notify.emit("MIGRATION", Some(json!({ "status": s })));
}

/// Hands a received, running guest to the service: run state `running`, `RESUME`.
fn install(core: &Core, vm: Vm, summary: IncomingSummary) {
    let tracker = vm.config().tracking.mode();
    {
        let mut g = core.lock();
        g.vm = Some(Arc::new(vm));
        g.tracker = tracker;
        g.limits = DirtyLimits::default();
    }
    lock(&core.incoming).summary = Some(summary);
    if core
        .notify
        .transition(RunState::Inmigrate, RunState::Running)
    {
        core.notify.emit("RESUME", None);
    }
    set_status(core, MigrationStatus::Completed);
}

/// Whether a new connection says something within `timeout` (a silent or closed one is
/// dropped before it is announced as a migration).
fn speaks(stream: &TcpStream, timeout: Duration, peer: &str) -> bool {
    let mut first = [0u8; 1];
    let r = stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .and_then(|()| stream.peek(&mut first));
    match r {
        Ok(0) => {
            tracing::info!(%peer, "a connection closed before sending anything");
            false
        }
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "a silent connection was dropped");
            false
        }
    }
}

/// `tls-authz` is read at each connection (QEMU looks its authz object up at each
/// handshake), so an operator can change who may connect next while the destination waits.
/// It applies when TLS came from the `tls-creds` parameter; TLS set up by the embedder
/// ([`DestOptions::tls`]) keeps its own list.
fn with_current_authz(core: &Core, dest: &DestOptions) -> DestOptions {
    let mut d = dest.clone();
    let g = core.lock();
    if let Some(t) = &mut d.tls {
        if !g.params.tls_creds.is_empty() {
            *t = t.with_authz(&g.params.tls_authz_list());
        }
    }
    d
}

fn accept_loop(core: Arc<Core>, listener: TcpListener, dest: DestOptions) {
    // Before the first byte of any peer (the first-byte probe included).
    if let Err(e) = sandbox::apply(sandbox::ThreadKind::Incoming) {
        tracing::error!(error = %e, "incoming: no seccomp filter; not accepting migrations");
        lock(&core.incoming).last_error = Some(e.to_string());
        set_status(&core, MigrationStatus::Failed);
        return;
    }
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a migration connection failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        if !speaks(&stream, core.cfg.incoming_first_byte_timeout, &peer) {
            continue;
        }
        tracing::info!(%peer, "incoming migration");
        set_status(&core, MigrationStatus::Active);
        let dest = with_current_authz(&core, &dest);
        let r = migration_engine::receive(stream, &dest, &mut |e| {
            tracing::info!(%peer, "incoming: {e}");
        });
        match r {
            Ok((vm, summary)) => {
                tracing::info!(%peer, "the received guest runs here");
                install(&core, vm, summary);
                return;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e,
                    "incoming migration failed; dropped what it sent, listening again");
                {
                    let mut inc = lock(&core.incoming);
                    inc.last_error = Some(e.to_string());
                    inc.failed_attempts += 1;
                }
                set_status(&core, MigrationStatus::Failed);
                set_status(&core, MigrationStatus::Setup);
            }
        }
    }
}

impl VmService {
    /// `migrate-incoming`: listens on `uri` (`tcp:HOST:PORT`, port 0 picks a free port) and
    /// receives a guest on its own thread; returns the address it listens on.
    pub fn migrate_incoming(&self, uri: &str) -> Result<SocketAddr, ControlError> {
        let addr = tcp_addr(uri)?;
        // `tls-creds` set on the monitor before `migrate-incoming` (as with QEMU) takes the
        // place of the one given on the command line.
        let tls = crate::params::server_tls(&self.core.lock().params)?;
        let mut inc = lock(&self.core.incoming);
        let mut dest = inc.dest.clone().ok_or(ControlError::NotIncoming)?;
        if tls.is_some() {
            dest.tls = tls;
        }
        if inc.listening.is_some() || inc.summary.is_some() {
            return Err(ControlError::IncomingStarted);
        }
        let listen_err = |source| ControlError::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(listen_err)?;
        let local = listener.local_addr().map_err(listen_err)?;
        let core = Arc::clone(&self.core);
        let tls = dest.tls.clone();
        std::thread::Builder::new()
            .name("migration-incoming".into())
            .spawn(move || accept_loop(core, listener, dest))
            .map_err(ControlError::Spawn)?;
        inc.listening = Some(local);
        drop(inc);
        match &tls {
            Some(t) => {
                tracing::info!(%local, creds = %t.dir().display(), authz = ?t.authz(),
                    "waiting for an incoming migration over TLS");
            }
            None if !local.ip().is_loopback() => {
                tracing::warn!(%local,
                    "listening for a migration in plain text on a non-loopback address: \
                     anyone who reaches it can read the guest's memory and send a guest \
                     (use --tls-creds)");
            }
            None => tracing::info!(%local, "waiting for an incoming migration"),
        }
        set_status(&self.core, MigrationStatus::Setup);
        Ok(local)
    }

    /// The address the destination listens on, once `migrate-incoming` ran.
    pub fn incoming_address(&self) -> Option<SocketAddr> {
        lock(&self.core.incoming).listening
    }

    /// What the destination received, once the guest runs here.
    pub fn incoming_summary(&self) -> Option<IncomingSummary> {
        lock(&self.core.incoming).summary.clone()
    }

    /// `query-migrate` on a destination (`{}` in a process that is not one, or before
    /// `migrate-incoming`).
    pub(crate) fn incoming_info(&self) -> Value {
        let inc = lock(&self.core.incoming);
        let Some(addr) = inc.listening else {
            return json!({});
        };
        let mut v = json!({
            "status": status_name(inc.status),
            "socket-address": [{
                "type": "inet",
                "host": addr.ip().to_string(),
                "port": addr.port().to_string(),
            }],
        });
        if let Some(s) = &inc.summary {
            v["total-time"] = json!(s.total_ms.round() as u64);
            v["ram"] = json!({
                "transferred": s.bytes,
                "duplicate": s.zero_pages,
                "normal": s.pages - s.zero_pages.min(s.pages),
                "normal-bytes": (s.pages - s.zero_pages.min(s.pages)) * kvm_dirty::PAGE_SIZE,
                "page-size": kvm_dirty::PAGE_SIZE,
            });
        }
        if let Some(e) = &inc.last_error {
            v["x-ringvisor-failed-attempts"] = json!(inc.failed_attempts);
            v["x-ringvisor-last-error"] = json!(e);
        }
        v
    }

    pub(crate) fn cmd_migrate_incoming(&self, args: &Args) -> Result<Value, CommandError> {
        let uri = args.required_str("uri")?;
        args.deny_unknown(&["uri"])?;
        self.migrate_incoming(uri)?;
        Ok(json!({}))
    }
}
