//! Connections that stay quiet after their handshake: the server hands a connection to
//! HTTP only once the client has sent something (so that idle connections do not hold
//! HTTP buffers), and that must change nothing a client can see: a late request is served,
//! a silent connection still closes at `request_header_timeout`, and stopping the server
//! does not wait for silent connections.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker};

async fn handshake(
    broker: &TestBroker,
    leaf: &Leaf,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        broker.tls_config(Some(leaf), rustls::DEFAULT_VERSIONS),
    ));
    let tcp = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_sent_long_after_the_handshake_is_served() {
    let mut setup = Setup::new();
    setup.extra_server = r#"request_header_timeout = "5s""#.into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("late-talker"));
    let broker = setup.start().await;
    let mut tls = handshake(&broker, &leaf).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let body = "grant_type=client_credentials";
    let request = format!(
        "POST /token HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(support::PATIENCE, tls.read_to_end(&mut answer))
        .await
        .expect("no answer to the late request")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("access_token"), "{text}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_closes_at_the_header_timeout() {
    let mut setup = Setup::new();
    setup.extra_server = r#"request_header_timeout = "1s""#.into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("silent"));
    let broker = setup.start().await;
    let mut tls = handshake(&broker, &leaf).await;
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(support::PATIENCE, tls.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server kept a silent connection open");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before request_header_timeout"
    );
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_does_not_wait_for_silent_connections() {
    let mut setup = Setup::new();
    setup.extra_server = "request_header_timeout = \"1h\"\nshutdown_grace = \"30s\"".into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("silent-at-stop"));
    let broker = setup.start().await;
    let mut silent = handshake(&broker, &leaf).await;
    let started = Instant::now();
    broker.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "stop waited {took:?} for a connection that never sent a request"
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(support::PATIENCE, silent.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the silent connection stayed open after the stop"
    );
}
