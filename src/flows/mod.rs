//! The flow registry: how a validated client gets a token.
//!
//! A flow is one file in this folder implementing [`Flow`]; adding one means adding that
//! file and one line to [`FLOWS`]. The token endpoint picks the first flow that
//! [`Flow::handles`] the request, then checks the client rule allows it by name.

pub mod mtls_client_credentials;

use std::sync::Arc;

use async_trait::async_trait;

use crate::claims::Subject;
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

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Signer(#[from] SignerError),
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
    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Minted, FlowError>;
}

/// Services flows are built from.
pub struct FlowDeps {
    pub issuer: String,
    pub signer: Arc<dyn Signer>,
}

/// Every flow the broker knows, most specific first (the first that handles a request wins).
const FLOWS: &[FlowEntry] = &[FlowEntry {
    name: mtls_client_credentials::NAME,
    build: mtls_client_credentials::build,
}];

struct FlowEntry {
    name: &'static str,
    build: fn(&FlowDeps) -> Arc<dyn Flow>,
}

/// Names of all flows, known without building them (config checks need them first).
pub fn names() -> Vec<&'static str> {
    FLOWS.iter().map(|f| f.name).collect()
}

pub struct Registry {
    flows: Vec<Arc<dyn Flow>>,
}

impl Registry {
    pub fn build(deps: &FlowDeps) -> Registry {
        Registry {
            flows: FLOWS.iter().map(|f| (f.build)(deps)).collect(),
        }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.flows.iter().map(|f| f.name()).collect()
    }

    pub fn grant_types(&self) -> Vec<&'static str> {
        let mut types: Vec<_> = self.flows.iter().map(|f| f.grant_type()).collect();
        types.dedup();
        types
    }

    /// The flow for this request, if any handles it.
    pub fn select(&self, request: &TokenRequest) -> Option<&dyn Flow> {
        self.flows
            .iter()
            .find(|f| f.grant_type() == request.grant_type && f.handles(request))
            .map(|f| f.as_ref())
    }
}
