//! Load generator for `bench/run.sh`: mutual-TLS HTTP/1.1 requests against the broker (or any
//! HTTPS server, e.g. the nginx reference), one JSON line of results on stdout.
//!
//! ```sh
//! cargo run --release --example loadgen -- --addr 127.0.0.1:8443 --ca certs/dev/ca.pem \
//!     --cert certs/dev/device.pem --key certs/dev/device-key.pem \
//!     --mode new-conn --concurrency 32 --duration 10
//! ```
//!
//! Modes:
//! - `new-conn`: per request a new TCP connection, a full TLS handshake (no resumption) with
//!   the client certificate, one `POST`, then close_notify and close. With `--resume`, each
//!   worker is a device reconnecting: it resumes the TLS session of its previous connection
//!   from a session store of its own. With `--addr2`, connections alternate between two
//!   servers (two replicas sharing ticket keys). The JSON line counts `resumed_handshakes`.
//! - `keep-alive`: one persistent connection per worker, requests back to back.
//! - `idle`: open `--connections` connections, complete the handshakes (and with
//!   `--idle-request` one request each), print the JSON line, then hold them until SIGTERM,
//!   SIGINT or `--duration` seconds.
//!
//! Without `--rate` the workers run closed-loop (maximum throughput). With `--rate R` the
//! workers together send R requests/s on a fixed schedule (each worker R/concurrency, evenly
//! staggered); a request's latency counts from its scheduled time when the worker was behind
//! schedule (so server stalls are not hidden: no coordinated omission), and from the actual
//! send time otherwise (so the 1 ms timer granularity does not add to every sample).
//!
//! With `--devices FILE` (a PEM bundle, each device's certificate followed by its key, as
//! `examples/bench_devices.rs` writes it) every new connection presents another device: the
//! next one of a random permutation (`--device-seed`, from position `--device-start`), so a
//! run of fewer connections than devices has every device once; the JSON line says where
//! the permutation stopped, for the next run to go on from there.
//!
//! HTTP/1.1 is written by hand: request with Content-Length, response parsed for its status
//! line and Content-Length (chunked answers are an error). Non-200 answers count as errors.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::pem::SectionKind;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Mode {
    NewConn,
    KeepAlive,
    Idle,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Kx {
    /// X25519, then P-256 (what OpenSSL/nginx pick by default; like-for-like comparisons).
    /// P-256 is listed because OpenSSL's TLS 1.2 refuses a P-256 server certificate to a
    /// client whose supported groups lack it; X25519 is still the one negotiated.
    X25519,
    /// secp256r1 only.
    P256,
    /// The post-quantum hybrid first, then X25519 and P-256 (what PQ-preferring clients send).
    X25519mlkem768,
    /// This rustls build's default list (X25519, P-256, P-384, then X25519MLKEM768 unless
    /// the `prefer-post-quantum` feature puts it first).
    Default,
}

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "mTLS HTTP/1.1 load generator (one JSON line out)"
)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    /// A second server: connections alternate between --addr and this one.
    #[arg(long)]
    addr2: Option<SocketAddr>,
    /// Resume TLS sessions across new connections, each worker as one device reconnecting.
    #[arg(long)]
    resume: bool,
    /// TLS server name (SNI and certificate check) and Host header.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA certificate(s) to trust for the server (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Client certificate chain (PEM). Without it no client certificate is presented.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Many devices: a PEM bundle of certificates each followed by its PKCS#8 key; each new
    /// connection presents the next device of a random permutation (instead of --cert).
    #[arg(long, conflicts_with = "cert")]
    devices: Option<PathBuf>,
    /// Seed of the devices' permutation (the same seed gives the same order).
    #[arg(long, default_value_t = 1)]
    device_seed: u64,
    /// Position in the permutation of the first connection's device.
    #[arg(long, default_value_t = 0)]
    device_start: usize,
    #[arg(long, value_enum, default_value_t = Mode::KeepAlive)]
    mode: Mode,
    /// Concurrent workers (connections in keep-alive mode; parallel openers in idle mode).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds of load (idle mode: longest hold).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Fixed total request rate (requests/s) instead of closed-loop maximum throughput.
    #[arg(long)]
    rate: Option<f64>,
    /// Idle mode: connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Idle mode: send one request on each connection before holding it.
    #[arg(long)]
    idle_request: bool,
    /// Use TLS 1.2 (default: TLS 1.3).
    #[arg(long)]
    tls12: bool,
    /// Key exchange groups offered.
    #[arg(long, value_enum, default_value_t = Kx::X25519)]
    kx: Kx,
    #[arg(long, default_value = "POST")]
    method: String,
    #[arg(long, default_value = "/token")]
    path: String,
    /// Request body (form-encoded); empty for none.
    #[arg(long, default_value = "grant_type=client_credentials")]
    body: String,
    /// Per-request (and per-handshake) timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Spread connections over this many loopback source addresses (127.0.0.1, .2, ...), so
    /// more connections than the ephemeral port range can be open to one server address.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    source_ips: u8,
    /// Free-form label copied into the JSON line.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.build().expect("tokio runtime");
    let result = runtime.block_on(run(args));
    match result {
        Ok(line) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        Err(error) => {
            eprintln!("loadgen: {error}");
            std::process::exit(1);
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Target {
    addrs: Vec<SocketAddr>,
    /// Connections opened so far: picks the next address, round robin.
    opened: std::sync::atomic::AtomicUsize,
    resumed: std::sync::atomic::AtomicU64,
    name: ServerName<'static>,
    connector: TlsConnector,
    /// `--resume`: each worker reconnects as one device ([`Returning`]).
    resume: bool,
    devices: Option<Devices>,
    request: Vec<u8>,
    timeout: Duration,
    source_ips: u8,
    next_source: std::sync::atomic::AtomicUsize,
}

fn tls_config(args: &Args) -> Result<rustls::ClientConfig, BoxError> {
    use rustls::crypto::aws_lc_rs::{self, kx_group};
    let mut provider = aws_lc_rs::default_provider();
    match args.kx {
        Kx::X25519 => provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1],
        Kx::P256 => provider.kx_groups = vec![kx_group::SECP256R1],
        Kx::X25519mlkem768 => {
            provider.kx_groups = vec![
                kx_group::X25519MLKEM768,
                kx_group::X25519,
                kx_group::SECP256R1,
            ]
        }
        Kx::Default => {}
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.ca)? {
        roots.add(cert?)?;
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = if args.tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)?
        .with_root_certificates(roots);
    let mut config = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    if !args.resume {
        // Every new connection is a full handshake.
        config.resumption = rustls::client::Resumption::disabled();
    }
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Device certificates and keys (DER), presented one per connection in a random order.
struct Devices {
    base: Arc<rustls::ClientConfig>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    certs: Vec<CertificateDer<'static>>,
    keys: Vec<PrivatePkcs8KeyDer<'static>>,
    order: Vec<u32>,
    start: usize,
    next: AtomicUsize,
}

/// The one device a connection presents.
#[derive(Debug)]
struct OneDevice(Arc<CertifiedKey>);

impl ResolvesClientCert for OneDevice {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl Devices {
    fn load(
        path: &std::path::Path,
        base: rustls::ClientConfig,
        seed: u64,
        start: usize,
    ) -> Result<Self, BoxError> {
        let pem = std::fs::read(path)?;
        let mut rest = pem.as_slice();
        let (mut certs, mut keys) = (Vec::new(), Vec::new());
        while let Some((kind, der)) = rustls_pki_types::pem::from_buf(&mut rest)? {
            match kind {
                SectionKind::Certificate => certs.push(CertificateDer::from(der)),
                SectionKind::PrivateKey => keys.push(PrivatePkcs8KeyDer::from(der)),
                _ => {
                    return Err(
                        format!("{}: unexpected PEM section {kind:?}", path.display()).into(),
                    )
                }
            }
        }
        if certs.is_empty() || certs.len() != keys.len() {
            return Err(format!(
                "{}: {} certificates and {} keys; want one key after each certificate",
                path.display(),
                certs.len(),
                keys.len()
            )
            .into());
        }
        let mut order: Vec<u32> = (0..certs.len() as u32).collect();
        fastrand::Rng::with_seed(seed).shuffle(&mut order);
        Ok(Devices {
            provider: base.crypto_provider().clone(),
            base: Arc::new(base),
            certs,
            keys,
            order,
            start,
            next: AtomicUsize::new(start),
        })
    }

    /// A connector presenting the next device (its key parsed now, on the client's time).
    fn next_connector(&self) -> Result<TlsConnector, Failure> {
        let position = self.next.fetch_add(1, Ordering::Relaxed);
        let index = self.order[position % self.order.len()] as usize;
        let key = self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(self.keys[index].clone_key()))
            .map_err(|_| Failure::Malformed("device key not loadable"))?;
        let certified = CertifiedKey::new(vec![self.certs[index].clone()], key);
        let mut config = rustls::ClientConfig::clone(&self.base);
        config.client_auth_cert_resolver = Arc::new(OneDevice(Arc::new(certified)));
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

fn build_request(args: &Args) -> Vec<u8> {
    let host = if args.addr.port() == 443 {
        args.server_name.clone()
    } else {
        format!("{}:{}", args.server_name, args.addr.port())
    };
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: token-broker-loadgen\r\nAccept: */*\r\n",
        args.method, args.path
    );
    if !args.body.is_empty() || args.method == "POST" {
        request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        request.push_str(&format!("Content-Length: {}\r\n", args.body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(args.body.as_bytes());
    bytes
}

/// Why a request failed; bounded set of labels for the JSON report.
#[derive(Debug)]
enum Failure {
    Connect(std::io::Error),
    Handshake(std::io::Error),
    Io(std::io::Error),
    Closed,
    Malformed(&'static str),
    Timeout,
    Status(u16),
}

impl Failure {
    fn label(&self) -> String {
        match self {
            Failure::Connect(_) => "connect".into(),
            Failure::Handshake(_) => "tls_handshake".into(),
            Failure::Io(_) => "io".into(),
            Failure::Closed => "closed_by_server".into(),
            Failure::Malformed(_) => "malformed_response".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Status(code) => format!("status_{code}"),
        }
    }
    fn detail(&self) -> String {
        match self {
            Failure::Connect(e) | Failure::Handshake(e) | Failure::Io(e) => e.to_string(),
            Failure::Malformed(what) => (*what).to_string(),
            other => other.label(),
        }
    }
}

struct Response {
    status: u16,
    close: bool,
}

/// A worker under `--resume`: one device reconnecting, with a session store of its own (a
/// shared store keeps at most 8 TLS 1.3 tickets, fewer than 32 workers in flight take) and
/// its own turn between the addresses, so with `--addr2` each resumption opens a ticket the
/// other server issued.
struct Returning {
    connector: TlsConnector,
    opened: usize,
}

impl Target {
    fn returning(&self) -> Option<Returning> {
        self.resume.then(|| {
            let mut config = rustls::ClientConfig::clone(self.connector.config());
            config.resumption = rustls::client::Resumption::in_memory_sessions(16);
            Returning {
                connector: TlsConnector::from(Arc::new(config)),
                opened: 0,
            }
        })
    }
}

/// Opens a connection to the next address (the worker's own turn when it is `returning`).
async fn connect(
    target: &Target,
    mut returning: Option<&mut Returning>,
) -> Result<TlsStream<TcpStream>, Failure> {
    use std::sync::atomic::Ordering::Relaxed;
    let turn = match &mut returning {
        Some(device) => {
            device.opened += 1;
            device.opened - 1
        }
        None => target.opened.fetch_add(1, Relaxed),
    };
    let addr = target.addrs[turn % target.addrs.len()];
    let tcp = if target.source_ips > 1 {
        let n = target.next_source.fetch_add(1, Relaxed);
        let host = (n % usize::from(target.source_ips)) as u8 + 1;
        let socket = tokio::net::TcpSocket::new_v4().map_err(Failure::Connect)?;
        socket
            .bind(SocketAddr::from(([127, 0, 0, host], 0)))
            .map_err(Failure::Connect)?;
        socket.connect(addr).await
    } else {
        TcpStream::connect(addr).await
    }
    .map_err(Failure::Connect)?;
    let _ = tcp.set_nodelay(true);
    let connector = match (&target.devices, returning) {
        (Some(devices), _) => &devices.next_connector()?,
        (None, Some(device)) => &device.connector,
        (None, None) => &target.connector,
    };
    let tls = connector
        .connect(target.name.clone(), tcp)
        .await
        .map_err(Failure::Handshake)?;
    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        target.resumed.fetch_add(1, Relaxed);
    }
    Ok(tls)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response (status line, headers, Content-Length body) from `stream`; bytes beyond
/// it stay in `buf`.
async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Response, Failure> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])
                .map_err(|_| Failure::Malformed("non-UTF-8 head"))?;
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or_default();
            if !version.starts_with("HTTP/1.") {
                return Err(Failure::Malformed("not an HTTP/1.x status line"));
            }
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or(Failure::Malformed("bad status code"))?;
            let mut length = None;
            let mut close = version == "HTTP/1.0";
            for line in lines {
                let Some((name, value)) = line.split_once(':') else {
                    continue;
                };
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(
                        value
                            .parse::<usize>()
                            .map_err(|_| Failure::Malformed("bad Content-Length"))?,
                    );
                } else if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(Failure::Malformed("chunked answers are not supported"));
                }
            }
            let length = length.ok_or(Failure::Malformed("no Content-Length"))?;
            let total = end + 4 + length;
            while buf.len() < total {
                read_more(stream, buf).await?;
            }
            buf.drain(..total);
            return Ok(Response { status, close });
        }
        if buf.len() > 1 << 20 {
            return Err(Failure::Malformed("response head over 1 MiB"));
        }
        read_more(stream, buf).await?;
    }
}

async fn read_more<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Result<(), Failure> {
    buf.reserve(16 * 1024);
    match stream.read_buf(buf).await {
        Ok(0) => Err(Failure::Closed),
        Ok(_) => Ok(()),
        Err(e) => Err(Failure::Io(e)),
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Response, Failure> {
    stream.write_all(request).await.map_err(Failure::Io)?;
    stream.flush().await.map_err(Failure::Io)?;
    read_response(stream, buf).await
}

/// Connect, handshake, one request, close_notify, close.
async fn one_new_conn(target: &Target, returning: Option<&mut Returning>) -> Result<(), Failure> {
    let mut tls = connect(target, returning).await?;
    let mut buf = Vec::with_capacity(4096);
    let response = exchange(&mut tls, &target.request, &mut buf).await?;
    let _ = tls.shutdown().await;
    if response.status != 200 {
        return Err(Failure::Status(response.status));
    }
    Ok(())
}

/// A worker's persistent connection, reopened when the server closes it.
struct KeepAlive {
    stream: Option<TlsStream<TcpStream>>,
    buf: Vec<u8>,
    opened: u64,
}

impl KeepAlive {
    async fn request(&mut self, target: &Target) -> Result<(), Failure> {
        if self.stream.is_none() {
            self.stream = Some(connect(target, None).await?);
            self.buf.clear();
            self.opened += 1;
        }
        let stream = self.stream.as_mut().expect("connected above");
        let result = exchange(stream, &target.request, &mut self.buf).await;
        match result {
            Ok(response) => {
                if response.close {
                    self.stream = None;
                }
                if response.status != 200 {
                    return Err(Failure::Status(response.status));
                }
                Ok(())
            }
            Err(failure) => {
                self.stream = None;
                Err(failure)
            }
        }
    }
}

#[derive(Default)]
struct WorkerStats {
    latencies_us: Vec<u32>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    connections: u64,
    late: u64,
}

impl WorkerStats {
    fn record(&mut self, started: Instant, result: Result<(), Failure>) {
        let micros = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
        match result {
            Ok(()) => {
                self.ok += 1;
                self.latencies_us.push(micros);
            }
            Err(failure) => {
                *self.errors.entry(failure.label()).or_default() += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(failure.detail());
                }
            }
        }
    }
}

async fn timed<F: std::future::Future<Output = Result<(), Failure>>>(
    limit: Duration,
    f: F,
) -> Result<(), Failure> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

/// What every worker shares: where, how, and when.
struct Plan {
    target: Arc<Target>,
    mode: Mode,
    workers: usize,
    rate: Option<f64>,
    start: Instant,
    deadline: Instant,
}

async fn worker(plan: Arc<Plan>, index: usize, mut conn: KeepAlive) -> WorkerStats {
    let Plan {
        ref target,
        mode,
        workers,
        rate,
        start,
        deadline,
    } = *plan;
    let mut stats = WorkerStats::default();
    let interval = rate.map(|r| Duration::from_secs_f64(workers as f64 / r));
    let offset = rate.map(|r| Duration::from_secs_f64(index as f64 / r));
    let mut sequence: u32 = 0;
    let mut previous_end = start;
    let mut returning = target.returning();
    loop {
        let started = match (interval, offset) {
            (Some(interval), Some(offset)) => {
                let scheduled = start + offset + interval * sequence;
                sequence += 1;
                if scheduled >= deadline {
                    break;
                }
                if previous_end > scheduled {
                    // Behind schedule: the wait counts (no coordinated omission).
                    stats.late += 1;
                    scheduled
                } else {
                    tokio::time::sleep_until(scheduled.into()).await;
                    Instant::now()
                }
            }
            _ => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                now
            }
        };
        let result = match mode {
            Mode::NewConn => {
                stats.connections += 1;
                timed(target.timeout, one_new_conn(target, returning.as_mut())).await
            }
            _ => {
                let result = timed(target.timeout, conn.request(target)).await;
                if matches!(result, Err(Failure::Timeout)) {
                    conn.stream = None;
                }
                result
            }
        };
        let failed = result.is_err();
        stats.record(started, result);
        previous_end = Instant::now();
        if failed && rate.is_none() {
            // Do not spin on a refusing server.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stats.connections += conn.opened;
    if let Some(mut stream) = conn.stream.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    }
    stats
}

/// This process's CPU time (user + system, all threads) from /proc/self/stat, in seconds;
/// lets the caller tell the load generator's share of the machine from others'.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ: /proc reports in 1/100 s on Linux.
    Some(ticks as f64 / 100.0)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

fn tls_description(stream: &TlsStream<TcpStream>) -> serde_json::Value {
    let (_, conn) = stream.get_ref();
    json!({
        "version": conn.protocol_version().map(|v| format!("{v:?}")),
        "cipher_suite": conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())),
        "kx_group": conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())),
    })
}

async fn run(args: Args) -> Result<serde_json::Value, BoxError> {
    let config = tls_config(&args)?;
    let devices = match &args.devices {
        Some(path) => Some(Devices::load(
            path,
            config.clone(),
            args.device_seed,
            args.device_start,
        )?),
        None => None,
    };
    let target = Arc::new(Target {
        addrs: std::iter::once(args.addr).chain(args.addr2).collect(),
        opened: Default::default(),
        resumed: Default::default(),
        name: ServerName::try_from(args.server_name.clone())?,
        connector: TlsConnector::from(Arc::new(config)),
        resume: args.resume,
        devices,
        request: build_request(&args),
        timeout: Duration::from_secs_f64(args.timeout),
        source_ips: args.source_ips,
        next_source: std::sync::atomic::AtomicUsize::new(0),
    });
    // One probe connection: fails fast with a clear message if the server is not reachable,
    // and tells what TLS was negotiated.
    let probe = connect(&target, None)
        .await
        .map_err(|f| format!("probe connection to {}: {}", args.addr, f.detail()))?;
    let tls = tls_description(&probe);
    drop(probe);

    let common = json!({
        "label": args.label,
        "mode": format!("{:?}", args.mode),
        "addr": args.addr.to_string(),
        "tls": tls,
        "client_cert": args.cert.is_some() || args.devices.is_some(),
    });
    let line = match args.mode {
        Mode::Idle => idle(&args, target.clone(), common).await?,
        mode => merge(load(&args, mode, target.clone()).await?, &common),
    };
    Ok(match &target.devices {
        Some(devices) => merge(
            line,
            &json!({"devices": {
                "count": devices.order.len(),
                "seed": args.device_seed,
                "start": devices.start,
                "next": devices.next.load(Ordering::Relaxed),
            }}),
        ),
        None => line,
    })
}

fn merge(mut line: serde_json::Value, common: &serde_json::Value) -> serde_json::Value {
    if let (Some(line), Some(common)) = (line.as_object_mut(), common.as_object()) {
        for (k, v) in common {
            line.insert(k.clone(), v.clone());
        }
    }
    line
}

async fn load(args: &Args, mode: Mode, target: Arc<Target>) -> Result<serde_json::Value, BoxError> {
    let workers = args.concurrency.max(1);
    // Keep-alive connections are opened before the clock starts.
    let mut conns = Vec::with_capacity(workers);
    let mut setup_errors = 0u64;
    for _ in 0..workers {
        let mut conn = KeepAlive {
            stream: None,
            buf: Vec::with_capacity(4096),
            opened: 0,
        };
        if mode == Mode::KeepAlive {
            match connect(&target, None).await {
                Ok(stream) => {
                    conn.stream = Some(stream);
                    conn.opened = 1;
                }
                Err(_) => setup_errors += 1,
            }
        }
        conns.push(conn);
    }
    let resumed_before = target.resumed.load(std::sync::atomic::Ordering::Relaxed);
    let cpu_before = process_cpu_seconds();
    let start = Instant::now() + Duration::from_millis(20);
    let deadline = start + Duration::from_secs_f64(args.duration);
    let plan = Arc::new(Plan {
        target: target.clone(),
        mode,
        workers,
        rate: args.rate,
        start,
        deadline,
    });
    let mut tasks = Vec::with_capacity(workers);
    for (index, conn) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(worker(plan.clone(), index, conn)));
    }
    tokio::time::sleep_until(start.into()).await;
    let mut latencies = Vec::new();
    let (mut ok, mut connections, mut late) = (0u64, 0u64, 0u64);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_error = None;
    for task in tasks {
        let stats = task.await?;
        ok += stats.ok;
        connections += stats.connections;
        late += stats.late;
        latencies.extend(stats.latencies_us);
        for (k, v) in stats.errors {
            *errors.entry(k).or_default() += v;
        }
        if first_error.is_none() {
            first_error = stats.first_error;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_now = process_cpu_seconds();
    let client_cpu = match (cpu_before, cpu_now) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    latencies.sort_unstable();
    let error_count: u64 = errors.values().sum();
    let mean = if latencies.is_empty() {
        0.0
    } else {
        latencies.iter().map(|&l| l as f64).sum::<f64>() / latencies.len() as f64 / 1000.0
    };
    Ok(json!({
        "concurrency": workers,
        "duration_s": args.duration,
        "elapsed_s": elapsed,
        "target_rate": args.rate,
        "requests": ok + error_count,
        "ok": ok,
        "errors": error_count,
        "error_kinds": errors,
        "first_error": first_error,
        "setup_errors": setup_errors,
        "connections_opened": connections,
        "resumed_handshakes": target.resumed.load(std::sync::atomic::Ordering::Relaxed) - resumed_before,
        "late_starts": late,
        "client_cpu_s": client_cpu,
        "client_process_cpu_s": cpu_now,
        "rps": ok as f64 / elapsed,
        "latency_ms": {
            "p50": percentile(&latencies, 0.50),
            "p90": percentile(&latencies, 0.90),
            "p99": percentile(&latencies, 0.99),
            "p999": percentile(&latencies, 0.999),
            "max": percentile(&latencies, 1.0),
            "mean": mean,
        },
    }))
}

async fn idle(
    args: &Args,
    target: Arc<Target>,
    common: serde_json::Value,
) -> Result<serde_json::Value, BoxError> {
    let started = Instant::now();
    let openers = args.concurrency.max(1);
    let per = args.connections.div_ceil(openers);
    let mut tasks = Vec::new();
    for i in 0..openers {
        let count = per.min(args.connections.saturating_sub(i * per));
        let target = target.clone();
        let with_request = args.idle_request;
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(count);
            let mut failures: BTreeMap<String, u64> = BTreeMap::new();
            let mut first_error = None;
            for _ in 0..count {
                let opened = timed(target.timeout, async {
                    let mut stream = connect(&target, None).await?;
                    if with_request {
                        let mut buf = Vec::new();
                        let response = exchange(&mut stream, &target.request, &mut buf).await?;
                        if response.status != 200 {
                            return Err(Failure::Status(response.status));
                        }
                    }
                    held.push(stream);
                    Ok(())
                })
                .await;
                if let Err(failure) = opened {
                    *failures.entry(failure.label()).or_default() += 1;
                    first_error.get_or_insert_with(|| failure.detail());
                }
            }
            (held, failures, first_error)
        }));
    }
    let mut held = Vec::with_capacity(args.connections);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_error = None;
    for task in tasks {
        let (streams, failures, first) = task.await?;
        held.extend(streams);
        for (k, v) in failures {
            *errors.entry(k).or_default() += v;
        }
        if first_error.is_none() {
            first_error = first;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let error_count: u64 = errors.values().sum();
    let line = merge(
        json!({
        "connections": args.connections,
        "established": held.len(),
        "errors": error_count,
        "error_kinds": errors,
        "first_error": first_error,
        "idle_request": args.idle_request,
        "open_s": elapsed,
        "handshakes_per_s": held.len() as f64 / elapsed,
        }),
        &common,
    );
    // Report now (the caller samples the server's memory while we hold), then hold.
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    let hold = Duration::from_secs_f64(args.duration);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::time::sleep(hold) => {},
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    }
    #[cfg(not(unix))]
    {
        tokio::select! {
            _ = tokio::time::sleep(hold) => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    }
    drop(held);
    std::process::exit(0);
}
