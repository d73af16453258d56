//! An in-process fake of the Google APIs the broker calls: the GCE metadata server, the OAuth2
//! JWT-bearer token endpoint, IAM Credentials (signJwt, generateAccessToken, generateIdToken),
//! STS token exchange, and the public key endpoints. It speaks Google's wire protocol (paths,
//! bodies, error shapes) over plain HTTP on one loopback listener, and checks what Google
//! checks, so production code is tested by changing base URLs only.
//!
//! Its crypto uses `jsonwebtoken`, a library the production code does not use.

// Handlers return `Result<Response, Response>` so refusals can use `?`; size is irrelevant here.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use bytes::Bytes;
use http::request::Parts;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

const GOOGLE_ISSUER: &str = "https://accounts.google.com";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const SUBJECT_TOKEN_TYPES: [&str; 2] = [
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
];
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Clock skew tolerated for `iat` in the future.
const SKEW_SECS: i64 = 5;
const JSON: &str = "application/json; charset=UTF-8";

type Resp = Response<Full<Bytes>>;

pub struct FakeGoogleConfig {
    pub project_number: String,
    pub pool_id: String,
    pub provider_id: String,
    /// The OIDC provider's issuer URI; subject tokens' `iss` must be byte-identical.
    pub issuer: String,
    /// Empty means Google's default: [`FakeGoogleConfig::default_audience`].
    pub allowed_audiences: Vec<String>,
    /// The SA the broker itself runs as (metadata server identity, key file).
    pub broker_service_account: String,
    /// SAs that federated principals may impersonate.
    pub impersonable: Vec<String>,
}

impl FakeGoogleConfig {
    /// A typical setup for `issuer`: project 123456789012, pool `devices`, provider
    /// `token-broker`, broker SA `token-broker@fake-project...`, impersonable `runner@fake-project...`.
    pub fn new(issuer: &str) -> FakeGoogleConfig {
        FakeGoogleConfig {
            project_number: "123456789012".into(),
            pool_id: "devices".into(),
            provider_id: "token-broker".into(),
            issuer: issuer.into(),
            allowed_audiences: Vec::new(),
            broker_service_account: "token-broker@fake-project.iam.gserviceaccount.com".into(),
            impersonable: vec!["runner@fake-project.iam.gserviceaccount.com".into()],
        }
    }

    /// `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/R`
    pub fn provider_resource(&self) -> String {
        format!(
            "//iam.googleapis.com/projects/{}/locations/global/workloadIdentityPools/{}/providers/{}",
            self.project_number, self.pool_id, self.provider_id
        )
    }

    /// `https://iam.googleapis.com/projects/.../providers/R`
    pub fn default_audience(&self) -> String {
        format!("https:{}", self.provider_resource())
    }

    /// The federated principal of a subject: `principal://iam.googleapis.com/.../subject/SUB`.
    pub fn principal(&self, sub: &str) -> String {
        format!(
            "principal://iam.googleapis.com/projects/{}/locations/global/workloadIdentityPools/{}/subject/{sub}",
            self.project_number, self.pool_id
        )
    }

    fn allowed_audiences(&self) -> Vec<String> {
        match self.allowed_audiences.is_empty() {
            true => vec![self.default_audience()],
            false => self.allowed_audiences.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    MetadataToken,
    MetadataEmail,
    OAuthToken,
    SignJwt,
    Sts,
    GenerateAccessToken,
    GenerateIdToken,
    ServiceAccountJwks,
    GoogleCerts,
}

#[derive(Clone, Debug)]
pub enum Fault {
    Status(u16),
    /// This status with this message in Google's error shape.
    StatusWithMessage(u16, String),
    TooManyRequests {
        retry_after_secs: u64,
    },
    Delay(Duration),
    /// No answer until [`FakeGoogle::release`] (then a normal one): a slow upstream whose
    /// slowness the test ends, instead of a delay the test must guess long enough.
    Hold,
    MalformedJson,
    PermissionDenied,
}

/// What an access token handed out by the fake stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedToken {
    /// A service account email, or a `principal://` for federated tokens.
    pub subject: String,
    pub federated: bool,
    pub scopes: Vec<String>,
    pub expires_at: i64,
}

pub struct FakeGoogle {
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    config: FakeGoogleConfig,
    url: String,
    /// Google-managed SA key: signs signJwt output.
    sa_system_key: RsaKey,
    /// User-managed SA key: the one in the key file.
    sa_user_key: RsaKey,
    /// Google's OIDC key: signs generateIdToken output.
    google_key: RsaKey,
    inner: Mutex<Inner>,
    /// Set once by `release`: held calls go on.
    released: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct Inner {
    calls: HashMap<Api, usize>,
    faults: HashMap<Api, VecDeque<Fault>>,
    tokens: HashMap<String, IssuedToken>,
    provider_jwks: Option<Value>,
    trusted_roots: Vec<String>,
    last_subject_claims: Option<Value>,
    last_sts_request: Option<BTreeMap<String, String>>,
}

impl FakeGoogle {
    pub async fn start(config: FakeGoogleConfig) -> FakeGoogle {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            config,
            url: url.clone(),
            sa_system_key: RsaKey::generate(),
            sa_user_key: RsaKey::generate(),
            google_key: RsaKey::generate(),
            inner: Mutex::default(),
            released: tokio::sync::watch::Sender::new(false),
        });
        let task = tokio::spawn(serve(listener, state.clone()));
        FakeGoogle { url, state, task }
    }

