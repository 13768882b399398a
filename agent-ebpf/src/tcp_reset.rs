//! TCP resets, sent and received: tracepoints `tcp/tcp_send_reset` and `tcp/tcp_receive_reset`.
//!
//! The record is copied raw and decoded in userspace with tracefs' field offsets. Here we only
//! add what userspace cannot get afterwards: the task (when there really is one), and the
//! socket's network namespace, state and cgroup, read through BTF-resolved offsets.

use agent_common::{
    COMM_LEN,
    counters::Counter,
    events::{EventKind, ResetDirection, TP_RECORD_MAX, TcpResetEvent},
    layout::{KernelLayout, UNKNOWN_OFFSET},
};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated},
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};

use crate::maps::{EVENTS, bump, header, layout};

/// 1 while this CPU serves a softirq. Resets are often sent and always received in softirq
/// context, where the "current" task is whoever was interrupted: its pid would be a lie.
#[map]
static IN_SOFTIRQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[tracepoint(category = "irq", name = "softirq_entry")]
pub fn softirq_entry(_ctx: TracePointContext) -> u32 {
    set_in_softirq(1);
    0
}

#[tracepoint(category = "irq", name = "softirq_exit")]
pub fn softirq_exit(_ctx: TracePointContext) -> u32 {
    set_in_softirq(0);
    0
}

#[inline(always)]
fn set_in_softirq(v: u32) {
    if let Some(slot) = IN_SOFTIRQ.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *slot = v };
    }
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    match try_reset(&ctx, ResetDirection::Sent) {
        Ok(()) | Err(()) => 0,
    }
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    match try_reset(&ctx, ResetDirection::Received) {
        Ok(()) | Err(()) => 0,
    }
}

/// Socket states whose `struct sock` is not a full socket (no `sk_cgrp_data`).
const TCP_TIME_WAIT: u32 = 6;
const TCP_NEW_SYN_RECV: u32 = 12;

fn try_reset(ctx: &TracePointContext, direction: ResetDirection) -> Result<(), ()> {
    let l = layout();
    let (seen, skaddr_off, skbaddr_off, len) = match direction {
        ResetDirection::Sent => (
            Counter::TcpResetSent,
            l.send_reset_skaddr,
            l.send_reset_skbaddr,
            l.send_reset_len,
        ),
        ResetDirection::Received => (
            Counter::TcpResetReceived,
            l.recv_reset_skaddr,
            UNKNOWN_OFFSET,
            l.recv_reset_len,
        ),
    };
    bump(seen);

    let Some(mut entry) = EVENTS.reserve::<TcpResetEvent>(0) else {
        bump(Counter::TcpResetDropped);
        return Err(());
    };
    let ev = entry.as_mut_ptr();
    let in_softirq = IN_SOFTIRQ.get(0).copied().unwrap_or(1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let len = if len as usize > TP_RECORD_MAX {
        TP_RECORD_MAX as u32
    } else {
        len
    };

    // SAFETY: `ev` points to a reservation of exactly size_of::<TcpResetEvent>() bytes, which
    // we fill completely before submitting.
    unsafe {
        (*ev).header = header(EventKind::TcpReset as u32);
        (*ev).direction = direction as u32;
        (*ev).task_context = u32::from(in_softirq == 0);
        (*ev).pid = (pid_tgid >> 32) as u32;
        (*ev).tid = pid_tgid as u32;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
        (*ev).netns_ino = 0;
        (*ev).sk_state = u32::MAX;
        (*ev).cgroup_id = 0;
        (*ev)._pad = 0;
        (*ev).record = [0u8; TP_RECORD_MAX];
        let copied = generated::bpf_probe_read_kernel(
            (&raw mut (*ev).record).cast(),
            len,
            ctx.as_ptr().cast_const(),
        );
        (*ev).record_len = if copied == 0 { len } else { 0 };

        let sk: u64 = read_field(ctx.as_ptr() as u64, skaddr_off).unwrap_or(0);
        if sk != 0 {
            socket_facts(&l, sk, &mut *ev);
        } else {
            // A reset sent for a segment that has no socket (e.g. a SYN to a closed port):
            // the namespace is the receiving device's.
            let skb: u64 = read_field(ctx.as_ptr() as u64, skbaddr_off).unwrap_or(0);
            let dev: u64 = read_field(skb, l.skb_dev).unwrap_or(0);
            let net: u64 = read_field(dev, l.net_device_net).unwrap_or(0);
            (*ev).netns_ino = read_field(net, l.net_inum).unwrap_or(0);
        }
    }
    // Woken at once (flags 0: the kernel wakes the reader if it had caught up): a reset can
    // trip a breaker, and resets are rare next to frames and GC pauses. A reset storm still
    // wakes the reader at most once per drain.
    entry.submit(0);
    Ok(())
}

/// Namespace, state and cgroup of a socket.
#[inline(always)]
fn socket_facts(l: &KernelLayout, sk: u64, ev: &mut TcpResetEvent) {
    let net: u64 = read_field(sk, l.sock_net).unwrap_or(0);
    ev.netns_ino = read_field(net, l.net_inum).unwrap_or(0);
    let state: u8 = match read_field(sk, l.sock_state) {
        Some(s) => s,
        None => return,
    };
    ev.sk_state = u32::from(state);
    if ev.sk_state == TCP_TIME_WAIT || ev.sk_state == TCP_NEW_SYN_RECV {
        return;
    }
    let cgroup: u64 = read_field(sk, l.sock_cgroup).unwrap_or(0);
    let kn: u64 = read_field(cgroup, l.cgroup_kn).unwrap_or(0);
    ev.cgroup_id = read_field(kn, l.kernfs_node_id).unwrap_or(0);
}

/// Reads a `T` at `base + offset` in kernel memory; None when the base is null, the offset
/// unknown, or the read faults.
#[inline(always)]
fn read_field<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == UNKNOWN_OFFSET {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T).ok() }
}
