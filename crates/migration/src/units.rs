//! Parsers for the sizes, rates and durations users type: `1G`, `128M`, `800MiB/s`,
//! `10Gbit/s`, `300ms`.
//!
//! Suffix rules (case-insensitive): none = bytes; `K`/`M`/`G`/`T`, `KiB`/`MiB`/... and
//! `KB`/`MB`/... are all binary, as QEMU's `qemu_strtosz` takes them (`-m 1G` and
//! `max-bandwidth 1GB` are 2^30); a `bit` suffix (`Mbit`, `Gbit`, also `b` as in `Gb`) means
//! decimal bits, as network links are rated. Rates may end in `/s` or `ps`. Decimals are
//! allowed (`1.5G`); the result is rounded down to whole bytes.

/// A value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Nothing to parse.
    #[error("empty value")]
    Empty,
    /// The number part is missing or not a decimal number.
    #[error("{input:?}: not a number followed by an optional unit")]
    InvalidNumber {
        /// The input.
        input: String,
    },
    /// The unit is not one this parser knows.
    #[error("{input:?}: unknown unit {unit:?} (use e.g. K, M, G, MiB, GB, Gbit, ms, s)")]
    UnknownUnit {
        /// The input.
        input: String,
        /// The unit part.
        unit: String,
    },
    /// The value does not fit in 64 bits.
    #[error("{input:?}: value too large")]
    Overflow {
        /// The input.
        input: String,
    },
}

/// Splits "1.5GiB" into ("1.5", "GiB") after trimming.
fn split(input: &str) -> Result<(&str, &str), UnitError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(UnitError::Empty);
    }
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return Err(UnitError::InvalidNumber {
            input: input.to_owned(),
        });
    }
    Ok((num, unit.trim()))
}

/// `num × mul / div`, exact on the integer and fractional digits, rounded down.
fn scale(input: &str, num: &str, mul: u128, div: u128) -> Result<u64, UnitError> {
    let overflow = || UnitError::Overflow {
        input: input.to_owned(),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.len() > 30 || frac.len() > 18 {
        return Err(overflow());
    }
    let digits: u128 = format!("{int}{frac}").parse().map_err(|_| overflow())?;
    let den = 10u128.pow(frac.len() as u32) * div;
    let v = digits.checked_mul(mul).ok_or_else(overflow)? / den;
    u64::try_from(v).map_err(|_| overflow())
}

fn byte_multiplier(unit: &str) -> Option<(u128, u128)> {
    let u = unit.to_ascii_lowercase();
    let power = |c: char| match c {
        'k' => Some(1u32),
        'm' => Some(2),
        'g' => Some(3),
        't' => Some(4),
        _ => None,
    };
    if unit.is_empty() || unit == "B" {
        return Some((1, 1));
    }
    if unit == "b" || u == "bit" {
        return Some((1, 8));
    }
    let mut chars = u.chars();
    let p = power(chars.next()?)?;
    let tail = chars.as_str();
    match tail {
        "" | "ib" => Some((1u128 << (10 * p), 1)),
        "b" if unit.ends_with('B') => Some((1u128 << (10 * p), 1)),
        "b" | "bit" => Some((10u128.pow(3 * p), 8)),
        _ => None,
    }
}

/// Parses a size in bytes: `4096`, `128M`, `1G`, `1.5GiB`, `500MB` (binary).
///
/// ```
/// use migration::units::parse_size;
/// assert_eq!(parse_size("1G").unwrap(), 1 << 30);
/// assert_eq!(parse_size("128M").unwrap(), 128 << 20);
/// assert_eq!(parse_size("2GB").unwrap(), 2 << 30);
/// assert!(parse_size("12Q").is_err());
/// ```
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let (num, unit) = split(input)?;
    let (mul, div) = byte_multiplier(unit).ok_or_else(|| UnitError::UnknownUnit {
        input: input.to_owned(),
        unit: unit.to_owned(),
    })?;
    scale(input, num, mul, div)
}

