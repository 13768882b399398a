//! Transparent interception's kernel side: loads `agent-intercept` (cgroup `connect4`/`connect6`,
//! `getpeername4`/`getpeername6` and `sock_ops`), fills the selected destinations, attaches to
//! the configured cgroups, and answers the listener's question: where did the connection I
//! just accepted mean to go?
//!
//! Fail open: the programs are attached by `bpf_link_create` links whose only references are
//! this process's file descriptors (nothing is pinned), so when the agent exits, however it
//! exits (SIGKILL too), the kernel closes them and detaches the programs; from then on a
//! connect goes where it was dialed.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::Mutex,
};

use agent_common::intercept::{
    DestinationKey, INTERCEPT_COUNTER_SLOTS, InterceptConfig as KernelConfig, InterceptCounter,
    OriginalDestination, PORT_PREFIX_BITS, PeerKey,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use ipnet::IpNet;
use tracing::info;

/// The kernel object built by `build.rs` from `agent-ebpf`'s `agent-intercept`.
static INTERCEPT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-intercept"));

const CONNECT_PROGRAMS: [&str; 4] = [
    "intercept_connect4",
    "intercept_connect6",
    "intercept_getpeername4",
    "intercept_getpeername6",
];

#[derive(Debug, thiserror::Error)]
pub enum InterceptLoadError {
    #[error("cannot load the interception programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the interception object has no {0}")]
    Missing(&'static str),
    #[error("{name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot open cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach {name} to cgroup {}: {source}", path.display())]
    Attach {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot read this network namespace's cookie (SO_NETNS_COOKIE): {0}")]
    NetnsCookie(#[source] std::io::Error),
}

/// A set of destinations: an address block and its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destinations {
    pub net: IpNet,
    /// Empty: every port.
    pub ports: Vec<u16>,
}

impl Destinations {
    /// Whether `to` is in the set, and how specifically: the prefix length, then whether a
    /// port was named (a longer prefix wins; at equal length, a named port).
    pub fn specificity(&self, to: SocketAddr) -> Option<(u8, bool)> {
        let ip = canonical(to.ip());
        let port_ok = self.ports.is_empty() || self.ports.contains(&to.port());
        (port_ok && self.net.contains(&ip))
            .then_some((self.net.prefix_len(), !self.ports.is_empty()))
    }
}

/// IPv4-mapped IPv6 addresses as IPv4 (a dual-stack socket dialing IPv4 reports them so).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What the programs are loaded with (from `[intercept]`).
#[derive(Clone, Copy, Debug)]
pub struct InterceptSettings<'a> {
    /// The intercept listener's addresses, already bound.
    pub listen: SocketAddr,
    pub listen6: Option<SocketAddr>,
    /// For connects from other network namespaces (see `[intercept] node_listen`).
    pub node_listen: Option<SocketAddr>,
    pub node_listen6: Option<SocketAddr>,
    pub cgroups: &'a [PathBuf],
    pub destinations: &'a [Destinations],
    pub own_mark: u32,
}

/// Where an intercepted connection was going, as the application dialed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Original {
    /// IPv4 as IPv4 (also when a dual-stack socket dialed it mapped).
    pub destination: SocketAddr,
    /// Index of the `[[intercept.destination]]` that selected it.
    pub rule: u32,
}

/// The loaded and attached programs; dropping it detaches them.
pub struct InterceptKernel {
    /// Owns the programs and their links.
    _ebpf: Ebpf,
    by_peer: Mutex<BpfHashMap<MapData, PeerKey, OriginalDestination>>,
    counters: PerCpuArray<MapData, u64>,
}

impl InterceptKernel {
    /// Loads the programs for `config` (the listener is `listen`, `listen6`, already bound),
    /// and attaches them to every configured cgroup.
    pub fn load(config: &InterceptSettings<'_>) -> Result<Self, InterceptLoadError> {
        super::environment::raise_memlock_limit();
        let settings = kernel_config(config, own_netns_cookie()?);
        let mut ebpf = EbpfLoader::new()
            .override_global("INTERCEPT_CONFIG", &settings, true)
            .load(INTERCEPT_OBJECT)
            .map_err(InterceptLoadError::Load)?;
        fill_destinations(&mut ebpf, config.destinations)?;
        let cgroups = config
            .cgroups
            .iter()
            .map(|path| {
                std::fs::File::open(path).map_err(|source| InterceptLoadError::Cgroup {
                    path: path.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Loaded before any is attached: the verifier refusing one leaves nothing half-done.
        for name in CONNECT_PROGRAMS {
            let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            program
                .load()
                .map_err(|source| InterceptLoadError::Program { name, source })?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, "intercept_sock_ops")?;
        sock_ops
            .load()
            .map_err(|source| InterceptLoadError::Program {
                name: "intercept_sock_ops",
                source,
            })?;
        // sock_ops first: a redirected socket's peer key is published by it, so it must be in
        // place before the first connect is redirected. `Single` is flags 0, which
        // bpf_link_create requires: a cgroup link always runs beside the cgroup's other
        // programs (as BPF_F_ALLOW_MULTI), so Cilium's or systemd's stay.
        for (cgroup, path) in cgroups.iter().zip(config.cgroups) {
            let attach_error = |name: &'static str| {
                let path = path.clone();
                move |source| InterceptLoadError::Attach { name, path, source }
            };
            let sock_ops: &mut SockOps = program(&mut ebpf, "intercept_sock_ops")?;
            sock_ops
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_error("intercept_sock_ops"))?;
            for name in CONNECT_PROGRAMS {
                let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                program
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(attach_error(name))?;
            }
            info!(cgroup = %path.display(), "interception attached");
        }
        let by_peer = BpfHashMap::try_from(
            ebpf.take_map("BY_PEER")
                .ok_or(InterceptLoadError::Missing("BY_PEER"))?,
        )
        .map_err(|source| InterceptLoadError::Map {
            name: "BY_PEER",
            source,
        })?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("INTERCEPT_COUNTERS")
                .ok_or(InterceptLoadError::Missing("INTERCEPT_COUNTERS"))?,
        )
        .map_err(|source| InterceptLoadError::Map {
            name: "INTERCEPT_COUNTERS",
            source,
        })?;
        Ok(Self {
            _ebpf: ebpf,
            by_peer: Mutex::new(by_peer),
            counters,
        })
    }

    /// Where the connection from `peer` (as the intercept listener accepted it) was going;
    /// its entry is taken (each is looked up once). None: not a redirected connection, or its
    /// entry was evicted.
    pub fn take_original(&self, peer: SocketAddr) -> Option<Original> {
        let key = peer_key(peer);
        let mut map = self
            .by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(Original {
            destination: original_address(&found),
            rule: found.rule,
        })
    }

    /// The kernel side's counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        InterceptCounter::ALL
            .iter()
            .map(|&c| {
                let total = self
                    .counters
                    .get(&(c as u32), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                (c.name(), total)
            })
            .collect()
    }
}

const _: () = assert!(INTERCEPT_COUNTER_SLOTS as usize == InterceptCounter::ALL.len());

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, InterceptLoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(InterceptLoadError::Missing(name))?
        .try_into()
        .map_err(|source| InterceptLoadError::Program { name, source })
}

/// This network namespace's cookie, as `bpf_get_netns_cookie` gives it to the programs.
fn own_netns_cookie() -> Result<u64, InterceptLoadError> {
    let socket =
        std::net::UdpSocket::bind("127.0.0.1:0").map_err(InterceptLoadError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a u64 with its length for the kernel to write.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(InterceptLoadError::NetnsCookie(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
}

/// The programs' settings: addresses and ports as the kernel has them (network byte order).
fn kernel_config(config: &InterceptSettings<'_>, netns_cookie: u64) -> KernelConfig {
    let v4 = |a: Option<SocketAddr>| match a {
        Some(SocketAddr::V4(a)) => (
            u32::from_ne_bytes(a.ip().octets()),
            u32::from(a.port().to_be()),
        ),
        _ => (0, 0),
    };
    let v6 = |a: Option<SocketAddr>| match a {
        Some(SocketAddr::V6(a)) => {
            let o = a.ip().octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (
                [word(0), word(4), word(8), word(12)],
                u32::from(a.port().to_be()),
            )
        }
        _ => ([0; 4], 0),
    };
    let (listen4_addr, listen4_port) = v4(Some(config.listen));
    let (listen6_addr, listen6_port) = v6(config.listen6);
    let (node4_addr, node4_port) = v4(config.node_listen);
    let (node6_addr, node6_port) = v6(config.node_listen6);
    KernelConfig {
        listen4_addr,
        listen4_port,
        listen6_addr,
        listen6_port,
        own_mark: config.own_mark,
        netns_cookie,
        node4_addr,
        node4_port,
        node6_addr,
        node6_port,
    }
}

/// The LPM keys of one destination set: (port or 0, address as 16 bytes) with the prefix over
/// both, IPv4 as IPv4-mapped.
fn destination_keys(d: &Destinations) -> Vec<Key<DestinationKey>> {
    let (addr, bits) = match d.net {
        IpNet::V4(n) => (
            n.network().to_ipv6_mapped().octets(),
            96 + u32::from(n.prefix_len()),
        ),
        IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
    };
    let ports: Vec<u16> = if d.ports.is_empty() {
        vec![0]
    } else {
        d.ports.clone()
    };
    ports
        .into_iter()
        .map(|port| {
            let mut data: DestinationKey = [0; 18];
            data[0..2].copy_from_slice(&port.to_be_bytes());
            data[2..18].copy_from_slice(&addr);
            Key::new(PORT_PREFIX_BITS + bits, data)
        })
        .collect()
}

fn fill_destinations(
    ebpf: &mut Ebpf,
    destinations: &[Destinations],
) -> Result<(), InterceptLoadError> {
    let map_error = |source| InterceptLoadError::Map {
        name: "DESTINATIONS",
        source,
    };
    let mut trie: LpmTrie<&mut MapData, DestinationKey, u32> = LpmTrie::try_from(
        ebpf.map_mut("DESTINATIONS")
            .ok_or(InterceptLoadError::Missing("DESTINATIONS"))?,
    )
    .map_err(map_error)?;
    // Later rules do not replace an earlier one's identical key: the first listed is named.
    for (rule, d) in destinations.iter().enumerate().rev() {
        for key in destination_keys(d) {
            trie.insert(&key, rule as u32, 0).map_err(map_error)?;
        }
    }
    Ok(())
}

/// The listener's view of a redirected socket's address, as `sock_ops` published it: 16
/// bytes, IPv4 mapped, port in network byte order.
fn peer_key(peer: SocketAddr) -> PeerKey {
    let addr = match peer {
        SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
        SocketAddr::V6(a) => a.ip().octets(),
    };
    PeerKey {
        addr,
        port: peer.port().to_be(),
        pad: 0,
    }
}

fn original_address(o: &OriginalDestination) -> SocketAddr {
    let ip = Ipv6Addr::from(o.addr);
    let port = u16::from_be(o.port);
    match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::from((v4, port)),
        None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_put_the_port_before_the_mapped_address() {
        let d = Destinations {
            net: "10.96.0.0/12"
                .parse()
                .unwrap_or(IpNet::from(IpAddr::from([0, 0, 0, 0]))),
            ports: vec![50051, 443],
        };
        let keys = destination_keys(&d);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].prefix_len(), 16 + 96 + 12);
        let data = keys[0].data();
        assert_eq!(&data[0..2], &50051u16.to_be_bytes());
        assert_eq!(&data[2..12], &[0u8; 10]);
        assert_eq!(&data[12..18], &[0xff, 0xff, 10, 96, 0, 0]);
        let any = destination_keys(&Destinations {
            net: "fd00::/108"
                .parse()
                .unwrap_or(IpNet::from(IpAddr::from([0, 0, 0, 0]))),
            ports: vec![],
        });
        assert_eq!(any[0].prefix_len(), 16 + 108);
        assert_eq!(&any[0].data()[0..2], &[0, 0]);
    }

    #[test]
    fn peer_keys_and_originals_round_trip() {
        let peer: SocketAddr = "127.0.0.1:40000"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0)));
        let key = peer_key(peer);
        assert_eq!(&key.addr[10..16], &[0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(key.port, 40000u16.to_be());
        let o = OriginalDestination {
            addr: std::net::Ipv4Addr::new(10, 96, 0, 10)
                .to_ipv6_mapped()
                .octets(),
            port: 50051u16.to_be(),
            family: 10,
            rule: 0,
        };
        assert_eq!(
            original_address(&o),
            "10.96.0.10:50051".parse().unwrap_or(peer)
        );
        let v6 = OriginalDestination {
            addr: "fd00::7"
                .parse::<Ipv6Addr>()
                .map_or([0; 16], |a| a.octets()),
            port: 50051u16.to_be(),
            family: 10,
            rule: 1,
        };
        assert_eq!(
            original_address(&v6),
            "[fd00::7]:50051".parse().unwrap_or(peer)
        );
    }

    fn set(cidr: &str, ports: &[u16]) -> Destinations {
        Destinations {
            net: cidr
                .parse()
                .unwrap_or_else(|_| IpNet::from(IpAddr::from([0, 0, 0, 0]))),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn specificity_orders_prefix_then_port() {
        let to: SocketAddr = "10.96.0.10:50051"
            .parse()
            .unwrap_or(SocketAddr::from(([0; 4], 0)));
        assert_eq!(set("10.96.0.0/12", &[]).specificity(to), Some((12, false)));
        assert_eq!(
            set("10.96.0.0/12", &[50051]).specificity(to),
            Some((12, true))
        );
        assert_eq!(set("10.96.0.0/12", &[80]).specificity(to), None);
        assert_eq!(set("10.96.0.10/32", &[]).specificity(to), Some((32, false)));
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:50051".parse().unwrap_or(to);
        assert_eq!(
            set("10.96.0.0/12", &[]).specificity(mapped),
            Some((12, false))
        );
        assert_eq!(set("fd00::/8", &[]).specificity(to), None);
    }
}
