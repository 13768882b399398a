//! Every breaker of the agent, by scope, and the admission of one call through them: its
//! client's, its cluster's and its method's breakers before an endpoint is picked, then the
//! picked endpoint's and its subset's. A call is recorded in each breaker it went through.
//!
//! Each breaker has its own lock, held for a few hundred nanoseconds at most (no I/O under
//! it), so calls to different endpoints or clients never wait for each other.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    circuit::{Breaker, Change, Figures, Mark, Permit, Reason, SignalAction},
    classify::Verdict,
    config::{BreakerConfig, Scope},
};

/// Which breaker: its scope, the name of what it guards, and the priority class it is for
/// (None for the default class, and for clients).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct BreakerId {
    pub scope: Scope,
    /// `cluster/endpoint`, `cluster/subset`, `cluster`, `cluster/path`, or the client key.
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
}

impl std::fmt::Display for BreakerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.scope.as_str(), self.name)?;
        if let Some(c) = &self.class {
            write!(f, " (class {c})")?;
        }
        Ok(())
    }
}

/// A breaker changed state.
#[derive(Clone, Debug)]
pub struct Transition {
    pub breaker: Arc<BreakerId>,
    pub change: Change,
}

/// A call refused by a breaker.
#[derive(Clone, Debug)]
pub struct Rejected {
    pub breaker: Arc<BreakerId>,
    pub reason: Reason,
    pub retry_after: Duration,
}

/// One breaker's figures, for the API and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    #[serde(flatten)]
    pub id: BreakerId,
    #[serde(flatten)]
    pub figures: Figures,
}

struct Cell {
    id: Arc<BreakerId>,
    breaker: Mutex<Breaker>,
}

