//! The value of every setting a config file leaves out (`docs/reference/config.md` lists
//! them); serde and the code that needs a default both read them here.

use std::time::Duration;

pub(crate) fn crl_refresh() -> Duration {
    Duration::from_secs(3600)
}
pub(crate) fn crl_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(crate) fn crl_max_bytes() -> usize {
    64 * 1024 * 1024
}
pub(crate) fn tls_versions() -> Vec<String> {
    vec!["1.2".into(), "1.3".into()]
}
pub(crate) fn handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(crate) fn header_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(crate) fn max_connections() -> usize {
    10_000
}
pub(crate) fn verified_chain_cache() -> usize {
    100_000
}
pub(crate) fn session_ticket_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}
pub(crate) fn max_body_bytes() -> usize {
    8 * 1024
}
pub(crate) fn rotate_after() -> Duration {
    Duration::from_secs(90 * 24 * 3600)
}
pub(crate) fn max_header_bytes() -> usize {
    16 * 1024
}
pub(crate) fn shutdown_delay() -> Duration {
    Duration::from_secs(5)
}
pub(crate) fn shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
pub(crate) fn reload_interval() -> Duration {
    Duration::from_secs(5)
}
pub(crate) fn proxy_header_timeout() -> Duration {
    Duration::from_secs(3)
}
pub(crate) fn admin_listen() -> String {
    "127.0.0.1:9090".into()
}
pub(crate) fn token_ttl() -> Duration {
    Duration::from_secs(300)
}
pub(crate) fn credentials() -> String {
    "metadata".into()
}
pub(crate) fn sts_url() -> String {
    "https://sts.googleapis.com".into()
}
pub(crate) fn iam_credentials_url() -> String {
    "https://iamcredentials.googleapis.com".into()
}
pub(crate) fn metadata_url() -> String {
    "http://metadata.google.internal".into()
}
pub(crate) fn request_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(crate) fn upstream_deadline() -> Duration {
    Duration::from_secs(10)
}
pub(crate) fn refresh_margin() -> Duration {
    Duration::from_secs(300)
}
pub(crate) fn cache_capacity() -> u64 {
    10_000
}
pub(crate) fn access_token_lifetime() -> Duration {
    Duration::from_secs(3600)
}
pub(crate) fn flows() -> Vec<String> {
    vec!["mtls-client-credentials".into()]
}
