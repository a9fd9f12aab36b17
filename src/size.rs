//! Human sizes on the command line: `4G`, `512MiB`, `1.5G`, `100M`, `4096`.
//!
//! Binary units are what people mean for sticks and image files (`truncate`,
//! `qemu-img` and `dd` agree), so `K/M/G/T` and `KiB/MiB/GiB/TiB` are powers of
//! 1024; the explicit SI spellings `KB/MB/GB/TB` are powers of 1000.

use thiserror::Error;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size {0:?} is empty; give a number with an optional unit, e.g. 4G or 512MiB")]
    Empty(String),
    #[error(
        "size {0:?} is not a number with a unit; use e.g. 4G, 512M, 512MiB, 1.5GiB or a byte count"
    )]
    Malformed(String),
    #[error(
        "size {0:?} has an unknown unit {1:?}; use K, M, G, T (or KiB/MiB/GiB/TiB, KB/MB/GB/TB)"
    )]
    UnknownUnit(String, String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

impl crate::error::Classify for SizeError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::BadInput
    }
}

/// Parses a size with an optional unit into bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SizeError::Empty(text.to_string()));
    }
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 {
        return Err(SizeError::Malformed(text.to_string()));
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(SizeError::UnknownUnit(text.to_string(), other.to_string())),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| SizeError::Overflow(text.to_string()))?
    };
    let mut bytes = whole
        .checked_mul(multiplier)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))?;
    if !fraction.is_empty() {
        // Fractions are exact decimal digits scaled by the unit, rounded down to a byte.
        let digits = fraction.len().min(9) as u32;
        let frac: u64 = fraction[..digits as usize]
            .parse()
            .map_err(|_| SizeError::Malformed(text.to_string()))?;
        let scaled = (frac as u128 * multiplier as u128) / 10u128.pow(digits);
        bytes = bytes
            .checked_add(scaled as u64)
            .ok_or_else(|| SizeError::Overflow(text.to_string()))?;
    }
    Ok(bytes)
}

/// Formats bytes for people: `1.5 GiB`, `64 MiB`, `512 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || (value.fract() == 0.0) {
        format!("{} {}", value as u64, UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Bytes as whole MiB, rounded up: what error messages show beside `--…-size-mb`.
pub fn mib_ceil(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_binary_unless_spelled_si() {
        assert_eq!(parse_size("4G"), Ok(4 * GIB));
        assert_eq!(parse_size("4GiB"), Ok(4 * GIB));
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("512 MiB"), Ok(512 * MIB));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("1KB"), Ok(1000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5G"), Ok(GIB + GIB / 2));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        assert!(matches!(parse_size(""), Err(SizeError::Empty(_))));
        assert!(matches!(parse_size("G"), Err(SizeError::Malformed(_))));
        assert!(matches!(
            parse_size("4X"),
            Err(SizeError::UnknownUnit(_, _))
        ));
        assert!(matches!(parse_size("1.2.3G"), Err(SizeError::Malformed(_))));
        assert!(matches!(
            parse_size("99999999999999999999T"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(parse_size("-1G"), Err(SizeError::Malformed(_))));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(64 * MIB), "64 MiB");
        assert_eq!(human(GIB + GIB / 2), "1.5 GiB");
    }
}
