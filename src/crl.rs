//! Certificate revocation lists as the broker holds them: parsed and checked once when
//! loaded, with the facts `check-config` and the metrics show, and the outcome of their
//! signature check remembered per issuer key.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};

use rustls_pki_types::SignatureVerificationAlgorithm;
use webpki::{BorrowedCertRevocationList, CertRevocationList, OwnedCertRevocationList};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::{der, pem};

/// id-ce-cRLNumber (RFC 5280 5.2.3).
const CRL_NUMBER_OID: &str = "2.5.29.20";

/// What a loaded CRL says of itself, for `check-config` and the metrics.
#[derive(Debug, Clone)]
pub struct CrlInfo {
    /// Where it was read: a file (with `#n` in a bundle) or a fetched source's URL.
    pub source: String,
    pub issuer: String,
    /// cRLNumber, in decimal.
    pub number: String,
    pub this_update: i64,
    pub next_update: Option<i64>,
    pub revoked: usize,
    /// Its issuer is a CA of the bundle and its signature was verified at load. Otherwise
    /// it belongs to an intermediate that clients send, and it is verified against that
    /// intermediate's key when a path first uses it (a bad signature refuses what it covers).
    pub verified_at_load: bool,
    /// Downloaded from a `[[server.crl_sources]]` URL (`source`), not read from a file.
    pub fetched: bool,
}

/// A loaded CRL.
pub struct Crl {
    /// The serials it revokes: what the broker's own check reads.
    revoked: RevokedSerials,
    /// webpki's parse of it (every entry again, owned, in a map, and the signed part
    /// copied), kept only when webpki checks revocation (a store with a partitioned CRL):
    /// a 1M-entry CRL would hold about 190 MB in it (`bench/crl.sh`).
    pub(crate) webpki: Option<CertRevocationList<'static>>,
    /// Contents of the issuer's Name SEQUENCE, as webpki compares names.
    issuer: Vec<u8>,
    /// It has an issuingDistributionPoint: its scope is webpki's to decide.
    pub(crate) partitioned: bool,
    /// The issuer's name and the issuingDistributionPoint, as encoded, and the key that was
    /// verified to sign it (when verified at load): CRLs with the same scope succeed one
    /// another (RFC 5280 5.2.3: cRLNumber increases per issuer and scope; a re-keyed CA of
    /// the same name numbers its own).
    scope: Vec<u8>,
    /// The file's bytes: a CRL of an intermediate clients send is verified on first use.
    der: Vec<u8>,
    /// nextUpdate, Unix seconds (`i64::MAX` without one).
    pub(crate) next_update: i64,
    /// Issuer keys (SPKI contents) this CRL's signature was checked against, and the
    /// outcome. Only keys of CAs on a verified path get here, so it stays small.
    signers: Mutex<Vec<(Vec<u8>, bool)>>,
    pub info: CrlInfo,
}

/// Signature outcomes a CRL remembers at most (a safety bound; a real PKI has a handful).
const MAX_REMEMBERED_CRL_SIGNERS: usize = 64;

