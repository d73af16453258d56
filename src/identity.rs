//! What a client certificate says about its holder.
//!
//! Parsed once per request from the leaf (x509-parser). The identity carries the facts
//! rules match on and tokens carry; it is only trusted after [`crate::trust`] accepted the
//! chain it came from.

use std::net::IpAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::objects::{oid2abbrev, oid_registry};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::X509Name;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Identity {
    /// Subject distinguished name as RFC 4514 text (most specific first, special
    /// characters escaped), as `openssl x509 -noout -subject -nameopt RFC2253` prints it.
    pub subject: String,
    pub common_name: Option<String>,
    pub issuer: String,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    pub email_sans: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    /// The certificate's one `spiffe://` URI SAN, if it has exactly one.
    pub spiffe_id: Option<String>,
    /// Serial number, lowercase hex without separators or DER sign padding.
    pub serial: String,
    /// SHA-256 of the DER certificate; serialized as `sha256_hex` and `x5t_s256`.
    #[serde(flatten)]
    pub sha256: CertDigest,
    pub not_before: i64,
    pub not_after: i64,
    #[serde(skip)]
    pub(crate) key: KeyInfo,
    #[serde(skip)]
    pub(crate) has_eku: bool,
}

/// SHA-256 of a DER certificate. Held as bytes, its text forms made when asked, because the
/// verified-chain cache keeps an identity per device: 32 bytes instead of about 180.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertDigest(pub [u8; 32]);

impl CertDigest {
    /// Lowercase hex: what rules match on and logs show.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// Base64url without padding: the `x5t#S256` confirmation (RFC 8705).
    pub fn x5t_s256(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }
}

impl Serialize for CertDigest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("sha256_hex", &self.hex())?;
        map.serialize_entry("x5t_s256", &self.x5t_s256())?;
        map.end()
    }
}

/// The leaf's public key, as far as policy needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyInfo {
    Rsa { bits: usize },
    EcP256,
    EcP384,
    Ed25519,
    Other,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("certificate has {0} spiffe:// URI SANs; an X.509-SVID has exactly one")]
    AmbiguousSpiffeId(usize),
    #[error("invalid SPIFFE ID {0:?}: {1}")]
    BadSpiffeId(String, &'static str),
    #[error("invalid {0} SAN {1:?}")]
    BadSan(&'static str, String),
    #[error("the subjectAltName extension is empty; RFC 5280 requires at least one name in it")]
    EmptySan,
}

impl Identity {
    pub fn from_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let malformed = |e: &dyn std::fmt::Display| IdentityError::Malformed(e.to_string());
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| malformed(&e))?;
        if !rest.is_empty() {
            return Err(IdentityError::Malformed(
                "trailing data after certificate".into(),
            ));
        }

        let mut identity = Identity {
            subject: rfc4514(cert.subject())?,
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            issuer: rfc4514(cert.issuer())?,
            dns_sans: Vec::new(),
            uri_sans: Vec::new(),
            email_sans: Vec::new(),
            ip_sans: Vec::new(),
            spiffe_id: None,
            serial: serial_hex(cert.raw_serial()),
            sha256: CertDigest(Sha256::digest(der).into()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            key: key_info(&cert),
            has_eku: cert
                .extended_key_usage()
                .map_err(|e| malformed(&e))?
                .is_some(),
        };

        if let Some(san) = cert.subject_alternative_name().map_err(|e| malformed(&e))? {
            // RFC 5280 4.2.1.6: "the sequence MUST contain at least one entry".
            if san.value.general_names.is_empty() {
                return Err(IdentityError::EmptySan);
            }
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => identity.dns_sans.push(checked_dns(n)?),
                    GeneralName::URI(u) => identity.uri_sans.push(checked_uri(u)?),
                    GeneralName::RFC822Name(e) => identity.email_sans.push(checked_email(e)?),
                    GeneralName::IPAddress(bytes) => identity.ip_sans.push(
                        ip_from_bytes(bytes)
                            .ok_or_else(|| IdentityError::BadSan("IP", hex(bytes)))?,
                    ),
                    _ => {}
                }
            }
        }

        let spiffe: Vec<&String> = identity
            .uri_sans
            .iter()
            .filter(|u| u.to_ascii_lowercase().starts_with("spiffe://"))
            .collect();
        match spiffe.as_slice() {
            [] => {}
            [one] => identity.spiffe_id = Some(checked_spiffe_id(one)?),
            many => return Err(IdentityError::AmbiguousSpiffeId(many.len())),
        }

        Ok(identity)
    }

    pub fn is_self_issued(&self) -> bool {
        self.subject == self.issuer
    }
}

