//! Revocation against an attacker who answers the broker's CRL downloads (an on-path
//! network, a spoofed DNS answer, a compromised CRL host of one CA) and against an operator
//! who mixes CRL files with CRL sources. Each attack is served by a hostile CRL server the
//! test starts; after each, the revoked device is still refused, good devices are still
//! served, the metric counts the failure, and what is kept survives a restart.

use std::time::Duration as StdDuration;

use proptest::prelude::*;

use crate::support::crl_server::{CrlServer, Serve};
use crate::support::{self, Ca, Leaf, LeafSpec, Setup, TestBroker};

const REVOKED: &str = "certificate revoked";

/// A root with two issuing CAs in the bundle (A: `setup.intermediate`, and the one
/// returned), the root's CRL as a file.
fn two_issuers() -> (Setup, Ca) {
    let mut setup = Setup::new();
    let b = setup.root.intermediate("Test Device Issuing CA B");
    setup.client_ca_pem = Some(format!(
        "{}{}{}",
        setup.root.pem, setup.intermediate.pem, b.pem
    ));
    setup.write("root.crl.pem", &setup.root.crl(&[]));
    setup.crl_paths = Some(vec!["root.crl.pem".into()]);
    (setup, b)
}

fn with_sources(setup: &mut Setup, urls: &[&str], refresh: &str) {
    let sources: Vec<String> = urls
        .iter()
        .map(|url| {
            format!("{{ url = \"{url}\", refresh = \"{refresh}\", timeout = \"2s\", max_bytes = 100000 }}")
        })
        .collect();
    setup.extra_server = format!(
        "crl_cache_dir = \"crl-cache\"\ncrl_sources = [{}]",
        sources.join(", ")
    );
}

