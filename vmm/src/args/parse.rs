//! Parsers of the sizes and durations the commands take (`64MiB`, `100ms`, `30s`).

use std::time::Duration;

/// Parses a size: a byte count, or a number with a binary unit (KiB, MiB, GiB, TiB; K, M,
/// G, T; B), case-insensitive.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size: use a byte count or a number with KiB, MiB, GiB or TiB"
        ));
    }
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{s}': use a byte count or KiB, MiB, GiB or TiB"
            ));
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses a duration where plain numbers are milliseconds: 100ms, 2s, 500us, 100.
pub fn parse_ms(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1e-3)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v * scale < 1e7 => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!(
            "'{s}' is not a duration like 100ms, 2s or 500us (plain numbers are ms)"
        )),
    }
}

/// As [`parse_ms`], and zero is allowed (`0`, `0ms`, `0us`).
pub fn parse_ms_or_zero(s: &str) -> std::result::Result<Duration, String> {
    let t = s
        .trim()
        .trim_end_matches("ms")
        .trim_end_matches("us")
        .trim_end_matches('s');
    if t.trim().parse::<f64>() == Ok(0.0) {
        return Ok(Duration::ZERO);
    }
    parse_ms(s)
}

/// Parses a duration where plain numbers are seconds: 30, 30s, 2m, 500ms.
pub fn parse_secs(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    if let Some(m) = t.strip_suffix('m').filter(|m| !m.ends_with('m')) {
        return m
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| *v > 0.0 && *v < 1e6)
            .map(|v| Duration::from_secs_f64(v * 60.0))
            .ok_or_else(|| format!("'{s}' is not a duration like 30s or 2m"));
    }
    if t.ends_with("ms") || t.ends_with("us") || t.ends_with('s') {
        return parse_ms(t);
    }
    parse_ms(&format!("{t}s"))
}

/// Parses a file mode in octal (`600`, `0660`, `0o640`): only the permission bits, at most
/// 777.
pub fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!(
            "'{s}' is not an octal mode like 600 or 660 (digits 0 to 7)"
        ));
    }
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "'{s}' has bits beyond 777: only the permission bits may be given"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size(" 8 KiB "), Ok(8192));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("2GB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn durations_that_may_be_zero_parse_and_bad_ones_are_refused() {
        for z in ["0", "0ms", "0us", "0s", " 0.0ms "] {
            assert_eq!(parse_ms_or_zero(z), Ok(Duration::ZERO), "{z}");
        }
        assert_eq!(parse_ms_or_zero("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_ms_or_zero("250us"), Ok(Duration::from_micros(250)));
        for bad in ["", "-1ms", "abc", "0x", "1 h", "nan"] {
            let e = parse_ms_or_zero(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad}: {e}");
        }
        // Where zero means nothing sensible, it stays refused.
        assert!(parse_ms("0").is_err());
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert_eq!(parse_mode("777"), Ok(0o777));
        for bad in ["", "rw", "680", "-600", "+600", "6 0", "0x1ff"] {
            assert!(parse_mode(bad).is_err(), "{bad:?} is not octal");
        }
        for too_wide in ["1777", "4755", "7777", "77777777777777"] {
            assert!(
                parse_mode(too_wide).is_err(),
                "{too_wide:?} has bits beyond 777"
            );
        }
    }
}
