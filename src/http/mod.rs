//! HTTP on the TLS listener: routing, public documents, and the token endpoint.

mod conn;
mod error;
mod response;
mod token;

pub use conn::ConnInfo;

pub use error::TokenError;
pub use token::parse_form;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::broker::Broker;
use crate::redact::echo;

/// Discovery and JWKS may be cached briefly; a new key is published long before it signs.
const PUBLIC_CACHE: &str = "public, max-age=300";

pub async fn handle(
    broker: Arc<Broker>,
    conn: Arc<ConnInfo>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let method = request.method().clone();
    let (route, response) = match request.uri().path() {
        "/" => (
            "/",
            get_only(&method, || redirect("/.well-known/openid-configuration")),
        ),
        "/.well-known/openid-configuration" | "/.well-known/oauth-authorization-server" => (
            "discovery",
            get_only(&method, || public_json(broker.public_documents().0.clone())),
        ),
        "/jwks" => (
            "jwks",
            get_only(&method, || match broker.signer().jwks_uri() {
                // The keys are Google's (IAM signer): send verifiers there.
                Some(uri) => redirect(uri),
                None => public_json(broker.public_documents().1.clone()),
            }),
        ),
        "/token" => {
            let response = if method == Method::POST {
                token::handle(&broker, &conn, request).await
            } else {
                error::method_not_allowed("POST", true)
            };
            ("token", response)
        }
        path => {
            let description = format!(
                "no such endpoint {}; see /.well-known/openid-configuration",
                echo(path)
            );
            (
                "other",
                error::json_error(StatusCode::NOT_FOUND, "not_found", &description, false),
            )
        }
    };
    broker
        .metrics()
        .request_duration
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    Ok(head_without_body(&method, response))
}

fn get_only(
    method: &Method,
    answer: impl FnOnce() -> Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    if method == Method::GET || method == Method::HEAD {
        answer()
    } else {
        error::method_not_allowed("GET, HEAD", false)
    }
}

/// HEAD gets GET's headers without the body.
fn head_without_body(method: &Method, response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    if method != Method::HEAD {
        return response;
    }
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, Full::new(Bytes::new()))
}

fn redirect(location: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn public_json(body: Bytes) -> Response<Full<Bytes>> {
    let mut response = response::json(StatusCode::OK, body);
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(PUBLIC_CACHE),
    );
    response
}
