//! Test harness: a real PKI made with rcgen, a real broker on loopback, real TLS clients.

pub mod crl_server;
pub mod fake_google;
pub mod logs;
pub mod process;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use time::{Duration, OffsetDateTime};
use token_broker::broker::Broker;
use token_broker::config::Config;
use token_broker::live::Live;
use token_broker::metrics::Metrics;
use token_broker::server::Server;

pub const TRUST_DOMAIN: &str = "test.example";

/// A certificate authority that can issue leaves, intermediates and CRLs.
pub struct Ca {
    pub pem: String,
    pub der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// What this CA's certificate was made from, to issue it again (cross-signing).
    params: CertificateParams,
    /// PEM of the CAs between this one and its root (this one first), for chains.
    pub chain_pem: String,
    pub serial: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    P256,
    P384,
    Rsa2048,
    Rsa1024,
    Ed25519,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eku {
    ClientAuth,
    ServerAuthOnly,
    Absent,
}

/// What a test leaf looks like; `Default` is a valid device certificate.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub name: String,
    pub key: KeyKind,
    pub eku: Eku,
    pub is_ca: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub spiffe: Option<String>,
    pub dns: Vec<String>,
    pub serial: u64,
}

impl LeafSpec {
    pub fn device(name: &str) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            name: name.to_owned(),
            key: KeyKind::P256,
            eku: Eku::ClientAuth,
            is_ca: false,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(30),
            spiffe: Some(format!("spiffe://{TRUST_DOMAIN}/device/{name}")),
            dns: Vec::new(),
            serial: rand_serial(),
        }
    }
}

fn rand_serial() -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_be_bytes(bytes[..8].try_into().unwrap()) >> 1
}

/// A client certificate with its key; `chain_pem` is what a client sends (leaf first).
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub chain_pem: String,
    pub serial: u64,
    /// A key rustls refuses to sign with (RSA-1024): only OpenSSL clients can present it.
    pub legacy_key: bool,
}

impl Leaf {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap()
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(365);
    params.serial_number = Some(SerialNumber::from(rand_serial()));
    params
}

