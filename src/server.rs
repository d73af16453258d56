//! Listeners and connections: TCP accept, PROXY v2, TLS handshake, HTTP/1.1, reload and
//! graceful shutdown.
//!
//! The serving state is a [`Live`] broker that a reload replaces whole: every request reads
//! the current one, so a new CRL or rule applies to open connections too, and a broken new
//! config never replaces a working one. Each connection is one task. Limits that protect the
//! process (connection count, PROXY/handshake/header/body timeouts, sizes) apply before any
//! request reaches the broker's logic.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::http::header::CONNECTION;
use ::http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::crl_fetch;
use crate::http::{self, ConnInfo};
use crate::live::Live;
use crate::tls;

pub struct Server {
    live: Arc<Live>,
    listener: TcpListener,
    admin: Option<TcpListener>,
}

impl Server {
    /// Binds the TLS and admin listeners (port 0 picks a free port, as tests do).
    pub async fn bind(live: Arc<Live>) -> std::io::Result<Server> {
        let broker = live.current();
        let listener = TcpListener::bind(broker.config().server.listen).await?;
        let admin = match broker.config().admin.listen.as_str() {
            "" => None,
            addr => Some(TcpListener::bind(addr).await?),
        };
        Ok(Server {
            live,
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

    /// Serves until `shutdown` completes, then drains: `/readyz` fails and answers carry
    /// `Connection: close` at once; new connections are still accepted for `shutdown_delay`
    /// (load balancers notice the failing `/readyz` meanwhile, so none is refused), then the
    /// listener closes and in-flight requests get `shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            live,
            listener,
            admin,
        } = self;
        live.set_listening(true);
        let admin_task = admin.map(|l| tokio::spawn(admin::serve(l, live.clone())));
        let reload_task = tokio::spawn(watch_for_changes(live.clone()));
        let crl_task = {
            let (current, reloading) = (live.clone(), live.clone());
            let requests = live.crl_fetch_requests();
            tokio::spawn(crl_fetch::run(
                move || current.current(),
                move || {
                    let _ = reloading.reload();
                },
                requests,
            ))
        };
        let graceful = GracefulShutdown::new();
        // Connections not yet handed to hyper (see `first_bytes`) close when this turns true.
        let (closing, closing_seen) = watch::channel(false);
        let max_connections = live.current().config().server.max_connections;
        let slots = Arc::new(Semaphore::new(max_connections));
        let stop_accepting = async {
            shutdown.await;
            live.start_draining();
            let delay = live.current().config().server.shutdown_delay;
            tracing::info!(
                delay_seconds = delay.as_secs_f64(),
                "draining: /readyz fails; accepting connections until load balancers notice"
            );
            tokio::time::sleep(delay).await;
        };
        tokio::pin!(stop_accepting);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut stop_accepting => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                live.metrics()
                    .refused_connections
                    .with_label_values(&["max_connections"])
                    .inc();
                drop(stream);
                continue;
            };
            let live = live.clone();
            let watcher = graceful.watcher();
            let closing = closing_seen.clone();
            tokio::spawn(async move {
                let metrics = live.metrics();
                metrics.open_connections.inc();
                serve_connection(live, stream, peer, watcher, closing).await;
                // The slot first: a connection no longer counted as open has freed its slot.
                drop(permit);
                metrics.open_connections.dec();
            });
        }
        drop(listener);
        live.set_listening(false);
        let grace = live.current().config().server.shutdown_grace;
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "draining: listener closed, finishing in-flight requests"
        );
        let _ = closing.send(true);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing remaining connections");
        }
        reload_task.abort();
        crl_task.abort();
        if let Some(task) = admin_task {
            task.abort();
        }
    }
}

