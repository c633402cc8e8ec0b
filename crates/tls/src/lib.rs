//! ringvisor's migration channel: plain TCP, or TLS 1.3 (rustls with the `ring` provider)
//! with mutual x509 authentication, as QEMU's `tls-creds-x509` + `tls-authz` give it.
//!
//! - [`creds`]: a credentials directory laid out as QEMU's (`ca-cert.pem`,
//!   `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`) loaded into
//!   a [`ServerTls`] (destination) or a [`ClientTls`] (source); both sides require the
//!   peer's certificate to chain to `ca-cert.pem`.
//! - [`identity`]: who the peer is (its leaf certificate's subject CN and DNS names) and the
//!   `tls-authz` check against a list of allowed names.
//! - [`channel`]: one connection, plain or TLS, split into a reader and a writer that may be
//!   used from different threads; plain TCP stays a bare `TcpStream` underneath (the same
//!   bytes, one branch per buffered read or write); TLS runs rustls for the handshake and
//!   then the record layer per direction itself.
//! - [`record`]: the TLS 1.3 record layer (`ring::aead`) after the handshake.
//! - [`generate`]: a fresh test CA and the five files (`ringvisor tls-creds`).
//!
//! The crate knows nothing of the migration protocol; it may not touch guests or KVM.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod channel;
pub mod creds;
pub mod generate;
pub mod identity;
pub mod record;
mod sys;

pub use channel::{Channel, ChannelReader, ChannelWriter};
pub use creds::{
    ClientTls, ServerTls, ALPN_AEAD_INTEGRITY, ALPN_BASE, CA_CERT, CLIENT_CERT, CLIENT_KEY,
    SERVER_CERT, SERVER_KEY,
};
pub use generate::{generate, GenerateOptions};
pub use identity::PeerIdentity;
pub use record::RecordError;

use std::path::PathBuf;

/// Why TLS set-up, a handshake or an authorization failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file could not be read.
    #[error("TLS credentials: cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (in the message, so it is not repeated as a source).
        error: std::io::Error,
    },
    /// A credentials file holds no usable PEM item of the kind expected.
    #[error("TLS credentials: {path} holds no {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// A certificate, a private key.
        what: &'static str,
    },
    /// rustls refused the credentials (a key that does not match its certificate, an
    /// unusable CA certificate).
    #[error("TLS credentials in {dir}: {reason}")]
    Config {
        /// The directory.
        dir: PathBuf,
        /// rustls' reason.
        reason: String,
    },
    /// The host name to verify the server's certificate for is not a DNS name or IP address.
    #[error("TLS: '{0}' is not a valid host name or IP address to verify the server for")]
    ServerName(String),
    /// The TLS handshake failed (a certificate from another CA, a wrong host name, a peer
    /// that does not speak TLS, ...).
    #[error("TLS handshake with the peer failed: {0}")]
    Handshake(rustls::Error),
    /// The peer did not complete the handshake before its deadline.
    #[error("TLS handshake timed out after {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during the TLS handshake")]
    HandshakeEof,
    /// The socket failed during the handshake.
    #[error("TLS handshake: socket: {0}")]
    Io(#[from] std::io::Error),
    /// The negotiated traffic keys could not be taken over by the record layer.
    #[error("TLS record layer: {0}")]
    Record(#[from] RecordError),
    /// The peer's certificate was valid but names no identity in the `tls-authz` list.
    #[error("TLS peer identity {presented:?} is not authorized (tls-authz allows {allowed:?})")]
    NotAuthorized {
        /// The names the peer's certificate carries (subject CN, DNS names).
        presented: Vec<String>,
        /// The allowed names.
        allowed: Vec<String>,
    },
    /// Writing generated credentials failed or would overwrite a file.
    #[error("TLS credentials: {path} exists (use --force to overwrite)")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Generating a key or a certificate failed.
    #[error("generating TLS credentials: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a generated file failed.
    #[error("writing {path}: {error}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why (in the message).
        error: std::io::Error,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, TlsError>;