fn serial_of(params: &CertificateParams) -> u64 {
    let bytes = params
        .serial_number
        .as_ref()
        .map(|s| s.to_bytes())
        .unwrap_or_default();
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

impl Ca {
    pub fn root(name: &str) -> Ca {
        Ca::root_with(name, |_| {})
    }

    /// A root whose certificate parameters `change` adjusts (constraints, extensions).
    pub fn root_with(name: &str, change: impl FnOnce(&mut CertificateParams)) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params(name);
        change(&mut params);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            chain_pem: String::new(),
            serial: serial_of(&params),
            params: params.clone(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn intermediate(&self, name: &str) -> Ca {
        self.intermediate_with(name, |_| {})
    }

    /// An intermediate whose certificate parameters `change` adjusts (path length, name
    /// constraints, EKU, key usage, basic constraints, extensions).
    pub fn intermediate_with(&self, name: &str, change: impl FnOnce(&mut CertificateParams)) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params(name);
        change(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Ca {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            pem: cert.pem(),
            der: cert.der().clone(),
            serial: serial_of(&params),
            params: params.clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// This CA's certificate issued again by `other` (same subject and key: a cross-sign),
    /// with `change` applied (e.g. another validity), as PEM.
    pub fn issued_by(&self, other: &Ca, change: impl FnOnce(&mut CertificateParams)) -> String {
        let mut params = self.params.clone();
        params.serial_number = Some(SerialNumber::from(rand_serial()));
        change(&mut params);
        params
            .signed_by(self.issuer.key(), &other.issuer)
            .unwrap()
            .pem()
    }

    /// A signature by this CA's key over `message` (ECDSA P-256 with SHA-256, DER), for
    /// certificates rcgen cannot express.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        use rcgen::SigningKey;
        self.issuer.key().sign(message).unwrap()
    }

    /// A leaf as `spec` describes it, then adjusted by `change` (SANs, extensions).
    pub fn leaf_with(&self, spec: &LeafSpec, change: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let mut params = leaf_params(spec);
        change(&mut params);
        let key = generate(spec.key);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            serial: spec.serial,
            legacy_key: false,
        }
    }

    pub fn leaf(&self, spec: &LeafSpec) -> Leaf {
        let params = leaf_params(spec);
        let (key_pem, cert) = match spec.key {
            KeyKind::Rsa1024 => {
                // Neither rcgen nor aws-lc-rs makes keys this weak; OpenSSL still does.
                let (key_pem, public_pem) = openssl_rsa1024();
                let public = SubjectPublicKeyInfo::from_pem(&public_pem).unwrap();
                (key_pem, params.signed_by(&public, &self.issuer).unwrap())
            }
            kind => {
                let key = generate(kind);
                (
                    key.serialize_pem(),
                    params.signed_by(&key, &self.issuer).unwrap(),
                )
            }
        };
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            key_pem,
            serial: spec.serial,
            legacy_key: spec.key == KeyKind::Rsa1024,
        }
    }

    /// A leaf for a key the test never holds (one made inside a PKCS#11 token): `spki_der`
    /// is its public key; `key_pem` is empty.
    pub fn leaf_for_public_key(&self, spec: &LeafSpec, spki_der: &[u8]) -> Leaf {
        let public = SubjectPublicKeyInfo::from_der(spki_der).unwrap();
        let cert = leaf_params(spec).signed_by(&public, &self.issuer).unwrap();
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            key_pem: String::new(),
            serial: spec.serial,
            legacy_key: false,
        }
    }

    /// A CRL from this CA listing `revoked` serials, valid from `this_update` for a week.
    pub fn crl(&self, revoked: &[u64]) -> String {
        self.crl_from(revoked, OffsetDateTime::now_utc() - Duration::hours(1))
    }

    pub fn crl_from(&self, revoked: &[u64], this_update: OffsetDateTime) -> String {
        self.crl_with(revoked, this_update, None)
    }

    /// A CRL with an issuingDistributionPoint (a partitioned CRL).
    pub fn crl_partitioned(
        &self,
        revoked: &[u64],
        idp: rcgen::CrlIssuingDistributionPoint,
    ) -> String {
        self.crl_with(
            revoked,
            OffsetDateTime::now_utc() - Duration::hours(1),
            Some(idp),
        )
    }

    /// A CRL with the cRLNumber `number` (big-endian bytes): an older one, or one a forger
    /// numbered past every genuine CRL.
    pub fn crl_numbered(&self, revoked: &[u64], number: &[u8]) -> String {
        self.crl_signed(
            revoked,
            OffsetDateTime::now_utc() - Duration::hours(1),
            None,
            SerialNumber::from(number.to_vec()),
        )
    }

    fn crl_with(
        &self,
        revoked: &[u64],
        this_update: OffsetDateTime,
        issuing_distribution_point: Option<rcgen::CrlIssuingDistributionPoint>,
    ) -> String {
        self.crl_signed(
            revoked,
            this_update,
            issuing_distribution_point,
            SerialNumber::from(next_crl_number()),
        )
    }

    fn crl_signed(
        &self,
        revoked: &[u64],
        this_update: OffsetDateTime,
        issuing_distribution_point: Option<rcgen::CrlIssuingDistributionPoint>,
        crl_number: SerialNumber,
    ) -> String {
        let now = OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update,
            next_update: this_update + Duration::days(7),
            crl_number,
            issuing_distribution_point,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }
}

