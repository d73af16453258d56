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
    #[error("{path} holds {holds} but every user of this machine can {what} it (mode {mode:03o}); run `chmod 600 {path}` (or `chmod 640` with a group only the broker is in)", path = path.display(), what = if mode & 0o002 != 0 { "write" } else { "read" })]
    Exposed {
        path: PathBuf,
        mode: u32,
        holds: &'static str,
    },
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

/// What a private key file holds, in [`read_secret`]'s messages.
pub const PRIVATE_KEY: &str = "a private key";

/// Reads a file holding a private key (server key, signing key, Google key file): see
/// [`read_secret_holding`].
pub fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, PemError> {
    read_secret_holding(path, PRIVATE_KEY)
}

/// Reads a secret file, which holds `holds` (said in the refusal and the warning). The one
/// rule for every secret the broker reads (keys, session ticket keys): a file every user can
/// read or write is refused, since its secret must be presumed stolen or replaceable. Group
/// access only warns, because a group only the broker is in (`root:token-broker 0640`, a
/// Kubernetes Secret under the pod's `fsGroup`, which is always group-readable) is a common,
/// sound layout. The bytes are wiped when dropped.
pub fn read_secret_holding(
    path: &Path,
    holds: &'static str,
) -> Result<Zeroizing<Vec<u8>>, PemError> {
    let read_error = |source| PemError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = file_mode(path).map_err(read_error)?;
    if mode & 0o006 != 0 {
        return Err(PemError::Exposed {
            path: path.to_owned(),
            mode,
            holds,
        });
    }
    if mode & 0o060 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:03o}"),
            holds,
            "secret file is readable by its group; make sure only the broker is in that group"
        );
    }
    std::fs::read(path).map(Zeroizing::new).map_err(read_error)
}

/// All certificates of a PEM file, in file order; at least one.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    certificates_in(&read(path)?, path)
}

/// All certificates of PEM `bytes` read from `path`, in order; at least one.
pub fn certificates_in(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Certificates from a PEM file, or from every `*.pem`/`*.crt`/`*.cer` file of a folder
/// (sorted).
pub fn certificate_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    if !path.is_dir() {
        return certificates(path);
    }
    let mut certs = Vec::new();
    for file in folder_files(path, &["pem", "crt", "cer"])? {
        certs.extend(certificates(&file)?);
    }
    if certs.is_empty() {
        return Err(invalid(
            path,
            "folder holds no *.pem, *.crt or *.cer certificate",
        ));
    }
    Ok(certs)
}

/// The files of `folder` with one of `extensions`, sorted (so the order never depends on
/// the file system).
fn folder_files(folder: &Path, extensions: &[&str]) -> Result<Vec<PathBuf>, PemError> {
    let read_error = |source| PemError::Read {
        path: folder.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(read_error)? {
        let file = entry.map_err(read_error)?.path();
        let wanted = file
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| extensions.contains(&e));
        if wanted && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// The one private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn private_key(path: &Path) -> Result<Zeroizing<PrivateKeyDer<'static>>, PemError> {
    let bytes = read_secret(path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map(Zeroizing::new)
        .map_err(|e| invalid(path, format!("no usable private key: {e}")))
}

/// One CRL as read from a file, and where it came from.
pub struct CrlBlock {
    pub der: CertificateRevocationListDer<'static>,
    /// The file, with `#n` (the n-th CRL of the file) when the file holds several.
    pub source: String,
}

/// Every CRL of a file or of a folder's `*.pem`/`*.crl`/`*.der` files (sorted): a PEM file
/// holds any number of `X509 CRL` blocks (a bundle, as many CAs publish them), a DER file
/// one. A file without a CRL is an error: reading only part of what an operator configured
/// would silently leave certificates unchecked.
pub fn crls(path: &Path) -> Result<Vec<CrlBlock>, PemError> {
    if !path.is_dir() {
        return crl_file(path);
    }
    let mut crls = Vec::new();
    for file in folder_files(path, &["pem", "crl", "der"])? {
        crls.extend(crl_file(&file)?);
    }
    if crls.is_empty() {
        return Err(invalid(path, "folder holds no *.pem, *.crl or *.der CRL"));
    }
    Ok(crls)
}

fn crl_file(path: &Path) -> Result<Vec<CrlBlock>, PemError> {
    let bytes = read(path)?;
    let ders = crls_in(&bytes).map_err(|message| invalid(path, message))?;
    let several = ders.len() > 1;
    Ok(ders
        .into_iter()
        .enumerate()
        .map(|(index, der)| CrlBlock {
            der,
            source: if several {
                format!("{}#{}", path.display(), index + 1)
            } else {
                path.display().to_string()
            },
        })
        .collect())
}

/// The CRLs of a file's contents (PEM bundle or one DER CRL); an error names the block.
pub fn crls_in(bytes: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    if crate::der::is_one_sequence(bytes) {
        return Ok(vec![CertificateRevocationListDer::from(bytes.to_vec())]);
    }
    let mut crls = Vec::new();
    for block in CertificateRevocationListDer::pem_slice_iter(bytes) {
        let crl = block.map_err(|e| format!("CRL #{}: bad PEM block: {e}", crls.len() + 1))?;
        crls.push(crl);
    }
    if crls.is_empty() {
        return Err("no CRL found: neither an -----BEGIN X509 CRL----- block nor a DER CRL".into());
    }
    Ok(crls)
}
