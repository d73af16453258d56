//! The client CA bundle, CRLs, and chain validation.
//!
//! Validation is webpki's (the same code rustls uses), run by the broker after the handshake
//! rather than inside it, so that a refused certificate gets an HTTP answer with a precise
//! reason instead of a bare TLS alert. On top of webpki the broker adds its own policy:
//! a `clientAuth` EKU must be present (webpki accepts a leaf without EKU) and the leaf key
//! must be one we accept.
//!
//! Bundle semantics (as OpenSSL's): self-issued certificates are trust anchors; the others
//! are intermediates that help build paths but are never trusted on their own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{Identity, KeyInfo};
use crate::pem;

/// Why a client certificate was refused. `reason()` is stable: it is the metric label and
/// the audit log's `reason`; `Display` is the human description sent in the 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no client certificate was presented; /token requires mutual TLS")]
    NoCertificate,
    #[error("certificate could not be parsed: {0}")]
    Malformed(String),
    #[error("{} expired at {}", which(*.leaf), rfc3339(*.at))]
    Expired { at: i64, leaf: bool },
    #[error("{} is not valid before {}", which(*.leaf), rfc3339(*.at))]
    NotYetValid { at: i64, leaf: bool },
    #[error("issuer not trusted: no path from the certificate to a root CA of the configured bundle (send intermediate CA certificates along with the client certificate)")]
    UnknownIssuer,
    #[error("self-signed certificate is not trusted; use a certificate issued by a CA in the configured bundle")]
    SelfSigned,
    #[error("certificate revoked (listed in its issuer's CRL)")]
    Revoked,
    #[error("revocation status unknown: the CRL for this certificate's issuer expired at {}", rfc3339(*.0))]
    CrlExpired(i64),
    #[error("missing clientAuth EKU: the certificate has no extendedKeyUsage extension")]
    MissingEku,
    #[error("missing clientAuth EKU: the certificate's extendedKeyUsage does not allow TLS client authentication")]
    BadEku,
    #[error("a CA certificate cannot be used as a client certificate")]
    CaAsLeaf,
    #[error("weak key: RSA key of {0} bits, at least 2048 required")]
    WeakKey(usize),
    #[error("unsupported key type: use ECDSA P-256/P-384, RSA (2048 bits or more) or Ed25519")]
    UnsupportedKey,
    #[error("unsupported or weak signature algorithm in the chain (SHA-1 and RSA keys under 2048 bits are refused)")]
    WeakSignature,
    #[error("invalid signature in the certificate chain")]
    BadSignature,
    #[error("certificate chain violates a CA constraint: {0}")]
    InvalidChain(String),
    #[error("no matching client rule for this certificate")]
    NoMatchingRule,
    #[error(
        "the client rule's subject template needs {{{0}}}, which this certificate does not have"
    )]
    SubjectUnavailable(&'static str),
    #[error("token subject is {0} bytes, Google's limit is 127; give the client rule a shorter `subject` template")]
    SubjectTooLong(usize),
}

impl Refusal {
    /// Stable, bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::Malformed(_) => "malformed_certificate",
            Refusal::Expired { .. } => "expired",
            Refusal::NotYetValid { .. } => "not_yet_valid",
            Refusal::UnknownIssuer => "unknown_issuer",
            Refusal::SelfSigned => "self_signed",
            Refusal::Revoked => "revoked",
            Refusal::CrlExpired(_) => "crl_expired",
            Refusal::MissingEku => "missing_eku",
            Refusal::BadEku => "bad_eku",
            Refusal::CaAsLeaf => "ca_as_leaf",
            Refusal::WeakKey(_) => "weak_key",
            Refusal::UnsupportedKey => "unsupported_key",
            Refusal::WeakSignature => "weak_signature",
            Refusal::BadSignature => "bad_signature",
            Refusal::InvalidChain(_) => "invalid_chain",
            Refusal::NoMatchingRule => "no_matching_rule",
            Refusal::SubjectUnavailable(_) => "subject_unavailable",
            Refusal::SubjectTooLong(_) => "subject_too_long",
        }
    }
}

