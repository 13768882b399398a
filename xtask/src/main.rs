//! `cargo xtask`: orchestration only. Each subcommand is a module with a documented `Options`.

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
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup(opts) => setup::run(opts),
        Command::Run(opts) => run::run(opts),
        Command::Test(opts) => test::run(opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
