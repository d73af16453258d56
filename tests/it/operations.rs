//! Operating the broker: metrics (checked by promtool), PROXY protocol v2, hot reload under
//! load, rate limits, slow and excess connections, readiness.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Whether an in-process broker of the test process logged `needle` (support::logs): the
/// needles are unique to their test.
fn logged(needle: &str) -> bool {
    support::logs::captured().contains(needle)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_valid_prometheus_text_with_bounded_labels() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("metered"));
    let broker = setup.start().await;
    broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    broker.token(None, "grant_type=client_credentials").await;
    let text = broker.metrics().await;
    for family in [
        "token_broker_tokens_issued_total",
        "token_broker_token_requests_total",
        "token_broker_client_cert_rejections_total",
        "token_broker_tls_handshakes_total",
        "token_broker_request_duration_seconds",
        "token_broker_signer_duration_seconds",
        "token_broker_token_cache_hits_total",
        "token_broker_token_cache_misses_total",
        "token_broker_open_connections",
        "token_broker_ca_cert_expiry_timestamp_seconds",
        "token_broker_signing_key_expiry_timestamp_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }
    assert_eq!(
        support::metric_value(
            &text,
            r#"token_broker_tokens_issued_total{client="devices",flow="mtls-client-credentials"}"#
        ),
        1.0
    );
    // Bounded labels: no subject, serial or fingerprint ever appears.
    assert!(!text.contains("spiffe://") && !text.contains(&format!("{:x}", leaf.serial)));
    let expiry = support::metric_value(&text, "token_broker_signing_key_expiry_timestamp_seconds");
    assert!(expiry > 1.0e9, "{expiry}");

    let promtool = support::require_tool("promtool", "prometheus");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    broker.stop().await;
}

/// A v2 header declaring `source` (PROXY) or nothing (LOCAL).
fn proxy_header(source: Option<&str>) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    match source {
        Some(source) => {
            let source: SocketAddr = source.parse().unwrap();
            let destination: SocketAddr = "127.0.0.1:8443".parse().unwrap();
            Builder::with_addresses(
                Version::Two | Command::Proxy,
                Protocol::Stream,
                (source, destination),
            )
            .build()
            .unwrap()
        }
        None => Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap(),
    }
}

async fn connect_from(source_ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{source_ip}:0").parse().unwrap())
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Writes `prefix`, then speaks TLS + one HTTP/1.1 token request; the status code on success.
async fn token_over(
    broker: &TestBroker,
    mut stream: TcpStream,
    prefix: &[u8],
    leaf: &Leaf,
) -> Result<u16, String> {
    stream.write_all(prefix).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        broker.tls_config(Some(leaf), rustls::DEFAULT_VERSIONS),
    ));
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), stream)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let body = "grant_type=client_credentials";
    let request = format!(
        "POST /token HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))
}

