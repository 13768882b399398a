//! The correlation stage: kernel signals joined to the proxy's own connections, streams and
//! upstream processes, and fed to the breakers.
//!
//! - A TCP reset is joined by its 4-tuple: our end of the connection, or (on this host, also
//!   across network namespaces) the mirror image, the peer's end. Both ends of one reset are
//!   two kernel events; the first acts, the second is only counted.
//! - An HTTP/2 frame is joined by its flow to a connection and by its stream id to a stream.
//! - A Go stop-the-world pause is joined by its pid to the endpoints that process serves: the
//!   owner of the socket at the far end of our connection to the endpoint ([`process`]).
//! - A rapid-reset pattern on a client connection is joined to the client key last seen on it.
//!
//! What each signal does is configured in `[signals]` ([`crate::config::signals::SignalsConfig`]): trip the
//! breaker, count as a failure, only annotate its next transition, or nothing.

pub mod evidence;
pub mod feed;
pub mod owners;
pub mod process;
pub mod table;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use serde::Serialize;
use serde_json::{Value, json};
use tracing::info;

use self::{
    evidence::{Board, Evidence, Target, wall_time},
    process::Owner,
    table::{Side, StreamTag, Tracked, TrackedConn},
};
use crate::{
    breaker::{
        circuit::SignalAction,
        config::Scope,
        registry::{Breakers, EndpointBreakers, Transition},
    },
    config::signals::{Parsed, SignalUse, SignalsConfig},
    signals::{
        GoStwPause, SignalKind, TcpReset,
        h2_frame::{FrameDetail, H2Frame},
        rapid_reset::{RapidReset, RapidResetDetector, RapidResetPolicy},
        tcp_reset::Direction,
    },
};

/// One kernel signal as the metrics count it: what, about which endpoint (when joined to the
/// proxy's upstream traffic), and a detail (a reset's direction, a frame's error).
#[derive(Clone, Debug)]
pub struct SignalRecord {
    pub kind: SignalKind,
    /// `cluster/address` of the upstream endpoint; None when not the proxy's upstream traffic.
    pub endpoint: Option<Arc<str>>,
    /// `sent`/`received` for a reset, the error name for a frame, `` otherwise.
    pub detail: &'static str,
    /// `upstream`, `agent`, `client`, or `` when not joined.
    pub by: &'static str,
    /// A Go process's name (go_stw).
    pub process: Option<Arc<str>>,
    /// A pause's length (go_stw).
    pub seconds: f64,
}

/// What the proxy and the correlation stage share: the connection table, the evidence board
/// and the processes found serving endpoints.
pub struct Joins {
    pub tracked: Tracked,
    pub board: Board,
    /// By endpoint breaker name (`cluster/address`).
    owners: Mutex<HashMap<String, Owner>>,
    pub stats: SignalStats,
}

impl Joins {
    pub fn new(tracking: bool) -> Self {
        Self {
            tracked: Tracked::new(tracking),
            board: Board::default(),
            owners: Mutex::default(),
            stats: SignalStats::default(),
        }
    }

    pub fn owner(&self, endpoint: &str) -> Option<Owner> {
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(endpoint)
            .cloned()
    }

    pub(super) fn set_owner(&self, endpoint: String, owner: Owner) {
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(endpoint, owner);
    }

    /// An endpoint left its cluster: the process that served it is no longer its.
    pub fn forget_owner(&self, endpoint: &str) {
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(endpoint);
    }

    /// Endpoints (breaker names) served by process `pid`.
    fn endpoints_of(&self, pid: u32) -> Vec<(String, Owner)> {
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, o)| o.pid == pid)
            .map(|(e, o)| (e.clone(), o.clone()))
            .collect()
    }
}

/// Per kind of signal: seen, joined to something of the proxy's, acted on (a breaker tripped
/// or counted), and duplicates (the second end of one reset).
#[derive(Debug, Default)]
pub struct SignalStats {
    pub tcp_resets: KindStats,
    pub rst_streams: KindStats,
    pub goaways: KindStats,
    pub stw_pauses: KindStats,
    pub rapid_resets: KindStats,
    /// Breaker transitions the signals caused.
    pub transitions: AtomicU64,
}

