//! The metadata agent (`token-broker agent`) as Google's client libraries meet it: path by
//! path against what GCE's metadata server answers, then the real Node `google-auth-library`
//! and Python `google-auth`, unmodified, detecting it and getting access tokens, ID tokens and
//! the project id from it; a device the broker refuses gets the broker's reason in the
//! libraries' errors. The broker is real (mutual TLS on loopback), Google is the in-process
//! fake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::fake_google::{Api, FakeGoogle, FakeGoogleConfig, Fault};
use crate::support::process::Process;
use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker, ISSUER};
use token_broker::device::agent::{serve, AgentConfig};
use token_broker::device::client::{BrokerClient, CachingClient};

const RUNNER: &str = "runner@fake-project.iam.gserviceaccount.com";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const USERINFO: &str = "https://www.googleapis.com/auth/userinfo.email";
const RUN_URL: &str = "https://my-service-abc.a.run.app";
const PROJECT: &str = "fake-project";
const PROJECT_NUMBER: u64 = 123456789012;
/// Beyond 2^53, as GCE's instance ids are: JSON readers must keep every digit.
const INSTANCE_ID: u64 = 5775171277418378123;
const HOSTNAME: &str = "sensor-1.plant.example";

struct World {
    fake: FakeGoogle,
    broker: TestBroker,
    /// A device the broker accepts, and one whose certificate its CRL lists.
    good: Leaf,
    revoked: Leaf,
}

async fn start() -> World {
    let fake = FakeGoogle::start(FakeGoogleConfig::new(ISSUER)).await;
    let mut setup = Setup::new();
    setup.google = Some(format!(
        "[google]\nproject_number = \"{PROJECT_NUMBER}\"\npool_id = \"devices\"\nprovider_id = \"token-broker\"\nsts_url = \"{0}\"\niam_credentials_url = \"{0}\"\nmetadata_url = \"{0}\"",
        fake.url
    ));
    setup.rules = format!(
        "[[clients]]\nname = \"devices\"\nmatch = {{ spiffe = [\"spiffe://test.example/device/*\"] }}\n\
         flows = [\"impersonate\", \"google-id-token\"]\nscopes = [\"{CLOUD_PLATFORM}\", \"{USERINFO}\"]\n\
         service_accounts = [\"{RUNNER}\"]\ntarget_audiences = [\"{RUN_URL}\"]\n"
    );
    let good = setup.intermediate.leaf(&LeafSpec::device("agent-1"));
    let revoked = setup.intermediate.leaf(&LeafSpec::device("agent-revoked"));
    setup.revoked = vec![revoked.serial];
    let broker = setup.start().await;
    let jwks: Value = broker.get_json("/jwks").await;
    fake.set_provider_jwks(jwks);
    World {
        fake,
        broker,
        good,
        revoked,
    }
}

/// An agent in this process for `device`, on a loopback port.
async fn start_agent(world: &World, device: &Leaf) -> SocketAddr {
    start_agent_for(world, device, Vec::new()).await
}