/// "accepted", or the refusal's description.
async fn decision(broker: &TestBroker, leaf: &Leaf) -> String {
    let (status, body) = broker
        .token(Some(leaf), "grant_type=client_credentials")
        .await;
    if status == 200 {
        return "accepted".into();
    }
    assert_eq!(status, 401, "{body}");
    body["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn until(broker: &TestBroker, leaf: &Leaf, says: &str) {
    for _ in 0..200 {
        if decision(broker, leaf).await.contains(says) {
            return;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    panic!(
        "device {} never said {says:?}: {}",
        leaf.serial,
        decision(broker, leaf).await
    );
}

fn fetches(url: &str, result: &str) -> String {
    format!("token_broker_crl_fetches_total{{result=\"{result}\",source=\"{url}\"}}")
}

/// Waits until one more download of `url` ended with `result`.
async fn one_more(broker: &TestBroker, url: &str, result: &str) {
    let sample = fetches(url, result);
    let before = broker.metric(&sample).await;
    assert_eq!(
        broker.metric_eventually(&sample, before + 1.0).await,
        before + 1.0,
        "{sample}"
    );
}

/// `check-config --fetch`: what it says of `url`'s download now.
fn explained(config: &std::path::Path, url: &str) -> String {
    let out = std::process::Command::new(support::binary())
        .args(["--log-format", "text", "-c"])
        .arg(config)
        .args(["check-config", "--fetch"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("# CRL source {url}: ")))
        .unwrap_or_else(|| panic!("check-config --fetch says nothing of {url}: {stdout}"));
    let refused = !line.contains("would be admitted");
    assert_eq!(out.status.code(), Some(i32::from(refused)), "{stdout}");
    line.to_string()
}

/// A new process (`verify-cert`), reading the kept copies and files as a restart would,
/// refuses `leaf` as revoked.
fn revoked_after_a_restart(config: &std::path::Path, broker: &TestBroker, leaf: &Leaf) {
    let report = support::verify_cert(config, &leaf.chain_pem, broker.setup.dir.path());
    assert_eq!(report["reason"], "revoked", "after a restart: {report}");
}

fn kept_bytes(setup: &Setup, url: &str) -> Option<Vec<u8>> {
    let (path, _) = token_broker::crl::kept_paths(&setup.path("crl-cache"), url);
    std::fs::read(path).ok()
}

/// 10^20, beyond every genuine cRLNumber, as a forger would number a CRL to block the
/// genuine ones after it.
const HUGE_NUMBER: [u8; 9] = [0x05, 0x6b, 0xc7, 0x5e, 0x2d, 0x63, 0x10, 0x00, 0x00];

/// With sources for A and B, A's host answers with B's older CRL (after A's own, alone, and
/// from a third source never fetched before), and a CRL file of B older than B's download
/// is configured: B's revocation stays in force through all of it, and after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_cannot_suppress_another_cas_revocation() {
    let (mut setup, b) = two_issuers();
    let good_a = setup.intermediate.leaf(&LeafSpec::device("good-a"));
    let good_b = b.leaf(&LeafSpec::device("good-b"));
    let revoked_b = b.leaf(&LeafSpec::device("revoked-b"));
    // B's CRL from before the revocation: validly signed, before its nextUpdate.
    let b_before = b.crl(&[]);
    let b_now = b.crl(&[revoked_b.serial]);
    let server = CrlServer::start().await;
    let (a, b_url, c) = (
        server.url("/a.crl"),
        server.url("/b.crl"),
        server.url("/c.crl"),
    );
    server.serve(
        "/a.crl",
        Serve::Crl(setup.intermediate.crl(&[]), "\"a1\"".into()),
    );
    server.serve("/b.crl", Serve::Crl(b_now.clone(), "\"b1\"".into()));
    server.serve("/c.crl", Serve::Status(404));
    with_sources(&mut setup, &[&a, &b_url, &c], "1s");
    let config = setup.write_config();
    let mut broker = setup.start().await;
    until(&broker, &revoked_b, REVOKED).await;

    let a_crl = broker.setup.intermediate.crl(&[]);
    let check = |after: &'static str| {
        let broker = &broker;
        let (revoked_b, good_a, good_b) = (&revoked_b, &good_a, &good_b);
        async move {
            assert!(
                decision(broker, revoked_b).await.contains(REVOKED),
                "after {after}"
            );
            assert_eq!(decision(broker, good_a).await, "accepted", "after {after}");
            assert_eq!(decision(broker, good_b).await, "accepted", "after {after}");
        }
    };
    // A's answer carries A's CRL followed by B's older one.
    server.serve(
        "/a.crl",
        Serve::Crl(format!("{a_crl}{b_before}"), "\"a2\"".into()),
    );
    one_more(&broker, &a, "invalid").await;
    check("two CRLs in one answer").await;
    assert!(explained(&config, &a).contains(": invalid: 2 CRLs in one answer"));
    // A's answer is B's older CRL alone: the source changed issuer.
    server.serve("/a.crl", Serve::Crl(b_before.clone(), "\"a3\"".into()));
    one_more(&broker, &a, "issuer_changed").await;
    check("another issuer's CRL").await;
    let said = explained(&config, &a);
    assert!(
        said.contains(": issuer_changed: the source served a CRL of CN=Test Device Issuing CA B, but its kept CRL, which no file or other source holds, is of CN=Test Device Issuing CA"),
        "{said}"
    );
    // A source never fetched before serves B's older CRL: older than B's CRL in force.
    server.serve("/c.crl", Serve::Crl(b_before.clone(), "\"c1\"".into()));
    one_more(&broker, &c, "older").await;
    check("an older CRL from another source").await;
    let said = explained(&config, &c);
    assert!(
        said.contains(": older: ") && said.contains(&b_url),
        "{said}"
    );
    // B publishes a CRL numbered far ahead; a CRL with that number but without the
    // revocation, from another source, is refused.
    let ahead = b.crl_numbered(&[revoked_b.serial], &[0x7f; 8]);
    server.serve("/b.crl", Serve::Crl(ahead, "\"b2\"".into()));
    one_more(&broker, &b_url, "updated").await;
    let twin = b.crl_numbered(&[], &[0x7f; 8]);
    server.serve("/c.crl", Serve::Crl(twin, "\"c2\"".into()));
    one_more(&broker, &c, "same_number").await;
    check("a CRL with the number of the one in force").await;
    assert!(explained(&config, &c).contains(": same_number: "));
    assert!(
        kept_bytes(&broker.setup, &c).is_none(),
        "nothing of C's was kept"
    );

    // A CRL file of B older than the download: shadowed, not in force, and check-config
    // says which CRL is in force and why the file is not.
    broker.setup.write("b-old.crl.pem", &b_before);
    broker.setup.crl_paths = Some(vec!["root.crl.pem".into(), "b-old.crl.pem".into()]);
    let config_path = broker.setup.write_config();
    assert_eq!(config_path, config);
    broker.live.reload().unwrap();
    assert!(decision(&broker, &revoked_b).await.contains(REVOKED));
    let report = support::check_config(&config);
    let line = |source: &str| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("# CRL {source}")))
            .unwrap_or_else(|| panic!("no line for {source}: {report}"))
            .to_string()
    };
    assert!(
        line(&broker.setup.path("b-old.crl.pem").display().to_string())
            .contains("NOT in force: older"),
        "{report}"
    );
    assert!(line(&b_url).ends_with("; in force"), "{report}");

    // A new process reads the kept copies and the file: the same decision.
    revoked_after_a_restart(&config, &broker, &revoked_b);
    broker.stop().await;
}

