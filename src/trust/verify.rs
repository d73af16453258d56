//! Chain validation: webpki's path building, with the broker's checks of each candidate
//! path inside it (root validity, revocation, keyCertSign), then the leaf's policy.

use std::cell::{Cell, RefCell};
use std::fmt;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy, VerifiedPath,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::limits::{MAX_CERTIFICATE_BYTES, MAX_SENT_CERTIFICATES, MAX_SENT_SAME_SUBJECT};
use super::refusal::{refusal_from_webpki, Refusal, Which};
use super::TrustStore;
use crate::clock::at_unix;
use crate::config::RevocationPolicy;
use crate::crl::spki_contents;
use crate::identity::{Identity, KeyInfo};

impl TrustStore {
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
        if chain.len() > MAX_SENT_CERTIFICATES {
            return Err(Refusal::InvalidChain(format!(
                "{} certificates were sent, at most {MAX_SENT_CERTIFICATES} are accepted: send the certificate and the intermediate CA certificates of its path only",
                chain.len()
            )));
        }
        if let Some((subject, count)) = most_repeated_subject(sent_intermediates) {
            if count > MAX_SENT_SAME_SUBJECT {
                return Err(Refusal::InvalidChain(format!(
                    "{count} of the sent certificates are named {subject}, at most {MAX_SENT_SAME_SUBJECT} are accepted: send the certificate and the intermediate CA certificates of its path only"
                )));
            }
        }
        if let Some(big) = chain.iter().find(|c| c.len() > MAX_CERTIFICATE_BYTES) {
            return Err(Refusal::Malformed(format!(
                "a certificate of the chain is {} bytes, more than the {MAX_CERTIFICATE_BYTES} accepted",
                big.len()
            )));
        }
        // Parse errors of the leaf are mapped like path errors: a critical extension
        // webpki does not know is a refusal of its own, not a parse failure.
        let cert =
            EndEntityCert::try_from(end_entity).map_err(|e| refusal_from_webpki(e, leaf, chain))?;

        let mut intermediates: Vec<CertificateDer<'_>> = sent_intermediates.to_vec();
        intermediates.extend(self.intermediates.iter().cloned());

