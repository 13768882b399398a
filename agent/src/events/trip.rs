//! The breaker-trip event, schema `breaker_trip/v1`: one per breaker transition (a trip is
//! `to: "open"`; the others, half-open and closed, are journaled alike so that a reader sees
//! every state a breaker went through). Fields (absent when unknown):
//!
//! | field | meaning |
//! |---|---|
//! | `schema` | `"breaker_trip/v1"` |
//! | `seq` | the journal's sequence number (contiguous; added by the journal) |
//! | `ts` | when the transition was published, RFC 3339 UTC with milliseconds |
//! | `breaker.name` | `endpoint orders/10.0.0.7:50051`, `client sub:user-1`, ... (as the API names it) |
//! | `breaker.scope` | `endpoint`, `subset`, `cluster`, `method` or `client` |
//! | `breaker.class` | the priority class, when not the default one |
//! | `breaker.from`, `breaker.to` | `closed`, `open`, `half_open` |
//! | `breaker.reason` | `consecutive_failures`, `failure_ratio`, `slow_call_ratio`, `open_elapsed`, `probe_failed`, `probes_succeeded`, `admin`, or a signal (`tcp_reset`, ...) |
//! | `breaker.open_for_ms` | when `to` is `open`: for how long |
//! | `breaker.generation` | the breaker's count of changes: its events in order (the journal puts a batch's events of one breaker in this order; across batches, two changes made on two threads at once may be journaled the other way round) |
//! | `window` | the breaker's window then: `calls`, `failures`, `slow` |
//! | `consecutive_failures` | failures in a row then |
//! | `upstream.cluster`, `upstream.endpoint` | what the breaker guards, or where the triggering call went |
//! | `upstream.pid`, `upstream.comm`, `upstream.netns` | the process serving that endpoint, when it runs on this host (found by the owner of the socket at the far end of the proxy's connection, in any network namespace) |
//! | `stream` | the call whose result made the change: `method`, `grpc_status`, `http_status`, `ending`, `trace_id`, `span_id`, `session_id`, `client` (address), `latency_us`, `error` (what went wrong when the proxy answered, or a try failed before an upstream took it: a refused connect, a TLS handshake's reason), and for an intercepted connection `intercepted: true` and `original_destination` (what the application dialed); for a change a kernel signal made, the stream the signal hit (`in_flight: true` and no status when it had not ended) |
//! | `jwt_claims` | that call's allowlisted claims, with `verified` and `expired` (never the token) |
//! | `evidence` | kernel signals about what the breaker guards in the last 30 s, oldest first (below) |
//!
//! Each `evidence` entry has `kind` (`tcp_reset`, `rst_stream`, `goaway`, `go_stw`,
//! `rapid_reset`), `at` (the kernel's timestamp as wall time), `ktime_ns` (CLOCK_MONOTONIC),
//! `kernel_to_transition_us` (from the kernel event to this transition), `by` (`upstream`,
//! `client` or `agent`: who sent the reset or frame, or paused), and by kind:
//!
//! - `tcp_reset`: `direction` (`sent`/`received` by the socket it was `seen_on`:
//!   `agent_socket` or `peer_socket`), `local` and `peer` (the proxy's connection), `state`,
//!   `netns`, `kernel_reason` (why the kernel sent it), `pid`/`comm` (when the kernel ran in the
//!   sending task), `stream` (method, client, trace and session of a stream on it).
//! - `rst_stream`: `stream_id`, `error_code`, `error`, `local`, `peer`, `stream`.
//! - `goaway`: `last_stream_id`, `error_code`, `error`, `local`, `peer`.
//! - `go_stw`: `pid`, `comm`, `netns`, `duration_us` (as the Go runtime accounts it),
//!   `world_stopped_us`, `threshold_us`, `reason`.
//! - `rapid_reset`: `client`, `local`, `resets_last_second`, `resets_total`,
//!   `max_resets_per_sec`.

use std::time::SystemTime;

use serde_json::{Value, json};

use super::BreakerEvent;
use crate::breaker::config::Scope;

pub const SCHEMA: &str = "breaker_trip/v1";

/// The event for one transition, without `seq` (the journal adds it).
pub fn breaker_trip(e: &BreakerEvent, at: SystemTime) -> Value {
    let t = &e.transition;
    let c = &t.change;
    let id = &t.breaker;
    let mut breaker = json!({
        "name": id.to_string(),
        "scope": id.scope,
        "from": c.from,
        "to": c.to,
        "reason": c.reason,
        "generation": c.generation,
    });
    if let Some(class) = &id.class {
        breaker["class"] = class.as_str().into();
    }
    if let Some(d) = c.open_for {
        breaker["open_for_ms"] = (d.as_millis() as u64).into();
    }
    let mut event = json!({
        "schema": SCHEMA,
        "ts": humantime::format_rfc3339_millis(at).to_string(),
        "breaker": breaker,
        "window": c.counts,
        "consecutive_failures": c.consecutive_failures,
        "evidence": e.evidence,
    });
    // What the breaker guards: its own name says it for endpoint and subset breakers.
    let mut upstream = serde_json::Map::new();
    if id.scope == Scope::Endpoint
        && let Some((cluster, endpoint)) = id.name.split_once('/')
    {
        upstream.insert("cluster".into(), cluster.into());
        upstream.insert("endpoint".into(), endpoint.into());
    }
    if let Some(o) = &e.trigger {
        if let Some(cluster) = &o.cluster {
            upstream.entry("cluster").or_insert(cluster.as_str().into());
        }
        if let Some(endpoint) = &o.endpoint {
            upstream
                .entry("endpoint")
                .or_insert(endpoint.as_str().into());
        }
        let mut stream = json!({
            "method": o.method,
            "ending": o.ending,
            "client": o.client.to_string(),
            "latency_us": o.latency.as_micros() as u64,
        });
        let optional = [
            ("grpc_status", o.grpc_status.map(Value::from)),
            ("http_status", o.http_status.map(Value::from)),
            ("trace_id", o.context.trace_id.as_deref().map(Value::from)),
            ("span_id", o.context.span_id.as_deref().map(Value::from)),
            (
                "session_id",
                o.context.session_id.as_deref().map(Value::from),
            ),
            ("error", o.error.as_deref().map(Value::from)),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                stream[k] = v;
            }
        }
        if let Some(to) = o.original_destination {
            stream["intercepted"] = true.into();
            stream["original_destination"] = to.to_string().into();
        }
        event["stream"] = stream;
        if let Some(claims) = o.context.claims.as_deref() {
            event["jwt_claims"] = serde_json::to_value(claims).unwrap_or(Value::Null);
        }
    }
    if e.trigger.is_none()
        && let Some(s) = &e.stream
    {
        let mut stream = crate::correlate::stream_json(s);
        stream["in_flight"] = true.into();
        event["stream"] = stream;
        if let Some(claims) = s.context.claims.as_deref() {
            event["jwt_claims"] = serde_json::to_value(claims).unwrap_or(Value::Null);
        }
    }
    if let Some(owner) = &e.upstream_owner {
        upstream.insert("pid".into(), owner.pid.into());
        upstream.insert("comm".into(), owner.comm.as_str().into());
        upstream.insert("netns".into(), owner.netns.into());
    }
    if !upstream.is_empty() {
        event["upstream"] = Value::Object(upstream);
    }
    event
}

#[cfg(test)]
mod tests;