/// A source keeps the scope of its kept copy (its CA, and partition), unless a file or
/// another source holds that copy too: then whoever answered the source's first download
/// (here with another CA's CRL) cannot bind it for good, and its own CA's CRL is taken. A
/// partition of its CA is refused, since it would drop the full CRL's floor and let an old
/// full CRL come back.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_keeps_its_scope_unless_its_copy_is_held_elsewhere() {
    let (mut setup, b) = two_issuers();
    let revoked_a = setup.intermediate.leaf(&LeafSpec::device("revoked-a"));
    let revoked_b = b.leaf(&LeafSpec::device("revoked-b"));
    let a_before = setup.intermediate.crl(&[]);
    let server = CrlServer::start().await;
    let (a, b_url) = (server.url("/a.crl"), server.url("/b.crl"));
    let b_crl = b.crl(&[revoked_b.serial]);
    // A's URL first answers with B's CRL, as B's own source serves it.
    server.serve("/a.crl", Serve::Crl(b_crl.clone(), "\"b-on-a\"".into()));
    server.serve("/b.crl", Serve::Crl(b_crl, "\"b1\"".into()));
    with_sources(&mut setup, &[&a, &b_url], "1s");
    let config = setup.write_config();
    let broker = setup.start().await;
    until(&broker, &revoked_b, REVOKED).await;

    let a_now = broker.setup.intermediate.crl(&[revoked_a.serial]);
    server.serve("/a.crl", Serve::Crl(a_now, "\"a1\"".into()));
    until(&broker, &revoked_a, REVOKED).await;
    assert!(decision(&broker, &revoked_b).await.contains(REVOKED));

    let partition = broker.setup.intermediate.crl_partitioned(
        &[],
        rcgen::CrlIssuingDistributionPoint {
            distribution_point: rcgen::CrlDistributionPoint {
                uris: vec!["http://crl.test.example/shard-1.crl".into()],
            },
            scope: Some(rcgen::CrlScope::UserCertsOnly),
        },
    );
    server.serve("/a.crl", Serve::Crl(partition, "\"shard\"".into()));
    one_more(&broker, &a, "issuer_changed").await;
    server.serve("/a.crl", Serve::Crl(a_before, "\"old\"".into()));
    one_more(&broker, &a, "older").await;
    assert!(decision(&broker, &revoked_a).await.contains(REVOKED));
    revoked_after_a_restart(&config, &broker, &revoked_a);
    broker.stop().await;
}

