//! The correlator with real breakers and a real connection table (no proxy: the stage needs
//! none) and decoded signals made by hand: which signal acts on which breaker, and how.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::VecDeque, net::SocketAddr};

use super::*;
use crate::{
    breaker::{config::BreakerConfig, registry::ClusterShape},
    context::RequestContext,
    signals::h2_frame::Flow,
};

const UP: &str = "10.9.0.1:50051";

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What the correlator published, oldest first.
#[derive(Default)]
struct Recorder {
    transitions: Mutex<VecDeque<Joined>>,
}

impl Outlet for Recorder {
    fn transition(&self, joined: Joined) {
        self.transitions.lock().unwrap().push_back(joined);
    }

    fn signal(&self, _: SignalRecord) {}
}

impl Recorder {
    fn try_recv(&self) -> Result<Joined, ()> {
        self.transitions.lock().unwrap().pop_front().ok_or(())
    }
}

/// One cluster, `upstream`, of two endpoints (the first is `UP`), as `--upstream` makes it.
fn setup(signals: SignalsConfig) -> (Targets, Arc<Recorder>, Correlator) {
    let parsed = signals.check().unwrap();
    let breakers = Breakers::new(
        BreakerConfig::default(),
        &[ClusterShape {
            name: "upstream",
            subsets: &[],
            endpoints_only: false,
        }],
        Instant::now(),
    );
    for e in [UP, "10.9.0.2:50051"] {
        breakers.endpoint(0, e, 0);
    }
    let recorder = Arc::new(Recorder::default());
    let targets = Targets {
        breakers: Arc::new(breakers),
        joins: Arc::new(Joins::new(true)),
        outlet: recorder.clone(),
    };
    let c = Correlator::new(targets.clone(), signals, parsed);
    (targets, recorder, c)
}

fn reset(direction: Direction, local: &str, remote: &str) -> TcpReset {
    TcpReset {
        ktime_ns: evidence::monotonic_ns(),
        direction,
        local: a(local),
        remote: a(remote),
        state: Some("ESTABLISHED"),
        reason: None,
        task: None,
        netns: None,
        cgroup_id: None,
        sock_cookie: None,
    }
}

fn frame(src: &str, dst: &str, stream_id: u32, detail: FrameDetail) -> H2Frame {
    let type_id = match detail {
        FrameDetail::RstStream { .. } => 3,
        FrameDetail::GoAway { .. } => 7,
        _ => 0,
    };
    H2Frame {
        ktime_ns: evidence::monotonic_ns(),
        flow: Flow {
            src: a(src),
            dst: a(dst),
        },
        direction: "ingress",
        hook: "cgroup",
        sender: Some("server"),
        frame_type: "",
        type_id,
        flags: 0,
        length: 8,
        stream_id,
        detail,
        cgroup_id: None,
    }
}

/// The breakers of endpoint `UP`.
fn up(shared: &Targets) -> Arc<crate::breaker::registry::EndpointBreakers> {
    shared
        .breakers
        .endpoint_named(&format!("upstream/{UP}"))
        .unwrap()
}

