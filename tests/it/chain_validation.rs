//! The certificate matrix: every case over real mTLS to a running broker, its reason
//! checked in the answer and in the metrics, and `verify-cert` agreeing with the server.

use crate::support::crl_server::{CrlServer, Serve};
use crate::support::{self, Ca, Eku, KeyKind, Leaf, LeafSpec, Setup, TestBroker};
use time::{Duration, OffsetDateTime};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Accept,
    /// 401 `invalid_client` with this reason.
    Refuse(&'static str),
    /// Refused during the TLS handshake (proof of possession impossible), counted with this reason.
    RefuseHandshake(&'static str),
}

struct Case {
    name: &'static str,
    leaf: Option<Leaf>,
    expect: Expect,
    /// A phrase the 401 description must contain, so a device owner can act on it.
    says: &'static str,
}

fn spec(name: &str, change: impl FnOnce(&mut LeafSpec)) -> LeafSpec {
    let mut s = LeafSpec::device(name);
    change(&mut s);
    s
}

fn matrix(setup: &mut Setup) -> Vec<Case> {
    let root = &setup.root;
    let int = &setup.intermediate;
    let now = OffsetDateTime::now_utc();
    let stranger = Ca::root("Stranger Root");
    let revoked = int.leaf(&LeafSpec::device("revoked"));
    setup.revoked.push(revoked.serial);
    let mut without_intermediate = int.leaf(&LeafSpec::device("lonely"));
    without_intermediate.chain_pem = without_intermediate.cert_pem.clone();

    use Expect::*;
    let case = |name, leaf, expect, says| Case {
        name,
        leaf: Some(leaf),
        expect,
        says,
    };
    vec![
        case(
            "direct leaf (P-256)",
            root.leaf(&LeafSpec::device("direct")),
            Accept,
            "",
        ),
        case(
            "leaf via intermediate sent by client",
            int.leaf(&LeafSpec::device("via-int")),
            Accept,
            "",
        ),
        case(
            "ECDSA P-384 leaf",
            int.leaf(&spec("p384", |s| s.key = KeyKind::P384)),
            Accept,
            "",
        ),
        case(
            "RSA-2048 leaf",
            int.leaf(&spec("rsa2048", |s| s.key = KeyKind::Rsa2048)),
            Accept,
            "",
        ),
        case(
            "Ed25519 leaf",
            int.leaf(&spec("ed25519", |s| s.key = KeyKind::Ed25519)),
            Accept,
            "",
        ),
        Case {
            name: "no certificate",
            leaf: None,
            expect: Refuse("no_certificate"),
            says: "no client certificate",
        },
        case(
            "unknown CA",
            stranger.leaf(&LeafSpec::device("stranger")),
            Refuse("unknown_issuer"),
            "issuer not trusted",
        ),
        case(
            "intermediate not sent",
            without_intermediate,
            Refuse("unknown_issuer"),
            "send intermediate",
        ),
        case(
            "self-signed",
            support::self_signed(&LeafSpec::device("selfie")),
            Refuse("self_signed"),
            "self-signed",
        ),
        case(
            "expired",
            int.leaf(&spec("expired", |s| {
                s.not_before = now - Duration::days(10);
                s.not_after = now - Duration::days(1);
            })),
            Refuse("expired"),
            "certificate expired at 20",
        ),
        case(
            "not yet valid",
            int.leaf(&spec("future", |s| s.not_before = now + Duration::days(1))),
            Refuse("not_yet_valid"),
            "not valid before 20",
        ),
        case("revoked by CRL", revoked, Refuse("revoked"), "revoked"),
        case(
            "no EKU",
            int.leaf(&spec("no-eku", |s| s.eku = Eku::Absent)),
            Refuse("missing_eku"),
            "missing clientAuth EKU",
        ),
        case(
            "serverAuth-only EKU",
            int.leaf(&spec("server-eku", |s| s.eku = Eku::ServerAuthOnly)),
            Refuse("bad_eku"),
            "missing clientAuth EKU",
        ),
        case(
            "CA certificate as leaf",
            int.leaf(&spec("ca-leaf", |s| s.is_ca = true)),
            Refuse("ca_as_leaf"),
            "CA certificate",
        ),
        case(
            "RSA-1024 leaf",
            int.leaf(&spec("rsa1024", |s| s.key = KeyKind::Rsa1024)),
            RefuseHandshake("weak_key"),
            "",
        ),
        case(
            "no matching client rule",
            int.leaf(&spec("outsider", |s| {
                s.spiffe = Some("spiffe://elsewhere.example/device/x".into())
            })),
            Refuse("no_matching_rule"),
            "no matching client rule",
        ),
    ]
}

/// Presents the leaf and returns the server's verdict as (status, reason description).
async fn server_verdict(
    broker: &TestBroker,
    case: &Case,
) -> Result<(u16, serde_json::Value), String> {
    if let Some(leaf) = case.leaf.as_ref().filter(|l| l.legacy_key) {
        return broker
            .curl_token(leaf, "grant_type=client_credentials")
            .await;
    }
    let client = broker.client(case.leaf.as_ref());
    let response = client
        .post(broker.url("/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.map_err(|e| e.to_string())?))
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_matrix_server_and_verify_cert_agree() {
    let mut setup = Setup::new();
    let cases = matrix(&mut setup);
    let broker = setup.start().await;
    let mut failures = Vec::new();

    for case in &cases {
        let reason_metric = |reason: &str| {
            format!("token_broker_client_cert_rejections_total{{reason=\"{reason}\"}}")
        };
        let before = match case.expect {
            Expect::Refuse(r) | Expect::RefuseHandshake(r) => {
                broker.metric(&reason_metric(r)).await
            }
            Expect::Accept => 0.0,
        };
        let verdict = server_verdict(&broker, case).await;
        let report = case.leaf.as_ref().map(|leaf| {
            support::verify_cert(
                &broker.config_path,
                &leaf.chain_pem,
                broker.setup.dir.path(),
            )
        });

        let mut check = |ok: bool, what: String| {
            if !ok {
                failures.push(format!("{}: {what}", case.name));
            }
        };
        match (case.expect, &verdict) {
            (Expect::Accept, Ok((status, body))) => {
                check(*status == 200, format!("expected 200, got {status} {body}"));
                if let Some(report) = &report {
                    check(
                        report["accepted"] == true,
                        format!("verify-cert refused: {report}"),
                    );
                }
            }
            (Expect::Refuse(reason), Ok((status, body))) => {
                check(*status == 401, format!("expected 401, got {status} {body}"));
                check(
                    body["error"] == "invalid_client",
                    format!("error code {body}"),
                );
                let description = body["error_description"].as_str().unwrap_or_default();
                check(
                    description.contains(case.says),
                    format!("description {description:?} lacks {:?}", case.says),
                );
                if let Some(report) = &report {
                    check(
                        report["reason"] == reason,
                        format!("verify-cert reason {} != {reason}", report["reason"]),
                    );
                    check(
                        report["description"] == description,
                        format!(
                            "verify-cert says {} but server says {description:?}",
                            report["description"]
                        ),
                    );
                }
            }
            (Expect::RefuseHandshake(reason), Err(_)) => {
                if let Some(report) = &report {
                    check(
                        report["reason"] == reason,
                        format!("verify-cert reason {} != {reason}", report["reason"]),
                    );
                }
            }
            (expect, verdict) => check(false, format!("expected {expect:?}, got {verdict:?}")),
        }
        if let Expect::Refuse(r) | Expect::RefuseHandshake(r) = case.expect {
            let after = broker
                .metric_eventually(&reason_metric(r), before + 1.0)
                .await;
            if after != before + 1.0 {
                failures.push(format!(
                    "{}: metric for {r} went {before} -> {after}",
                    case.name
                ));
            }
        }
    }
    broker.stop().await;
    assert!(
        failures.is_empty(),
        "matrix failures:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_an_intermediate_refuses_its_leaves() {
    // A leaf issued by a revoked intermediate is refused even though the leaf itself is not listed.
    let mut setup = Setup::new();
    let bad_int = setup.root.intermediate("Revoked Issuing CA");
    let leaf = bad_int.leaf(&LeafSpec::device("child-of-revoked"));
    setup.revoked.push(bad_int.serial);
    let broker = setup.start().await;
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        body["error_description"],
        "certificate revoked (listed in its issuer's CRL)"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bundle_folder_with_intermediate_accepts_a_leaf_sent_alone() {
    let mut setup = Setup::new();
    setup.bundle_folder = true;
    let mut leaf = setup.intermediate.leaf(&LeafSpec::device("alone"));
    leaf.chain_pem = leaf.cert_pem.clone();
    let stranger = Ca::root("Other Root").intermediate("Other Issuing");
    let foreign = stranger.leaf(&LeafSpec::device("foreign"));
    let broker = setup.start().await;
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    // A bundle intermediate helps build paths but is no trust anchor of its own.
    let (status, body) = broker
        .token(Some(&foreign), "grant_type=client_credentials")
        .await;
    assert_eq!(
        (
            status,
            body["error_description"]
                .as_str()
                .map(|d| d.starts_with("issuer not trusted"))
        ),
        (401, Some(true)),
        "{body}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_12_and_13_only() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("versions"));
    let broker = setup.start().await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let response = broker
            .client_with_versions(Some(&leaf), &[version])
            .post(broker.url("/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{version:?}");
    }
    // An OpenSSL client limited to TLS 1.1 finds no common version.
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--tlsv1.0",
            "--tls-max",
            "1.1",
            "--ciphers",
            "DEFAULT@SECLEVEL=0",
            "-k",
        ])
        .arg(broker.url("/jwks"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "TLS 1.1 handshake succeeded");
    broker.stop().await;

    let mut setup = Setup::new();
    setup.extra_server = r#"tls_versions = ["1.3"]"#.into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("v13"));
    let broker = setup.start().await;
    let refused = broker
        .client_with_versions(Some(&leaf), &[&rustls::version::TLS12])
        .get(broker.url("/jwks"))
        .send()
        .await;
    assert!(refused.is_err(), "TLS 1.2 accepted by a 1.3-only server");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_crl_refuses_what_it_covers() {
    let mut setup = Setup::new();
    setup.stale_crl = true;
    let covered = setup.intermediate.leaf(&LeafSpec::device("covered"));
    let direct = setup.root.leaf(&LeafSpec::device("direct"));
    let broker = setup.start().await;
    let (status, body) = broker
        .token(Some(&covered), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 401, "{body}");
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.starts_with("revocation status unknown: the CRL"),
        "{description}"
    );
    let report = support::verify_cert(
        &broker.config_path,
        &covered.chain_pem,
        broker.setup.dir.path(),
    );
    assert_eq!(report["reason"], "crl_expired");
    // The root's CRL is current: certificates it covers alone are fine.
    let (status, body) = broker
        .token(Some(&direct), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    broker.stop().await;
}

/// Presents a trusted certificate but signs the handshake with another key.
#[derive(Debug)]
struct WrongKey(std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for WrongKey {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A client presenting `cert`'s chain but signing with `key`'s private key (as a thief of a
/// certificate, not of its key, would), over `versions`.
fn wrong_key_client(
    broker: &TestBroker,
    cert: &Leaf,
    key: &Leaf,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> reqwest::Client {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let wrong_key = provider.key_provider.load_private_key(key.key()).unwrap();
    let stolen = rustls::sign::CertifiedKey::new(cert.chain(), wrong_key);
    let mut config = broker.tls_config(None, versions);
    config.client_auth_cert_resolver = std::sync::Arc::new(WrongKey(std::sync::Arc::new(stolen)));
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .build()
        .unwrap()
}

async fn post_client_credentials(
    broker: &TestBroker,
    client: &reqwest::Client,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(broker.url("/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_without_its_private_key_gets_nothing() {
    let setup = Setup::new();
    let victim = setup.intermediate.leaf(&LeafSpec::device("victim"));
    let thief = setup.intermediate.leaf(&LeafSpec::device("thief"));
    let broker = setup.start().await;
    let client = wrong_key_client(&broker, &victim, &thief, rustls::DEFAULT_VERSIONS);
    let result = post_client_credentials(&broker, &client).await;
    assert!(result.is_err(), "handshake must fail: {result:?}");
    assert_eq!(
        broker
            .metric_eventually(r#"token_broker_tls_handshakes_total{result="error"}"#, 1.0)
            .await,
        1.0
    );
    assert_eq!(
        broker
            .metric(r#"token_broker_tls_handshakes_total{result="ok"}"#)
            .await,
        0.0
    );
    broker.stop().await;
}

/// The refusals counted under `reason`.
fn rejections(reason: &str) -> String {
    format!("token_broker_client_cert_rejections_total{{reason=\"{reason}\"}}")
}

/// `leaf` is refused with `reason` by verify-cert, and over mutual TLS with the metric.
async fn refused_everywhere(setup: Setup, leaf: &Leaf, good: &Leaf, reason: &str, case: &str) {
    let config = setup.write_config();
    let report = support::verify_cert(&config, &leaf.chain_pem, setup.dir.path());
    assert_eq!(report["reason"], reason, "{case}: verify-cert {report}");
    let broker = setup.start().await;
    let before = broker.metric(&rejections(reason)).await;
    let (status, body) = broker
        .token(Some(leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 401, "{case}: {body}");
    assert_eq!(
        broker
            .metric_eventually(&rejections(reason), before + 1.0)
            .await,
        before + 1.0,
        "{case}"
    );
    let (status, body) = broker
        .token(Some(good), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{case}: {body}");
    broker.stop().await;
}

/// Every CRL configured is read: a PEM file holding several (in any order), a folder of
/// CRL files, a DER file. Reading only a bundle's first CRL would let a revoked device in.
#[tokio::test(flavor = "multi_thread")]
async fn every_crl_of_a_bundle_a_folder_or_a_der_file_is_read() {
    for layout in [
        "2, root's first",
        "2, issuing CA's first",
        "50",
        "folder",
        "der",
    ] {
        let mut setup = Setup::new();
        let revoked = setup
            .intermediate
            .leaf(&LeafSpec::device("revoked-in-bundle"));
        let good = setup.intermediate.leaf(&LeafSpec::device("good-in-bundle"));
        let root_crl = setup.root.crl(&[]);
        let issuing_crl = setup.intermediate.crl(&[revoked.serial]);
        let crl_paths = match layout {
            "2, root's first" => {
                setup.write("crls.pem", &format!("{root_crl}{issuing_crl}"));
                vec!["crls.pem"]
            }
            "2, issuing CA's first" => {
                setup.write("crls.pem", &format!("{issuing_crl}{root_crl}"));
                vec!["crls.pem"]
            }
            "50" => {
                // 48 CRLs of other CAs around the two that matter, the issuing CA's last.
                let mut all: Vec<String> = (0..48)
                    .map(|i| Ca::root(&format!("Other CA {i}")).crl(&[revoked.serial]))
                    .collect();
                all.insert(20, root_crl.clone());
                all.push(issuing_crl.clone());
                setup.write("crls.pem", &all.concat());
                setup.crl_paths = Some(vec!["crls.pem".into()]);
                let stdout = support::check_config(&setup.write_config());
                let listed: Vec<&str> =
                    stdout.lines().filter(|l| l.starts_with("# CRL ")).collect();
                assert_eq!(listed.len(), 50, "{stdout}");
                assert!(
                    listed[49].contains("crls.pem#50: issuer CN=Test Device Issuing CA")
                        && listed[49].contains(", 1 revoked,"),
                    "{}",
                    listed[49]
                );
                vec!["crls.pem"]
            }
            "folder" => {
                setup.write("crls/1-root.pem", &root_crl);
                setup.write("crls/2-issuing.crl", &issuing_crl);
                setup.write("crls/README.txt", "not a CRL: ignored");
                vec!["crls"]
            }
            _ => {
                use rustls_pki_types::pem::PemObject;
                let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(
                    issuing_crl.as_bytes(),
                )
                .unwrap();
                setup.write("root.crl.pem", &root_crl);
                std::fs::write(setup.path("issuing.crl"), der.as_ref()).unwrap();
                vec!["root.crl.pem", "issuing.crl"]
            }
        };
        setup.crl_paths = Some(crl_paths.into_iter().map(String::from).collect());
        refused_everywhere(setup, &revoked, &good, "revoked", layout).await;
    }
}

/// With CRLs configured, revocation is required by default: a CA of the path without a
/// CRL refuses the certificates it issued (`crl_missing`); "best-effort" accepts them.
#[tokio::test(flavor = "multi_thread")]
async fn a_ca_without_a_crl_is_refused_unless_best_effort() {
    let setup = Setup::new();
    let unlisted = setup.root.intermediate("Issuing CA Without CRL");
    let orphan = unlisted.leaf(&LeafSpec::device("orphan"));
    let good = setup.intermediate.leaf(&LeafSpec::device("good"));
    refused_everywhere(setup, &orphan, &good, "crl_missing", "default").await;

    let mut setup = Setup::new();
    setup.extra_server = "revocation = \"best-effort\"".into();
    let orphan = setup
        .root
        .intermediate("Issuing CA Without CRL")
        .leaf(&LeafSpec::device("orphan"));
    let broker = setup.start().await;
    let (status, body) = broker
        .token(Some(&orphan), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    broker.stop().await;
}

/// CRLs the broker fetches itself: at start, on refresh (conditional), revocations between
/// refreshes, every kind of failed download keeping the last good CRL, a restart without
/// network from the kept copy, and a CRL past its nextUpdate refusing `crl_expired`.
#[tokio::test(flavor = "multi_thread")]
async fn fetched_crls_are_refreshed_kept_and_fail_closed() {
    let mut setup = Setup::new();
    // The issuing CA is in the bundle, so a fetched CRL's signature is checked on download.
    setup.bundle_folder = true;
    let a = setup.intermediate.leaf(&LeafSpec::device("fetched-a"));
    let b = setup.intermediate.leaf(&LeafSpec::device("fetched-b"));
    let server = CrlServer::start().await;
    let path = "/issuing.crl";
    let url = server.url(path);
    let serve = |answer: Serve| server.serve(path, answer);
    serve(Serve::Crl(
        setup.intermediate.crl(&[a.serial]),
        "\"v1\"".into(),
    ));
    setup.write("root.crl.pem", &setup.root.crl(&[]));
    setup.crl_paths = Some(vec!["root.crl.pem".into()]);
    setup.extra_server = format!(
        "crl_cache_dir = \"crl-cache\"\n\
         crl_sources = [{{ url = \"{url}\", refresh = \"1s\", timeout = \"1s\", max_bytes = 100000 }}]"
    );
    let config = setup.write_config();
    let broker = setup.start().await;
    let issuing = &broker.setup.intermediate;
    let fetches = |result: &str| {
        format!("token_broker_crl_fetches_total{{result=\"{result}\",source=\"{url}\"}}")
    };
    let reason_of = |leaf: &Leaf| {
        let broker = &broker;
        let leaf = leaf.clone();
        async move {
            let (status, body) = broker
                .token(Some(&leaf), "grant_type=client_credentials")
                .await;
            if status == 200 {
                "accepted".to_string()
            } else {
                let description = body["error_description"].as_str().unwrap_or_default();
                assert_eq!(status, 401, "{body}");
                description.to_string()
            }
        }
    };
    let eventually = |leaf: &Leaf, says: &'static str| {
        let leaf = leaf.clone();
        let reason_of = &reason_of;
        async move {
            for _ in 0..300 {
                let said = reason_of(&leaf).await;
                if said.contains(says) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("device {} never said {says:?}", leaf.serial);
        }
    };
    let revoked = "certificate revoked";

    // Downloaded at start.
    eventually(&a, revoked).await;
    assert_eq!(reason_of(&b).await, "accepted");
    assert!(broker.metric(&fetches("updated")).await >= 1.0);
    // Refreshed with If-None-Match: 304.
    broker
        .metric_eventually(&fetches("not_modified"), 1.0)
        .await;
    assert!(
        server.revalidated.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the refresh named the kept CRL's ETag"
    );
    // A revocation between refreshes applies at the next one.
    serve(Serve::Crl(
        issuing.crl(&[a.serial, b.serial]),
        "\"v2\"".into(),
    ));
    eventually(&b, revoked).await;

    // Failed downloads keep the last good CRL: a CRL of the issuing CA's name signed by
    // another key, 404, a truncated body, more than max_bytes, no answer in time.
    let impostor = Ca::root("Test Device Issuing CA").crl(&[]);
    for (answer, result) in [
        (Serve::Crl(impostor, "\"forged\"".into()), "bad_signature"),
        (Serve::Status(404), "not_found"),
        (Serve::Truncated, "network_error"),
        (Serve::Big(200_000), "too_large"),
        (Serve::Hang, "timeout"),
    ] {
        serve(answer);
        let before = broker.metric(&fetches(result)).await;
        broker
            .metric_eventually(&fetches(result), before + 1.0)
            .await;
        assert!(
            reason_of(&b).await.contains(revoked),
            "after {result}, the kept CRL still revokes b"
        );
    }

    // A new process with the network down reads the kept copy.
    serve(Serve::Status(503));
    let report = support::verify_cert(&config, &b.chain_pem, broker.setup.dir.path());
    assert_eq!(report["reason"], "revoked", "{report}");

    // A CRL whose nextUpdate is near, then no more downloads: kept until its nextUpdate,
    // then its certificates are refused crl_expired.
    let next_update = OffsetDateTime::now_utc() + Duration::seconds(8);
    let short = issuing.crl_from(&[a.serial], next_update - Duration::days(7));
    serve(Serve::Crl(short, "\"v3\"".into()));
    eventually(&b, "accepted").await;
    serve(Serve::Status(404));
    eventually(
        &b,
        "revocation status unknown: the CRL for this certificate's issuer expired",
    )
    .await;
    assert!(OffsetDateTime::now_utc() >= next_update - Duration::seconds(1));
    broker.stop().await;
}

/// The verified-chain cache holds one verdict per leaf certificate, reached for a client
/// that proved it holds the key. That verdict must not stand in for the proof: the same
/// certificate presented with another key, over TLS 1.2 and over TLS 1.3, fails the
/// handshake (rustls checks CertificateVerify against the certificate's key) and gets no
/// token, and the genuine device still gets its tokens afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_chain_presented_with_another_key_is_refused_over_tls12_and_tls13() {
    let setup = Setup::new();
    let device = setup.intermediate.leaf(&LeafSpec::device("cached-device"));
    let thief = setup.intermediate.leaf(&LeafSpec::device("key-thief"));
    let broker = setup.start().await;
    let issued =
        r#"token_broker_tokens_issued_total{client="devices",flow="mtls-client-credentials"}"#;
    let answered = |text: &str| {
        text.lines()
            .filter(|line| line.starts_with("token_broker_token_requests_total{"))
            .map(|line| support::metric_value(text, line.rsplit_once(' ').unwrap().0))
            .sum::<f64>()
    };
    let chain_cache = |text: &str| {
        let count = |result| {
            support::metric_value(
                text,
                &format!("token_broker_verified_chain_cache_{result}_total"),
            )
        };
        (count("misses"), count("hits"))
    };
    let handshakes =
        |result: &str| format!("token_broker_tls_handshakes_total{{result=\"{result}\"}}");

    // The device, with its own key: a token, and its chain's verdict cached.
    let (status, body) = broker
        .token(Some(&device), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    let text = broker.metrics().await;
    assert_eq!(chain_cache(&text), (1.0, 0.0));
    assert_eq!(support::metric_value(&text, issued), 1.0);

    for (version, name) in [
        (&rustls::version::TLS12, "TLS 1.2"),
        (&rustls::version::TLS13, "TLS 1.3"),
    ] {
        let before = broker.metrics().await;
        let errors = support::metric_value(&before, &handshakes("error"));
        let client = wrong_key_client(&broker, &device, &thief, &[version]);
        let result = post_client_credentials(&broker, &client).await;
        assert!(
            result.is_err(),
            "{name}: the certificate with another key got an answer: {result:?}"
        );
        // Counted once the server has given up on the connection: no request can follow.
        assert_eq!(
            broker
                .metric_eventually(&handshakes("error"), errors + 1.0)
                .await,
            errors + 1.0,
            "{name}: the handshake failed on the server"
        );
        let after = broker.metrics().await;
        assert_eq!(
            support::metric_value(&after, issued),
            support::metric_value(&before, issued),
            "{name}: a token was issued"
        );
        assert_eq!(
            answered(&after),
            answered(&before),
            "{name}: a request was served"
        );
        assert_eq!(
            chain_cache(&after),
            chain_cache(&before),
            "{name}: the cached verdict was consulted"
        );
        assert_eq!(
            support::metric_value(&after, &handshakes("ok")),
            support::metric_value(&before, &handshakes("ok")),
            "{name}: the handshake succeeded"
        );

        // The device itself, over the same version: still served, from its cached verdict.
        let genuine = broker.client_with_versions(Some(&device), &[version]);
        let response = post_client_credentials(&broker, &genuine).await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "{name}: the device after the attempt"
        );
        let text = broker.metrics().await;
        let (misses, hits) = chain_cache(&before);
        assert_eq!(chain_cache(&text), (misses, hits + 1.0), "{name}");
        assert_eq!(
            support::metric_value(&text, issued),
            support::metric_value(&before, issued) + 1.0
        );
    }
    broker.stop().await;
}

/// check-config says when revocation is off, and which CAs `best-effort` leaves unchecked.
#[test]
fn check_config_warns_of_unchecked_revocation() {
    let check_config = |setup: &Setup| support::check_config(&setup.write_config());
    let mut setup = Setup::new();
    setup.crl_paths = Some(Vec::new());
    let report = check_config(&setup);
    assert!(
        report.contains("# warning: no CRL is configured"),
        "{report}"
    );

    let mut setup = Setup::new();
    setup.bundle_folder = true;
    setup.write("root.crl.pem", &setup.root.crl(&[]));
    setup.crl_paths = Some(vec!["root.crl.pem".into()]);
    setup.extra_server = "revocation = \"best-effort\"".into();
    let report = check_config(&setup);
    assert!(
        !report.contains("expires at"),
        "no root expires soon: {report}"
    );
    assert!(
        report.contains("best-effort")
            && report.contains("not checked")
            && report.contains("CN=Test Device Issuing CA"),
        "{report}"
    );
}

/// check-config warns a month before a root expires, and says when one has.
#[test]
fn check_config_warns_of_roots_expiring_or_expired() {
    let now = OffsetDateTime::now_utc();
    for (days, says) in [(10, "expires at"), (-1, "expired at")] {
        let mut setup = Setup::new();
        setup.root = Ca::root_with("Short-Lived Root", |p| {
            p.not_before = now - Duration::days(30);
            p.not_after = now + Duration::days(days);
        });
        setup.intermediate = setup.root.intermediate("Short-Lived Issuing CA");
        let report = support::check_config(&setup.write_config());
        assert!(
            report.contains(&format!("# warning: root CA CN=Short-Lived Root {says}")),
            "{report}"
        );
    }
}
