//! The flow registry: how a validated client gets a token.
//!
//! A flow is one file in this folder implementing [`Flow`] (`flow.rs`); adding one means
//! adding that file and one line to the registry's list (`registry.rs`). The broker picks
//! the first flow that [`Flow::handles`] the request, then checks the client rule allows it
//! by name.

mod flow;
pub mod google_id_token;
pub mod impersonate;
pub mod mtls_client_credentials;
mod registry;
pub mod sts_exchange;

pub use flow::{
    Flow, FlowDeps, FlowError, MintContext, Minted, TokenRequest, ACCESS_TOKEN_TYPE, ID_TOKEN_TYPE,
};
pub use registry::{google_flow_names, names, Registry};
