//! The device side: `token`'s exit codes and errors against a real broker whose Google is the
//! in-process fake. The executable-sourced credential configuration is in executable.rs, the
//! metadata agent in agent.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::fake_google::{FakeGoogle, FakeGoogleConfig};
use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker, ISSUER};
use serde_json::Value;

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

/// `python3` that can `import google.auth` (`bash .ci/run` installs it; a test without it fails naming it).
pub(crate) fn python() -> &'static str {
    support::require_python_modules("google.auth, requests", &["google-auth", "requests"])
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

/// A device's own setup mistakes are local (exit 1) and say the fix: a `--ca` that did not
/// sign the broker's certificate, or none at all (the public roots). Only a broker that
/// cannot be reached is "unavailable" (exit 3, `token_command_errors_say_what_to_do`).
#[tokio::test(flavor = "multi_thread")]
async fn local_mistakes_are_local() {
    let (_fake, broker, device) = start().await;
    let wrong_ca = broker.setup.write("wrong-ca.pem", &broker.setup.root.pem);
    let base = token_command(&broker, &device, "");
    let ca_arg = format!("--ca {}", device.ca.display());
    for (case, command, says) in [
        (
            "another CA",
            base.replace(&ca_arg, &format!("--ca {}", wrong_ca.display())),
            "pass --ca with the CA that signed the broker's certificate",
        ),
        (
            "no --ca",
            base.replace(&ca_arg, ""),
            "pass --ca with the CA that signed the broker's certificate",
        ),
    ] {
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let out = Command::new(support::binary()).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
        assert!(stderr.contains(says), "{case}: {stderr}");
        assert!(!stderr.contains("unavailable"), "{case}: {stderr}");
    }
    broker.stop().await;
}

/// `token --cache` serves a cached token only to the run that would have fetched it: the
/// same broker URL, CA bundle and device certificate. Any other is a miss that asks the
/// broker (a URL nobody answers: exit 3, not the cached token).
#[tokio::test(flavor = "multi_thread")]
async fn the_token_cache_is_bound_to_broker_ca_and_certificate() {
    let (_fake, broker, device) = start().await;
    let cache = broker.setup.path("token-cache.json");
    let issued =
        r#"token_broker_tokens_issued_total{client="devices",flow="mtls-client-credentials"}"#;
    let run = |command: String| {
        let args: Vec<String> = command
            .split_whitespace()
            .skip(1)
            .map(str::to_owned)
            .collect();
        Command::new(support::binary()).args(args).output().unwrap()
    };
    let base = token_command(&broker, &device, &format!("--cache {}", cache.display()));
    let out = run(base.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(broker.metric(issued).await, 1.0);
    let out = run(base.clone());
    assert!(out.status.success());
    assert_eq!(
        broker.metric(issued).await,
        1.0,
        "the same run is served from the cache"
    );

    // Another broker URL: nobody answers there, and the cache does not stand in for it.
    let port = broker.addr.port();
    let out = run(base.replace(&format!("localhost:{port}"), "localhost:1"));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Another CA bundle (the same CA and one more): the broker is asked.
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(&device.ca).unwrap(),
        broker.setup.root.pem
    );
    let other_ca = broker.setup.write("other-ca.pem", &bundle);
    let out = run(base.replace(
        &format!("--ca {}", device.ca.display()),
        &format!("--ca {}", other_ca.display()),
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        broker.metric(issued).await,
        2.0,
        "another CA bundle is a miss"
    );
    // Another device certificate: the broker is asked, and answers for that device.
    let other = broker
        .setup
        .intermediate
        .leaf(&LeafSpec::device("python-2"));
    let other_cert = broker.setup.write("other-device.pem", &other.chain_pem);
    let other_key = broker.setup.write("other-device-key.pem", &other.key_pem);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&other_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = run(base
        .replace(
            &format!("--cert {}", device.cert.display()),
            &format!("--cert {}", other_cert.display()),
        )
        .replace(
            &format!("--key {}", device.key.display()),
            &format!("--key {}", other_key.display()),
        ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        broker.metric(issued).await,
        3.0,
        "another certificate is a miss"
    );
    broker.stop().await;
}

/// A hostile or broken server at the broker's URL, with a certificate the device trusts:
/// a redirect is not followed (the request, with the device's certificate, goes nowhere
/// else; the place it names records no hit), and an answer over 1 MiB is not read whole.
/// Both are the broker being unavailable (exit 3), never a token.
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_broker_cannot_redirect_or_flood_the_device() {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_fake, broker, device) = start().await;
    let elsewhere = support::crl_server::CrlServer::start().await;
    elsewhere.serve(
        "/token",
        support::crl_server::Serve::Crl("{}".into(), "\"x\"".into()),
    );
    let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_file_iter(broker.setup.path("server.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(broker.setup.path("server-key.pem"))
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let answering = answer.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, answer) = (acceptor.clone(), answering.lock().unwrap().clone());
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(stream).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    let command = token_command(&broker, &device, "").replace(
        &format!("localhost:{}", broker.addr.port()),
        &format!("localhost:{port}"),
    );
    let run = move || {
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        Command::new(support::binary()).args(args).output().unwrap()
    };
    let redirect = format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        elsewhere.url("/token")
    );
    let mut flood = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"access_token\":\"".to_vec();
    flood.resize(flood.len() + 2 * 1024 * 1024, b'a');
    for (case, body, says) in [
        ("a redirect", redirect.into_bytes(), "HTTP 307"),
        ("2 MiB", flood, "larger than 1048576 bytes"),
    ] {
        *answer.lock().unwrap() = body;
        let out = tokio::task::spawn_blocking(run.clone()).await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{case}: {stderr}");
        assert!(stderr.contains(says), "{case}: {stderr}");
        assert!(out.stdout.is_empty(), "{case}");
    }
    assert_eq!(elsewhere.hits("/token"), 0, "the redirect was followed");
    broker.stop().await;
}
