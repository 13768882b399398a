//! Small helpers for running external commands with useful error messages.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail};

/// Renders a command the way a person would type it (env overrides first), for messages.
pub use test_support::supervised::command_line as display;

/// Runs `cmd` with stdout/stderr captured, whatever its exit status; errors only if it can't start.
pub fn output_any_status(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("failed to start `{}`", display(cmd)))
}

/// Runs `cmd` with output captured and returns its stdout; a non-zero exit is an error
/// that carries the command line and its stderr (and stdout, which some tools use for errors).
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = output_any_status(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}){}{}",
            display(cmd),
            out.status,
            tail("stderr", &out.stderr),
            tail("stdout", &out.stdout),
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", display(cmd)))
}

/// Shorthand for [`output`] on a program and its arguments.
pub fn cmd_output<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String> {
    output(Command::new(program).args(args))
}

/// Runs `cmd` with inherited stdio (so long builds show progress); a non-zero exit is an error.
pub fn run_status(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` with output captured, printing nothing when it succeeds; on failure the error
/// carries the end of its output, since that is where apt/pip put the reason.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

/// The last lines of a captured stream, formatted for an error message ("" when empty).
fn tail(name: &str, bytes: &[u8]) -> String {
    const MAX_LINES: usize = 30;
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(MAX_LINES);
    format!("\n--- {name} ---\n{}", lines[start..].join("\n"))
}

/// The workspace root: xtask's manifest dir is `<root>/xtask`.
pub fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("xtask manifest dir has no parent"))
}

/// Builds the Go program `tests/peers/NAME` into `target/e2e-peers/NAME` (shared with the e2e
/// tests' builds) with Debian's Go sources: no module proxy here.
pub fn build_go_peer(root: &Path, name: &str) -> Result<PathBuf> {
    let out = root.join("target/e2e-peers").join(name);
    run_status(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(root.join("tests/peers").join(name))
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", root.join("target/go-cache")),
    )?;
    Ok(out)
}
