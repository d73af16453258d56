//! The broker's own ID token: its claims and their signing.
//!
//! Every flow starts from this token (Google flows exchange it at STS), so the claims are
//! built in one place. They must pass Google STS's checks: `kid` present, ES256/RS256,
//! `iat` not in the future, `exp - iat` well under 48h, `aud` allowed, `iss` exact.

use std::time::Instant;

use serde_json::{json, Map, Value};

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

/// The claims of a token issued at `now` (Unix seconds) by `flow`.
pub fn id_token_claims(
    issuer: &str,
    who: &Subject<'_>,
    flow: &str,
    now: i64,
    jti: &str,
) -> Map<String, Value> {
    let id = who.identity;
    let mut claims = who.rule.claims.clone();
    let ours = json!({
        "iss": issuer,
        "sub": who.subject,
        "aud": who.audience,
        "iat": now,
        "nbf": now,
        "exp": now + who.rule.ttl.as_secs() as i64,
        "jti": jti,
        "client_id": who.rule.client_id,
        "amr": [flow],
        "cnf": { "x5t#S256": id.x5t_s256 },
        "client": {
            "x5_spiffe": id.spiffe_id.clone().unwrap_or_default(),
            "x5_dnssan": id.dns_sans.join(","),
            "x5_urisan": id.uri_sans.join(","),
            "x5_sha256": id.sha256_hex,
            "x5_serial": id.serial,
        },
    });
    if let Value::Object(ours) = ours {
        claims.extend(ours);
    }
    claims
}

/// A signed broker ID token.
pub struct IdToken {
    pub jwt: String,
    pub jti: String,
    pub expires_at: i64,
}

/// Builds, signs and times one ID token.
pub async fn issue(
    signer: &dyn Signer,
    metrics: &Metrics,
    issuer: &str,
    who: &Subject<'_>,
    flow: &str,
    now: i64,
) -> Result<IdToken, SignerError> {
    let jti = uuid::Uuid::new_v4().simple().to_string();
    let claims = id_token_claims(issuer, who, flow, now, &jti);
    let started = Instant::now();
    let jwt = signer.sign(&claims).await;
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
