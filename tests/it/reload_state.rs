//! What a reload keeps and what it says it left alone, and logs an operator can route:
//! rate-limit state across reloads, settings read only at start (warning and gauge),
//! `--log-format text`, and the audit file through logrotate's rename + SIGHUP (separate
//! processes, as deployed).

use std::path::Path;

use serde_json::Value;

use crate::replicas::Replica;
use crate::support::process::Process;
use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker};

const CREDENTIALS: &str = "grant_type=client_credentials";

async fn status(broker: &TestBroker, leaf: &Leaf) -> u16 {
    broker.token(Some(leaf), CREDENTIALS).await.0
}

/// Replaces `from` by `to` in the running broker's config file, then reloads it.
fn edit_and_reload(broker: &TestBroker, from: &str, to: &str) {
    let text = std::fs::read_to_string(&broker.config_path).unwrap();
    assert!(
        text.contains(from),
        "{from:?} is not in the config:\n{text}"
    );
    std::fs::write(&broker.config_path, text.replacen(from, to, 1)).unwrap();
    broker.live.reload().unwrap();
}

const LIMITED_RULE: &str = r#"
[[clients]]
name = "limited"
match = { spiffe = ["spiffe://test.example/device/*"] }
rate_limit = { requests_per_minute = 1, burst = 2 }
ttl = "10m"
"#;

/// A device at its limit stays limited across a reload that keeps its rule (same name,
/// rate and burst, other keys changed); a changed burst or rate starts afresh, and so does
/// a rule removed and added back (SECURITY.md, "Denial of service"). One request a minute: no refill during the test.
#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_state_follows_its_rule_across_reloads() {
    let mut setup = Setup::new();
    setup.extra_server = "reload_interval = \"0s\"".into();
    setup.rules =
        format!("{LIMITED_RULE}\n[[clients]]\nname = \"open\"\nmatch = {{ subject = [\"**\"] }}\n");
    let chatty = setup.intermediate.leaf(&LeafSpec::device("chatty"));
    let other = setup.intermediate.leaf(&LeafSpec::device("other"));
    let broker = setup.start().await;
    let statuses = |n: usize| {
        let (broker, chatty) = (&broker, &chatty);
        async move {
            let mut seen = Vec::new();
            for _ in 0..n {
                seen.push(status(broker, chatty).await);
            }
            seen
        }
    };
    assert_eq!(statuses(3).await, [200, 200, 429]);

    // The rule stays (its ttl changes, which applies): the device stays at its limit.
    edit_and_reload(&broker, "ttl = \"10m\"", "ttl = \"9m\"");
    let response = broker.post_token(Some(&chatty), CREDENTIALS).await;
    assert_eq!(
        response.status(),
        429,
        "a reload must not refill the bucket"
    );
    let wait: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let (code, body) = broker.token(Some(&other), CREDENTIALS).await;
    // 9 minutes: the new ttl applies (a second may pass between minting and answering).
    let expires_in = body["expires_in"].as_u64().unwrap_or(0);
    assert_eq!(code, 200, "{body}");
    assert!((538..=540).contains(&expires_in), "{body}");

    // A changed burst starts afresh: the new burst, then the limit.
    edit_and_reload(&broker, "burst = 2", "burst = 3");
    assert_eq!(statuses(4).await, [200, 200, 200, 429]);

    // Removed: the device falls to the open rule. Added back: a fresh bucket.
    let limited = LIMITED_RULE
        .replace("burst = 2", "burst = 3")
        .replace("10m", "9m");
    edit_and_reload(&broker, &limited, "");
    assert_eq!(statuses(4).await, [200, 200, 200, 200]);
    // Back before the open rule (after it, it would never match).
    edit_and_reload(&broker, "[[clients]]", &format!("{limited}\n[[clients]]"));
    assert_eq!(statuses(4).await, [200, 200, 200, 429]);

    // A changed rate, same burst, starts afresh too (the quota is rate and burst).
    edit_and_reload(
        &broker,
        "requests_per_minute = 1",
        "requests_per_minute = 2",
    );
    assert_eq!(statuses(4).await, [200, 200, 200, 429]);
    broker.stop().await;
}