    /// Every request to that API, faulted or not.
    pub fn calls(&self, api: Api) -> usize {
        self.state.lock().calls.get(&api).copied().unwrap_or(0)
    }

    /// The next `times` calls to `api` get this fault (after faults injected earlier).
    pub fn inject(&self, api: Api, fault: Fault, times: usize) {
        let mut inner = self.state.lock();
        let queue = inner.faults.entry(api).or_default();
        queue.extend(std::iter::repeat_n(fault, times));
    }

    /// Forgets the faults still queued for `api`: Google recovered.
    pub fn clear_faults(&self, api: Api) {
        self.state.lock().faults.remove(&api);
    }

    /// Lets every call held by [`Fault::Hold`], now and later, go on.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    /// Like `gcloud ... --jwk-json-path`: STS uses these keys instead of fetching discovery.
    pub fn set_provider_jwks(&self, jwks: Value) {
        self.state.lock().provider_jwks = Some(jwks);
    }

    /// Trust this PEM root (or roots) when fetching the issuer's discovery document and JWKS.
    pub fn trust_root_pem(&self, pem: &str) {
        self.state.lock().trusted_roots.push(pem.to_owned());
    }

    /// Public keys of the broker SA (both the key-file key and the key signJwt signs with).
    pub fn service_account_jwks(&self) -> Value {
        self.state.service_account_jwks()
    }

    /// A Google service-account key file (JSON) for the broker SA; `token_uri` is `{url}/token`.
    pub fn service_account_key_file(&self) -> String {
        let config = &self.state.config;
        let email = &config.broker_service_account;
        let project = email
            .split_once('@')
            .and_then(|(_, domain)| domain.strip_suffix(".iam.gserviceaccount.com"))
            .unwrap_or("fake-project");
        serde_json::to_string_pretty(&json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": self.state.sa_user_key.kid,
            "private_key": self.state.sa_user_key.pem,
            "client_email": email,
            "client_id": unique_id(email),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": format!("{}/token", self.url),
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!("https://www.googleapis.com/robot/v1/metadata/x509/{}", email.replace('@', "%40")),
            "universe_domain": "googleapis.com",
        }))
        .unwrap()
    }

    /// Google's OIDC JWKS (`/oauth2/v3/certs`): verifies generateIdToken output.
    pub fn google_certs(&self) -> Value {
        json!({ "keys": [self.state.google_key.jwk] })
    }

    /// A broker's `[google]` section sending every Google API to this fake.
    pub fn config_section(&self) -> String {
        format!(
            "[google]\nproject_number = \"123456789012\"\npool_id = \"devices\"\nprovider_id = \"token-broker\"\nsts_url = \"{0}\"\niam_credentials_url = \"{0}\"\nmetadata_url = \"{0}\"",
            self.url
        )
    }

    /// Claims of the last subject token STS accepted.
    pub fn last_subject_claims(&self) -> Option<Value> {
        self.state.lock().last_subject_claims.clone()
    }

    /// Fields (snake_case) of the last STS request that could be parsed, accepted or not.
    pub fn last_sts_request(&self) -> Option<BTreeMap<String, String>> {
        self.state.lock().last_sts_request.clone()
    }

    /// What an access token handed out by this fake stands for; `None` if it never issued it.
    pub fn issued_token(&self, token: &str) -> Option<IssuedToken> {
        self.state.lock().tokens.get(token).cloned()
    }
}

impl Drop for FakeGoogle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn service_account_jwks(&self) -> Value {
        json!({ "keys": [self.sa_system_key.jwk, self.sa_user_key.jwk] })
    }

    fn issue(&self, subject: &str, federated: bool, scopes: Vec<String>, lifetime: i64) -> String {
        let token = format!("ya29.fake-{}", uuid::Uuid::new_v4().simple());
        let issued = IssuedToken {
            subject: subject.to_owned(),
            federated,
            scopes,
            expires_at: now() + lifetime,
        };
        self.lock().tokens.insert(token.clone(), issued);
        token
    }

    fn known_service_account(&self, email: &str) -> bool {
        email == self.config.broker_service_account
            || self.config.impersonable.iter().any(|sa| sa == email)
    }
}

/// An RSA-2048 signing key with its public JWK (`kid` = 40 hex digits, like Google's).
struct RsaKey {
    kid: String,
    pem: String,
    encoding: EncodingKey,
    jwk: Value,
    decoding: DecodingKey,
}

