//! Timestamps as Kubernetes writes them: RFC 3339 in UTC, second precision for `Time`,
//! microseconds for `MicroTime` (jiff does the calendar work).

use jiff::Timestamp;

/// Now, as `2026-11-27T03:31:29Z`.
pub fn now_rfc3339() -> String {
    format_unix(now_unix())
}

pub fn now_unix() -> i64 {
    Timestamp::now().as_second()
}

/// Now with microseconds (`MicroTime`, as in managedFields and leases).
pub fn now_micro_rfc3339() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

pub fn format_unix(secs: i64) -> String {
    Timestamp::from_second(secs)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Seconds since the epoch of an RFC 3339 timestamp (fractions and offsets accepted).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    s.parse::<Timestamp>().ok().map(|t| t.as_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(1_795_750_289), "2026-11-27T03:31:29Z");
        assert_eq!(parse_rfc3339("2026-11-27T03:31:29Z"), Some(1_795_750_289));
        assert_eq!(parse_rfc3339("2026-11-27T03:31:29.123456Z"), Some(1_795_750_289));
        assert!(now_micro_rfc3339().ends_with('Z'));
    }
}
