//! The one place errors become HTTP answers (RFC 6749 section 5.2 JSON bodies).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::broker::IssueError;
use crate::flows::FlowError;
use crate::google::{Api, UpstreamError};
use crate::signer::SignerError;
use crate::trust::Refusal;

/// Everything the token endpoint can refuse with.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("request body not received within {0}s")]
    BodyTimeout(u64),
    #[error("{0}")]
    UnsupportedGrantType(String),
    #[error("{0}")]
    InvalidTarget(String),
    #[error("{0}")]
    InvalidClient(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{0}")]
    UnauthorizedClient(String),
    #[error("too many token requests from this certificate; retry in {0}s")]
    RateLimited(u64),
    #[error(transparent)]
    Flow(#[from] FlowError),
}

impl From<IssueError> for TokenError {
    fn from(error: IssueError) -> Self {
        match error {
            IssueError::WrongClientId(message) => TokenError::InvalidClient(message),
            IssueError::RateLimited(seconds) => TokenError::RateLimited(seconds),
            IssueError::NoFlow(message) => TokenError::InvalidRequest(message),
            IssueError::FlowNotAllowed(message) => TokenError::UnauthorizedClient(message),
            IssueError::AudienceNotAllowed(message) => TokenError::InvalidTarget(message),
            IssueError::Flow(error) => TokenError::Flow(error),
        }
    }
}

impl TokenError {
    /// HTTP status and RFC 6749 `error` code: the one mapping from errors to answers.
    fn classify(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            TokenError::InvalidRequest(_) => (S::BAD_REQUEST, "invalid_request"),
            TokenError::UnsupportedMediaType(_) => (S::UNSUPPORTED_MEDIA_TYPE, "invalid_request"),
            TokenError::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "invalid_request"),
            TokenError::BodyTimeout(_) => (S::REQUEST_TIMEOUT, "invalid_request"),
            TokenError::UnsupportedGrantType(_) => (S::BAD_REQUEST, "unsupported_grant_type"),
            TokenError::InvalidTarget(_) | TokenError::Flow(FlowError::InvalidTarget(_)) => {
                (S::BAD_REQUEST, "invalid_target")
            }
            TokenError::Flow(FlowError::InvalidScope(_)) => (S::BAD_REQUEST, "invalid_scope"),
            TokenError::InvalidClient(_) | TokenError::Refused(_) => {
                (S::UNAUTHORIZED, "invalid_client")
            }
            TokenError::UnauthorizedClient(_) | TokenError::Flow(FlowError::NotAllowed(_)) => {
                (S::FORBIDDEN, "unauthorized_client")
            }
            TokenError::Flow(FlowError::Upstream(e))
            | TokenError::Flow(FlowError::Signer(SignerError::Upstream(e))) => match e {
                // Denied for the broker's own identity: our setup, not the client's rights.
                UpstreamError::Denied {
                    api: Api::SignJwt | Api::Metadata | Api::OAuth,
                    ..
                } => (S::INTERNAL_SERVER_ERROR, "server_error"),
                UpstreamError::Denied { .. } => (S::FORBIDDEN, "unauthorized_client"),
                UpstreamError::Unavailable { .. } | UpstreamError::DeadlineExceeded(_) => {
                    (S::SERVICE_UNAVAILABLE, "temporarily_unavailable")
                }
                UpstreamError::Rejected { .. } | UpstreamError::Malformed { .. } => {
                    (S::BAD_GATEWAY, "temporarily_unavailable")
                }
                UpstreamError::Credentials(_) => (S::INTERNAL_SERVER_ERROR, "server_error"),
            },
            TokenError::Flow(FlowError::Signer(_)) => (S::INTERNAL_SERVER_ERROR, "server_error"),
            TokenError::RateLimited(_) => (S::TOO_MANY_REQUESTS, "temporarily_unavailable"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    /// The RFC 6749 `error` code (also the metric label).
    pub fn code(&self) -> &'static str {
        self.classify().1
    }

    /// Seconds a client should wait before retrying, when Google said or we know.
    pub fn retry_after(&self) -> Option<u64> {
        let upstream = match self {
            TokenError::RateLimited(seconds) => return Some((*seconds).clamp(1, 300)),
            TokenError::Flow(FlowError::Upstream(e))
            | TokenError::Flow(FlowError::Signer(SignerError::Upstream(e))) => e,
            _ => return None,
        };
        match upstream {
            UpstreamError::Unavailable { retry_after, .. } => {
                retry_after.map(|seconds| seconds.clamp(1, 300))
            }
            UpstreamError::DeadlineExceeded(_) => Some(1),
            _ => None,
        }
    }

    /// The `error_description`: actionable. A 5xx says what to do and the request's id
    /// instead of the details, which the log has under that id: Google's messages name
    /// projects, pools and endpoints that are no device's business.
    pub fn description(&self, request_id: &str) -> String {
        match self.status() {
            StatusCode::INTERNAL_SERVER_ERROR => format!(
                "the token could not be issued because of a server problem; it has been logged (request id {request_id})"
            ),
            StatusCode::BAD_GATEWAY => format!(
                "Google did not accept or answer the broker's request; retry later, and if it persists give the broker's operator the request id {request_id}"
            ),
            StatusCode::SERVICE_UNAVAILABLE => format!(
                "Google is unavailable or slow; retry later (request id {request_id})"
            ),
            _ => self.to_string(),
        }
    }

    /// The answer: RFC 6749 JSON, or AIP-4117's `{version, success:false, code, message}`.
    pub fn into_response(
        self,
        external_credential: bool,
        request_id: &str,
    ) -> Response<Full<Bytes>> {
        let mut response = if external_credential {
            let body = json!({
                "version": 1,
                "success": false,
                "code": self.code(),
                "message": self.description(request_id),
            });
            let mut response = super::response::json(self.status(), Bytes::from(body.to_string()));
            super::response::no_store(&mut response);
            response
        } else {
            json_error(
                self.status(),
                self.code(),
                &self.description(request_id),
                true,
            )
        };
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A JSON error answer; `no_store` adds the token endpoint's cache headers.
pub(super) fn json_error(
    status: StatusCode,
    code: &str,
    description: &str,
    no_store: bool,
) -> Response<Full<Bytes>> {
    let body = json!({ "error": code, "error_description": description });
    let mut response = super::response::json(status, Bytes::from(body.to_string()));
    if no_store {
        super::response::no_store(&mut response);
    }
    response
}

/// 405 with the `Allow` header listing what the route accepts.
pub(super) fn method_not_allowed(allow: &'static str, no_store: bool) -> Response<Full<Bytes>> {
    let mut response = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request",
        &format!("method not allowed; use {allow}"),
        no_store,
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}
