//! A credentials directory laid out as QEMU's `tls-creds-x509` (`dir=`): the CA certificate
//! both sides verify their peer against, the destination's (server) certificate and key,
//! the source's (client) certificate and key. Both sides authenticate: the destination
//! requires a client certificate from the CA, the source verifies the destination's
//! certificate for the host it connects to (or `tls-hostname`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::channel::{handshake, Channel};
use crate::identity::{check_authz, PeerIdentity};
use crate::{Result, TlsError};

/// The CA certificate (PEM) both sides verify their peer's certificate against.
pub const CA_CERT: &str = "ca-cert.pem";
/// The destination's certificate chain (PEM, leaf first).
pub const SERVER_CERT: &str = "server-cert.pem";
/// The destination's private key (PEM, PKCS#8, SEC1 or PKCS#1).
pub const SERVER_KEY: &str = "server-key.pem";
/// The source's certificate chain (PEM, leaf first).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The source's private key.
pub const CLIENT_KEY: &str = "client-key.pem";

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(|c| c.ok())
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Pem {
        path: path.to_path_buf(),
        what: "private key",
    })
}

fn roots(dir: &Path) -> Result<RootCertStore> {
    let path = dir.join(CA_CERT);
    let mut roots = RootCertStore::empty();
    for c in certs(&path)? {
        roots.add(c).map_err(|e| config_err(dir, e))?;
    }
    Ok(roots)
}

fn config_err(dir: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Config {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    }
}

/// rustls with *ring* (no aws-lc: it needs cmake and a C toolchain at build time). rustls
/// deprecates the *ring* provider for lacking post-quantum key exchange; the migration
/// channel accepts that (TLS 1.3 with X25519 / P-256 / P-384, AES-GCM, ChaCha20-Poly1305).
///
/// X25519 comes first: the provider's default order starts with P-384, whose *ring*
/// implementation (generic bignum arithmetic) made the key exchange the larger part of a
/// handshake's CPU time; both groups stay available to a peer that asks.
///
/// AES-128-GCM comes first (TLS 1.3's mandatory suite, and kernel TLS's usual one): it seals
/// about 1.3x as fast as AES-256-GCM here (`--example throughput -- --aead 1`), and the
/// cipher is most of what TLS adds to a migration's CPU time. AES-256-GCM and
/// ChaCha20-Poly1305 stay available to a peer that prefers them.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, kx_group};
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// ALPN name of the capability "every byte of this stream is authenticated by the TLS
/// record layer, the protocol on top may drop its own checksums" (the migration stream's
/// frame CRC-32C). Both sides offer it; it is in force only when the server selected it, so
/// a peer that predates it (and sends or answers no ALPN) keeps the checksums.
pub const ALPN_AEAD_INTEGRITY: &[u8] = b"ringvisor-migration/aead-integrity";
/// ALPN name of the base protocol (checksums kept), offered after
/// [`ALPN_AEAD_INTEGRITY`] so that a later peer which offers other names but not this
/// capability still finds a protocol in common (rustls refuses a handshake whose ALPN lists
/// do not meet).
pub const ALPN_BASE: &[u8] = b"ringvisor-migration/base";

/// The ALPN list a side offers, in preference order: none at all without the capability
/// (exactly what a peer that predates it sends).
fn alpn(aead_integrity: bool) -> Vec<Vec<u8>> {
    if aead_integrity {
        vec![ALPN_AEAD_INTEGRITY.to_vec(), ALPN_BASE.to_vec()]
    } else {
        Vec::new()
    }
}

/// The destination's side: its certificate and key, the CA its sources' certificates must
/// chain to, and the identities allowed to connect (`tls-authz`; empty = any certificate
/// from the CA).
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    authz: Vec<String>,
    dir: PathBuf,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("dir", &self.dir)
            .field("authz", &self.authz)
            .finish()
    }
}

impl ServerTls {
    /// Loads `ca-cert.pem`, `server-cert.pem` and `server-key.pem` from `dir`. TLS 1.3
    /// only; a client certificate from the CA is required.
    pub fn load(dir: &Path, authz: &[String]) -> Result<Self> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider.clone())
                .build()
                .map_err(|e| config_err(dir, e))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(dir, e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&dir.join(SERVER_CERT))?, key(&dir.join(SERVER_KEY))?)
            .map_err(|e| config_err(dir, e))?;
        // One connection per migration, never resumed: no session tickets to send.
        config.send_tls13_tickets = 0;
        // The channel runs the record layer itself after the handshake.
        config.enable_secret_extraction = true;
        config.alpn_protocols = alpn(true);
        Ok(ServerTls {
            config: Arc::new(config),
            authz: authz.to_vec(),
            dir: dir.to_path_buf(),
        })
    }

    /// The credentials directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The allowed peer identities (empty: any certificate from the CA).
    pub fn authz(&self) -> &[String] {
        &self.authz
    }

    /// The same credentials with another `tls-authz` list (cheap: the configuration is
    /// shared).
    pub fn with_authz(&self, authz: &[String]) -> ServerTls {
        ServerTls {
            authz: authz.to_vec(),
            ..self.clone()
        }
    }

    /// The same credentials without the [`ALPN_AEAD_INTEGRITY`] capability and without
    /// ALPN, as a peer that predates it (the stream keeps its own checksums).
    pub fn without_aead_integrity(&self) -> ServerTls {
        let mut config = (*self.config).clone();
        config.alpn_protocols = alpn(false);
        ServerTls {
            config: Arc::new(config),
            ..self.clone()
        }
    }

    /// Runs the server side of the handshake on an accepted connection, within `timeout`.
    /// The source's certificate is verified; its identity is *not* yet checked against
    /// `tls-authz`: call [`authorize`](Self::authorize) (after the handshake the refusal
    /// can be told to the source over the channel).
    pub fn accept(&self, sock: TcpStream, timeout: Duration) -> Result<Channel> {
        let conn = ServerConnection::new(self.config.clone()).map_err(TlsError::Handshake)?;
        let mut conn = rustls::Connection::Server(conn);
        let rest = handshake(&mut conn, &sock, timeout)?;
        Channel::tls(sock, conn, rest)
    }

    /// Checks the peer of an accepted channel against `tls-authz`.
    pub fn authorize(&self, peer: Option<&PeerIdentity>) -> Result<()> {
        check_authz(peer, &self.authz)
    }
}

