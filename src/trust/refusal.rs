//! Why a certificate was refused: the stable reasons and the words devices read, and the
//! one translation of webpki's errors into them.

use std::fmt;

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::EndEntityCert;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::limits::{MAX_CERTIFICATE_BYTES, MAX_PATH_INTERMEDIATES};
use crate::clock::rfc3339;
use crate::identity::Identity;

/// Why a client certificate was refused. `reason()` is stable: it is the metric label and
/// the audit log's `reason`; `Display` is the human description sent in the 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no client certificate was presented; /token requires mutual TLS")]
    NoCertificate,
    #[error("certificate could not be parsed: {0}")]
    Malformed(String),
    #[error("{which} expired at {}", rfc3339(*.at))]
    Expired { at: i64, which: Which },
    #[error("{which} is not valid before {}", rfc3339(*.at))]
    NotYetValid { at: i64, which: Which },
    #[error("issuer not trusted: no path from the certificate to a root CA of the configured bundle (send intermediate CA certificates along with the client certificate)")]
    UnknownIssuer,
    #[error("self-signed certificate is not trusted; use a certificate issued by a CA in the configured bundle")]
    SelfSigned,
    #[error("certificate revoked (listed in its issuer's CRL)")]
    Revoked,
    #[error("revocation status unknown: the CRL for this certificate's issuer expired at {}", rfc3339(*.0))]
    CrlExpired(i64),
    #[error("revocation status unknown: the broker has no CRL {}, and its revocation policy (server.revocation = \"require\") refuses a certificate whose revocation it cannot check{}", crl_missing_for(.issuer.as_deref()), not_fetched_yet(.unfetched))]
    CrlMissing {
        issuer: Option<String>,
        /// CRL sources never downloaded yet: the CRL may be theirs.
        unfetched: Vec<String>,
    },
    #[error("missing clientAuth EKU: the certificate has no extendedKeyUsage extension")]
    MissingEku,
    #[error("missing clientAuth EKU: {}", bad_eku(*.leaf))]
    BadEku { leaf: bool },
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
    #[error("invalid certificate chain: {0}")]
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
            Refusal::CrlMissing { .. } => "crl_missing",
            Refusal::MissingEku => "missing_eku",
            Refusal::BadEku { .. } => "bad_eku",
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

fn bad_eku(leaf: bool) -> &'static str {
    if leaf {
        "the certificate's extendedKeyUsage does not allow TLS client authentication"
    } else {
        "an intermediate CA certificate of the chain has an extendedKeyUsage without clientAuth, which rules out client authentication for every certificate below it"
    }
}

/// Which certificate of a path a time refusal is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    Leaf,
    Intermediate,
    /// A root of the bundle, by name (it is the operator's to renew, not the device's).
    Root(String),
}

impl fmt::Display for Which {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Which::Leaf => f.write_str("certificate"),
            Which::Intermediate => f.write_str("an intermediate CA certificate of the chain"),
            Which::Root(name) => write!(f, "the root CA {name} of the broker's client CA bundle"),
        }
    }
}

fn crl_missing_for(issuer: Option<&str>) -> String {
    match issuer {
        Some(issuer) => format!("of the CA {issuer}, which issued a certificate of this chain"),
        None => "covering a certificate of this chain".into(),
    }
}

fn not_fetched_yet(unfetched: &[String]) -> String {
    match unfetched {
        [] => String::new(),
        urls => format!(
            "; not downloaded yet (no answer admitted so far; the broker's log says why): CRL source {}",
            urls.join(", ")
        ),
    }
}

/// Why webpki cannot even parse `leaf`, in the words `/token` and `verify-cert` use for it.
/// The handshake parses the leaf to check the client's signature, so such a certificate
/// fails there, before any request; this lets that failure carry its reason too.
pub fn leaf_parse_refusal(leaf: &CertificateDer<'_>) -> Option<Refusal> {
    if leaf.len() > MAX_CERTIFICATE_BYTES {
        return Some(Refusal::Malformed(format!(
            "the certificate is {} bytes, more than the {MAX_CERTIFICATE_BYTES} accepted",
            leaf.len()
        )));
    }
    let error = EndEntityCert::try_from(leaf).err()?;
    Some(match Identity::from_der(leaf) {
        Ok(identity) => refusal_from_webpki(error, &identity, std::slice::from_ref(leaf)),
        Err(e) => Refusal::Malformed(e.to_string()),
    })
}

