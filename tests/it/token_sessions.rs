//! `token --session-file`: the one-shot `token` process keeps the broker's TLS session tickets
//! in a file, so its next run resumes. Real broker processes sharing ticket keys
//! (`server.session_ticket_keys`), real `token` runs as separate processes; what a resumed
//! run still checks (revocation), what a damaged, exposed or planted file does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::devices::{write_device, Device};
use crate::replicas::Replica;
use crate::resumption::{rotate, setup_with_tickets, RESUMED};
use crate::support::{self, logs, LeafSpec, Setup, ISSUER};

const RELOADS: &str = r#"token_broker_config_reloads_total{result="ok"}"#;

/// A setup with ticket keys, a device, and its config written (for `Replica::start`).
fn setup(device_name: &str) -> (Setup, Device, u64) {
    let setup = setup_with_tickets();
    let leaf = setup.intermediate.leaf(&LeafSpec::device(device_name));
    let device = write_device(&setup, &leaf);
    setup.write_config();
    (setup, device, leaf.serial)
}

/// A broker process, and a device whose first `token` run wrote its session file.
struct Fixture {
    setup: Setup,
    device: Device,
    serial: u64,
    replica: Replica,
    file: PathBuf,
}

async fn after_a_first_run(device_name: &str) -> Fixture {
    let (setup, device, serial) = setup(device_name);
    let replica = Replica::start(&setup, "a").await;
    let file = session_path(&setup);
    let out = run(&device, replica.port, &with_file(&file));
    token_of(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(replica.metric(RESUMED).await, 0.0);
    assert_valid_file(&file);
    Fixture {
        setup,
        device,
        serial,
        replica,
        file,
    }
}

/// `token` against the broker on `port`, with `extra` arguments.
fn run(device: &Device, port: u16, extra: &[&str]) -> Output {
    let out = Command::new(support::binary())
        .arg("token")
        .args(["--url", &format!("https://localhost:{port}")])
        .arg("--cert")
        .arg(&device.cert)
        .arg("--key")
        .arg(&device.key)
        .arg("--ca")
        .arg(&device.ca)
        .args(extra)
        .env_remove("GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE")
        .output()
        .unwrap();
    logs::assert_no_secrets(&String::from_utf8_lossy(&out.stderr), "token");
    out
}

fn with_file(file: &Path) -> [&str; 2] {
    ["--session-file", file.to_str().unwrap()]
}

/// The access token of a successful run.
fn token_of(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// Verifies `jwt` with the JWKS `replica` publishes: a real token of this broker.
async fn verify(setup: &Setup, replica: &Replica, jwt: &str) -> Value {
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(replica.get_json(setup, "127.0.0.1", "/jwks").await).unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    let key =
        jsonwebtoken::DecodingKey::from_jwk(jwks.find(&header.kid.unwrap()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["aud-a"]);
    validation.set_issuer(&[ISSUER]);
    jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .unwrap()
        .claims
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The file as a run leaves it: this format, owner-only, sessions for `localhost`.
fn assert_valid_file(file: &Path) {
    assert!(std::fs::symlink_metadata(file).unwrap().is_file());
    assert_eq!(mode(file), 0o600);
    let contents: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    assert_eq!(contents["version"], 1, "{contents}");
    let tickets = contents["servers"]["localhost"]["tls13"]
        .as_array()
        .unwrap();
    assert!(!tickets.is_empty(), "{contents}");
}

/// One run resumed on `replica` (its counter up by exactly one) and got a valid token.
async fn assert_resumed(setup: &Setup, replica: &Replica, device: &Device, file: &Path) {
    let before = replica.metric(RESUMED).await;
    let token = token_of(&run(device, replica.port, &with_file(file)));
    assert_eq!(replica.metric(RESUMED).await, before + 1.0, "resumed");
    let claims = verify(setup, replica, &token).await;
    assert!(
        claims["sub"]
            .as_str()
            .unwrap()
            .starts_with("spiffe://test.example/device/"),
        "{claims}"
    );
}

/// One run made a full handshake on `replica` and got a token; the file is valid after it.
fn assert_full_then_valid(replica_resumed: (f64, f64), out: &Output, file: &Path) {
    token_of(out);
    assert_eq!(replica_resumed.1, replica_resumed.0, "not resumed");
    assert_valid_file(file);
}

async fn reload(replica: &Replica, reloads: f64) {
    replica.signal("HUP");
    support::wait_until("the reload", || async {
        replica.metric(RELOADS).await >= reloads
    })
    .await;
}

fn session_path(setup: &Setup) -> PathBuf {
    setup.path("token-sessions.json")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_second_run_resumes_from_the_session_file_and_a_run_without_it_does_not() {
    let Fixture {
        setup,
        device,
        replica,
        file,
        ..
    } = after_a_first_run("resuming-run").await;
    assert_resumed(&setup, &replica, &device, &file).await;
    assert_resumed(&setup, &replica, &device, &file).await;
    // Without the file: a full handshake, however recent the last run.
    let before = replica.metric(RESUMED).await;
    token_of(&run(&device, replica.port, &[]));
    assert_eq!(replica.metric(RESUMED).await, before);
    // The file holds sessions (tickets, secrets, the broker's chain), not the device's key
    // or a token.
    let token = token_of(&run(&device, replica.port, &with_file(&file)));
    let contents = std::fs::read_to_string(&file).unwrap();
    assert!(!contents.contains(&token));
    let key = std::fs::read_to_string(&device.key).unwrap();
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!contents.contains(line));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_from_one_replica_resumes_on_another_sharing_the_key_file() {
    let Fixture {
        setup,
        device,
        replica: a,
        file,
        ..
    } = after_a_first_run("two-replicas").await;
    let b = Replica::start(&setup, "b").await;
    assert_resumed(&setup, &b, &device, &file).await;
    assert_eq!(a.metric(RESUMED).await, 0.0);
    assert_resumed(&setup, &a, &device, &file).await;
}

/// The ticket restores the chain; the broker checks it on every request: a device revoked
/// since its last run is refused on the resumed connection, with the broker's reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_revoked_since_the_last_run_is_refused_on_the_resumed_run() {
    let Fixture {
        setup,
        device,
        serial,
        replica,
        file,
    } = after_a_first_run("revoked-between-runs").await;
    setup.write("intermediate.crl.pem", &setup.intermediate.crl(&[serial]));
    reload(&replica, 1.0).await;
    let before = replica.metric(RESUMED).await;
    let out = run(&device, replica.port, &with_file(&file));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("HTTP 401 invalid_client") && stderr.contains("revoked"),
        "{stderr}"
    );
    assert_eq!(replica.metric(RESUMED).await, before + 1.0, "resumed");
    // The executable format answers the library with the broker's RFC 6749 code.
    let out = run(
        &device,
        replica.port,
        &[
            "--session-file",
            file.to_str().unwrap(),
            "--format",
            "executable",
        ],
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (answer["success"].clone(), answer["code"].clone()),
        (false.into(), "invalid_client".into()),
        "{answer}"
    );
}

/// Damaged files: a full handshake, a token, the file replaced by one that resumes; with
/// `--format executable` nothing on stderr (the library reads it as part of the response).
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_truncated_or_foreign_session_file_costs_a_full_handshake_and_is_replaced() {
    let Fixture {
        setup,
        device,
        replica,
        file,
        ..
    } = after_a_first_run("damaged-file").await;
    let valid = std::fs::read(&file).unwrap();
    let mut contents: Value = serde_json::from_slice(&valid).unwrap();
    let ticket = contents["servers"]["localhost"]["tls13"][0]
        .as_str()
        .unwrap()
        .to_owned();
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&ticket)
        .unwrap();
    let mut damaged_sessions = Vec::new();
    // Each session cut short at a few places, and with a byte changed in its header.
    for cut in [1, 3, 9, bytes.len() / 2, bytes.len() - 1] {
        damaged_sessions.push(bytes[..cut].to_vec());
    }
    // In process, every cut and every byte changed (as the vendored rustls decodes them):
    // an error or a session, never a panic; the whole encoding decodes.
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    use rustls::client::{Tls12ClientSessionValue, Tls13ClientSessionValue};
    let decoded = Tls13ClientSessionValue::from_bytes(&bytes, &config).unwrap();
    assert_eq!(decoded.to_bytes(), bytes);
    for cut in 0..bytes.len() {
        assert!(Tls13ClientSessionValue::from_bytes(&bytes[..cut], &config).is_err());
        assert!(Tls12ClientSessionValue::from_bytes(&bytes[..cut], &config).is_err());
    }
    for at in 0..bytes.len() {
        let mut changed = bytes.clone();
        changed[at] ^= 0x5a;
        let _ = Tls13ClientSessionValue::from_bytes(&changed, &config);
    }
    let mut flipped = bytes.clone();
    flipped[1] ^= 0xff;
    damaged_sessions.push(flipped);
    let mut trailing = bytes.clone();
    trailing.push(0);
    damaged_sessions.push(trailing);
    let mut bad_files: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("garbage".into(), b"\x00\xff not json \x13".to_vec()),
        ("truncated".into(), valid[..valid.len() / 2].to_vec()),
        ("foreign version".into(), {
            let mut other = contents.clone();
            other["version"] = 99.into();
            serde_json::to_vec(&other).unwrap()
        }),
        (
            "wrong shape".into(),
            br#"{"version":1,"servers":{"localhost":{"tls13":"x"}}}"#.to_vec(),
        ),
    ];
    for (i, session) in damaged_sessions.iter().enumerate() {
        contents["servers"]["localhost"]["tls13"] =
            vec![base64::engine::general_purpose::STANDARD.encode(session)].into();
        bad_files.push((
            format!("damaged session {i}"),
            serde_json::to_vec(&contents).unwrap(),
        ));
    }
    for (n, (what, bad)) in bad_files.iter().enumerate() {
        std::fs::write(&file, bad).unwrap();
        set_mode(&file, 0o600);
        let before = replica.metric(RESUMED).await;
        let executable = n % 2 == 0;
        let mut args = with_file(&file).to_vec();
        if executable {
            args.extend(["--format", "executable"]);
        }
        let out = run(&device, replica.port, &args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{what}: {stderr}");
        if executable {
            assert!(stderr.is_empty(), "{what}: {stderr}");
            let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(answer["success"], true, "{what}");
        } else {
            token_of(&out);
            assert!(stderr.contains("session file not used"), "{what}: {stderr}");
        }
        assert_eq!(replica.metric(RESUMED).await, before, "{what}: not resumed");
        assert_valid_file(&file);
        assert_resumed(&setup, &replica, &device, &file).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_file_others_can_read_is_refused_and_a_pkcs11_key_may_not_use_one() {
    // `_setup` keeps the folder until the end.
    let Fixture {
        setup: _setup,
        device,
        replica,
        file,
        ..
    } = after_a_first_run("exposed-file").await;
    let valid = std::fs::read(&file).unwrap();
    for loose in [0o640, 0o604, 0o660] {
        set_mode(&file, loose);
        let out = run(&device, replica.port, &with_file(&file));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{loose:o}: {stderr}");
        assert!(
            stderr.contains(&format!("chmod 600 {}", file.display())),
            "{loose:o}: {stderr}"
        );
        assert!(out.stdout.is_empty());
        // Left as it was: the user decides.
        assert_eq!(std::fs::read(&file).unwrap(), valid);
        assert_eq!(mode(&file), loose);
    }
    set_mode(&file, 0o600);
    let mut args: Vec<String> = [
        "token",
        "--url",
        &format!("https://localhost:{}", replica.port),
        "--cert",
        "pkcs11:token=device;object=device",
        "--key",
        "pkcs11:token=device;object=device",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(with_file(&file).map(str::to_owned));
    let out = Command::new(support::binary())
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("PKCS#11 key"), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), valid);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_planted_at_the_session_path_is_replaced_not_written_through() {
    let (setup, device, _) = setup("planted-link");
    let replica = Replica::start(&setup, "a").await;
    let file = session_path(&setup);
    let victim = setup.write("victim", "victim");
    set_mode(&victim, 0o600);
    std::os::unix::fs::symlink(&victim, &file).unwrap();
    token_of(&run(&device, replica.port, &with_file(&file)));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
    assert_valid_file(&file);
    assert_resumed(&setup, &replica, &device, &file).await;
    // A link to a valid session file is not followed either (full handshake, replaced).
    let elsewhere = setup.path("elsewhere.json");
    std::fs::rename(&file, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
    let before = replica.metric(RESUMED).await;
    let out = run(&device, replica.port, &with_file(&file));
    assert_full_then_valid((before, replica.metric(RESUMED).await), &out, &file);
}

/// Tickets open under the key file's current and previous key: after two rotations the
/// stored ticket does not, and the run still gets its token with a full handshake.
#[tokio::test(flavor = "multi_thread")]
async fn after_two_rotations_the_stored_ticket_no_longer_opens() {
    let Fixture {
        setup,
        device,
        replica,
        file,
        ..
    } = after_a_first_run("rotations").await;
    let keys = setup.path("ticket-keys");
    // One rotation: the ticket (under the now previous key) still opens.
    let stale = std::fs::read(&file).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    rotate(&keys);
    reload(&replica, 1.0).await;
    assert_resumed(&setup, &replica, &device, &file).await;
    // Back to the ticket under the first key, then a second rotation.
    std::fs::write(&file, &stale).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    rotate(&keys);
    reload(&replica, 2.0).await;
    let before = replica.metric(RESUMED).await;
    let out = run(&device, replica.port, &with_file(&file));
    assert_full_then_valid((before, replica.metric(RESUMED).await), &out, &file);
    assert_resumed(&setup, &replica, &device, &file).await;
}

/// A session is used only under the CA bundle and certificate that made it: a run with
/// another bundle (a broker CA added or withdrawn) or a renewed certificate does a full
/// handshake, and the next run under the new ones resumes again.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_stored_under_other_roots_or_another_certificate_is_not_resumed() {
    let Fixture {
        setup,
        device,
        replica,
        file,
        ..
    } = after_a_first_run("bound-session").await;
    // The same broker CA plus one more root: still trusts the broker, but another bundle.
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(&device.ca).unwrap(),
        setup.root.pem
    );
    let other_roots = Device {
        ca: setup.write("other-roots.pem", &bundle),
        cert: device.cert.clone(),
        key: device.key.clone(),
    };
    let before = replica.metric(RESUMED).await;
    let out = run(&other_roots, replica.port, &with_file(&file));
    assert_full_then_valid((before, replica.metric(RESUMED).await), &out, &file);
    assert_resumed(&setup, &replica, &other_roots, &file).await;
    // A renewed certificate (new key, same name) under the same bundle.
    let renewed = setup.intermediate.leaf(&LeafSpec::device("bound-session"));
    let renewed = Device {
        cert: setup.write("renewed.pem", &renewed.chain_pem),
        key: setup.write("renewed-key.pem", &renewed.key_pem),
        ca: other_roots.ca.clone(),
    };
    set_mode(&renewed.key, 0o600);
    let before = replica.metric(RESUMED).await;
    let out = run(&renewed, replica.port, &with_file(&file));
    assert_full_then_valid((before, replica.metric(RESUMED).await), &out, &file);
    assert_resumed(&setup, &replica, &renewed, &file).await;
}
