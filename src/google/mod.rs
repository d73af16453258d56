//! Google Cloud APIs: STS token exchange, IAM Credentials, and the broker's own credentials.
//!
//! Every call goes through [`Google::call`]: a per-request timeout, retries with jittered
//! exponential backoff on 429/5xx/connection errors, `Retry-After` honoured, all inside one
//! deadline so a device's request never hangs. Base URLs come from `[google]`, which is how
//! tests point the broker at a fake that speaks Google's wire protocol.

mod credentials;
pub mod setup;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::broker::unix_now;
use crate::config::GoogleConfig;
use crate::metrics::Metrics;
use credentials::Credentials;

/// The upstream APIs, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Metadata,
    OAuth,
    Sts,
    SignJwt,
    GenerateAccessToken,
    GenerateIdToken,
}

impl Api {
    pub fn label(self) -> &'static str {
        match self {
            Api::Metadata => "metadata",
            Api::OAuth => "oauth2",
            Api::Sts => "sts",
            Api::SignJwt => "signJwt",
            Api::GenerateAccessToken => "generateAccessToken",
            Api::GenerateIdToken => "generateIdToken",
        }
    }
}

/// How an upstream call failed, after retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Google said the caller may not do this (HTTP 403).
    #[error("Google {} denied the request: {message}", .api.label())]
    Denied { api: Api, message: String },
    /// Overloaded, failing or unreachable until the deadline.
    #[error("Google {} is unavailable: {message}", .api.label())]
    Unavailable {
        api: Api,
        message: String,
        retry_after: Option<u64>,
    },
    /// Any other refusal (4xx): a configuration problem on our side or Google's.
    #[error("Google {} refused the request (HTTP {status}): {message}", .api.label())]
    Rejected {
        api: Api,
        status: u16,
        message: String,
    },
    /// A success status with a body we could not understand.
    #[error("Google {} sent an unreadable answer: {detail}", .api.label())]
    Malformed { api: Api, detail: String },
    /// The broker's own Google setup is wrong (e.g. unreadable key file).
    #[error("Google credentials: {0}")]
    Credentials(String),
    /// The request's upstream calls together took longer than the deadline.
    #[error("Google did not answer within {0}s")]
    DeadlineExceeded(u64),
}

/// An OAuth access token and when it expires (Unix seconds).
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub token: String,
    pub expires_at: i64,
}

pub struct Google {
    config: GoogleConfig,
    http: reqwest::Client,
    credentials: Credentials,
    metrics: Arc<Metrics>,
}

/// Largest upstream answer read; Google's are a few kilobytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Longest lifetime believed from an upstream answer (12h, Google's maximum).
const MAX_LIFETIME: i64 = 12 * 3600;

/// `now + seconds`, with the lifetime clamped to what Google can issue.
fn expiry(seconds: i64) -> i64 {
    unix_now().saturating_add(seconds.clamp(0, MAX_LIFETIME))
}

