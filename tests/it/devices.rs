//! The device side with unmodified Google client libraries: the real `google-auth` Python
//! library gets credentials through the metadata agent (`GCE_METADATA_HOST`), against a
//! broker whose Google is the in-process fake; `token`'s exit codes. The executable-sourced
//! credential configuration (`token --format executable`) is in executable.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::fake_google::{FakeGoogle, FakeGoogleConfig};
use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker, ISSUER};
use serde_json::Value;
use token_broker::device::client::{BrokerClient, CachingClient};

const RUNNER: &str = "runner@fake-project.iam.gserviceaccount.com";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const RUN_URL: &str = "https://my-service-abc.a.run.app";

pub(crate) struct Device {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) ca: PathBuf,
}

pub(crate) async fn start() -> (FakeGoogle, TestBroker, Device) {
    let fake = FakeGoogle::start(FakeGoogleConfig::new(ISSUER)).await;
    let audience = FakeGoogleConfig::new(ISSUER).default_audience();
    let mut setup = Setup::new();
    setup.google = Some(format!(
        "[google]\nproject_number = \"123456789012\"\npool_id = \"devices\"\nprovider_id = \"token-broker\"\nsts_url = \"{0}\"\niam_credentials_url = \"{0}\"\nmetadata_url = \"{0}\"",
        fake.url
    ));
    setup.rules = format!(
        "[[clients]]\nname = \"devices\"\nmatch = {{ spiffe = [\"spiffe://test.example/device/*\"] }}\naudiences = [\"{audience}\"]\n\
         flows = [\"mtls-client-credentials\", \"impersonate\", \"google-id-token\"]\nscopes = [\"{CLOUD_PLATFORM}\"]\n\
         service_accounts = [\"{RUNNER}\"]\ntarget_audiences = [\"{RUN_URL}\"]\n"
    );
    let leaf = setup.intermediate.leaf(&LeafSpec::device("python-1"));
    let device = write_device(&setup, &leaf);
    let broker = setup.start().await;
    let jwks: Value = broker.get_json("/jwks").await;
    fake.set_provider_jwks(jwks);
    (fake, broker, device)
}

pub(crate) fn write_device(setup: &Setup, leaf: &Leaf) -> Device {
    let key = setup.write("device-key.pem", &leaf.key_pem);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    Device {
        cert: setup.write("device.pem", &leaf.chain_pem),
        key,
        ca: setup.path("server-ca.pem"),
    }
}

/// `python3` that can `import google.auth` (installed from PyPI when missing).
pub(crate) fn python() -> &'static str {
    support::require_python_modules("google.auth, requests", &["google-auth", "requests"])
}

