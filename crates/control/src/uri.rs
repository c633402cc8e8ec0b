//! Migration URIs as QEMU spells them: `tcp:HOST:PORT` (`HOST` may be `[v6]`).

use crate::error::ControlError;

/// `HOST:PORT` of a `tcp:HOST:PORT` URI, as given (resolution happens later: on the job
/// thread for an outgoing migration, so a bad host is a failed job, never a lost guest).
pub fn tcp_addr(uri: &str) -> Result<&str, ControlError> {
    let Some(rest) = uri.strip_prefix("tcp:") else {
        return Err(ControlError::UnsupportedUri(uri.to_string()));
    };
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.is_empty() => Ok(rest),
        _ => Err(ControlError::BadUri(uri.to_string())),
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
    fn tcp_uris_give_host_and_port_and_other_schemes_are_refused() {
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
        assert!(matches!(tcp_addr("tcp:4444"), Err(ControlError::BadUri(_))));
        assert!(matches!(
            tcp_addr("tcp::4444"),
            Err(ControlError::BadUri(_))
        ));
        assert!(matches!(
            tcp_addr("tcp:host:"),
            Err(ControlError::BadUri(_))
        ));
        assert_eq!(with_scheme("1.2.3.4:5"), "tcp:1.2.3.4:5");
        assert_eq!(with_scheme("tcp:1.2.3.4:5"), "tcp:1.2.3.4:5");
        assert_eq!(with_scheme("unix:/x"), "unix:/x");
    }
}
