//! Every breaker of the agent, by scope, and the admission of one call through them: its
//! client's, its cluster's and its method's breakers before an endpoint is picked, then the
//! picked endpoint's and its subset's. A call is recorded in each breaker it went through.
//!
//! Each breaker has its own lock, held for a few hundred nanoseconds at most (no I/O under
//! it), so calls to different endpoints or clients never wait for each other.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::signals::SignalKind;

use super::{
    circuit::{Breaker, Change, Figures, Mark, Permit, Reason, SignalAction, State, nanos},
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
    /// The breaker's state and generation, mirrored after every change under the lock, so
    /// that a closed breaker admits a call without taking it, and a healthy one counts a
    /// success without it (most calls, most of the time).
    gate: AtomicU64,
    /// Successes counted without the lock, per window bucket: `bucket index << 24 | count`.
    /// Moved into the breaker's window each time the lock is taken.
    /// In [`STRIPES`] rings of `buckets` counters, one per group of threads, so that runtime
    /// threads counting at once do not fight over one cache line.
    successes: Box<[AtomicU64]>,
    buckets: usize,
    bucket_nanos: u64,
}

/// Rings of lock-free success counters per breaker (see [`Cell::successes`]).
const STRIPES: usize = 4;

/// This thread's ring, given out in turn as threads first count.
fn stripe() -> usize {
    use std::cell::Cell as LocalCell;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: LocalCell<usize> = const { LocalCell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
        }
        s.get()
    })
}

const GATE_STATE: u64 = 0b11;
const GATE_CLOSED: u64 = 0;
const GATE_OPEN: u64 = 1;
/// Set while a success only counts (see [`Breaker::success_only_counts`]).
const GATE_SUCCESS_ONLY_COUNTS: u64 = 0b100;
const GATE_GENERATION_SHIFT: u32 = 3;
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

fn gate_of(b: &Breaker) -> u64 {
    let state = match b.state() {
        State::Closed => GATE_CLOSED,
        State::Open => GATE_OPEN,
        State::HalfOpen => 2,
    };
    let counts_only = if b.success_only_counts() {
        GATE_SUCCESS_ONLY_COUNTS
    } else {
        0
    };
    (b.generation() << GATE_GENERATION_SHIFT) | counts_only | state
}

/// A breaker's lock; the gate is brought up to date when it is let go.
struct Locked<'a> {
    cell: &'a Cell,
    guard: MutexGuard<'a, Breaker>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Breaker;
    fn deref(&self) -> &Breaker {
        &self.guard
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Breaker {
        &mut self.guard
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.cell
            .gate
            .store(gate_of(&self.guard), Ordering::Release);
    }
}

impl Cell {
    fn new(id: BreakerId, breaker: Breaker) -> Self {
        let (bucket_nanos, buckets) = breaker.window_shape();
        Self {
            id: Arc::new(id),
            gate: AtomicU64::new(gate_of(&breaker)),
            successes: (0..buckets * STRIPES).map(|_| AtomicU64::new(0)).collect(),
            buckets,
            bucket_nanos: bucket_nanos.max(1),
            breaker: Mutex::new(breaker),
        }
    }

