//! Parsing of memory sizes such as `64M`, `1G`, `512K` or `4096`.

/// Why a size string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional K/M/G/T suffix.
    #[error(
        "invalid size {0:?}: expected a number with an optional K, M, G or T suffix (e.g. 64M, 1G)"
    )]
    Syntax(String),
    /// The value does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a byte count with an optional binary suffix (K, M, G, T; an
/// optional trailing `B` or `iB` is accepted).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let body = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, shift) = match body.chars().last() {
        Some('K') => (&body[..body.len() - 1], 10),
        Some('M') => (&body[..body.len() - 1], 20),
        Some('G') => (&body[..body.len() - 1], 30),
        Some('T') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::Syntax(s.to_string()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// [`parse_size`] for a command-line flag (clap's `value_parser`).
pub fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A comma-separated list of sizes for a command-line flag.
pub fn sizes_arg(s: &str) -> Result<Vec<u64>, String> {
    s.split(',').map(size_arg).collect()
}

/// Formats a byte count for people (`256 MiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512KB"), Ok(512 << 10));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse_size(""), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("M"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("-1M"), Err(SizeError::Syntax(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Syntax(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(4097), "4097 bytes");
    }
}
