//! Google flows end to end over real mTLS, against the in-process fake Google (which checks
//! what Google checks): STS exchange, impersonation, Google-signed ID tokens, the IAM signer,
//! the token cache, upstream failures and the AIP-4117 answer shape.

use std::time::{Duration, Instant};

use crate::support::fake_google::{Api, FakeGoogle, FakeGoogleConfig, Fault};
use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker, ISSUER};
use serde_json::Value;

const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const STORAGE_READ: &str = "https://www.googleapis.com/auth/devstorage.read_only";
const RUNNER: &str = "runner@fake-project.iam.gserviceaccount.com";
/// Allowed by the client rule, but Google refuses to let devices impersonate it (the
/// broker's own service account).
const FORBIDDEN_SA: &str = "token-broker@fake-project.iam.gserviceaccount.com";
const RUN_URL: &str = "https://my-service-abc.a.run.app";

/// Generous upstream timings: on a loaded machine a slow answer must not turn into a retry
/// (the tests count upstream calls) nor a 503. Tests about timeouts choose their own.
const REQUEST_TIMEOUT: &str = "10s";
const DEADLINE: &str = "30s";

fn google_section(fake: &FakeGoogle, credentials: &str) -> String {
    google_section_with(fake, credentials, REQUEST_TIMEOUT, DEADLINE)
}

fn google_section_with(
    fake: &FakeGoogle,
    credentials: &str,
    request_timeout: &str,
    deadline: &str,
) -> String {
    format!(
        r#"
[google]
project_number = "123456789012"
pool_id = "devices"
provider_id = "token-broker"
credentials = "{credentials}"
sts_url = "{url}"
iam_credentials_url = "{url}"
metadata_url = "{url}"
request_timeout = "{request_timeout}"
deadline = "{deadline}"
"#,
        url = fake.url
    )
}

fn rules(provider_audience: &str) -> String {
    format!(
        r#"
[[clients]]
name = "devices"
match = {{ spiffe = ["spiffe://test.example/device/*"] }}
audiences = ["aud-a", "{provider_audience}"]
flows = ["mtls-client-credentials", "sts-exchange", "impersonate", "google-id-token"]
scopes = ["{CLOUD_PLATFORM}", "{STORAGE_READ}"]
service_accounts = ["{RUNNER}", "{FORBIDDEN_SA}"]
target_audiences = ["{RUN_URL}"]

[[clients]]
name = "local-only"
match = {{ spiffe = ["spiffe://test.example/local/*"] }}
"#
    )
}

/// A fake Google and a broker using it with local keys; Google trusts the broker's JWKS.
async fn start() -> (FakeGoogle, TestBroker, Leaf) {
    start_with(REQUEST_TIMEOUT, DEADLINE).await
}

