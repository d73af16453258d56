//! The development PKI: a root CA, a localhost server certificate, one device certificate,
//! an empty CRL and an ES256 signing key, all made with rcgen. For trying the broker out
//! only: the CA key sits next to the certificates it signs.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

pub const DEV_TRUST_DOMAIN: &str = "dev.token-broker.local";

#[derive(Debug, thiserror::Error)]
pub enum DevPkiError {
    #[error("{0} already exists; use --force to overwrite")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Where `init` put things (names are fixed so `config.toml` can point at them).
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn device_cert(&self) -> PathBuf {
        self.dir.join("device.pem")
    }
    pub fn device_key(&self) -> PathBuf {
        self.dir.join("device-key.pem")
    }

    /// A ready-to-paste command that fetches a token with the device certificate.
    pub fn curl_command(&self, token_url: &str) -> String {
        format!(
            "curl --cacert {} --cert {} --key {} -d grant_type=client_credentials {token_url}",
            self.ca().display(),
            self.device_cert().display(),
            self.device_key().display()
        )
    }
}

const FILES: &[&str] = &[
    "ca.pem",
    "ca-key.pem",
    "ca.crl.pem",
    "server.pem",
    "server-key.pem",
    "device.pem",
    "device-key.pem",
    "keys/signing-0001.pem",
];

pub fn init(dir: &Path, force: bool) -> Result<DevPki, DevPkiError> {
    if !force {
        if let Some(existing) = FILES.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
            return Err(DevPkiError::Exists(existing));
        }
    }
    let now = OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "token-broker development root CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "token-broker (development only)");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(3650);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let (server_cert, server_key) = issue_leaf(
        &issuer,
        "localhost",
        vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (device_cert, device_key) = issue_device(&issuer, "dev-device-1")?;

    let crl = CertificateRevocationListParams {
        this_update: now - Duration::hours(1),
        next_update: now + Duration::days(365),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;

    let signing_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;

    const SECRET: bool = true;
    const PUBLIC: bool = false;
    let files: [(&str, String, bool); 8] = [
        ("ca.pem", ca_cert.pem(), PUBLIC),
        ("ca-key.pem", issuer.key().serialize_pem(), SECRET),
        ("ca.crl.pem", crl.pem()?, PUBLIC),
        ("server.pem", server_cert.pem(), PUBLIC),
        ("server-key.pem", server_key.serialize_pem(), SECRET),
        ("device.pem", device_cert.pem(), PUBLIC),
        ("device-key.pem", device_key.serialize_pem(), SECRET),
        ("keys/signing-0001.pem", signing_key.serialize_pem(), SECRET),
    ];
    for (name, contents, is_secret) in files {
        write(&dir.join(name), contents.as_bytes(), is_secret)?;
    }
    Ok(DevPki {
        dir: dir.to_path_buf(),
    })
}

/// A device certificate like `init`'s (DNS and SPIFFE SANs, clientAuth), for `name`; the
/// benchmarks make many with it (`examples/bench_devices.rs`).
pub fn issue_device(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
) -> Result<(rcgen::Certificate, KeyPair), DevPkiError> {
    issue_leaf(
        issuer,
        name,
        vec![
            SanType::DnsName(format!("{name}.devices.{DEV_TRUST_DOMAIN}").try_into()?),
            SanType::URI(format!("spiffe://{DEV_TRUST_DOMAIN}/device/{name}").try_into()?),
        ],
        ExtendedKeyUsagePurpose::ClientAuth,
    )
}

/// A P-256 leaf valid for a year, signed by the development CA.
fn issue_leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> Result<(rcgen::Certificate, KeyPair), DevPkiError> {
    let now = OffsetDateTime::now_utc();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![usage];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(365);
    Ok((params.signed_by(&key, issuer)?, key))
}

/// The shipped `config.toml`, the starting config `init --config` writes.
const SHIPPED_CONFIG: &str = include_str!("../config.toml");

/// `init`: the PKI in `dir` and, when no file is at `config` (an existing config is never
/// replaced, `force` or not), the shipped commented config there with its development
/// paths pointing at `dir`. Says whether it wrote the config.
pub fn init_with_config(
    dir: &Path,
    config: &Path,
    force: bool,
) -> Result<(DevPki, bool), DevPkiError> {
    let pki = init(dir, force)?;
    if config.exists() {
        return Ok((pki, false));
    }
    write(config, starting_config(dir, config).as_bytes(), false)?;
    Ok((pki, true))
}

/// The shipped config with `certs/dev` replaced by `dir` as seen from `config`'s folder
/// (relative when `dir` is under it, else absolute).
fn starting_config(dir: &Path, config: &Path) -> String {
    let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let dir = absolute(dir);
    let folder = absolute(config)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let seen = match dir.strip_prefix(&folder) {
        Ok(inside) if inside.as_os_str().is_empty() => Path::new("."),
        Ok(inside) => inside,
        Err(_) => &dir,
    };
    let seen = seen
        .to_string_lossy()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    format!(
        "# Written by `token-broker init`: a development starting point, beside the\n\
         # development PKI it names. For production see README.md, \"Pointing it at your PKI\".\n\n{}",
        SHIPPED_CONFIG.replace("\"certs/dev", &format!("\"{seen}"))
    )
}

/// Writes a file, private keys readable by the owner only.
fn write(path: &Path, contents: &[u8], secret: bool) -> Result<(), DevPkiError> {
    let error = |source| DevPkiError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(error)?;
    #[cfg(unix)]
    {
        // `mode` only applies to new files; `--force` may be rewriting a looser one.
        use std::os::unix::fs::PermissionsExt;
        let mode = if secret { 0o600 } else { 0o644 };
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(error)?;
    }
    file.write_all(contents).map_err(error)
}
/// `serve`'s start with `[dev] pki_dir` set: the first time, creates the development PKI
/// there and prints, loudly, that it is for development only and how to try it; every
/// time, warns that it is in use.
pub fn prepare(config: &crate::config::Config) -> Result<(), DevPkiError> {
    let Some(dir) = &config.dev.pki_dir else {
        return Ok(());
    };
    let dir = config.path(dir);
    if !dir.exists() {
        let pki = init(&dir, false)?;
        crate::console::eprintln(&format!(
            "\n*** DEVELOPMENT ONLY: created a development PKI and signing key in {} ***\n\
             *** Its CA key sits next to its certificates. Never use it in production. ***\n\
             \nTry it:\n  {}\n",
            dir.display(),
            pki.curl_command(&config.issuer.endpoint("/token"))
        ));
    }
    tracing::warn!(dir = %dir.display(), "development PKI in use ([dev] pki_dir is set): not for production");
    Ok(())
}
