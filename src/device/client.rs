//! The device side: asking a broker for a token over mutual TLS (`token-broker token`, and
//! the metadata agent behind it).
//!
//! Failures are sorted by who can fix them: the device's own files (exit 1), the broker's
//! refusal with its reason (exit 2), the broker or network being unavailable (exit 3).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::clock::unix_now;
use crate::device::credentials::{DeviceCredentials, Loaded};
pub use crate::device::error::ClientError;
use crate::device::pkcs11::TokenKey;
use crate::device::private_file::PrivateFile;
use crate::pem;
use crate::redact::root_cause;

/// A fetched token is reused until this long before it expires.
pub const REFRESH_MARGIN: i64 = 60;

/// What to ask the broker for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenParams {
    pub audience: Option<String>,
    pub scope: Option<String>,
    pub service_account: Option<String>,
    pub target_audience: Option<String>,
}

/// The broker's answer, with an absolute expiry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Token {
    pub access_token: String,
    pub id_token: Option<String>,
    pub token_type: String,
    pub issued_token_type: Option<String>,
    pub scope: Option<String>,
    pub expires_at: i64,
}

impl Token {
    pub fn expires_in(&self) -> i64 {
        (self.expires_at - unix_now()).max(0)
    }

    pub fn is_fresh(&self) -> bool {
        self.expires_at - REFRESH_MARGIN > unix_now()
    }

    /// The broker's JSON answer shape.
    pub fn to_json(&self) -> Value {
        let mut answer = json!({
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_in": self.expires_in(),
        });
        for (name, value) in [
            ("id_token", &self.id_token),
            ("issued_token_type", &self.issued_token_type),
            ("scope", &self.scope),
        ] {
            if let (Some(value), Some(map)) = (value, answer.as_object_mut()) {
                map.insert(name.into(), value.clone().into());
            }
        }
        answer
    }
}

pub struct BrokerClient {
    credentials: DeviceCredentials,
    roots: Arc<rustls::RootCertStore>,
    token_url: String,
    current: std::sync::Mutex<Current>,
}

/// The HTTP client for the credentials last loaded. Replaced whole when they change, so no
/// pooled connection or resumable TLS session of the old certificate is reused.
struct Current {
    loaded: Loaded,
    http: reqwest::Client,
    /// The stamp of files that changed but failed to load: not retried until they change
    /// again (a retried login with a wrong PIN would lock the token).
    rejected: Option<[u8; 32]>,
}

impl BrokerClient {
    /// A client presenting `cert` (PEM chain) and `key` (PEM), trusting `ca` or the public
    /// roots.
    pub fn new(
        url: &str,
        cert: &Path,
        key: &Path,
        ca: Option<&Path>,
    ) -> Result<BrokerClient, ClientError> {
        BrokerClient::with_credentials(url, DeviceCredentials::files(cert, key), ca)
    }