impl Crl {
    /// Parses a DER CRL read from `source`. A CRL must carry a non-critical cRLNumber
    /// (RFC 5280 5.2.3: conforming CRL issuers include it, and mark it non-critical): a
    /// CRL without one cannot be ordered against its successor, and a critical one is a
    /// CRL no conforming issuer makes.
    pub fn parse(der: &[u8], source: String, fetched: bool) -> Result<Crl, String> {
        let not_valid = |e: &dyn std::fmt::Display| format!("not a valid CRL: {e}");
        // webpki's parse decides what is a valid CRL, as before; its entries are read
        // once, into the broker's table, and not kept in webpki's map.
        let list = BorrowedCertRevocationList::from_der(der).map_err(|e| not_valid(&e))?;
        let mut serials = Vec::new();
        for entry in &list {
            serials.push(entry.map_err(|e| not_valid(&e))?.serial_number);
        }
        let revoked_count = serials.len();
        let revoked = RevokedSerials::new(serials);
        // x509-parser reads the facts shown (issuer, cRLNumber, dates) from the CRL without
        // its entries: parsing a million of them into its structures took seconds and
        // hundreds of MB.
        let summary = without_entries(der).ok_or_else(|| not_valid(&"malformed DER"))?;
        let (_, parsed) =
            CertificateRevocationList::from_der(&summary).map_err(|e| not_valid(&e))?;
        let issuer = crate::identity::dn_text(parsed.issuer());
        let number = parsed
            .extensions()
            .iter()
            .find(|ext| ext.oid.to_id_string() == CRL_NUMBER_OID);
        let number = match (number, parsed.crl_number()) {
            (Some(ext), _) if ext.critical => {
                return Err(format!(
                    "CRL of {issuer} marks its cRLNumber critical, which RFC 5280 forbids; reissue it with a non-critical cRLNumber"
                ))
            }
            (Some(_), Some(number)) => number.to_string(),
            _ => {
                return Err(format!(
                    "CRL of {issuer} has no cRLNumber (RFC 5280 5.2.3 requires one); reissue it with a CRL number"
                ))
            }
        };
        let next_update = parsed.next_update().map(|t| t.timestamp());
        let info = CrlInfo {
            source,
            issuer,
            number,
            this_update: parsed.last_update().timestamp(),
            next_update,
            revoked: revoked_count,
            verified_at_load: false,
            fetched,
        };
        let list = CertRevocationList::Borrowed(list);
        let partitioned = list.issuing_distribution_point().is_some();
        let webpki = match &list {
            CertRevocationList::Borrowed(borrowed) if partitioned => Some(
                CertRevocationList::Owned(borrowed.to_owned().map_err(|e| not_valid(&e))?),
            ),
            _ => None,
        };
        let mut scope = list.issuer().to_vec();
        scope.extend_from_slice(list.issuing_distribution_point().unwrap_or_default());
        Ok(Crl {
            revoked,
            webpki,
            issuer: list.issuer().to_vec(),
            partitioned,
            scope,
            der: der.to_vec(),
            next_update: next_update.unwrap_or(i64::MAX),
            signers: Mutex::default(),
            info,
        })
    }

    /// The issuer's name as encoded (contents of the Name SEQUENCE, as webpki compares it).
    pub(crate) fn issuer(&self) -> &[u8] {
        &self.issuer
    }

    /// Issuer and issuingDistributionPoint: two CRLs of one scope are versions of one list.
    pub(crate) fn scope(&self) -> &[u8] {
        &self.scope
    }

    /// The CRL as read.
    pub(crate) fn der(&self) -> &[u8] {
        &self.der
    }

    /// Records that the key `issuer_spki` (SPKI contents) signs this CRL, checked before it
    /// was parsed: its scope is that key's, and no use checks it again.
    pub(crate) fn verified_by(&mut self, issuer_spki: &[u8]) {
        self.scope.extend_from_slice(issuer_spki);
        self.info.verified_at_load = true;
        if let Ok(mut signers) = self.signers.lock() {
            signers.push((issuer_spki.to_vec(), true));
        }
    }

    /// How this CRL's cRLNumber compares with `other`'s.
    pub fn number_order(&self, other: &Crl) -> std::cmp::Ordering {
        number_order(&self.info.number, &other.info.number)
    }

    /// Whether it revokes the certificate with `serial` (its INTEGER's contents as
    /// encoded, as webpki compares serials).
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.revoked.contains(serial)
    }

    /// Keeps webpki's parse beside the broker's table, for a store where webpki checks
    /// revocation (one of its CRLs is partitioned).
    pub(crate) fn keep_webpki_list(&mut self) -> Result<(), String> {
        if self.webpki.is_none() {
            let list = OwnedCertRevocationList::from_der(&self.der)
                .map_err(|e| format!("not a valid CRL: {e}"))?;
            self.webpki = Some(CertRevocationList::Owned(list));
        }
        Ok(())
    }

    /// Whether the key `issuer_spki` (SPKI contents) signed this CRL: webpki verifies this
    /// on every use (the CRL signature was a tenth of a new connection's CPU); the answer
    /// never changes for one CRL and one key, so it is computed once per key.
    pub(crate) fn signed_by(
        &self,
        issuer_spki: &[u8],
        algorithms: &[&dyn SignatureVerificationAlgorithm],
    ) -> bool {
        let remembered = |signers: &[(Vec<u8>, bool)]| {
            signers
                .iter()
                .find(|(key, _)| key == issuer_spki)
                .map(|(_, signed)| *signed)
        };
        let signers = || self.signers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(signed) = remembered(&signers()) {
            return signed;
        }
        // Verified without the lock: other paths using this CRL need not wait for it.
        let signed = crl_signed_by(&self.der, issuer_spki, algorithms);
        let mut signers = signers();
        if remembered(&signers).is_none() && signers.len() < MAX_REMEMBERED_CRL_SIGNERS {
            signers.push((issuer_spki.to_vec(), signed));
        }
        signed
    }
}

