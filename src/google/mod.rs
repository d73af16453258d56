//! Google Cloud APIs: STS token exchange, IAM Credentials, and the broker's own credentials.
//!
//! Every call goes through the transport (`transport.rs`: timeouts, retries, one deadline).
//! Base URLs come from `[google]`, which is how tests point the broker at a fake that speaks
//! Google's wire protocol.

mod credentials;
pub mod setup;
mod transport;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::clock::unix_now;
use crate::config::GoogleConfig;
use crate::metrics::Metrics;
use credentials::Credentials;
use transport::{expiry, Transport, MAX_LIFETIME};
pub use transport::{AccessToken, Api, UpstreamError};

/// The scope of full Google Cloud access (IAM decides what it allows).
pub const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

pub struct Google {
    transport: Transport,
    credentials: Credentials,
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
        Ok(Google {
            credentials: Credentials::load(config)?,
            transport: Transport::new(config, metrics)?,
        })
    }

    pub fn config(&self) -> &GoogleConfig {
        &self.transport.config
    }

    fn iam_url(&self, service_account: &str, method: &str) -> String {
        format!(
            "{}/v1/projects/-/serviceAccounts/{}:{method}",
            self.transport
                .config
                .iam_credentials_url
                .trim_end_matches('/'),
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
        let url = format!(
            "{}/v1/token",
            self.transport.config.sts_url.trim_end_matches('/')
        );
        let audience = self.transport.config.provider_resource();
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
            .transport
            .call(Api::Sts, || self.transport.http.post(&url).form(&form))
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
            "lifetime": format!("{}s", self.transport.config.access_token_lifetime.as_secs()),
        });
        let answer: Answer = self
            .transport
            .call(Api::GenerateAccessToken, || {
                self.transport
                    .http
                    .post(&url)
                    .bearer_auth(federated)
                    .json(&body)
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
            .transport
            .call(Api::GenerateIdToken, || {
                self.transport
                    .http
                    .post(&url)
                    .bearer_auth(federated)
                    .json(&body)
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
        let token = self.credentials.token(&self.transport).await?;
        let url = self.iam_url(service_account, "signJwt");
        let body = json!({ "payload": payload });
        let answer: Answer = self
            .transport
            .call(Api::SignJwt, || {
                self.transport
                    .http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
            })
            .await?;
        Ok(answer.signed_jwt)
    }
}

/// `exp` of a JWT, read without verifying (the token came from Google over TLS).
fn jwt_expiry(jwt: &str) -> Option<i64> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let payload = jwt.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    claims["exp"].as_i64()
}
