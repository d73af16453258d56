//! `token-broker token --format executable` under Google's executable-sourced credential
//! contract (AIP-4117), driven by the real client libraries (Python `google-auth`, Node
//! `google-auth-library`, unmodified) whose STS and IAM are the in-process fake: the
//! library's environment, its `output_file` (the second client is served from it, the broker
//! sees no request), `--cache` beside or at the same file, refusals as the libraries show
//! them, and the device configuration `wif-setup` prints.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::devices::{python, start, write_device, Device};
use crate::support::fake_google::{FakeGoogle, FakeGoogleConfig};
use crate::support::{self, LeafSpec, TestBroker, ISSUER};

const RUNNER: &str = "runner@fake-project.iam.gserviceaccount.com";
const DEVICE_SUB: &str = "spiffe://test.example/device/python-1";
const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";

/// Answers of the broker's `/token`, whatever their status.
async fn broker_requests(broker: &TestBroker) -> f64 {
    broker
        .metrics()
        .await
        .lines()
        .filter(|line| line.starts_with("token_broker_token_requests_total{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `token-broker token ... --format executable EXTRA`, without `--audience`: the library's
/// GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE supplies it.
fn command(broker: &TestBroker, device: &Device, extra: &str) -> String {
    format!(
        "{} token --url {} --cert {} --key {} --ca {} --format executable {extra}",
        support::binary().display(),
        broker.url(""),
        device.cert.display(),
        device.key.display(),
        device.ca.display(),
    )
}

fn credential_config(
    fake: &FakeGoogle,
    command: &str,
    impersonate: bool,
    output_file: Option<&Path>,
) -> Value {
    let mut executable = json!({ "command": command, "timeout_millis": 60000 });
    if let Some(path) = output_file {
        executable["output_file"] = json!(path);
    }
    let mut config = json!({
        "type": "external_account",
        "audience": FakeGoogleConfig::new(ISSUER).provider_resource(),
        "subject_token_type": ID_TOKEN_TYPE,
        "token_url": format!("{}/v1/token", fake.url),
        "credential_source": { "executable": executable },
    });
    if impersonate {
        config["service_account_impersonation_url"] = json!(format!(
            "{}/v1/projects/-/serviceAccounts/{RUNNER}:generateAccessToken",
            fake.url
        ));
    }
    config
}

#[derive(Clone, Copy, Debug)]
enum Library {
    Python,
    Node,
}

/// Gets an access token with the library from the credential configuration at `config`;
/// prints `{"token"}`, or `{"error"}` (the library's message) and exits 1.
const PYTHON: &str = r#"
import json, sys
import google.auth.pluggable, google.auth.transport.requests
# The executable-sourced credential type google.auth.default() builds from this file
# (loaded directly: default() would also ask Cloud Resource Manager for a project id).
creds = google.auth.pluggable.Credentials.from_file(sys.argv[1], scopes=["https://www.googleapis.com/auth/cloud-platform"])
try:
    creds.refresh(google.auth.transport.requests.Request())
except Exception as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(1)
print(json.dumps({"token": creds.token}))
"#;

const NODE: &str = r#"
const fs = require('fs');
const {ExternalAccountClient} = require('google-auth-library');
const client = ExternalAccountClient.fromJSON(JSON.parse(fs.readFileSync(process.argv[1], 'utf8')));
client.getAccessToken().then(
  (answer) => console.log(JSON.stringify({token: answer.token})),
  (error) => { console.log(JSON.stringify({error: error.message})); process.exit(1); });
"#;

/// Runs `library` on the configuration at `config` (in a blocking task: the broker under test
/// shares this runtime); the process's output and its JSON line.
async fn run_library(library: Library, config: &Path, home: &Path) -> (Output, Value) {
    let mut process = match library {
        Library::Python => {
            let mut process = Command::new(python());
            process.args(["-c", PYTHON]);
            process
        }
        Library::Node => {
            let mut process = Command::new("node");
            process
                .args(["-e", NODE])
                .current_dir(support::require_node_modules());
            process
        }
    };
    process
        .arg(config)
        .env("GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES", "1")
        .env("HOME", home)
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS");
    for variable in [
        "TOKEN_BROKER_URL",
        "TOKEN_BROKER_CERT",
        "TOKEN_BROKER_KEY",
        "TOKEN_BROKER_CA",
    ] {
        process.env_remove(variable);
    }
    let out = tokio::task::spawn_blocking(move || process.output().unwrap())
        .await
        .unwrap();
    let answer = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{library:?} printed no JSON:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, answer)
}

/// The mode bits of a file, which must be a regular file.
#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path).unwrap();
    assert!(meta.file_type().is_file(), "{}", path.display());
    meta.permissions().mode() & 0o777
}

/// A successful executable response the libraries accept from `output_file`: unexpired, with
/// `expiration_time`, 0600.
fn assert_output_file(path: &Path) -> Value {
    let response: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(response["version"], 1);
    assert_eq!(response["success"], true);
    assert_eq!(response["token_type"], ID_TOKEN_TYPE);
    assert!(response["id_token"].as_str().unwrap().split('.').count() == 3);
    let expiration = response["expiration_time"].as_i64().unwrap();
    assert!(expiration > token_broker::clock::unix_now());
    #[cfg(unix)]
    assert_eq!(mode(path), 0o600);
    response
}

/// Where the token command keeps its token in a case.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Files {
    /// Neither `output_file` nor `--cache`: every client runs the command.
    None,
    /// `output_file` only.
    OutputFile,
    /// `output_file` and `--cache` naming the same file.
    SameAsCache,
    /// `output_file` and `--cache` naming different files.
    CacheElsewhere,
}