impl RsaKey {
    fn generate() -> RsaKey {
        let pair =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .unwrap();
        let pkcs8 = pair.serialize_der();
        let encoding = EncodingKey::from_rsa_der(pkcs1_of_pkcs8(&pkcs8).expect("PKCS#8 RSA key"));
        let kid = hex(&Sha256::digest(&pkcs8))[..40].to_owned();
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        RsaKey {
            kid,
            pem: pair.serialize_pem(),
            decoding: DecodingKey::from_jwk(&jwk).unwrap(),
            jwk: serde_json::to_value(&jwk).unwrap(),
            encoding,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// The RSAPrivateKey (PKCS#1) inside a PrivateKeyInfo (PKCS#8): jsonwebtoken wants PKCS#1.
fn pkcs1_of_pkcs8(der: &[u8]) -> Option<&[u8]> {
    fn next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (tag, first) = (*input.first()?, *input.get(1)? as usize);
        let (len, start) = match first < 0x80 {
            true => (first, 2),
            false => {
                let n = first & 0x7f;
                let len = input
                    .get(2..2 + n)?
                    .iter()
                    .fold(0, |acc, b| acc << 8 | *b as usize);
                (len, 2 + n)
            }
        };
        Some((
            tag,
            input.get(start..start + len)?,
            input.get(start + len..)?,
        ))
    }
    let (0x30, info, _) = next(der)? else {
        return None;
    };
    let (_version, _, rest) = next(info)?;
    let (_algorithm, _, rest) = next(rest)?;
    let (0x04, key, _) = next(rest)? else {
        return None;
    };
    Some(key)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable 21-digit numeric id for a service account, like Google's unique ids.
fn unique_id(email: &str) -> String {
    let digest = Sha256::digest(email.as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().unwrap());
    format!("1{:020}", n)
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Routing, faults and response helpers
// ---------------------------------------------------------------------------------------------

fn api_of(path: &str) -> Option<Api> {
    if let Some(rest) = path.strip_prefix("/computeMetadata/v1/instance/service-accounts/") {
        return match rest.split_once('/') {
            Some((_, "token")) => Some(Api::MetadataToken),
            Some((_, "email")) => Some(Api::MetadataEmail),
            _ => None,
        };
    }
    if path.starts_with("/v1/projects/") {
        return match path.rsplit_once(':')?.1 {
            "signJwt" => Some(Api::SignJwt),
            "generateAccessToken" => Some(Api::GenerateAccessToken),
            "generateIdToken" => Some(Api::GenerateIdToken),
            _ => None,
        };
    }
    if path.starts_with("/service_accounts/v1/metadata/jwk/") {
        return Some(Api::ServiceAccountJwks);
    }
    match path {
        "/token" => Some(Api::OAuthToken),
        "/v1/token" => Some(Api::Sts),
        "/oauth2/v3/certs" => Some(Api::GoogleCerts),
        _ => None,
    }
}

#[derive(PartialEq)]
enum Style {
    Metadata,
    OAuth,
    Google,
}

fn style(api: Api) -> Style {
    match api {
        Api::MetadataToken | Api::MetadataEmail => Style::Metadata,
        Api::OAuthToken | Api::Sts => Style::OAuth,
        _ => Style::Google,
    }
}

fn permission(api: Api) -> &'static str {
    match api {
        Api::SignJwt => "iam.serviceAccounts.signJwt",
        Api::GenerateIdToken => "iam.serviceAccounts.getOpenIdToken",
        _ => "iam.serviceAccounts.getAccessToken",
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let Some(api) = api_of(req.uri().path()) else {
        return Ok(respond(
            404,
            "text/html; charset=UTF-8",
            "<!DOCTYPE html>\n<title>Error 404 (Not Found)</title>\n",
        ));
    };
    let fault = {
        let mut inner = state.lock();
        *inner.calls.entry(api).or_default() += 1;
        inner.faults.get_mut(&api).and_then(VecDeque::pop_front)
    };
    match fault {
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::Hold) => {
            let _ = state
                .released
                .subscribe()
                .wait_for(|released| *released)
                .await;
        }
        Some(fault) => return Ok(fault_response(api, &fault)),
        None => {}
    }
    let (parts, body) = req.into_parts();
    let expected = match style(api) == Style::Metadata
        || matches!(api, Api::ServiceAccountJwks | Api::GoogleCerts)
    {
        true => Method::GET,
        false => Method::POST,
    };
    if parts.method != expected {
        let mut response = error(
            api,
            405,
            &format!("Method {} is not allowed; use {expected}.", parts.method),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, expected.as_str().parse().unwrap());
        return Ok(response);
    }
    let body = match Limited::new(body, 1 << 20).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(error(api, 413, "Request body too large or unreadable.")),
    };
    let result = match api {
        Api::MetadataToken | Api::MetadataEmail => metadata(&state, api, &parts),
        Api::OAuthToken => oauth_token(&state, &parts, &body),
        Api::SignJwt => sign_jwt(&state, &parts, &body),
        Api::GenerateAccessToken => generate_access_token(&state, &parts, &body),
        Api::GenerateIdToken => generate_id_token(&state, &parts, &body),
        Api::Sts => sts(&state, &parts, &body).await,
        Api::ServiceAccountJwks => service_account_jwks(&state, &parts),
        Api::GoogleCerts => Ok(json_response(
            200,
            &json!({ "keys": [state.google_key.jwk] }),
        )),
    };
    Ok(result.unwrap_or_else(|response| response))
}

fn fault_response(api: Api, fault: &Fault) -> Resp {
    match fault {
        Fault::Status(code) => error(api, *code, default_message(*code)),
        Fault::StatusWithMessage(code, message) => error(api, *code, message),
        Fault::TooManyRequests { retry_after_secs } => {
            let mut response = match api {
                Api::Sts | Api::OAuthToken => oauth_error(
                    429,
                    "quota_exceeded",
                    "The request was throttled due to rate limit: sts.googleapis.com/requests. Please retry after a few seconds.",
                ),
                _ => error(api, 429, "Quota exceeded for quota metric 'Requests' and limit 'Requests per minute'."),
            };
            let value = retry_after_secs.to_string().parse().unwrap();
            response.headers_mut().insert(header::RETRY_AFTER, value);
            response
        }
        Fault::PermissionDenied if style(api) == Style::Google => {
            permission_denied(permission(api))
        }
        Fault::PermissionDenied => error(api, 403, "The caller does not have permission."),
        Fault::MalformedJson => respond(200, JSON, "{\"truncated\":"),
        Fault::Delay(_) | Fault::Hold => unreachable!("delays are served normally"),
    }
}

fn default_message(code: u16) -> &'static str {
    match code {
        500 => "Internal error encountered.",
        503 => "The service is currently unavailable.",
        504 => "The request timed out.",
        429 => "Resource has been exhausted (e.g. check quota).",
        403 => "The caller does not have permission.",
        401 => "Request had invalid authentication credentials.",
        404 => "Requested entity was not found.",
        _ => "Injected failure.",
    }
}

fn status_name(code: u16) -> &'static str {
    match code {
        400 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 | 501 => "UNIMPLEMENTED",
        409 => "ABORTED",
        412 => "FAILED_PRECONDITION",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        502 | 503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    }
}