fn state(shared: &Targets, endpoint: &str) -> String {
    let s = shared.breakers.snapshot(Instant::now());
    let b = s
        .iter()
        .find(|b| b.id.scope == Scope::Endpoint && b.id.name == format!("upstream/{endpoint}"))
        .unwrap();
    serde_json::to_value(&b.figures).unwrap()["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn both_ends_of_one_upstream_reset_trip_its_endpoint_once_with_the_stream() {
    let (shared, events, mut c) = setup(SignalsConfig::default());
    let conn = shared
        .joins
        .tracked
        .connection(
            Side::Upstream {
                endpoint: up(&shared),
            },
            a("10.0.0.5:40000"),
            a(UP),
        )
        .unwrap();
    let _s = conn.conn.stream(
        3,
        Arc::new(StreamTag {
            method: "/a.B/C".into(),
            client: a("127.0.0.1:5000"),
            context: RequestContext {
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
                ..RequestContext::default()
            },
            client_key: None,
            original_destination: None,
        }),
    );
    // The peer's socket sent it (seen from the mirror), then ours received it.
    c.tcp_reset(&reset(Direction::Sent, UP, "10.0.0.5:40000"));
    c.tcp_reset(&reset(Direction::Received, "10.0.0.5:40000", UP));
    assert_eq!(state(&shared, UP), "open");
    let e = events.try_recv().unwrap();
    assert_eq!(e.transition.change.reason.to_string(), "tcp_reset");
    assert_eq!(e.evidence.len(), 1);
    assert_eq!(e.evidence[0]["by"], "upstream");
    assert_eq!(e.evidence[0]["seen_on"], "peer_socket");
    assert_eq!(
        e.stream.as_ref().unwrap().context.trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert!(events.try_recv().is_err(), "one transition");
    let f = shared.joins.stats.tcp_resets.figures();
    assert_eq!((f.seen, f.joined, f.acted, f.duplicates), (2, 2, 1, 1));
    // The other endpoint is untouched; a reset of somebody else's connection joins nothing.
    assert_eq!(state(&shared, "10.9.0.2:50051"), "closed");
    c.tcp_reset(&reset(Direction::Received, "10.0.0.5:40001", UP));
    assert_eq!(shared.joins.stats.tcp_resets.figures().joined, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_the_agent_sent_is_evidence_only() {
    let (shared, _, mut c) = setup(SignalsConfig::default());
    let _conn = shared.joins.tracked.connection(
        Side::Upstream {
            endpoint: up(&shared),
        },
        a("10.0.0.5:40000"),
        a(UP),
    );
    c.tcp_reset(&reset(Direction::Sent, "10.0.0.5:40000", UP));
    assert_eq!(state(&shared, UP), "closed");
    assert_eq!(shared.joins.stats.tcp_resets.figures().acted, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn goaway_with_an_error_counts_and_rst_stream_annotates_as_configured() {
    let signals = SignalsConfig {
        upstream_goaway: SignalUse::Trip,
        ..SignalsConfig::default()
    };
    let (shared, _, mut c) = setup(signals);
    let _conn = shared.joins.tracked.connection(
        Side::Upstream {
            endpoint: up(&shared),
        },
        a("10.0.0.5:40000"),
        a(UP),
    );
    let (local, up) = ("10.0.0.5:40000", UP);
    // A graceful GOAWAY is a drain, not a fault.
    c.h2_frame(&frame(
        up,
        local,
        0,
        FrameDetail::GoAway {
            last_stream_id: 7,
            error_code: 0,
            error: "NO_ERROR",
        },
    ));
    // RST_STREAM(INTERNAL_ERROR): annotated by default.
    c.h2_frame(&frame(
        up,
        local,
        5,
        FrameDetail::RstStream {
            error_code: 2,
            error: "INTERNAL_ERROR",
        },
    ));
    assert_eq!(state(&shared, UP), "closed");
    c.h2_frame(&frame(
        up,
        local,
        0,
        FrameDetail::GoAway {
            last_stream_id: 7,
            error_code: 11,
            error: "ENHANCE_YOUR_CALM",
        },
    ));
    assert_eq!(state(&shared, UP), "open");
    // The transition carries all three, oldest first.
    let id = shared
        .breakers
        .snapshot(Instant::now())
        .into_iter()
        .find(|b| b.id.name == format!("upstream/{UP}"))
        .unwrap()
        .id;
    let kinds: Vec<String> = shared
        .joins
        .board
        .recent(&id, Instant::now())
        .iter()
        .map(|e| e.json["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["goaway", "rst_stream", "goaway"]);
    // Frames the agent sent (egress from our end) are not the upstream's.
    let g = &shared.joins.stats.goaways.figures();
    assert_eq!((g.seen, g.joined, g.acted), (2, 2, 1));
    c.h2_frame(&frame(
        local,
        up,
        0,
        FrameDetail::GoAway {
            last_stream_id: 0,
            error_code: 2,
            error: "INTERNAL_ERROR",
        },
    ));
    assert_eq!(shared.joins.stats.goaways.figures().joined, 2);
}
