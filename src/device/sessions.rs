//! `token --session-file`: the broker's TLS session tickets kept between runs, so a `token`
//! process (a new one per token) resumes the previous run's session instead of a full
//! handshake. rustls asks this store for a ticket when it connects and hands it the broker's
//! new tickets; the file is read once at start and written at the end of a successful run.
//!
//! The file holds resumption secrets: whoever reads it can resume this device's session
//! (and present its certificate) until the ticket expires. So a file others may read is
//! refused, it is written like the token cache (owner only, atomically, never through a
//! link), and nothing of it is ever logged. A file that cannot be used (corrupt, another
//! version, expired sessions) only costs a full handshake, and is replaced.

use std::collections::VecDeque;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, NamedGroup};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::device::error::ClientError;
use crate::device::private_file::PrivateFile;

/// The file's format; another number (an older or newer `token`) is ignored and replaced.
const VERSION: u32 = 1;
/// As rustls' in-memory store: the broker sends two tickets per connection.
const MAX_TLS13_TICKETS: usize = 8;

/// The file: per server name (as the URL names the broker), its sessions.
#[derive(Serialize, Deserialize)]
struct FileContents {
    version: u32,
    servers: Map<String, Value>,
}

/// One server's sessions, each in the vendored rustls' encoding (`to_bytes`), base64.
#[derive(Default, Serialize, Deserialize)]
struct Stored {
    #[serde(default)]
    tls13: Vec<String>,
    #[serde(default)]
    tls12: Option<String>,
    #[serde(default)]
    kx_hint: Option<u16>,
    /// [`binding`] of the run that stored them.
    #[serde(default)]
    binding: String,
}

#[derive(Default)]
struct Sessions {
    tls13: VecDeque<Tls13ClientSessionValue>,
    tls12: Option<Tls12ClientSessionValue>,
    kx_hint: Option<NamedGroup>,
}

/// The session store of one `token` run, for the broker's server name only.
pub struct SessionFile {
    file: PrivateFile,
    server: ServerName<'static>,
    /// Other servers' entries, written back as they were read.
    others: Mutex<Map<String, Value>>,
    sessions: Mutex<Sessions>,
    /// Why the file (or part of it) was not used, for the caller's warning.
    ignored: Mutex<Option<String>>,
    /// [`binding`] of this run's trust and certificate, once loaded.
    binding: Mutex<String>,
}

