//! TLS session resumption with ticket keys shared by replicas (`server.session_ticket_keys`):
//! a returning device resumes on any replica holding the key file, and a resumed connection
//! keeps every guarantee of a full handshake, because the broker validates the chain the
//! ticket restores on every request (revocation, expiry), and only tickets under the file's
//! current or previous key open.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::HandshakeKind;
use rustls_pki_types::ServerName;
use serde_json::Value;
use time::{Duration, OffsetDateTime};
use token_broker::broker::Broker;
use token_broker::config::Config;
use token_broker::live::Live;
use token_broker::metrics::Metrics;
use token_broker::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, logs, LeafSpec, Setup, TestBroker};

pub(crate) const RESUMED: &str = "token_broker_tls_resumed_handshakes_total";

/// Writes a fresh key file as an operator would (`rotate-ticket-keys`), its keys known to
/// the log scanner.
pub(crate) fn rotate(path: &Path) {
    token_broker::tickets::rotate(path).unwrap();
    register_keys(path);
}

fn register_keys(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    for key in text.lines().filter(|l| !l.starts_with('#')) {
        logs::register_key(&format!("-----BEGIN-----\n{key}\n-----END-----\n"));
    }
}

/// A setup whose broker reads its ticket keys from `ticket-keys`.
pub(crate) fn setup_with_tickets() -> Setup {
    let mut setup = Setup::new();
    setup.extra_server = "session_ticket_keys = \"ticket-keys\"\nreload_interval = \"1s\"".into();
    rotate(&setup.path("ticket-keys"));
    setup
}

/// Another broker process's worth of state serving `config` (a second replica).
struct Replica {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    async fn start(config: Config) -> Replica {
        let source = config.source.clone();
        let broker = Arc::new(Broker::build(config, Arc::new(Metrics::new())).unwrap());
        let live = Arc::new(Live::new(broker, Some(source)));
        let server = Server::bind(live).await.unwrap();
        let (addr, admin) = (server.local_addr().unwrap(), server.admin_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Replica {
            addr,
            admin,
            stop: Some(stop),
            task,
        }
    }

    async fn resumed(&self) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        support::metric_value(&text, RESUMED)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap();
    }
}

/// A device's TLS client: its certificate, and a session store kept across connections.
fn device(
    broker: &TestBroker,
    leaf: &support::Leaf,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    Arc::new(broker.tls_config(Some(leaf), &[version]))
}

/// One token request on a new connection: how the handshake went, the status and the body.
async fn token(
    client: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> (HandshakeKind, u16, Value) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let form = "grant_type=client_credentials";
    let request = format!(
        "POST /token HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // The server closes after its answer; a missing close_notify is not this test's concern.
    let _ = tls.read_to_end(&mut answer).await;
    let text = String::from_utf8(answer).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (kind, status, serde_json::from_str(body).unwrap())
}

const VERSIONS: [(&rustls::SupportedProtocolVersion, &str); 2] = [
    (&rustls::version::TLS13, "TLS 1.3"),
    (&rustls::version::TLS12, "TLS 1.2"),
];

#[tokio::test(flavor = "multi_thread")]
async fn a_device_resumes_on_another_replica_sharing_the_key_file() {
    let setup = setup_with_tickets();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("returning"));
    let first = setup.start().await;
    let second = Replica::start(Config::load(&first.config_path).unwrap()).await;
    for (version, name) in VERSIONS {
        let client = device(&first, &leaf, version);
        let (kind, status, body) = token(&client, first.addr).await;
        assert_eq!((kind, status), (HandshakeKind::Full, 200), "{name}: {body}");
        let before = second.resumed().await;
        let (kind, status, body) = token(&client, second.addr).await;
        assert_eq!(
            (kind, status),
            (HandshakeKind::Resumed, 200),
            "{name}: {body}"
        );
        assert_eq!(body["token_type"], "Bearer", "{name}: {body}");
        assert_eq!(second.resumed().await, before + 1.0, "{name}");
    }
    assert_eq!(first.metric(RESUMED).await, 0.0);
    second.stop().await;
    first.stop().await;
}