async fn proxied_broker() -> (TestBroker, Leaf) {
    let mut setup = Setup::new();
    setup.extra_server = "[server.proxy_protocol]\nmode = \"v2\"\ntrusted_cidrs = [\"127.0.0.1/32\"]\nheader_timeout = \"1s\"".into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("behind-lb"));
    (setup.start().await, leaf)
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_v2_from_trusted_peers_only() {
    let (broker, leaf) = proxied_broker().await;
    let refused = |cause: &'static str| {
        format!("token_broker_refused_connections_total{{cause=\"{cause}\"}}")
    };

    // Trusted peer with a header: the declared client address is the one logged and audited.
    let stream = connect_from("127.0.0.1", broker.addr).await;
    let status = token_over(
        &broker,
        stream,
        &proxy_header(Some("203.0.113.7:5555")),
        &leaf,
    )
    .await;
    assert_eq!(status, Ok(200));
    assert!(
        logged(r#""peer":"203.0.113.7:5555""#),
        "client address not in the audit log"
    );

    // LOCAL (load balancer health check): served as the peer itself.
    let stream = connect_from("127.0.0.1", broker.addr).await;
    assert_eq!(
        token_over(&broker, stream, &proxy_header(None), &leaf).await,
        Ok(200)
    );

    // Trusted peer without a header: dropped.
    let stream = connect_from("127.0.0.1", broker.addr).await;
    assert!(token_over(&broker, stream, b"", &leaf).await.is_err());
    assert_eq!(broker.metric(&refused("proxy_missing_header")).await, 1.0);

    // Untrusted peer with a header (v2 or v1): dropped; without one: a direct client.
    let stream = connect_from("127.0.0.2", broker.addr).await;
    assert!(token_over(
        &broker,
        stream,
        &proxy_header(Some("198.51.100.1:1")),
        &leaf
    )
    .await
    .is_err());
    let stream = connect_from("127.0.0.2", broker.addr).await;
    assert!(token_over(
        &broker,
        stream,
        b"PROXY TCP4 198.51.100.1 127.0.0.1 1 8443\r\n",
        &leaf
    )
    .await
    .is_err());
    assert_eq!(broker.metric(&refused("proxy_untrusted_header")).await, 2.0);
    let stream = connect_from("127.0.0.2", broker.addr).await;
    assert_eq!(token_over(&broker, stream, b"", &leaf).await, Ok(200));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_truncated_and_huge_proxy_headers_are_dropped() {
    let (broker, leaf) = proxied_broker().await;
    let good = proxy_header(Some("203.0.113.8:6666"));
    let mut bad_family = good.clone();
    bad_family[13] = 0xF1;
    let mut huge = good[..16].to_vec();
    huge[14] = 0xFF;
    huge[15] = 0xFF;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad address family", bad_family),
        ("truncated, then silence", good[..20].to_vec()),
        ("huge length", huge),
        ("signature only", good[..12].to_vec()),
        ("random bytes", vec![0x0d; 40]),
    ];
    for (name, bytes) in cases {
        let mut stream = connect_from("127.0.0.1", broker.addr).await;
        stream.write_all(&bytes).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(support::PATIENCE, stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "{name}: connection left open");
        assert!(rest.is_empty(), "{name}: got an answer {rest:?}");
    }
    assert!(
        broker
            .metric(r#"token_broker_refused_connections_total{cause="proxy_malformed"}"#)
            .await
            >= 2.0
    );
    // Still serving.
    let stream = connect_from("127.0.0.1", broker.addr).await;
    assert_eq!(token_over(&broker, stream, &good, &leaf).await, Ok(200));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_per_certificate_answers_429_with_retry_after() {
    let mut setup = Setup::new();
    setup.rules = r#"
[[clients]]
name = "devices"
match = { spiffe = ["spiffe://test.example/device/*"] }
rate_limit = { requests_per_minute = 6, burst = 2 }
"#
    .into();
    let one = setup.intermediate.leaf(&LeafSpec::device("chatty"));
    let two = setup.intermediate.leaf(&LeafSpec::device("quiet"));
    let broker = setup.start().await;
    for _ in 0..2 {
        assert_eq!(
            broker
                .token(Some(&one), "grant_type=client_credentials")
                .await
                .0,
            200
        );
    }
    let response = broker
        .post_token(Some(&one), "grant_type=client_credentials")
        .await;
    assert_eq!(response.status(), 429);
    let wait: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&wait), "{wait}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");
    // Another device of the same rule has its own budget.
    assert_eq!(
        broker
            .token(Some(&two), "grant_type=client_credentials")
            .await
            .0,
        200
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_do_not_block_real_ones_and_are_closed() {
    let mut setup = Setup::new();
    setup.extra_server = "handshake_timeout = \"3s\"\nrequest_header_timeout = \"3s\"".into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("patient"));
    let broker = setup.start().await;

    // 100 connections that never start TLS, 50 that stop mid-ClientHello.
    let mut idle = Vec::new();
    for i in 0..150 {
        let mut stream = TcpStream::connect(broker.addr).await.unwrap();
        if i >= 100 {
            stream
                .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    // 20 that finish TLS but never finish their headers.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        broker.tls_config(Some(&leaf), rustls::DEFAULT_VERSIONS),
    ));
    let mut half = Vec::new();
    for _ in 0..20 {
        let tcp = TcpStream::connect(broker.addr).await.unwrap();
        let mut tls = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"POST /token HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        half.push(tls);
    }
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");

    // All of them are closed by the server after the timeouts.
    for mut stream in idle {
        let mut rest = Vec::new();
        let done = tokio::time::timeout(support::PATIENCE, stream.read_to_end(&mut rest)).await;
        assert!(done.is_ok(), "a stalled handshake was left open");
    }
    for mut tls in half {
        let mut rest = Vec::new();
        let done = tokio::time::timeout(support::PATIENCE, tls.read_to_end(&mut rest)).await;
        assert!(done.is_ok(), "a stalled request head was left open");
    }
    assert!(
        broker
            .metric(r#"token_broker_tls_handshakes_total{result="timeout"}"#)
            .await
            >= 100.0
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_limit_are_refused_early_and_counted() {
    let mut setup = Setup::new();
    setup.extra_server = "max_connections = 5".into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("late"));
    let broker = setup.start().await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(TcpStream::connect(broker.addr).await.unwrap());
    }
    let mut extra = TcpStream::connect(broker.addr).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(support::PATIENCE, extra.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the sixth connection was not closed");
    assert_eq!(
        broker
            .metric(r#"token_broker_refused_connections_total{cause="max_connections"}"#)
            .await,
        1.0
    );
    // Their slots are free once the server has seen them close (it frees a slot before it
    // stops counting the connection as open).
    drop(held);
    support::wait_until(
        "the held connections to be closed by the server",
        || async { broker.metric("token_broker_open_connections").await == 0.0 },
    )
    .await;
    assert_eq!(
        broker
            .token(Some(&leaf), "grant_type=client_credentials")
            .await
            .0,
        200
    );
    broker.stop().await;
}

/// Requests tokens in a loop until stopped; counts answers (in `answered` too) and keeps
/// those other than 200.
fn token_loop(
    broker: Arc<TestBroker>,
    leaf: Arc<Leaf>,
    stop: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut done = 0;
        while stop.load(Ordering::Relaxed) == 0 {
            let (status, body) = broker
                .token(Some(&leaf), "grant_type=client_credentials")
                .await;
            if status != 200 {
                failures.lock().unwrap().push(format!("{status} {body}"));
            }
            done += 1;
            answered.fetch_add(1, Ordering::Relaxed);
        }
        done
    })
}

/// Waits until the load loops have had a few more answers: the load goes on across each
/// change, whatever the machine's speed (instead of a minimum count at the end).
async fn load_goes_on(answered: &AtomicUsize) {
    let seen = answered.load(Ordering::Relaxed);
    support::wait_until("more answers to the load loops", || async {
        answered.load(Ordering::Relaxed) >= seen + 4
    })
    .await;
}

async fn wait_for_reload(broker: &TestBroker, result: &str, count: f64) {
    let sample = format!("token_broker_config_reloads_total{{result=\"{result}\"}}");
    support::wait_until(
        &format!("{count} reload(s) with result {result}"),
        || async { broker.metric(&sample).await >= count },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_reload_under_load_changes_trust_crl_and_keys_without_failures() {
    let mut setup = Setup::new();
    setup.extra_server = "reload_interval = \"1s\"".into();
    let steady = setup.intermediate.leaf(&LeafSpec::device("steady"));
    let doomed = setup.intermediate.leaf(&LeafSpec::device("doomed"));
    let new_root = support::Ca::root("Second Device Root");
    let newcomer = new_root.leaf(&LeafSpec::device("newcomer"));
    // Its CRL is configured before the root is trusted (revocation is required).
    setup.extra_crl_pems = vec![new_root.crl(&[])];
    let broker = Arc::new(setup.start().await);
    let old_kid = jsonwebtoken::decode_header(
        broker
            .token(Some(&doomed), "grant_type=client_credentials")
            .await
            .1["access_token"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
    .kid
    .unwrap();
    assert_eq!(
        broker
            .token(Some(&newcomer), "grant_type=client_credentials")
            .await
            .0,
        401
    );

    let stop = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            token_loop(
                broker.clone(),
                Arc::new(steady.clone()),
                stop.clone(),
                answered.clone(),
                failures.clone(),
            )
        })
        .collect();
    load_goes_on(&answered).await;

    // 1. The CA bundle gains a root.
    let bundle = format!("{}{}", broker.setup.root.pem, new_root.pem);
    broker.setup.write("client-ca.pem", &bundle);
    wait_for_reload(&broker, "ok", 1.0).await;
    load_goes_on(&answered).await;
    assert_eq!(
        broker
            .token(Some(&newcomer), "grant_type=client_credentials")
            .await
            .0,
        200
    );

    // 2. A new CRL revokes a device: refused from now on, also on its open connections.
    broker.setup.write(
        "intermediate.crl.pem",
        &broker.setup.intermediate.crl(&[doomed.serial]),
    );
    wait_for_reload(&broker, "ok", 2.0).await;
    load_goes_on(&answered).await;
    let (status, body) = broker
        .token(Some(&doomed), "grant_type=client_credentials")
        .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (
            401,
            Some("certificate revoked (listed in its issuer's CRL)")
        )
    );

    // 3. A broken file: the old state keeps serving and the error is counted.
    broker.setup.write(
        "root.crl.pem",
        "-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n",
    );
    wait_for_reload(&broker, "error", 1.0).await;
    load_goes_on(&answered).await;
    broker
        .setup
        .write("root.crl.pem", &broker.setup.root.crl(&[]));
    wait_for_reload(&broker, "ok", 3.0).await;
    load_goes_on(&answered).await;

    // 4. Key rotation: a new key dated in the past signs; the old key stays published.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    broker
        .setup
        .write("keys/signing-20200101T000000Z.pem", &key.serialize_pem());
    wait_for_reload(&broker, "ok", 4.0).await;
    load_goes_on(&answered).await;
    let (status, body) = broker
        .token(Some(&steady), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200);
    let jwks: Value = broker.get_json("/jwks").await;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert_eq!(kids.len(), 2, "old and new keys are both published");
    assert!(kids.contains(&old_kid.as_str()));
    let jwt = body["access_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    let new_kid = header.kid.clone().unwrap();
    assert_ne!(
        new_kid, old_kid,
        "the dated key (2020, later than undated) signs now"
    );
    let new_key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == new_kid.as_str())
        .unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(new_key.clone()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&["aud-a"]);
    jsonwebtoken::decode::<Value>(
        jwt,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &validation,
    )
    .unwrap();

    stop.store(1, Ordering::Relaxed);
    let mut total = 0;
    for task in loops {
        total += task.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_are_counted_and_readyz_reports_ready() {
    let setup = Setup::new();
    let broker = setup.start().await;
    let ready = reqwest::get(format!("http://{}/readyz", broker.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let health = reqwest::get(format!("http://{}/healthz", broker.admin))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    broker.live.reload().unwrap();
    assert_eq!(
        broker
            .metric(r#"token_broker_config_reloads_total{result="ok"}"#)
            .await,
        1.0
    );
    broker.stop().await;
}

/// A verdict is reused on the same connection and by a reconnecting device, and neither
/// outlives the certificate's notAfter or a reload that revokes it. Expiry is driven by
/// times the test chooses, not by waiting for a short-lived certificate to run out: such a
/// certificate would have to outlive the first requests on a loaded machine.
#[tokio::test(flavor = "multi_thread")]
async fn a_reused_verdict_ends_with_its_certificate_and_with_a_reload() {
    let mut setup = Setup::new();
    // Idle kept-alive connections stay open throughout, however slow the machine.
    setup.extra_server = "request_header_timeout = \"1h\"".into();
    let now = time::OffsetDateTime::now_utc();
    // Its notAfter comes before the CRLs' nextUpdate (a week): the verdict ends with it.
    let spec = LeafSpec {
        not_after: now + time::Duration::days(1),
        ..LeafSpec::device("reused")
    };
    let reused = setup.intermediate.leaf(&spec);
    let doomed = setup
        .intermediate
        .leaf(&LeafSpec::device("doomed-keepalive"));
    let expired_spec = LeafSpec {
        not_before: now - time::Duration::hours(2),
        not_after: now - time::Duration::hours(1),
        ..LeafSpec::device("expired")
    };
    let expired = setup.intermediate.leaf(&expired_spec);
    let broker = setup.start().await;
    let post = |client: reqwest::Client| {
        let url = broker.url("/token");
        async move {
            let response = client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("grant_type=client_credentials")
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let chain_cache = || {
        let broker = &broker;
        async move {
            let text = broker.metrics().await;
            let count = |result| {
                support::metric_value(
                    &text,
                    &format!("token_broker_verified_chain_cache_{result}_total"),
                )
            };
            (count("misses"), count("hits"))
        }
    };
    // One client = one kept-alive connection.
    let reused_client = broker.client(Some(&reused));
    let doomed_client = broker.client(Some(&doomed));
    assert_eq!(post(reused_client.clone()).await.0, 200);
    assert_eq!(post(doomed_client.clone()).await.0, 200);
    assert_eq!(chain_cache().await, (2.0, 0.0));
    // Again on the same connection, and from a new one: both reuse the verdict.
    assert_eq!(post(reused_client.clone()).await.0, 200);
    assert_eq!(post(broker.client(Some(&reused))).await.0, 200);
    assert_eq!(chain_cache().await, (2.0, 2.0));

    // Revoked by a reload: the same connection is refused at once, and so is a new one.
    broker.setup.write(
        "intermediate.crl.pem",
        &broker.setup.intermediate.crl(&[doomed.serial]),
    );
    broker.live.reload().unwrap();
    for client in [doomed_client, broker.client(Some(&doomed))] {
        let (status, body) = post(client).await;
        assert_eq!(
            (status, body["error_description"].as_str()),
            (
                401,
                Some("certificate revoked (listed in its issuer's CRL)")
            )
        );
    }
    assert_eq!(post(reused_client.clone()).await.0, 200);
    let (misses, hits) = chain_cache().await;

    // The verdict the last request cached holds while the time is before notAfter; from
    // notAfter on (a valid second still: inclusive) the chain is validated again, and a
    // second later refused. Asked at those times, the broker /token uses decides so.
    let current = broker.live.current();
    let at = |chain: &[rustls_pki_types::CertificateDer<'static>], t: time::OffsetDateTime| {
        current
            .authenticate(chain, token_broker::clock::at_unix(t.unix_timestamp()))
            .map(|_| ())
            .map_err(|refusal| refusal.reason())
    };
    let not_after =
        time::OffsetDateTime::from_unix_timestamp(spec.not_after.unix_timestamp()).unwrap();
    let second = time::Duration::seconds(1);
    assert_eq!(at(&reused.chain(), not_after - second), Ok(()));
    assert_eq!(
        chain_cache().await,
        (misses, hits + 1.0),
        "reused until notAfter"
    );
    assert_eq!(at(&reused.chain(), not_after), Ok(()));
    assert_eq!(
        chain_cache().await,
        (misses + 1.0, hits + 1.0),
        "validated again at notAfter"
    );
    assert_eq!(at(&reused.chain(), not_after + second), Err("expired"));
    assert_eq!(chain_cache().await, (misses + 2.0, hits + 1.0));

    // Over the wire: a certificate whose verdict was cached while it was valid, presented
    // after its notAfter, is validated again and refused.
    let valid_then = expired_spec.not_before + time::Duration::minutes(30);
    assert_eq!(at(&expired.chain(), valid_then), Ok(()));
    let (status, body) = post(broker.client(Some(&expired))).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .starts_with("certificate expired at"));
    assert_eq!(chain_cache().await, (misses + 4.0, hits + 1.0));
    // The kept-alive connection of the valid certificate still gets its tokens.
    assert_eq!(post(reused_client).await.0, 200);
    assert_eq!(
        broker
            .metric(r#"token_broker_tls_handshakes_total{result="ok"}"#)
            .await,
        5.0,
        "the first two connections were kept alive throughout"
    );
    broker.stop().await;
}
