//! Size and rate arguments as QEMU users write them: `1G`, `256M`, `512MiB`, `800MiB/s`,
//! `4096` (bytes). Binary multiples (K = 1024).

use anyhow::{bail, Result};

/// Parses a size in bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mul) = match t.chars().last() {
        Some(c @ ('K' | 'k' | 'M' | 'm' | 'G' | 'g' | 'T' | 't')) => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => 1 << 40,
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("'{s}' is not a size (examples: 4096, 256M, 1G, 800MiB/s)"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("'{s}' must be a non-negative size");
    }
    let bytes = v * mul as f64;
    if bytes > u64::MAX as f64 / 2.0 {
        bail!("'{s}' is too large");
    }
    Ok(bytes as u64)
}

/// clap value parser for sizes.
pub fn size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("800MiB/s").unwrap(), 800 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert!(parse_size("fast").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("").is_err());
    }
}