fn respond(code: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .unwrap()
}

fn json_response(code: u16, body: &Value) -> Resp {
    respond(code, JSON, body.to_string())
}

/// An error in the API's own shape: text for metadata, OAuth JSON for STS and the token
/// endpoint (server errors there come as Google JSON, as STS really does), Google JSON otherwise.
fn error(api: Api, code: u16, message: &str) -> Resp {
    match style(api) {
        Style::Metadata => {
            let mut response = respond(code, "text/plain; charset=utf-8", format!("{message}\n"));
            response
                .headers_mut()
                .insert("metadata-flavor", "Google".parse().unwrap());
            response
        }
        Style::OAuth if code < 500 => {
            let kind = match code {
                401 => "invalid_client",
                403 => "access_denied",
                429 => "quota_exceeded",
                _ => "invalid_request",
            };
            oauth_error(code, kind, message)
        }
        _ => google_error(code, message),
    }
}

/// `{"error":{"code":N,"message":"...","status":"..."}}`
fn google_error(code: u16, message: &str) -> Resp {
    let body =
        json!({ "error": { "code": code, "message": message, "status": status_name(code) } });
    let mut response = json_response(code, &body);
    if code == 401 {
        let challenge = "Bearer realm=\"https://accounts.google.com/\""
            .parse()
            .unwrap();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
    }
    response
}

fn permission_denied(permission: &str) -> Resp {
    let message = format!("Permission '{permission}' denied on resource (or it may not exist).");
    let body = json!({ "error": {
        "code": 403, "message": message, "status": "PERMISSION_DENIED",
        "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "IAM_PERMISSION_DENIED",
            "domain": "iam.googleapis.com",
            "metadata": { "permission": permission },
        }],
    }});
    json_response(403, &body)
}

/// `{"error":"...","error_description":"..."}` (RFC 6749 5.2, as STS and oauth2.googleapis.com answer).
fn oauth_error(code: u16, error: &str, description: &str) -> Resp {
    json_response(
        code,
        &json!({ "error": error, "error_description": description }),
    )
}

fn invalid_request(description: &str) -> Resp {
    oauth_error(400, "invalid_request", description)
}

fn invalid_grant(description: &str) -> Resp {
    oauth_error(400, "invalid_grant", description)
}

fn split_scopes(list: &str, separator: char) -> Vec<String> {
    let scopes = list.split(separator).filter(|s| !s.is_empty());
    scopes.map(str::to_owned).collect()
}

fn invalid_argument(message: &str) -> Resp {
    google_error(400, message)
}

fn media_type(parts: &Parts) -> String {
    let value = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let value = value.unwrap_or("").split(';').next().unwrap_or("");
    value.trim().to_ascii_lowercase()
}

/// A form body; a repeated parameter is refused (RFC 6749 3.2).
fn parse_form(body: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let mut fields = BTreeMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        if fields
            .insert(name.to_string(), value.into_owned())
            .is_some()
        {
            return Err(format!("Parameter \"{name}\" is repeated."));
        }
    }
    Ok(fields)
}

fn snake_case(camel: &str) -> String {
    camel.chars().fold(String::new(), |mut out, c| {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
        out
    })
}

/// A proto3-JSON request body: an object whose names are `fields` in lowerCamelCase or
/// snake_case; unknown names are refused, as Google's frontends do. Keys come back in camelCase.
fn parse_proto_json(body: &[u8], fields: &[&str]) -> Result<Map<String, Value>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let object = match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return Err("Invalid JSON payload received. Expected an object.".into()),
        Err(e) => return Err(format!("Invalid JSON payload received. {e}.")),
    };
    let mut out = Map::new();
    for (name, value) in object {
        let Some(field) = fields.iter().find(|f| **f == name || snake_case(f) == name) else {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{name}\": Cannot find field."
            ));
        };
        out.insert((*field).to_owned(), value);
    }
    Ok(out)
}