    /// A client presenting `credentials` (files or PKCS#11 objects), loaded and checked now.
    pub fn with_credentials(
        url: &str,
        credentials: DeviceCredentials,
        ca: Option<&Path>,
    ) -> Result<BrokerClient, ClientError> {
        let local = |e: &dyn std::fmt::Display| ClientError::Local(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(ca) => {
                for root in pem::certificates(ca).map_err(|e| local(&e))? {
                    roots
                        .add(root)
                        .map_err(|e| local(&format!("{}: {e}", ca.display())))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let roots = Arc::new(roots);
        let loaded = credentials.load()?;
        let http = http_client(&roots, &loaded)?;
        let base = url.trim_end_matches('/');
        let token_url = if base.ends_with("/token") {
            base.to_owned()
        } else {
            format!("{base}/token")
        };
        Ok(BrokerClient {
            credentials,
            roots,
            token_url,
            current: std::sync::Mutex::new(Current {
                loaded,
                http,
                rejected: None,
            }),
        })
    }

    /// The identity of the certificate presented now (files or a token object alike).
    pub fn identity(&self) -> Result<crate::identity::Identity, ClientError> {
        let current = self
            .current
            .lock()
            .map_err(|_| ClientError::Local("an earlier request panicked".into()))?;
        Ok(current.loaded.identity.clone())
    }

    /// The HTTP client for the credentials as they are now, with the key if it is in a
    /// token: a renewed certificate or key (files replaced, token object rewritten) is
    /// loaded for this request. If the new ones cannot be used (say, the certificate was
    /// written but not yet its key), the previous ones are kept and the problem logged. A
    /// token that broke (removed, re-created, a module failure) is opened again
    /// (`DeviceCredentials::reload`, with its backoff); until that works, requests fail with
    /// its reason, a local problem.
    fn http(&self) -> Result<(reqwest::Client, Option<TokenKey>), ClientError> {
        let mut current = self
            .current
            .lock()
            .map_err(|_| ClientError::Local("an earlier request panicked".into()))?;
        let stamp = self.credentials.current_stamp(&current.loaded);
        let usable = current.loaded.usable();
        if usable {
            let stamp = match stamp {
                Ok(stamp) => stamp,
                Err(error) => {
                    tracing::warn!(%error, "cannot look at the device certificate for a renewal; using the one loaded");
                    return Ok(current.client());
                }
            };
            if stamp == current.loaded.stamp() || Some(stamp) == current.rejected {
                return Ok(current.client());
            }
        }
        match self.credentials.reload(&current.loaded).and_then(|loaded| {
            let http = http_client(&self.roots, &loaded)?;
            Ok((http, loaded))
        }) {
            Ok((http, loaded)) => {
                tracing::info!(
                    serial = %loaded.identity.serial,
                    subject = %loaded.identity.subject,
                    "device certificate loaded again (renewed or token reopened); used from this request on"
                );
                *current = Current {
                    loaded,
                    http,
                    rejected: None,
                };
            }
            Err(error) if usable => {
                tracing::warn!(%error, "the device certificate or key changed but cannot be used; still using the previous ones");
                current.rejected = stamp.ok();
            }
            Err(error) => return Err(error),
        }
        Ok(current.client())
    }

    pub async fn fetch(&self, params: &TokenParams) -> Result<Token, ClientError> {
        let mut form = vec![("grant_type", "client_credentials")];
        for (name, value) in [
            ("audience", &params.audience),
            ("scope", &params.scope),
            ("service_account", &params.service_account),
            ("target_audience", &params.target_audience),
        ] {
            if let Some(value) = value {
                form.push((name, value));
            }
        }
        // Looking for a renewal, or reopening a token, calls the PKCS#11 module (and waits
        // for another request doing so): off the runtime's workers.
        let (http, token_key) = crate::device::pkcs11::off_the_runtime(|| self.http())?;
        let response = http
            .post(&self.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| match token_key.as_ref().and_then(TokenKey::failure) {
                // The handshake failed because the device's token did: a local problem.
                Some(failure) => ClientError::Local(format!(
                    "the device key's token failed during the TLS handshake: {failure}; it is \
                     opened again for the next request"
                )),
                None => self.send_error(&e),
            })?;
        let status = response.status().as_u16();
        let body = read_capped(response, MAX_ANSWER_BYTES).await?;
        let body: Value = serde_json::from_slice(&body).map_err(|e| {
            ClientError::Unavailable(format!("unreadable answer (HTTP {status}): {e}"))
        })?;
        let text = |name: &str| body[name].as_str().map(str::to_owned);
        if status != 200 {
            let refused = ClientError::Refused {
                status,
                code: text("error").unwrap_or_else(|| "unknown".into()),
                description: text("error_description").unwrap_or_default(),
            };
            return Err(match status {
                400..=428 | 430..=499 => refused,
                // 429, 5xx, and anything a token endpoint does not answer (1xx, 2xx other
                // than 200, 3xx: redirects are not followed).
                _ => ClientError::Unavailable(refused.to_string()),
            });
        }
        Ok(Token {
            access_token: text("access_token")
                .ok_or_else(|| ClientError::Unavailable("answer without access_token".into()))?,
            id_token: text("id_token"),
            token_type: text("token_type").unwrap_or_else(|| "Bearer".into()),
            issued_token_type: text("issued_token_type"),
            scope: text("scope"),
            expires_at: unix_now()
                .saturating_add(body["expires_in"].as_i64().unwrap_or(0).clamp(0, 43_200)),
        })
    }
}

/// The largest answer read from the broker: a token answer is a few kilobytes.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The body of `response`, refused past `limit` bytes (a broker could send gigabytes).
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ClientError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() > limit => {
                return Err(ClientError::Unavailable(format!(
                    "the broker's answer is larger than {limit} bytes"
                )))
            }
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(ClientError::Unavailable(format!(
                    "the broker's answer broke off: {}",
                    root_cause(&e)
                )))
            }
        }
    }
}

