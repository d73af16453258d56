//! Where the device's certificate and key come from (PEM files, or objects in a PKCS#11
//! token), loaded into what TLS presents, and a fingerprint of their current state: a
//! long-running agent compares it before each token request and notices a renewal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::CertificateDer;
use sha2::Digest;
use zeroize::Zeroizing;

use crate::clock::unix_now;
use crate::device::error::ClientError;
use crate::device::pkcs11::{
    off_the_runtime, Module, Pin, Pkcs11Error, Pkcs11Uri, Token, TokenKey, PIN_ENV,
};
use crate::identity::Identity;
use crate::pem;

/// A certificate or key: a file, or an object in a PKCS#11 token.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Token(Box<Pkcs11Uri>),
}

impl Source {
    /// A `--cert`/`--key` value: an RFC 7512 `pkcs11:` URI, else a file name. A value
    /// carrying `pin-value` is refused before anything else, URI or not (a mistyped scheme
    /// would otherwise make it a file name, repeated in the error).
    pub fn parse(value: &Path) -> Result<Source, ClientError> {
        if Pkcs11Uri::has_pin_value(&value.to_string_lossy()) {
            return Err(ClientError::Local(Pkcs11Error::PinInUri.to_string()));
        }
        match value.to_str().filter(|text| Pkcs11Uri::is_uri(text)) {
            Some(text) => Pkcs11Uri::parse(text)
                .map(|uri| Source::Token(Box::new(uri)))
                .map_err(|e| ClientError::Local(e.to_string())),
            None => Ok(Source::File(value.to_owned())),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::Token(uri) => uri.shown().to_owned(),
        }
    }
}

/// How to reach a PKCS#11 module and log in to its token.
#[derive(Default)]
pub struct Pkcs11Options {
    /// The module; else the URI's `module-path`, else p11-kit's proxy.
    pub module: Option<PathBuf>,
    /// The PIN file; else the URI's `pin-source`, else `pin_env`.
    pub pin_file: Option<PathBuf>,
    /// The value of [`PIN_ENV`], when set.
    pub pin_env: Option<Zeroizing<String>>,
}

impl Pkcs11Options {
    /// Options with the PIN from [`PIN_ENV`] if the environment has it.
    pub fn from_env(module: Option<PathBuf>, pin_file: Option<PathBuf>) -> Pkcs11Options {
        Pkcs11Options {
            module,
            pin_file,
            pin_env: std::env::var(PIN_ENV).ok().map(Zeroizing::new),
        }
    }
}

/// The device's certificate and key, as configured.
pub struct DeviceCredentials {
    cert: Source,
    /// Intermediates sent after a certificate from a token (a token holds the leaf).
    chain: Option<PathBuf>,
    key: Source,
    pkcs11: Pkcs11Options,
    /// Loaded once per process: a module refuses a second initialization.
    module: Mutex<Option<Module>>,
    /// PIN sources whose PIN a token refused, as they were then: not tried again.
    refused: Mutex<Vec<PinOrigin>>,
    /// When a broken token may be opened again, and why the last attempt failed.
    healing: Mutex<Healing>,
}

/// Where a PIN was read from, as it was then: a refused PIN is tried again only once this
/// differs (the file replaced or rewritten; the environment is a new process's).
#[derive(Debug, Clone, PartialEq, Eq)]
enum PinOrigin {
    File { path: PathBuf, version: Vec<u64> },
    Env,
}

impl PinOrigin {
    fn file(path: &Path) -> PinOrigin {
        let version = match std::fs::metadata(path) {
            #[cfg(unix)]
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                [
                    meta.dev(),
                    meta.ino(),
                    meta.size(),
                    meta.mtime() as u64,
                    meta.mtime_nsec() as u64,
                    meta.ctime() as u64,
                    meta.ctime_nsec() as u64,
                ]
                .to_vec()
            }
            #[cfg(not(unix))]
            Ok(meta) => vec![
                meta.len(),
                meta.modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos() as u64),
            ],
            Err(_) => Vec::new(),
        };
        PinOrigin::File {
            path: path.to_owned(),
            version,
        }
    }

    fn describe(&self) -> String {
        match self {
            PinOrigin::File { path, .. } => format!("the PIN file {}", path.display()),
            PinOrigin::Env => format!("{PIN_ENV} (a new process's environment)"),
        }
    }
}

