//! `agent.v1.AgentStatus`: reads the proxy's breakers and the agent's figures, serves the
//! journal to watchers, and trips or resets breakers for an authenticated admin.
//!
//! A watcher reads the journal itself, from its own position (a [`Tail`]), and is only woken
//! when the journal grows: a slow watcher falls behind on disk, not in the agent's memory, and
//! can never hold up the journal, the proxy or another watcher. One that takes nothing for
//! [`STALL`] while events wait is told where to resume (`lagged`) and let go.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use serde_json::Value;
use sha2::Digest as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::{self, agent_status_server::AgentStatus, watch_event};
use crate::{
    breaker::registry::Snapshot,
    correlate::{Joins, feed::ProbeCounters},
    events::{tail::Tail, writer::JournalStats},
    probes::{ProbeStatus, ring::ReaderStats},
    proxy::{forward::Shared, server::StatsSource},
};

/// Events a watcher's stream holds before it waits for its client.
const WATCH_BUFFER: usize = 256;

/// Journal lines read at a time for a watcher.
const READ_BATCH: usize = 512;

/// A watcher that takes nothing for this long while events wait is let go with `lagged`.
pub const STALL: Duration = Duration::from_secs(5);

/// What the service reads; everything is shared with the running agent.
pub struct Sources {
    pub shared: Arc<Shared>,
    pub stats: StatsSource,
    pub probes: Vec<ProbeStatus>,
    pub probe_counters: Option<ProbeCounters>,
    pub reader: Option<Arc<ReaderStats>>,
    pub journal_dir: Option<PathBuf>,
    pub journal_stats: Arc<JournalStats>,
    /// The last sequence number journaled, as it changes (wakes the watchers).
    pub journaled_seq: watch::Receiver<u64>,
    /// The configuration file's bytes (empty in quick mode).
    pub config_bytes: Vec<u8>,
    pub listeners: Vec<String>,
    pub admin_token: Option<Vec<u8>>,
    /// Turns true when the agent stops: watchers end (the server's graceful stop waits for
    /// every stream).
    pub stopping: watch::Receiver<bool>,
}

pub struct StatusService {
    src: Arc<Sources>,
    started: Instant,
    config_sha256: String,
}

impl StatusService {
    pub fn new(src: Sources) -> Self {
        let config_sha256 = if src.config_bytes.is_empty() {
            String::new()
        } else {
            hex(&sha2::Sha256::digest(&src.config_bytes))
        };
        Self {
            src: Arc::new(src),
            started: Instant::now(),
            config_sha256,
        }
    }

