//! Time as the broker reads and writes it: Unix seconds, RFC 3339 text, webpki's time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::UnixTime;

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// RFC 3339 UTC rendering of a Unix time, for messages.
pub fn rfc3339(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| unix.to_string())
}

/// A validation time from Unix seconds (for `verify-cert --at`).
pub fn at_unix(seconds: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(seconds.max(0) as u64))
}
