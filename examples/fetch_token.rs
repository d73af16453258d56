//! A device fetching tokens from the broker over mutual TLS with plain reqwest, then calling
//! a Cloud Run service with a Google-signed ID token.
//!
//! cargo run --example fetch_token -- https://localhost:8443 certs/dev/device.pem \
//!     certs/dev/device-key.pem certs/dev/ca.pem
//!
//! (The `token-broker token` command does the same with caching and AIP-4117 output.)

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, cert, key, ca] = args.as_slice() else {
        return Err("usage: fetch_token BROKER_URL CERT.pem KEY.pem CA.pem".into());
    };
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_file_iter(ca)? {
        roots.add(root?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()?;

    // The broker's own ID token (flow mtls-client-credentials).
    let answer: serde_json::Value = client
        .post(format!("{}/token", url.trim_end_matches('/')))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await?
        .json()
        .await?;
    match answer["access_token"].as_str() {
        Some(token) => println!("token for {} seconds: {token}", answer["expires_in"]),
        None => return Err(format!("refused: {answer}").into()),
    }

    // With Google configured on the broker, the same request with
    //   ("target_audience", "https://my-service-abc.a.run.app"),
    //   ("service_account", "runner@my-project.iam.gserviceaccount.com")
    // returns a Google-signed ID token to send to Cloud Run as `Authorization: Bearer`.
    Ok(())
}
