//! TLS session tickets whose keys every replica shares, so a device that reconnects to any
//! replica resumes instead of paying a full handshake (rustls' own ticketer draws a random
//! key per process, which only its own process can open).
//!
//! The key file (`server.session_ticket_keys`) holds at most two keys, newest first: the
//! first encrypts, both decrypt, so a rotation (`token-broker rotate-ticket-keys`, which
//! puts a new key first and keeps the one it replaces) never breaks tickets issued just
//! before it, and the key before that is gone from every replica after the next reload.
//! A ticket also carries the time it was issued (authenticated), and is refused once it is
//! older than the configured lifetime, whatever keys are in the file.
//!
//! A ticket decides nothing about trust: rustls restores the client chain from it and every
//! request validates that chain again (`Broker::authenticate`), as on a full handshake. But
//! whoever holds a key can seal a ticket carrying any device's chain (certificates are not
//! secret) and a resumption secret of their own, and resume as that device: the key file is
//! protected like a signing key (`pem::read_secret_holding`, SECURITY.md).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::clock::unix_now;
use crate::pem;

const KEY_LEN: usize = 32;
const ID_LEN: usize = 8;
/// Key id, then the issue time (big-endian Unix seconds): the authenticated header.
const HEADER_LEN: usize = ID_LEN + 8;
/// Replicas' clocks may disagree this much about a ticket's issue time.
const CLOCK_SKEW: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error(transparent)]
    File(#[from] pem::PemError),
    #[error("{path}: {message}; `token-broker rotate-ticket-keys {path}` writes a valid one", path = path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write {path}: {source}", path = path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One key of the file.
struct TicketKey {
    id: [u8; ID_LEN],
    key: RandomizedNonceKey,
}

impl TicketKey {
    fn new(secret: &[u8]) -> Option<TicketKey> {
        let digest = Sha256::new()
            .chain_update(b"token-broker session ticket key id\0")
            .chain_update(secret)
            .finalize();
        let mut id = [0; ID_LEN];
        id.copy_from_slice(&digest[..ID_LEN]);
        let key = RandomizedNonceKey::new(&AES_256_GCM, secret).ok()?;
        Some(TicketKey { id, key })
    }
}

/// The tickets of the key file: encrypted under its first key, opened under any of its keys
/// while younger than `lifetime`.
pub struct SharedTickets {
    keys: Vec<TicketKey>,
    lifetime: u32,
}

impl std::fmt::Debug for SharedTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only: they identify keys without revealing them.
        let ids: Vec<String> = self.keys.iter().map(|k| hex(&k.id)).collect();
        f.debug_struct("SharedTickets")
            .field("key_ids", &ids)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SharedTickets {
    /// Reads the key file (a secret, under `pem`'s rule for key files).
    pub fn load(path: &Path, lifetime: Duration) -> Result<SharedTickets, TicketKeyError> {
        let text = pem::read_secret_holding(path, HOLDS)?;
        let keys = parse(path, &text)?
            .iter()
            .map(|secret| TicketKey::new(secret))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid(path, "a key is not usable for AES-256-GCM"))?;
        Ok(SharedTickets {
            keys,
            lifetime: u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX),
        })
    }

    fn seal(&self, plain: &[u8], issued_at: i64) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let mut header = [0; HEADER_LEN];
        header[..ID_LEN].copy_from_slice(&key.id);
        header[ID_LEN..].copy_from_slice(&issued_at.to_be_bytes());
        let mut body = plain.to_vec();
        let nonce = key
            .key
            .seal_in_place_append_tag(Aad::from(header), &mut body)
            .ok()?;
        let mut ticket = Vec::with_capacity(HEADER_LEN + NONCE_LEN + body.len());
        ticket.extend_from_slice(&header);
        ticket.extend_from_slice(nonce.as_ref());
        ticket.extend_from_slice(&body);
        Some(ticket)
    }

    fn open(&self, ticket: &[u8], now: i64) -> Option<Vec<u8>> {
        let header = ticket.get(..HEADER_LEN)?;
        let nonce = ticket.get(HEADER_LEN..HEADER_LEN + NONCE_LEN)?;
        let body = ticket.get(HEADER_LEN + NONCE_LEN..)?;
        let key = self.keys.iter().find(|k| k.id == header[..ID_LEN])?;
        let issued_at = i64::from_be_bytes(header[ID_LEN..].try_into().ok()?);
        let young = issued_at <= now + CLOCK_SKEW && now < issued_at + i64::from(self.lifetime);
        if !young {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(header), &mut body)
            .ok()?;
        let len = plain.len();
        body.truncate(len);
        Some(body)
    }
}

