//! Durations as config files write them (`"30s"`, `"5m"`, `"1h 30m"`, `"90d"`).

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses human durations such as `"5m"`, `"90s"`, `"1h 30m"` or `"90d"` (jiff's friendly
/// format; a day is 24 hours here).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |e: &dyn std::fmt::Display| {
        format!("invalid duration {text:?} (use e.g. \"30s\", \"5m\", \"1h\", \"90d\"): {e}")
    };
    let signed = match text.parse::<jiff::SignedDuration>() {
        Ok(d) => d,
        Err(_) => text
            .parse::<jiff::Span>()
            .and_then(|span| span.to_duration(jiff::SpanRelativeTo::days_are_24_hours()))
            .map_err(|e| invalid(&e))?,
    };
    Duration::try_from(signed).map_err(|_| format!("duration {text:?} must not be negative"))
}

/// `d` as a config file would write it, in the largest whole units: `"1d"`, `"90d"`,
/// `"1h 30m"`, `"500ms"`, `"0s"` (never `"24h"` for a day); [`parse_duration`] reads it back.
pub(super) fn format_duration(d: &Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3_600, "h"),
        (secs % 3_600 / 60, "m"),
        (secs % 60, "s"),
        (u64::from(nanos / 1_000_000), "ms"),
        (u64::from(nanos / 1_000 % 1_000), "us"),
        (u64::from(nanos % 1_000), "ns"),
    ];
    let text: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".into()
    } else {
        text.join(" ")
    }
}

pub(super) mod text {
    use super::*;

    pub(crate) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

pub(super) mod optional_text {
    use super::*;

    pub(crate) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(d)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::{format_duration, parse_duration};
    use std::time::Duration;

    #[test]
    fn durations_print_in_their_largest_whole_units_and_read_back() {
        for (written, printed) in [
            ("1d", "1d"),
            ("90d", "90d"),
            ("24h", "1d"),
            ("1h 30m", "1h 30m"),
            ("90s", "1m 30s"),
            ("5m", "5m"),
            ("0s", "0s"),
            ("1d 2h 3m 4s", "1d 2h 3m 4s"),
            ("500ms", "500ms"),
        ] {
            let parsed = parse_duration(written).unwrap();
            assert_eq!(format_duration(&parsed), printed, "{written}");
            assert_eq!(parse_duration(printed).unwrap(), parsed, "{printed}");
        }
        let odd = Duration::new(3_601, 1_002_003);
        assert_eq!(format_duration(&odd), "1h 1s 1ms 2us 3ns");
        assert_eq!(parse_duration(&format_duration(&odd)).unwrap(), odd);
    }
}
