//! The command line as a user meets it: first run on the shipped config, `init`,
//! `check-config` on a broken config, `jwks`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use crate::support::{self, binary};

fn run(args: &[&str], dir: &Path) -> Output {
    let out = Command::new(binary())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    support::logs::assert_no_secrets(&String::from_utf8_lossy(&out.stderr), &format!("{args:?}"));
    out
}

/// The standard output of a command that must have succeeded (else its standard error).
fn succeeded(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The shipped config.toml, moved to a free port, in a fresh folder.
fn shipped_config(dir: &Path) -> (std::path::PathBuf, u16) {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let port = support::free_port();
    let text = shipped
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"))
        .replace(
            "https://localhost:8443",
            &format!("https://localhost:{port}"),
        )
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    assert_ne!(
        text, shipped,
        "the shipped config's addresses changed; update this test"
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    (path, port)
}

/// `serve` on the shipped config moved to a free port: the child, its port, its stderr lines
/// (drained in the background: the server must never write to a closed pipe), and whether
/// it printed the development-only warning and a curl line before "serving".
struct Served {
    child: std::process::Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
    warned: bool,
    curl_line: Option<String>,
}

/// Starts `serve` on a free port and waits until it serves. The port is picked here and freed
/// for the broker, so another process may take it meanwhile: then another one is tried.
fn serve_shipped_config(dir: &Path) -> Served {
    // The dev PKI is made (warning and curl line) by the first attempt only.
    let (mut warned, mut curl_line, mut said) = (false, None, Vec::new());
    for _ in 0..5 {
        let (config, port) = shipped_config(dir);
        let mut child = Command::new(binary())
            .args(["--log-format", "text", "-c"])
            .arg(&config)
            .arg("serve")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let deadline = Instant::now() + support::PATIENCE;
        // Ends at "serving", or when the process exits (its stderr closes).
        while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            warned |= line.contains("DEVELOPMENT ONLY");
            if line.trim_start().starts_with("curl ") {
                curl_line = Some(line.trim().to_owned());
            }
            if line.contains("token-broker serving") {
                return Served {
                    child,
                    port,
                    lines,
                    warned,
                    curl_line,
                };
            }
            said.push(line);
        }
        let _ = child.kill();
        let _ = child.wait();
        if !said.iter().any(|line| line.contains("cannot listen")) {
            break;
        }
    }
    panic!("serve did not start:\n{}", said.join("\n"));
}

#[test]
fn first_serve_creates_dev_pki_and_its_curl_line_fetches_a_verifiable_token() {
    let dir = tempfile::tempdir().unwrap();
    let Served {
        mut child,
        port,
        lines,
        warned,
        curl_line,
    } = serve_shipped_config(dir.path());
    assert!(warned, "no development-only warning");
    let curl_line = curl_line.expect("a curl line is printed");
    assert!(
        curl_line.contains("--cert")
            && curl_line.contains("--key")
            && curl_line.contains("--cacert")
    );
    assert!(dir.path().join("certs/dev/keys/signing-0001.pem").exists());

    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{curl_line} -sS"))
        .output()
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        let server: Vec<String> = lines.try_iter().collect();
        panic!(
            "curl said: {} {}\nserver said:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            server.join("\n")
        )
    });
    let jwt = body["access_token"].as_str().expect("a token");

    // Verify with the JWKS the server publishes, fetched the same way.
    let ca = dir.path().join("certs/dev/ca.pem");
    let jwks = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .arg(format!("https://localhost:{port}/jwks"))
        .output()
        .unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&jwks.stdout).unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    let key =
        jsonwebtoken::DecodingKey::from_jwk(jwks.find(&header.kid.unwrap()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["token-broker-dev"]);
    validation.set_issuer(&[format!("https://localhost:{port}")]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(
        claims["sub"],
        "spiffe://dev.token-broker.local/device/dev-device-1"
    );

    // SIGTERM: a clean exit.
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn init_never_overwrites_without_force_and_keeps_keys_private() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["init", "--dir", "pki"], dir.path());
    succeeded(&out);
    let key = dir.path().join("pki/device-key.pem");
    let before = std::fs::read(&key).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    let out = run(&["init", "--dir", "pki"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&key).unwrap(), before, "nothing overwritten");

    let out = run(&["init", "--dir", "pki", "--force"], dir.path());
    assert!(out.status.success());
    assert_ne!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn check_config_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("garbage-ca.pem"), "not a certificate").unwrap();
    assert!(run(&["init", "--dir", "pki"], dir.path()).status.success());
    std::fs::create_dir(dir.path().join("empty-keys")).unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        r#"
