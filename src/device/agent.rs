//! `token-broker agent`: the part of the GCE metadata server that Google client libraries
//! use to detect it and get credentials, answered with the device's broker tokens, so
//! unmodified libraries work on premises with `GCE_METADATA_HOST=127.0.0.1:PORT`.
//!
//! It answers as GCE does (paths, directory listings and `?recursive=true` JSON, redirects of
//! directories named without their slash, `ETag`s, headers, error statuses), from a fixed
//! tree: what a device cannot have (GCE claims in ID tokens, licenses, metadata that changes)
//! is refused or documented in `docs/devices.md`, never invented.
//!
//! Like the real server it requires `Metadata-Flavor: Google` (except for the root ping),
//! refuses requests carrying `X-Forwarded-For` (so a proxy or SSRF on the device cannot reach
//! it), and it listens on loopback unless told otherwise. It also answers only its own host
//! names, so a web page whose name was rebound to loopback (DNS rebinding) cannot read the
//! device's tokens.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::net::TcpListener;

use crate::device::client::{CachingClient, ClientError, TokenParams};

/// What the agent says about the machine it stands in for.
pub struct AgentConfig {
    pub service_account: String,
    pub scopes: Vec<String>,
    /// `None`: not defined (404), as for any metadata key a server lacks.
    pub project_id: Option<String>,
    pub numeric_project_id: Option<u64>,
    pub instance_id: u64,
    pub hostname: String,
    /// The zone's name; served as `projects/NUMBER/zones/NAME` when the project number is known.
    pub zone: String,
    /// The local accounts (uids) whose connections are served; empty: every local account,
    /// as on GCE, where every process of the VM may ask.
    pub allowed_uids: Vec<u32>,
}

/// The universe whose tokens the broker's Google flows mint.
const UNIVERSE_DOMAIN: &str = "googleapis.com";

const TEXT: &str = "application/text";
const JSON: &str = "application/json";
const HTML: &str = "text/html; charset=UTF-8";
const PLAIN: &str = "text/plain; charset=utf-8";

/// A node of the metadata tree, as GCE shows it in text and in `?recursive=true` JSON.
enum Node {
    /// Children by path name, each with its recursive-JSON key (GCE uses camelCase there).
    Dir(Vec<(String, String, Node)>),
    Text(String),
    /// A text value that recursive JSON shows as a number (ids beyond 2^53 included).
    Number(u64),
    /// One item a line in text, an array in JSON.
    Lines(Vec<String>),
    /// Minted on each request; listed, never part of recursive JSON.
    Token,
    Identity,
}

impl Node {
    fn dir(children: Vec<(&str, &str, Node)>) -> Node {
        Node::Dir(
            children
                .into_iter()
                .map(|(name, key, node)| (name.to_owned(), key.to_owned(), node))
                .collect(),
        )
    }

    fn child(&self, name: &str) -> Option<&Node> {
        match self {
            Node::Dir(children) => children.iter().find(|(n, ..)| n == name).map(|(.., c)| c),
            _ => None,
        }
    }

    /// GCE's directory listing: one name a line, subdirectories with a trailing slash.
    fn listing(children: &[(String, String, Node)]) -> String {
        children
            .iter()
            .map(|(name, _, node)| match node {
                Node::Dir(_) => format!("{name}/\n"),
                _ => format!("{name}\n"),
            })
            .collect()
    }

    /// `None` for what recursive answers leave out (tokens).
    fn to_json(&self) -> Option<Value> {
        match self {
            Node::Dir(children) => Some(Value::Object(
                children
                    .iter()
                    .filter_map(|(_, key, node)| Some((key.clone(), node.to_json()?)))
                    .collect(),
            )),
            Node::Text(text) => Some(json!(text)),
            Node::Number(number) => Some(json!(number)),
            Node::Lines(lines) => Some(json!(lines)),
            Node::Token | Node::Identity => None,
        }
    }

    fn text(&self) -> Option<String> {
        match self {
            Node::Dir(children) => Some(Node::listing(children)),
            Node::Text(text) => Some(text.clone()),
            Node::Number(number) => Some(number.to_string()),
            Node::Lines(lines) => Some(lines.iter().map(|line| format!("{line}\n")).collect()),
            Node::Token | Node::Identity => None,
        }
    }
}