/// An audit path that cannot be a file is a load problem: check-config and reloads name it,
/// and a reload keeps the running state.
#[tokio::test(flavor = "multi_thread")]
async fn an_audit_path_that_cannot_be_a_file_fails_the_reload() {
    let mut setup = Setup::new();
    setup.extra_server = "reload_interval = \"0s\"".into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("audited"));
    let broker = setup.start().await;
    let original = std::fs::read_to_string(&broker.config_path).unwrap();
    for (path, problem) in [("missing/audit.log", "the folder of"), (".", "is a folder")] {
        let audited = original.replacen(
            "[issuer]",
            &format!("[audit]\npath = {path:?}\n\n[issuer]"),
            1,
        );
        std::fs::write(&broker.config_path, audited).unwrap();
        let problems = broker.live.reload().unwrap_err().to_string();
        assert!(
            problems.contains("audit.path: ") && problems.contains(problem),
            "{problems}"
        );
        assert_eq!(status(&broker, &leaf).await, 200);
    }
    broker.stop().await;
}

fn pending_restart(setting: &str) -> String {
    format!("token_broker_config_pending_restart{{setting=\"{setting}\"}}")
}

const START_ONLY: [&str; 6] = [
    "server.listen",
    "admin.listen",
    "server.max_connections",
    "google.cache_capacity",
    "google.refresh_margin",
    "dev.pki_dir",
];

/// The in-process brokers' WARN lines naming `setting` as changed to `configured`.
fn pending_restart_warnings(setting: &str, configured: &str) -> Vec<Value> {
    support::logs::captured()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| {
            line["message"] == "setting changed in the config file; it applies only after a restart"
                && line["setting"] == setting
                && line["configured"] == configured
        })
        .collect()
}

