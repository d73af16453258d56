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
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Identity {
    /// Subject distinguished name (RFC 4514 style).
    pub subject: String,
    pub common_name: Option<String>,
    pub issuer: String,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    pub email_sans: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    /// The certificate's one `spiffe://` URI SAN, if it has exactly one.
    pub spiffe_id: Option<String>,
    /// Serial number, lowercase hex without separators.
    pub serial: String,
    /// SHA-256 of the DER certificate, lowercase hex (rules match on this).
    pub sha256_hex: String,
    /// SHA-256 of the DER certificate, base64url (`x5t#S256`, RFC 8705).
    pub x5t_s256: String,
    pub not_before: i64,
    pub not_after: i64,
    #[serde(skip)]
    pub(crate) key: KeyInfo,
    #[serde(skip)]
    pub(crate) has_eku: bool,
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
            subject: cert.subject().to_string(),
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            issuer: cert.issuer().to_string(),
            dns_sans: Vec::new(),
            uri_sans: Vec::new(),
            email_sans: Vec::new(),
            ip_sans: Vec::new(),
            spiffe_id: None,
            serial: hex(cert.raw_serial()),
            sha256_hex: String::new(),
            x5t_s256: String::new(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            key: key_info(&cert),
            has_eku: cert
                .extended_key_usage()
                .map_err(|e| malformed(&e))?
                .is_some(),
        };

        if let Some(san) = cert.subject_alternative_name().map_err(|e| malformed(&e))? {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => identity.dns_sans.push((*n).to_owned()),
                    GeneralName::URI(u) => identity.uri_sans.push((*u).to_owned()),
                    GeneralName::RFC822Name(e) => identity.email_sans.push((*e).to_owned()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            identity.ip_sans.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }

        let spiffe: Vec<&String> = identity
            .uri_sans
            .iter()
            .filter(|u| u.to_ascii_lowercase().starts_with("spiffe://"))
            .collect();
        match spiffe.len() {
            0 => {}
            1 => identity.spiffe_id = Some(spiffe[0].clone()),
            n => return Err(IdentityError::AmbiguousSpiffeId(n)),
        }

        let digest = Sha256::digest(der);
        identity.sha256_hex = hex(&digest);
        identity.x5t_s256 = URL_SAFE_NO_PAD.encode(digest);
        Ok(identity)
    }

    /// The default token subject: SPIFFE ID, else first URI SAN, else first DNS SAN,
    /// else the subject DN.
    pub fn default_subject(&self) -> &str {
        self.spiffe_id
            .as_deref()
            .or(self.uri_sans.first().map(String::as_str))
            .or(self.dns_sans.first().map(String::as_str))
            .unwrap_or(&self.subject)
    }

    pub fn is_self_issued(&self) -> bool {
        self.subject == self.issuer
    }
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

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
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
    fn garbage_is_malformed_not_a_panic() {
        for input in [&b""[..], b"\x30", b"\x30\x82\xff\xff", b"not a cert"] {
            assert!(matches!(
                Identity::from_der(input),
                Err(IdentityError::Malformed(_))
            ));
        }
    }
}
