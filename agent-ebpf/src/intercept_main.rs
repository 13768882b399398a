//! Kernel programs of transparent interception, an object of their own (`agent-intercept`):
//! loaded only when `[intercept]` is configured, and without the signal programs' maps.
#![no_std]
#![no_main]

mod intercept;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The same license as the signal programs' object.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
