#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::*;

const MS: u64 = 1_000_000;

#[test]
fn bins_hold_their_values() {
    for us in [
        0u64,
        1,
        15,
        16,
        17,
        100,
        999,
        1_000,
        123_456,
        10_000_000,
        u32::MAX as u64,
    ] {
        let d = Duration::from_micros(us);
        let edge = upper_edge(bin(d));
        assert!(edge > d, "{us} us: upper edge {edge:?}");
        // Within 12.5% (one of 8 sub-bins), or 1 us in the linear part.
        assert!(
            edge.as_micros() as u64 <= us + us / 8 + 1,
            "{us} us: upper edge {edge:?} too far"
        );
    }
}

#[test]
fn p95_needs_enough_samples() {
    let mut t = LatencyTracker::new(60_000 * MS, 100);
    for i in 0..99 {
        t.record(i * MS, Duration::from_millis(10));
    }
    assert_eq!(t.p95(100 * MS), None);
    t.record(100 * MS, Duration::from_millis(10));
    let p = t.p95(100 * MS).unwrap();
    assert!(
        p >= Duration::from_millis(10) && p <= Duration::from_micros(11_300),
        "{p:?}"
    );
}

#[test]
fn p95_is_the_95th_percentile() {
    let mut t = LatencyTracker::new(60_000 * MS, 10);
    // 94 fast calls and 6 slow: the p95 is slow. 96 and 4: fast.
    for i in 0..94 {
        t.record(i, Duration::from_millis(1));
    }
    for i in 0..6 {
        t.record(100 + i, Duration::from_millis(100));
    }
    // The estimate is refreshed every REFRESH calls: after these, it has seen at least 126
    // fast and 6 slow (95.4% fast).
    for _ in 0..2 * REFRESH {
        t.record(200, Duration::from_millis(1));
    }
    assert!(t.p95(300).unwrap() <= Duration::from_micros(1_130));
}

#[test]
fn old_samples_age_out() {
    // A 10 s window: halves of 5 s.
    let mut t = LatencyTracker::new(10_000 * MS, 10);
    for i in 0..50 {
        t.record(i * MS, Duration::from_millis(200));
    }
    assert!(t.p95(1_000 * MS).unwrap() >= Duration::from_millis(200));
    for i in 0..50 {
        t.record(5_000 * MS + i * MS, Duration::from_millis(2));
    }
    // Both halves: still 200 ms at the p95.
    assert!(t.p95(6_000 * MS).unwrap() >= Duration::from_millis(200));
    // The first half rotated out.
    let p = t.p95(10_500 * MS).unwrap();
    assert!(p <= Duration::from_micros(2_300), "{p:?}");
    // A whole quiet window: nothing left.
    assert_eq!(t.p95(30_000 * MS), None);
}
