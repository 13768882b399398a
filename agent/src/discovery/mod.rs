//! Endpoint discovery: the clusters' DNS names followed at their TTL (Envoy's STRICT_DNS), each
//! address its own endpoint. One task per name asks, hands the answer to its cluster's pool
//! (which adds, keeps and drains endpoints), and waits for the answer's TTL, bounded by the
//! cluster's `[cluster.dns]`. A failed lookup keeps the endpoints the name had and is tried
//! again sooner; an answer that the name has no address (NXDOMAIN, or no record of the
//! family) is an answer: its endpoints drain, as when a service is scaled to zero.

pub mod dns;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use crate::config::{
    AgentConfig,
    dns::DnsPolicy,
    proxy::{Cluster, Source},
};

use self::dns::{Answer, Resolver};

/// Where discovery's answers go: the proxy's clusters.
pub trait EndpointSink: Send + Sync + 'static {
    /// Entry `entry` of cluster `cluster` (both indexes in the configuration) stands for
    /// `addresses` now.
    fn set_entry(&self, cluster: usize, entry: usize, addresses: Vec<SocketAddr>) -> SetChange;
}

/// What a change of a cluster's endpoints did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetChange {
    pub added: usize,
    pub removed: usize,
    /// Endpoints the cluster has now.
    pub now: usize,
}

/// One DNS name of a cluster, as discovery last saw it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NameStatus {
    pub cluster: String,
    /// The entry as written (`orders.default.svc:50051`, `_grpc._tcp.orders.default.svc`).
    pub name: String,
    /// The endpoints it stands for now (the last good answer's).
    pub addresses: Vec<SocketAddr>,
    /// Lookups that answered (addresses, or that there are none).
    pub answered: u64,
    /// Of those, the ones that said the name has no address.
    pub empty: u64,
    /// Lookups that failed (timeout, SERVFAIL, no server): the endpoints stayed.
    pub failed: u64,
    /// Why the last lookup failed, while it is the last one.
    pub last_error: Option<String>,
    /// Unix seconds of the last answer.
    pub last_answer_unix: Option<u64>,
    /// The last answer's TTL (seconds), before the cluster's bounds.
    pub ttl_secs: Option<u64>,
}

/// What every name's task reports, shared with the status API and the metrics.
#[derive(Default)]
pub struct DiscoveryStats {
    names: Vec<Mutex<NameStatus>>,
}

impl DiscoveryStats {
    pub fn names(&self) -> Vec<NameStatus> {
        self.names.iter().map(|n| lock(n).clone()).collect()
    }
}

/// The running discovery: its tasks end when `stop` turns true.
pub struct Discovery {
    pub stats: Arc<DiscoveryStats>,
}

/// A cluster entry that is a DNS name, and where its answers go.
struct Followed {
    pool_index: usize,
    entry: usize,
    source: Source,
    policy: DnsPolicy,
    cluster: String,
    /// The entry as written.
    text: String,
}

impl Discovery {
    /// Asks every DNS name of `config`'s clusters once (so the proxy starts with their
    /// endpoints), then follows each on a task of its own, until `stop` turns true (or its
    /// sender is dropped).
    pub async fn start(
        config: &AgentConfig,
        sink: Arc<dyn EndpointSink>,
        stop: watch::Receiver<bool>,
    ) -> Result<Discovery, dns::ResolverError> {
        let followed = followed(&config.clusters);
        let stats = Arc::new(DiscoveryStats {
            names: followed
                .iter()
                .map(|f| {
                    Mutex::new(NameStatus {
                        cluster: f.cluster.clone(),
                        name: f.text.clone(),
                        ..NameStatus::default()
                    })
                })
                .collect(),
        });
        if followed.is_empty() {
            return Ok(Discovery { stats });
        }
        let resolver = Arc::new(Resolver::new(&config.dns)?);
        // The first answers, all at once, before the proxy serves.
        let first = futures_util::future::join_all(
            followed
                .iter()
                .map(|f| resolver.resolve(&f.source, f.policy.family)),
        )
        .await;
        for (k, (f, answer)) in followed.into_iter().zip(first).enumerate() {
            let wait = apply(&*sink, &f, &stats.names[k], answer, 0);
            let name = NameTask {
                resolver: resolver.clone(),
                sink: sink.clone(),
                followed: f,
                stats: stats.clone(),
                index: k,
            };
            tokio::spawn(name.run(wait, stop.clone()));
        }
        Ok(Discovery { stats })
    }
}

/// The DNS entries of every cluster.
fn followed(clusters: &[Cluster]) -> Vec<Followed> {
    let mut out = Vec::new();
    for (pool_index, c) in clusters.iter().enumerate() {
        for (entry, e) in c.endpoints.iter().enumerate() {
            if e.source.is_dns() {
                out.push(Followed {
                    pool_index,
                    entry,
                    source: e.source.clone(),
                    policy: c.dns,
                    cluster: c.name.clone(),
                    text: e.text.clone(),
                });
            }
        }
    }
    out
}

struct NameTask {
    resolver: Arc<Resolver>,
    sink: Arc<dyn EndpointSink>,
    followed: Followed,
    stats: Arc<DiscoveryStats>,
    index: usize,
}

impl NameTask {
    async fn run(self, mut wait: Duration, mut stop: watch::Receiver<bool>) {
        let mut failures_in_a_row = 0u32;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            let f = &self.followed;
            let answer = self.resolver.resolve(&f.source, f.policy.family).await;
            if answer.is_err() {
                failures_in_a_row = failures_in_a_row.saturating_add(1);
            } else {
                failures_in_a_row = 0;
            }
            wait = apply(
                &*self.sink,
                f,
                &self.stats.names[self.index],
                answer,
                failures_in_a_row,
            );
        }
    }
}

/// Hands one lookup's result to the pool and the stats; returns how long to wait before the
/// next.
fn apply(
    sink: &dyn EndpointSink,
    f: &Followed,
    status: &Mutex<NameStatus>,
    answer: Result<Answer, dns::LookupError>,
    failures_in_a_row: u32,
) -> Duration {
    let (min, max) = (f.policy.min_refresh, f.policy.max_refresh);
    let mut s = lock(status);
    match answer {
        Ok(a) => {
            let ttl = a.valid_until.saturating_duration_since(Instant::now());
            let change = sink.set_entry(f.pool_index, f.entry, a.addresses.clone());
            if change.added + change.removed > 0 {
                info!(cluster = %f.cluster, name = %f.text, added = change.added, removed = change.removed, endpoints = change.now, "DNS changed the cluster's endpoints");
            } else {
                debug!(cluster = %f.cluster, name = %f.text, endpoints = change.now, ttl = ?ttl, "DNS answer unchanged");
            }
            s.answered += 1;
            if a.addresses.is_empty() {
                s.empty += 1;
            }
            s.addresses = a.addresses;
            s.last_error = None;
            s.last_answer_unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            s.ttl_secs = Some(ttl.as_secs());
            ttl.clamp(min, max)
        }
        Err(e) => {
            warn!(cluster = %f.cluster, name = %f.text, error = %e, kept = s.addresses.len(), "DNS lookup failed; the endpoints stay");
            s.failed += 1;
            s.last_error = Some(e.to_string());
            // min, 2 min, 4 min ... up to max.
            let factor = 1u32 << failures_in_a_row.saturating_sub(1).min(16);
            min.saturating_mul(factor).min(max)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
