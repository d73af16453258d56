//! The one place errors become HTTP answers (RFC 6749 section 5.2 JSON bodies).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::flows::FlowError;
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
    #[error(transparent)]
    Flow(#[from] FlowError),
}

impl TokenError {
    pub fn status(&self) -> StatusCode {
        match self {
            TokenError::InvalidRequest(_)
            | TokenError::UnsupportedGrantType(_)
            | TokenError::InvalidTarget(_) => StatusCode::BAD_REQUEST,
            TokenError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            TokenError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            TokenError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            TokenError::InvalidClient(_) | TokenError::Refused(_) => StatusCode::UNAUTHORIZED,
            TokenError::UnauthorizedClient(_) => StatusCode::FORBIDDEN,
            TokenError::Flow(FlowError::Signer(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The RFC 6749 `error` code (also the metric label).
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::InvalidRequest(_)
            | TokenError::UnsupportedMediaType(_)
            | TokenError::PayloadTooLarge(_)
            | TokenError::BodyTimeout(_) => "invalid_request",
            TokenError::UnsupportedGrantType(_) => "unsupported_grant_type",
            TokenError::InvalidTarget(_) => "invalid_target",
            TokenError::InvalidClient(_) | TokenError::Refused(_) => "invalid_client",
            TokenError::UnauthorizedClient(_) => "unauthorized_client",
            TokenError::Flow(FlowError::Signer(_)) => "server_error",
        }
    }

    /// The `error_description`: actionable, and never internal details for 5xx.
    pub fn description(&self) -> String {
        if self.status().is_server_error() {
            return "the token could not be issued because of a server problem; it has been logged"
                .into();
        }
        self.to_string()
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        json_error(self.status(), self.code(), &self.description(), true)
    }
}

/// A JSON error answer; `no_store` adds the token endpoint's cache headers.
pub fn json_error(
    status: StatusCode,
    code: &str,
    description: &str,
    no_store: bool,
) -> Response<Full<Bytes>> {
    let body = json!({ "error": code, "error_description": description });
    let mut response = super::json(status, Bytes::from(body.to_string()));
    if no_store {
        super::no_store(&mut response);
    }
    response
}

/// 405 with the `Allow` header listing what the route accepts.
pub fn method_not_allowed(allow: &'static str, no_store: bool) -> Response<Full<Bytes>> {
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
