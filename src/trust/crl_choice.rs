//! Which CRL is in force: the only place that decides it, for files and downloads alike.
//!
//! For each scope (issuer, and issuingDistributionPoint for a partitioned CRL) the admitted
//! CRL with the highest cRLNumber is in force, whatever its origin and wherever it was
//! configured; the others are shadowed and say why. Two CRLs of one scope with the same
//! number and different contents are an error: one of them is not what its CA published.

use std::cmp::Ordering;

use crate::crl::{Crl, CrlInfo};

/// Why a CRL was not admitted. [`CrlRefused::label`] is the `result` a refused download
/// counts under in `crl_fetches_total`.
#[derive(Debug, thiserror::Error)]
pub enum CrlRefused {
    #[error("{0}")]
    Invalid(String),
    #[error("CRL of {0} is not validly signed by the CA {0} of the client CA bundle: a CRL of another CA with the same name, a forged or corrupted CRL, or a signature algorithm the broker does not accept (SHA-1)")]
    BadSignature(String),
    #[error("CRL of {0}, whose keyUsage does not include cRLSign: it may not issue CRLs")]
    NotCrlSigner(String),
    #[error("CRL of {0}, a CA that is not in server.client_ca, so its signature cannot be verified and it is not used: add the certificate of {0} to server.client_ca (an intermediate there helps build paths and is never trusted on its own)")]
    UnknownIssuer(String),
}

impl CrlRefused {
    pub fn label(&self) -> &'static str {
        match self {
            CrlRefused::Invalid(_) => "invalid",
            CrlRefused::BadSignature(_) | CrlRefused::NotCrlSigner(_) => "bad_signature",
            CrlRefused::UnknownIssuer(_) => "unknown_issuer",
        }
    }
}

/// A CRL the broker read, in force or not, for `check-config` and the metrics.
#[derive(Debug, Clone)]
pub struct CrlStatus {
    /// The file (`#n` in a bundle) or the source's URL.
    pub source: String,
    pub fetched: bool,
    /// What it says of itself; `None` when it could not be admitted at all.
    pub crl: Option<CrlInfo>,
    /// Why it is not in force (`None`: it is).
    pub shadowed_by: Option<String>,
    /// An identical copy of the CRL in force: not in force, yet nothing is missing.
    pub redundant: bool,
    /// Its scope ([`Crl::scope`]) and digest, to compare a download with what is held.
    pub(super) scope: Vec<u8>,
    pub(super) digest: [u8; 32],
}

impl CrlStatus {
    pub fn in_force(&self) -> bool {
        self.shadowed_by.is_none()
    }

    pub(super) fn refused(source: String, fetched: bool, why: &CrlRefused) -> CrlStatus {
        CrlStatus {
            source,
            fetched,
            crl: None,
            shadowed_by: Some(format!("not admitted: {why}")),
            redundant: false,
            scope: Vec::new(),
            digest: [0; 32],
        }
    }
}

/// Splits admitted CRLs into those in force (in the order given) and the statuses of all.
/// The outcome does not depend on the order of `admitted`, except for the order of lists.
/// Two files of one scope and number with other contents are an error (the operator's to
/// fix); where a download is one of them, the download is not used (a file wins, else the
/// download of the smaller URL), so that no download can stop the configuration loading.
pub(super) fn choose(admitted: Vec<Crl>) -> Result<(Vec<Crl>, Vec<CrlStatus>), String> {
    let mut order: Vec<usize> = (0..admitted.len()).collect();
    // Best first within a scope: the highest number; then a file over a download and the
    // smallest source, so that which of two identical copies is reported does not depend
    // on the configuration's order.
    order.sort_by(|&a, &b| {
        let (a, b) = (&admitted[a], &admitted[b]);
        a.scope()
            .cmp(b.scope())
            .then_with(|| b.number_order(a))
            .then_with(|| a.info.fetched.cmp(&b.info.fetched))
            .then_with(|| a.info.source.cmp(&b.info.source))
    });
    let mut winner_of = vec![0; admitted.len()];
    let mut winner: Option<usize> = None;
    for &index in &order {
        let crl = &admitted[index];
        let best = match winner {
            Some(best) if admitted[best].scope() == crl.scope() => best,
            _ => index,
        };
        let conflict = best != index
            && crl.number_order(&admitted[best]) == Ordering::Equal
            && crl.der() != admitted[best].der();
        if conflict && !crl.info.fetched {
            // Both are files (a file sorts before a download of the same number).
            let best = &admitted[best].info;
            return Err(format!(
                "{} and {} are two different CRLs of {} with the same cRLNumber {}: one of them is not what the CA published; remove the wrong one (each CRL a CA issues has a new number)",
                best.source, crl.info.source, crl.info.issuer, crl.info.number
            ));
        }
        winner = Some(best);
        winner_of[index] = best;
    }
    let statuses = admitted
        .iter()
        .enumerate()
        .map(|(index, crl)| {
            let best = &admitted[winner_of[index]];
            let same_number = crl.number_order(best) == Ordering::Equal;
            let redundant = winner_of[index] != index && crl.der() == best.der();
            let shadowed_by = (winner_of[index] != index).then(|| match (same_number, redundant) {
                (_, true) => format!("the same CRL as {}, which is in force", best.info.source),
                (true, false) => format!(
                    "not used: cRLNumber {} as {}, which is in force, but other contents (one of them is not what the CA published)",
                    crl.info.number, best.info.source
                ),
                (false, _) => format!(
                    "older: number {}, while {} has number {} and is in force",
                    crl.info.number, best.info.source, best.info.number
                ),
            });
            CrlStatus {
                source: crl.info.source.clone(),
                fetched: crl.info.fetched,
                crl: Some(crl.info.clone()),
                shadowed_by,
                redundant,
                scope: crl.scope().to_vec(),
                digest: crate::crl::digest(crl.der()),
            }
        })
        .collect();
    let in_force = admitted
        .into_iter()
        .enumerate()
        .filter(|(index, _)| winner_of[*index] == *index)
        .map(|(_, crl)| crl)
        .collect();
    Ok((in_force, statuses))
}
