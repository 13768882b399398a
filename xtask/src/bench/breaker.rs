//! `cargo xtask bench breaker`: how many calls a client sees fail when one of two endpoints
//! goes bad, through the agent and through HAProxy, and what the breaker engine costs a
//! stream.
//!
//! Faults. Two grpcio servers A and B (`tests/peers/grpcpy/server.py`, started afresh for
//! each run) behind the proxy under test; `client.py PROXY load --per-call` makes `--calls`
//! unary calls from `--concurrency` workers, each pausing `--pause-ms` between its calls
//! (some 340 calls/s on the 2-core machine this was written on, for 9 s). `--fault-after-ms`
//! after the first call, A goes bad in one of two ways:
//! - **failing**: `client.py A control --code UNAVAILABLE`: from then on A answers every call
//!   with gRPC status 14 (HTTP 200, HEADERS then the status in trailers). HAProxy's `observe
//!   layer7` judges HTTP status codes only, so it is not expected to see anything wrong;
//! - **killed**: SIGKILL to A; its port refuses connections from then on.
//!
//! Each run reports, from the client's per-call lines (`t` is `time.monotonic()`, the same
//! CLOCK_MONOTONIC the bench reads):
//! - failures: calls that ended with a non-OK status (calls that failed before the fault are
//!   counted apart, as `early`: there should be none);
//! - when the failures stop: from the fault's onset to the start of the last failed call of
//!   the first burst (failures less than [`BURST_GAP`] apart); "never" when that burst lasts
//!   until the end of the load; 0 when no call failed, or only calls already under way. The
//!   onset is the kill(2) for `killed`, and the start of the first failed call for `failing`
//!   (the control client takes ~0.5 s to start, most of it before its call reaches A).
//!   Failures after that burst (the agent's half-open probe, 5 s later) are counted as `later`;
//! - when the proxy itself said A was out: the agent's `kind:"breaker"` line opening A's
//!   endpoint breaker, HAProxy's "Server servers/a is DOWN" warning, timed as the bench reads
//!   them;
//! - for `failing`, A's own `faults` counter (`client.py A stats`): the calls that reached A
//!   after the fault (each of them failed there, whether or not the client saw it);
//! - the slowest call from the fault on (HAProxy retries a refused connection on the same
//!   server after a turn-around of one second), and the calls per second of the run.
//!
//! The runs are interleaved: for each of `--runs` rounds, each fault, both proxies in an order
//! that alternates. Medians are printed side by side with the lowest and highest run, with the
//! agent's share of HAProxy's failures against the target of one third. Nothing is asserted.
//!
//! The agent runs with a configuration of one listener and one cluster of the two endpoints,
//! breakers and retries at their defaults (5 consecutive failures, or half of at least 20
//! calls in 10 s, open an endpoint's breaker for 5 s; calls that never reached an endpoint are
//! retried on another within the retry budget). HAProxy runs `mode http` with `proto h2` on
//! both sides, `balance roundrobin`, and on each server `check inter 1s observe layer7
//! error-limit 5 on-error mark-down` (the active check is a plain TCP connect: no `option
//! httpchk`); HAProxy's own `retries 3` and no `option redispatch`, unless
//! `--haproxy-redispatch` adds `option redispatch 1` (every retry on another server, what
//! the agent does with a call that could not connect).
//!
//! Engine. `agent/benches/breaker.rs` (hidden; release build) admits and records `--engine-calls`
//! streams through the breakers as the proxy does per stream, without any I/O, on one thread
//! and on two at once over the same breakers; `--engine-runs` runs of each, interleaved, and
//! the median ns per call against the target of 200 ns.
//!
//! Everything also goes to `target/bench/breaker.json`.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use test_support::supervised::{Supervised, Supervision};

use super::{free_port, median};
use crate::util::{output, workspace_root};

#[derive(Debug, clap::Parser)]
pub struct Options {
    /// Runs of each proxy and fault (interleaved).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Unary calls the load client makes per run.
    #[arg(long, default_value_t = 3000)]
    calls: u32,
    /// Load client workers, each making one call at a time.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Pause between the calls of one worker, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pause_ms: u32,
    /// When A goes bad, after the first call of the run, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    fault_after_ms: u64,
    /// HAProxy: `option redispatch 1` (retry a refused connection on another server).
    #[arg(long)]
    haproxy_redispatch: bool,
    /// Runs of `agent/benches/breaker.rs` with one thread, and as many with two.
    #[arg(long, default_value_t = 5)]
    engine_runs: usize,
    /// Streams per thread and run of `agent/benches/breaker.rs`.
    #[arg(long, default_value_t = 1_000_000)]
    engine_calls: u64,
}

/// Failures further apart than this end a burst (seconds).
const BURST_GAP: f64 = 1.0;