#[derive(Debug, Default)]
pub struct KindStats {
    pub seen: AtomicU64,
    pub joined: AtomicU64,
    pub acted: AtomicU64,
    pub duplicates: AtomicU64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct KindFigures {
    pub seen: u64,
    pub joined: u64,
    pub acted: u64,
    pub duplicates: u64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl KindStats {
    pub fn figures(&self) -> KindFigures {
        KindFigures {
            seen: self.seen.load(Ordering::Relaxed),
            joined: self.joined.load(Ordering::Relaxed),
            acted: self.acted.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
        }
    }
}

impl SignalStats {
    /// Each kind's counters, in [`SignalKind::ALL`] order.
    pub fn by_kind(&self) -> [(SignalKind, &KindStats); SignalKind::ALL.len()] {
        SignalKind::ALL.map(|kind| (kind, self.of(kind)))
    }

    pub fn of(&self, kind: SignalKind) -> &KindStats {
        match kind {
            SignalKind::TcpReset => &self.tcp_resets,
            SignalKind::RstStream => &self.rst_streams,
            SignalKind::Goaway => &self.goaways,
            SignalKind::GoStw => &self.stw_pauses,
            SignalKind::RapidReset => &self.rapid_resets,
        }
    }

    pub fn figures(&self) -> Value {
        let mut v: serde_json::Map<String, Value> = self
            .by_kind()
            .into_iter()
            .map(|(kind, k)| (kind.as_str().to_owned(), json!(k.figures())))
            .collect();
        v.insert(
            "transitions".into(),
            self.transitions.load(Ordering::Relaxed).into(),
        );
        Value::Object(v)
    }
}

/// A breaker transition joined to what the correlation stage knows about it: the stream a
/// signal hit, the evidence the board holds for the breaker, and the process serving its
/// endpoint. The events stage makes it a [`crate::events::BreakerEvent`].
#[derive(Clone, Debug)]
pub struct Joined {
    pub transition: Transition,
    pub stream: Option<Arc<StreamTag>>,
    /// `breaker_trip/v1` evidence objects, oldest first.
    pub evidence: Vec<Value>,
    pub upstream_owner: Option<Owner>,
}

impl Joins {
    /// Joins `transition` (of a call, the timer or a signal alike) to its evidence; the owner
    /// is the endpoint breaker's, else that of `endpoint` (`cluster/address`, the call's).
    pub fn join(
        &self,
        transition: Transition,
        stream: Option<Arc<StreamTag>>,
        endpoint: Option<&str>,
    ) -> Joined {
        let at = evidence::monotonic_ns();
        let evidence: Vec<Value> = self
            .board
            .recent(&transition.breaker, Instant::now())
            .iter()
            .map(|e| e.for_transition(at))
            .collect();
        let upstream_owner = (transition.breaker.scope == Scope::Endpoint)
            .then(|| self.owner(&transition.breaker.name))
            .flatten()
            .or_else(|| endpoint.and_then(|name| self.owner(name)));
        Joined {
            transition,
            stream,
            evidence,
            upstream_owner,
        }
    }
}

/// Where the correlation stage sends what it found: the publish bus
/// ([`crate::events::bus::Bus`]) in the agent.
pub trait Outlet: Send + Sync {
    /// A breaker changed state because of a kernel signal.
    fn transition(&self, joined: Joined);
    /// A kernel signal, for the metrics.
    fn signal(&self, record: SignalRecord);
}

/// What the correlation stage acts on and reports to.
#[derive(Clone)]
pub struct Targets {
    pub breakers: Arc<Breakers>,
    pub joins: Arc<Joins>,
    pub outlet: Arc<dyn Outlet>,
}

/// The correlation task's state.
pub struct Correlator {
    targets: Targets,
    config: SignalsConfig,
    parsed: Parsed,
    rapid_reset: RapidResetDetector,
    /// This agent's network namespace: a 4-tuple on loopback names a connection only there.
    own_netns: Option<u64>,
}

impl Correlator {
    pub fn new(targets: Targets, config: SignalsConfig, parsed: Parsed) -> Self {
        let rapid_reset = RapidResetDetector::new(RapidResetPolicy {
            max_resets_per_sec: config.rapid_reset_rate,
            cooldown_ns: 10_000_000_000,
        });
        let own_netns = std::fs::read_link("/proc/self/ns/net").ok().and_then(|l| {
            l.to_str()?
                .strip_prefix("net:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        });
        Self {
            targets,
            config,
            parsed,
            rapid_reset,
            own_netns,
        }
    }

    fn joins(&self) -> &Joins {
        &self.targets.joins
    }

    fn record(
        &self,
        kind: SignalKind,
        endpoint: Option<String>,
        detail: &'static str,
        by: &'static str,
    ) {
        self.targets.outlet.signal(SignalRecord {
            kind,
            endpoint: endpoint.map(Into::into),
            detail,
            by,
            process: None,
            seconds: 0.0,
        });
    }

    fn upstream_name(conn: &TrackedConn) -> Option<String> {
        match &conn.side {
            Side::Upstream { endpoint } => Some(endpoint.name.to_string()),
            Side::Downstream { .. } => None,
        }
    }

    /// The connection of ours a 4-tuple names, and whether the event was on our end of it.
    fn connection(
        &self,
        local: SocketAddr,
        remote: SocketAddr,
        netns: Option<u32>,
    ) -> Option<(Arc<TrackedConn>, bool)> {
        let t = &self.joins().tracked;
        let ours_ns = match (netns, self.own_netns) {
            (Some(a), Some(b)) => u64::from(a) == b,
            _ => true,
        };
        if ours_ns && let Some(c) = t.find(local, remote) {
            return Some((c, true));
        }
        // The peer's end: on loopback only in our own namespace (another namespace's loopback
        // is another host's).
        if remote.ip().is_loopback() && !ours_ns {
            return None;
        }
        t.find(remote, local).map(|c| (c, false))
    }

    pub fn tcp_reset(&mut self, r: &TcpReset) {
        let stats = &self.joins().stats.tcp_resets;
        bump(&stats.seen);
        let direction = match r.direction {
            Direction::Sent => "sent",
            Direction::Received => "received",
        };
        let Some((conn, our_end)) = self.connection(r.local, r.remote, r.netns) else {
            self.record(SignalKind::TcpReset, None, direction, "");
            return;
        };
        bump(&stats.joined);
        // Who reset the connection: our socket sent it, or the peer's did.
        let by_peer = match (our_end, r.direction) {
            (true, Direction::Received) | (false, Direction::Sent) => true,
            (true, Direction::Sent) | (false, Direction::Received) => false,
        };
        if !conn.first_reset() {
            bump(&stats.duplicates);
            return;
        }
        let by = match (&conn.side, by_peer) {
            (_, false) => "agent",
            (Side::Upstream { .. }, true) => "upstream",
            (Side::Downstream { .. }, true) => "client",
        };
        self.record(
            SignalKind::TcpReset,
            Self::upstream_name(&conn),
            direction,
            by,
        );
        let mut json = json!({
            "kind": SignalKind::TcpReset.as_str(),
            "at": wall_time(r.ktime_ns),
            "ktime_ns": r.ktime_ns,
            "by": by,
            "direction": r.direction,
            "seen_on": if our_end { "agent_socket" } else { "peer_socket" },
            "local": conn.local.to_string(),
            "peer": conn.peer.to_string(),
            "state": r.state,
            "netns": r.netns,
        });
        if let Some(reason) = &r.reason {
            json["kernel_reason"] = reason.as_str().into();
        }
        if let Some(t) = &r.task {
            json["pid"] = t.pid.into();
            json["comm"] = t.comm.as_str().into();
        }
        let affected = conn.affected_stream();
        if let Some(s) = &affected {
            json["stream"] = stream_json(s);
        }
        let ev = Evidence {
            ktime_ns: r.ktime_ns,
            json,
        };
        match &conn.side {
            Side::Upstream { endpoint } if by_peer => {
                let used = self.config.upstream_tcp_reset;
                if self.endpoint_signal(endpoint, SignalKind::TcpReset, used, ev, affected) {
                    bump(&stats.acted);
                }
            }
            // Resets by the agent, and by clients, are evidence only (of the endpoint, or of
            // the client's key).
            Side::Upstream { endpoint } => {
                self.annotate(Scope::Endpoint, endpoint.name.to_string(), ev);
            }
            Side::Downstream { .. } => {
                if let Some(key) = conn.client_key() {
                    self.annotate(Scope::Client, key.to_string(), ev);
                }
            }
        }
    }

    pub fn h2_frame(&mut self, f: &H2Frame) {
        if let Some(signal) = self.rapid_reset.observe(f) {
            self.rapid_reset_seen(&signal);
        }
        let (kind, error) = match &f.detail {
            FrameDetail::RstStream { error, .. } => (SignalKind::RstStream, *error),
            FrameDetail::GoAway { error, .. } => (SignalKind::Goaway, *error),
            _ => return,
        };
        let stats = self.joins().stats.of(kind);
        let is_rst = kind == SignalKind::RstStream;
        bump(&stats.seen);
        // Only frames an upstream sent us: find our end as the receiver.
        let Some(conn) = self.joins().tracked.find(f.flow.dst, f.flow.src) else {
            self.record(kind, None, error, "");
            return;
        };
        let Side::Upstream { endpoint } = &conn.side else {
            self.record(kind, None, error, "client");
            return;
        };
        self.record(kind, Some(endpoint.name.to_string()), error, "upstream");
        bump(&stats.joined);
        let (kind, used, json) = match &f.detail {
            FrameDetail::RstStream { error_code, error } => {
                // An ordinary end, a cancellation, a refusal the proxy retries: counted, not
                // evidence (grpc-go ends many streams with RST_STREAM NO_ERROR, which would
                // crowd real evidence off the board).
                if matches!(*error_code, 0 | 7 | 8) {
                    return;
                }
                let used = self.config.upstream_rst_stream;
                (
                    SignalKind::RstStream,
                    used,
                    json!({"stream_id": f.stream_id, "error_code": error_code, "error": error}),
                )
            }
            FrameDetail::GoAway {
                last_stream_id,
                error_code,
                error,
            } => {
                let used = if *error_code == 0 {
                    SignalUse::Annotate
                } else {
                    self.config.upstream_goaway
                };
                (
                    SignalKind::Goaway,
                    used,
                    json!({"last_stream_id": last_stream_id, "error_code": error_code, "error": error}),
                )
            }
            _ => return,
        };
        let mut json = json;
        json["kind"] = kind.as_str().into();
        json["at"] = wall_time(f.ktime_ns).into();
        json["ktime_ns"] = f.ktime_ns.into();
        json["by"] = "upstream".into();
        json["local"] = conn.local.to_string().into();
        json["peer"] = conn.peer.to_string().into();
        let stream = if is_rst {
            conn.find_stream(f.stream_id)
        } else {
            conn.affected_stream()
        };
        if let Some(s) = &stream {
            json["stream"] = stream_json(s);
        }
        let ev = Evidence {
            ktime_ns: f.ktime_ns,
            json,
        };
        if self.endpoint_signal(endpoint, kind, used, ev, stream) {
            bump(&stats.acted);
        }
    }

    fn rapid_reset_seen(&mut self, r: &RapidReset) {
        let stats = &self.joins().stats.rapid_resets;
        bump(&stats.seen);
        // The client sent the resets: our end is the receiver.
        let conn = self
            .joins()
            .tracked
            .find(r.flow.dst, r.flow.src)
            .filter(|c| matches!(c.side, Side::Downstream { .. }));
        self.record(
            SignalKind::RapidReset,
            None,
            if conn.is_some() { "proxy" } else { "other" },
            "client",
        );
        let Some(conn) = conn else {
            return;
        };
        bump(&stats.joined);
        let json = json!({
            "kind": SignalKind::RapidReset.as_str(),
            "at": wall_time(r.ktime_ns),
            "ktime_ns": r.ktime_ns,
            "by": "client",
            "client": r.flow.src.to_string(),
            "local": r.flow.dst.to_string(),
            "resets_last_second": r.resets_last_second,
            "resets_total": r.resets_total,
            "max_resets_per_sec": r.max_resets_per_sec,
        });
        let ev = Evidence {
            ktime_ns: r.ktime_ns,
            json,
        };
        let Some(key) = conn.client_key() else {
            // Nothing to key a breaker by: no verified subject, no session on its streams.
            info!(client = %r.flow.src, resets_last_second = r.resets_last_second, "rapid reset from a client without a client key: not tripped");
            return;
        };
        let action = match self.config.rapid_reset {
            SignalUse::Trip => SignalAction::Trip,
            SignalUse::Count => SignalAction::CountFailure,
            SignalUse::Annotate => {
                self.annotate(Scope::Client, key.to_string(), ev);
                return;
            }
            SignalUse::Off => return,
        };
        let now = Instant::now();
        self.joins().board.add(
            Target {
                scope: Scope::Client,
                name: key.to_string(),
            },
            ev,
            now,
        );
        let mut out = Vec::new();
        self.targets
            .breakers
            .signal_client(&key, SignalKind::RapidReset, action, now, &mut out);
        bump(&stats.acted);
        let stream = conn.affected_stream();
        self.publish_all(out, stream);
    }

    pub fn go_stw(&mut self, p: &GoStwPause) {
        let stats = &self.joins().stats.stw_pauses;
        bump(&stats.seen);
        let served = self.joins().endpoints_of(p.pid);
        let view = p.view(p.cookie.go_minor);
        self.targets.outlet.signal(SignalRecord {
            kind: SignalKind::GoStw,
            endpoint: served.first().map(|(name, _)| name.as_str().into()),
            detail: "",
            by: "",
            process: Some(p.comm.as_str().into()),
            seconds: view.duration_ns as f64 / 1e9,
        });
        if served.is_empty() {
            return;
        }
        bump(&stats.joined);
        let long = view.duration_ns
            >= u64::try_from(self.parsed.stw_threshold.as_nanos()).unwrap_or(u64::MAX);
        let used = if long {
            self.config.upstream_stw
        } else {
            SignalUse::Off
        };
        if used == SignalUse::Off {
            return;
        }
        for (name, owner) in served {
            let json = json!({
                "kind": SignalKind::GoStw.as_str(),
                "at": wall_time(p.stop_ns),
                "ktime_ns": p.stop_ns,
                "by": "upstream",
                "pid": p.pid,
                "comm": p.comm,
                "netns": owner.netns,
                "duration_us": view.duration_ns / 1000,
                "world_stopped_us": view.world_stopped_ns / 1000,
                "threshold_us": self.parsed.stw_threshold.as_micros() as u64,
                "reason": view.reason,
            });
            let ev = Evidence {
                ktime_ns: p.stop_ns,
                json,
            };
            let Some(endpoint) = self.targets.breakers.endpoint_named(&name) else {
                continue;
            };
            if self.endpoint_signal(&endpoint, SignalKind::GoStw, used, ev, None) {
                bump(&stats.acted);
            }
        }
    }

    fn annotate(&self, scope: Scope, name: String, ev: Evidence) {
        self.joins()
            .board
            .add(Target { scope, name }, ev, Instant::now());
    }

    /// Files the evidence and applies the signal to the endpoint's breakers; true when it
    /// tripped or counted.
    fn endpoint_signal(
        &self,
        endpoint: &EndpointBreakers,
        kind: SignalKind,
        used: SignalUse,
        ev: Evidence,
        stream: Option<Arc<StreamTag>>,
    ) -> bool {
        let name = endpoint.name.to_string();
        let now = Instant::now();
        self.joins().board.add(
            Target {
                scope: Scope::Endpoint,
                name,
            },
            ev,
            now,
        );
        let action = match used {
            SignalUse::Trip => SignalAction::Trip,
            SignalUse::Count => SignalAction::CountFailure,
            SignalUse::Annotate | SignalUse::Off => return false,
        };
        let mut out = Vec::new();
        self.targets
            .breakers
            .signal_endpoint(endpoint, kind, action, now, &mut out);
        self.publish_all(out, stream);
        true
    }

    fn publish_all(&self, transitions: Vec<Transition>, stream: Option<Arc<StreamTag>>) {
        for t in transitions {
            info!(breaker = %t.breaker, from = t.change.from.as_str(), to = t.change.to.as_str(), reason = %t.change.reason, "breaker (kernel signal)");
            self.joins()
                .stats
                .transitions
                .fetch_add(1, Ordering::Relaxed);
            let joined = self.joins().join(t, stream.clone(), None);
            self.targets.outlet.transition(joined);
        }
    }

    /// Periodic work: forget old connections and evidence. (The processes serving endpoints
    /// are looked up by [`owners::OwnerLookup`], on a task of its own.)
    pub fn sweep(&self) {
        let now = Instant::now();
        self.joins().tracked.sweep(now);
        self.joins().board.sweep(now);
    }
}

/// What a stream tag says, as evidence and in the trip event's `stream`.
pub fn stream_json(s: &StreamTag) -> Value {
    let mut v = json!({"method": s.method, "client": s.client.to_string()});
    if let Some(t) = &s.context.trace_id {
        v["trace_id"] = t.as_str().into();
    }
    if let Some(t) = &s.context.session_id {
        v["session_id"] = t.as_str().into();
    }
    if let Some(to) = s.original_destination {
        v["intercepted"] = true.into();
        v["original_destination"] = to.to_string().into();
    }
    v
}

#[cfg(test)]
mod tests;
