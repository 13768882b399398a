//! Listeners and client connections: the HTTP/2 server side, with the timeouts `h2` does not
//! have (header read, idle, keep-alive PING) and a graceful drain on shutdown.

use std::{
    future::poll_fn,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use h2::{Ping, Reason};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Notify, watch},
    time::{Instant, sleep_until},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::{
    breaker::registry::{Breakers, ClusterShape, Snapshot},
    config::{
        AgentConfig,
        intercept::PASSTHROUGH_CLUSTER,
        proxy::{Limits, Listener, Timeouts},
    },
    context::{ContextStats, Extractor},
    correlate::{Joins, table::Side},
    discovery::{Discovery, DiscoveryStats, EndpointSink, NameStatus, SetChange},
    events::bus::{BreakerEvents, Bus, Outcomes},
    probes::intercept::InterceptKernel,
};

use super::{
    coalesce::Coalesce,
    forward::{self, ConnInfo, Shared},
    intercept::{self, InterceptFigures, InterceptPlan, InterceptServing},
    retry::RetryBudget,
    tls::{self, TlsError},
    upstream::{ClusterPool, PoolOptions},
};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("request context: {0}")]
    Context(#[from] crate::context::ContextError),
    #[error("listener {listener}: {source}")]
    Tls {
        listener: String,
        #[source]
        source: TlsError,
    },
    #[error(transparent)]
    Dns(#[from] crate::discovery::dns::ResolverError),
    #[error("cluster {cluster}: upstream TLS: {source}")]
    UpstreamTls {
        cluster: String,
        #[source]
        source: crate::config::tls::UpstreamTlsError,
    },
    #[error("cannot listen on {address} (listener {listener}): {source}")]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Live connections (and streams), so a drain knows when it is done.
#[derive(Default)]
pub(super) struct Live {
    count: AtomicUsize,
    idle: Notify,
}

pub(super) struct LiveGuard(Arc<Live>);

impl Live {
    pub(super) fn enter(self: &Arc<Self>) -> LiveGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        LiveGuard(self.clone())
    }

    /// Waits until none is left or `deadline` passes; returns how many are left.
    async fn until_none(&self, deadline: Instant) -> usize {
        loop {
            let waiting = self.idle.notified();
            let n = self.count.load(Ordering::SeqCst);
            if n == 0 {
                return 0;
            }
            tokio::select! {
                () = waiting => {}
                () = sleep_until(deadline) => return self.count.load(Ordering::SeqCst),
            }
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A bound proxy, ready to serve.
pub struct Proxy {
    listeners: Vec<(Listener, TcpListener, Option<TlsAcceptor>)>,
    /// `[intercept]`'s listeners (IPv4, then IPv6), bound before the kernel programs are
    /// attached so that no redirected connect finds nobody listening.
    intercept_listeners: Vec<TcpListener>,
    intercept_plan: Option<Arc<InterceptPlan>>,
    intercept_kernel: Option<Arc<InterceptKernel>>,
    shared: Arc<Shared>,
    /// The clusters' DNS names, followed until the proxy is dropped (which drops this).
    discovery: Arc<DiscoveryStats>,
    _discovery_stop: watch::Sender<bool>,
    limits: Limits,
    timeouts: Timeouts,
    connections: Arc<Live>,
    streams: Arc<Live>,
}

/// What the proxy holds right now: to see that nothing leaks, and for the status API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProxyStats {
    pub client_connections: usize,
    pub client_streams: usize,
    pub outcomes_published: u64,
    pub upstreams: Vec<super::upstream::EndpointStats>,
    pub breakers: Vec<Snapshot>,
    pub breaker_events_published: u64,
    /// Calls retrying now, and retries the budget refused.
    pub retries_in_flight: usize,
    pub retries_refused_by_budget: usize,
    pub untracked_clients: u64,
    pub untracked_methods: u64,
    pub context: ContextStats,
    /// The clusters' DNS names and endpoints files: what each stands for, lookups answered
    /// and failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub discovery: Vec<NameStatus>,
    /// Clusters with upstream TLS: times their files changed and loaded, and did not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstream_tls: Vec<UpstreamTlsFigures>,
    /// What interception did, when it is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intercept: Option<InterceptFigures>,
}

/// One cluster's upstream TLS files: reloaded on change, or refused (the old ones kept).
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamTlsFigures {
    pub cluster: String,
    pub reloads: u64,
    pub reload_failures: u64,
}

/// Takes [`ProxyStats`] while the proxy serves.
#[derive(Clone)]
pub struct StatsSource {
    shared: Arc<Shared>,
    discovery: Arc<DiscoveryStats>,
    intercept: Option<(Arc<InterceptPlan>, Option<Arc<InterceptKernel>>)>,
    connections: Arc<Live>,
    streams: Arc<Live>,
}

impl StatsSource {
    /// What interception did, when it is on (the kernel's counters read now).
    pub fn intercept(&self) -> Option<InterceptFigures> {
        self.intercept
            .as_ref()
            .map(|(plan, kernel)| plan.stats.figures(kernel.as_deref()))
    }

    /// The clusters' DNS names and endpoints files as discovery last saw them.
    pub fn discovery(&self) -> Vec<NameStatus> {
        self.discovery.names()
    }

    /// Every endpoint's load, those draining included.
    pub fn upstreams(&self) -> Vec<super::upstream::EndpointStats> {
        self.shared
            .clusters
            .iter()
            .flat_map(|c| c.stats())
            .collect()
    }

    /// Each TLS cluster's reloads of its files.
    pub fn upstream_tls(&self) -> Vec<UpstreamTlsFigures> {
        self.shared
            .clusters
            .iter()
            .filter_map(|c| {
                let (reloads, reload_failures) = c.tls_reloads()?;
                Some(UpstreamTlsFigures {
                    cluster: c.name.clone(),
                    reloads,
                    reload_failures,
                })
            })
            .collect()
    }

    pub fn snapshot(&self) -> ProxyStats {
        ProxyStats {
            client_connections: self.connections.count.load(Ordering::SeqCst),
            client_streams: self.streams.count.load(Ordering::SeqCst),
            outcomes_published: self.shared.bus.outcomes.published(),
            upstreams: self.upstreams(),
            breakers: self.shared.breakers.snapshot(std::time::Instant::now()),
            breaker_events_published: self.shared.bus.breaker_events.published(),
            retries_in_flight: self.shared.budget.retrying(),
            retries_refused_by_budget: self.shared.budget.exhausted.load(Ordering::Relaxed),
            untracked_clients: self
                .shared
                .breakers
                .untracked_clients
                .load(Ordering::Relaxed),
            untracked_methods: self
                .shared
                .breakers
                .untracked_methods
                .load(Ordering::Relaxed),
            context: self.shared.context.stats(),
            discovery: self.discovery(),
            upstream_tls: self.upstream_tls(),
            intercept: self.intercept(),
        }
    }
}

impl Proxy {
    /// Binds every listener (so a taken port fails at start, not later).
    pub async fn bind(config: &AgentConfig) -> Result<Proxy, ServerError> {
        // Room for the original destinations the passthrough cluster meets.
        let discovered = |c: &crate::config::proxy::Cluster| match &config.intercept {
            Some(i) if c.name == PASSTHROUGH_CLUSTER => i.max_passthrough_endpoints,
            _ => 0,
        };
        let mut intercept_listeners = Vec::new();
        if let Some(i) = &config.intercept {
            let addresses = [Some(i.listen), i.listen6, i.node_listen, i.node_listen6];
            for address in addresses.into_iter().flatten() {
                let tcp = TcpListener::bind(address)
                    .await
                    .map_err(|source| ServerError::Bind {
                        listener: "intercept".into(),
                        address,
                        source,
                    })?;
                intercept_listeners.push(tcp);
            }
        }
        let intercept_plan = config
            .intercept
            .as_ref()
            .map(|i| Arc::new(InterceptPlan::new(i, &config.clusters)));
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let tls = l
                .tls
                .as_ref()
                .map(tls::acceptor)
                .transpose()
                .map_err(|source| ServerError::Tls {
                    listener: l.name.clone(),
                    source,
                })?;
            let tcp = TcpListener::bind(l.address)
                .await
                .map_err(|source| ServerError::Bind {
                    listener: l.name.clone(),
                    address: l.address,
                    source,
                })?;
            listeners.push((l.clone(), tcp, tls));
        }
        let shapes: Vec<_> = config
            .clusters
            .iter()
            .map(|c| ClusterShape {
                name: &c.name,
                subsets: &c.subsets,
                endpoints_only: config.intercept.is_some() && c.name == PASSTHROUGH_CLUSTER,
            })
            .collect();
        let mark = config.intercept.as_ref().map(|i| i.own_mark);
        // Connections and streams are tracked only when kernel signals are joined to them.
        let joins = Arc::new(Joins::new(!config.signals.probes.is_empty()));
        let breakers = Arc::new(Breakers::new(
            config.breakers.clone(),
            &shapes,
            std::time::Instant::now(),
        ));
        let mut clusters = Vec::new();
        for (i, c) in config.clusters.iter().enumerate() {
            let options = PoolOptions {
                discovered: discovered(c),
                mark,
            };
            let pool = ClusterPool::new(
                i,
                c,
                config.limits,
                joins.clone(),
                breakers.clone(),
                &options,
            )
            .map_err(|source| ServerError::UpstreamTls {
                cluster: c.name.clone(),
                source,
            })?;
            clusters.push(pool);
        }
        let shared = Arc::new(Shared {
            clusters,
            bus: Arc::new(Bus::default()),
            breakers,
            context: Extractor::new(&config.context)?,
            retries: config.retries.clone(),
            budget: RetryBudget::default(),
            grpc_timeout_offset: config.timeouts.grpc_timeout_offset,
            joins,
        });
        // Before serving: a DNS name's endpoints are there for the first call.
        let (discovery_stop, stop) = watch::channel(false);
        let discovery = Discovery::start(config, shared.clone(), stop).await?.stats;
        Ok(Proxy {
            listeners,
            intercept_listeners,
            intercept_plan,
            intercept_kernel: None,
            shared,
            discovery,
            _discovery_stop: discovery_stop,
            limits: config.limits,
            timeouts: config.timeouts,
            connections: Arc::default(),
            streams: Arc::default(),
        })
    }

    /// Hands the proxy the loaded interception programs, whose listener it serves; without
    /// them the intercept listener is not served (nothing would be redirected to it).
    pub fn set_interception(&mut self, kernel: Arc<InterceptKernel>) {
        self.intercept_kernel = Some(kernel);
    }

    /// The intercept listeners' addresses: loopback (IPv4, IPv6), then the node's.
    pub fn intercept_addrs(&self) -> Vec<SocketAddr> {
        self.intercept_listeners
            .iter()
            .filter_map(|t| t.local_addr().ok())
            .collect()
    }

    /// The address each listener is bound to (port 0 resolved), by name.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(l, t, _)| Some((l.name.clone(), t.local_addr().ok()?)))
            .collect()
    }

    pub fn outcomes(&self) -> &Outcomes {
        &self.shared.bus.outcomes
    }

    /// What the correlation stage needs of the proxy.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub fn breaker_events(&self) -> &BreakerEvents {
        &self.shared.bus.breaker_events
    }

    pub fn stats(&self) -> StatsSource {
        StatsSource {
            shared: self.shared.clone(),
            discovery: self.discovery.clone(),
            intercept: self
                .intercept_plan
                .clone()
                .map(|p| (p, self.intercept_kernel.clone())),
            connections: self.connections.clone(),
            streams: self.streams.clone(),
        }
    }

    /// Serves until `shutdown` turns true, then drains: GOAWAY to every client, in-flight
    /// streams get `timeouts.drain` to finish. Returns the streams still open at the end.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) -> usize {
        let (live, streams) = (self.connections, self.streams);
        let mut accept_tasks = Vec::new();
        for (listener, tcp, tls) in self.listeners {
            let info = Arc::new(ListenerInfo {
                name: listener.name.as_str().into(),
                routes: listener.routes.clone().into(),
                tls,
            });
            info!(listener = %listener.name, address = %listener.address, tls = info.tls.is_some(), "listening");
            accept_tasks.push(tokio::spawn(accept_loop(
                tcp,
                info,
                self.shared.clone(),
                self.limits,
                self.timeouts,
                shutdown.clone(),
                live.clone(),
                streams.clone(),
            )));
        }
        if let (Some(plan), Some(kernel)) =
            (self.intercept_plan.clone(), self.intercept_kernel.clone())
        {
            let serving = Arc::new(InterceptServing {
                plan,
                kernel,
                shared: self.shared.clone(),
                limits: self.limits,
                timeouts: self.timeouts,
                shutdown: shutdown.clone(),
                live: live.clone(),
                streams: streams.clone(),
            });
            for tcp in self.intercept_listeners {
                accept_tasks.push(tokio::spawn(intercept::accept_loop(tcp, serving.clone())));
            }
            accept_tasks.push(tokio::spawn(intercept::watch_passthrough_breakers(
                self.shared.clone(),
                serving.plan.passthrough,
            )));
        }
        // Open breakers whose period passed turn half-open even with no call to notice.
        let shared = self.shared.clone();
        accept_tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            loop {
                every.tick().await;
                let mut changes = Vec::new();
                shared
                    .breakers
                    .tick(std::time::Instant::now(), &mut changes);
                for transition in changes {
                    shared.publish_transition(transition, None, None);
                }
            }
        }));
        let _ = shutdown.wait_for(|stop| *stop).await;
        for t in &accept_tasks {
            t.abort();
        }
        let deadline = Instant::now() + self.timeouts.drain;
        info!(
            connections = live.count.load(Ordering::SeqCst),
            streams = streams.count.load(Ordering::SeqCst),
            drain = ?self.timeouts.drain,
            "draining"
        );
        let streams_left = streams.until_none(deadline).await;
        // Then the connections: each closes once its last frames (trailers, GOAWAY) are
        // written; leaving before that would cut off responses that are already done.
        let connections_left = live.until_none(deadline + Duration::from_secs(1)).await;
        if connections_left > 0 {
            warn!(
                connections = connections_left,
                "connections still open after the drain"
            );
        }
        streams_left
    }
}