/// Header and claims of a compact JWS, both JSON objects; signature unchecked.
fn jwt_parts(token: &str) -> Option<(Map<String, Value>, Map<String, Value>)> {
    let mut pieces = token.split('.');
    let (header, claims, _signature) = (pieces.next()?, pieces.next()?, pieces.next()?);
    if pieces.next().is_some() {
        return None;
    }
    let object = |piece: &str| match serde_json::from_slice(&B64URL.decode(piece).ok()?) {
        Ok(Value::Object(object)) => Some(object),
        _ => None,
    };
    Some((object(header)?, object(claims)?))
}

/// Checks a JWS signature only (claims are checked by the callers, with Google's messages).
fn signature_valid(token: &str, key: &DecodingKey, alg: Algorithm) -> bool {
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, key, &validation).is_ok()
}

fn seconds(value: Option<&Value>) -> Option<i64> {
    value?.as_f64().map(|f| f as i64)
}

fn display(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "null".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

/// `GET /computeMetadata/v1/instance/service-accounts/{default|EMAIL}/{token|email}`
fn metadata(state: &State, api: Api, parts: &Parts) -> Result<Resp, Resp> {
    let headers = &parts.headers;
    if headers.contains_key("x-forwarded-for") {
        return Err(error(
            api,
            403,
            "Request contains an X-Forwarded-For header and is refused.",
        ));
    }
    if headers.get("metadata-flavor").map(|v| v.as_bytes()) != Some(b"Google") {
        return Err(error(
            api,
            403,
            "Missing required header \"Metadata-Flavor\": \"Google\".",
        ));
    }
    let sa = &state.config.broker_service_account;
    let account = parts.uri.path().split('/').nth(5).unwrap_or("");
    if account != "default" && account != sa.as_str() {
        return Err(error(api, 404, "Not Found"));
    }
    let mut response = match api {
        Api::MetadataEmail => respond(200, "text/plain; charset=utf-8", sa.clone()),
        _ => {
            let query = parts.uri.query().unwrap_or("").as_bytes();
            let scopes = form_urlencoded::parse(query).find(|(name, _)| name == "scopes");
            let scopes = match scopes {
                Some((_, list)) => split_scopes(&list, ','),
                None => vec![CLOUD_PLATFORM.to_owned()],
            };
            let token = state.issue(sa, false, scopes, 3599);
            let body = json!({ "access_token": token, "expires_in": 3599, "token_type": "Bearer" });
            respond(200, "application/json", body.to_string())
        }
    };
    response
        .headers_mut()
        .insert("metadata-flavor", "Google".parse().unwrap());
    Ok(response)
}

/// `POST /token`: the OAuth2 JWT-bearer grant (RFC 7523) with a key-file assertion.
fn oauth_token(state: &State, parts: &Parts, body: &[u8]) -> Result<Resp, Resp> {
    if media_type(parts) != "application/x-www-form-urlencoded" {
        return Err(invalid_request(
            "Content type must be application/x-www-form-urlencoded.",
        ));
    }
    let form = parse_form(body).map_err(|e| invalid_request(&e))?;
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant_type != JWT_BEARER {
        return Err(oauth_error(
            400,
            "unsupported_grant_type",
            &format!("Invalid grant_type: {grant_type}"),
        ));
    }
    let Some(assertion) = form.get("assertion") else {
        return Err(invalid_request("Missing required parameter: assertion"));
    };
    let Some((header, claims)) = jwt_parts(assertion) else {
        return Err(invalid_grant(
            "Invalid JWT: the assertion is not a well-formed JWS.",
        ));
    };
    let key = &state.sa_user_key;
    if display(claims.get("iss")) != state.config.broker_service_account {
        return Err(invalid_grant("Invalid grant: account not found"));
    }
    let (alg, kid) = (display(header.get("alg")), display(header.get("kid")));
    if alg != "RS256"
        || kid != key.kid
        || !signature_valid(assertion, &key.decoding, Algorithm::RS256)
    {
        return Err(invalid_grant("Invalid JWT Signature."));
    }
    let token_uri = format!("{}/token", state.url);
    if display(claims.get("aud")) != token_uri {
        return Err(invalid_grant(&format!(
            "Invalid JWT: Failed audience check. The right audience is {token_uri}"
        )));
    }
    let (now, iat, exp) = (
        now(),
        seconds(claims.get("iat")),
        seconds(claims.get("exp")),
    );
    let reasonable = matches!((iat, exp), (Some(iat), Some(exp))
        if iat <= now + SKEW_SECS && exp > now && exp - iat <= 3600 && exp > iat);
    if !reasonable {
        return Err(invalid_grant("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim."));
    }
    let scopes = split_scopes(
        claims.get("scope").and_then(Value::as_str).unwrap_or(""),
        ' ',
    );
    if scopes.is_empty() {
        return Err(oauth_error(
            400,
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        ));
    }
    let token = state.issue(&state.config.broker_service_account, false, scopes, 3599);
    Ok(json_response(
        200,
        &json!({ "access_token": token, "expires_in": 3599, "token_type": "Bearer" }),
    ))
}

/// The caller of an IAM Credentials method, from `Authorization: Bearer`.
fn caller(state: &State, parts: &Parts) -> Result<IssuedToken, Resp> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(value) = value else {
        return Err(google_error(401, "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."));
    };
    let token = value.strip_prefix("Bearer ").unwrap_or("");
    match state.lock().tokens.get(token) {
        Some(issued) if issued.expires_at > now() => Ok(issued.clone()),
        _ => Err(google_error(401, "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.")),
    }
}