/// Backoff between attempts: exponential from 100 ms, capped at 2 s, with full jitter.
fn backoff(attempt: u32) -> Duration {
    let ceiling = Duration::from_millis(100).saturating_mul(1 << attempt.min(5));
    ceiling
        .min(Duration::from_secs(2))
        .mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// What one attempt came to.
enum Attempt<T> {
    Done(Result<T, UpstreamError>),
    Retry {
        message: String,
        retry_after: Option<u64>,
    },
}

impl Google {
    pub fn new(config: &GoogleConfig, metrics: Arc<Metrics>) -> Result<Google, String> {
        for (name, url) in [
            ("sts_url", &config.sts_url),
            ("iam_credentials_url", &config.iam_credentials_url),
            ("metadata_url", &config.metadata_url),
        ] {
            url::Url::parse(url).map_err(|e| format!("google.{name} {url:?}: {e}"))?;
        }
        let credentials = Credentials::load(config)?;
        let tls = crate::tls::public_client_config().map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Google {
            config: config.clone(),
            http,
            credentials,
            metrics,
        })
    }

    pub fn config(&self) -> &GoogleConfig {
        &self.config
    }

    /// Sends the request `build` makes, retrying within the deadline, and parses the JSON answer.
    async fn call<T: DeserializeOwned>(
        &self,
        api: Api,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, UpstreamError> {
        let deadline = Instant::now() + self.config.deadline;
        let mut attempt = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let (message, retry_after) = match self.attempt(api, &build, remaining).await {
                Attempt::Done(result) => return result,
                Attempt::Retry {
                    message,
                    retry_after,
                } => (message, retry_after),
            };
            // Google's Retry-After, but never sooner than our backoff nor absurdly late.
            let asked = Duration::from_secs(retry_after.unwrap_or(0).min(300));
            let wait = asked.max(backoff(attempt));
            if wait >= deadline.saturating_duration_since(Instant::now()) {
                return Err(UpstreamError::Unavailable {
                    api,
                    message,
                    retry_after: Some(retry_after.unwrap_or(1)),
                });
            }
            tracing::debug!(api = api.label(), attempt, wait_ms = wait.as_millis() as u64, %message, "retrying upstream call");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    async fn attempt<T: DeserializeOwned>(
        &self,
        api: Api,
        build: &impl Fn() -> reqwest::RequestBuilder,
        remaining: Duration,
    ) -> Attempt<T> {
        let timeout = self.config.request_timeout.min(remaining);
        let started = Instant::now();
        let exchange = async {
            let mut response = build().send().await?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            // Google's answers are small; a huge one is not worth our memory.
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    body.truncate(0);
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, retry_after, body))
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        self.metrics
            .upstream_duration
            .with_label_values(&[api.label()])
            .observe(started.elapsed().as_secs_f64());
        let (status, retry_after, body) = match outcome {
            Err(_) => {
                self.count(api, "timeout");
                return Attempt::Retry {
                    message: format!("no answer within {}ms", timeout.as_millis()),
                    retry_after: None,
                };
            }
            Ok(Err(error)) => {
                self.count(api, "error");
                return Attempt::Retry {
                    message: format!("connection failed: {}", root_cause(&error)),
                    retry_after: None,
                };
            }
            Ok(Ok(answer)) => answer,
        };
        self.count(api, &status.to_string());
        match status {
            200..=299 => {
                Attempt::Done(
                    serde_json::from_slice(&body).map_err(|e| UpstreamError::Malformed {
                        api,
                        detail: e.to_string(),
                    }),
                )
            }
            429 | 500..=599 => Attempt::Retry {
                message: format!("HTTP {status}: {}", error_message(&body)),
                retry_after,
            },
            403 => Attempt::Done(Err(UpstreamError::Denied {
                api,
                message: error_message(&body),
            })),
            // STS says "not this principal" with a 400 and an OAuth error code.
            400 if api == Api::Sts && is_oauth_denial(&body) => {
                Attempt::Done(Err(UpstreamError::Denied {
                    api,
                    message: error_message(&body),
                }))
            }
            _ => Attempt::Done(Err(UpstreamError::Rejected {
                api,
                status,
                message: error_message(&body),
            })),
        }
    }

    fn count(&self, api: Api, code: &str) {
        self.metrics
            .upstream_requests
            .with_label_values(&[api.label(), code])
            .inc();
    }

    fn iam_url(&self, service_account: &str, method: &str) -> String {
        format!(
            "{}/v1/projects/-/serviceAccounts/{}:{method}",
            self.config.iam_credentials_url.trim_end_matches('/'),
            service_account
        )
    }

    /// STS token exchange (RFC 8693) of a broker ID token for a federated access token.
    pub async fn exchange(
        &self,
        subject_token: &str,
        scope: &str,
    ) -> Result<AccessToken, UpstreamError> {
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
            expires_in: Option<i64>,
        }
        let url = format!("{}/v1/token", self.config.sts_url.trim_end_matches('/'));
        let audience = self.config.provider_resource();
        let form = [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("audience", audience.as_str()),
            ("scope", scope),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("subject_token", subject_token),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ];
        let answer: Answer = self
            .call(Api::Sts, || self.http.post(&url).form(&form))
            .await?;
        Ok(AccessToken {
            token: answer.access_token,
            expires_at: expiry(answer.expires_in.unwrap_or(3600)),
        })
    }

    /// IAM Credentials `generateAccessToken`, authorised by a federated token.
    pub async fn generate_access_token(
        &self,
        federated: &str,
        service_account: &str,
        scopes: &[&str],
    ) -> Result<AccessToken, UpstreamError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            access_token: String,
            expire_time: String,
        }
        let url = self.iam_url(service_account, "generateAccessToken");
        let body = json!({
            "scope": scopes,
            "lifetime": format!("{}s", self.config.access_token_lifetime.as_secs()),
        });
        let answer: Answer = self
            .call(Api::GenerateAccessToken, || {
                self.http.post(&url).bearer_auth(federated).json(&body)
            })
            .await?;
        let expires_at = answer
            .expire_time
            .parse::<jiff::Timestamp>()
            .map_err(|e| UpstreamError::Malformed {
                api: Api::GenerateAccessToken,
                detail: format!("expireTime {:?}: {e}", answer.expire_time),
            })?
            .as_second()
            .min(unix_now().saturating_add(MAX_LIFETIME));
        Ok(AccessToken {
            token: answer.access_token,
            expires_at,
        })
    }

    /// IAM Credentials `generateIdToken`: a Google-signed ID token for `audience`.
    pub async fn generate_id_token(
        &self,
        federated: &str,
        service_account: &str,
        audience: &str,
    ) -> Result<AccessToken, UpstreamError> {
        #[derive(Deserialize)]
        struct Answer {
            token: String,
        }
        let url = self.iam_url(service_account, "generateIdToken");
        let body = json!({ "audience": audience, "includeEmail": true });
        let answer: Answer = self
            .call(Api::GenerateIdToken, || {
                self.http.post(&url).bearer_auth(federated).json(&body)
            })
            .await?;
        let expires_at = jwt_expiry(&answer.token).ok_or_else(|| UpstreamError::Malformed {
            api: Api::GenerateIdToken,
            detail: "token is not a JWT with an exp claim".into(),
        })?;
        Ok(AccessToken {
            token: answer.token,
            expires_at: expires_at.min(unix_now().saturating_add(MAX_LIFETIME)),
        })
    }

    /// IAM Credentials `signJwt` with the broker's own credentials.
    pub async fn sign_jwt(
        &self,
        service_account: &str,
        payload: &str,
    ) -> Result<String, UpstreamError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            signed_jwt: String,
        }
        let token = self.credentials.token(self).await?;
        let url = self.iam_url(service_account, "signJwt");
        let body = json!({ "payload": payload });
        let answer: Answer = self
            .call(Api::SignJwt, || {
                self.http.post(&url).bearer_auth(&token).json(&body)
            })
            .await?;
        Ok(answer.signed_jwt)
    }
}

/// An STS refusal that concerns the principal rather than the request's form.
fn is_oauth_denial(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        matches!(
            v["error"].as_str(),
            Some("unauthorized_client" | "access_denied")
        )
    })
}

/// The human part of a Google error body: `{"error":{"message"}}` (googleapis) or
/// `{"error","error_description"}` (OAuth/STS), else the start of the text.
fn error_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(v) => v["error"]["message"]
            .as_str()
            .or(v["error_description"].as_str())
            .or(v["error"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string()),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    text.chars().take(300).collect()
}

/// The innermost cause of a reqwest error: the part that says what went wrong.
pub(crate) fn root_cause(error: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    let mut last = error.to_string();
    while let Some(e) = source {
        last = e.to_string();
        source = e.source();
    }
    last
}

/// `exp` of a JWT, read without verifying (the token came from Google over TLS).
fn jwt_expiry(jwt: &str) -> Option<i64> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let payload = jwt.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    claims["exp"].as_i64()
}