/// A reload that changes settings read only at start applies everything else, names each
/// of them in a WARN line (running and configured value) and in
/// `config_pending_restart{setting}`, and keeps running with the old values (a connection
/// limit of 1 in the file does not stop a second connection; the admin listener the file
/// disables still answers). A file back in line clears the gauge.
#[tokio::test(flavor = "multi_thread")]
async fn settings_read_only_at_start_are_named_and_the_rest_of_a_reload_applies() {
    let mut setup = Setup::new();
    setup.extra_server = "reload_interval = \"0s\"".into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("start-only"));
    let broker = setup.start().await;
    let text = broker.metrics().await;
    for setting in START_ONLY {
        assert!(
            text.contains(&format!("{} 0\n", pending_restart(setting))),
            "{setting} not 0 at start:\n{text}"
        );
    }
    let original = std::fs::read_to_string(&broker.config_path).unwrap();
    let changed = original
        .replacen(
            "max_body_bytes = 1024",
            "max_body_bytes = 1024\nmax_connections = 1",
            1,
        )
        .replacen(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"\"",
            1,
        )
        .replacen("ttl = \"10m\"", "ttl = \"7m\"", 1);
    assert_eq!(changed.matches("ttl = \"7m\"").count(), 1);
    std::fs::write(&broker.config_path, &changed).unwrap();
    broker.live.reload().unwrap();

    // Applied: the rule's new lifetime.
    let (code, body) = broker.token(Some(&leaf), CREDENTIALS).await;
    assert_eq!((code, body["expires_in"].as_u64()), (200, Some(420)));
    // Not applied: two connections at once (each client keeps its own), the admin listener.
    let (first, second) = (broker.client(Some(&leaf)), broker.client(Some(&leaf)));
    for client in [&first, &second, &first, &second] {
        let response = client
            .post(broker.url("/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(CREDENTIALS)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let text = broker.metrics().await;
    assert_eq!(
        support::metric_value(
            &text,
            r#"token_broker_refused_connections_total{cause="max_connections"}"#
        ),
        0.0
    );
    for setting in START_ONLY {
        let expected = if matches!(setting, "server.max_connections" | "admin.listen") {
            1.0
        } else {
            0.0
        };
        assert_eq!(
            support::metric_value(&text, &pending_restart(setting)),
            expected,
            "{setting}"
        );
    }
    for (setting, running, configured) in [
        ("server.max_connections", "10000", "1"),
        ("admin.listen", "\"127.0.0.1:0\"", "\"\""),
    ] {
        let warnings = pending_restart_warnings(setting, configured);
        let warning = warnings
            .iter()
            .find(|w| w["running"] == running)
            .unwrap_or_else(|| panic!("no warning for {setting}: {warnings:?}"));
        assert_eq!(warning["level"], "WARN");
    }

    // Back in line: the gauge clears.
    std::fs::write(&broker.config_path, &original).unwrap();
    broker.live.reload().unwrap();
    let text = broker.metrics().await;
    for setting in START_ONLY {
        assert_eq!(
            support::metric_value(&text, &pending_restart(setting)),
            0.0,
            "{setting}"
        );
    }
    drop((first, second));
    broker.stop().await;
}

fn client(setup: &Setup, leaf: &Leaf) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(setup.tls_config(Some(leaf), rustls::DEFAULT_VERSIONS))
        .build()
        .unwrap()
}

async fn token(client: &reqwest::Client, port: u16) -> u16 {
    client
        .post(format!("https://localhost:{port}/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(CREDENTIALS)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn port_of(address: &str) -> u16 {
    address.parse::<std::net::SocketAddr>().unwrap().port()
}

/// Text lines: `TIMESTAMP LEVEL TARGET: message key=value ...`, no JSON, no colours.
fn assert_text_line(line: &str, level: &str, message: &str) {
    let mut words = line.split_whitespace();
    let timestamp = words.next().unwrap();
    assert!(timestamp.parse::<jiff::Timestamp>().is_ok(), "{line}");
    assert_eq!(words.next(), Some(level), "{line}");
    assert!(line.contains(&format!(": {message}")), "{line}");
}

fn assert_readable_text(log: &str) {
    support::logs::assert_no_secrets(log, "a text log");
    assert!(!log.contains('\u{1b}'), "colour codes in text logs:\n{log}");
    for line in log.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_err(),
            "a JSON line in text logs: {line}"
        );
    }
}

/// `--log-format text` gives plain lines a human reads (serve and agent); without the flag
/// every line stays a JSON object, audit lines included.
#[tokio::test(flavor = "multi_thread")]
async fn log_format_text_is_plain_lines_and_json_stays_the_default() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("reader"));
    let config = setup.write_config();
    let config = config.to_str().unwrap();

    let mut text = Process::start(
        &["--log-format", "text", "-c", config, "serve"],
        setup.path("text.log"),
    );
    let serving = text.line("token-broker serving").await;
    assert_text_line(&serving, "INFO", "token-broker serving");
    let port = port_of(support::logs::text_field(&serving, "listen"));
    let device = client(&setup, &leaf);
    assert_eq!(token(&device, port).await, 200);
    let audit = text.line("token decision").await;
    assert_text_line(&audit, "INFO", "token decision");
    assert!(audit.contains(" audit: "), "target: {audit}");
    assert_eq!(support::logs::text_field(&audit, "result"), "\"issued\"");
    assert_eq!(support::logs::text_field(&audit, "rule"), "\"devices\"");
    drop(device);
    assert_readable_text(&text.stop().await);

    // The device side: the agent.
    setup.write("device.pem", &leaf.chain_pem);
    setup.write("device-key.pem", &leaf.key_pem);
    let path = |name: &str| setup.path(name).to_str().unwrap().to_owned();
    let url = format!("https://localhost:{port}");
    let mut agent = Process::start(
        &[
            "--log-format",
            "text",
            "agent",
            "--url",
            &url,
            "--cert",
            &path("device.pem"),
            "--key",
            &path("device-key.pem"),
            "--ca",
            &path("server-ca.pem"),
            "--listen",
            "127.0.0.1:0",
            "--service-account",
            "reader@project.iam.gserviceaccount.com",
        ],
        setup.path("agent.log"),
    );
    let serving = agent.line("metadata agent serving").await;
    assert_text_line(&serving, "INFO", "metadata agent serving");
    assert_ne!(port_of(support::logs::text_field(&serving, "listen")), 0);
    assert_readable_text(&agent.stop().await);

    // Without the flag: JSON objects, timestamp first and target last.
    let mut json = Process::start(&["-c", config, "serve"], setup.path("json.log"));
    let serving: Value = serde_json::from_str(&json.line("token-broker serving").await).unwrap();
    let port = port_of(serving["listen"].as_str().unwrap());
    let device = client(&setup, &leaf);
    assert_eq!(token(&device, port).await, 200);
    json.line("token decision").await;
    drop(device);
    let log = json.stop().await;
    support::logs::assert_no_secrets(&log, "token-broker serve");
    for line in log.lines() {
        let object: serde_json::Map<String, Value> = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        let keys: Vec<&String> = object.keys().collect();
        assert_eq!(
            keys.first().map(|k| k.as_str()),
            Some("timestamp"),
            "{line}"
        );
        assert_eq!(keys.get(1).map(|k| k.as_str()), Some("level"), "{line}");
        assert_eq!(keys.last().map(|k| k.as_str()), Some("target"), "{line}");
    }
    let audit: Value =
        serde_json::from_str(log.lines().find(|l| l.contains("token decision")).unwrap()).unwrap();
    assert_eq!(audit["target"], "audit");
    assert_eq!(audit["result"], "issued");
    assert_eq!(audit["subject"], "spiffe://test.example/device/reader");
}