impl BrokerClient {
    /// A request that got no answer, sorted by who can fix it: the device's own setup (the
    /// broker's certificate not trusted with `--ca`, a URL that cannot be used) is local
    /// (exit 1, retrying cannot help); a broker that cannot be reached is unavailable (3).
    fn send_error(&self, error: &reqwest::Error) -> ClientError {
        if let Some(tls) = rustls_error(error) {
            let fix = match tls {
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
                | rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. }) => {
                    "the broker's certificate does not name the host of --url: use the name the certificate was issued for"
                }
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
                ) => "the broker's certificate has expired (or this device's clock is wrong): renew the broker's certificate, or set the clock",
                rustls::Error::InvalidCertificate(_) => {
                    "pass --ca with the CA that signed the broker's certificate"
                }
                // Anything else in TLS (an alert, a broken record) may be the broker's or
                // the network's: unavailable, retried.
                _ => {
                    return ClientError::Unavailable(format!(
                        "TLS with {} failed: {tls}",
                        self.token_url
                    ))
                }
            };
            return ClientError::Local(format!(
                "TLS with {} failed on this device's side: {tls}; {fix}",
                self.token_url
            ));
        }
        if error.is_builder() {
            return ClientError::Local(format!(
                "{} cannot be used as the broker's URL: {}",
                self.token_url,
                root_cause(error)
            ));
        }
        ClientError::Unavailable(format!(
            "{} unreachable: {}",
            self.token_url,
            root_cause(error)
        ))
    }
}

/// The rustls error under a failed request, if TLS is what failed. io::Error hides its
/// inner error from `source()`, so it is looked into explicitly.
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| rustls_error(inner))
        {
            return Some(inner);
        }
        cause = error.source();
    }
    None
}

impl Current {
    fn client(&self) -> (reqwest::Client, Option<TokenKey>) {
        (self.http.clone(), self.loaded.token_key())
    }
}

/// TLS and HTTP for one set of loaded credentials.
fn http_client(
    roots: &Arc<rustls::RootCertStore>,
    loaded: &Loaded,
) -> Result<reqwest::Client, ClientError> {
    let local = |e: &dyn std::fmt::Display| ClientError::Local(e.to_string());
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| local(&e))?
        .with_root_certificates(roots.clone())
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            loaded.certified.clone(),
        )));
    // New connections resume from the broker's tickets, kept in memory with this client
    // only (new credentials start empty). Never on disk: rustls has no public encoding of a
    // client session (docs/devices.md, "Returning devices resume their TLS session").
    tls.resumption = rustls::client::Resumption::in_memory_sessions(256);
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        // The token endpoint is the one URL given: a redirect would re-send the request,
        // with this device's certificate, elsewhere (or over plain HTTP).
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| local(&e))
}

/// A token file reused across runs: one broker request per token lifetime, however often
/// a client library runs the executable. Its contents are an executable-source response
/// (AIP-4117) with this cache's own `token_broker` member, so the same file can also be a
/// credential configuration's `output_file`: the libraries read the response and ignore the
/// rest, and each file is written whole, atomically.
pub struct TokenCacheFile {
    file: PrivateFile,
    /// What a cached token must have been fetched with: [`cache_binding`]; empty when it
    /// could not be computed, and then nothing cached is used.
    binding: String,
}

#[derive(Serialize, Deserialize)]
struct CachedToken {
    params: TokenParams,
    #[serde(default)]
    bound_to: String,
    token: Token,
}

