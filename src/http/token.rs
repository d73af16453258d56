//! `POST /token`: form in, token or RFC 6749 error out, one audit line per decision.

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::conn::ConnInfo;
use super::error::TokenError;
use crate::broker::{Broker, Decided};
use crate::clock::unix_now;
use crate::flows::{Minted, TokenRequest};
use crate::redact::echo;
use crate::trust::Refusal;
use sha2::{Digest, Sha256};

/// What the audit line says about a decision; filled in as the request progresses.
#[derive(Default)]
struct Audit {
    /// Names the request in its log lines and in a 5xx answer, which carries no details.
    request_id: String,
    rule: Option<String>,
    subject: Option<String>,
    sha256: Option<String>,
    serial: Option<String>,
    flow: Option<&'static str>,
    audience: Option<String>,
    jti: Option<String>,
    /// The client asked for the AIP-4117 answer shape.
    external_credential: bool,
}

pub(super) async fn handle(
    broker: &Broker,
    conn: &ConnInfo,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let mut audit = Audit {
        request_id: crate::crypto::random_uuid().to_string(),
        ..Audit::default()
    };
    let result = answer(broker, conn, request, &mut audit).await;
    let metrics = &broker.metrics();
    match result {
        Ok(minted) => {
            let flow = audit.flow.unwrap_or_default();
            let rule = audit.rule.as_deref().unwrap_or_default();
            metrics.tokens_issued.with_label_values(&[flow, rule]).inc();
            metrics.token_requests.with_label_values(&["200", ""]).inc();
            log_decision(conn, &audit, "issued", None);
            success(&minted, audit.external_credential)
        }
        Err(error) => {
            if let TokenError::Refused(refusal) = &error {
                metrics
                    .cert_rejections
                    .with_label_values(&[refusal.reason()])
                    .inc();
            }
            let status = error.status();
            metrics
                .token_requests
                .with_label_values(&[status.as_str(), error.code()])
                .inc();
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::error!(peer = %conn.peer, request_id = %audit.request_id, error = %error, "token request failed");
            } else if status.is_server_error() {
                tracing::warn!(peer = %conn.peer, request_id = %audit.request_id, error = %error, "token request failed upstream");
            }
            let reason = match &error {
                TokenError::Refused(refusal) => refusal.reason(),
                other => other.code(),
            };
            log_decision(conn, &audit, "refused", Some(reason));
            let mut response = error.into_response(audit.external_credential, &audit.request_id);
            if status == StatusCode::UNAUTHORIZED {
                // A refused client gains nothing from keeping the connection; closing it
                // makes every retry pay for a new handshake.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            response
        }
    }
}

fn log_decision(conn: &ConnInfo, audit: &Audit, result: &str, reason: Option<&str>) {
    tracing::info!(
        target: "audit",
        peer = %conn.peer,
        request_id = %audit.request_id,
        rule = audit.rule.as_deref(),
        subject = audit.subject.as_deref(),
        cert_sha256 = audit.sha256.as_deref(),
        cert_serial = audit.serial.as_deref(),
        flow = audit.flow,
        audience = audit.audience.as_deref(),
        result,
        reason,
        jti = audit.jti.as_deref(),
        "token decision"
    );
}

async fn answer(
    broker: &Broker,
    conn: &ConnInfo,
    request: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Minted, TokenError> {
    let server = &broker.config().server;
    let body = tokio::time::timeout(
        server.request_header_timeout,
        read_form_body(request, server.max_body_bytes),
    )
    .await
    .map_err(|_| TokenError::BodyTimeout(server.request_header_timeout.as_secs()))??;
    let params = parse_form(&body)?;
    audit.external_credential = params.format.as_deref() == Some(EXTERNAL_CREDENTIAL);
    match params.format.as_deref() {
        None => {}
        Some(EXTERNAL_CREDENTIAL) if params.scope.is_some() => {
            return Err(TokenError::InvalidRequest(
                "format=external_credential carries an ID token; it cannot be combined with scope"
                    .into(),
            ))
        }
        Some(EXTERNAL_CREDENTIAL) => {}
        Some(other) => {
            return Err(TokenError::InvalidRequest(format!(
                "format {} is not supported; use external_credential or leave it out",
                echo(other)
            )))
        }
    }
    let Some(leaf) = conn.client_chain.first() else {
        return Err(Refusal::NoCertificate.into());
    };
    let now = unix_now();
    let auth = broker
        .authenticate_parsed(
            &conn.client_chain,
            crate::clock::at_unix(now),
            &conn.client_identity,
        )
        .inspect_err(|_| audit.sha256 = Some(crate::identity::hex(&Sha256::digest(leaf))))?;
    audit.rule = Some(auth.rule.name.clone());
    audit.subject = Some(auth.subject.clone());
    audit.sha256 = Some(auth.identity.sha256.hex());
    audit.serial = Some(auth.identity.serial.clone());

    let mut decided = Decided::default();
    let result = broker.issue(&auth, &params, now, &mut decided).await;
    audit.flow = decided.flow;
    audit.audience = decided.audience;
    let minted = result?;
    audit.jti = Some(minted.jti.clone());
    Ok(minted)
}

async fn read_form_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, TokenError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(TokenError::UnsupportedMediaType(format!(
            "Content-Type must be application/x-www-form-urlencoded, got {}",
            echo(content_type)
        )));
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(TokenError::PayloadTooLarge(limit));
    }
    Limited::new(request.into_body(), limit)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                TokenError::PayloadTooLarge(limit)
            } else {
                TokenError::InvalidRequest("request body could not be read".into())
            }
        })
}

