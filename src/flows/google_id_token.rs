//! `google-id-token` (`target_audience` + `service_account`): a federated token from STS,
//! then IAM Credentials `generateIdToken`: a Google-signed ID token for Cloud Run or IAP.

use std::sync::Arc;

use async_trait::async_trait;

use super::flow::{
    allowed_service_account, allowed_target_audience, Flow, FlowDeps, FlowError, GoogleFlowBase,
    MintContext, Minted, TokenRequest, CLOUD_PLATFORM, ID_TOKEN_TYPE,
};
use crate::clients::ClientRule;

pub const NAME: &str = "google-id-token";

pub fn build(deps: &FlowDeps) -> Option<Arc<dyn Flow>> {
    Some(Arc::new(GoogleIdToken(GoogleFlowBase::new(deps)?)))
}

struct GoogleIdToken(GoogleFlowBase);

#[async_trait]
impl Flow for GoogleIdToken {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, request: &TokenRequest) -> bool {
        request.target_audience.is_some() && request.service_account.is_some()
    }

    fn subject_audience(&self) -> Option<&str> {
        Some(&self.0.audience)
    }

    fn calls_upstream(&self) -> bool {
        true
    }

    fn authorize(&self, rule: &ClientRule, request: &TokenRequest) -> Result<(), FlowError> {
        allowed_service_account(rule, request)?;
        allowed_target_audience(rule, request).map(drop)
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Minted, FlowError> {
        let account = allowed_service_account(ctx.who.rule, ctx.request)?;
        let target = allowed_target_audience(ctx.who.rule, ctx.request)?;
        let (federated, jti) = self.0.federate(ctx, NAME, CLOUD_PLATFORM).await?;
        let token = self
            .0
            .google
            .generate_id_token(&federated.token, account, target)
            .await?;
        Ok(Minted {
            access_token: token.token.clone(),
            expires_at: token.expires_at,
            issued_token_type: ID_TOKEN_TYPE,
            id_token: Some(token.token),
            scope: None,
            jti,
        })
    }
}