/// The source's side: its certificate and key, the CA the destination's certificate must
/// chain to, the host name to verify it for (`tls-hostname`; by default the host of the
/// migration URI) and the destination identities allowed (`tls-authz`; empty = any).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    authz: Vec<String>,
    hostname: Option<String>,
    dir: PathBuf,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("dir", &self.dir)
            .field("hostname", &self.hostname)
            .field("authz", &self.authz)
            .finish()
    }
}

impl ClientTls {
    /// Loads `ca-cert.pem`, `client-cert.pem` and `client-key.pem` from `dir`.
    pub fn load(dir: &Path, authz: &[String], hostname: Option<&str>) -> Result<Self> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(dir, e))?
            .with_root_certificates(roots(dir)?)
            .with_client_auth_cert(certs(&dir.join(CLIENT_CERT))?, key(&dir.join(CLIENT_KEY))?)
            .map_err(|e| config_err(dir, e))?;
        config.resumption = rustls::client::Resumption::disabled();
        config.enable_secret_extraction = true;
        config.alpn_protocols = alpn(true);
        if let Some(h) = hostname {
            server_name(h)?;
        }
        Ok(ClientTls {
            config: Arc::new(config),
            authz: authz.to_vec(),
            hostname: hostname.filter(|h| !h.is_empty()).map(str::to_string),
            dir: dir.to_path_buf(),
        })
    }

    /// The credentials directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The same credentials without the [`ALPN_AEAD_INTEGRITY`] capability and without
    /// ALPN, as a peer that predates it (the stream keeps its own checksums).
    pub fn without_aead_integrity(&self) -> ClientTls {
        let mut config = (*self.config).clone();
        config.alpn_protocols = alpn(false);
        ClientTls {
            config: Arc::new(config),
            ..self.clone()
        }
    }

    /// The name the server's certificate is verified for when connecting to `host`:
    /// `tls-hostname` if set, else `host` (brackets of an IPv6 literal removed).
    pub fn verify_name<'a>(&'a self, host: &'a str) -> &'a str {
        match &self.hostname {
            Some(h) => h,
            None => host.trim_start_matches('[').trim_end_matches(']'),
        }
    }

    /// Runs the client side of the handshake on a connected socket, within `timeout`,
    /// verifying the server's certificate for [`verify_name`](Self::verify_name)`(host)` and
    /// its identity against `tls-authz`.
    pub fn connect(&self, sock: TcpStream, host: &str, timeout: Duration) -> Result<Channel> {
        let name = server_name(self.verify_name(host))?;
        let conn = ClientConnection::new(self.config.clone(), name).map_err(TlsError::Handshake)?;
        let mut conn = rustls::Connection::Client(conn);
        let rest = handshake(&mut conn, &sock, timeout)?;
        let chan = Channel::tls(sock, conn, rest)?;
        check_authz(chan.peer(), &self.authz)?;
        Ok(chan)
    }
}

fn server_name(h: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(h.to_string()).map_err(|_| TlsError::ServerName(h.to_string()))
}

/// The host part of `HOST:PORT` (`[v6]:PORT` keeps its brackets; a string without a port is
/// the host).
pub fn host_of(addr: &str) -> &str {
    if addr.starts_with('[') {
        return match addr.find(']') {
            Some(i) => &addr[..=i],
            None => addr,
        };
    }
    match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x25519_is_offered_first_and_the_nist_groups_stay_available() {
        use rustls::NamedGroup;
        let names: Vec<NamedGroup> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(
            names,
            [
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1
            ]
        );
    }

    #[test]
    fn aes_128_gcm_is_offered_first_and_the_other_tls13_suites_stay_available() {
        use rustls::CipherSuite;
        let suites: Vec<CipherSuite> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            [
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
    }

    #[test]
    fn host_of_takes_the_host_of_every_address_form() {
        assert_eq!(host_of("127.0.0.1:4444"), "127.0.0.1");
        assert_eq!(host_of("[::1]:4444"), "[::1]");
        assert_eq!(host_of("dest.example:1"), "dest.example");
        assert_eq!(host_of("dest"), "dest");
    }

    #[test]
    fn missing_files_and_non_pem_are_typed_errors() {
        let dir = std::env::temp_dir().join(format!("tls-creds-missing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            ServerTls::load(&dir, &[]),
            Err(TlsError::Read { path, .. }) if path.ends_with(CA_CERT)
        ));
        std::fs::write(dir.join(CA_CERT), b"not a certificate").unwrap();
        assert!(matches!(
            ClientTls::load(&dir, &[], None),
            Err(TlsError::Pem {
                what: "certificate",
                ..
            })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
