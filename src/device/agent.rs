//! `token-broker agent`: the subset of the GCE metadata server that Google client libraries
//! use, answered with the device's broker tokens, so unmodified libraries work on premises
//! with `GCE_METADATA_HOST=127.0.0.1:PORT`.
//!
//! Like the real server it requires `Metadata-Flavor: Google` and refuses requests carrying
//! `X-Forwarded-For` (so a proxy or SSRF on the device cannot reach it), and it listens on
//! loopback unless told otherwise. It also answers only its own host names, so a web page
//! whose name was rebound to loopback (DNS rebinding) cannot read the device's tokens.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::device::client::{CachingClient, TokenParams};

pub struct AgentConfig {
    pub service_account: String,
    pub scopes: Vec<String>,
    pub project_id: String,
    pub numeric_project_id: String,
}

struct Agent {
    config: AgentConfig,
    broker: Arc<CachingClient>,
}

const PREFIX: &str = "/computeMetadata/v1/";

pub async fn serve(listener: TcpListener, config: AgentConfig, broker: Arc<CachingClient>) {
    let agent = Arc::new(Agent { config, broker });
    let listening = listener.local_addr().ok();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        // The address this connection reached (the listen address, or one of the host's
        // addresses when listening on 0.0.0.0 or ::).
        let Some(local) = stream.local_addr().ok().or(listening) else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(agent.answer(&request, local).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Loopback unless the operator insists: the agent hands out the device's credentials.
pub fn check_listen(addr: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(format!(
            "--listen {addr} is not a loopback address; anyone who can reach it gets this device's credentials (add --allow-remote if you really mean it)"
        ))
    }
}

/// Names the agent answers to besides its own address: those Google libraries use for the
/// metadata server.
const HOST_NAMES: &[&str] = &["localhost", "metadata.google.internal", "169.254.169.254"];

/// Whether `host` (a `Host` header) names this agent: its address or one of [`HOST_NAMES`],
/// any case, with or without a port. Only the name matters: it is what a rebound page
/// cannot choose, as its browser sends the page's own name.
fn is_own_host(host: &str, local: SocketAddr) -> bool {
    let name = match host.rsplit_once(':') {
        // An IPv6 literal has colons inside its brackets; only one after them is a port.
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.starts_with('[') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    };
    let own = match local.ip() {
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
    };
    name.eq_ignore_ascii_case(&own)
        || HOST_NAMES
            .iter()
            .any(|allowed| name.eq_ignore_ascii_case(allowed))
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("metadata-flavor", HeaderValue::from_static("Google"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::SERVER,
        HeaderValue::from_static("Metadata Server for VM"),
    );
    response
}

fn text(body: impl Into<String>) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "application/text", body.into())
}

fn not_found() -> Response<Full<Bytes>> {
    reply(
        StatusCode::NOT_FOUND,
        "text/html; charset=UTF-8",
        "<p>The requested URL was not found on this server.</p>\n".into(),
    )
}

impl Agent {
    async fn answer(
        &self,
        request: &Request<Incoming>,
        local: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let headers = request.headers();
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if !host.is_some_and(|host| is_own_host(host, local)) {
            return reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                format!(
                    "Request denied: the Host header must name this metadata server ({local}, {})\n",
                    HOST_NAMES.join(", ")
                ),
            );
        }
        if headers.contains_key("x-forwarded-for") {
            return reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                "Request denied: X-Forwarded-For header present\n".into(),
            );
        }
        if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
            return reply(
                StatusCode::FORBIDDEN,
                "text/plain",
                "Missing required header \"Metadata-Flavor\": \"Google\"\n".into(),
            );
        }
        let path = request.uri().path();
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        if path == "/" {
            return text("computeMetadata/\n");
        }
        let Some(rest) = path.strip_prefix(PREFIX) else {
            return not_found();
        };
        let config = &self.config;
        match rest {
            "project/project-id" => text(config.project_id.clone()),
            "project/numeric-project-id" => text(config.numeric_project_id.clone()),
            _ => match rest
                .strip_prefix("instance/service-accounts/")
                .and_then(|r| r.split_once('/'))
            {
                Some((account, item))
                    if account == "default" || account == config.service_account =>
                {
                    self.service_account(item, &query).await
                }
                _ => not_found(),
            },
        }
    }

    async fn service_account(
        &self,
        item: &str,
        query: &HashMap<String, String>,
    ) -> Response<Full<Bytes>> {
        let config = &self.config;
        match item {
            "" if query.get("recursive").is_some_and(|v| v == "true") => reply(
                StatusCode::OK,
                "application/json",
                json!({ "aliases": ["default"], "email": config.service_account, "scopes": config.scopes })
                    .to_string(),
            ),
            "email" => text(config.service_account.clone()),
            "scopes" => text(config.scopes.join("\n") + "\n"),
            "token" => {
                let scopes = query
                    .get("scopes")
                    .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" "))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| config.scopes.join(" "));
                let params = TokenParams {
                    scope: Some(scopes),
                    service_account: Some(config.service_account.clone()),
                    ..TokenParams::default()
                };
                match self.broker.get(&params).await {
                    Ok(token) => reply(
                        StatusCode::OK,
                        "application/json",
                        json!({ "access_token": token.access_token, "expires_in": token.expires_in(), "token_type": "Bearer" })
                            .to_string(),
                    ),
                    Err(e) => upstream_error(&e),
                }
            }
            "identity" => {
                let Some(audience) = query.get("audience").filter(|a| !a.is_empty()) else {
                    return reply(StatusCode::BAD_REQUEST, "text/plain", "non-empty audience parameter required\n".into());
                };
                let params = TokenParams {
                    target_audience: Some(audience.clone()),
                    service_account: Some(config.service_account.clone()),
                    ..TokenParams::default()
                };
                match self.broker.get(&params).await {
                    Ok(token) => text(token.id_token.unwrap_or(token.access_token)),
                    Err(e) => upstream_error(&e),
                }
            }
            _ => not_found(),
        }
    }
}

/// The broker's refusal, passed on so the library's error says why.
fn upstream_error(error: &crate::device::client::ClientError) -> Response<Full<Bytes>> {
    let status = match error.exit_code() {
        2 => StatusCode::FORBIDDEN,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    reply(status, "text/plain", format!("token-broker: {error}\n"))
}

#[cfg(test)]
mod tests {
    use super::is_own_host;

    #[test]
    fn own_host_names_with_or_without_port_in_any_case() {
        let v4 = "127.0.0.1:8080".parse().unwrap();
        let v6 = "[::1]:8080".parse().unwrap();
        for host in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "LOCALHOST:1",
            "Metadata.Google.Internal",
        ] {
            assert!(is_own_host(host, v4), "{host}");
        }
        for host in ["[::1]", "[::1]:8080", "localhost", "169.254.169.254:80"] {
            assert!(is_own_host(host, v6), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "[::1]",
            "127.0.0.1:",
            "localhost:x",
            "",
            "::1",
        ] {
            assert!(!is_own_host(host, v4), "{host}");
        }
        assert!(!is_own_host("127.0.0.1", v6));
    }
}
