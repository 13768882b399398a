#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::breaker::circuit::Mark::{Failure, Neutral, Success};

fn answered(status: u32) -> Facts {
    Facts {
        grpc: true,
        ended: Ended::Answered,
        grpc_status: Some(status),
        http_status: Some(200),
        token_expired: false,
        request_complete: true,
    }
}

fn verdict(f: Facts) -> (Mark, Mark) {
    let v = classify(&f, Attribution::Ignore);
    (v.upstream, v.client)
}

#[test]
fn every_grpc_status_has_an_owner() {
    let upstream_faults = [2, 4, 13, 14, 15];
    let answered_fine = [0, 3, 5, 6, 7, 9, 10, 11, 12, 16];
    for s in upstream_faults {
        assert_eq!(verdict(answered(s)), (Failure, Success), "status {s}");
    }
    for s in answered_fine {
        assert_eq!(verdict(answered(s)), (Success, Success), "status {s}");
    }
    assert_eq!(verdict(answered(1)), (Neutral, Neutral));
    assert_eq!(verdict(answered(8)), (Neutral, Neutral));
    // Outside the 17 codes: an answer about the request, not tonic's UNKNOWN (a failure).
    for s in [17, 99, u32::MAX] {
        assert_eq!(verdict(answered(s)), (Success, Success), "status {s}");
    }
}

#[test]
fn an_expired_token_is_the_clients_fault() {
    let f = Facts {
        token_expired: true,
        ..answered(16)
    };
    assert_eq!(verdict(f), (Success, Failure));
    // Another status with an expired token is judged as usual.
    let f = Facts {
        token_expired: true,
        ..answered(14)
    };
    assert_eq!(verdict(f), (Failure, Success));
}

#[test]
fn resource_exhausted_goes_where_configured() {
    let f = answered(8);
    assert_eq!(classify(&f, Attribution::Upstream).upstream, Failure);
    let v = classify(&f, Attribution::Client);
    assert_eq!((v.upstream, v.client), (Success, Failure));
}

#[test]
fn endings_without_a_status() {
    let with = |ended, request_complete| Facts {
        ended,
        request_complete,
        grpc_status: None,
        ..answered(0)
    };
    assert_eq!(verdict(with(Ended::NotReached, false)), (Failure, Success));
    assert_eq!(
        verdict(with(Ended::UpstreamReset, true)),
        (Failure, Success)
    );
    assert_eq!(
        verdict(with(Ended::ClientCancelled, true)),
        (Neutral, Neutral)
    );
    // The upstream had the whole request and did not answer in time.
    assert_eq!(
        verdict(with(Ended::DeadlineExceeded, true)),
        (Failure, Success)
    );
    // The client was still sending: its own deadline.
    assert_eq!(
        verdict(with(Ended::DeadlineExceeded, false)),
        (Neutral, Neutral)
    );
    // gRPC with no grpc-status at all.
    assert_eq!(verdict(with(Ended::Answered, true)), (Failure, Success));
}

#[test]
fn plain_http_by_status() {
    let http = |s| Facts {
        grpc: false,
        grpc_status: None,
        http_status: Some(s),
        ..answered(0)
    };
    assert_eq!(verdict(http(200)), (Success, Success));
    assert_eq!(verdict(http(404)), (Success, Success));
    assert_eq!(verdict(http(501)), (Success, Success));
    assert_eq!(verdict(http(502)), (Failure, Success));
    assert_eq!(verdict(http(503)), (Failure, Success));
}