async fn serve_connection(
    live: Arc<Live>,
    mut stream: TcpStream,
    socket_peer: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
    closing: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let broker = live.current();
    let metrics = broker.metrics().clone();
    // The PROXY header and handshake futures are boxed and gone once done: the task of an
    // idle connection is sized for its TLS state, not for every step before it.
    let peer = match Box::pin(broker.proxy().accept(&mut stream, socket_peer)).await {
        Ok(client) => client,
        Err(error) => {
            metrics
                .refused_connections
                .with_label_values(&[error.cause()])
                .inc();
            tracing::info!(peer = %socket_peer, %error, "connection dropped");
            return;
        }
    };
    let config = &broker.config().server;
    let acceptor = TlsAcceptor::from(broker.tls());
    let handshake = Box::pin(tokio::time::timeout(
        config.handshake_timeout,
        acceptor.accept(stream),
    ));
    // Bound once: a rebinding (`let mut tls = tls`) would give the task a second slot of
    // the TLS state's size.
    let mut tls = match handshake.await {
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
    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        metrics.tls_resumed_handshakes.inc();
    }
    // One limit for the wait for the first bytes and the request's headers together.
    let header_deadline = tokio::time::Instant::now() + config.request_header_timeout;
    if !first_bytes(&mut tls, header_deadline, closing).await {
        return;
    }
    // Copied out of rustls only now: an idle connection holds its chain once.
    let client_chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let conn = Arc::new(ConnInfo {
        peer,
        client_chain,
        client_identity: Default::default(),
    });

    let service = service_fn(move |request| {
        let (live, conn) = (live.clone(), conn.clone());
        async move {
            // The current broker, not the one the connection started with: reloads apply.
            let mut response = http::handle(live.current(), conn, request).await?;
            if live.is_draining() {
                // The client reconnects, through the load balancer, to a replica that stays.
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_deadline.saturating_duration_since(tokio::time::Instant::now()))
        .max_buf_size(config.max_header_bytes.max(8192));
    // Boxed for the same reason: hyper's connection state exists only once the client sends.
    let connection = Box::pin(watcher.watch(builder.serve_connection(TokioIo::new(tls), service)));
    if let Err(error) = connection.await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Waits until the client has sent something after its handshake (true), or not by
/// `deadline`, or the server closes first (false). Hyper allocates its read and write buffers
/// (8 KiB each) as soon as it is given a connection, so a device that holds its connection
/// before the first request costs only its TLS state meanwhile.
async fn first_bytes(
    tls: &mut TlsStream<TcpStream>,
    deadline: tokio::time::Instant,
    mut closing: watch::Receiver<bool>,
) -> bool {
    let (tcp, session) = tls.get_mut();
    // The request may have come with the client's Finished and already be read by rustls.
    match session.process_new_packets() {
        Ok(state) if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() => return true,
        Ok(_) => {}
        Err(_) => return false,
    }
    tokio::select! {
        ready = tokio::time::timeout_at(deadline, tcp.readable()) => matches!(ready, Ok(Ok(()))),
        _ = closing.wait_for(|closing| *closing) => false,
    }
}

/// Reloads on SIGHUP and when a watched file changes; tidies rate-limiter state.
async fn watch_for_changes(live: Arc<Live>) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = fingerprint(&live.current().watched_files());
    loop {
        let interval = live.current().config().server.reload_interval;
        let tick = async {
            if interval.is_zero() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(interval).await
            }
        };
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = tick => false,
            _ = hup => true,
        };
        let broker = live.current();
        broker.tidy_rate_limits();
        broker.update_gauges();
        let now = fingerprint(&broker.watched_files());
        if forced {
            // Revocation on the operator's schedule: every CRL source is downloaded now,
            // then enforced by the downloader's own reload.
            live.fetch_crls_now();
        }
        if forced || now != seen {
            tracing::info!(signal = forced, "reloading configuration");
            // File reads and parsing stay off the runtime's worker threads.
            let reloading = live.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = reloading.reload();
                // logrotate renames the file, then sends SIGHUP: follow it, whatever the
                // reload's outcome.
                if forced {
                    reloading.reopen_audit_log();
                }
            })
            .await;
            // Remember what was tried, so a broken file is not retried every tick.
            seen = now;
        }
    }
}

/// Modification time and size of every watched file: cheap to compare, and changes when
/// a Kubernetes Secret or ConfigMap swaps its symlinks.
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, Option<(SystemTime, u64)>)> {
    paths
        .iter()
        .map(|p: &PathBuf| (p.clone(), metadata(p)))
        .collect()
}

fn metadata(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
