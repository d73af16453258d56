//! Draining and readiness: `/readyz` is 200 only when the broker could issue a token, says
//! which check fails, and turns 503 at once on shutdown while the listener stays open for
//! `shutdown_delay`; a replica behind HAProxy (no retries) drains without a failed request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::google::start_iam;
use crate::replicas::{behind_haproxy, client_builder};
use crate::support::fake_google::{Api, Fault};
use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker};

/// `/readyz` of a broker's admin listener: status and body.
async fn readyz(broker: &TestBroker) -> (u16, String) {
    let response = reqwest::get(format!("http://{}/readyz", broker.admin))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

fn readiness_gauge(check: &str) -> String {
    format!(r#"token_broker_readiness{{check="{check}"}}"#)
}

/// A TLS connection to the broker, presenting `leaf` if given.
async fn connect(broker: &TestBroker, leaf: Option<&Leaf>) -> TlsStream<TcpStream> {
    let config = broker.tls_config(leaf, rustls::DEFAULT_VERSIONS);
    let tcp = TcpStream::connect(broker.addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

const GET_JWKS: &[u8] = b"GET /jwks HTTP/1.1\r\nhost: localhost\r\n\r\n";

/// Reads one HTTP/1.1 answer: status, head (lowercase) and body.
async fn read_answer(stream: &mut TlsStream<TcpStream>) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut more = async |buf: &mut Vec<u8>| {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-answer: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        more(&mut buf).await;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map_or(0, |value| value.trim().parse().unwrap());
    while buf.len() < head_end + length {
        more(&mut buf).await;
    }
    let status = head[9..12].parse().unwrap();
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    (status, head, body)
}

/// The server ended the connection (close_notify or EOF) instead of waiting for a request.
async fn assert_closed_by_server(stream: &mut TlsStream<TcpStream>) {
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(support::PATIENCE, stream.read(&mut byte))
        .await
        .expect("the server closes the connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "connection still open: {read:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_fails_readyz_at_once_keeps_accepting_for_the_delay_and_closes_connections() {
    const DELAY: Duration = Duration::from_secs(3);
    let mut setup = Setup::new();
    setup.shutdown_delay = "3s".into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("draining"));
    let mut broker = setup.start().await;
    assert_eq!(readyz(&broker).await, (200, "ready\n".into()));
    for check in ["listener", "signer", "crls", "draining"] {
        assert_eq!(broker.metric(&readiness_gauge(check)).await, 1.0, "{check}");
    }

    // A kept-alive connection, opened while serving: its answers do not close it.
    let mut kept = connect(&broker, None).await;
    kept.write_all(GET_JWKS).await.unwrap();
    let (status, head, _) = read_answer(&mut kept).await;
    assert_eq!(status, 200);
    assert!(!head.contains("connection: close"), "{head}");

    let stopped_at = Instant::now();
    broker.begin_stop();
    support::wait_until("/readyz to fail", || async {
        readyz(&broker).await.0 == 503
    })
    .await;
    let (status, body) = readyz(&broker).await;
    assert!(stopped_at.elapsed() < DELAY, "503 only after the delay");
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "draining: shutting down (SIGTERM/SIGINT): finishing in-flight requests, then exiting\n"
    );
    assert_eq!(broker.metric(&readiness_gauge("draining")).await, 0.0);
    assert_eq!(broker.metric(&readiness_gauge("listener")).await, 1.0);

    // The kept-alive connection's next answer carries Connection: close, and it is closed.
    kept.write_all(GET_JWKS).await.unwrap();
    let (status, head, _) = read_answer(&mut kept).await;
    assert_eq!(status, 200);
    assert!(head.contains("connection: close"), "{head}");
    assert_closed_by_server(&mut kept).await;

    // The listener still accepts during the delay: a new connection gets a token, and the
    // answer tells it to go elsewhere next time.
    let mut late = connect(&broker, Some(&leaf)).await;
    let form = "grant_type=client_credentials";
    late.write_all(
        format!(
            "POST /token HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n",
            form.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    assert!(
        stopped_at.elapsed() < DELAY,
        "connected only after the delay"
    );
    // Half the body: the request is in flight while the listener closes.
    late.write_all(&form.as_bytes()[..10]).await.unwrap();
    late.flush().await.unwrap();

    support::wait_until("the listener to close after the delay", || async {
        TcpStream::connect(broker.addr).await.is_err()
    })
    .await;
    assert!(
        stopped_at.elapsed() >= DELAY,
        "the listener closed after {:?}, before shutdown_delay",
        stopped_at.elapsed()
    );
    let (status, body) = readyz(&broker).await;
    assert_eq!(status, 503);
    assert_eq!(
        body.lines()
            .map(|l| l.split(':').next().unwrap())
            .collect::<Vec<_>>(),
        ["listener", "draining"],
        "{body}"
    );
    assert_eq!(broker.metric(&readiness_gauge("listener")).await, 0.0);

    // The in-flight request finishes within shutdown_grace.
    late.write_all(&form.as_bytes()[10..]).await.unwrap();
    let (status, head, body) = read_answer(&mut late).await;
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("connection: close"), "{head}");
    let token: Value = serde_json::from_str(&body).unwrap();
    assert!(token["access_token"].is_string(), "{body}");
    assert_closed_by_server(&mut late).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_names_a_failing_iam_signer_and_sees_it_recover() {
    let (fake, broker, leaf) = start_iam(|_, _| "metadata".into()).await;
    // Nothing was signed yet: /readyz probes signJwt once, and waits for the answer.
    support::wait_until("the first signJwt probe", || async {
        readyz(&broker).await.0 == 200
    })
    .await;
    assert_eq!(fake.calls(Api::SignJwt), 1, "one probe");
    for _ in 0..20 {
        assert_eq!(readyz(&broker).await, (200, "ready\n".into()));
    }
    assert_eq!(
        fake.calls(Api::SignJwt),
        1,
        "a success is not probed again soon"
    );

    // Google stops signing: the failed signJwt of a token request makes /readyz fail at
    // once, naming the signer and what to fix.
    fake.inject(Api::SignJwt, Fault::PermissionDenied, 1000);
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_ne!(status, 200, "{body}");
    let failed_calls = fake.calls(Api::SignJwt);
    let (status, body) = readyz(&broker).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(
        body.starts_with("signer: iam signer cannot sign: signJwt as "),
        "{body}"
    );
    assert!(
        body.contains("roles/iam.serviceAccountTokenCreator"),
        "{body}"
    );
    assert_eq!(broker.metric(&readiness_gauge("signer")).await, 0.0);
    assert_eq!(broker.metric(&readiness_gauge("crls")).await, 1.0);
    // Polled often, the probe stays rate-limited (one at most every few seconds).
    for _ in 0..20 {
        assert_eq!(readyz(&broker).await.0, 503);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        fake.calls(Api::SignJwt) <= failed_calls + 1,
        "{} probes in half a second",
        fake.calls(Api::SignJwt) - failed_calls
    );

    // Google recovers: a probe notices without any token request.
    fake.clear_faults(Api::SignJwt);
    support::wait_until("/readyz to see the signer recover", || async {
        readyz(&broker).await.0 == 200
    })
    .await;
    assert_eq!(broker.metric(&readiness_gauge("signer")).await, 1.0);
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_fails_while_a_crl_is_past_its_next_update() {
    let mut setup = Setup::new();
    setup.stale_crl = true;
    let broker = setup.start().await;
    let (status, body) = readyz(&broker).await;
    assert_eq!(status, 503);
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(body.starts_with("crls: CRL "), "{body}");
    assert!(
        body.contains("intermediate.crl.pem of CN=Test Device Issuing CA expired at "),
        "{body}"
    );
    assert!(body.contains("renew it"), "{body}");
    assert_eq!(broker.metric(&readiness_gauge("crls")).await, 0.0);
    // Liveness is not readiness: the process is fine.
    let healthz = reqwest::get(format!("http://{}/healthz", broker.admin))
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);

    // A renewed CRL, reloaded: ready.
    let setup = &broker.setup;
    setup.write("intermediate.crl.pem", &setup.intermediate.crl(&[]));
    broker.live.reload().unwrap();
    assert_eq!(readyz(&broker).await, (200, "ready\n".into()));
    assert_eq!(broker.metric(&readiness_gauge("crls")).await, 1.0);
    broker.stop().await;
}

/// What the load saw: answers, failures, and answers telling the client to reconnect.
#[derive(Default)]
struct Tally {
    ok: usize,
    closing: usize,
    failures: Vec<String>,
}

/// One token request through the load balancer: whether the answer said
/// `Connection: close`, or what failed.
async fn request_token(client: &reqwest::Client, frontend: u16) -> Result<bool, String> {
    let response = client
        .post(format!("https://localhost:{frontend}/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials")
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let closing = response
        .headers()
        .get("connection")
        .is_some_and(|v| v == "close");
    let status = response.status().as_u16();
    match response.json::<Value>().await {
        Ok(body) if status == 200 && body["access_token"].is_string() => Ok(closing),
        Ok(body) => Err(format!("{status}: {body}")),
        Err(e) => Err(format!("{status}: {e}")),
    }
}

/// Token requests until `stop`, counted in `tally`.
async fn load(
    client: reqwest::Client,
    frontend: u16,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let mut sent = 0usize;
    while !stop.load(Ordering::Relaxed) {
        sent += 1;
        let outcome = request_token(&client, frontend).await;
        {
            let mut tally = tally.lock().unwrap();
            match outcome {
                Ok(closing) => {
                    tally.ok += 1;
                    tally.closing += usize::from(closing);
                }
                Err(failure) => tally.failures.push(format!("request {sent}: {failure}")),
            }
        }
        // Steady, not saturating: the machine is shared with the replicas and HAProxy.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_drains_behind_haproxy_without_retries_and_no_request_fails() {
    let mut setup = Setup::new();
    // HAProxy checks every 100ms and takes a server out on one failed check: 3s is many
    // checks, even on a loaded machine.
    setup.shutdown_delay = "3s".into();
    let leaves: Vec<Leaf> = (0..5)
        .map(|i| {
            setup
                .intermediate
                .leaf(&LeafSpec::device(&format!("load-{i}")))
        })
        .collect();
    let (replicas, _lb, frontend) = behind_haproxy(&mut setup).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    // Three clients keep their connection: opened one after the other, round robin gives
    // each replica one. Two more open a connection per request.
    let mut clients = Vec::new();
    for leaf in &leaves[..3] {
        let client = client_builder(&setup, Some(leaf), "127.0.0.2")
            .build()
            .unwrap();
        request_token(&client, frontend).await.unwrap();
        clients.push(client);
    }
    for leaf in &leaves[3..] {
        let client = client_builder(&setup, Some(leaf), "127.0.0.2")
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        clients.push(client);
    }
    let workers: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(load(client, frontend, stop.clone(), tally.clone())))
        .collect();

    let issued =
        r#"token_broker_tokens_issued_total{client="devices",flow="mtls-client-credentials"}"#;
    support::wait_until("the load to reach the replica that will stop", || async {
        replicas[1].metric(issued).await >= 20.0
    })
    .await;
    let before = tally.lock().unwrap().ok;
    let stopped_at = Instant::now();
    replicas[1].signal("TERM");
    let mut replicas = replicas;
    let mut drained = replicas.remove(1);
    let exit = tokio::task::spawn_blocking(move || drained.process.wait())
        .await
        .unwrap();
    let drain_time = stopped_at.elapsed();
    assert!(exit.success(), "exit status {exit:?}");
    assert!(drain_time >= Duration::from_secs(3), "{drain_time:?}");
    // The load goes on a while on the two replicas left.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }

    let tally = std::mem::take(&mut *tally.lock().unwrap());
    println!(
        "drain took {drain_time:?}; {} tokens ({} during and after the drain), {} answers with Connection: close, {} failed",
        tally.ok,
        tally.ok - before,
        tally.closing,
        tally.failures.len()
    );
    assert!(
        tally.failures.is_empty(),
        "failed requests: {:#?}\nhaproxy: {}",
        tally.failures,
        std::fs::read_to_string(setup.path("haproxy.log")).unwrap_or_default()
    );
    assert!(tally.ok - before >= 50, "too little load during the drain");
    // The kept-alive client connected to the stopping replica was told to reconnect.
    assert!(tally.closing >= 1, "no answer said Connection: close");
    for replica in &replicas {
        assert!(replica.metric(issued).await > 0.0);
    }
    let log = std::fs::read_to_string(setup.path("r1.log")).unwrap();
    support::logs::assert_no_secrets(&log, "the drained replica");
}
