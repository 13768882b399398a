//! Go stop-the-world pauses.
//!
//! The kernel reports three instants per pause: stop (entry of `stopTheWorldWithSema`),
//! restart (entry of `startTheWorldWithSema`) and end (its return). The Go runtime's own
//! accounting (gctrace, runtime/metrics) ends a GC mark-termination pause at restart and every
//! other pause after the world is restarted, near end. `duration_ns` follows the runtime, so it
//! agrees with what Go users already read; `world_stopped_ns` is the whole interval.

use agent_common::events::GoStwEvent;
use serde::Serialize;

use super::{DecodeError, comm_str, read_record};

#[derive(Clone, Debug)]
pub struct GoStwPause {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub stop_ns: u64,
    /// 0 when the probe at `startTheWorldWithSema` entry did not fire.
    pub restart_ns: u64,
    pub end_ns: u64,
    pub stop_arg: u64,
    pub start_arg: u64,
    /// Who the probes that saw the pause were attached for.
    pub cookie: StwCookie,
}

/// The attach cookie of a binary's STW probes: the agent's id for the binary and its Go minor
/// version. The kernel hands it back with every pause, so a pause is interpreted with the Go
/// version of the binary that made it, even before the agent has registered the process (a
/// binary's probes serve every process that runs it from the moment they are attached).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StwCookie {
    /// 0: no cookie (not attached by this agent, or a kernel without attach cookies).
    pub binary: u32,
    pub go_minor: Option<u32>,
}

impl StwCookie {
    /// Binary id in the high half; the low half is the Go minor version plus one (0: unknown).
    pub const fn encode(self) -> u64 {
        let minor = match self.go_minor {
            Some(m) if m < u32::MAX => m + 1,
            _ => 0,
        };
        ((self.binary as u64) << 32) | minor as u64
    }

    pub const fn decode(cookie: u64) -> Self {
        let minor = cookie as u32;
        Self {
            binary: (cookie >> 32) as u32,
            go_minor: if minor == 0 { None } else { Some(minor - 1) },
        }
    }
}

/// A pause interpreted with the Go version of its process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StwView {
    /// Why the world stopped, when the Go version says: the `stwReason` (Go 1.21+), or for
    /// Go 1.17 to 1.20 "GC mark termination" inferred from `startTheWorldWithSema(true)` (this
    /// assumes runtime/trace is not running, which passes true for every GC pause).
    pub reason: Option<&'static str>,
    /// The pause as the Go runtime accounts it (what GODEBUG=gctrace=1 prints).
    pub duration_ns: u64,
    /// From stopping the world until it runs again.
    pub world_stopped_ns: u64,
}

pub const MARK_TERMINATION: &str = "GC mark termination";

pub fn decode(bytes: &[u8]) -> Result<GoStwPause, DecodeError> {
    let ev: GoStwEvent = read_record(bytes, "go stw")?;
    Ok(GoStwPause {
        pid: ev.pid,
        tid: ev.tid,
        comm: comm_str(&ev.comm),
        stop_ns: ev.stop_ns,
        restart_ns: ev.restart_ns,
        end_ns: ev.end_ns,
        stop_arg: ev.stop_arg,
        start_arg: ev.start_arg,
        cookie: StwCookie::decode(ev.cookie),
    })
}

impl GoStwPause {
    /// Interprets the pause for a process running Go `1.<go_minor>` (None: unknown version).
    pub fn view(&self, go_minor: Option<u32>) -> StwView {
        let world_stopped_ns = self.end_ns.saturating_sub(self.stop_ns);
        let reason = match go_minor {
            Some(minor) if minor >= 21 => stw_reason(self.stop_arg),
            // Register ABI, before stwReason: only `emitTraceEvent` tells mark termination.
            Some(17..=20) if self.start_arg & 0xff == 1 => Some(MARK_TERMINATION),
            _ => None,
        };
        let duration_ns = if reason == Some(MARK_TERMINATION) && self.restart_ns != 0 {
            self.restart_ns.saturating_sub(self.stop_ns)
        } else {
            world_stopped_ns
        };
        StwView {
            reason,
            duration_ns,
            world_stopped_ns,
        }
    }
}

/// `stwReasonStrings` of `runtime/proc.go` (Go 1.21+).
fn stw_reason(arg: u64) -> Option<&'static str> {
    Some(match arg {
        0 => "unknown",
        1 => MARK_TERMINATION,
        2 => "GC sweep termination",
        3 => "write heap dump",
        4 => "goroutine profile",
        5 => "goroutine profile cleanup",
        6 => "all goroutines stack trace",
        7 => "read mem stats",
        8 => "AllThreadsSyscall",
        9 => "GOMAXPROCS",
        10 => "start trace",
        11 => "stop trace",
        12 => "CountPagesInUse (test)",
        13 => "ReadMetricsSlow (test)",
        14 => "ReadMemStatsSlow (test)",
        15 => "PageCachePagesLeaked (test)",
        16 => "ResetDebugLog (test)",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(stop_arg: u64, start_arg: u64) -> GoStwPause {
        GoStwPause {
            pid: 1,
            tid: 1,
            comm: String::new(),
            stop_ns: 1_000,
            restart_ns: 31_000,
            end_ns: 101_000,
            stop_arg,
            start_arg,
            cookie: StwCookie::default(),
        }
    }

    #[test]
    fn cookie_round_trip() {
        for c in [
            StwCookie {
                binary: 1,
                go_minor: Some(19),
            },
            StwCookie {
                binary: u32::MAX,
                go_minor: Some(0),
            },
            StwCookie {
                binary: 7,
                go_minor: None,
            },
        ] {
            assert_eq!(StwCookie::decode(c.encode()), c);
        }
        assert_eq!(StwCookie::decode(0), StwCookie::default());
    }

    #[test]
    fn go_1_19_mark_termination_ends_at_restart() {
        let v = pause(0xdead, 1).view(Some(19));
        assert_eq!(v.reason, Some(MARK_TERMINATION));
        assert_eq!((v.duration_ns, v.world_stopped_ns), (30_000, 100_000));
    }

    #[test]
    fn go_1_19_other_pauses_end_when_the_world_runs() {
        let v = pause(0xdead, 0).view(Some(19));
        assert_eq!(v.reason, None);
        assert_eq!(v.duration_ns, 100_000);
    }

    #[test]
    fn go_1_21_uses_stw_reason() {
        assert_eq!(
            pause(2, 1).view(Some(21)).reason,
            Some("GC sweep termination")
        );
        assert_eq!(pause(2, 1).view(Some(21)).duration_ns, 100_000);
        assert_eq!(pause(1, 0).view(Some(22)).duration_ns, 30_000);
        assert_eq!(pause(999, 0).view(Some(22)).reason, None);
    }

    #[test]
    fn unknown_version_or_missing_restart_reports_the_whole_pause() {
        assert_eq!(pause(1, 1).view(None).duration_ns, 100_000);
        let mut p = pause(0, 1);
        p.restart_ns = 0;
        assert_eq!(p.view(Some(19)).duration_ns, 100_000);
    }
}
