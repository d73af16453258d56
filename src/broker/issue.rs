//! The token decision after authentication: everything between "who is asking" and the
//! answer. The edge (`http/token.rs`) only parses the form, calls [`Broker::issue`] and
//! maps the result.

use crate::cache::CacheKey;
use crate::claims::Subject;
use crate::config::defaults;
use crate::flows::{Flow, FlowError, MintContext, Minted, TokenRequest};
use crate::google::UpstreamError;
use crate::redact::echo;

use super::{Authenticated, Broker};

/// Why an authenticated client gets no token.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// `client_id` is not the rule's (RFC 8705 2.1).
    #[error("{0}")]
    WrongClientId(String),
    #[error("too many token requests from this certificate; retry in {0}s")]
    RateLimited(u64),
    /// No enabled flow takes this combination of parameters.
    #[error("{0}")]
    NoFlow(String),
    /// The rule does not allow the selected flow.
    #[error("{0}")]
    FlowNotAllowed(String),
    /// The audience is not one the rule allows.
    #[error("{0}")]
    AudienceNotAllowed(String),
    #[error(transparent)]
    Flow(#[from] FlowError),
}

/// What was decided on the way, for the audit line, whether or not a token came of it.
#[derive(Debug, Default)]
pub struct Decided {
    pub flow: Option<&'static str>,
    pub audience: Option<String>,
}

impl Broker {
    /// Issues a token for `auth` at `now`: the client id, the per-certificate rate, the
    /// flow (first that handles the request, and allowed by the rule), the audience, the
    /// flow's own limits (before any upstream call), then minting: through the token cache
    /// and within one deadline for flows that call Google. `decided` learns the flow and
    /// audience as they are settled.
    pub async fn issue(
        &self,
        auth: &Authenticated<'_>,
        request: &TokenRequest,
        now: i64,
        decided: &mut Decided,
    ) -> Result<Minted, IssueError> {
        if let Some(client_id) = &request.client_id {
            if *client_id != auth.rule.client_id {
                return Err(IssueError::WrongClientId(format!(
                    "client_id {} does not match this certificate's client {:?}",
                    echo(client_id),
                    auth.rule.client_id
                )));
            }
        }
        auth.rule
            .check_rate(&auth.identity.sha256)
            .map_err(IssueError::RateLimited)?;

        let flow = self
            .flows
            .select(request)
            .ok_or_else(|| IssueError::NoFlow(self.flows.unhandled(request)))?;
        decided.flow = Some(flow.name());
        if !auth.rule.allows_flow(flow.name()) {
            return Err(IssueError::FlowNotAllowed(format!(
                "flow {:?} is not allowed for client {:?}",
                flow.name(),
                auth.rule.client_id
            )));
        }

        let audience = self.audience_for(flow, auth, request)?;
        decided.audience = Some(audience.clone());
        let ctx = MintContext {
            who: Subject {
                identity: &auth.identity,
                rule: auth.rule,
                subject: &auth.subject,
                audience: &audience,
            },
            request,
            now,
            metrics: &self.metrics,
        };
        flow.authorize(auth.rule, request)?;
        if !flow.calls_upstream() {
            return Ok(flow.mint(&ctx).await?);
        }
        let key = CacheKey {
            cert: auth.identity.sha256,
            rule: auth.rule.name.clone(),
            flow: flow.name(),
            audience: audience.clone(),
            scopes: request.scopes(),
            service_account: request.service_account.clone(),
            target_audience: request.target_audience.clone(),
        };
        // One deadline for the whole request, however many upstream calls it takes.
        let deadline = self
            .config
            .google
            .as_ref()
            .map_or_else(defaults::upstream_deadline, |g| g.deadline);
        let minted = tokio::time::timeout(deadline, self.cache.get_or_mint(key, flow.mint(&ctx)))
            .await
            .map_err(|_| {
                FlowError::Upstream(UpstreamError::DeadlineExceeded(deadline.as_secs()))
            })??;
        Ok(minted)
    }

    /// The broker token's `aud`: fixed by Google flows (the provider's audience), else the
    /// requested or default audience, which the client rule must allow.
    fn audience_for(
        &self,
        flow: &dyn Flow,
        auth: &Authenticated<'_>,
        request: &TokenRequest,
    ) -> Result<String, IssueError> {
        let refuse = |audience: &str, allowed: &str| {
            IssueError::AudienceNotAllowed(format!(
                "audience {} is not allowed for client {:?} (allowed: {allowed})",
                echo(audience),
                auth.rule.client_id,
            ))
        };
        if let Some(fixed) = flow.subject_audience() {
            return match request.audience.as_deref() {
                Some(asked) if asked != fixed => Err(refuse(asked, fixed)),
                _ => Ok(fixed.to_owned()),
            };
        }
        let audience = request
            .audience
            .clone()
            .unwrap_or_else(|| self.config.issuer.default_audience().to_owned());
        if auth.rule.audiences.contains(&audience) {
            Ok(audience)
        } else {
            Err(refuse(&audience, &auth.rule.audiences.join(", ")))
        }
    }
}
