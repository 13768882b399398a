//! Rapid-reset detection (CVE-2023-44487): a client that opens streams and resets them faster
//! than a configured rate makes the server do work for requests nobody waits for.
//!
//! Per connection, a token bucket holds one second of the allowed rate; each RST_STREAM the
//! client sends takes a token. An empty bucket means the client has sustained more than the
//! rate (with a one-second burst allowance): one `rapid_reset` signal, then quiet for
//! `cooldown` so an attack yields a signal per cooldown, not one per reset. Time is the frame's
//! kernel timestamp, so the policy is testable without clocks.

use std::collections::HashMap;

use serde::Serialize;

use super::h2_frame::{Flow, H2Frame};

#[derive(Clone, Copy, Debug)]
pub struct RapidResetPolicy {
    /// Client RST_STREAM frames per second a connection may sustain.
    pub max_resets_per_sec: u32,
    /// Quiet time after a signal for the same connection.
    pub cooldown_ns: u64,
}

/// The signal: `flow` is the client-to-server direction of the connection.
#[derive(Clone, Debug, Serialize)]
pub struct RapidReset {
    /// CLOCK_MONOTONIC nanoseconds of the reset that tripped the detector.
    pub ktime_ns: u64,
    #[serde(flatten)]
    pub flow: Flow,
    /// Client resets seen on the connection so far, and over the last second.
    pub resets_total: u64,
    pub resets_last_second: u64,
    pub max_resets_per_sec: u32,
}

struct Bucket {
    tokens: f64,
    last_ns: u64,
    quiet_until_ns: u64,
    total: u64,
    /// Resets in the current one-second window, and the window's start.
    window_start_ns: u64,
    window: u64,
    last_window: u64,
}

pub struct RapidResetDetector {
    policy: RapidResetPolicy,
    buckets: HashMap<Flow, Bucket>,
}

/// Connections remembered at most; the oldest half is dropped beyond (a bounded map under a
/// flood of connections).
const MAX_CONNECTIONS: usize = 65536;
const SECOND_NS: u64 = 1_000_000_000;

impl RapidResetDetector {
    pub fn new(policy: RapidResetPolicy) -> Self {
        Self {
            policy,
            buckets: HashMap::new(),
        }
    }

    /// Feeds one frame; returns a signal when this reset drained the connection's bucket.
    pub fn observe(&mut self, frame: &H2Frame) -> Option<RapidReset> {
        // Resets by the server are its own business (refusing streams, cancelling pushes).
        if frame.type_id != agent_common::h2::frame_type::RST_STREAM
            || frame.sender == Some("server")
        {
            return None;
        }
        let now = frame.ktime_ns;
        let rate = f64::from(self.policy.max_resets_per_sec.max(1));
        if self.buckets.len() >= MAX_CONNECTIONS && !self.buckets.contains_key(&frame.flow) {
            self.evict_idle(now);
        }
        let b = self.buckets.entry(frame.flow).or_insert(Bucket {
            tokens: rate,
            last_ns: now,
            quiet_until_ns: 0,
            total: 0,
            window_start_ns: now,
            window: 0,
            last_window: 0,
        });
        let elapsed = now.saturating_sub(b.last_ns) as f64 / SECOND_NS as f64;
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.last_ns = now;
        b.total += 1;
        if now.saturating_sub(b.window_start_ns) >= SECOND_NS {
            b.last_window = b.window;
            b.window = 0;
            b.window_start_ns = now;
        }
        b.window += 1;
        b.tokens -= 1.0;
        if b.tokens >= 0.0 || now < b.quiet_until_ns {
            return None;
        }
        b.quiet_until_ns = now.saturating_add(self.policy.cooldown_ns);
        Some(RapidReset {
            ktime_ns: now,
            flow: frame.flow,
            resets_total: b.total,
            resets_last_second: b.window.max(b.last_window),
            max_resets_per_sec: self.policy.max_resets_per_sec,
        })
    }

    fn evict_idle(&mut self, now: u64) {
        let mut ages: Vec<u64> = self.buckets.values().map(|b| b.last_ns).collect();
        ages.sort_unstable();
        let cutoff = ages.get(ages.len() / 2).copied().unwrap_or(now);
        self.buckets.retain(|_, b| b.last_ns > cutoff);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::signals::h2_frame::FrameDetail;

    fn reset(t_ns: u64, sender: Option<&'static str>) -> H2Frame {
        H2Frame {
            ktime_ns: t_ns,
            flow: Flow {
                src: "127.0.0.1:40000".parse().unwrap(),
                dst: "127.0.0.1:8080".parse().unwrap(),
            },
            direction: "egress",
            hook: "cgroup",
            sender,
            frame_type: "RST_STREAM",
            type_id: 3,
            flags: 0,
            length: 4,
            stream_id: 1,
            detail: FrameDetail::Other {},
            cgroup_id: None,
        }
    }

    fn policy() -> RapidResetPolicy {
        RapidResetPolicy {
            max_resets_per_sec: 100,
            cooldown_ns: 10 * SECOND_NS,
        }
    }

    #[test]
    fn a_thousand_resets_per_second_trip_within_a_second() {
        let mut d = RapidResetDetector::new(policy());
        let first = (0..1000u64).find_map(|i| d.observe(&reset(i * 1_000_000, Some("client"))));
        let signal = first.expect("no signal for 1000 resets/s");
        assert!(signal.ktime_ns < SECOND_NS, "{}", signal.ktime_ns);
        // A bucket of 100, refilled by 0.1 per millisecond: empty after about 111 resets.
        assert!(
            (110..=113).contains(&signal.resets_total),
            "{}",
            signal.resets_total
        );
    }

    #[test]
    fn resets_at_the_allowed_rate_never_trip() {
        let mut d = RapidResetDetector::new(policy());
        // 99 per second for a minute.
        let n = (0..99 * 60u64)
            .filter_map(|i| d.observe(&reset(i * SECOND_NS / 99, None)))
            .count();
        assert_eq!(n, 0);
    }

    #[test]
    fn one_signal_per_cooldown_and_server_resets_ignored() {
        let mut d = RapidResetDetector::new(policy());
        let n = (0..5000u64)
            .filter_map(|i| d.observe(&reset(i * 1_000_000, Some("client"))))
            .count();
        assert_eq!(n, 1, "5 s of attack inside one 10 s cooldown");
        let mut d = RapidResetDetector::new(policy());
        let n = (0..5000u64)
            .filter_map(|i| d.observe(&reset(i * 1_000_000, Some("server"))))
            .count();
        assert_eq!(n, 0);
    }
}
