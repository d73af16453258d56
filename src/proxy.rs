//! PROXY protocol v2 in front of the TLS handshake (parsing by the `ppp` crate).
//!
//! Invariant: a client address from a PROXY header is believed only from a trusted peer,
//! and a trusted peer must send one; anything else drops the connection before TLS.
//! The header is read with its own short timeout and a size cap.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::v2::{Addresses, Command, Header, PROTOCOL_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

use crate::config::{ProxyMode, ProxyProtocolConfig};

/// The fixed part of a v2 header: signature, version/command, family, length.
const MINIMUM_LENGTH: usize = 16;

/// Longest header accepted (addresses plus TLVs); HAProxy's are well under this.
const MAX_HEADER_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("PROXY header from an untrusted peer")]
    UntrustedHeader,
    #[error("trusted peer sent no PROXY v2 header")]
    MissingHeader,
    #[error("malformed PROXY v2 header: {0}")]
    Malformed(String),
    #[error("PROXY v2 header of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("no PROXY header within the timeout")]
    Timeout,
    #[error("connection closed during the PROXY header")]
    Closed,
}

impl ProxyError {
    /// Metric label (`refused_connections_total{cause}`).
    pub fn cause(&self) -> &'static str {
        match self {
            ProxyError::UntrustedHeader => "proxy_untrusted_header",
            ProxyError::MissingHeader => "proxy_missing_header",
            ProxyError::Malformed(_) | ProxyError::TooLarge(_) => "proxy_malformed",
            ProxyError::Timeout => "proxy_timeout",
            ProxyError::Closed => "proxy_closed",
        }
    }
}

pub struct ProxyPolicy {
    mode: ProxyMode,
    trusted: Vec<IpNet>,
    header_timeout: Duration,
}

impl ProxyPolicy {
    pub fn new(config: &ProxyProtocolConfig) -> Result<ProxyPolicy, String> {
        let trusted = config
            .trusted_cidrs
            .iter()
            .map(|cidr| {
                cidr.parse::<IpNet>()
                    .or_else(|_| cidr.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|e| format!("server.proxy_protocol.trusted_cidrs: {cidr:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if config.mode == ProxyMode::V2 && trusted.is_empty() {
            return Err("server.proxy_protocol: mode = \"v2\" needs trusted_cidrs (the load balancers' addresses)".into());
        }
        Ok(ProxyPolicy {
            mode: config.mode,
            trusted,
            header_timeout: config.header_timeout,
        })
    }

    fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted.iter().any(|net| net.contains(&peer))
    }

    /// Reads the PROXY header if policy requires one; returns the client's address.
    pub async fn accept(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<SocketAddr, ProxyError> {
        if self.mode == ProxyMode::Off {
            return Ok(peer);
        }
        if !self.trusts(peer.ip()) {
            // A TLS record starts with 0x16; v2 starts with '\r', v1 with 'P'.
            let mut first = [0u8; 1];
            let seen = within(self.header_timeout, async {
                stream
                    .peek(&mut first)
                    .await
                    .map_err(|_| ProxyError::Closed)
            })
            .await?;
            return match (seen, first[0]) {
                (1, b'\r' | b'P') => Err(ProxyError::UntrustedHeader),
                _ => Ok(peer),
            };
        }
        // One timeout for the whole header, however it is split into packets.
        let header = within(self.header_timeout, read_header(stream)).await?;
        client_address(&header, peer)
    }
}

/// The complete v2 header: the fixed 16 bytes, then the length they declare (capped).
/// Public (and generic) for the fuzz targets.
pub async fn read_header<R: AsyncRead + Unpin>(stream: &mut R) -> Result<Vec<u8>, ProxyError> {
    let mut fixed = [0u8; MINIMUM_LENGTH];
    stream
        .read_exact(&mut fixed)
        .await
        .map_err(|_| ProxyError::Closed)?;
    if !fixed.starts_with(PROTOCOL_PREFIX) {
        return Err(ProxyError::MissingHeader);
    }
    let length = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if length > MAX_HEADER_BYTES {
        return Err(ProxyError::TooLarge(length));
    }
    let mut header = fixed.to_vec();
    header.resize(MINIMUM_LENGTH + length, 0);
    stream
        .read_exact(&mut header[MINIMUM_LENGTH..])
        .await
        .map_err(|_| ProxyError::Closed)?;
    Ok(header)
}

async fn within<T>(
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, ProxyError>>,
) -> Result<T, ProxyError> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| ProxyError::Timeout)?
}

/// The source address a complete v2 header declares (`LOCAL`: the peer itself).
/// Public for the fuzz targets.
pub fn client_address(bytes: &[u8], peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let header = Header::try_from(bytes).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    if header.command == Command::Local {
        // Health checks from the load balancer itself.
        return Ok(peer);
    }
    match header.addresses {
        Addresses::IPv4(a) => Ok(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => Ok(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unspecified | Addresses::Unix(_) => Ok(peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(source: &str) -> Vec<u8> {
        let source: SocketAddr = source.parse().unwrap();
        let destination: SocketAddr = match source {
            SocketAddr::V4(_) => "10.0.0.1:8443".parse().unwrap(),
            SocketAddr::V6(_) => "[2001:db8::2]:8443".parse().unwrap(),
        };
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (source, destination),
        )
        .build()
        .unwrap()
    }

    #[test]
    fn addresses_from_headers() {
        let peer: SocketAddr = "10.0.0.9:1000".parse().unwrap();
        assert_eq!(
            client_address(&v2("203.0.113.7:5555"), peer)
                .unwrap()
                .to_string(),
            "203.0.113.7:5555"
        );
        assert_eq!(
            client_address(&v2("[2001:db8::1]:443"), peer)
                .unwrap()
                .to_string(),
            "[2001:db8::1]:443"
        );
        let mut garbage = v2("203.0.113.7:5555");
        garbage[13] = 0xF1; // no such address family
        assert!(matches!(
            client_address(&garbage, peer),
            Err(ProxyError::Malformed(_))
        ));
        for cut in 0..garbage.len() {
            let _ = client_address(&v2("203.0.113.7:5555")[..cut], peer);
        }
    }

    #[test]
    fn trust_is_by_cidr_and_v2_needs_trusted_peers() {
        let config = ProxyProtocolConfig {
            mode: ProxyMode::V2,
            trusted_cidrs: vec!["10.0.0.0/8".into(), "192.0.2.7".into()],
            header_timeout: Duration::from_secs(1),
        };
        let policy = ProxyPolicy::new(&config).unwrap();
        assert!(policy.trusts("10.1.2.3".parse().unwrap()));
        assert!(policy.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(policy.trusts("192.0.2.7".parse().unwrap()));
        assert!(!policy.trusts("192.0.2.8".parse().unwrap()));
        let empty = ProxyProtocolConfig {
            trusted_cidrs: vec![],
            ..config.clone()
        };
        assert!(ProxyPolicy::new(&empty).is_err());
        let bad = ProxyProtocolConfig {
            trusted_cidrs: vec!["10.0.0.0/33".into()],
            ..config
        };
        assert!(ProxyPolicy::new(&bad).is_err());
    }
}
