//! CRLs the broker downloads itself (`[[server.crl_sources]]`).
//!
//! Each source is fetched when the server starts and again every `refresh`, and always
//! before its CRL's nextUpdate; conditionally (ETag, Last-Modified), bounded in size and
//! time, retried. A download replaces the copy kept in `crl_cache_dir` only when the trust
//! store admits it as it admits a configured file (signed by its CA when that CA is in the
//! bundle) and it is not older than the kept one (no rollback to a CRL from before a
//! revocation); then the broker reloads, reading the kept copies like files. A failed
//! refresh keeps the last good CRL: past its nextUpdate, its certificates are refused
//! `crl_expired`. Only configured URLs are fetched, never one a device's certificate names.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::broker::Broker;
use crate::clock::unix_now;
use crate::config::CrlSourceConfig;
use crate::crl;
use crate::pem;

/// Attempts of one download before the refresh counts as failed.
const ATTEMPTS: u32 = 3;
/// The first retry waits this long, the next twice as long.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
/// After a failed refresh, the next one is tried after at most this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// After a success, a source is not fetched again sooner than this (unless `refresh` is).
const SOONEST_AFTER_SUCCESS: Duration = Duration::from_secs(60);
/// The soonest a source is fetched again, whatever its CRL says.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Why a download did not replace the kept CRL. `label()` is the metric's `result`.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Network(String),
    #[error("the CRL is larger than max_bytes ({0} bytes)")]
    TooLarge(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("the CRL (number {fetched}) is older than the kept one (number {kept})")]
    Older { fetched: String, kept: String },
    #[error("cannot keep it in {0}")]
    Keep(String),
}

impl FetchError {
    fn label(&self) -> &'static str {
        match self {
            FetchError::Status(404) => "not_found",
            FetchError::Status(_) => "http_error",
            FetchError::Timeout(_) => "timeout",
            FetchError::Network(_) => "network_error",
            FetchError::TooLarge(_) => "too_large",
            FetchError::Invalid(_) => "invalid",
            FetchError::Older { .. } => "older",
            FetchError::Keep(_) => "disk_error",
        }
    }

    /// Worth another attempt now: the server or the network may do better.
    fn transient(&self) -> bool {
        match self {
            FetchError::Status(status) => *status >= 500 || *status == 429,
            FetchError::Timeout(_) | FetchError::Network(_) => true,
            _ => false,
        }
    }
}

enum Fetched {
    /// A new CRL is kept: the broker must reload.
    Updated,
    NotModified,
}

/// HTTP validators of the kept copy, for a conditional request.
#[derive(Default, Serialize, Deserialize)]
struct Validators {
    etag: Option<String>,
    last_modified: Option<String>,
}

/// Keeps every configured source fresh, for as long as the server runs. `current` gives
/// the serving broker (its sources, trust store and metrics); `reload` rebuilds it after a
/// kept CRL changed.
pub async fn run(current: impl Fn() -> Arc<Broker>, reload: impl Fn() + Send + Clone + 'static) {
    let http = match client() {
        Ok(http) => http,
        Err(error) => {
            tracing::error!(%error, "no HTTP client for CRL sources: they are not fetched");
            return;
        }
    };
    // When each source (by URL) is due, and how many refreshes in a row failed.
    let mut schedule: HashMap<String, (Instant, u32)> = HashMap::new();
    loop {
        let broker = current();
        let server = &broker.config().server;
        // Without sources (no cache folder either) nothing is due; a reload may add some.
        let Some(dir) = server
            .crl_cache_dir
            .as_ref()
            .map(|d| broker.config().path(d))
        else {
            tokio::time::sleep(MIN_INTERVAL).await;
            continue;
        };
        let mut updated = false;
        for source in &server.crl_sources {
            let now = Instant::now();
            let (due, failures) = schedule.entry(source.url.clone()).or_insert((now, 0));
            if *due > now {
                continue;
            }
            let result = fetch_with_retries(&http, source, &dir, &broker).await;
            let label = match &result {
                Ok(Fetched::Updated) => "updated",
                Ok(Fetched::NotModified) => "not_modified",
                Err(e) => e.label(),
            };
            broker
                .metrics()
                .crl_fetches
                .with_label_values(&[source.url.as_str(), label])
                .inc();
            let wait = match result {
                Ok(fetched) => {
                    updated |= matches!(fetched, Fetched::Updated);
                    *failures = 0;
                    tracing::info!(source = %source.url, result = label, "CRL source fetched");
                    next_refresh(source, &broker)
                }
                Err(error) => {
                    *failures += 1;
                    tracing::warn!(source = %source.url, result = label, %error, "CRL source not fetched; the last good CRL stays in use until its nextUpdate");
                    // Backing off, so that a source that is down (perhaps past its CRL's
                    // nextUpdate) is not asked every second.
                    RETRY_AFTER_FAILURE
                        .saturating_mul(1 << (*failures - 1).min(6))
                        .min(source.refresh)
                }
            };
            *due = Instant::now() + wait.max(MIN_INTERVAL);
        }
        if updated {
            let reload = reload.clone();
            let _ = tokio::task::spawn_blocking(reload).await;
        }
        let next = schedule.values().map(|(due, _)| *due).min();
        let tick = Instant::now() + MIN_INTERVAL;
        tokio::time::sleep_until(next.map_or(tick, |next| next.min(tick))).await;
    }
}

