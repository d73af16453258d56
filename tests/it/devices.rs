//! The device side with unmodified Google client libraries: the real `google-auth` Python
//! library gets credentials through an executable-sourced credential configuration that
//! runs `token-broker token --format executable`, against a broker whose Google is the
//! in-process fake. The metadata agent has its own module (`agent.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::fake_google::{FakeGoogle, FakeGoogleConfig};
use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker, ISSUER};
use serde_json::Value;

const RUNNER: &str = "runner@fake-project.iam.gserviceaccount.com";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const RUN_URL: &str = "https://my-service-abc.a.run.app";

struct Device {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

async fn start() -> (FakeGoogle, TestBroker, Device) {
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

fn write_device(setup: &Setup, leaf: &Leaf) -> Device {
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
fn python() -> &'static str {
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
async fn google_auth_with_executable_sourced_credentials() {
    let (fake, broker, device) = start().await;
    let cache = broker.setup.path("token-cache.json");
    let config = serde_json::json!({
        "type": "external_account",
        "audience": FakeGoogleConfig::new(ISSUER).provider_resource(),
        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "token_url": format!("{}/v1/token", fake.url),
        "service_account_impersonation_url": format!("{}/v1/projects/-/serviceAccounts/{RUNNER}:generateAccessToken", fake.url),
        "credential_source": { "executable": {
            "command": token_command(&broker, &device, &format!("--format executable --cache {}", cache.display())),
            "timeout_millis": 60000
        }}
    });
    let config_path = broker
        .setup
        .write("device-credentials.json", &config.to_string());
    let script = r#"
import json
import google.auth.pluggable, google.auth.transport.requests
# The executable-sourced credential type google.auth.default() builds from this file
# (loaded directly: default() would also ask Cloud Resource Manager for a project id).
creds = google.auth.pluggable.Credentials.from_file(CONFIG, scopes=["https://www.googleapis.com/auth/cloud-platform"])
creds.refresh(google.auth.transport.requests.Request())
print(json.dumps({"token": creds.token}))
"#
    .replace("CONFIG", &format!("{:?}", config_path.display().to_string()));
    let dir = broker.setup.dir.path().to_owned();
    let answer = tokio::task::spawn_blocking(move || {
        run_python(
            &script,
            &[("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES", "1")],
            &dir,
        )
    })
    .await
    .unwrap();
    let issued = fake
        .issued_token(answer["token"].as_str().unwrap())
        .expect("a token the fake issued");
    assert_eq!(issued.subject, RUNNER);
    assert!(!issued.federated);
    // google-auth exchanged the broker's ID token itself: the fake saw it.
    assert_eq!(
        fake.last_subject_claims().unwrap()["sub"],
        "spiffe://test.example/device/python-1"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_executable_with_a_cache_asks_the_broker_once_per_token_lifetime() {
    let (_fake, broker, device) = start().await;
    let cache = broker.setup.path("cache.json");
    let issued =
        r#"token_broker_tokens_issued_total{client="devices",flow="mtls-client-credentials"}"#;
    let command = token_command(
        &broker,
        &device,
        &format!("--format executable --cache {}", cache.display()),
    );
    let mut tokens = Vec::new();
    for _ in 0..5 {
        let args: Vec<String> = command
            .split_whitespace()
            .skip(1)
            .map(str::to_owned)
            .collect();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(support::binary()).args(args).output().unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["version"], 1);
        assert_eq!(answer["success"], true);
        assert_eq!(
            answer["token_type"],
            "urn:ietf:params:oauth:token-type:id_token"
        );
        tokens.push(answer["id_token"].as_str().unwrap().to_owned());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        broker.metric(issued).await,
        1.0,
        "one broker request for five runs"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    broker.stop().await;
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
    // Refused by the broker: exit 2, its reason on stderr, AIP-4117 error on stdout.
    let out = run("--format executable --scope https://www.googleapis.com/auth/admin --service-account x@y.iam.gserviceaccount.com", None);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (answer["success"].as_bool(), answer["code"].as_str()),
        (Some(false), Some("unauthorized_client"))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not allowed for client"));

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
