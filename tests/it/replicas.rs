//! The broker as separate processes: SIGHUP reload, SIGTERM drain, and three replicas behind
//! HAProxy (PROXY v2, shared keys) losing no request while one of them stops.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::support::fake_google::{Api, FakeGoogle, FakeGoogleConfig, Fault};
use crate::support::process::Process;
use crate::support::{self, Leaf, LeafSpec, Setup, ISSUER};
use serde_json::Value;

/// A broker process on its own ports; killed when dropped.
pub(crate) struct Replica {
    pub(crate) process: Process,
    pub(crate) port: u16,
    pub(crate) admin: u16,
}

impl Replica {
    /// Starts `token-broker serve` on the setup's config. It listens on ports the
    /// system picks (`127.0.0.1:0`), read from its "serving" log line: a port picked here and
    /// freed for the broker could be taken by another process meanwhile.
    pub(crate) async fn start(setup: &Setup, name: &str) -> Replica {
        let config = setup.path("config.toml");
        let config = config.to_str().unwrap();
        let mut process = Process::start(
            &["--log-format", "json", "-c", config, "serve"],
            setup.path(&format!("{name}.log")),
        );
        // Logs are flushed every 100 ms: the line shows up a little after the listeners.
        let serving: Value =
            serde_json::from_str(&process.line("token-broker serving").await).unwrap();
        let port_of = |field: &str| -> u16 {
            let text = serving[field].as_str().unwrap();
            let addr = text.trim_start_matches("Some(").trim_end_matches(')');
            addr.parse::<SocketAddr>().unwrap().port()
        };
        let replica = Replica {
            port: port_of("listen"),
            admin: port_of("admin"),
            process,
        };
        support::wait_until(&format!("{name} to be ready"), || async {
            replica.ready().await == Some(200)
        })
        .await;
        replica
    }

