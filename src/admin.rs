//! The plain-HTTP admin listener: `/metrics`, `/healthz` (the process answers), `/readyz`
//! (the broker could issue a token now: each failing check is one line of the body).
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
                async move { Ok::<_, Infallible>(route(&live, &request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(live: &Live, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => {
            // The readiness gauges are as fresh as the scrape.
            readiness(live).await;
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                Bytes::from(live.metrics().render()),
            )
        }
        "/healthz" => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        "/readyz" => {
            let failing: String = readiness(live)
                .await
                .into_iter()
                .filter_map(|(check, outcome)| Some(format!("{check}: {}\n", outcome.err()?)))
                .collect();
            match failing.is_empty() {
                true => (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n")),
                false => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    Bytes::from(failing),
                ),
            }
        }
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

/// Every readiness check by name (the `readiness{check}` label), with what an operator
/// should know when it fails; the gauges are set on the way.
async fn readiness(live: &Live) -> Vec<(&'static str, Result<(), String>)> {
    let broker = live.current();
    let signer = broker.signer();
    let expired_crls = broker.expired_crls(crate::clock::unix_now());
    let checks = vec![
        (
            "listener",
            match live.is_listening() {
                true => Ok(()),
                false => Err("the TLS listener is not accepting connections (not yet bound, or closed by the drain)".into()),
            },
        ),
        (
            "signer",
            signer
                .readiness()
                .await
                .map_err(|why| format!("{} signer cannot sign: {why}", signer.kind())),
        ),
        (
            "crls",
            match expired_crls.is_empty() {
                true => Ok(()),
                false => Err(format!(
                    "{}; renew it where server.crls or server.crl_sources point",
                    expired_crls.join("; ")
                )),
            },
        ),
        (
            "draining",
            match live.is_draining() {
                false => Ok(()),
                true => Err("shutting down (SIGTERM/SIGINT): finishing in-flight requests, then exiting".into()),
            },
        ),
    ];
    let gauge = &live.metrics().readiness;
    for (check, outcome) in &checks {
        gauge
            .with_label_values(&[check])
            .set(if outcome.is_ok() { 1.0 } else { 0.0 });
    }
    checks
}
