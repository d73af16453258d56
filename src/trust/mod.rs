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

mod crl_choice;
mod limits;
mod refusal;
mod verify;

use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, TrustAnchor};
use x509_parser::prelude::{FromDer, X509Certificate};

pub use crl_choice::{CrlRefused, CrlStatus};
pub use limits::{MAX_CERTIFICATE_BYTES, MAX_SENT_CERTIFICATES, MAX_SENT_SAME_SUBJECT};
pub use refusal::{leaf_parse_refusal, Refusal, Which};

use crate::config::{RevocationPolicy, SpkiPin};
use crate::crl::{spki_contents, Crl, CrlInfo, KeptCopy};
use crate::pem;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    File(#[from] pem::PemError),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{origin}: {message}")]
    Crl { origin: String, message: String },
    #[error("{0}")]
    CrlConflict(String),
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
    /// The CRLs in force, one per scope ([`crl_choice`]).
    crls: Vec<Crl>,
    /// Every CRL read, in force or not, and why not.
    crl_statuses: Vec<CrlStatus>,
    /// `[[server.crl_sources]]` URLs without an admitted kept copy: never downloaded (or
    /// only refused answers), so a refusal for a missing CRL names them.
    unfetched: Vec<String>,
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
    /// Loads the bundle and the CRLs: files (as read by [`pem::crls`]) and the kept copies
    /// of `[[server.crl_sources]]` (`sources`: every configured URL). `pins`, when not
    /// empty, must cover every root. A file that cannot be admitted is an error; a kept
    /// copy that cannot (written by an older version, or altered on disk) is not used, and
    /// says why in [`TrustStore::crl_statuses`]: the next download replaces it.
    pub fn load(
        bundle: &Path,
        files: Vec<pem::CrlBlock>,
        kept: Vec<KeptCopy>,
        sources: &[String],
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
            crl_statuses: Vec::new(),
            unfetched: Vec::new(),
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
            let subject = crate::identity::dn_text(cert.subject());
            if !cert.is_ca() {
                return Err(invalid(format!(
                    "{subject} is not a CA certificate (basicConstraints CA:TRUE required)"
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
                    "{subject} has a keyUsage without keyCertSign: it may not issue certificates"
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
                    "root CA {subject} has an extendedKeyUsage without clientAuth: it cannot anchor client certificates"
                )));
            }
            let pin = SpkiPin::of_spki(cert.public_key().raw);
            if is_root && !pins.is_empty() && !pins.contains(&pin) {
                unpinned.push(format!("{subject} (its pin: \"{pin}\")"));
            }
            store.cas.push(CaInfo {
                subject: subject.clone(),
                not_after: cert.validity().not_after.timestamp(),
                is_root,
                pin,
            });
            store.bundle_cas.push(BundleCa {
                subject: subject.clone(),
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
                    subject,
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
        let mut admitted = Vec::new();
        for block in files {
            let crl = store
                .admit_crl(&block.der, block.source.clone(), false)
                .map_err(|refused| TrustError::Crl {
                    origin: block.source,
                    message: refused.to_string(),
                })?;
            admitted.push(crl);
        }
        let mut refused = Vec::new();
        for copy in kept {
            match store.admit_download(&copy.bytes, &copy.url) {
                Ok(crl) => admitted.push(crl),
                Err(why) => refused.push(CrlStatus::refused(copy.url, true, &why)),
            }
        }
        let (in_force, statuses) = crl_choice::choose(admitted).map_err(TrustError::CrlConflict)?;
        store.crl_statuses = statuses;
        store.crl_statuses.extend(refused);
        store.unfetched = sources
            .iter()
            .filter(|url| {
                !store
                    .crl_statuses
                    .iter()
                    .any(|s| s.fetched && s.crl.is_some() && &&s.source == url)
            })
            .cloned()
            .collect();
        for crl in in_force {
            store.add_crl(crl);
        }
        if !store.own_revocation_check {
            for crl in &mut store.crls {
                crl.keep_webpki_list().map_err(|message| TrustError::Crl {
                    origin: crl.info.source.clone(),
                    message,
                })?;
            }
        }
        Ok(store)
    }

    /// Parses a CRL and checks it as loading does: a CRL naming a bundle CA must be signed
    /// by it, checked once here, so a wrong or corrupted CRL fails check-config (or a
    /// reload, keeping the old state) instead of refusing every certificate of that CA at
    /// request time. A CRL file of an intermediate the clients send cannot be checked before
    /// a client sends it; it is checked against that intermediate's key on the first path
    /// using it. A download (`fetched`) must be verifiable now: it is admitted only when
    /// its issuer is a CA of the bundle, so nothing unverified is kept or sets a floor.
    pub fn admit_crl(&self, der: &[u8], source: String, fetched: bool) -> Result<Crl, CrlRefused> {
        let invalid = || CrlRefused::Invalid("not a valid CRL: malformed DER".into());
        // Who signed it is checked before the CRL is parsed: a download's millions of
        // entries are not read, let alone kept, for a CRL its CA did not sign.
        let issuer = crate::crl::issuer_of(der).ok_or_else(invalid)?;
        let named: Vec<&BundleCa> = self
            .bundle_cas
            .iter()
            .filter(|ca| ca.subject_raw == issuer)
            .collect();
        let name = || {
            let name = crate::der::tlv(crate::der::SEQUENCE, issuer);
            x509_parser::x509::X509Name::from_der(&name)
                .map_or_else(|_| "(an unreadable name)".into(), |(_, n)| n.to_string())
        };
        if named.is_empty() {
            return match fetched {
                true => Err(CrlRefused::UnknownIssuer(name())),
                false => Crl::parse(der, source, false).map_err(CrlRefused::Invalid),
            };
        }
        let signer = named
            .iter()
            .find(|ca| crate::crl::crl_signed_by(der, &ca.spki, self.algorithms))
            .ok_or_else(|| CrlRefused::BadSignature(name()))?;
        if !signer.may_sign_crls {
            return Err(CrlRefused::NotCrlSigner(name()));
        }
        let mut crl = Crl::parse(der, source, fetched).map_err(CrlRefused::Invalid)?;
        crl.verified_by(&signer.spki);
        Ok(crl)
    }

    /// Admits what a CRL source served (or its kept copy): exactly one CRL, verified now.
    pub fn admit_download(&self, bytes: &[u8], url: &str) -> Result<Crl, CrlRefused> {
        let ders = pem::crls_in(bytes).map_err(CrlRefused::Invalid)?;
        let [der] = ders.as_slice() else {
            return Err(CrlRefused::Invalid(format!(
                "{} CRLs in one answer: a CRL source serves one CRL (configure one source per CRL)",
                ders.len()
            )));
        };
        self.admit_crl(der, url.to_owned(), true)
    }

    /// Whether an admitted download from `url` may replace what the broker holds: a source
    /// serves one scope (its CA, and partition), that of its kept copy, unless a file or
    /// another source holds as much of that scope (then the kept copy adds nothing, and
    /// whoever answered the source's first download cannot bind it for good); and no CRL
    /// older than one held for its scope, from any origin, replaces it (no rollback to a CRL
    /// from before a revocation), nor one of the same number with other contents.
    /// `kept_since`: a kept copy of `url` written after this store was loaded (admitted),
    /// which counts as much as the one loaded.
    pub fn may_succeed(
        &self,
        url: &str,
        fetched: &Crl,
        kept_since: Option<&Crl>,
    ) -> Result<(), Succession> {
        let held = self
            .crl_statuses
            .iter()
            .filter_map(|s| Some((s, s.crl.as_ref()?)));
        let kept = match kept_since {
            Some(kept) => Some((kept.scope(), &kept.info)),
            None => held
                .clone()
                .find(|(s, _)| s.fetched && s.source == url)
                .map(|(s, info)| (s.scope.as_slice(), info)),
        };
        if let Some((scope, kept)) = kept.filter(|(scope, _)| *scope != fetched.scope()) {
            let covered = held.clone().any(|(s, info)| {
                s.source != url
                    && s.scope == scope
                    && crate::crl::number_order(&info.number, &kept.number).is_ge()
            });
            if !covered {
                return Err(Succession::IssuerChanged {
                    kept: kept.issuer.clone(),
                    fetched: fetched.info.issuer.clone(),
                });
            }
        }
        let digest = crate::crl::digest(fetched.der());
        let floors = held
            .filter(|(s, _)| s.scope == fetched.scope())
            .map(|(s, info)| (info, s.digest))
            .chain(kept_since.map(|k| (&k.info, crate::crl::digest(k.der()))));
        for (floor, floor_digest) in floors {
            match crate::crl::number_order(&fetched.info.number, &floor.number) {
                std::cmp::Ordering::Less => {
                    return Err(Succession::Older {
                        fetched: fetched.info.number.clone(),
                        in_force: floor.number.clone(),
                        origin: floor.source.clone(),
                    })
                }
                std::cmp::Ordering::Equal if floor_digest != digest => {
                    return Err(Succession::SameNumber {
                        number: fetched.info.number.clone(),
                        origin: floor.source.clone(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn add_crl(&mut self, crl: Crl) {
        // A CRL without nextUpdate never expires for webpki either.
        self.crls_valid_until = self.crls_valid_until.min(crl.next_update);
        self.own_revocation_check &= !crl.partitioned;
        self.crls.push(crl);
    }

    /// The CRLs in force, in the order they were configured.
    pub fn crls(&self) -> impl Iterator<Item = &CrlInfo> {
        self.crls.iter().map(|crl| &crl.info)
    }

    /// Every CRL read, in force or not (and why not), in the order configured.
    pub fn crl_statuses(&self) -> &[CrlStatus] {
        &self.crl_statuses
    }

    /// The CRL sources that have no admitted kept copy yet.
    pub fn unfetched_sources(&self) -> &[String] {
        &self.unfetched
    }

    pub fn revocation(&self) -> RevocationPolicy {
        self.revocation
    }

    /// A CRL in force naming `issuer` (contents of its Name SEQUENCE); partitioned CRLs
    /// are left to webpki.
    fn crl_of(&self, issuer: &[u8]) -> Option<&Crl> {
        self.crls.iter().find(|crl| crl.issuer() == issuer)
    }

    /// The CRLs in force naming `issuer`: one per key of that name (a re-keyed CA signs
    /// its own).
    fn crls_of<'a>(&'a self, issuer: &'a [u8]) -> impl Iterator<Item = &'a Crl> {
        self.crls.iter().filter(move |crl| crl.issuer() == issuer)
    }

    /// The CAs of the bundle no CRL names: their certificates' revocation is not checked
    /// (`best-effort`) or they are refused `crl_missing` (`require`).
    pub fn cas_without_crl(&self) -> Vec<&str> {
        self.bundle_cas
            .iter()
            .filter(|ca| self.crl_of(&ca.subject_raw).is_none())
            .map(|ca| ca.subject.as_str())
            .collect()
    }

    pub fn crl_count(&self) -> usize {
        self.crls.len()
    }
}

/// Why an admitted download does not replace what the broker holds.
#[derive(Debug, thiserror::Error)]
pub enum Succession {
    #[error("the source served a CRL of {fetched}, but its kept CRL, which no file or other source holds, is of {kept} (or of another partition): a source serves one CA's CRL (configure a source per CA)")]
    IssuerChanged { kept: String, fetched: String },
    #[error("the CRL (number {fetched}) is older than one the broker holds (number {in_force}, from {origin}): a replayed or stale CRL is never taken back")]
    Older {
        fetched: String,
        in_force: String,
        origin: String,
    },
    #[error("the CRL has the number {number} of the CRL in force (from {origin}) but other contents: one of them is not what the CA published")]
    SameNumber { number: String, origin: String },
}

impl Succession {
    pub fn label(&self) -> &'static str {
        match self {
            Succession::IssuerChanged { .. } => "issuer_changed",
            Succession::Older { .. } => "older",
            Succession::SameNumber { .. } => "same_number",
        }
    }
}
