//! What a flow is: the request it sees, what it mints, how it fails, and the checks the
//! Google flows share.

use std::sync::Arc;

use async_trait::async_trait;

use crate::claims::{self, Subject};
use crate::clients::ClientRule;
use crate::google::{AccessToken, Google, UpstreamError};
use crate::metrics::Metrics;
use crate::signer::{Signer, SignerError};

/// The parameters of a `POST /token` (RFC 6749 section 4.4 plus the broker's extensions).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub grant_type: String,
    pub client_id: Option<String>,
    pub audience: Option<String>,
    pub scope: Option<String>,
    pub service_account: Option<String>,
    pub target_audience: Option<String>,
    /// `external_credential`: answer in the AIP-4117 executable-response shape.
    pub format: Option<String>,
}

impl TokenRequest {
    /// Requested scopes, deduplicated and sorted (order carries no meaning).
    pub fn scopes(&self) -> Vec<String> {
        let mut scopes: Vec<String> = self
            .scope
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        scopes.sort();
        scopes.dedup();
        scopes
    }
}

/// What a flow minted, in the shape of the token endpoint's answer.
#[derive(Debug, Clone)]
pub struct Minted {
    pub access_token: String,
    pub expires_at: i64,
    pub issued_token_type: &'static str,
    pub id_token: Option<String>,
    pub scope: Option<String>,
    /// `jti` of the broker's own token, for the audit log.
    pub jti: String,
}

pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

#[derive(Debug, Clone, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Signer(#[from] SignerError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("{0}")]
    InvalidScope(String),
    #[error("{0}")]
    InvalidTarget(String),
    #[error("{0}")]
    NotAllowed(String),
}

/// Everything a flow may use to mint: the validated client, the clock, shared services.
pub struct MintContext<'a> {
    pub who: Subject<'a>,
    pub request: &'a TokenRequest,
    pub now: i64,
    pub metrics: &'a Metrics,
}

#[async_trait]
pub trait Flow: Send + Sync {
    /// Name used in client rules' `flows`, the `amr` claim and metrics.
    fn name(&self) -> &'static str;
    /// OAuth grant type this flow answers.
    fn grant_type(&self) -> &'static str {
        "client_credentials"
    }
    /// Whether this flow is the one for these parameters.
    fn handles(&self, request: &TokenRequest) -> bool;
    /// The `aud` the broker token must carry for this flow, if the flow fixes it (Google
    /// flows: the workload identity provider's audience).
    fn subject_audience(&self) -> Option<&str> {
        None
    }
    /// Whether minting calls an upstream API, so results are worth caching.
    fn calls_upstream(&self) -> bool;
    /// The rule's limits on this request (scopes, service accounts, target audiences).
    /// Checked on every request, before the cache: a cached token is no permission.
    fn authorize(&self, _rule: &ClientRule, _request: &TokenRequest) -> Result<(), FlowError> {
        Ok(())
    }
    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Minted, FlowError>;
}

/// Services flows are built from.
pub struct FlowDeps {
    pub issuer: String,
    pub signer: Arc<dyn Signer>,
    pub google: Option<Arc<Google>>,
}

/// Each requested scope must be allowed by the rule; returns them sorted.
pub(crate) fn allowed_scopes(
    rule: &ClientRule,
    request: &TokenRequest,
) -> Result<Vec<String>, FlowError> {
    let scopes = request.scopes();
    if scopes.is_empty() {
        return Err(FlowError::InvalidScope("scope is empty".into()));
    }
    match scopes.iter().find(|s| !rule.scopes.contains(s)) {
        Some(denied) => Err(FlowError::InvalidScope(format!(
            "scope {} is not allowed for client {:?}",
            crate::redact::echo(denied),
            rule.client_id
        ))),
        None => Ok(scopes),
    }
}

/// The requested service account, which the rule must allow.
pub(crate) fn allowed_service_account<'a>(
    rule: &ClientRule,
    request: &'a TokenRequest,
) -> Result<&'a str, FlowError> {
    let account = request.service_account.as_deref().unwrap_or_default();
    if rule.service_accounts.iter().any(|a| a == account) {
        Ok(account)
    } else {
        Err(FlowError::NotAllowed(format!(
            "service account {} is not allowed for client {:?}",
            crate::redact::echo(account),
            rule.client_id
        )))
    }
}

/// The requested target audience, which the rule must allow.
pub(crate) fn allowed_target_audience<'a>(
    rule: &ClientRule,
    request: &'a TokenRequest,
) -> Result<&'a str, FlowError> {
    let target = request.target_audience.as_deref().unwrap_or_default();
    if rule.target_audiences.iter().any(|t| t == target) {
        Ok(target)
    } else {
        Err(FlowError::InvalidTarget(format!(
            "target_audience {} is not allowed for client {:?}",
            crate::redact::echo(target),
            rule.client_id
        )))
    }
}

/// What every Google flow needs: Google, and the broker token it exchanges at STS.
pub(crate) struct GoogleFlowBase {
    pub google: Arc<Google>,
    issuer: String,
    signer: Arc<dyn Signer>,
    /// The workload identity provider's audience, carried by the exchanged broker token.
    pub audience: String,
}

impl GoogleFlowBase {
    /// `None` without `[google]`: the flow is then not offered.
    pub(crate) fn new(deps: &FlowDeps) -> Option<GoogleFlowBase> {
        let google = deps.google.clone()?;
        Some(GoogleFlowBase {
            audience: google.config().subject_token_audience(),
            google,
            issuer: deps.issuer.clone(),
            signer: deps.signer.clone(),
        })
    }

    /// A federated access token for the client: the broker's ID token for the provider's
    /// audience, exchanged at STS. Returns the token and the broker token's `jti`.
    pub(crate) async fn federate(
        &self,
        ctx: &MintContext<'_>,
        flow: &str,
        scope: &str,
    ) -> Result<(AccessToken, String), FlowError> {
        let id_token = claims::sign_id_token(
            self.signer.as_ref(),
            ctx.metrics,
            &self.issuer,
            &ctx.who,
            flow,
            ctx.now,
        )
        .await?;
        let federated = self.google.exchange(&id_token.jwt, scope).await?;
        Ok((federated, id_token.jti))
    }
}

/// The scope of the federated token when it only serves to call IAM Credentials.
pub(crate) use crate::google::CLOUD_PLATFORM;
