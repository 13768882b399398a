#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A policy with no jitter, so open periods are exact.
fn policy() -> Policy {
    Policy {
        jitter: 0.0,
        ..Policy::default()
    }
}

struct Clock {
    epoch: Instant,
    now: Instant,
}

impl Clock {
    fn new() -> Self {
        let epoch = Instant::now();
        Self { epoch, now: epoch }
    }
    fn advance(&mut self, d: Duration) -> Instant {
        self.now += d;
        self.now
    }
}

fn breaker(p: Policy, c: &Clock) -> Breaker {
    Breaker::new(p, c.epoch, 7)
}

/// Admits and records one call; returns the change, if any.
fn call(b: &mut Breaker, now: Instant, mark: Mark) -> Option<Change> {
    let (permit, _) = b.admit(now).expect("admitted");
    b.record(permit, mark, ms(1), now)
}

#[test]
fn consecutive_failures_trip_and_a_success_resets_the_count() {
    let c = Clock::new();
    let mut b = breaker(
        Policy {
            failure_ratio: 0.0,
            ..policy()
        },
        &c,
    );
    for _ in 0..4 {
        assert_eq!(call(&mut b, c.now, Mark::Failure), None);
    }
    assert_eq!(call(&mut b, c.now, Mark::Success), None);
    for _ in 0..4 {
        assert_eq!(call(&mut b, c.now, Mark::Failure), None);
    }
    let change = call(&mut b, c.now, Mark::Failure).unwrap();
    assert_eq!(
        (change.from, change.to, change.reason),
        (State::Closed, State::Open, Reason::ConsecutiveFailures)
    );
    assert_eq!(change.open_for, Some(ms(5000)));
    assert_eq!(change.consecutive_failures, 5);
    let refused = b.admit(c.now).unwrap_err();
    assert_eq!(refused.reason, Reason::ConsecutiveFailures);
    assert_eq!(refused.retry_after, ms(5000));
}

#[test]
fn neutral_results_neither_count_nor_reset() {
    let c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 3,
            failure_ratio: 0.0,
            ..policy()
        },
        &c,
    );
    call(&mut b, c.now, Mark::Failure);
    call(&mut b, c.now, Mark::Neutral);
    call(&mut b, c.now, Mark::Failure);
    assert_eq!(b.figures(c.now).window.calls, 2);
    assert!(call(&mut b, c.now, Mark::Failure).is_some());
}

#[test]
fn the_failure_ratio_waits_for_the_minimum_volume() {
    let c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 0,
            failure_ratio: 0.5,
            min_requests: 20,
            ..policy()
        },
        &c,
    );
    // 19 calls, all failed: under the volume, nothing trips.
    for _ in 0..19 {
        assert_eq!(call(&mut b, c.now, Mark::Failure), None);
    }
    // The 20th call, even a success, makes the volume: 19/20 >= 0.5.
    let change = call(&mut b, c.now, Mark::Success).unwrap();
    assert_eq!(change.reason, Reason::FailureRatio);
    assert_eq!(change.counts.calls, 20);
    assert_eq!(change.counts.failures, 19);
}

#[test]
fn the_failure_ratio_trips_exactly_at_the_threshold() {
    let c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 0,
            failure_ratio: 0.5,
            min_requests: 10,
            ..policy()
        },
        &c,
    );
    for i in 0..9 {
        let mark = if i % 2 == 0 {
            Mark::Success
        } else {
            Mark::Failure
        };
        assert_eq!(call(&mut b, c.now, mark), None);
    }
    // 10 calls, 5 failed: exactly 0.5.
    assert_eq!(
        call(&mut b, c.now, Mark::Failure).unwrap().reason,
        Reason::FailureRatio
    );
}

