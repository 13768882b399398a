//! Kernel programs of the agent, one module per signal family.
//!
//! All programs write to one ring buffer (`EVENTS`) and count what they see and what they could
//! not deliver in one per-CPU array (`COUNTERS`).
#![no_std]
#![no_main]

mod go_runtime;
mod h2_frames;
mod maps;
mod tcp_reset;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_probe_read_kernel and the tracepoint helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
