//! The plain-HTTP admin listener: `/metrics`, `/healthz`, `/readyz`.
//!
//! Bound to loopback by default: it exposes operational data and is not authenticated.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::live::Live;

pub async fn serve(listener: TcpListener, live: Arc<Live>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Typically out of file descriptors: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let live = live.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let live = live.clone();
                async move { Ok::<_, Infallible>(route(&live, &request)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(live: &Live, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            Bytes::from(live.metrics().render()),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        // Loaded (a Live only exists with a built broker) and not draining.
        "/readyz" if live.is_ready() => {
            (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"draining\n"),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
