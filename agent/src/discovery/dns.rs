//! One lookup of an endpoint entry's DNS name: its addresses (of the family the cluster
//! wants) and how long the answer holds, or why there is no answer. hickory-resolver does the
//! DNS; this says which of its results is "no such address" (an answer) and which a failure.

use std::{net::SocketAddr, time::Duration};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::{DnsError, NetError, runtime::TokioRuntimeProvider},
    proto::rr::{RData, Record},
};
use tokio::time::Instant;

use crate::config::{
    dns::{DnsConfig, DnsFamily},
    proxy::Source,
};

/// The resolver could not be made (an unreadable /etc/resolv.conf, say).
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct ResolverError(#[from] NetError);

/// Why a lookup has no answer: the endpoints the name had stay.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {source}")]
pub struct LookupError {
    name: String,
    #[source]
    source: NetError,
}

/// What a name stands for now.
#[derive(Debug)]
pub struct Answer {
    /// Sorted, each once.
    pub addresses: Vec<SocketAddr>,
    /// When to ask again (the smallest TTL of the records it came from).
    pub valid_until: Instant,
}

/// An answer with no records says so for this long (when the server gave no negative TTL).
const EMPTY_HOLDS: Duration = Duration::from_secs(1);

pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// The servers of `[dns]`, or /etc/resolv.conf's.
    pub fn new(config: &DnsConfig) -> Result<Resolver, ResolverError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.servers.is_empty() {
            TokioResolver::builder(provider)?
        } else {
            let servers = config
                .servers
                .iter()
                .map(|s| {
                    let at_port = |mut c: ConnectionConfig| {
                        c.port = s.port();
                        c
                    };
                    NameServerConfig::new(
                        s.ip(),
                        true,
                        vec![
                            at_port(ConnectionConfig::udp()),
                            at_port(ConnectionConfig::tcp()),
                        ],
                    )
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts = builder.options_mut();
        opts.timeout = config.timeout;
        opts.attempts = config.attempts;
        // Discovery asks again at the TTL itself: a cache would only answer from the past.
        opts.cache_size = 0;
        Ok(Resolver {
            inner: builder.build()?,
        })
    }

    /// The addresses `source` stands for now.
    pub async fn resolve(&self, source: &Source, family: DnsFamily) -> Result<Answer, LookupError> {
        match source {
            Source::Address(a) => Ok(Answer {
                addresses: vec![*a],
                valid_until: Instant::now() + Duration::from_secs(3600),
            }),
            Source::Dns { host, port } => self.host(host, *port, family).await,
            Source::Srv { name } => self.srv(name, family).await,
            // Not DNS: discovery reads files itself (`super::file`).
            Source::File { .. } => Ok(Answer {
                addresses: Vec::new(),
                valid_until: Instant::now() + Duration::from_secs(3600),
            }),
        }
    }

    async fn host(&self, host: &str, port: u16, family: DnsFamily) -> Result<Answer, LookupError> {
        let failed = |source| LookupError {
            name: host.to_owned(),
            source,
        };
        let (v4, v6) = match family {
            DnsFamily::V4 => (Some(self.records(host, false).await), None),
            DnsFamily::V6 => (None, Some(self.records(host, true).await)),
            DnsFamily::All => {
                let (a, b) = tokio::join!(self.records(host, false), self.records(host, true));
                (Some(a), Some(b))
            }
            DnsFamily::V4Preferred => {
                let a = self.records(host, false).await;
                match &a {
                    Ok(found) if found.addresses.is_empty() => {
                        (None, Some(self.records(host, true).await))
                    }
                    _ => (Some(a), None),
                }
            }
        };
        let mut answer = Answer {
            addresses: Vec::new(),
            valid_until: Instant::now() + Duration::from_secs(86_400),
        };
        for part in [v4, v6].into_iter().flatten() {
            let part = part.map_err(failed)?;
            answer.valid_until = answer.valid_until.min(part.valid_until);
            answer.addresses.extend(
                part.addresses
                    .into_iter()
                    .map(|a| SocketAddr::new(a.ip(), port)),
            );
        }
        answer.addresses.sort_unstable();
        answer.addresses.dedup();
        Ok(answer)
    }

    /// The A (or AAAA) records of `host`, port 0; none is an answer too.
    async fn records(&self, host: &str, v6: bool) -> Result<Answer, NetError> {
        let looked = if v6 {
            self.inner.ipv6_lookup(host).await
        } else {
            self.inner.ipv4_lookup(host).await
        };
        match looked {
            Ok(lookup) => Ok(Answer {
                addresses: lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) if !v6 => Some(SocketAddr::new(a.0.into(), 0)),
                        RData::AAAA(a) if v6 => Some(SocketAddr::new(a.0.into(), 0)),
                        _ => None,
                    })
                    .collect(),
                valid_until: lookup.valid_until().into(),
            }),
            Err(e) => empty_answer(e),
        }
    }

    /// Each target of the lowest priority's SRV records, at its port (RFC 2782: a client uses
    /// the lowest priority it can reach; weights are for picking one, and here each target is
    /// an endpoint of its own, balanced by load).
    async fn srv(&self, name: &str, family: DnsFamily) -> Result<Answer, LookupError> {
        let failed = |source| LookupError {
            name: name.to_owned(),
            source,
        };
        let lookup = match self.inner.srv_lookup(name).await {
            Ok(l) => l,
            Err(e) => return empty_answer(e).map_err(failed),
        };
        let records: Vec<(&Record, u16, u16)> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((r, srv.priority, srv.port)),
                _ => None,
            })
            .collect();
        let lowest = records.iter().map(|(_, p, _)| *p).min();
        let mut answer = Answer {
            addresses: Vec::new(),
            valid_until: lookup.valid_until().into(),
        };
        for (r, priority, port) in records {
            if Some(priority) != lowest {
                continue;
            }
            let RData::SRV(srv) = &r.data else { continue };
            let target = srv.target.to_string();
            let found = self.host(&target, port, family).await?;
            answer.valid_until = answer.valid_until.min(found.valid_until);
            answer.addresses.extend(found.addresses);
        }
        answer.addresses.sort_unstable();
        answer.addresses.dedup();
        Ok(answer)
    }
}

/// NXDOMAIN, or no record of the type asked: the name has no address now, for its negative
/// TTL. Anything else is a failure.
fn empty_answer(e: NetError) -> Result<Answer, NetError> {
    match &e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => {
            let holds = no
                .negative_ttl
                .map_or(EMPTY_HOLDS, |s| Duration::from_secs(u64::from(s)));
            Ok(Answer {
                addresses: Vec::new(),
                valid_until: Instant::now() + holds,
            })
        }
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_are_answers_without_a_lookup() {
        let r = Resolver::new(&DnsConfig {
            servers: vec!["127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!())],
            ..DnsConfig::default()
        });
        let Ok(r) = r else {
            panic!("resolver");
        };
        let a: SocketAddr = "10.0.0.1:50051".parse().unwrap_or_else(|_| unreachable!());
        let answer = r.resolve(&Source::Address(a), DnsFamily::All).await;
        assert!(matches!(answer, Ok(x) if x.addresses == [a]));
    }
}