/// Parses a rate in bytes/s: `800MiB/s`, `128M`, `1Gbit/s`, `10Gbps`; `0` and `unlimited`
/// give 0 (no limit).
///
/// ```
/// use migration::units::parse_bandwidth;
/// assert_eq!(parse_bandwidth("800MiB/s").unwrap(), 800 << 20);
/// assert_eq!(parse_bandwidth("1Gbit/s").unwrap(), 125_000_000);
/// assert_eq!(parse_bandwidth("unlimited").unwrap(), 0);
/// ```
pub fn parse_bandwidth(input: &str) -> Result<u64, UnitError> {
    let s = input.trim();
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let lower = s.to_ascii_lowercase();
    let body = if lower.ends_with("/s") || (lower.ends_with("ps") && lower.len() > 2) {
        &s[..s.len() - 2]
    } else {
        s
    };
    let (num, unit) = split(body).map_err(|e| match e {
        UnitError::InvalidNumber { .. } => UnitError::InvalidNumber {
            input: input.to_owned(),
        },
        other => other,
    })?;
    let (mul, div) = byte_multiplier(unit).ok_or_else(|| UnitError::UnknownUnit {
        input: input.to_owned(),
        unit: unit.to_owned(),
    })?;
    scale(input, num, mul, div)
}

/// Parses a duration in milliseconds: `300` (ms), `300ms`, `1.5s`, `2m`, `1h`.
///
/// ```
/// use migration::units::parse_duration_ms;
/// assert_eq!(parse_duration_ms("300").unwrap(), 300);
/// assert_eq!(parse_duration_ms("1.5s").unwrap(), 1500);
/// assert_eq!(parse_duration_ms("2m").unwrap(), 120_000);
/// ```
pub fn parse_duration_ms(input: &str) -> Result<u64, UnitError> {
    let (num, unit) = split(input)?;
    let mul: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "ms" => 1,
        "s" | "sec" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(UnitError::UnknownUnit {
                input: input.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    scale(input, num, mul, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_with_or_without_a_b_suffix_as_qemu_takes_them() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 1g "), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1KB"), Ok(1024));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("8bit"), Ok(1));
    }

    #[test]
    fn bad_sizes_return_typed_errors() {
        assert_eq!(parse_size(""), Err(UnitError::Empty));
        assert!(matches!(
            parse_size("G"),
            Err(UnitError::InvalidNumber { .. })
        ));
        assert!(matches!(
            parse_size("1.2.3G"),
            Err(UnitError::InvalidNumber { .. })
        ));
        assert!(matches!(
            parse_size("-1G"),
            Err(UnitError::InvalidNumber { .. })
        ));
        assert!(matches!(
            parse_size("5X"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("5 apples"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("99999999999999999999T"),
            Err(UnitError::Overflow { .. })
        ));
        assert!(matches!(
            parse_size("17179869184G"),
            Err(UnitError::Overflow { .. })
        ));
    }

    #[test]
    fn bandwidths_accept_rates_bits_and_unlimited() {
        assert_eq!(parse_bandwidth("800MiB/s"), Ok(800 << 20));
        assert_eq!(parse_bandwidth("128M"), Ok(128 << 20));
        assert_eq!(parse_bandwidth("10Gbit/s"), Ok(1_250_000_000));
        assert_eq!(parse_bandwidth("1Gbps"), Ok(125_000_000));
        assert_eq!(parse_bandwidth("100MB/s"), Ok(100 << 20));
        assert_eq!(parse_bandwidth("1Gbit/s"), Ok(125_000_000));
        assert_eq!(parse_bandwidth("0"), Ok(0));
        assert_eq!(parse_bandwidth("Unlimited"), Ok(0));
        assert!(matches!(
            parse_bandwidth("fast"),
            Err(UnitError::InvalidNumber { .. })
        ));
        assert!(matches!(
            parse_bandwidth("1Q/s"),
            Err(UnitError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn durations_default_to_milliseconds() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert!(matches!(
            parse_duration_ms("3 days"),
            Err(UnitError::UnknownUnit { .. })
        ));
    }
}
