//! Upstream clusters: endpoints, load balancing, and pooled HTTP/2 connections.
//!
//! A cluster's endpoints are one set, swapped whole when they change (DNS gave other
//! addresses, an intercepted connection found a new destination): a call reads the set once,
//! without a lock. An endpoint that leaves drains: the calls it has finish on its connections,
//! which close when the last one lets go; no new call picks it.
//!
//! Each call goes to the endpoint with fewer calls in flight of two picked at random (least
//! request, power of two choices: close to the best pick at the cost of two loads). Each
//! endpoint keeps up to `max_connections_per_endpoint` connections; a call takes the least
//! busy one that still has room under the endpoint's SETTINGS_MAX_CONCURRENT_STREAMS, opens
//! another when none has, and when the cap is reached waits in `h2` for a stream to finish:
//! the upstream's limit is never exceeded on the wire.

use std::{
    collections::HashMap,
    future::Future as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::correlate::{
    Joins,
    table::{Side, TrackedConn},
};

use crate::{
    breaker::registry::{Breakers, EndpointBreakers},
    config::proxy::{Cluster, Limits, Source},
    discovery::SetChange,
};

use super::{
    coalesce::Coalesce,
    goaway_watch::{GoawaySeen, GoawayWatch},
    upstream_tls::{UpstreamIo, UpstreamTlsClient},
};
use crate::config::tls::UpstreamTlsError;
use rustls_pki_types::ServerName;

/// Why no upstream stream could be had.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed: an unknown CA, an expired certificate, a name it is not
    /// for, a client certificate refused (rustls's reason).
    #[error("TLS handshake with {endpoint} failed: {source}")]
    Tls {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {endpoint} timed out after {after:?}")]
    ConnectTimeout { endpoint: String, after: Duration },
    #[error("HTTP/2 handshake with {endpoint} failed: {source}")]
    Handshake {
        endpoint: String,
        #[source]
        source: h2::Error,
    },
    #[error("connection to {endpoint} is gone: {source}")]
    Closed {
        endpoint: String,
        #[source]
        source: h2::Error,
    },
}

/// One endpoint's load, for the stats the agent reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStats {
    pub cluster: String,
    pub endpoint: String,
    /// Its subset's name (empty when the cluster has none).
    pub subset: String,
    /// Left its cluster (DNS no longer has it), finishing the calls it had.
    pub draining: bool,
    pub calls_in_flight: usize,
    /// Pooled connections (those that got GOAWAY included, until they close).
    pub connections: usize,
    /// Streams the proxy holds open on them.
    pub streams_open: usize,
}

pub struct ClusterPool {
    pub name: String,
    /// Its place among the proxy's clusters (as the breakers name it).
    index: usize,
    subsets: Vec<String>,
    joins: Arc<Joins>,
    breakers: Arc<Breakers>,
    /// The endpoints calls pick from, replaced whole when they change.
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// What made the set: writers hold this lock while they make and swap in a new one.
    sources: Mutex<Sources>,
    /// Endpoints that left while calls still held them, until the last lets go.
    draining: Mutex<Vec<Weak<Endpoint>>>,
    /// Room for endpoints found while running (the passthrough cluster's).
    room: usize,
    /// TLS to the endpoints, when the cluster has `[cluster.tls]`.
    tls: Option<UpstreamTlsClient>,
    /// `SO_MARK` of the upstream sockets: the interception programs leave them alone.
    mark: Option<u32>,
    connect_timeout: Duration,
    max_connections: usize,
    limits: Limits,
}

/// The addresses each of a cluster's endpoint entries gave last, in the entries' order.
struct Sources {
    /// By entry: its subset, its addresses (an IP entry's one; a DNS name's last answer),
    /// and the DNS name its endpoints' TLS certificates are for.
    entries: Vec<(usize, Vec<SocketAddr>, Option<Arc<str>>)>,
    /// Original destinations of intercepted connections (the passthrough cluster's), in the
    /// order they were met.
    found: Vec<SocketAddr>,
}