/// Targets of the issue: the agent's failures at most this share of HAProxy's, and the
/// engine's admission and record under this many nanoseconds a stream.
const FAILURE_SHARE_TARGET: f64 = 1.0 / 3.0;
const ENGINE_NS_TARGET: f64 = 200.0;

/// HAProxy's threads (the agent's runtime has one per CPU: two here).
const HAPROXY_THREADS: u32 = 2;

/// The agent's cluster name, which its endpoint breakers are named after.
const CLUSTER: &str = "svc";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ProxyKind {
    Agent,
    Haproxy,
}

const PROXIES: [ProxyKind; 2] = [ProxyKind::Agent, ProxyKind::Haproxy];

impl ProxyKind {
    fn name(self) -> &'static str {
        match self {
            ProxyKind::Agent => "agent",
            ProxyKind::Haproxy => "haproxy",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    Failing,
    Killed,
}

const FAULTS: [Fault; 2] = [Fault::Failing, Fault::Killed];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Failing => "failing",
            Fault::Killed => "killed",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Fault::Failing => {
                "A answers every call with gRPC UNAVAILABLE (HTTP 200, status in trailers)"
            }
            Fault::Killed => "A is SIGKILLed (its port refuses connections)",
        }
    }
}

/// Paths and binaries every run needs.
struct Setup {
    agent_bin: PathBuf,
    /// `agent/benches/breaker.rs`: the engine alone.
    engine_bin: PathBuf,
    bench_dir: PathBuf,
    server_py: PathBuf,
    client_py: PathBuf,
    opts: Options,
}

