//! Every flow the broker knows, and the registry built from them for one configuration.

use std::sync::Arc;

use super::flow::{Flow, FlowDeps, TokenRequest};
use super::{google_id_token, impersonate, mtls_client_credentials, sts_exchange};

/// Every flow the broker knows, most specific first (the first that handles a request wins).
const FLOWS: &[FlowEntry] = &[
    FlowEntry {
        name: google_id_token::NAME,
        needs_google: true,
        build: google_id_token::build,
    },
    FlowEntry {
        name: impersonate::NAME,
        needs_google: true,
        build: impersonate::build,
    },
    FlowEntry {
        name: sts_exchange::NAME,
        needs_google: true,
        build: sts_exchange::build,
    },
    FlowEntry {
        name: mtls_client_credentials::NAME,
        needs_google: false,
        build: mtls_client_credentials::build,
    },
];

struct FlowEntry {
    name: &'static str,
    needs_google: bool,
    /// `None` when a dependency (such as `[google]`) is not configured.
    build: fn(&FlowDeps) -> Option<Arc<dyn Flow>>,
}

/// Names of the flows that need `[google]`.
pub fn google_flow_names() -> Vec<&'static str> {
    FLOWS
        .iter()
        .filter(|f| f.needs_google)
        .map(|f| f.name)
        .collect()
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
            flows: FLOWS.iter().filter_map(|f| (f.build)(deps)).collect(),
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

    /// Why no flow handles `request`, naming the parameters to change: a parameter
    /// another needs, or the flow this shape asks for when this broker does not have it.
    pub fn unhandled(&self, request: &TokenRequest) -> String {
        let given = |value: &Option<String>| value.is_some();
        match (
            given(&request.scope),
            given(&request.service_account),
            given(&request.target_audience),
        ) {
            (_, false, true) => "target_audience needs service_account: a Google-signed ID token is minted as that service account".into(),
            (false, true, false) => "service_account needs scope (its access token) or target_audience (its Google-signed ID token)".into(),
            (scope, account, audience) => {
                let named: Vec<&str> = [("scope", scope), ("service_account", account), ("target_audience", audience)]
                    .iter()
                    .filter(|(_, given)| *given)
                    .map(|(name, _)| *name)
                    .collect();
                format!(
                    "the parameters {} ask for a Google token, and this broker has no Google flow (its config has no [google]); without scope, service_account and target_audience it issues its own ID token",
                    named.join(" and ")
                )
            }
        }
    }

    /// The flow for this request, if any handles it.
    pub fn select(&self, request: &TokenRequest) -> Option<&dyn Flow> {
        self.flows
            .iter()
            .find(|f| f.grant_type() == request.grant_type && f.handles(request))
            .map(|f| f.as_ref())
    }
}