    pub(crate) async fn ready(&self) -> Option<u16> {
        reqwest::get(format!("http://127.0.0.1:{}/readyz", self.admin))
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    pub(crate) async fn metric(&self, sample: &str) -> f64 {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        support::metric_value(&text, sample)
    }

    pub(crate) fn signal(&self, name: &str) {
        self.process.signal(name);
    }

    /// A GET on the TLS listener from `source_ip`, without a client certificate.
    pub(crate) async fn get_json(&self, setup: &Setup, source_ip: &str, path: &str) -> Value {
        support::json_of(
            client(setup, None, source_ip).get(format!("https://localhost:{}{path}", self.port)),
        )
        .await
    }
}

/// A TLS client trusting the test server CA, presenting `leaf`, from `source_ip`, opening
/// one connection per request, so the load balancer spreads them.
fn client(setup: &Setup, leaf: Option<&Leaf>, source_ip: &str) -> reqwest::Client {
    client_builder(setup, leaf, source_ip)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// [`client`] before its connection pooling is chosen.
pub(crate) fn client_builder(
    setup: &Setup,
    leaf: Option<&Leaf>,
    source_ip: &str,
) -> reqwest::ClientBuilder {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(setup.server_ca.der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let tls = match leaf {
        Some(leaf) => builder
            .with_client_auth_cert(leaf.chain(), leaf.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .local_address(source_ip.parse::<std::net::IpAddr>().unwrap())
}

async fn post_token(
    client: &reqwest::Client,
    port: u16,
    form: &str,
) -> Result<(u16, Value), String> {
    let response = client
        .post(format!("https://localhost:{port}/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.to_owned())
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.map_err(|e| e.to_string())?))
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_sigterm_drains_in_flight_requests() {
    let fake = FakeGoogle::start(FakeGoogleConfig::new(ISSUER)).await;
    let mut setup = Setup::new();
    // A grace that outlasts the test's own waiting: the held requests are let go only after
    // the draining has been observed.
    setup.extra_server = "shutdown_grace = \"5m\"\nreload_interval = \"0s\"".into();
    setup.google = Some(format!(
        "[google]\nproject_number = \"123456789012\"\npool_id = \"devices\"\nprovider_id = \"token-broker\"\nsts_url = \"{0}\"\niam_credentials_url = \"{0}\"\nmetadata_url = \"{0}\"\n# Held calls must not time out while the test watches the draining.\nrequest_timeout = \"60s\"\ndeadline = \"5m\"",
        fake.url
    ));
    setup.rules = "[[clients]]\nname = \"devices\"\nmatch = { spiffe = [\"spiffe://test.example/device/*\"] }\nflows = [\"mtls-client-credentials\", \"sts-exchange\"]\nscopes = [\"https://www.googleapis.com/auth/cloud-platform\"]\n".into();
    let leaves: Vec<Leaf> = (0..3)
        .map(|i| {
            setup
                .intermediate
                .leaf(&LeafSpec::device(&format!("slow-{i}")))
        })
        .collect();
    setup.write_config();
    let replica = Replica::start(&setup, "single").await;
    fake.set_provider_jwks(replica.get_json(&setup, "127.0.0.1", "/jwks").await);

    // SIGHUP: a reload, counted.
    replica.signal("HUP");
    let reloads = r#"token_broker_config_reloads_total{result="ok"}"#;
    support::wait_until("SIGHUP to reload", || async {
        replica.metric(reloads).await >= 1.0
    })
    .await;
    assert_eq!(replica.metric(reloads).await, 1.0, "one SIGHUP, one reload");

    // Three slow requests in flight (Google holds them until the test lets go), then SIGTERM.
    fake.inject(Api::Sts, Fault::Hold, 3);
    let setup = Arc::new(setup);
    let port = replica.port;
    let in_flight: Vec<_> = leaves
        .into_iter()
        .map(|leaf| {
            let setup = setup.clone();
            tokio::spawn(async move {
                post_token(
                    &client(&setup, Some(&leaf), "127.0.0.1"),
                    port,
                    "grant_type=client_credentials&scope=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform",
                )
                .await
            })
        })
        .collect();
    support::wait_until("the three requests to be in flight", || async {
        fake.calls(Api::Sts) == 3
    })
    .await;
    replica.signal("TERM");
    // Draining (the requests are still held): /readyz fails, new connections are refused.
    support::wait_until("/readyz to fail while draining", || async {
        replica.ready().await == Some(503)
    })
    .await;
    support::wait_until("new connections to be refused while draining", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    })
    .await;
    assert_eq!(replica.ready().await, Some(503), "still draining");
    assert_eq!(fake.calls(Api::Sts), 3, "no retry of the held calls");
    fake.release();
    for task in in_flight {
        let (status, body) = task.await.unwrap().expect("in-flight request completes");
        assert_eq!(status, 200, "{body}");
    }
    let mut replica = replica;
    let status = tokio::task::spawn_blocking(move || replica.process.wait())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let log = std::fs::read_to_string(setup.path("single.log")).unwrap();
    support::logs::assert_no_secrets(&log, "the drained replica");
}

/// No retries and no redispatch: a connection HAProxy sends to a replica that refuses it
/// fails, so only the replicas' drain (`shutdown_delay` outlasting `inter` x `fall`) keeps
/// clients from seeing a stop.
fn haproxy_config(frontend: u16, stats: &std::path::Path, replicas: &[&Replica]) -> String {
    let mut config = format!(
        "global\n  maxconn 1000\n  stats socket {stats}\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  retries 0\n\
         frontend brokers\n  bind 127.0.0.1:{frontend}\n  default_backend replicas\n\
         backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n",
        stats = stats.display()
    );
    for (i, replica) in replicas.iter().enumerate() {
        config.push_str(&format!(
            "  server broker{i} 127.0.0.1:{} send-proxy-v2 check port {} inter 100ms fall 1 rise 1\n",
            replica.port, replica.admin
        ));
    }
    config
}

pub(crate) struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The status HAProxy gives each server of the backend (`UP`, `DOWN`, ...), from its stats
/// socket; `None` while the socket does not answer.
fn server_statuses(stats: &std::path::Path) -> Option<Vec<String>> {
    use std::io::{Read, Write};
    let mut socket = std::os::unix::net::UnixStream::connect(stats).ok()?;
    socket.write_all(b"show stat\n").ok()?;
    let mut text = String::new();
    socket.read_to_string(&mut text).ok()?;
    let header: Vec<&str> = text
        .lines()
        .next()?
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let status = header.iter().position(|field| *field == "status")?;
    Some(
        text.lines()
            .filter(|line| line.starts_with("replicas,broker"))
            .map(|line| line.split(',').nth(status).unwrap_or_default().to_owned())
            .collect(),
    )
}

/// HAProxy on a free port in front of `replicas`, once its health checks found them all up.
/// A port picked here and freed for HAProxy could be taken meanwhile: HAProxy then exits,
/// and another port is tried.
async fn start_haproxy(setup: &Setup, replicas: &[&Replica]) -> (Haproxy, u16) {
    let haproxy = support::require_tool("haproxy", "haproxy");
    let stats = setup.path("haproxy.sock");
    for _ in 0..5 {
        let frontend = support::free_port();
        let config = setup.write("haproxy.cfg", &haproxy_config(frontend, &stats, replicas));
        let mut lb = Haproxy(
            Command::new(&haproxy)
                .arg("-db")
                .arg("-f")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(setup.path("haproxy.log")).unwrap(),
                ))
                .spawn()
                .unwrap(),
        );
        let deadline = std::time::Instant::now() + support::PATIENCE;
        loop {
            if lb.0.try_wait().unwrap().is_some() {
                break;
            }
            let statuses = server_statuses(&stats);
            if statuses
                .as_ref()
                .is_some_and(|s| s.len() == replicas.len() && s.iter().all(|status| status == "UP"))
            {
                return (lb, frontend);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "HAProxy never saw every replica up: {statuses:?}\n{}",
                std::fs::read_to_string(setup.path("haproxy.log")).unwrap_or_default()
            );
            tokio::time::sleep(support::POLL).await;
        }
    }
    panic!(
        "HAProxy did not start: {}",
        std::fs::read_to_string(setup.path("haproxy.log")).unwrap_or_default()
    );
}

/// Writes the setup's config with PROXY v2 from HAProxy (127.0.0.1; clients come from
/// 127.0.0.2), starts three replicas on it (r0, r1, r2) and HAProxy in front of them.
pub(crate) async fn behind_haproxy(setup: &mut Setup) -> (Vec<Replica>, Haproxy, u16) {
    setup
        .extra_server
        .push_str("\n[server.proxy_protocol]\nmode = \"v2\"\ntrusted_cidrs = [\"127.0.0.1/32\"]");
    setup.write_config();
    let replicas = vec![
        Replica::start(setup, "r0").await,
        Replica::start(setup, "r1").await,
        Replica::start(setup, "r2").await,
    ];
    let (lb, frontend) = start_haproxy(setup, &replicas.iter().collect::<Vec<_>>()).await;
    (replicas, lb, frontend)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_behind_haproxy_share_keys_and_survive_a_stop() {
    let mut setup = Setup::new();
    setup.shutdown_delay = "2s".into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("fleet-1"));
    let (replicas, _lb, frontend) = behind_haproxy(&mut setup).await;

    // Every replica's JWKS, fetched directly (from an untrusted address: no PROXY header).
    let mut key_sets = Vec::new();
    for replica in &replicas {
        let jwks = replica.get_json(&setup, "127.0.0.2", "/jwks").await;
        key_sets.push(serde_json::from_value::<jsonwebtoken::jwk::JwkSet>(jwks).unwrap());
    }

    let through_lb = client(&setup, Some(&leaf), "127.0.0.2");
    let mut failures = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..60 {
        if i == 20 {
            replicas[1].signal("TERM");
        }
        match post_token(&through_lb, frontend, "grant_type=client_credentials").await {
            Ok((200, body)) => tokens.push(body["access_token"].as_str().unwrap().to_owned()),
            other => failures.push(format!("request {i}: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        failures.is_empty(),
        "lost requests: {failures:#?}\nhaproxy: {}",
        std::fs::read_to_string(setup.path("haproxy.log")).unwrap_or_default()
    );

    // Every token verifies against every replica's JWKS.
    for token in &tokens {
        let header = jsonwebtoken::decode_header(token).unwrap();
        for jwks in &key_sets {
            let key = jsonwebtoken::DecodingKey::from_jwk(
                jwks.find(header.kid.as_deref().unwrap()).unwrap(),
            )
            .unwrap();
            let mut validation = jsonwebtoken::Validation::new(header.alg);
            validation.set_audience(&["aud-a"]);
            validation.set_issuer(&[ISSUER]);
            jsonwebtoken::decode::<Value>(token, &key, &validation).unwrap();
        }
    }
    // The load balancer used every replica, and the audit logs carry the real client address.
    for (i, replica) in replicas.iter().enumerate() {
        if i != 1 {
            let issued = replica.metric(r#"token_broker_tokens_issued_total{client="devices",flow="mtls-client-credentials"}"#).await;
            assert!(issued > 0.0, "replica {i} issued nothing");
        }
        // A running replica flushes its log every 100 ms: wait for the line, not a guess.
        let log_path = setup.path(&format!("r{i}.log"));
        let log = || std::fs::read_to_string(&log_path).unwrap();
        support::wait_until(&format!("replica {i} to log the client address"), || {
            let logged = log().contains(r#""peer":"127.0.0.2:"#);
            async move { logged }
        })
        .await;
        support::logs::assert_no_secrets(&log(), &format!("replica {i}"));
    }
}
