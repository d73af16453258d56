//! An independent TLS scanner (sslyze, with its own OpenSSL build) against a running
//! broker: only TLS 1.2 and 1.3, only forward-secret AEAD suites, a client certificate
//! requested (optional at the handshake, by design: discovery and JWKS are public), no
//! renegotiation, none of the classic server-side flaws.

use crate::support::{self, Setup};
use serde_json::Value;

/// The TLS 1.2 suites an up-to-date server may offer: ECDHE key exchange and an AEAD.
const STRONG_TLS12: &[&str] = &[
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
];

fn accepted_suites(scan: &Value, command: &str) -> Vec<String> {
    let result = &scan[command];
    assert_eq!(result["status"], "COMPLETED", "{command}: {result}");
    result["result"]["accepted_cipher_suites"]
        .as_array()
        .unwrap_or_else(|| panic!("{command}: no accepted_cipher_suites in {result}"))
        .iter()
        .map(|s| s["cipher_suite"]["name"].as_str().unwrap().to_owned())
        .collect()
}

fn completed<'a>(scan: &'a Value, command: &str) -> &'a Value {
    assert_eq!(
        scan[command]["status"], "COMPLETED",
        "{command}: {}",
        scan[command]
    );
    &scan[command]["result"]
}

#[tokio::test(flavor = "multi_thread")]
async fn sslyze_finds_only_modern_tls_and_a_requested_client_certificate() {
    let python = support::require_python_modules("sslyze", &["sslyze"]);
    let broker = Setup::new().start().await;
    let out_file = broker.setup.path("sslyze.json");
    let mut command = std::process::Command::new(python);
    command
        .args([
            "-m",
            "sslyze",
            "--quiet",
            "--sni",
            "localhost",
            "--json_out",
        ])
        .arg(&out_file)
        .args([
            "--sslv2",
            "--sslv3",
            "--tlsv1",
            "--tlsv1_1",
            "--tlsv1_2",
            "--tlsv1_3",
            "--reneg",
            "--compression",
            "--heartbleed",
            "--openssl_ccs",
            "--robot",
            "--fallback",
            "--early_data",
        ])
        .arg(format!("127.0.0.1:{}", broker.addr.port()));
    let status = tokio::task::spawn_blocking(move || command.status())
        .await
        .unwrap()
        .expect("python3 -m sslyze runs");
    assert!(status.success(), "sslyze failed: {status:?}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    let server = &report["server_scan_results"][0];
    assert_eq!(server["connectivity_status"], "COMPLETED", "{server}");
    assert_eq!(
        server["connectivity_result"]["client_auth_requirement"], "OPTIONAL",
        "the server must ask for a client certificate"
    );
    let scan = &server["scan_result"];

    for old in [
        "ssl_2_0_cipher_suites",
        "ssl_3_0_cipher_suites",
        "tls_1_0_cipher_suites",
        "tls_1_1_cipher_suites",
    ] {
        assert_eq!(accepted_suites(scan, old), Vec::<String>::new(), "{old}");
    }
    let tls12 = accepted_suites(scan, "tls_1_2_cipher_suites");
    assert!(!tls12.is_empty(), "TLS 1.2 is offered by default");
    for suite in &tls12 {
        assert!(
            STRONG_TLS12.contains(&suite.as_str()),
            "weak TLS 1.2 suite {suite}"
        );
    }
    assert!(!accepted_suites(scan, "tls_1_3_cipher_suites").is_empty());

    let reneg = completed(scan, "session_renegotiation");
    assert_eq!(reneg["is_vulnerable_to_client_renegotiation_dos"], false);
    assert_eq!(reneg["client_renegotiations_success_count"], 0, "{reneg}");
    assert_eq!(
        completed(scan, "tls_compression")["supports_compression"],
        false
    );
    assert_eq!(
        completed(scan, "heartbleed")["is_vulnerable_to_heartbleed"],
        false
    );
    assert_eq!(
        completed(scan, "openssl_ccs_injection")["is_vulnerable_to_ccs_injection"],
        false
    );
    let robot = completed(scan, "robot")["robot_result"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(robot.starts_with("NOT_VULNERABLE"), "{robot}");
    assert_eq!(
        completed(scan, "tls_fallback_scsv")["supports_fallback_scsv"],
        true
    );
    assert_eq!(
        completed(scan, "tls_1_3_early_data")["supports_early_data"],
        false
    );
}
