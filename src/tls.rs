//! rustls server configuration.
//!
//! Invariant: the handshake asks for a client certificate, lets clients without one in
//! (discovery and JWKS are public), and for clients with one checks *only* proof of
//! possession (the CertificateVerify signature). Chain validation is [`crate::trust`]'s job,
//! run per token request, so a refused certificate gets a 401 with its reason instead of
//! an opaque TLS alert. Nothing may read the peer certificates as trusted without it.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::identity::{Identity, KeyInfo};
use crate::pem;
use crate::trust::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    File(#[from] pem::PemError),
    #[error("tls_versions: {0}")]
    Versions(String),
    #[error("server certificate and key: {0}")]
    Certificate(rustls::Error),
}

/// [`crypto::provider`] with the AES-128-GCM suites first, for the server's choice; shared
/// with the bench floor server (`examples/floor.rs`) so both negotiate the same suites.
pub fn server_provider() -> Arc<CryptoProvider> {
    use rustls::CipherSuite as S;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

pub fn protocol_versions(
    names: &[String],
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, TlsError> {
    let mut versions = Vec::new();
    for name in names {
        match name.as_str() {
            "1.2" => versions.push(&rustls::version::TLS12),
            "1.3" => versions.push(&rustls::version::TLS13),
            other => {
                return Err(TlsError::Versions(format!(
                    "unsupported TLS version {other:?} (only \"1.2\" and \"1.3\")"
                )))
            }
        }
    }
    if versions.is_empty() {
        return Err(TlsError::Versions(
            "at least one of \"1.2\", \"1.3\" is required".into(),
        ));
    }
    Ok(versions)
}

/// The TLS listener's configuration: server chain from PEM, optional client certificates,
/// and session tickets under keys shared by every replica when `tickets` is given.
pub fn server_config(
    cert: &Path,
    key: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    root_subjects: Vec<DistinguishedName>,
    tickets: Option<Arc<dyn rustls::server::ProducesTickets>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let chain = pem::certificates(cert)?;
    let key = pem::private_key(key)?;
    // Loaded from a borrow so that the only DER copy of the key stays in our zeroizing
    // buffer (`with_single_cert` would take and drop an unwiped copy).
    let signing_key =
        rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(TlsError::Certificate)?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(TlsError::Certificate)?;
    let provider = server_provider();
    let verifier = Arc::new(PossessionOnly {
        root_subjects,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(TlsError::Certificate)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The server picks the suite: AES-128-GCM first (Mozilla's order) makes the handshake
    // hash SHA-256, which CPUs accelerate, instead of the SHA-384 that most clients'
    // first choice, AES-256-GCM, brings; every offered suite stays strong.
    config.ignore_client_order = true;
    if let Some(tickets) = tickets {
        // Tickets only (TLS 1.3, and TLS 1.2 clients that offer them): every replica opens
        // them, within their lifetime. Session ids would resume on this replica alone.
        config.ticketer = tickets;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    Ok(config)
}

/// Accepts any client chain at the handshake after checking the client's signature with
/// the leaf's key. See the module invariant.
#[derive(Debug)]
struct PossessionOnly {
    root_subjects: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PossessionOnly {
    /// Explains a failed signature check when the certificate or its key is the problem, so the
    /// refusal is logged and counted with the same reason `verify-cert` gives.
    fn explain(cert: &CertificateDer<'_>, error: rustls::Error) -> rustls::Error {
        if let Some(refusal) = crate::trust::leaf_parse_refusal(cert) {
            return refusal_error(refusal);
        }
        match Identity::from_der(cert).map(|id| id.key) {
            Ok(KeyInfo::Rsa { bits }) if bits < 2048 => refusal_error(Refusal::WeakKey(bits)),
            Ok(KeyInfo::Other) => refusal_error(Refusal::UnsupportedKey),
            _ => error,
        }
    }
}

fn refusal_error(refusal: Refusal) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(refusal))))
}

/// The certificate refusal behind a failed handshake, if that is why it failed.
pub fn handshake_refusal(error: &std::io::Error) -> Option<Refusal> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<Refusal>().cloned()
        }
        _ => None,
    }
}

impl ClientCertVerifier for PossessionOnly {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_subjects
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deliberately no chain validation here: see the module invariant.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
            .map_err(|e| Self::explain(cert, e))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
            .map_err(|e| Self::explain(cert, e))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