fn run_python(script: &str, env: &[(&str, &str)], home: &Path) -> Value {
    let out = Command::new(python())
        .args(["-c", script])
        .envs(env.iter().copied())
        .env("HOME", home)
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn token_command(broker: &TestBroker, device: &Device, extra: &str) -> String {
    format!(
        "{} token --url https://localhost:{} --cert {} --key {} --ca {} --audience {} {extra}",
        support::binary().display(),
        broker.addr.port(),
        device.cert.display(),
        device.key.display(),
        device.ca.display(),
        FakeGoogleConfig::new(ISSUER).default_audience(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn token_command_errors_say_what_to_do() {
    let (_fake, broker, device) = start().await;
    let run = |extra: &str, key: Option<&Path>| {
        let mut args: Vec<String> = token_command(&broker, &device, extra)
            .split_whitespace()
            .skip(1)
            .map(str::to_owned)
            .collect();
        if let Some(key) = key {
            let at = args.iter().position(|a| a == "--key").unwrap();
            args[at + 1] = key.display().to_string();
        }
        let out = Command::new(support::binary()).args(args).output().unwrap();
        support::logs::assert_no_secrets(&String::from_utf8_lossy(&out.stderr), "token");
        out
    };
    // Refused by the broker: exit 2, its reason on stderr (the executable format's error is
    // in executable.rs).
    let out = run("--scope https://www.googleapis.com/auth/admin --service-account x@y.iam.gserviceaccount.com", None);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unauthorized_client") && stderr.contains("not allowed for client"),
        "{stderr}"
    );

    // A key readable by others: refused locally, with the fix.
    let loose = broker.setup.write(
        "loose-key.pem",
        &std::fs::read_to_string(&device.key).unwrap(),
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = run("", Some(&loose));
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    }
    // Broker unreachable: exit 3.
    let args: Vec<String> = token_command(&broker, &device, "")
        .replace(&format!("localhost:{}", broker.addr.port()), "localhost:1")
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect();
    let out = Command::new(support::binary()).args(args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));
    broker.stop().await;
}

async fn start_agent(broker: &TestBroker, device: &Device) -> std::net::SocketAddr {
    let client =
        BrokerClient::new(&broker.url(""), &device.cert, &device.key, Some(&device.ca)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = token_broker::device::agent::AgentConfig {
        service_account: RUNNER.into(),
        scopes: vec![CLOUD_PLATFORM.into()],
        project_id: "fake-project".into(),
        numeric_project_id: "123456789012".into(),
    };
    tokio::spawn(token_broker::device::agent::serve(
        listener,
        config,
        CachingClient::new(client),
    ));
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn google_auth_default_and_fetch_id_token_through_the_agent() {
    let (fake, broker, device) = start().await;
    let agent = start_agent(&broker, &device).await.to_string();
    let script = format!(
        r#"
import json
import google.auth, google.auth.transport.requests, google.oauth2.id_token
request = google.auth.transport.requests.Request()
creds, project = google.auth.default()
creds.refresh(request)
id_token = google.oauth2.id_token.fetch_id_token(request, "{RUN_URL}")
print(json.dumps({{"token": creds.token, "project": project, "id_token": id_token, "email": creds.service_account_email}}))
"#
    );
    let dir = broker.setup.dir.path().to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        run_python(
            &script,
            &[("GCE_METADATA_HOST", &agent), ("GCE_METADATA_IP", &agent)],
            &dir,
        )
    })
    .await
    .unwrap();
    assert_eq!(answer["project"], "fake-project");
    assert_eq!(answer["email"], RUNNER);
    let issued = fake
        .issued_token(answer["token"].as_str().unwrap())
        .expect("a token the fake issued");
    assert_eq!(issued.subject, RUNNER);
    // The Google-signed ID token verifies with Google's (the fake's) keys for the audience.
    let id_token = answer["id_token"].as_str().unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(fake.google_certs()).unwrap();
    let header = jsonwebtoken::decode_header(id_token).unwrap();
    let key =
        jsonwebtoken::DecodingKey::from_jwk(jwks.find(&header.kid.unwrap()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[RUN_URL]);
    let claims = jsonwebtoken::decode::<Value>(id_token, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["email"], RUNNER);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_answers_like_the_metadata_server_and_refuses_what_it_refuses() {
    let (fake, broker, device) = start().await;
    let agent = start_agent(&broker, &device).await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{agent}{path}"));
    let token_path = "/computeMetadata/v1/instance/service-accounts/default/token";

    let missing = get(token_path).send().await.unwrap();
    assert_eq!(missing.status(), 403);
    assert!(missing.text().await.unwrap().contains("Metadata-Flavor"));
    let forwarded = get(token_path)
        .header("Metadata-Flavor", "Google")
        .header("X-Forwarded-For", "10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(forwarded.status(), 403);
    let unknown = get("/computeMetadata/v1/instance/attributes/ssh-keys")
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.headers()["metadata-flavor"], "Google");
    assert_eq!(
        fake.calls(support::fake_google::Api::GenerateAccessToken),
        0,
        "refusals never reach Google"
    );

    let ping = get("/")
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), 200);
    assert_eq!(ping.headers()["metadata-flavor"], "Google");
    let email = get("/computeMetadata/v1/instance/service-accounts/default/email")
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(email.text().await.unwrap(), RUNNER);
    let scopes = get("/computeMetadata/v1/instance/service-accounts/default/scopes")
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(scopes.text().await.unwrap().trim(), CLOUD_PLATFORM);
    let numeric = get("/computeMetadata/v1/project/numeric-project-id")
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(numeric.text().await.unwrap(), "123456789012");

    // Tokens are cached: three asks, one trip through the broker to Google.
    for _ in 0..3 {
        let token: Value = get(&format!("{token_path}?scopes={CLOUD_PLATFORM}"))
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(token["token_type"], "Bearer");
        assert!(token["expires_in"].as_i64().unwrap() > 3000);
    }
    assert_eq!(
        fake.calls(support::fake_google::Api::GenerateAccessToken),
        1
    );
    broker.stop().await;
}

/// A raw HTTP/1.1 GET to the agent with this `Host` header: (status, body).
async fn get_with_host(agent: std::net::SocketAddr, path: &str, host: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(agent).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_answers_only_its_own_host_names() {
    let (fake, broker, device) = start().await;
    let agent = start_agent(&broker, &device).await;
    let token_path = "/computeMetadata/v1/instance/service-accounts/default/token";
    let email_path = "/computeMetadata/v1/instance/service-accounts/default/email";
    let port = agent.port();
    // A page on the device whose name was rebound to 127.0.0.1 sends its own name.
    for host in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        "localhost.evil.example".to_owned(),
        "metadata.google.internal.evil.example".to_owned(),
        "127.0.0.1.nip.io".to_owned(),
        "[::1]".to_owned(),
    ] {
        for path in [token_path, email_path] {
            let (status, body) = get_with_host(agent, path, &host).await;
            assert_eq!(status, 403, "{host} {path}: {body}");
            assert!(body.contains("Host"), "{host}: {body}");
        }
    }
    assert_eq!(
        fake.calls(support::fake_google::Api::GenerateAccessToken),
        0,
        "refused hosts never reach Google"
    );
    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        format!("LocalHost:{port}"),
        "metadata.google.internal".to_owned(),
        "Metadata.Google.Internal:80".to_owned(),
        "169.254.169.254".to_owned(),
        format!("169.254.169.254:{port}"),
    ] {
        let (status, body) = get_with_host(agent, email_path, &host).await;
        assert_eq!((status, body.as_str()), (200, RUNNER), "{host}");
    }
    let (status, body) = get_with_host(agent, token_path, "metadata.google.internal").await;
    assert_eq!(status, 200, "{body}");
    broker.stop().await;
}