/// Forged CRLs numbered 10^20, of a bundle CA (another key, same name), of an intermediate
/// the devices send but the bundle lacks, and of a made-up CA, then a truncated and an
/// oversized answer: none is kept, none sets a floor (the genuine CRL after them is taken),
/// devices are decided as before, and `/readyz` stays 200. `check-config --fetch` says
/// why each was refused; `crl fetch` names the missing CA and the fix.
#[tokio::test(flavor = "multi_thread")]
async fn forged_crls_are_never_kept_and_set_no_floor() {
    let (mut setup, _b) = two_issuers();
    let outsider = setup.root.intermediate("Test Device Issuing CA C");
    let good_a = setup.intermediate.leaf(&LeafSpec::device("good-a"));
    let revoked_a = setup.intermediate.leaf(&LeafSpec::device("revoked-a"));
    let server = CrlServer::start().await;
    let (a, c) = (server.url("/a.crl"), server.url("/c.crl"));
    server.serve(
        "/a.crl",
        Serve::Crl(setup.intermediate.crl(&[revoked_a.serial]), "\"a1\"".into()),
    );
    server.serve("/c.crl", Serve::Crl(outsider.crl(&[]), "\"c1\"".into()));
    with_sources(&mut setup, &[&a, &c], "1s");
    setup.extra_server += "\nrevocation = \"best-effort\"";
    let config = setup.write_config();
    let broker = setup.start().await;
    until(&broker, &revoked_a, REVOKED).await;
    let kept_a = kept_bytes(&broker.setup, &a).expect("A's CRL kept");

    let impostor = Ca::root("Test Device Issuing CA");
    for (body, result) in [
        (
            impostor.crl_numbered(&[good_a.serial], &HUGE_NUMBER),
            "bad_signature",
        ),
        (
            Ca::root("Made Up CA").crl_numbered(&[good_a.serial], &HUGE_NUMBER),
            "unknown_issuer",
        ),
    ] {
        server.serve("/a.crl", Serve::Crl(body, format!("\"{result}\"")));
        one_more(&broker, &a, result).await;
        assert_eq!(
            kept_bytes(&broker.setup, &a).as_ref(),
            Some(&kept_a),
            "{result}"
        );
        assert_eq!(decision(&broker, &good_a).await, "accepted", "{result}");
        assert!(
            decision(&broker, &revoked_a).await.contains(REVOKED),
            "{result}"
        );
    }
    // A truncated answer and one past max_bytes: nothing kept, said why.
    for (answer, result) in [
        (Serve::Truncated, "network_error"),
        (Serve::Big(200_000), "too_large"),
    ] {
        server.serve("/a.crl", answer);
        one_more(&broker, &a, result).await;
        assert!(explained(&config, &a).contains(&format!(": {result}: ")));
        assert_eq!(
            kept_bytes(&broker.setup, &a).as_ref(),
            Some(&kept_a),
            "{result}"
        );
        assert!(
            decision(&broker, &revoked_a).await.contains(REVOKED),
            "{result}"
        );
    }
    // The outsider's CRLs, genuine or forged, cannot be verified: never kept.
    one_more(&broker, &c, "unknown_issuer").await;
    server.serve(
        "/c.crl",
        Serve::Crl(
            Ca::root("Test Device Issuing CA C").crl_numbered(&[], &HUGE_NUMBER),
            "\"c2\"".into(),
        ),
    );
    one_more(&broker, &c, "unknown_issuer").await;
    assert!(kept_bytes(&broker.setup, &c).is_none());
    let ready = reqwest::get(format!("http://{}/readyz", broker.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // The operator asks why: `crl fetch` names the CA and the fix, and exits 1.
    let out = std::process::Command::new(support::binary())
        .args(["--log-format", "text", "-c"])
        .arg(&config)
        .args(["crl", "fetch"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("{c}: unknown_issuer: CRL of"))
            && said.contains("add the certificate of")
            && said.contains("to server.client_ca"),
        "{said}"
    );

    // No floor was set: A's next genuine CRL is taken and enforced.
    server.serve(
        "/a.crl",
        Serve::Crl(
            broker
                .setup
                .intermediate
                .crl(&[revoked_a.serial, good_a.serial]),
            "\"a2\"".into(),
        ),
    );
    until(&broker, &good_a, REVOKED).await;
    revoked_after_a_restart(&config, &broker, &good_a);
    broker.stop().await;
}

/// A redirect is a failed download naming its Location: the URL it points at (a loopback
/// port standing in for an admin port) is never asked.
#[tokio::test(flavor = "multi_thread")]
async fn redirects_are_not_followed() {
    let (mut setup, _b) = two_issuers();
    let revoked = setup.intermediate.leaf(&LeafSpec::device("revoked"));
    let server = CrlServer::start().await;
    let elsewhere = CrlServer::start().await;
    let a = server.url("/a.crl");
    server.serve(
        "/a.crl",
        Serve::Crl(setup.intermediate.crl(&[revoked.serial]), "\"a1\"".into()),
    );
    elsewhere.serve(
        "/admin",
        Serve::Crl(setup.intermediate.crl(&[]), "\"x\"".into()),
    );
    with_sources(&mut setup, &[&a], "1s");
    let config = setup.write_config();
    let broker = setup.start().await;
    until(&broker, &revoked, REVOKED).await;
    server.serve("/a.crl", Serve::Redirect(elsewhere.url("/admin")));
    one_more(&broker, &a, "redirect").await;
    one_more(&broker, &a, "redirect").await;
    let said = explained(&config, &a);
    assert!(
        said.contains(&format!("redirecting to \"{}\"", elsewhere.url("/admin"))),
        "{said}"
    );
    assert_eq!(elsewhere.hits("/admin"), 0, "the redirect was followed");
    assert!(decision(&broker, &revoked).await.contains(REVOKED));
    // Logged once for the run of failures, with the Location; the next are debug lines.
    let about_a: Vec<serde_json::Value> = crate::support::logs::captured()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["source"] == a.as_str() && line["result"] == "redirect")
        .collect();
    let warnings: Vec<&serde_json::Value> =
        about_a.iter().filter(|l| l["level"] == "WARN").collect();
    assert_eq!(warnings.len(), 1, "{about_a:?}");
    assert!(
        warnings[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&elsewhere.url("/admin"))),
        "{:?}",
        warnings[0]
    );
    assert!(about_a.len() >= 2, "{about_a:?}");
    broker.stop().await;
}