pub fn run(opts: Options) -> Result<()> {
    if opts.runs == 0 || opts.calls == 0 || opts.concurrency == 0 || opts.engine_runs == 0 {
        bail!("--runs, --calls, --concurrency and --engine-runs must be at least 1");
    }
    let root = workspace_root()?;
    eprintln!("bench breaker: building the agent (release)");
    let agent_bin = crate::run::build_release_agent(&root)?;
    let engine_bin = crate::run::build_agent_bench(&root, "breaker")?;
    let bench_dir = root.join("target/bench");
    std::fs::create_dir_all(&bench_dir)?;
    let peers = root.join("tests/peers/grpcpy");
    let setup = Setup {
        agent_bin,
        engine_bin,
        bench_dir,
        server_py: peers.join("server.py"),
        client_py: peers.join("client.py"),
        opts,
    };
    let opts = &setup.opts;
    println!(
        "bench breaker: two grpcio servers A and B; client.py load: {} unary calls, {} workers, {} ms pause between a worker's calls; A goes bad {} ms after the first call; {} runs per proxy and fault, interleaved",
        opts.calls, opts.concurrency, opts.pause_ms, opts.fault_after_ms, opts.runs
    );
    println!(
        "  agent: one cluster of A and B, breakers and retries at their defaults:\n{}",
        indent(&agent_config("A", "B"))
    );
    println!(
        "  haproxy {}:\n{}",
        haproxy_version(),
        indent(&haproxy_config(None, "A", "B", opts.haproxy_redispatch))
    );

    let mut runs: Vec<RunResult> = Vec::new();
    for i in 0..opts.runs {
        for fault in FAULTS {
            for k in 0..PROXIES.len() {
                let proxy = PROXIES[(i + k) % PROXIES.len()];
                let r = one_run(&setup, proxy, fault).with_context(|| {
                    format!("{} through {}, run {}", fault.name(), proxy.name(), i + 1)
                })?;
                println!(
                    "  run {} {:<8} {:<8} {}",
                    i + 1,
                    fault.name(),
                    proxy.name(),
                    r.line()
                );
                runs.push(r);
            }
        }
    }

    let mut faults_json = Vec::new();
    let mut totals = [0.0f64; 2];
    for fault in FAULTS {
        let sums: Vec<Summary> = PROXIES
            .iter()
            .map(|&p| {
                let of: Vec<&RunResult> = runs
                    .iter()
                    .filter(|r| r.proxy == p && r.fault == fault)
                    .collect();
                Summary::of(p, &of)
            })
            .collect();
        print_fault(fault, &sums);
        for (t, s) in totals.iter_mut().zip(&sums) {
            *t += s.failures;
        }
        let (share, met) = share(sums[0].failures, sums[1].failures);
        faults_json.push(json!({
            "fault": fault.name(),
            "what": fault.what(),
            "proxies": sums.iter().map(Summary::json).collect::<Vec<_>>(),
            "agent_share_of_haproxy_failures": share,
            "target_met": met,
        }));
    }
    let (share_all, met_all) = share(totals[0], totals[1]);
    println!(
        "\nboth faults: agent {:.0} failures vs HAProxy {:.0} (sums of medians): {}",
        totals[0],
        totals[1],
        share_text(share_all, met_all)
    );

    let engine = engine(&setup)?;

    let results = json!({
        "calls": opts.calls,
        "concurrency": opts.concurrency,
        "pause_ms": opts.pause_ms,
        "fault_after_ms": opts.fault_after_ms,
        "runs": opts.runs,
        "burst_gap_s": BURST_GAP,
        "agent_config": agent_config("A", "B"),
        "haproxy_config": haproxy_config(None, "A", "B", opts.haproxy_redispatch),
        "haproxy_version": haproxy_version(),
        "faults": faults_json,
        "both_faults": {
            "agent_failures": totals[0],
            "haproxy_failures": totals[1],
            "agent_share_of_haproxy_failures": share_all,
            "target": FAILURE_SHARE_TARGET,
            "target_met": met_all,
        },
        "runs_detail": runs.iter().map(RunResult::json).collect::<Vec<_>>(),
        "engine": engine,
    });
    let path = setup.bench_dir.join("breaker.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("\n{results}");
    println!("\nresults also in {}", path.display());
    Ok(())
}

/// The agent's failures over HAProxy's, and whether that meets the target; None when HAProxy
/// had none (no ratio; met if the agent had none either).
fn share(agent: f64, haproxy: f64) -> (Option<f64>, bool) {
    if haproxy > 0.0 {
        let s = agent / haproxy;
        (Some(s), s <= FAILURE_SHARE_TARGET)
    } else {
        (None, agent == 0.0)
    }
}

fn share_text(share: Option<f64>, met: bool) -> String {
    let verdict = if met { "met" } else { "NOT met" };
    match share {
        Some(s) => format!("agent/HAProxy = {s:.3} (target <= 0.333: {verdict})"),
        None => format!("HAProxy had no failures (target: {verdict})"),
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn agent_config(a: &str, b: &str) -> String {
    format!(
        "# Written by `cargo xtask bench breaker` for one run: breakers and retries at their defaults.\n\
         [[listener]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\n[[listener.route]]\ncluster = \"{CLUSTER}\"\n\n\
         [[cluster]]\nname = \"{CLUSTER}\"\nendpoints = [\"{a}\", \"{b}\"]\n"
    )
}

/// HAProxy's configuration; `bind` None leaves the address as a placeholder (for printing).
fn haproxy_config(bind: Option<SocketAddr>, a: &str, b: &str, redispatch: bool) -> String {
    let bind = bind.map_or("127.0.0.1:PORT".to_owned(), |b| b.to_string());
    let redispatch = if redispatch {
        "    option redispatch 1\n"
    } else {
        ""
    };
    format!(
        "# Written by `cargo xtask bench breaker` for one run.\n\
         global\n    nbthread {HAPROXY_THREADS}\n\n\
         defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    retries 3\n\n\
         frontend grpc\n    bind {bind} proto h2\n    default_backend servers\n\n\
         backend servers\n    balance roundrobin\n{redispatch}\
         \x20   # No httpchk: the active check is a TCP connect every second (fall 3, rise 2).\n\
         \x20   default-server proto h2 check inter 1s observe layer7 error-limit 5 on-error mark-down\n\
         \x20   server a {a}\n    server b {b}\n"
    )
}

fn haproxy_version() -> String {
    output(Command::new("haproxy").arg("-v"))
        .ok()
        .and_then(|v| v.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "(version unknown)".to_owned())
}

/// Seconds of CLOCK_MONOTONIC, the clock of Python's `time.monotonic()`.
fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// A child process, SIGKILLed and reaped on drop (unless already waited for).
type Proc = Supervised;

fn spawn(cmd: &mut Command) -> Result<Proc> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    Ok(Supervised::spawn(&name, cmd, Supervision::KILL)?)
}

/// Waits for the exit, killing the process at `deadline`.
fn finish_by(proc: &mut Proc, deadline: Instant, what: &str) -> Result<std::process::ExitStatus> {
    match proc.wait_until(deadline) {
        Some(status) => Ok(status),
        None => {
            proc.kill();
            bail!("{what} did not finish in time; killed")
        }
    }
}

/// A grpcio test server on a free loopback port.
struct PyServer {
    proc: Proc,
    addr: SocketAddr,
}

impl PyServer {
    /// Starts both servers at once (each takes a few hundred ms to compile its protos), then
    /// waits for their listening lines.
    fn start_pair(setup: &Setup) -> Result<(PyServer, PyServer)> {
        let spawn = |name: &str| -> Result<Proc> {
            let log = File::create(setup.bench_dir.join(format!("breaker-server-{name}.log")))?;
            spawn(
                Command::new("python3")
                    .arg("-u")
                    .arg(&setup.server_py)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(log),
            )
        };
        let (a, b) = (spawn("a")?, spawn("b")?);
        Ok((PyServer::listening(a)?, PyServer::listening(b)?))
    }

    fn listening(mut proc: Proc) -> Result<PyServer> {
        let mut line = String::new();
        BufReader::new(proc.child_mut().stdout.take().context("server.py stdout")?)
            .read_line(&mut line)?;
        let addr = serde_json::from_str::<Value>(&line)
            .ok()
            .filter(|v| v["event"] == "listening")
            .and_then(|v| v["address"].as_str()?.parse().ok());
        let Some(addr) = addr else {
            bail!("server.py said {line:?} instead of its listening line");
        };
        Ok(PyServer { proc, addr })
    }
}

/// What a proxy printed that the bench reads: when it said A was out, and (the agent) how
/// many calls it retried.
#[derive(Default)]
struct ProxyLog {
    /// CLOCK_MONOTONIC seconds of the first line saying A is out.
    a_out_at: Option<f64>,
    streams: u64,
    retried: u64,
}

/// The proxy under test, stopped on drop.
struct Proxy {
    kind: ProxyKind,
    proc: Proc,
    addr: SocketAddr,
    reader: Option<JoinHandle<ProxyLog>>,
    log: PathBuf,
}

impl Proxy {
    fn start(setup: &Setup, kind: ProxyKind, a: SocketAddr, b: SocketAddr) -> Result<Proxy> {
        match kind {
            ProxyKind::Agent => Proxy::agent(setup, a, b),
            ProxyKind::Haproxy => Proxy::haproxy(setup, a, b),
        }
    }

    /// `agent run --config FILE --print-outcomes --print-breakers`; its stdout is read to the
    /// end by a thread, which timestamps the line opening A's endpoint breaker.
    fn agent(setup: &Setup, a: SocketAddr, b: SocketAddr) -> Result<Proxy> {
        let config = setup.bench_dir.join("breaker-agent.toml");
        std::fs::write(&config, agent_config(&a.to_string(), &b.to_string()))?;
        let log = setup.bench_dir.join("breaker-agent.log");
        let mut proc = spawn(
            Command::new(&setup.agent_bin)
                .arg("run")
                .arg("--config")
                .arg(&config)
                .args(["--print-outcomes", "--print-breakers"])
                .env("AGENT_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(File::create(&log)?),
        )?;
        let stdout = proc.child_mut().stdout.take().context("agent stdout")?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let a_breaker = format!("endpoint {CLUSTER}/{a}");
        let reader = std::thread::spawn(move || {
            let mut seen = ProxyLog::default();
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                match v["kind"].as_str() {
                    Some("ready") => {
                        let addr = v["listeners"][0]["address"]
                            .as_str()
                            .and_then(|s| s.parse::<SocketAddr>().ok());
                        if let (Some(tx), Some(addr)) = (ready_tx.take(), addr) {
                            let _ = tx.send(addr);
                        }
                    }
                    Some("breaker")
                        if seen.a_out_at.is_none()
                            && v["breaker"]["name"] == a_breaker
                            && v["breaker"]["to"] == "open" =>
                    {
                        seen.a_out_at = Some(monotonic());
                    }
                    Some("stream") => {
                        seen.streams += 1;
                        if v["retries"].as_u64().unwrap_or(0) > 0 {
                            seen.retried += 1;
                        }
                    }
                    _ => {}
                }
            }
            seen
        });
        let Ok(addr) = ready_rx.recv_timeout(Duration::from_secs(10)) else {
            drop(proc);
            let _ = reader.join();
            bail!(
                "the agent printed no ready line within 10 s; stderr:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Ok(Proxy {
            kind: ProxyKind::Agent,
            proc,
            addr,
            reader: Some(reader),
            log,
        })
    }

    /// `haproxy -db -f FILE`; its stderr is read by a thread, which timestamps the warning
    /// that server `a` is DOWN.
    fn haproxy(setup: &Setup, a: SocketAddr, b: SocketAddr) -> Result<Proxy> {
        let addr = free_port()?;
        let config = setup.bench_dir.join("breaker-haproxy.cfg");
        std::fs::write(
            &config,
            haproxy_config(
                Some(addr),
                &a.to_string(),
                &b.to_string(),
                setup.opts.haproxy_redispatch,
            ),
        )?;
        let log = setup.bench_dir.join("breaker-haproxy.log");
        let mut proc = spawn(
            Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )?;
        let stderr = proc.child_mut().stderr.take().context("haproxy stderr")?;
        let mut text = File::create(&log)?;
        let reader = std::thread::spawn(move || {
            let mut seen = ProxyLog::default();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if seen.a_out_at.is_none() && line.contains("Server servers/a is DOWN") {
                    seen.a_out_at = Some(monotonic());
                }
                let _ = std::io::Write::write_all(&mut text, format!("{line}\n").as_bytes());
            }
            seen
        });
        let mut proxy = Proxy {
            kind: ProxyKind::Haproxy,
            proc,
            addr,
            reader: Some(reader),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Some(status) = proxy.proc.exited() {
                let _ = proxy.reader.take().map(JoinHandle::join);
                bail!(
                    "haproxy exited ({status}) before listening:\n{}",
                    proxy.log_text()
                );
            }
            if Instant::now() >= deadline {
                bail!("haproxy did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; the agent must drain and exit 0. What its output said.
    fn stop(mut self) -> Result<ProxyLog> {
        let status = self.proc.terminate(Duration::from_secs(30));
        let seen = self
            .reader
            .take()
            .map(JoinHandle::join)
            .transpose()
            .map_err(|_| anyhow::anyhow!("the proxy's output reader panicked"))?
            .unwrap_or_default();
        if self.kind == ProxyKind::Agent && !status.is_some_and(|s| s.success()) {
            bail!(
                "the agent did not exit 0 on SIGTERM ({status:?}); stderr:\n{}",
                self.log_text()
            );
        }
        Ok(seen)
    }
}

/// One call of the load client's, from its `{"event":"call"}` line.
#[derive(Clone, Copy, Debug)]
struct Call {
    /// CLOCK_MONOTONIC seconds at the call's start.
    t: f64,
    ms: f64,
    ok: bool,
}

/// `client.py PROXY load --per-call`, its lines read by a thread.
struct Load {
    proc: Proc,
    first: mpsc::Receiver<f64>,
    reader: JoinHandle<(Vec<Call>, Option<Value>)>,
}

impl Load {
    fn start(setup: &Setup, target: SocketAddr) -> Result<Load> {
        let opts = &setup.opts;
        let log = File::create(setup.bench_dir.join("breaker-load.log"))?;
        let mut proc = spawn(
            Command::new("python3")
                .arg("-u")
                .arg(&setup.client_py)
                .arg(target.to_string())
                .arg("load")
                .args(["--count", &opts.calls.to_string()])
                .args(["--concurrency", &opts.concurrency.to_string()])
                .args(["--pause-ms", &opts.pause_ms.to_string()])
                .arg("--per-call")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log),
        )?;
        let stdout = proc.child_mut().stdout.take().context("client.py stdout")?;
        let (first_tx, first) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut calls = Vec::new();
            let mut done = None;
            let mut first_tx = Some(first_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                match v["event"].as_str() {
                    Some("call") => {
                        let (Some(t), Some(ms)) = (v["t"].as_f64(), v["ms"].as_f64()) else {
                            continue;
                        };
                        if let Some(tx) = first_tx.take() {
                            let _ = tx.send(t);
                        }
                        calls.push(Call {
                            t,
                            ms,
                            ok: v["code"] == "OK",
                        });
                    }
                    Some("done") => done = Some(v),
                    _ => {}
                }
            }
            (calls, done)
        });
        Ok(Load {
            proc,
            first,
            reader,
        })
    }

    /// Waits for the client's exit; its calls, which must all have been made.
    fn finish(mut self, setup: &Setup) -> Result<Vec<Call>> {
        let opts = &setup.opts;
        // Far more than a run takes (10 s), for a proxy that holds calls for seconds.
        let budget = Duration::from_secs(120)
            + Duration::from_millis(
                u64::from(opts.calls) * (u64::from(opts.pause_ms) + 20)
                    / u64::from(opts.concurrency),
            );
        let status = finish_by(&mut self.proc, Instant::now() + budget, "client.py load")?;
        let (calls, done) = self
            .reader
            .join()
            .map_err(|_| anyhow::anyhow!("the load client's reader panicked"))?;
        let log =
            std::fs::read_to_string(setup.bench_dir.join("breaker-load.log")).unwrap_or_default();
        let Some(done) = done else {
            bail!("client.py load ({status}) printed no summary; stderr:\n{log}");
        };
        if done["ok"] != true || calls.len() != opts.calls as usize {
            bail!(
                "client.py load ({status}) made {} of {} calls, or saw a wrong answer: {done}\n{log}",
                calls.len(),
                opts.calls
            );
        }
        Ok(calls)
    }
}

/// `client.py SERVER CASE ARGS`, to its end: its `done` line, or its `stats` line for `stats`.
fn py_client(setup: &Setup, server: SocketAddr, case: &str, args: &[&str]) -> Result<Value> {
    let text = output(
        Command::new("python3")
            .arg("-u")
            .arg(&setup.client_py)
            .arg(server.to_string())
            .arg(case)
            .args(args),
    )?;
    let want = if case == "stats" { "stats" } else { "done" };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == want)
        .with_context(|| format!("client.py {case} printed no {want} line:\n{text}"))
}

/// One run's figures. Times are milliseconds from the fault's onset.
struct RunResult {
    proxy: ProxyKind,
    fault: Fault,
    /// Calls that failed after the fault.
    failures: u64,
    /// Calls that failed before the fault began (should be none).
    early: u64,
    /// The start of the last failed call of the first burst; None: it lasted to the end.
    stop_ms: Option<f64>,
    /// Failures after the first burst.
    later: u64,
    /// The start of the last failed call.
    last_failure_ms: Option<f64>,
    /// When the proxy said A was out; None: it never did.
    out_ms: Option<f64>,
    /// A's `faults` counter (failing only).
    reached_a: Option<u64>,
    /// The slowest call still running at or started after the fault.
    max_call_ms: f64,
    calls_per_s: f64,
    /// The agent's calls retried on another endpoint.
    retried: Option<u64>,
}

impl RunResult {
    fn line(&self) -> String {
        format!(
            "{} failures{}, stop after {}, {} later, {}{}, slowest call {:.0} ms, {:.0} calls/s{}",
            self.failures,
            if self.early > 0 {
                format!(" (+{} before the fault!)", self.early)
            } else {
                String::new()
            },
            ms_text(self.stop_ms),
            self.later,
            self.out_ms
                .map_or("the proxy never said A was out".to_owned(), |ms| format!(
                    "the proxy said A was out at {ms:.0} ms"
                )),
            self.reached_a
                .map_or(String::new(), |n| format!(", {n} calls reached A")),
            self.max_call_ms,
            self.calls_per_s,
            self.retried
                .map_or(String::new(), |n| format!(", {n} retried")),
        )
    }

    fn json(&self) -> Value {
        json!({
            "proxy": self.proxy.name(),
            "fault": self.fault.name(),
            "failures": self.failures,
            "failures_before_fault": self.early,
            "failures_stop_after_ms": self.stop_ms,
            "later_failures": self.later,
            "last_failure_ms": self.last_failure_ms,
            "proxy_said_a_out_ms": self.out_ms,
            "calls_reached_a_after_fault": self.reached_a,
            "slowest_call_from_fault_ms": self.max_call_ms,
            "calls_per_s": self.calls_per_s,
            "agent_retried_calls": self.retried,
        })
    }
}

/// `12 ms`, or `never` for None.
fn ms_text(ms: Option<f64>) -> String {
    ms.map_or("never".to_owned(), |v| format!("{v:.0} ms"))
}

/// One run: fresh servers and proxy, the load, the fault after `--fault-after-ms`.
fn one_run(setup: &Setup, kind: ProxyKind, fault: Fault) -> Result<RunResult> {
    let opts = &setup.opts;
    let (mut a, b) = PyServer::start_pair(setup)?;
    let proxy = Proxy::start(setup, kind, a.addr, b.addr)?;
    let load = Load::start(setup, proxy.addr)?;
    let first = load
        .first
        .recv_timeout(Duration::from_secs(30))
        .context("the load client made no call within 30 s")?;
    let at = first + opts.fault_after_ms as f64 / 1e3;
    let wait = at - monotonic();
    if wait > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(wait));
    }
    let fault_start = monotonic();
    match fault {
        Fault::Failing => {
            py_client(setup, a.addr, "control", &["--code", "UNAVAILABLE"])?;
        }
        Fault::Killed => {
            a.proc.kill();
        }
    }
    let fault_end = monotonic();
    let calls = load.finish(setup)?;
    let reached_a = match fault {
        Fault::Failing => py_client(setup, a.addr, "stats", &[])?["faults"].as_u64(),
        Fault::Killed => None,
    };
    let seen = proxy.stop()?;
    drop((a, b));

    let last_t = calls.iter().map(|c| c.t).fold(f64::NEG_INFINITY, f64::max);
    if last_t < fault_end + BURST_GAP {
        bail!(
            "the load ended before or just after the fault: raise --calls or lower --fault-after-ms"
        );
    }
    let (early, mut failed): (Vec<Call>, Vec<Call>) = calls
        .iter()
        .filter(|c| !c.ok)
        .partition(|c| c.t + c.ms / 1e3 < fault_start);
    failed.sort_by(|x, y| x.t.total_cmp(&y.t));
    // The onset: the kill itself, or the first call that met the failing A.
    let onset = match fault {
        Fault::Killed => fault_start,
        Fault::Failing => failed.first().map_or(fault_end, |c| c.t),
    };
    let ms = |t: f64| ((t - onset) * 1e3).max(0.0);
    let starts: Vec<f64> = failed.iter().map(|c| c.t).collect();
    let (burst_end, in_burst) = first_burst(&starts, last_t);
    let stop_ms = if starts.is_empty() {
        Some(0.0)
    } else {
        burst_end.map(ms)
    };
    let first_t = calls.iter().map(|c| c.t).fold(f64::INFINITY, f64::min);
    let last_end = calls
        .iter()
        .map(|c| c.t + c.ms / 1e3)
        .fold(f64::NEG_INFINITY, f64::max);
    Ok(RunResult {
        proxy: kind,
        fault,
        failures: failed.len() as u64,
        early: early.len() as u64,
        stop_ms,
        later: (failed.len() - in_burst) as u64,
        last_failure_ms: failed.last().map(|c| ms(c.t)),
        out_ms: seen.a_out_at.map(ms),
        reached_a,
        max_call_ms: calls
            .iter()
            .filter(|c| c.t + c.ms / 1e3 >= fault_start)
            .map(|c| c.ms)
            .fold(0.0, f64::max),
        calls_per_s: calls.len() as f64 / (last_end - first_t),
        retried: (kind == ProxyKind::Agent).then_some(seen.retried),
    })
}

