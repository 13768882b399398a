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
    /// HTTP/2 frames followed (all types).
    H2Frames = 10,
    /// HTTP/2 frame events not delivered (ring buffer full).
    H2FramesDropped = 11,
    /// TCP segments with payload on tracked flows, and those skipped because their bytes
    /// had been followed already (loopback: every segment passes egress, then ingress).
    H2Segments = 12,
    H2SegmentsSeen = 13,
    /// Segments of lost flows that could not be followed (bytes not parsed).
    H2SegmentsNotFollowed = 14,
    /// Flows lost, by reason.
    H2LostGap = 15,
    H2LostOversize = 16,
    H2LostBudget = 17,
    H2LostUnreadable = 18,
    /// Flows started by a client preface, and picked up at a plausible frame header.
    H2Prefaces = 19,
    H2Syncs = 20,
    /// `H2_FLOWS` could not take a new flow.
    H2FlowsFull = 21,
    /// Flow-change events not delivered.
    H2FlowEventsDropped = 22,
}

/// Size of the `COUNTERS` array; room to grow without resizing the map.
pub const COUNTER_SLOTS: u32 = 32;

impl Counter {
    pub const ALL: [Counter; 23] = [
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
        Counter::H2Frames,
        Counter::H2FramesDropped,
        Counter::H2Segments,
        Counter::H2SegmentsSeen,
        Counter::H2SegmentsNotFollowed,
        Counter::H2LostGap,
        Counter::H2LostOversize,
        Counter::H2LostBudget,
        Counter::H2LostUnreadable,
        Counter::H2Prefaces,
        Counter::H2Syncs,
        Counter::H2FlowsFull,
        Counter::H2FlowEventsDropped,
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
            Counter::H2Frames => "h2_frames",
            Counter::H2FramesDropped => "h2_frames_dropped",
            Counter::H2Segments => "h2_segments",
            Counter::H2SegmentsSeen => "h2_segments_already_seen",
            Counter::H2SegmentsNotFollowed => "h2_segments_not_followed",
            Counter::H2LostGap => "h2_lost_gap",
            Counter::H2LostOversize => "h2_lost_oversize",
            Counter::H2LostBudget => "h2_lost_budget",
            Counter::H2LostUnreadable => "h2_lost_unreadable",
            Counter::H2Prefaces => "h2_prefaces",
            Counter::H2Syncs => "h2_syncs",
            Counter::H2FlowsFull => "h2_flows_full",
            Counter::H2FlowEventsDropped => "h2_flow_events_dropped",
        }
    }
}
