//! The client CA bundle, CRLs, and chain validation.
//!
//! Validation is webpki's (the same code rustls uses), run by the broker after the handshake
//! rather than inside it, so that a refused certificate gets an HTTP answer with a precise
//! reason instead of a bare TLS alert. On top of webpki the broker adds its own policy:
//! a `clientAuth` EKU must be present (webpki accepts a leaf without EKU), the leaf key
//! must be one we accept, a CA certificate on the path must be allowed to sign
//! certificates by its keyUsage (webpki ignores keyUsage), and a client may send only a
//! few certificates of bounded size (path building costs grow with them).
//!
//! Revocation is checked by the broker, inside webpki's path building (so a revoked path
//! makes it try the alternatives), by webpki's rules, but with each CRL's signature
//! verified once per issuer key instead of on every use. CRLs with an
//! issuingDistributionPoint (partitioned CRLs) turn this off: webpki then checks them all.
//!
//! Bundle semantics (as OpenSSL's): self-issued certificates are trust anchors; the others
//! are intermediates that help build paths but are never trusted on their own. Loading
//! refuses what could never work or would be trusted by mistake: a non-CA or a CA that may
//! not sign certificates, a root whose EKU excludes clientAuth, a root not matching
//! `client_ca_pins` when pins are set, and a CRL that claims a bundle CA as its issuer but
//! is not validly signed by it. The policy, case by case, is in `docs/validation.md`.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy, VerifiedPath,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::clock::{at_unix, rfc3339};
use crate::config::{RevocationPolicy, SpkiPin};
use crate::crl::{spki_contents, Crl, CrlInfo};
use crate::identity::{Identity, KeyInfo};
use crate::pem;

/// The most certificates a client may send: the leaf, up to webpki's 6 intermediates,
/// perhaps its root and a cross-signed spare. Everything sent feeds path building; more
/// is never needed and only costs.
pub const MAX_SENT_CERTIFICATES: usize = 10;

/// The most sent certificates that may share a subject name (cross-signed copies of one
/// CA). Path building tries every certificate named as the current issuer at every level,
/// so same-named certificates multiply its work: nine self-issued ones make webpki spend
/// its whole budget (200,000 steps, a third of a CPU second) on one request. With three
/// per name, the worst of ten certificates stays in the milliseconds.
pub const MAX_SENT_SAME_SUBJECT: usize = 3;

/// webpki reads certificates of at most 64 KiB; saying so beats its bare "BadDer".
pub const MAX_CERTIFICATE_BYTES: usize = 0xffff;

/// webpki's limit on intermediates in a path (`MAX_SUB_CA_COUNT`), for messages.
const MAX_PATH_INTERMEDIATES: usize = 6;

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
    #[error("revocation status unknown: the broker has no CRL {}, and its revocation policy (server.revocation = \"require\") refuses a certificate whose revocation it cannot check", crl_missing_for(.0.as_deref()))]
    CrlMissing(Option<String>),
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
            Refusal::CrlMissing(_) => "crl_missing",
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

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    File(#[from] pem::PemError),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{origin}: {message}")]
    Crl { origin: String, message: String },
}

/// A CA certificate of the bundle, for `/readyz`, metrics and `check-config`.
#[derive(Debug, Clone)]
pub struct CaInfo {
    pub subject: String,
    pub not_after: i64,
    pub is_root: bool,
    /// Its public-key pin, as `client_ca_pins` takes it.
    pub pin: SpkiPin,
}

/// What loading keeps of a bundle CA to verify CRLs against it.
struct BundleCa {
    subject: String,
    /// Contents of its subject Name, as webpki and [`Crl`] compare names.
    subject_raw: Vec<u8>,
    /// SubjectPublicKeyInfo contents (without the outer SEQUENCE), as webpki keeps keys.
    spki: Vec<u8>,
    /// keyUsage absent or including cRLSign.
    may_sign_crls: bool,
}

pub struct TrustStore {
    /// The TLS provider's algorithms: one source of truth for handshake and chain. webpki
    /// has no SHA-1, and its RSA needs 2048 bits.
    algorithms: &'static [&'static dyn rustls_pki_types::SignatureVerificationAlgorithm],
    anchors: Vec<TrustAnchor<'static>>,
    /// The roots' validity (notBefore, notAfter, subject), in `anchors` order: webpki
    /// trusts an anchor whatever its dates, the broker does not.
    anchor_validity: Vec<(i64, i64, String)>,
    bundle_cas: Vec<BundleCa>,
    revocation: RevocationPolicy,
    intermediates: Vec<CertificateDer<'static>>,
    crls: Vec<Crl>,
    /// No CRL has an issuingDistributionPoint, so the broker checks revocation itself
    /// ([`TrustStore::check_revocation`]); partitioned CRLs are left to webpki, whose scope
    /// rules for them are not repeated here.
    own_revocation_check: bool,
    /// The earliest nextUpdate of the CRLs (`i64::MAX` without CRLs).
    crls_valid_until: i64,
    /// Subjects of the roots, sent in the CertificateRequest so clients pick the right cert.
    pub root_subjects: Vec<rustls::DistinguishedName>,
    pub cas: Vec<CaInfo>,
}