impl Sources {
    /// Every address once, with its subset and its entry's name: the first entry that names
    /// it places it.
    fn wanted(&self) -> Vec<(SocketAddr, usize, Option<Arc<str>>)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let listed = self.entries.iter().flat_map(|(subset, addrs, name)| {
            addrs.iter().map(move |a| (*a, *subset, name.clone()))
        });
        for (a, subset, name) in listed.chain(self.found.iter().map(|a| (*a, 0, None))) {
            if seen.insert(a) {
                out.push((a, subset, name));
            }
        }
        out
    }
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as text, as outcomes and breakers name it.
    pub address: String,
    /// Index into its cluster's subsets.
    pub subset: usize,
    pub breakers: Arc<EndpointBreakers>,
    /// What its TLS certificate must name (when the cluster speaks TLS).
    server_name: Option<ServerName<'static>>,
    /// Left its cluster: no new calls; the ones it has finish.
    removed: AtomicBool,
    /// Calls holding a stream on this endpoint.
    in_flight: AtomicUsize,
    connections: Mutex<Vec<Arc<UpstreamConnection>>>,
    /// Connections being opened (counted against the cap).
    connecting: AtomicUsize,
    /// Notified when an opening connection is ready or failed.
    opened: tokio::sync::Notify,
    /// Counts the times this endpoint's breaker opened: the intercepted client connections
    /// pinned to it watch it and send GOAWAY, so that the client's balancer moves on.
    pub breaker_opened: tokio::sync::watch::Sender<u64>,
}

struct UpstreamConnection {
    send: SendRequest<Bytes>,
    /// Streams open on it (ours).
    active: AtomicUsize,
    /// The upstream's SETTINGS_MAX_CONCURRENT_STREAMS as last seen.
    max_streams: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    /// Once the upstream sent GOAWAY, no new stream goes here.
    goaway: Arc<GoawaySeen>,
    /// This connection in the correlation table (when kernel signals are joined).
    tracked: Option<Arc<TrackedConn>>,
}

/// A stream slot on an endpoint's connection; released on drop.
pub struct Lease {
    pub endpoint: Arc<Endpoint>,
    connection: Arc<UpstreamConnection>,
}

impl Lease {
    /// A handle to send this call's request on, once `h2` says the connection can take it.
    pub async fn ready(&self) -> Result<SendRequest<Bytes>, UpstreamError> {
        self.connection
            .send
            .clone()
            .ready()
            .await
            .map_err(|source| UpstreamError::Closed {
                endpoint: self.endpoint.address.clone(),
                source,
            })
    }
}

impl Lease {
    /// The connection's entry in the correlation table, to register the call's stream in.
    pub fn tracked(&self) -> Option<&Arc<TrackedConn>> {
        self.connection.tracked.as_ref()
    }

