//! The proxy's own connections and streams, under the keys the kernel reports them by: a
//! connection by its 4-tuple (this host's address and port, the peer's), a stream by its
//! HTTP/2 stream id on that connection.
//!
//! The proxy registers what it opens and accepts; the correlation stage looks kernel signals up
//! here. A closed connection lingers for [`LINGER`], and each connection remembers the last
//! stream that ended on it, because the kernel's account of a reset can reach the agent after
//! the proxy has already seen the connection die and let its streams go.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{breaker::registry::EndpointBreakers, context::RequestContext};

/// How long a closed connection can still be joined to a late kernel signal.
pub const LINGER: Duration = Duration::from_secs(5);

/// Lock shards of the connection table (connections open and close on many threads).
const SHARDS: usize = 16;

/// Which side of the proxy a connection is on.
#[derive(Clone, Debug)]
pub enum Side {
    /// A client's connection to one of our listeners.
    Downstream { listener: Arc<str> },
    /// Our connection to an upstream endpoint: its breakers, which also name it.
    Upstream { endpoint: Arc<EndpointBreakers> },
}

impl PartialEq for Side {
    fn eq(&self, other: &Side) -> bool {
        match (self, other) {
            (Side::Downstream { listener: a }, Side::Downstream { listener: b }) => a == b,
            (Side::Upstream { endpoint: a }, Side::Upstream { endpoint: b }) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// What the correlation stage needs to know of a stream: whose it was and what it carried.
#[derive(Debug)]
pub struct StreamTag {
    pub method: String,
    /// The client's address (of the downstream connection).
    pub client: SocketAddr,
    pub context: RequestContext,
    pub client_key: Option<String>,
    /// Where the application dialed, when its connection was intercepted.
    pub original_destination: Option<SocketAddr>,
}

pub struct TrackedConn {
    pub side: Side,
    /// This host's end.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    inner: Mutex<Streams>,
    /// A signal already acted on this connection's death (the two ends of one reset on the
    /// same host are two kernel events).
    reset_seen: AtomicBool,
    /// The process serving the peer end was looked for (upstream connections).
    pub(super) owner_looked_up: AtomicBool,
}

#[derive(Default)]
struct Streams {
    live: HashMap<u32, Arc<StreamTag>, foldhash::fast::RandomState>,
    last_ended: Option<(u32, Arc<StreamTag>)>,
    /// The latest client key seen on a downstream connection.
    client_key: Option<Arc<str>>,
    closed_at: Option<Instant>,
}

impl TrackedConn {
    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers stream `id`; the guard lets it go when the stream ends.
    pub fn stream(self: &Arc<Self>, id: u32, tag: Arc<StreamTag>) -> StreamGuard {
        let mut s = self.lock();
        if let Some(k) = tag.client_key.as_deref()
            && s.client_key.as_deref() != Some(k)
        {
            s.client_key = Some(k.into());
        }
        s.live.insert(id, tag);
        StreamGuard {
            conn: self.clone(),
            id,
        }
    }

    /// Stream `id`, live or the last one that ended.
    pub fn find_stream(&self, id: u32) -> Option<Arc<StreamTag>> {
        let s = self.lock();
        s.live.get(&id).cloned().or_else(|| {
            s.last_ended
                .as_ref()
                .filter(|(last, _)| *last == id)
                .map(|(_, t)| t.clone())
        })
    }

    /// A stream the connection's death hit: a live one (the oldest id), else the last that
    /// ended.
    pub fn affected_stream(&self) -> Option<Arc<StreamTag>> {
        let s = self.lock();
        s.live
            .iter()
            .min_by_key(|(id, _)| **id)
            .map(|(_, t)| t.clone())
            .or_else(|| s.last_ended.as_ref().map(|(_, t)| t.clone()))
    }

    pub fn live_streams(&self) -> usize {
        self.lock().live.len()
    }

    /// The client key last seen on this (downstream) connection.
    pub fn client_key(&self) -> Option<Arc<str>> {
        self.lock().client_key.clone()
    }

    /// True the first time: whether this signal is the first about the connection's reset.
    pub fn first_reset(&self) -> bool {
        !self.reset_seen.swap(true, Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn closed(&self) -> bool {
        self.lock().closed_at.is_some()
    }
}

/// Drops the stream from its connection's live set.
pub struct StreamGuard {
    conn: Arc<TrackedConn>,
    id: u32,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut s = self.conn.lock();
        if let Some(tag) = s.live.remove(&self.id) {
            s.last_ended = Some((self.id, tag));
        }
    }
}

/// Marks the connection closed (it lingers for [`LINGER`]) when the proxy lets it go.
pub struct ConnGuard {
    pub conn: Arc<TrackedConn>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.conn.lock().closed_at = Some(Instant::now());
    }
}

type Key = (SocketAddr, SocketAddr);

/// Every connection the proxy holds (and those closed in the last [`LINGER`]).
pub struct Tracked {
    enabled: bool,
    shards: Vec<Mutex<HashMap<Key, Arc<TrackedConn>>>>,
    hasher: foldhash::fast::FixedState,
    pub registered: AtomicU64,
    /// Poked when an upstream connection opens: its serving process is looked for at once.
    pub upstream_opened: tokio::sync::Notify,
}

impl Tracked {
    /// A table; when not `enabled` (no kernel signals to join) nothing is registered.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: foldhash::fast::FixedState::default(),
            registered: AtomicU64::new(0),
            upstream_opened: tokio::sync::Notify::new(),
        }
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, HashMap<Key, Arc<TrackedConn>>> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection the proxy opened or accepted; None when tracking is off.
    pub fn connection(&self, side: Side, local: SocketAddr, peer: SocketAddr) -> Option<ConnGuard> {
        if !self.enabled {
            return None;
        }
        let (local, peer) = (canonical(local), canonical(peer));
        let conn = Arc::new(TrackedConn {
            side,
            local,
            peer,
            inner: Mutex::default(),
            reset_seen: AtomicBool::new(false),
            owner_looked_up: AtomicBool::new(false),
        });
        // A port reused within LINGER replaces the old connection: the new one is live.
        self.shard(&(local, peer))
            .insert((local, peer), conn.clone());
        self.registered.fetch_add(1, Ordering::Relaxed);
        if matches!(conn.side, Side::Upstream { .. }) {
            self.upstream_opened.notify_one();
        }
        Some(ConnGuard { conn })
    }

    /// Our connection whose ends are `local` (this host) and `peer`.
    pub fn find(&self, local: SocketAddr, peer: SocketAddr) -> Option<Arc<TrackedConn>> {
        let key = (canonical(local), canonical(peer));
        self.shard(&key).get(&key).cloned()
    }

    /// Forgets connections closed more than [`LINGER`] ago.
    pub fn sweep(&self, now: Instant) {
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            map.retain(|_, c| {
                c.lock()
                    .closed_at
                    .is_none_or(|t| now.saturating_duration_since(t) < LINGER)
            });
        }
    }

    /// Connections held (open or lingering), and live streams on them.
    pub fn counts(&self) -> (usize, usize) {
        let mut conns = 0;
        let mut streams = 0;
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            conns += map.len();
            streams += map.values().map(|c| c.live_streams()).sum::<usize>();
        }
        (conns, streams)
    }