/// A cRLNumber later than every one made before in this process and than the last second's
/// (a CA numbers its CRLs in order; two CRLs of one CA with one number are a load error).
pub fn next_crl_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = OffsetDateTime::now_utc().unix_timestamp() as u64;
    let mut last = LAST.load(Ordering::SeqCst);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange(last, next, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// A DER element.
pub fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = contents.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

pub fn extension(oid: &[u64], critical: bool, value: Vec<u8>) -> rcgen::CustomExtension {
    let mut ext = rcgen::CustomExtension::from_oid_content(oid, value);
    ext.set_criticality(critical);
    ext
}

/// A nameConstraints extension with one URI subtree (rcgen has no URI subtrees).
pub fn uri_name_constraint(host: &str, excluded: bool) -> rcgen::CustomExtension {
    let subtree = tlv(0x30, &tlv(0x86, host.as_bytes()));
    let tag = if excluded { 0xa1 } else { 0xa0 };
    extension(&[2, 5, 29, 30], true, tlv(0x30, &tlv(tag, &subtree)))
}

/// A subjectAltName extension holding these DER GeneralNames.
pub fn raw_san(names: &[Vec<u8>]) -> rcgen::CustomExtension {
    extension(&[2, 5, 29, 17], false, tlv(0x30, &names.concat()))
}

/// A self-signed leaf (no CA involved).
pub fn self_signed(spec: &LeafSpec) -> Leaf {
    let key = generate(spec.key);
    let cert = leaf_params(spec).self_signed(&key).unwrap();
    Leaf {
        chain_pem: cert.pem(),
        cert_pem: cert.pem(),
        der: cert.der().clone(),
        key_pem: key.serialize_pem(),
        serial: spec.serial,
        legacy_key: false,
    }
}

fn generate(kind: KeyKind) -> KeyPair {
    match kind {
        KeyKind::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyKind::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        KeyKind::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
        KeyKind::Rsa2048 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
        KeyKind::Rsa1024 => unreachable!("made by openssl"),
    }
    .unwrap()
}

fn openssl_rsa1024() -> (String, String) {
    let run = |args: &[&str], stdin: Option<&str>| -> String {
        use std::io::Write;
        let mut child = Command::new("openssl")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl is needed for the RSA-1024 case");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        } else {
            drop(child.stdin.take());
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    };
    let key = run(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
        ],
        None,
    );
    let public = run(&["pkey", "-pubout"], Some(&key));
    (key, public)
}

fn leaf_params(spec: &LeafSpec) -> CertificateParams {
    let mut params = CertificateParams::new(spec.dns.clone()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, spec.name.clone());
    if let Some(spiffe) = &spec.spiffe {
        params
            .subject_alt_names
            .push(SanType::URI(spiffe.clone().try_into().unwrap()));
    }
    params.extended_key_usages = match spec.eku {
        Eku::ClientAuth => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Eku::ServerAuthOnly => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Eku::Absent => vec![],
    };
    if spec.is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
    } else {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    params.serial_number = Some(SerialNumber::from(spec.serial));
    params
}

/// The default client rules of test brokers.
pub const RULES: &str = r#"
[[clients]]
name = "devices"
match = { spiffe = ["spiffe://test.example/device/*"] }
audiences = ["aud-a", "aud-b"]
claims = { fleet = "test" }
ttl = "10m"

[[clients]]
name = "gateways"
client_id = "gateway-client"
match = { dns = ["*.gateways.test.example"] }
"#;

/// The harness's client rules, then one that takes any trusted certificate, so that rule
/// matching never hides what validation decided.
pub fn rules_accepting_any() -> String {
    format!("{RULES}\n[[clients]]\nname = \"any\"\nmatch = {{ subject = [\"**\"] }}\n")
}

pub const ISSUER: &str = "https://broker.test/tenant";

/// A PKI, its files, and a config pointing at them.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub root: Ca,
    pub intermediate: Ca,
    pub server_ca: Ca,
    /// Serials listed in the CRL of `root` and `intermediate`.
    pub revoked: Vec<u64>,
    pub rules: String,
    pub extra_server: String,
    /// `server.shutdown_delay`: "0s" unless a test drains, so stopping a broker is quick.
    pub shutdown_delay: String,
    /// Trust a folder holding the root and the intermediate instead of a root-only file.
    pub bundle_folder: bool,
    /// Write the intermediate's CRL with a nextUpdate in the past.
    pub stale_crl: bool,
    /// Replaces the local `[signer]` section.
    pub signer: Option<String>,
    /// A `[google]` section.
    pub google: Option<String>,
    /// Replaces the client CA bundle (a file with these PEM certificates).
    pub client_ca_pem: Option<String>,
    /// Replaces the CRL files (these PEM CRLs, in order).
    pub crl_pems: Option<Vec<String>>,
    /// CRLs configured after those (PEM).
    pub extra_crl_pems: Vec<String>,
    /// Replaces the `crls` list: paths (files or folders) the test wrote itself.
    pub crl_paths: Option<Vec<String>>,
}