/// Opening a broken token again: at most once per backoff period.
#[derive(Default)]
struct Healing {
    failures: u32,
    /// Not before this; the last attempt's error.
    wait: Option<(Instant, String)>,
}

/// The wait after `failures` failed attempts to open a broken token again: 1 s, doubling,
/// at most a minute.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// What one load produced, and what it was made from.
pub struct Loaded {
    pub certified: Arc<CertifiedKey>,
    pub identity: Identity,
    stamp: [u8; 32],
    /// The token the certificate was read from, to read it again for the stamp.
    cert_token: Option<Token>,
    token_key: Option<TokenKey>,
}

impl Loaded {
    /// Whether the key can still sign and the certificate be read (a token's session can
    /// break: token removed, re-created, logged out).
    pub fn usable(&self) -> bool {
        self.token_key.as_ref().is_none_or(TokenKey::usable)
            && self
                .cert_token
                .as_ref()
                .is_none_or(|token| token.failure().is_none())
    }

    /// The key in a token, if it is in one: its failure explains a failed handshake.
    pub fn token_key(&self) -> Option<TokenKey> {
        self.token_key.clone()
    }

    pub fn stamp(&self) -> [u8; 32] {
        self.stamp
    }
}

fn local(e: impl std::fmt::Display) -> ClientError {
    ClientError::Local(e.to_string())
}

fn read_file(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| local(format!("cannot read {}: {e}", path.display())))
}

impl DeviceCredentials {
    pub fn new(
        cert: Source,
        chain: Option<PathBuf>,
        key: Source,
        pkcs11: Pkcs11Options,
    ) -> DeviceCredentials {
        DeviceCredentials {
            cert,
            chain,
            key,
            pkcs11,
            module: Mutex::new(None),
            refused: Mutex::new(Vec::new()),
            healing: Mutex::new(Healing::default()),
        }
    }

    /// PEM files only (no token).
    pub fn files(cert: &Path, key: &Path) -> DeviceCredentials {
        DeviceCredentials::new(
            Source::File(cert.to_owned()),
            None,
            Source::File(key.to_owned()),
            Pkcs11Options::default(),
        )
    }

    /// Reads everything and checks it: the certificate is current, the key is usable and
    /// belongs to it (a signature made with the key verifies with the certificate). Off the
    /// runtime's workers: files, and every call into a PKCS#11 module, block.
    pub fn load(&self) -> Result<Loaded, ClientError> {
        off_the_runtime(|| self.load_now())
    }

