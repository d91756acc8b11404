//! Kubernetes resource quantities (`500m`, `1.5`, `128Mi`, `1G`, `1e3`) as numbers, for
//! cgroup limits and `resourceFieldRef`. Written here because k8s-openapi carries
//! quantities as strings and no maintained crate parses them without pulling in a
//! decimal library; the values the agent needs fit an f64 and an i128 of milli-units.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The value of a quantity in milli-units (`500m` → 500, `2` → 2000, `1Ki` → 1,024,000),
/// rounded up as Kubernetes does when it reads a milli-value. `None`: not a quantity.
pub fn milli_value(q: &str) -> Option<i128> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    if number.is_empty() {
        return None;
    }
    let (mantissa, exponent) = match suffix {
        "" => (number.to_owned(), 0i32),
        "m" => (number.to_owned(), -3),
        "k" => (number.to_owned(), 3),
        "M" => (number.to_owned(), 6),
        "G" => (number.to_owned(), 9),
        "T" => (number.to_owned(), 12),
        "P" => (number.to_owned(), 15),
        "E" => (number.to_owned(), 18),
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let power = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"].iter().position(|s| *s == suffix)? as u32 + 1;
            let value: f64 = number.parse().ok()?;
            let milli = value * 1024f64.powi(power as i32) * 1000.0;
            return milli.is_finite().then(|| milli.ceil() as i128);
        }
        s if s.starts_with(['e', 'E']) => (number.to_owned(), s[1..].parse().ok()?),
        _ => return None,
    };
    let value: f64 = mantissa.parse().ok()?;
    let milli = value * 10f64.powi(exponent + 3);
    milli.is_finite().then(|| milli.ceil() as i128)
}

/// The value in whole units, rounded up (`100m` → 1, `1Ki` → 1024).
pub fn value(q: &str) -> Option<i128> {
    milli_value(q).map(|m| (m + 999).div_euclid(1000))
}

/// The milli-value of `resources.<which>.<name>` (`which`: `limits` or `requests`), if set.
pub fn resource_milli(
    resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
    which: &str,
    name: &str,
) -> Option<i128> {
    resources
        .and_then(|r| {
            if which == "limits" {
                r.limits.as_ref()
            } else {
                r.requests.as_ref()
            }
        })
        .and_then(|m| m.get(name))
        .and_then(milli)
}

/// [`milli_value`] of a k8s-openapi quantity.
pub fn milli(q: &Quantity) -> Option<i128> {
    milli_value(&q.0)
}

/// [`value`] of a k8s-openapi quantity.
pub fn units(q: &Quantity) -> Option<i128> {
    value(&q.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_binary_and_milli_suffixes() {
        assert_eq!(milli_value("500m"), Some(500));
        assert_eq!(milli_value("2"), Some(2000));
        assert_eq!(milli_value("1.5"), Some(1500));
        assert_eq!(milli_value("0.1"), Some(100));
        assert_eq!(value("128Mi"), Some(128 * 1024 * 1024));
        assert_eq!(value("1G"), Some(1_000_000_000));
        assert_eq!(value("1k"), Some(1000));
        assert_eq!(value("1e3"), Some(1000));
        assert_eq!(value("100m"), Some(1));
        assert_eq!(value("1Ki"), Some(1024));
        assert_eq!(milli_value("bogus"), None);
        assert_eq!(milli_value("1Xi"), None);
        assert_eq!(milli_value(""), None);
    }
}
