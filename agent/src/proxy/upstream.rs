//! Upstream clusters: endpoints, load balancing, and pooled HTTP/2 connections.
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
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

use crate::correlate::{
    Joins,
    table::{Side, TrackedConn},
};

use crate::{
    config::proxy::{Cluster, Limits},
    grow::GrowList,
};

use super::{
    coalesce::Coalesce,
    goaway_watch::{GoawaySeen, GoawayWatch},
};

/// Why no upstream stream could be had.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve {endpoint}: {source}")]
    Resolve {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
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
    pub calls_in_flight: usize,
    /// Pooled connections (those that got GOAWAY included, until they close).
    pub connections: usize,
    /// Streams the proxy holds open on them.
    pub streams_open: usize,
}

pub struct ClusterPool {
    pub name: String,
    /// Its place among the proxy's clusters (as the breakers and the correlation table name it).
    index: usize,
    joins: Arc<Joins>,
    endpoints: GrowList<Arc<Endpoint>>,
    /// The endpoints' addresses by index, shared with the correlation stage (which names
    /// endpoints by them).
    addresses: Arc<GrowList<String>>,
    /// Index by address of endpoints found while running (the passthrough cluster's).
    discovered: Mutex<HashMap<String, usize>>,
    /// `SO_MARK` of the upstream sockets: the interception programs leave them alone.
    mark: Option<u32>,
    connect_timeout: Duration,
    max_connections: usize,
    limits: Limits,
}

pub struct Endpoint {
    pub address: String,
    index: usize,
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
    fn new(address: String, index: usize) -> Arc<Self> {
        Arc::new(Endpoint {
            address,
            index,
            in_flight: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
            connecting: AtomicUsize::new(0),
            opened: tokio::sync::Notify::new(),
            breaker_opened: tokio::sync::watch::Sender::new(0),
        })
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
    pub fn new(
        index: usize,
        cluster: &Cluster,
        limits: Limits,
        joins: Arc<Joins>,
        options: &PoolOptions,
    ) -> Self {
        let endpoints = cluster
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, a)| Endpoint::new(a.clone(), i));
        Self {
            name: cluster.name.clone(),
            index,
            joins,
            endpoints: GrowList::new(endpoints, options.discovered),
            addresses: Arc::new(GrowList::new(
                cluster.endpoints.iter().cloned(),
                options.discovered,
            )),
            discovered: Mutex::new(HashMap::new()),
            mark: options.mark,
            connect_timeout: cluster.connect_timeout,
            max_connections: cluster.max_connections_per_endpoint,
            limits,
        }
    }

    /// What each endpoint holds right now.
    pub fn stats(&self) -> Vec<EndpointStats> {
        self.endpoints
            .iter()
            .map(|e| {
                let conns = lock(&e.connections);
                let open: Vec<_> = conns
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Relaxed))
                    .collect();
                EndpointStats {
                    cluster: self.name.clone(),
                    endpoint: e.address.clone(),
                    calls_in_flight: e.in_flight.load(Ordering::Relaxed),
                    connections: open.len(),
                    streams_open: open.iter().map(|c| c.active.load(Ordering::Relaxed)).sum(),
                }
            })
            .collect()
    }

    pub fn endpoint(&self, index: usize) -> Option<Arc<Endpoint>> {
        self.endpoints.get(index).cloned()
    }

    /// The endpoint at `address`, if the pool has one.
    pub fn find(&self, address: &str) -> Option<Arc<Endpoint>> {
        self.endpoints
            .iter()
            .find(|e| e.address == address)
            .cloned()
    }

    /// Every endpoint's address by index, as it grows.
    pub fn addresses(&self) -> Arc<GrowList<String>> {
        self.addresses.clone()
    }

    /// The index of the endpoint at `address`, added when it is new (then `added` runs with
    /// its index before any call can use it: the breakers make theirs). None when the pool has
    /// no room left.
    pub fn find_or_add(&self, address: &str, added: impl FnOnce(usize)) -> Option<usize> {
        let mut discovered = lock(&self.discovered);
        if let Some(&i) = discovered.get(address) {
            return Some(i);
        }
        if let Some(i) = self.endpoints.iter().position(|e| e.address == address) {
            return Some(i);
        }
        let index = self.endpoints.len();
        if self.endpoints.full() || self.addresses.full() {
            return None;
        }
        added(index);
        self.addresses.push(address.to_owned()).ok()?;
        let pushed = self
            .endpoints
            .push(Endpoint::new(address.to_owned(), index));
        if !matches!(pushed, Ok(i) if i == index) {
            return None;
        }
        discovered.insert(address.to_owned(), index);
        Some(index)
    }

    /// Picks an endpoint among those `allowed` (their breakers closed, say): the one with
    /// fewer calls in flight of two picked at random. Returns its index.
    pub fn pick(&self, allowed: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        // The first allowed endpoint at or after a random place, and another after that one.
        let first_from = |start: usize, skip: Option<usize>| {
            (0..n)
                .map(|k| (start + k) % n)
                .find(|&i| Some(i) != skip && allowed(i))
        };
        let a = first_from(fastrand::usize(..n), None)?;
        let Some(b) = first_from(fastrand::usize(..n), Some(a)) else {
            return Some(a);
        };
        let load = |i: usize| {
            self.endpoints
                .get(i)
                .map_or(usize::MAX, |e| e.in_flight.load(Ordering::Relaxed))
        };
        Some(if load(b) < load(a) { b } else { a })
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
        let mut last = None;
        let addrs =
            tokio::net::lookup_host(address)
                .await
                .map_err(|source| UpstreamError::Resolve {
                    endpoint: address.to_owned(),
                    source,
                })?;
        let mut tcp = None;
        for a in addrs {
            match dial(a, self.mark).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(tcp) = tcp else {
            return Err(UpstreamError::Connect {
                endpoint: address.to_owned(),
                source: last.unwrap_or_else(|| std::io::Error::other("no address")),
            });
        };
        let _ = tcp.set_nodelay(true);
        // Registered before the handshake: a reset during it is this endpoint's too.
        let tracked = match (tcp.local_addr(), tcp.peer_addr()) {
            (Ok(local), Ok(peer)) => self.joins.tracked.connection(
                Side::Upstream {
                    cluster: self.index,
                    endpoint: e.index,
                },
                local,
                peer,
            ),
            _ => None,
        };
        let goaway = Arc::new(GoawaySeen::default());
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(self.limits.upstream_stream_window)
            .initial_connection_window_size(self.limits.connection_window)
            .max_send_buffer_size(self.limits.max_send_buffer)
            .max_header_list_size(self.limits.max_header_list_size)
            .handshake::<_, Bytes>(GoawayWatch::new(Coalesce::new(tcp), goaway.clone()))
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
