//! Parsing of byte sizes given on the command line, such as `--device-memory 80GiB`.
//!
//! Accepted: a number (whole or with a fraction), optional spaces, then an optional unit.
//! `K`, `M`, `G`, `T` and `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024 (as GPU memory is
//! usually quoted: "80G" means 80 GiB); `KB`, `MB`, `GB`, `TB` are powers of 1000; `B` or no
//! unit is bytes. Units are case-insensitive.
//!
//! Invariants: the result is a whole number of bytes greater than zero that fits in `usize`;
//! anything else is an error that says what was expected. Parsing never panics.

/// Parses a size such as `80GiB`, `80G`, `81920MiB`, `1.5 TiB` or `85899345920`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit = unit.trim();
    let invalid = |why: &str| {
        format!(
            "invalid size {text:?}: {why} (expected e.g. 80GiB, 80G, 81920MiB, or a number of bytes)"
        )
    };
    if number.is_empty() {
        return Err(invalid("it does not start with a number"));
    }
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(invalid(&format!("unknown unit {unit:?}"))),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if fraction.contains('.') || (whole.is_empty() && fraction.is_empty()) {
        return Err(invalid("not a number"));
    }
    if fraction.len() > 12 {
        return Err(invalid("too many decimals"));
    }
    let digits = |d: &str| -> Result<u128, String> {
        if d.is_empty() {
            Ok(0)
        } else {
            d.parse::<u128>().map_err(|_| invalid("number too large"))
        }
    };
    // Exact arithmetic: bytes = (whole + fraction / 10^len) * multiplier, rounded down.
    let scale = 10u128.pow(fraction.len() as u32);
    let bytes = digits(whole)?
        .checked_mul(scale)
        .and_then(|n| n.checked_add(digits(fraction).ok()?))
        .and_then(|n| n.checked_mul(multiplier))
        .map(|n| n / scale)
        .ok_or_else(|| invalid("number too large"))?;
    if bytes == 0 {
        return Err(invalid("the size must be greater than zero"));
    }
    usize::try_from(bytes).map_err(|_| invalid("larger than this machine can address"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn accepts_the_usual_spellings() {
        assert_eq!(parse_size("80GiB"), Ok(80 << 30));
        assert_eq!(parse_size("80G"), Ok(80 << 30));
        assert_eq!(parse_size("80g"), Ok(80 << 30));
        assert_eq!(parse_size("81920MiB"), Ok(80 << 30));
        assert_eq!(parse_size("85899345920"), Ok(80 << 30));
        assert_eq!(parse_size(" 80 GiB "), Ok(80 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("80GB"), Ok(80_000_000_000));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
    }

    #[test]
    fn rejects_nonsense_with_a_reason() {
        for bad in [
            "", "GiB", "80XB", "-1G", "0", "0GiB", "1.2.3G", ".", "80 G B", "1e9",
        ] {
            let err = parse_size(bad).expect_err(bad);
            assert!(err.contains("invalid size"), "{bad}: {err}");
        }
        assert!(parse_size("99999999999999999999999999999999999999999TiB").is_err());
        assert!(parse_size("1.0000000000000000001G").is_err());
    }
}
