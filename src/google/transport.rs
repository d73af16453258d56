//! The one HTTP client for Google: every call goes through [`Transport::call`]: a
//! per-request timeout, retries with jittered exponential backoff on 429/5xx/connection
//! errors, `Retry-After` honoured, all inside one deadline so a device's request never
//! hangs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::clock::unix_now;
use crate::config::GoogleConfig;
use crate::metrics::Metrics;
use crate::redact::root_cause;

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

/// Google's base URLs and timings, the HTTP client and the metrics every call counts in.
pub(super) struct Transport {
    pub(super) config: GoogleConfig,
    pub(super) http: reqwest::Client,
    metrics: Arc<Metrics>,
}

/// Largest upstream answer read; Google's are a few kilobytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Longest lifetime believed from an upstream answer (12h, Google's maximum).
pub(super) const MAX_LIFETIME: i64 = 12 * 3600;

/// `now + seconds`, with the lifetime clamped to what Google can issue.
pub(super) fn expiry(seconds: i64) -> i64 {
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

impl Transport {
    pub(super) fn new(config: &GoogleConfig, metrics: Arc<Metrics>) -> Result<Transport, String> {
        let tls = crate::crypto::public_client_config().map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Transport {
            config: config.clone(),
            http,
            metrics,
        })
    }

    /// Sends the request `build` makes, retrying within the deadline, and parses the JSON answer.
    pub(super) async fn call<T: DeserializeOwned>(
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
