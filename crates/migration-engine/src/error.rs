//! Engine errors.

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream broke or carried something invalid.
    #[error(transparent)]
    Wire(#[from] migration::wire::WireError),
    /// Socket setup.
    #[error("migration socket: {0}")]
    Io(#[from] std::io::Error),
    /// The VMM failed (creating the VM, reading memory, vCPU state).
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] kvm_dirty::DirtyError),
    /// The layout was invalid.
    #[error(transparent)]
    Layout(#[from] migration::wire::LayoutError),
    /// The memory digests differ: a page was lost or corrupted.
    #[error("memory verification failed: {0}")]
    Digest(migration::digest::DigestError),
    /// The destination reported an error.
    #[error("destination failed: {0}")]
    Destination(String),
    /// The source abandoned the migration.
    #[error("the source aborted the migration: {0}")]
    SourceAborted(String),
    /// The peer sent nothing complete in time: the handshake (preamble, Hello, Layout) took
    /// longer than its deadline, no frame completed within the progress deadline, or no
    /// Commit came within the commit deadline.
    #[error("the source stalled ({phase} deadline of {limit:?} passed)")]
    Stalled {
        /// `handshake`, `progress` or `commit`.
        phase: &'static str,
        /// The deadline that passed.
        limit: std::time::Duration,
    },
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The operator cancelled the migration (`migrate_cancel`); the guest keeps running on the
    /// source.
    #[error("migration cancelled")]
    Cancelled,
    /// The destination could not be reached.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The address as given.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The thread's seccomp filter could not be installed (nothing was read or sent).
    #[error("seccomp: {0}")]
    Sandbox(#[from] sandbox::SandboxError),
    /// TLS on the migration channel failed: credentials, the handshake (a certificate from
    /// another CA, a wrong host name, a peer that does not speak TLS) or `tls-authz`.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// This source spoke plain TCP and the destination answered with a TLS alert.
    #[error("the destination requires TLS (it answered with a TLS alert): set tls-creds")]
    DestinationRequiresTls,
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, MigrationError>;