fn which(leaf: bool) -> &'static str {
    if leaf {
        "certificate"
    } else {
        "an intermediate CA certificate of the chain"
    }
}

/// RFC 3339 UTC rendering of a Unix time, for messages.
pub fn rfc3339(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| unix.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    File(#[from] pem::PemError),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A CA certificate of the bundle, for `/readyz`, metrics and `check-config`.
#[derive(Debug, Clone)]
pub struct CaInfo {
    pub subject: String,
    pub not_after: i64,
    pub is_root: bool,
}

pub struct TrustStore {
    /// The TLS provider's algorithms: one source of truth for handshake and chain. webpki
    /// has no SHA-1, and its RSA needs 2048 bits.
    algorithms: &'static [&'static dyn rustls_pki_types::SignatureVerificationAlgorithm],
    anchors: Vec<TrustAnchor<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    crls: Vec<CertRevocationList<'static>>,
    /// The earliest nextUpdate of the CRLs (`i64::MAX` without CRLs).
    crls_valid_until: i64,
    /// Subjects of the roots, sent in the CertificateRequest so clients pick the right cert.
    pub root_subjects: Vec<rustls::DistinguishedName>,
    pub cas: Vec<CaInfo>,
}

impl TrustStore {
    pub fn load(bundle: &Path, crl_files: &[PathBuf]) -> Result<TrustStore, TrustError> {
        let certs = pem::certificate_bundle(bundle)?;
        let mut store = TrustStore {
            algorithms: crate::tls::provider().signature_verification_algorithms.all,
            anchors: Vec::new(),
            intermediates: Vec::new(),
            crls: Vec::new(),
            crls_valid_until: i64::MAX,
            root_subjects: Vec::new(),
            cas: Vec::new(),
        };
        for (index, der) in certs.into_iter().enumerate() {
            let invalid = |message: String| TrustError::Invalid {
                path: bundle.to_owned(),
                message: format!("certificate #{}: {message}", index + 1),
            };
            let (_, cert) = X509Certificate::from_der(&der).map_err(|e| invalid(e.to_string()))?;
            if !cert.is_ca() {
                return Err(invalid(format!(
                    "{} is not a CA certificate (basicConstraints CA:TRUE required)",
                    cert.subject()
                )));
            }
            let is_root = cert.subject().as_raw() == cert.issuer().as_raw();
            store.cas.push(CaInfo {
                subject: cert.subject().to_string(),
                not_after: cert.validity().not_after.timestamp(),
                is_root,
            });
            if is_root {
                let anchor = webpki::anchor_from_trusted_cert(&der)
                    .map_err(|e| invalid(format!("not usable as a trust anchor: {e}")))?
                    .to_owned();
                store
                    .root_subjects
                    .push(rustls::DistinguishedName::in_sequence(
                        anchor.subject.as_ref(),
                    ));
                store.anchors.push(anchor);
            } else {
                store.intermediates.push(der);
            }
        }
        if store.anchors.is_empty() {
            return Err(TrustError::Invalid {
                path: bundle.to_owned(),
                message: "no root CA (self-signed certificate) in the bundle; intermediates alone cannot anchor trust".into(),
            });
        }
        for path in crl_files {
            let der = pem::crl(path)?;
            let crl = OwnedCertRevocationList::from_der(&der).map_err(|e| TrustError::Invalid {
                path: path.clone(),
                message: format!("not a valid CRL: {e}"),
            })?;
            store.crls.push(CertRevocationList::Owned(crl));
            // A CRL without nextUpdate never expires for webpki either.
            if let Ok((_, parsed)) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
            {
                if let Some(next) = parsed.next_update() {
                    store.crls_valid_until = store.crls_valid_until.min(next.timestamp());
                }
            }
        }
        Ok(store)
    }

    /// Validates `chain` (leaf first, then any intermediates the client sent) at `now`.
    /// `leaf` is the already parsed identity of `chain[0]`. On success, returns until when
    /// this verdict stays true for this store: the earliest notAfter on the verified path
    /// and the earliest CRL nextUpdate (nothing else in it depends on the time).
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        leaf: &Identity,
        now: UnixTime,
    ) -> Result<i64, Refusal> {
        let (end_entity, sent_intermediates) = chain.split_first().ok_or(Refusal::NoCertificate)?;
        let cert =
            EndEntityCert::try_from(end_entity).map_err(|e| Refusal::Malformed(e.to_string()))?;

        let mut intermediates: Vec<CertificateDer<'_>> = sent_intermediates.to_vec();
        intermediates.extend(self.intermediates.iter().cloned());

        let crl_refs: Vec<&CertRevocationList<'static>> = self.crls.iter().collect();
        let revocation = RevocationOptionsBuilder::new(&crl_refs)
            .ok()
            .map(|builder| {
                builder
                    .with_depth(RevocationCheckDepth::Chain)
                    .with_status_policy(UnknownStatusPolicy::Allow)
                    .with_expiration_policy(ExpirationPolicy::Enforce)
                    .build()
            });

        let path = cert
            .verify_for_usage(
                self.algorithms,
                &self.anchors,
                &intermediates,
                now,
                KeyUsage::client_auth(),
                revocation,
                None,
            )
            .map_err(|e| refusal_from_webpki(e, leaf, chain.len()))?;
        leaf_policy(leaf)?;

        let path_expiry = path
            .intermediate_certificates()
            .filter_map(|c| {
                X509Certificate::from_der(&c.der())
                    .ok()
                    .map(|(_, x)| x.validity().not_after.timestamp())
            })
            .fold(leaf.not_after, i64::min);
        Ok(path_expiry.min(self.crls_valid_until))
    }

    pub fn crl_count(&self) -> usize {
        self.crls.len()
    }
}

