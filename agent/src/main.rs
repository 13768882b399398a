//! The agent: one binary for the daemon and its command-line tools.
//!
//! Modules follow the data path: `probes` (kernel programs) -> `signals` (typed kernel events)
//! -> ... -> `cli` (what a user runs).

mod api;
mod breaker;
mod cli;
mod context;
mod correlate;
mod events;
mod export;
mod probes;
mod proxy;
mod signals;

fn main() -> std::process::ExitCode {
    cli::main()
}