/// The ticket restores the chain of the first handshake, and the broker validates it on
/// every request: a certificate revoked after that handshake is refused on a resumed one.
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_revoked_after_the_first_handshake_is_refused_on_a_resumed_connection() {
    let setup = setup_with_tickets();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("revoked-later"));
    let broker = setup.start().await;
    let second = Replica::start(Config::load(&broker.config_path).unwrap()).await;
    let clients: Vec<_> = VERSIONS
        .iter()
        .map(|(version, _)| device(&broker, &leaf, version))
        .collect();
    for (client, (_, name)) in clients.iter().zip(VERSIONS) {
        let (kind, status, body) = token(client, broker.addr).await;
        assert_eq!((kind, status), (HandshakeKind::Full, 200), "{name}: {body}");
    }
    let setup = &broker.setup;
    setup.write(
        "intermediate.crl.pem",
        &setup.intermediate.crl(&[leaf.serial]),
    );
    broker.live.reload().unwrap();
    for (client, (_, name)) in clients.iter().zip(VERSIONS) {
        let (kind, status, body) = token(client, broker.addr).await;
        assert_eq!(
            (kind, status),
            (HandshakeKind::Resumed, 401),
            "{name}: {body}"
        );
        assert_eq!(body["error"], "invalid_client", "{name}: {body}");
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("revoked"),
            "{name}: {body}"
        );
    }
    second.stop().await;
    broker.stop().await;
}

/// A ticket outlives nothing: a chain that expired since the first handshake is refused on
/// the resumed connection (the verified-chain verdict ends at the leaf's notAfter).
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_chain_is_refused_on_a_resumed_connection() {
    let setup = setup_with_tickets();
    let not_after = OffsetDateTime::now_utc() + Duration::seconds(4);
    let mut spec = LeafSpec::device("short-lived");
    spec.not_after = not_after;
    let leaf = setup.intermediate.leaf(&spec);
    let broker = setup.start().await;
    let client = device(&broker, &leaf, &rustls::version::TLS13);
    let (kind, status, body) = token(&client, broker.addr).await;
    assert_eq!((kind, status), (HandshakeKind::Full, 200), "{body}");
    // Resumed while still valid: accepted from the verdict of the first request.
    let (kind, status, body) = token(&client, broker.addr).await;
    assert_eq!((kind, status), (HandshakeKind::Resumed, 200), "{body}");
    let wait = not_after + Duration::seconds(1) - OffsetDateTime::now_utc();
    tokio::time::sleep(wait.try_into().unwrap_or_default()).await;
    let (kind, status, body) = token(&client, broker.addr).await;
    assert_eq!((kind, status), (HandshakeKind::Resumed, 401), "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    broker.stop().await;
}

/// Rotation without a restart: the watched key file changes, every replica reloads it;
/// tickets under the previous key still resume, tickets under the key before that do not
/// (a full handshake, which still gets the token).
#[tokio::test(flavor = "multi_thread")]
async fn after_a_rotation_the_previous_key_resumes_and_the_one_before_does_not() {
    let setup = setup_with_tickets();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("rotating"));
    let broker = setup.start().await;
    let keys = broker.setup.path("ticket-keys");
    let tls13 = &rustls::version::TLS13;
    // Two devices holding tickets under the first key.
    let (early, late) = (device(&broker, &leaf, tls13), device(&broker, &leaf, tls13));
    for client in [&early, &late] {
        assert_eq!(token(client, broker.addr).await.0, HandshakeKind::Full);
    }
    let reloads = r#"token_broker_config_reloads_total{result="ok"}"#;
    let rotate_and_wait = |n: f64| {
        let (keys, broker) = (&keys, &broker);
        async move {
            // The watcher compares mtime and size: make sure a second has passed.
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
            rotate(keys);
            assert_eq!(broker.metric_eventually(reloads, n).await, n);
        }
    };
    rotate_and_wait(1.0).await;
    // Under the previous key: resumes, and gets tickets under the current one.
    let (kind, status, _) = token(&early, broker.addr).await;
    assert_eq!((kind, status), (HandshakeKind::Resumed, 200));
    rotate_and_wait(2.0).await;
    // `late` holds only tickets under the key before the previous one.
    let (kind, status, body) = token(&late, broker.addr).await;
    assert_eq!((kind, status), (HandshakeKind::Full, 200), "{body}");
    // `early` holds tickets under the now previous key.
    let (kind, status, _) = token(&early, broker.addr).await;
    assert_eq!((kind, status), (HandshakeKind::Resumed, 200));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ticket_from_a_broker_with_another_key_file_does_not_resume() {
    let setup = setup_with_tickets();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("elsewhere"));
    let broker = setup.start().await;
    let other_keys = broker.setup.path("other-ticket-keys");
    rotate(&other_keys);
    let mut config = Config::load(&broker.config_path).unwrap();
    config.server.session_ticket_keys = Some(other_keys);
    let other = Replica::start(config).await;
    for (version, name) in VERSIONS {
        let client = device(&broker, &leaf, version);
        assert_eq!(token(&client, broker.addr).await.0, HandshakeKind::Full);
        let (kind, status, body) = token(&client, other.addr).await;
        assert_eq!((kind, status), (HandshakeKind::Full, 200), "{name}: {body}");
    }
    assert_eq!(other.resumed().await, 0.0);
    other.stop().await;
    broker.stop().await;
}