/// Before any download is admitted a refusal names the source not downloaded yet; then a
/// revocation published now is enforced at once through `crl fetch` (another process) and
/// through a fetch request (what SIGHUP does), without waiting for `refresh` (an hour).
#[tokio::test(flavor = "multi_thread")]
async fn revocation_on_the_operators_schedule() {
    let (mut setup, _b) = two_issuers();
    let first = setup.intermediate.leaf(&LeafSpec::device("first"));
    let second = setup.intermediate.leaf(&LeafSpec::device("second"));
    let server = CrlServer::start().await;
    let a = server.url("/a.crl");
    server.serve("/a.crl", Serve::Status(503));
    with_sources(&mut setup, &[&a], "1h");
    let config = setup.write_config();
    let broker = setup.start().await;
    one_more(&broker, &a, "http_error").await;
    let said = decision(&broker, &first).await;
    assert!(
        said.contains("not downloaded yet") && said.contains(&a),
        "{said}"
    );
    let report = support::verify_cert(&config, &first.chain_pem, broker.setup.dir.path());
    assert_eq!(report["reason"], "crl_missing", "{report}");
    assert!(
        report["description"].as_str().unwrap().contains(&a),
        "{report}"
    );

    server.serve(
        "/a.crl",
        Serve::Crl(broker.setup.intermediate.crl(&[]), "\"1\"".into()),
    );
    broker.live.fetch_crls_now();
    until(&broker, &first, "accepted").await;

    server.serve(
        "/a.crl",
        Serve::Crl(
            broker.setup.intermediate.crl(&[first.serial]),
            "\"2\"".into(),
        ),
    );
    let out = std::process::Command::new(support::binary())
        .args(["--log-format", "text", "-c"])
        .arg(&config)
        .args(["crl", "fetch"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert_eq!(said.trim(), format!("{a}: updated"));
    // The server enforces what the command kept, without downloading it itself.
    until(&broker, &first, REVOKED).await;

    server.serve(
        "/a.crl",
        Serve::Crl(
            broker
                .setup
                .intermediate
                .crl(&[first.serial, second.serial]),
            "\"3\"".into(),
        ),
    );
    broker.live.fetch_crls_now();
    until(&broker, &second, REVOKED).await;
    broker.stop().await;
}

/// A source that never answers (each attempt waits its whole timeout, three times) delays
/// no other source's CRL: a revocation another source brings is enforced meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_source_delays_no_other() {
    let (mut setup, b) = two_issuers();
    let revoked_b = b.leaf(&LeafSpec::device("revoked-b"));
    let server = CrlServer::start().await;
    let (a, b_url) = (server.url("/a.crl"), server.url("/b.crl"));
    server.serve(
        "/a.crl",
        Serve::Crl(setup.intermediate.crl(&[]), "\"a1\"".into()),
    );
    server.serve("/b.crl", Serve::Crl(b.crl(&[]), "\"b1\"".into()));
    with_sources(&mut setup, &[&a, &b_url], "1s");
    let broker = setup.start().await;
    until(&broker, &revoked_b, "accepted").await;
    // A hangs from now on (three attempts of 2 s each, and back-off between them).
    server.serve("/a.crl", Serve::Hang);
    one_more(&broker, &a, "timeout").await;
    server.serve(
        "/b.crl",
        Serve::Crl(b.crl(&[revoked_b.serial]), "\"b2\"".into()),
    );
    let started = std::time::Instant::now();
    until(&broker, &revoked_b, REVOKED).await;
    assert!(
        started.elapsed() < StdDuration::from_secs(5),
        "B's revocation waited {:?} behind A's hanging download",
        started.elapsed()
    );
    broker.stop().await;
}

/// A reload that read the old kept copy and is slow to finish (the CA bundle it reads next
/// is a FIFO the test holds) must not land after the download's reload: reloads run one at
/// a time, so the device, once refused, is never accepted again.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reload_overlapping_a_download_ends_with_the_download_in_force() {
    let (mut setup, _b) = two_issuers();
    let device = setup.intermediate.leaf(&LeafSpec::device("raced"));
    let server = CrlServer::start().await;
    let a = server.url("/a.crl");
    server.serve(
        "/a.crl",
        Serve::Crl(setup.intermediate.crl(&[]), "\"1\"".into()),
    );
    with_sources(&mut setup, &[&a], "1s");
    // Reloads only when the test (or the downloader) asks for one.
    setup.extra_server += "\nreload_interval = \"0s\"";
    let broker = setup.start().await;
    until(&broker, &device, "accepted").await;
    let kept_before = kept_bytes(&broker.setup, &a);

    // The bundle becomes a FIFO: the next reload reads the CRL files and the kept copies,
    // then waits on it. The real bundle is put back for every reload after that one.
    let bundle = broker.setup.path("client-ca.pem");
    let (fifo, real) = (
        broker.setup.path("bundle.fifo"),
        broker.setup.path("bundle.real"),
    );
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "mkfifo (coreutils) is needed"
    );
    std::fs::copy(&bundle, &real).unwrap();
    std::fs::hard_link(&fifo, broker.setup.path("bundle.fifo.held")).unwrap();
    std::fs::rename(&fifo, &bundle).unwrap();
    let slow = {
        let live = broker.live.clone();
        std::thread::spawn(move || live.reload())
    };
    tokio::time::sleep(StdDuration::from_millis(500)).await;
    std::fs::rename(&real, &bundle).unwrap();

    // Meanwhile the device is revoked and the download is kept.
    let states = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    server.serve(
        "/a.crl",
        Serve::Crl(
            broker.setup.intermediate.crl(&[device.serial]),
            "\"2\"".into(),
        ),
    );
    let sample = |states: &std::sync::Arc<std::sync::Mutex<Vec<bool>>>| {
        let (broker, states, device) = (&broker, states.clone(), &device);
        async move {
            let revoked = decision(broker, device).await.contains(REVOKED);
            states.lock().unwrap().push(revoked);
        }
    };
    for _ in 0..100 {
        if kept_bytes(&broker.setup, &a) != kept_before {
            break;
        }
        sample(&states).await;
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    assert_ne!(
        kept_bytes(&broker.setup, &a),
        kept_before,
        "the download was kept"
    );
    // Time for the download's reload, were it not to wait for the slow one.
    for _ in 0..50 {
        sample(&states).await;
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    // The slow reload, which read the old kept copy, finishes now.
    let pem = broker.setup.client_ca_pem.clone().unwrap();
    std::fs::write(broker.setup.path("bundle.fifo.held"), &pem).unwrap();
    let slow = tokio::task::spawn_blocking(move || slow.join().unwrap());
    assert!(slow.await.unwrap().is_ok(), "the slow reload loaded");
    for _ in 0..150 {
        sample(&states).await;
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    let states = states.lock().unwrap().clone();
    let first_refused = states
        .iter()
        .position(|r| *r)
        .expect("the device was never refused");
    assert!(
        states[first_refused..].iter().all(|r| *r),
        "the device was accepted again after its revocation was enforced: {states:?}"
    );
    let gauge = format!("token_broker_crl_kept_not_in_force{{source=\"{a}\"}}");
    assert_eq!(broker.metric_eventually(&gauge, 0.0).await, 0.0);
    broker.stop().await;
}

/// The pool the property test draws CRLs from: for issuers A and B (in the bundle) and C
/// (not), numbers 1 to 3, signed by the issuer or by an impostor of the same name, with
/// two different contents per number.
struct Pool {
    dir: tempfile::TempDir,
    bundle: std::path::PathBuf,
    /// (issuer, number, genuine, variant) -> PEM.
    crls: std::collections::HashMap<(usize, u8, bool, u8), String>,
}

fn pool() -> &'static Pool {
    static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let root = Ca::root("Property Root");
        let names = ["Property CA A", "Property CA B", "Property CA C"];
        let issuers: Vec<Ca> = names.iter().map(|n| root.intermediate(n)).collect();
        let impostors: Vec<Ca> = names.iter().map(|n| Ca::root(n)).collect();
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(
            &bundle,
            format!("{}{}{}", root.pem, issuers[0].pem, issuers[1].pem),
        )
        .unwrap();
        let mut crls = std::collections::HashMap::new();
        for issuer in 0..3 {
            for number in 1..=3u8 {
                for genuine in [true, false] {
                    for variant in 0..2u8 {
                        let signer = if genuine {
                            &issuers[issuer]
                        } else {
                            &impostors[issuer]
                        };
                        let crl = signer.crl_numbered(&[u64::from(variant) + 100], &[number]);
                        crls.insert((issuer, number, genuine, variant), crl);
                    }
                }
            }
        }
        Pool { dir, bundle, crls }
    })
}