impl Cell {
    fn lock(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A permit on one breaker, given back (as neutral) if dropped unrecorded: a call that
/// vanished must not hold a half-open probe slot for ever.
struct Held {
    cell: Arc<Cell>,
    permit: Option<Permit>,
}

impl Held {
    fn record(&mut self, mark: Mark, latency: Duration, now: Instant, out: &mut Vec<Transition>) {
        if let Some(p) = self.permit.take()
            && let Some(change) = self.cell.lock().record(p, mark, latency, now)
        {
            out.push(Transition {
                breaker: self.cell.id.clone(),
                change,
            });
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.cell.lock().release(p);
        }
    }
}

/// The permits one call holds.
#[derive(Default)]
pub struct CallPermits {
    client: Option<Held>,
    cluster: Option<Held>,
    method: Option<Held>,
    subset: Option<Held>,
    endpoint: Option<Held>,
}

impl CallPermits {
    /// Records one attempt on the endpoint it was sent to (and its subset), before the call
    /// tries another endpoint.
    pub fn record_attempt(
        &mut self,
        mark: Mark,
        latency: Duration,
        now: Instant,
        out: &mut Vec<Transition>,
    ) {
        for mut h in [self.endpoint.take(), self.subset.take()]
            .into_iter()
            .flatten()
        {
            h.record(mark, latency, now, out);
        }
    }

    /// Records the call's result in every breaker it still holds.
    pub fn record_call(
        &mut self,
        verdict: Verdict,
        latency: Duration,
        now: Instant,
        out: &mut Vec<Transition>,
    ) {
        if let Some(h) = &mut self.client {
            h.record(verdict.client, latency, now, out);
        }
        for h in [
            &mut self.cluster,
            &mut self.method,
            &mut self.subset,
            &mut self.endpoint,
        ]
        .into_iter()
        .flatten()
        {
            h.record(verdict.upstream, latency, now, out);
        }
    }

    /// Whether any of the permits is a half-open probe.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by tests"))]
    pub fn probing(&self) -> bool {
        [
            &self.client,
            &self.cluster,
            &self.method,
            &self.subset,
            &self.endpoint,
        ]
        .into_iter()
        .flatten()
        .any(|h| h.permit.is_some_and(|p| p.is_probe()))
    }
}

/// The shape of one cluster, as the breakers need it.
pub struct ClusterShape<'a> {
    pub name: &'a str,
    pub endpoints: &'a [String],
    /// Subset index of each endpoint.
    pub endpoint_subset: &'a [usize],
    pub subsets: &'a [String],
}

struct ClassBreakers {
    cluster: Option<Arc<Cell>>,
    /// Empty when the cluster has one subset only (its breaker would be the cluster's).
    subsets: Vec<Arc<Cell>>,
    endpoints: Vec<Arc<Cell>>,
    methods: RwLock<HashMap<Box<str>, Arc<Cell>>>,
}

struct ClusterBreakers {
    name: String,
    endpoint_subset: Vec<usize>,
    classes: Vec<ClassBreakers>,
}

pub struct Breakers {
    config: BreakerConfig,
    epoch: Instant,
    clusters: Vec<ClusterBreakers>,
    clients: Mutex<HashMap<Box<str>, Arc<Cell>>>,
    next_seed: AtomicU64,
    /// Clients and methods seen while their map was full: no breaker for them.
    pub untracked_clients: AtomicU64,
    pub untracked_methods: AtomicU64,
}

impl Breakers {
    pub fn new(config: BreakerConfig, clusters: &[ClusterShape<'_>], epoch: Instant) -> Self {
        let mut me = Self {
            next_seed: AtomicU64::new(config.seed.unwrap_or_else(|| fastrand::u64(..))),
            config,
            epoch,
            clusters: Vec::new(),
            clients: Mutex::new(HashMap::new()),
            untracked_clients: AtomicU64::new(0),
            untracked_methods: AtomicU64::new(0),
        };
        me.clusters = clusters.iter().map(|c| me.cluster_breakers(c)).collect();
        me
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn cell(&self, scope: Scope, class: usize, name: String) -> Option<Arc<Cell>> {
        let policy = self.config.policy(class, scope)?;
        let class_name = (class != 0 && scope != Scope::Client)
            .then(|| self.config.classes.get(class).cloned())
            .flatten();
        Some(Arc::new(Cell {
            id: Arc::new(BreakerId {
                scope,
                name,
                class: class_name,
            }),
            breaker: Mutex::new(Breaker::new(
                policy,
                self.epoch,
                self.next_seed.fetch_add(1, Ordering::Relaxed),
            )),
        }))
    }

    fn cluster_breakers(&self, c: &ClusterShape<'_>) -> ClusterBreakers {
        let classes = (0..self.config.classes.len())
            .map(|class| ClassBreakers {
                cluster: self.cell(Scope::Cluster, class, c.name.to_owned()),
                subsets: if c.subsets.len() > 1 {
                    c.subsets
                        .iter()
                        .filter_map(|s| self.cell(Scope::Subset, class, format!("{}/{s}", c.name)))
                        .collect()
                } else {
                    Vec::new()
                },
                endpoints: c
                    .endpoints
                    .iter()
                    .filter_map(|e| self.cell(Scope::Endpoint, class, format!("{}/{e}", c.name)))
                    .collect(),
                methods: RwLock::new(HashMap::new()),
            })
            .collect();
        ClusterBreakers {
            name: c.name.to_owned(),
            endpoint_subset: c.endpoint_subset.to_vec(),
            classes,
        }
    }

    fn class(&self, cluster: usize, class: usize) -> Option<&ClassBreakers> {
        self.clusters.get(cluster)?.classes.get(class)
    }

    /// Admits a call through its client's, cluster's and method's breakers (before an
    /// endpoint is picked). Changes of state go to `out`.
    pub fn admit_call(
        &self,
        cluster: usize,
        class: usize,
        method: &str,
        client: Option<&str>,
        now: Instant,
        out: &mut Vec<Transition>,
    ) -> Result<CallPermits, Rejected> {
        let mut permits = CallPermits::default();
        if let Some(key) = client
            && let Some(cell) = self.client_cell(key, now)
        {
            permits.client = Some(admit(&cell, now, out)?);
        }
        let Some(cb) = self.class(cluster, class) else {
            return Ok(permits);
        };
        if let Some(cell) = &cb.cluster {
            permits.cluster = Some(admit(cell, now, out)?);
        }
        if let Some(cell) = self.method_cell(cluster, class, cb, method) {
            permits.method = Some(admit(&cell, now, out)?);
        }
        Ok(permits)
    }

    /// Whether an endpoint (and its subset) would take a call now; changes nothing.
    pub fn endpoint_admissible(
        &self,
        cluster: usize,
        class: usize,
        endpoint: usize,
        now: Instant,
    ) -> bool {
        let Some(cb) = self.class(cluster, class) else {
            return true;
        };
        let subset = self.subset_of(cluster, endpoint);
        [
            cb.endpoints.get(endpoint),
            subset.and_then(|s| cb.subsets.get(s)),
        ]
        .into_iter()
        .flatten()
        .all(|c| c.lock().admissible(now))
    }

    /// Takes the picked endpoint's (and its subset's) permits for the call.
    pub fn admit_endpoint(
        &self,
        permits: &mut CallPermits,
        cluster: usize,
        class: usize,
        endpoint: usize,
        now: Instant,
        out: &mut Vec<Transition>,
    ) -> Result<(), Rejected> {
        let Some(cb) = self.class(cluster, class) else {
            return Ok(());
        };
        permits.subset = match self
            .subset_of(cluster, endpoint)
            .and_then(|s| cb.subsets.get(s))
        {
            Some(cell) => Some(admit(cell, now, out)?),
            None => None,
        };
        permits.endpoint = match cb.endpoints.get(endpoint) {
            Some(cell) => Some(admit(cell, now, out)?),
            None => None,
        };
        Ok(())
    }

    /// Why no endpoint of a cluster takes calls: the open breaker that probes soonest.
    pub fn no_endpoint(&self, cluster: usize, class: usize, now: Instant) -> Option<Rejected> {
        let cb = self.class(cluster, class)?;
        cb.endpoints
            .iter()
            .chain(&cb.subsets)
            .filter_map(|c| {
                c.lock().refusal(now).map(|r| Rejected {
                    breaker: c.id.clone(),
                    reason: r.reason,
                    retry_after: r.retry_after,
                })
            })
            .min_by_key(|r| r.retry_after)
    }

    fn subset_of(&self, cluster: usize, endpoint: usize) -> Option<usize> {
        self.clusters
            .get(cluster)?
            .endpoint_subset
            .get(endpoint)
            .copied()
    }

    fn method_cell(
        &self,
        cluster: usize,
        class: usize,
        cb: &ClassBreakers,
        method: &str,
    ) -> Option<Arc<Cell>> {
        self.config.policy(class, Scope::Method)?;
        if let Some(c) = read(&cb.methods).get(method) {
            return Some(c.clone());
        }
        let mut map = write(&cb.methods);
        if let Some(c) = map.get(method) {
            return Some(c.clone());
        }
        if map.len() >= self.config.max_methods {
            self.untracked_methods.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let name = format!("{}{method}", self.clusters.get(cluster)?.name);
        let cell = self.cell(Scope::Method, class, name)?;
        map.insert(method.into(), cell.clone());
        Some(cell)
    }

    fn client_cell(&self, key: &str, now: Instant) -> Option<Arc<Cell>> {
        let policy = self.config.policy(0, Scope::Client)?;
        let mut map = lock(&self.clients);
        if let Some(c) = map.get(key) {
            return Some(c.clone());
        }
        if map.len() >= self.config.max_clients {
            // Forget the clients that are closed and were quiet for a whole window.
            let idle_before = u64::try_from(
                now.saturating_duration_since(self.epoch)
                    .saturating_sub(policy.window)
                    .as_nanos(),
            )
            .unwrap_or(u64::MAX);
            map.retain(|_, c| {
                let b = c.lock();
                b.state() != super::circuit::State::Closed || b.last_active() >= idle_before
            });
            if map.len() >= self.config.max_clients {
                self.untracked_clients.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let cell = self.cell(Scope::Client, 0, key.to_owned())?;
        map.insert(key.into(), cell.clone());
        Some(cell)
    }

    fn every_cell(&self) -> Vec<Arc<Cell>> {
        let mut cells = Vec::new();
        for c in &self.clusters {
            for cb in &c.classes {
                cells.extend(cb.cluster.iter().cloned());
                cells.extend(cb.subsets.iter().cloned());
                cells.extend(cb.endpoints.iter().cloned());
                cells.extend(read(&cb.methods).values().cloned());
            }
        }
        cells.extend(lock(&self.clients).values().cloned());
        cells
    }

    /// Every breaker's figures.
    pub fn snapshot(&self, now: Instant) -> Vec<Snapshot> {
        self.every_cell()
            .into_iter()
            .map(|c| Snapshot {
                id: (*c.id).clone(),
                figures: c.lock().figures(now),
            })
            .collect()
    }

    /// Turns the open breakers whose period passed half-open (run every few hundred ms, so
    /// the state shown is true without traffic).
    pub fn tick(&self, now: Instant, out: &mut Vec<Transition>) {
        for c in self.every_cell() {
            if let Some(change) = c.lock().tick(now) {
                out.push(Transition {
                    breaker: c.id.clone(),
                    change,
                });
            }
        }
    }

    /// An outside signal about one endpoint (every class's breaker of it).
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "the correlation stage feeds kernel signals (issue 6)"
        )
    )]
    pub fn signal_endpoint(
        &self,
        cluster: usize,
        endpoint: usize,
        kind: &str,
        action: SignalAction,
        now: Instant,
        out: &mut Vec<Transition>,
    ) {
        let Some(c) = self.clusters.get(cluster) else {
            return;
        };
        for cb in &c.classes {
            if let Some(cell) = cb.endpoints.get(endpoint)
                && let Some(change) = cell.lock().signal(now, kind, action)
            {
                out.push(Transition {
                    breaker: cell.id.clone(),
                    change,
                });
            }
        }
    }

    /// An outside signal about one client.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "the correlation stage feeds kernel signals (issue 6)"
        )
    )]
    pub fn signal_client(
        &self,
        key: &str,
        kind: &str,
        action: SignalAction,
        now: Instant,
        out: &mut Vec<Transition>,
    ) {
        if let Some(cell) = self.client_cell(key, now)
            && let Some(change) = cell.lock().signal(now, kind, action)
        {
            out.push(Transition {
                breaker: cell.id.clone(),
                change,
            });
        }
    }