#[test]
fn failures_leave_the_window_as_the_buckets_roll_over() {
    let mut c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 0,
            failure_ratio: 0.5,
            min_requests: 10,
            window: ms(10_000),
            buckets: 10,
            ..policy()
        },
        &c,
    );
    // 5 failures in the first second...
    for _ in 0..5 {
        call(&mut b, c.now, Mark::Failure);
    }
    // ... then 10 s later (bucket 0 rolled out exactly now) 4 successes and 1 failure: 1/5,
    // under the volume; had the first 5 stayed, 6/10 would trip.
    c.advance(ms(10_000));
    for _ in 0..4 {
        assert_eq!(call(&mut b, c.now, Mark::Success), None);
    }
    assert_eq!(call(&mut b, c.now, Mark::Failure), None);
    assert_eq!(b.figures(c.now).window.calls, 5);
    // One bucket earlier they would all still count.
    let mut c2 = Clock::new();
    let mut b2 = breaker(*b.policy(), &c2);
    for _ in 0..5 {
        call(&mut b2, c2.now, Mark::Failure);
    }
    c2.advance(ms(9_999));
    for _ in 0..4 {
        assert_eq!(call(&mut b2, c2.now, Mark::Success), None);
    }
    assert_eq!(
        call(&mut b2, c2.now, Mark::Failure).unwrap().reason,
        Reason::FailureRatio
    );
}

#[test]
fn half_open_lets_only_the_probe_limit_through_and_closes_on_success() {
    let mut c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 1,
            half_open_probes: 2,
            half_open_successes: 2,
            ..policy()
        },
        &c,
    );
    call(&mut b, c.now, Mark::Failure).unwrap();
    assert!(!b.admissible(c.advance(ms(4_999))));
    assert!(b.admit(c.now).is_err());
    c.advance(ms(1));
    assert!(b.admissible(c.now));
    let (p1, change) = b.admit(c.now).unwrap();
    let change = change.unwrap();
    assert_eq!(
        (change.from, change.to, change.reason),
        (State::Open, State::HalfOpen, Reason::OpenElapsed)
    );
    assert!(p1.is_probe());
    let (p2, none) = b.admit(c.now).unwrap();
    assert!(none.is_none());
    // Two probes out: the third call is refused, with no wait to tell.
    assert!(!b.admissible(c.now));
    assert_eq!(b.admit(c.now).unwrap_err().retry_after, Duration::ZERO);
    // One success: still half-open, one slot free again.
    assert_eq!(b.record(p1, Mark::Success, ms(1), c.now), None);
    let (p3, _) = b.admit(c.now).unwrap();
    assert!(b.admit(c.now).is_err());
    let change = b.record(p2, Mark::Success, ms(1), c.now).unwrap();
    assert_eq!(
        (change.from, change.to, change.reason),
        (State::HalfOpen, State::Closed, Reason::ProbesSucceeded)
    );
    // The third probe ends after the close: from the old generation, it changes nothing.
    assert_eq!(b.record(p3, Mark::Failure, ms(1), c.now), None);
    assert_eq!(b.figures(c.now).window.calls, 0);
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn a_failed_probe_reopens_with_doubled_backoff_up_to_the_cap() {
    let mut c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 1,
            open_for: ms(1_000),
            max_open_for: ms(5_000),
            backoff_multiplier: 2.0,
            half_open_probes: 1,
            half_open_successes: 1,
            ..policy()
        },
        &c,
    );
    let first = call(&mut b, c.now, Mark::Failure).unwrap();
    assert_eq!(first.open_for, Some(ms(1_000)));
    let mut periods = Vec::new();
    let mut open_for = ms(1_000);
    for _ in 0..5 {
        c.advance(open_for);
        let (probe, _) = b.admit(c.now).unwrap();
        let change = b.record(probe, Mark::Failure, ms(1), c.now).unwrap();
        assert_eq!((change.from, change.to), (State::HalfOpen, State::Open));
        assert_eq!(change.reason, Reason::ProbeFailed);
        open_for = change.open_for.unwrap();
        periods.push(open_for.as_millis());
    }
    assert_eq!(periods, [2_000, 4_000, 5_000, 5_000, 5_000]);
    assert_eq!(b.figures(c.now).backoff_level, 5);
    // A success closes it, and the next trip starts from the first period again.
    c.advance(open_for);
    let (probe, _) = b.admit(c.now).unwrap();
    assert_eq!(
        b.record(probe, Mark::Success, ms(1), c.now).unwrap().to,
        State::Closed
    );
    assert_eq!(
        call(&mut b, c.now, Mark::Failure).unwrap().open_for,
        Some(ms(1_000))
    );
}