        let crl_refs: Vec<&CertRevocationList<'static>> = if self.own_revocation_check {
            Vec::new()
        } else {
            // Every CRL keeps webpki's parse in such a store (see `TrustStore::load`).
            self.crls
                .iter()
                .filter_map(|crl| crl.webpki.as_ref())
                .collect()
        };
        let options = |status_policy| {
            RevocationOptionsBuilder::new(&crl_refs)
                .ok()
                .map(|builder| {
                    builder
                        .with_depth(RevocationCheckDepth::Chain)
                        .with_status_policy(status_policy)
                        .with_expiration_policy(ExpirationPolicy::Enforce)
                        .build()
                })
        };
        let revocation = options(match self.revocation {
            RevocationPolicy::Require => UnknownStatusPolicy::Deny,
            RevocationPolicy::BestEffort => UnknownStatusPolicy::Allow,
        });

        // The broker's checks of a candidate path run inside path building, so that a
        // path they refuse makes webpki try the alternatives (cross-signed copies). webpki
        // takes only its own error type back: CertDistrusted (never produced for our
        // anchors) carries "see `refused_path`". The root's dates and revocation run before
        // the broker's policy, in webpki's order; the expiry of the path webpki returns is
        // the last accepted here.
        let refused_path: RefCell<Option<Refusal>> = RefCell::new(None);
        let accepted_expiry = Cell::new(leaf.not_after);
        let broker_checks = |path: &VerifiedPath<'_>| {
            let root_not_after = self.check_root_validity(path, now)?;
            let facts = intermediate_facts(path)?;
            if self.own_revocation_check {
                self.check_revocation(path, &facts, now)
                    .map_err(|e| e.into_refusal(leaf, chain, &self.unfetched))?;
            }
            path_policy(path, &facts)?;
            let expiry = facts
                .iter()
                .map(|f| f.not_after)
                .fold(root_not_after, i64::min);
            accepted_expiry.set(expiry.min(leaf.not_after));
            Ok(())
        };
        let check_path = |path: &VerifiedPath<'_>| {
            broker_checks(path).map_err(|refusal| {
                *refused_path.borrow_mut() = Some(refusal);
                webpki::Error::CertDistrusted
            })
        };
        let verify =
            |revocation, check: &dyn Fn(&VerifiedPath<'_>) -> Result<(), webpki::Error>| {
                cert.verify_for_usage(
                    self.algorithms,
                    &self.anchors,
                    &intermediates,
                    now,
                    KeyUsage::client_auth(),
                    revocation,
                    Some(check),
                )
            };
        verify(revocation, &check_path).map_err(|e| match (e, refused_path.take()) {
            (webpki::Error::CertDistrusted, Some(refusal)) => refusal,
            // webpki's own check (partitioned CRLs) stops at the first certificate of unknown
            // status, from the leaf up, and does not say which CA lacked a CRL. As the
            // broker's check does, a certificate known revoked (or a CRL expired) anywhere
            // on the path is said first: a path built with unknown status allowed tells.
            (webpki::Error::UnknownRevocationStatus, _) => {
                let missing = RefCell::new(None);
                let name_missing = |path: &VerifiedPath<'_>| {
                    *missing.borrow_mut() = self.first_issuer_without_crl(path);
                    Ok(())
                };
                match verify(options(UnknownStatusPolicy::Allow), &name_missing) {
                    Err(e) => refusal_from_webpki(e, leaf, chain),
                    Ok(_) => Refusal::CrlMissing {
                        issuer: missing.take(),
                        unfetched: self.unfetched.clone(),
                    },
                }
            }
            (e, _) => refusal_from_webpki(e, leaf, chain),
        })?;
        leaf_policy(leaf)?;
        Ok(accepted_expiry.get().min(self.crls_valid_until))
    }

    /// A root that is expired or not yet valid refuses the paths it anchors (webpki trusts
    /// an anchor whatever its dates); returns the root's notAfter.
    fn check_root_validity(&self, path: &VerifiedPath<'_>, now: UnixTime) -> Result<i64, Refusal> {
        let Some((not_before, not_after, name)) = self.anchor_validity_of(path.anchor()) else {
            return Ok(i64::MAX);
        };
        let now = now.as_secs() as i64;
        if now > *not_after {
            return Err(Refusal::Expired {
                at: *not_after,
                which: Which::Root(name.clone()),
            });
        }
        if now < *not_before {
            return Err(Refusal::NotYetValid {
                at: *not_before,
                which: Which::Root(name.clone()),
            });
        }
        Ok(*not_after)
    }

    fn anchor_validity_of(&self, anchor: &TrustAnchor<'_>) -> Option<&(i64, i64, String)> {
        self.anchors
            .iter()
            .position(|a| {
                a.subject == anchor.subject
                    && a.subject_public_key_info == anchor.subject_public_key_info
            })
            .and_then(|index| self.anchor_validity.get(index))
    }

    /// The name of the CA that issued certificate `index` of `path` (0: the leaf).
    fn issuer_name(&self, path: &VerifiedPath<'_>, index: usize) -> Option<String> {
        match path.intermediate_certificates().nth(index) {
            Some(issuer) => X509Certificate::from_der(&issuer.der())
                .ok()
                .map(|(_, parsed)| crate::identity::dn_text(parsed.subject())),
            None => self
                .anchor_validity_of(path.anchor())
                .map(|(_, _, name)| name.clone()),
        }
    }

    /// The first CA of `path` that issued a certificate of it and that no CRL names.
    fn first_issuer_without_crl(&self, path: &VerifiedPath<'_>) -> Option<String> {
        let certs = std::iter::once(&**path.end_entity()).chain(path.intermediate_certificates());
        let (index, _) = certs
            .enumerate()
            .find(|(_, cert)| self.crl_of(cert.issuer()).is_none())?;
        self.issuer_name(path, index)
    }

    /// Revocation of every certificate of `path` but its anchor, as webpki would check it
    /// with the options of the fallback above (whole chain, expired CRLs refused, unknown
    /// status as `server.revocation` says) for CRLs without an issuingDistributionPoint:
    /// the CRL in force of the certificate's issuer (of its key, for a re-keyed CA) decides,
    /// it must not be expired, an issuer with a keyUsage must have cRLSign. Only
    /// the CRL signature is not verified again on each use (see [`Crl::signed_by`]).
    /// `facts` follows `path.intermediate_certificates()`.
    fn check_revocation(
        &self,
        path: &VerifiedPath<'_>,
        facts: &[IntermediateFacts],
        now: UnixTime,
    ) -> Result<(), RevocationError> {
        // A certificate known revoked says more than one whose status is unknown: a CA
        // without a CRL is reported only when nothing else on the path is refused.
        let mut missing = None;
        let intermediates: Vec<_> = path.intermediate_certificates().collect();
        let certs = std::iter::once(&**path.end_entity()).chain(intermediates.iter().copied());
        for (index, cert) in certs.enumerate() {
            if self.crl_of(cert.issuer()).is_none() {
                if self.revocation == RevocationPolicy::Require && missing.is_none() {
                    missing = Some(index);
                }
                continue;
            }
            let issuer_spki = intermediates
                .get(index)
                .map(|i| i.subject_public_key_info());
            let (key, may_sign_crls) = match &issuer_spki {
                Some(spki) => (
                    spki_contents(spki.as_ref()).unwrap_or_default(),
                    facts.get(index).is_some_and(|f| f.may_sign_crls),
                ),
                // webpki does not track a trust anchor's keyUsage; loading checked it.
                None => (path.anchor().subject_public_key_info.as_ref(), true),
            };
            // The CRL of this issuer's key: a re-keyed CA of the same name has its own.
            let Some(crl) = self
                .crls_of(cert.issuer())
                .find(|crl| crl.signed_by(key, self.algorithms))
            else {
                return Err(webpki::Error::InvalidCrlSignatureForPublicKey.into());
            };
            if now.as_secs() as i64 >= crl.next_update {
                return Err(webpki::Error::CrlExpired {
                    time: now,
                    next_update: at_unix(crl.next_update),
                }
                .into());
            }
            if !may_sign_crls {
                return Err(webpki::Error::IssuerNotCrlSigner.into());
            }
            if crl.is_revoked(cert.serial()) {
                return Err(webpki::Error::CertRevoked.into());
            }
        }
        match missing {
            Some(index) => Err(RevocationError::Missing(self.issuer_name(path, index))),
            None => Ok(()),
        }
    }
}

