//! Migration URIs as QEMU spells them: `tcp:HOST:PORT` (`HOST` may be `[v6]`).

use crate::error::ControlError;

/// `HOST:PORT` of a `tcp:HOST:PORT` URI, as given. Only the scheme is checked here: the
/// address is resolved later, on the job thread for an outgoing migration, so a bad host or
/// port is a failed job with the reason in `error-desc` (as in QEMU), never a lost guest.
pub fn tcp_addr(uri: &str) -> Result<&str, ControlError> {
    match uri.strip_prefix("tcp:") {
        None => Err(ControlError::UnsupportedUri(uri.to_string())),
        Some("") => Err(ControlError::BadUri(uri.to_string())),
        Some(rest) => Ok(rest),
    }
}

/// A CLI destination: `tcp:HOST:PORT`, or `HOST:PORT` (the scheme is then implied).
pub fn with_scheme(addr: &str) -> String {
    if addr.contains("://") || addr.starts_with("tcp:") || addr.starts_with("unix:") {
        addr.to_string()
    } else {
        format!("tcp:{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uris_give_their_address_and_other_schemes_are_refused() {
        assert_eq!(tcp_addr("tcp:127.0.0.1:4444").unwrap(), "127.0.0.1:4444");
        assert_eq!(tcp_addr("tcp:[::1]:0").unwrap(), "[::1]:0");
        assert_eq!(tcp_addr("tcp:notanaddr:1").unwrap(), "notanaddr:1");
        assert!(matches!(
            tcp_addr("unix:/tmp/x"),
            Err(ControlError::UnsupportedUri(_))
        ));
        assert!(matches!(
            tcp_addr("exec:cat"),
            Err(ControlError::UnsupportedUri(_))
        ));
        // Resolved (and refused) later, by the job: a failed migration, not a refused command.
        assert_eq!(tcp_addr("tcp:notanaddr").unwrap(), "notanaddr");
        assert!(matches!(tcp_addr("tcp:"), Err(ControlError::BadUri(_))));
        assert_eq!(with_scheme("1.2.3.4:5"), "tcp:1.2.3.4:5");
        assert_eq!(with_scheme("tcp:1.2.3.4:5"), "tcp:1.2.3.4:5");
        assert_eq!(with_scheme("unix:/x"), "unix:/x");
    }
}