    /// The breaker, with the successes counted meanwhile moved into its window.
    fn lock(&self) -> Locked<'_> {
        let mut guard = self.breaker.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in &self.successes {
            if slot.load(Ordering::Relaxed) != 0 {
                let v = slot.swap(0, Ordering::AcqRel);
                if v != 0 {
                    guard.absorb_successes(v >> COUNT_BITS, (v & COUNT_MASK) as u32);
                }
            }
        }
        Locked { cell: self, guard }
    }

    /// Notes a change of this breaker's state, if there was one.
    fn report(&self, change: Option<Change>, out: &mut Vec<Transition>) {
        if let Some(change) = change {
            out.push(Transition {
                breaker: self.id.clone(),
                change,
            });
        }
    }

    /// Whether the breaker is open, read without the lock.
    fn open(&self) -> bool {
        self.gate.load(Ordering::Acquire) & GATE_STATE == GATE_OPEN
    }

    /// The generation of a closed breaker, read without the lock.
    fn closed(&self) -> Option<u64> {
        let g = self.gate.load(Ordering::Acquire);
        (g & GATE_STATE == GATE_CLOSED).then_some(g >> GATE_GENERATION_SHIFT)
    }

    /// Counts a success without the lock, if that is all it would do (see the gate). False
    /// when the lock is needed.
    /// `t`: nanoseconds since the registry's (and every breaker's) epoch.
    fn count_success(&self, generation: u64, t: u64) -> bool {
        let want = (generation << GATE_GENERATION_SHIFT) | GATE_SUCCESS_ONLY_COUNTS | GATE_CLOSED;
        if self.gate.load(Ordering::Acquire) != want || self.buckets == 0 {
            return false;
        }
        let index = t / self.bucket_nanos;
        if index >= 1 << (64 - COUNT_BITS) {
            return false;
        }
        let Some(slot) = self
            .successes
            .get(stripe() * self.buckets + (index % self.buckets as u64) as usize)
        else {
            return false;
        };
        let mut v = slot.load(Ordering::Relaxed);
        loop {
            let held = v >> COUNT_BITS;
            let new = if v != 0 && held == index {
                if v & COUNT_MASK == COUNT_MASK {
                    return false;
                }
                v + 1
            } else if v == 0 || held < index {
                // Empty, or a bucket a whole window old: gone from the window anyway.
                (index << COUNT_BITS) | 1
            } else {
                // A newer bucket: this clock reading is a window late; let the lock sort it.
                return false;
            };
            match slot.compare_exchange_weak(v, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now_there) => v = now_there,
            }
        }
    }
}

/// A breaker held by a call: borrowed from the registry (endpoint, subset, cluster: they live
/// as long as it), or shared (client and method breakers, made as calls come, and a client's
/// may be forgotten while a call holds it).
enum CellRef<'a> {
    Borrowed(&'a Cell),
    Shared(Arc<Cell>),
}

impl std::ops::Deref for CellRef<'_> {
    type Target = Cell;
    fn deref(&self) -> &Cell {
        match self {
            CellRef::Borrowed(c) => c,
            CellRef::Shared(c) => c,
        }
    }
}

/// A permit on one breaker, given back (as neutral) if dropped unrecorded: a call that
/// vanished must not hold a half-open probe slot for ever.
struct Held<'a> {
    cell: CellRef<'a>,
    permit: Option<Permit>,
}

impl Held<'_> {
    /// `t`: `now` on the registry's clock.
    fn record(
        &mut self,
        mark: Mark,
        latency: Duration,
        now: Instant,
        t: u64,
        out: &mut Vec<Transition>,
    ) {
        let Some(p) = self.permit.take() else { return };
        if mark == Mark::Success && !p.is_probe() && self.cell.count_success(p.generation(), t) {
            return;
        }
        let change = self.cell.lock().record(p, mark, latency, now);
        self.cell.report(change, out);
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.cell.lock().release(p);
        }
    }
}

/// The permits one call holds.
pub struct CallPermits<'a> {
    registry: &'a Breakers,
    client: Option<Held<'a>>,
    cluster: Option<Held<'a>>,
    method: Option<Held<'a>>,
    subset: Option<Held<'a>>,
    endpoint: Option<Held<'a>>,
}

impl<'a> CallPermits<'a> {
    fn new(registry: &'a Breakers) -> Self {
        Self {
            registry,
            client: None,
            cluster: None,
            method: None,
            subset: None,
            endpoint: None,
        }
    }

    fn clock(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.registry.epoch))
    }

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
            h.record(mark, latency, now, self.clock(now), out);
        }
    }

    /// Records the call's result in every breaker it still holds; a fault of a `client` that
    /// had no breaker yet makes it one.
    pub fn record_call(
        &mut self,
        verdict: Verdict,
        latency: Duration,
        now: Instant,
        client: Option<&str>,
        out: &mut Vec<Transition>,
    ) {
        let t = self.clock(now);
        match (&mut self.client, client) {
            (Some(h), _) => h.record(verdict.client, latency, now, t, out),
            (None, Some(key)) if verdict.client == Mark::Failure => {
                self.registry.client_fault(key, now, out);
            }
            _ => {}
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
            h.record(verdict.upstream, latency, now, t, out);
        }
    }

    /// Whether any of the permits is a half-open probe.
    #[cfg(test)]
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

