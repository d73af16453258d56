//! Tokens verified by an independent JWT library against the served JWKS, discovery, and
//! the HTTP surface (routes, methods, headers).

use crate::support::{self, Eku, LeafSpec, Setup, TestBroker, ISSUER};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::Value;

async fn get_json(broker: &TestBroker, path: &str) -> (reqwest::header::HeaderMap, Value) {
    let response = broker
        .client(None)
        .get(broker.url(path))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    let headers = response.headers().clone();
    (headers, response.json().await.unwrap())
}

/// Verifies `jwt` with jsonwebtoken using only what the broker publishes.
async fn verify(broker: &TestBroker, jwt: &str, audience: &str) -> Value {
    let (_, discovery) = get_json(broker, "/.well-known/openid-configuration").await;
    let jwks_path = discovery["jwks_uri"]
        .as_str()
        .unwrap()
        .strip_prefix(ISSUER)
        .unwrap()
        .to_owned();
    let (_, jwks) = get_json(broker, &jwks_path).await;
    let jwks: JwkSet = serde_json::from_value(jwks).unwrap();
    let header = decode_header(jwt).unwrap();
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let kid = header.kid.expect("kid in header");
    let jwk = jwks.find(&kid).expect("kid published in JWKS");
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[audience]);
    // Byte-identical issuer: the discovery document's, which is the configured one.
    validation.set_issuer(&[discovery["issuer"].as_str().unwrap()]);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "iat", "nbf", "iss", "aud", "sub"]);
    decode::<Value>(jwt, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
        .unwrap()
        .claims
}

