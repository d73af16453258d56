//! Secret hygiene: a credential a client puts in the wrong place is neither sent back nor
//! logged, and the broker's own log (at `trace`) never carries tokens or key bytes. Every
//! other test also checks its brokers' logs (support/logs.rs); this one makes sure that
//! check sees real audit lines and drives the paths that handle secrets.

use crate::support::{self, LeafSpec, Setup};

#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_the_wrong_parameter_are_not_echoed_or_logged() {
    let setup = Setup::new();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("dev-secret"));
    let broker = setup.start().await;

    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap().to_owned();
    // Every token of a key starts with the same header; the signature is this one's own.
    let signature = token.rsplit_once('.').unwrap().1.to_owned();

    // A client pastes its token (or a key) into each parameter the broker reads, into an
    // unknown one, and into the Content-Type header.
    let pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----";
    let pem = form_urlencoded::byte_serialize(pem.as_bytes()).collect::<String>();
    for form in [
        format!("grant_type={token}"),
        format!("grant_type=client_credentials&audience={token}"),
        format!("grant_type=client_credentials&client_id={token}"),
        format!("grant_type=client_credentials&format={token}"),
        format!("grant_type=client_credentials&scope={token}&service_account=sa@p.iam.gserviceaccount.com"),
        format!("grant_type=client_credentials&audience={pem}"),
        format!("grant_type=client_credentials&client_secret={token}"),
        "grant_type=client_credentials&audience=ya29.a0AfH6SMBx".to_owned(),
    ] {
        let (status, body) = broker.token(Some(&leaf), &form).await;
        let text = body.to_string();
        assert!(
            !text.contains(&signature) && !text.contains("ya29.") && !text.contains("MIGHAgEA"),
            "{form}: {status} {text}"
        );
    }
    let response = broker
        .client(Some(&leaf))
        .post(broker.url("/token"))
        .header("content-type", format!("text/plain; token={token}"))
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert!(!response.text().await.unwrap().contains(&signature));

    // The audit lines of all of this are in the captured log, at trace level, and hold no
    // secret (the JWT-shaped checks of the scanner see the token's own header).
    let log = support::logs::captured();
    let decisions = log.matches("token decision").count();
    assert!(decisions >= 9, "{decisions} audit lines:\n{log}");
    assert!(
        !log.contains(&signature),
        "the issued token reached the log"
    );
    support::logs::assert_no_secrets(&log, "the broker");
}
