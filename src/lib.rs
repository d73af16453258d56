//! token-broker: a self-hosted mTLS token server.
//!
//! A device proves possession of a certificate in the TLS handshake; the broker validates
//! the chain itself, turns the certificate into an [`identity::Identity`], matches it to a
//! client rule, and lets a flow from the [`flows`] registry mint a token.
//!
//! Crate map (see `ARCHITECTURE.md` for the request's path):
//! - [`config`]: the TOML contract, with every problem collected rather than the first.
//! - [`broker`]: the loaded, validated state shared by the server and the CLI.
//! - [`tls`]: rustls server configuration; the handshake checks proof of possession only.
//! - [`trust`]: CA bundle + CRLs and chain validation (webpki) with stable refusal reasons.
//! - [`identity`]: what a certificate says about its holder (x509-parser).
//! - [`clients`]: `[[clients]]` rules: who may get what.
//! - [`claims`]: the broker's own ID token claims.
//! - [`flows`]: the pluggable token flows and their registry.
//! - [`signer`]: JWT signing keys and the JWKS (local keys or Google IAM `signJwt`).
//! - [`google`]: STS, IAM Credentials and the broker's own Google credentials, with retries.
//! - [`cache`]: minted tokens, shared by identical requests (single-flight).
//! - [`http`]: routing, the token endpoint and the one mapping from errors to RFC 6749 answers.
//! - [`server`]: listeners, connection handling and shutdown.
//! - [`metrics`] / [`admin`]: Prometheus metrics and the plain-HTTP admin listener.
//! - [`logging`]: the JSON log line format and the buffered stderr writer (audit lines are
//!   on every token's path).
//! - [`devpki`]: the development PKI made by `init` and the first `serve`.
//! - [`client`] / [`agent`]: the device side: `token` and the GCE metadata-server emulator.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod broker;
pub mod cache;
pub mod claims;
pub mod client;
pub mod clients;
pub mod clock;
pub mod config;
pub mod crl;
pub mod crl_fetch;
pub mod crypto;
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
pub mod tls;
pub mod trust;
