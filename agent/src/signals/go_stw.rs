//! Go stop-the-world pauses.

use agent_common::events::GoStwEvent;
use serde::Serialize;

use super::{DecodeError, comm_str, read_record};

#[derive(Clone, Debug, Serialize)]
pub struct GoStwPause {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// CLOCK_MONOTONIC nanoseconds when the world was stopped.
    pub start_ns: u64,
    pub duration_ns: u64,
    /// Raw first argument of `stopTheWorldWithSema`; see [`stw_reason`].
    #[serde(skip)]
    pub reason_arg: u64,
}

pub fn decode(bytes: &[u8]) -> Result<GoStwPause, DecodeError> {
    let ev: GoStwEvent = read_record(bytes, "go stw")?;
    Ok(GoStwPause {
        pid: ev.pid,
        tid: ev.tid,
        comm: comm_str(&ev.comm),
        start_ns: ev.start_ns,
        duration_ns: ev.duration_ns,
        reason_arg: ev.reason_arg,
    })
}

/// The `stwReason` passed to `stopTheWorldWithSema` from Go 1.21 on (`runtime/proc.go`,
/// `stwReasonStrings`). Earlier versions pass none: the caller only asks for `go >= 1.21`.
pub fn stw_reason(go_minor: u32, arg: u64) -> Option<&'static str> {
    if go_minor < 21 {
        return None;
    }
    Some(match arg {
        0 => "unknown",
        1 => "GC mark termination",
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