/// The shape of one cluster, as the breakers need it. (Its endpoints come and go: each gets
/// its breakers from [`Breakers::endpoint`] when it joins.)
pub struct ClusterShape<'a> {
    pub name: &'a str,
    pub subsets: &'a [String],
    /// Only endpoint breakers: the passthrough cluster's endpoints are unrelated services, so
    /// a cluster or method breaker over all of them would let one fail the others.
    pub endpoints_only: bool,
}

/// The breakers a call to one endpoint goes through, for every priority class: the endpoint's
/// own and its subset's. Made by [`Breakers::endpoint`] when the endpoint joins its cluster
/// (from the configuration, from DNS, or as an intercepted connection's original destination)
/// and held by the endpoint and by the connections to it: a kernel signal about one of those
/// reaches the breaker without an index into anything that may have changed since.
pub struct EndpointBreakers {
    /// `cluster/address`, as the breakers and the evidence name it.
    pub name: Arc<str>,
    /// By class.
    classes: Box<[EndpointClass]>,
}

struct EndpointClass {
    endpoint: Option<Arc<Cell>>,
    /// None when the cluster has one subset only (its breaker would be the cluster's).
    subset: Option<Arc<Cell>>,
}

impl EndpointBreakers {
    fn class(&self, class: usize) -> Option<&EndpointClass> {
        self.classes.get(class)
    }

    /// The endpoint's and its subset's breakers of one class.
    fn cells(&self, class: usize) -> impl Iterator<Item = &Arc<Cell>> {
        self.class(class)
            .into_iter()
            .flat_map(|c| c.endpoint.iter().chain(c.subset.iter()))
    }
}

impl std::fmt::Debug for EndpointBreakers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("EndpointBreakers").field(&self.name).finish()
    }
}

type Map<V> = HashMap<Box<str>, V, foldhash::quality::RandomState>;

/// Method breakers: an open-addressed table that only grows (up to `max` methods, in twice
/// as many slots), so that finding a method's breaker takes no lock and no reference count,
/// and a breaker, once made, lives as long as the registry.
type MethodEntry = Box<(Box<str>, Arc<Cell>)>;

struct MethodTable {
    slots: Box<[OnceLock<MethodEntry>]>,
    hasher: foldhash::quality::RandomState,
    len: AtomicUsize,
    max: usize,
}

impl MethodTable {
    fn new(max: usize) -> Self {
        Self {
            slots: (0..(max * 2).max(1)).map(|_| OnceLock::new()).collect(),
            hasher: foldhash::quality::RandomState::default(),
            len: AtomicUsize::new(0),
            max,
        }
    }

    fn full(&self) -> bool {
        self.len.load(Ordering::Relaxed) >= self.max
    }

    fn get_or_insert(
        &self,
        method: &str,
        make: impl FnOnce() -> Option<Arc<Cell>>,
    ) -> Option<&Cell> {
        use std::hash::BuildHasher as _;
        let n = self.slots.len();
        let start = self.hasher.hash_one(method) as usize;
        let mut make = Some(make);
        // A breaker made for a slot another method took first, kept for the next empty one.
        let mut spare: Option<Arc<Cell>> = None;
        for k in 0..n {
            let slot = &self.slots[(start + k) % n];
            if let Some(entry) = slot.get() {
                if &*entry.0 == method {
                    return Some(&entry.1);
                }
                continue;
            }
            // An empty slot: the method is not in the table; put it here (or learn which
            // method another call put here first).
            if self.full() {
                return None;
            }
            let cell = spare.take().or_else(|| make.take().and_then(|f| f()))?;
            match slot.set(Box::new((Box::<str>::from(method), cell))) {
                Ok(()) => {
                    self.len.fetch_add(1, Ordering::Relaxed);
                    return slot.get().map(|e| &*e.1);
                }
                Err(lost) => match slot.get() {
                    Some(there) if &*there.0 == method => return Some(&there.1),
                    _ => spare = Some(lost.1),
                },
            }
        }
        None
    }