/// RFC 4514 text of a name: RDNs most specific first, `+` within an RDN, values escaped
/// so that no value can impersonate a separator (rules match on this text). The one
/// spelling of a distinguished name the broker prints or reads (`check-config`, warnings,
/// refusals, `verify-cert`, `match.subject`/`match.issuer`).
pub fn dn_text(name: &X509Name<'_>) -> String {
    rfc4514(name).unwrap_or_else(|_| name.to_string())
}

fn rfc4514(name: &X509Name<'_>) -> Result<String, IdentityError> {
    let mut rdns = Vec::new();
    for rdn in name.iter() {
        let mut parts = Vec::new();
        for atv in rdn.iter() {
            let oid = atv.attr_type();
            let key = oid2abbrev(oid, oid_registry())
                .map(str::to_owned)
                .unwrap_or_else(|_| oid.to_id_string());
            let value = match atv.as_str() {
                Ok(text) => escape_dn_value(text),
                Err(_) => format!("#{}", hex(atv.as_slice())),
            };
            parts.push(format!("{key}={value}"));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

fn escape_dn_value(value: &str) -> String {
    let last = value.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        match c {
            '\0' => out.push_str("\\00"),
            c if special => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// A DNS SAN: non-empty labels of letters, digits, `-`, `_`, an optional leading `*` label.
fn checked_dns(name: &str) -> Result<String, IdentityError> {
    let labels: Vec<&str> = name.split('.').collect();
    let ok = name.len() <= 253
        && labels.iter().enumerate().all(|(i, label)| {
            (i == 0 && *label == "*")
                || (!label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        });
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(IdentityError::BadSan(
            "DNS",
            name.chars().take(100).collect(),
        ))
    }
}

/// A URI SAN: RFC 5280 4.2.1.6 wants an absolute URI (a scheme and a scheme-specific
/// part) in RFC 3986 syntax, so printable ASCII without spaces or the characters RFC 3986
/// excludes, that `url` parses without a base. Rules match on this text, so text that is
/// no URI is refused rather than matched.
fn checked_uri(uri: &str) -> Result<String, IdentityError> {
    let bad = || IdentityError::BadSan("URI", uri.chars().take(100).collect());
    let printable = uri
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b));
    let parsed = url::Url::parse(uri).map_err(|_| bad())?;
    if !printable || uri.len() <= parsed.scheme().len() + 1 {
        return Err(bad());
    }
    Ok(uri.to_owned())
}

/// An email SAN: exactly one `@`, a non-empty local part and a valid domain (a mailbox,
/// so no wildcard label: `*` is only meaningful in DNS SANs).
fn checked_email(address: &str) -> Result<String, IdentityError> {
    let bad = || IdentityError::BadSan("email", address.chars().take(100).collect());
    let (local, domain) = address.split_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.contains('@')
        || local.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad());
    }
    if domain.starts_with('*') {
        return Err(bad());
    }
    let domain = checked_dns(domain).map_err(|_| bad())?;
    Ok(format!("{local}@{domain}"))
}

/// A SPIFFE ID as the SPIFFE-ID spec defines it: lowercase `spiffe://` scheme and trust
/// domain, no port, user info, query or fragment, path segments neither empty nor dots.
fn checked_spiffe_id(id: &str) -> Result<String, IdentityError> {
    let bad = |why| IdentityError::BadSpiffeId(id.chars().take(100).collect(), why);
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| bad("scheme must be lowercase spiffe://"))?;
    if id.len() > 2048 {
        return Err(bad("longer than 2048 bytes"));
    }
    let (trust_domain, path) = match rest.split_once('/') {
        Some((trust_domain, path)) => (trust_domain, Some(path)),
        None => (rest, None),
    };
    if trust_domain.is_empty()
        || !trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err(bad(
            "trust domain must be lowercase letters, digits, '-', '.', '_'",
        ));
    }
    // A `/` after the trust domain starts a path, so `spiffe://td/` has an empty segment
    // (a trailing slash, which the spec forbids).
    for segment in path.into_iter().flat_map(|p| p.split('/')) {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(bad("path segments must not be empty, '.' or '..'"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(bad("path segments must be letters, digits, '-', '.', '_'"));
        }
    }
    Ok(id.to_owned())
}