/// `chain` is what the client sent (leaf first), `leaf` its parsed identity.
pub(super) fn refusal_from_webpki(
    error: webpki::Error,
    leaf: &Identity,
    chain: &[CertificateDer<'_>],
) -> Refusal {
    use webpki::Error as E;
    let which = |t: UnixTime| {
        let t = t.as_secs() as i64;
        if t == leaf.not_after || t == leaf.not_before {
            Which::Leaf
        } else {
            Which::Intermediate
        }
    };
    match error {
        E::CertExpired { not_after, .. } => Refusal::Expired {
            at: not_after.as_secs() as i64,
            which: which(not_after),
        },
        E::CertNotValidYet { not_before, .. } => Refusal::NotYetValid {
            at: not_before.as_secs() as i64,
            which: which(not_before),
        },
        E::UnknownIssuer if chain.len() == 1 && leaf.is_self_issued() => Refusal::SelfSigned,
        E::UnknownIssuer => Refusal::UnknownIssuer,
        E::CertRevoked => Refusal::Revoked,
        E::CrlExpired { next_update, .. } => Refusal::CrlExpired(next_update.as_secs() as i64),
        E::UnknownRevocationStatus => Refusal::CrlMissing {
            issuer: None,
            unfetched: Vec::new(),
        },
        // webpki requires clientAuth (when an EKU is present) of every certificate of the
        // path; a leaf that has it points at an intermediate.
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => Refusal::BadEku {
            leaf: !chain.first().is_some_and(|der| has_client_auth_eku(der)),
        },
        E::CaUsedAsEndEntity => Refusal::CaAsLeaf,
        E::UnsupportedSignatureAlgorithmContext(_) => Refusal::WeakSignature,
        // A signature that cannot be right: an algorithm the signer's key cannot make
        // (RSA declared, ECDSA key), an outer algorithm differing from the signed one, or
        // a value that does not verify (wrong hash declared, tampered bytes).
        E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::SignatureAlgorithmMismatch
        | E::InvalidSignatureForPublicKey => Refusal::BadSignature,
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::InvalidCertValidity => {
            Refusal::Malformed(format!("{error:?}"))
        }
        other => Refusal::InvalidChain(chain_problem(other)),
    }
}

/// Whether a certificate's extendedKeyUsage lists id-kp-clientAuth.
fn has_client_auth_eku(der: &[u8]) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, cert)| {
        cert.extended_key_usage()
            .is_ok_and(|eku| eku.is_some_and(|eku| eku.value.client_auth))
    })
}

