//! CRLs the broker downloads itself (`[[server.crl_sources]]`).
//!
//! Each source is fetched on its own schedule (a slow source delays no other's), when the
//! server starts, again every `refresh` (always before its CRL's nextUpdate) and at once on
//! SIGHUP or `token-broker crl fetch`; conditionally (ETag,
//! Last-Modified), bounded in size and time, retried, and never redirected: only configured
//! URLs are fetched, never one a device's certificate or a server's `Location` names.
//!
//! A download replaces the copy kept in `crl_cache_dir` only once the trust store has
//! verified its signature against a CA of `client_ca` (nothing unverified is kept or sets a
//! floor), it is of the issuer the source served before, and it is not older than any CRL
//! the broker holds for that CA, from any origin (no rollback to a CRL from before a
//! revocation). Then the broker reloads, reading the kept copies like files; at every tick
//! it compares the kept copies with what it enforces and reloads again until they agree, so
//! a download never sits on disk unenforced. A failed refresh keeps the last good CRL: past
//! its nextUpdate, its certificates are refused `crl_expired`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::clock::unix_now;
use crate::config::CrlSourceConfig;
use crate::crl;
use crate::trust::{CrlRefused, Succession};

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

/// After a reload that left a kept CRL unenforced, the next one is tried after this long,
/// doubling up to [`RELOAD_RETRY_MAX`].
const RELOAD_RETRY: Duration = Duration::from_secs(2);
const RELOAD_RETRY_MAX: Duration = Duration::from_secs(60);