async fn start_with(request_timeout: &str, deadline: &str) -> (FakeGoogle, TestBroker, Leaf) {
    let fake = FakeGoogle::start(FakeGoogleConfig::new(ISSUER)).await;
    let mut setup = Setup::new();
    setup.google = Some(google_section_with(
        &fake,
        "metadata",
        request_timeout,
        deadline,
    ));
    setup.rules = rules(&FakeGoogleConfig::new(ISSUER).default_audience());
    let leaf = setup.intermediate.leaf(&LeafSpec::device("dev-g"));
    let broker = setup.start().await;
    let jwks: Value = broker.get_json("/jwks").await;
    fake.set_provider_jwks(jwks);
    (fake, broker, leaf)
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .extend_pairs(pairs)
        .finish()
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_exchange_gives_a_federated_token_for_the_device() {
    let (fake, broker, leaf) = start().await;
    let (status, body) = broker
        .token(Some(&leaf), &form(&[("scope", CLOUD_PLATFORM)]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body["scope"], CLOUD_PLATFORM);
    let issued = fake
        .issued_token(body["access_token"].as_str().unwrap())
        .expect("a token from Google");
    assert!(issued.federated);
    assert_eq!(
        issued.subject,
        FakeGoogleConfig::new(ISSUER).principal("spiffe://test.example/device/dev-g")
    );

    // What Google saw: the broker's token for the provider audience, exchanged as a JWT.
    let claims = fake.last_subject_claims().unwrap();
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(
        claims["aud"],
        FakeGoogleConfig::new(ISSUER).default_audience()
    );
    assert_eq!(claims["amr"], serde_json::json!(["sts-exchange"]));
    let request = fake.last_sts_request().unwrap();
    assert_eq!(
        request["subject_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    assert_eq!(
        request["audience"],
        FakeGoogleConfig::new(ISSUER).provider_resource()
    );

    // A scope the rule does not allow: refused before any upstream call.
    let calls = fake.calls(Api::Sts);
    let (status, body) = broker
        .token(
            Some(&leaf),
            &form(&[("scope", "https://www.googleapis.com/auth/admin")]),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope")),
        "{body}"
    );
    assert_eq!(fake.calls(Api::Sts), calls);

    // A client whose rule does not enable the flow.
    let local = broker.setup.intermediate.leaf(&LeafSpec {
        spiffe: Some("spiffe://test.example/local/l1".into()),
        ..LeafSpec::device("l1")
    });
    let (status, body) = broker
        .token(Some(&local), &form(&[("scope", CLOUD_PLATFORM)]))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("unauthorized_client")),
        "{body}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn impersonation_and_its_refusals() {
    let (fake, broker, leaf) = start().await;
    let request = form(&[("scope", STORAGE_READ), ("service_account", RUNNER)]);
    let (status, body) = broker.token(Some(&leaf), &request).await;
    assert_eq!(status, 200, "{body}");
    let issued = fake
        .issued_token(body["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(issued.subject, RUNNER);
    assert_eq!(issued.scopes, vec![STORAGE_READ.to_owned()]);
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((3500..=3600).contains(&expires_in), "{expires_in}");

    // Not in the rule: 403 without asking Google.
    let calls = fake.calls(Api::GenerateAccessToken);
    let (status, body) = broker
        .token(
            Some(&leaf),
            &form(&[
                ("scope", STORAGE_READ),
                ("service_account", "admin@x.iam.gserviceaccount.com"),
            ]),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("unauthorized_client")),
        "{body}"
    );
    assert_eq!(fake.calls(Api::GenerateAccessToken), calls);

    // In the rule, but Google denies: 403 with Google's own words.
    let (status, body) = broker
        .token(
            Some(&leaf),
            &form(&[("scope", STORAGE_READ), ("service_account", FORBIDDEN_SA)]),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("unauthorized_client")),
        "{body}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("iam.serviceAccounts.getAccessToken"),
        "{body}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn google_signed_id_token_for_cloud_run() {
    let (fake, broker, leaf) = start().await;
    let (status, body) = broker
        .token(
            Some(&leaf),
            &form(&[("target_audience", RUN_URL), ("service_account", RUNNER)]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:id_token"
    );
    let token = body["id_token"].as_str().unwrap();
    assert_eq!(body["access_token"], token);
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(fake.google_certs()).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let key =
        jsonwebtoken::DecodingKey::from_jwk(jwks.find(&header.kid.unwrap()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[RUN_URL]);
    validation.set_issuer(&["https://accounts.google.com"]);
    let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["email"], RUNNER);

    let (status, body) = broker
        .token(
            Some(&leaf),
            &form(&[
                ("target_audience", "https://evil.example"),
                ("service_account", RUNNER),
            ]),
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
async fn cache_serves_repeats_and_separates_keys() {
    let (fake, broker, leaf) = start().await;
    let request = form(&[("scope", STORAGE_READ), ("service_account", RUNNER)]);
    let mut tokens = Vec::new();
    for _ in 0..5 {
        let (status, body) = broker.token(Some(&leaf), &request).await;
        assert_eq!(status, 200, "{body}");
        tokens.push(body["access_token"].as_str().unwrap().to_owned());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "one token served from cache");
    assert_eq!(fake.calls(Api::Sts), 1);
    assert_eq!(fake.calls(Api::GenerateAccessToken), 1);
    assert_eq!(
        broker.metric("token_broker_token_cache_hits_total").await,
        4.0
    );
    assert_eq!(
        broker.metric("token_broker_token_cache_misses_total").await,
        1.0
    );

    // Scope order does not matter; another scope set or another device does.
    let reordered = form(&[
        ("scope", &format!("{CLOUD_PLATFORM} {STORAGE_READ}")),
        ("service_account", RUNNER),
    ]);
    let same = form(&[
        ("scope", &format!("{STORAGE_READ} {CLOUD_PLATFORM}")),
        ("service_account", RUNNER),
    ]);
    broker.token(Some(&leaf), &reordered).await;
    broker.token(Some(&leaf), &same).await;
    assert_eq!(fake.calls(Api::GenerateAccessToken), 2);
    let other = broker.setup.intermediate.leaf(&LeafSpec::device("dev-h"));
    broker.token(Some(&other), &request).await;
    assert_eq!(fake.calls(Api::GenerateAccessToken), 3);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_identical_requests_make_one_upstream_call() {
    // The longest timeouts there are: the held call must not turn into retries.
    let (fake, broker, leaf) = start_with("60s", "5m").await;
    // The mint is held until all fifty requests have reached the broker, so that every one
    // of them arrives while the first is still minting (no timing involved).
    fake.inject(Api::Sts, Fault::Hold, 1);
    let broker = std::sync::Arc::new(broker);
    let leaf = std::sync::Arc::new(leaf);
    let request = form(&[("scope", STORAGE_READ), ("service_account", RUNNER)]);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (broker, leaf, request) = (broker.clone(), leaf.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            broker.token(Some(&leaf), &request).await
        }));
    }
    // Each request is authenticated (a verified-chain cache hit or miss) before it asks for
    // the token.
    support::wait_until("all fifty requests to be authenticated", || async {
        let text = broker.metrics().await;
        let count = |result| {
            support::metric_value(
                &text,
                &format!("token_broker_verified_chain_cache_{result}_total"),
            )
        };
        count("hits") + count("misses") == 50.0
    })
    .await;
    assert_eq!(fake.calls(Api::Sts), 1, "single-flight while minting");
    assert!(
        tasks.iter().all(|task| !task.is_finished()),
        "a request was answered while the only mint was held"
    );
    fake.release();
    let mut tokens = std::collections::HashSet::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
        tokens.insert(body["access_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        broker.metric("token_broker_token_cache_misses_total").await,
        1.0
    );
    assert_eq!(fake.calls(Api::Sts), 1, "single-flight");
    assert_eq!(fake.calls(Api::GenerateAccessToken), 1, "single-flight");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_failures_are_retried_or_answered_clearly() {
    // A deadline short enough to wait out (the 503 case), but no slow answer times out.
    let (fake, broker, leaf) = start_with(REQUEST_TIMEOUT, REQUEST_TIMEOUT).await;
    // Each case uses its own device, so no answer comes from the cache.
    let sts = form(&[("scope", CLOUD_PLATFORM)]);

    // One 500: retried, the device never notices.
    fake.inject(Api::Sts, Fault::Status(500), 1);
    let (status, body) = broker.token(Some(&leaf), &sts).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.calls(Api::Sts), 2);
    assert_eq!(
        broker
            .metric(r#"token_broker_upstream_requests_total{api="sts",code="500"}"#)
            .await,
        1.0
    );

    // 429 with Retry-After: honoured, then success.
    let other = broker.setup.intermediate.leaf(&LeafSpec::device("dev-429"));
    fake.inject(
        Api::Sts,
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        1,
    );
    let started = Instant::now();
    let (status, body) = broker.token(Some(&other), &sts).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );

    // Unavailable for longer than the deadline: 503 temporarily_unavailable + Retry-After.
    let third = broker.setup.intermediate.leaf(&LeafSpec::device("dev-503"));
    fake.inject(Api::Sts, Fault::Status(503), 1000);
    let response = broker.post_token(Some(&third), &sts).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hanging_malformed_and_denied_upstreams() {
    let (fake, broker, leaf) = start_with("1s", "3s").await;
    let request = form(&[("scope", STORAGE_READ), ("service_account", RUNNER)]);

    // Google hangs (STS slow, then IAM hanging): the device gets a 503 once the one request
    // deadline (3s) is spent: not a hang, and not a deadline per upstream call (12s here).
    // Only a hang fails the liveness deadline; attempts are counted instead of timed: each
    // IAM attempt hangs for a whole request_timeout (1s) after STS's 0.9s, so at most three
    // start within the 3s deadline (fewer on a slow machine, never more).
    fake.inject(Api::Sts, Fault::Delay(Duration::from_millis(900)), 100);
    fake.inject(Api::GenerateAccessToken, Fault::Hold, 100);
    let response =
        tokio::time::timeout(support::PATIENCE, broker.post_token(Some(&leaf), &request))
            .await
            .expect("the device got an answer: the request deadline ended the hanging call");
    assert_eq!(response.status(), 503);
    let headers = response.headers().clone();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable", "{body}");
    assert_eq!(
        headers.get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1"),
        "{body}"
    );
    let attempts = fake.calls(Api::GenerateAccessToken);
    assert!(
        attempts <= 3,
        "{attempts} IAM attempts within a 3s deadline"
    );
    broker.stop().await;

    let (fake, broker, leaf) = start().await;
    fake.inject(Api::GenerateAccessToken, Fault::MalformedJson, 1);
    let (status, body) = broker.token(Some(&leaf), &request).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("temporarily_unavailable")),
        "{body}"
    );
    assert_eq!(
        fake.calls(Api::GenerateAccessToken),
        1,
        "unreadable answers are not retried"
    );

    fake.inject(Api::Sts, Fault::PermissionDenied, 1);
    let (status, body) = broker.token(Some(&leaf), &request).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("unauthorized_client")),
        "{body}"
    );
    // Failures are not cached: the next request succeeds.
    let (status, body) = broker.token(Some(&leaf), &request).await;
    assert_eq!(status, 200, "{body}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn external_credential_answers_in_the_aip_4117_shape() {
    let (_fake, broker, leaf) = start().await;
    let audience = FakeGoogleConfig::new(ISSUER).default_audience();
    let (status, body) = broker
        .token(
            Some(&leaf),
            &form(&[("format", "external_credential"), ("audience", &audience)]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(body["success"], true);
    assert_eq!(
        body["token_type"],
        "urn:ietf:params:oauth:token-type:id_token"
    );
    let exp = body["expiration_time"].as_i64().unwrap();
    assert!(exp > support_now());
    assert!(body["id_token"].as_str().unwrap().starts_with("ey"));
    let mut keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "expiration_time",
            "id_token",
            "success",
            "token_type",
            "version"
        ]
    );

    let (status, body) = broker
        .token(None, &form(&[("format", "external_credential")]))
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["version"], 1);
    assert_eq!(body["success"], false);
    assert_eq!(body["code"], "invalid_client");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("no client certificate"));

    let (status, body) = broker
        .token(
            Some(&leaf),
            &form(&[("format", "external_credential"), ("scope", CLOUD_PLATFORM)]),
        )
        .await;
    assert_eq!(
        (status, body["success"].as_bool()),
        (400, Some(false)),
        "{body}"
    );
    broker.stop().await;
}

fn support_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The IAM signer: Google signs the broker's tokens; the broker holds no key.
pub(crate) async fn start_iam(
    credentials: impl FnOnce(&FakeGoogle, &Setup) -> String,
) -> (FakeGoogle, TestBroker, Leaf) {
    let fake = FakeGoogle::start(FakeGoogleConfig::new(ISSUER)).await;
    let mut setup = Setup::new();
    let credentials = credentials(&fake, &setup);
    setup.google = Some(google_section(&fake, &credentials));
    let broker_sa = FakeGoogleConfig::new(ISSUER).broker_service_account;
    setup.signer = Some(format!(
        "[signer]\nkind = \"iam\"\nservice_account = \"{broker_sa}\"\njwks_url = \"{}/service_accounts/v1/metadata/jwk/{broker_sa}\"",
        fake.url
    ));
    setup.rules = rules(&FakeGoogleConfig::new(ISSUER).default_audience());
    let leaf = setup.intermediate.leaf(&LeafSpec::device("dev-iam"));
    let broker = setup.start().await;
    fake.set_provider_jwks(fake.service_account_jwks());
    (fake, broker, leaf)
}

async fn assert_iam_signed(fake: &FakeGoogle, broker: &TestBroker, leaf: &Leaf) {
    let discovery: Value = broker.get_json("/.well-known/openid-configuration").await;
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        serde_json::json!(["RS256"])
    );
    let jwks_uri = discovery["jwks_uri"].as_str().unwrap();
    assert!(jwks_uri.starts_with(&fake.url), "{jwks_uri}");
    let redirect = broker
        .client(None)
        .get(broker.url("/jwks"))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 307);
    assert_eq!(redirect.headers()["location"], jwks_uri);

    let (status, body) = broker.token(Some(leaf), &form(&[])).await;
    assert_eq!(status, 200, "{body}");
    let jwt = body["access_token"].as_str().unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet =
        reqwest::get(jwks_uri).await.unwrap().json().await.unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    let key =
        jsonwebtoken::DecodingKey::from_jwk(jwks.find(&header.kid.unwrap()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&["aud-a"]);
    validation.set_issuer(&[ISSUER]);
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "spiffe://test.example/device/dev-iam");

    // signJwt is an upstream call: cached like the Google flows.
    let (_, again) = broker.token(Some(leaf), &form(&[])).await;
    assert_eq!(again["access_token"], body["access_token"]);
    assert_eq!(fake.calls(Api::SignJwt), 1);

    // Google flows work with IAM-signed subject tokens too.
    let (status, body) = broker
        .token(Some(leaf), &form(&[("scope", CLOUD_PLATFORM)]))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn iam_signer_with_metadata_server_credentials() {
    let (fake, broker, leaf) = start_iam(|_, _| "metadata".into()).await;
    assert_iam_signed(&fake, &broker, &leaf).await;
    assert_eq!(
        fake.calls(Api::MetadataToken),
        1,
        "the broker's own token is cached"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn iam_signer_with_a_service_account_key_file() {
    let (fake, broker, leaf) = start_iam(|fake, setup| {
        setup
            .write("broker-sa.json", &fake.service_account_key_file())
            .display()
            .to_string()
    })
    .await;
    assert_iam_signed(&fake, &broker, &leaf).await;
    assert_eq!(fake.calls(Api::OAuthToken), 1);
    assert_eq!(fake.calls(Api::MetadataToken), 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_token_is_no_permission_after_the_rule_changes() {
    let (fake, broker, leaf) = start().await;
    let request = form(&[("scope", STORAGE_READ), ("service_account", RUNNER)]);
    assert_eq!(broker.token(Some(&leaf), &request).await.0, 200);
    assert_eq!(broker.token(Some(&leaf), &request).await.0, 200);
    assert_eq!(
        fake.calls(Api::GenerateAccessToken),
        1,
        "the second answer came from the cache"
    );

    // The rule no longer lists the service account: refused, cache or not.
    let config = std::fs::read_to_string(&broker.config_path).unwrap();
    let narrowed = config.replace(
        &format!("service_accounts = [\"{RUNNER}\", "),
        "service_accounts = [",
    );
    assert_ne!(narrowed, config);
    std::fs::write(&broker.config_path, narrowed).unwrap();
    broker.live.reload().unwrap();
    let (status, body) = broker.token(Some(&leaf), &request).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("unauthorized_client")),
        "{body}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_changes_what_tokens_carry_empties_the_token_cache() {
    let (fake, broker, leaf) = start().await;
    let sts = form(&[("scope", CLOUD_PLATFORM)]);
    assert_eq!(broker.token(Some(&leaf), &sts).await.0, 200);
    assert_eq!(broker.token(Some(&leaf), &sts).await.0, 200);
    assert_eq!(
        fake.calls(Api::Sts),
        1,
        "the second answer came from the cache"
    );

    // A reload changing nothing tokens carry keeps the cache.
    broker.live.reload().unwrap();
    assert_eq!(broker.token(Some(&leaf), &sts).await.0, 200);
    assert_eq!(
        fake.calls(Api::Sts),
        1,
        "an unchanged reload keeps the cache"
    );

    // The rule now adds a claim: the next token is minted anew, carrying it.
    let config = std::fs::read_to_string(&broker.config_path).unwrap();
    let changed = config.replacen(
        "name = \"devices\"\n",
        "name = \"devices\"\nclaims = { fleet = \"second\" }\n",
        1,
    );
    assert_ne!(changed, config);
    std::fs::write(&broker.config_path, changed).unwrap();
    broker.live.reload().unwrap();
    let (status, body) = broker.token(Some(&leaf), &sts).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        fake.calls(Api::Sts),
        2,
        "a fresh upstream call after the reload"
    );
    assert_eq!(fake.last_subject_claims().unwrap()["fleet"], "second");
    broker.stop().await;
}

/// The request id a 5xx description ends with.
fn request_id(description: &str) -> String {
    let (_, rest) = description
        .split_once("request id ")
        .unwrap_or_else(|| panic!("no request id in {description:?}"));
    let id: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || *c == '-')
        .collect();
    assert_eq!(id.len(), 36, "{description:?}");
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_failures_reach_devices_as_a_request_id_and_the_log_as_details() {
    let (fake, broker, leaf) = start().await;
    let request = form(&[("scope", STORAGE_READ), ("service_account", RUNNER)]);
    let rejected = "Pool projects/123456789012/workloadIdentityPools/devices DETAIL-REJECTED-7f3a";
    let unavailable = "backend iamcredentials-internal.corp:8443 DETAIL-UNAVAILABLE-9c1e";
    for (fault, times, status, detail) in [
        (
            Fault::StatusWithMessage(400, rejected.into()),
            1,
            502,
            "DETAIL-REJECTED-7f3a",
        ),
        (
            Fault::StatusWithMessage(503, unavailable.into()),
            1000,
            503,
            "DETAIL-UNAVAILABLE-9c1e",
        ),
    ] {
        fake.inject(Api::GenerateAccessToken, fault, times);
        let (got, body) = broker.token(Some(&leaf), &request).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(body["error"], "temporarily_unavailable", "{body}");
        let description = body["error_description"].as_str().unwrap();
        for secret in [detail, "123456789012", "internal"] {
            assert!(!description.contains(secret), "{description}");
        }
        assert!(description.contains("retry"), "{description}");
        let id = request_id(description);
        let logged = support::logs::captured();
        let lines: Vec<&str> = logged.lines().filter(|l| l.contains(&id)).collect();
        assert!(
            lines.iter().any(|l| l.contains(detail)),
            "no log line with {id} and {detail} in {lines:#?}"
        );
    }
    broker.stop().await;
}