[server]
listen = "127.0.0.1:0"
cert = "missing-server.pem"
key = "missing-server-key.pem"
client_ca = "garbage-ca.pem"
tls_versions = ["1.0"]
handshake_timeout = "0s"
max_body_bytes = 0

[admin]
listen = "everywhere"

[issuer]
url = "http://insecure.example"
token_ttl = "2h"

[signer]
kind = "local"
key_dir = "empty-keys"

[[clients]]
name = "bad"
match = { dns = ["[oops"] }
flows = ["teleportation"]
"#,
    )
    .unwrap();
    let out = run(&["check-config"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "missing-server.pem",
        "garbage-ca.pem",
        "1.0",
        "handshake_timeout",
        "max_body_bytes",
        "admin.listen",
        "must be https",
        "token_ttl",
        "no signing key",
        "[oops",
        "teleportation",
    ] {
        assert!(
            stderr.contains(needle),
            "{needle:?} not reported in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"));
    for line in stderr.lines().filter(|l| !l.contains("problem(s) found")) {
        assert!(line.starts_with("error: "), "unexpected line {line:?}");
    }
}

#[test]
fn check_config_reports_toml_errors_with_location_and_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), "[server]\nlisten = \n").unwrap();
    let out = run(&["check-config"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: config.toml") && stderr.contains("line 2"),
        "{stderr}"
    );

    let (config, _) = shipped_config(dir.path());
    assert!(run(&["init", "--dir", "certs/dev"], dir.path())
        .status
        .success());
    let out = run(
        &["-c", config.to_str().unwrap(), "check-config"],
        dir.path(),
    );
    let stdout = succeeded(&out);
    assert!(
        stdout.contains("token_ttl = \"5m\"") && stdout.contains("# ok: 1 root CA"),
        "{stdout}"
    );

    let out = run(&["-c", config.to_str().unwrap(), "jwks"], dir.path());
    assert!(out.status.success());
    let jwks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jwks["keys"][0]["alg"], "ES256");
}

#[test]
fn verify_cert_explains_the_dev_device_and_refuses_at_a_later_time() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = shipped_config(dir.path());
    assert!(run(&["init", "--dir", "certs/dev"], dir.path())
        .status
        .success());
    let config = config.to_str().unwrap();
    let out = run(
        &["-c", config, "verify-cert", "certs/dev/device.pem"],
        dir.path(),
    );
    succeeded(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["accepted"], true);
    assert_eq!(report["rule"], "dev-devices");
    assert_eq!(
        report["claims"]["sub"],
        "spiffe://dev.token-broker.local/device/dev-device-1"
    );

    let at = |time: &str| {
        let args = [
            "-c",
            config,
            "verify-cert",
            "certs/dev/device.pem",
            "--at",
            time,
        ];
        run(&args, dir.path())
    };
    let out = at("2099-01-01T00:00:00Z");
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["reason"], "expired");

    let out = at("yesterday");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: --at"));
}

#[test]
fn check_config_refuses_a_leaf_in_the_ca_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = shipped_config(dir.path());
    assert!(run(&["init", "--dir", "certs/dev"], dir.path())
        .status
        .success());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        r#"client_ca = "certs/dev/ca.pem""#,
        r#"client_ca = "certs/dev/device.pem""#,
    );
    std::fs::write(&config, text).unwrap();
    let out = run(&["check-config"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a CA certificate"), "{stderr}");
}

#[test]
fn wif_setup_prints_the_gcloud_commands_and_a_device_config() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = shipped_config(dir.path());
    let out = run(&["-c", config.to_str().unwrap(), "wif-setup"], dir.path());
    assert_eq!(out.status.code(), Some(1), "no [google] section: an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [google] section"));

    let text = std::fs::read_to_string(&config).unwrap()
        + "\n[google]\nproject_number = \"42\"\npool_id = \"fleet\"\nprovider_id = \"broker\"\n";
    let text = text.replace(
        r#"flows = ["mtls-client-credentials"]"#,
        r#"flows = ["mtls-client-credentials", "impersonate"]
service_accounts = ["uploader@p.iam.gserviceaccount.com"]
scopes = ["https://www.googleapis.com/auth/cloud-platform"]"#,
    );
    std::fs::write(&config, text).unwrap();
    let out = run(
        &[
            "-c",
            config.to_str().unwrap(),
            "wif-setup",
            "--project-id",
            "my-proj",
        ],
        dir.path(),
    );
    succeeded(&out);
    let script = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "gcloud iam workload-identity-pools create fleet",
        "providers create-oidc broker",
        "--project=my-proj",
        "--issuer-uri=\"https://localhost:",
        "--allowed-audiences=\"https://iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/fleet/providers/broker\"",
        "google.subject=assertion.sub",
        "attribute.spiffe=assertion.client.x5_spiffe",
        "--jwk-json-path",
        "add-iam-policy-binding uploader@p.iam.gserviceaccount.com",
        "workloadIdentityPools/fleet/attribute.client_id/dev-devices",
        "roles/iam.workloadIdentityUser",
    ] {
        assert!(script.contains(needle), "{needle:?} missing from:\n{script}");
    }
    // The device configuration it prints: executable::wif_setup_prints_a_device_configuration_google_auth_uses_as_is.

    // The dev config enables a Google flow now; check-config is satisfied with [google].
    assert!(run(&["init", "--dir", "certs/dev"], dir.path())
        .status
        .success());
    let out = run(
        &["-c", config.to_str().unwrap(), "check-config"],
        dir.path(),
    );
    succeeded(&out);
    // Without [google], the same rule is a configuration error.
    let text = std::fs::read_to_string(&config).unwrap();
    let without = text.split("\n[google]").next().unwrap().to_owned();
    std::fs::write(&config, without).unwrap();
    let out = run(
        &["-c", config.to_str().unwrap(), "check-config"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("flow \"impersonate\" needs a [google] section"));
}