impl SessionFile {
    /// The store for `path` and the broker at `url`; nothing read yet. Refuses a file that
    /// other users may read, naming the fix (a planted link is not followed: it is replaced).
    pub fn open(path: &Path, url: &str) -> Result<Arc<SessionFile>, ClientError> {
        let local = |why: String| ClientError::Local(format!("--session-file: {why}"));
        if std::fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file()) {
            crate::device::credentials::check_private(
                path,
                "session file (TLS resumption secrets)",
            )?;
        }
        let url = url::Url::parse(url).map_err(|e| local(format!("the broker URL: {e}")))?;
        let host = match url.host() {
            Some(url::Host::Domain(name)) => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(local(format!("the broker URL {url} names no host"))),
        };
        let server =
            ServerName::try_from(host).map_err(|e| local(format!("the broker URL's host: {e}")))?;
        Ok(Arc::new(SessionFile {
            file: PrivateFile::new(path),
            server,
            others: Mutex::default(),
            sessions: Mutex::default(),
            ignored: Mutex::default(),
            binding: Mutex::default(),
        }))
    }

    fn key(&self) -> String {
        self.server.to_str().into_owned()
    }

    /// Reads the file's sessions for connections made with `config` (sessions are bound to
    /// its verifier and client certificate) and `binding` (the [`binding`] of its roots and
    /// certificate: sessions stored under other ones are not used). What cannot be used is
    /// dropped and noted.
    pub fn load(&self, config: &ClientConfig, binding: String) {
        *lock(&self.binding) = binding;
        let bytes = match self.file.read_trusted() {
            Ok(Some(bytes)) => Zeroizing::new(bytes),
            Ok(None) => return,
            Err(reason) => return self.ignore(reason),
        };
        // serde's messages may quote the file: only a fixed reason is kept.
        let contents = match serde_json::from_slice::<FileContents>(&bytes) {
            Ok(contents) if contents.version == VERSION => contents,
            Ok(contents) => {
                return self.ignore(format!(
                    "format version {} is not {VERSION}",
                    contents.version
                ))
            }
            Err(_) => return self.ignore("not a session file (corrupt or truncated JSON)".into()),
        };
        let mut servers = contents.servers;
        let stored = servers.remove(&self.key());
        *lock(&self.others) = servers;
        let Some(stored) = stored else { return };
        let Ok(stored) = serde_json::from_value::<Stored>(stored) else {
            return self.ignore("the broker's entry is not a list of sessions".into());
        };
        if stored.binding != *lock(&self.binding) {
            return self.ignore("stored under another CA bundle or device certificate".into());
        }
        let decode = |text: &String| BASE64.decode(text).ok().map(Zeroizing::new);
        let mut unusable = 0;
        let mut sessions = lock(&self.sessions);
        for text in stored.tls13.iter().take(MAX_TLS13_TICKETS) {
            match decode(text).and_then(|b| Tls13ClientSessionValue::from_bytes(&b, config).ok()) {
                Some(session) => sessions.tls13.push_back(session),
                None => unusable += 1,
            }
        }
        if let Some(text) = &stored.tls12 {
            sessions.tls12 =
                decode(text).and_then(|b| Tls12ClientSessionValue::from_bytes(&b, config).ok());
            unusable += usize::from(sessions.tls12.is_none());
        }
        sessions.kx_hint = stored.kx_hint.map(NamedGroup::from);
        if unusable > 0 {
            drop(sessions);
            // Expired, for a suite or certificate no longer used, or damaged.
            self.ignore(format!("{unusable} stored session(s) expired or unusable"));
        }
    }

    fn ignore(&self, reason: String) {
        *lock(&self.ignored) = Some(reason);
    }

    /// Why the file, or some of its sessions, was not used (for a warning where one may be
    /// printed), if so.
    pub fn ignored(&self) -> Option<String> {
        lock(&self.ignored).clone()
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Writes the sessions held now (the broker's newest tickets) over the file.
    pub fn save(&self) -> Result<(), ClientError> {
        let stored = {
            let sessions = lock(&self.sessions);
            let encode = |bytes: Vec<u8>| BASE64.encode(Zeroizing::new(bytes));
            Stored {
                tls13: sessions
                    .tls13
                    .iter()
                    .map(|s| encode(s.to_bytes()))
                    .collect(),
                tls12: sessions.tls12.as_ref().map(|s| encode(s.to_bytes())),
                kx_hint: sessions.kx_hint.map(u16::from),
                binding: lock(&self.binding).clone(),
            }
        };
        let mut servers = lock(&self.others).clone();
        servers.insert(
            self.key(),
            serde_json::to_value(&stored).unwrap_or_default(),
        );
        let contents = FileContents {
            version: VERSION,
            servers,
        };
        // Serializing maps of strings cannot fail.
        let bytes = Zeroizing::new(serde_json::to_vec(&contents).unwrap_or_default());
        self.file.store(&bytes).map_err(ClientError::Local)
    }

    fn ours(&self, server: &ServerName<'_>) -> bool {
        *server == self.server
    }
}

/// What the stored sessions were made under: the roots that verified the broker and the
/// certificate chain presented to it. In one process rustls reuses a session only under the
/// same verifier and certificate; across runs the file keeps that rule by this digest, so
/// a run with another CA bundle (a broker CA withdrawn) or a renewed certificate does a full
/// handshake instead of resuming what the old ones made.
pub fn binding(roots: &rustls::RootCertStore, chain: &[CertificateDer<'_>]) -> String {
    let mut digest = Sha256::new();
    let mut part = |bytes: &[u8]| {
        digest.update((bytes.len() as u64).to_be_bytes());
        digest.update(bytes);
    };
    for root in &roots.roots {
        part(&root.subject);
        part(&root.subject_public_key_info);
        part(root.name_constraints.as_deref().unwrap_or_default());
    }
    for cert in chain {
        part(cert);
    }
    crate::identity::hex(&digest.finalize())
}

/// The lock, even after a panic elsewhere: sessions are plain data.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl fmt::Debug for SessionFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionFile")
            .field("path", &self.file.path())
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Sessions of other servers (a redirect) are not kept.
impl ClientSessionStore for SessionFile {
    fn set_kx_hint(&self, server: ServerName<'static>, group: NamedGroup) {
        if self.ours(&server) {
            lock(&self.sessions).kx_hint = Some(group);
        }
    }

    fn kx_hint(&self, server: &ServerName<'_>) -> Option<NamedGroup> {
        self.ours(server).then(|| lock(&self.sessions).kx_hint)?
    }

    fn set_tls12_session(&self, server: ServerName<'static>, value: Tls12ClientSessionValue) {
        if self.ours(&server) {
            lock(&self.sessions).tls12 = Some(value);
        }
    }

    fn tls12_session(&self, server: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.ours(server)
            .then(|| lock(&self.sessions).tls12.clone())?
    }

    fn remove_tls12_session(&self, server: &ServerName<'static>) {
        if self.ours(server) {
            lock(&self.sessions).tls12 = None;
        }
    }

    fn insert_tls13_ticket(&self, server: ServerName<'static>, value: Tls13ClientSessionValue) {
        if self.ours(&server) {
            let mut sessions = lock(&self.sessions);
            if sessions.tls13.len() >= MAX_TLS13_TICKETS {
                sessions.tls13.pop_front();
            }
            sessions.tls13.push_back(value);
        }
    }

    /// The newest ticket; TLS 1.3 tickets are used once (RFC 8446 C.4).
    fn take_tls13_ticket(&self, server: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.ours(server)
            .then(|| lock(&self.sessions).tls13.pop_back())?
    }
}
