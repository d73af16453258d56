//! The one crypto provider (aws-lc-rs) for TLS, chain and CRL signatures, and the TLS
//! client configuration of the broker's own outbound calls.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider for TLS and for chain signatures.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// TLS for the broker's own outbound calls (Google, CRL sources): the public web PKI roots,
/// no client certificate.
pub fn public_client_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
