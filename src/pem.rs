//! Reading certificates, keys and CRLs from files (rustls-pki-types' PEM parser).

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path} holds a private key but every user of this machine can {what} it (mode {mode:03o}); run `chmod 600 {path}` (or `chmod 640` with a group only the broker is in)", path = path.display(), what = if mode & 0o002 != 0 { "write" } else { "read" })]
    Exposed { path: PathBuf, mode: u32 },
}

fn invalid(path: &Path, message: impl Into<String>) -> PemError {
    PemError::Invalid {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The permission bits (`mode & 0o777`) of `path`; 0o600 where files have no Unix modes.
/// Symlinks are followed, so a Kubernetes secret mount is judged by the file it points to.
pub fn file_mode(path: &Path) -> std::io::Result<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).map(|_| 0o600)
    }
}

/// Reads a file holding a private key (server key, signing key, Google key file). A file
/// every user can read or write is refused: its key must be presumed stolen or
/// replaceable. Group access only warns, because `root:ssl-cert 0640` is a common, sound
/// layout. The bytes are wiped when dropped.
pub fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, PemError> {
    let read_error = |source| PemError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = file_mode(path).map_err(read_error)?;
    if mode & 0o006 != 0 {
        return Err(PemError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    if mode & 0o060 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:03o}"),
            "private key file is readable by its group; make sure only the broker is in that group"
        );
    }
    std::fs::read(path).map(Zeroizing::new).map_err(read_error)
}

/// All certificates of a PEM file, in file order; at least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Certificates from a PEM file, or from every `*.pem`/`*.crt` file of a folder (sorted).
pub fn certificate_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    if !path.is_dir() {
        return certificates(path);
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| PemError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file = entry.path();
        let is_cert = matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("pem" | "crt" | "cer")
        );
        if is_cert && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    let mut certs = Vec::new();
    for file in &files {
        certs.extend(certificates(file)?);
    }
    if certs.is_empty() {
        return Err(invalid(
            path,
            "folder holds no *.pem, *.crt or *.cer certificate",
        ));
    }
    Ok(certs)
}

/// The one private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn private_key(path: &Path) -> Result<Zeroizing<PrivateKeyDer<'static>>, PemError> {
    let bytes = read_secret(path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map(Zeroizing::new)
        .map_err(|e| invalid(path, format!("no usable private key: {e}")))
}

/// A CRL in PEM (`X509 CRL`) or DER form.
pub fn crl(path: &Path) -> Result<CertificateRevocationListDer<'static>, PemError> {
    let bytes = read(path)?;
    if bytes.starts_with(b"-----") || bytes.iter().take(64).all(u8::is_ascii) {
        CertificateRevocationListDer::from_pem_slice(&bytes)
            .map_err(|e| invalid(path, format!("bad PEM CRL: {e}")))
    } else {
        Ok(CertificateRevocationListDer::from(bytes))
    }
}