/// The first burst of failures (`starts`, sorted, less than [`BURST_GAP`] apart): the start
/// of its last call, None when it lasts until `last_t` (the last call's start) or there is
/// no failure, and how many failures it holds.
fn first_burst(starts: &[f64], last_t: f64) -> (Option<f64>, usize) {
    let n = 1 + starts
        .windows(2)
        .take_while(|w| w[1] - w[0] < BURST_GAP)
        .count();
    match starts.get(n - 1) {
        Some(&end) if last_t - end >= BURST_GAP => (Some(end), n),
        Some(_) => (None, n),
        None => (None, 0),
    }
}

/// Medians of one proxy's runs on one fault; `never` (None) sorts above every time.
struct Summary {
    proxy: ProxyKind,
    failures: f64,
    failures_min: u64,
    failures_max: u64,
    stop_ms: Option<f64>,
    later: f64,
    out_ms: Option<f64>,
    reached_a: Option<f64>,
    max_call_ms: f64,
    calls_per_s: f64,
    retried: Option<f64>,
    runs: usize,
}

/// Median where None is "never" (infinite); None if the median is.
fn median_never(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.map(|x| x.unwrap_or(f64::INFINITY)).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let m = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    m.is_finite().then_some(m)
}

impl Summary {
    fn of(proxy: ProxyKind, runs: &[&RunResult]) -> Summary {
        let med = |f: &dyn Fn(&RunResult) -> f64| {
            median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>()).unwrap_or(f64::NAN)
        };
        let med_some = |f: &dyn Fn(&RunResult) -> Option<f64>| {
            median(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        Summary {
            proxy,
            failures: med(&|r| r.failures as f64),
            failures_min: runs.iter().map(|r| r.failures).min().unwrap_or(0),
            failures_max: runs.iter().map(|r| r.failures).max().unwrap_or(0),
            stop_ms: median_never(runs.iter().map(|r| r.stop_ms)),
            later: med(&|r| r.later as f64),
            out_ms: median_never(runs.iter().map(|r| r.out_ms)),
            reached_a: med_some(&|r| r.reached_a.map(|n| n as f64)),
            max_call_ms: med(&|r| r.max_call_ms),
            calls_per_s: med(&|r| r.calls_per_s),
            retried: med_some(&|r| r.retried.map(|n| n as f64)),
            runs: runs.len(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "proxy": self.proxy.name(),
            "runs": self.runs,
            "median_failures": self.failures,
            "min_failures": self.failures_min,
            "max_failures": self.failures_max,
            "median_failures_stop_after_ms": self.stop_ms,
            "median_later_failures": self.later,
            "median_proxy_said_a_out_ms": self.out_ms,
            "median_calls_reached_a_after_fault": self.reached_a,
            "median_slowest_call_from_fault_ms": self.max_call_ms,
            "median_calls_per_s": self.calls_per_s,
            "median_agent_retried_calls": self.retried,
        })
    }
}

fn print_fault(fault: Fault, sums: &[Summary]) {
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    println!(
        "\n== {}: {}; medians of {} runs (failures: lowest..highest run) ==",
        fault.name(),
        fault.what(),
        sums.first().map_or(0, |s| s.runs)
    );
    println!(
        "{:<8} {:>18} {:>11} {:>6} {:>11} {:>10} {:>11} {:>8} {:>8}",
        "proxy",
        "failures",
        "stop after",
        "later",
        "said A out",
        "reached A",
        "slowest ms",
        "calls/s",
        "retried"
    );
    for s in sums {
        println!(
            "{:<8} {:>18} {:>11} {:>6} {:>11} {:>10} {:>11.0} {:>8.0} {:>8}",
            s.proxy.name(),
            format!("{:.0} ({}..{})", s.failures, s.failures_min, s.failures_max),
            ms_text(s.stop_ms),
            format!("{:.0}", s.later),
            ms_text(s.out_ms),
            opt(s.reached_a),
            s.max_call_ms,
            s.calls_per_s,
            opt(s.retried),
        );
    }
    if let [agent, haproxy] = sums {
        let (s, met) = share(agent.failures, haproxy.failures);
        println!("{}: {}", fault.name(), share_text(s, met));
    }
}

/// `agent/benches/breaker.rs` `--engine-runs` times with one thread and as many with two,
/// interleaved.
fn engine(setup: &Setup) -> Result<Value> {
    let opts = &setup.opts;
    println!(
        "\n== engine: admission + record per stream (agent/benches/breaker.rs, {} calls per thread, {} runs) ==",
        opts.engine_calls, opts.engine_runs
    );
    let mut by_threads = Vec::new();
    // One thread; two on the same breakers; one where every client has a breaker (after a
    // storm of client faults, still in the window: the slowest path of a healthy stream).
    const VARIANTS: [(usize, bool); 3] = [(1, false), (2, false), (1, true)];
    let mut ns: [Vec<f64>; 3] = Default::default();
    for _ in 0..opts.engine_runs {
        for (k, (threads, tracked)) in VARIANTS.into_iter().enumerate() {
            let v = engine_run(&setup.engine_bin, opts.engine_calls, threads, tracked)?;
            // Every call is admitted and succeeds: a refusal or a transition would mean the
            // loop measured something else than the path of a healthy stream.
            if v["rejected"] != 0 || v["transitions"] != 0 {
                println!("  (agent/benches/breaker.rs refused calls or changed a breaker: {v})");
            }
            let x = v["ns_per_call"]
                .as_f64()
                .with_context(|| format!("agent/benches/breaker.rs printed {v}"))?;
            ns[k].push(x);
        }
    }
    for (k, (threads, tracked)) in VARIANTS.into_iter().enumerate() {
        let m = median(&ns[k]).unwrap_or(f64::NAN);
        let lo = ns[k].iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ns[k].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let verdict = if m < ENGINE_NS_TARGET {
            "met"
        } else {
            "NOT met"
        };
        println!(
            "{threads} thread{} {m:.0} ns per stream (runs {lo:.0}..{hi:.0}); target < {ENGINE_NS_TARGET:.0} ns: {verdict}{}",
            if threads == 1 { ": " } else { "s:" },
            match (threads, tracked) {
                (1, false) => " (no client was ever at fault: no client breakers)",
                (1, true) => " (every client has a breaker with a fault in its window)",
                _ =>
                    " (two threads on the same breakers: each call's wait, lock contention included)",
            }
        );
        by_threads.push(json!({
            "threads": threads,
            "clients_with_breakers": tracked,
            "ns_per_call": ns[k],
            "median_ns_per_call": m,
            "target_ns": ENGINE_NS_TARGET,
            "target_met": m < ENGINE_NS_TARGET,
        }));
    }
    Ok(json!({"calls_per_thread": opts.engine_calls, "runs": by_threads}))
}

fn engine_run(bench_bin: &Path, calls: u64, threads: usize, tracked: bool) -> Result<Value> {
    let text = output(
        Command::new(bench_bin)
            .args(["--calls", &calls.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(tracked.then_some("--clients-with-breakers"))
            .env("AGENT_LOG", "warn"),
    )?;
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .with_context(|| format!("the breaker bench printed no JSON line:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_sorts_above_every_time() {
        assert_eq!(
            median_never([Some(1.0), None, Some(3.0)].into_iter()),
            Some(3.0)
        );
        assert_eq!(median_never([None, None, Some(3.0)].into_iter()), None);
        assert_eq!(median_never([Some(2.0)].into_iter()), Some(2.0));
    }

    #[test]
    fn the_first_burst_ends_at_a_gap() {
        // Five failures within 40 ms, a probe 5 s later, calls until 9 s.
        let starts = [2.0, 2.01, 2.02, 2.03, 2.04, 7.0];
        assert_eq!(first_burst(&starts, 9.0), (Some(2.04), 5));
        // Failures until the end: they never stopped.
        assert_eq!(first_burst(&[2.0, 2.5, 3.0, 3.5], 4.0), (None, 4));
        // A lone failure at the end is a later one.
        assert_eq!(first_burst(&[2.0, 2.5, 8.9], 9.0), (Some(2.5), 2));
        assert_eq!(first_burst(&[], 9.0), (None, 0));
    }

    #[test]
    fn share_against_the_target() {
        assert_eq!(share(1.0, 4.0), (Some(0.25), true));
        assert_eq!(share(2.0, 4.0), (Some(0.5), false));
        assert_eq!(share(0.0, 0.0), (None, true));
        assert_eq!(share(1.0, 0.0), (None, false));
    }
}