#[tokio::test(flavor = "multi_thread")]
async fn token_verifies_against_served_jwks_with_exact_claims() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec {
        dns: vec!["dev-7.devices.test.example".into()],
        ..LeafSpec::device("dev-7")
    });
    let broker = setup.start().await;

    let before = token_broker::clock::unix_now();
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials&audience=aud-b")
        .await;
    let took = token_broker::clock::unix_now() - before;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:id_token"
    );
    // The rule's ttl (10m), less the whole seconds that passed since the token was minted.
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!(
        (600 - took..=600).contains(&expires_in),
        "expires_in {expires_in}, {took}s after asking"
    );
    assert_eq!(body["id_token"], body["access_token"]);
    let jwt = body["access_token"].as_str().unwrap();

    let claims = verify(&broker, jwt, "aud-b").await;
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["sub"], "spiffe://test.example/device/dev-7");
    assert_eq!(claims["aud"], "aud-b");
    assert_eq!(claims["client_id"], "devices");
    assert_eq!(
        claims["amr"],
        serde_json::json!(["mtls-client-credentials"])
    );
    assert_eq!(claims["fleet"], "test", "static claim from the rule");
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(claims["nbf"].as_i64().unwrap(), iat);
    assert_eq!(claims["exp"].as_i64().unwrap() - iat, 600);
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);

    // cnf binds the token to the presented certificate (RFC 8705).
    use base64::Engine;
    use sha2::Digest;
    let thumbprint =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&leaf.der));
    assert_eq!(claims["cnf"]["x5t#S256"], thumbprint);
    let client = &claims["client"];
    assert_eq!(client["x5_spiffe"], "spiffe://test.example/device/dev-7");
    assert_eq!(client["x5_dnssan"], "dev-7.devices.test.example");
    assert_eq!(client["x5_urisan"], "spiffe://test.example/device/dev-7");
    assert_eq!(client["x5_sha256"], hex(&sha2::Sha256::digest(&leaf.der)));
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf.der).unwrap();
    let serial = parsed.raw_serial();
    let significant = &serial[serial.iter().position(|b| *b != 0).unwrap_or(0)..];
    assert_eq!(client["x5_serial"], hex(significant));

    // Two tokens never share a jti.
    let (_, again) = broker
        .token(Some(&leaf), "grant_type=client_credentials&audience=aud-b")
        .await;
    let again = verify(&broker, again["access_token"].as_str().unwrap(), "aud-b").await;
    assert_ne!(again["jti"], claims["jti"]);
    broker.stop().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn audience_allow_list_and_default_audience() {
    let setup = Setup::new();
    let device = setup.intermediate.leaf(&LeafSpec::device("aud"));
    let gateway = setup.intermediate.leaf(&LeafSpec {
        spiffe: None,
        dns: vec!["gw-1.gateways.test.example".into()],
        ..LeafSpec::device("gw-1")
    });
    let broker = setup.start().await;

    let (status, body) = broker
        .token(
            Some(&device),
            "grant_type=client_credentials&audience=aud-evil",
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_target")),
        "{body}"
    );
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("aud-a, aud-b"));

    // No audience: the issuer's default audience.
    let (status, body) = broker
        .token(Some(&device), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    let claims = verify(&broker, body["access_token"].as_str().unwrap(), "aud-a").await;
    assert_eq!(claims["aud"], "aud-a");

    // A rule without `audiences` gets only the default; its client_id and DNS subject apply.
    let (status, body) = broker
        .token(
            Some(&gateway),
            "grant_type=client_credentials&client_id=gateway-client",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let claims = verify(&broker, body["access_token"].as_str().unwrap(), "aud-a").await;
    assert_eq!(claims["sub"], "gw-1.gateways.test.example");
    assert_eq!(claims["client_id"], "gateway-client");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        300
    );
    let (status, body) = broker
        .token(
            Some(&gateway),
            "grant_type=client_credentials&audience=aud-b",
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_target")),
        "{body}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn flows_not_allowed_or_not_available_are_refused() {
    let mut setup = Setup::new();
    setup.rules = r#"
[[clients]]
name = "readers"
match = { spiffe = ["spiffe://test.example/device/*"] }
flows = []
"#
    .into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("reader"));
    let broker = setup.start().await;
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("unauthorized_client")),
        "{body}"
    );
    // Google parameters with no Google flow enabled: no flow handles the request.
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials&scope=x")
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_combination_no_flow_takes_is_refused_naming_the_parameter_to_change() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("dev-8"));
    let broker = setup.start().await;
    for (form, says) in [
        (
            "target_audience=https://run.example",
            "target_audience needs service_account",
        ),
        (
            "target_audience=https://run.example&scope=x",
            "target_audience needs service_account",
        ),
        (
            "service_account=a@p.iam.gserviceaccount.com",
            "service_account needs scope (its access token) or target_audience",
        ),
        ("scope=x", "the parameters scope ask for a Google token"),
        (
            "scope=x&service_account=a@p.iam.gserviceaccount.com",
            "the parameters scope and service_account ask for a Google token, and this broker has no Google flow (its config has no [google])",
        ),
    ] {
        let (status, body) = broker
            .token(Some(&leaf), &format!("grant_type=client_credentials&{form}"))
            .await;
        assert_eq!((status, body["error"].as_str()), (400, Some("invalid_request")), "{form}: {body}");
        let description = body["error_description"].as_str().unwrap_or_default();
        assert!(description.contains(says), "{form}: {description}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_jwks_and_http_surface() {
    let setup = Setup::new();
    let broker = setup.start().await;

    let (headers, discovery) = get_json(&broker, "/.well-known/openid-configuration").await;
    assert_eq!(headers["cache-control"], "public, max-age=300");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(discovery["issuer"], ISSUER);
    assert_eq!(discovery["token_endpoint"], format!("{ISSUER}/token"));
    assert_eq!(discovery["jwks_uri"], format!("{ISSUER}/jwks"));
    assert_eq!(
        discovery["grant_types_supported"],
        serde_json::json!(["client_credentials"])
    );
    assert_eq!(
        discovery["token_endpoint_auth_methods_supported"],
        serde_json::json!(["tls_client_auth"])
    );
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    assert_eq!(
        discovery["subject_types_supported"],
        serde_json::json!(["public"])
    );
    assert_eq!(
        discovery["tls_client_certificate_bound_access_tokens"],
        true
    );
    assert!(discovery["claims_supported"]
        .as_array()
        .unwrap()
        .contains(&"cnf".into()));
    let (_, oauth) = get_json(&broker, "/.well-known/oauth-authorization-server").await;
    assert_eq!(oauth, discovery);

    let (_, jwks) = get_json(&broker, "/jwks").await;
    let key = &jwks["keys"][0];
    let mut members: Vec<&str> = key
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    members.sort_unstable();
    assert_eq!(
        members,
        ["alg", "crv", "kid", "kty", "use", "x", "y"],
        "public members only"
    );
    assert_eq!(key["use"], "sig");
    assert_eq!(key["alg"], "ES256");

    let client = broker.client(None);
    let root = client.get(broker.url("/")).send().await.unwrap();
    assert_eq!(root.status(), 307);
    assert_eq!(
        root.headers()["location"],
        "/.well-known/openid-configuration"
    );

    let missing = client.get(broker.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "not_found");

    let wrong = client.get(broker.url("/token")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "POST");
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");

    let wrong = client.post(broker.url("/jwks")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "GET, HEAD");

    let head = client.head(broker.url("/jwks")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.bytes().await.unwrap().len(), 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rsa_signing_key_and_key_set_with_several_keys() {
    let setup = Setup::new();
    // Two keys: an older ES256 and a newer RS256, which signs (last in name order).
    let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let new = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    setup.write("keys/signing-0001.pem", &old.serialize_pem());
    setup.write("keys/signing-0002.pem", &new.serialize_pem());
    let leaf = setup.intermediate.leaf(&LeafSpec::device("rsa-signed"));
    let broker = setup.start().await;

    let (_, jwks) = get_json(&broker, "/jwks").await;
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "every key is published");
    assert_eq!(keys[1]["kty"], "RSA");
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    let jwt = body["access_token"].as_str().unwrap();
    assert_eq!(decode_header(jwt).unwrap().alg, Algorithm::RS256);
    assert_eq!(
        decode_header(jwt).unwrap().kid.as_deref(),
        keys[1]["kid"].as_str()
    );
    verify(&broker, jwt, "aud-a").await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_counted_by_code_and_never_issue() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec {
        eku: Eku::Absent,
        ..LeafSpec::device("no-eku")
    });
    let broker = setup.start().await;
    let (status, _) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 401);
    let metrics = broker.metrics().await;
    assert_eq!(
        support::metric_value(
            &metrics,
            r#"token_broker_token_requests_total{code="401",error="invalid_client"}"#
        ),
        1.0
    );
    assert!(
        !metrics.contains("token_broker_tokens_issued_total{"),
        "nothing issued:\n{metrics}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_are_echoed_bounded() {
    let broker = Setup::new().start().await;
    let client = broker.client(None);
    let long = format!("/{}%00%1B", "x".repeat(8000));
    let missing = client.get(broker.url(&long)).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
    let description = body["error_description"].as_str().unwrap();
    assert!(description.len() < 300, "{} bytes", description.len());
    assert!(
        description.starts_with(&format!("no such endpoint \"/{}", "x".repeat(50))),
        "{description}"
    );
    assert!(description.contains("...") && description.contains("openid-configuration"));
    broker.stop().await;
}