fn key_info(cert: &X509Certificate<'_>) -> KeyInfo {
    let spki = cert.public_key();
    let alg = &spki.algorithm;
    if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
        return match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => KeyInfo::Rsa {
                bits: bit_length(rsa.modulus),
            },
            _ => KeyInfo::Other,
        };
    }
    if alg.algorithm == OID_SIG_ED25519 {
        return KeyInfo::Ed25519;
    }
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => KeyInfo::EcP256,
            Some(c) if c == OID_NIST_EC_P384 => KeyInfo::EcP384,
            _ => KeyInfo::Other,
        };
    }
    KeyInfo::Other
}

/// Bit length of a big-endian unsigned integer (x509-parser's own helper assumes a
/// leading zero byte, which not every encoder writes).
fn bit_length(be: &[u8]) -> usize {
    let digits: &[u8] = match be.iter().position(|b| *b != 0) {
        Some(i) => &be[i..],
        None => return 0,
    };
    digits.len() * 8 - digits[0].leading_zeros() as usize
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// A serial number as CAs print it: hex of its bytes without DER's leading zero bytes
/// (the sign padding), as `openssl x509 -serial` shows it.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex(&raw[start..])
}

/// Lowercase hex. A table lookup, not `write!` per byte: the certificate digest is written
/// out twice per token (its claim and the audit line).
pub(crate) fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_length_ignores_leading_zero_bytes() {
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01, 0x00]), 9);
        assert_eq!(bit_length(&[0, 0]), 0);
    }

    #[test]
    fn dn_values_cannot_fake_separators() {
        assert_eq!(escape_dn_value("x, O=Example Corp"), "x\\, O=Example Corp");
        assert_eq!(escape_dn_value(" #a+b "), "\\ #a\\+b\\ ");
        assert_eq!(escape_dn_value("plain"), "plain");
    }

    #[test]
    fn san_and_spiffe_syntax() {
        assert_eq!(
            checked_dns("Dev-1.Example.com").unwrap(),
            "dev-1.example.com"
        );
        assert!(checked_dns("*.example.com").is_ok());
        for bad in ["", ".example.com", "a..b", "a.*.b", "a b.com", "a/b.com"] {
            assert!(checked_dns(bad).is_err(), "{bad}");
        }
        assert!(checked_email("a.b@Example.com").is_ok());
        for bad in [
            "a@evil.com@example.com",
            "@example.com",
            "a@",
            "nope",
            "a@*.example.com",
        ] {
            assert!(checked_email(bad).is_err(), "{bad}");
        }
        assert!(checked_uri("spiffe://example.org/device/d-1").is_ok());
        assert!(checked_uri("urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66").is_ok());
        assert!(checked_uri("https://example.com/a%20b?x=1#f").is_ok());
        for bad in [
            "",
            "not a uri",
            "relative/path",
            "a:",
            "https://example.com/a b",
        ] {
            assert!(checked_uri(bad).is_err(), "{bad}");
        }
        assert!(checked_spiffe_id("spiffe://example.org/device/d-1").is_ok());
        assert!(checked_spiffe_id("spiffe://example.org").is_ok());
        for bad in [
            "SPIFFE://example.org/a",
            "spiffe://Example.org/a",
            "spiffe://example.org:8443/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/",
            // Found by fuzz/ identity_structured: a trust domain with a trailing slash.
            "spiffe://example.org/",
            "spiffe://example.org/a?x",
            "spiffe://evil.com#.example.org/a",
            "spiffe:///a",
        ] {
            assert!(checked_spiffe_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serials_print_like_cas_print_them() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x0a, 0x01]), "0a01");
        assert_eq!(serial_hex(&[0x00]), "00");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for input in [&b""[..], b"\x30", b"\x30\x82\xff\xff", b"not a cert"] {
            assert!(matches!(
                Identity::from_der(input),
                Err(IdentityError::Malformed(_))
            ));
        }
    }
}
