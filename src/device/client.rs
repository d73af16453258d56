//! The device side: asking a broker for a token over mutual TLS (`token-broker token`, and
//! the metadata agent behind it).
//!
//! Failures are sorted by who can fix them: the device's own files (exit 1), the broker's
//! refusal with its reason (exit 2), the broker or network being unavailable (exit 3).

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::clock::unix_now;
use crate::device::credentials::{DeviceCredentials, Loaded};
pub use crate::device::error::ClientError;
use crate::device::pkcs11::TokenKey;
use crate::device::private_file::PrivateFile;
use crate::device::sessions::{binding, SessionFile};
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
    /// `token --session-file`: TLS sessions kept between runs (else in memory only).
    sessions: Option<Arc<SessionFile>>,
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
        let http = http_client(&roots, &loaded, None)?;
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
            sessions: None,
        })
    }

    /// Resumes from the sessions of `sessions` (read now) and keeps the broker's new ones
    /// there for [`BrokerClient::save_sessions`].
    pub fn with_session_file(
        mut self,
        sessions: Arc<SessionFile>,
    ) -> Result<BrokerClient, ClientError> {
        let current = self
            .current
            .get_mut()
            .map_err(|_| ClientError::Local("an earlier request panicked".into()))?;
        current.http = http_client(&self.roots, &current.loaded, Some(&sessions))?;
        self.sessions = Some(sessions);
        Ok(self)
    }

    /// The session file, if any: writes the sessions held now over it.
    pub fn save_sessions(&self) -> Result<(), ClientError> {
        self.sessions
            .as_ref()
            .map_or(Ok(()), |sessions| sessions.save())
    }

    /// The session file and why it (or some of its sessions) was not used, if so.
    pub fn sessions_ignored(&self) -> Option<(&Path, String)> {
        let sessions = self.sessions.as_ref()?;
        Some((sessions.path(), sessions.ignored()?))
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
            let http = http_client(&self.roots, &loaded, self.sessions.as_ref())?;
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
        let (http, token_key) = self.http()?;
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
                None => ClientError::Unavailable(format!(
                    "{} unreachable: {}",
                    self.token_url,
                    root_cause(&e)
                )),
            })?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.map_err(|e| {
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
                429 | 500..=599 => ClientError::Unavailable(refused.to_string()),
                _ => refused,
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

impl Current {
    fn client(&self) -> (reqwest::Client, Option<TokenKey>) {
        (self.http.clone(), self.loaded.token_key())
    }
}

/// TLS and HTTP for one set of loaded credentials.
fn http_client(
    roots: &Arc<rustls::RootCertStore>,
    loaded: &Loaded,
    sessions: Option<&Arc<SessionFile>>,
) -> Result<reqwest::Client, ClientError> {
    let local = |e: &dyn std::fmt::Display| ClientError::Local(e.to_string());
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| local(&e))?
        .with_root_certificates(roots.clone())
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            loaded.certified.clone(),
        )));
    // New connections resume from the broker's tickets: kept in memory, with this client
    // only (new credentials start empty), or in `token`'s session file for its next run,
    // bound to this config's verifier and certificate as rustls' own sessions are.
    tls.resumption = match sessions {
        Some(sessions) => {
            sessions.load(&tls, binding(roots, &loaded.certified.cert));
            rustls::client::Resumption::store(sessions.clone())
        }
        None => rustls::client::Resumption::in_memory_sessions(256),
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
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
}

#[derive(Serialize, Deserialize)]
struct CachedToken {
    params: TokenParams,
    token: Token,
}

impl TokenCacheFile {
    pub fn new(path: &Path) -> TokenCacheFile {
        TokenCacheFile {
            file: PrivateFile::new(path),
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
            (cached.params == *params && cached.token.is_fresh()).then_some(cached.token)
        }))
    }

    /// The file's contents for `token`: `response` (the executable-source response) with
    /// what [`TokenCacheFile::load`] needs.
    pub fn contents(params: &TokenParams, token: &Token, mut response: Value) -> Vec<u8> {
        if let Some(map) = response.as_object_mut() {
            map.insert(
                "token_broker".into(),
                json!({ "params": params, "token": token }),
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

/// Shared by the agent: one client, and an in-memory token per parameter set.
pub struct CachingClient {
    client: BrokerClient,
    tokens: tokio::sync::Mutex<std::collections::HashMap<TokenParams, Token>>,
}

impl CachingClient {
    pub fn new(client: BrokerClient) -> Arc<CachingClient> {
        Arc::new(CachingClient {
            client,
            tokens: Default::default(),
        })
    }

    pub async fn get(&self, params: &TokenParams) -> Result<Token, ClientError> {
        let mut tokens = self.tokens.lock().await;
        if let Some(token) = tokens.get(params).filter(|t| t.is_fresh()) {
            return Ok(token.clone());
        }
        let token = self.client.fetch(params).await?;
        tokens.retain(|_, t| t.is_fresh());
        tokens.insert(params.clone(), token.clone());
        Ok(token)
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
        TokenCacheFile::contents(params, &token, response)
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
        let cache = TokenCacheFile::new(&path);
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
        let cache = TokenCacheFile::new(&path);
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
        assert!(TokenCacheFile::new(&link).load(&params).is_err());
        assert!(cache.load(&params).unwrap().is_some());
        // Another user's file (only root can make one to test with).
        if PrivateFile::new(&path).current_uid().unwrap() == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert!(cache.load(&params).is_err());
        }
    }
}
