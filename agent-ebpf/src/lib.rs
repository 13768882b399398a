// The programs live in the `agent` binary target (src/main.rs). This empty library exists so the
// agent's build script can depend on this crate and be rebuilt when it changes.
#![no_std]