/// The broker's own rules for leaves, beyond webpki's.
fn leaf_policy(leaf: &Identity) -> Result<(), Refusal> {
    if !leaf.has_eku {
        return Err(Refusal::MissingEku);
    }
    match leaf.key {
        KeyInfo::Rsa { bits } if bits < 2048 => Err(Refusal::WeakKey(bits)),
        KeyInfo::Rsa { bits } if bits > 8192 => Err(Refusal::UnsupportedKey),
        KeyInfo::Rsa { .. } | KeyInfo::EcP256 | KeyInfo::EcP384 | KeyInfo::Ed25519 => Ok(()),
        KeyInfo::Other => Err(Refusal::UnsupportedKey),
    }
}

fn refusal_from_webpki(error: webpki::Error, leaf: &Identity, chain_len: usize) -> Refusal {
    use webpki::Error as E;
    let is_leaf_time =
        |t: UnixTime| t.as_secs() as i64 == leaf.not_after || t.as_secs() as i64 == leaf.not_before;
    match error {
        E::CertExpired { not_after, .. } => Refusal::Expired {
            at: not_after.as_secs() as i64,
            leaf: is_leaf_time(not_after),
        },
        E::CertNotValidYet { not_before, .. } => Refusal::NotYetValid {
            at: not_before.as_secs() as i64,
            leaf: is_leaf_time(not_before),
        },
        E::UnknownIssuer if chain_len == 1 && leaf.is_self_issued() => Refusal::SelfSigned,
        E::UnknownIssuer => Refusal::UnknownIssuer,
        E::CertRevoked => Refusal::Revoked,
        E::CrlExpired { next_update, .. } => Refusal::CrlExpired(next_update.as_secs() as i64),
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => Refusal::BadEku,
        E::CaUsedAsEndEntity => Refusal::CaAsLeaf,
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => Refusal::WeakSignature,
        E::InvalidSignatureForPublicKey => Refusal::BadSignature,
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::InvalidCertValidity => {
            Refusal::Malformed(format!("{error:?}"))
        }
        other => Refusal::InvalidChain(format!("{other:?}")),
    }
}

/// A validation time from Unix seconds (for `verify-cert --at`).
pub fn at_unix(seconds: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(seconds.max(0) as u64))
}
