//! Tests of the Google fake itself, over real HTTP: it must accept what Google accepts and
//! refuse what Google refuses, or the broker's Google tests prove nothing.
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};

use crate::support::fake_google::{Api, FakeGoogle, FakeGoogleConfig, Fault};

const ISSUER: &str = "https://issuer.test/tenant";
const RUNNER: &str = "runner@fake-project.iam.gserviceaccount.com";
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const SUB: &str = "spiffe://test.example/device/d1";

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::new()
}

/// Status and body (JSON, or a JSON string holding the text when it is not JSON).
async fn read(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

async fn post_form(url: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
    let response = client()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(pairs))
        .send()
        .await
        .unwrap();
    read(response).await
}

/// The OIDC provider's side (the broker's role): an ES256 key, its JWKS, signed subject tokens.
struct Provider {
    key: EncodingKey,
    kid: String,
    jwks: Value,
}

impl Provider {
    fn new(kid: &str) -> Provider {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        let jwks = json!({ "keys": [jwk] });
        Provider {
            key,
            kid: kid.to_owned(),
            jwks,
        }
    }

    fn claims(&self, issuer: &str) -> Value {
        let audience = FakeGoogleConfig::new(issuer).default_audience();
        json!({ "iss": issuer, "sub": SUB, "aud": audience, "iat": now() - 1, "exp": now() + 300 })
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// A fake for ISSUER whose provider keys were uploaded (no discovery fetch).
async fn start() -> (FakeGoogle, Provider) {
    let fake = FakeGoogle::start(FakeGoogleConfig::new(ISSUER)).await;
    let provider = Provider::new("provider-key-1");
    fake.set_provider_jwks(provider.jwks.clone());
    (fake, provider)
}

fn provider_resource() -> String {
    FakeGoogleConfig::new(ISSUER).provider_resource()
}

/// An STS exchange, form-encoded, with Google's required parameters and `overrides`.
async fn sts(fake: &FakeGoogle, token: &str, overrides: &[(&str, &str)]) -> (u16, Value) {
    let audience = provider_resource();
    let mut pairs = vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("audience", audience.as_str()),
        ("scope", SCOPE),
        (
            "requested_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("subject_token", token),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
    ];
    for (name, value) in overrides {
        pairs.retain(|(n, _)| n != name);
        if !value.is_empty() {
            pairs.push((name, value));
        }
    }
    post_form(&format!("{}/v1/token", fake.url), &pairs).await
}

async fn federated_token(fake: &FakeGoogle, provider: &Provider) -> String {
    let (status, body) = sts(fake, &provider.sign(&provider.claims(ISSUER)), &[]).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

/// The metadata server's answer to a token request, whatever it is.
async fn metadata_token_answer(fake: &FakeGoogle) -> (u16, Value) {
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/token",
        fake.url
    );
    let response = client()
        .get(url)
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    read(response).await
}

async fn metadata_token(fake: &FakeGoogle) -> String {
    let (status, body) = metadata_token_answer(fake).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

/// POST to an IAM Credentials method of `sa` (used verbatim in the path).
async fn iam(
    fake: &FakeGoogle,
    bearer: Option<&str>,
    sa: &str,
    method: &str,
    body: &Value,
) -> (u16, Value) {
    let url = format!("{}/v1/projects/-/serviceAccounts/{sa}:{method}", fake.url);
    let mut request = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    read(request.send().await.unwrap()).await
}

fn broker_sa() -> String {
    FakeGoogleConfig::new(ISSUER).broker_service_account
}

fn assert_google_error(status: u16, body: &Value, code: u16, name: &str, fragment: &str) {
    assert_eq!(status, code, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["status"], name, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
}

fn assert_oauth_error(status: u16, body: &Value, error: &str, fragment: &str) {
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], error, "{body}");
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.contains(fragment),
        "{description:?} lacks {fragment:?}"
    );
}

#[tokio::test]
async fn metadata_token_requires_the_flavor_header_and_refuses_forwarded_requests() {
    let (fake, _) = start().await;
    let url = format!(
        "{}/computeMetadata/v1/instance/service-accounts/default/token",
        fake.url
    );

    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), 403);
    let response = client()
        .get(&url)
        .header("Metadata-Flavor", "google")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "the value is case-sensitive");
    let response = client()
        .get(&url)
        .header("Metadata-Flavor", "Google")
        .header("X-Forwarded-For", "10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    let response = client()
        .get(format!("{url}?scopes=scope-a,scope-b"))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["metadata-flavor"], "Google");
    assert_eq!(response.headers()["content-type"], "application/json");
    let (status, body) = read(response).await;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    let issued = fake
        .issued_token(body["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(issued.subject, broker_sa());
    assert!(!issued.federated);
    assert_eq!(issued.scopes, ["scope-a", "scope-b"]);

    let email = client()
        .get(url.replace("/token", "/email"))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(email.status(), 200);
    assert_eq!(email.text().await.unwrap(), broker_sa());
    assert_eq!(fake.calls(Api::MetadataToken), 4);
    assert_eq!(fake.calls(Api::MetadataEmail), 1);
}

/// A JWT-bearer assertion signed with josekit (not the fake's library) from the key file.
fn assertion(key_file: &Value, pem: &str, claims: Value) -> String {
    let signer = josekit::jws::RS256.signer_from_pem(pem).unwrap();
    let mut header = josekit::jws::JwsHeader::new();
    header.set_token_type("JWT");
    header.set_key_id(key_file["private_key_id"].as_str().unwrap());
    let Value::Object(claims) = claims else {
        unreachable!()
    };
    let payload = josekit::jwt::JwtPayload::from_map(claims).unwrap();
    josekit::jwt::encode_with_signer(&payload, &header, &signer).unwrap()
}

#[tokio::test]
async fn jwt_bearer_grant_accepts_a_key_file_assertion_and_refuses_a_wrong_one() {
    let (fake, _) = start().await;
    let key_file: Value = serde_json::from_str(&fake.service_account_key_file()).unwrap();
    assert_eq!(key_file["type"], "service_account");
    assert_eq!(key_file["client_email"], broker_sa());
    let token_uri = key_file["token_uri"].as_str().unwrap().to_owned();
    assert_eq!(token_uri, format!("{}/token", fake.url));
    let pem = key_file["private_key"].as_str().unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let claims = |aud: &str, iat: i64, exp: i64| json!({ "iss": broker_sa(), "aud": aud, "scope": SCOPE, "iat": iat, "exp": exp });
    let grant = |assertion: String| {
        let url = token_uri.clone();
        async move {
            let pairs = [
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ];
            post_form(&url, &pairs).await
        }
    };

    let good = assertion(&key_file, pem, claims(&token_uri, now(), now() + 3600));
    let (status, body) = grant(good.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(fake.issued_token(token).unwrap().subject, broker_sa());
    // The token is a broker-SA token: it may sign as the broker SA.
    let payload = json!({ "payload": json!({ "sub": "x" }).to_string() });
    let (status, body) = iam(&fake, Some(token), &broker_sa(), "signJwt", &payload).await;
    assert_eq!(status, 200, "{body}");

    let wrong_aud = assertion(
        &key_file,
        pem,
        claims("https://oauth2.googleapis.com/token", now(), now() + 600),
    );
    let (status, body) = grant(wrong_aud).await;
    assert_oauth_error(status, &body, "invalid_grant", "audience");

    let too_long = assertion(&key_file, pem, claims(&token_uri, now(), now() + 3601));
    let (status, body) = grant(too_long).await;
    assert_oauth_error(status, &body, "invalid_grant", "short-lived");

    let expired = assertion(&key_file, pem, claims(&token_uri, now() - 700, now() - 100));
    let (status, body) = grant(expired).await;
    assert_oauth_error(status, &body, "invalid_grant", "short-lived");

    let mut unscoped = claims(&token_uri, now(), now() + 600);
    unscoped.as_object_mut().unwrap().remove("scope");
    let (status, body) = grant(assertion(&key_file, pem, unscoped)).await;
    assert_oauth_error(status, &body, "invalid_scope", "scope");

    let other_key =
        rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            .unwrap()
            .serialize_pem();
    let forged = assertion(
        &key_file,
        &other_key,
        claims(&token_uri, now(), now() + 600),
    );
    let (status, body) = grant(forged).await;
    assert_oauth_error(status, &body, "invalid_grant", "Signature");

    let url = format!("{}/token", fake.url);
    let pairs = [
        ("grant_type", "client_credentials"),
        ("assertion", good.as_str()),
    ];
    let (status, body) = post_form(&url, &pairs).await;
    assert_oauth_error(
        status,
        &body,
        "unsupported_grant_type",
        "client_credentials",
    );
    assert_eq!(fake.calls(Api::OAuthToken), 7);
}

#[tokio::test]
async fn sign_jwt_output_verifies_with_the_service_account_jwks() {
    let (fake, provider) = start().await;
    let token = metadata_token(&fake).await;
    let claims =
        json!({ "iss": ISSUER, "sub": SUB, "aud": "aud-a", "iat": now(), "exp": now() + 300 });
    let encoded_sa = broker_sa().replace('@', "%40");
    let request = json!({ "payload": claims.to_string(), "delegates": [] });
    let (status, body) = iam(&fake, Some(&token), &encoded_sa, "signJwt", &request).await;
    assert_eq!(status, 200, "{body}");
    let key_id = body["keyId"].as_str().unwrap();
    let signed = body["signedJwt"].as_str().unwrap();

    let header = jsonwebtoken::decode_header(signed).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(header.kid.as_deref(), Some(key_id));
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    // Verified with josekit, a different library from the fake's.
    let jwks = fake.service_account_jwks();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == key_id)
        .expect("signJwt's kid is in the SA JWKS");
    let jwk = josekit::jwk::Jwk::from_map(jwk.as_object().unwrap().clone()).unwrap();
    let verifier = josekit::jws::RS256.verifier_from_jwk(&jwk).unwrap();
    let (payload, _) = josekit::jwt::decode_with_verifier(signed, &verifier).unwrap();
    assert_eq!(Value::Object(payload.claims_set().clone()), claims);

    let url = format!("{}/service_accounts/v1/metadata/jwk/{encoded_sa}", fake.url);
    let (status, served) = read(client().get(url).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(served, jwks);

    // Refusals.
    let (status, body) = iam(&fake, None, &broker_sa(), "signJwt", &request).await;
    assert_google_error(status, &body, 401, "UNAUTHENTICATED", "missing");
    let (status, body) = iam(&fake, Some("ya29.bogus"), &broker_sa(), "signJwt", &request).await;
    assert_google_error(status, &body, 401, "UNAUTHENTICATED", "invalid");
    let late = json!({ "payload": json!({ "exp": now() + 13 * 3600 }).to_string() });
    let (status, body) = iam(&fake, Some(&token), &broker_sa(), "signJwt", &late).await;
    assert_google_error(status, &body, 400, "INVALID_ARGUMENT", "12 hours");
    let array = json!({ "payload": "[1]" });
    let (status, body) = iam(&fake, Some(&token), &broker_sa(), "signJwt", &array).await;
    assert_google_error(status, &body, 400, "INVALID_ARGUMENT", "JSON object");
    let typo = json!({ "payLoad": claims.to_string() });
    let (status, body) = iam(&fake, Some(&token), &broker_sa(), "signJwt", &typo).await;
    assert_google_error(status, &body, 400, "INVALID_ARGUMENT", "Unknown name");
    let unknown = "nobody@fake-project.iam.gserviceaccount.com";
    let (status, body) = iam(&fake, Some(&token), unknown, "signJwt", &request).await;
    assert_google_error(status, &body, 404, "NOT_FOUND", unknown);
    let (status, body) = iam(&fake, Some(&token), RUNNER, "signJwt", &request).await;
    assert_google_error(
        status,
        &body,
        403,
        "PERMISSION_DENIED",
        "iam.serviceAccounts.signJwt",
    );
    let federated = federated_token(&fake, &provider).await;
    let (status, body) = iam(&fake, Some(&federated), &broker_sa(), "signJwt", &request).await;
    assert_google_error(
        status,
        &body,
        403,
        "PERMISSION_DENIED",
        "iam.serviceAccounts.signJwt",
    );
}

#[tokio::test]
async fn sts_accepts_a_good_es256_subject_token_as_form_and_as_json() {
    let (fake, provider) = start().await;
    let before = now();
    let claims = provider.claims(ISSUER);
    let token = provider.sign(&claims);

    let (status, body) = sts(&fake, &token, &[]).await;
    let took = now() - before;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body["token_type"], "Bearer");
    // Like Google: never past the subject token's exp.
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((300 - took..=300).contains(&expires_in), "{expires_in}");
    let issued = fake
        .issued_token(body["access_token"].as_str().unwrap())
        .unwrap();
    assert!(issued.federated);
    assert_eq!(issued.subject, FakeGoogleConfig::new(ISSUER).principal(SUB));
    assert_eq!(fake.last_subject_claims(), Some(claims.clone()));
    let request = fake.last_sts_request().unwrap();
    assert_eq!(request["subject_token"], token);
    assert_eq!(request["audience"], provider_resource());

    let json_body = json!({
        "grantType": "urn:ietf:params:oauth:grant-type:token-exchange",
        "audience": provider_resource(),
        "scope": SCOPE,
        "requestedTokenType": "urn:ietf:params:oauth:token-type:access_token",
        "subjectToken": token,
        "subjectTokenType": "urn:ietf:params:oauth:token-type:id_token",
    });
    let response = client()
        .post(format!("{}/v1/token", fake.url))
        .json(&json_body)
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].is_string());
    let request = fake.last_sts_request().unwrap();
    let names: Vec<&str> = request.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "audience",
            "grant_type",
            "requested_token_type",
            "scope",
            "subject_token",
            "subject_token_type"
        ]
    );
    assert_eq!(
        request["subject_token_type"],
        "urn:ietf:params:oauth:token-type:id_token"
    );

    // `aud` may be an array; one allowed audience suffices.
    let mut listed = provider.claims(ISSUER);
    listed["aud"] = json!(["other", FakeGoogleConfig::new(ISSUER).default_audience()]);
    let (status, body) = sts(&fake, &provider.sign(&listed), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.calls(Api::Sts), 3);
}