    fn cells(&self) -> impl Iterator<Item = &Arc<Cell>> {
        self.slots.iter().filter_map(|s| s.get()).map(|e| &e.1)
    }
}

struct ClassBreakers {
    cluster: Option<Arc<Cell>>,
    /// Empty when the cluster has one subset only (its breaker would be the cluster's).
    subsets: Vec<Arc<Cell>>,
    methods: MethodTable,
}

struct ClusterBreakers {
    name: String,
    /// No method breakers (see [`ClusterShape::endpoints_only`]).
    endpoints_only: bool,
    classes: Vec<ClassBreakers>,
}

pub struct Breakers {
    config: BreakerConfig,
    /// The breakers of the registry this one replaced (see [`Breakers::new_after`]), by id.
    previous: HashMap<BreakerId, Arc<Cell>>,
    epoch: Instant,
    clusters: Vec<ClusterBreakers>,
    /// Every endpoint's breakers by name (`cluster/address`), for the figures, the timer, the
    /// operator and the signals that name an endpoint; calls reach them through their
    /// endpoint, without this lock.
    endpoints: Mutex<Map<Arc<EndpointBreakers>>>,
    /// Breakers of the clients that were at fault (a client that never was needs none).
    clients: Mutex<Map<Arc<Cell>>>,
    /// A bit per client key hash, set for the clients in `clients`: most calls learn that
    /// their client has no breaker from one load.
    client_filter: Box<[AtomicU64]>,
    filter_hasher: foldhash::quality::RandomState,
    next_seed: AtomicU64,
    /// Clients and methods seen while their map was full: no breaker for them.
    pub untracked_clients: AtomicU64,
    pub untracked_methods: AtomicU64,
}

