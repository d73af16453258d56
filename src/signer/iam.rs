//! Signing with Google IAM Credentials `signJwt`: the broker holds no key at all; Google
//! signs as the configured service account and publishes the keys itself.
//!
//! Whether signing works is only known by calling Google: the outcome of the last `signJwt`
//! is kept for `/readyz`, and when it is old a probe (one `signJwt` of a throwaway claims
//! set) runs in the background, at most one at a time and only as often as outcomes age.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::contract::{Signer, SignerError};
use crate::google::{Google, UpstreamError};

/// How long a successful `signJwt` vouches for the signer before `/readyz` probes again.
const SUCCESS_HOLDS_FOR: Duration = Duration::from_secs(60);
/// How long a failed one stands: a recovered Google is noticed this soon.
const FAILURE_HOLDS_FOR: Duration = Duration::from_secs(5);
/// How long `/readyz` waits for the very first probe rather than answering "not known yet".
const FIRST_PROBE_WAIT: Duration = Duration::from_secs(2);

pub struct IamSigner {
    google: Arc<Google>,
    service_account: String,
    jwks_uri: String,
    health: Arc<Health>,
}

/// The last `signJwt` outcome, and whether a probe is under way.
struct Health {
    last: watch::Sender<Option<Outcome>>,
    probing: AtomicBool,
}

#[derive(Clone)]
struct Outcome {
    at: Instant,
    failure: Option<String>,
}

impl Health {
    fn record<T>(&self, result: &Result<T, UpstreamError>) {
        let failure = result.as_ref().err().map(|error| match error {
            UpstreamError::Denied { .. } => format!(
                "{error}; the broker's Google identity needs roles/iam.serviceAccountTokenCreator on the signing service account"
            ),
            _ => error.to_string(),
        });
        self.last.send_replace(Some(Outcome {
            at: Instant::now(),
            failure,
        }));
    }
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
            health: Arc::new(Health {
                last: watch::Sender::new(None),
                probing: AtomicBool::new(false),
            }),
        }
    }

    /// Starts a probe unless one runs already.
    fn probe(&self) {
        if self.health.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (google, health) = (self.google.clone(), self.health.clone());
        let service_account = self.service_account.clone();
        tokio::spawn(async move {
            let now = crate::clock::unix_now();
            // Signed and thrown away: an audience no verifier accepts, valid one minute.
            let payload = json!({
                "iss": service_account,
                "sub": service_account,
                "aud": "token-broker-readiness-probe",
                "iat": now,
                "exp": now + 60,
            })
            .to_string();
            let result = google.sign_jwt(&service_account, &payload).await;
            health.record(&result);
            health.probing.store(false, Ordering::Release);
        });
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

    async fn readiness(&self) -> Result<(), String> {
        let last = self.health.last.borrow().clone();
        let stale = last.as_ref().is_none_or(|outcome| {
            let holds_for = match outcome.failure {
                None => SUCCESS_HOLDS_FOR,
                Some(_) => FAILURE_HOLDS_FOR,
            };
            outcome.at.elapsed() >= holds_for
        });
        if stale {
            self.probe();
        }
        let last = match last {
            Some(outcome) => Some(outcome),
            None => {
                let mut updates = self.health.last.subscribe();
                tokio::time::timeout(FIRST_PROBE_WAIT, updates.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|seen| seen.ok().and_then(|outcome| outcome.clone()))
            }
        };
        let account = &self.service_account;
        match last {
            None => Err(format!(
                "not known yet whether Google signs as {account}: a signJwt probe is under way"
            )),
            Some(Outcome { failure: None, .. }) => Ok(()),
            Some(Outcome {
                failure: Some(failure),
                at,
            }) => Err(format!(
                "signJwt as {account} failed {}s ago: {failure}",
                at.elapsed().as_secs()
            )),
        }
    }

    async fn sign(&self, payload: &str) -> Result<String, SignerError> {
        let result = self.google.sign_jwt(&self.service_account, payload).await;
        self.health.record(&result);
        Ok(result?)
    }
}