/// The whole tree from `/`, built once from the configuration.
fn tree(config: &AgentConfig) -> Node {
    let account = || {
        Node::dir(vec![
            ("aliases", "aliases", Node::Lines(vec!["default".into()])),
            ("email", "email", Node::Text(config.service_account.clone())),
            ("identity", "identity", Node::Identity),
            ("scopes", "scopes", Node::Lines(config.scopes.clone())),
            ("token", "token", Node::Token),
        ])
    };
    let mut instance = vec![
        // A device has no metadata attributes: empty, as on a VM without any.
        ("attributes", "attributes", Node::dir(vec![])),
        ("hostname", "hostname", Node::Text(config.hostname.clone())),
        ("id", "id", Node::Number(config.instance_id)),
        (
            "name",
            "name",
            Node::Text(
                config
                    .hostname
                    .split('.')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
        ),
        (
            "service-accounts",
            "serviceAccounts",
            Node::dir(vec![
                ("default", "default", account()),
                (&config.service_account, &config.service_account, account()),
            ]),
        ),
    ];
    if let Some(number) = config.numeric_project_id {
        instance.push((
            "zone",
            "zone",
            Node::Text(format!("projects/{number}/zones/{}", config.zone)),
        ));
    }
    let mut project = vec![("attributes", "attributes", Node::dir(vec![]))];
    if let Some(number) = config.numeric_project_id {
        project.push((
            "numeric-project-id",
            "numericProjectId",
            Node::Number(number),
        ));
    }
    if let Some(id) = &config.project_id {
        project.push(("project-id", "projectId", Node::Text(id.clone())));
    }
    Node::dir(vec![(
        "computeMetadata",
        "computeMetadata",
        Node::dir(vec![(
            "v1",
            "v1",
            Node::dir(vec![
                ("instance", "instance", Node::dir(instance)),
                ("project", "project", Node::dir(project)),
                (
                    "universe",
                    "universe",
                    Node::dir(vec![(
                        "universe-domain",
                        "universeDomain",
                        Node::Text(UNIVERSE_DOMAIN.into()),
                    )]),
                ),
            ]),
        )]),
    )])
}

/// How long a client library waits for the metadata server: Python's google-auth, the
/// shortest of the official libraries, gives it 3 seconds (`GCE_METADATA_TIMEOUT`) before it
/// retries. The agent answers within this, with the broker's reason (503) when the broker
/// has not answered yet; the broker request goes on and serves the library's retry.
pub const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest path and query the agent reads (414 beyond): a library's are far shorter.
const MAX_TARGET: usize = 8192;
/// Scopes per request, and bytes per scope or audience, at most (400 beyond).
const MAX_SCOPES: usize = 32;
const MAX_PARAMETER: usize = 1024;

struct Agent {
    config: AgentConfig,
    tree: Node,
    broker: Arc<CachingClient>,
    /// Connections refused because their local account is not allowed.
    refused: std::sync::atomic::AtomicU64,
}

pub async fn serve(listener: TcpListener, config: AgentConfig, broker: Arc<CachingClient>) {
    let tree = tree(&config);
    let agent = Arc::new(Agent {
        config,
        tree,
        broker,
        refused: Default::default(),
    });
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
            let refusal = agent.check_peer(&stream).await.err().map(Arc::new);
            let service = service_fn(move |request| {
                let (agent, refusal) = (agent.clone(), refusal.clone());
                async move {
                    Ok::<_, Infallible>(match refusal {
                        Some(reason) => {
                            error_page(StatusCode::FORBIDDEN, request.uri().path(), &reason)
                        }
                        None => agent.answer(&request, local).await,
                    })
                }
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

/// The default `instance/id`: GCE's is a stable 64-bit number naming the machine; the
/// device's stable name is its certificate's SPIFFE ID (else subject), which survives
/// renewals, so the number is derived from that.
pub fn instance_id_of(identity: &crate::identity::Identity) -> u64 {
    let name = identity.spiffe_id.as_ref().unwrap_or(&identity.subject);
    let digest = sha2::Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 63 bits, as GCE's ids fit a signed 64-bit integer.
    u64::from_be_bytes(first) >> 1
}

/// This machine's host name (Linux), for `instance/hostname` when none is configured.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Names the agent answers to besides its own address: those Google libraries use for the
/// metadata server.
const HOST_NAMES: &[&str] = &["localhost", "metadata.google.internal", "169.254.169.254"];

/// Whether `host` (a `Host` header) names this agent: its address or one of [`HOST_NAMES`],
/// any case, with or without a port, and with or without the root's dot (`gcp-metadata`
/// asks `metadata.google.internal.`). Only the name matters: it is what a rebound page
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
    if name.eq_ignore_ascii_case(&own) {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    HOST_NAMES
        .iter()
        .any(|allowed| name.eq_ignore_ascii_case(allowed))
}

type Answer = Response<Full<Bytes>>;

/// Every answer carries the headers GCE's metadata server sends, refusals included.
fn reply(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("metadata-flavor", HeaderValue::from_static("Google"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::SERVER,
        HeaderValue::from_static("Metadata Server for VM"),
    );
    headers.insert("x-xss-protection", HeaderValue::from_static("0"));
    headers.insert("x-frame-options", HeaderValue::from_static("SAMEORIGIN"));
    response
}

/// A value that only changes when the agent restarts, with its `ETag` (what
/// `wait_for_change` clients compare).
fn fixed(content_type: &'static str, body: String) -> Answer {
    let tag = etag(&body);
    let mut response = reply(StatusCode::OK, content_type, body);
    if let Ok(value) = HeaderValue::from_str(&tag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// 16 hex digits, the form of GCE's `ETag`s.
fn etag(body: &str) -> String {
    crate::identity::hex(&sha2::Sha256::digest(body.as_bytes())[..8])
}

/// GCE answers errors with an HTML page naming the path and the reason.
fn error_page(status: StatusCode, path: &str, sentence: &str) -> Answer {
    let escaped = path
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or_default();
    reply(
        status,
        HTML,
        format!(
            "<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error {code} ({reason})!!1</title>\n  <p><b>{code}.</b> <ins>That’s an error.</ins>\n  <p>{} <ins>That’s all we know.</ins>\n",
            sentence.replace("{path}", &format!("<code>{escaped}</code>"))
        ),
    )
}

fn not_found(path: &str) -> Answer {
    error_page(
        StatusCode::NOT_FOUND,
        path,
        "The requested URL {path} was not found on this server.",
    )
}

fn bad_request(message: &str) -> Answer {
    reply(StatusCode::BAD_REQUEST, PLAIN, format!("{message}\n"))
}

impl Agent {
    /// Whether the local account that opened `stream` may use the device's identity
    /// (`--allow-user`); the refusal says why. Counted and logged.
    async fn check_peer(&self, stream: &tokio::net::TcpStream) -> Result<(), String> {
        let allowed = &self.config.allowed_uids;
        if allowed.is_empty() {
            return Ok(());
        }
        let uid = match stream.peer_addr() {
            Ok(peer) => {
                tokio::task::spawn_blocking(move || crate::device::local_peer::uid_of(peer))
                    .await
                    .ok()
                    .flatten()
            }
            Err(_) => None,
        };
        let refusal = match uid {
            Some(uid) if allowed.contains(&uid) => return Ok(()),
            Some(uid) => format!(
                "Request denied: local user {uid} may not use this device's identity (token-broker agent --allow-user)."
            ),
            None => "Request denied: this metadata server could not tell which local user connected (token-broker agent --allow-user).".to_string(),
        };
        let refused = self
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::warn!(
            uid,
            refused_total = refused,
            "metadata agent: connection of a local user not allowed by --allow-user refused"
        );
        Err(refusal)
    }

    async fn answer(&self, request: &Request<Incoming>, local: SocketAddr) -> Answer {
        let headers = request.headers();
        let path = request.uri().path();
        let target = request
            .uri()
            .path_and_query()
            .map_or(0, |t| t.as_str().len());
        if target > MAX_TARGET {
            return reply(
                StatusCode::URI_TOO_LONG,
                PLAIN,
                format!("The request's path and query are {target} bytes; this metadata server (token-broker agent) reads at most {MAX_TARGET}.\n"),
            );
        }
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let Some(host) = host.filter(|host| is_own_host(host, local)) else {
            return error_page(
                StatusCode::FORBIDDEN,
                path,
                &format!(
                    "Request denied: the Host header must name this metadata server ({local}, {}).",
                    HOST_NAMES.join(", ")
                ),
            );
        };
        if headers.contains_key("x-forwarded-for") {
            return error_page(
                StatusCode::FORBIDDEN,
                path,
                "Your client does not have permission to get URL {path} from this server. Request denied: X-Forwarded-For header present.",
            );
        }
        // The root answers without it, as on GCE (Go's detection pings it bare).
        let flavor = headers.get("metadata-flavor").and_then(|v| v.to_str().ok());
        if flavor != Some("Google") && path != "/" {
            return error_page(
                StatusCode::FORBIDDEN,
                path,
                "Your client does not have permission to get URL {path} from this server. Missing Metadata-Flavor:Google header.",
            );
        }
        if request.method() != Method::GET {
            let mut refused = error_page(
                StatusCode::METHOD_NOT_ALLOWED,
                path,
                "The request method is not allowed for URL {path}: the metadata server answers GET.",
            );
            refused
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return refused;
        }
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let Some((node, slash)) = self.find(path) else {
            return not_found(path);
        };
        match (node, slash) {
            // A directory named without its slash: GCE redirects to the listing.
            (Node::Dir(_), false) => {
                let query = request
                    .uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                let mut redirect = reply(StatusCode::MOVED_PERMANENTLY, HTML, format!("{path}/\n"));
                if let Ok(location) = HeaderValue::from_str(&format!("http://{host}{path}/{query}"))
                {
                    redirect.headers_mut().insert(header::LOCATION, location);
                }
                redirect
            }
            (Node::Dir(_), true) | (_, false) => self.value(node, path, &query).await,
            (_, true) => not_found(path),
        }
    }

    /// The node a path names, and whether the path ended with a slash.
    fn find(&self, path: &str) -> Option<(&Node, bool)> {
        let inside = path.strip_prefix('/')?;
        let (inside, slash) = match inside.strip_suffix('/') {
            Some(dir) => (dir, true),
            None => (inside, inside.is_empty()),
        };
        if inside.is_empty() {
            return Some((&self.tree, true));
        }
        inside
            .split('/')
            .try_fold(&self.tree, |node, name| node.child(name))
            .map(|node| (node, slash))
    }

    async fn value(&self, node: &Node, path: &str, query: &HashMap<String, String>) -> Answer {
        let is = |name: &str, value: &str| {
            query
                .get(name)
                .is_some_and(|v| v.eq_ignore_ascii_case(value))
        };
        let waiting = is("wait_for_change", "true");
        match node {
            Node::Token | Node::Identity if waiting => {
                return bad_request(
                    "wait_for_change is not served for tokens by this metadata server (token-broker agent): ask for a new token instead",
                )
            }
            Node::Token => return self.token(query).await,
            Node::Identity => return self.identity(query).await,
            _ => {}
        }
        let recursive = is("recursive", "true") && matches!(node, Node::Dir(_));
        let body = match query.get("alt").map(String::as_str) {
            None | Some("text") if !recursive => node.text().map(|text| (TEXT, text)),
            None | Some("json") if recursive => node.to_json().map(|json| (JSON, json.to_string())),
            Some("json") if !matches!(node, Node::Dir(_)) => {
                node.to_json().map(|json| (JSON, json.to_string()))
            }
            Some(alt) => {
                return bad_request(&format!(
                    "alt={} is not served here for this path by this metadata server (token-broker agent): ask without alt, alt=json for a value, or recursive=true for a directory's JSON",
                    crate::redact::echo(alt)
                ))
            }
            None => None,
        };
        let Some((content_type, body)) = body else {
            return not_found(path);
        };
        // GCE holds a wait_for_change request until the ETag differs from `last_etag`.
        // Values here change only when the agent restarts, so a request that would wait is
        // refused at once rather than held; one whose `last_etag` is stale gets the value.
        if waiting
            && query
                .get("last_etag")
                .is_none_or(|last| *last == etag(&body))
        {
            return bad_request(
                "wait_for_change is not served by this metadata server (token-broker agent): its values change only when it restarts, so the request would wait forever",
            );
        }
        fixed(content_type, body)
    }

    async fn token(&self, query: &HashMap<String, String>) -> Answer {
        // Binding a token to a transport or certificate is GCE's doing; an unbound token
        // in its place would silently weaken what the caller asked for.
        for binding in [
            "transport",
            "binding-enforcement",
            "bindCertificateFingerprint",
        ] {
            if query.contains_key(binding) {
                return bad_request(&format!(
                    "{binding}: bound tokens are not available from this metadata server (token-broker agent)"
                ));
            }
        }
        let config = &self.config;
        let scopes = match query.get("scopes").map(|s| normalized_scopes(s)) {
            Some(Err(refused)) => return bad_request(&refused),
            Some(Ok(scopes)) if !scopes.is_empty() => scopes,
            _ => normalized_scopes(&config.scopes.join(",")).unwrap_or_default(),
        };
        let params = TokenParams {
            scope: Some(scopes),
            service_account: Some(config.service_account.clone()),
            ..TokenParams::default()
        };
        match self.broker.get(&params, ANSWER_WITHIN).await {
            Ok(token) => reply(
                StatusCode::OK,
                JSON,
                json!({ "access_token": token.access_token, "expires_in": token.expires_in(), "token_type": "Bearer" })
                    .to_string(),
            ),
            Err(e) => broker_error(&e),
        }
    }

    /// A Google-signed ID token for `audience`. `format=full` and `licenses=TRUE` are
    /// accepted (the libraries always send `format=full`), but the token is the standard
    /// one: the claims they add describe a GCE VM, and this device is none.
    async fn identity(&self, query: &HashMap<String, String>) -> Answer {
        let Some(audience) = query.get("audience").filter(|a| !a.is_empty()) else {
            return bad_request("non-empty audience parameter required");
        };
        if audience.len() > MAX_PARAMETER {
            return bad_request(&format!(
                "audience: at most {MAX_PARAMETER} bytes are accepted"
            ));
        }
        if let Some(format) = query.get("format") {
            if !["standard", "full"].contains(&format.as_str()) {
                return bad_request(&format!(
                    "format={}: must be standard or full",
                    crate::redact::echo(format)
                ));
            }
        }
        if let Some(licenses) = query.get("licenses") {
            if !["true", "false"].contains(&licenses.to_ascii_lowercase().as_str()) {
                return bad_request(&format!(
                    "licenses={}: must be TRUE or FALSE",
                    crate::redact::echo(licenses)
                ));
            }
        }
        let params = TokenParams {
            target_audience: Some(audience.clone()),
            service_account: Some(self.config.service_account.clone()),
            ..TokenParams::default()
        };
        match self.broker.get(&params, ANSWER_WITHIN).await {
            Ok(token) => reply(
                StatusCode::OK,
                TEXT,
                token.id_token.unwrap_or(token.access_token),
            ),
            Err(e) => broker_error(&e),
        }
    }
}

/// The scopes of a `scopes` parameter as the broker compares them: split at commas and
/// spaces, sorted, each once; so that spellings of one request share one cached token.
fn normalized_scopes(text: &str) -> Result<String, String> {
    let mut scopes: Vec<&str> = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect();
    if scopes.len() > MAX_SCOPES || scopes.iter().any(|s| s.len() > MAX_PARAMETER) {
        return Err(format!(
            "scopes: at most {MAX_SCOPES} scopes of at most {MAX_PARAMETER} bytes each are accepted"
        ));
    }
    scopes.sort_unstable();
    scopes.dedup();
    Ok(scopes.join(" "))
}

/// The broker's refusal passed on with its status and RFC 6749 error, so the library's
/// error carries the broker's reason (Node, Python, Go and Java quote a failed answer's
/// body; .NET reads only an RFC 6749 JSON one).
fn broker_error(error: &ClientError) -> Answer {
    tracing::warn!(%error, "metadata agent: no token for the library");
    let status = match error {
        ClientError::Refused { status, .. } => {
            StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN)
        }
        ClientError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        ClientError::Contract { .. } => StatusCode::BAD_REQUEST,
        ClientError::Local(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let code = match error {
        ClientError::Local(_) => "server_error",
        other => other.code(),
    };
    reply(
        status,
        "application/json",
        json!({ "error": code, "error_description": format!("token-broker: {error}") }).to_string(),
    )
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
            "metadata.google.internal.",
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
            "metadata.google.internal..",
        ] {
            assert!(!is_own_host(host, v4), "{host}");
        }
        assert!(!is_own_host("127.0.0.1", v6));
    }
}
