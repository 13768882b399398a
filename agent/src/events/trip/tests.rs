#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant, UNIX_EPOCH},
};

use super::*;
use crate::{
    breaker::{
        config::{BreakerConfig, Scope},
        registry::{Breakers, ClusterShape},
    },
    context::{ContextConfig, Extractor},
    events::outcome::{Ending, StreamOutcome},
};

#[test]
fn a_trip_carries_the_breaker_the_upstream_and_the_calls_context() {
    let b = Breakers::new(
        BreakerConfig::default(),
        &[ClusterShape {
            name: "orders",
            subsets: &[],
            endpoints_only: false,
        }],
        Instant::now(),
    );
    let _endpoint = b.endpoint(0, "10.0.0.7:50051", 0);
    let transition = b
        .force("endpoint orders/10.0.0.7:50051", true, Instant::now())
        .unwrap()
        .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    headers.insert("x-session-id", "sess_9z8y".parse().unwrap());
    let context = Extractor::new(&ContextConfig::default())
        .unwrap()
        .extract(&headers, 0);
    let outcome = StreamOutcome {
        listener: "in".into(),
        client: "127.0.0.1:40000".parse().unwrap(),
        cluster: Some("orders".into()),
        endpoint: Some("10.0.0.7:50051".into()),
        method: "/orders.v1.Orders/Create".into(),
        grpc: true,
        http_status: Some(200),
        grpc_status: Some(14),
        ending: Ending::Completed,
        reset_reason: None,
        latency: Duration::from_micros(1234),
        request_bytes: 0,
        response_bytes: 0,
        retries: 0,
        context,
        class: None,
        breaker: None,
        blame: Some("upstream"),
        first_byte: None,
        original_destination: None,
        error: None,
    };
    let e = breaker_trip(
        &BreakerEvent {
            transition,
            trigger: Some(Arc::new(outcome)),
            stream: None,
            evidence: Vec::new(),
            upstream_owner: None,
            at: UNIX_EPOCH,
        },
        UNIX_EPOCH + Duration::from_millis(1_717_023_480_123),
    );
    assert_eq!(e["schema"], "breaker_trip/v1");
    assert_eq!(e["ts"], "2024-05-29T22:58:00.123Z");
    assert_eq!(e["breaker"]["name"], "endpoint orders/10.0.0.7:50051");
    assert_eq!(e["breaker"]["scope"], "endpoint");
    assert_eq!(
        (
            &e["breaker"]["from"],
            &e["breaker"]["to"],
            &e["breaker"]["reason"]
        ),
        (&"closed".into(), &"open".into(), &"admin".into())
    );
    assert!(e["breaker"]["open_for_ms"].as_u64().unwrap() > 4000);
    assert_eq!(e["upstream"]["cluster"], "orders");
    assert_eq!(e["upstream"]["endpoint"], "10.0.0.7:50051");
    assert_eq!(e["stream"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(e["stream"]["session_id"], "sess_9z8y");
    assert_eq!(e["stream"]["grpc_status"], 14);
    assert_eq!(e["stream"]["method"], "/orders.v1.Orders/Create");
    assert_eq!(e["evidence"], serde_json::json!([]));
    assert!(e.get("seq").is_none(), "the journal numbers it");
    let _ = Scope::Endpoint;
}
