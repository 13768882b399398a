#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;

use super::*;

const MS: u64 = 1_000_000;

#[test]
fn calls_leave_one_bucket_at_a_time() {
    // 10 s in 10 buckets of 1 s.
    let mut w = SlidingWindow::new(10_000 * MS, 10);
    w.record(100 * MS, true, false); // bucket 0
    w.record(1_500 * MS, false, false); // bucket 1
    w.record(9_999 * MS, false, true); // bucket 9
    assert_eq!(
        w.counts(9_999 * MS),
        Counts {
            calls: 3,
            failures: 1,
            slow: 1
        }
    );
    // Bucket 10 starts: bucket 0 (the failure) leaves, bucket 1 stays.
    assert_eq!(w.counts(10_000 * MS).calls, 2);
    assert_eq!(w.counts(10_000 * MS).failures, 0);
    assert_eq!(w.counts(11_000 * MS).calls, 1);
    // Bucket 9 leaves when bucket 19 starts.
    assert_eq!(w.counts(18_999 * MS).calls, 1);
    assert_eq!(w.counts(19_000 * MS).calls, 0);
}

#[test]
fn a_long_quiet_gap_empties_the_window() {
    let mut w = SlidingWindow::new(1_000 * MS, 4);
    for i in 0..100 {
        w.record(i * MS, i % 2 == 0, false);
    }
    assert_eq!(w.counts(100 * MS).calls, 100);
    assert_eq!(w.counts(10_000_000 * MS), Counts::default());
    w.record(10_000_001 * MS, true, false);
    assert_eq!(w.counts(10_000_001 * MS).failures, 1);
}

#[test]
fn a_burst_at_a_bucket_edge_is_not_split() {
    // The fixed-window failure: 10 failures just before a reset and 10 just after would show
    // as two half-windows of 10; the sliding window sees all 20 together.
    let mut w = SlidingWindow::new(10_000 * MS, 10);
    for i in 0..10 {
        w.record(9_990 * MS + i * MS, true, false);
    }
    for i in 0..10 {
        w.record(10_000 * MS + i * MS, true, false);
    }
    assert_eq!(w.counts(10_010 * MS).failures, 20);
}

#[test]
fn an_older_clock_reading_counts_in_the_newest_bucket() {
    let mut w = SlidingWindow::new(1_000 * MS, 10);
    w.record(550 * MS, false, false);
    w.record(420 * MS, true, false); // another thread's slightly older now
    assert_eq!(w.counts(550 * MS).failures, 1);
    // Both leave with bucket 5, when bucket 15 starts.
    assert_eq!(w.counts(1_499 * MS).calls, 2);
    assert_eq!(w.counts(1_500 * MS).calls, 0);
}

/// A naive exact model: every event kept; the window at `now` is every event in a bucket
/// newer than `bucket(now) - n`.
fn model(events: &[(u64, bool, bool)], now: u64, bucket: u64, n: u64) -> Counts {
    let head = now / bucket;
    let mut c = Counts::default();
    for &(t, f, s) in events {
        if t / bucket + n > head && t <= now {
            c.calls += 1;
            c.failures += u32::from(f);
            c.slow += u32::from(s);
        }
    }
    c
}

fn exact(events: &[(u64, bool, bool)], from: u64, to: u64) -> u32 {
    events.iter().filter(|e| e.0 > from && e.0 <= to).count() as u32
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The bucketed window agrees with the naive model at every step of a random event stream
    /// (random gaps, from nothing to several windows), and is exact to one bucket: it holds
    /// every call of the last `window - bucket` and none older than `window`.
    #[test]
    fn sliding_window_matches_a_naive_model(
        buckets in 1u32..20,
        bucket_ms in 1u64..50,
        steps in proptest::collection::vec((0u64..3000, any::<bool>(), any::<bool>(), any::<bool>()), 1..300),
    ) {
        let bucket = bucket_ms * MS;
        let window = bucket * u64::from(buckets);
        let mut w = SlidingWindow::new(window, buckets);
        let mut events = Vec::new();
        let mut now = 0u64;
        for (gap_tenths_of_bucket, record, failed, slow) in steps {
            now += gap_tenths_of_bucket * bucket / 100;
            if record {
                w.record(now, failed, slow);
                events.push((now, failed, slow));
            }
            let got = w.counts(now);
            prop_assert_eq!(got, model(&events, now, bucket, u64::from(buckets)));
            let lower = exact(&events, now.saturating_sub(window - bucket), now);
            let upper = exact(&events, now.saturating_sub(window), now)
                + u32::from(now < window) * events.iter().filter(|e| e.0 == 0).count() as u32;
            prop_assert!(got.calls >= lower, "{} < {} (last window - bucket)", got.calls, lower);
            prop_assert!(got.calls <= upper, "{} > {} (last window)", got.calls, upper);
        }
    }
}