/// Why the broker's revocation check refused a path: what webpki would say, or a CA
/// without a CRL under `require` (webpki's own error for that names no CA).
#[derive(Debug)]
enum RevocationError {
    Webpki(webpki::Error),
    Missing(Option<String>),
}

impl From<webpki::Error> for RevocationError {
    fn from(error: webpki::Error) -> Self {
        RevocationError::Webpki(error)
    }
}

impl RevocationError {
    /// `unfetched`: the CRL sources never downloaded yet, which a missing CRL may be from.
    fn into_refusal(
        self,
        leaf: &Identity,
        chain: &[CertificateDer<'_>],
        unfetched: &[String],
    ) -> Refusal {
        match self {
            RevocationError::Webpki(error) => refusal_from_webpki(error, leaf, chain),
            RevocationError::Missing(issuer) => Refusal::CrlMissing {
                issuer,
                unfetched: unfetched.to_vec(),
            },
        }
    }
}

/// The subject name shared by the most of `certs`, and how many share it. Certificates that
/// do not parse are left to webpki.
fn most_repeated_subject(certs: &[CertificateDer<'_>]) -> Option<(String, usize)> {
    let subjects: Vec<(Vec<u8>, String)> = certs
        .iter()
        .filter_map(|der| X509Certificate::from_der(der).ok())
        .map(|(_, c)| {
            (
                c.subject().as_raw().to_vec(),
                crate::identity::dn_text(c.subject()),
            )
        })
        .collect();
    subjects
        .iter()
        .map(|(raw, text)| {
            let count = subjects.iter().filter(|(other, _)| other == raw).count();
            (text.clone(), count)
        })
        .max_by_key(|(_, count)| *count)
}

/// What the broker reads itself of a path's intermediates (webpki keeps their keyUsage
/// and validity to itself).
struct IntermediateFacts {
    /// keyUsage absent or including keyCertSign.
    may_sign_certs: bool,
    /// keyUsage absent or including cRLSign.
    may_sign_crls: bool,
    not_after: i64,
}

/// The facts of `path`'s intermediates, in path order; one that x509-parser cannot read
/// refuses the path.
fn intermediate_facts(path: &VerifiedPath<'_>) -> Result<Vec<IntermediateFacts>, Refusal> {
    let malformed =
        |e: &dyn fmt::Display| Refusal::Malformed(format!("intermediate CA certificate: {e}"));
    path.intermediate_certificates()
        .map(|cert| {
            let der = cert.der();
            let (_, parsed) = X509Certificate::from_der(&der).map_err(|e| malformed(&e))?;
            let key_usage = parsed.key_usage().map_err(|e| malformed(&e))?;
            Ok(IntermediateFacts {
                may_sign_certs: key_usage.as_ref().is_none_or(|ku| ku.value.key_cert_sign()),
                may_sign_crls: key_usage.as_ref().is_none_or(|ku| ku.value.crl_sign()),
                not_after: parsed.validity().not_after.timestamp(),
            })
        })
        .collect()
}

/// The broker's own rule for a path webpki accepted, beyond webpki's: every intermediate CA
/// certificate must be allowed to sign certificates (RFC 5280 4.2.1.3: a keyUsage, if
/// present, must include keyCertSign). webpki ignores keyUsage; bundle CAs are checked at
/// load, so this is about the intermediates clients send.
fn path_policy(path: &VerifiedPath<'_>, facts: &[IntermediateFacts]) -> Result<(), Refusal> {
    let Some(index) = facts.iter().position(|f| !f.may_sign_certs) else {
        return Ok(());
    };
    let subject = path
        .intermediate_certificates()
        .nth(index)
        .and_then(|cert| {
            X509Certificate::from_der(&cert.der())
                .ok()
                .map(|(_, parsed)| crate::identity::dn_text(parsed.subject()))
        })
        .unwrap_or_default();
    Err(Refusal::InvalidChain(format!(
        "the intermediate CA certificate {subject} has a keyUsage without keyCertSign, so it may not issue certificates"
    )))
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