/// One CRL of a generated configuration.
#[derive(Debug, Clone, Copy)]
struct Drawn {
    issuer: usize,
    number: u8,
    genuine: bool,
    variant: u8,
    fetched: bool,
}

fn drawn() -> impl Strategy<Value = Drawn> {
    (
        0..3usize,
        1..=3u8,
        prop::bool::weighted(0.8),
        0..2u8,
        any::<bool>(),
    )
        .prop_map(|(issuer, number, genuine, variant, fetched)| Drawn {
            issuer,
            number,
            genuine,
            variant,
            fetched,
        })
}

/// Loads `crls` in the given order: per issuer (by name) the number and contents in force,
/// or the load error.
fn in_force(crls: &[Drawn], case: &str) -> Result<Vec<(String, String)>, String> {
    use rustls_pki_types::pem::PemObject;
    let pool = pool();
    let dir = pool.dir.path().join(case);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    let mut kept = Vec::new();
    let mut sources = Vec::new();
    for (index, crl) in crls.iter().enumerate() {
        let pem = &pool.crls[&(crl.issuer, crl.number, crl.genuine, crl.variant)];
        if crl.fetched {
            let url = format!("http://crl.test/{index}");
            let (path, _) = token_broker::crl::kept_paths(&dir, &url);
            std::fs::write(path, pem).unwrap();
            kept.extend(token_broker::crl::kept(&dir, &url).unwrap());
            sources.push(url);
        } else {
            files.push(token_broker::pem::CrlBlock {
                der: rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
                    .unwrap(),
                source: format!("file-{index}"),
            });
        }
    }
    let store = token_broker::trust::TrustStore::load(
        &pool.bundle,
        files,
        kept,
        &sources,
        &[],
        token_broker::config::RevocationPolicy::BestEffort,
    )
    .map_err(|e| e.to_string())?;
    let mut force: Vec<(String, String)> = store
        .crls()
        .map(|c| (c.issuer.clone(), c.number.clone()))
        .collect();
    force.sort();
    Ok(force)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Whatever files and downloads are configured, in whatever order: a file badly signed
    /// by a bundle CA is a load error; otherwise, per issuer, the CRL in force is the
    /// highest-numbered admitted one (downloads are admitted only when signed by a bundle
    /// CA; files of a CA outside the bundle are checked per request), two different CRL
    /// files of one number that would decide are an error (a download is then not used),
    /// and the order changes nothing.
    #[test]
    fn the_crl_in_force_is_the_highest_admitted_whatever_the_order(
        crls in prop::collection::vec(drawn(), 0..7),
        seed in any::<u64>(),
    ) {
        let names = ["CN=Property CA A", "CN=Property CA B", "CN=Property CA C"];
        let admitted: Vec<&Drawn> = crls
            .iter()
            .filter(|c| if c.fetched { c.issuer < 2 && c.genuine } else { true })
            .collect();
        let bad_file = crls.iter().any(|c| !c.fetched && c.issuer < 2 && !c.genuine);
        let mut expected = Vec::new();
        let mut conflict = false;
        for (issuer, name) in names.iter().enumerate() {
            let of: Vec<&&Drawn> = admitted.iter().filter(|c| c.issuer == issuer).collect();
            let Some(top) = of.iter().map(|c| c.number).max() else { continue };
            let tops: Vec<&&&Drawn> = of.iter().filter(|c| c.number == top).collect();
            // Contents: the variant, and the signer (an impostor's CRL differs). Only two
            // files are an error; a download of the same number and other contents is
            // not used, so that no answer to a download can stop the configuration loading.
            let files: Vec<(u8, bool)> = tops
                .iter()
                .filter(|c| !c.fetched)
                .map(|c| (c.variant, c.genuine))
                .collect();
            conflict |= files.iter().any(|contents| *contents != files[0]);
            expected.push((name.to_string(), top.to_string()));
        }
        let got = in_force(&crls, &format!("case-{seed}"));
        if bad_file {
            prop_assert!(got.as_ref().is_err_and(|e| e.contains("not validly signed")), "{got:?}");
        } else if conflict {
            prop_assert!(got.as_ref().is_err_and(|e| e.contains("same cRLNumber")), "{got:?}");
        } else {
            expected.sort();
            prop_assert_eq!(got.as_ref(), Ok(&expected));
        }
        // Another order: the same outcome.
        let mut shuffled = crls.clone();
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let again = in_force(&shuffled, &format!("case-{seed}-shuffled"));
        prop_assert_eq!(got.is_ok(), again.is_ok(), "{:?} / {:?}", got, again);
        if let (Ok(got), Ok(again)) = (&got, &again) {
            prop_assert_eq!(got, again);
        }
    }
}
