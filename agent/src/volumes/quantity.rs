//! Kubernetes resource quantities (`250m`, `1Gi`, `1e3`) as exact nano-units, for the
//! downward API's divisors and emptyDir size limits. k8s-openapi keeps quantities as strings
//! and no well-kept crate parses them exactly; floats would turn `100m / 1m` into 101.

/// `q` in nano-units (`1` → 1e9, `250m` → 2.5e8, `1Ki` → 1024e9); None if it is no quantity.
pub fn nano_units(q: &str) -> Option<i128> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let (negative, number) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number.strip_prefix('+').unwrap_or(number)),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let digits: i128 = format!("{whole}{fraction}").parse().ok()?;
    // value = digits * 10^(exponent - fraction digits) * binary multiplier
    let (exponent, binary): (i32, i128) = match suffix {
        "" => (0, 1),
        "n" => (-9, 1),
        "u" => (-6, 1),
        "m" => (-3, 1),
        "k" => (3, 1),
        "M" => (6, 1),
        "G" => (9, 1),
        "T" => (12, 1),
        "P" => (15, 1),
        "E" => (18, 1),
        "Ki" => (0, 1 << 10),
        "Mi" => (0, 1 << 20),
        "Gi" => (0, 1 << 30),
        "Ti" => (0, 1 << 40),
        "Pi" => (0, 1 << 50),
        "Ei" => (0, 1 << 60),
        s => (s.strip_prefix(['e', 'E'])?.parse().ok()?, 1),
    };
    let scale = exponent + 9 - i32::try_from(fraction.len()).ok()?;
    let value = if scale >= 0 {
        digits
            .checked_mul(10i128.checked_pow(scale as u32)?)?
            .checked_mul(binary)?
    } else {
        // Below a nano-unit: round up, as Kubernetes does.
        let divisor = 10i128.checked_pow((-scale) as u32)?;
        (digits.checked_mul(binary)? + divisor - 1) / divisor
    };
    Some(if negative { -value } else { value })
}

/// `q` in whole units, rounded up (kubelet's `Quantity.Value()`).
pub fn whole_units(q: &str) -> Option<i128> {
    let nano = nano_units(q)?;
    Some(nano.div_euclid(1_000_000_000) + i128::from(nano.rem_euclid(1_000_000_000) != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_exactly() {
        assert_eq!(nano_units("1"), Some(1_000_000_000));
        assert_eq!(nano_units("250m"), Some(250_000_000));
        assert_eq!(nano_units("0.5"), Some(500_000_000));
        assert_eq!(nano_units("1Ki"), Some(1024 * 1_000_000_000));
        assert_eq!(nano_units("64Mi"), Some((64i128 << 20) * 1_000_000_000));
        assert_eq!(nano_units("1e3"), Some(1_000 * 1_000_000_000));
        assert_eq!(nano_units("2k"), Some(2_000 * 1_000_000_000));
        assert_eq!(nano_units("1n"), Some(1));
        assert_eq!(nano_units("-1"), Some(-1_000_000_000));
        assert_eq!(nano_units("lots"), None);
        assert_eq!(nano_units("1Xi"), None);
        assert_eq!(nano_units(""), None);
        assert_eq!(whole_units("100m"), Some(1));
        assert_eq!(whole_units("1Gi"), Some(1 << 30));
    }
}
