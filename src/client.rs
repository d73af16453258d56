//! The device side: asking a broker for a token over mutual TLS (`token-broker token`, and
//! the metadata agent behind it).
//!
//! Failures are sorted by who can fix them: the device's own files (exit 1), the broker's
//! refusal with its reason (exit 2), the broker or network being unavailable (exit 3).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::broker::unix_now;
use crate::identity::Identity;
use crate::pem;

/// A fetched token is reused until this long before it expires.
pub const REFRESH_MARGIN: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Local(String),
    #[error("the broker refused (HTTP {status} {code}): {description}")]
    Refused {
        status: u16,
        code: String,
        description: String,
    },
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Local(_) => 1,
            ClientError::Refused { .. } => 2,
            ClientError::Unavailable(_) => 3,
        }
    }

    /// The AIP-4117 error code for executable-sourced credentials.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Local(_) => "local_error",
            ClientError::Refused { code, .. } => code,
            ClientError::Unavailable(_) => "temporarily_unavailable",
        }
    }
}

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

    /// AIP-4117 executable response (an ID token for STS to exchange).
    pub fn to_executable(&self) -> Value {
        json!({
            "version": 1,
            "success": true,
            "token_type": "urn:ietf:params:oauth:token-type:id_token",
            "id_token": self.id_token.as_deref().unwrap_or(&self.access_token),
            "expiration_time": self.expires_at,
        })
    }
}

/// AIP-4117 error response.
pub fn executable_error(error: &ClientError) -> Value {
    json!({ "version": 1, "success": false, "code": error.code(), "message": error.to_string() })
}

pub struct BrokerClient {
    http: reqwest::Client,
    token_url: String,
}

impl BrokerClient {
    /// A client presenting `cert` (PEM chain) and `key`, trusting `ca` or the public roots.
    pub fn new(
        url: &str,
        cert: &Path,
        key: &Path,
        ca: Option<&Path>,
    ) -> Result<BrokerClient, ClientError> {
        let local = |e: &dyn std::fmt::Display| ClientError::Local(e.to_string());
        check_key_permissions(key)?;
        let chain = pem::certificates(cert).map_err(|e| local(&e))?;
        if let Some(leaf) = chain.first() {
            let identity =
                Identity::from_der(leaf).map_err(|e| local(&format!("{}: {e}", cert.display())))?;
            if identity.not_after < unix_now() {
                return Err(ClientError::Local(format!(
                    "certificate {} expired at {}; renew it with your PKI",
                    cert.display(),
                    crate::trust::rfc3339(identity.not_after)
                )));
            }
        }
        let key = pem::private_key(key).map_err(|e| local(&e))?;
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
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| local(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key.clone_key())
            .map_err(|e| local(&format!("certificate and key do not fit together: {e}")))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| local(&e))?;
        let base = url.trim_end_matches('/');
        let token_url = if base.ends_with("/token") {
            base.to_owned()
        } else {
            format!("{base}/token")
        };
        Ok(BrokerClient { http, token_url })
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
        let response = self
            .http
            .post(&self.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                ClientError::Unavailable(format!(
                    "{} unreachable: {}",
                    self.token_url,
                    root_cause(&e)
                ))
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

fn root_cause(error: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// A private key anyone but its owner can read is refused, stricter than the server (which
/// allows a group): on a device the key is its whole identity and has one user.
fn check_key_permissions(key: &Path) -> Result<(), ClientError> {
    let mode = pem::file_mode(key)
        .map_err(|e| ClientError::Local(format!("cannot read key {}: {e}", key.display())))?;
    if mode & 0o077 != 0 {
        return Err(ClientError::Local(format!(
            "key {} is readable by others (mode {mode:03o}); run: chmod 600 {}",
            key.display(),
            key.display()
        )));
    }
    Ok(())
}

/// A token file reused across runs: one broker request per token lifetime, however often
/// a client library runs the executable.
pub struct TokenCacheFile {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct CachedToken {
    params: TokenParams,
    token: Token,
}

impl TokenCacheFile {
    pub fn new(path: &Path) -> TokenCacheFile {
        TokenCacheFile {
            path: path.to_owned(),
        }
    }

    /// The stored token, if it is for these parameters and still fresh.
    pub fn load(&self, params: &TokenParams) -> Option<Token> {
        let text = std::fs::read(&self.path).ok()?;
        let cached: CachedToken = serde_json::from_slice(&text).ok()?;
        (cached.params == *params && cached.token.is_fresh()).then_some(cached.token)
    }

    /// Writes atomically (temporary file + rename), readable by the owner only.
    pub fn store(&self, params: &TokenParams, token: &Token) -> Result<(), ClientError> {
        let io =
            |e: std::io::Error| ClientError::Local(format!("cache {}: {e}", self.path.display()));
        let bytes = serde_json::to_vec(&CachedToken {
            params: params.clone(),
            token: token.clone(),
        })
        .map_err(|e| ClientError::Local(e.to_string()))?;
        let temporary = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        std::io::Write::write_all(&mut options.open(&temporary).map_err(io)?, &bytes)
            .map_err(io)?;
        std::fs::rename(&temporary, &self.path).map_err(io)
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
