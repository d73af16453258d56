//! `impersonate` (`scope` + `service_account`): a federated token from STS, then IAM
//! Credentials `generateAccessToken` for a service account the client rule allows.

use std::sync::Arc;

use async_trait::async_trait;

use super::flow::{
    allowed_scopes, allowed_service_account, Flow, FlowDeps, FlowError, GoogleFlowBase,
    MintContext, Minted, TokenRequest, ACCESS_TOKEN_TYPE, CLOUD_PLATFORM,
};
use crate::clients::ClientRule;

pub const NAME: &str = "impersonate";

pub fn build(deps: &FlowDeps) -> Option<Arc<dyn Flow>> {
    Some(Arc::new(Impersonate(GoogleFlowBase::new(deps)?)))
}

struct Impersonate(GoogleFlowBase);

#[async_trait]
impl Flow for Impersonate {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, request: &TokenRequest) -> bool {
        request.scope.is_some()
            && request.service_account.is_some()
            && request.target_audience.is_none()
    }

    fn subject_audience(&self) -> Option<&str> {
        Some(&self.0.audience)
    }

    fn calls_upstream(&self) -> bool {
        true
    }

    fn authorize(&self, rule: &ClientRule, request: &TokenRequest) -> Result<(), FlowError> {
        allowed_service_account(rule, request)?;
        allowed_scopes(rule, request).map(drop)
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Minted, FlowError> {
        let account = allowed_service_account(ctx.who.rule, ctx.request)?;
        let scopes = allowed_scopes(ctx.who.rule, ctx.request)?;
        let (federated, jti) = self.0.federate(ctx, NAME, CLOUD_PLATFORM).await?;
        let scope_refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let token = self
            .0
            .google
            .generate_access_token(&federated.token, account, &scope_refs)
            .await?;
        Ok(Minted {
            access_token: token.token,
            expires_at: token.expires_at,
            issued_token_type: ACCESS_TOKEN_TYPE,
            id_token: None,
            scope: Some(scopes.join(" ")),
            jti,
        })
    }
}
