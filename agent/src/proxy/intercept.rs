//! The intercept listener: connections the kernel steered here (see `probes::intercept`).
//!
//! Each accepted connection is looked up by its peer address to learn where the application
//! dialed. Then its first bytes decide: the HTTP/2 prior-knowledge preface is proxied (to the
//! cluster claiming the destination, else to the destination itself as an endpoint of the
//! passthrough cluster, with its own breakers); anything else (HTTP/1.1, a TLS ClientHello, a
//! protocol where the server speaks first) is spliced to the original destination unchanged.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    config::{
        intercept::{Destinations, InterceptConfig, PASSTHROUGH_CLUSTER, canonical},
        proxy::{Limits, Timeouts},
    },
    probes::intercept::{InterceptKernel, Original},
};

use super::{
    forward::{ConnInfo, Intercepted, Shared},
    route,
    server::{Live, serve_connection},
    upstream::dial,
};

/// The HTTP/2 connection preface a prior-knowledge client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How intercepted connections are served: who claims which destination, and the rest.
pub struct InterceptPlan {
    /// Each claiming cluster's destinations.
    pub claims: Vec<(usize, Destinations)>,
    /// The passthrough cluster's index.
    pub passthrough: usize,
    pub detect_timeout: Duration,
    pub own_mark: u32,
    pub connect_timeout: Duration,
    pub stats: Arc<InterceptStats>,
}

/// What the intercept listener did, for the stats and metrics.
#[derive(Default, Debug)]
pub struct InterceptStats {
    pub accepted: AtomicU64,
    /// Accepted, but the kernel had no original destination for the peer (a client dialing
    /// the listener itself, or an entry evicted): closed.
    pub no_original: AtomicU64,
    pub proxied_claimed: AtomicU64,
    pub proxied_passthrough: AtomicU64,
    /// Spliced because the first bytes were not the HTTP/2 preface.
    pub spliced_not_http2: AtomicU64,
    /// Spliced because the client sent nothing within `detect_timeout` (the server speaks
    /// first, or a client waits).
    pub spliced_silent: AtomicU64,
    /// Spliced because the passthrough cluster had no room for another endpoint.
    pub spliced_passthrough_full: AtomicU64,
    /// The original destination refused or did not answer a splice: the client's connection
    /// is reset, as a direct connect would have failed.
    pub splice_connect_failed: AtomicU64,
    pub spliced_bytes_to_destination: AtomicU64,
    pub spliced_bytes_to_client: AtomicU64,
    /// Passthrough connections refused at once because their endpoint's breaker is open
    /// (the client's balancer then sees a failed connection and moves on).
    pub refused_breaker_open: AtomicU64,
}

/// [`InterceptStats`] at one moment, with the kernel side's counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InterceptFigures {
    pub accepted: u64,
    pub no_original: u64,
    pub proxied_claimed: u64,
    pub proxied_passthrough: u64,
    pub spliced_not_http2: u64,
    pub spliced_silent: u64,
    pub spliced_passthrough_full: u64,
    pub splice_connect_failed: u64,
    pub spliced_bytes_to_destination: u64,
    pub spliced_bytes_to_client: u64,
    pub refused_breaker_open: u64,
    /// `redirected`, `own_skipped`, ... (see `agent_common::intercept::InterceptCounter`).
    pub kernel: Vec<(&'static str, u64)>,
}

