//! DNS discovery's settings: the `[dns]` section (which servers answer; /etc/resolv.conf's by
//! default) and each cluster's `[cluster.dns]` (how often its names are asked again, which
//! address families become endpoints).

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use super::duration;

/// What is wrong in `[dns]` or a `[cluster.dns]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("dns.servers: {0:?} is not IP:PORT")]
    Server(String),
    #[error("dns.attempts must be 1..=10")]
    Attempts,
    #[error("dns.timeout must be between 100ms and 60s")]
    Timeout,
    #[error(
        "cluster {0:?}: dns.min_refresh must be at least 100ms and no more than dns.max_refresh"
    )]
    Refresh(String),
}

/// `[dns]`: the resolver every cluster's names go through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers to ask (UDP, then TCP for truncated answers); empty: /etc/resolv.conf's,
    /// with its search domains and options.
    pub servers: Vec<SocketAddr>,
    /// How long one query may take.
    pub timeout: Duration,
    /// Tries per query (of each server).
    pub attempts: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDns {
    servers: Vec<String>,
    #[serde(with = "duration")]
    timeout: Duration,
    attempts: usize,
}

impl Default for RawDns {
    fn default() -> Self {
        let d = DnsConfig::default();
        Self {
            servers: Vec::new(),
            timeout: d.timeout,
            attempts: d.attempts,
        }
    }
}

impl RawDns {
    pub(super) fn check(self) -> Result<DnsConfig, Vec<DnsError>> {
        let mut errors = Vec::new();
        let mut servers = Vec::new();
        for s in &self.servers {
            match s.parse::<SocketAddr>() {
                Ok(a) if a.port() != 0 => servers.push(a),
                _ => errors.push(DnsError::Server(s.clone())),
            }
        }
        if !(1..=10).contains(&self.attempts) {
            errors.push(DnsError::Attempts);
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.timeout) {
            errors.push(DnsError::Timeout);
        }
        if errors.is_empty() {
            Ok(DnsConfig {
                servers,
                timeout: self.timeout,
                attempts: self.attempts,
            })
        } else {
            Err(errors)
        }
    }
}

/// Which of a name's addresses become endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsFamily {
    /// The IPv4 addresses if the name has any, else the IPv6 ones (Envoy's V4_PREFERRED): a
    /// dual-stack name does not double its endpoints.
    #[default]
    V4Preferred,
    V4,
    V6,
    /// Both families, each address its own endpoint.
    All,
}

/// `[cluster.dns]`: how one cluster follows its names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsPolicy {
    /// A name is asked again when its answer's TTL runs out, but never sooner than this...
    #[serde(with = "duration")]
    pub min_refresh: Duration,
    /// ...nor later than this. A failed lookup is tried again after `min_refresh`, doubling up
    /// to `max_refresh`, and the endpoints it had stay meanwhile.
    #[serde(with = "duration")]
    pub max_refresh: Duration,
    pub family: DnsFamily,
}

impl Default for DnsPolicy {
    fn default() -> Self {
        Self {
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(30),
            family: DnsFamily::default(),
        }
    }
}

impl DnsPolicy {
    pub(super) fn check(&self, cluster: &str) -> Result<(), DnsError> {
        if self.min_refresh < Duration::from_millis(100) || self.min_refresh > self.max_refresh {
            return Err(DnsError::Refresh(cluster.to_owned()));
        }
        Ok(())
    }
}
