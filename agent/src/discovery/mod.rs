//! Endpoint discovery: the clusters' DNS names followed at their TTL (Envoy's STRICT_DNS), and
//! their endpoint files (Prometheus file_sd) watched, each address its own endpoint. One task
//! per name asks, hands the answer to its cluster's pool (which adds, keeps and drains
//! endpoints), and waits for the answer's TTL, bounded by the cluster's `[cluster.dns]`. A
//! failed lookup keeps the endpoints the name had and is tried again sooner; an answer that the
//! name has no address (NXDOMAIN, or no record of the family) is an answer: its endpoints
//! drain, as when a service is scaled to zero. A file is looked at every [`FILE_POLL`] and read
//! when it changed; a file that does not read in full keeps the endpoints it gave before.

pub mod dns;
pub mod file;

use std::{
    net::SocketAddr,
    path::PathBuf,
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

use self::{
    dns::{Answer, Resolver},
    file::FileWatch,
};

/// How often an endpoints file is looked at (a `stat`; read only when it changed). Polled, not
/// watched: a Kubernetes ConfigMap volume swaps a symlink, which inotify on the file misses.
pub const FILE_POLL: Duration = Duration::from_secs(1);

/// A lookup's (or file read's) result: the addresses and the TTL they came with, or why
/// there are none.
type Looked = Result<(Vec<SocketAddr>, Option<Duration>), String>;

/// Targets one file may give.
const MAX_FILE_ENDPOINTS: usize = 4096;

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
    /// The entry as written (`orders.default.svc:50051`, `_grpc._tcp.orders.default.svc`), or
    /// the endpoints file's path.
    pub name: String,
    /// `dns` or `file`.
    pub source: &'static str,
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
                        source: match f.source {
                            Source::File { .. } => "file",
                            _ => "dns",
                        },
                        ..NameStatus::default()
                    })
                })
                .collect(),
        });
        let (files, names): (Vec<_>, Vec<_>) = followed
            .into_iter()
            .enumerate()
            .partition(|(_, f)| matches!(f.source, Source::File { .. }));
        for (k, f) in files {
            // The first read now, before the proxy serves (a file of a few kilobytes).
            let mut watch = FileWatch::new(PathBuf::new());
            let read = look_at_file(&f.source, &mut watch);
            if let Some(read) = read {
                record(&*sink, &f, &stats.names[k], read);
            }
            let task = FileTask {
                sink: sink.clone(),
                followed: f,
                stats: stats.clone(),
                index: k,
            };
            tokio::spawn(task.run(watch, stop.clone()));
        }
        if names.is_empty() {
            return Ok(Discovery { stats });
        }
        let resolver = Arc::new(Resolver::new(&config.dns)?);
        // The first answers, all at once, before the proxy serves.
        let first = futures_util::future::join_all(
            names
                .iter()
                .map(|(_, f)| resolver.resolve(&f.source, f.policy.family)),
        )
        .await;
        for ((k, f), answer) in names.into_iter().zip(first) {
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
            if e.source.is_discovered() {
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
    match answer {
        Ok(a) => {
            let ttl = a.valid_until.saturating_duration_since(Instant::now());
            record(sink, f, status, Ok((a.addresses, Some(ttl))));
            ttl.clamp(min, max)
        }
        Err(e) => {
            record(sink, f, status, Err(e.to_string()));
            // min, 2 min, 4 min ... up to max.
            let factor = 1u32 << failures_in_a_row.saturating_sub(1).min(16);
            min.saturating_mul(factor).min(max)
        }
    }
}

/// One lookup's (or file read's) result, in the pool and the stats: the addresses and the
/// TTL they came with, or why there are none (the endpoints stay).
fn record(sink: &dyn EndpointSink, f: &Followed, status: &Mutex<NameStatus>, result: Looked) {
    let mut s = lock(status);
    match result {
        Ok((addresses, ttl)) => {
            let change = sink.set_entry(f.pool_index, f.entry, addresses.clone());
            if change.added + change.removed > 0 {
                info!(cluster = %f.cluster, name = %f.text, source = s.source, added = change.added, removed = change.removed, endpoints = change.now, "discovery changed the cluster's endpoints");
            } else {
                debug!(cluster = %f.cluster, name = %f.text, endpoints = change.now, ttl = ?ttl, "discovery: no change");
            }
            s.answered += 1;
            if addresses.is_empty() {
                s.empty += 1;
            }
            s.addresses = addresses;
            s.last_error = None;
            s.last_answer_unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
            s.ttl_secs = ttl.map(|t| t.as_secs());
        }
        Err(e) => {
            warn!(cluster = %f.cluster, name = %f.text, source = s.source, error = %e, kept = s.addresses.len(), "discovery failed; the endpoints stay");
            s.failed += 1;
            s.last_error = Some(e);
        }
    }
}

/// An endpoints file's task: looks at it every [`FILE_POLL`], reads it when it changed.
struct FileTask {
    sink: Arc<dyn EndpointSink>,
    followed: Followed,
    stats: Arc<DiscoveryStats>,
    index: usize,
}

impl FileTask {
    async fn run(self, mut watch: FileWatch, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(FILE_POLL) => {}
                _ = stop.changed() => return,
            }
            // The stat (and, on a change, the read) off the runtime's threads.
            let source = self.followed.source.clone();
            let looked = tokio::task::spawn_blocking(move || {
                let read = look_at_file(&source, &mut watch);
                (watch, read)
            })
            .await;
            let Ok((back, read)) = looked else { return };
            watch = back;
            if let Some(read) = read {
                record(
                    &*self.sink,
                    &self.followed,
                    &self.stats.names[self.index],
                    read,
                );
            }
        }
    }
}

/// The file's targets if it changed since `watch` last looked (a new watch is made for a
/// file source's path the first time); None when it did not change.
fn look_at_file(source: &Source, watch: &mut FileWatch) -> Option<Looked> {
    let Source::File { path, match_labels } = source else {
        return None;
    };
    if watch.path() != path {
        *watch = FileWatch::new(path.clone());
    }
    if !watch.changed() {
        return None;
    }
    Some(
        file::read_targets(path, match_labels, MAX_FILE_ENDPOINTS)
            .map(|a| (a, None))
            .map_err(|e| e.to_string()),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