    /// The upstream said by GOAWAY that it will not process stream `id` of this connection.
    pub fn refused(&self, id: h2::StreamId) -> bool {
        self.connection.goaway.refused(id.as_u32())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.connection.active.fetch_sub(1, Ordering::Relaxed);
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoint {
    fn new(
        addr: SocketAddr,
        subset: usize,
        breakers: Arc<EndpointBreakers>,
        server_name: Option<ServerName<'static>>,
    ) -> Arc<Self> {
        Arc::new(Endpoint {
            addr,
            address: addr.to_string(),
            subset,
            breakers,
            server_name,
            removed: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
            connecting: AtomicUsize::new(0),
            opened: tokio::sync::Notify::new(),
            breaker_opened: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Whether it left its cluster.
    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }
}

/// How a pool is set up beyond its cluster's configuration.
#[derive(Clone, Debug, Default)]
pub struct PoolOptions {
    /// Room for endpoints found while running (see [`ClusterPool::find_or_add`]).
    pub discovered: usize,
    /// `SO_MARK` of its upstream sockets.
    pub mark: Option<u32>,
}

impl ClusterPool {
    /// The pool of `cluster` (the `index`th), with its IP endpoints; its DNS names' come when
    /// discovery gives them ([`Self::set_entry`]).
    pub fn new(
        index: usize,
        cluster: &Cluster,
        limits: Limits,
        joins: Arc<Joins>,
        breakers: Arc<Breakers>,
        options: &PoolOptions,
    ) -> Result<Self, UpstreamTlsError> {
        let entries = cluster
            .endpoints
            .iter()
            .map(|e| {
                let (addrs, name) = match &e.source {
                    Source::Address(a) => (vec![*a], None),
                    Source::Dns { host, .. } => (Vec::new(), Some(host.trim_end_matches('.'))),
                    // `_grpc._tcp.orders.svc`: the service's name, not its targets'.
                    Source::Srv { name } => {
                        let service = name.splitn(3, '.').nth(2).unwrap_or(name);
                        (Vec::new(), Some(service.trim_end_matches('.')))
                    }
                    // Addresses only: their certificates are for the cluster's server_name,
                    // or their IP.
                    Source::File { .. } => (Vec::new(), None),
                };
                (e.subset, addrs, name.map(Arc::from))
            })
            .collect();
        let tls = cluster
            .tls
            .as_ref()
            .map(UpstreamTlsClient::new)
            .transpose()?;
        let pool = Self {
            name: cluster.name.clone(),
            index,
            subsets: cluster.subsets.clone(),
            joins,
            breakers,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            sources: Mutex::new(Sources {
                entries,
                found: Vec::new(),
            }),
            draining: Mutex::new(Vec::new()),
            room: options.discovered,
            tls,
            mark: options.mark,
            connect_timeout: cluster.connect_timeout,
            max_connections: cluster.max_connections_per_endpoint,
            limits,
        };
        pool.rebuild(&lock(&pool.sources));
        Ok(pool)
    }

    /// Upstream TLS's reloads of its files: (loaded, refused); None without TLS.
    pub fn tls_reloads(&self) -> Option<(u64, u64)> {
        self.tls.as_ref().map(|t| {
            (
                t.reloads.load(Ordering::Relaxed),
                t.reload_failures.load(Ordering::Relaxed),
            )
        })
    }

    /// The endpoints calls pick from now.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// What each endpoint holds right now, those draining included.
    pub fn stats(&self) -> Vec<EndpointStats> {
        let mut draining = lock(&self.draining);
        draining.retain(|w| w.strong_count() > 0);
        let leaving: Vec<_> = draining.iter().filter_map(Weak::upgrade).collect();
        drop(draining);
        self.endpoints()
            .iter()
            .chain(&leaving)
            .map(|e| {
                let conns = lock(&e.connections);
                let open: Vec<_> = conns
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Relaxed))
                    .collect();
                EndpointStats {
                    cluster: self.name.clone(),
                    endpoint: e.address.clone(),
                    subset: self.subsets.get(e.subset).cloned().unwrap_or_default(),
                    draining: e.removed(),
                    calls_in_flight: e.in_flight.load(Ordering::Relaxed),
                    connections: open.len(),
                    streams_open: open.iter().map(|c| c.active.load(Ordering::Relaxed)).sum(),
                }
            })
            .collect()
    }

    /// The endpoint at `address`, if the cluster has one.
    pub fn find(&self, address: SocketAddr) -> Option<Arc<Endpoint>> {
        self.endpoints().iter().find(|e| e.addr == address).cloned()
    }

    /// The endpoint at `address`, added when it is new (with breakers of its own, before any
    /// call can use it). None when the pool has no room left.
    pub fn find_or_add(&self, address: SocketAddr) -> Option<Arc<Endpoint>> {
        if let Some(e) = self.find(address) {
            return Some(e);
        }
        let mut sources = lock(&self.sources);
        if let Some(e) = self.find(address) {
            return Some(e);
        }
        if sources.found.len() >= self.room {
            return None;
        }
        sources.found.push(address);
        self.rebuild(&sources);
        self.find(address)
    }

    /// Entry `entry` of the cluster's endpoints (a DNS name) now stands for `addrs`.
    pub fn set_entry(&self, entry: usize, addrs: Vec<SocketAddr>) -> SetChange {
        let mut sources = lock(&self.sources);
        match sources.entries.get_mut(entry) {
            Some((_, old, _)) if *old != addrs => *old = addrs,
            _ => {
                return SetChange {
                    now: self.endpoints.load().len(),
                    ..SetChange::default()
                };
            }
        }
        self.rebuild(&sources)
    }

    /// Makes the set `sources` ask for and swaps it in: endpoints kept by address, new ones
    /// with their breakers, those gone set draining.
    fn rebuild(&self, sources: &Sources) -> SetChange {
        let current = self.endpoints();
        let by_addr: HashMap<SocketAddr, &Arc<Endpoint>> =
            current.iter().map(|e| (e.addr, e)).collect();
        let mut next = Vec::new();
        let mut change = SetChange::default();
        for (addr, subset, name) in sources.wanted() {
            match by_addr.get(&addr) {
                Some(e) if e.subset == subset => next.push(Arc::clone(e)),
                found => {
                    // Moved to another subset: the breakers it had were that subset's.
                    if let Some(moved) = found {
                        self.breakers.forget_endpoint(&moved.breakers);
                    }
                    let breakers = self
                        .breakers
                        .endpoint(self.index, &addr.to_string(), subset);
                    let server_name = self
                        .tls
                        .as_ref()
                        .map(|t| t.server_name(name.as_deref(), addr.ip()));
                    next.push(Endpoint::new(addr, subset, breakers, server_name));
                    change.added += 1;
                }
            }
        }
        let kept: std::collections::HashSet<*const Endpoint> =
            next.iter().map(Arc::as_ptr).collect();
        let mut draining = lock(&self.draining);
        // Those that finished draining: let their (weak) places go.
        draining.retain(|w| w.strong_count() > 0);
        for gone in current.iter().filter(|e| !kept.contains(&Arc::as_ptr(e))) {
            gone.removed.store(true, Ordering::Relaxed);
            self.breakers.forget_endpoint(&gone.breakers);
            self.joins.forget_owner(&gone.breakers.name);
            draining.push(Arc::downgrade(gone));
            change.removed += 1;
        }
        change.now = next.len();
        self.endpoints.store(Arc::new(next));
        change
    }

    /// Picks an endpoint of `set` among those `allowed` (their breakers closed, say): the one
    /// with fewer calls in flight of two picked at random.
    pub fn pick(
        set: &[Arc<Endpoint>],
        allowed: impl Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let n = set.len();
        if n == 0 {
            return None;
        }
        // The first allowed endpoint at or after a random place, and another after that one.
        let first_from = |start: usize, skip: Option<usize>| {
            (0..n)
                .map(|k| (start + k) % n)
                .find(|&i| Some(i) != skip && allowed(&set[i]))
        };
        let a = first_from(fastrand::usize(..n), None)?;
        let Some(b) = first_from(fastrand::usize(..n), Some(a)) else {
            return Some(set[a].clone());
        };
        let load = |i: usize| set[i].in_flight.load(Ordering::Relaxed);
        Some(set[if load(b) < load(a) { b } else { a }].clone())
    }

    /// A stream slot on `endpoint`, opening a connection when every one is full.
    pub async fn lease(&self, endpoint: Arc<Endpoint>) -> Result<Lease, UpstreamError> {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        // From here the Lease (or this guard, on error) gives the in-flight count back.
        struct Pending<'a>(&'a Endpoint, bool);
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let mut pending = Pending(&endpoint, false);
        let connection = loop {
            if let Some(c) = self.existing(&endpoint, false) {
                break c;
            }
            if self.reserve_open(&endpoint) {
                break self.open(&endpoint).await?;
            }
            // At the cap: queue in h2 on the least busy connection, or, while every place is
            // still being opened by other calls, wait for one of those.
            let opened = endpoint.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if let Some(c) = self.existing(&endpoint, true) {
                break c;
            }
            opened.await;
        };
        pending.1 = true;
        drop(pending);
        Ok(Lease {
            endpoint,
            connection,
        })
    }

    /// The least busy open connection with room (any open one when `even_full`), its slot
    /// taken.
    fn existing(&self, e: &Endpoint, even_full: bool) -> Option<Arc<UpstreamConnection>> {
        let mut conns = lock(&e.connections);
        // A connection that got GOAWAY leaves the pool (and frees its place for a new one);
        // its streams below the last-stream-id go on.
        conns.retain(|c| !c.closed.load(Ordering::Relaxed) && !c.goaway.any());
        let best = conns
            .iter()
            .filter(|c| {
                even_full
                    || c.active.load(Ordering::Relaxed) < c.max_streams.load(Ordering::Relaxed)
            })
            .min_by_key(|c| c.active.load(Ordering::Relaxed))?
            .clone();
        best.active.fetch_add(1, Ordering::Relaxed);
        Some(best)
    }

    /// Takes a place for a new connection under the cap, in the same step as the check (else
    /// a burst of calls would each see room and open one).
    fn reserve_open(&self, e: &Endpoint) -> bool {
        let conns = lock(&e.connections);
        let room = conns.len() + e.connecting.load(Ordering::Relaxed) < self.max_connections;
        if room {
            e.connecting.fetch_add(1, Ordering::Relaxed);
        }
        room
    }

    /// Opens the connection [`Self::reserve_open`] made room for.
    async fn open(&self, e: &Endpoint) -> Result<Arc<UpstreamConnection>, UpstreamError> {
        let result = tokio::time::timeout(self.connect_timeout, self.connect(e)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::ConnectTimeout {
                endpoint: e.address.clone(),
                after: self.connect_timeout,
            }),
        };
        let opened = result.inspect(|conn| {
            conn.active.fetch_add(1, Ordering::Relaxed);
            lock(&e.connections).push(conn.clone());
        });
        e.connecting.fetch_sub(1, Ordering::Relaxed);
        // Whether it worked or not, the calls waiting for a place look again.
        e.opened.notify_waiters();
        opened
    }

