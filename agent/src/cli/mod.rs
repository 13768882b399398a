//! Command-line interface: parses arguments, sets up logging and the runtime, and maps errors to
//! one readable line and a non-zero exit code.

mod api_client;
mod check_config;
mod run;
mod signal_print;
mod trace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "Resilience agent for gRPC / HTTP/2 fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach the kernel probes and print each signal as it happens.
    Trace(trace::Options),
    /// Run the HTTP/2 / gRPC proxy until SIGTERM (then drain and exit 0).
    Run(run::Options),
    /// Check a configuration file; every problem is printed with its line.
    CheckConfig(check_config::Options),
    /// A running agent's status: probes, kernel signals, journal, drops (status API).
    Status(api_client::StatusOptions),
    /// A running agent's breakers; `--watch` then prints each transition.
    Breakers(api_client::BreakersOptions),
    /// The breaker events a running agent journaled; `--follow` for new ones.
    Events(api_client::EventsOptions),
    /// Trip, reset or show one breaker of a running agent (trip and reset need the admin
    /// token).
    Breaker(api_client::BreakerOptions),
}

pub fn main() -> ExitCode {
    // Logs go to stderr so that stdout stays machine-readable with --json.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_env("AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Trace(opts) => trace::run(opts).await,
            Command::Run(opts) => run::run(opts).await,
            Command::CheckConfig(opts) => check_config::run(&opts),
            Command::Status(opts) => api_client::status(&opts).await,
            Command::Breakers(opts) => api_client::breakers(&opts).await,
            Command::Events(opts) => api_client::events(&opts).await,
            Command::Breaker(opts) => api_client::breaker(&opts).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: {e:#}");
            match e.downcast_ref::<api_client::ExitWith>() {
                Some(x) => ExitCode::from(x.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Runtime threads: `AGENT_WORKER_THREADS`, else one per CPU this process may run on (its
/// affinity mask, so `taskset` and a container's cpuset are honoured), at most 8.
fn worker_threads() -> usize {
    std::env::var("AGENT_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get().min(8)))
}
