//! Records written to the `EVENTS` ring buffer. Each begins with an [`EventHeader`].

use crate::COMM_LEN;

/// What a ring-buffer record is. The values are the wire format: append, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    TcpReset = 1,
    GoStw = 2,
    ProcessExec = 3,
    ProcessExit = 4,
    /// [`crate::h2::H2FrameEvent`]
    H2Frame = 5,
    /// [`crate::h2::H2FlowEvent`]
    H2Flow = 6,
    /// [`crate::h2::H2FrameBatchEvent`]
    H2FrameBatch = 7,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::TcpReset),
            2 => Some(Self::GoStw),
            3 => Some(Self::ProcessExec),
            4 => Some(Self::ProcessExit),
            5 => Some(Self::H2Frame),
            6 => Some(Self::H2Flow),
            7 => Some(Self::H2FrameBatch),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    pub kind: u32,
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, nanoseconds.
    pub ktime_ns: u64,
}

/// Which tracepoint saw the reset.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetDirection {
    Sent = 0,
    Received = 1,
}

/// Largest tracepoint record the TCP reset programs copy. `tcp_send_reset` is 88 bytes and
/// `tcp_receive_reset` 72 on 6.18; older layouts are smaller.
pub const TP_RECORD_MAX: usize = 128;

/// A TCP reset seen by `tcp/tcp_send_reset` or `tcp/tcp_receive_reset`.
///
/// The tracepoint record is copied raw and decoded in userspace with the field offsets that
/// tracefs publishes for this kernel: the layout of these records changed in 6.10 and may change
/// again, and userspace can adapt where the kernel program cannot.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpResetEvent {
    pub header: EventHeader,
    /// A [`ResetDirection`].
    pub direction: u32,
    /// 1 when the program ran in task context (not serving a softirq): only then do `pid`,
    /// `tid` and `comm` name the task that caused the reset.
    pub task_context: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
    /// Inode number of the socket's network namespace (as in `/proc/PID/ns/net`); 0 unknown.
    pub netns_ino: u32,
    /// `sk->sk_state` read from the socket; `u32::MAX` when there is no socket.
    pub sk_state: u32,
    /// cgroup v2 id of the socket's cgroup; 0 unknown.
    pub cgroup_id: u64,
    /// Bytes of `record` that were copied.
    pub record_len: u32,
    pub _pad: u32,
    pub record: [u8; TP_RECORD_MAX],
}

/// One Go stop-the-world pause, from entry of `runtime.stopTheWorldWithSema` to a return of
/// `runtime.startTheWorldWithSema` in the same process. The entry of `startTheWorldWithSema`
/// is recorded too: the Go runtime itself ends some pauses there (mark termination) and others
/// after the world is restarted (sweep termination), and userspace reports both views.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoStwEvent {
    pub header: EventHeader,
    pub pid: u32,
    /// Thread that stopped the world.
    pub tid: u32,
    /// Entry of `stopTheWorldWithSema`.
    pub stop_ns: u64,
    /// Entry of `startTheWorldWithSema`; 0 if the probe there did not fire.
    pub restart_ns: u64,
    /// Return of `startTheWorldWithSema`.
    pub end_ns: u64,
    /// First integer argument register at `stopTheWorldWithSema`: the `stwReason` from Go
    /// 1.21 on (register ABI), meaningless before. Userspace interprets it by Go version.
    pub stop_arg: u64,
    /// First integer argument register at `startTheWorldWithSema`: `emitTraceEvent` (bool)
    /// in Go 1.17 to 1.20, true for mark termination.
    pub start_arg: u64,
    /// The attach cookie of the binary's probes: who the agent attached them for (its binary
    /// id and Go version, see `probes::go_processes::StwCookie`), so a pause is interpreted
    /// even before the agent has registered the process that paused.
    pub cookie: u64,
    pub comm: [u8; COMM_LEN],
}

/// A process called `execve`: the agent checks whether the new image is a Go binary. Written,
/// like [`ProcessExitEvent`], to the `PROCESS_EVENTS` ring, which only Go process discovery
/// reads: nothing else the agent does (printing, correlating) can hold up a new process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessExecEvent {
    pub header: EventHeader,
    pub pid: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
}

/// A process the agent tracks has exited (its whole thread group is dead).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessExitEvent {
    pub header: EventHeader,
    pub pid: u32,
    pub _pad: u32,
}

/// An STW pause in progress, keyed by tgid in `GO_STW_INFLIGHT`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StwStart {
    pub stop_ns: u64,
    pub stop_arg: u64,
    pub restart_ns: u64,
    pub start_arg: u64,
    pub tid: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, made of integers and byte arrays, and every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::StwStart {}
}
