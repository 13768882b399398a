//! Upstream GOAWAY and REFUSED_STREAM: a call the upstream refused unprocessed is sent again
//! on another connection (the client never notices); a call it processed is never sent twice.
//!
//! The upstream is `tests/peers/h2py/h2_upstream.py` (Python `h2`), which refuses or
//! drops the first request it gets and echoes every other; the client is grpcio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use e2e::proxy::{AgentProxy, JsonChild, h2_upstream, python};
use serde_json::Value;

struct Run {
    calls: Vec<Value>,
    upstream: Vec<Value>,
    outcomes: Vec<Value>,
}

/// Three echo calls (5 B, 100 B, 20 kB) through the proxy to a refusing upstream in `mode`.
fn calls_through_refusing_upstream(mode: &str) -> Run {
    let (mut upstream, upstream_addr) = h2_upstream(mode);
    let proxy = AgentProxy::quick(&[upstream_addr]);
    let client = JsonChild::spawn(
        "raw_unary",
        &mut python("grpcpy/raw_unary.py", &[&proxy.addr.to_string()]),
    );
    let (status, lines, stderr) = client.finish(Duration::from_secs(30));
    assert!(status.success(), "client failed: {stderr}");
    let calls: Vec<Value> = lines.into_iter().filter(|l| l["event"] == "call").collect();
    assert_eq!(calls.len(), 3, "{calls:?}");
    let (status, proxy_lines, proxy_err) = proxy.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "agent run exited with {status}: {proxy_err}"
    );
    let outcomes = proxy_lines
        .into_iter()
        .filter(|l| l["kind"] == "stream")
        .collect();
    let upstream = upstream
        .drain()
        .iter()
        .filter(|l| l["event"] == "request")
        .cloned()
        .collect();
    Run {
        calls,
        upstream,
        outcomes,
    }
}

fn assert_all_echoed(run: &Run) {
    for c in &run.calls {
        assert_eq!(c["code"], "OK", "{c}");
        assert_eq!(c["echo_ok"], true, "{c}");
    }
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_stream_above_goaway_last_stream_id_is_retried_on_a_new_connection() {
    let run = calls_through_refusing_upstream("goaway");
    assert_all_echoed(&run);
    // The first call reached connection 1, which refused it; it then went to connection 2,
    // body and all.
    let first: Vec<&Value> = run
        .upstream
        .iter()
        .filter(|r| r["body_bytes"] == 10)
        .collect();
    assert_eq!(first.len(), 2, "{:?}", run.upstream);
    assert_eq!(
        (&first[0]["conn"], &first[0]["action"]),
        (&1.into(), &"goaway".into())
    );
    assert_eq!(
        (&first[1]["conn"], &first[1]["action"]),
        (&2.into(), &"answered".into())
    );
    assert_eq!(run.calls[0]["x_conn"], "2", "{:?}", run.calls);
    // Nothing is sent to a connection after its GOAWAY.
    assert!(
        run.upstream.iter().skip(1).all(|r| r["conn"] == 2),
        "{:?}",
        run.upstream
    );
    assert_eq!(run.outcomes[0]["retries"], 1, "{:?}", run.outcomes);
    assert!(run.outcomes[1..].iter().all(|o| o["retries"] == 0));
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_refused_stream_is_retried() {
    let run = calls_through_refusing_upstream("refused-stream");
    assert_all_echoed(&run);
    let first: Vec<&Value> = run
        .upstream
        .iter()
        .filter(|r| r["body_bytes"] == 10)
        .collect();
    assert_eq!(first.len(), 2, "{:?}", run.upstream);
    assert_eq!(first[0]["action"], "refused-stream");
    assert_eq!(first[1]["action"], "answered");
    assert_eq!(run.outcomes[0]["retries"], 1, "{:?}", run.outcomes);
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_processed_stream_is_never_sent_twice() {
    let run = calls_through_refusing_upstream("processed");
    // The first call was at or below the last-stream-id: the upstream had it, so the client
    // gets UNAVAILABLE rather than a second delivery.
    assert_eq!(run.calls[0]["code"], "UNAVAILABLE", "{:?}", run.calls);
    let first: Vec<&Value> = run
        .upstream
        .iter()
        .filter(|r| r["body_bytes"] == 10)
        .collect();
    assert_eq!(first.len(), 1, "sent twice: {:?}", run.upstream);
    assert_eq!(run.outcomes[0]["retries"], 0, "{:?}", run.outcomes);
    // The calls after it go to a new connection and succeed.
    for c in &run.calls[1..] {
        assert_eq!(
            (&c["code"], &c["echo_ok"]),
            (&"OK".into(), &true.into()),
            "{c}"
        );
    }
}