#[cfg(unix)]
#[test]
fn check_config_refuses_private_keys_every_user_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    shipped_config(dir.path());
    assert!(run(&["init", "--dir", "certs/dev"], dir.path())
        .status
        .success());
    let chmod = |file: &str, mode: u32| {
        let path = dir.path().join(file);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let check = || {
        let out = run(&["check-config"], dir.path());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(check().0, Some(0), "init writes keys owner-only");

    for key in [
        "certs/dev/server-key.pem",
        "certs/dev/keys/signing-0001.pem",
    ] {
        chmod(key, 0o644);
        let (code, stderr) = check();
        assert_eq!(code, Some(1), "{key} world-readable: {stderr}");
        assert!(
            stderr.contains("every user of this machine can read it (mode 644)")
                && stderr.contains(&format!("run `chmod 600 {key}`")),
            "{stderr}"
        );
        chmod(key, 0o602);
        assert!(check().1.contains("can write it"), "world-writable {key}");

        // A group (root:ssl-cert 0640) is a sound layout: accepted with a warning.
        chmod(key, 0o640);
        let (code, stderr) = check();
        assert_eq!(code, Some(0), "{key} group-readable: {stderr}");
        chmod(key, 0o600);
    }
}

/// The shipped config and its development PKI in `dir`, with `extra` appended.
fn shipped_config_with(dir: &Path, extra: &str) -> std::path::PathBuf {
    let (config, _) = shipped_config(dir);
    assert!(run(&["init", "--dir", "certs/dev"], dir).status.success());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(extra);
    std::fs::write(&config, text).unwrap();
    config
}

#[test]
fn check_config_refuses_a_rule_without_match() {
    let dir = tempfile::tempdir().unwrap();
    let config = shipped_config_with(dir.path(), "\n[[clients]]\nname = \"everyone\"\n");
    let out = run(
        &["-c", config.to_str().unwrap(), "check-config"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"everyone\"") && stderr.contains("no `match`"),
        "{stderr}"
    );
    assert!(stderr.contains(r#"subject = ["**"]"#), "{stderr}");

    // The explicit catch-all the message names is accepted.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "name = \"everyone\"\n",
        "name = \"everyone\"\nmatch = { subject = [\"**\"] }\n",
    );
    std::fs::write(&config, text).unwrap();
    let out = run(
        &["-c", config.to_str().unwrap(), "check-config"],
        dir.path(),
    );
    succeeded(&out);
}

#[test]
fn check_config_warns_when_a_rule_may_ask_for_the_google_provider_audience() {
    let dir = tempfile::tempdir().unwrap();
    let provider = "https://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/devices/providers/token-broker";
    let config = shipped_config_with(
        dir.path(),
        &format!(
            "\n[google]\nproject_number = \"123456789012\"\npool_id = \"devices\"\nprovider_id = \"token-broker\"\n\
             \n[[clients]]\nname = \"self-service\"\nmatch = {{ spiffe = [\"spiffe://dev.token-broker.local/other/*\"] }}\n\
             audiences = [\"{provider}\"]\n"
        ),
    );
    let out = run(
        &["-c", config.to_str().unwrap(), "check-config"],
        dir.path(),
    );
    let stdout = succeeded(&out);
    let warnings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("# warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(
        warnings[0].contains("\"self-service\"") && warnings[0].contains(provider),
        "{stdout}"
    );
}

#[test]
fn usage_errors_exit_1_and_refusals_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = shipped_config_with(dir.path(), "");
    let config = config.to_str().unwrap();
    for args in [
        &[
            "-c",
            config,
            "verify-cert",
            "--bogus-flag",
            "certs/dev/device.pem",
        ][..],
        &["-c", config, "verify-cert"],
        &["no-such-command"],
        &["token", "--url", "https://localhost:1"],
    ] {
        let out = run(args, dir.path());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Usage"),
            "{args:?}"
        );
    }
    for args in [&["--help"][..], &["verify-cert", "--help"], &["--version"]] {
        let out = run(args, dir.path());
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
    let refused = run(
        &[
            "-c",
            config,
            "verify-cert",
            "certs/dev/device.pem",
            "--at",
            "2099-01-01T00:00:00Z",
        ],
        dir.path(),
    );
    assert_eq!(refused.status.code(), Some(2));
}

/// `args` in `dir` with stdout (or stderr) a pipe whose reader is already gone, as under
/// `| head -c1` once head has exited: every write there fails with EPIPE.
fn run_into_closed_pipe(args: &[&str], dir: &Path, stderr_too: bool) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut command = Command::new(binary());
    command.args(args).current_dir(dir);
    if stderr_too {
        command.stderr(writer).stdout(Stdio::null());
    } else {
        command.stdout(writer).stderr(Stdio::piped());
    }
    command.output().unwrap()
}