async fn library_cases(library: Library) {
    let (fake, broker, device) = start().await;
    let home = broker.setup.dir.path().to_owned();
    for (case, (impersonate, files)) in [
        (true, Files::None),
        (false, Files::None),
        (true, Files::OutputFile),
        (false, Files::OutputFile),
        (true, Files::SameAsCache),
        (true, Files::CacheElsewhere),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("{library:?} case {case}: impersonate {impersonate}, {files:?}");
        let output_file = broker
            .setup
            .path(&format!("case-{case}/subject-token.json"));
        let cache = match files {
            Files::SameAsCache => output_file.clone(),
            _ => broker.setup.path(&format!("case-{case}/cache.json")),
        };
        std::fs::create_dir_all(output_file.parent().unwrap()).unwrap();
        let extra = match files {
            Files::SameAsCache | Files::CacheElsewhere => format!("--cache {}", cache.display()),
            Files::None | Files::OutputFile => String::new(),
        };
        let config = credential_config(
            &fake,
            &command(&broker, &device, &extra),
            impersonate,
            (files != Files::None).then_some(output_file.as_path()),
        );
        let config_path = broker.setup.write(
            &format!("case-{case}/credentials.json"),
            &config.to_string(),
        );
        let before = broker_requests(&broker).await;
        let mut clients = 2;
        for _ in 0..clients {
            let (out, answer) = run_library(library, &config_path, &home).await;
            assert!(
                out.status.success(),
                "{what}: {answer}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let issued = fake
                .issued_token(answer["token"].as_str().unwrap())
                .expect("a token the fake issued");
            if impersonate {
                assert_eq!(
                    (issued.subject.as_str(), issued.federated),
                    (RUNNER, false),
                    "{what}"
                );
            } else {
                let principal = FakeGoogleConfig::new(ISSUER).principal(DEVICE_SUB);
                assert_eq!(
                    (issued.subject, issued.federated),
                    (principal, true),
                    "{what}"
                );
            }
        }
        if files == Files::CacheElsewhere {
            // The library's file gone: it runs the command, which answers from its cache
            // and writes the file again.
            std::fs::remove_file(&output_file).unwrap();
            let (out, answer) = run_library(library, &config_path, &home).await;
            assert!(out.status.success(), "{what}: {answer}");
            clients += 1;
        }
        let expected = if files == Files::None { clients } else { 1 };
        assert_eq!(
            broker_requests(&broker).await - before,
            f64::from(expected),
            "{what}: broker requests for {clients} clients"
        );
        if files != Files::None {
            let response = assert_output_file(&output_file);
            // The library exchanged the very token of the file, for the provider.
            let exchanged = claims(response["id_token"].as_str().unwrap());
            assert_eq!(fake.last_subject_claims().unwrap(), exchanged, "{what}");
            assert_eq!(exchanged["sub"], DEVICE_SUB);
            assert_eq!(
                exchanged["aud"],
                FakeGoogleConfig::new(ISSUER).default_audience()
            );
        }
        if files == Files::CacheElsewhere {
            #[cfg(unix)]
            assert_eq!(mode(&cache), 0o600);
        }
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_google_auth_runs_the_command_and_reuses_its_output_file() {
    library_cases(Library::Python).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_google_auth_library_runs_the_command_and_reuses_its_output_file() {
    library_cases(Library::Node).await;
}

/// The longest quote-free piece of `text`: what survives the libraries' quoting intact.
fn longest_plain_piece(text: &str) -> &str {
    text.split(['"', '\'', '\\'])
        .max_by_key(|piece| piece.len())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_device_sees_the_brokers_reason_in_the_librarys_error() {
    let (fake, broker, _) = start().await;
    // A device of the PKI that no client rule takes.
    let mut spec = LeafSpec::device("printer-1");
    spec.spiffe = Some("spiffe://test.example/printer/printer-1".into());
    let leaf = broker.setup.intermediate.leaf(&spec);
    let (status, refusal) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 401, "{refusal}");
    let code = refusal["error"].as_str().unwrap().to_owned();
    let reason = refusal["error_description"].as_str().unwrap().to_owned();
    let printer = write_device(&broker.setup, &leaf);
    let home = broker.setup.dir.path().to_owned();
    let output_file = broker.setup.path("printer-token.json");
    let config = credential_config(
        &fake,
        &command(&broker, &printer, ""),
        true,
        Some(&output_file),
    );
    let config_path = broker
        .setup
        .write("printer-credentials.json", &config.to_string());
    for library in [Library::Python, Library::Node] {
        let (out, answer) = run_library(library, &config_path, &home).await;
        assert!(!out.status.success());
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.contains(longest_plain_piece(&reason)) && error.contains(&code),
            "{library:?} shows {error:?}, not the broker's reason {reason:?}"
        );
        // Failures are not written for the next client.
        assert!(!output_file.exists());
    }
    assert_eq!(fake.calls(support::fake_google::Api::Sts), 0);
    broker.stop().await;
}

/// Runs the token command as a library would, with these GOOGLE_EXTERNAL_ACCOUNT_* variables.
async fn run_token(
    broker: &TestBroker,
    device: &Device,
    extra: &str,
    env: &[(&str, &str)],
) -> (Option<i32>, Value, String) {
    let args: Vec<String> = command(broker, device, extra)
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect();
    let mut process = Command::new(support::binary());
    process.args(args).envs(env.iter().copied());
    let out = tokio::task::spawn_blocking(move || process.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    support::logs::assert_no_secrets(&stderr, "token");
    let answer = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON on stdout; stderr: {stderr}"));
    (out.status.code(), answer, stderr)
}

fn claims(id_token: &str) -> Value {
    let payload = id_token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_takes_the_libraries_audience_and_token_type_and_refuses_what_sts_would() {
    let (_fake, broker, device) = start().await;
    let google = FakeGoogleConfig::new(ISSUER);
    let provider = google.provider_resource();
    let audience = ("GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE", provider.as_str());

    // The configuration's audience, as the provider's default audience; token type jwt.
    let (code, answer, stderr) = run_token(
        &broker,
        &device,
        "",
        &[
            audience,
            (
                "GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE",
                "urn:ietf:params:oauth:token-type:jwt",
            ),
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.is_empty(),
        "libraries read stderr as output: {stderr}"
    );
    assert_eq!(answer["token_type"], "urn:ietf:params:oauth:token-type:jwt");
    assert_eq!(
        claims(answer["id_token"].as_str().unwrap())["aud"],
        google.default_audience()
    );

    let before = broker_requests(&broker).await;
    // --audience naming another provider than the configuration.
    let other = google
        .default_audience()
        .replace("providers/token-broker", "providers/other");
    let (code, answer, _) = run_token(
        &broker,
        &device,
        &format!("--audience {other}"),
        &[audience],
    )
    .await;
    assert_eq!(code, Some(1));
    assert_eq!(
        (answer["success"].as_bool(), answer["code"].as_str()),
        (Some(false), Some("invalid_target"))
    );
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("same provider"),
        "{answer}"
    );
    // SAML, which the broker cannot issue.
    let (code, answer, _) = run_token(
        &broker,
        &device,
        "",
        &[(
            "GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE",
            "urn:ietf:params:oauth:token-type:saml2",
        )],
    )
    .await;
    assert_eq!(code, Some(1));
    assert_eq!(answer["code"], "unsupported_token_type");
    assert!(
        answer["message"].as_str().unwrap().contains("not SAML"),
        "{answer}"
    );
    // A Google access token is no subject token.
    let (code, answer, _) = run_token(
        &broker,
        &device,
        &format!("--service-account {RUNNER}"),
        &[audience],
    )
    .await;
    assert_eq!(code, Some(1));
    assert_eq!(answer["code"], "invalid_request");
    // The impersonated email is the library's business: the same ID token.
    let (code, answer, _) = run_token(
        &broker,
        &device,
        "",
        &[
            audience,
            (
                "GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL",
                "other@p.iam.gserviceaccount.com",
            ),
        ],
    )
    .await;
    assert_eq!(code, Some(0));
    assert_eq!(
        claims(answer["id_token"].as_str().unwrap())["sub"],
        DEVICE_SUB
    );
    assert_eq!(
        broker_requests(&broker).await - before,
        1.0,
        "refusals never reach the broker"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_and_output_file_work_as_one_file_or_two() {
    let (_fake, broker, device) = start().await;
    let provider = FakeGoogleConfig::new(ISSUER).provider_resource();
    let audience = ("GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE", provider.as_str());
    let output = |path: &Path| -> (&'static str, String) {
        (
            "GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE",
            path.display().to_string(),
        )
    };

    // One file: the second run is served from it.
    let same = broker.setup.path("same.json");
    let extra = format!("--cache {}", same.display());
    let before = broker_requests(&broker).await;
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let (name, value) = output(&same);
        let (code, answer, stderr) =
            run_token(&broker, &device, &extra, &[audience, (name, &value)]).await;
        assert_eq!(code, Some(0), "{stderr}");
        tokens.push(answer["id_token"].as_str().unwrap().to_owned());
        assert_eq!(assert_output_file(&same)["id_token"], answer["id_token"]);
    }
    assert_eq!(tokens[0], tokens[1]);
    assert_eq!(broker_requests(&broker).await - before, 1.0);

    // Two files: both written; the output file gone, the cache still serves and rewrites it.
    let cache = broker.setup.path("cache.json");
    let out_file = broker.setup.path("output.json");
    let extra = format!("--cache {}", cache.display());
    let before = broker_requests(&broker).await;
    for _ in 0..2 {
        let (name, value) = output(&out_file);
        let (code, _, stderr) =
            run_token(&broker, &device, &extra, &[audience, (name, &value)]).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert_output_file(&out_file);
        assert_output_file(&cache);
        std::fs::remove_file(&out_file).unwrap();
    }
    assert_eq!(broker_requests(&broker).await - before, 1.0);

    // A cache file another user could have written is not used, and stays silent on stderr
    // (libraries read it as output); it is replaced by a 0600 file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o644)).unwrap();
        let before = broker_requests(&broker).await;
        let (code, _, stderr) = run_token(&broker, &device, &extra, &[audience]).await;
        assert_eq!((code, stderr.as_str()), (Some(0), ""));
        assert_eq!(broker_requests(&broker).await - before, 1.0);
        assert_eq!(mode(&cache), 0o600);
    }
    broker.stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn the_output_file_is_replaced_whole_never_written_through() {
    let (_fake, broker, device) = start().await;
    let provider = FakeGoogleConfig::new(ISSUER).provider_resource();
    let audience = ("GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE", provider.as_str());
    let victim = broker.setup.path("victim.txt");
    std::fs::write(&victim, "victim").unwrap();
    let path = broker.setup.path("planted.json");
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    let value = path.display().to_string();
    let (code, _, stderr) = run_token(
        &broker,
        &device,
        "",
        &[audience, ("GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE", &value)],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
    assert_output_file(&path);
    // An existing file readable by others becomes a new 0600 file (a new inode).
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let inode = std::fs::metadata(&path).unwrap().ino();
    let (code, _, _) = run_token(
        &broker,
        &device,
        "",
        &[audience, ("GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE", &value)],
    )
    .await;
    assert_eq!(code, Some(0));
    assert_output_file(&path);
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), inode);
    // No temporary files are left beside it.
    let names: Vec<String> = std::fs::read_dir(broker.setup.dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    broker.stop().await;
}

/// The numbers of the script's `# N. ` step headings, in order.
fn step_numbers(script: &str) -> Vec<usize> {
    script
        .lines()
        .filter_map(|line| line.strip_prefix("# ")?.split_once(". ")?.0.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn wif_setup_prints_a_device_configuration_google_auth_uses_as_is() {
    let (fake, broker, device) = start().await;
    let config = broker.config_path.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(support::binary())
            .args(["--log-format", "text", "-c"])
            .arg(&config)
            .args(["wif-setup", "--project-id", "fake-project"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let script = String::from_utf8_lossy(&out.stdout).into_owned();
    // The test issuer is under .test, which only local networks resolve.
    assert!(
        stderr.contains(&format!(
            "warning: the issuer URL {ISSUER} names broker.test"
        )),
        "{stderr}"
    );
    assert!(script.contains(&format!("# warning: the issuer URL {ISSUER}")));
    let steps = step_numbers(&script);
    assert_eq!(steps, (1..=steps.len()).collect::<Vec<_>>(), "{script}");
    assert!(steps.len() >= 6, "{script}");
    for needle in [
        "token-broker agent --url",
        &format!("--service-account {RUNNER}"),
        "GCE_METADATA_HOST=127.0.0.1:8080",
        "GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1",
    ] {
        assert!(
            script.contains(needle),
            "{needle:?} missing from:\n{script}"
        );
    }
    let json = script
        .split("<<'JSON'\n")
        .nth(1)
        .unwrap()
        .split("\nJSON")
        .next()
        .unwrap();
    let printed: Value = serde_json::from_str(json).unwrap();
    let executable = &printed["credential_source"]["executable"];
    let command = executable["command"].as_str().unwrap();
    for needle in [
        "--ca /etc/device/broker-ca.pem",
        "--format executable",
        &format!("--url {ISSUER} "),
    ] {
        assert!(
            command.contains(needle),
            "{needle:?} missing from {command}"
        );
    }
    assert!(executable["output_file"].as_str().is_some());

    // The device's own locations put in; nothing else changed.
    let output_file = broker.setup.path("device-cache/subject-token.json");
    std::fs::create_dir_all(output_file.parent().unwrap()).unwrap();
    let device_config = json
        .replace(
            "/usr/local/bin/token-broker",
            &support::binary().display().to_string(),
        )
        .replace("/etc/device/cert.pem", &device.cert.display().to_string())
        .replace("/etc/device/key.pem", &device.key.display().to_string())
        .replace(
            "/etc/device/broker-ca.pem",
            &device.ca.display().to_string(),
        )
        .replace(
            &format!("--url {ISSUER} "),
            &format!("--url {} ", broker.url("")),
        )
        .replace(
            executable["output_file"].as_str().unwrap(),
            &output_file.display().to_string(),
        );
    let config_path = broker.setup.write("wif-device.json", &device_config);
    let home = broker.setup.dir.path().to_owned();
    let before = broker_requests(&broker).await;
    for _ in 0..2 {
        let (out, answer) = run_library(Library::Python, &config_path, &home).await;
        assert!(out.status.success(), "{answer}");
        let issued = fake
            .issued_token(answer["token"].as_str().unwrap())
            .unwrap();
        assert_eq!(issued.subject, RUNNER);
    }
    assert_eq!(broker_requests(&broker).await - before, 1.0);
    assert_output_file(&output_file);
    broker.stop().await;
}

#[test]
fn the_example_credential_configuration_runs_a_command_the_cli_accepts() {
    use clap::Parser;
    use token_broker::cli::{Cli, Command as CliCommand};
    use token_broker::device::client::TokenParams;
    use token_broker::device::executable::ExecutableEnv;
    use token_broker::device::token::TokenFormat;
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/devices/credential-config.json");
    let example: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let executable = &example["credential_source"]["executable"];
    assert!(executable["output_file"].is_string());
    let command = executable["command"].as_str().unwrap();
    let Some(CliCommand::Token(args)) = Cli::try_parse_from(command.split_whitespace())
        .unwrap()
        .command
    else {
        panic!("not a token command: {command}");
    };
    assert_eq!(args.format, TokenFormat::Executable);
    assert!(args.device.ca.is_some(), "a private broker CA needs --ca");
    // Its --audience is the one the library's environment implies.
    let env = ExecutableEnv {
        audience: example["audience"].as_str().map(str::to_owned),
        token_type: example["subject_token_type"].as_str().map(str::to_owned),
        ..ExecutableEnv::default()
    };
    let mut implied = TokenParams::default();
    env.prepare(&mut implied).unwrap();
    assert_eq!(implied.audience, args.audience);
}

/// tpm2-pkcs11, which p11-kit's proxy loads beside SoftHSM2, writes its TCTI errors on
/// stderr when there is no TPM. The libraries read stderr with the response: the token
/// command prints nothing but the response even so.
#[tokio::test(flavor = "multi_thread")]
async fn python_google_auth_gets_its_token_while_a_pkcs11_module_writes_on_stderr() {
    use crate::device_keys::{SoftHsm, P11_KIT_PROXY};
    support::require_file(P11_KIT_PROXY, "p11-kit-modules");
    support::require_file(
        "/usr/share/p11-kit/modules/tpm2_pkcs11.module",
        "libtpm2-pkcs11-1",
    );
    let (fake, broker, device) = start().await;
    let hsm = SoftHsm::new();
    let public = hsm.generate("EC:prime256v1", "device-key", "01");
    let leaf = broker
        .setup
        .intermediate
        .leaf_for_public_key(&LeafSpec::device("python-1"), &public);
    let cert = broker.setup.write("hsm-device.pem", &leaf.chain_pem);
    let pin_file = hsm.pin_file();
    // Without a TPM (none here: no TPM2_PKCS11_TCTI, no D-Bus), the module is noisy.
    let quiet = |command: &mut Command| {
        command
            .envs(hsm.env())
            .env_remove("TPM2_PKCS11_TCTI")
            .env_remove("DBUS_SESSION_BUS_ADDRESS");
    };
    let mut listing = Command::new("pkcs11-tool");
    listing.args(["--module", P11_KIT_PROXY, "-L"]);
    quiet(&mut listing);
    let noise = listing.output().unwrap();
    assert!(
        !noise.stderr.is_empty(),
        "the module was expected to write on stderr; nothing to test"
    );
    let args = format!(
        "{} token --url {} --cert {} --key pkcs11:token=device;object=device-key \
         --pkcs11-pin-file {} --ca {} --format executable",
        support::binary().display(),
        broker.url(""),
        cert.display(),
        pin_file.display(),
        device.ca.display(),
    );

    // The command alone: the response on stdout, nothing on stderr.
    let mut direct = Command::new(support::binary());
    direct.args(args.split_whitespace().skip(1)).envs([
        (
            "GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE",
            FakeGoogleConfig::new(ISSUER).provider_resource(),
        ),
        ("GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE", ID_TOKEN_TYPE.into()),
    ]);
    quiet(&mut direct);
    let out = tokio::task::spawn_blocking(move || direct.output().unwrap())
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stderr, "", "stderr of a successful run");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let response: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(response["success"], true, "{stdout}");

    // Through the library, with the module's environment.
    let env: String = hsm
        .env()
        .iter()
        .filter(|(name, _)| *name != "TPM2_PKCS11_TCTI")
        .map(|(name, value)| format!("{name}={} ", value.display()))
        .collect();
    let command = format!("env -u DBUS_SESSION_BUS_ADDRESS {env}{args}");
    let config = credential_config(&fake, &command, true, None);
    let config_path = broker
        .setup
        .write("hsm-credentials.json", &config.to_string());
    let home = broker.setup.dir.path().to_owned();
    let (out, answer) = run_library(Library::Python, &config_path, &home).await;
    assert!(
        out.status.success(),
        "{answer}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issued = fake
        .issued_token(answer["token"].as_str().unwrap())
        .expect("a token the fake issued");
    assert_eq!(issued.subject, RUNNER);
    broker.stop().await;
}
