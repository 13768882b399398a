//! `cargo xtask run -- ARGS`: set up, build the agent in release mode, and run it.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, Result};

use crate::{
    setup,
    util::{run_status, workspace_root},
};

#[derive(Debug, clap::Parser)]
pub struct Options {
    /// Arguments for the agent, e.g. `-- trace --json`. Default: `trace`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(opts: Options) -> Result<()> {
    setup::run(setup::Options { check: false })?;
    let agent = build_release_agent(&workspace_root()?)?;
    let args = if opts.args.is_empty() {
        vec!["trace".to_owned()]
    } else {
        opts.args
    };
    eprintln!("xtask: running {} {}", agent.display(), args.join(" "));
    // Replace this process so Ctrl-C and SIGTERM reach the agent directly.
    let err = Command::new(&agent).args(&args).exec();
    Err(err).with_context(|| format!("cannot run {}", agent.display()))
}

/// Builds the agent in release mode (kernel object included) and returns its path.
pub fn build_release_agent(root: &std::path::Path) -> Result<std::path::PathBuf> {
    run_status(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--package",
        "agent",
    ]))?;
    Ok(root.join("target/release/agent"))
}

/// Builds one of the agent's benchmarks of internals (`agent/benches/NAME.rs`, bench profile:
/// optimised) and returns its executable.
pub fn build_agent_bench(root: &std::path::Path, name: &str) -> Result<std::path::PathBuf> {
    let out = Command::new("cargo")
        .current_dir(root)
        .args(["bench", "--package", "agent", "--bench", name, "--no-run"])
        .args(["--message-format", "json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo bench --no-run")?;
    if !out.status.success() {
        anyhow::bail!("cargo bench --package agent --bench {name} --no-run failed");
    }
    // The compiler-artifact message of the bench target names its executable.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
        .find_map(|v| v["executable"].as_str().map(std::path::PathBuf::from))
        .with_context(|| format!("cargo named no executable for the {name} bench"))
}
