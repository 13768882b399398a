//! The `[signals]` section: which probes `agent run` attaches and what each kernel signal does
//! to the breakers.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::probes::{ProbeName, pipeline::DEFAULT_RING_POLL_INTERVAL};

/// What a kernel signal does to the breaker of what it is about.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalUse {
    /// Open the breaker at once.
    Trip,
    /// Count as one failed call (the breaker's own rules decide).
    Count,
    /// Only attach it as evidence to the breaker's next transition.
    Annotate,
    /// Ignore it (still counted in the agent's signal figures).
    Off,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SignalsConfig {
    /// Probes to attach: `tcp-reset`, `h2-frames`, `go-gc`. Empty: no kernel signals.
    pub probes: Vec<ProbeName>,
    /// A TCP reset from an upstream on one of the proxy's connections to it.
    pub upstream_tcp_reset: SignalUse,
    /// GOAWAY from an upstream with an error code (GOAWAY with NO_ERROR is a graceful drain:
    /// only evidence).
    pub upstream_goaway: SignalUse,
    /// RST_STREAM from an upstream, except NO_ERROR, CANCEL and REFUSED_STREAM (an ordinary
    /// end, a cancellation, and a refusal the proxy retries). The proxy counts the stream's
    /// failure itself, so the default only annotates.
    pub upstream_rst_stream: SignalUse,
    /// A Go stop-the-world pause of the process serving an upstream endpoint, at least
    /// `stw_threshold` long.
    pub upstream_stw: SignalUse,
    pub stw_threshold: String,
    /// A client resetting more than `rapid_reset_rate` streams a second on one connection
    /// (CVE-2023-44487): the breaker of that client's key.
    pub rapid_reset: SignalUse,
    pub rapid_reset_rate: u32,
    /// Size of the kernel ring buffer (a power of two of at least 4096).
    pub ring_buffer_bytes: u32,
    /// The most a signal waits in the ring before the agent reads it (TCP resets wake it at
    /// once; process starts and exits have a ring of their own, read at once).
    pub ring_poll_interval: String,
    /// h2-frames: the cgroup v2 directory to attach to (default: the root, every socket).
    pub cgroup: Option<PathBuf>,
    /// h2-frames: attach with TC to these interfaces instead.
    pub tc_interfaces: Vec<String>,
    /// go-gc: how long a Go binary's probes stay attached after its last process exits, so a
    /// restarted process has them at exec ("0s": release at once).
    pub go_linger: String,
    /// go-gc: expedite RCU grace periods (system-wide) while attaching a new Go binary, about
    /// a millisecond each: exec-to-attach about 1 ms instead of one grace period (10-35 ms).
    /// On unless switched off (real-time nodes that keep `rcu_normal`, where it does nothing).
    pub go_attach_expedited: bool,
}

impl Default for SignalsConfig {
    fn default() -> Self {
        Self {
            probes: vec![ProbeName::TcpReset, ProbeName::H2Frames, ProbeName::GoGc],
            upstream_tcp_reset: SignalUse::Trip,
            upstream_goaway: SignalUse::Count,
            upstream_rst_stream: SignalUse::Annotate,
            upstream_stw: SignalUse::Trip,
            stw_threshold: "50ms".into(),
            rapid_reset: SignalUse::Trip,
            rapid_reset_rate: 100,
            ring_buffer_bytes: 16 * 1024 * 1024,
            ring_poll_interval: DEFAULT_RING_POLL_INTERVAL.into(),
            cgroup: None,
            tc_interfaces: Vec::new(),
            go_linger: "60s".into(),
            go_attach_expedited: true,
        }
    }
}

/// The parts of [`SignalsConfig`] that needed parsing.
#[derive(Clone, Copy, Debug)]
pub struct Parsed {
    pub stw_threshold: Duration,
    pub ring_poll_interval: Duration,
    pub go_linger: Duration,
}

/// What is wrong in `[signals]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignalsError {
    #[error("signals.{key} {value:?}: {reason}")]
    Period {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("signals.ring_poll_interval must be between 1ms and 1s")]
    PollInterval,
    #[error("signals.ring_buffer_bytes must be a power of two of at least 4096")]
    RingSize,
    #[error("signals.rapid_reset_rate must be at least 1")]
    RapidResetRate,
}

impl SignalsConfig {
    pub fn check(&self) -> Result<Parsed, SignalsError> {
        let period = |key: &'static str, value: &str| {
            humantime::parse_duration(value).map_err(|e| SignalsError::Period {
                key,
                value: value.to_owned(),
                reason: e.to_string(),
            })
        };
        let stw_threshold = period("stw_threshold", &self.stw_threshold)?;
        let ring_poll_interval = period("ring_poll_interval", &self.ring_poll_interval)?;
        if !(Duration::from_millis(1)..=Duration::from_secs(1)).contains(&ring_poll_interval) {
            return Err(SignalsError::PollInterval);
        }
        if self.ring_buffer_bytes < 4096 || !self.ring_buffer_bytes.is_power_of_two() {
            return Err(SignalsError::RingSize);
        }
        if self.rapid_reset_rate == 0 {
            return Err(SignalsError::RapidResetRate);
        }
        let go_linger = period("go_linger", &self.go_linger)?;
        Ok(Parsed {
            stw_threshold,
            ring_poll_interval,
            go_linger,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_check_and_bad_values_are_named() {
        assert!(SignalsConfig::default().check().is_ok());
        let mut c = SignalsConfig {
            stw_threshold: "soon".into(),
            ..SignalsConfig::default()
        };
        assert!(
            c.check()
                .is_err_and(|e| e.to_string().contains("stw_threshold"))
        );
        c.stw_threshold = "1ms".into();
        c.ring_poll_interval = "5s".into();
        assert!(
            c.check()
                .is_err_and(|e| e.to_string().contains("ring_poll_interval"))
        );
        c.ring_poll_interval = "5ms".into();
        c.ring_buffer_bytes = 5000;
        assert!(
            c.check()
                .is_err_and(|e| e.to_string().contains("ring_buffer_bytes"))
        );
    }

    #[test]
    fn a_section_parses_from_toml() {
        let c: SignalsConfig = toml::from_str(
            "probes = [\"tcp-reset\"]\nupstream_stw = \"annotate\"\nstw_threshold = \"20us\"",
        )
        .unwrap_or_default();
        assert_eq!(c.probes, vec![ProbeName::TcpReset]);
        assert_eq!(c.upstream_stw, SignalUse::Annotate);
        assert_eq!(
            c.check().map(|p| p.stw_threshold).ok(),
            Some(Duration::from_micros(20))
        );
    }
}
