//! Breaker policies: what trips a breaker, how long it stays open, how it is probed. One
//! [`Policy`] per breaker, made of the base policy, the scope's overrides and the priority
//! class's overrides, in that order (see [`PolicyOverrides::apply`]).

use std::time::Duration;

use serde::Deserialize;

/// The latency above which a call counts as slow.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SlowThreshold {
    /// A fixed latency.
    Fixed(Duration),
    /// `factor` times the breaker's own recent p95 (over `latency_window`), never below
    /// `floor`; until `min_latency_samples` calls were seen, no call counts as slow.
    Adaptive { factor: f64, floor: Duration },
}

/// An effective policy: every threshold resolved. A zero disables the rule it belongs to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Trip after this many failures in a row (0: never).
    pub consecutive_failures: u32,
    /// Trip when failures / calls in the window reach this (0: never).
    pub failure_ratio: f64,
    /// Trip when slow calls / calls in the window reach this (0: never).
    pub slow_ratio: f64,
    pub slow_threshold: SlowThreshold,
    /// The window the ratios are taken over, in `buckets` equal parts: a true sliding window,
    /// exact to one bucket (a call leaves the window between `window - window/buckets` and
    /// `window` after it ended).
    pub window: Duration,
    pub buckets: u32,
    /// No ratio trips the breaker before this many calls are in the window.
    pub min_requests: u32,
    /// The adaptive slow threshold's p95 is taken over this long.
    pub latency_window: Duration,
    pub min_latency_samples: u32,
    /// The first open period; each failed half-open try multiplies it by
    /// `backoff_multiplier`, up to `max_open_for`.
    pub open_for: Duration,
    pub max_open_for: Duration,
    pub backoff_multiplier: f64,
    /// Each open period is shortened by a random share of itself up to this (0..1), so that
    /// breakers that tripped together do not probe together.
    pub jitter: f64,
    /// Calls let through at once while half-open.
    pub half_open_probes: u32,
    /// Successful probes that close the breaker.
    pub half_open_successes: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            slow_ratio: 0.0,
            slow_threshold: SlowThreshold::Adaptive {
                factor: 3.0,
                floor: Duration::from_millis(20),
            },
            window: Duration::from_secs(10),
            buckets: 10,
            min_requests: 20,
            latency_window: Duration::from_secs(60),
            min_latency_samples: 100,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(120),
            backoff_multiplier: 2.0,
            jitter: 0.1,
            half_open_probes: 3,
            half_open_successes: 3,
        }
    }
}

/// A policy as written in the configuration: only what is given replaces the policy below.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyOverrides {
    /// `false` turns the breakers of this scope (or class) off.
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<u32>,
    pub failure_ratio: Option<f64>,
    pub slow_ratio: Option<f64>,
    /// `"adaptive"`, or a latency such as `"250ms"`.
    pub slow_threshold: Option<String>,
    pub slow_factor: Option<f64>,
    #[serde(default, with = "opt_duration")]
    pub slow_floor: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub window: Option<Duration>,
    pub buckets: Option<u32>,
    pub min_requests: Option<u32>,
    #[serde(default, with = "opt_duration")]
    pub latency_window: Option<Duration>,
    pub min_latency_samples: Option<u32>,
    #[serde(default, with = "opt_duration")]
    pub open_for: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub max_open_for: Option<Duration>,
    pub backoff_multiplier: Option<f64>,
    pub jitter: Option<f64>,
    pub half_open_probes: Option<u32>,
    pub half_open_successes: Option<u32>,
}

impl PolicyOverrides {
    /// `base` with what this gives replaced. Errors name the key.
    pub fn apply(&self, base: &Policy) -> Result<Policy, PolicyError> {
        let mut p = *base;
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { p.$field = v; } )* };
        }
        set!(
            consecutive_failures,
            failure_ratio,
            slow_ratio,
            window,
            buckets,
            min_requests,
            latency_window,
            min_latency_samples,
            open_for,
            max_open_for,
            backoff_multiplier,
            jitter,
            half_open_probes,
            half_open_successes
        );
        if let Some(t) = &self.slow_threshold {
            p.slow_threshold = if t == "adaptive" {
                match base.slow_threshold {
                    a @ SlowThreshold::Adaptive { .. } => a,
                    SlowThreshold::Fixed(_) => Policy::default().slow_threshold,
                }
            } else {
                SlowThreshold::Fixed(humantime::parse_duration(t).map_err(|reason| {
                    PolicyError::SlowThreshold {
                        text: t.clone(),
                        reason,
                    }
                })?)
            };
        }
        if let SlowThreshold::Adaptive { factor, floor } = &mut p.slow_threshold {
            if let Some(f) = self.slow_factor {
                *factor = f;
            }
            if let Some(f) = self.slow_floor {
                *floor = f;
            }
        }
        check(&p)?;
        Ok(p)
    }
}

/// A policy that cannot be: each names the key at fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("slow_threshold {text:?} is neither \"adaptive\" nor a duration ({reason})")]
    SlowThreshold {
        text: String,
        reason: humantime::DurationError,
    },
    /// `failure_ratio`, `slow_ratio` or `jitter` outside 0..=1.
    #[error("{key} must be between 0 and 1, not {value}")]
    Ratio { key: &'static str, value: f64 },
    #[error("buckets must be 1..=1000, not {0}")]
    Buckets(u32),
    #[error("window {window:?} is too short for {buckets} buckets (at least 1 ms each)")]
    WindowTooShort { window: Duration, buckets: u32 },
    #[error("latency_window must be at least 2ms")]
    LatencyWindow,
    #[error("open_for must be above 0 and max_open_for at least open_for")]
    OpenFor,
    #[error("backoff_multiplier must be at least 1")]
    BackoffMultiplier,
    #[error("half_open_probes and half_open_successes must be at least 1")]
    HalfOpen,
    #[error("slow_factor must be at least 1")]
    SlowFactor,
}

/// The rules a policy must keep, whatever it was made of.
fn check(p: &Policy) -> Result<(), PolicyError> {
    let ratio = |key: &'static str, value: f64| {
        if (0.0..=1.0).contains(&value) {
            Ok(())
        } else {
            Err(PolicyError::Ratio { key, value })
        }
    };
    ratio("failure_ratio", p.failure_ratio)?;
    ratio("slow_ratio", p.slow_ratio)?;
    ratio("jitter", p.jitter)?;
    if p.buckets == 0 || p.buckets > 1000 {
        return Err(PolicyError::Buckets(p.buckets));
    }
    if p.window < Duration::from_millis(u64::from(p.buckets)) {
        return Err(PolicyError::WindowTooShort {
            window: p.window,
            buckets: p.buckets,
        });
    }
    if p.latency_window < Duration::from_millis(2) {
        return Err(PolicyError::LatencyWindow);
    }
    if p.open_for.is_zero() || p.max_open_for < p.open_for {
        return Err(PolicyError::OpenFor);
    }
    if p.backoff_multiplier < 1.0 || !p.backoff_multiplier.is_finite() {
        return Err(PolicyError::BackoffMultiplier);
    }
    if p.half_open_probes == 0 || p.half_open_successes == 0 {
        return Err(PolicyError::HalfOpen);
    }
    if let SlowThreshold::Adaptive { factor, .. } = p.slow_threshold
        && (factor < 1.0 || !factor.is_finite())
    {
        return Err(PolicyError::SlowFactor);
    }
    Ok(())
}

/// Optional durations as text: "10s", "250ms".
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        humantime::parse_duration(&text).map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write e.g. \"10s\" or \"250ms\""
            ))
        })
    }
}