/// The service account of `/v1/projects/-/serviceAccounts/{EMAIL}:method`, known to the fake.
fn target_account(state: &State, parts: &Parts) -> Result<String, Resp> {
    let path = parts.uri.path().strip_prefix("/v1/projects/").unwrap_or("");
    let Some((project, rest)) = path.split_once("/serviceAccounts/") else {
        return Err(google_error(404, "Requested entity was not found."));
    };
    if project != "-" {
        return Err(invalid_argument("The `-` wildcard character is required for the project; replacing it with a project ID is invalid."));
    }
    let Some((email, _method)) = rest.rsplit_once(':') else {
        return Err(google_error(404, "Requested entity was not found."));
    };
    let email = percent_decode(email).ok_or_else(|| invalid_argument("Invalid resource name."))?;
    match state.known_service_account(&email) {
        true => Ok(email),
        false => Err(google_error(
            404,
            &format!("Not found; Gaia id not found for email {email}"),
        )),
    }
}

fn percent_decode(input: &str) -> Option<String> {
    let (bytes, mut out, mut i) = (input.as_bytes(), Vec::new(), 0);
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(input.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn no_delegates(request: &Map<String, Value>) -> Result<(), Resp> {
    match request.get("delegates") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(list)) if list.is_empty() => Ok(()),
        Some(_) => Err(invalid_argument(
            "Delegation chains are not supported by this fake.",
        )),
    }
}

/// `POST /v1/projects/-/serviceAccounts/{SA}:signJwt` (the broker SA signing as itself).
fn sign_jwt(state: &State, parts: &Parts, body: &[u8]) -> Result<Resp, Resp> {
    let caller = caller(state, parts)?;
    let sa = target_account(state, parts)?;
    let broker = &state.config.broker_service_account;
    if caller.federated || &caller.subject != broker || &sa != broker {
        return Err(permission_denied("iam.serviceAccounts.signJwt"));
    }
    let request =
        parse_proto_json(body, &["payload", "delegates"]).map_err(|e| invalid_argument(&e))?;
    no_delegates(&request)?;
    let Some(Value::String(payload)) = request.get("payload") else {
        return Err(invalid_argument(
            "Invalid value at 'payload': a JWT claim set (JSON string) is required.",
        ));
    };
    let Ok(Value::Object(claims)) = serde_json::from_str::<Value>(payload) else {
        return Err(invalid_argument(
            "Invalid JWT payload: the payload must be a JSON object.",
        ));
    };
    if let Some(exp) = claims.get("exp") {
        match exp.as_i64() {
            Some(exp) if exp > now() && exp <= now() + 12 * 3600 => {}
            _ => return Err(invalid_argument("Invalid JWT payload: the exp claim must be an integer timestamp that is not in the past and no more than 12 hours in the future.")),
        }
    }
    let key = &state.sa_system_key;
    let signed = key.sign(&Value::Object(claims));
    Ok(json_response(
        200,
        &json!({ "keyId": key.kid, "signedJwt": signed }),
    ))
}

/// A federated caller allowed to impersonate `sa` (roles/iam.workloadIdentityUser), else 403.
fn impersonation(state: &State, parts: &Parts, permission: &str) -> Result<String, Resp> {
    let caller = caller(state, parts)?;
    let sa = target_account(state, parts)?;
    if !caller.federated || !state.config.impersonable.contains(&sa) {
        return Err(permission_denied(permission));
    }
    Ok(sa)
}

/// A protobuf Duration in JSON ("3600s", "1.5s") as whole seconds (rounded up).
fn parse_duration(value: &Value) -> Option<i64> {
    let seconds: f64 = value.as_str()?.strip_suffix('s')?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| seconds.ceil() as i64)
}

/// `POST /v1/projects/-/serviceAccounts/{SA}:generateAccessToken`
fn generate_access_token(state: &State, parts: &Parts, body: &[u8]) -> Result<Resp, Resp> {
    let sa = impersonation(state, parts, "iam.serviceAccounts.getAccessToken")?;
    let request = parse_proto_json(body, &["delegates", "scope", "lifetime"])
        .map_err(|e| invalid_argument(&e))?;
    no_delegates(&request)?;
    let scopes: Vec<String> = match request.get("scope") {
        Some(Value::Array(list)) if !list.is_empty() && list.iter().all(Value::is_string) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => {
            return Err(invalid_argument(
                "Scope required: \"scope\" must be a non-empty list of OAuth scopes.",
            ))
        }
    };
    let lifetime = match request.get("lifetime") {
        None => 3600,
        Some(value) => parse_duration(value).ok_or_else(|| {
            invalid_argument(&format!("Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration), {value}"))
        })?,
    };
    if lifetime == 0 {
        return Err(invalid_argument(
            "Lifetime of access token must be larger then zero.",
        ));
    }
    if lifetime > 3600 {
        return Err(invalid_argument("can not have lifetimes of more than 1 hour. Use the Org Policy Constraint constraints/iam.allowServiceAccountCredentialLifetimeExtension to allow up to 12 hours."));
    }
    let token = state.issue(&sa, false, scopes, lifetime);
    let expire = jiff::Timestamp::from_second(now() + lifetime).unwrap();
    Ok(json_response(
        200,
        &json!({ "accessToken": token, "expireTime": expire.to_string() }),
    ))
}

