//! The one crypto provider (aws-lc-rs) for TLS, chain and CRL signatures and random ids,
//! and the TLS client configuration of the broker's own outbound calls.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider for TLS and for chain signatures.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A random (version 4) UUID from aws-lc's generator, which runs in user space:
/// `Uuid::new_v4` makes a `getrandom` system call each time, and every token takes two
/// (its `jti` and the request's id).
pub fn random_uuid() -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    match aws_lc_rs::rand::fill(&mut bytes) {
        Ok(()) => uuid::Builder::from_random_bytes(bytes).into_uuid(),
        Err(_) => uuid::Uuid::new_v4(),
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn random_uuids_are_version_4_and_differ() {
        let (a, b) = (super::random_uuid(), super::random_uuid());
        assert_eq!(a.get_version_num(), 4);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(a, b);
    }
}
