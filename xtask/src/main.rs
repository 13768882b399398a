//! `cargo xtask`: orchestration only. Each subcommand is a module with a documented `Options`.

mod bench;
mod demo;
mod run;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Build, run, test and benchmark the agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install everything a fresh machine lacks (idempotent; seconds when nothing is missing).
    Setup(setup::Options),
    /// Set up, build the agent and run it with the given arguments (as root).
    Run(run::Options),
    /// Set up, then run every test: lints, unit tests, and the privileged end-to-end tests.
    Test(test::Options),
    /// Benchmarks, measured side by side against real peers: `cargo xtask bench probes`.
    Bench(bench::Options),
    /// The agent in front of two grpc-go upstreams under load, one fault after another (an
    /// upstream killed, GC pressure, expired tokens, rapid reset), its trips shown live (root).
    Demo(demo::Options),
    /// Internal to `bench probes`: make TCP resets in a network namespace of our own.
    #[command(hide = true)]
    ResetStorm(bench::reset_storm::Options),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup(opts) => setup::run(opts),
        Command::Run(opts) => run::run(opts),
        Command::Test(opts) => test::run(opts),
        Command::Bench(opts) => bench::run(opts),
        Command::Demo(opts) => demo::run(opts),
        Command::ResetStorm(opts) => bench::reset_storm::run(opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
