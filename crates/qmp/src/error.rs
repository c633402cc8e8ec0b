//! Errors: the QMP error object a command answers with ([`CommandError`], [`ErrorClass`])
//! and the crate's own failures ([`QmpError`] for the server, [`ClientError`] for the
//! client).

use std::fmt;
use std::io;
use std::path::PathBuf;

/// QEMU's QMP error classes (`qapi/error.json`, `QapiErrorClass`). New code uses
/// `GenericError` unless a client is known to branch on the class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Everything without a more specific class (bad arguments, failed operations).
    GenericError,
    /// The command does not exist, or cannot run in the current state (before or after
    /// capabilities negotiation).
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// The named device does not exist.
    DeviceNotFound,
    /// The KVM capability a command needs is missing.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }

    /// Parses a wire name. QEMU may add classes; a client that does not know one treats it
    /// as `GenericError` (what `qemu.qmp` does too), so unknown names map to that.
    pub fn from_wire(name: &str) -> ErrorClass {
        match name {
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KVMMissingCap,
            _ => ErrorClass::GenericError,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command's failure as QMP reports it: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct CommandError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable description (QEMU's wording where QEMU has the case).
    pub desc: String,
}

impl CommandError {
    /// A `GenericError` with this description.
    pub fn generic(desc: impl Into<String>) -> Self {
        CommandError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of `class` with this description.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        CommandError {
            class,
            desc: desc.into(),
        }
    }

    /// QEMU's answer to an unknown command: `The command NAME has not been found`.
    pub fn command_not_found(name: &str) -> Self {
        CommandError::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }
}

/// Why a [`crate::QmpServer`] could not be started.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The path exists and is not a socket; the server never replaces such a file.
    #[error("QMP socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another server answers on the path.
    #[error("QMP socket {0} is in use by a running server")]
    InUse(PathBuf),
    /// The path does not fit `sockaddr_un` or contains a NUL byte.
    #[error("QMP socket path {0} is not usable (longer than 107 bytes or contains NUL)")]
    BadPath(PathBuf),
    /// Creating, binding, restricting or listening on the socket failed.
    #[error("cannot create QMP socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The accept thread could not be spawned.
    #[error("cannot start the QMP accept thread: {0}")]
    Spawn(io::Error),
    /// The accept thread could not install its seccomp filter.
    #[error("QMP accept thread: {0}")]
    Sandbox(#[from] sandbox::SandboxError),
}

/// Why a [`crate::QmpClient`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the socket failed.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The server did not answer before the deadline.
    #[error("QMP server did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The server closed the connection.
    #[error("QMP server closed the connection")]
    Closed,
    /// The server sent a message larger than the client accepts.
    #[error("QMP server sent a message larger than {0} bytes")]
    TooLarge(usize),
    /// The server sent something that is not QMP (bad JSON, a bad greeting, ...).
    #[error("QMP protocol violation by the server: {0}")]
    Protocol(String),
    /// The server answered with an error that carries no `id`: it could not parse what
    /// this client sent.
    #[error("QMP server rejected the input: {0}")]
    Rejected(CommandError),
    /// The command failed.
    #[error("QMP command failed: {0}")]
    Command(CommandError),
    /// `arguments` given to [`crate::QmpClient::execute`] is neither an object nor null.
    #[error("QMP command arguments must be a JSON object")]
    ArgumentsNotObject,
    /// An earlier failure left the stream in an unknown state; reconnect.
    #[error("QMP connection unusable after an earlier error")]
    Broken,
}