    /// Loads again after `previous`: a renewal when `previous` still works; else its token
    /// broke (removed, re-created, logged out, a module failure), and the module is
    /// initialized again and everything found anew, at most once per backoff period
    /// (1 s doubling to a minute; in between, the last attempt's error at once).
    pub fn reload(&self, previous: &Loaded) -> Result<Loaded, ClientError> {
        if previous.usable() {
            return self.load();
        }
        off_the_runtime(|| {
            let mut healing = self
                .healing
                .lock()
                .map_err(|_| local("PKCS#11 token: an earlier use panicked"))?;
            if let Some((at, error)) = &healing.wait {
                let left = at.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    return Err(ClientError::Local(format!(
                        "{error} (the PKCS#11 token is opened again in {} s at the earliest)",
                        left.as_secs() + 1
                    )));
                }
            }
            let module = self.module.lock().ok().and_then(|m| m.clone());
            let result = match module.map(|m| m.reinitialize()) {
                Some(Err(error)) => Err(local(error)),
                _ => self.load_now(),
            };
            match &result {
                Ok(_) => *healing = Healing::default(),
                Err(error) => {
                    healing.failures = healing.failures.saturating_add(1);
                    healing.wait = Some((
                        Instant::now() + backoff(healing.failures),
                        error.to_string(),
                    ));
                }
            }
            result
        })
    }

    fn load_now(&self) -> Result<Loaded, ClientError> {
        // The key first: its login, which PKCS#11 shares between the sessions of a token,
        // also shows a certificate kept private in the same token.
        let key_token = match &self.key {
            Source::Token(uri) => {
                let token = self.token(uri)?;
                self.log_in(&token, uri)?;
                Some(token)
            }
            Source::File(_) => None,
        };
        let cert_token = match &self.cert {
            Source::Token(uri) => Some(self.token(uri)?),
            Source::File(_) => None,
        };
        // The stamp is taken from what is loaded, so a change after this is noticed.
        let (stamp, cert_bytes) = self.snapshot(cert_token.as_ref())?;
        let mut chain = match &self.cert {
            Source::File(path) => pem::certificates_in(&cert_bytes, path).map_err(local)?,
            Source::Token(_) => vec![CertificateDer::from(cert_bytes)],
        };
        if let Some(path) = &self.chain {
            chain.extend(pem::certificates(path).map_err(local)?);
        }
        let cert_name = self.cert.describe();
        let leaf = chain
            .first()
            .ok_or_else(|| local(format!("{cert_name}: no certificate")))?;
        let identity = Identity::from_der(leaf).map_err(|e| local(format!("{cert_name}: {e}")))?;
        if identity.not_after < unix_now() {
            return Err(ClientError::Local(format!(
                "certificate {cert_name} expired at {}; renew it with your PKI",
                crate::clock::rfc3339(identity.not_after)
            )));
        }
        let (key, token_key): (Arc<dyn SigningKey>, Option<TokenKey>) = match &self.key {
            Source::File(path) => {
                check_private(path, "key")?;
                let der = pem::private_key(path).map_err(local)?;
                let key = crate::crypto::provider()
                    .key_provider
                    .load_private_key(der.clone_key())
                    .map_err(|e| local(format!("{}: unusable private key: {e}", path.display())))?;
                (key, None)
            }
            Source::Token(uri) => {
                let token = match key_token {
                    Some(token) => token,
                    None => self.token(uri)?,
                };
                let key = token.private_key(uri).map_err(local)?;
                (Arc::new(key.clone()), Some(key))
            }
        };
        check_fit(leaf, key.as_ref()).map_err(|reason| {
            ClientError::Local(format!(
                "certificate {cert_name} and key {} do not fit together: {reason}",
                self.key.describe()
            ))
        })?;
        Ok(Loaded {
            certified: Arc::new(CertifiedKey::new(chain, key)),
            identity,
            stamp,
            cert_token,
            token_key,
        })
    }

    /// The fingerprint of the certificate, chain and key as they are now, to compare with
    /// [`Loaded::stamp`]: cheap (small files read, the key file only stat'ed).
    pub fn current_stamp(&self, loaded: &Loaded) -> Result<[u8; 32], ClientError> {
        off_the_runtime(|| {
            self.snapshot(loaded.cert_token.as_ref())
                .map(|(stamp, _)| stamp)
        })
    }

    /// The fingerprint of the certificate, chain and key as they are now, without loading
    /// them: what `token --cache` binds its tokens to.
    /// A certificate that is a private object of its token is not read (that would log in
    /// a second time in the run, and try a wrong PIN twice): no stamp, so no cache.
    pub fn certificate_stamp(&self) -> Result<[u8; 32], ClientError> {
        let cert_bytes = match &self.cert {
            Source::Token(uri) => self.token(uri)?.certificate(uri).map_err(local)?,
            Source::File(path) => read_file(path)?,
        };
        self.stamp(cert_bytes).map(|(stamp, _)| stamp)
    }

    /// The stamp and the certificate bytes it covers (PEM file or DER from the token).
    fn snapshot(&self, cert_token: Option<&Token>) -> Result<([u8; 32], Vec<u8>), ClientError> {
        let cert_bytes = match (&self.cert, cert_token) {
            (Source::Token(uri), Some(token)) => self.certificate(token, uri)?,
            (Source::Token(uri), None) => self.certificate(&self.token(uri)?, uri)?,
            (Source::File(path), _) => read_file(path)?,
        };
        self.stamp(cert_bytes)
    }

    /// The fingerprint of `cert_bytes`, the chain file and the key file's identity, with the
    /// certificate bytes.
    fn stamp(&self, cert_bytes: Vec<u8>) -> Result<([u8; 32], Vec<u8>), ClientError> {
        let mut hash = sha2::Sha256::new();
        hash.update(&cert_bytes);
        if let Some(path) = &self.chain {
            hash.update(read_file(path)?);
        }
        if let Source::File(path) = &self.key {
            // The key is not read here: its file's identity and age stand for it.
            let meta = std::fs::metadata(path)
                .map_err(|e| local(format!("cannot read key {}: {e}", path.display())))?;
            hash.update(meta.len().to_be_bytes());
            if let Ok(modified) = meta.modified() {
                hash.update(format!("{modified:?}"));
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                hash.update(meta.ino().to_be_bytes());
                hash.update(meta.dev().to_be_bytes());
            }
        }
        Ok((hash.finalize().into(), cert_bytes))
    }

    /// The certificate `uri` names in `token`. A certificate is a public object, read
    /// without logging in; only a token that keeps it private, and for which a PIN is
    /// configured, is logged in to (once: see [`DeviceCredentials::log_in`]).
    fn certificate(&self, token: &Token, uri: &Pkcs11Uri) -> Result<Vec<u8>, ClientError> {
        match token.certificate(uri) {
            Err(not_found @ Pkcs11Error::NotFound { .. }) => {
                if token.needs_login().map_err(local)? && self.pin_origin(uri).is_some() {
                    self.log_in(token, uri)?;
                    token.certificate(uri).map_err(local)
                } else {
                    Err(local(not_found))
                }
            }
            other => other.map_err(local),
        }
    }

    /// The token `uri` names, with a session not logged in.
    fn token(&self, uri: &Pkcs11Uri) -> Result<Token, ClientError> {
        let module = {
            let mut module = self
                .module
                .lock()
                .map_err(|_| local("PKCS#11 module: an earlier use panicked"))?;
            match &*module {
                Some(loaded) => loaded.clone(),
                None => {
                    let path = self.pkcs11.module.as_deref().or_else(|| self.uri_module());
                    let loaded = Module::load(path).map_err(local)?;
                    *module = Some(loaded.clone());
                    loaded
                }
            }
        };
        module.open(uri).map_err(local)
    }

    /// Where the PIN for `uri` comes from: `--pkcs11-pin-file`, the URI's `pin-source`,
    /// [`PIN_ENV`].
    fn pin_origin(&self, uri: &Pkcs11Uri) -> Option<PinOrigin> {
        match (
            self.pkcs11.pin_file.as_deref(),
            uri.pin_source(),
            &self.pkcs11.pin_env,
        ) {
            (Some(path), _, _) | (None, Some(path), _) => Some(PinOrigin::file(path)),
            (None, None, Some(_)) => Some(PinOrigin::Env),
            (None, None, None) => None,
        }
    }

    /// Logs in to `token` if it needs it, with the configured PIN: tried once. A PIN the
    /// token refused is not tried again (no `C_Login`) until its source changes, so a
    /// wrong PIN never uses up the token's tries, however often it is asked.
    fn log_in(&self, token: &Token, uri: &Pkcs11Uri) -> Result<(), ClientError> {
        if !token.needs_login().map_err(local)? {
            return Ok(());
        }
        let origin = self.pin_origin(uri).ok_or_else(|| {
            local(Pkcs11Error::PinNeeded {
                token: token.label().to_owned(),
            })
        })?;
        let mut refused = self
            .refused
            .lock()
            .map_err(|_| local("PKCS#11 login: an earlier use panicked"))?;
        if refused.contains(&origin) {
            return Err(local(Pkcs11Error::PinRefusedBefore {
                token: token.label().to_owned(),
                pin_from: origin.describe(),
            }));
        }
        let pin = match &origin {
            PinOrigin::File { path, .. } => {
                check_private(path, "PIN file")?;
                Pin::from_file(path).map_err(local)?
            }
            PinOrigin::Env => match &self.pkcs11.pin_env {
                Some(text) => Pin::from_text(text.clone()),
                None => {
                    return Err(local(Pkcs11Error::PinNeeded {
                        token: token.label().to_owned(),
                    }))
                }
            },
        };
        match token.login(&pin, &origin.describe()) {
            Ok(()) => Ok(()),
            Err(error @ (Pkcs11Error::WrongPin { .. } | Pkcs11Error::PinLocked { .. })) => {
                tracing::warn!(token = token.label(), pin = %origin.describe(), "PKCS#11 token refused the configured PIN; not tried again until it changes");
                refused.push(origin);
                Err(local(error))
            }
            Err(error) => Err(local(error)),
        }
    }

    /// The module named in the key's URI, else in the certificate's.
    fn uri_module(&self) -> Option<&Path> {
        [&self.key, &self.cert]
            .into_iter()
            .find_map(|source| match source {
                Source::Token(uri) => uri.module_path(),
                Source::File(_) => None,
            })
    }
}

