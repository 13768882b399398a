//! `cargo xtask test`: the one command that runs every test, on a fresh machine too.
//!
//! Order: set up (idempotent), format and lint checks, unit tests, then the privileged
//! end-to-end tests in `tests/`, which load the real probes and drive real peers, and last the
//! demo with its dashboard check (`cargo xtask demo --check-dashboards`, about a minute). Those
//! need root; run as another user they fail with a message instead of passing silently.

use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use crate::{
    setup,
    util::{run_status, workspace_root},
};

#[derive(Debug, clap::Parser)]
pub struct Options {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    no_lint: bool,
    /// Only run end-to-end tests whose name contains this (and the demo only if "demo" does).
    #[arg(long)]
    filter: Option<String>,
}

pub fn run(opts: Options) -> Result<()> {
    setup::run(setup::Options { check: false })?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "the end-to-end tests load eBPF programs and need root; run `sudo -E cargo xtask test`"
        );
    }
    let root = workspace_root()?;
    let cargo = |args: &[&str]| {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root).args(args);
        cmd
    };
    if !opts.no_lint {
        step("format check");
        run_status(&mut cargo(&["fmt", "--all", "--", "--check"]))?;
        step("clippy");
        // Default members: the eBPF crate only builds for the BPF target.
        run_status(&mut cargo(&[
            "clippy",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        step("clippy (agent-ebpf for the BPF target, nightly)");
        run_status(&mut clippy_ebpf(&root))?;
    }
    step("unit tests");
    run_status(&mut cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "e2e",
        "--exclude",
        "agent-ebpf",
    ]))?;

    step("end-to-end tests (root, real probes, real peers)");
    run_status(&mut cargo(&["build", "--package", "agent"]))?;
    let mut e2e = cargo(&[
        "test",
        "--package",
        "e2e",
        "--",
        "--include-ignored",
        "--test-threads=1",
    ]);
    if let Some(filter) = &opts.filter {
        e2e.arg(filter);
    }
    e2e.env("AGENT_BIN", root.join("target/debug/agent"));
    run_status(&mut e2e)?;

    if opts
        .filter
        .as_ref()
        .is_none_or(|f| "demo".contains(f.as_str()))
    {
        step("demo with the dashboard check (root, real peers, Prometheus)");
        crate::demo::run(crate::demo::Options {
            check_dashboards: true,
            phase_secs: crate::demo::DEFAULT_PHASE_SECS,
        })?;
    }
    Ok(())
}

/// Clippy on the kernel programs as aya-build compiles them (see `agent/build.rs`): the nightly
/// toolchain, the BPF target of this host's endianness, `-Z build-std=core`, the release
/// profile (so `cfg(debug_assertions)` code is the same) and this host's `bpf_target_arch`
/// cfg. `agent-common` is linted too, as compiled for BPF. Only checked, never linked, so
/// bpf-linker is not needed.
fn clippy_ebpf(root: &Path) -> Command {
    let target = if cfg!(target_endian = "big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root)
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "agent-ebpf",
        ])
        .args(["--release", "--target", target, "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        // As aya-build does: its flags replace any RUSTFLAGS, and RUSTC would pick another
        // toolchain's compiler.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    cmd
}

fn step(name: &str) {
    eprintln!("\nxtask test: == {name} ==");
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