#[tokio::test]
async fn sts_refuses_subject_tokens_google_refuses() {
    let (fake, provider) = start().await;
    let good = provider.claims(ISSUER);
    let with = |name: &str, value: Value| {
        let mut claims = good.clone();
        claims[name] = value;
        provider.sign(&claims)
    };
    let iat = now() - 10;
    let long_lived = {
        let mut claims = good.clone();
        claims["iat"] = json!(iat);
        claims["exp"] = json!(iat + 48 * 3600);
        provider.sign(&claims)
    };
    let no_kid =
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &good, &provider.key).unwrap();
    let unknown_kid = Provider {
        kid: "unknown-kid".into(),
        ..Provider::new("unused")
    }
    .sign(&good);
    let forged = Provider::new(&provider.kid).sign(&good);
    let hs256 = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(provider.kid.clone());
        jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(b"secret")).unwrap()
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "wrong iss (trailing slash)",
            with("iss", json!(format!("{ISSUER}/"))),
            "invalid_grant",
            "issuer in ID Token",
        ),
        (
            "no iss",
            with("iss", Value::Null),
            "invalid_grant",
            "issuer in ID Token null",
        ),
        (
            "wrong aud",
            with("aud", json!("https://example.com")),
            "invalid_grant",
            "audience in ID Token [https://example.com]",
        ),
        (
            "provider resource as aud",
            with("aud", json!(provider_resource())),
            "invalid_grant",
            "audience in ID Token",
        ),
        ("exp - iat = 48h", long_lived, "invalid_grant", "48 hours"),
        (
            "iat in the future",
            with("iat", json!(now() + 120)),
            "invalid_grant",
            "in the future",
        ),
        (
            "no iat",
            with("iat", Value::Null),
            "invalid_grant",
            "issued at null",
        ),
        (
            "expired",
            with("exp", json!(now() - 10)),
            "invalid_grant",
            "stale",
        ),
        ("missing kid", no_kid, "invalid_grant", "kid"),
        (
            "unknown kid",
            unknown_kid,
            "invalid_grant",
            "Error connecting",
        ),
        ("wrong key", forged, "invalid_grant", "signature"),
        (
            "sub of 128 bytes",
            with("sub", json!("a".repeat(128))),
            "invalid_request",
            "127 bytes",
        ),
        ("no sub", with("sub", Value::Null), "invalid_grant", "sub"),
        ("alg HS256", hs256, "invalid_grant", "RS256 or ES256"),
        ("not a JWT", "not-a-jwt".into(), "invalid_grant", "parse"),
        ("bad base64", "%%%.%%%.%%%".into(), "invalid_grant", "parse"),
    ];
    for (name, token, error, fragment) in &cases {
        let (status, body) = sts(&fake, token, &[]).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"], *error, "{name}: {body}");
        let description = body["error_description"].as_str().unwrap();
        assert!(description.contains(fragment), "{name}: {description:?}");
    }
    assert_eq!(fake.last_subject_claims(), None);

    // The limits themselves are accepted.
    let (status, body) = sts(&fake, &with("sub", json!("a".repeat(127))), &[]).await;
    assert_eq!(status, 200, "{body}");
    let mut claims = good.clone();
    claims["iat"] = json!(iat);
    claims["exp"] = json!(iat + 48 * 3600 - 1);
    let (status, body) = sts(&fake, &provider.sign(&claims), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.calls(Api::Sts), cases.len() + 2);
}

