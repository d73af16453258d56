//! `mtls-client-credentials`: the broker's own ID token for a certificate holder
//! (RFC 6749 client credentials with RFC 8705 certificate-bound tokens).

use std::sync::Arc;

use async_trait::async_trait;

use super::flow::{Flow, FlowDeps, FlowError, MintContext, Minted, TokenRequest, ID_TOKEN_TYPE};
use crate::claims;
use crate::signer::Signer;

pub const NAME: &str = "mtls-client-credentials";

pub fn build(deps: &FlowDeps) -> Option<Arc<dyn Flow>> {
    Some(Arc::new(MtlsClientCredentials {
        issuer: deps.issuer.clone(),
        signer: deps.signer.clone(),
    }))
}

struct MtlsClientCredentials {
    issuer: String,
    signer: Arc<dyn Signer>,
}

#[async_trait]
impl Flow for MtlsClientCredentials {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Only plain requests: Google parameters belong to the Google flows.
    fn handles(&self, request: &TokenRequest) -> bool {
        request.scope.is_none()
            && request.service_account.is_none()
            && request.target_audience.is_none()
    }

    /// Local keys sign in microseconds; `signJwt` is a quota-limited upstream call.
    fn calls_upstream(&self) -> bool {
        self.signer.kind() != "local"
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Minted, FlowError> {
        let token = claims::sign_id_token(
            self.signer.as_ref(),
            ctx.metrics,
            &self.issuer,
            &ctx.who,
            self.name(),
            ctx.now,
        )
        .await?;
        Ok(Minted {
            access_token: token.jwt.clone(),
            expires_at: token.expires_at,
            issued_token_type: ID_TOKEN_TYPE,
            id_token: Some(token.jwt),
            scope: None,
            jti: token.jti,
        })
    }
}
