//! The `[intercept]` section: which TCP connects of the node the kernel steers into the agent
//! (by cgroup, destination CIDR and port), where they arrive, and how the agent's own sockets
//! are told apart; and the `claims` of a `[[cluster]]`: the original destinations it serves.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

pub use crate::probes::intercept::{Destinations, InterceptSettings, canonical};
use toml::Spanned;

use super::{Problems, duration};

/// Where intercepted connections arrive by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15001";

/// The name of the cluster that serves unclaimed destinations (each its own endpoint).
pub const PASSTHROUGH_CLUSTER: &str = "passthrough";

/// The `SO_MARK` of the agent's own sockets by default: outside the bits kube-proxy (0x4000,
/// 0x8000), Calico (0xffff0000), Cilium (0x0f00, 0x0200) and Istio (0x539) use.
pub const DEFAULT_OWN_MARK: u32 = 0x0000_00a6;

/// A validated `[intercept]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct InterceptConfig {
    pub listen: SocketAddr,
    /// IPv6 connects are redirected only with an IPv6 listener.
    pub listen6: Option<SocketAddr>,
    /// Where connects from other network namespaces (pods) are steered: an address of the
    /// agent's namespace that they reach, such as the pods' gateway. None: such connects are
    /// left alone.
    pub node_listen: Option<SocketAddr>,
    pub node_listen6: Option<SocketAddr>,
    /// cgroup v2 directories whose processes (and their descendants') are intercepted; the
    /// v2 root when the file names none.
    pub cgroups: Vec<PathBuf>,
    /// In order: a connect is steered when its destination is in one of them.
    pub destinations: Vec<Destinations>,
    pub own_mark: u32,
    /// How long a connection may stay silent before it is taken for a protocol where the
    /// server speaks first, and spliced.
    pub detect_timeout: Duration,
    /// Original destinations the passthrough cluster keeps as endpoints (each with its
    /// breakers) at most; connections to more are spliced, not proxied.
    pub max_passthrough_endpoints: usize,
}

/// What is wrong in `[intercept]` or a cluster's `claims`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InterceptError {
    #[error("intercept.listen must be an IPv4 address and port, e.g. {DEFAULT_LISTEN}")]
    Listen,
    #[error("intercept.listen6 must be an IPv6 address and port, e.g. [::1]:15001")]
    Listen6,
    #[error(
        "intercept.node_listen must be an IPv4 address and port of this namespace that pods reach, e.g. 10.244.0.1:15001"
    )]
    NodeListen,
    #[error(
        "intercept.node_listen6 must be an IPv6 address and port of this namespace that pods reach"
    )]
    NodeListen6,
    #[error(
        "the intercept listeners need fixed ports (the kernel programs are loaded with them), not 0"
    )]
    ListenPortZero,
    #[error("[intercept] has no [[intercept.destination]]: nothing would be intercepted")]
    NoDestinations,
    #[error("{0:?} is not an address or CIDR (10.96.0.0/12, fd00::/108, 10.0.0.7)")]
    Cidr(String),
    #[error("port 0 in ports (leave ports out for every port)")]
    PortZero,
    #[error("{0} destination rules (CIDRs times ports); at most {1}")]
    TooManyRules(usize, u32),
    #[error("intercept.own_mark must not be 0")]
    MarkZero,
    #[error("intercept.cgroups: {} is not a cgroup v2 directory", .0.display())]
    Cgroup(PathBuf),
    #[error(
        "no cgroup v2 hierarchy is mounted (interception attaches to cgroup v2): mount one, or name intercept.cgroups"
    )]
    NoCgroup2,
    #[error(
        "a cluster cannot be named {PASSTHROUGH_CLUSTER:?} while [intercept] is on: it serves unclaimed destinations"
    )]
    ReservedName,
    #[error("claims need an [intercept] section: nothing else has an original destination")]
    ClaimsWithoutIntercept,
    #[error("{0} claimed by two clusters")]
    ClaimedTwice(String),
    #[error("intercept.max_passthrough_endpoints must be at least 1")]
    NoPassthroughEndpoints,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntercept {
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
    listen6: Option<Spanned<String>>,
    node_listen: Option<Spanned<String>>,
    node_listen6: Option<Spanned<String>>,
    /// Empty: the cgroup v2 root (every process of the node).
    #[serde(default)]
    cgroups: Vec<Spanned<PathBuf>>,
    #[serde(default, rename = "destination")]
    destinations: Vec<RawDestinations>,
    #[serde(default = "default_mark")]
    own_mark: Spanned<u32>,
    #[serde(default = "default_detect_timeout", with = "duration")]
    detect_timeout: Duration,
    #[serde(default = "default_max_passthrough")]
    max_passthrough_endpoints: usize,
}

/// `{ cidr = "10.96.0.0/12", ports = [50051] }`, in `[[intercept.destination]]` and in a
/// cluster's `claims`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDestinations {
    cidr: Spanned<String>,
    ports: Option<Spanned<Vec<u16>>>,
}

