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

pub(super) fn format_duration(d: &Duration) -> String {
    let signed = jiff::SignedDuration::try_from(*d).unwrap_or(jiff::SignedDuration::MAX);
    format!("{signed:#}")
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
