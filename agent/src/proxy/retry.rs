//! Retries: of calls that never reached an upstream (no connection, a stream the upstream
//! refused unprocessed), and of calls marked idempotent whose upstream answered UNAVAILABLE
//! before sending anything. Bounded by a budget, so that retries cannot multiply the load on
//! a cluster that is already failing (a retry storm): at most `budget_ratio` of the calls in
//! flight may be retries, and never fewer than `min_concurrent` (so a quiet proxy still
//! retries). Waits between tries are full-jitter exponential: random in
//! `0..min(backoff_max, backoff_base * 2^try)`.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

pub use crate::config::retries::RetryConfig;

/// The retry policy's behaviour; the policy itself is `[retries]`.
impl RetryConfig {
    pub fn idempotent(&self, path: &str) -> bool {
        self.idempotent_methods.iter().any(|m| path.starts_with(m))
    }

    /// The wait before retry number `retry` (1 for the first retry): full jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.backoff_max);
        cap.mul_f64(fastrand::f64())
    }
}

/// Calls and retries in flight, for the budget.
#[derive(Default)]
pub struct RetryBudget {
    calls: AtomicUsize,
    retries: AtomicUsize,
    /// Retries refused by the budget.
    pub exhausted: AtomicUsize,
}

/// A call in flight; counted until dropped.
pub struct CallGuard<'a>(&'a RetryBudget);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A call retrying; counted until dropped.
pub struct RetryGuard<'a>(&'a RetryBudget);

impl Drop for RetryGuard<'_> {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    pub fn call(&self) -> CallGuard<'_> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        CallGuard(self)
    }

    /// A place for one more retrying call, if the budget has one.
    pub fn try_retry(&self, config: &RetryConfig) -> Option<RetryGuard<'_>> {
        let calls = self.calls.load(Ordering::Relaxed);
        let limit = ((calls as f64 * config.budget_ratio) as usize).max(config.min_concurrent);
        let prev = self.retries.fetch_add(1, Ordering::Relaxed);
        if prev >= limit {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(RetryGuard(self))
    }

    pub fn retrying(&self) -> usize {
        self.retries.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_budget_is_a_share_of_the_calls_in_flight_with_a_floor() {
        let c = RetryConfig::default();
        let b = RetryBudget::default();
        let calls: Vec<_> = (0..50).map(|_| b.call()).collect();
        // 20% of 50 = 10.
        let retries: Vec<_> = (0..12).filter_map(|_| b.try_retry(&c)).collect();
        assert_eq!(retries.len(), 10);
        assert_eq!(b.exhausted.load(Ordering::Relaxed), 2);
        drop(retries);
        drop(calls);
        // With nothing in flight the floor still allows 3.
        let retries: Vec<_> = (0..5).filter_map(|_| b.try_retry(&c)).collect();
        assert_eq!(retries.len(), 3);
    }

    #[test]
    fn backoff_is_full_jitter_under_a_growing_cap() {
        let c = RetryConfig::default();
        for retry in 1..8 {
            let cap = Duration::from_millis((25u64 << (retry - 1)).min(250));
            let waits: Vec<_> = (0..500).map(|_| c.backoff(retry)).collect();
            assert!(waits.iter().all(|w| *w <= cap), "retry {retry}");
            // Spread over the whole range, not clustered at the cap.
            assert!(waits.iter().any(|w| *w < cap / 4), "retry {retry}");
            assert!(waits.iter().any(|w| *w > cap * 3 / 4), "retry {retry}");
        }
    }

    #[test]
    fn idempotent_methods_by_prefix() {
        let c = RetryConfig {
            idempotent_methods: vec!["/pkg.Reads/".into(), "/pkg.Orders/Get".into()],
            ..RetryConfig::default()
        };
        assert!(c.idempotent("/pkg.Reads/List"));
        assert!(c.idempotent("/pkg.Orders/Get"));
        assert!(!c.idempotent("/pkg.Orders/Create"));
        assert!(c.check().is_ok());
        let bad = RetryConfig {
            idempotent_methods: vec!["pkg.Reads".into()],
            ..RetryConfig::default()
        };
        assert!(bad.check().is_err());
    }
}
