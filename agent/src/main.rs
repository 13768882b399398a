//! The agent's one binary: the daemon (`agent run`) and its command-line tools.

fn main() -> std::process::ExitCode {
    agent::cli::main()
}
