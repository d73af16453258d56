//! Pins of CA public keys (`server.client_ca_pins`).

use serde::{Deserialize, Deserializer, Serialize};

/// A public-key pin: the SHA-256 of a DER SubjectPublicKeyInfo, written
/// `sha256/<base64>` (the HPKP and `curl --pinnedpubkey` format), so that the usual
/// `openssl ... | openssl dgst -sha256 -binary | base64` output can be pasted as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpkiPin(pub [u8; 32]);

impl SpkiPin {
    const PREFIX: &'static str = "sha256/";

    /// The pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> SpkiPin {
        use sha2::Digest;
        SpkiPin(sha2::Sha256::digest(spki_der).into())
    }
}

impl std::fmt::Display for SpkiPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.0);
        write!(f, "{}{b64}", Self::PREFIX)
    }
}

impl std::str::FromStr for SpkiPin {
    type Err = String;

    fn from_str(text: &str) -> Result<SpkiPin, String> {
        use base64::Engine;
        let invalid = |why: &str| {
            format!(
                "invalid pin {text:?}: {why}; expected \"sha256/\" and the base64 of the SHA-256 of \
                 the CA's DER public key (see config.toml for the openssl command)"
            )
        };
        let b64 = text
            .strip_prefix(Self::PREFIX)
            .ok_or_else(|| invalid("only sha256 pins are supported"))?;
        // Standard alphabet with padding only: the one encoding `base64` prints.
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| invalid(&format!("bad base64 ({e})")))?;
        let digest = <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| invalid(&format!("{} bytes, a SHA-256 digest has 32", bytes.len())))?;
        Ok(SpkiPin(digest))
    }
}

impl Serialize for SpkiPin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpkiPin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SpkiPin, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