/// An agent serving only the local accounts `allowed_uids` (empty: all).
async fn start_agent_for(world: &World, device: &Leaf, allowed_uids: Vec<u32>) -> SocketAddr {
    let setup = &world.broker.setup;
    let cert = setup.write(&format!("{}.pem", device.serial), &device.chain_pem);
    let key = setup.write(&format!("{}-key.pem", device.serial), &device.key_pem);
    let client = BrokerClient::new(
        &world.broker.url(""),
        &cert,
        &key,
        Some(&setup.path("server-ca.pem")),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = AgentConfig {
        service_account: RUNNER.into(),
        scopes: vec![CLOUD_PLATFORM.into()],
        project_id: Some(PROJECT.into()),
        numeric_project_id: Some(PROJECT_NUMBER),
        instance_id: INSTANCE_ID,
        hostname: HOSTNAME.into(),
        zone: "on-premises".into(),
        allowed_uids,
    };
    tokio::spawn(serve(listener, config, CachingClient::new(client)));
    addr
}

struct Raw {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// One HTTP/1.1 GET as written here (so Host and every header are the test's choice);
/// `headers` replace the defaults of the same name, an empty value drops one.
async fn raw_get(agent: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Raw {
    raw_request(agent, "GET", target, headers).await
}

async fn raw_request(
    agent: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Raw {
    let mut all: Vec<(String, String)> = vec![
        ("Host".into(), "metadata.google.internal".into()),
        ("Metadata-Flavor".into(), "Google".into()),
    ];
    for (name, value) in headers {
        all.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        if !value.is_empty() {
            all.push(((*name).into(), (*value).into()));
        }
    }
    let mut request = format!("{method} {target} HTTP/1.1\r\n");
    for (name, value) in &all {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(agent).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        answer
    };
    // Nothing here may be held open (wait_for_change included).
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("{target}: no answer within 10 s"));
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Raw {
        status,
        headers,
        body: body.to_owned(),
    }
}

const V1: &str = "/computeMetadata/v1";
const TEXT: &str = "application/text";
const JSON: &str = "application/json";
const HTML: &str = "text/html; charset=UTF-8";

/// What GCE's metadata server answers to one request: (request target, extra headers,
/// status, content type, body).
type Row<'a> = (String, Vec<(&'a str, &'a str)>, u16, &'static str, Body);

/// A body exactly, as JSON compared as JSON, or a phrase it contains.
enum Body {
    Exact(String),
    Json(Value),
    Contains(&'static str),
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_answers_path_by_path_as_gce_does() {
    let world = start().await;
    let agent = start_agent(&world, &world.good).await;
    let account = json!({ "aliases": ["default"], "email": RUNNER, "scopes": [CLOUD_PLATFORM] });
    let zone = format!("projects/{PROJECT_NUMBER}/zones/on-premises");
    let redirect = |to: &str| Body::Exact(format!("{to}\n"));
    use Body::*;
    let sa = format!("{V1}/instance/service-accounts");
    let own_address = agent.to_string();
    let own_evil = format!("evil.example:{}", agent.port());
    let mut table: Vec<Row> = vec![
        // Detection: the root (Go pings it without Metadata-Flavor), and `instance`
        // (gcp-metadata), which GCE redirects to its listing.
        (
            "/".into(),
            vec![("Metadata-Flavor", "")],
            200,
            TEXT,
            Exact("computeMetadata/\n".into()),
        ),
        (
            "/".into(),
            vec![],
            200,
            TEXT,
            Exact("computeMetadata/\n".into()),
        ),
        (
            "/computeMetadata".into(),
            vec![],
            301,
            HTML,
            redirect("/computeMetadata/"),
        ),
        (
            "/computeMetadata/".into(),
            vec![],
            200,
            TEXT,
            Exact("v1/\n".into()),
        ),
        (V1.into(), vec![], 301, HTML, redirect(&format!("{V1}/"))),
        (
            format!("{V1}/"),
            vec![],
            200,
            TEXT,
            Exact("instance/\nproject/\nuniverse/\n".into()),
        ),
        (
            format!("{V1}/instance"),
            vec![],
            301,
            HTML,
            redirect(&format!("{V1}/instance/")),
        ),
        (
            format!("{V1}/instance/"),
            vec![],
            200,
            TEXT,
            Exact("attributes/\nhostname\nid\nname\nservice-accounts/\nzone\n".into()),
        ),
        (
            format!("{V1}/instance/?recursive=true"),
            vec![],
            200,
            JSON,
            Json(json!({
                "attributes": {}, "hostname": HOSTNAME, "id": INSTANCE_ID, "name": "sensor-1", "zone": zone,
                "serviceAccounts": { "default": account, RUNNER: account },
            })),
        ),
        (
            format!("{V1}/instance/id"),
            vec![],
            200,
            TEXT,
            Exact(INSTANCE_ID.to_string()),
        ),
        (
            format!("{V1}/instance/zone"),
            vec![],
            200,
            TEXT,
            Exact(zone.clone()),
        ),
        (
            format!("{V1}/instance/hostname"),
            vec![],
            200,
            TEXT,
            Exact(HOSTNAME.into()),
        ),
        (
            format!("{V1}/instance/name"),
            vec![],
            200,
            TEXT,
            Exact("sensor-1".into()),
        ),
        // No metadata attributes on a device: empty directories, and any key undefined.
        (
            format!("{V1}/instance/attributes/"),
            vec![],
            200,
            TEXT,
            Exact(String::new()),
        ),
        (
            format!("{V1}/project/attributes/?recursive=true"),
            vec![],
            200,
            JSON,
            Json(json!({})),
        ),
        // Project and universe.
        (
            format!("{V1}/project/project-id"),
            vec![],
            200,
            TEXT,
            Exact(PROJECT.into()),
        ),
        (
            format!("{V1}/project/numeric-project-id"),
            vec![],
            200,
            TEXT,
            Exact(PROJECT_NUMBER.to_string()),
        ),
        (
            format!("{V1}/project/"),
            vec![],
            200,
            TEXT,
            Exact("attributes/\nnumeric-project-id\nproject-id\n".into()),
        ),
        (
            format!("{V1}/project/?recursive=true"),
            vec![],
            200,
            JSON,
            Json(
                json!({ "attributes": {}, "numericProjectId": PROJECT_NUMBER, "projectId": PROJECT }),
            ),
        ),
        (
            format!("{V1}/universe/universe-domain"),
            vec![],
            200,
            TEXT,
            Exact("googleapis.com".into()),
        ),
        // Service accounts: listings, recursive JSON (Java reads `default.email` from the
        // recursive listing, Python `email` and `scopes` from the account's), values.
        (sa.clone(), vec![], 301, HTML, redirect(&format!("{sa}/"))),
        (
            format!("{sa}/"),
            vec![],
            200,
            TEXT,
            Exact(format!("default/\n{RUNNER}/\n")),
        ),
        (
            format!("{sa}/?recursive=true"),
            vec![],
            200,
            JSON,
            Json(json!({ "default": account, RUNNER: account })),
        ),
        (
            format!("{sa}/default"),
            vec![],
            301,
            HTML,
            redirect(&format!("{sa}/default/")),
        ),
        (
            format!("{sa}/default/"),
            vec![],
            200,
            TEXT,
            Exact("aliases\nemail\nidentity\nscopes\ntoken\n".into()),
        ),
        (
            format!("{sa}/default/?recursive=true"),
            vec![],
            200,
            JSON,
            Json(account.clone()),
        ),
        (
            format!("{sa}/default/?recursive=TRUE"),
            vec![],
            200,
            JSON,
            Json(account.clone()),
        ),
        (
            format!("{sa}/{RUNNER}/?recursive=true"),
            vec![],
            200,
            JSON,
            Json(account.clone()),
        ),
        (
            format!("{sa}/default/email"),
            vec![],
            200,
            TEXT,
            Exact(RUNNER.into()),
        ),
        (
            format!("{sa}/{RUNNER}/email"),
            vec![],
            200,
            TEXT,
            Exact(RUNNER.into()),
        ),
        (
            format!("{sa}/default/aliases"),
            vec![],
            200,
            TEXT,
            Exact("default\n".into()),
        ),
        (
            format!("{sa}/default/scopes"),
            vec![],
            200,
            TEXT,
            Exact(format!("{CLOUD_PLATFORM}\n")),
        ),
        (
            format!("{sa}/default/email?alt=json"),
            vec![],
            200,
            JSON,
            Json(json!(RUNNER)),
        ),
        (
            format!("{sa}/default/scopes?alt=json"),
            vec![],
            200,
            JSON,
            Json(json!([CLOUD_PLATFORM])),
        ),
        (
            format!("{sa}/default/email?alt=xml"),
            vec![],
            400,
            "text/plain; charset=utf-8",
            Contains("alt=\"xml\" is not served"),
        ),
        // What is not there: 404 as GCE, with its HTML page naming the path.
        (
            format!("{V1}/instance/attributes/ssh-keys"),
            vec![],
            404,
            HTML,
            Contains("<code>/computeMetadata/v1/instance/attributes/ssh-keys</code> was not found"),
        ),
        (
            format!("{sa}/other@fake-project.iam.gserviceaccount.com/token"),
            vec![],
            404,
            HTML,
            Contains("was not found"),
        ),
        (
            format!("{sa}/default/email/"),
            vec![],
            404,
            HTML,
            Contains("was not found"),
        ),
        (
            format!("{V1}//instance/"),
            vec![],
            404,
            HTML,
            Contains("was not found"),
        ),
        (
            "/computeMetadata/v1beta1/".into(),
            vec![],
            404,
            HTML,
            Contains("was not found"),
        ),
        // Metadata-Flavor, as GCE refuses it (the root excepted, above).
        (
            format!("{V1}/"),
            vec![("Metadata-Flavor", "")],
            403,
            HTML,
            Contains("Missing Metadata-Flavor:Google header"),
        ),
        (
            format!("{sa}/default/token"),
            vec![("Metadata-Flavor", "")],
            403,
            HTML,
            Contains("Missing Metadata-Flavor:Google header"),
        ),
        (
            format!("{sa}/default/token"),
            vec![("Metadata-Flavor", "Other")],
            403,
            HTML,
            Contains("Missing Metadata-Flavor:Google header"),
        ),
        (
            format!("{sa}/default/token"),
            vec![("X-Forwarded-For", "10.0.0.1")],
            403,
            HTML,
            Contains("X-Forwarded-For"),
        ),
        // wait_for_change: values here change only on restart, so a request that would
        // wait is refused at once; a stale last_etag gets the value at once, as on GCE.
        (
            format!("{V1}/instance/id?wait_for_change=true"),
            vec![],
            400,
            "text/plain; charset=utf-8",
            Contains("the request would wait forever"),
        ),
        (
            format!("{V1}/instance/id?wait_for_change=true&last_etag=0000000000000000"),
            vec![],
            200,
            TEXT,
            Exact(INSTANCE_ID.to_string()),
        ),
        (
            format!("{sa}/default/token?wait_for_change=true"),
            vec![],
            400,
            "text/plain; charset=utf-8",
            Contains("not served for tokens"),
        ),
        // Token and identity parameters the agent cannot honour, before any broker call.
        (
            format!("{sa}/default/identity"),
            vec![],
            400,
            "text/plain; charset=utf-8",
            Exact("non-empty audience parameter required\n".into()),
        ),
        (
            format!("{sa}/default/identity?audience="),
            vec![],
            400,
            "text/plain; charset=utf-8",
            Exact("non-empty audience parameter required\n".into()),
        ),
        (
            format!("{sa}/default/identity?audience={RUN_URL}&format=compact"),
            vec![],
            400,
            "text/plain; charset=utf-8",
            Contains("must be standard or full"),
        ),
        (
            format!("{sa}/default/identity?audience={RUN_URL}&licenses=maybe"),
            vec![],
            400,
            "text/plain; charset=utf-8",
            Contains("must be TRUE or FALSE"),
        ),
        (
            format!("{sa}/default/token?transport=mtls"),
            vec![],
            400,
            "text/plain; charset=utf-8",
            Contains("bound tokens are not available"),
        ),
        (
            format!("{sa}/default/token?bindCertificateFingerprint=abc"),
            vec![],
            400,
            "text/plain; charset=utf-8",
            Contains("bound tokens are not available"),
        ),
    ];
    // Host: GCE's own names, any case, with or without a port or the root dot
    // (gcp-metadata asks `metadata.google.internal.`), and this address; never a rebound
    // page's name.
    let email = format!("{sa}/default/email");
    let token = format!("{sa}/default/token");
    for host in [
        "169.254.169.254",
        "metadata.google.internal.",
        "Metadata.Google.Internal:80",
        "LocalHost",
        &own_address,
    ] {
        table.push((
            email.clone(),
            vec![("Host", host)],
            200,
            TEXT,
            Exact(RUNNER.into()),
        ));
    }
    for host in [
        "evil.example",
        &own_evil,
        "localhost.evil.example",
        "metadata.google.internal.evil.example",
        "127.0.0.1.nip.io",
        "[::1]",
        "",
    ] {
        let refused = Contains("Host header must name this metadata server");
        table.push((token.clone(), vec![("Host", host)], 403, HTML, refused));
    }
    for (target, headers, status, content_type, body) in &table {
        let answer = raw_get(agent, target, headers).await;
        let what = format!("{target} {headers:?}: {} {:?}", answer.status, answer.body);
        assert_eq!(answer.status, *status, "{what}");
        assert_eq!(answer.headers["metadata-flavor"], "Google", "{what}");
        assert_eq!(answer.headers["server"], "Metadata Server for VM", "{what}");
        assert_eq!(answer.headers["content-type"], *content_type, "{what}");
        match body {
            Exact(text) => assert_eq!(&answer.body, text, "{what}"),
            Json(value) => assert_eq!(
                &serde_json::from_str::<Value>(&answer.body).unwrap(),
                value,
                "{what}"
            ),
            Contains(phrase) => assert!(answer.body.contains(phrase), "{what}"),
        }
        // Values carry an ETag (16 hex digits, as GCE's); nothing else does.
        let etag = answer.headers.get("etag");
        assert_eq!(etag.is_some(), *status == 200, "{what}");
        if let Some(etag) = etag {
            assert!(
                etag.len() == 16 && etag.bytes().all(|b| b.is_ascii_hexdigit()),
                "{what}"
            );
        }
        if *status == 301 {
            let path = target.split('?').next().unwrap();
            let query = target
                .split_once('?')
                .map(|(_, q)| format!("?{q}"))
                .unwrap_or_default();
            assert_eq!(
                answer.headers["location"],
                format!("http://metadata.google.internal{path}/{query}"),
                "{what}"
            );
        }
    }
    // The redirect keeps the query, so `instance?recursive=true` still gets JSON.
    let answer = raw_get(agent, &format!("{V1}/instance?recursive=true"), &[]).await;
    assert_eq!(
        answer.headers["location"],
        format!("http://metadata.google.internal{V1}/instance/?recursive=true")
    );
    // A current last_etag would wait: refused at once like no last_etag.
    let current = raw_get(agent, &format!("{V1}/instance/id"), &[])
        .await
        .headers["etag"]
        .clone();
    let answer = raw_get(
        agent,
        &format!("{V1}/instance/id?wait_for_change=true&last_etag={current}"),
        &[],
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    // Another method: 405, naming the one served.
    let answer = raw_request(
        agent,
        "POST",
        &format!("{sa}/default/token"),
        &[("Content-Length", "0")],
    )
    .await;
    assert_eq!(
        (answer.status, answer.headers["allow"].as_str()),
        (405, "GET")
    );
    assert_eq!(answer.headers["metadata-flavor"], "Google");
    assert_eq!(
        world.fake.calls(Api::GenerateAccessToken),
        0,
        "none of this reached Google"
    );
    assert_eq!(
        world.fake.calls(Api::GenerateIdToken),
        0,
        "none of this reached Google"
    );

    // Tokens: GCE's JSON (`expires_in` in seconds), no ETag; cached per scope set.
    for _ in 0..3 {
        let answer = raw_get(
            agent,
            &format!("{sa}/default/token?scopes={CLOUD_PLATFORM}"),
            &[],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.headers["content-type"], JSON);
        assert!(!answer.headers.contains_key("etag"));
        let token: Value = serde_json::from_str(&answer.body).unwrap();
        let keys: Vec<&String> = token.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["access_token", "expires_in", "token_type"]);
        assert_eq!(token["token_type"], "Bearer");
        assert!((3000..=3600).contains(&token["expires_in"].as_i64().unwrap()));
        let issued = world
            .fake
            .issued_token(token["access_token"].as_str().unwrap())
            .unwrap();
        assert_eq!(issued.subject, RUNNER);
    }
    assert_eq!(world.fake.calls(Api::GenerateAccessToken), 1);
    // The identity endpoint as gcloud and .NET ask it; the token is Google's, for the audience.
    let answer = raw_get(
        agent,
        &format!("{sa}/default/identity?audience={RUN_URL}&format=full&licenses=FALSE"),
        &[],
    )
    .await;
    assert_eq!(
        (answer.status, answer.headers["content-type"].as_str()),
        (200, TEXT),
        "{}",
        answer.body
    );
    let claims = verify_google_id_token(&world.fake, &answer.body);
    assert_eq!(claims["email"], RUNNER);
    world.broker.stop().await;
}

/// The claims of an ID token signed with Google's (the fake's) keys for [`RUN_URL`].
fn verify_google_id_token(fake: &FakeGoogle, id_token: &str) -> Value {
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(fake.google_certs()).unwrap();
    let header = jsonwebtoken::decode_header(id_token).unwrap();
    let key =
        jsonwebtoken::DecodingKey::from_jwk(jwks.find(&header.kid.unwrap()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[RUN_URL]);
    jsonwebtoken::decode::<Value>(id_token, &key, &validation)
        .unwrap()
        .claims
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_device_gets_the_brokers_reason_as_the_token_answer() {
    let world = start().await;
    let sa = format!("{V1}/instance/service-accounts/default");
    let token = format!("{sa}/token");
    let identity = format!("{sa}/identity?audience={RUN_URL}&format=full");
    // (device, request, status, error, what the description says): a revoked certificate,
    // then a rule that does not allow what the library asked for.
    let cases = [
        (
            &world.revoked,
            token.clone(),
            401,
            "invalid_client",
            "certificate revoked",
        ),
        (
            &world.revoked,
            identity,
            401,
            "invalid_client",
            "certificate revoked",
        ),
        (
            &world.good,
            format!("{token}?scopes=https://www.googleapis.com/auth/admin"),
            400,
            "invalid_scope",
            "not allowed",
        ),
        (
            &world.good,
            format!("{sa}/identity?audience=https://elsewhere.example"),
            400,
            "invalid_target",
            "not allowed",
        ),
    ];
    for (device, target, status, code, reason) in cases {
        let agent = start_agent(&world, device).await;
        let answer = raw_get(agent, &target, &[]).await;
        assert_eq!(answer.status, status, "{target}: {}", answer.body);
        assert_eq!(answer.headers["metadata-flavor"], "Google");
        assert_eq!(answer.headers["content-type"], JSON);
        let error: Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(error["error"], code, "{error}");
        let description = error["error_description"].as_str().unwrap();
        assert!(description.contains(reason), "{error}");
        assert!(
            description.starts_with("token-broker: the broker refused"),
            "{error}"
        );
    }
    assert_eq!(world.fake.calls(Api::GenerateAccessToken), 0);
    assert_eq!(world.fake.calls(Api::GenerateIdToken), 0);
    world.broker.stop().await;
}

/// The environment a library process gets: the agent as its metadata server, and nothing
/// else it could take credentials or a project from.
fn library_command(program: &Path, agent: SocketAddr, home: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .env("GCE_METADATA_HOST", agent.to_string())
        .env("GCE_METADATA_IP", agent.to_string())
        .env("HOME", home)
        .env("CLOUDSDK_CONFIG", home.join("gcloud"));
    for variable in [
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_CLOUD_PROJECT",
        "GCLOUD_PROJECT",
        "GCP_PROJECT",
        "CLOUDSDK_CORE_PROJECT",
        "METADATA_SERVER_DETECTION",
        "NO_GCE_CHECK",
    ] {
        command.env_remove(variable);
    }
    command
}

/// Runs a library script to its JSON line on stdout.
async fn run_json(mut command: Command) -> Value {
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the library script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
    })
}

const NODE_SCRIPT: &str = r#"
const { GoogleAuth } = require('google-auth-library');
const RUN_URL = process.argv[1];
const message = async (f) => { try { await f(); return null; } catch (e) { return String(e && e.message); } };
(async () => {
  const auth = new GoogleAuth({ scopes: ['https://www.googleapis.com/auth/cloud-platform'] });
  const client = await auth.getClient();
  const result = { client: client.constructor.name };
  result.tokenError = await message(async () => { result.token = (await client.getAccessToken()).token; });
  result.projectId = await auth.getProjectId();
  const credentials = await auth.getCredentials();
  result.email = credentials.client_email;
  result.universe = await auth.getUniverseDomainFromMetadataServer();
  const idClient = await auth.getIdTokenClient(RUN_URL);
  result.idTokenError = await message(async () => {
    const headers = await idClient.getRequestHeaders(RUN_URL);
    const authorization = typeof headers.get === 'function' ? headers.get('authorization') : headers.Authorization;
    result.idToken = authorization.replace(/^Bearer /, '');
  });
  console.log(JSON.stringify(result));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

async fn run_node(world: &World, agent: SocketAddr) -> Value {
    let modules = support::require_node_modules();
    let node = support::require_tool("node", "nodejs");
    let mut command = library_command(&node, agent, world.broker.setup.dir.path());
    command
        .current_dir(&modules)
        .args(["-e", NODE_SCRIPT, RUN_URL]);
    run_json(command).await
}

#[tokio::test(flavor = "multi_thread")]
async fn node_google_auth_library_detects_the_agent_and_gets_tokens_and_the_project() {
    let world = start().await;
    let agent = start_agent(&world, &world.good).await;
    let answer = run_node(&world, agent).await;
    assert_eq!(answer["client"], "Compute", "{answer}");
    assert_eq!(answer["tokenError"], Value::Null, "{answer}");
    let issued = world
        .fake
        .issued_token(answer["token"].as_str().unwrap())
        .expect("a token the fake issued");
    assert_eq!(issued.subject, RUNNER);
    assert_eq!(answer["projectId"], PROJECT);
    assert_eq!(answer["email"], RUNNER);
    assert_eq!(answer["universe"], "googleapis.com");
    assert_eq!(answer["idTokenError"], Value::Null, "{answer}");
    assert_eq!(
        verify_google_id_token(&world.fake, answer["idToken"].as_str().unwrap())["email"],
        RUNNER
    );
    world.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_google_auth_library_errors_carry_the_brokers_reason() {
    let world = start().await;
    let agent = start_agent(&world, &world.revoked).await;
    let answer = run_node(&world, agent).await;
    // Detection and the project still work; the credentials are refused, with the reason.
    assert_eq!(answer["client"], "Compute", "{answer}");
    assert_eq!(answer["projectId"], PROJECT);
    for error in ["tokenError", "idTokenError"] {
        let message = answer[error]
            .as_str()
            .unwrap_or_else(|| panic!("{error}: {answer}"));
        assert!(
            message.contains("certificate revoked"),
            "{error}: {message}"
        );
    }
    assert_eq!(world.fake.calls(Api::GenerateAccessToken), 0);
    world.broker.stop().await;
}

const PYTHON_SCRIPT: &str = r#"
import json, sys
import google.auth, google.auth.transport.requests, google.oauth2.id_token
RUN_URL = sys.argv[1]
request = google.auth.transport.requests.Request()
credentials, project = google.auth.default()
result = {"kind": type(credentials).__module__ + "." + type(credentials).__name__, "project": project}
try:
    credentials.refresh(request)
    result["token"] = credentials.token
    result["email"] = credentials.service_account_email
    result["universe"] = credentials.universe_domain
except Exception as e:
    result["tokenError"] = str(e)
try:
    result["idToken"] = google.oauth2.id_token.fetch_id_token(request, RUN_URL)
except Exception as e:
    result["idTokenError"] = str(e)
print(json.dumps(result))
"#;

async fn run_python(world: &World, agent: SocketAddr) -> Value {
    let mut command = library_command(
        Path::new(crate::devices::python()),
        agent,
        world.broker.setup.dir.path(),
    );
    command.args(["-c", PYTHON_SCRIPT, RUN_URL]);
    run_json(command).await
}

#[tokio::test(flavor = "multi_thread")]
async fn python_google_auth_detects_the_agent_and_gets_tokens_and_the_project() {
    let world = start().await;
    let agent = start_agent(&world, &world.good).await;
    let answer = run_python(&world, agent).await;
    assert_eq!(
        answer["kind"], "google.auth.compute_engine.credentials.Credentials",
        "{answer}"
    );
    assert_eq!(answer["project"], PROJECT);
    assert_eq!(answer["email"], RUNNER, "{answer}");
    assert_eq!(answer["universe"], "googleapis.com");
    let issued = world
        .fake
        .issued_token(answer["token"].as_str().unwrap())
        .expect("a token the fake issued");
    assert_eq!(issued.subject, RUNNER);
    assert_eq!(
        verify_google_id_token(&world.fake, answer["idToken"].as_str().unwrap())["email"],
        RUNNER
    );
    world.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_google_auth_errors_carry_the_brokers_reason() {
    let world = start().await;
    let agent = start_agent(&world, &world.revoked).await;
    let answer = run_python(&world, agent).await;
    assert_eq!(answer["project"], PROJECT, "{answer}");
    for error in ["tokenError", "idTokenError"] {
        let message = answer[error]
            .as_str()
            .unwrap_or_else(|| panic!("{error}: {answer}"));
        assert!(
            message.contains("certificate revoked"),
            "{error}: {message}"
        );
    }
    world.broker.stop().await;
}

/// `token-broker agent` as a process: what its flags and their defaults put in the tree.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_command_serves_what_its_flags_say() {
    let world = start().await;
    let setup = &world.broker.setup;
    let cert = setup.write("agent-cert.pem", &world.good.chain_pem);
    let key = setup.write("agent-key.pem", &world.good.key_pem);
    let device_args = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "agent",
            "--url",
            &world.broker.url(""),
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "--ca",
            &setup.path("server-ca.pem").display().to_string(),
            "--service-account",
            RUNNER,
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    };
    // A project number that is not one is refused before anything is served.
    let out = Command::new(support::binary())
        .args(device_args(&["--numeric-project-id", "twelve"]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--numeric-project-id"));

    let mut command = Command::new(support::binary());
    command.args(device_args(&[
        // Port 0, and its line says which port: one picked here could be taken first.
        "--listen",
        "127.0.0.1:0",
        "--numeric-project-id",
        &PROJECT_NUMBER.to_string(),
        "--zone",
        "europe-west1-b",
    ]));
    let mut child = Process::spawn(command, setup.path("agent-command.log"));
    let serving: Value = serde_json::from_str(&child.line("metadata agent serving").await).unwrap();
    let agent: SocketAddr = serving["listen"].as_str().unwrap().parse().unwrap();
    let instance = raw_get(agent, &format!("{V1}/instance/?recursive=true"), &[]).await;
    let instance: Value = serde_json::from_str(&instance.body).unwrap();
    // The id defaults to a number naming the device's SPIFFE ID (stable across renewals).
    let digest = <sha2::Sha256 as sha2::Digest>::digest(b"spiffe://test.example/device/agent-1");
    let id = u64::from_be_bytes(digest[..8].try_into().unwrap()) >> 1;
    assert_eq!(instance["id"], id, "{instance}");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(instance["hostname"], hostname.trim());
    assert_eq!(
        instance["zone"],
        format!("projects/{PROJECT_NUMBER}/zones/europe-west1-b")
    );
    // No --project-id: not defined, as a key GCE lacks.
    let project = raw_get(agent, &format!("{V1}/project/"), &[]).await;
    assert_eq!(project.body, "attributes/\nnumeric-project-id\n");
    let project_id = raw_get(agent, &format!("{V1}/project/project-id"), &[]).await;
    assert_eq!(project_id.status, 404);
    let token = raw_get(
        agent,
        &format!("{V1}/instance/service-accounts/default/token"),
        &[],
    )
    .await;
    assert_eq!(token.status, 200, "{}", token.body);
    child.kill();
    world.broker.stop().await;
}

const TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// A broker request that Google holds (an ID token) delays no other request: a cached token
/// and a token of other scopes answer at once meanwhile, and the held request itself is
/// answered within the time client libraries wait, with a 503 that says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_request_for_one_token_delays_no_other() {
    let world = start().await;
    let agent = start_agent(&world, &world.good).await;
    let cached = raw_get(agent, TOKEN_PATH, &[]).await;
    assert_eq!(cached.status, 200, "{}", cached.body);
    world.fake.inject(Api::GenerateIdToken, Fault::Hold, 100);
    let held = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let answer = raw_get(
            agent,
            &format!("{V1}/instance/service-accounts/default/identity?audience={RUN_URL}"),
            &[],
        )
        .await;
        (answer, started.elapsed())
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    for target in [
        TOKEN_PATH.to_string(),
        format!("{TOKEN_PATH}?scopes={USERINFO}"),
    ] {
        let started = std::time::Instant::now();
        let answer = raw_get(agent, &target, &[]).await;
        assert_eq!(answer.status, 200, "{target}: {}", answer.body);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{target} waited {:?} for the held request",
            started.elapsed()
        );
    }
    let (held, waited) = held.await.unwrap();
    assert_eq!(held.status, 503, "{}", held.body);
    assert!(
        held.body.contains("no answer from the broker within"),
        "{}",
        held.body
    );
    assert!(waited < std::time::Duration::from_secs(3), "{waited:?}");
    world.fake.release();
    world.broker.stop().await;
}

/// Python's google-auth waits 3 s for each answer and retries: while Google hangs, every
/// answer comes in time, and the error the library raises carries the broker's reason.
#[tokio::test(flavor = "multi_thread")]
async fn python_google_auth_gets_the_brokers_reason_while_google_hangs() {
    let world = start().await;
    let agent = start_agent(&world, &world.good).await;
    world
        .fake
        .inject(Api::GenerateAccessToken, Fault::Hold, 1000);
    let answer = run_python(&world, agent).await;
    let message = answer["tokenError"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"));
    // The broker's own answer (its deadline passed with Google silent), whether the agent
    // passed it on at once or quoted it as the last answer while a new request waited.
    assert!(
        message.contains("Response status: 503")
            && message.contains("the broker refused (HTTP 503 temporarily_unavailable)"),
        "{message}"
    );
    assert!(!message.contains("Read timed out"), "{message}");
    world.fake.release();
    world.broker.stop().await;
}

/// Thousands of distinct requests from a local client: oversized ones are refused with a
/// clear answer, the rest leave the agent's memory flat (no entry per request kept).
#[tokio::test(flavor = "multi_thread")]
async fn distinct_requests_by_the_thousand_keep_the_agent_flat() {
    let world = start().await;
    let setup = &world.broker.setup;
    let cert = setup.write("flat-cert.pem", &world.good.chain_pem);
    let key = setup.write("flat-key.pem", &world.good.key_pem);
    let url = world.broker.url("");
    let ca = setup.path("server-ca.pem");
    let mut child = Process::start(
        &[
            "agent",
            "--url",
            &url,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
            "--service-account",
            RUNNER,
            "--listen",
            "127.0.0.1:0",
        ],
        setup.path("flat-agent.log"),
    );
    let serving: Value = serde_json::from_str(&child.line("metadata agent serving").await).unwrap();
    let agent: SocketAddr = serving["listen"].as_str().unwrap().parse().unwrap();
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .to_string();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    // Too long a request, too many scopes, too long a scope or audience: refused, said why.
    let long = "s".repeat(9000);
    let answer = raw_get(agent, &format!("{TOKEN_PATH}?scopes={long}"), &[]).await;
    assert_eq!(answer.status, 414, "{}", answer.body);
    let many = (0..40)
        .map(|i| format!("scope-{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let answer = raw_get(agent, &format!("{TOKEN_PATH}?scopes={many}"), &[]).await;
    assert_eq!(answer.status, 400);
    assert!(answer.body.contains("at most 32 scopes"), "{}", answer.body);
    let answer = raw_get(
        agent,
        &format!(
            "{V1}/instance/service-accounts/default/identity?audience={}",
            "a".repeat(2000)
        ),
        &[],
    )
    .await;
    assert_eq!(answer.status, 400);

    // Distinct spellings of one allowed request (order, repeats, separators): the broker
    // sorts and de-duplicates scopes, so each is a token; kept per spelling, they grew the
    // agent by megabytes.
    let distinct = |from: usize, count: usize| {
        (from..from + count).map(|i| {
            let items: Vec<&str> = (0..30)
                .map(|k| match (i >> (k % 13)) & 1 {
                    1 => CLOUD_PLATFORM,
                    _ => USERINFO,
                })
                .collect();
            let separator = [",", "%20", ",%20"][i % 3];
            format!("{TOKEN_PATH}?scopes={}", items.join(separator))
        })
    };
    let send = |targets: Vec<String>| async move {
        let mut statuses = std::collections::BTreeMap::new();
        for chunk in targets.chunks(16) {
            let mut answers = tokio::task::JoinSet::new();
            for target in chunk {
                let target = target.clone();
                answers.spawn(async move { raw_get(agent, &target, &[]).await });
            }
            let answers = answers.join_all().await;
            for answer in answers {
                *statuses.entry(answer.status).or_insert(0) += 1;
            }
        }
        statuses
    };
    // Warm up, then measure across thousands more.
    send(distinct(0, 300).collect()).await;
    let before = rss();
    let statuses = send(distinct(300, 4000).collect()).await;
    let after = rss();
    assert_eq!(statuses.get(&200), Some(&4000), "{statuses:?}");
    assert!(
        after < before + 3 * 1024,
        "the agent grew from {before} kB to {after} kB over 4,000 distinct requests"
    );
    child.kill();
    world.broker.stop().await;
}

/// `--allow-user`: the allowed local account gets a token, another local account gets 403
/// with the reason, and the refusal is counted in the log. Two accounts made for the test.
#[tokio::test(flavor = "multi_thread")]
async fn only_allowed_local_users_get_the_devices_tokens() {
    let user = |name: &str| -> u32 {
        let _ = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/false", name])
            .output();
        let out = Command::new("id")
            .args(["-u", name])
            .output()
            .expect("id (coreutils)");
        assert!(
            out.status.success(),
            "useradd {name} (passwd) failed; tests run as root in CI"
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let (allowed, other) = (user("tb-agent-allowed"), user("tb-agent-other"));
    let world = start().await;
    let agent = start_agent_for(&world, &world.good, vec![allowed]).await;
    let curl_as = move |name: &str| {
        let out = Command::new("runuser")
            .args([
                "-u",
                name,
                "--",
                "curl",
                "-s",
                "-w",
                "\n%{http_code}",
                "-H",
                "Metadata-Flavor: Google",
            ])
            .arg(format!("http://{agent}{TOKEN_PATH}"))
            .output()
            .expect("runuser (util-linux) and curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or_default();
        (code.to_string(), body.to_string())
    };
    let (code, body) = tokio::task::spawn_blocking(move || curl_as("tb-agent-allowed"))
        .await
        .unwrap();
    assert_eq!(code, "200", "{body}");
    let (code, body) = tokio::task::spawn_blocking(move || curl_as("tb-agent-other"))
        .await
        .unwrap();
    assert_eq!(code, "403", "{body}");
    assert!(
        body.contains(&format!(
            "local user {other} may not use this device's identity"
        )),
        "{body}"
    );
    // This process's own account is not allowed either.
    let answer = raw_get(agent, TOKEN_PATH, &[]).await;
    assert_eq!(answer.status, 403);
    let counted = support::logs::captured()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["refused_total"].as_u64().is_some())
        .count();
    assert!(counted >= 2, "refusals counted in the log");
    world.broker.stop().await;
}
