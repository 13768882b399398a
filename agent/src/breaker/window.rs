//! A sliding time window of call counts, in equal buckets.
//!
//! The window is the current bucket and the `n - 1` before it, so it slides one bucket at a
//! time: a call leaves it between `window - window/n` and `window` after it was recorded,
//! never all at once as in a fixed window that resets (which halves the ratio after each reset
//! and lets a burst that straddles a reset hide). Running totals make both recording and
//! reading O(1), however many buckets.

use serde::Serialize;

/// Calls in the window, and how many of them failed or were slow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.calls = self.calls.saturating_add(o.calls);
        self.failures = self.failures.saturating_add(o.failures);
        self.slow = self.slow.saturating_add(o.slow);
    }

    fn sub(&mut self, o: Counts) {
        self.calls = self.calls.saturating_sub(o.calls);
        self.failures = self.failures.saturating_sub(o.failures);
        self.slow = self.slow.saturating_sub(o.slow);
    }

    pub fn failure_ratio(&self) -> f64 {
        ratio(self.failures, self.calls)
    }

    pub fn slow_ratio(&self) -> f64 {
        ratio(self.slow, self.calls)
    }
}

fn ratio(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) / f64::from(whole)
    }
}

pub struct SlidingWindow {
    bucket_nanos: u64,
    ring: Box<[Counts]>,
    /// The newest bucket number seen: time never goes back inside the window (a caller whose
    /// clock reading is a little older than another's records into the newest bucket).
    head: u64,
    total: Counts,
}

impl SlidingWindow {
    /// `window_nanos` in `buckets` buckets (each at least 1 ns).
    pub fn new(window_nanos: u64, buckets: u32) -> Self {
        let n = buckets.max(1);
        Self {
            bucket_nanos: (window_nanos / u64::from(n)).max(1),
            ring: vec![Counts::default(); n as usize].into_boxed_slice(),
            head: 0,
            total: Counts::default(),
        }
    }

    /// Records one call at `now` (nanoseconds on the breaker's clock).
    pub fn record(&mut self, now: u64, failed: bool, slow: bool) {
        self.advance(now);
        let c = Counts {
            calls: 1,
            failures: u32::from(failed),
            slow: u32::from(slow),
        };
        let len = self.ring.len() as u64;
        if let Some(b) = self.ring.get_mut((self.head % len) as usize) {
            b.add(c);
        }
        self.total.add(c);
    }

    /// What the window holds at `now`.
    pub fn counts(&mut self, now: u64) -> Counts {
        self.advance(now);
        self.total
    }

    /// Adds `calls` successful calls counted elsewhere (lock-free) in bucket `index`; nothing
    /// if that bucket has left the window.
    pub fn absorb(&mut self, index: u64, calls: u32) {
        self.advance(index.saturating_mul(self.bucket_nanos));
        let len = self.ring.len() as u64;
        if index.saturating_add(len) <= self.head {
            return;
        }
        let c = Counts {
            calls,
            failures: 0,
            slow: 0,
        };
        if let Some(b) = self.ring.get_mut((index % len) as usize) {
            b.add(c);
        }
        self.total.add(c);
    }

    pub fn bucket_nanos(&self) -> u64 {
        self.bucket_nanos
    }

    pub fn buckets(&self) -> usize {
        self.ring.len()
    }

    /// Failures in the window as of the last record or read (no clock needed: it can only
    /// be more than at `now`).
    pub fn failures_seen(&self) -> u32 {
        self.total.failures
    }

    pub fn clear(&mut self) {
        self.ring.fill(Counts::default());
        self.total = Counts::default();
    }

    /// Moves the head to `now`'s bucket, dropping the buckets that left the window.
    fn advance(&mut self, now: u64) {
        let index = now / self.bucket_nanos;
        if index <= self.head {
            return;
        }
        let len = self.ring.len() as u64;
        if index - self.head >= len {
            self.ring.fill(Counts::default());
            self.total = Counts::default();
        } else {
            for i in self.head + 1..=index {
                if let Some(b) = self.ring.get_mut((i % len) as usize) {
                    self.total.sub(*b);
                    *b = Counts::default();
                }
            }
        }
        self.head = index;
    }
}

#[cfg(test)]
mod tests;
