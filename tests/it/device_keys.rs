//! Device keys in hardware and certificate renewal on the device. The `token` and `agent`
//! binaries sign their TLS handshakes with keys generated inside SoftHSM2 (they never exist
//! outside it), through the PKCS#11 module directly or p11-kit's proxy, against a real broker
//! whose Google is the in-process fake; every failure names its fix. A running agent picks up
//! a renewed certificate and key (files, or objects in the token) for its next broker
//! request.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use serde_json::Value;
use sha2::Digest;

use crate::support::fake_google::{FakeGoogle, FakeGoogleConfig};
use crate::support::process::Process;
use crate::support::{self, Leaf, LeafSpec, Setup, TestBroker, ISSUER};

const RUNNER: &str = "runner@fake-project.iam.gserviceaccount.com";
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const READ_ONLY: &str = "https://www.googleapis.com/auth/devstorage.read_only";
const PIN: &str = "246810";
const SO_PIN: &str = "13579111";
pub(crate) const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub(crate) const P11_KIT_PROXY: &str = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so";
/// OpenSC's logging PKCS#11 module: it passes every call to the module named by
/// `PKCS11SPY` and writes each to the file named by `PKCS11SPY_OUTPUT`.
const PKCS11_SPY: &str = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so";

/// A broker allowing its own ID tokens (`token`) and impersonation (`agent`) for devices.
async fn start_broker() -> (FakeGoogle, TestBroker) {
    let fake = FakeGoogle::start(FakeGoogleConfig::new(ISSUER)).await;
    let mut setup = Setup::new();
    setup.google = Some(fake.config_section());
    setup.rules = format!(
        "[[clients]]\nname = \"devices\"\nmatch = {{ spiffe = [\"spiffe://test.example/device/*\"] }}\naudiences = [\"aud-a\"]\n\
         flows = [\"mtls-client-credentials\", \"impersonate\"]\nscopes = [\"{CLOUD_PLATFORM}\", \"{READ_ONLY}\"]\n\
         service_accounts = [\"{RUNNER}\"]\n"
    );
    let broker = setup.start().await;
    fake.set_provider_jwks(broker.get_json("/jwks").await);
    (fake, broker)
}

/// A SoftHSM2 token of its own (configuration and token folder in a temporary folder),
/// labelled `device`, user PIN [`PIN`].
pub(crate) struct SoftHsm {
    dir: tempfile::TempDir,
}

impl SoftHsm {
    pub(crate) fn new() -> SoftHsm {
        support::require_tool("softhsm2-util", "softhsm2");
        support::require_tool("pkcs11-tool", "opensc");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let hsm = SoftHsm { dir };
        hsm.init_token(PIN);
        hsm
    }

    /// Token `device`, with this user PIN, in the first free slot.
    fn init_token(&self, pin: &str) {
        self.run(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                "device",
                "--pin",
                pin,
                "--so-pin",
                SO_PIN,
            ],
        );
    }

    /// Token `device` deleted (as when a card is pulled, or a TPM store wiped).
    fn delete_token(&self) {
        self.run("softhsm2-util", &["--delete-token", "--token", "device"]);
    }

    /// `leaf`'s key imported into token `device` under `pin`, with its certificate: the
    /// same objects each time (a key made in the token could not be made again).
    fn import(&self, leaf: &Leaf, pin: &str) {
        let key_file = self.dir.path().join("import-key.pem");
        std::fs::write(&key_file, &leaf.key_pem).unwrap();
        self.run(
            "softhsm2-util",
            &[
                "--import",
                key_file.to_str().unwrap(),
                "--token",
                "device",
                "--label",
                "device",
                "--id",
                "01",
                "--pin",
                pin,
            ],
        );
        std::fs::remove_file(&key_file).unwrap();
        let cert_file = self.dir.path().join("import-cert.der");
        std::fs::write(&cert_file, &leaf.der).unwrap();
        self.run(
            "pkcs11-tool",
            &[
                "--module",
                SOFTHSM_MODULE,
                "--login",
                "--pin",
                pin,
                "--write-object",
                cert_file.to_str().unwrap(),
                "--type",
                "cert",
                "--label",
                "device",
                "--id",
                "01",
            ],
        );
    }

    /// What every process using this token needs in its environment. p11-kit's proxy also
    /// loads tpm2-pkcs11, whose store is kept here rather than in the user's home.
    pub(crate) fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("SOFTHSM2_CONF", self.dir.path().join("softhsm2.conf")),
            ("TPM2_PKCS11_STORE", self.dir.path().to_owned()),
        ]
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        support::run_checked(program, args, self.env())
    }

    fn pkcs11_tool(&self, args: &[&str]) -> Output {
        let mut all = vec!["--module", SOFTHSM_MODULE, "--login", "--pin", PIN];
        all.extend_from_slice(args);
        self.run("pkcs11-tool", &all)
    }

    /// A key pair made inside the token (`EC:prime256v1`, `rsa:2048`, ...); returns the
    /// public key (DER SubjectPublicKeyInfo). The private key is never extractable.
    pub(crate) fn generate(&self, key_type: &str, label: &str, id: &str) -> Vec<u8> {
        self.pkcs11_tool(&[
            "--keypairgen",
            "--key-type",
            key_type,
            "--label",
            label,
            "--id",
            id,
        ]);
        let public = self.dir.path().join(format!("public-{id}.der"));
        self.pkcs11_tool(&[
            "--read-object",
            "--type",
            "pubkey",
            "--id",
            id,
            "-o",
            public.to_str().unwrap(),
        ]);
        std::fs::read(public).unwrap()
    }

    fn store_certificate(&self, leaf: &Leaf, label: &str, id: &str) {
        let file = self.dir.path().join(format!("cert-{id}.der"));
        std::fs::write(&file, &leaf.der).unwrap();
        self.pkcs11_tool(&[
            "--write-object",
            file.to_str().unwrap(),
            "--type",
            "cert",
            "--label",
            label,
            "--id",
            id,
        ]);
    }

    fn delete(&self, kind: &str, id: &str) {
        self.pkcs11_tool(&["--delete-object", "--type", kind, "--id", id]);
    }

    /// A file holding the PIN, readable by its owner only.
    pub(crate) fn pin_file(&self) -> PathBuf {
        let path = self.dir.path().join("pin");
        std::fs::write(&path, format!("{PIN}\n")).unwrap();
        set_mode(&path, 0o600);
        path
    }
}