#[test]
fn the_backoff_never_overflows() {
    let mut c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 1,
            open_for: ms(1),
            max_open_for: Duration::from_secs(3600),
            backoff_multiplier: 1000.0,
            half_open_probes: 1,
            ..policy()
        },
        &c,
    );
    call(&mut b, c.now, Mark::Failure).unwrap();
    for _ in 0..100 {
        c.advance(Duration::from_secs(3600));
        let (probe, _) = b.admit(c.now).unwrap();
        let change = b.record(probe, Mark::Failure, ms(1), c.now).unwrap();
        assert!(change.open_for.unwrap() <= Duration::from_secs(3600));
    }
}

#[test]
fn jitter_shortens_the_open_period_by_at_most_its_share() {
    let c = Clock::new();
    for seed in 0..200 {
        let mut b = Breaker::new(
            Policy {
                consecutive_failures: 1,
                open_for: ms(10_000),
                jitter: 0.2,
                ..Policy::default()
            },
            c.epoch,
            seed,
        );
        let d = call(&mut b, c.now, Mark::Failure)
            .unwrap()
            .open_for
            .unwrap();
        assert!(d > ms(8_000) && d <= ms(10_000), "{d:?}");
    }
}

#[test]
fn an_abandoned_probe_frees_its_slot() {
    let mut c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 1,
            half_open_probes: 1,
            ..policy()
        },
        &c,
    );
    call(&mut b, c.now, Mark::Failure).unwrap();
    c.advance(ms(5_000));
    let (p, _) = b.admit(c.now).unwrap();
    assert!(b.admit(c.now).is_err());
    b.release(p);
    let (p, _) = b.admit(c.now).unwrap();
    // A neutral result (a client's cancel) frees it too, and does not close.
    assert_eq!(b.record(p, Mark::Neutral, ms(1), c.now), None);
    assert_eq!(b.state(), State::HalfOpen);
    assert!(b.admit(c.now).is_ok());
}

#[test]
fn calls_admitted_before_a_trip_do_not_count_after_it() {
    let c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 2,
            ..policy()
        },
        &c,
    );
    let (early, _) = b.admit(c.now).unwrap();
    call(&mut b, c.now, Mark::Failure);
    call(&mut b, c.now, Mark::Failure).unwrap();
    // The early call fails after the trip: the open period is not touched.
    let before = b.figures(c.now);
    assert_eq!(b.record(early, Mark::Failure, ms(1), c.now), None);
    let after = b.figures(c.now);
    assert_eq!(before.open_remaining_ms, after.open_remaining_ms);
    assert_eq!(after.trips, 1);
}

#[test]
fn a_tick_turns_a_due_breaker_half_open() {
    let mut c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 1,
            ..policy()
        },
        &c,
    );
    call(&mut b, c.now, Mark::Failure).unwrap();
    assert_eq!(b.tick(c.advance(ms(4_000))), None);
    let change = b.tick(c.advance(ms(1_000))).unwrap();
    assert_eq!((change.from, change.to), (State::Open, State::HalfOpen));
    assert_eq!(b.tick(c.now), None);
    assert!(b.admit(c.now).unwrap().0.is_probe());
}

#[test]
fn fixed_slow_calls_trip_the_slow_ratio() {
    let c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 0,
            failure_ratio: 0.0,
            slow_ratio: 0.5,
            slow_threshold: SlowThreshold::Fixed(ms(100)),
            min_requests: 4,
            ..policy()
        },
        &c,
    );
    let mut rec = |lat: u64| {
        let (p, _) = b.admit(c.now).unwrap();
        b.record(p, Mark::Success, ms(lat), c.now)
    };
    assert_eq!(rec(100), None); // at the threshold: not slow
    assert_eq!(rec(101), None);
    assert_eq!(rec(10), None);
    let change = rec(500).unwrap();
    assert_eq!(change.reason, Reason::SlowCallRatio);
    assert_eq!(change.counts.slow, 2);
}

