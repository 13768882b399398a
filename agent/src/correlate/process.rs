//! Which process serves an upstream endpoint: the owner of the socket at the far end of one of
//! our connections, found in whichever network namespace it lives.
//!
//! For our connection `local -> peer`, the serving socket is the one whose local address is
//! `peer` and whose remote is `local`. Each network namespace's TCP table is read once (through
//! the first process seen in it), and the socket's inode is then looked for among the file
//! descriptors of that namespace's processes. No NAT between the two ends is assumed: behind a
//! translating Service address the owner stays unknown, which is said, not guessed.

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use serde::Serialize;

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    /// The network namespace's inode number (as `ls -l /proc/PID/ns/net` shows it).
    pub netns: u64,
}

/// The process whose socket is the other end of our `local -> peer` connection, read from
/// `proc` (normally `/proc`).
pub fn peer_owner(proc: &Path, local: SocketAddr, peer: SocketAddr) -> Option<Owner> {
    // Processes by network namespace; the first of each stands for its namespace's tables.
    let mut by_netns: HashMap<u64, Vec<u32>> = HashMap::new();
    for entry in fs::read_dir(proc).ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ns) = netns_of(proc, pid) {
            by_netns.entry(ns).or_default().push(pid);
        }
    }
    for (netns, pids) in &by_netns {
        let Some(&first) = pids.first() else {
            continue;
        };
        let Some(inode) = socket_inode(proc, first, peer, local) else {
            continue;
        };
        let target = format!("socket:[{inode}]");
        for &pid in pids {
            if holds(proc, pid, &target) {
                let comm = fs::read_to_string(proc.join(pid.to_string()).join("comm"))
                    .map(|s| s.trim_end().to_owned())
                    .unwrap_or_default();
                return Some(Owner {
                    pid,
                    comm,
                    netns: *netns,
                });
            }
        }
    }
    None
}

fn netns_of(proc: &Path, pid: u32) -> Option<u64> {
    let link = fs::read_link(proc.join(pid.to_string()).join("ns/net")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The inode of the socket with local address `local` and remote `remote` in the TCP tables
/// (`net/tcp`, `net/tcp6`) of `pid`'s network namespace.
fn socket_inode(proc: &Path, pid: u32, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let dir = proc.join(pid.to_string()).join("net");
    ["tcp", "tcp6"].iter().find_map(|table| {
        let text = fs::read_to_string(dir.join(table)).ok()?;
        text.lines()
            .skip(1)
            .find_map(|line| match_row(line, local, remote))
    })
}

/// The inode of one `/proc/net/tcp{,6}` row if its addresses are `local` and `remote`.
fn match_row(line: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
    let (l, r, inode) = (cols.get(1)?, cols.get(2)?, cols.get(9)?);
    let same = |hex: &str, want: SocketAddr| {
        parse_hex_addr(hex).is_some_and(|a| {
            a.ip().to_canonical() == want.ip().to_canonical() && a.port() == want.port()
        })
    };
    (same(l, local) && same(r, remote))
        .then(|| inode.parse().ok())
        .flatten()
        .filter(|&i| i != 0)
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the kernel prints each 32-bit
/// word of the address in host byte order.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn holds(proc: &Path, pid: u32, target: &str) -> bool {
    let Ok(fds) = fs::read_dir(proc.join(pid.to_string()).join("fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .ok()
            .is_some_and(|l| l.as_os_str() == target)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    #[test]
    fn proc_net_tcp_addresses_parse() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_hex_addr("0100007F:1F90"),
                Some(addr("127.0.0.1:8080"))
            );
            assert_eq!(
                parse_hex_addr("0000000000000000FFFF00000100007F:C351"),
                Some(addr("[::ffff:127.0.0.1]:50001"))
            );
        }
        assert_eq!(parse_hex_addr("zz:1"), None);
    }

    #[test]
    fn a_row_matches_only_its_own_pair() {
        let row = "   3: 0100007F:C351 0100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        if cfg!(target_endian = "little") {
            let l = addr("127.0.0.1:50001");
            let r = addr("127.0.0.1:40960");
            assert_eq!(match_row(row, l, r), Some(123456));
            assert_eq!(match_row(row, r, l), None);
        }
    }

    /// The real /proc: this test's own connection is found, owned by this process.
    #[test]
    fn finds_the_owner_of_a_loopback_peer() -> std::io::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let server_addr = listener.local_addr()?;
        let client = std::net::TcpStream::connect(server_addr)?;
        let (_accepted, _) = listener.accept()?;
        let owner = peer_owner(Path::new("/proc"), client.local_addr()?, server_addr);
        assert_eq!(owner.map(|o| o.pid), Some(std::process::id()));
        Ok(())
    }
}
