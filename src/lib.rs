//! token-broker: a self-hosted mTLS token server.
//!
//! A device proves possession of a certificate in the TLS handshake; the broker validates
//! the chain itself, turns the certificate into an [`identity::Identity`], matches it to a
//! client rule, and lets a flow from the [`flows`] registry mint a token.
//!
//! Crate map, top layer first; a module imports only from layers below it
//! (`ARCHITECTURE.md` has the request's path, `tests/it/layers.rs` holds the rule):
//! - The command line: [`cli`] (the binary only parses and calls it).
//! - The server edge: [`server`] (listeners, connections, reload, shutdown), [`live`] (the
//!   broker serving now), [`tls`] (the handshake checks proof of possession only),
//!   [`proxy`] (PROXY v2), [`http`] (routing, the token endpoint, the one mapping from errors
//!   to RFC 6749 answers), [`admin`] (metrics and health), [`crl_fetch`] (downloaded CRLs).
//! - The decision: [`broker`]: everything loaded and checked; `authenticate`, then `issue`.
//! - The mechanisms below it: [`trust`] (CA bundle, CRLs, chain validation, refusal
//!   reasons), [`crl`], [`identity`], [`clients`] (`[[clients]]` rules), [`flows`] (one file
//!   per flow, and their registry), [`claims`], [`signer`], [`google`] (transport, STS, IAM
//!   Credentials, the broker's own credentials), [`cache`] (minted tokens, single-flight).
//! - The device side, on its own: [`device`] (`token` and the metadata agent).
//! - Small bottom modules: [`config`], [`clock`], [`crypto`], [`pem`], [`logging`],
//!   [`metrics`], [`redact`], [`console`] (stdout/stderr for people and scripts: a closed pipe is no failure), [`devpki`], [`tickets`] (TLS session tickets under shared keys), and `der` (the few DER elements read by hand).
#![forbid(unsafe_code)]
#![deny(unreachable_pub)]

pub mod admin;
pub mod broker;
pub mod cache;
pub mod claims;
pub mod cli;
pub mod clients;
pub mod clock;
pub mod config;
pub mod console;
pub mod crl;
pub mod crl_fetch;
pub mod crypto;
mod der;
pub mod device;
pub mod devpki;
pub mod flows;
pub mod google;
pub mod http;
pub mod identity;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod pem;
pub mod proxy;
pub mod redact;
pub mod server;
pub mod signer;
pub mod tickets;
pub mod tls;
pub mod trust;