fn set_mode(path: &Path, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// A device certificate for a key held in the token.
fn device_leaf(broker: &TestBroker, name: &str, public_key: &[u8]) -> Leaf {
    broker
        .setup
        .intermediate
        .leaf_for_public_key(&LeafSpec::device(name), public_key)
}

/// Replaces a file the way renewal tools do (a new file renamed over the old one).
fn replace(path: &Path, contents: &str) {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, contents).unwrap();
    set_mode(&temporary, 0o600);
    std::fs::rename(&temporary, path).unwrap();
}

/// The flags reaching the test broker as a device.
fn device_flags(broker: &TestBroker, cert: &str, key: &str) -> Vec<String> {
    [
        "--url",
        &broker.url(""),
        "--cert",
        cert,
        "--key",
        key,
        "--ca",
        broker.setup.path("server-ca.pem").to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `token-broker token` with these flags and environment (off the runtime's threads).
async fn run_token(flags: Vec<String>, env: Vec<(&'static str, PathBuf)>) -> Output {
    let env: Vec<(&str, std::ffi::OsString)> = env
        .into_iter()
        .map(|(k, v)| (k, v.into_os_string()))
        .collect();
    run_token_env(flags, env).await
}

async fn run_token_env(flags: Vec<String>, env: Vec<(&str, std::ffi::OsString)>) -> Output {
    let mut command = Command::new(support::binary());
    command
        .args(["--log-format", "text", "token"])
        .args(flags)
        .env_remove("TOKEN_BROKER_PKCS11_PIN")
        .envs(env);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    support::logs::assert_no_secrets(&String::from_utf8_lossy(&out.stderr), "token");
    out
}

/// The claims of the broker's ID token `token` printed, checked to be bound to `leaf`.
fn assert_token_for(out: &Output, leaf: &Leaf, name: &str) {
    assert!(
        out.status.success(),
        "token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let claims = jwt_claims(answer["access_token"].as_str().unwrap());
    assert_bound_to(&claims, leaf, name);
}

fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// The broker saw `leaf`: its ID token names the device and carries the certificate's
/// thumbprint (RFC 8705 `cnf`).
fn assert_bound_to(claims: &Value, leaf: &Leaf, name: &str) {
    assert_eq!(
        claims["sub"],
        format!("spiffe://test.example/device/{name}")
    );
    let thumbprint =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&leaf.der));
    assert_eq!(claims["cnf"]["x5t#S256"], thumbprint);
}

/// `token-broker agent` as a process of its own, killed when dropped.
struct Agent {
    process: Process,
    addr: String,
}

impl Agent {
    async fn start(
        broker: &TestBroker,
        flags: Vec<String>,
        env: Vec<(&'static str, std::ffi::OsString)>,
    ) -> Agent {
        let log = broker
            .setup
            .path(&format!("agent-{}.log", uuid::Uuid::new_v4()));
        let mut command = Command::new(support::binary());
        command
            // Port 0, and its line says which port: one picked here could be taken before
            // the agent binds it.
            .args(["--log-format", "text", "agent", "--listen", "127.0.0.1:0"])
            .args(["--service-account", RUNNER, "--project-id", "fake-project"])
            .args(flags)
            .env_remove("TOKEN_BROKER_PKCS11_PIN")
            .envs(env);
        let mut process = Process::spawn(command, log);
        let serving = process.line("metadata agent serving").await;
        let addr = support::logs::text_field(&serving, "listen").to_owned();
        let mut agent = Agent { process, addr };
        let client = reqwest::Client::new();
        let url = format!("http://{}/", agent.addr);
        let mut tries = 0;
        loop {
            let ping = client
                .get(&url)
                .header("metadata-flavor", "Google")
                .send()
                .await;
            if ping.is_ok_and(|r| r.status() == 200) {
                break;
            }
            if let Some(status) = agent.process.exited() {
                panic!("agent exited ({status}): {}", agent.log_text());
            }
            tries += 1;
            assert!(
                tries * support::POLL < support::PATIENCE,
                "agent never answered: {}",
                agent.log_text()
            );
            tokio::time::sleep(support::POLL).await;
        }
        agent
    }

    fn log_text(&self) -> String {
        self.process.log()
    }

    /// The status and body of the agent's answer to a token request for these scopes.
    async fn try_token(&self, scopes: &str) -> (u16, String) {
        let response = reqwest::Client::new()
            .get(format!(
                "http://{}/computeMetadata/v1/instance/service-accounts/default/token?scopes={scopes}",
                self.addr
            ))
            .header("metadata-flavor", "Google")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// Asks for a token until one is served (a healing token waits out its backoff).
    async fn token_eventually(&self, scopes: &str) -> String {
        let deadline = std::time::Instant::now() + support::PATIENCE;
        loop {
            let (status, body) = self.try_token(scopes).await;
            if status == 200 {
                let answer: Value = serde_json::from_str(&body).unwrap();
                return answer["access_token"].as_str().unwrap().to_owned();
            }
            assert_eq!(status, 500, "{body}");
            assert!(
                std::time::Instant::now() < deadline,
                "no token within {:?}: {body}\nagent log:\n{}",
                support::PATIENCE,
                self.log_text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// The access token the agent serves for these scopes (a metadata-server request).
    async fn token(&self, scopes: &str) -> String {
        let (status, body) = self.try_token(scopes).await;
        assert_eq!(status, 200, "{body}\nagent log:\n{}", self.log_text());
        let answer: Value = serde_json::from_str(&body).unwrap();
        answer["access_token"].as_str().unwrap().to_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.process.kill();
        if !std::thread::panicking() {
            support::logs::assert_no_secrets(&self.log_text(), "agent");
        }
    }
}

/// The agent's token came from the fake for the service account, through the broker's
/// exchange of an ID token bound to `leaf`.
fn assert_agent_token_for(fake: &FakeGoogle, token: &str, leaf: &Leaf, name: &str) {
    let issued = fake.issued_token(token).expect("a token the fake issued");
    assert_eq!(issued.subject, RUNNER);
    assert_bound_to(&fake.last_subject_claims().unwrap(), leaf, name);
}

/// `token`, then the agent, with these flags and the PIN from the environment, each get a
/// token bound to `leaf`; the agent is left running.
async fn token_then_agent(
    broker: &TestBroker,
    fake: &FakeGoogle,
    flags: Vec<String>,
    mut env: Vec<(&'static str, std::ffi::OsString)>,
    leaf: &Leaf,
    name: &str,
) -> Agent {
    env.push(("TOKEN_BROKER_PKCS11_PIN", PIN.into()));
    assert_token_for(&run_token_env(flags.clone(), env.clone()).await, leaf, name);
    let agent = Agent::start(broker, flags, env).await;
    let token = agent.token(CLOUD_PLATFORM).await;
    assert_agent_token_for(fake, &token, leaf, name);
    agent
}

fn os(env: Vec<(&'static str, PathBuf)>) -> Vec<(&'static str, std::ffi::OsString)> {
    env.into_iter()
        .map(|(k, v)| (k, v.into_os_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_p256_key_made_in_softhsm_signs_for_token_and_agent() {
    let (fake, broker) = start_broker().await;
    let hsm = SoftHsm::new();
    let public = hsm.generate("EC:prime256v1", "device-key", "01");
    let leaf = device_leaf(&broker, "hsm-p256", &public);
    let cert = broker.setup.write("device.pem", &leaf.chain_pem);
    let pin_file = hsm.pin_file();

    // Module and PIN file from flags.
    let mut flags = device_flags(
        &broker,
        cert.to_str().unwrap(),
        "pkcs11:token=device;object=device-key;type=private",
    );
    flags.extend([
        "--pkcs11-module".into(),
        SOFTHSM_MODULE.into(),
        "--pkcs11-pin-file".into(),
        pin_file.display().to_string(),
    ]);
    assert_token_for(&run_token(flags, hsm.env()).await, &leaf, "hsm-p256");

    // Module and PIN source from the URI alone, for the agent.
    let key = format!(
        "pkcs11:token=device;id=%01?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
        pin_file.display()
    );
    let agent = Agent::start(
        &broker,
        device_flags(&broker, cert.to_str().unwrap(), &key),
        os(hsm.env()),
    )
    .await;
    let token = agent.token(CLOUD_PLATFORM).await;
    assert_agent_token_for(&fake, &token, &leaf, "hsm-p256");
    drop(agent);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_p384_key_imported_into_softhsm_signs_for_token() {
    let (_fake, broker) = start_broker().await;
    let hsm = SoftHsm::new();
    // OpenSC 0.23's pkcs11-tool cannot export a P-384 public key ("cannot create
    // EVP_PKEY"): this key is made outside, imported, and its file deleted.
    let mut spec = LeafSpec::device("hsm-p384");
    spec.key = support::KeyKind::P384;
    let leaf = broker.setup.intermediate.leaf(&spec);
    let key_file = broker.setup.write("p384-key.pem", &leaf.key_pem);
    hsm.run(
        "softhsm2-util",
        &[
            "--import",
            key_file.to_str().unwrap(),
            "--token",
            "device",
            "--label",
            "device-key",
            "--id",
            "04",
            "--pin",
            PIN,
        ],
    );
    std::fs::remove_file(&key_file).unwrap();
    let cert = broker.setup.write("device.pem", &leaf.chain_pem);
    let mut flags = device_flags(&broker, cert.to_str().unwrap(), "pkcs11:object=device-key");
    flags.extend([
        "--pkcs11-module".into(),
        SOFTHSM_MODULE.into(),
        "--pkcs11-pin-file".into(),
        hsm.pin_file().display().to_string(),
    ]);
    assert_token_for(&run_token(flags, hsm.env()).await, &leaf, "hsm-p384");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_rsa_2048_key_and_its_certificate_in_softhsm_through_p11_kit_with_renewal_in_the_token()
{
    support::require_file(P11_KIT_PROXY, "p11-kit-modules");
    let (fake, broker) = start_broker().await;
    let hsm = SoftHsm::new();
    let public = hsm.generate("rsa:2048", "device", "02");
    let leaf = device_leaf(&broker, "hsm-rsa", &public);
    hsm.store_certificate(&leaf, "device", "02");
    let chain = broker
        .setup
        .write("intermediates.pem", &broker.setup.intermediate.pem);
    // No module flag: p11-kit's proxy finds SoftHSM; the PIN comes from the environment.
    let mut flags = device_flags(
        &broker,
        "pkcs11:token=device;object=device;type=cert",
        "pkcs11:token=device;object=device;type=private",
    );
    flags.extend(["--chain".into(), chain.display().to_string()]);
    let agent = token_then_agent(&broker, &fake, flags, os(hsm.env()), &leaf, "hsm-rsa").await;

    // Renewal inside the token: a new key and certificate under the same label replace the
    // old ones while the agent runs; its next broker request (other scopes, so not served
    // from its cache) presents the new certificate.
    hsm.delete("cert", "02");
    hsm.delete("privkey", "02");
    hsm.delete("pubkey", "02");
    let public = hsm.generate("rsa:2048", "device", "03");
    let renewed = device_leaf(&broker, "hsm-rsa-renewed", &public);
    hsm.store_certificate(&renewed, "device", "03");
    let token = agent.token(READ_ONLY).await;
    assert_agent_token_for(&fake, &token, &renewed, "hsm-rsa-renewed");
    drop(agent);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_failures_name_their_fix() {
    let (_fake, broker) = start_broker().await;
    let hsm = SoftHsm::new();
    let public = hsm.generate("EC:prime256v1", "device-key", "01");
    hsm.generate("EC:secp521r1", "p521", "05");
    hsm.generate("EC:prime256v1", "other-key", "06");
    hsm.pkcs11_tool(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "pin-per-signature",
        "--id",
        "07",
        "--always-auth",
    ]);
    let leaf = device_leaf(&broker, "hsm-errors", &public);
    let cert = broker.setup.write("device.pem", &leaf.chain_pem);
    let wrong_pin = broker.setup.write("wrong-pin", "000000\n");
    let shared_pin = broker.setup.write("shared-pin", &format!("{PIN}\n"));
    set_mode(&shared_pin, 0o640);
    let pin_file = hsm.pin_file();
    let module = |path: &str| vec!["--pkcs11-module".to_owned(), path.to_owned()];
    let pin = |path: &Path| vec!["--pkcs11-pin-file".to_owned(), path.display().to_string()];
    let cases: Vec<(&str, &str, Vec<String>, &str)> = vec![
        (
            "wrong PIN",
            "pkcs11:token=device;object=device-key",
            [module(SOFTHSM_MODULE), pin(&wrong_pin)].concat(),
            "wrong PIN for PKCS#11 token 'device'",
        ),
        (
            "missing key",
            "pkcs11:token=device;object=no-such-key",
            [module(SOFTHSM_MODULE), pin(&pin_file)].concat(),
            "PKCS#11 private key not found: no object matching object=no-such-key on token 'device' (there: ",
        ),
        (
            "module missing",
            "pkcs11:token=device;object=device-key",
            [module("/usr/lib/no-such-pkcs11.so"), pin(&pin_file)].concat(),
            "PKCS#11 module /usr/lib/no-such-pkcs11.so: cannot load it (no such file)",
        ),
        (
            "token absent",
            "pkcs11:token=elsewhere;object=device-key",
            [module(SOFTHSM_MODULE), pin(&pin_file)].concat(),
            "PKCS#11 token absent: no token matching token=elsewhere",
        ),
        (
            "PIN file others may read",
            "pkcs11:token=device;object=device-key",
            [module(SOFTHSM_MODULE), pin(&shared_pin)].concat(),
            "is readable by others (mode 640); run: chmod 600",
        ),
        (
            "no PIN",
            "pkcs11:token=device;object=device-key",
            module(SOFTHSM_MODULE),
            "PKCS#11 token 'device' needs a PIN",
        ),
        (
            "unsupported key",
            "pkcs11:token=device;object=p521",
            [module(SOFTHSM_MODULE), pin(&pin_file)].concat(),
            "unsupported key type in PKCS#11 token 'device': an elliptic curve other than P-256 and P-384",
        ),
        (
            "key wanting the PIN per signature",
            "pkcs11:token=device;object=pin-per-signature",
            [module(SOFTHSM_MODULE), pin(&pin_file)].concat(),
            "unsupported key type in PKCS#11 token 'device': a key that needs the PIN again for every signature (CKA_ALWAYS_AUTHENTICATE)",
        ),
        (
            "key of another certificate",
            "pkcs11:token=device;object=other-key",
            [module(SOFTHSM_MODULE), pin(&pin_file)].concat(),
            "and key pkcs11:token=device;object=other-key do not fit together: the key's ECDSA_NISTP256_SHA256 signature does not verify",
        ),
        (
            "a certificate URI given as the key",
            "pkcs11:token=device;object=device-key;type=cert",
            [module(SOFTHSM_MODULE), pin(&pin_file)].concat(),
            "--key names a PKCS#11 object of type=cert; it needs type=private (or no type)",
        ),
        (
            "PIN in the URI",
            "pkcs11:token=device;object=device-key?pin-value=246810",
            module(SOFTHSM_MODULE),
            "the PKCS#11 URI carries pin-value",
        ),
    ];
    for (case, key, extra, expected) in cases {
        let mut flags = device_flags(&broker, cert.to_str().unwrap(), key);
        flags.extend(extra);
        let out = run_token(flags, hsm.env()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
        assert!(stderr.contains(expected), "{case}: {stderr}");
        assert!(
            !stderr.contains(PIN),
            "{case}: the PIN was repeated: {stderr}"
        );
    }
    // After the failures, the right PIN still works (a wrong PIN was tried once, not
    // retried until the token locked).
    let mut flags = device_flags(
        &broker,
        cert.to_str().unwrap(),
        "pkcs11:token=device;object=device-key",
    );
    flags.extend([module(SOFTHSM_MODULE), pin(&pin_file)].concat());
    assert_token_for(&run_token(flags, hsm.env()).await, &leaf, "hsm-errors");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_uses_renewed_certificate_and_key_files_from_its_next_request() {
    let (fake, broker) = start_broker().await;
    let original = broker
        .setup
        .intermediate
        .leaf(&LeafSpec::device("before-renewal"));
    let cert = broker.setup.write("device.pem", &original.chain_pem);
    let key = broker.setup.write("device-key.pem", &original.key_pem);
    let agent = Agent::start(
        &broker,
        device_flags(&broker, cert.to_str().unwrap(), key.to_str().unwrap()),
        Vec::new(),
    )
    .await;
    let token = agent.token(CLOUD_PLATFORM).await;
    assert_agent_token_for(&fake, &token, &original, "before-renewal");

    // Renewal: a new key and certificate written over the old files, key first (a
    // certificate without its key is never loaded).
    let renewed = broker
        .setup
        .intermediate
        .leaf(&LeafSpec::device("after-renewal"));
    support::logs::register_key(&renewed.key_pem);
    replace(&key, &renewed.key_pem);
    replace(&cert, &renewed.chain_pem);
    let token = agent.token(READ_ONLY).await;
    assert_agent_token_for(&fake, &token, &renewed, "after-renewal");
    // Info lines reach the log within the agent's flush interval.
    support::wait_until("the agent to log the renewal", || async {
        agent.log_text().contains("device certificate loaded again")
    })
    .await;
    drop(agent);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_written_renewal_keeps_the_agent_on_its_previous_certificate() {
    let (fake, broker) = start_broker().await;
    let original = broker.setup.intermediate.leaf(&LeafSpec::device("steady"));
    let cert = broker.setup.write("device.pem", &original.chain_pem);
    let key = broker.setup.write("device-key.pem", &original.key_pem);
    let agent = Agent::start(
        &broker,
        device_flags(&broker, cert.to_str().unwrap(), key.to_str().unwrap()),
        Vec::new(),
    )
    .await;
    agent.token(CLOUD_PLATFORM).await;
    // The new certificate is there, its key not yet: the pair does not fit.
    let renewed = broker.setup.intermediate.leaf(&LeafSpec::device("next"));
    replace(&cert, &renewed.chain_pem);
    let token = agent.token(READ_ONLY).await;
    assert_agent_token_for(&fake, &token, &original, "steady");
    assert!(agent.log_text().contains("do not fit together"));
    // Then the key arrives: used from the next request.
    support::logs::register_key(&renewed.key_pem);
    replace(&key, &renewed.key_pem);
    let token = agent.token(&format!("{CLOUD_PLATFORM},{READ_ONLY}")).await;
    assert_agent_token_for(&fake, &token, &renewed, "next");
    drop(agent);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_reads_the_current_certificate_and_key_files() {
    let (_fake, broker) = start_broker().await;
    let first = broker.setup.intermediate.leaf(&LeafSpec::device("first"));
    let cert = broker.setup.write("device.pem", &first.chain_pem);
    let key = broker.setup.write("device-key.pem", &first.key_pem);
    let flags = device_flags(&broker, cert.to_str().unwrap(), key.to_str().unwrap());
    assert_token_for(&run_token(flags.clone(), Vec::new()).await, &first, "first");
    let second = broker.setup.intermediate.leaf(&LeafSpec::device("second"));
    support::logs::register_key(&second.key_pem);
    replace(&key, &second.key_pem);
    replace(&cert, &second.chain_pem);
    assert_token_for(&run_token(flags, Vec::new()).await, &second, "second");
    broker.stop().await;
}

const TPM2_PKCS11_MODULE: &str = "/usr/lib/x86_64-linux-gnu/libtpm2_pkcs11.so.1";

/// A software TPM (swtpm, socket mode: CI has no /dev/tpm) behind tpm2-abrmd on a private
/// D-Bus, with a tpm2-pkcs11 store holding token `device` and a P-256 key made in the TPM.
/// swtpm has no resource manager: without tpm2-abrmd, tpm2-pkcs11's tools run out of
/// transient object slots (`TPM_RC_OBJECT_MEMORY`) within one `tpm2_ptool addtoken`.
struct Tpm {
    dir: tempfile::TempDir,
    /// swtpm, dbus-daemon, tpm2-abrmd: ended in reverse order when dropped.
    processes: Vec<std::process::Child>,
    /// tpm2-abrmd and the swtpm port it talks to.
    resource_manager: Option<(PathBuf, u16)>,
}

impl Tpm {
    async fn start() -> Tpm {
        let swtpm = support::require_tool("swtpm", "swtpm");
        support::require_tool("tpm2_getcap", "tpm2-tools");
        support::require_tool("tpm2_ptool", "libtpm2-pkcs11-tools");
        support::require_tool("pkcs11-tool", "opensc");
        let dbus = support::require_tool("dbus-daemon", "dbus-daemon");
        let abrmd = support::require_file("/usr/sbin/tpm2-abrmd", "tpm2-abrmd");
        support::require_file(TPM2_PKCS11_MODULE, "libtpm2-pkcs11-1");
        support::require_file(
            "/usr/lib/x86_64-linux-gnu/libtss2-tcti-swtpm.so.0",
            "libtss2-tcti-swtpm0",
        );
        support::require_file(
            "/usr/lib/x86_64-linux-gnu/libtss2-tcti-tabrmd.so.0",
            "libtss2-tcti-tabrmd0",
        );
        let dir = tempfile::tempdir().unwrap();
        for sub in ["state", "store"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let mut tpm = Tpm {
            dir,
            processes: Vec::new(),
            resource_manager: None,
        };
        // The swtpm TCTI finds the control channel on the port after the server's. Either
        // port may be taken (by another test's connection) by the time swtpm binds it; swtpm
        // then exits, and starts again on other ports.
        let state = format!("dir={}", tpm.dir.path().join("state").display());
        let mut attempts = 0;
        let port = loop {
            let port = support::free_port();
            let Some(control) = port.checked_add(1) else {
                continue;
            };
            tpm.spawn(Command::new(&swtpm).args([
                "socket",
                "--tpm2",
                "--tpmstate",
                &state,
                "--server",
                &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                "--ctrl",
                &format!("type=tcp,port={control},bindaddr=127.0.0.1"),
                "--flags",
                "not-need-init,startup-clear",
            ]));
            let exited = tpm.listening_or_exit([port, control]).await;
            attempts += 1;
            match exited {
                None => break port,
                Some(status) if attempts < 5 => {
                    eprintln!(
                        "swtpm on ports {port}, {control} exited ({status}); again\n{}",
                        tpm.logs()
                    );
                    tpm.processes.pop();
                }
                Some(status) => panic!("swtpm exited ({status}) {attempts} times:\n{}", tpm.logs()),
            }
        };
        let bus = tpm.dir.path().join("bus");
        tpm.spawn(Command::new(dbus).args([
            "--session",
            "--nofork",
            &format!("--address=unix:path={}", bus.display()),
        ]));
        support::wait_until("the private D-Bus", || async { bus.exists() }).await;
        tpm.resource_manager = Some((abrmd, port));
        tpm.start_resource_manager().await;
        let store = tpm.dir.path().join("store").display().to_string();
        let ptool = |args: &[&str]| tpm.run("tpm2_ptool", args);
        ptool(&["init", "--path", &store]);
        ptool(&[
            "addtoken",
            "--pid=1",
            "--label=device",
            "--sopin=13579111",
            &format!("--userpin={PIN}"),
            "--path",
            &store,
        ]);
        ptool(&[
            "addkey",
            "--algorithm=ecc256",
            "--label=device",
            "--key-label=device-key",
            &format!("--userpin={PIN}"),
            "--path",
            &store,
        ]);
        tpm
    }

    /// tpm2-abrmd, last of the processes, once tpm2-tools reach the TPM through it.
    async fn start_resource_manager(&mut self) {
        let (abrmd, port) = self.resource_manager.clone().unwrap();
        let mut resource_manager = Command::new(abrmd);
        resource_manager
            .args([
                "--session",
                "--allow-root",
                &format!("--tcti=swtpm:host=127.0.0.1,port={port}"),
            ])
            .envs(self.env());
        self.spawn(&mut resource_manager);
        let deadline = std::time::Instant::now() + support::PATIENCE;
        loop {
            let out = Command::new("tpm2_getcap")
                .arg("properties-fixed")
                .envs(self.env())
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tpm2-abrmd never reached swtpm: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            tokio::time::sleep(support::POLL).await;
        }
    }

    /// tpm2-abrmd ended: the TPM is out of reach, as when a device's resource manager dies.
    fn stop_resource_manager(&mut self) {
        let mut abrmd = self.processes.pop().unwrap();
        abrmd.kill().unwrap();
        abrmd.wait().unwrap();
    }

    fn spawn(&mut self, command: &mut Command) {
        let log = self
            .dir
            .path()
            .join(format!("process-{}.log", self.processes.len()));
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        self.processes.push(child);
    }

    /// Waits until the last process started accepts on every one of `ports` (`None`), or
    /// exits (its status).
    async fn listening_or_exit(&mut self, ports: [u16; 2]) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + support::PATIENCE;
        loop {
            let process = self.processes.last_mut().unwrap();
            if let Some(status) = process.try_wait().unwrap() {
                return Some(status);
            }
            if ports
                .iter()
                .all(|&port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            {
                // A port another listener holds also accepts: only a swtpm still running
                // after both did is listening on both.
                tokio::time::sleep(support::POLL).await;
                return self.processes.last_mut().unwrap().try_wait().unwrap();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waited {:?} in vain for swtpm to listen:\n{}",
                support::PATIENCE,
                self.logs()
            );
            tokio::time::sleep(support::POLL).await;
        }
    }

    /// What swtpm, dbus-daemon and tpm2-abrmd said, for a failure's message.
    fn logs(&self) -> String {
        (0..self.processes.len())
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("process-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        let tcti = PathBuf::from("tabrmd:bus_type=session");
        vec![
            (
                "DBUS_SESSION_BUS_ADDRESS",
                PathBuf::from(format!(
                    "unix:path={}",
                    self.dir.path().join("bus").display()
                )),
            ),
            ("TPM2TOOLS_TCTI", tcti.clone()),
            ("TPM2_PKCS11_TCTI", tcti),
            ("TPM2_PKCS11_STORE", self.dir.path().join("store")),
        ]
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        support::run_checked(program, args, self.env())
    }

    /// The TPM key's public half (DER SubjectPublicKeyInfo), as the module gives it.
    fn public_key(&self) -> Vec<u8> {
        let file = self.dir.path().join("public.der");
        self.run(
            "pkcs11-tool",
            &[
                "--module",
                TPM2_PKCS11_MODULE,
                "--read-object",
                "--type",
                "pubkey",
                "--label",
                "device-key",
                "-o",
                file.to_str().unwrap(),
            ],
        );
        std::fs::read(file).unwrap()
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        while let Some(mut child) = self.processes.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_p256_key_made_in_a_software_tpm_signs_for_token_and_agent() {
    let (fake, broker) = start_broker().await;
    let tpm = Tpm::start().await;
    let leaf = device_leaf(&broker, "tpm-p256", &tpm.public_key());
    let cert = broker.setup.write("device.pem", &leaf.chain_pem);
    let mut flags = device_flags(
        &broker,
        cert.to_str().unwrap(),
        "pkcs11:token=device;object=device-key;type=private",
    );
    flags.extend(["--pkcs11-module".into(), TPM2_PKCS11_MODULE.into()]);
    let agent = token_then_agent(&broker, &fake, flags, os(tpm.env()), &leaf, "tpm-p256").await;
    drop(agent);
    broker.stop().await;
}

/// The agent's answer while its token is broken: a local failure (500 `server_error`) with
/// the PKCS#11 reason, never the broker's unavailability (503).
fn assert_local_failure(status: u16, body: &str, agent: &Agent) -> String {
    assert_eq!(status, 500, "{body}\nagent log:\n{}", agent.log_text());
    let answer: Value = serde_json::from_str(body).unwrap();
    assert_eq!(answer["error"], "server_error", "{body}");
    let description = answer["error_description"].as_str().unwrap().to_owned();
    assert!(description.contains("PKCS#11"), "{description}");
    assert!(!description.contains("unavailable"), "{description}");
    description
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_deleted_and_re_created_under_a_running_agent_serves_again() {
    let (fake, broker) = start_broker().await;
    let hsm = SoftHsm::new();
    let leaf = broker
        .setup
        .intermediate
        .leaf(&LeafSpec::device("hsm-again"));
    hsm.import(&leaf, PIN);
    let chain = broker
        .setup
        .write("intermediates.pem", &broker.setup.intermediate.pem);
    let mut flags = device_flags(
        &broker,
        "pkcs11:token=device;object=device;type=cert",
        "pkcs11:token=device;object=device;type=private",
    );
    flags.extend([
        "--chain".into(),
        chain.display().to_string(),
        "--pkcs11-module".into(),
        SOFTHSM_MODULE.into(),
    ]);
    let mut env = os(hsm.env());
    env.push(("TOKEN_BROKER_PKCS11_PIN", PIN.into()));
    let agent = Agent::start(&broker, flags.clone(), env.clone()).await;
    let token = agent.token(CLOUD_PLATFORM).await;
    assert_agent_token_for(&fake, &token, &leaf, "hsm-again");

    // The token goes: every request fails at once, as a local problem naming the PKCS#11
    // reason (the old session's objects are gone, then the token itself).
    hsm.delete_token();
    for scopes in [READ_ONLY, &format!("{CLOUD_PLATFORM},{READ_ONLY}")] {
        let (status, body) = agent.try_token(scopes).await;
        assert_local_failure(status, &body, &agent);
    }
    // As for a `token` run: exit 1, a local problem.
    let out = run_token_env(flags.clone(), env.clone()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("PKCS#11 token absent"), "{stderr}");

    // The same token made again: the running agent opens it anew and serves.
    hsm.init_token(PIN);
    hsm.import(&leaf, PIN);
    let token = agent.token_eventually(READ_ONLY).await;
    assert_agent_token_for(&fake, &token, &leaf, "hsm-again");
    support::wait_until("the agent to log the token opened again", || async {
        agent.log_text().contains("device certificate loaded again")
    })
    .await;
    drop(agent);
    broker.stop().await;
}

/// How many times the module was asked to log in (`C_Login`), as pkcs11-spy wrote them.
fn logins(spy_log: &Path) -> usize {
    std::fs::read_to_string(spy_log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.ends_with(": C_Login"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_pin_is_tried_once_until_the_pin_file_changes() {
    support::require_file(PKCS11_SPY, "opensc-pkcs11");
    let (fake, broker) = start_broker().await;
    let hsm = SoftHsm::new();
    let leaf = broker.setup.intermediate.leaf(&LeafSpec::device("hsm-pin"));
    hsm.import(&leaf, PIN);
    let pin_file = hsm.pin_file();
    let spy_log = hsm.dir.path().join("spy.log");
    let mut flags = device_flags(
        &broker,
        broker
            .setup
            .write("device.pem", &leaf.chain_pem)
            .to_str()
            .unwrap(),
        "pkcs11:token=device;object=device;type=private",
    );
    flags.extend([
        "--pkcs11-module".into(),
        PKCS11_SPY.into(),
        "--pkcs11-pin-file".into(),
        pin_file.display().to_string(),
    ]);
    let mut env = os(hsm.env());
    env.push(("PKCS11SPY", SOFTHSM_MODULE.into()));
    env.push(("PKCS11SPY_OUTPUT", spy_log.clone().into_os_string()));
    let agent = Agent::start(&broker, flags, env).await;
    let token = agent.token(CLOUD_PLATFORM).await;
    assert_agent_token_for(&fake, &token, &leaf, "hsm-pin");
    assert_eq!(logins(&spy_log), 1);

    // The card comes back with another PIN: the configured one is tried once, then never
    // again, however many requests come, each failing at once saying so.
    const NEW_PIN: &str = "864200";
    hsm.delete_token();
    hsm.init_token(NEW_PIN);
    hsm.import(&leaf, NEW_PIN);
    // (Other scopes than the token the agent holds; failures are never kept.)
    let mut last = String::new();
    for request in 0..4 {
        if request > 0 {
            // Past each backoff (1, 2, 4 s): the token is opened again each time.
            tokio::time::sleep(std::time::Duration::from_millis(1_100 << (request - 1))).await;
        }
        let (status, body) = agent.try_token(READ_ONLY).await;
        last = assert_local_failure(status, &body, &agent);
        assert!(!body.contains(PIN) && !body.contains(NEW_PIN), "{body}");
    }
    assert!(
        last.contains("was refused by PKCS#11 token 'device'"),
        "{last}"
    );
    assert!(last.contains("not tried again until it changes"), "{last}");
    assert_eq!(logins(&spy_log), 2, "C_Login with a refused PIN again");

    // The PIN file changes: the new PIN is tried, and works.
    replace(&pin_file, &format!("{NEW_PIN}\n"));
    let token = agent.token_eventually(READ_ONLY).await;
    assert_agent_token_for(&fake, &token, &leaf, "hsm-pin");
    assert_eq!(logins(&spy_log), 3);
    drop(agent);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_pin_written_in_a_uri_appears_in_any_output() {
    let (_fake, broker) = start_broker().await;
    let hsm = SoftHsm::new();
    const SECRET: &str = "975312";
    let malformed = [
        format!("pkcs11:colour=red;pin-value={SECRET}"),
        format!("pkcs11:token=device;object=device?pin-value={SECRET}"),
        format!("pkcs11:token;PIN-VALUE={SECRET}"),
        format!("pkcs12:token=device;pin-value={SECRET}"),
        format!("pkcs11:colour=red;pin-source={SECRET}"),
        format!("pkcs11:token=device;colour=red?pin-source=file:{SECRET}"),
        format!("pkcs11:token=device;pin-source{SECRET}"),
    ];
    let cert = broker.setup.write("device.pem", "not used");
    for uri in &malformed {
        for (flag, format) in [
            ("--key", "json"),
            ("--key", "executable"),
            ("--cert", "executable"),
        ] {
            let (cert, key) = match flag {
                "--key" => (cert.display().to_string(), uri.clone()),
                _ => (uri.clone(), "pkcs11:token=device;object=device".to_owned()),
            };
            let mut flags = device_flags(&broker, &cert, &key);
            flags.extend(["--format".into(), format.into()]);
            let out = run_token(flags, hsm.env()).await;
            let (stdout, stderr) = (
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
            let case = format!("{flag} {uri} --format {format}");
            assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
            assert!(stderr.contains("error: "), "{case}: {stderr}");
            assert!(
                !stdout.contains(SECRET) && !stderr.contains(SECRET),
                "{case}: the PIN was repeated:\n{stdout}\n{stderr}"
            );
            if format == "executable" {
                let response: Value = serde_json::from_str(&stdout).unwrap();
                assert_eq!(response["success"], false, "{case}");
                assert_eq!(response["code"], "local_error", "{case}");
            }
            if uri.to_ascii_lowercase().contains("pin-value") {
                assert!(stderr.contains("carries pin-value"), "{case}: {stderr}");
            }
        }
        // The agent refuses it at start the same way.
        let out = Command::new(support::binary())
            .args([
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--service-account",
                RUNNER,
            ])
            .args(device_flags(&broker, cert.to_str().unwrap(), uri))
            .envs(hsm.env())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "agent {uri}: {stderr}");
        assert!(!stderr.contains(SECRET), "agent {uri}: {stderr}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_in_the_token_is_read_without_a_pin_or_with_the_keys() {
    let (_fake, broker) = start_broker().await;
    let hsm = SoftHsm::new();
    let leaf = broker
        .setup
        .intermediate
        .leaf(&LeafSpec::device("hsm-cert"));
    hsm.import(&leaf, PIN);
    let chain = broker
        .setup
        .write("intermediates.pem", &broker.setup.intermediate.pem);
    let cert = "pkcs11:token=device;object=device;type=cert";
    let extra = [
        "--chain".to_owned(),
        chain.display().to_string(),
        "--pkcs11-module".into(),
        SOFTHSM_MODULE.into(),
    ];
    // A key file: no PIN anywhere, and none is needed for the certificate, a public object.
    let key_file = broker.setup.write("device-key.pem", &leaf.key_pem);
    set_mode(&key_file, 0o600);
    let mut flags = device_flags(&broker, cert, key_file.to_str().unwrap());
    flags.extend(extra.clone());
    assert_token_for(&run_token(flags, hsm.env()).await, &leaf, "hsm-cert");
    // The key in the same token, its PIN named in the key's URI only.
    let key = format!(
        "pkcs11:token=device;object=device;type=private?pin-source=file:{}",
        hsm.pin_file().display()
    );
    let mut flags = device_flags(&broker, cert, &key);
    flags.extend(extra);
    assert_token_for(&run_token(flags, hsm.env()).await, &leaf, "hsm-cert");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_whose_tpm_fails_during_a_handshake_says_so_and_heals() {
    let (fake, broker) = start_broker().await;
    let mut tpm = Tpm::start().await;
    let leaf = device_leaf(&broker, "tpm-heal", &tpm.public_key());
    let cert = broker.setup.write("device.pem", &leaf.chain_pem);
    let mut flags = device_flags(
        &broker,
        cert.to_str().unwrap(),
        "pkcs11:token=device;object=device-key;type=private",
    );
    flags.extend(["--pkcs11-module".into(), TPM2_PKCS11_MODULE.into()]);
    let mut env = os(tpm.env());
    env.push(("TOKEN_BROKER_PKCS11_PIN", PIN.into()));
    let agent = Agent::start(&broker, flags, env).await;
    // The TPM goes out of reach after the start's checks, before any connection: the
    // session and key look fine, and the first handshake's signature fails in the module.
    tpm.stop_resource_manager();
    let (status, body) = agent.try_token(CLOUD_PLATFORM).await;
    let description = assert_local_failure(status, &body, &agent);
    assert!(
        description.contains("failed during the TLS handshake"),
        "{description}"
    );
    // The TPM is back: the token is opened again, and signs.
    tpm.start_resource_manager().await;
    let token = agent.token_eventually(CLOUD_PLATFORM).await;
    assert_agent_token_for(&fake, &token, &leaf, "tpm-heal");
    drop(agent);
    broker.stop().await;
}
