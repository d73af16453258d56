//! The broker as separate processes: SIGHUP reload, SIGTERM drain, and three replicas behind
//! HAProxy (PROXY v2, shared keys) losing no request while one of them stops.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::fake_google::{Api, FakeGoogle, FakeGoogleConfig, Fault};
use support::{Leaf, LeafSpec, Setup, ISSUER};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker process on its own ports; killed when dropped.
struct Replica {
    child: Child,
    port: u16,
    admin: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    /// Starts `token-broker serve` on a copy of the setup's config with fixed ports.
    async fn start(setup: &Setup, name: &str) -> Replica {
        let (port, admin) = (free_port(), free_port());
        let base = std::fs::read_to_string(setup.path("config.toml")).unwrap();
        let config = base
            .replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{port}\""),
                1,
            )
            .replacen(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{admin}\""),
                1,
            );
        let path = setup.write(&format!("{name}.toml"), &config);
        let log = std::fs::File::create(setup.path(&format!("{name}.log"))).unwrap();
        let child = Command::new(support::binary())
            .args(["--log-format", "json", "-c"])
            .arg(&path)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let replica = Replica { child, port, admin };
        for _ in 0..100 {
            if replica.ready().await == Some(200) {
                return replica;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{name} did not become ready: {}",
            std::fs::read_to_string(setup.path(&format!("{name}.log"))).unwrap_or_default()
        );
    }

    async fn ready(&self) -> Option<u16> {
        reqwest::get(format!("http://127.0.0.1:{}/readyz", self.admin))
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    async fn metric(&self, sample: &str) -> f64 {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        support::metric_value(&text, sample)
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A TLS client trusting the test server CA, presenting `leaf`, from `source_ip`.
fn client(setup: &Setup, leaf: Option<&Leaf>, source_ip: &str) -> reqwest::Client {
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
        // One connection per request, so the load balancer spreads them.
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
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
    setup.extra_server = "shutdown_grace = \"10s\"\nreload_interval = \"0s\"".into();
    setup.google = Some(format!(
        "[google]\nproject_number = \"123456789012\"\npool_id = \"devices\"\nprovider_id = \"token-broker\"\nsts_url = \"{0}\"\niam_credentials_url = \"{0}\"\nmetadata_url = \"{0}\"",
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
    let jwks: Value = client(&setup, None, "127.0.0.1")
        .get(format!("https://localhost:{}/jwks", replica.port))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    fake.set_provider_jwks(jwks);

    // SIGHUP: a reload, counted.
    replica.signal("HUP");
    let mut reloaded = 0.0;
    for _ in 0..50 {
        reloaded = replica
            .metric(r#"token_broker_config_reloads_total{result="ok"}"#)
            .await;
        if reloaded >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reloaded, 1.0, "SIGHUP did not reload");

    // Three slow requests in flight (Google takes 2s), then SIGTERM.
    fake.inject(Api::Sts, Fault::Delay(Duration::from_secs(2)), 3);
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
    for _ in 0..100 {
        if fake.calls(Api::Sts) == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fake.calls(Api::Sts), 3, "the requests are in flight");
    replica.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(
        replica.ready().await,
        Some(503),
        "/readyz fails while draining"
    );
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(
        refused.is_err(),
        "new connections must be refused while draining"
    );
    for task in in_flight {
        let (status, body) = task.await.unwrap().expect("in-flight request completes");
        assert_eq!(status, 200, "{body}");
    }
    let mut replica = replica;
    let status = tokio::task::spawn_blocking(move || replica.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let log = std::fs::read_to_string(setup.path("single.log")).unwrap();
    support::logs::assert_no_secrets(&log, "the drained replica");
}

fn haproxy_config(frontend: u16, replicas: &[&Replica]) -> String {
    let mut config = format!(
        "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 10s\n  timeout server 10s\n  retries 3\n  option redispatch 1\n\
         frontend brokers\n  bind 127.0.0.1:{frontend}\n  default_backend replicas\n\
         backend replicas\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n"
    );
    for (i, replica) in replicas.iter().enumerate() {
        config.push_str(&format!(
            "  server broker{i} 127.0.0.1:{} send-proxy-v2 check port {} inter 300ms fall 1 rise 1\n",
            replica.port, replica.admin
        ));
    }
    config
}

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_behind_haproxy_share_keys_and_survive_a_stop() {
    let haproxy = support::require_tool("haproxy", "haproxy");
    let mut setup = Setup::new();
    // Behind the load balancer: PROXY v2 from it (127.0.0.1); clients come from 127.0.0.2.
    setup.extra_server = "shutdown_grace = \"5s\"\n[server.proxy_protocol]\nmode = \"v2\"\ntrusted_cidrs = [\"127.0.0.1/32\"]".into();
    let leaf = setup.intermediate.leaf(&LeafSpec::device("fleet-1"));
    setup.write_config();
    let replicas = vec![
        Replica::start(&setup, "r0").await,
        Replica::start(&setup, "r1").await,
        Replica::start(&setup, "r2").await,
    ];
    let frontend = free_port();
    let config = setup.write(
        "haproxy.cfg",
        &haproxy_config(frontend, &replicas.iter().collect::<Vec<_>>()),
    );
    let _lb = Haproxy(
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
    wait_for_port(frontend).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Every replica's JWKS, fetched directly (from an untrusted address: no PROXY header).
    let mut key_sets = Vec::new();
    for replica in &replicas {
        let jwks: jsonwebtoken::jwk::JwkSet = client(&setup, None, "127.0.0.2")
            .get(format!("https://localhost:{}/jwks", replica.port))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        key_sets.push(jwks);
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
        let log = std::fs::read_to_string(setup.path(&format!("r{i}.log"))).unwrap();
        support::logs::assert_no_secrets(&log, &format!("replica {i}"));
        assert!(
            log.contains(r#""peer":"127.0.0.2:"#),
            "replica {i} did not log the client address"
        );
    }
}

async fn wait_for_port(port: u16) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}