#[test]
fn the_adaptive_threshold_follows_the_recent_p95() {
    let mut c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 0,
            failure_ratio: 0.0,
            slow_ratio: 0.5,
            slow_threshold: SlowThreshold::Adaptive {
                factor: 3.0,
                floor: ms(5),
            },
            min_requests: 20,
            min_latency_samples: 50,
            window: ms(1_000),
            latency_window: ms(60_000),
            ..policy()
        },
        &c,
    );
    // No threshold until 50 samples: even very slow calls are not slow.
    assert_eq!(b.figures(c.now).slow_threshold_us, None);
    for _ in 0..50 {
        let (p, _) = b.admit(c.now).unwrap();
        assert_eq!(b.record(p, Mark::Success, ms(10), c.now), None);
    }
    let threshold = b.figures(c.now).slow_threshold_us.unwrap();
    assert!((30_000..=34_000).contains(&threshold), "{threshold}");
    // The window rolls past the warm-up calls; then the endpoint slows down 10x.
    c.advance(ms(2_000));
    let mut tripped = None;
    for i in 0..20 {
        let (p, _) = b.admit(c.now).unwrap();
        if let Some(change) = b.record(p, Mark::Success, ms(100), c.now) {
            tripped = Some((i, change));
            break;
        }
    }
    let (i, change) = tripped.expect("the slow calls trip the breaker");
    assert_eq!(change.reason, Reason::SlowCallRatio);
    assert_eq!(i, 19, "at the volume threshold, not before");
}

#[test]
fn the_floor_keeps_a_fast_endpoint_from_tripping_on_jitter() {
    let c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 0,
            failure_ratio: 0.0,
            slow_ratio: 0.5,
            slow_threshold: SlowThreshold::Adaptive {
                factor: 3.0,
                floor: ms(20),
            },
            min_requests: 10,
            min_latency_samples: 10,
            ..policy()
        },
        &c,
    );
    // 100 us calls: 3 x p95 would be 300 us; 1 ms calls then would all be slow.
    for _ in 0..20 {
        let (p, _) = b.admit(c.now).unwrap();
        b.record(p, Mark::Success, Duration::from_micros(100), c.now);
    }
    assert_eq!(b.figures(c.now).slow_threshold_us, Some(20_000));
    for _ in 0..50 {
        let (p, _) = b.admit(c.now).unwrap();
        assert_eq!(b.record(p, Mark::Success, ms(1), c.now), None);
    }
}

#[test]
fn signals_trip_or_count() {
    let mut c = Clock::new();
    let mut b = breaker(
        Policy {
            consecutive_failures: 3,
            ..policy()
        },
        &c,
    );
    assert_eq!(
        b.signal(c.now, SignalKind::Goaway, SignalAction::CountFailure),
        None
    );
    assert_eq!(
        b.signal(c.now, SignalKind::Goaway, SignalAction::CountFailure),
        None
    );
    let change = b
        .signal(c.now, SignalKind::Goaway, SignalAction::CountFailure)
        .unwrap();
    assert_eq!(change.reason, Reason::Signal(SignalKind::Goaway));
    assert_eq!(change.reason.as_str(), "goaway");
    c.advance(ms(5_000));
    let (_probe, _) = b.admit(c.now).unwrap();
    // A trip signal while half-open reopens, for longer.
    let change = b
        .signal(c.now, SignalKind::TcpReset, SignalAction::Trip)
        .unwrap();
    assert_eq!((change.from, change.to), (State::HalfOpen, State::Open));
    assert_eq!(change.open_for, Some(ms(10_000)));
    // While open, signals change nothing.
    assert_eq!(
        b.signal(c.now, SignalKind::TcpReset, SignalAction::Trip),
        None
    );
}

#[test]
fn an_operator_opens_and_closes() {
    let c = Clock::new();
    let mut b = breaker(policy(), &c);
    let change = b.force_open(c.now).unwrap();
    assert_eq!((change.to, change.reason), (State::Open, Reason::Admin));
    assert_eq!(b.force_open(c.now), None);
    assert_eq!(b.admit(c.now).unwrap_err().reason, Reason::Admin);
    let change = b.force_close(c.now).unwrap();
    assert_eq!((change.from, change.to), (State::Open, State::Closed));
    assert!(b.admit(c.now).is_ok());
}