/// What `check-config` says of a config it refuses.
fn refused_config(config: &Path) -> String {
    let out = std::process::Command::new(support::binary())
        .args(["--log-format", "text", "-c"])
        .arg(config)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A configured key file that is missing or unusable stops the load with a message naming
/// the setting and the command that writes one (its mode: below).
#[test]
fn a_missing_or_malformed_key_file_is_a_config_error() {
    let setup = setup_with_tickets();
    let config_path = setup.write_config();
    let keys = setup.path("ticket-keys");
    std::fs::remove_file(&keys).unwrap();
    let report = refused_config(&config_path);
    assert!(
        report.contains("server.session_ticket_keys") && report.contains("ticket-keys"),
        "{report}"
    );
    setup.write("ticket-keys", "AAAA\n");
    let report = refused_config(&config_path);
    assert!(report.contains("rotate-ticket-keys"), "{report}");
    // Rotation refuses to replace a file it cannot read as keys.
    assert!(token_broker::tickets::rotate(&keys).is_err());
}

/// `check-config`'s exit code and stderr for `config`.
fn check_config(config: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(support::binary())
        .args(["--log-format", "text", "-c"])
        .arg(config)
        .arg("check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    logs::assert_no_secrets(&stderr, "check-config");
    (out.status.code(), stderr)
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Whoever holds a ticket key can forge a ticket carrying any device's chain, so the key
/// file is protected like a signing key, by the same rule (`pem::read_secret_holding`):
/// `rotate-ticket-keys` writes it owner-only (whatever the umask); one every user can read
/// or write is refused by `check-config` and by a reload of `serve` (the same `Broker`
/// build), naming the file, its mode, what it holds and `chmod 600`; group access is
/// accepted with a warning naming the file, as for the signing keys (SECURITY.md).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_ticket_key_file_every_user_can_read_is_refused_like_a_signing_key() {
    let setup = setup_with_tickets();
    let config_path = setup.write_config();
    let keys = setup.path("ticket-keys");
    std::fs::remove_file(&keys).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$0\" rotate-ticket-keys \"$1\"")
        .arg(support::binary())
        .arg(&keys)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    register_keys(&keys);
    assert_eq!(mode(&keys), 0o600, "written owner-only under umask 000");
    let (code, stderr) = check_config(&config_path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("readable by its group"), "{stderr}");

    let fix = format!("run `chmod 600 {}`", keys.display());
    for (loose, verb) in [(0o644, "read"), (0o604, "read"), (0o602, "write")] {
        set_mode(&keys, loose);
        let (code, stderr) = check_config(&config_path);
        assert_eq!(code, Some(1), "{loose:o}: {stderr}");
        for needed in [
            format!("server.session_ticket_keys: {}", keys.display()),
            format!("can {verb} it (mode {loose:03o})"),
            "forge a resumed session as any device".to_owned(),
            fix.clone(),
        ] {
            assert!(stderr.contains(&needed), "{loose:o}: {needed}: {stderr}");
        }
    }
    set_mode(&keys, 0o640);
    let (code, stderr) = check_config(&config_path);
    assert_eq!(code, Some(0), "{stderr}");
    let warning = stderr
        .lines()
        .find(|line| line.contains("secret file is readable by its group"))
        .unwrap_or_else(|| panic!("no group warning: {stderr}"));
    assert!(
        warning.contains(&keys.display().to_string())
            && warning.contains("640")
            && warning.contains("session ticket keys"),
        "{warning}"
    );

    set_mode(&keys, 0o600);
    let broker = setup.start().await;
    set_mode(&keys, 0o644);
    let problems = broker.live.reload().unwrap_err().to_string();
    assert!(
        problems.contains("server.session_ticket_keys") && problems.contains(&fix),
        "{problems}"
    );
    set_mode(&keys, 0o600);
    broker.live.reload().unwrap();
    broker.stop().await;
}

/// The metadata agent keeps its TLS sessions in memory: when the broker has closed its idle
/// connection, the agent's next request opens a new one that resumes.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_resumes_across_connections() {
    use crate::support::fake_google::{FakeGoogle, FakeGoogleConfig};
    use token_broker::device::agent::{serve, AgentConfig};
    use token_broker::device::client::{BrokerClient, CachingClient};
    const RUNNER: &str = "runner@fake-project.iam.gserviceaccount.com";
    let fake = FakeGoogle::start(FakeGoogleConfig::new(support::ISSUER)).await;
    let mut setup = setup_with_tickets();
    // Idle connections close after a second, so each request below needs a new one.
    setup
        .extra_server
        .push_str("\nrequest_header_timeout = \"1s\"");
    setup.google = Some(format!(
        "[google]\nproject_number = \"123456789012\"\npool_id = \"devices\"\nprovider_id = \"token-broker\"\nsts_url = \"{0}\"\niam_credentials_url = \"{0}\"\nmetadata_url = \"{0}\"",
        fake.url
    ));
    setup.rules = format!(
        "[[clients]]\nname = \"devices\"\nmatch = {{ spiffe = [\"spiffe://test.example/device/*\"] }}\n\
         flows = [\"google-id-token\"]\nservice_accounts = [\"{RUNNER}\"]\n\
         target_audiences = [\"https://a.example\", \"https://b.example\", \"https://c.example\"]\n"
    );
    let leaf = setup.intermediate.leaf(&LeafSpec::device("agent-resuming"));
    let broker = setup.start().await;
    fake.set_provider_jwks(broker.get_json("/jwks").await);
    let cert = broker.setup.write("agent.pem", &leaf.chain_pem);
    let key = broker.setup.write("agent-key.pem", &leaf.key_pem);
    let ca = broker.setup.path("server-ca.pem");
    let client = BrokerClient::new(&broker.url(""), &cert, &key, Some(&ca)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = listener.local_addr().unwrap();
    let config = AgentConfig {
        service_account: RUNNER.into(),
        scopes: vec!["https://www.googleapis.com/auth/cloud-platform".into()],
        project_id: None,
        numeric_project_id: None,
        instance_id: 1,
        hostname: "device".into(),
        zone: "on-premises".into(),
        allowed_uids: Vec::new(),
    };
    tokio::spawn(serve(listener, config, CachingClient::new(client)));
    let http = reqwest::Client::new();
    let handshakes = r#"token_broker_tls_handshakes_total{result="ok"}"#;
    // The test's own /jwks request was one handshake.
    let (handshakes0, resumed0) = (
        broker.metric(handshakes).await,
        broker.metric(RESUMED).await,
    );
    for (n, audience) in [
        "https://a.example",
        "https://b.example",
        "https://c.example",
    ]
    .iter()
    .enumerate()
    {
        // A new audience each time: the agent's token cache cannot answer.
        let answer = http
            .get(format!(
                "http://{agent}/computeMetadata/v1/instance/service-accounts/default/identity?audience={audience}"
            ))
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
        let opened = broker.metric(handshakes).await - handshakes0;
        assert_eq!(opened, (n + 1) as f64, "one connection per request");
        let resumed = broker.metric(RESUMED).await - resumed0;
        assert_eq!(resumed, n as f64, "every connection but the first resumed");
        // The broker closes the idle connection after request_header_timeout.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    broker.stop().await;
}
