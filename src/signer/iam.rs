//! Signing with Google IAM Credentials `signJwt`: the broker holds no key at all; Google
//! signs as the configured service account and publishes the keys itself.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use super::contract::{Signer, SignerError};
use crate::google::Google;

pub struct IamSigner {
    google: Arc<Google>,
    service_account: String,
    jwks_uri: String,
}

impl IamSigner {
    pub fn new(google: Arc<Google>, service_account: &str, jwks_uri: Option<&str>) -> IamSigner {
        IamSigner {
            google,
            service_account: service_account.to_owned(),
            jwks_uri: jwks_uri.map(str::to_owned).unwrap_or_else(|| {
                format!(
                    "https://www.googleapis.com/service_accounts/v1/metadata/jwk/{service_account}"
                )
            }),
        }
    }
}

#[async_trait]
impl Signer for IamSigner {
    fn kind(&self) -> &'static str {
        "iam"
    }

    /// Google signs service-account JWTs with RS256 keys.
    fn algorithms(&self) -> Vec<&'static str> {
        vec!["RS256"]
    }

    fn jwks(&self) -> Option<&Value> {
        None
    }

    fn jwks_uri(&self) -> Option<&str> {
        Some(&self.jwks_uri)
    }

    async fn sign(&self, payload: &str) -> Result<String, SignerError> {
        Ok(self.google.sign_jwt(&self.service_account, payload).await?)
    }
}