/// Why a download did not replace the kept CRL. `label()` is the metric's `result`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("HTTP status {status} redirecting to {location}: redirects are not followed; configure the final URL as the source")]
    Redirect { status: u16, location: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Network(String),
    #[error("the CRL is larger than max_bytes ({0} bytes)")]
    TooLarge(usize),
    #[error(transparent)]
    Refused(#[from] CrlRefused),
    #[error(transparent)]
    Succession(#[from] Succession),
    #[error("cannot keep it in {0}")]
    Keep(String),
}

impl FetchError {
    pub fn label(&self) -> &'static str {
        match self {
            FetchError::Status(404) => "not_found",
            FetchError::Status(_) => "http_error",
            FetchError::Redirect { .. } => "redirect",
            FetchError::Timeout(_) => "timeout",
            FetchError::Network(_) => "network_error",
            FetchError::TooLarge(_) => "too_large",
            FetchError::Refused(refused) => refused.label(),
            FetchError::Succession(succession) => succession.label(),
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

pub enum Fetched {
    /// A new CRL is kept: the broker must reload.
    Updated,
    NotModified,
}

impl Fetched {
    pub fn label(&self) -> &'static str {
        match self {
            Fetched::Updated => "updated",
            Fetched::NotModified => "not_modified",
        }
    }
}

/// HTTP validators of the kept copy, for a conditional request.
#[derive(Default, Serialize, Deserialize)]
struct Validators {
    etag: Option<String>,
    last_modified: Option<String>,
}

/// How each source fared: when it is due, and the run of failures it is in.
#[derive(Default)]
struct SourceState {
    due: Option<Instant>,
    failures: u32,
    last_failure: &'static str,
}

/// Keeps every configured source fresh and enforced, for as long as the server runs.
/// `current` gives the serving broker (its sources, trust store and metrics); `reload`
/// rebuilds it after a kept CRL changed; `fetch_now` makes every source due at once.
pub async fn run(
    current: impl Fn() -> Arc<Broker>,
    reload: impl Fn() + Send + Clone + 'static,
    fetch_now: Arc<Notify>,
) {
    let http = match client() {
        Ok(http) => http,
        Err(error) => {
            tracing::error!(%error, "no HTTP client for CRL sources: they are not fetched");
            return;
        }
    };
    let mut states: HashMap<String, SourceState> = HashMap::new();
    // Downloads in progress, each on its own: a slow source (up to three timeouts) delays no
    // other's; and which source each one is.
    let mut downloads = tokio::task::JoinSet::new();
    let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut reload_retry = RELOAD_RETRY;
    let mut next_reload = Instant::now();
    let mut forced = false;
    loop {
        let broker = current();
        let server = &broker.config().server;
        // Without sources (no cache folder either) nothing is due; a reload may add some.
        if let Some(dir) = server
            .crl_cache_dir
            .as_ref()
            .map(|d| broker.config().path(d))
        {
            for source in &server.crl_sources {
                if running.values().any(|url| *url == source.url) {
                    continue;
                }
                let state = states.entry(source.url.clone()).or_default();
                if !forced && state.due.is_some_and(|due| due > Instant::now()) {
                    continue;
                }
                let url = source.url.clone();
                let (http, source, dir, broker) =
                    (http.clone(), source.clone(), dir.clone(), broker.clone());
                let task = downloads.spawn(async move {
                    let result =
                        fetch_with_retries(&http, &source, &dir, &broker, Mode::Keep).await;
                    (source, result)
                });
                running.insert(task.id(), url);
            }
        }
        forced = false;
        // What was fetched is what is enforced: again while a kept copy differs from what
        // the serving broker read (a reload that failed, one that raced with another, a
        // download by `token-broker crl fetch`).
        let unenforced = !current().kept_crls_not_loaded().is_empty();
        if unenforced && Instant::now() >= next_reload {
            let reload = reload.clone();
            let _ = tokio::task::spawn_blocking(reload).await;
            if current().kept_crls_not_loaded().is_empty() {
                reload_retry = RELOAD_RETRY;
            } else {
                tracing::warn!(
                    retry_seconds = reload_retry.as_secs(),
                    "a downloaded CRL is kept but not enforced: the reload did not take it up (see the reload's log line); retrying"
                );
                next_reload = Instant::now() + reload_retry;
                reload_retry = (reload_retry * 2).min(RELOAD_RETRY_MAX);
            }
        }
        let broker = current();
        let not_in_force = broker.kept_crls_not_in_force();
        let gauge = &broker.metrics().crl_kept_not_in_force;
        // Only the configured sources: one a reload removed has no series left.
        gauge.reset();
        for source in &broker.config().server.crl_sources {
            let stale = not_in_force.contains(&source.url.as_str());
            gauge
                .with_label_values(&[source.url.as_str()])
                .set(if stale { 1.0 } else { 0.0 });
        }
        // The next source due that is not being fetched already.
        let next = states
            .iter()
            .filter(|(url, _)| !running.values().any(|running| running == *url))
            .filter_map(|(_, state)| state.due)
            .min();
        let tick = Instant::now() + MIN_INTERVAL;
        tokio::select! {
            Some(joined) = downloads.join_next_with_id(), if !downloads.is_empty() => {
                let (id, ended) = match joined {
                    Ok((id, ended)) => (id, Some(ended)),
                    Err(stopped) => (stopped.id(), None),
                };
                running.remove(&id);
                if let Some((source, result)) = ended {
                    // Each new CRL is enforced as soon as it is kept.
                    if matches!(result, Ok(Fetched::Updated)) {
                        let reload = reload.clone();
                        let _ = tokio::task::spawn_blocking(reload).await;
                    }
                    let state = states.entry(source.url.clone()).or_default();
                    let wait = record(&current(), &source, state, &result);
                    state.due = Some(Instant::now() + wait.max(MIN_INTERVAL));
                }
            }
            _ = tokio::time::sleep_until(next.map_or(tick, |next| next.min(tick))) => {}
            _ = fetch_now.notified() => forced = true,
        }
    }
}

/// Counts and logs one refresh of `source` (a warning once per run of failures, or when
/// the reason changes), and says how long until the next.
fn record(
    broker: &Broker,
    source: &CrlSourceConfig,
    state: &mut SourceState,
    result: &Result<Fetched, FetchError>,
) -> Duration {
    let label = match result {
        Ok(fetched) => fetched.label(),
        Err(error) => error.label(),
    };
    broker
        .metrics()
        .crl_fetches
        .with_label_values(&[source.url.as_str(), label])
        .inc();
    match result {
        Ok(_) => {
            if state.failures > 0 {
                tracing::info!(source = %source.url, result = label, failed_before = state.failures, "CRL source fetched again");
            } else {
                tracing::info!(source = %source.url, result = label, "CRL source fetched");
            }
            state.failures = 0;
            next_refresh(source, broker)
        }
        Err(error) => {
            state.failures += 1;
            if state.failures == 1 || state.last_failure != label {
                tracing::warn!(source = %source.url, result = label, %error, "CRL source not fetched; the last good CRL stays in force until its nextUpdate (logged once until the result changes or a download succeeds)");
            } else {
                tracing::debug!(source = %source.url, result = label, %error, failures = state.failures, "CRL source not fetched, again");
            }
            state.last_failure = label;
            // Backing off, so that a source that is down (perhaps past its CRL's
            // nextUpdate) is not asked every second.
            RETRY_AFTER_FAILURE
                .saturating_mul(1 << (state.failures - 1).min(6))
                .min(source.refresh)
        }
    }
}

/// A source's URL and how its download ended.
pub type SourceResult = (String, Result<Fetched, FetchError>);

/// What a download is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Kept when admitted (the server, `crl fetch`).
    Keep,
    /// Checked as the server would, then dropped (`check-config --fetch`).
    Check,
}

/// Downloads every source of `broker` once: each one's URL and result. With [`Mode::Keep`]
/// (`token-broker crl fetch`) a running server notices the kept copies changed and reloads
/// within a second.
pub async fn fetch_all(broker: &Arc<Broker>, mode: Mode) -> Vec<SourceResult> {
    let server = &broker.config().server;
    let Some(dir) = server
        .crl_cache_dir
        .as_ref()
        .map(|d| broker.config().path(d))
    else {
        return Vec::new();
    };
    let http = match client() {
        Ok(http) => http,
        Err(error) => {
            return server
                .crl_sources
                .iter()
                .map(|s| (s.url.clone(), Err(FetchError::Network(error.clone()))))
                .collect()
        }
    };
    let mut results = Vec::new();
    for source in &server.crl_sources {
        let result = fetch_with_retries(&http, source, &dir, broker, mode).await;
        results.push((source.url.clone(), result));
    }
    results
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
        // Only configured URLs: a redirect could send the broker anywhere, a loopback admin
        // port or an http:// URL in place of an https:// one.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())
}

async fn fetch_with_retries(
    http: &reqwest::Client,
    source: &CrlSourceConfig,
    dir: &Path,
    broker: &Arc<Broker>,
    mode: Mode,
) -> Result<Fetched, FetchError> {
    let mut attempt = 1;
    loop {
        match fetch(http, source, dir, broker, mode).await {
            Err(error) if error.transient() && attempt < ATTEMPTS => {
                tokio::time::sleep(RETRY_BACKOFF * attempt).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// One conditional download of `source`; a CRL the trust store admits replaces the kept one
/// ([`Mode::Keep`]).
async fn fetch(
    http: &reqwest::Client,
    source: &CrlSourceConfig,
    dir: &Path,
    broker: &Arc<Broker>,
    mode: Mode,
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
    if status.is_redirection() {
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .map(|v| crate::redact::echo(&String::from_utf8_lossy(v.as_bytes())))
            .unwrap_or_else(|| "(no Location)".into());
        return Err(FetchError::Redirect {
            status: status.as_u16(),
            location,
        });
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
        let disk = |e: std::io::Error| FetchError::Keep(format!("{}: {e}", dir.display()));
        // One writer at a time (this server, another replica sharing the folder, `crl
        // fetch`): what is compared below is still what is on disk when it is replaced.
        let _lock = match mode {
            Mode::Keep => Some(lock(&dir).map_err(disk)?),
            Mode::Check => None,
        };
        let kept = crl::kept(&dir, &source.url).map_err(|e| FetchError::Keep(e.to_string()))?;
        if kept.as_ref().is_some_and(|kept| kept.bytes == body) {
            // Served again without validators: nothing to reload.
            return Ok(Fetched::NotModified);
        }
        let trust = broker.trust();
        let fetched = trust.admit_download(&body, &source.url)?;
        // The same CRL in another encoding (PEM for DER, other line breaks): nothing new.
        let kept_der = kept
            .as_ref()
            .and_then(|kept| crate::pem::crls_in(&kept.bytes).ok());
        if kept_der.is_some_and(|ders| ders.len() == 1 && ders[0].as_ref() == fetched.der()) {
            return Ok(Fetched::NotModified);
        }
        // A kept copy written since the serving broker read the folder is as binding.
        let kept_since = kept
            .filter(|kept| Some(kept.stamp) != broker.kept_stamp(&source.url))
            .and_then(|kept| trust.admit_download(&kept.bytes, &source.url).ok());
        trust.may_succeed(&source.url, &fetched, kept_since.as_ref())?;
        if mode == Mode::Check {
            return Ok(Fetched::Updated);
        }
        keep(&crl_path, &body).map_err(disk)?;
        if let Ok(json) = serde_json::to_vec(&fetched_validators) {
            // Without validators the next download is unconditional: no harm done.
            let _ = keep(&validators_path, &json);
        }
        Ok(Fetched::Updated)
    })
    .await
    .unwrap_or_else(|stopped| Err(FetchError::Keep(format!("its check stopped: {stopped}"))))
}

/// Holds the kept copies' folder for one writer until dropped.
fn lock(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    file.lock()?;
    Ok(file)
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