impl InterceptFigures {
    /// Connections by what became of them, by the names the metrics and the API use.
    pub fn outcomes(&self) -> [(&'static str, u64); 9] {
        [
            ("accepted", self.accepted),
            ("proxied_claimed", self.proxied_claimed),
            ("proxied_passthrough", self.proxied_passthrough),
            ("spliced_not_http2", self.spliced_not_http2),
            ("spliced_silent", self.spliced_silent),
            ("spliced_passthrough_full", self.spliced_passthrough_full),
            ("splice_connect_failed", self.splice_connect_failed),
            ("refused_breaker_open", self.refused_breaker_open),
            ("no_original", self.no_original),
        ]
    }

    /// Bytes spliced, by direction.
    pub fn spliced_bytes(&self) -> [(&'static str, u64); 2] {
        [
            ("to_destination", self.spliced_bytes_to_destination),
            ("to_client", self.spliced_bytes_to_client),
        ]
    }
}

impl InterceptStats {
    pub fn figures(&self, kernel: Option<&InterceptKernel>) -> InterceptFigures {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        InterceptFigures {
            accepted: get(&self.accepted),
            no_original: get(&self.no_original),
            proxied_claimed: get(&self.proxied_claimed),
            proxied_passthrough: get(&self.proxied_passthrough),
            spliced_not_http2: get(&self.spliced_not_http2),
            spliced_silent: get(&self.spliced_silent),
            spliced_passthrough_full: get(&self.spliced_passthrough_full),
            splice_connect_failed: get(&self.splice_connect_failed),
            spliced_bytes_to_destination: get(&self.spliced_bytes_to_destination),
            spliced_bytes_to_client: get(&self.spliced_bytes_to_client),
            refused_breaker_open: get(&self.refused_breaker_open),
            kernel: kernel.map(InterceptKernel::counters).unwrap_or_default(),
        }
    }
}

impl InterceptPlan {
    pub fn new(config: &InterceptConfig, clusters: &[crate::config::proxy::Cluster]) -> Self {
        let claims = clusters
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.claims.iter().map(move |d| (i, d.clone())))
            .collect();
        // The configuration adds it whenever [intercept] is on.
        let passthrough = clusters
            .iter()
            .position(|c| c.name == PASSTHROUGH_CLUSTER)
            .unwrap_or(usize::MAX);
        Self {
            claims,
            passthrough,
            detect_timeout: config.detect_timeout,
            own_mark: config.own_mark,
            connect_timeout: Duration::from_secs(2),
            stats: Arc::default(),
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
enum Detected {
    Http2,
    NotHttp2,
    Silent,
}

/// Peeks (reads nothing away) until the preface is complete, contradicted, or `timeout`
/// passes.
async fn detect(socket: &TcpStream, timeout: Duration) -> std::io::Result<Detected> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let n = match tokio::time::timeout_at(deadline, socket.peek(&mut buf)).await {
            Err(_) => return Ok(Detected::Silent),
            Ok(r) => r?,
        };
        // An end of stream before any byte is not HTTP/2 either: splice it (the destination
        // sees the same half-close).
        if n == 0 || buf[..n] != PREFACE[..n] {
            return Ok(Detected::NotHttp2);
        }
        if n == PREFACE.len() {
            return Ok(Detected::Http2);
        }
        // Part of the preface: peek again once more may have come, without spinning on the
        // bytes already there.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(1)))
            .await
            .is_err()
        {
            return Ok(Detected::Silent);
        }
    }
}

/// Where an intercepted HTTP/2 connection's calls go: the claiming cluster (most specific
/// claim), else the passthrough cluster's endpoint for the destination. None: the
/// passthrough cluster is full.
fn plan_route(plan: &InterceptPlan, shared: &Shared, to: SocketAddr) -> Option<Intercepted> {
    let to = SocketAddr::new(canonical(to.ip()), to.port());
    if let Some(cluster) = route::claimant(&plan.claims, to) {
        return Some(Intercepted {
            original: to,
            cluster,
            endpoint: None,
        });
    }
    let cluster = plan.passthrough;
    let endpoint = shared.clusters.get(cluster)?.find_or_add(to)?;
    Some(Intercepted {
        original: to,
        cluster,
        endpoint: Some(endpoint),
    })
}

/// Copies both ways between the client and its original destination until both are done.
async fn splice(mut client: TcpStream, to: SocketAddr, plan: &InterceptPlan) {
    let stats = &plan.stats;
    let connected = tokio::time::timeout(plan.connect_timeout, dial(to, Some(plan.own_mark))).await;
    let mut upstream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(destination = %to, error = %e, "splice: original destination refused");
            stats.splice_connect_failed.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return;
        }
        Err(_) => {
            debug!(destination = %to, "splice: original destination did not answer");
            stats.splice_connect_failed.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((to_destination, to_client)) => {
            stats
                .spliced_bytes_to_destination
                .fetch_add(to_destination, Ordering::Relaxed);
            stats
                .spliced_bytes_to_client
                .fetch_add(to_client, Ordering::Relaxed);
        }
        Err(e) => debug!(destination = %to, error = %e, "splice ended with an error"),
    }
}

/// Closes with RST, as a refused connect would look to the client.
fn reset(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// Tells the intercepted connections pinned to a passthrough endpoint when its breaker opens
/// (whatever opened it: calls, a kernel signal, an operator), for them to send GOAWAY.
pub(super) async fn watch_passthrough_breakers(shared: Arc<Shared>, passthrough: usize) {
    let mut events = shared.bus.breaker_events.subscribe();
    let Some(pool) = shared.clusters.get(passthrough) else {
        return;
    };
    let prefix = format!("{}/", pool.name);
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "intercept: breaker events missed; connections to endpoints that opened meanwhile stay until they fail"
                );
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let id = &event.transition.breaker;
        if id.scope != crate::breaker::config::Scope::Endpoint
            || event.transition.change.to != crate::breaker::circuit::State::Open
        {
            continue;
        }
        let address = id.name.strip_prefix(&prefix).and_then(|a| a.parse().ok());
        if let Some(endpoint) = address.and_then(|a| pool.find(a)) {
            endpoint.breaker_opened.send_modify(|n| *n += 1);
        }
    }
}