/// Orders two cRLNumbers written in decimal without leading zeros (up to 20 octets: more
/// than any integer type holds).
pub(crate) fn number_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The SHA-256 of a CRL as read: tells two CRLs of one number apart.
pub(crate) fn digest(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Where the copy of a fetched CRL source is kept in `dir`, and its HTTP validators.
pub fn kept_paths(dir: &Path, url: &str) -> (PathBuf, PathBuf) {
    let digest = Sha256::digest(url.as_bytes());
    let name: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    (
        dir.join(format!("{name}.crl")),
        dir.join(format!("{name}.validators.json")),
    )
}

/// A fetched CRL source's kept copy as read, and which file it was read from.
pub struct KeptCopy {
    pub url: String,
    pub bytes: Vec<u8>,
    pub stamp: KeptStamp,
}

/// Identifies one version of a kept file: a download is written to a new file renamed over
/// the old one, so a new download always has another inode. Read from the file handle the
/// copy was read through, so stamp and bytes cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptStamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl KeptStamp {
    fn of(meta: &std::fs::Metadata) -> KeptStamp {
        use std::os::unix::fs::MetadataExt;
        KeptStamp {
            inode: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// The kept copy of a fetched CRL source; none before its first download.
pub fn kept(dir: &Path, url: &str) -> Result<Option<KeptCopy>, pem::PemError> {
    use std::io::Read;
    let (path, _) = kept_paths(dir, url);
    let read = || -> std::io::Result<KeptCopy> {
        let mut file = std::fs::File::open(&path)?;
        let stamp = KeptStamp::of(&file.metadata()?);
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(KeptCopy {
            url: url.to_owned(),
            bytes,
            stamp,
        })
    };
    match read() {
        Ok(copy) => Ok(Some(copy)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(pem::PemError::Read { path, source }),
    }
}

/// The stamp of the kept copy of `url` now (`None`: there is none).
pub fn kept_stamp(dir: &Path, url: &str) -> Option<KeptStamp> {
    let (path, _) = kept_paths(dir, url);
    std::fs::metadata(path)
        .ok()
        .map(|meta| KeptStamp::of(&meta))
}

/// The issuer Name of a DER CRL, read without parsing the rest (its entries may be millions
/// of an unverified download): contents of the Name SEQUENCE, as webpki compares names.
pub(crate) fn issuer_of(crl_der: &[u8]) -> Option<&[u8]> {
    // CertificateList ::= SEQUENCE { tbsCertList SEQUENCE { version INTEGER OPTIONAL,
    //   signature AlgorithmIdentifier, issuer Name, ... }, ... }
    let (list, _) = der::element(crl_der, der::SEQUENCE)?;
    let (tbs, _) = der::element(list, der::SEQUENCE)?;
    let tbs = der::element(tbs, der::INTEGER).map_or(tbs, |(_, rest)| rest);
    let (_, rest) = der::element(tbs, der::SEQUENCE)?;
    der::element(rest, der::SEQUENCE).map(|(name, _)| name)
}

/// The contents of a DER Name (what is inside its SEQUENCE), the form webpki compares.
pub(crate) fn name_contents(name: &[u8]) -> &[u8] {
    der::element(name, der::SEQUENCE).map_or(name, |(contents, _)| contents)
}

/// Whether `crl_der` is signed by the key of `issuer_spki` (SubjectPublicKeyInfo contents,
/// without the outer SEQUENCE, as webpki keeps keys) with one of `algorithms`, the check
/// webpki makes. webpki does not offer it on its own, so the few DER elements it needs
/// are read here.
pub(crate) fn crl_signed_by(
    crl_der: &[u8],
    issuer_spki: &[u8],
    algorithms: &[&dyn SignatureVerificationAlgorithm],
) -> bool {
    let check = || -> Option<bool> {
        // CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm, signatureValue }
        let (list, _) = der::element(crl_der, der::SEQUENCE)?;
        let (_, tbs, rest) = der::element_with_header(list, der::SEQUENCE)?;
        let (algorithm, rest) = der::element(rest, der::SEQUENCE)?;
        let (signature, _) = der::element(rest, der::BIT_STRING)?;
        // SubjectPublicKeyInfo ::= SEQUENCE { algorithm, subjectPublicKey BIT STRING }
        let (key_algorithm, rest) = der::element(issuer_spki, der::SEQUENCE)?;
        let (key, _) = der::element(rest, der::BIT_STRING)?;
        // Bit strings here have no unused bits.
        let (signature, key) = (signature.strip_prefix(&[0])?, key.strip_prefix(&[0])?);
        Some(
            algorithms
                .iter()
                .filter(|a| {
                    a.signature_alg_id().as_ref() == algorithm
                        && a.public_key_alg_id().as_ref() == key_algorithm
                })
                .any(|a| a.verify_signature(key, tbs, signature).is_ok()),
        )
    };
    check().unwrap_or(false)
}

/// The contents of a DER SubjectPublicKeyInfo (what is inside its SEQUENCE).
pub(crate) fn spki_contents(spki: &[u8]) -> Option<&[u8]> {
    der::element(spki, der::SEQUENCE).map(|(contents, _)| contents)
}

/// The serial numbers a CRL revokes (INTEGER contents as encoded, as webpki compares them),
/// grouped by length, each group sorted in one buffer: no allocation and no pointer per
/// entry (a million 17-byte serials take 17 MB). A big group also has an index that
/// divides the range of its serials (past their common prefix) into equal buckets, so a
/// lookup reads the index and a few neighbouring entries instead of a binary search's
/// scattered cache lines.
#[derive(Default)]
struct RevokedSerials {
    groups: Vec<SerialGroup>,
}

struct SerialGroup {
    width: usize,
    /// The serials of this length back to back, sorted.
    bytes: Vec<u8>,
    /// Leading bytes every serial of the group shares.
    prefix: usize,
    /// `index[k]..index[k + 1]`: the entries whose key ([`SerialGroup::key`]) is `k`
    /// (empty for small groups).
    index: Vec<u32>,
    /// The first entry's [`window`], and how far the last one's is from it: the range the
    /// buckets divide, so that a counter's serials spread over them as random ones do.
    first_window: u64,
    span: u64,
    /// A bucket covers `1 << shift` windows.
    shift: u32,
}

/// Groups smaller than this are searched without an index (it would outweigh them).
const INDEXED_GROUP: usize = 4096;

/// Entries an index bucket holds at least, on average: the index costs at most half a
/// byte per entry (a fixed 16-bit index was 26 B per entry at 10,000), and a lookup reads
/// one or two cache lines of the table. At 65,536 buckets (a million entries) the index
/// stops growing: at 256 KiB it still fits in L2, where a bigger one missed the cache.
const ENTRIES_PER_BUCKET: usize = 8;

impl RevokedSerials {
    fn new(mut serials: Vec<&[u8]>) -> RevokedSerials {
        serials.sort_unstable_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
        serials.dedup();
        let groups = serials
            .chunk_by(|a, b| a.len() == b.len())
            .map(SerialGroup::new)
            .collect();
        RevokedSerials { groups }
    }

    fn contains(&self, serial: &[u8]) -> bool {
        self.groups
            .iter()
            .find(|group| group.width == serial.len())
            .is_some_and(|group| group.contains(serial))
    }
}

impl SerialGroup {
    /// `serials`: sorted, distinct, all of one length.
    fn new(serials: &[&[u8]]) -> SerialGroup {
        let width = serials.first().map_or(0, |serial| serial.len());
        let mut bytes = Vec::with_capacity(width * serials.len());
        serials
            .iter()
            .for_each(|serial| bytes.extend_from_slice(serial));
        let prefix = match (serials.first(), serials.last()) {
            (Some(first), Some(last)) => {
                first.iter().zip(*last).take_while(|(a, b)| a == b).count()
            }
            _ => 0,
        };
        let (first_window, last_window) = match (serials.first(), serials.last()) {
            (Some(first), Some(last)) => (window(first, prefix), window(last, prefix)),
            _ => (0, 0),
        };
        let mut group = SerialGroup {
            width,
            bytes,
            prefix,
            index: Vec::new(),
            first_window,
            span: last_window.saturating_sub(first_window),
            shift: 0,
        };
        if serials.len() >= INDEXED_GROUP && serials.len() < u32::MAX as usize {
            let bits = (serials.len() / ENTRIES_PER_BUCKET).ilog2().min(16);
            let span_bits = u64::BITS - group.span.leading_zeros();
            group.shift = span_bits.saturating_sub(bits);
            let buckets = (group.span >> group.shift) as usize + 1;
            let mut index = vec![0u32; buckets + 1];
            // index[k] = number of entries whose key is below k.
            for serial in serials {
                if let Some(key) = group.key(serial) {
                    index[key + 1] += 1;
                }
            }
            for k in 1..index.len() {
                index[k] += index[k - 1];
            }
            group.index = index;
        }
        group
    }

    /// The index's key: the bucket of the serial's window within the group's range, so
    /// keys rise with the sorted serials. `None`: a window outside the range, which no
    /// entry has.
    fn key(&self, serial: &[u8]) -> Option<usize> {
        let offset = window(serial, self.prefix).checked_sub(self.first_window)?;
        (offset <= self.span).then_some((offset >> self.shift) as usize)
    }

    fn contains(&self, serial: &[u8]) -> bool {
        // An empty serial (which webpki does not accept) would be a group of width 0.
        let Some(count) = self.bytes.len().checked_div(self.width) else {
            return true;
        };
        let (mut low, mut high) = (0, count);
        if !self.index.is_empty() {
            if serial.get(..self.prefix) != self.bytes.get(..self.prefix) {
                return false;
            }
            let Some(key) = self.key(serial) else {
                return false;
            };
            match (self.index.get(key), self.index.get(key + 1)) {
                (Some(&start), Some(&end)) => (low, high) = (start as usize, end as usize),
                _ => return false,
            }
        }
        let width = self.width;
        while low < high {
            let middle = low + (high - low) / 2;
            match self.bytes[middle * width..(middle + 1) * width].cmp(serial) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }
}

/// The 64 bits of `serial` after its first `prefix` bytes (zero-padded past the end).
fn window(serial: &[u8], prefix: usize) -> u64 {
    let mut window = [0; 8];
    for (to, from) in window
        .iter_mut()
        .zip(serial.get(prefix..).unwrap_or_default())
    {
        *to = *from;
    }
    u64::from_be_bytes(window)
}

/// The CRL `der` without its revokedCertificates (the third SEQUENCE of tbsCertList, after
/// signature and issuer), for a parser that would otherwise build a structure per entry.
/// The signature no longer matches; only the other fields are read from it.
fn without_entries(crl_der: &[u8]) -> Option<Vec<u8>> {
    let (list, _) = der::element(crl_der, der::SEQUENCE)?;
    let (mut tbs, _, after_tbs) = der::element_with_header(list, der::SEQUENCE)?;
    let mut kept_tbs = Vec::new();
    let mut sequences = 0;
    while let Some(&tag) = tbs.first() {
        let (_, whole, rest) = der::element_with_header(tbs, tag)?;
        if tag == der::SEQUENCE {
            sequences += 1;
        }
        if !(tag == der::SEQUENCE && sequences == 3) {
            kept_tbs.extend_from_slice(whole);
        }
        tbs = rest;
    }
    let mut list = der::tlv(der::SEQUENCE, &kept_tbs);
    list.extend_from_slice(after_tbs);
    Some(der::tlv(der::SEQUENCE, &list))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    #[test]
    fn crl_numbers_order_as_numbers_of_any_size() {
        use std::cmp::Ordering::*;
        assert_eq!(super::number_order("9", "10"), Less);
        assert_eq!(super::number_order("10", "9"), Greater);
        assert_eq!(super::number_order("123", "123"), Equal);
        assert_eq!(super::number_order("124", "123"), Greater);
        // Past u64: a forger's 10^20 is still ordered.
        assert_eq!(
            super::number_order("100000000000000000000", "18446744073709551615"),
            Greater
        );
    }

    use super::{RevokedSerials, ENTRIES_PER_BUCKET};

    /// Every index size, from the smallest indexed group to past the 65,536-bucket cap,
    /// for random serials, a counter's, and a counter's crossing a power of two: members
    /// and their neighbours answer as a set, and no bucket holds much more than its share.
    #[test]
    fn groups_of_every_index_size_answer_and_spread_over_their_buckets() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for count in [4096u64, 8191, 8192, 100_000, 600_000] {
            for start in [None, Some(1_000_000), Some((1 << 32) - count / 2)] {
                let values: BTreeSet<u64> = (0..count)
                    .map(|i| start.map_or_else(&mut random, |start| start + i))
                    .collect();
                let serials: Vec<[u8; 8]> = values.iter().map(|v| v.to_be_bytes()).collect();
                let table = RevokedSerials::new(serials.iter().map(|s| &s[..]).collect());
                let [group] = &table.groups[..] else {
                    panic!("one width, one group")
                };
                let sizes: Vec<u32> = group.index.windows(2).map(|w| w[1] - w[0]).collect();
                let largest = sizes.iter().max().copied().unwrap_or(0);
                assert!(
                    largest <= 8 * ENTRIES_PER_BUCKET as u32 && sizes.len() >= values.len() / 32,
                    "{count} from {start:?}: a bucket of {largest}, {} buckets",
                    sizes.len()
                );
                assert!(group.index.len() * 4 <= values.len() / 2 + 8, "{count}");
                for value in &values {
                    for probe in [value.wrapping_sub(1), *value, value.wrapping_add(1)] {
                        assert_eq!(
                            table.contains(&probe.to_be_bytes()),
                            values.contains(&probe),
                            "{probe:#x} in {count} from {start:?}"
                        );
                    }
                }
            }
        }
    }

    proptest! {
        /// The table answers as a set of the serials would (webpki's map, by key).
        #[test]
        fn revoked_serials_answer_as_a_set(
            revoked in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..4), 0..200),
            probes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..4), 0..200),
        ) {
            let table = RevokedSerials::new(revoked.iter().map(Vec::as_slice).collect());
            let set: BTreeSet<&[u8]> = revoked.iter().map(Vec::as_slice).collect();
            for serial in revoked.iter().chain(&probes) {
                prop_assert_eq!(table.contains(serial), set.contains(serial.as_slice()));
            }
        }

        /// The same with a group big enough to be indexed, whose serials share leading
        /// bytes (`lead`, and more when `shift` narrows their spread).
        #[test]
        fn indexed_groups_answer_as_a_set(
            seeds in proptest::collection::vec(any::<u32>(), 5000..6000),
            probes in proptest::collection::vec(any::<u32>(), 0..500),
            lead in any::<u8>(),
            shift in 0u32..16,
        ) {
            let encode = |seed: &u32| {
                let mut serial = vec![lead];
                serial.extend_from_slice(&(seed >> shift).to_be_bytes());
                serial
            };
            let revoked: Vec<Vec<u8>> = seeds.iter().map(encode).collect();
            let table = RevokedSerials::new(revoked.iter().map(Vec::as_slice).collect());
            prop_assert!(table.groups.iter().any(|group| !group.index.is_empty()));
            // The index is sized to its group: at most half a byte per entry.
            for group in &table.groups {
                prop_assert!(group.index.len() * 4 <= group.bytes.len() / group.width.max(1) / 2 + 4);
            }
            let set: BTreeSet<&[u8]> = revoked.iter().map(Vec::as_slice).collect();
            let others = probes
                .iter()
                .map(encode)
                .chain(probes.iter().map(|p| p.to_be_bytes().to_vec()))
                .chain(probes.iter().map(|p| [&[!lead][..], &p.to_be_bytes()].concat()));
            for serial in revoked.iter().cloned().chain(others) {
                prop_assert_eq!(table.contains(&serial), set.contains(serial.as_slice()));
            }
        }
    }
}
