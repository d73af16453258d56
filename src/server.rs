//! Listeners and connections: TCP accept, TLS handshake, HTTP/1.1, graceful shutdown.
//!
//! Each connection is one task. Limits that protect the process (connection count,
//! handshake and header timeouts, body size) are enforced here or in hyper, before any
//! request reaches the broker's logic.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::broker::Broker;
use crate::http::{self, ConnInfo};
use crate::tls;

/// How long in-flight requests get to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub struct Server {
    broker: Arc<Broker>,
    listener: TcpListener,
    admin: Option<TcpListener>,
}

impl Server {
    /// Binds the TLS and admin listeners (port 0 picks a free port, as tests do).
    pub async fn bind(broker: Arc<Broker>) -> std::io::Result<Server> {
        let listener = TcpListener::bind(broker.config.server.listen).await?;
        let admin = match broker.config.admin.listen.as_str() {
            "" => None,
            addr => Some(TcpListener::bind(addr).await?),
        };
        Ok(Server {
            broker,
            listener,
            admin,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            broker,
            listener,
            admin,
        } = self;
        let admin_task = admin.map(|l| tokio::spawn(admin::serve(l, broker.metrics.clone())));
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(broker.config.server.max_connections));
        let acceptor = TlsAcceptor::from(broker.tls.clone());
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                broker
                    .metrics
                    .refused_connections
                    .with_label_values(&["max_connections"])
                    .inc();
                drop(stream);
                continue;
            };
            let broker = broker.clone();
            let acceptor = acceptor.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                broker.metrics.open_connections.inc();
                serve_connection(&broker, acceptor, stream, peer, watcher).await;
                broker.metrics.open_connections.dec();
                drop(permit);
            });
        }
        drop(listener);
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing remaining connections");
        }
        if let Some(task) = admin_task {
            task.abort();
        }
    }
}

async fn serve_connection(
    broker: &Arc<Broker>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let _ = stream.set_nodelay(true);
    let config = &broker.config.server;
    let metrics = &broker.metrics;
    let tls = match tokio::time::timeout(config.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            metrics.tls_handshakes.with_label_values(&["error"]).inc();
            match tls::handshake_refusal(&error) {
                Some(refusal) => {
                    metrics
                        .cert_rejections
                        .with_label_values(&[refusal.reason()])
                        .inc();
                    tracing::info!(target: "audit", %peer, result = "refused", reason = refusal.reason(), description = %refusal, "client certificate refused at handshake");
                }
                None => tracing::debug!(%peer, %error, "TLS handshake failed"),
            }
            return;
        }
        Err(_) => {
            metrics.tls_handshakes.with_label_values(&["timeout"]).inc();
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    metrics.tls_handshakes.with_label_values(&["ok"]).inc();
    let client_chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let conn = Arc::new(ConnInfo { peer, client_chain });

    let service_broker = broker.clone();
    let service =
        service_fn(move |request| http::handle(service_broker.clone(), conn.clone(), request));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.request_header_timeout)
        .max_buf_size(64 * 1024);
    let connection = builder.serve_connection(TokioIo::new(tls), service);
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}
