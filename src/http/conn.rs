//! What a connection tells its requests.

use std::net::SocketAddr;

use rustls_pki_types::CertificateDer;

/// What the connection knows about its peer; shared by all requests on it.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The client's certificate chain as sent (leaf first); *not* validated yet.
    pub client_chain: Vec<CertificateDer<'static>>,
}