/// Resolves when the watched endpoint's breaker opens again; never without a watch.
async fn opened(watch: Option<watch::Receiver<u64>>) {
    if let Some(mut w) = watch
        && w.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

impl ConnInfo {
    /// A client connection just accepted on `listener`, entered in the correlation table
    /// (when kernel signals are joined to the proxy's connections).
    pub(super) fn accepted(
        shared: &Shared,
        listener: Arc<str>,
        socket: &tokio::net::TcpStream,
        peer: SocketAddr,
        routes: Arc<[crate::config::proxy::Route]>,
        intercepted: Option<forward::Intercepted>,
    ) -> Arc<ConnInfo> {
        let tracked = socket.local_addr().ok().and_then(|local| {
            shared.joins.tracked.connection(
                Side::Downstream {
                    listener: listener.clone(),
                },
                local,
                peer,
            )
        });
        Arc::new(ConnInfo {
            listener,
            client: peer,
            routes,
            tracked,
            intercepted,
        })
    }
}

struct ListenerInfo {
    name: Arc<str>,
    routes: Arc<[crate::config::proxy::Route]>,
    tls: Option<TlsAcceptor>,
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
async fn accept_loop(
    tcp: TcpListener,
    info: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    limits: Limits,
    timeouts: Timeouts,
    shutdown: watch::Receiver<bool>,
    live: Arc<Live>,
    streams: Arc<Live>,
) {
    loop {
        let (socket, peer) = match tcp.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(listener = %info.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = ConnInfo::accepted(
            &shared,
            info.name.clone(),
            &socket,
            peer,
            info.routes.clone(),
            None,
        );
        let guard = live.enter();
        let _ = socket.set_nodelay(true);
        let (shared, shutdown, streams) = (shared.clone(), shutdown.clone(), streams.clone());
        let Some(acceptor) = info.tls.clone() else {
            tokio::spawn(serve_connection(
                socket, conn, shared, limits, timeouts, shutdown, streams, guard,
            ));
            continue;
        };
        tokio::spawn(async move {
            // The TLS handshake counts against the header-read timeout, like the preface.
            let accepted = Instant::now();
            let tls = match tokio::time::timeout(timeouts.header_read, acceptor.accept(socket))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(client = %conn.client, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(client = %conn.client, "TLS handshake not done within the header-read timeout");
                    return;
                }
            };
            let timeouts = Timeouts {
                header_read: timeouts.header_read.saturating_sub(accepted.elapsed()),
                ..timeouts
            };
            serve_connection(
                tls, conn, shared, limits, timeouts, shutdown, streams, guard,
            )
            .await;
        });
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
pub(super) async fn serve_connection<T>(
    socket: T,
    info: Arc<ConnInfo>,
    shared: Arc<Shared>,
    limits: Limits,
    timeouts: Timeouts,
    mut shutdown: watch::Receiver<bool>,
    streams: Arc<Live>,
    _live: LiveGuard,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let accepted = Instant::now();
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_size)
        .initial_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .max_send_buffer_size(limits.max_send_buffer)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(limits.max_local_error_reset_streams));
    let handshake = builder.handshake::<_, Bytes>(Coalesce::new(socket));
    let mut conn = match tokio::time::timeout(timeouts.header_read, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(client = %info.client, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            debug!(client = %info.client, "no HTTP/2 preface within the header-read timeout");
            return;
        }
    };
    let mut ping_pong = conn.ping_pong();
    // A passthrough connection ends (GOAWAY) when its endpoint's breaker opens.
    let watched = info
        .intercepted
        .as_ref()
        .and_then(|i| Some(i.endpoint.as_ref()?.breaker_opened.subscribe()));
    // One future for the connection's life, not one per turn of the loop; polled only for a
    // connection that has an endpoint to watch.
    let mut endpoint_watch_done = watched.is_none();
    let endpoint_opened = opened(watched);
    tokio::pin!(endpoint_opened);
    // The connection's streams run inside this task, not spawned: one wake-up then serves
    // every stream that is ready and h2 writes their frames together (a spawned task per
    // stream made about two writes per call, and moved each stream's future into the heap).
    let mut in_flight = FuturesUnordered::new();
    // Until the first request: the header-read deadline; then idle and keep-alive.
    let mut first_request_by = Some(accepted + timeouts.header_read);
    let mut last_active = Instant::now();
    let mut next_ping = Instant::now() + timeouts.keepalive_interval;
    let mut pong_due: Option<Instant> = None;
    let mut drain_by: Option<Instant> = None;
    loop {
        let idle_check = if let Some(by) = drain_by {
            by
        } else if let Some(t) = first_request_by {
            t
        } else {
            let mut t = (last_active + timeouts.idle).min(next_ping);
            if let Some(p) = pong_due {
                t = t.min(p);
            }
            t
        };
        tokio::select! {
            next = conn.accept() => match next {
                None => break,
                Some(Err(e)) => {
                    debug!(client = %info.client, error = %e, "client connection ended with an error");
                    break;
                }
                Some(Ok((req, respond))) => {
                    first_request_by = None;
                    last_active = Instant::now();
                    let stream_guard = streams.enter();
                    let stream = forward::forward(req, respond, shared.clone(), info.clone());
                    in_flight.push(async move {
                        stream.await;
                        drop(stream_guard);
                    });
                }
            },
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            r = poll_fn(|cx| match ping_pong.as_mut() {
                Some(pp) if pong_due.is_some() => pp.poll_pong(cx),
                _ => std::task::Poll::Pending,
            }) => {
                pong_due = None;
                if let Err(e) = r {
                    debug!(client = %info.client, error = %e, "keep-alive PING failed");
                }
            }
            _ = shutdown.wait_for(|s| *s), if drain_by.is_none() => {
                conn.graceful_shutdown();
                drain_by = Some(Instant::now() + timeouts.drain);
            }
            () = &mut endpoint_opened, if drain_by.is_none() && !endpoint_watch_done => {
                endpoint_watch_done = true;
                debug!(client = %info.client, "endpoint's breaker opened: GOAWAY");
                conn.graceful_shutdown();
                drain_by = Some(Instant::now() + timeouts.drain);
            }
            () = sleep_until(idle_check) => {
                let now = Instant::now();
                if !in_flight.is_empty() {
                    // Streams in flight: the connection is not idle.
                    last_active = now;
                }
                if let Some(by) = drain_by {
                    if now >= by {
                        conn.abrupt_shutdown(Reason::NO_ERROR);
                        break;
                    }
                } else if first_request_by.is_some_and(|t| now >= t) {
                    debug!(client = %info.client, "no request within the header-read timeout");
                    conn.abrupt_shutdown(Reason::NO_ERROR);
                    break;
                } else if pong_due.is_some_and(|t| now >= t) {
                    debug!(client = %info.client, "keep-alive PING not answered");
                    conn.abrupt_shutdown(Reason::NO_ERROR);
                    break;
                } else if in_flight.is_empty() && now >= last_active + timeouts.idle {
                    debug!(client = %info.client, "idle connection closed");
                    conn.graceful_shutdown();
                    drain_by = Some(now + timeouts.drain);
                } else if now >= next_ping {
                    next_ping = now + timeouts.keepalive_interval;
                    if let Some(pp) = ping_pong.as_mut() && pong_due.is_none() && pp.send_ping(Ping::opaque()).is_ok() {
                        pong_due = Some(now + timeouts.keepalive_timeout);
                    }
                }
            }
        }
    }
    // Streams still here lost their client: dropping the connection fails their client
    // side, so each cancels its upstream stream and publishes its outcome.
    drop(conn);
    while in_flight.next().await.is_some() {}
}

impl EndpointSink for Shared {
    fn set_entry(
        &self,
        cluster: usize,
        entry: usize,
        addresses: Vec<std::net::SocketAddr>,
    ) -> SetChange {
        self.clusters
            .get(cluster)
            .map_or_else(SetChange::default, |pool| pool.set_entry(entry, addresses))
    }
}