/// `POST /v1/projects/-/serviceAccounts/{SA}:generateIdToken`
fn generate_id_token(state: &State, parts: &Parts, body: &[u8]) -> Result<Resp, Resp> {
    let sa = impersonation(state, parts, "iam.serviceAccounts.getOpenIdToken")?;
    let fields = [
        "delegates",
        "audience",
        "includeEmail",
        "organizationNumberIncluded",
    ];
    let request = parse_proto_json(body, &fields).map_err(|e| invalid_argument(&e))?;
    no_delegates(&request)?;
    let audience = match request.get("audience") {
        Some(Value::String(audience)) if !audience.is_empty() => audience.clone(),
        _ => {
            return Err(invalid_argument(
                "Invalid value at 'audience': an audience is required.",
            ))
        }
    };
    let include_email = match request.get("includeEmail") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(invalid_argument(&format!(
                "Invalid value at 'include_email' (TYPE_BOOL), {other}"
            )))
        }
    };
    let (iat, id) = (now(), unique_id(&sa));
    let mut claims = json!({ "iss": GOOGLE_ISSUER, "aud": audience, "azp": id, "sub": id, "iat": iat, "exp": iat + 3600 });
    if include_email {
        claims["email"] = json!(sa);
        claims["email_verified"] = json!(true);
    }
    Ok(json_response(
        200,
        &json!({ "token": state.google_key.sign(&claims) }),
    ))
}

/// `GET /service_accounts/v1/metadata/jwk/{SA}`
fn service_account_jwks(state: &State, parts: &Parts) -> Result<Resp, Resp> {
    let email = parts
        .uri
        .path()
        .trim_start_matches("/service_accounts/v1/metadata/jwk/");
    let email = percent_decode(email).unwrap_or_default();
    if email == state.config.broker_service_account {
        Ok(json_response(200, &state.service_account_jwks()))
    } else if state.known_service_account(&email) {
        Ok(json_response(200, &json!({ "keys": [] })))
    } else {
        Err(google_error(
            404,
            &format!("Not found; Gaia id not found for email {email}"),
        ))
    }
}

/// `POST /v1/token`: STS token exchange of an OIDC subject token for a federated access token.
async fn sts(state: &State, parts: &Parts, body: &[u8]) -> Result<Resp, Resp> {
    let fields = match media_type(parts).as_str() {
        "application/x-www-form-urlencoded" => parse_form(body).map_err(|e| invalid_request(&e))?,
        "application/json" => {
            let names = [
                "grantType",
                "audience",
                "scope",
                "requestedTokenType",
                "subjectToken",
                "subjectTokenType",
                "options",
            ];
            let object = parse_proto_json(body, &names).map_err(|e| invalid_request(&e))?;
            object
                .into_iter()
                .map(|(name, value)| (snake_case(&name), display(Some(&value))))
                .collect()
        }
        other => {
            return Err(invalid_request(&format!(
                "Unsupported content type \"{other}\"."
            )))
        }
    };
    state.lock().last_sts_request = Some(fields.clone());
    let field = |name: &str| fields.get(name).map(String::as_str).unwrap_or("");
    if field("grant_type") != TOKEN_EXCHANGE {
        return Err(oauth_error(
            400,
            "unsupported_grant_type",
            "Invalid value for \"grant_type\".",
        ));
    }
    if field("requested_token_type") != ACCESS_TOKEN_TYPE {
        return Err(invalid_request(
            "Invalid value of requested_token_type in request.",
        ));
    }
    if !SUBJECT_TOKEN_TYPES.contains(&field("subject_token_type")) {
        return Err(invalid_request("Invalid value for \"subject_token_type\": an OIDC provider accepts urn:ietf:params:oauth:token-type:jwt or urn:ietf:params:oauth:token-type:id_token."));
    }
    if field("subject_token").is_empty() {
        return Err(invalid_request(
            "Missing required parameter: \"subject_token\".",
        ));
    }
    let audience = field("audience");
    let shape = audience
        .strip_prefix("//iam.googleapis.com/projects/")
        .map(|rest| rest.split('/').collect::<Vec<_>>());
    if !matches!(
        shape.as_deref(),
        Some([
            _,
            "locations",
            _,
            "workloadIdentityPools",
            _,
            "providers",
            _
        ])
    ) {
        return Err(invalid_request("Invalid value for \"audience\"."));
    }
    if audience != state.config.provider_resource() {
        return Err(oauth_error(400, "invalid_target", "The target service indicated by the \"audience\" parameters is invalid. This might either be because the pool or provider is disabled or deleted or because it doesn't exist."));
    }
    let scopes = split_scopes(field("scope"), ' ');
    if scopes.is_empty() {
        return Err(invalid_request("Scope(s) must be provided."));
    }
    let claims = verify_subject_token(state, field("subject_token")).await?;
    let exp = seconds(claims.get("exp")).unwrap_or(0);
    let expires_in = (exp - now()).min(3600);
    let principal = state.config.principal(&display(claims.get("sub")));
    let token = state.issue(&principal, true, scopes, expires_in);
    state.lock().last_subject_claims = Some(Value::Object(claims));
    Ok(json_response(
        200,
        &json!({
            "access_token": token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": expires_in,
        }),
    ))
}