    /// Admin calls: the bearer token of `[api] admin_token_file`, compared in constant time.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(want) = &self.src.admin_token else {
            return Err(Status::permission_denied(
                "admin calls are off: the agent has no [api] admin_token_file",
            ));
        };
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "admin call without authorization: send `authorization: Bearer <token>`",
            ));
        };
        let got = value
            .as_bytes()
            .strip_prefix(b"Bearer ")
            .or_else(|| value.as_bytes().strip_prefix(b"bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization is not a bearer token"))?;
        if constant_time_eq(got.trim_ascii(), want) {
            Ok(())
        } else {
            Err(Status::permission_denied("wrong admin token"))
        }
    }

    fn find(&self, name: &str) -> Option<Snapshot> {
        self.src
            .shared
            .breakers
            .snapshot(Instant::now())
            .into_iter()
            .find(|b| b.id.to_string() == name || b.id.name == name)
    }

    async fn admin(
        &self,
        req: Request<pb::BreakerAdminRequest>,
        open: bool,
    ) -> Result<Response<pb::BreakerAdminResponse>, Status> {
        self.authorize(&req)?;
        let name = req.into_inner().name;
        let shared = &self.src.shared;
        let Some(change) = shared.breakers.force(&name, open, Instant::now()) else {
            return Err(Status::not_found(format!("no breaker {name:?}")));
        };
        let changed = change.is_some();
        if let Some(t) = change {
            tracing::info!(breaker = %t.breaker, to = t.change.to.as_str(), "breaker changed by an admin call");
            shared.publish_transition(t, None, None);
        }
        let breaker = self.find(&name).map(|s| breaker_pb(&s));
        Ok(Response::new(pb::BreakerAdminResponse { changed, breaker }))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Lengths are not secret enough to hide; the bytes are compared without an early exit.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn breaker_pb(s: &Snapshot) -> pb::Breaker {
    let f = &s.figures;
    pb::Breaker {
        name: s.id.to_string(),
        scope: s.id.scope.as_str().into(),
        target: s.id.name.clone(),
        class: s.id.class.clone().unwrap_or_default(),
        state: f.state.as_str().into(),
        reason: f
            .reason
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        open_remaining_ms: f.open_remaining_ms.unwrap_or(0),
        window_calls: f.window.calls.into(),
        window_failures: f.window.failures.into(),
        window_slow: f.window.slow.into(),
        consecutive_failures: f.consecutive_failures.into(),
        slow_threshold_us: f.slow_threshold_us.unwrap_or(0),
        json: serde_json::to_string(s).unwrap_or_default(),
    }
}

fn signals(joins: &Joins) -> Vec<pb::SignalFigures> {
    joins
        .stats
        .by_kind()
        .into_iter()
        .map(|(kind, k)| {
            let f = k.figures();
            pb::SignalFigures {
                kind: kind.as_str().into(),
                seen: f.seen,
                joined: f.joined,
                acted: f.acted,
                duplicates: f.duplicates,
            }
        })
        .collect()
}

/// An event for the wire, from its journal line.
fn event_pb(seq: u64, line: String) -> pb::WatchEvent {
    let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let s = |k: &str| v["breaker"][k].as_str().unwrap_or_default().to_owned();
    pb::WatchEvent {
        kind: Some(watch_event::Kind::Event(pb::Event {
            seq,
            breaker: s("name"),
            from: s("from"),
            to: s("to"),
            reason: s("reason"),
            json: line,
        })),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AgentStatus for StatusService {
    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        let src = &self.src;
        let proxy = src.stats.snapshot();
        let journal = src.journal_stats.figures();
        let mut dropped = BTreeMap::new();
        dropped.insert("journal_writer_behind".to_owned(), journal.dropped);
        dropped.insert("journal_write_failed".to_owned(), journal.failed);
        dropped.insert(
            "evidence_board".to_owned(),
            src.shared
                .joins
                .board
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        if let Some(r) = &src.reader {
            dropped.insert(
                "ring_undecodable".to_owned(),
                r.undecodable.load(std::sync::atomic::Ordering::Relaxed),
            );
        }
        let mut probes = Vec::new();
        for p in &src.probes {
            probes.push(pb::Probe {
                name: p.name.as_str().into(),
                attached: p.attached,
                degraded: p.degraded.clone(),
            });
        }
        let counters = src
            .probe_counters
            .as_ref()
            .map(ProbeCounters::snapshot)
            .unwrap_or_default();
        for (name, v) in &counters {
            if name.ends_with("_dropped") {
                dropped.insert(name.clone(), *v);
            }
        }
        let mut intercept = BTreeMap::new();
        if let Some(f) = &proxy.intercept {
            for (name, v) in f.outcomes() {
                intercept.insert(name.to_owned(), v);
            }
            for (direction, v) in f.spliced_bytes() {
                intercept.insert(format!("spliced_bytes_{direction}"), v);
            }
            for (name, v) in &f.kernel {
                intercept.insert(format!("kernel_{name}"), *v);
            }
            // What interception lost: a connect left alone for want of map room, a
            // redirected connection whose destination could not be published.
            for lost in ["store_failed", "peer_publish_failed"] {
                let v = f
                    .kernel
                    .iter()
                    .find(|(n, _)| *n == lost)
                    .map_or(0, |(_, v)| *v);
                dropped.insert(format!("intercept_{lost}"), v);
            }
        }
        let breakers_open = proxy
            .breakers
            .iter()
            .filter(|b| b.figures.state != crate::breaker::circuit::State::Closed)
            .count() as u32;
        Ok(Response::new(pb::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            pid: std::process::id(),
            config_sha256: self.config_sha256.clone(),
            probes,
            signals: signals(&src.shared.joins),
            journal: Some(pb::Journal {
                dir: src
                    .journal_dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
                last_seq: journal.last_seq,
                written: journal.written,
                dropped: journal.dropped,
                failed: journal.failed,
            }),
            dropped: dropped.into_iter().collect(),
            client_connections: proxy.client_connections as u64,
            client_streams: proxy.client_streams as u64,
            breakers_open,
            listeners: src.listeners.clone(),
            probe_counters: counters.into_iter().collect(),
            intercept: intercept.into_iter().collect(),
            endpoints: proxy
                .upstreams
                .iter()
                .map(|e| pb::Endpoint {
                    cluster: e.cluster.clone(),
                    address: e.endpoint.clone(),
                    subset: e.subset.clone(),
                    draining: e.draining,
                    calls_in_flight: e.calls_in_flight as u64,
                    connections: e.connections as u64,
                })
                .collect(),
            discovery: proxy
                .discovery
                .iter()
                .map(|n| pb::Discovered {
                    cluster: n.cluster.clone(),
                    name: n.name.clone(),
                    source: n.source.to_owned(),
                    addresses: n.addresses.iter().map(ToString::to_string).collect(),
                    answered: n.answered,
                    empty: n.empty,
                    failed: n.failed,
                    last_error: n.last_error.clone().unwrap_or_default(),
                    ttl_secs: n.ttl_secs.unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn list_breakers(
        &self,
        req: Request<pb::ListBreakersRequest>,
    ) -> Result<Response<pb::ListBreakersResponse>, Status> {
        let r = req.into_inner();
        let breakers = self
            .src
            .shared
            .breakers
            .snapshot(Instant::now())
            .iter()
            .filter(|b| r.scope.is_empty() || b.id.scope.as_str() == r.scope)
            .filter(|b| !r.not_closed || b.figures.state != crate::breaker::circuit::State::Closed)
            .map(breaker_pb)
            .collect();
        Ok(Response::new(pb::ListBreakersResponse { breakers }))
    }

    async fn get_breaker(
        &self,
        req: Request<pb::GetBreakerRequest>,
    ) -> Result<Response<pb::Breaker>, Status> {
        let name = req.into_inner().name;
        self.find(&name)
            .map(|s| Response::new(breaker_pb(&s)))
            .ok_or_else(|| Status::not_found(format!("no breaker {name:?}")))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let Some(dir) = self.src.journal_dir.clone() else {
            return Err(Status::failed_precondition(
                "the agent keeps no journal ([events] journal): there are no events to watch",
            ));
        };
        let mut journaled = self.src.journaled_seq.clone();
        let from = match req.into_inner().from_seq {
            0 => *journaled.borrow_and_update() + 1,
            n => n,
        };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        // The stream's last word when the agent stops, after what is buffered (the buffer may
        // be full: a watcher that is behind must still learn where to resume).
        let (last_word, last_word_rx) = tokio::sync::oneshot::channel::<Status>();
        let stopped = move |next: u64| {
            let _ = last_word.send(Status::unavailable(format!(
                "the agent is stopping: resume from seq {next}"
            )));
        };
        let mut stopping = self.src.stopping.clone();
        tokio::spawn(async move {
            let mut tail = Tail::new(&dir, from);
            let mut next = from;
            loop {
                let batch = match tokio::task::block_in_place(|| tail.read(READ_BATCH)) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("journal unreadable: {e}"))))
                            .await;
                        return;
                    }
                };
                if batch.is_empty() {
                    // Caught up: wait for the journal to grow (or the agent to stop).
                    tokio::select! {
                        r = journaled.changed() => if r.is_err() { return },
                        _ = tx.closed() => return,
                        _ = stopping.wait_for(|s| *s) => return stopped(next),
                    }
                    continue;
                }
                for (seq, line) in batch {
                    let sent = tokio::select! {
                        r = tx.send_timeout(Ok(event_pb(seq, line)), STALL) => r,
                        _ = stopping.wait_for(|s| *s) => return stopped(next),
                    };
                    match sent {
                        Ok(()) => next = seq + 1,
                        Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
                        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                            // Stalled: say where to resume once it reads again, and let it go.
                            let lagged = pb::WatchEvent {
                                kind: Some(watch_event::Kind::Lagged(pb::Lagged {
                                    resume_from_seq: next,
                                })),
                            };
                            tokio::select! {
                                _ = tx.send_timeout(Ok(lagged), 12 * STALL) => {}
                                _ = stopping.wait_for(|s| *s) => stopped(next),
                            }
                            return;
                        }
                    }
                }
            }
        });
        let last = futures_util::stream::once(last_word_rx)
            .filter_map(|r| std::future::ready(r.ok().map(Err)));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx).chain(last),
        )))
    }

    async fn trip_breaker(
        &self,
        req: Request<pb::BreakerAdminRequest>,
    ) -> Result<Response<pb::BreakerAdminResponse>, Status> {
        self.admin(req, true).await
    }

    async fn reset_breaker(
        &self,
        req: Request<pb::BreakerAdminRequest>,
    ) -> Result<Response<pb::BreakerAdminResponse>, Status> {
        self.admin(req, false).await
    }
}