#[test]
fn a_closed_stdout_or_stderr_keeps_every_commands_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let config = shipped_config_with(dir.path(), "");
    let config = config.to_str().unwrap();
    let google =
        "\n[google]\nproject_number = \"42\"\npool_id = \"fleet\"\nprovider_id = \"broker\"\n";
    let with_google = dir.path().join("google.toml");
    std::fs::write(
        &with_google,
        std::fs::read_to_string(config).unwrap() + google,
    )
    .unwrap();
    let with_google = with_google.to_str().unwrap();
    let later = "2099-01-01T00:00:00Z";
    let cases: &[(&[&str], i32)] = &[
        (&["-c", config, "verify-cert", "certs/dev/device.pem"], 0),
        (
            &[
                "-c",
                config,
                "verify-cert",
                "certs/dev/device.pem",
                "--at",
                later,
            ],
            2,
        ),
        (&["-c", config, "check-config"], 0),
        (&["-c", config, "jwks"], 0),
        (&["-c", with_google, "wif-setup"], 0),
        (&["init", "--dir", "other-pki", "--force"], 0),
        (&["rotate-ticket-keys", "tickets.key"], 0),
        (&["-c", "missing.toml", "check-config"], 1),
        (&["--help"], 0),
        (&["--version"], 0),
        (
            &[
                "token",
                "--url",
                "https://localhost:1",
                "--cert",
                "none.pem",
                "--key",
                "none.pem",
                "--format",
                "executable",
            ],
            1,
        ),
    ];
    for (args, code) in cases {
        for stderr_too in [false, true] {
            let out = run_into_closed_pipe(args, dir.path(), stderr_too);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(*code),
                "{args:?} (closed {}): {stderr}",
                if stderr_too { "stderr" } else { "stdout" }
            );
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn wif_setup_jwks_step_reads_the_config_it_was_given_from_any_folder() {
    let dir = tempfile::tempdir().unwrap();
    // A development config and PKI in the current folder, which `jwks` without -c would read.
    shipped_config_with(dir.path(), "");
    // The config wif-setup is given, elsewhere, with its own keys.
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let broker = shipped_config_with(
        &etc,
        "\n[google]\nproject_number = \"42\"\npool_id = \"fleet\"\nprovider_id = \"broker\"\n",
    );
    let out = run(&["-c", "etc/config.toml", "wif-setup"], dir.path());
    let script = succeeded(&out);
    let jwks_line = script
        .lines()
        .find(|line| line.starts_with("token-broker ") && line.contains(" jwks"))
        .unwrap_or_else(|| panic!("no jwks step in:\n{script}"));
    // Run that step as the script would, from another folder, the binary on PATH.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(binary(), bin.join("token-broker")).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let step = Command::new("sh")
        .args(["-c", jwks_line])
        .current_dir(elsewhere.path())
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env_remove("TOKEN_BROKER_CONFIG")
        .output()
        .unwrap();
    assert!(
        step.status.success(),
        "{jwks_line}: {}",
        String::from_utf8_lossy(&step.stderr)
    );
    let uploaded = std::fs::read_to_string(elsewhere.path().join("jwks.json")).unwrap();
    let expected = succeeded(&run(&["-c", broker.to_str().unwrap(), "jwks"], dir.path()));
    let local = succeeded(&run(&["jwks"], dir.path()));
    assert_ne!(expected, local, "the two configs must have different keys");
    assert_eq!(uploaded, expected, "{jwks_line}");
}

/// The `# warning:` lines of a successful `check-config`.
fn check_config_warnings(config: &Path, dir: &Path) -> Vec<String> {
    let stdout = succeeded(&run(&["-c", config.to_str().unwrap(), "check-config"], dir));
    stdout
        .lines()
        .filter(|l| l.starts_with("# warning:"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn check_config_warns_on_a_provider_resource_name_as_an_audience() {
    let dir = tempfile::tempdir().unwrap();
    let resource = "//iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/fleet/providers/broker";
    let config = shipped_config_with(
        dir.path(),
        &format!(
            "\n[[clients]]\nname = \"sensors\"\nmatch = {{ spiffe = [\"spiffe://dev.token-broker.local/other/*\"] }}\n\
             audiences = [\"{resource}\"]\n"
        ),
    );
    let warnings = check_config_warnings(&config, dir.path());
    let named: Vec<_> = warnings
        .iter()
        .filter(|w| w.contains("\"sensors\"") && w.contains(&format!("\"https:{resource}\"")))
        .collect();
    assert_eq!(named.len(), 1, "{warnings:#?}");
    // The form Google accepts draws no such warning.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("\"{resource}\""), &format!("\"https:{resource}\""));
    std::fs::write(&config, text).unwrap();
    let warnings = check_config_warnings(&config, dir.path());
    assert!(
        !warnings.iter().any(|w| w.contains("resource name")),
        "{warnings:#?}"
    );
}

/// `examples/production.toml` with its files replaced by a fresh development PKI's, on
/// loopback: what `check-config` says of it is what it would say in production.
fn production_example(dir: &Path) -> std::path::PathBuf {
    assert!(run(&["init", "--dir", "certs/dev"], dir).status.success());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/production.toml");
    let mut text = std::fs::read_to_string(example).unwrap();
    for (production, dev) in [
        (
            "/etc/token-broker/tls/server-chain.pem",
            "certs/dev/server.pem",
        ),
        (
            "/etc/token-broker/tls/server-key.pem",
            "certs/dev/server-key.pem",
        ),
        ("/etc/token-broker/client-ca/", "certs/dev/ca.pem"),
        (
            r#"["/etc/token-broker/crl/devices-issuing.crl", "/etc/token-broker/crl/root.crl"]"#,
            r#"["certs/dev/ca.crl.pem"]"#,
        ),
        ("/etc/token-broker/signing-keys", "certs/dev/keys"),
        ("0.0.0.0:8443", "127.0.0.1:0"),
        ("10.0.0.5:9090", "127.0.0.1:0"),
    ] {
        assert!(
            text.contains(production),
            "examples/production.toml no longer has {production}"
        );
        text = text.replace(production, dev);
    }
    let path = dir.join("production.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_production_example_checks_and_writes_audiences_as_google_accepts_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = production_example(dir.path());
    let warnings = check_config_warnings(&config, dir.path());
    assert!(
        !warnings.iter().any(|w| w.contains("iam.googleapis.com")),
        "{warnings:#?}"
    );
}

#[test]
fn an_empty_key_dir_names_the_production_fix_and_that_fix_works() {
    let dir = tempfile::tempdir().unwrap();
    let config = production_example(dir.path());
    let keys = dir.path().join("certs/dev/keys");
    std::fs::remove_dir_all(&keys).unwrap();
    std::fs::create_dir(&keys).unwrap();
    let out = run(
        &["-c", config.to_str().unwrap(), "check-config"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no signing key usable"), "{stderr}");
    assert!(
        !stderr.contains("token-broker init"),
        "the dev PKI generator is no production fix: {stderr}"
    );
    // The command it names, run as printed, makes a key the broker takes.
    let command = stderr
        .split('`')
        .find(|part| part.starts_with("openssl "))
        .unwrap_or_else(|| panic!("no openssl command in: {stderr}"));
    let made = Command::new("sh")
        .args(["-c", command])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    succeeded(&run(
        &["-c", config.to_str().unwrap(), "check-config"],
        dir.path(),
    ));
}

#[test]
fn check_configs_effective_config_keeps_units_drops_empty_sections_and_loads_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = shipped_config_with(dir.path(), "");
    let effective = succeeded(&run(
        &["-c", config.to_str().unwrap(), "check-config"],
        dir.path(),
    ));
    for line in [
        r#"session_ticket_lifetime = "1d""#,
        r#"rotate_after = "90d""#,
        r#"token_ttl = "5m""#,
    ] {
        assert!(
            effective.lines().any(|l| l == line),
            "{line} missing:\n{effective}"
        );
    }
    assert!(
        !effective.lines().any(|l| l == "[audit]"),
        "an empty [audit]:\n{effective}"
    );
    // What it prints is a config that loads to the same effective config.
    let again = dir.path().join("effective.toml");
    std::fs::write(&again, &effective).unwrap();
    let twice = succeeded(&run(
        &["-c", again.to_str().unwrap(), "check-config"],
        dir.path(),
    ));
    assert_eq!(twice, effective);

    let dir = tempfile::tempdir().unwrap();
    let production = production_example(dir.path());
    let effective = succeeded(&run(
        &["-c", production.to_str().unwrap(), "check-config"],
        dir.path(),
    ));
    for empty in ["[dev]", "[audit]"] {
        assert!(
            !effective.lines().any(|l| l == empty),
            "an empty {empty}:\n{effective}"
        );
    }
}

#[test]
fn check_config_warns_when_the_active_signing_key_is_past_rotate_after() {
    let dir = tempfile::tempdir().unwrap();
    let config = shipped_config_with(dir.path(), "");
    let rotation = |warnings: &[String]| warnings.iter().any(|w| w.contains("signer.rotate_after"));
    assert!(!rotation(&check_config_warnings(&config, dir.path())));
    // An undated key's age is its file's: 100 days, past the shipped 90d.
    let aged = Command::new("sh")
        .args(["-c", "touch -d '100 days ago' certs/dev/keys/*.pem"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(aged.success());
    let warnings = check_config_warnings(&config, dir.path());
    assert!(rotation(&warnings), "{warnings:#?}");
}

/// A PATH whose `token-broker` is the binary under test, as an installed one would be.
fn path_with_binary(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("token-broker");
    if !link.exists() {
        std::os::unix::fs::symlink(binary(), link).unwrap();
    }
    format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display())
}

/// `line` run by sh in `dir` with the binary on PATH.
fn shell(line: &str, dir: &Path, path: &str) -> Output {
    Command::new("sh")
        .args(["-c", line])
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("TOKEN_BROKER_CONFIG")
        .output()
        .unwrap()
}

/// The line after the one starting with `label` in `text`, trimmed.
/// `command` (a `serve` line of the docs) run by `sh` in `dir` with `path`, once it has said
/// it is serving; fails with what it said otherwise.
fn serving(command: &str, dir: &Path, path: &str) -> std::process::Child {
    let mut server = Command::new("sh")
        .args(["-c", &format!("exec {command}")])
        .current_dir(dir)
        .env("PATH", path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(server.stderr.take().unwrap());
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + support::PATIENCE;
    let mut said = Vec::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let serving = line.contains("token-broker serving");
        said.push(line);
        if serving {
            break;
        }
    }
    assert!(
        said.iter().any(|l| l.contains("token-broker serving")),
        "{}",
        said.join("\n")
    );
    server
}

fn line_after<'a>(text: &'a str, label: &str) -> &'a str {
    let mut lines = text.lines();
    lines
        .by_ref()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"));
    lines.next().map(str::trim).unwrap_or_default()
}

/// The binary alone, in an empty folder: a missing config names the way out, and the
/// command it names writes a PKI and a commented starting config that checks clean, prints
/// the next commands (run by `the_readme_newcomer_block_runs_as_written`), and never
/// replaces a config.
#[test]
fn a_missing_config_names_the_way_out_and_init_writes_one_never_over_another() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let path = path_with_binary(dir.path());
    for command in ["serve", "check-config"] {
        let out = shell(&format!("token-broker {command}"), &work, &path);
        assert_eq!(out.status.code(), Some(1), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for needle in [
            "-c FILE",
            "TOKEN_BROKER_CONFIG",
            "`token-broker init --config config.toml`",
        ] {
            assert!(
                stderr.contains(needle),
                "{command}: {needle} missing: {stderr}"
            );
        }
    }
    let stderr =
        String::from_utf8_lossy(&shell("token-broker serve", &work, &path).stderr).into_owned();
    let suggested = stderr.split('`').nth(1).unwrap();
    let out = shell(suggested, &work, &path);
    let said = succeeded(&out);
    let serve = line_after(&said, "Next, run the server:");
    let curl = line_after(&said, "then, in another terminal, get a token:");
    assert!(
        serve.starts_with("token-broker ") && curl.starts_with("curl "),
        "{said}"
    );
    // The starting config is commented and checks clean.
    let config = std::fs::read_to_string(work.join("config.toml")).unwrap();
    assert!(config.lines().filter(|l| l.starts_with('#')).count() > 50);
    succeeded(&shell("token-broker check-config", &work, &path));
    // Again: the config is never overwritten.
    let again = shell(&format!("{suggested} --dir other --force"), &work, &path);
    assert!(succeeded(&again).contains("left as it is"));
    assert_eq!(
        std::fs::read_to_string(work.join("config.toml")).unwrap(),
        config
    );
}

/// The lines of the shell block marked `<!-- runnable: NAME ... -->` in `file`.
fn doc_block(file: &str, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let marker = format!("<!-- runnable: {name}");
    let after = text
        .split(&marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no {marker} in {file}"));
    let block = after
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    block.lines().map(str::to_owned).collect()
}

/// A command of a docs block, and the JSON its comment lines right below it show as the
/// answer, when they do.
type DocCommand = (String, Option<serde_json::Value>);

/// A block's commands, continuation lines joined.
fn doc_commands(lines: &[String]) -> Vec<DocCommand> {
    let mut out: Vec<DocCommand> = Vec::new();
    let mut command = String::new();
    let mut shown = String::new();
    let flush = |out: &mut Vec<DocCommand>, shown: &mut String| {
        if let Some(last) = out.last_mut() {
            if !shown.is_empty() {
                last.1 = serde_json::from_str(shown).ok();
            }
        }
        shown.clear();
    };
    for line in lines {
        let trimmed = line.trim();
        if let Some(comment) = trimmed.strip_prefix('#') {
            if !shown.is_empty() || comment.trim_start().starts_with('{') {
                shown.push_str(comment);
            }
            continue;
        }
        flush(&mut out, &mut shown);
        if trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                command.push_str(part);
                command.push(' ');
            }
            None => {
                command.push_str(trimmed);
                out.push((std::mem::take(&mut command), None));
            }
        }
    }
    flush(&mut out, &mut shown);
    out
}

/// The commands of README's block marked `<!-- runnable: NAME ... -->`.
fn readme_block(name: &str) -> Vec<String> {
    doc_commands(&doc_block("README.md", name))
        .into_iter()
        .map(|(command, _)| command)
        .collect()
}

/// `answer` agrees with what the docs show: the same keys, and the same values where the
/// docs do not abbreviate them (`"eyJ..."`).
fn agrees(answer: &serde_json::Value, shown: &serde_json::Value) -> bool {
    let (Some(answer), Some(shown)) = (answer.as_object(), shown.as_object()) else {
        return answer == shown;
    };
    let mut keys: Vec<&String> = answer.keys().collect();
    let mut shown_keys: Vec<&String> = shown.keys().collect();
    keys.sort();
    shown_keys.sort();
    keys == shown_keys
        && shown.iter().all(|(key, value)| {
            value.as_str().is_some_and(|v| v.contains("...")) || answer.get(key) == Some(value)
        })
}

/// README's walkthrough and the device's first token in docs/devices.md, run as written
/// (the binary for `cargo run --release --`, free ports for 8443 and 9090, the development
/// PKI for the device's files) against the shipped config's first `serve`: every command
/// exits 0, or 2 for a documented refusal, and every answer agrees with the JSON shown.
#[test]
fn the_docs_walkthrough_and_device_steps_run_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let path = path_with_binary(dir.path());
    let (port, admin) = (support::free_port(), support::free_port());
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    std::fs::write(
        work.join("config.toml"),
        shipped
            .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"))
            .replace(
                "https://localhost:8443",
                &format!("https://localhost:{port}"),
            )
            .replace("127.0.0.1:9090", &format!("127.0.0.1:{admin}")),
    )
    .unwrap();
    let mut server = serving("token-broker serve", &work, &path);

    let substitute = |command: &str| {
        command
            .replace("cargo run --release --", "token-broker")
            .replace("localhost:8443", &format!("localhost:{port}"))
            .replace("localhost:9090", &format!("127.0.0.1:{admin}"))
            .replace(
                "https://token-broker.example.com",
                &format!("https://localhost:{port}"),
            )
            .replace("/etc/device/cert.pem", "certs/dev/device.pem")
            .replace("/etc/device/key.pem", "certs/dev/device-key.pem")
            .replace("/etc/device/broker-ca.pem", "certs/dev/ca.pem")
    };
    let blocks = [
        ("README.md", "walkthrough"),
        ("docs/devices.md", "device-token"),
    ];
    let (mut ran, mut compared) = (0, 0);
    for (file, name) in blocks {
        for (command, shown) in doc_commands(&doc_block(file, name)) {
            let command = substitute(&command);
            let out = shell(&command, &work, &path);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                matches!(out.status.code(), Some(0 | 2)),
                "{file} ({name}): {command}: {:?}\n{stdout}\n{stderr}",
                out.status.code()
            );
            assert!(!stderr.contains("panicked"), "{command}: {stderr}");
            if let Some(shown) = shown {
                let answer: serde_json::Value = serde_json::from_str(&stdout)
                    .unwrap_or_else(|_| panic!("{file}: {command}: not JSON: {stdout}"));
                assert!(
                    agrees(&answer, &shown),
                    "{file}: {command}:\n{answer:#}\nshown:\n{shown:#}"
                );
                compared += 1;
            }
            if command.contains("token-broker token") {
                let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
                assert!(
                    answer["access_token"].is_string(),
                    "{command}: {stdout} {stderr}"
                );
            }
            ran += 1;
        }
    }
    assert!(
        ran >= 9 && compared >= 2,
        "{ran} commands, {compared} answers compared"
    );
    Command::new("kill")
        .arg("-TERM")
        .arg(server.id().to_string())
        .status()
        .unwrap();
    assert!(server.wait().unwrap().success());
}

/// README's newcomer block, run as written in an empty folder with the binary on PATH (the
/// server moved to a free port once `init` wrote the config), and what `init` prints as
/// the next commands is what README says.
#[test]
fn the_readme_newcomer_block_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let path = path_with_binary(dir.path());
    let commands = readme_block("newcomer");
    assert_eq!(commands.len(), 3, "{commands:?}");
    let said = succeeded(&shell(&commands[0], &work, &path));
    assert_eq!(
        line_after(&said, "Next, run the server:"),
        commands[1],
        "{said}"
    );
    assert_eq!(
        line_after(&said, "then, in another terminal, get a token:"),
        commands[2],
        "{said}"
    );

    let port = support::free_port();
    let config = std::fs::read_to_string(work.join("config.toml")).unwrap();
    std::fs::write(
        work.join("config.toml"),
        config
            .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"))
            .replace(
                "https://localhost:8443",
                &format!("https://localhost:{port}"),
            )
            .replace("127.0.0.1:9090", "127.0.0.1:0"),
    )
    .unwrap();
    let mut server = serving(&commands[1], &work, &path);
    let curl = commands[2].replace("localhost:8443", &format!("localhost:{port}"));
    let out = shell(&format!("{curl} -sS"), &work, &path);
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{curl}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        body["access_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("eyJ")),
        "{body}"
    );
    Command::new("kill")
        .arg("-TERM")
        .arg(server.id().to_string())
        .status()
        .unwrap();
    assert!(server.wait().unwrap().success());
}

/// One spelling of a distinguished name: what `check-config` prints of a CA, pasted into
/// `match.issuer`, matches; an OpenSSL-style spelling draws a warning, and `verify-cert`
/// says per rule which condition failed.
#[test]
fn a_ca_name_pasted_from_check_config_matches_and_a_miss_is_explained_per_rule() {
    let dir = tempfile::tempdir().unwrap();
    let config = shipped_config_with(dir.path(), "");
    let c = config.to_str().unwrap();
    let report = succeeded(&run(&["-c", c, "check-config"], dir.path()));
    let root = report
        .lines()
        .find_map(|l| l.strip_prefix("# root CA ")?.split(": pin ").next())
        .unwrap_or_else(|| panic!("no root CA line:\n{report}"))
        .to_owned();
    assert!(!root.contains(", "), "RFC 4514, as rules read it: {root}");
    let shipped = std::fs::read_to_string(&config).unwrap();
    let with_issuer = |issuer: &str| {
        let text = shipped.replace(
            "[clients.match]\nspiffe = [",
            &format!("[clients.match]\nissuer = [{issuer:?}]\nspiffe = ["),
        );
        assert_ne!(
            text, shipped,
            "the shipped rule's match changed; update this test"
        );
        std::fs::write(&config, text).unwrap();
    };
    with_issuer(&root);
    let accepted = run(
        &["-c", c, "verify-cert", "certs/dev/device.pem"],
        dir.path(),
    );
    assert_eq!(
        accepted.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&accepted.stdout)
    );
    assert!(!check_config_warnings(&config, dir.path())
        .iter()
        .any(|w| w.contains("match.issuer")));

    // The same name as OpenSSL prints it by default: in certificate order, ", " between.
    let openssl: Vec<&str> = root.split(',').rev().collect();
    let openssl = openssl.join(", ");
    with_issuer(&openssl);
    let warnings = check_config_warnings(&config, dir.path());
    assert!(
        warnings.iter().any(|w| w.contains("\"dev-devices\"")
            && w.contains("matches no CA")
            && w.contains(&root)),
        "{warnings:#?}"
    );
    let refused = run(
        &["-c", c, "verify-cert", "certs/dev/device.pem"],
        dir.path(),
    );
    assert_eq!(refused.status.code(), Some(2));
    let decision: serde_json::Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(decision["reason"], "no_matching_rule");
    assert_eq!(decision["rules"][0]["rule"], "dev-devices", "{decision:#}");
    let failed = decision["rules"][0]["failed"].as_str().unwrap_or_default();
    assert!(
        failed.starts_with(&format!(
            "match.issuer: {root:?} matches none of [{openssl:?}]"
        )),
        "{failed}"
    );
}
