//! Kernel evidence: what the kernel saw, as it goes into a `breaker_trip/v1` event's
//! `evidence` list, and the board that keeps recent evidence per breaker target until a
//! transition of that breaker takes it (a signal set to `annotate`, or one that counted as a
//! failure without tripping yet).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::breaker::{config::Scope, registry::BreakerId};

/// Evidence kept per target at most, the newest.
const PER_TARGET: usize = 8;

/// Evidence older than this is not attached to a transition.
pub const KEEP_FOR: Duration = Duration::from_secs(30);

/// Targets on the board at most; past that the oldest evidence is dropped (and counted).
const MAX_TARGETS: usize = 4096;

/// One kernel signal joined to what the proxy knows; a JSON object with at least `kind`,
/// `ktime_ns` (CLOCK_MONOTONIC of the kernel event) and `at` (its wall-clock time).
#[derive(Clone, Debug)]
pub struct Evidence {
    pub ktime_ns: u64,
    pub json: Value,
}

impl Evidence {
    /// The evidence as written, with how long after the kernel event the breaker changed.
    pub fn for_transition(&self, transition_ktime_ns: u64) -> Value {
        let mut v = self.json.clone();
        v["kernel_to_transition_us"] =
            (transition_ktime_ns.saturating_sub(self.ktime_ns) / 1000).into();
        v
    }
}

/// What a breaker guards, as evidence is filed under it: endpoint breakers of every class
/// share their endpoint's evidence.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub scope: Scope,
    pub name: String,
}

impl Target {
    pub fn of(id: &BreakerId) -> Self {
        Self {
            scope: id.scope,
            name: id.name.clone(),
        }
    }
}

#[derive(Default)]
pub struct Board {
    inner: Mutex<HashMap<Target, VecDeque<(Instant, Evidence)>>>,
    pub dropped: std::sync::atomic::AtomicU64,
}

impl Board {
    pub fn add(&self, target: Target, evidence: Evidence, now: Instant) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_TARGETS && !map.contains_key(&target) {
            map.retain(|_, q| {
                q.retain(|(t, _)| now.saturating_duration_since(*t) < KEEP_FOR);
                !q.is_empty()
            });
            if map.len() >= MAX_TARGETS {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
        let q = map.entry(target).or_default();
        if q.len() == PER_TARGET {
            q.pop_front();
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        q.push_back((now, evidence));
    }

    /// The recent evidence about what `id` guards, oldest first. It stays on the board: the
    /// other classes' breakers of the same endpoint, and the next transition, see it too.
    pub fn recent(&self, id: &BreakerId, now: Instant) -> Vec<Evidence> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&Target::of(id))
            .map(|q| {
                q.iter()
                    .filter(|(t, _)| now.saturating_duration_since(*t) < KEEP_FOR)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets what is too old to be attached.
    pub fn sweep(&self, now: Instant) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, q| {
            q.retain(|(t, _)| now.saturating_duration_since(*t) < KEEP_FOR);
            !q.is_empty()
        });
    }
}

pub use crate::signals::monotonic_ns;

/// The wall-clock time of a kernel CLOCK_MONOTONIC timestamp, RFC 3339 with microseconds.
pub fn wall_time(ktime_ns: u64) -> String {
    let now_mono = monotonic_ns();
    let now = std::time::SystemTime::now();
    let at = if ktime_ns <= now_mono {
        now.checked_sub(Duration::from_nanos(now_mono - ktime_ns))
    } else {
        now.checked_add(Duration::from_nanos(ktime_ns - now_mono))
    }
    .unwrap_or(now);
    humantime::format_rfc3339_micros(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, class: Option<&str>) -> BreakerId {
        BreakerId {
            scope: Scope::Endpoint,
            name: name.into(),
            class: class.map(Into::into),
        }
    }

    fn ev(n: u64) -> Evidence {
        Evidence {
            ktime_ns: n,
            json: serde_json::json!({"kind": "tcp_reset", "n": n}),
        }
    }

    #[test]
    fn evidence_is_shared_by_every_class_and_expires() {
        let b = Board::default();
        let t0 = Instant::now();
        b.add(Target::of(&id("svc/a:1", None)), ev(1), t0);
        assert_eq!(b.recent(&id("svc/a:1", Some("high")), t0).len(), 1);
        assert_eq!(b.recent(&id("svc/b:1", None), t0).len(), 0);
        assert_eq!(b.recent(&id("svc/a:1", None), t0 + KEEP_FOR).len(), 0);
        b.sweep(t0 + KEEP_FOR);
        assert_eq!(b.recent(&id("svc/a:1", None), t0).len(), 0);
    }

    #[test]
    fn the_board_keeps_the_newest_and_counts_what_it_dropped() {
        let b = Board::default();
        let t0 = Instant::now();
        for n in 0..(PER_TARGET as u64 + 3) {
            b.add(Target::of(&id("svc/a:1", None)), ev(n), t0);
        }
        let kept = b.recent(&id("svc/a:1", None), t0);
        assert_eq!(kept.len(), PER_TARGET);
        assert_eq!(kept.first().map(|e| e.ktime_ns), Some(3));
        assert_eq!(b.dropped.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[test]
    fn the_delay_to_the_transition_is_reported_in_microseconds() {
        let e = ev(1_000_000);
        assert_eq!(e.for_transition(3_500_000)["kernel_to_transition_us"], 2500);
        assert_eq!(e.for_transition(0)["kernel_to_transition_us"], 0);
    }
}
