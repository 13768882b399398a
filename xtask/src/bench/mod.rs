//! `cargo xtask bench SUITE`: benchmarks, not tests. Each suite runs its measurements side by
//! side in one run against real peers and prints ratios, so a noisy machine shifts both sides
//! alike. Nothing here asserts a time: the figures are for people to read and compare.

mod agent;
mod breaker;
mod correlate;
mod h2;
mod intercept;
mod probes;
mod proxy;
pub mod reset_storm;

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use test_support::supervised::{Supervised, Supervision};

use crate::util::build_go_peer;

#[derive(Debug, clap::Parser)]
pub struct Options {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Debug, clap::Subcommand)]
enum Suite {
    /// Kernel probes: a TCP reset storm (reported/made, drops, agent CPU per million events),
    /// a GC-heavy Go program with and without the probes, and exec-to-attach latency.
    Probes(probes::Options),
    /// HTTP/2 frame tracker: h2load throughput against grpc-go with the tracker attached vs
    /// not (interleaved runs), and the tracker's frames followed and events emitted per second.
    H2(h2::Options),
    /// The agent's proxy: h2load gRPC unary calls at grpc-go direct, through `agent run`,
    /// nghttpx and HAProxy (interleaved runs): requests/s, p50/p99, the proxy's CPU and memory.
    Proxy(proxy::Options),
    /// Circuit breakers: client-visible failures and time until traffic stops reaching an
    /// endpoint that fails every call or is killed, through `agent run` vs HAProxy (`observe
    /// layer7 error-limit 5 on-error mark-down`); and the engine's cost per stream.
    Breaker(breaker::Options),
    /// Transparent interception: connect()-to-first-response time and requests/s, direct vs
    /// intercepted vs the agent's explicit listener (interleaved runs, medians).
    Intercept(intercept::Options),
    /// Correlation: kernel signals joined per second with 10,000 live streams tracked (and
    /// with 100, for the ratio), and memory per tracked stream.
    Correlate(correlate::Options),
}

pub fn run(opts: Options) -> Result<()> {
    crate::setup::run(crate::setup::Options { check: false })?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks load eBPF programs and need root; run `sudo -E cargo xtask bench`");
    }
    ensure_no_agent_attached()?;
    match opts.suite {
        Suite::Probes(o) => probes::run(o),
        Suite::H2(o) => h2::run(o),
        Suite::Proxy(o) => proxy::run(o),
        Suite::Breaker(o) => breaker::run(o),
        Suite::Correlate(o) => correlate::run(o),
        Suite::Intercept(o) => intercept::run(o),
    }
}

/// Programs of the agent's that a running agent (a stray `agent trace`, a DaemonSet pod on
/// this node) would have loaded.
const AGENT_PROGRAMS: &[&str] = &[
    "tcp_send_reset",
    "tcp_receive_reset",
    "sched_process_exec",
    "h2_cgroup_egress",
    "h2_cgroup_ingress",
    "h2_tc_egress",
    "h2_tc_ingress",
    "intercept_connect4",
    "intercept_connect6",
    "intercept_sock_ops",
];

/// The "without the agent" side of every ratio is only that when no other agent runs: one left
/// over from an earlier run once made a bench compare the tracker against the tracker.
fn ensure_no_agent_attached() -> Result<()> {
    let out = crate::util::cmd_output("bpftool", &["prog", "show", "--json"])?;
    let progs: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    let loaded: Vec<String> = progs
        .iter()
        .filter_map(|p| p["name"].as_str())
        // The kernel keeps 15 bytes of a name; bpftool shows the whole one when BTF has it.
        .filter(|name| {
            AGENT_PROGRAMS
                .iter()
                .any(|p| p == name || (name.len() >= 15 && p.starts_with(name)))
        })
        .map(str::to_owned)
        .collect();
    if !loaded.is_empty() {
        bail!(
            "another agent's programs are loaded ({}); stop it first (pgrep -a agent), or the runs \
             \"without the agent\" would not be",
            loaded.join(", ")
        );
    }
    Ok(())
}

/// The lowest and highest of `values` relative to their median, e.g. `-1.2%..+0.8%`: the
/// runs' own dispersion, for reading a ratio. On a noisy machine a ratio inside it says "no
/// overhead this machine can resolve", not "1.00".
fn spread(values: &[f64]) -> String {
    let m = median(values).unwrap_or(f64::NAN);
    let lo = quantile(values, 0.0).unwrap_or(f64::NAN);
    let hi = quantile(values, 1.0).unwrap_or(f64::NAN);
    format!(
        "{:+.1}%..{:+.1}%",
        (lo / m - 1.0) * 100.0,
        (hi / m - 1.0) * 100.0
    )
}

/// Median of `values` (mean of the middle two for an even count); None when empty.
fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// The value below which `q` (0..=1) of `values` fall (nearest rank); None when empty.
fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// A loopback address with a port free right now (for a proxy that must be told its port).
fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The grpc-go test server (`cmd` runs the grpcpeer binary, pinned or not) on loopback,
/// stopped on drop.
struct GrpcServer {
    /// Killed with the server.
    _child: Supervised,
    addr: SocketAddr,
}

impl GrpcServer {
    fn start(cmd: &mut Command) -> Result<GrpcServer> {
        let mut child = Supervised::spawn(
            "grpcpeer server",
            cmd.args(["server", "-addr", "127.0.0.1:0"])
                .stdout(Stdio::piped()),
            Supervision::KILL,
        )?;
        let stdout = child.child_mut().stdout.take().context("grpcpeer stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            bail!("grpcpeer said {line:?} instead of listening ADDR");
        };
        Ok(GrpcServer {
            _child: child,
            addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn quantile_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.95), Some(19.0));
        assert_eq!(quantile(&v, 1.0), Some(20.0));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
    }
}
