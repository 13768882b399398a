//! One circuit breaker: closed -> open -> half-open -> closed (or open again, for longer).
//!
//! Pure: no I/O, no clock of its own; every call takes `now`. Calls are admitted with a
//! [`Permit`] and their result recorded against it. Each state change starts a new
//! generation, and a result recorded on a permit of an older generation changes nothing:
//! a call admitted before a trip that fails after it does not extend the open period, and one
//! admitted before a breaker closed does not count in its fresh window.

use crate::signals::SignalKind;

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{
    latency::LatencyTracker,
    policy::{Policy, SlowThreshold},
    window::{Counts, SlidingWindow},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// Why a breaker changed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    ConsecutiveFailures,
    FailureRatio,
    SlowCallRatio,
    /// The open period passed: probing.
    OpenElapsed,
    /// A half-open probe failed: open again, for longer.
    ProbeFailed,
    /// Enough half-open probes succeeded.
    ProbesSucceeded,
    /// An outside signal: a kernel event (`tcp_reset`, `goaway`, `go_stw`, ...).
    Signal(SignalKind),
    /// An operator, through the API.
    Admin,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures => "consecutive_failures",
            Reason::FailureRatio => "failure_ratio",
            Reason::SlowCallRatio => "slow_call_ratio",
            Reason::OpenElapsed => "open_elapsed",
            Reason::ProbeFailed => "probe_failed",
            Reason::ProbesSucceeded => "probes_succeeded",
            Reason::Signal(kind) => kind.as_str(),
            Reason::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What a call's result means for this breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Success,
    Failure,
    /// Says nothing about the health of what this breaker guards (a client's cancel).
    Neutral,
}

/// What an outside signal does to a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalAction {
    /// Open at once.
    Trip,
    /// Count as one failed call.
    CountFailure,
}

/// A call let through. Give it back with [`Breaker::record`] or [`Breaker::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Permit {
    generation: u64,
    probe: bool,
}

impl Permit {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A permit of a closed breaker of this generation (admitted without its lock: a closed
    /// breaker lets every call through).
    pub fn closed(generation: u64) -> Self {
        Self {
            generation,
            probe: false,
        }
    }

    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// A state change.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub from: State,
    pub to: State,
    pub reason: Reason,
    /// When `to` is open: for how long.
    pub open_for: Option<Duration>,
    /// The window when it happened.
    pub counts: Counts,
    pub consecutive_failures: u32,
    /// The breaker's generation after the change: its changes in order (two changes of one
    /// breaker made on two threads at once can reach the journal in the other order).
    pub generation: u64,
}

/// A call refused.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// Why the breaker is open.
    pub reason: Reason,
    /// Until the breaker probes again (0 when half-open with every probe taken).
    pub retry_after: Duration,
}

/// A breaker's figures, for the API and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub state: State,
    /// Why it is in that state (None: closed since it was made).
    pub reason: Option<Reason>,
    pub window: Counts,
    pub consecutive_failures: u32,
    /// The slow-call threshold in force, in microseconds (None: no slow-call rule, or too few
    /// samples yet for the adaptive one).
    pub slow_threshold_us: Option<u64>,
    pub p95_us: Option<u64>,
    /// Open: until it probes, in milliseconds.
    pub open_remaining_ms: Option<u64>,
    pub probes_in_flight: u32,
    /// Consecutive failed half-open tries: the open period is `open_for * multiplier^this`.
    pub backoff_level: u32,
    pub trips: u64,
}

pub struct Breaker {
    policy: Policy,
    epoch: Instant,
    state: State,
    reason: Option<Reason>,
    generation: u64,
    open_until: u64,
    backoff_level: u32,
    probes_in_flight: u32,
    probe_successes: u32,
    consecutive: u32,
    window: SlidingWindow,
    latency: Option<LatencyTracker>,
    rng: fastrand::Rng,
    trips: u64,
    /// Last admission or record, for the eviction of idle client breakers.
    last_active: u64,
}

