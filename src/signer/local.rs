//! Signing with PEM keys from `key_dir` (josekit).
//!
//! Every key in the folder is published in the JWKS; the last one in file-name order signs.
//! Name order (not mtime) decides so that every replica reading the same folder agrees.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use josekit::jwk::KeyPair;
use josekit::jws::{JwsHeader, JwsSigner, ES256, RS256};
use josekit::jwt::{self, JwtPayload};
use serde_json::{json, Map, Value};

use super::{public_jwk, Signer, SignerError};

struct SigningKey {
    alg: &'static str,
    kid: String,
    signer: Box<dyn JwsSigner>,
}

pub struct LocalSigner {
    active: SigningKey,
    jwks: Value,
    algorithms: Vec<&'static str>,
}

impl LocalSigner {
    /// Loads every `*.pem` of `key_dir`; fails if there is none or any is unusable.
    pub fn load(key_dir: &Path) -> Result<LocalSigner, SignerError> {
        let entries = std::fs::read_dir(key_dir).map_err(|e| {
            SignerError::Key(format!("cannot read key_dir {}: {e}", key_dir.display()))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pem") && p.is_file())
            .collect();
        files.sort();

        let (mut published, mut algorithms, mut active) = (Vec::new(), Vec::new(), None);
        for file in &files {
            let pem = std::fs::read(file)
                .map_err(|e| SignerError::Key(format!("cannot read {}: {e}", file.display())))?;
            let (key, jwk) =
                load_key(&pem).map_err(|e| SignerError::Key(format!("{}: {e}", file.display())))?;
            published.push(jwk);
            algorithms.push(key.alg);
            active = Some(key);
        }
        let active = active.ok_or_else(|| {
            SignerError::Key(format!(
                "no signing key (*.pem) in key_dir {}; `token-broker init` creates one",
                key_dir.display()
            ))
        })?;
        algorithms.sort_unstable();
        algorithms.dedup();
        let jwks = json!({ "keys": published });
        Ok(LocalSigner {
            active,
            jwks,
            algorithms,
        })
    }

    /// The `kid` new tokens are signed with.
    pub fn active_kid(&self) -> &str {
        &self.active.kid
    }
}

/// Reads one PEM private key as ES256 (P-256) or RS256 (RSA, 2048 bits or more).
fn load_key(pem: &[u8]) -> Result<(SigningKey, Value), String> {
    if let Ok(pair) = ES256.key_pair_from_pem(pem) {
        let signer = ES256.signer_from_pem(pem).map_err(|e| e.to_string())?;
        return finish("ES256", &pair.to_jwk_public_key(), Box::new(signer));
    }
    if let Ok(pair) = RS256.key_pair_from_pem(pem) {
        if pair.key_len() * 8 < 2048 {
            return Err(format!(
                "RSA key of {} bits; at least 2048 required",
                pair.key_len() * 8
            ));
        }
        let signer = RS256.signer_from_pem(pem).map_err(|e| e.to_string())?;
        return finish("RS256", &pair.to_jwk_public_key(), Box::new(signer));
    }
    Err("not a P-256 EC or RSA private key in PEM (PKCS#8, SEC1 or PKCS#1)".into())
}

fn finish(
    alg: &'static str,
    public: &josekit::jwk::Jwk,
    signer: Box<dyn JwsSigner>,
) -> Result<(SigningKey, Value), String> {
    let jwk = public_jwk(alg, public.as_ref()).map_err(|e| e.to_string())?;
    let kid = jwk["kid"].as_str().unwrap_or_default().to_owned();
    Ok((SigningKey { alg, kid, signer }, jwk))
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

    async fn sign(&self, claims: &Map<String, Value>) -> Result<String, SignerError> {
        let mut header = JwsHeader::new();
        header.set_token_type("JWT");
        header.set_key_id(&self.active.kid);
        let payload =
            JwtPayload::from_map(claims.clone()).map_err(|e| SignerError::Sign(e.to_string()))?;
        jwt::encode_with_signer(&payload, &header, self.active.signer.as_ref())
            .map_err(|e| SignerError::Sign(e.to_string()))
    }
}