/// What a cached token is bound to: the broker's URL, the CA bundle the broker is trusted
/// with (`None`: the public roots) and the device certificate, chain and key as they are
/// now ([`DeviceCredentials::certificate_stamp`]). Another broker, CA or device is a miss.
pub fn cache_binding(
    url: &str,
    ca: Option<&Path>,
    credentials_stamp: &[u8; 32],
) -> Result<String, String> {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update((url.len() as u64).to_be_bytes());
    hash.update(url.as_bytes());
    match ca {
        Some(ca) => {
            let bytes =
                std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
            hash.update(sha2::Sha256::digest(&bytes));
        }
        None => hash.update(b"public roots"),
    }
    hash.update(credentials_stamp);
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl TokenCacheFile {
    pub fn new(path: &Path, binding: String) -> TokenCacheFile {
        TokenCacheFile {
            file: PrivateFile::new(path),
            binding,
        }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The stored token, if it is for these parameters and still fresh. `Err` says why a
    /// file that is there was not trusted (another user could have written it); the caller
    /// then fetches a new token, whose file replaces it.
    pub fn load(&self, params: &TokenParams) -> Result<Option<Token>, String> {
        let Some(text) = self.read_trusted()? else {
            return Ok(None);
        };
        let cached = serde_json::from_slice::<Value>(&text)
            .ok()
            .and_then(|mut file| {
                serde_json::from_value::<CachedToken>(file["token_broker"].take()).ok()
            });
        Ok(cached.and_then(|cached| {
            let bound = !self.binding.is_empty() && cached.bound_to == self.binding;
            (bound && cached.params == *params && cached.token.is_fresh()).then_some(cached.token)
        }))
    }

    /// The file's contents for `token`: `response` (the executable-source response) with
    /// what [`TokenCacheFile::load`] needs.
    pub fn contents(
        params: &TokenParams,
        binding: &str,
        token: &Token,
        mut response: Value,
    ) -> Vec<u8> {
        if let Some(map) = response.as_object_mut() {
            map.insert(
                "token_broker".into(),
                json!({ "params": params, "bound_to": binding, "token": token }),
            );
        }
        // Serializing a Value cannot fail.
        serde_json::to_vec(&response).unwrap_or_default()
    }

    /// See [`PrivateFile::read_trusted`].
    pub(crate) fn read_trusted(&self) -> Result<Option<Vec<u8>>, String> {
        self.file.read_trusted()
    }

    /// Writes atomically, readable by the owner only.
    pub fn store(&self, contents: &[u8]) -> Result<(), ClientError> {
        self.file.store(contents).map_err(ClientError::Local)
    }
}

/// Tokens the agent keeps at most: each distinct parameter set a local client asks for is
/// one entry, so a client cannot grow the agent without bound.
pub const MAX_CACHED_TOKENS: u64 = 256;
/// Distinct broker requests in flight at most; more are refused at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// How long the last failure for a parameter set is remembered, to explain the next wait.
const FAILURE_MEMORY: Duration = Duration::from_secs(300);

type Answer = Option<Result<Token, ClientError>>;

/// Shared by the agent: one client, a bounded cache of tokens (each until its refresh
/// margin), and at most one broker request in flight per parameter set. No lock is held
/// while the broker answers: a slow request for one set never delays another, and a cached
/// token is served whatever is in flight.
pub struct CachingClient {
    client: Arc<BrokerClient>,
    tokens: moka::sync::Cache<TokenParams, Token>,
    /// The last failure of each parameter set, said when a later request must wait.
    failures: moka::sync::Cache<TokenParams, ClientError>,
    in_flight: Arc<std::sync::Mutex<HashMap<TokenParams, watch::Receiver<Answer>>>>,
}

/// Removes a parameter set from the in-flight map when its broker request ends.
struct InFlight {
    map: Arc<std::sync::Mutex<HashMap<TokenParams, watch::Receiver<Answer>>>>,
    params: TokenParams,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.remove(&self.params);
    }
}

/// A cached token lives until its refresh margin.
struct UntilRefresh;

impl moka::Expiry<TokenParams, Token> for UntilRefresh {
    fn expire_after_create(
        &self,
        _: &TokenParams,
        token: &Token,
        _: std::time::Instant,
    ) -> Option<Duration> {
        let left = token.expires_at - REFRESH_MARGIN - unix_now();
        Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
    }
}

impl CachingClient {
    pub fn new(client: BrokerClient) -> Arc<CachingClient> {
        Arc::new(CachingClient {
            client: Arc::new(client),
            tokens: moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED_TOKENS)
                .expire_after(UntilRefresh)
                .build(),
            failures: moka::sync::Cache::builder()
                .max_capacity(MAX_CACHED_TOKENS)
                .time_to_live(FAILURE_MEMORY)
                .build(),
            in_flight: Arc::default(),
        })
    }

    /// A fresh token for `params`: from the cache, or from the broker request in flight
    /// for them (started if there is none), waiting at most `patience`. A request that
    /// takes longer goes on, and its token is cached for the next caller.
    pub async fn get(
        &self,
        params: &TokenParams,
        patience: Duration,
    ) -> Result<Token, ClientError> {
        if let Some(token) = self.tokens.get(params).filter(Token::is_fresh) {
            return Ok(token);
        }
        let mut answer = self.join_or_start(params)?;
        let waited = tokio::time::timeout(patience, answer.wait_for(Option::is_some))
            .await
            .map(|answered| answered.ok().and_then(|answer| answer.clone()));
        match waited {
            Ok(Some(result)) => result,
            Ok(None) => Err(ClientError::Local(
                "the broker request ended without an answer".into(),
            )),
            Err(_) => {
                let last = self
                    .failures
                    .get(params)
                    .map(|e| format!("; the last answer for this request was: {e}"))
                    .unwrap_or_default();
                Err(ClientError::Unavailable(format!(
                    "no answer from the broker within {patience:?}, the time client libraries wait; the request goes on and its token is served to the next request{last}"
                )))
            }
        }
    }

    /// The answer of the broker request in flight for `params`, or of a new one.
    fn join_or_start(&self, params: &TokenParams) -> Result<watch::Receiver<Answer>, ClientError> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A request whose task ended without answering (its sender dropped) is not joined.
        if let Some(answer) = in_flight.get(params).filter(|a| a.has_changed().is_ok()) {
            return Ok(answer.clone());
        }
        if in_flight.len() >= MAX_IN_FLIGHT {
            return Err(ClientError::Unavailable(format!(
                "{MAX_IN_FLIGHT} different token requests are already waiting for the broker; retry shortly"
            )));
        }
        let (send, answer) = watch::channel(None);
        in_flight.insert(params.clone(), answer.clone());
        let (client, tokens, failures, in_flight) = (
            self.client.clone(),
            self.tokens.clone(),
            self.failures.clone(),
            self.in_flight.clone(),
        );
        let params = params.clone();
        tokio::spawn(async move {
            // Whatever ends the request, even a panic, its key leaves the in-flight map.
            let done = InFlight {
                map: in_flight,
                params: params.clone(),
            };
            let result = client.fetch(&params).await;
            match &result {
                Ok(token) => {
                    tokens.insert(params.clone(), token.clone());
                    failures.invalidate(&params);
                }
                Err(error) => failures.insert(params.clone(), error.clone()),
            }
            drop(done);
            let _ = send.send(Some(result));
        });
        Ok(answer)
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn token() -> Token {
        Token {
            access_token: "cached-token".into(),
            id_token: None,
            token_type: "Bearer".into(),
            issued_token_type: None,
            scope: None,
            expires_at: unix_now() + 3600,
        }
    }

    fn contents(params: &TokenParams) -> Vec<u8> {
        let token = token();
        // The executable-source response the cache file also is (its shape is executable.rs's).
        let response = json!({ "version": 1, "success": true });
        TokenCacheFile::contents(params, "bound", &token, response)
    }

    #[test]
    fn a_file_planted_at_the_temporary_path_never_receives_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "victim").unwrap();
        // The name the cache used to write through: predictable from the process id.
        let planted = path.with_extension(format!("tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let cache = TokenCacheFile::new(&path, "bound".into());
        let params = TokenParams::default();
        cache.store(&contents(&params)).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            cache.load(&params).unwrap().unwrap().access_token,
            "cached-token"
        );
    }

    #[test]
    fn a_cache_file_others_can_read_or_write_or_a_symlink_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.json");
        let cache = TokenCacheFile::new(&path, "bound".into());
        let params = TokenParams::default();
        cache.store(&contents(&params)).unwrap();
        assert!(cache.load(&params).unwrap().is_some());
        for mode in [0o644, 0o620, 0o606] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let reason = cache.load(&params).unwrap_err();
            assert!(reason.contains("other users"), "mode {mode:o}: {reason}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(TokenCacheFile::new(&link, "bound".into())
            .load(&params)
            .is_err());
        assert!(cache.load(&params).unwrap().is_some());
        // Another user's file (only root can make one to test with).
        if PrivateFile::new(&path).current_uid().unwrap() == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert!(cache.load(&params).is_err());
        }
    }
}
