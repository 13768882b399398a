//! The recent p95 latency of one breaker's calls, for the adaptive slow-call threshold.
//!
//! Two histograms, each covering half of the latency window: the current one fills, the
//! previous one is kept, and the p95 is read over both, so the estimate always covers between
//! half the window and all of it. Bins are log-linear (8 per power of two, so within 12.5%),
//! in microseconds. The p95 is recomputed every [`REFRESH`] calls, not on each one.

use std::time::Duration;

/// Exact bins below this many microseconds, then 8 per power of two.
const LINEAR: u64 = 16;
const SUB_BITS: u32 = 3;
const BINS: usize = 16 + 40 * 8;
const REFRESH: u32 = 32;

pub struct LatencyTracker {
    half_nanos: u64,
    /// Start of the current half, on the breaker's clock.
    current_since: u64,
    current: Box<[u32; BINS]>,
    previous: Box<[u32; BINS]>,
    samples: u32,
    since_refresh: u32,
    p95: Option<Duration>,
    min_samples: u32,
}

fn bin(d: Duration) -> usize {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    if us < LINEAR {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // >= 4
    let sub = (us >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (LINEAR as usize + (exp as usize - 4) * 8 + sub as usize).min(BINS - 1)
}

/// The upper edge of a bin: the estimate errs towards slower, never flagging a call slow
/// because the bin rounded the p95 down.
fn upper_edge(bin: usize) -> Duration {
    if bin < LINEAR as usize {
        return Duration::from_micros(bin as u64 + 1);
    }
    let exp = (bin - LINEAR as usize) / 8 + 4;
    let sub = ((bin - LINEAR as usize) % 8) as u64;
    let low = (1u64 << exp) + (sub << (exp as u32 - SUB_BITS));
    Duration::from_micros(low + (1u64 << (exp as u32 - SUB_BITS)))
}

impl LatencyTracker {
    pub fn new(window_nanos: u64, min_samples: u32) -> Self {
        Self {
            half_nanos: (window_nanos / 2).max(1),
            current_since: 0,
            current: Box::new([0; BINS]),
            previous: Box::new([0; BINS]),
            samples: 0,
            since_refresh: 0,
            p95: None,
            min_samples,
        }
    }

    pub fn record(&mut self, now: u64, latency: Duration) {
        self.rotate(now);
        let b = bin(latency);
        if let Some(c) = self.current.get_mut(b) {
            *c = c.saturating_add(1);
        }
        self.samples = self.samples.saturating_add(1);
        self.since_refresh += 1;
        if self.since_refresh >= REFRESH || self.p95.is_none() {
            self.refresh();
        }
    }

    /// The p95 over the last half to whole window; None until `min_samples` calls are in it.
    pub fn p95(&mut self, now: u64) -> Option<Duration> {
        if self.rotate(now) {
            self.refresh();
        }
        self.p95
    }

    /// Starts a new half when the current one is over. True if anything moved.
    fn rotate(&mut self, now: u64) -> bool {
        if now < self.current_since + self.half_nanos {
            return false;
        }
        if now >= self.current_since + 2 * self.half_nanos {
            // Quiet for a whole window: nothing recent is left.
            self.previous.fill(0);
        } else {
            std::mem::swap(&mut self.current, &mut self.previous);
        }
        self.current.fill(0);
        self.current_since = now - (now - self.current_since) % self.half_nanos;
        self.samples = self.previous.iter().sum();
        true
    }

    fn refresh(&mut self) {
        self.since_refresh = 0;
        if self.samples < self.min_samples.max(1) {
            self.p95 = None;
            return;
        }
        // The smallest bin with at least 95% of the samples at or below it.
        let want = (u64::from(self.samples) * 95).div_ceil(100);
        let mut seen = 0u64;
        for b in 0..BINS {
            seen += u64::from(self.current[b]) + u64::from(self.previous[b]);
            if seen >= want {
                self.p95 = Some(upper_edge(b));
                return;
            }
        }
        self.p95 = Some(upper_edge(BINS - 1));
    }
}

#[cfg(test)]
mod tests;