#[tokio::test]
async fn sts_checks_the_request_parameters() {
    let (fake, provider) = start().await;
    let token = provider.sign(&provider.claims(ISSUER));
    let default_audience = FakeGoogleConfig::new(ISSUER).default_audience();
    let other_provider = provider_resource().replace("token-broker", "other");
    let access_token_type = "urn:ietf:params:oauth:token-type:access_token";
    // (parameter, value or "" to leave it out, error, fragment of the description)
    let cases = [
        (
            "grant_type",
            "client_credentials",
            "unsupported_grant_type",
            "grant_type",
        ),
        (
            "audience",
            default_audience.as_str(),
            "invalid_request",
            "audience",
        ),
        ("audience", "", "invalid_request", "audience"),
        (
            "audience",
            other_provider.as_str(),
            "invalid_target",
            "audience",
        ),
        (
            "requested_token_type",
            "",
            "invalid_request",
            "requested_token_type",
        ),
        (
            "subject_token_type",
            access_token_type,
            "invalid_request",
            "subject_token_type",
        ),
        ("scope", "", "invalid_request", "Scope"),
        ("subject_token", "", "invalid_request", "subject_token"),
    ];
    for (name, value, error, fragment) in cases {
        let (status, body) = sts(&fake, &token, &[(name, value)]).await;
        assert_oauth_error(status, &body, error, fragment);
    }

    let response = client()
        .post(format!("{}/v1/token", fake.url))
        .header("content-type", "text/plain")
        .body("grant_type=x")
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_oauth_error(status, &body, "invalid_request", "content type");
    let repeated = format!("{}&scope=again", form(&[("scope", SCOPE)]));
    let response = client()
        .post(format!("{}/v1/token", fake.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(repeated)
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_oauth_error(status, &body, "invalid_request", "repeated");
    let response = client()
        .post(format!("{}/v1/token", fake.url))
        .json(&json!({ "grantType": "x", "subject_token_typ": "y" }))
        .send()
        .await
        .unwrap();
    let (status, body) = read(response).await;
    assert_oauth_error(status, &body, "invalid_request", "Unknown name");
}

/// An HTTPS OIDC issuer on loopback serving discovery and `jwks`; returns its URL and CA.
async fn tls_issuer(jwks: Value) -> (String, String) {
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Issuer Test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &*ca)
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let discovery = json!({ "issuer": issuer, "jwks_uri": format!("{issuer}/jwks") });
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, discovery, jwks) = (acceptor.clone(), discovery.clone(), jwks.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    let body = match req.uri().path() {
                        "/.well-known/openid-configuration" => discovery.to_string(),
                        _ => jwks.to_string(),
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (issuer, ca.pem())
}

#[tokio::test]
async fn sts_fetches_the_issuers_keys_through_discovery_when_none_were_uploaded() {
    let provider = Provider::new("discovered-key");
    let (issuer, ca_pem) = tls_issuer(provider.jwks.clone()).await;
    let fake = FakeGoogle::start(FakeGoogleConfig::new(&issuer)).await;
    let token = provider.sign(&provider.claims(&issuer));

    let (status, body) = sts(&fake, &token, &[]).await;
    assert_oauth_error(status, &body, "invalid_grant", "Error connecting");
    fake.trust_root_pem(&ca_pem);
    let (status, body) = sts(&fake, &token, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.last_subject_claims().unwrap()["iss"], issuer.as_str());
}

#[tokio::test]
async fn generate_access_token_impersonates_only_allowed_service_accounts() {
    let (fake, provider) = start().await;
    let federated = federated_token(&fake, &provider).await;
    let request = json!({ "scope": [SCOPE], "lifetime": "600s", "delegates": [] });

    let before = now();
    let (status, body) = iam(
        &fake,
        Some(&federated),
        RUNNER,
        "generateAccessToken",
        &request,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let expire: jiff::Timestamp = body["expireTime"].as_str().unwrap().parse().unwrap();
    assert!(
        (before + 600..=now() + 600).contains(&expire.as_second()),
        "{expire}"
    );
    assert!(body["expireTime"].as_str().unwrap().ends_with('Z'));
    let issued = fake
        .issued_token(body["accessToken"].as_str().unwrap())
        .unwrap();
    assert_eq!(issued.subject, RUNNER);
    assert!(!issued.federated);
    assert_eq!(issued.scopes, [SCOPE]);

    let (status, body) = iam(
        &fake,
        Some(&federated),
        &broker_sa(),
        "generateAccessToken",
        &request,
    )
    .await;
    assert_google_error(
        status,
        &body,
        403,
        "PERMISSION_DENIED",
        "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
    );
    let unknown = "nobody@fake-project.iam.gserviceaccount.com";
    let (status, body) = iam(
        &fake,
        Some(&federated),
        unknown,
        "generateAccessToken",
        &request,
    )
    .await;
    assert_google_error(status, &body, 404, "NOT_FOUND", unknown);
    let broker_token = metadata_token(&fake).await;
    let (status, body) = iam(
        &fake,
        Some(&broker_token),
        RUNNER,
        "generateAccessToken",
        &request,
    )
    .await;
    assert_google_error(status, &body, 403, "PERMISSION_DENIED", "getAccessToken");
    let (status, body) = iam(&fake, None, RUNNER, "generateAccessToken", &request).await;
    assert_google_error(status, &body, 401, "UNAUTHENTICATED", "authentication");

    let bad_requests = [
        (json!({ "scope": [SCOPE], "lifetime": "3601s" }), "1 hour"),
        (
            json!({ "scope": [SCOPE], "lifetime": "0s" }),
            "larger then zero",
        ),
        (
            json!({ "scope": [SCOPE], "lifetime": "an hour" }),
            "lifetime",
        ),
        (json!({ "scope": [] }), "Scope"),
        (json!({ "lifetime": "60s" }), "Scope"),
        (json!({ "scopes": [SCOPE] }), "Unknown name \"scopes\""),
    ];
    for (request, fragment) in &bad_requests {
        let (status, body) = iam(
            &fake,
            Some(&federated),
            RUNNER,
            "generateAccessToken",
            request,
        )
        .await;
        assert_google_error(status, &body, 400, "INVALID_ARGUMENT", fragment);
    }
    // snake_case names are proto3 JSON too; lifetime defaults to an hour.
    let before = now();
    let (status, body) = iam(
        &fake,
        Some(&federated),
        RUNNER,
        "generateAccessToken",
        &json!({ "scope": [SCOPE] }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let expire: jiff::Timestamp = body["expireTime"].as_str().unwrap().parse().unwrap();
    assert!(
        (before + 3600..=now() + 3600).contains(&expire.as_second()),
        "{expire}"
    );
}

#[tokio::test]
async fn generate_id_token_output_verifies_with_google_certs() {
    let (fake, provider) = start().await;
    let federated = federated_token(&fake, &provider).await;
    let audience = "https://service-abc.a.run.app";
    let request = json!({ "audience": audience, "includeEmail": true });
    let (status, body) = iam(&fake, Some(&federated), RUNNER, "generateIdToken", &request).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap();

    let certs = fake.google_certs();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let jwk: Jwk = serde_json::from_value(
        certs["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap()
            .clone(),
    )
    .unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&["https://accounts.google.com"]);
    let claims =
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(&jwk).unwrap(), &validation)
            .unwrap()
            .claims;
    assert_eq!(claims["email"], RUNNER);
    assert_eq!(claims["email_verified"], true);
    let sub = claims["sub"].as_str().unwrap();
    assert!(
        sub.len() >= 20 && sub.bytes().all(|b| b.is_ascii_digit()),
        "{sub}"
    );
    assert_eq!(claims["azp"], sub);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );

    let (status, served) = read(
        client()
            .get(format!("{}/oauth2/v3/certs", fake.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(served, certs);

    let request = json!({ "audience": audience, "include_email": false });
    let (status, body) = iam(&fake, Some(&federated), RUNNER, "generateIdToken", &request).await;
    assert_eq!(status, 200, "{body}");
    let claims = jsonwebtoken::decode::<Value>(
        body["token"].as_str().unwrap(),
        &DecodingKey::from_jwk(&jwk).unwrap(),
        &validation,
    )
    .unwrap()
    .claims;
    assert!(claims.get("email").is_none(), "{claims}");

    let (status, body) = iam(
        &fake,
        Some(&federated),
        &broker_sa(),
        "generateIdToken",
        &request,
    )
    .await;
    assert_google_error(
        status,
        &body,
        403,
        "PERMISSION_DENIED",
        "iam.serviceAccounts.getOpenIdToken",
    );
    let (status, body) = iam(
        &fake,
        Some(&federated),
        RUNNER,
        "generateIdToken",
        &json!({ "includeEmail": true }),
    )
    .await;
    assert_google_error(status, &body, 400, "INVALID_ARGUMENT", "audience");
}

#[tokio::test]
async fn faults_behave_as_specified_and_every_call_is_counted() {
    let (fake, provider) = start().await;
    let broker_token = metadata_token(&fake).await;
    let federated = federated_token(&fake, &provider).await;
    let payload = json!({ "payload": "{}" });

    // Status: the next `times` calls only; Google JSON for googleapis.
    fake.inject(Api::SignJwt, Fault::Status(503), 2);
    for _ in 0..2 {
        let (status, body) = iam(
            &fake,
            Some(&broker_token),
            &broker_sa(),
            "signJwt",
            &payload,
        )
        .await;
        assert_google_error(status, &body, 503, "UNAVAILABLE", "");
    }
    let (status, _) = iam(
        &fake,
        Some(&broker_token),
        &broker_sa(),
        "signJwt",
        &payload,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(fake.calls(Api::SignJwt), 3);

    fake.inject(Api::Sts, Fault::Status(500), 1);
    let (status, body) = sts(&fake, &provider.sign(&provider.claims(ISSUER)), &[]).await;
    assert_google_error(status, &body, 500, "INTERNAL", "");
    fake.inject(Api::Sts, Fault::Status(400), 1);
    let (status, body) = sts(&fake, &provider.sign(&provider.claims(ISSUER)), &[]).await;
    assert_oauth_error(status, &body, "invalid_request", "");

    // TooManyRequests: 429 with Retry-After.
    fake.inject(
        Api::GenerateAccessToken,
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
        1,
    );
    let response = client()
        .post(format!(
            "{}/v1/projects/-/serviceAccounts/{RUNNER}:generateAccessToken",
            fake.url
        ))
        .bearer_auth(&federated)
        .json(&json!({ "scope": [SCOPE] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "7");
    let (status, body) = read(response).await;
    assert_google_error(status, &body, 429, "RESOURCE_EXHAUSTED", "");
    fake.inject(
        Api::Sts,
        Fault::TooManyRequests {
            retry_after_secs: 3,
        },
        1,
    );
    let response = client()
        .post(format!("{}/v1/token", fake.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3");
    assert_eq!(read(response).await.1["error"], "quota_exceeded");

    // Delay: then a normal answer.
    fake.inject(
        Api::MetadataToken,
        Fault::Delay(Duration::from_millis(400)),
        1,
    );
    // A 500 queued behind it: the call after the delayed one meets it, so the delay was
    // spent on one call (without asserting how fast the next one is).
    fake.inject(Api::MetadataToken, Fault::Status(500), 1);
    let started = Instant::now();
    metadata_token(&fake).await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(metadata_token_answer(&fake).await.0, 500);
    metadata_token(&fake).await;

    // MalformedJson: 200, JSON content type, truncated body.
    fake.inject(Api::OAuthToken, Fault::MalformedJson, 1);
    let response = client()
        .post(format!("{}/token", fake.url))
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(response.text().await.unwrap(), "{\"truncated\":");

    // PermissionDenied: the method's own permission.
    fake.inject(Api::GenerateIdToken, Fault::PermissionDenied, 1);
    let request = json!({ "audience": "x" });
    let (status, body) = iam(&fake, Some(&federated), RUNNER, "generateIdToken", &request).await;
    assert_google_error(
        status,
        &body,
        403,
        "PERMISSION_DENIED",
        "iam.serviceAccounts.getOpenIdToken",
    );
    let (status, _) = iam(&fake, Some(&federated), RUNNER, "generateIdToken", &request).await;
    assert_eq!(status, 200);

    // Metadata faults are plain text, with the Metadata-Flavor header.
    fake.inject(Api::MetadataEmail, Fault::Status(503), 1);
    let response = client()
        .get(format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/email",
            fake.url
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["metadata-flavor"], "Google");

    // Faults on the key endpoints, too.
    fake.inject(Api::GoogleCerts, Fault::Status(502), 1);
    fake.inject(Api::ServiceAccountJwks, Fault::MalformedJson, 1);
    let certs = client()
        .get(format!("{}/oauth2/v3/certs", fake.url))
        .send()
        .await
        .unwrap();
    assert_eq!(certs.status(), 502);
    let jwk_url = format!(
        "{}/service_accounts/v1/metadata/jwk/{}",
        fake.url,
        broker_sa()
    );
    let jwks = client().get(jwk_url).send().await.unwrap();
    assert_eq!(jwks.text().await.unwrap(), "{\"truncated\":");

    assert_eq!(fake.calls(Api::Sts), 4);
    assert_eq!(fake.calls(Api::GenerateAccessToken), 1);
    assert_eq!(fake.calls(Api::MetadataToken), 4);
    assert_eq!(fake.calls(Api::MetadataEmail), 1);
    assert_eq!(fake.calls(Api::OAuthToken), 1);
    assert_eq!(fake.calls(Api::GenerateIdToken), 2);
    assert_eq!(fake.calls(Api::GoogleCerts), 1);
    assert_eq!(fake.calls(Api::ServiceAccountJwks), 1);
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_the_fake_keeps_serving() {
    let (fake, _) = start().await;
    let token = metadata_token(&fake).await;
    let url = |path: &str| format!("{}{path}", fake.url);

    let response = client().get(url("/nowhere")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let response = client().get(url("/v1/token")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    let response = client().post(url("/oauth2/v3/certs")).send().await.unwrap();
    assert_eq!(response.status(), 405);

    let sign_jwt = url(&format!(
        "/v1/projects/-/serviceAccounts/{}:signJwt",
        broker_sa()
    ));
    for body in [
        "{",
        "[]",
        "\"x\"",
        "{\"payload\": 5}",
        "{\"payload\": \"{\"}",
    ] {
        let response = client()
            .post(&sign_jwt)
            .bearer_auth(&token)
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, body) = read(response).await;
        assert_google_error(status, &body, 400, "INVALID_ARGUMENT", "");
    }
    let bad_percent = url("/v1/projects/-/serviceAccounts/a%zz:signJwt");
    let response = client()
        .post(bad_percent)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let project = url(&format!(
        "/v1/projects/my-project/serviceAccounts/{}:signJwt",
        broker_sa()
    ));
    let response = client()
        .post(project)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    let response = client()
        .post(url("/v1/token"))
        .header("content-type", "application/json")
        .body("[")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let (status, body) = post_form(
        &url("/token"),
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", "e30.e30.!!"),
        ],
    )
    .await;
    assert_oauth_error(status, &body, "invalid_grant", "");
    let response = client()
        .get(url(
            "/computeMetadata/v1/instance/service-accounts/someone-else/token",
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let response = client()
        .get(url("/service_accounts/v1/metadata/jwk/nobody@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    metadata_token(&fake).await;
}
