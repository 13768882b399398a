//! Wire types shared by the kernel programs (`agent-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` and `Copy`: these structs cross the ring buffer and the map
//! boundary byte for byte. Kinds and counter indexes are explicit numbers that are never reused,
//! so an agent can always tell what a record is, whatever version of the kernel object wrote it.
#![no_std]

pub mod counters;
pub mod events;
pub mod h2;
pub mod intercept;
pub mod layout;

/// Length of a task's `comm` in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
