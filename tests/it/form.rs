//! Form handling at the token endpoint: every malformed request gets the right status and
//! RFC 6749 error code, and the server keeps serving.

use crate::support::{self, LeafSpec, Setup};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_precise_errors() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("former"));
    let broker = setup.start().await;
    let client = broker.client(Some(&leaf));
    const FORM: &str = "application/x-www-form-urlencoded";

    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "missing grant_type",
            FORM,
            b"audience=aud-a".to_vec(),
            400,
            "invalid_request",
        ),
        ("empty body", FORM, Vec::new(), 400, "invalid_request"),
        (
            "wrong grant_type",
            FORM,
            b"grant_type=password".to_vec(),
            400,
            "unsupported_grant_type",
        ),
        (
            "JSON body",
            "application/json",
            br#"{"grant_type":"client_credentials"}"#.to_vec(),
            415,
            "invalid_request",
        ),
        (
            "no content type",
            "",
            b"grant_type=client_credentials".to_vec(),
            415,
            "invalid_request",
        ),
        (
            "repeated grant_type",
            FORM,
            b"grant_type=client_credentials&grant_type=client_credentials".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "repeated audience",
            FORM,
            b"grant_type=client_credentials&audience=aud-a&audience=aud-b".to_vec(),
            400,
            "invalid_request",
        ),
        (
            "client_id mismatch",
            FORM,
            b"grant_type=client_credentials&client_id=someone-else".to_vec(),
            401,
            "invalid_client",
        ),
        (
            "oversized body",
            FORM,
            format!("grant_type=client_credentials&pad={}", "x".repeat(2000)).into_bytes(),
            413,
            "invalid_request",
        ),
        (
            "garbage bytes",
            FORM,
            vec![0xff, 0x00, 0xfe, b'=', b'&', 0x80, b'%', b'%'],
            400,
            "invalid_request",
        ),
        (
            "percent garbage",
            FORM,
            b"%zz=%%&grant_type%=client_credentials".to_vec(),
            400,
            "invalid_request",
        ),
    ];
    for (name, content_type, body, status, code) in cases {
        let mut request = client.post(broker.url("/token")).body(body);
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
        assert_eq!(response.headers()["cache-control"], "no-store", "{name}");
        assert_eq!(response.headers()["pragma"], "no-cache", "{name}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], code, "{name}: {body}");
        let description = body["error_description"].as_str().unwrap();
        assert!(!description.is_empty(), "{name}");
        assert!(
            !description.contains("xxxxxxxx"),
            "{name}: request body echoed"
        );
    }

    // Charset parameter on the media type is fine; unknown parameters are ignored.
    let response = client
        .post(broker.url("/token"))
        .header(
            "content-type",
            "application/x-www-form-urlencoded; charset=UTF-8",
        )
        .body("grant_type=client_credentials&client_id=devices&unknown=1&scope=")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_oversized_body_and_broken_http_do_not_hurt_the_server() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("chunky"));
    let broker = setup.start().await;

    let config = broker.tls_config(Some(&leaf), rustls::DEFAULT_VERSIONS);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let exchange = |bytes: Vec<u8>| {
        let connector = connector.clone();
        let addr = broker.addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut tls = connector
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap();
            tls.write_all(&bytes).await.unwrap();
            let mut answer = Vec::new();
            let _ = tls.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer).into_owned()
        }
    };

    // Oversized without Content-Length (chunked): the limit still applies.
    let chunk = "a".repeat(700);
    let chunked = format!(
        "POST /token HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n2bc\r\n{chunk}\r\n2bc\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = exchange(chunked.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Garbage instead of HTTP: a 4xx or a closed connection, nothing else happens.
    for garbage in [
        &b"\x00\x01\x02 NOT HTTP\r\n\r\n"[..],
        b"POST /token HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /token HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
    ] {
        let answer = exchange(garbage.to_vec()).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
    }

    // Plain HTTP to the TLS port: refused at the handshake.
    let plain = reqwest::get(format!("http://{}/token", broker.addr)).await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);

    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "still serving: {body}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_bodies_time_out() {
    let mut setup = Setup::new();
    setup.extra_server = r#"request_header_timeout = "1s""#.into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("staller"));
    let broker = setup.start().await;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        broker.tls_config(Some(&leaf), rustls::DEFAULT_VERSIONS),
    ));
    let tcp = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let head = "POST /token HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant_type=";
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(support::PATIENCE, tls.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server kept waiting for the body");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");

    // 405 on the token endpoint carries its cache headers too.
    let response = broker
        .client(None)
        .get(broker.url("/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["cache-control"], "no-store");
    broker.stop().await;
}
