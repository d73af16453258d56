//! `impersonate` (`scope` + `service_account`): a federated token from STS, then IAM
//! Credentials `generateAccessToken` for a service account the client rule allows.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    allowed_scopes, allowed_service_account, federate, Flow, FlowDeps, FlowError, MintContext,
    Minted, TokenRequest, ACCESS_TOKEN_TYPE,
};
use crate::clients::ClientRule;
use crate::google::Google;
use crate::signer::Signer;

pub const NAME: &str = "impersonate";

/// The federated token only needs to call IAM Credentials.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

pub fn build(deps: &FlowDeps) -> Option<Arc<dyn Flow>> {
    let google = deps.google.clone()?;
    Some(Arc::new(Impersonate {
        audience: google.config().subject_token_audience(),
        google,
        issuer: deps.issuer.clone(),
        signer: deps.signer.clone(),
    }))
}

struct Impersonate {
    google: Arc<Google>,
    issuer: String,
    signer: Arc<dyn Signer>,
    audience: String,
}

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
        Some(&self.audience)
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
        let (federated, jti) = federate(
            &self.google,
            self.signer.as_ref(),
            &self.issuer,
            ctx,
            NAME,
            CLOUD_PLATFORM,
        )
        .await?;
        let scope_refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let token = self
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
