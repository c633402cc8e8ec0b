//! Who the peer is: the subject common name and the DNS names of its leaf certificate, and
//! the `tls-authz` check. QEMU's `authz-list` matches the whole distinguished name
//! (`CN=...,O=...`); ringvisor matches a name in the certificate (its CN or one of its DNS
//! subject alternative names), which is what the generated credentials carry.

use rustls::pki_types::CertificateDer;

use crate::{Result, TlsError};

/// The identity a verified peer certificate presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's common name (the first CN, if any).
    pub common_name: Option<String>,
    /// The DNS names of the subject alternative name extension.
    pub dns_names: Vec<String>,
}

impl PeerIdentity {
    /// Reads the identity of a (verified) leaf certificate. A certificate whose subject does
    /// not parse yields no common name rather than an error: it was already verified, and
    /// an identity it does not present cannot be authorized.
    pub fn from_cert(der: &CertificateDer<'_>) -> PeerIdentity {
        let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
            return PeerIdentity::default();
        };
        PeerIdentity {
            common_name: common_name(cert.subject()),
            dns_names: cert.valid_dns_names().map(str::to_string).collect(),
        }
    }

    /// Every name presented: the CN first, then the DNS names.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.common_name.iter().cloned().collect();
        v.extend(
            self.dns_names
                .iter()
                .filter(|n| Some(*n) != self.common_name.as_ref())
                .cloned(),
        );
        v
    }

    /// Whether one of the names is in `allowed` (exact, case-insensitive for ASCII as DNS
    /// names are).
    pub fn is_allowed(&self, allowed: &[String]) -> bool {
        self.names()
            .iter()
            .any(|n| allowed.iter().any(|a| a.eq_ignore_ascii_case(n)))
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = self.names();
        if names.is_empty() {
            f.write_str("(no name)")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// `Ok` when `allowed` is empty (any certificate from the CA) or the peer presents an
/// allowed name; otherwise [`TlsError::NotAuthorized`]. A plain connection has no peer
/// identity and passes only an empty list.
pub(crate) fn check_authz(peer: Option<&PeerIdentity>, allowed: &[String]) -> Result<()> {
    if allowed.is_empty() || peer.is_some_and(|p| p.is_allowed(allowed)) {
        return Ok(());
    }
    Err(TlsError::NotAuthorized {
        presented: peer.map(PeerIdentity::names).unwrap_or_default(),
        allowed: allowed.to_vec(),
    })
}

/// One DER TLV: (tag, contents, rest). `None` for anything malformed or longer than the
/// input (the input is a verified certificate's subject, but it is parsed defensively).
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, d) = d.split_first()?;
    let (&l0, mut d) = d.split_first()?;
    let len = if l0 < 0x80 {
        usize::from(l0)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || d.len() < n {
            return None;
        }
        let len = d[..n]
            .iter()
            .fold(0usize, |a, &b| (a << 8) | usize::from(b));
        d = &d[n..];
        len
    };
    (d.len() >= len).then(|| (tag, &d[..len], &d[len..]))
}

/// The id-at-commonName OID (2.5.4.3), DER contents.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// DER tags: SEQUENCE, SET, OBJECT IDENTIFIER.
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The first common name of a DER `Name` (`SEQUENCE OF SET OF AttributeTypeAndValue`);
/// `subject` is the contents of the outer SEQUENCE, as webpki gives it.
fn common_name(subject: &[u8]) -> Option<String> {
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (tag, set, rest) = tlv(rdns)?;
        rdns = rest;
        if tag != SET {
            return None;
        }
        let mut atvs = set;
        while !atvs.is_empty() {
            let (tag, atv, rest) = tlv(atvs)?;
            atvs = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = tlv(atv)?;
            if tag == OID && oid == OID_CN {
                // UTF8String, PrintableString, IA5String, ... all carry the bytes as text.
                let (_, text, _) = tlv(value)?;
                return std::str::from_utf8(text).ok().map(str::to_string);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cn: Option<&str>, dns: &[&str]) -> PeerIdentity {
        PeerIdentity {
            common_name: cn.map(str::to_string),
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn authz_allows_a_listed_cn_or_dns_name_and_nothing_else() {
        let allow = vec!["src-a".to_string(), "Host.Example".to_string()];
        assert!(check_authz(Some(&id(Some("src-a"), &[])), &allow).is_ok());
        assert!(check_authz(Some(&id(Some("x"), &["host.example"])), &allow).is_ok());
        assert!(matches!(
            check_authz(Some(&id(Some("src-b"), &["other"])), &allow),
            Err(TlsError::NotAuthorized { presented, .. }) if presented == ["src-b", "other"]
        ));
        assert!(
            check_authz(None, &allow).is_err(),
            "a plain peer has no identity"
        );
        assert!(
            check_authz(None, &[]).is_ok(),
            "an empty list allows any peer"
        );
    }

    #[test]
    fn the_common_name_is_read_from_a_der_name_and_garbage_gives_none() {
        // SET { SEQUENCE { OID 2.5.4.6 (C), PrintableString "DE" } },
        // SET { SEQUENCE { OID 2.5.4.3 (CN), UTF8String "dest" } }
        let name = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'D', b'E', 0x31,
            0x0d, 0x30, 0x0b, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x04, b'd', b'e', b's', b't',
        ];
        assert_eq!(common_name(&name).as_deref(), Some("dest"));
        assert_eq!(common_name(&name[..9]), None, "truncated");
        assert_eq!(common_name(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[]), None);
    }
}