impl Breakers {
    pub fn new(config: BreakerConfig, clusters: &[ClusterShape<'_>], epoch: Instant) -> Self {
        let mut me = Self::with_previous(config, epoch, HashMap::new());
        me.clusters = clusters.iter().map(|c| me.cluster_breakers(c)).collect();
        me
    }

    fn with_previous(
        config: BreakerConfig,
        epoch: Instant,
        previous: HashMap<BreakerId, Arc<Cell>>,
    ) -> Self {
        let max_clients = config.max_clients;
        Self {
            previous,
            next_seed: AtomicU64::new(config.seed.unwrap_or_else(|| fastrand::u64(..))),
            config,
            epoch,
            clusters: Vec::new(),
            endpoints: Mutex::new(Map::default()),
            clients: Mutex::new(Map::default()),
            client_filter: (0..(max_clients * 16).next_power_of_two().max(1024) / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
            filter_hasher: foldhash::quality::RandomState::default(),
            untracked_clients: AtomicU64::new(0),
            untracked_methods: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// The breaker `scope`/`class`/`name`, when its scope has a policy: the previous
    /// registry's (its state kept) if it had one of that name and policy, else a new one.
    fn cell(&self, scope: Scope, class: usize, name: String) -> Option<Arc<Cell>> {
        let policy = self.config.policy(class, scope)?;
        let class_name = (class != 0 && scope != Scope::Client)
            .then(|| self.config.classes.get(class).cloned())
            .flatten();
        let id = BreakerId {
            scope,
            name,
            class: class_name,
        };
        if let Some(old) = self.previous.get(&id)
            && *old.lock().policy() == policy
        {
            return Some(old.clone());
        }
        let breaker = Breaker::new(
            policy,
            self.epoch,
            self.next_seed.fetch_add(1, Ordering::Relaxed),
        );
        Some(Arc::new(Cell::new(id, breaker)))
    }

    /// A registry for a new configuration (a reload) that keeps the state of every breaker of
    /// `previous` whose name and policy stay: a call of the old configuration still in flight
    /// and one of the new record into the same breaker.
    pub fn new_after(
        config: BreakerConfig,
        clusters: &[ClusterShape<'_>],
        previous: &Breakers,
    ) -> Self {
        let carried: HashMap<BreakerId, Arc<Cell>> = previous
            .every_cell()
            .into_iter()
            .map(|c| ((*c.id).clone(), c))
            .collect();
        let mut me = Self::with_previous(config, previous.epoch, carried);
        me.clusters = clusters.iter().map(|c| me.cluster_breakers(c)).collect();
        // Client breakers are made when a client is at fault, so those of the old registry
        // are taken now: an open one keeps refusing its client.
        let keys: Vec<String> = lock(&previous.clients)
            .keys()
            .map(|k| k.to_string())
            .collect();
        for key in keys {
            if let Some(cell) = me.cell(Scope::Client, 0, key.clone())
                && me
                    .previous
                    .get(&cell.id)
                    .is_some_and(|old| Arc::ptr_eq(old, &cell))
            {
                lock(&me.clients).insert(key.as_str().into(), cell);
                let (word, bit) = me.filter_bit(&key);
                if let Some(w) = me.client_filter.get(word) {
                    w.fetch_or(bit, Ordering::AcqRel);
                }
            }
        }
        me
    }

    fn cluster_breakers(&self, c: &ClusterShape<'_>) -> ClusterBreakers {
        let classes = (0..self.config.classes.len())
            .map(|class| ClassBreakers {
                cluster: (!c.endpoints_only)
                    .then(|| self.cell(Scope::Cluster, class, c.name.to_owned()))
                    .flatten(),
                subsets: if c.subsets.len() > 1 {
                    c.subsets
                        .iter()
                        .filter_map(|s| self.cell(Scope::Subset, class, format!("{}/{s}", c.name)))
                        .collect()
                } else {
                    Vec::new()
                },
                methods: MethodTable::new(self.config.max_methods),
            })
            .collect();
        ClusterBreakers {
            endpoints_only: c.endpoints_only,
            name: c.name.to_owned(),
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
    ) -> Result<CallPermits<'_>, Rejected> {
        let mut permits = CallPermits::new(self);
        // Only clients that were at fault have a breaker: for the others (nearly every call)
        // the filter says so without a lock.
        if let Some(key) = client
            && self.client_known(key)
            && let Some(cell) = lock(&self.clients).get(key).cloned()
        {
            permits.client = Some(admit(CellRef::Shared(cell), now, out)?);
        }
        let Some(cb) = self.class(cluster, class) else {
            return Ok(permits);
        };
        if let Some(cell) = &cb.cluster {
            permits.cluster = Some(admit(CellRef::Borrowed(cell), now, out)?);
        }
        if let Some(cell) = self.method_cell(cluster, class, cb, method) {
            permits.method = Some(admit(CellRef::Borrowed(cell), now, out)?);
        }
        Ok(permits)
    }

    /// The breakers of the endpoint at `address` of `cluster`, in `subset` (an index into the
    /// cluster's subsets): the ones it has if it is known, else new ones (closed).
    pub fn endpoint(&self, cluster: usize, address: &str, subset: usize) -> Arc<EndpointBreakers> {
        let cluster_name = self.clusters.get(cluster).map_or("", |c| c.name.as_str());
        let name = format!("{cluster_name}/{address}");
        let mut map = lock(&self.endpoints);
        if let Some(e) = map.get(name.as_str()) {
            return e.clone();
        }
        let classes = (0..self.config.classes.len())
            .map(|class| EndpointClass {
                endpoint: self.cell(Scope::Endpoint, class, name.clone()),
                subset: self
                    .class(cluster, class)
                    .and_then(|cb| cb.subsets.get(subset))
                    .cloned(),
            })
            .collect();
        let made = Arc::new(EndpointBreakers {
            name: name.as_str().into(),
            classes,
        });
        map.insert(name.into(), made.clone());
        made
    }

    /// An endpoint left its cluster: its breakers are no longer shown or looked up by name.
    /// (The calls and connections still holding them may go on recording.)
    pub fn forget_endpoint(&self, endpoint: &Arc<EndpointBreakers>) {
        let mut map = lock(&self.endpoints);
        if map
            .get(&*endpoint.name)
            .is_some_and(|e| Arc::ptr_eq(e, endpoint))
        {
            map.remove(&*endpoint.name);
        }
    }

    /// The breakers of the endpoint named `cluster/address`, if it is in its cluster.
    pub fn endpoint_named(&self, name: &str) -> Option<Arc<EndpointBreakers>> {
        lock(&self.endpoints).get(name).cloned()
    }

    /// Whether an endpoint (and its subset) would take a call now; changes nothing.
    pub fn endpoint_admissible(&self, e: &EndpointBreakers, class: usize, now: Instant) -> bool {
        e.cells(class)
            .all(|c| c.closed().is_some() || c.lock().admissible(now))
    }

    /// Takes the picked endpoint's (and its subset's) permits for the call.
    pub fn admit_endpoint<'a>(
        &'a self,
        permits: &mut CallPermits<'a>,
        e: &EndpointBreakers,
        class: usize,
        now: Instant,
        out: &mut Vec<Transition>,
    ) -> Result<(), Rejected> {
        let Some(ec) = e.class(class) else {
            return Ok(());
        };
        permits.subset = match &ec.subset {
            Some(cell) => Some(admit(CellRef::Shared(cell.clone()), now, out)?),
            None => None,
        };
        permits.endpoint = match &ec.endpoint {
            Some(cell) => Some(admit(CellRef::Shared(cell.clone()), now, out)?),
            None => None,
        };
        Ok(())
    }

    /// Why no endpoint of a cluster takes calls: the open breaker (of `endpoints`, or of the
    /// cluster's subsets) that probes soonest.
    pub fn no_endpoint<'a>(
        &self,
        cluster: usize,
        class: usize,
        endpoints: impl Iterator<Item = &'a EndpointBreakers>,
        now: Instant,
    ) -> Option<Rejected> {
        let cb = self.class(cluster, class)?;
        let endpoint_cells = endpoints.filter_map(move |e| e.class(class)?.endpoint.as_ref());
        Self::soonest_refusal(endpoint_cells.chain(&cb.subsets), now)
    }

    /// Why one endpoint (and its subset) does not take calls.
    pub fn endpoint_refusal(
        &self,
        e: &EndpointBreakers,
        class: usize,
        now: Instant,
    ) -> Option<Rejected> {
        Self::soonest_refusal(e.cells(class), now)
    }

    fn soonest_refusal<'a>(
        cells: impl Iterator<Item = &'a Arc<Cell>>,
        now: Instant,
    ) -> Option<Rejected> {
        cells
            .filter_map(|c| {
                c.lock().refusal(now).map(|r| Rejected {
                    breaker: c.id.clone(),
                    reason: r.reason,
                    retry_after: r.retry_after,
                })
            })
            .min_by_key(|r| r.retry_after)
    }

    fn method_cell<'a>(
        &'a self,
        cluster: usize,
        class: usize,
        cb: &'a ClassBreakers,
        method: &str,
    ) -> Option<&'a Cell> {
        self.config.policy(class, Scope::Method)?;
        if self.clusters.get(cluster)?.endpoints_only {
            return None;
        }
        let found = cb.methods.get_or_insert(method, || {
            let name = format!("{}{method}", self.clusters.get(cluster)?.name);
            self.cell(Scope::Method, class, name)
        });
        if found.is_none() && cb.methods.full() {
            self.untracked_methods.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Where a client key's bit is in the filter of clients with a breaker.
    fn filter_bit(&self, key: &str) -> (usize, u64) {
        use std::hash::BuildHasher as _;
        let h = self.filter_hasher.hash_one(key);
        let words = self.client_filter.len().max(1);
        (((h >> 6) as usize) % words, 1u64 << (h & 63))
    }

    /// Whether a client may have a breaker (false: it surely has none).
    fn client_known(&self, key: &str) -> bool {
        let (word, bit) = self.filter_bit(key);
        self.client_filter
            .get(word)
            .is_some_and(|w| w.load(Ordering::Acquire) & bit != 0)
    }

    /// A fault of a client that had no breaker when its call was admitted: counted in its
    /// breaker, made now.
    fn client_fault(&self, key: &str, now: Instant, out: &mut Vec<Transition>) {
        if let Some(cell) = self.client_cell(key, now) {
            let change = cell.lock().count_failure(now);
            cell.report(change, out);
        }
    }

    fn client_cell(&self, key: &str, now: Instant) -> Option<Arc<Cell>> {
        let policy = self.config.policy(0, Scope::Client)?;
        let mut map = lock(&self.clients);
        if let Some(c) = map.get(key) {
            return Some(c.clone());
        }
        if map.len() >= self.config.max_clients {
            // Forget the clients that are closed and were quiet for a whole window.
            let idle_before = nanos(
                now.saturating_duration_since(self.epoch)
                    .saturating_sub(policy.window),
            );
            map.retain(|_, c| {
                let b = c.lock();
                b.state() != super::circuit::State::Closed || b.last_active() >= idle_before
            });
            // The filter again, for the clients left. (A call admitted meanwhile may miss
            // its client's breaker: a race of microseconds, only when the map is full.)
            for w in &self.client_filter {
                w.store(0, Ordering::Release);
            }
            for k in map.keys() {
                let (word, bit) = self.filter_bit(k);
                if let Some(w) = self.client_filter.get(word) {
                    w.fetch_or(bit, Ordering::AcqRel);
                }
            }
            if map.len() >= self.config.max_clients {
                self.untracked_clients.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let cell = self.cell(Scope::Client, 0, key.to_owned())?;
        map.insert(key.into(), cell.clone());
        let (word, bit) = self.filter_bit(key);
        if let Some(w) = self.client_filter.get(word) {
            w.fetch_or(bit, Ordering::AcqRel);
        }
        Some(cell)
    }

    fn every_cell(&self) -> Vec<Arc<Cell>> {
        let mut cells = Vec::new();
        for c in &self.clusters {
            for cb in &c.classes {
                cells.extend(cb.cluster.iter().cloned());
                cells.extend(cb.subsets.iter().cloned());
                cells.extend(cb.methods.cells().cloned());
            }
        }
        let mut endpoints: Vec<_> = lock(&self.endpoints).values().cloned().collect();
        // In a steady order for the figures (the map's is its hash's).
        endpoints.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        for e in &endpoints {
            for ec in &e.classes {
                cells.extend(ec.endpoint.iter().cloned());
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
        // Only an open breaker can be due; the others' locks are left to their calls.
        for c in self.every_cell().into_iter().filter(|c| c.open()) {
            let change = c.lock().tick(now);
            c.report(change, out);
        }
    }

    /// An outside signal about one endpoint (every class's breaker of it).
    pub fn signal_endpoint(
        &self,
        e: &EndpointBreakers,
        kind: SignalKind,
        action: SignalAction,
        now: Instant,
        out: &mut Vec<Transition>,
    ) {
        for cell in e.classes.iter().filter_map(|c| c.endpoint.as_ref()) {
            let change = cell.lock().signal(now, kind, action);
            cell.report(change, out);
        }
    }

    /// An outside signal about one client.
    pub fn signal_client(
        &self,
        key: &str,
        kind: SignalKind,
        action: SignalAction,
        now: Instant,
        out: &mut Vec<Transition>,
    ) {
        if let Some(cell) = self.client_cell(key, now) {
            let change = cell.lock().signal(now, kind, action);
            cell.report(change, out);
        }
    }

    /// An operator opens (`open`) or closes a breaker, named as in [`BreakerId`]'s display
    /// (`endpoint orders/10.0.0.7:50051`). None when there is no such breaker.
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
fn admit<'a>(
    cell: CellRef<'a>,
    now: Instant,
    out: &mut Vec<Transition>,
) -> Result<Held<'a>, Rejected> {
    if let Some(generation) = cell.closed() {
        return Ok(Held {
            cell,
            permit: Some(Permit::closed(generation)),
        });
    }
    let admitted = cell.lock().admit(now);
    match admitted {
        Ok((permit, change)) => {
            cell.report(change, out);
            Ok(Held {
                cell,
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

#[cfg(test)]
mod tests;