impl Setup {
    pub fn new() -> Setup {
        // reqwest's plain-HTTP client (for /metrics) still wants a process-wide provider.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        logs::install();
        let root = Ca::root("Test Device Root");
        let intermediate = root.intermediate("Test Device Issuing CA");
        Setup {
            dir: tempfile::tempdir().unwrap(),
            root,
            intermediate,
            server_ca: Ca::root("Test Server Root"),
            revoked: Vec::new(),
            rules: RULES.to_owned(),
            extra_server: String::new(),
            shutdown_delay: "0s".into(),
            bundle_folder: false,
            stale_crl: false,
            signer: None,
            google: None,
            client_ca_pem: None,
            crl_pems: None,
            extra_crl_pems: Vec::new(),
            crl_paths: None,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A rustls client config trusting the test server CA, presenting `leaf` if given.
    pub fn tls_config(
        &self,
        leaf: Option<&Leaf>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.server_ca.der.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
        match leaf {
            Some(leaf) => builder
                .with_client_auth_cert(leaf.chain(), leaf.key())
                .unwrap(),
            None => builder.with_no_client_auth(),
        }
    }

    /// Writes a file readable by its owner only, as a deployment keeps its keys (the
    /// broker refuses key files every user can read).
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        if contents.contains("PRIVATE KEY") {
            logs::register_key(contents);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        path
    }

    /// Writes every file and the config; returns the config path.
    pub fn write_config(&self) -> PathBuf {
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(1);
        let server = params.signed_by(&key, &self.server_ca.issuer).unwrap();
        self.write("server.pem", &server.pem());
        self.write("server-key.pem", &key.serialize_pem());
        self.write("server-ca.pem", &self.server_ca.pem);
        let client_ca = if let Some(bundle) = &self.client_ca_pem {
            self.write("client-ca.pem", bundle);
            "client-ca.pem"
        } else if self.bundle_folder {
            self.write("client-ca/root.pem", &self.root.pem);
            self.write("client-ca/issuing.crt", &self.intermediate.pem);
            self.write("client-ca/README.txt", "not a certificate: ignored");
            "client-ca"
        } else {
            // The bundle holds the root only: clients send their intermediates.
            self.write("client-ca.pem", &self.root.pem);
            "client-ca.pem"
        };
        let mut crl_files = match (&self.crl_paths, &self.crl_pems) {
            (Some(paths), _) => paths.iter().map(|p| format!("{p:?}")).collect(),
            (None, Some(crls)) => (0..crls.len())
                .map(|i| {
                    let name = format!("crl-{i}.pem");
                    self.write(&name, &crls[i]);
                    format!("{name:?}")
                })
                .collect::<Vec<_>>(),
            (None, None) => {
                self.write("root.crl.pem", &self.root.crl(&self.revoked));
                let intermediate_crl = if self.stale_crl {
                    self.intermediate
                        .crl_from(&self.revoked, now - Duration::days(8))
                } else {
                    self.intermediate.crl(&self.revoked)
                };
                self.write("intermediate.crl.pem", &intermediate_crl);
                vec![
                    r#""root.crl.pem""#.into(),
                    r#""intermediate.crl.pem""#.into(),
                ]
            }
        };
        for (i, crl) in self.extra_crl_pems.iter().enumerate() {
            let name = format!("extra-crl-{i}.pem");
            self.write(&name, crl);
            crl_files.push(format!("{name:?}"));
        }
        if !self.path("keys").exists() {
            let signing = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            self.write("keys/signing-0001.pem", &signing.serialize_pem());
        }
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
cert = "server.pem"
key = "server-key.pem"
client_ca = "{client_ca}"
crls = [{crls}]
max_body_bytes = 1024
shutdown_delay = "{shutdown_delay}"
{extra_server}

[admin]
listen = "127.0.0.1:0"

[issuer]
url = "{ISSUER}"
token_ttl = "5m"
default_audience = "aud-a"

{signer}
{google}
{rules}
"#,
            signer = self
                .signer
                .as_deref()
                .unwrap_or("[signer]\nkind = \"local\"\nkey_dir = \"keys\""),
            google = self.google.as_deref().unwrap_or_default(),
            extra_server = self.extra_server,
            shutdown_delay = self.shutdown_delay,
            client_ca = client_ca,
            crls = crl_files.join(", "),
            rules = self.rules,
        );
        self.write("config.toml", &config)
    }

    pub async fn start(self) -> TestBroker {
        let config_path = self.write_config();
        let config = Config::load(&config_path).unwrap();
        let broker = Arc::new(Broker::build(config, Arc::new(Metrics::new())).unwrap());
        let live = Arc::new(Live::new(broker, Some(config_path.clone())));
        let server = Server::bind(live.clone()).await.unwrap();
        let addr = server.local_addr().unwrap();
        let admin = server.admin_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestBroker {
            addr,
            admin,
            live,
            config_path,
            setup: self,
            stop: Some(stop),
            task: Some(task),
        }
    }
}

pub struct TestBroker {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub live: Arc<Live>,
    pub config_path: PathBuf,
    pub setup: Setup,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestBroker {
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// A TLS client trusting the test server CA, presenting `leaf` if given.
    pub fn client(&self, leaf: Option<&Leaf>) -> reqwest::Client {
        self.client_with_versions(leaf, rustls::DEFAULT_VERSIONS)
    }

    pub fn client_with_versions(
        &self,
        leaf: Option<&Leaf>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> reqwest::Client {
        let tls = self.tls_config(leaf, versions);
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    /// A rustls client config trusting the test server CA, presenting `leaf` if given.
    pub fn tls_config(
        &self,
        leaf: Option<&Leaf>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        self.setup.tls_config(leaf, versions)
    }

    /// GETs a public document (no client certificate) as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        json_of(self.client(None).get(self.url(path))).await
    }

    /// POSTs a form to /token and returns the raw response (status, headers, body).
    pub async fn post_token(&self, leaf: Option<&Leaf>, form: &str) -> reqwest::Response {
        self.client(leaf)
            .post(self.url("/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// POSTs a form to /token; returns the status and JSON body.
    pub async fn token(&self, leaf: Option<&Leaf>, form: &str) -> (u16, Value) {
        let response = self.post_token(leaf, form).await;
        assert_eq!(response.headers()["cache-control"], "no-store");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// POSTs a form to /token with curl (OpenSSL), which can present keys rustls refuses. Err on a TLS failure.
    pub async fn curl_token(&self, leaf: &Leaf, form: &str) -> Result<(u16, Value), String> {
        let dir = self.setup.dir.path();
        let id = uuid::Uuid::new_v4();
        let (cert, key) = (
            dir.join(format!("{id}.pem")),
            dir.join(format!("{id}-key.pem")),
        );
        std::fs::write(&cert, &leaf.chain_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        // Security level 0 lets OpenSSL load and use the weak key at all.
        let openssl_conf = dir.join("openssl-seclevel0.cnf");
        std::fs::write(
            &openssl_conf,
            "openssl_conf = c\n[c]\nssl_conf = s\n[s]\nsystem_default = d\n[d]\nCipherString = DEFAULT@SECLEVEL=0\n",
        )
        .unwrap();
        let mut curl = Command::new("curl");
        curl.env("OPENSSL_CONF", &openssl_conf)
            .args(["-sS", "-w", "\n%{http_code}", "--cacert"])
            .arg(self.setup.path("server-ca.pem"))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["-d", form, &self.url("/token")]);
        // curl blocks; keep it off the runtime threads the broker under test runs on.
        let out = tokio::task::spawn_blocking(move || curl.output())
            .await
            .unwrap()
            .expect("curl is needed");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        Ok((code.parse().unwrap(), serde_json::from_str(body).unwrap()))
    }

    /// The Prometheus text of the admin listener.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits (up to [`PATIENCE`]) for a sample to reach `expected`, and returns its last
    /// value: the server counts a failed handshake just after the client has seen it fail.
    pub async fn metric_eventually(&self, sample: &str, expected: f64) -> f64 {
        let mut value = self.metric(sample).await;
        let deadline = std::time::Instant::now() + PATIENCE;
        while value != expected && std::time::Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            value = self.metric(sample).await;
        }
        value
    }

    /// Value of one sample (`name{labels}`), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    /// Signals the server to shut down (as SIGTERM does) without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            logs::check_captured("an in-process broker");
        }
    }
}

/// How long a test waits for something that must happen: long enough that only a hang, never
/// a loaded machine, runs out of it. Never a measure of speed.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);
/// How often a waiting test looks again.
pub const POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Sends `request` and reads its answer as JSON.
pub async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// Polls `condition` until it holds; panics saying `what` was awaited after [`PATIENCE`].
/// For what a test must wait for (a reload, a flushed log line, a counted event) instead of
/// sleeping for a guess of how long it takes.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            std::time::Instant::now() < deadline,
            "waited {PATIENCE:?} in vain for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// A loopback port nothing listens on now (for a process that must be told its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `program` with `env`, which must succeed; the failure message carries its stderr.
pub fn run_checked<K, V>(
    program: &str,
    args: &[&str],
    env: impl IntoIterator<Item = (K, V)>,
) -> std::process::Output
where
    K: AsRef<std::ffi::OsStr>,
    V: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(program).args(args).envs(env).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Path of the built binary.
pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_token-broker"))
}

/// Runs `token-broker check-config`, which must succeed; returns what it printed.
pub fn check_config(config: &Path) -> String {
    let out = Command::new(binary())
        .args(["--log-format", "text", "-c"])
        .arg(config)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `token-broker verify-cert` on a chain; returns the parsed JSON report.
pub fn verify_cert(config: &Path, chain_pem: &str, dir: &Path) -> Value {
    let chain = dir.join(format!("chain-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&chain, chain_pem).unwrap();
    let out = Command::new(binary())
        .args(["--log-format", "text", "-c"])
        .arg(config)
        .arg("verify-cert")
        .arg(&chain)
        .output()
        .unwrap();
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 2)),
        "verify-cert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["accepted"].as_bool(), Some(code == Some(0)));
    report
}

/// `python3` that can `import {imports}`; panics naming `packages` when it cannot. Tests
/// install nothing: `bash .ci/run` does.
pub fn require_python_modules(imports: &str, packages: &[&str]) -> &'static str {
    let has = Command::new("python3")
        .args(["-c", &format!("import {imports}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has,
        "this test needs the Python packages {packages:?}: pip install {} (bash .ci/run does)",
        packages.join(" ")
    );
    "python3"
}

/// The folder holding Google's Node.js client library (`tests/node`, pinned in its
/// package-lock.json), to run `node` in so that `require("google-auth-library")` finds it;
/// panics with the command that installs it when it is not there.
pub fn require_node_modules() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules/google-auth-library/package.json")
            .is_file(),
        "this test needs Node.js 20 and npm: cd tests/node && npm ci (bash .ci/run does)"
    );
    dir
}

/// The path of an external tool the tests drive; panics naming its Debian package when it
/// is missing. Tests install nothing: `bash .ci/run` does.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "this test needs `{tool}`: install the Debian package `{package}` (bash .ci/run does)"
        )
    })
}

/// A file a Debian package installs (a PKCS#11 module), required like [`require_tool`].
pub fn require_file(path: &str, package: &str) -> PathBuf {
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "this test needs {}: install the Debian package `{package}` (bash .ci/run does)",
        path.display()
    );
    path
}
