//! `token --session-file` was removed with the patched rustls it needed (rustls has no public
//! encoding of a client session). A device script that still passes it is refused with the
//! reason, as a `token` process: never a token made some other way than the script asked
//! for, not even one from `--cache`. The agent's in-memory resumption is in resumption.rs
//! (`the_agent_resumes_across_connections`).

use std::process::{Command, Output};

use serde_json::Value;

use crate::devices::{start, Device};
use crate::support::fake_google::FakeGoogleConfig;
use crate::support::{self, logs, TestBroker, ISSUER};

const HANDSHAKES: &str = r#"token_broker_tls_handshakes_total{result="ok"}"#;

/// `token` against `broker` with `extra` arguments, without the library's variables.
fn run(broker: &TestBroker, device: &Device, extra: &[&str]) -> Output {
    let out = Command::new(support::binary())
        .arg("token")
        .args(["--url", &broker.url("")])
        .arg("--cert")
        .arg(&device.cert)
        .arg("--key")
        .arg(&device.key)
        .arg("--ca")
        .arg(&device.ca)
        .args([
            "--audience",
            &FakeGoogleConfig::new(ISSUER).default_audience(),
        ])
        .args(extra)
        .env_remove("GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE")
        .output()
        .unwrap();
    logs::assert_no_secrets(&String::from_utf8_lossy(&out.stderr), "token");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn session_file_is_refused_as_removed_even_when_the_cache_holds_a_token() {
    let (_fake, broker, device) = start().await;
    let cache = broker.setup.path("token-cache.json");
    let sessions = broker.setup.path("token-sessions.json");
    let cache_arg = cache.to_str().unwrap();
    let sessions_arg = sessions.to_str().unwrap();
    // A first run fills the cache: a later run with the same request would answer from it.
    let out = run(&broker, &device, &["--cache", cache_arg]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let handshakes = broker.metric(HANDSHAKES).await;

    for format in ["json", "raw"] {
        let out = run(
            &broker,
            &device,
            &[
                "--cache",
                cache_arg,
                "--format",
                format,
                "--session-file",
                sessions_arg,
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{format}: {stderr}");
        assert!(
            stderr.contains("--session-file was removed") && stderr.contains("rustls"),
            "{format}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{format}: no token printed");
    }
    // Google's libraries read the executable format's error from stdout.
    let out = run(
        &broker,
        &device,
        &["--format", "executable", "--session-file", sessions_arg],
    );
    assert_eq!(out.status.code(), Some(1));
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(response["success"], false, "{response}");
    assert!(
        response["message"]
            .as_str()
            .unwrap()
            .contains("--session-file was removed"),
        "{response}"
    );
    assert!(!sessions.exists(), "no session file written");
    assert_eq!(
        broker.metric(HANDSHAKES).await,
        handshakes,
        "refused before any connection"
    );
    broker.stop().await;
}