fn default_listen() -> Spanned<String> {
    Spanned::new(0..0, DEFAULT_LISTEN.to_owned())
}

fn default_mark() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_OWN_MARK)
}

fn default_detect_timeout() -> Duration {
    Duration::from_millis(200)
}

fn default_max_passthrough() -> usize {
    1024
}

impl RawDestinations {
    pub(super) fn check(self, p: &mut Problems<'_>) -> Destinations {
        let text = self.cidr.get_ref().trim();
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map(|n| match n {
                // ::ffff:10.0.0.0/104 is 10.0.0.0/8.
                IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                    Some(v4) if v6.prefix_len() >= 96 => {
                        ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(n, IpNet::V4)
                    }
                    _ => n,
                },
                v4 => v4,
            });
        let net = match net {
            Ok(n) => n.trunc(),
            Err(_) => {
                p.at(self.cidr.span(), InterceptError::Cidr(text.to_owned()));
                IpNet::from(IpAddr::from([0, 0, 0, 0]))
            }
        };
        if let Some(ports) = &self.ports
            && ports.get_ref().contains(&0)
        {
            p.at(ports.span(), InterceptError::PortZero);
        }
        let mut ports = self.ports.map(Spanned::into_inner).unwrap_or_default();
        ports.sort_unstable();
        ports.dedup();
        Destinations { net, ports }
    }
}

impl InterceptConfig {
    /// What the kernel programs are loaded with.
    pub fn kernel_settings(&self) -> InterceptSettings<'_> {
        InterceptSettings {
            listen: self.listen,
            listen6: self.listen6,
            node_listen: self.node_listen,
            node_listen6: self.node_listen6,
            cgroups: &self.cgroups,
            destinations: &self.destinations,
            own_mark: self.own_mark,
        }
    }
}

impl RawIntercept {
    pub(super) fn check(self, p: &mut Problems<'_>) -> InterceptConfig {
        let fallback = SocketAddr::from(([127, 0, 0, 1], 15001));
        let listen = match self.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.is_ipv4() => a,
            _ => {
                p.at(self.listen.span(), InterceptError::Listen);
                fallback
            }
        };
        let mut address = |l: Spanned<String>, v6: bool, error: InterceptError| match l
            .get_ref()
            .parse::<SocketAddr>(
        ) {
            Ok(a) if a.is_ipv6() == v6 && a.port() != 0 => a,
            Ok(a) if a.is_ipv6() == v6 => {
                p.at(l.span(), InterceptError::ListenPortZero);
                a
            }
            _ => {
                p.at(l.span(), error);
                fallback
            }
        };
        let listen6 = self
            .listen6
            .map(|l| address(l, true, InterceptError::Listen6));
        let node_listen = self
            .node_listen
            .map(|l| address(l, false, InterceptError::NodeListen));
        let node_listen6 = self
            .node_listen6
            .map(|l| address(l, true, InterceptError::NodeListen6));
        if listen.port() == 0 {
            p.at(self.listen.span(), InterceptError::ListenPortZero);
        }
        let mut cgroups = self.cgroups;
        if cgroups.is_empty() {
            let root = std::fs::read_to_string("/proc/self/mountinfo")
                .ok()
                .and_then(|m| crate::probes::h2_hooks::cgroup2_root(&m));
            match root {
                Some(root) => cgroups.push(Spanned::new(0..0, root)),
                None => p.at(self.listen.span(), InterceptError::NoCgroup2),
            }
        }
        for c in &cgroups {
            if !c.get_ref().join("cgroup.procs").is_file() {
                p.at(c.span(), InterceptError::Cgroup(c.get_ref().clone()));
            }
        }
        if self.destinations.is_empty() {
            p.at(self.listen.span(), InterceptError::NoDestinations);
        }
        let destinations: Vec<Destinations> =
            self.destinations.into_iter().map(|d| d.check(p)).collect();
        let rules: usize = destinations.iter().map(|d| d.ports.len().max(1)).sum();
        let max = agent_common::intercept::MAX_DESTINATION_RULES;
        if rules > max as usize {
            p.at(self.listen.span(), InterceptError::TooManyRules(rules, max));
        }
        if *self.own_mark.get_ref() == 0 {
            p.at(self.own_mark.span(), InterceptError::MarkZero);
        }
        if self.max_passthrough_endpoints == 0 {
            p.at(self.listen.span(), InterceptError::NoPassthroughEndpoints);
        }
        InterceptConfig {
            listen,
            listen6,
            node_listen,
            node_listen6,
            cgroups: cgroups.into_iter().map(Spanned::into_inner).collect(),
            destinations,
            own_mark: self.own_mark.into_inner(),
            detect_timeout: self.detect_timeout,
            max_passthrough_endpoints: self.max_passthrough_endpoints,
        }
    }
}