/// The audit lines of `file` that are `token decision`s, parsed; every line must be whole
/// and JSON.
fn decisions(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{} ends mid-line",
        file.display()
    );
    support::logs::assert_no_secrets(&text, "the audit file");
    text.lines()
        .map(|line| {
            let line: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a cut or mixed line ({e}): {line}"));
            assert_eq!(line["target"], "audit", "{line}");
            assert_eq!(line["message"], "token decision", "{line}");
            line
        })
        .collect()
}

/// Token requests from `tasks` concurrent clients of `leaf`, `each` per client; all 200.
async fn load(setup: &Setup, leaf: &Leaf, port: u16, tasks: usize, each: usize) -> usize {
    let runs: Vec<_> = (0..tasks)
        .map(|_| {
            let device = client(setup, leaf);
            tokio::spawn(async move {
                for _ in 0..each {
                    assert_eq!(token(&device, port).await, 200);
                }
            })
        })
        .collect();
    for run in runs {
        run.await.unwrap();
    }
    tasks * each
}

/// `serve` in a child process, its config with `[audit] path = path`: the process, ready,
/// and its config file.
async fn serve_audited(setup: &Setup, path: &str) -> (Replica, std::path::PathBuf) {
    let config = setup.write_config();
    let text = std::fs::read_to_string(&config).unwrap();
    let audited = format!("[audit]\npath = {path:?}\n\n[issuer]");
    std::fs::write(&config, text.replacen("[issuer]", &audited, 1)).unwrap();
    (Replica::start(setup, "serve").await, config)
}

/// With `[audit] path`, audit lines go to that file only (mode 0640 at most, created at
/// start). logrotate's rename + SIGHUP: lines of requests answered before the SIGHUP are in
/// the renamed file (also those after the rename), later ones in a new file; a reload that
/// changes the path moves to that file. The files hold every request exactly once, each a
/// whole JSON line, also under concurrent load and with the last lines flushed at exit.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_file_follows_logrotate_and_loses_no_line() {
    let mut setup = Setup::new();
    setup.extra_server = "reload_interval = \"1s\"".into();
    let (audit, rotated) = (setup.path("audit.log"), setup.path("audit.log.1"));
    let moved = setup.path("audit-2.log");
    let devices: Vec<Leaf> = ["before", "between", "after", "moved"]
        .iter()
        .map(|name| setup.intermediate.leaf(&LeafSpec::device(name)))
        .collect();

    let (mut broker, config) = serve_audited(&setup, "audit.log").await;
    let port = broker.port;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o600, 0o600, "{mode:o}");
        assert_eq!(mode & 0o137, 0, "{mode:o}: at most 0640");
    }

    let mut made = Vec::new();
    made.push(load(&setup, &devices[0], port, 4, 15).await);
    // logrotate: rename; requests go on; then SIGHUP.
    std::fs::rename(&audit, &rotated).unwrap();
    made.push(load(&setup, &devices[1], port, 4, 15).await);
    broker.signal("HUP");
    broker.process.line("audit log reopened").await;
    made.push(load(&setup, &devices[2], port, 4, 15).await);
    // A reload (the file changed) that moves the audit file.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("audit.log", "audit-2.log")).unwrap();
    broker.process.line("audit-2.log").await;
    made.push(load(&setup, &devices[3], port, 2, 5).await);
    let log = broker.process.stop().await;

    let subject = |line: &Value| line["subject"].as_str().unwrap().to_owned();
    let old = decisions(&rotated);
    let new = decisions(&audit);
    let count = |lines: &[Value], name: &str| {
        let wanted = format!("spiffe://test.example/device/{name}");
        lines.iter().filter(|l| subject(l) == wanted).count()
    };
    assert_eq!(
        (
            count(&old, "before"),
            count(&old, "between"),
            count(&old, "after")
        ),
        (made[0], made[1], 0),
        "the renamed file"
    );
    assert_eq!(
        (
            count(&new, "before"),
            count(&new, "between"),
            count(&new, "after")
        ),
        (0, 0, made[2]),
        "the new file"
    );
    let last = decisions(&moved);
    assert_eq!(
        (count(&new, "moved"), count(&last, "moved"), last.len()),
        (0, made[3], made[3]),
        "the file a reload moved to"
    );
    let ids: std::collections::HashSet<&str> = old
        .iter()
        .chain(&new)
        .chain(&last)
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), made.iter().sum::<usize>(), "each request once");

    assert!(
        !log.lines().any(|l| l.contains("\"target\":\"audit\"")),
        "audit lines in the main log:\n{log}"
    );
}

