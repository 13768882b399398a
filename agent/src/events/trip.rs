//! The breaker-trip event, schema `breaker_trip/v1`: one per breaker transition (a trip is
//! `to: "open"`; the others, half-open and closed, are journaled alike so that a reader sees
//! every state a breaker went through). Fields (absent when unknown):
//!
//! | field | meaning |
//! |---|---|
//! | `schema` | `"breaker_trip/v1"` |
//! | `seq` | the journal's sequence number (contiguous; added by the journal) |
//! | `ts` | when the transition happened, RFC 3339 UTC with milliseconds |
//! | `breaker.name` | `endpoint orders/10.0.0.7:50051`, `client sub:user-1`, ... (as the API names it) |
//! | `breaker.scope` | `endpoint`, `subset`, `cluster`, `method` or `client` |
//! | `breaker.class` | the priority class, when not the default one |
//! | `breaker.from`, `breaker.to` | `closed`, `open`, `half_open` |
//! | `breaker.reason` | `consecutive_failures`, `failure_ratio`, `slow_call_ratio`, `open_elapsed`, `probe_failed`, `probes_succeeded`, `admin`, or a signal (`tcp_reset`, ...) |
//! | `breaker.open_for_ms` | when `to` is `open`: for how long |
//! | `window` | the breaker's window then: `calls`, `failures`, `slow` |
//! | `consecutive_failures` | failures in a row then |
//! | `upstream.cluster`, `upstream.endpoint` | what the breaker guards, or where the triggering call went |
//! | `stream` | the call whose result made the change: `method`, `grpc_status`, `http_status`, `ending`, `trace_id`, `span_id`, `session_id`, `client` (address), `latency_us` |
//! | `jwt_claims` | that call's allowlisted claims, with `verified` and `expired` (never the token) |
//! | `evidence` | kernel signals behind the change (empty until the correlation stage) |

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::{breaker::config::Scope, proxy::outcome::BreakerEvent};

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
        "evidence": [],
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
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                stream[k] = v;
            }
        }
        event["stream"] = stream;
        if let Some(claims) = o.context.claims.as_deref() {
            event["jwt_claims"] = serde_json::to_value(claims).unwrap_or(Value::Null);
        }
    }
    if !upstream.is_empty() {
        event["upstream"] = Value::Object(upstream);
    }
    event
}

#[cfg(test)]
mod tests;
