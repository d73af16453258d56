//! The floor of the broker's stack, for `bench/floor.sh`: what rustls, hyper and tokio cost
//! for a mutual-TLS connection with nothing of the broker on top.
//!
//! The same crypto provider and suite preference as the broker ([`tls::server_provider`],
//! aws-lc-rs), the same certificate chain and TLS versions, and rustls' own full client
//! verifier ([`WebPkiClientVerifier`]) with the same CA bundle and CRLs, so each handshake
//! validates the client's chain inside the handshake, as a plain rustls server does. HTTP/1.1
//! through hyper like the broker; each request is read in full (head and body) and answered
//! `200 ok`.
//!
//! ```sh
//! cargo run --release --example floor -- --listen 127.0.0.1:9443 --cert certs/dev/server.pem \
//!     --key certs/dev/server-key.pem --client-ca certs/dev/ca.pem --crl certs/dev/ca.crl.pem
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use token_broker::tls;

#[derive(Parser, Debug)]
#[command(
    name = "floor",
    about = "bare rustls + hyper mTLS server answering 200 ok"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Client CA bundle (PEM): the roots client chains must lead to.
    #[arg(long)]
    client_ca: PathBuf,
    /// CRL (PEM), repeatable; checked for every certificate of the chain.
    #[arg(long)]
    crl: Vec<PathBuf>,
    /// TLS versions, as `server.tls_versions` takes them.
    #[arg(long, value_delimiter = ',', default_value = "1.2,1.3")]
    tls_versions: Vec<String>,
    /// Runtime worker threads (default: one per CPU, as the broker).
    #[arg(long)]
    threads: Option<usize>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn server_config(args: &Args) -> Result<rustls::ServerConfig, BoxError> {
    let provider = tls::server_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.client_ca)? {
        roots.add(cert?)?;
    }
    let mut crls = Vec::new();
    for path in &args.crl {
        for crl in CertificateRevocationListDer::pem_file_iter(path)? {
            crls.push(crl?);
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()?;
    let chain = CertificateDer::pem_file_iter(&args.cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&args.key)?;
    let versions = tls::protocol_versions(&args.tls_versions)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // As the broker: the server picks the suite (AES-128-GCM first).
    config.ignore_client_order = true;
    Ok(config)
}

/// Reads the whole request, then answers.
async fn answer(
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let body = request.into_body().collect().await?.to_bytes();
    std::hint::black_box(&body);
    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

async fn run(args: Args) -> Result<(), BoxError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&args)?));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("floor: listening on https://{}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait instead of spinning.
                eprintln!("floor: accept: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = hyper::service::service_fn(answer);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn main() {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let result = runtime
        .build()
        .map_err(BoxError::from)
        // The accept loop on a worker thread, as the broker's (`cli::serve`).
        .and_then(|rt| {
            rt.block_on(rt.spawn(run(args)))
                .unwrap_or_else(|join| Err(join.into()))
        });
    if let Err(error) = result {
        eprintln!("floor: {error}");
        std::process::exit(1);
    }
}