/// An audit file that refuses writes (`/dev/full`: no space left on device) loses no audit
/// line: each goes to the main log instead, `audit_file_write_failures_total` counts the
/// refused batches, and one ERROR line (for the whole run of failures) names the file and
/// the error.
#[tokio::test(flavor = "multi_thread")]
async fn audit_lines_the_audit_file_refuses_go_to_the_main_log_and_are_counted() {
    let setup = Setup::new();
    let device = setup.intermediate.leaf(&LeafSpec::device("unaudited"));
    let (mut broker, _) = serve_audited(&setup, "/dev/full").await;
    let port = broker.port;

    let made = load(&setup, &device, port, 2, 5).await;
    let refused: Value =
        serde_json::from_str(&broker.process.line("the audit file refuses writes").await).unwrap();
    assert_eq!(refused["level"], "ERROR", "{refused}");
    assert_eq!(refused["path"], "/dev/full", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{refused}"
    );
    let failures = broker
        .metric("token_broker_audit_file_write_failures_total")
        .await;
    assert!(failures >= 1.0, "{failures}");
    let log = broker.process.stop().await;

    let audited = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "audit" && line["message"] == "token decision")
        .count();
    assert_eq!(audited, made, "every decision, in the main log:\n{log}");
    let reports = log
        .lines()
        .filter(|l| l.contains("the audit file refuses writes"))
        .count();
    assert_eq!(reports, 1, "one ERROR line for the run of failures:\n{log}");
}

/// The in-process brokers' "configuration warning" lines that contain `needle`.
fn configuration_warnings(needle: &str) -> usize {
    support::logs::captured()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| {
            line["message"] == "configuration warning"
                && line["warning"].as_str().is_some_and(|w| w.contains(needle))
        })
        .count()
}

/// A configuration warning is logged when it first holds, not again by every reload (SIGHUP,
/// a file change, every CRL download); one a reload brings is logged once too.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_logs_only_the_configuration_warnings_that_are_new() {
    let resource =
        "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/r";
    let rule = |name: &str| {
        format!("\n[[clients]]\nname = \"{name}\"\nmatch = {{ dns = [\"{name}.example\"] }}\naudiences = [\"{resource}\"]\n")
    };
    let mut setup = Setup::new();
    setup.extra_server = "reload_interval = \"0s\"".into();
    setup.rules = rule("warned-at-start");
    let broker = setup.start().await;
    assert_eq!(configuration_warnings("\"warned-at-start\""), 1);
    for _ in 0..3 {
        broker.live.reload().unwrap();
    }
    assert_eq!(
        configuration_warnings("\"warned-at-start\""),
        1,
        "repeated by a reload"
    );
    let text = std::fs::read_to_string(&broker.config_path).unwrap() + &rule("warned-on-reload");
    std::fs::write(&broker.config_path, text).unwrap();
    for _ in 0..3 {
        broker.live.reload().unwrap();
    }
    assert_eq!(configuration_warnings("\"warned-on-reload\""), 1);
    assert_eq!(configuration_warnings("\"warned-at-start\""), 1);
    broker.stop().await;
}
