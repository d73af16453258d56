//! `sts-exchange` (`scope` given): the broker's ID token exchanged at Google STS for a
//! federated access token of the device's workload identity principal.

use std::sync::Arc;

use async_trait::async_trait;

use super::flow::{
    allowed_scopes, Flow, FlowDeps, FlowError, GoogleFlowBase, MintContext, Minted, TokenRequest,
    ACCESS_TOKEN_TYPE,
};
use crate::clients::ClientRule;

pub const NAME: &str = "sts-exchange";

pub fn build(deps: &FlowDeps) -> Option<Arc<dyn Flow>> {
    Some(Arc::new(StsExchange(GoogleFlowBase::new(deps)?)))
}

struct StsExchange(GoogleFlowBase);

#[async_trait]
impl Flow for StsExchange {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, request: &TokenRequest) -> bool {
        request.scope.is_some()
            && request.service_account.is_none()
            && request.target_audience.is_none()
    }

    fn subject_audience(&self) -> Option<&str> {
        Some(&self.0.audience)
    }

    fn calls_upstream(&self) -> bool {
        true
    }

    fn authorize(&self, rule: &ClientRule, request: &TokenRequest) -> Result<(), FlowError> {
        allowed_scopes(rule, request).map(drop)
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Minted, FlowError> {
        let scope = allowed_scopes(ctx.who.rule, ctx.request)?.join(" ");
        let (federated, jti) = self.0.federate(ctx, NAME, &scope).await?;
        Ok(Minted {
            access_token: federated.token,
            expires_at: federated.expires_at,
            issued_token_type: ACCESS_TOKEN_TYPE,
            id_token: None,
            scope: Some(scope),
            jti,
        })
    }
}
