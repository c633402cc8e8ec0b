//! A fresh test CA and the five credential files, so the secure set-up is two commands
//! (`ringvisor tls-creds --dir D`, then `--tls-creds D` on both sides). The CA's private key
//! is not kept: nothing else can ever be signed by this CA.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::creds::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
use crate::{Result, TlsError};

/// What [`generate`] writes.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The source's certificate common name (what `--tls-authz` lists).
    pub client_name: String,
    /// The names the destination's certificate is valid for (DNS names or IP addresses;
    /// the first is also its common name). Default: `localhost`, `127.0.0.1`, `::1`.
    pub server_names: Vec<String>,
    /// Overwrite existing files.
    pub force: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            client_name: "ringvisor-client".into(),
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            force: false,
        }
    }
}

fn leaf(
    cn: &str,
    sans: &[String],
    eku: ExtendedKeyUsagePurpose,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(sans.to_vec())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    let cert = p.signed_by(&key, ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem` and
/// `client-key.pem` into `dir` (created 0700 if missing); keys are 0600. Refuses, before
/// writing anything, if one of them exists and `force` is off. Returns the files written.
pub fn generate(dir: &Path, opts: &GenerateOptions) -> Result<Vec<PathBuf>> {
    let names = [CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY];
    if !opts.force {
        if let Some(path) = names.iter().map(|n| dir.join(n)).find(|p| p.exists()) {
            return Err(TlsError::Exists { path });
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "ringvisor test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca.self_signed(&ca_key)?;
    let server_cn = opts
        .server_names
        .first()
        .map(String::as_str)
        .unwrap_or("localhost");
    let server = leaf(
        server_cn,
        &opts.server_names,
        ExtendedKeyUsagePurpose::ServerAuth,
        &ca,
        &ca_key,
    )?;
    // The client's name is its CN (what tls-authz matches); a DNS-shaped name also goes
    // into the SAN.
    let client_sans: Vec<String> = rcgen::Ia5String::try_from(opts.client_name.as_str())
        .ok()
        .filter(|_| is_dns_like(&opts.client_name))
        .map(|_| vec![opts.client_name.clone()])
        .unwrap_or_default();
    let client = leaf(
        &opts.client_name,
        &client_sans,
        ExtendedKeyUsagePurpose::ClientAuth,
        &ca,
        &ca_key,
    )?;
    let write = |name: &str, text: &str, mode: u32| -> Result<PathBuf> {
        let path = dir.join(name);
        let werr = |error| TlsError::Write {
            path: path.clone(),
            error,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(werr)?;
        // An existing file (--force) keeps its mode on open: set it.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(werr)?;
        f.write_all(text.as_bytes()).map_err(werr)?;
        Ok(path)
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| TlsError::Write {
            path: dir.to_path_buf(),
            error,
        })?;
    Ok(vec![
        write(CA_CERT, &ca.pem(), 0o644)?,
        write(SERVER_CERT, &server.0, 0o644)?,
        write(SERVER_KEY, &server.1, 0o600)?,
        write(CLIENT_CERT, &client.0, 0o644)?,
        write(CLIENT_KEY, &client.1, 0o600)?,
    ])
}

fn is_dns_like(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}