    /// An operator opens (`open`) or closes a breaker, named as in [`BreakerId`]'s display
    /// (`endpoint orders/10.0.0.7:50051`). None when there is no such breaker.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "the status API trips and resets breakers (issue 7)"
        )
    )]
    pub fn force(&self, name: &str, open: bool, now: Instant) -> Option<Option<Transition>> {
        let cell = self
            .every_cell()
            .into_iter()
            .find(|c| c.id.to_string() == name || c.id.name == name)?;
        let mut b = cell.lock();
        let change = if open {
            b.force_open(now)
        } else {
            b.force_close(now)
        };
        Some(change.map(|change| Transition {
            breaker: cell.id.clone(),
            change,
        }))
    }
}

/// Admits through one breaker, noting a change (open -> half-open).
fn admit(cell: &Arc<Cell>, now: Instant, out: &mut Vec<Transition>) -> Result<Held, Rejected> {
    match cell.lock().admit(now) {
        Ok((permit, change)) => {
            if let Some(change) = change {
                out.push(Transition {
                    breaker: cell.id.clone(),
                    change,
                });
            }
            Ok(Held {
                cell: cell.clone(),
                permit: Some(permit),
            })
        }
        Err(r) => Err(Rejected {
            breaker: cell.id.clone(),
            reason: r.reason,
            retry_after: r.retry_after,
        }),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
