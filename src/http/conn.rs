//! What a connection tells its requests.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use rustls_pki_types::CertificateDer;

use crate::identity::Identity;

/// What the connection knows about its peer; shared by all requests on it.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The client's certificate chain as sent (leaf first); *not* validated yet.
    pub client_chain: Vec<CertificateDer<'static>>,
    /// The leaf's identity, parsed by the first request that needs it; *not* validated:
    /// every request still gets its verdict from the broker.
    pub client_identity: OnceLock<Arc<Identity>>,
}
