//! The broker's own Google credentials: the metadata server (GCE, GKE, Cloud Run) or a
//! service-account key file (OAuth 2.0 JWT-bearer grant, RFC 7523).
//!
//! Hand-written rather than a crate: it is two small HTTP calls, and the maintained auth
//! crates pull a second HTTP stack and TLS configuration we would not control. The token is
//! cached and refreshed a minute before it expires; one refresh at a time.

use josekit::jws::{JwsHeader, JwsSigner, RS256};
use josekit::jwt::{self, JwtPayload};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::transport::{expiry, AccessToken, Api, Transport, UpstreamError};
use super::CLOUD_PLATFORM;
use crate::clock::unix_now;
use crate::config::GoogleConfig;

const REFRESH_BEFORE_EXPIRY: i64 = 60;

enum Source {
    Metadata,
    KeyFile {
        email: String,
        key_id: String,
        token_uri: String,
        signer: Box<dyn JwsSigner>,
    },
}

pub(super) struct Credentials {
    source: Source,
    cached: Mutex<Option<AccessToken>>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: i64,
}

/// The fields of a Google service-account key file the broker uses.
#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key_id: String,
    token_uri: String,
    /// Wiped when dropped; the parsed key lives on in OpenSSL, which clears it on free.
    private_key: zeroize::Zeroizing<String>,
}

impl Credentials {
    pub(super) fn load(config: &GoogleConfig) -> Result<Credentials, String> {
        let source = if config.credentials == "metadata" {
            Source::Metadata
        } else {
            let path = &config.credentials;
            let bytes = crate::pem::read_secret(std::path::Path::new(path))
                .map_err(|e| format!("google.credentials: {e}"))?;
            let key: ServiceAccountKey = serde_json::from_slice(&bytes).map_err(|e| {
                format!("google.credentials: {path} is not a service-account key file: {e}")
            })?;
            let signer = RS256
                .signer_from_pem(key.private_key.as_bytes())
                .map_err(|e| format!("google.credentials: {path}: private_key: {e}"))?;
            Source::KeyFile {
                email: key.client_email,
                key_id: key.private_key_id,
                token_uri: key.token_uri,
                signer: Box::new(signer),
            }
        };
        Ok(Credentials {
            source,
            cached: Mutex::new(None),
        })
    }

    /// A valid access token for the broker's own identity.
    pub(super) async fn token(&self, transport: &Transport) -> Result<String, UpstreamError> {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached.as_ref() {
            if token.expires_at - REFRESH_BEFORE_EXPIRY > unix_now() {
                return Ok(token.token.clone());
            }
        }
        let answer: TokenAnswer = match &self.source {
            Source::Metadata => {
                let url = format!(
                    "{}/computeMetadata/v1/instance/service-accounts/default/token",
                    transport.config.metadata_url.trim_end_matches('/')
                );
                transport
                    .call(Api::Metadata, || {
                        transport.http.get(&url).header("Metadata-Flavor", "Google")
                    })
                    .await?
            }
            Source::KeyFile {
                email,
                key_id,
                token_uri,
                signer,
            } => {
                let assertion = assertion(email, key_id, token_uri, signer.as_ref())?;
                let form = [
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion.as_str()),
                ];
                transport
                    .call(Api::OAuth, || transport.http.post(token_uri).form(&form))
                    .await?
            }
        };
        let token = AccessToken {
            token: answer.access_token,
            expires_at: expiry(answer.expires_in),
        };
        *cached = Some(token.clone());
        Ok(token.token)
    }
}

/// The signed JWT a service account presents to the OAuth token endpoint.
fn assertion(
    email: &str,
    key_id: &str,
    token_uri: &str,
    signer: &dyn JwsSigner,
) -> Result<String, UpstreamError> {
    let now = unix_now();
    let claims = json!({
        "iss": email,
        "scope": CLOUD_PLATFORM,
        "aud": token_uri,
        "iat": now,
        "exp": now + 3600,
    });
    let mut header = JwsHeader::new();
    header.set_token_type("JWT");
    header.set_key_id(key_id);
    let Value::Object(map) = claims else {
        return Err(UpstreamError::Credentials("assertion claims".into()));
    };
    let payload =
        JwtPayload::from_map(map).map_err(|e| UpstreamError::Credentials(e.to_string()))?;
    jwt::encode_with_signer(&payload, &header, signer)
        .map_err(|e| UpstreamError::Credentials(format!("signing the assertion: {e}")))
}
