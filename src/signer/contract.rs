//! What every signer provides: signing, and the keys that verify what it signed.

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SignerError {
    #[error("{0}")]
    Key(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error(transparent)]
    Upstream(#[from] crate::google::UpstreamError),
}

#[async_trait]
pub trait Signer: Send + Sync {
    /// Label for metrics (`signer_duration_seconds{kind}`).
    fn kind(&self) -> &'static str;
    /// JWS algorithms tokens may be signed with, for discovery.
    fn algorithms(&self) -> Vec<&'static str>;
    /// The public JWKS document (`{"keys": [...]}`) when the broker holds the keys.
    fn jwks(&self) -> Option<&Value>;
    /// Where verifiers find the keys when they are not the broker's (IAM signer).
    fn jwks_uri(&self) -> Option<&str> {
        None
    }
    /// When the key signing now is due for rotation (Unix time), if the signer knows.
    fn key_expiry(&self) -> Option<i64> {
        None
    }
    /// Whether signing works now, as far as the signer can tell without a long wait, for
    /// `/readyz`; `Err` says what is wrong. A signer holding its keys is ready once loaded.
    async fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
    /// Signs `payload` (a JSON claims set) as a compact JWS with `typ: JWT` and the
    /// signing key's `kid`.
    async fn sign(&self, payload: &str) -> Result<String, SignerError>;
}

/// The public JWK of a key, exactly the members docs/reference/http.md allows, with `kid` set to the
/// RFC 7638 thumbprint. `public` is the key's own JWK (with `kty` and its key members).
pub(crate) fn public_jwk(alg: &str, public: &Map<String, Value>) -> Result<Value, SignerError> {
    let member = |name: &str| -> Result<&str, SignerError> {
        public
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| SignerError::Key(format!("public key lacks JWK member {name:?}")))
    };
    // RFC 7638: the required members only, lexicographic order, no whitespace.
    let (thumbprint_input, mut jwk) = match member("kty")? {
        "EC" => {
            let (crv, x, y) = (member("crv")?, member("x")?, member("y")?);
            (
                format!(r#"{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}"#),
                json!({"kty": "EC", "crv": crv, "x": x, "y": y}),
            )
        }
        "RSA" => {
            let (n, e) = (member("n")?, member("e")?);
            (
                format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#),
                json!({"kty": "RSA", "n": n, "e": e}),
            )
        }
        other => return Err(SignerError::Key(format!("unsupported key type {other:?}"))),
    };
    let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(thumbprint_input.as_bytes()));
    if let Some(obj) = jwk.as_object_mut() {
        obj.insert("alg".into(), alg.into());
        obj.insert("use".into(), "sig".into());
        obj.insert("kid".into(), kid.into());
    }
    Ok(jwk)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 section 3.1's example key and thumbprint.
    #[test]
    fn kid_is_the_rfc7638_thumbprint() {
        let public = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
        });
        let jwk = public_jwk("RS256", public.as_object().unwrap()).unwrap();
        assert_eq!(jwk["kid"], "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "RS256");
    }
}