/// What an intercept accept loop serves with.
pub(super) struct InterceptServing {
    pub plan: Arc<InterceptPlan>,
    pub kernel: Arc<InterceptKernel>,
    pub shared: Arc<Shared>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub shutdown: watch::Receiver<bool>,
    pub live: Arc<Live>,
    pub streams: Arc<Live>,
}

pub(super) async fn accept_loop(tcp: TcpListener, s: Arc<InterceptServing>) {
    let name: Arc<str> = "intercept".into();
    if let Ok(a) = tcp.local_addr() {
        info!(address = %a, "intercept listener serving");
    }
    loop {
        let (socket, peer) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(listener = "intercept", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let stats = &s.plan.stats;
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Some(Original { destination, .. }) = s.kernel.take_original(peer) else {
            stats.no_original.fetch_add(1, Ordering::Relaxed);
            debug!(client = %peer, "intercept listener: no original destination; closed");
            continue;
        };
        let (s, name) = (s.clone(), name.clone());
        tokio::spawn(async move {
            serve_intercepted(socket, peer, destination, name, &s).await;
        });
    }
}

async fn serve_intercepted(
    socket: TcpStream,
    peer: SocketAddr,
    destination: SocketAddr,
    listener: Arc<str>,
    s: &InterceptServing,
) {
    let plan = &s.plan;
    let stats = &plan.stats;
    let detected = match detect(&socket, plan.detect_timeout).await {
        Ok(d) => d,
        Err(e) => {
            debug!(client = %peer, error = %e, "intercepted connection failed before its first bytes");
            return;
        }
    };
    let route = match detected {
        Detected::Http2 => plan_route(plan, &s.shared, destination),
        Detected::NotHttp2 => {
            stats.spliced_not_http2.fetch_add(1, Ordering::Relaxed);
            None
        }
        Detected::Silent => {
            stats.spliced_silent.fetch_add(1, Ordering::Relaxed);
            None
        }
    };
    let Some(route) = route else {
        if detected == Detected::Http2 {
            stats
                .spliced_passthrough_full
                .fetch_add(1, Ordering::Relaxed);
        }
        splice(socket, destination, plan).await;
        return;
    };
    if let Some(endpoint) = &route.endpoint {
        // An endpoint whose breaker is open is refused like a dead one: the client's balancer
        // (grpc-go's round_robin, say) marks that address down and uses the others.
        let now = std::time::Instant::now();
        if !s
            .shared
            .breakers
            .endpoint_admissible(&endpoint.breakers, 0, now)
        {
            stats.refused_breaker_open.fetch_add(1, Ordering::Relaxed);
            reset(&socket);
            return;
        }
        stats.proxied_passthrough.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.proxied_claimed.fetch_add(1, Ordering::Relaxed);
    }
    let conn = ConnInfo::accepted(
        &s.shared,
        listener,
        &socket,
        peer,
        Arc::from(Vec::new()),
        Some(route),
    );
    let _ = socket.set_nodelay(true);
    serve_connection(
        socket,
        conn,
        s.shared.clone(),
        s.limits,
        s.timeouts,
        s.shutdown.clone(),
        s.streams.clone(),
        s.live.enter(),
    )
    .await;
}
