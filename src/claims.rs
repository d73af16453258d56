//! The broker's own ID token: its claims and their signing.
//!
//! Every flow starts from this token (Google flows exchange it at STS), so the claims are
//! built in one place. They must pass Google STS's checks: `kid` present, ES256/RS256,
//! `iat` not in the future, `exp - iat` well under 48h, `aud` allowed, `iss` exact.

use std::time::Instant;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::clients::ClientRule;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::signer::{Signer, SignerError};

/// Who the token is for and about; everything claims depend on besides the clock.
pub struct Subject<'a> {
    pub identity: &'a Identity,
    pub rule: &'a ClientRule,
    /// `sub`, already rendered and length-checked by the rule.
    pub subject: &'a str,
    pub audience: &'a str,
}

/// The claims of a token issued at `now` (Unix seconds) by `flow`, serialized straight
/// into the JWT payload (no intermediate JSON tree: this is on every token's path).
#[derive(Serialize)]
pub struct IdTokenClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
    jti: &'a str,
    client_id: &'a str,
    amr: [&'a str; 1],
    cnf: Confirmation,
    client: CertificateClaims<'a>,
    /// The rule's static claims. Config loading refuses names the broker sets, so a key
    /// never appears twice.
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

/// RFC 8705 certificate binding.
#[derive(Serialize)]
struct Confirmation {
    #[serde(rename = "x5t#S256")]
    x5t_s256: String,
}

/// The certificate fields Google's Token Service attribute mappings read (`client.x5_*`).
#[derive(Serialize)]
struct CertificateClaims<'a> {
    x5_spiffe: &'a str,
    x5_dnssan: String,
    x5_urisan: String,
    x5_sha256: String,
    x5_serial: &'a str,
}

pub fn id_token_claims<'a>(
    issuer: &'a str,
    who: &'a Subject<'a>,
    flow: &'a str,
    now: i64,
    jti: &'a str,
) -> IdTokenClaims<'a> {
    let id = who.identity;
    IdTokenClaims {
        iss: issuer,
        sub: who.subject,
        aud: who.audience,
        iat: now,
        nbf: now,
        exp: now + who.rule.ttl.as_secs() as i64,
        jti,
        client_id: &who.rule.client_id,
        amr: [flow],
        cnf: Confirmation {
            x5t_s256: id.sha256.x5t_s256(),
        },
        client: CertificateClaims {
            x5_spiffe: id.spiffe_id.as_deref().unwrap_or_default(),
            x5_dnssan: id.dns_sans.join(","),
            x5_urisan: id.uri_sans.join(","),
            x5_sha256: id.sha256.hex(),
            x5_serial: &id.serial,
        },
        extra: &who.rule.claims,
    }
}

/// A signed broker ID token.
pub struct IdToken {
    pub jwt: String,
    pub jti: String,
    pub expires_at: i64,
}

/// Builds, signs and times one ID token.
pub async fn sign_id_token(
    signer: &dyn Signer,
    metrics: &Metrics,
    issuer: &str,
    who: &Subject<'_>,
    flow: &str,
    now: i64,
) -> Result<IdToken, SignerError> {
    let jti = crate::crypto::random_uuid().simple().to_string();
    let payload = serde_json::to_string(&id_token_claims(issuer, who, flow, now, &jti))
        .map_err(|e| SignerError::Sign(e.to_string()))?;
    let started = Instant::now();
    let jwt = signer.sign(&payload).await;
    metrics
        .signer_duration
        .with_label_values(&[signer.kind()])
        .observe(started.elapsed().as_secs_f64());
    Ok(IdToken {
        jwt: jwt?,
        jti,
        expires_at: now + who.rule.ttl.as_secs() as i64,
    })
}