/// A private key (or a token's PIN) anyone but its owner can read is refused, stricter than
/// the server (which allows a group): on a device the key is its whole identity and has one
/// user.
pub(crate) fn check_private(path: &Path, what: &str) -> Result<(), ClientError> {
    let mode = pem::file_mode(path)
        .map_err(|e| ClientError::Local(format!("cannot read {what} {}: {e}", path.display())))?;
    if mode & 0o077 != 0 {
        return Err(ClientError::Local(format!(
            "{what} {} is readable by others (mode {mode:03o}); run: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Whether `key` signs for the public key of certificate `leaf`: each kind of signature TLS
/// may ask of it (for RSA both PSS and PKCS#1, which are different operations in a
/// module) made once and checked with the certificate. Also proves, before any
/// connection, that a token signs at all (PIN, mechanisms).
fn check_fit(leaf: &CertificateDer<'_>, key: &dyn SigningKey) -> Result<(), String> {
    use rustls::SignatureScheme as S;
    let algorithms = crate::crypto::provider().signature_verification_algorithms;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("{e:?}"))?;
    let message = b"token-broker: does this key belong to the device certificate?";
    let mut checked = 0;
    for scheme in [
        S::ECDSA_NISTP256_SHA256,
        S::ECDSA_NISTP384_SHA384,
        S::ED25519,
        S::RSA_PSS_SHA256,
        S::RSA_PKCS1_SHA256,
    ] {
        let Some(signer) = key.choose_scheme(&[scheme]) else {
            continue;
        };
        let signature = signer.sign(message).map_err(|e| e.to_string())?;
        let verifies = algorithms
            .mapping
            .iter()
            .filter(|(mapped, _)| *mapped == scheme)
            .flat_map(|(_, algs)| algs.iter())
            .any(|alg| cert.verify_signature(*alg, message, &signature).is_ok());
        if !verifies {
            return Err(format!(
                "the key's {scheme:?} signature does not verify with the certificate's public key"
            ));
        }
        checked += 1;
    }
    if checked == 0 {
        return Err("the key can make no signature TLS accepts".into());
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_broken_token_is_opened_again_at_most_once_per_backoff() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), Duration::from_secs(60));
    }

    /// A device certificate and key in PEM files in `dir`.
    fn pem_files(dir: &Path) -> (PathBuf, PathBuf, String) {
        let made = rcgen::generate_simple_self_signed(vec!["device.example".into()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert, key, made.cert.pem())
    }

    /// Runs `read` (which reads the certificate) on a one-worker runtime while the
    /// certificate is a FIFO that another task of that runtime writes: it completes only if
    /// `read` leaves the worker to that task (without `block_in_place` it waits until the
    /// watchdog writes, and the test fails).
    fn read_with_one_worker<T: Send + 'static>(
        fifo: &Path,
        pem: String,
        read: impl FnOnce() -> T + Send + 'static,
    ) -> (bool, T) {
        std::fs::remove_file(fifo).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let other_ran = Arc::new(AtomicBool::new(false));
        let watchdog = (fifo.to_owned(), other_ran.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(10));
            if !watchdog.1.load(Ordering::SeqCst) {
                // Unblocks the read, then takes what the late writer writes.
                let _ = std::fs::write(&watchdog.0, "watchdog");
                let _ = std::fs::read(&watchdog.0);
            }
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let (fifo, ran) = (fifo.to_owned(), other_ran.clone());
        runtime.block_on(async move {
            tokio::spawn(async move {
                // Spawned from the worker: queued behind the blocking read, on its worker.
                let writer = tokio::spawn(async move {
                    ran.store(true, Ordering::SeqCst);
                    std::fs::write(&fifo, pem).unwrap();
                });
                let result = read();
                // Whether the other task ran while the read waited.
                let ran_meanwhile = other_ran.load(Ordering::SeqCst);
                writer.await.unwrap();
                (ran_meanwhile, result)
            })
            .await
            .unwrap()
        })
    }

    #[test]
    fn loading_and_looking_for_a_renewal_leave_the_runtime_to_other_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, pem) = pem_files(dir.path());
        let credentials = Arc::new(DeviceCredentials::files(&cert, &key));
        let loaded = credentials.load().unwrap();
        let stamp = loaded.stamp();

        let looking = credentials.clone();
        let (other_ran, current) =
            read_with_one_worker(&cert, pem.clone(), move || looking.current_stamp(&loaded));
        assert!(other_ran, "the renewal check blocked the runtime");
        assert_eq!(current.unwrap(), stamp);

        let loading = credentials.clone();
        let (other_ran, reloaded) = read_with_one_worker(&cert, pem, move || loading.load());
        assert!(other_ran, "loading blocked the runtime");
        assert_eq!(reloaded.unwrap().stamp(), stamp);
    }
}