/// Parses the form strictly: UTF-8, each parameter at most once (RFC 6749 3.2), empty
/// values treated as absent, unknown parameters ignored. Public for the fuzz targets.
pub fn parse_form(body: &[u8]) -> Result<TokenRequest, TokenError> {
    if std::str::from_utf8(body).is_err() {
        return Err(TokenError::InvalidRequest(
            "request body is not UTF-8".into(),
        ));
    }
    let mut request = TokenRequest::default();
    let mut grant_type = None;
    let mut seen = Vec::new();
    for (name, value) in form_urlencoded::parse(body) {
        if value.contains(char::REPLACEMENT_CHARACTER) || name.contains(char::REPLACEMENT_CHARACTER)
        {
            return Err(TokenError::InvalidRequest(
                "a parameter is not valid percent-encoded UTF-8".into(),
            ));
        }
        let slot = match name.as_ref() {
            "grant_type" => &mut grant_type,
            "client_id" => &mut request.client_id,
            "audience" => &mut request.audience,
            "scope" => &mut request.scope,
            "service_account" => &mut request.service_account,
            "target_audience" => &mut request.target_audience,
            "format" => &mut request.format,
            _ => continue,
        };
        if seen.contains(&name) {
            return Err(TokenError::InvalidRequest(format!(
                "parameter {name:?} is repeated; send it once"
            )));
        }
        seen.push(name.clone());
        if !value.is_empty() {
            *slot = Some(value.into_owned());
        }
    }
    match grant_type.as_deref() {
        Some("client_credentials") => {}
        None => {
            return Err(TokenError::InvalidRequest(
                "missing grant_type; use grant_type=client_credentials".into(),
            ))
        }
        Some(other) => {
            return Err(TokenError::UnsupportedGrantType(format!(
                "grant_type {} is not supported; use client_credentials",
                echo(other)
            )))
        }
    }
    request.grant_type = "client_credentials".into();
    Ok(request)
}

/// `format=external_credential`: Google's executable-sourced credential response (AIP-4117).
const EXTERNAL_CREDENTIAL: &str = "external_credential";

fn success(minted: &Minted, external_credential: bool) -> Response<Full<Bytes>> {
    let body = if external_credential {
        serde_json::to_vec(&ExternalCredential {
            version: 1,
            success: true,
            token_type: crate::flows::ID_TOKEN_TYPE,
            id_token: minted.id_token.as_deref().unwrap_or(&minted.access_token),
            expiration_time: minted.expires_at,
        })
    } else {
        serde_json::to_vec(&OAuthSuccess {
            access_token: &minted.access_token,
            token_type: "Bearer",
            expires_in: (minted.expires_at - unix_now()).max(0),
            issued_token_type: minted.issued_token_type,
            id_token: minted.id_token.as_deref(),
            scope: minted.scope.as_deref(),
        })
    };
    // Serializing strings and integers cannot fail; the fallback only keeps this total.
    let body = body.unwrap_or_default();
    let mut response = super::response::json(StatusCode::OK, Bytes::from(body));
    super::response::no_store(&mut response);
    response
}

/// RFC 6749 section 5.1 (with RFC 8693's `issued_token_type`). Borrowed fields: the
/// answer is written straight from the minted token, without copying it.
#[derive(serde::Serialize)]
struct OAuthSuccess<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: i64,
    issued_token_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
}

/// AIP-4117 executable response, as Google's Token Service answers it.
#[derive(serde::Serialize)]
struct ExternalCredential<'a> {
    version: u8,
    success: bool,
    token_type: &'static str,
    id_token: &'a str,
    expiration_time: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_rules() {
        let ok = parse_form(b"grant_type=client_credentials&audience=a%20b&scope=&x=1").unwrap();
        assert_eq!(ok.audience.as_deref(), Some("a b"));
        assert_eq!(ok.scope, None);
        let err = |body: &[u8]| parse_form(body).unwrap_err().code();
        assert_eq!(err(b""), "invalid_request");
        assert_eq!(err(b"grant_type=password"), "unsupported_grant_type");
        assert_eq!(
            err(b"grant_type=client_credentials&grant_type=client_credentials"),
            "invalid_request"
        );
        assert_eq!(
            err(b"grant_type=client_credentials&audience=a&audience=b"),
            "invalid_request"
        );
        assert_eq!(err(b"\xff\xfe"), "invalid_request");
        assert_eq!(err(b"%%%&&&==="), "invalid_request");
        assert_eq!(
            err(b"grant_type=&grant_type=client_credentials"),
            "invalid_request"
        );
        assert_eq!(
            err(b"grant_type=client_credentials&audience=%FF"),
            "invalid_request"
        );
    }
}
