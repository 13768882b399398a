//! Go runtime stop-the-world pauses, and the process lifecycle the agent needs to find Go
//! programs (exec) and to release their probes (exit).
//!
//! Entry uprobes only: a uretprobe rewrites the return address on the goroutine stack, and Go
//! moves stacks, which crashes the process. Exits are probed at each return instruction. A
//! pause runs from entry of `runtime.stopTheWorldWithSema` to the return of
//! `runtime.startTheWorldWithSema` in the same process (the runtime allows one stop-the-world
//! at a time per process).

use agent_common::{
    COMM_LEN,
    counters::Counter,
    events::{EventKind, GoStwEvent, ProcessExecEvent, ProcessExitEvent, StwStart},
    layout::UNKNOWN_OFFSET,
};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, tracepoint, uprobe},
    maps::HashMap,
    programs::{ProbeContext, TracePointContext},
};

use crate::maps::{EVENTS, PROCESS_EVENTS, bump, header, layout, wakeup_flags};

/// Pauses in progress, by tgid.
#[map]
static GO_STW_INFLIGHT: HashMap<u32, StwStart> = HashMap::with_max_entries(16384, 0);

/// Processes whose exit the agent wants to hear about (it attached probes for them).
#[map]
static TRACKED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(65536, 0);

#[uprobe]
pub fn go_stw_stop(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let start = StwStart {
        // SAFETY: helper without arguments.
        stop_ns: unsafe { bpf_ktime_get_ns() },
        stop_arg: first_go_arg(&ctx),
        restart_ns: 0,
        start_arg: 0,
        tid: pid_tgid as u32,
        _pad: 0,
    };
    if GO_STW_INFLIGHT
        .insert((pid_tgid >> 32) as u32, start, 0)
        .is_err()
    {
        bump(Counter::GoStwInflightFull);
    }
    0
}

/// Entry of `startTheWorldWithSema`: the world is still stopped; note when restarting began.
#[uprobe]
pub fn go_stw_start(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(entry) = GO_STW_INFLIGHT.get_ptr_mut(tgid) else {
        bump(Counter::GoStwUnmatched);
        return 0;
    };
    // SAFETY: a valid map value pointer; only this process' STW thread touches its entry.
    unsafe {
        (*entry).restart_ns = bpf_ktime_get_ns();
        (*entry).start_arg = first_go_arg(&ctx);
    }
    0
}

/// Where `startTheWorldWithSema` has restarted the world: its call to `wakep` and each of its
/// return instructions (probed one by one: a uretprobe would rewrite a return address on a
/// stack Go may move). The first to fire emits the pause; later ones find no entry.
#[uprobe]
pub fn go_stw_start_return(ctx: ProbeContext) -> u32 {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: the value is copied out before the entry is removed.
    let Some(start) = (unsafe { GO_STW_INFLIGHT.get(tgid) }).copied() else {
        return 0;
    };
    let _ = GO_STW_INFLIGHT.remove(tgid);
    bump(Counter::GoStwPauses);
    let event = GoStwEvent {
        header: header(EventKind::GoStw as u32),
        pid: tgid,
        tid: start.tid,
        stop_ns: start.stop_ns,
        restart_ns: start.restart_ns,
        end_ns: now,
        stop_arg: start.stop_arg,
        start_arg: start.start_arg,
        // SAFETY: the context of a uprobe program, as the helper expects.
        cookie: unsafe { bpf_get_attach_cookie(ctx.as_ptr()) },
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
    };
    if EVENTS
        .output::<GoStwEvent>(&event, wakeup_flags(size_of::<GoStwEvent>() as u64))
        .is_err()
    {
        bump(Counter::GoStwDropped);
    }
    0
}

/// Go's register ABI (1.17+) passes the first integer argument in RAX on amd64 and in R0 on
/// arm64; the C-ABI accessor would read RDI.
#[inline(always)]
fn first_go_arg(ctx: &ProbeContext) -> u64 {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        // SAFETY: regs points to the probed task's saved registers.
        unsafe { (*ctx.regs).rax }
    }
    #[cfg(not(bpf_target_arch = "x86_64"))]
    {
        ctx.arg::<u64>(0).unwrap_or(0)
    }
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    bump(Counter::ProcessExecs);
    let event = ProcessExecEvent {
        header: header(EventKind::ProcessExec as u32),
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
    };
    // Woken at once (flags 0): the agent attaches to new Go processes, and every millisecond
    // before that is a pause it cannot see. An exec costs far more than the wake-up.
    if PROCESS_EVENTS
        .output::<ProcessExecEvent>(&event, 0)
        .is_err()
    {
        bump(Counter::ProcessExecDropped);
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let offset = layout().exit_group_dead;
    let group_dead = if offset == UNKNOWN_OFFSET {
        tgid == pid_tgid as u32
    } else {
        // SAFETY: offset is inside the tracepoint record (from tracefs).
        unsafe { bpf_probe_read_kernel((ctx.as_ptr() as *const u8).add(offset as usize)) }
            .map(|v: u8| v != 0)
            .unwrap_or(false)
    };
    if !group_dead {
        return 0;
    }
    // A process that dies mid-pause must not leave its entry behind.
    let _ = GO_STW_INFLIGHT.remove(tgid);
    // SAFETY: only checks presence.
    if unsafe { TRACKED_PIDS.get(tgid) }.is_none() {
        return 0;
    }
    let _ = TRACKED_PIDS.remove(tgid);
    let event = ProcessExitEvent {
        header: header(EventKind::ProcessExit as u32),
        pid: tgid,
        _pad: 0,
    };
    // Only processes the agent attached for: few, and each exit may release a binary's probes.
    if PROCESS_EVENTS
        .output::<ProcessExitEvent>(&event, 0)
        .is_err()
    {
        bump(Counter::ProcessExitDropped);
    }
    0
}
