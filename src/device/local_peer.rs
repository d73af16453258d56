//! Which local account opened a loopback TCP connection to the agent: the kernel's socket
//! tables (`/proc/net/tcp`, `/proc/net/tcp6`) list the client's end of the connection,
//! its ports and the uid that owns it. No anchor, no credential: the kernel says who it is.

use std::net::{IpAddr, SocketAddr};

/// The uid owning the client end of an established TCP connection from `peer`, if the
/// kernel lists it (it is gone when the client closed already). Matched on the client's
/// own address and port only: a connection redirected to the agent (iptables DNAT from
/// 169.254.169.254:80) lists the address the client dialled, not the agent's. Two
/// established sockets of different owners on that address and port: no answer.
pub fn uid_of(peer: SocketAddr) -> Option<u32> {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let tables: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .collect();
    let mut owners = tables.iter().flat_map(|text| uids_in(text, peer));
    let uid = owners.next()?;
    owners.all(|other| other == uid).then_some(uid)
}

/// TCP_ESTABLISHED in the tables' `st` column; sockets in other states (TIME_WAIT among
/// them) are listed with uid 0 whoever owned them.
const ESTABLISHED: &str = "01";

/// The uids of the established sockets whose local address is `peer` in one table's text.
fn uids_in(table: &str, peer: SocketAddr) -> impl Iterator<Item = u32> + '_ {
    table.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (ours, state, uid) = (fields.get(1)?, fields.get(3)?, fields.get(7)?);
        (*state == ESTABLISHED && address(ours)? == peer)
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word as the
/// kernel holds it, in this machine's byte order; an IPv4-mapped IPv6 address is its IPv4.
fn address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::from(word(ip)?),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A `--allow-user` value: a uid, or a user name looked up in the system's user database.
pub fn uid_named(user: &str) -> Result<u32, String> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    uzers::get_user_by_name(user)
        .map(|user| user.uid())
        .ok_or_else(|| format!("--allow-user {user:?}: no such user on this system"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 3 1 0 20 4 30 10 -1
";

    #[test]
    fn the_client_end_of_a_connection_names_its_uid() {
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(uids_in(TABLE, client).collect::<Vec<_>>(), [1001]);
            let other: SocketAddr = "127.0.0.1:54322".parse().unwrap();
            assert_eq!(uids_in(TABLE, other).count(), 0);
            // The listening socket (state 0A) is not a connection.
            let agent: SocketAddr = "127.0.0.1:8080".parse().unwrap();
            assert_eq!(uids_in(TABLE, agent).collect::<Vec<_>>(), [0]);
            let time_wait = TABLE.replace(
                " 01 00000000:00000000 00:00000000 00000000  1001",
                " 06 00000000:00000000 00:00000000 00000000  1001",
            );
            assert_eq!(uids_in(&time_wait, client).count(), 0);
        }
    }

    #[test]
    fn ipv6_and_mapped_addresses_are_read() {
        if cfg!(target_endian = "little") {
            let v6 = "00000000000000000000000001000000:1F90";
            assert_eq!(address(v6), Some("[::1]:8080".parse().unwrap()));
            let mapped = "0000000000000000FFFF00000100007F:1F90";
            assert_eq!(address(mapped), Some("127.0.0.1:8080".parse().unwrap()));
        }
    }

    #[test]
    fn this_process_own_connection_is_found_with_its_uid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let uid = std::fs::metadata("/proc/self")
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.uid()
            })
            .ok();
        assert_eq!(
            uid_of(peer),
            uid,
            "the kernel's table names this process's uid"
        );
        // As an IPv4-mapped IPv6 address, as a dual-stack listener sees it.
        let mapped = match peer.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), peer.port()),
            IpAddr::V6(_) => peer,
        };
        assert_eq!(uid_of(mapped), uid);
    }
}
