//! Signing with PEM keys from `key_dir`.
//!
//! josekit reads the keys and exports their public JWKs; the signatures themselves are
//! made with aws-lc-rs (the crypto provider rustls already uses): profiling showed
//! josekit's OpenSSL path spending 65 µs per ES256 token, most of it per-signature setup.
//!
//! Every key in the folder is published in the JWKS. A key whose file name ends in a UTC
//! time (`signing-20261201T000000Z.pem`) signs only from that time on, so a new key can be
//! published everywhere before any replica signs with it; undated keys sign at once. Of
//! the keys allowed to sign, the newest (by that time, then by name) does. Names, not
//! mtimes, decide, so every replica reading the same folder agrees.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use josekit::jwk::KeyPair;
use josekit::jws::{ES256, RS256};
use serde_json::{json, Value};

use super::contract::{public_jwk, Signer, SignerError};
use crate::clock::unix_now;

/// A private key ready to sign (aws-lc-rs).
enum KeyMaterial {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

struct SigningKey {
    alg: &'static str,
    key: KeyMaterial,
    /// `base64url({"alg","kid","typ":"JWT"}) + "."`: the same for every token of this key.
    header_prefix: String,
    /// Unix time from which this key signs (0: undated).
    not_before: i64,
    /// When the key was made or its time came (file mtime for undated keys), for rotation alerts.
    since: i64,
}

pub struct LocalSigner {
    /// Sorted by (not_before, file name): the last one allowed now signs.
    keys: Vec<SigningKey>,
    jwks: Value,
    algorithms: Vec<&'static str>,
    rotate_after: i64,
    rng: SystemRandom,
}

impl LocalSigner {
    /// Loads every `*.pem` of `key_dir`; fails if there is none or any is unusable.
    pub fn load(
        key_dir: &Path,
        rotate_after: std::time::Duration,
    ) -> Result<LocalSigner, SignerError> {
        let entries = std::fs::read_dir(key_dir).map_err(|e| {
            SignerError::Key(format!("cannot read key_dir {}: {e}", key_dir.display()))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pem") && p.is_file())
            .collect();
        files.sort();

        let (mut published, mut algorithms, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        for file in &files {
            let pem = crate::pem::read_secret(file).map_err(|e| SignerError::Key(e.to_string()))?;
            let (mut key, jwk) =
                load_key(&pem).map_err(|e| SignerError::Key(format!("{}: {e}", file.display())))?;
            key.not_before = not_before(file)
                .map_err(|e| SignerError::Key(format!("{}: {e}", file.display())))?;
            key.since = match key.not_before {
                0 => modified(file),
                dated => dated,
            };
            published.push(jwk);
            algorithms.push(key.alg);
            keys.push(key);
        }
        // Stable sort: equal times keep file-name order.
        keys.sort_by_key(|k| k.not_before);
        if !keys.iter().any(|k| k.not_before <= unix_now()) {
            return Err(SignerError::Key(format!(
                "no signing key usable now in key_dir {dir} (*.pem, undated or dated in the past); make one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {dir}/signing.pem` (owner-only, as OpenSSL writes it), the same on every replica",
                dir = key_dir.display()
            )));
        }
        algorithms.sort_unstable();
        algorithms.dedup();
        let jwks = json!({ "keys": published });
        Ok(LocalSigner {
            keys,
            jwks,
            algorithms,
            rotate_after: rotate_after.as_secs() as i64,
            rng: SystemRandom::new(),
        })
    }

    /// The key that signs at `now`: the newest whose time has come.
    fn active(&self, now: i64) -> Option<&SigningKey> {
        self.keys.iter().rev().find(|k| k.not_before <= now)
    }
}

/// The UTC time at the end of a key file's name (`...YYYYMMDDTHHMMSSZ.pem`), 0 if undated.
/// A suffix shaped like a time that does not parse is an error, not an undated key: it
/// would otherwise sign at once, before other replicas published it.
fn not_before(file: &Path) -> Result<i64, String> {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let Some(stamp) = stem.len().checked_sub(16).and_then(|i| stem.get(i..)) else {
        return Ok(0);
    };
    let bytes = stamp.as_bytes();
    let looks_dated = bytes[8].eq_ignore_ascii_case(&b'T') && bytes[15].eq_ignore_ascii_case(&b'Z');
    if !looks_dated {
        return Ok(0);
    }
    jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", stamp)
        .ok()
        .and_then(|t| t.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|t| t.timestamp().as_second())
        .ok_or_else(|| format!("{stamp:?} is not a UTC time like 20270101T000000Z"))
}

fn modified(file: &Path) -> i64 {
    std::fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reads one PEM private key as ES256 (P-256) or RS256 (RSA, 2048 bits or more).
fn load_key(pem: &[u8]) -> Result<(SigningKey, Value), String> {
    if let Ok(pair) = ES256.key_pair_from_pem(pem) {
        let key = EcdsaKeyPair::from_private_key_der(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            der(pem)?.secret_der(),
        )
        .map_err(|e| format!("P-256 key: {e}"))?;
        return finish("ES256", &pair.to_jwk_public_key(), KeyMaterial::Es256(key));
    }
    if let Ok(pair) = RS256.key_pair_from_pem(pem) {
        if pair.key_len() * 8 < 2048 {
            return Err(format!(
                "RSA key of {} bits; at least 2048 required",
                pair.key_len() * 8
            ));
        }
        let der = der(pem)?;
        let key = RsaKeyPair::from_pkcs8(der.secret_der())
            .or_else(|_| RsaKeyPair::from_der(der.secret_der()))
            .map_err(|e| format!("RSA key: {e}"))?;
        return finish("RS256", &pair.to_jwk_public_key(), KeyMaterial::Rs256(key));
    }
    Err("not a P-256 EC or RSA private key in PEM (PKCS#8, SEC1 or PKCS#1)".into())
}

/// The DER inside a PEM private key (PKCS#8, SEC1 or PKCS#1).
fn der(pem: &[u8]) -> Result<zeroize::Zeroizing<rustls_pki_types::PrivateKeyDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| format!("PEM: {e}"))
}

fn finish(
    alg: &'static str,
    public: &josekit::jwk::Jwk,
    key: KeyMaterial,
) -> Result<(SigningKey, Value), String> {
    let jwk = public_jwk(alg, public.as_ref()).map_err(|e| e.to_string())?;
    let kid = jwk["kid"].as_str().unwrap_or_default().to_owned();
    let header = json!({ "alg": alg, "kid": kid, "typ": "JWT" });
    Ok((
        SigningKey {
            alg,
            header_prefix: format!("{}.", URL_SAFE_NO_PAD.encode(header.to_string())),
            key,
            not_before: 0,
            since: 0,
        },
        jwk,
    ))
}

impl SigningKey {
    /// The compact JWS of `claims` (RFC 7515 section 7.1).
    fn sign(&self, payload: &str, rng: &SystemRandom) -> Result<String, SignerError> {
        let mut jws = self.header_prefix.clone();
        URL_SAFE_NO_PAD.encode_string(payload, &mut jws);
        let failed = |_| SignerError::Sign(format!("{} signature failed", self.alg));
        let signature = match &self.key {
            KeyMaterial::Es256(key) => key
                .sign(rng, jws.as_bytes())
                .map_err(failed)?
                .as_ref()
                .to_vec(),
            KeyMaterial::Rs256(key) => {
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(&RSA_PKCS1_SHA256, rng, jws.as_bytes(), &mut signature)
                    .map_err(failed)?;
                signature
            }
        };
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut jws);
        Ok(jws)
    }
}

#[async_trait]
impl Signer for LocalSigner {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn algorithms(&self) -> Vec<&'static str> {
        self.algorithms.clone()
    }

    fn jwks(&self) -> Option<&Value> {
        Some(&self.jwks)
    }

    fn key_expiry(&self) -> Option<i64> {
        self.active(unix_now()).map(|k| k.since + self.rotate_after)
    }

    async fn sign(&self, payload: &str) -> Result<String, SignerError> {
        self.active(unix_now())
            .ok_or_else(|| SignerError::Key("no signing key is usable now".into()))?
            .sign(payload, &self.rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dated_key_names() {
        assert_eq!(
            not_before(Path::new("k/signing-20261201T000000Z.pem")),
            Ok(1_796_083_200)
        );
        assert_eq!(not_before(Path::new("k/signing-0001.pem")), Ok(0));
        assert_eq!(not_before(Path::new("k/x.pem")), Ok(0));
        assert!(not_before(Path::new("k/signing-20261301T000000Z.pem")).is_err());
        assert!(not_before(Path::new("k/signing-20261201t000000z.pem")).is_err());
    }
}