impl TrustStore {
    /// Loads the bundle and the CRLs (as read by [`pem::crls`]). `pins`, when not empty,
    /// must cover every root.
    pub fn load(
        bundle: &Path,
        crls: Vec<pem::CrlBlock>,
        pins: &[SpkiPin],
        revocation: RevocationPolicy,
    ) -> Result<TrustStore, TrustError> {
        let certs = pem::certificate_bundle(bundle)?;
        let mut store = TrustStore {
            algorithms: crate::crypto::provider()
                .signature_verification_algorithms
                .all,
            anchors: Vec::new(),
            anchor_validity: Vec::new(),
            bundle_cas: Vec::new(),
            revocation,
            intermediates: Vec::new(),
            crls: Vec::new(),
            own_revocation_check: true,
            crls_valid_until: i64::MAX,
            root_subjects: Vec::new(),
            cas: Vec::new(),
        };
        let mut unpinned = Vec::new();
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
            // webpki ignores keyUsage on CAs; RFC 5280 4.2.1.3 says a CA whose keyUsage
            // lacks keyCertSign must not sign certificates, so it cannot be one of ours.
            let key_usage = cert.key_usage().map_err(|e| invalid(e.to_string()))?;
            if key_usage
                .as_ref()
                .is_some_and(|ku| !ku.value.key_cert_sign())
            {
                return Err(invalid(format!(
                    "{} has a keyUsage without keyCertSign: it may not issue certificates",
                    cert.subject()
                )));
            }
            let is_root = cert.subject().as_raw() == cert.issuer().as_raw();
            // webpki checks EKU on intermediates but knows nothing of a root's; a root
            // restricted to other purposes (e.g. serverAuth only) cannot anchor client
            // certificates, as OpenSSL and Go would also decide.
            let eku = cert
                .extended_key_usage()
                .map_err(|e| invalid(e.to_string()))?;
            if is_root && eku.is_some_and(|e| !e.value.client_auth && !e.value.any) {
                return Err(invalid(format!(
                    "root CA {} has an extendedKeyUsage without clientAuth: it cannot anchor client certificates",
                    cert.subject()
                )));
            }
            let pin = SpkiPin::of_spki(cert.public_key().raw);
            if is_root && !pins.is_empty() && !pins.contains(&pin) {
                unpinned.push(format!("{} (its pin: \"{pin}\")", cert.subject()));
            }
            store.cas.push(CaInfo {
                subject: cert.subject().to_string(),
                not_after: cert.validity().not_after.timestamp(),
                is_root,
                pin,
            });
            store.bundle_cas.push(BundleCa {
                subject: cert.subject().to_string(),
                subject_raw: crate::crl::name_contents(cert.subject().as_raw()).to_vec(),
                spki: spki_contents(cert.public_key().raw)
                    .ok_or_else(|| invalid("malformed subjectPublicKeyInfo".into()))?
                    .to_vec(),
                may_sign_crls: key_usage.as_ref().is_none_or(|ku| ku.value.crl_sign()),
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
                store.anchor_validity.push((
                    cert.validity().not_before.timestamp(),
                    cert.validity().not_after.timestamp(),
                    cert.subject().to_string(),
                ));
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
        if !unpinned.is_empty() {
            return Err(TrustError::Invalid {
                path: bundle.to_owned(),
                message: format!(
                    "root CA not pinned by server.client_ca_pins: {}; if it is legitimate, add its pin",
                    unpinned.join(", ")
                ),
            });
        }
        for block in crls {
            let crl = store
                .admit_crl(&block.der, block.source.clone())
                .map_err(|message| TrustError::Crl {
                    origin: block.source,
                    message,
                })?;
            store.add_crl(crl);
        }
        Ok(store)
    }

    /// Parses a CRL and checks it as loading does: a CRL naming a bundle CA must be signed
    /// by it, checked once here, so a wrong or corrupted CRL fails check-config (or a
    /// refresh, or a reload, keeping the old state) instead of refusing every certificate
    /// of that CA at request time. A CRL of an intermediate the clients send cannot be
    /// checked before a client sends it; it is checked against that intermediate's key on
    /// the first path using it.
    pub fn admit_crl(&self, der: &[u8], source: String) -> Result<Crl, String> {
        let mut crl = Crl::parse(der, source)?;
        let issuer = crl.info.issuer.clone();
        let named: Vec<&BundleCa> = self
            .bundle_cas
            .iter()
            .filter(|ca| ca.subject_raw == crl.issuer_raw)
            .collect();
        if !named.is_empty() {
            match named
                .iter()
                .find(|ca| crl.signed_by(&ca.spki, self.algorithms))
            {
                None => return Err(format!(
                    "CRL of {issuer} is not validly signed by the CA {issuer} of the client CA bundle: a CRL of another CA with the same name, a corrupted file, or a signature algorithm the broker does not accept (SHA-1)"
                )),
                Some(ca) if !ca.may_sign_crls => return Err(format!(
                    "CRL of {issuer}, whose keyUsage does not include cRLSign: it may not issue CRLs"
                )),
                Some(_) => crl.info.verified_at_load = true,
            }
        }
        Ok(crl)
    }

    fn add_crl(&mut self, crl: Crl) {
        // A CRL without nextUpdate never expires for webpki either.
        self.crls_valid_until = self.crls_valid_until.min(crl.next_update);
        self.own_revocation_check &= crl.list.issuing_distribution_point().is_none();
        self.crls.push(crl);
    }

    /// The loaded CRLs, in the order they were configured.
    pub fn crls(&self) -> impl Iterator<Item = &CrlInfo> {
        self.crls.iter().map(|crl| &crl.info)
    }

    pub fn revocation(&self) -> RevocationPolicy {
        self.revocation
    }

    /// The CAs of the bundle no CRL names: their certificates' revocation is not checked
    /// (`best-effort`) or they are refused `crl_missing` (`require`).
    pub fn cas_without_crl(&self) -> Vec<&str> {
        self.bundle_cas
            .iter()
            .filter(|ca| !self.crls.iter().any(|crl| crl.issuer_raw == ca.subject_raw))
            .map(|ca| ca.subject.as_str())
            .collect()
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
            self.crls.iter().map(|crl| &crl.list).collect()
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
                    .map_err(|e| e.into_refusal(leaf, chain))?;
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
                    Ok(_) => Refusal::CrlMissing(missing.take()),
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
                .map(|(_, parsed)| parsed.subject().to_string()),
            None => self
                .anchor_validity_of(path.anchor())
                .map(|(_, _, name)| name.clone()),
        }
    }

    /// The first CA of `path` that issued a certificate of it and that no CRL names.
    fn first_issuer_without_crl(&self, path: &VerifiedPath<'_>) -> Option<String> {
        let certs = std::iter::once(&**path.end_entity()).chain(path.intermediate_certificates());
        let (index, _) = certs.enumerate().find(|(_, cert)| {
            !self
                .crls
                .iter()
                .any(|crl| crl.list.issuer() == cert.issuer())
        })?;
        self.issuer_name(path, index)
    }

    /// Revocation of every certificate of `path` but its anchor, as webpki would check it
    /// with the options of the fallback above (whole chain, expired CRLs refused, unknown
    /// status as `server.revocation` says) for CRLs without an issuingDistributionPoint:
    /// the first CRL naming the certificate's issuer decides, its signature must be the
    /// issuer's, it must not be expired, an issuer with a keyUsage must have cRLSign. Only
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
            let Some(crl) = self
                .crls
                .iter()
                .find(|crl| crl.list.issuer() == cert.issuer())
            else {
                if self.revocation == RevocationPolicy::Require && missing.is_none() {
                    missing = Some(index);
                }
                continue;
            };
            let (signed, may_sign_crls) = match intermediates.get(index) {
                Some(issuer) => {
                    let spki = issuer.subject_public_key_info();
                    let signed = spki_contents(spki.as_ref())
                        .is_some_and(|key| crl.signed_by(key, self.algorithms));
                    let may_sign = facts.get(index).is_some_and(|f| f.may_sign_crls);
                    (signed, may_sign)
                }
                // webpki does not track a trust anchor's keyUsage; loading checked it.
                None => (
                    crl.signed_by(
                        path.anchor().subject_public_key_info.as_ref(),
                        self.algorithms,
                    ),
                    true,
                ),
            };
            if !signed {
                return Err(webpki::Error::InvalidCrlSignatureForPublicKey.into());
            }
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
            if crl.list.find_serial(cert.serial())?.is_some() {
                return Err(webpki::Error::CertRevoked.into());
            }
        }
        match missing {
            Some(index) => Err(RevocationError::Missing(self.issuer_name(path, index))),
            None => Ok(()),
        }
    }

    pub fn crl_count(&self) -> usize {
        self.crls.len()
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
    fn into_refusal(self, leaf: &Identity, chain: &[CertificateDer<'_>]) -> Refusal {
        match self {
            RevocationError::Webpki(error) => refusal_from_webpki(error, leaf, chain),
            RevocationError::Missing(issuer) => Refusal::CrlMissing(issuer),
        }
    }
}

/// The subject name shared by the most of `certs`, and how many share it. Certificates that
/// do not parse are left to webpki.
fn most_repeated_subject(certs: &[CertificateDer<'_>]) -> Option<(String, usize)> {
    let subjects: Vec<(Vec<u8>, String)> = certs
        .iter()
        .filter_map(|der| X509Certificate::from_der(der).ok())
        .map(|(_, c)| (c.subject().as_raw().to_vec(), c.subject().to_string()))
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
                .map(|(_, parsed)| parsed.subject().to_string())
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
fn refusal_from_webpki(
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
        E::UnknownRevocationStatus => Refusal::CrlMissing(None),
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