    /// Open upstream connections whose serving process was not looked for yet.
    pub fn upstreams_to_look_up(&self) -> Vec<Arc<TrackedConn>> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let map = shard.lock().unwrap_or_else(PoisonError::into_inner);
            out.extend(
                map.values()
                    .filter(|c| {
                        matches!(c.side, Side::Upstream { .. })
                            && !c.owner_looked_up.load(Ordering::Relaxed)
                    })
                    .cloned(),
            );
        }
        out
    }
}

/// IPv4 addresses as IPv4, also when a dual-stack socket reports them v4-mapped.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn test_endpoint() -> Arc<EndpointBreakers> {
        let b = crate::breaker::registry::Breakers::new(
            crate::breaker::config::BreakerConfig::default(),
            &[crate::breaker::registry::ClusterShape {
                name: "c",
                subsets: &[],
                endpoints_only: false,
            }],
            Instant::now(),
        );
        b.endpoint(0, "10.0.0.1:1", 0)
    }

    fn tag(method: &str) -> Arc<StreamTag> {
        Arc::new(StreamTag {
            method: method.into(),
            client: addr("127.0.0.1:1"),
            context: RequestContext::default(),
            client_key: Some("session:s1".into()),
            original_destination: None,
        })
    }

    #[test]
    fn connections_are_found_by_their_four_tuple_also_v4_mapped() {
        let t = Tracked::new(true);
        let up = Side::Upstream {
            endpoint: test_endpoint(),
        };
        let g = t.connection(up.clone(), addr("127.0.0.1:4000"), addr("127.0.0.1:50051"));
        assert!(g.is_some());
        let found = t.find(addr("[::ffff:127.0.0.1]:4000"), addr("127.0.0.1:50051"));
        assert_eq!(found.map(|c| c.side.clone()), Some(up));
        // The mirror image is the peer's socket, not ours.
        assert!(
            t.find(addr("127.0.0.1:50051"), addr("127.0.0.1:4000"))
                .is_none()
        );
    }

    #[test]
    fn a_closed_connection_lingers_then_goes() {
        let t = Tracked::new(true);
        let g = t.connection(
            Side::Downstream {
                listener: "l".into(),
            },
            addr("127.0.0.1:8080"),
            addr("127.0.0.1:5555"),
        );
        drop(g);
        let now = Instant::now();
        t.sweep(now);
        let c = t.find(addr("127.0.0.1:8080"), addr("127.0.0.1:5555"));
        assert!(c.as_ref().is_some_and(|c| c.closed()));
        t.sweep(now + LINGER + Duration::from_millis(1));
        assert!(
            t.find(addr("127.0.0.1:8080"), addr("127.0.0.1:5555"))
                .is_none()
        );
    }

    #[test]
    fn streams_are_joined_by_id_and_the_last_ended_one_is_remembered() {
        let t = Tracked::new(true);
        let Some(g) = t.connection(
            Side::Downstream {
                listener: "l".into(),
            },
            addr("127.0.0.1:8080"),
            addr("127.0.0.1:5555"),
        ) else {
            panic!("tracking is on")
        };
        let s1 = g.conn.stream(1, tag("/a"));
        let s3 = g.conn.stream(3, tag("/b"));
        assert_eq!(
            g.conn.find_stream(3).map(|t| t.method.clone()),
            Some("/b".into())
        );
        assert_eq!(
            g.conn.affected_stream().map(|t| t.method.clone()),
            Some("/a".into())
        );
        assert_eq!(g.conn.client_key().as_deref(), Some("session:s1"));
        drop(s1);
        drop(s3);
        assert_eq!(g.conn.live_streams(), 0);
        assert!(g.conn.find_stream(1).is_none());
        assert_eq!(
            g.conn.find_stream(3).map(|t| t.method.clone()),
            Some("/b".into())
        );
        assert_eq!(
            g.conn.affected_stream().map(|t| t.method.clone()),
            Some("/b".into())
        );
        assert!(g.conn.first_reset());
        assert!(!g.conn.first_reset());
    }

    #[test]
    fn nothing_is_registered_when_tracking_is_off() {
        let t = Tracked::new(false);
        assert!(
            t.connection(
                Side::Upstream {
                    endpoint: test_endpoint()
                },
                addr("127.0.0.1:1"),
                addr("127.0.0.1:2")
            )
            .is_none()
        );
        assert_eq!(t.counts(), (0, 0));
    }
}
