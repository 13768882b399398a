//! Indexes of the per-CPU `COUNTERS` array. Every event a program sees and every event it could
//! not deliver is counted here, so nothing is dropped silently.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    TcpResetSent = 0,
    TcpResetReceived = 1,
    /// Ring buffer full: a reset event was not delivered.
    TcpResetDropped = 2,
    GoStwPauses = 3,
    GoStwDropped = 4,
    /// `startTheWorldWithSema` without a matching stop (probe attached mid-pause).
    GoStwUnmatched = 5,
    /// `GO_STW_INFLIGHT` full: a pause start could not be recorded.
    GoStwInflightFull = 6,
    ProcessExecs = 7,
    ProcessExecDropped = 8,
    ProcessExitDropped = 9,
}

/// Size of the `COUNTERS` array; room to grow without resizing the map.
pub const COUNTER_SLOTS: u32 = 32;

impl Counter {
    pub const ALL: [Counter; 10] = [
        Counter::TcpResetSent,
        Counter::TcpResetReceived,
        Counter::TcpResetDropped,
        Counter::GoStwPauses,
        Counter::GoStwDropped,
        Counter::GoStwUnmatched,
        Counter::GoStwInflightFull,
        Counter::ProcessExecs,
        Counter::ProcessExecDropped,
        Counter::ProcessExitDropped,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::TcpResetSent => "tcp_reset_sent",
            Counter::TcpResetReceived => "tcp_reset_received",
            Counter::TcpResetDropped => "tcp_reset_dropped",
            Counter::GoStwPauses => "go_stw_pauses",
            Counter::GoStwDropped => "go_stw_dropped",
            Counter::GoStwUnmatched => "go_stw_unmatched",
            Counter::GoStwInflightFull => "go_stw_inflight_full",
            Counter::ProcessExecs => "process_execs",
            Counter::ProcessExecDropped => "process_exec_dropped",
            Counter::ProcessExitDropped => "process_exit_dropped",
        }
    }
}