/// A sentence for the webpki errors that end up as `invalid_chain`.
fn chain_problem(error: webpki::Error) -> String {
    use webpki::Error as E;
    match error {
        E::PathLenConstraintViolated => "an intermediate CA certificate has more CA certificates below it than its pathLenConstraint allows".into(),
        E::EndEntityUsedAsCa => "a certificate that is not a CA (basicConstraints CA:FALSE or absent) issued another certificate".into(),
        E::NameConstraintViolation => "a name of a certificate of the chain (a subjectAltName, its subject, or an email address in its subject) is outside a permitted subtree, or inside an excluded subtree, of the name constraints of a CA above it".into(),
        E::MalformedNameConstraint => "a CA of the chain has a name constraint that is not a valid name of its form (a host, a domain, a mailbox), which refuses every name of that form below it".into(),
        E::UnsupportedCriticalExtension => "a certificate of the chain has a critical extension the broker does not process, which RFC 5280 requires to refuse".into(),
        E::MaximumPathDepthExceeded => format!("no path to a root CA within {MAX_PATH_INTERMEDIATES} intermediate CA certificates, the most the broker builds"),
        E::MaximumSignatureChecksExceeded | E::MaximumPathBuildCallsExceeded | E::MaximumNameConstraintComparisonsExceeded => "the chain is too costly to validate (path building gave up): send only the certificate and the intermediates of its path".into(),
        E::InvalidCrlSignatureForPublicKey
        | E::UnsupportedCrlSignatureAlgorithmContext(_)
        | E::UnsupportedCrlSignatureAlgorithmForPublicKeyContext(_)
        | E::IssuerNotCrlSigner => "revocation status unknown: the configured CRL of a CA of this chain is not validly signed by that CA (the broker's CRL file needs fixing)".into(),
        E::CertDistrusted => "a CA of the chain is distrusted".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::at_unix;
    use webpki::Error as E;

    /// Every webpki error the broker maps, with the reason and words devices get.
    #[test]
    fn webpki_errors_become_stable_reasons_in_words() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["device.test".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "device");
        let cert = params.self_signed(&key).unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        let leaf = Identity::from_der(&der).unwrap();
        let alone = std::slice::from_ref(&der);
        let with_intermediate = [der.clone(), der.clone()];
        let (leaf_end, other_time) = (at_unix(leaf.not_after), at_unix(leaf.not_after - 1));
        let now = at_unix(leaf.not_after + 1);
        let table: Vec<(E, &[CertificateDer<'_>], &str, &str)> = vec![
            (
                E::CertExpired {
                    time: now,
                    not_after: leaf_end,
                },
                alone,
                "expired",
                "certificate expired at",
            ),
            (
                E::CertExpired {
                    time: now,
                    not_after: other_time,
                },
                alone,
                "expired",
                "an intermediate CA certificate of the chain expired at",
            ),
            (
                E::CertNotValidYet {
                    time: now,
                    not_before: other_time,
                },
                alone,
                "not_yet_valid",
                "is not valid before",
            ),
            (
                E::UnknownIssuer,
                alone,
                "self_signed",
                "self-signed certificate",
            ),
            (
                E::UnknownIssuer,
                &with_intermediate,
                "unknown_issuer",
                "no path from the certificate to a root CA",
            ),
            (E::CertRevoked, alone, "revoked", "certificate revoked"),
            (
                E::CrlExpired {
                    time: now,
                    next_update: other_time,
                },
                alone,
                "crl_expired",
                "the CRL for this certificate's issuer expired at",
            ),
            (
                E::UnknownRevocationStatus,
                alone,
                "crl_missing",
                "revocation status unknown",
            ),
            (
                E::EmptyEkuExtension,
                alone,
                "bad_eku",
                "missing clientAuth EKU",
            ),
            (
                E::CaUsedAsEndEntity,
                alone,
                "ca_as_leaf",
                "a CA certificate cannot be used",
            ),
            (
                E::SignatureAlgorithmMismatch,
                alone,
                "bad_signature",
                "invalid signature",
            ),
            (
                E::InvalidSignatureForPublicKey,
                alone,
                "bad_signature",
                "invalid signature",
            ),
            (
                E::BadDer,
                alone,
                "malformed_certificate",
                "could not be parsed",
            ),
            (
                E::PathLenConstraintViolated,
                alone,
                "invalid_chain",
                "pathLenConstraint",
            ),
            (
                E::NameConstraintViolation,
                alone,
                "invalid_chain",
                "name constraints",
            ),
            (
                E::MaximumPathDepthExceeded,
                alone,
                "invalid_chain",
                "within 6 intermediate CA certificates",
            ),
            (
                E::MaximumPathBuildCallsExceeded,
                alone,
                "invalid_chain",
                "too costly to validate",
            ),
            (
                E::InvalidCrlSignatureForPublicKey,
                alone,
                "invalid_chain",
                "not validly signed by that CA",
            ),
            (
                E::IssuerNotCrlSigner,
                alone,
                "invalid_chain",
                "revocation status unknown",
            ),
            (E::EndEntityUsedAsCa, alone, "invalid_chain", "is not a CA"),
        ];
        let mut wrong = Vec::new();
        for (error, chain, reason, words) in table {
            let shown = format!("{error:?}");
            let refusal = refusal_from_webpki(error, &leaf, chain);
            let description = refusal.to_string();
            if refusal.reason() != reason || !description.contains(words) {
                wrong.push(format!(
                    "{shown}: {} ({description}), expected {reason} ({words})",
                    refusal.reason()
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