/// How long until `source` is fetched again after a success: `refresh`, or sooner so that
/// a new CRL is in hand before the kept one's nextUpdate (halfway there, so that a failure
/// leaves time for retries), but not more often than once a minute (or `refresh`, if
/// shorter) when the source serves a CRL that is already at its nextUpdate.
fn next_refresh(source: &CrlSourceConfig, broker: &Broker) -> Duration {
    let next_update = broker
        .trust()
        .crls()
        .filter(|crl| crl.source == source.url)
        .filter_map(|crl| crl.next_update)
        .min();
    match next_update {
        Some(next) => {
            let remaining = u64::try_from(next - unix_now()).unwrap_or(0);
            let soonest = source.refresh.min(SOONEST_AFTER_SUCCESS);
            source
                .refresh
                .min(Duration::from_secs(remaining / 2))
                .max(soonest)
        }
        None => source.refresh,
    }
}

fn client() -> Result<reqwest::Client, String> {
    let tls = crate::crypto::public_client_config().map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::limited(3))
        .build()
        .map_err(|e| e.to_string())
}

async fn fetch_with_retries(
    http: &reqwest::Client,
    source: &CrlSourceConfig,
    dir: &Path,
    broker: &Arc<Broker>,
) -> Result<Fetched, FetchError> {
    let mut attempt = 1;
    loop {
        match fetch(http, source, dir, broker).await {
            Err(error) if error.transient() && attempt < ATTEMPTS => {
                tokio::time::sleep(RETRY_BACKOFF * attempt).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// One conditional download of `source`; a CRL the trust store admits replaces the kept one.
async fn fetch(
    http: &reqwest::Client,
    source: &CrlSourceConfig,
    dir: &Path,
    broker: &Arc<Broker>,
) -> Result<Fetched, FetchError> {
    let (crl_path, validators_path) = crl::kept_paths(dir, &source.url);
    let validators: Validators = match (crl_path.exists(), std::fs::read(&validators_path)) {
        (true, Ok(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
        _ => Validators::default(),
    };
    let mut request = http.get(&source.url).timeout(source.timeout);
    if let Some(etag) = &validators.etag {
        request = request.header(reqwest::header::IF_NONE_MATCH, etag);
    }
    if let Some(date) = &validators.last_modified {
        request = request.header(reqwest::header::IF_MODIFIED_SINCE, date);
    }
    let network = |e: reqwest::Error| {
        if e.is_timeout() {
            FetchError::Timeout(source.timeout)
        } else {
            FetchError::Network(crate::redact::root_cause(&e))
        }
    };
    let mut response = request.send().await.map_err(network)?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_MODIFIED {
        return Ok(Fetched::NotModified);
    }
    if !status.is_success() {
        return Err(FetchError::Status(status.as_u16()));
    }
    if response
        .content_length()
        .is_some_and(|length| length > source.max_bytes as u64)
    {
        return Err(FetchError::TooLarge(source.max_bytes));
    }
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let fetched_validators = Validators {
        etag: header(reqwest::header::ETAG),
        last_modified: header(reqwest::header::LAST_MODIFIED),
    };
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(network)? {
        if body.len() + chunk.len() > source.max_bytes {
            return Err(FetchError::TooLarge(source.max_bytes));
        }
        body.extend_from_slice(&chunk);
    }
    // Reading the kept copy, parsing the download (a million entries take about a second)
    // and writing it stay off the runtime's worker threads, which serve tokens meanwhile.
    let (source, dir, broker) = (source.clone(), dir.to_owned(), broker.clone());
    tokio::task::spawn_blocking(move || {
        if std::fs::read(&crl_path).is_ok_and(|kept| kept == body) {
            // Served again without validators: nothing to reload.
            return Ok(Fetched::NotModified);
        }
        admit(&body, &source, &broker)?;
        keep(&crl_path, &body).map_err(|e| FetchError::Keep(format!("{}: {e}", dir.display())))?;
        if let Ok(json) = serde_json::to_vec(&fetched_validators) {
            // Without validators the next download is unconditional: no harm done.
            let _ = keep(&validators_path, &json);
        }
        Ok(Fetched::Updated)
    })
    .await
    .unwrap_or_else(|stopped| Err(FetchError::Invalid(format!("its check stopped: {stopped}"))))
}

/// The checks a configured CRL file passes, and no rollback: a fetched CRL older than the
/// kept one (a replayed download from before a revocation) is refused.
fn admit(body: &[u8], source: &CrlSourceConfig, broker: &Broker) -> Result<(), FetchError> {
    let ders = pem::crls_in(body).map_err(FetchError::Invalid)?;
    for der in ders {
        let crl = broker
            .trust()
            .admit_crl(&der, source.url.clone())
            .map_err(FetchError::Invalid)?;
        let kept = broker
            .trust()
            .crls()
            .find(|kept| kept.source == source.url && kept.issuer == crl.info.issuer);
        if let Some(kept) = kept {
            if crl_number_order(&crl.info.number, &kept.number).is_lt() {
                return Err(FetchError::Older {
                    fetched: crl.info.number.clone(),
                    kept: kept.number.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Orders two cRLNumbers written in decimal (no leading zeros).
fn crl_number_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Writes `bytes` to `path` whole or not at all: a fresh temporary file beside it, synced,
/// then renamed over it.
fn keep(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crl_numbers_order_as_numbers() {
        use std::cmp::Ordering::*;
        assert_eq!(crl_number_order("9", "10"), Less);
        assert_eq!(crl_number_order("10", "9"), Greater);
        assert_eq!(crl_number_order("123", "123"), Equal);
        assert_eq!(crl_number_order("124", "123"), Greater);
    }
}