    async fn connect(&self, e: &Endpoint) -> Result<Arc<UpstreamConnection>, UpstreamError> {
        let address = e.address.as_str();
        let tcp = dial(e.addr, self.mark)
            .await
            .map_err(|source| UpstreamError::Connect {
                endpoint: address.to_owned(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        // Registered before the handshakes: a reset during them is this endpoint's too.
        let tracked = match (tcp.local_addr(), tcp.peer_addr()) {
            (Ok(local), Ok(peer)) => self.joins.tracked.connection(
                Side::Upstream {
                    endpoint: e.breakers.clone(),
                },
                local,
                peer,
            ),
            _ => None,
        };
        let io = match (&self.tls, &e.server_name) {
            (Some(tls), Some(name)) => {
                let tls_stream =
                    tls.connect(name.clone(), tcp)
                        .await
                        .map_err(|source| UpstreamError::Tls {
                            endpoint: address.to_owned(),
                            source,
                        })?;
                UpstreamIo::Tls(Box::new(tls_stream))
            }
            _ => UpstreamIo::Plain(tcp),
        };
        let goaway = Arc::new(GoawaySeen::default());
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(self.limits.upstream_stream_window)
            .initial_connection_window_size(self.limits.connection_window)
            .max_send_buffer_size(self.limits.max_send_buffer)
            .max_header_list_size(self.limits.max_header_list_size)
            .handshake::<_, Bytes>(GoawayWatch::new(Coalesce::new(io), goaway.clone()))
            .await
            .map_err(|source| UpstreamError::Handshake {
                endpoint: address.to_owned(),
                source,
            })?;
        let max_streams = Arc::new(AtomicUsize::new(connection.max_concurrent_send_streams()));
        let closed = Arc::new(AtomicBool::new(false));
        let (max, done, endpoint) = (max_streams.clone(), closed.clone(), address.to_owned());
        let tracked_conn = tracked.as_ref().map(|g| g.conn.clone());
        tokio::spawn(async move {
            // The table entry lingers from the connection's end, not its last lease's.
            let _tracked = tracked;
            // Drive the connection; note the upstream's stream limit as its SETTINGS change.
            let result = std::future::poll_fn(|cx| {
                let r = std::pin::Pin::new(&mut connection).poll(cx);
                max.store(connection.max_concurrent_send_streams(), Ordering::Relaxed);
                r
            })
            .await;
            done.store(true, Ordering::Relaxed);
            match result {
                Ok(()) => debug!(%endpoint, "upstream connection closed"),
                Err(e) => warn!(%endpoint, error = %e, "upstream connection failed"),
            }
        });
        debug!(endpoint = %address, "upstream connection open");
        Ok(Arc::new(UpstreamConnection {
            send,
            active: AtomicUsize::new(0),
            max_streams,
            closed,
            goaway,
            tracked: tracked_conn,
        }))
    }
}

/// A TCP connection to `address`, its socket marked (`SO_MARK`) before it connects.
pub async fn dial(address: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(address).await;
    };
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket2::SockRef::from(&socket).set_mark(mark)?;
    socket.connect(address).await
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::breaker::registry::ClusterShape;

    /// The pool of the first cluster of `config` (its breakers made for it alone; endpoint
    /// breakers only when it has room for found destinations, as the passthrough cluster).
    fn pool_of(config: &crate::config::AgentConfig, options: &PoolOptions) -> ClusterPool {
        let cluster = &config.clusters[0];
        let breakers = Arc::new(Breakers::new(
            config.breakers.clone(),
            &[ClusterShape {
                name: &cluster.name,
                subsets: &cluster.subsets,
                endpoints_only: options.discovered > 0,
            }],
            std::time::Instant::now(),
        ));
        ClusterPool::new(
            0,
            cluster,
            config.limits,
            Arc::new(Joins::new(false)),
            breakers,
            options,
        )
        .unwrap()
    }

    /// Cluster `c` with one listener routing to it, then `cluster_body` (its endpoints).
    fn config(cluster_body: &str) -> crate::config::AgentConfig {
        crate::config::parse(&format!(
            "[[listener]]\nname = \"in\"\naddress = \"127.0.0.1:15001\"\n[[listener.route]]\ncluster = \"c\"\n\n[[cluster]]\nname = \"c\"\n{cluster_body}"
        ))
        .unwrap()
    }

    fn pool() -> ClusterPool {
        pool_of(
            &config(r#"endpoints = ["10.0.0.1:50051", "orders.test:50051"]"#),
            &PoolOptions::default(),
        )
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn listed(p: &ClusterPool) -> Vec<(String, bool)> {
        let mut v: Vec<_> = p
            .stats()
            .into_iter()
            .map(|s| (s.endpoint, s.draining))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_name_s_addresses_come_and_go_and_the_ones_that_stay_keep_their_breakers() {
        let p = pool();
        // The IP entry is there from the start; the name's come with its first answer.
        assert_eq!(p.endpoints().len(), 1);
        let change = p.set_entry(1, vec![addr("10.0.0.2:50051"), addr("10.0.0.3:50051")]);
        assert_eq!((change.added, change.removed, change.now), (2, 0, 3));
        let kept = p.find(addr("10.0.0.2:50051")).unwrap();
        let now = std::time::Instant::now();
        p.breakers
            .force("endpoint c/10.0.0.2:50051", true, now)
            .unwrap();
        // The same answer again changes nothing.
        assert_eq!(
            p.set_entry(1, vec![addr("10.0.0.2:50051"), addr("10.0.0.3:50051")]),
            SetChange {
                added: 0,
                removed: 0,
                now: 3
            }
        );
        // 10.0.0.3 leaves while a call holds it: it drains, and is no longer picked.
        let leaving = p.find(addr("10.0.0.3:50051")).unwrap();
        let change = p.set_entry(1, vec![addr("10.0.0.2:50051"), addr("10.0.0.4:50051")]);
        assert_eq!((change.added, change.removed, change.now), (1, 1, 3));
        assert!(leaving.removed());
        assert!(p.find(addr("10.0.0.3:50051")).is_none());
        assert!(p.breakers.endpoint_named("c/10.0.0.3:50051").is_none());
        assert_eq!(
            listed(&p),
            [
                ("10.0.0.1:50051".into(), false),
                ("10.0.0.2:50051".into(), false),
                ("10.0.0.3:50051".into(), true),
                ("10.0.0.4:50051".into(), false),
            ]
        );
        for _ in 0..100 {
            let set = p.endpoints();
            let picked = ClusterPool::pick(&set, |_| true).unwrap();
            assert_ne!(picked.address, "10.0.0.3:50051");
        }
        // The kept endpoint is the same one, its breaker still open.
        let same = p.find(addr("10.0.0.2:50051")).unwrap();
        assert!(Arc::ptr_eq(&kept, &same));
        assert!(!p.breakers.endpoint_admissible(&same.breakers, 0, now));
        // The last holder lets go: it is gone.
        drop(leaving);
        assert_eq!(listed(&p).len(), 3);
        // No address (NXDOMAIN): the name's endpoints drain; the IP entry stays.
        let change = p.set_entry(1, Vec::new());
        assert_eq!((change.added, change.removed, change.now), (0, 2, 1));
    }

    #[test]
    fn an_address_that_moves_to_another_subset_is_still_named_by_its_breakers() {
        let p = pool_of(
            &config(
                "endpoints = [\"stable.test:1\"]\n[[cluster.subset]]\nname = \"canary\"\nendpoints = [\"canary.test:1\"]\n",
            ),
            &PoolOptions::default(),
        );
        let x = addr("10.0.0.5:1");
        p.set_entry(0, vec![x]);
        assert_eq!(p.find(x).unwrap().subset, 0);
        p.set_entry(0, Vec::new());
        p.set_entry(1, vec![x]);
        assert_eq!(p.find(x).unwrap().subset, 1);
        assert!(p.breakers.endpoint_named("c/10.0.0.5:1").is_some());
        // And both ways in one answer: listed by both entries, the first places it.
        p.set_entry(0, vec![x]);
        assert_eq!(p.find(x).unwrap().subset, 0);
        assert!(p.breakers.endpoint_named("c/10.0.0.5:1").is_some());
    }

    #[test]
    fn found_destinations_are_bounded() {
        let config = crate::config::quick(addr("127.0.0.1:0"), &["10.0.0.1:1".into()]).unwrap();
        let p = pool_of(
            &config,
            &PoolOptions {
                discovered: 2,
                mark: None,
            },
        );
        let a = p.find_or_add(addr("10.1.0.1:80")).unwrap();
        assert!(Arc::ptr_eq(
            &a,
            &p.find_or_add(addr("10.1.0.1:80")).unwrap()
        ));
        assert!(p.find_or_add(addr("10.1.0.2:80")).is_some());
        assert!(p.find_or_add(addr("10.1.0.3:80")).is_none(), "no room");
        assert_eq!(p.endpoints().len(), 3);
    }
}
