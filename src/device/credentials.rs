//! Where the device's certificate and key come from (PEM files, or objects in a PKCS#11
//! token), loaded into what TLS presents, and a fingerprint of their current state: a
//! long-running agent compares it before each token request and notices a renewal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::CertificateDer;
use sha2::Digest;
use zeroize::Zeroizing;

use crate::clock::unix_now;
use crate::device::error::ClientError;
use crate::device::pkcs11::{Module, Pin, Pkcs11Uri, Token, TokenKey, PIN_ENV};
use crate::identity::Identity;
use crate::pem;

/// A certificate or key: a file, or an object in a PKCS#11 token.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Token(Box<Pkcs11Uri>),
}

impl Source {
    /// A `--cert`/`--key` value: an RFC 7512 `pkcs11:` URI, else a file name.
    pub fn parse(value: &Path) -> Result<Source, ClientError> {
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
    /// Whether the key can still sign (a token's session can break: token removed).
    pub fn usable(&self) -> bool {
        self.token_key.as_ref().is_none_or(TokenKey::usable)
    }

    pub fn stamp(&self) -> [u8; 32] {
        self.stamp
    }
}

fn local(e: impl std::fmt::Display) -> ClientError {
    ClientError::Local(e.to_string())
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
    /// belongs to it (a signature made with the key verifies with the certificate).
    pub fn load(&self) -> Result<Loaded, ClientError> {
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
                let key = self.token(uri)?.private_key(uri).map_err(local)?;
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
        self.snapshot(loaded.cert_token.as_ref())
            .map(|(stamp, _)| stamp)
    }

    /// The fingerprint of the certificate, chain and key as they are now, without loading
    /// them: what `token --cache` binds its tokens to.
    pub fn certificate_stamp(&self) -> Result<[u8; 32], ClientError> {
        self.snapshot(None).map(|(stamp, _)| stamp)
    }

    /// The stamp and the certificate bytes it covers (PEM file or DER from the token).
    fn snapshot(&self, cert_token: Option<&Token>) -> Result<([u8; 32], Vec<u8>), ClientError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| local(format!("cannot read {}: {e}", path.display())))
        };
        let cert_bytes = match (&self.cert, cert_token) {
            (Source::Token(uri), Some(token)) => token.certificate(uri).map_err(local)?,
            (Source::Token(uri), None) => self.token(uri)?.certificate(uri).map_err(local)?,
            (Source::File(path), _) => read(path)?,
        };
        let mut hash = sha2::Sha256::new();
        hash.update(&cert_bytes);
        if let Some(path) = &self.chain {
            hash.update(read(path)?);
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

    /// The token `uri` names, logged in with the configured PIN.
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
        let pin = match (
            self.pkcs11.pin_file.as_deref(),
            uri.pin_source(),
            &self.pkcs11.pin_env,
        ) {
            (Some(path), _, _) | (None, Some(path), _) => {
                check_private(path, "PIN file")?;
                Some(Pin::from_file(path).map_err(local)?)
            }
            (None, None, Some(text)) => Some(Pin::from_text(text.clone())),
            (None, None, None) => None,
        };
        module.open(uri, pin.as_ref()).map_err(local)
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