/// Google's checks on an OIDC subject token; the claims when it passes.
async fn verify_subject_token(state: &State, token: &str) -> Result<Map<String, Value>, Resp> {
    let config = &state.config;
    let Some((header, claims)) = jwt_parts(token) else {
        return Err(invalid_grant("Unable to parse the ID Token: it is not a JWS in compact serialization with JSON header and claims."));
    };
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        _ => {
            return Err(invalid_grant(&format!(
                "The ID Token's signing algorithm {} is not supported; use RS256 or ES256.",
                display(header.get("alg"))
            )))
        }
    };
    let Some(kid) = header
        .get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
    else {
        return Err(invalid_grant(
            "The ID Token header has no \"kid\": it is required to select the verification key.",
        ));
    };
    if claims.get("iss").and_then(Value::as_str) != Some(config.issuer.as_str()) {
        return Err(invalid_grant(&format!(
            "The issuer in ID Token {} does not match the expected one in config: {}",
            display(claims.get("iss")),
            config.issuer
        )));
    }
    let uploaded = state.lock().provider_jwks.clone();
    let jwks = match uploaded {
        Some(jwks) => jwks,
        None => fetch_jwks(state).await.map_err(|e| {
            invalid_grant(&format!(
                "Error connecting to the given credential's issuer. ({e})"
            ))
        })?,
    };
    let jwk = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|key| key["kid"].as_str() == Some(kid));
    let Some(jwk) = jwk.and_then(|key| serde_json::from_value::<Jwk>(key.clone()).ok()) else {
        return Err(invalid_grant(&format!("Error connecting to the given credential's issuer. (No usable key with kid \"{kid}\" in the provider's JWKS.)")));
    };
    let key_fits = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
            ec.curve == EllipticCurve::P256
        }
        _ => false,
    };
    let key = DecodingKey::from_jwk(&jwk).ok().filter(|_| key_fits);
    if !key.is_some_and(|key| signature_valid(token, &key, alg)) {
        return Err(invalid_grant("Unable to verify the ID Token signature."));
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(aud)) => vec![aud.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let allowed = config.allowed_audiences();
    if !audiences.iter().any(|aud| allowed.iter().any(|a| a == aud)) {
        return Err(invalid_grant(&format!(
            "The audience in ID Token [{}] does not match the expected audience {}.",
            audiences.join(", "),
            allowed.join(", ")
        )));
    }
    let now = now();
    let Some(iat) = seconds(claims.get("iat")) else {
        return Err(invalid_grant(
            "ID Token issued at null is stale to sign-in.",
        ));
    };
    if iat > now + SKEW_SECS {
        return Err(invalid_grant(&format!(
            "ID Token issued at {iat} is in the future (now is {now})."
        )));
    }
    match seconds(claims.get("exp")) {
        Some(exp) if exp > now && exp - iat < 48 * 3600 => {}
        Some(exp) if exp > now => {
            return Err(invalid_grant(&format!(
                "The ID Token lifetime exp - iat = {}s must be less than 48 hours.",
                exp - iat
            )));
        }
        _ => {
            return Err(invalid_grant(&format!(
                "ID Token issued at {iat} is stale to sign-in."
            )))
        }
    }
    match claims.get("sub").and_then(Value::as_str) {
        Some(sub) if sub.len() > 127 => Err(invalid_request("The size of mapped attribute google.subject exceeds the 127 bytes limit. Either modify your attribute mapping or the incoming assertion to produce a mapped attribute that is less than 127 bytes.")),
        Some(sub) if !sub.is_empty() => Ok(claims),
        _ => Err(invalid_grant("The ID Token has no \"sub\" claim, which google.subject=assertion.sub maps.")),
    }
}

/// The provider's keys, the way Google finds them: `{issuer}/.well-known/openid-configuration`
/// (whose `issuer` must equal the configured one), then its `jwks_uri`.
async fn fetch_jwks(state: &State) -> Result<Value, String> {
    let roots = state.lock().trusted_roots.clone();
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none());
    for pem in roots {
        for cert in
            reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| e.to_string())?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let issuer = &state.config.issuer;
    let discovery = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let document = get_json(&client, &discovery).await?;
    if document["issuer"].as_str() != Some(issuer.as_str()) {
        return Err(format!(
            "the discovery document's issuer {} is not {issuer}",
            document["issuer"]
        ));
    }
    let Some(jwks_uri) = document["jwks_uri"].as_str() else {
        return Err("the discovery document has no jwks_uri".into());
    };
    get_json(&client, jwks_uri).await
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: status {}", response.status()));
    }
    response.json().await.map_err(|e| format!("GET {url}: {e}"))
}