impl rustls::server::ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, unix_now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(cipher, unix_now())
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> TicketKeyError {
    TicketKeyError::Invalid {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// What the key file holds, in the messages about its mode: its holder can forge a ticket
/// carrying any device's certificate chain, so it is protected like a signing key.
const HOLDS: &str =
    "session ticket keys (whoever reads them can forge a resumed session as any device)";

const HEADER_COMMENT: &str =
    "# token-broker session ticket keys, newest first: the first encrypts new tickets,\n\
# both open them. Replace with `token-broker rotate-ticket-keys`; as secret as a signing key.\n";

/// The keys of a key file: one or two lines of base64 (32 bytes each), `#` comments.
fn parse(path: &Path, text: &[u8]) -> Result<Vec<Zeroizing<Vec<u8>>>, TicketKeyError> {
    let text = std::str::from_utf8(text).map_err(|_| invalid(path, "not UTF-8 text"))?;
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = Zeroizing::new(
            STANDARD
                .decode(line)
                .map_err(|_| invalid(path, format!("line {}: not base64", number + 1)))?,
        );
        if key.len() != KEY_LEN {
            return Err(invalid(
                path,
                format!(
                    "line {}: a key is {KEY_LEN} bytes, this one {}",
                    number + 1,
                    key.len()
                ),
            ));
        }
        keys.push(key);
    }
    match keys.len() {
        0 => Err(invalid(path, "no key")),
        1 | 2 => Ok(keys),
        n => Err(invalid(
            path,
            format!("{n} keys; at most two (the current one and the one it replaced)"),
        )),
    }
}

/// Puts a new random key first and keeps the one it replaces (creates the file with one key
/// when there is none). Written atomically, readable by its owner only.
pub fn rotate(path: &Path) -> Result<(), TicketKeyError> {
    let previous = if path.exists() {
        parse(path, &pem::read_secret_holding(path, HOLDS)?)?
            .into_iter()
            .next()
    } else {
        None
    };
    let mut new = Zeroizing::new(vec![0; KEY_LEN]);
    aws_lc_rs::rand::fill(&mut new).map_err(|_| invalid(path, "no random bytes"))?;
    let mut text = Zeroizing::new(String::from(HEADER_COMMENT));
    for key in std::iter::once(&new).chain(previous.as_ref()) {
        text.push_str(&STANDARD.encode(key.as_slice()));
        text.push('\n');
    }
    write_private(path, text.as_bytes()).map_err(|source| TicketKeyError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to a new owner-only file beside `path`, then renames it over `path`, so
/// a reader (another replica's reload) sees the old file or the new one, never half of one.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temporary = path.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&temporary).and_then(|mut file| {
        file.write_all(contents)?;
        file.sync_all()
    });
    let result = written.and_then(|()| std::fs::rename(&temporary, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tickets(dir: &Path, lifetime: u64) -> SharedTickets {
        SharedTickets::load(&dir.join("keys"), Duration::from_secs(lifetime)).unwrap()
    }

    #[test]
    fn a_ticket_opens_under_the_current_and_previous_key_only_while_young() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        rotate(&path).unwrap();
        let first = tickets(dir.path(), 3600);
        let ticket = first.seal(b"session", 1000).unwrap();
        assert_eq!(first.open(&ticket, 1000).as_deref(), Some(&b"session"[..]));
        assert_eq!(first.open(&ticket, 4599).as_deref(), Some(&b"session"[..]));
        assert_eq!(first.open(&ticket, 4600), None, "older than the lifetime");
        assert_eq!(first.open(&ticket, 1000 - 61), None, "issued in the future");
        let mut forged = ticket.clone();
        forged[ID_LEN + 7] ^= 1; // the issue time is authenticated
        assert_eq!(first.open(&forged, 1000), None);
        rotate(&path).unwrap();
        assert_eq!(
            tickets(dir.path(), 3600).open(&ticket, 1000).as_deref(),
            Some(&b"session"[..])
        );
        rotate(&path).unwrap();
        assert_eq!(tickets(dir.path(), 3600).open(&ticket, 1000), None);
        assert_eq!(first.open(&ticket[..HEADER_LEN], 1000), None);
        assert_eq!(first.open(&[], 1000), None);
    }

    #[test]
    fn the_key_file_is_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        rotate(&path).unwrap();
        rotate(&path).unwrap();
        #[cfg(unix)]
        assert_eq!(pem::file_mode(&path).unwrap(), 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 2);
        let write = |text: &str| {
            std::fs::write(&path, text).unwrap();
            SharedTickets::load(&path, Duration::from_secs(60))
                .unwrap_err()
                .to_string()
        };
        assert!(write("").contains("no key"));
        assert!(write("AAAA\n").contains("a key is 32 bytes"));
        assert!(write("not base64!\n").contains("not base64"));
        let key = STANDARD.encode([7u8; 32]);
        assert!(write(&format!("{key}\n{key}\n{key}\n")).contains("at most two"));
    }
}