/// A duration in nanoseconds, saturating: the breakers' clock unit.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `d * by`, saturating (`Duration::mul_f64` panics on overflow).
fn scale(d: Duration, by: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * by).unwrap_or(if by > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

impl Breaker {
    /// A closed breaker. `seed` feeds the open-period jitter (fixed in tests).
    pub fn new(policy: Policy, epoch: Instant, seed: u64) -> Self {
        let latency = (policy.slow_ratio > 0.0
            && matches!(policy.slow_threshold, SlowThreshold::Adaptive { .. }))
        .then(|| LatencyTracker::new(nanos(policy.latency_window), policy.min_latency_samples));
        Self {
            window: SlidingWindow::new(nanos(policy.window), policy.buckets),
            latency,
            policy,
            epoch,
            state: State::Closed,
            reason: None,
            generation: 0,
            open_until: 0,
            backoff_level: 0,
            probes_in_flight: 0,
            probe_successes: 0,
            consecutive: 0,
            rng: fastrand::Rng::with_seed(seed),
            trips: 0,
            last_active: 0,
        }
    }

    fn clock(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch))
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a success changes nothing now but the window's count of calls: closed, no
    /// failure in a row or in the window, no slow-call rule (which needs each latency). Then
    /// a success may be counted without the breaker's lock (see the registry).
    pub fn success_only_counts(&self) -> bool {
        self.state == State::Closed
            && self.consecutive == 0
            && self.window.failures_seen() == 0
            && self.policy.slow_ratio <= 0.0
    }

    /// Successes counted without the lock in bucket `index` of the window.
    pub fn absorb_successes(&mut self, index: u64, calls: u32) {
        self.window.absorb(index, calls);
    }

    /// The window's bucket width and count, for counting successes without the lock.
    pub fn window_shape(&self) -> (u64, usize) {
        (self.window.bucket_nanos(), self.window.buckets())
    }

    /// Changes of state so far (see [`Permit`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Nanoseconds since the epoch of the last admission or record.
    pub fn last_active(&self) -> u64 {
        self.last_active
    }

    /// Whether [`Self::admit`] would let a call through at `now` (changes nothing).
    pub fn admissible(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open => self.clock(now) >= self.open_until,
            State::HalfOpen => self.probes_in_flight < self.policy.half_open_probes,
        }
    }

    /// Why [`Self::admit`] would refuse a call at `now`, if it would (changes nothing).
    pub fn refusal(&self, now: Instant) -> Option<Refusal> {
        if self.admissible(now) {
            return None;
        }
        let t = self.clock(now);
        Some(Refusal {
            reason: self.reason.clone().unwrap_or(Reason::Admin),
            retry_after: Duration::from_nanos(self.open_until.saturating_sub(t)),
        })
    }

    /// Lets a call through, or says why not. An open breaker whose period passed turns
    /// half-open here (the change is returned) and the call is its first probe.
    pub fn admit(&mut self, now: Instant) -> Result<(Permit, Option<Change>), Refusal> {
        let t = self.clock(now);
        self.last_active = t;
        let mut change = None;
        if self.state == State::Open {
            if t < self.open_until {
                return Err(Refusal {
                    reason: self.reason.clone().unwrap_or(Reason::Admin),
                    retry_after: Duration::from_nanos(self.open_until - t),
                });
            }
            change = Some(self.half_open(t));
        }
        match self.state {
            State::Closed => Ok((
                Permit {
                    generation: self.generation,
                    probe: false,
                },
                change,
            )),
            State::HalfOpen if self.probes_in_flight < self.policy.half_open_probes => {
                self.probes_in_flight += 1;
                Ok((
                    Permit {
                        generation: self.generation,
                        probe: true,
                    },
                    change,
                ))
            }
            _ => Err(Refusal {
                reason: self.reason.clone().unwrap_or(Reason::OpenElapsed),
                retry_after: Duration::ZERO,
            }),
        }
    }

    /// Moves an open breaker whose period passed to half-open, with no call waiting (a
    /// periodic tick, so that the state shown is true even without traffic).
    pub fn tick(&mut self, now: Instant) -> Option<Change> {
        let t = self.clock(now);
        (self.state == State::Open && t >= self.open_until).then(|| self.half_open(t))
    }

    /// Records a call's result. `latency` decides whether it was slow.
    pub fn record(
        &mut self,
        permit: Permit,
        mark: Mark,
        latency: Duration,
        now: Instant,
    ) -> Option<Change> {
        let t = self.clock(now);
        self.last_active = t;
        if permit.generation != self.generation {
            return None;
        }
        if mark == Mark::Neutral {
            self.release(permit);
            return None;
        }
        let slow = self.is_slow(t, latency);
        // The baseline learns from good calls only: slow calls feeding it would raise the
        // threshold until nothing is slow any more.
        if mark == Mark::Success
            && !slow
            && let Some(l) = &mut self.latency
        {
            l.record(t, latency);
        }
        let failed = mark == Mark::Failure;
        match self.state {
            State::Closed => {
                self.count(t, failed, slow);
                self.trip_reason(t).map(|r| self.open(t, r, 0))
            }
            State::HalfOpen if permit.probe => {
                self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
                // A slow probe fails it, when slowness is a reason to open.
                if failed || (slow && self.policy.slow_ratio > 0.0) {
                    let level = self.backoff_level.saturating_add(1);
                    Some(self.open(t, Reason::ProbeFailed, level))
                } else {
                    self.probe_successes += 1;
                    (self.probe_successes >= self.policy.half_open_successes)
                        .then(|| self.close(t, Reason::ProbesSucceeded))
                }
            }
            _ => None,
        }
    }

    /// A failure of a call admitted without a permit (a client that had no breaker yet):
    /// counted, and judged, as any failure of a closed breaker.
    pub fn count_failure(&mut self, now: Instant) -> Option<Change> {
        let t = self.clock(now);
        self.last_active = t;
        if self.state != State::Closed {
            return None;
        }
        self.count(t, true, false);
        self.trip_reason(t).map(|r| self.open(t, r, 0))
    }

    /// Gives a permit back without a result (the call was abandoned).
    pub fn release(&mut self, permit: Permit) {
        if permit.probe && permit.generation == self.generation && self.state == State::HalfOpen {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
    }

    /// An outside signal about what this breaker guards.
    pub fn signal(
        &mut self,
        now: Instant,
        kind: SignalKind,
        action: SignalAction,
    ) -> Option<Change> {
        let t = self.clock(now);
        let reason = Reason::Signal(kind);
        match (self.state, action) {
            (State::Closed, SignalAction::Trip) => Some(self.open(t, reason, 0)),
            (State::HalfOpen, SignalAction::Trip) => {
                let level = self.backoff_level.saturating_add(1);
                Some(self.open(t, reason, level))
            }
            (State::Closed, SignalAction::CountFailure) => {
                self.count(t, true, false);
                self.trip_reason(t).map(|_| self.open(t, reason, 0))
            }
            _ => None,
        }
    }

    /// An operator opens the breaker (for one open period) ...
    pub fn force_open(&mut self, now: Instant) -> Option<Change> {
        let t = self.clock(now);
        (self.state != State::Open).then(|| self.open(t, Reason::Admin, self.backoff_level))
    }

    /// ... or closes it.
    pub fn force_close(&mut self, now: Instant) -> Option<Change> {
        let t = self.clock(now);
        (self.state != State::Closed).then(|| self.close(t, Reason::Admin))
    }

    pub fn figures(&mut self, now: Instant) -> Figures {
        let t = self.clock(now);
        let slow_threshold = self.slow_threshold(t);
        Figures {
            state: self.state,
            reason: self.reason.clone(),
            window: self.window.counts(t),
            consecutive_failures: self.consecutive,
            slow_threshold_us: slow_threshold.map(|d| d.as_micros() as u64),
            p95_us: self
                .latency
                .as_mut()
                .and_then(|l| l.p95(t))
                .map(|d| d.as_micros() as u64),
            open_remaining_ms: (self.state == State::Open)
                .then(|| self.open_until.saturating_sub(t) / 1_000_000),
            probes_in_flight: self.probes_in_flight,
            backoff_level: self.backoff_level,
            trips: self.trips,
        }
    }

    fn count(&mut self, t: u64, failed: bool, slow: bool) {
        self.window.record(t, failed, slow);
        self.consecutive = if failed {
            self.consecutive.saturating_add(1)
        } else {
            0
        };
    }

    /// The first rule the closed breaker now breaks, if any.
    fn trip_reason(&mut self, t: u64) -> Option<Reason> {
        let p = &self.policy;
        if p.consecutive_failures > 0 && self.consecutive >= p.consecutive_failures {
            return Some(Reason::ConsecutiveFailures);
        }
        let c = self.window.counts(t);
        if c.calls < p.min_requests.max(1) {
            return None;
        }
        if p.failure_ratio > 0.0 && c.failure_ratio() >= p.failure_ratio {
            return Some(Reason::FailureRatio);
        }
        if p.slow_ratio > 0.0 && c.slow_ratio() >= p.slow_ratio {
            return Some(Reason::SlowCallRatio);
        }
        None
    }

    fn slow_threshold(&mut self, t: u64) -> Option<Duration> {
        if self.policy.slow_ratio <= 0.0 {
            return None;
        }
        match self.policy.slow_threshold {
            SlowThreshold::Fixed(d) => Some(d),
            SlowThreshold::Adaptive { factor, floor } => {
                let p95 = self.latency.as_mut()?.p95(t)?;
                Some(scale(p95, factor).max(floor))
            }
        }
    }

    fn is_slow(&mut self, t: u64, latency: Duration) -> bool {
        self.slow_threshold(t).is_some_and(|th| latency > th)
    }

    fn change(&mut self, to: State, reason: Reason, t: u64, open_for: Option<Duration>) -> Change {
        let from = self.state;
        self.state = to;
        self.reason = Some(reason.clone());
        self.generation += 1;
        self.probes_in_flight = 0;
        self.probe_successes = 0;
        Change {
            from,
            to,
            reason,
            open_for,
            counts: self.window.counts(t),
            consecutive_failures: self.consecutive,
            generation: self.generation,
        }
    }

    fn open(&mut self, t: u64, reason: Reason, level: u32) -> Change {
        let p = &self.policy;
        let full =
            scale(p.open_for, p.backoff_multiplier.powi(level.min(64) as i32)).min(p.max_open_for);
        let open_for = scale(full, 1.0 - p.jitter * self.rng.f64());
        self.backoff_level = level;
        self.open_until = t.saturating_add(nanos(open_for));
        self.trips += 1;
        self.change(State::Open, reason, t, Some(open_for))
    }

    fn half_open(&mut self, t: u64) -> Change {
        self.change(State::HalfOpen, Reason::OpenElapsed, t, None)
    }

    fn close(&mut self, t: u64, reason: Reason) -> Change {
        self.backoff_level = 0;
        self.consecutive = 0;
        self.window.clear();
        self.change(State::Closed, reason, t, None)
    }
}

#[cfg(test)]
mod tests;
