//! Maps and load-time constants shared by every program.

use agent_common::{
    counters::{COUNTER_SLOTS, Counter},
    events::EventHeader,
    layout::KernelLayout,
};
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};

/// Default size; the agent may resize it at load time (`--ring-buffer-bytes`).
const EVENTS_BYTES: u32 = 16 * 1024 * 1024;

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Exec and exit of processes, for Go process discovery alone: a ring of its own so that a flood
/// of other signals (or a slow consumer of them) never delays or drops a new process.
#[map]
pub static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Offsets resolved by the agent from BTF and tracefs before loading; see `KernelLayout`.
#[unsafe(no_mangle)]
static LAYOUT: KernelLayout = KernelLayout::UNKNOWN;

/// Reads the load-time layout. Volatile so the compiler does not fold the placeholder values:
/// the agent rewrites `.rodata` before the verifier sees the program.
#[inline(always)]
pub fn layout() -> KernelLayout {
    // SAFETY: LAYOUT is a plain static; reading it is always valid.
    unsafe { core::ptr::read_volatile(&raw const LAYOUT) }
}

#[inline(always)]
pub fn bump(counter: Counter) {
    bump_by(counter, 1);
}

#[inline(always)]
pub fn bump_by(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += n };
    }
}

#[inline(always)]
pub fn header(kind: u32) -> EventHeader {
    EventHeader {
        kind,
        // SAFETY: plain helper calls without arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Submit flags for a record of `record_bytes` about to be written to `EVENTS`.
///
/// Waking the agent for every record costs an irq_work (a self-IPI; in a VM an exit to the
/// hypervisor) in the producing task plus an agent wake-up per event: at ~1000 Go GC pauses a
/// second that alone slowed the Go program measurably. The agent reads the ring on a short timer
/// anyway, so records are written without a wake-up, except the one that takes the ring past
/// 1/16 full: a burst is read at once and never waits for the timer to fill the ring.
#[inline(always)]
pub fn wakeup_flags(record_bytes: u64) -> u64 {
    let waiting = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let threshold = EVENTS.query(u64::from(BPF_RB_RING_SIZE)) / 16;
    // 8 bytes of record header in the ring.
    if waiting < threshold && waiting + record_bytes + 8 >= threshold {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}
