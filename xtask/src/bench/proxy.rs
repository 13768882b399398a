//! `cargo xtask bench proxy`: what the agent's proxy costs a gRPC call, next to nghttpx and
//! HAProxy.
//!
//! h2load makes gRPC unary calls (`/grpc.health.v1.Health/Check`, an empty request) at one
//! grpc-go server at two load shapes, `-c 10 -m 20` and `-c 100 -m 10`, in four modes: direct,
//! through `agent run --listen --upstream`, through nghttpx and through HAProxy, each proxy
//! speaking cleartext HTTP/2 on both sides. Runs are interleaved and the order rotates each
//! round, so drift on a noisy machine hits every mode alike; each run has a fixed duration
//! (`h2load -D` after `--warm-up-time`) so that a slow mode does not take longer. Each proxy is
//! started afresh for each run, so its VmHWM at the end is the peak of that run. Every run must
//! finish with no failed, errored or timed-out request and only 2xx answers; as h2load counts a
//! 200 with a non-zero grpc-status as a success, the first round of each shape also asks each
//! path once with nghttp for grpc-status 0 and a SERVING answer.
//!
//! Printed per shape and mode: median requests/s, median p50 and p99 latency (from h2load's
//! per-request log), the proxy's CPU per call and memory (peak VmHWM, VmRSS at the end of the
//! run, summed over its processes: nghttpx runs a main and a worker process), the agent's
//! ratios to direct and to the faster of nghttpx and HAProxy, and each mode's run-to-run
//! spread; then every figure as one JSON object (also written to `target/bench/proxy.json`).
//! The proxy's CPU per call is its CPU time from the end of the warm-up to the end of the run
//! over the calls measured in that time.
//!
//! CPUs. The machine this was written on has two cores. By default h2load is pinned to CPU 0
//! and everything it calls (grpc-go, and the proxy in the proxy modes) to CPU 1, with
//! `taskset`, the same way in every mode. Unpinned, a proxy's threads spread over both cores
//! and take CPU from the load generator, by an amount that depends on the scheduler rather
//! than on the proxy; pinned, every proxy gets the same budget (one core, shared with the same
//! backend) and requests/s reads as how cheaply it forwards a call. The direct mode gets that
//! core to grpc-go alone, so it is the ceiling, not a proxy's peer. `--no-pin` runs unpinned.
//! Threads: the agent sizes its runtime by its CPU affinity, so pinned to one CPU it runs one
//! worker thread; nghttpx runs `--workers=2` and HAProxy `nbthread 2` ([`PROXY_THREADS`]) on
//! the same CPU set (tried: nghttpx and HAProxy with one thread instead of two differed by
//! less than the run-to-run noise, either way).

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpStream},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use test_support::{
    h2load,
    supervised::{Supervised, Supervision},
};

use super::{GrpcServer, agent::cpu_seconds, build_go_peer, free_port, median, quantile, spread};
use crate::util::{display, output_any_status, workspace_root};

#[derive(Debug, clap::Parser)]
pub struct Options {
    /// Runs per mode and load shape (interleaved; the order rotates each round).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Measured seconds per h2load run (`-D`).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured seconds at the start of each run (`--warm-up-time`).
    #[arg(long, default_value_t = 1)]
    warm_up: u64,
    /// Leave CPUs unpinned (by default h2load gets CPU 0; grpc-go and the proxy CPU 1).
    #[arg(long)]
    no_pin: bool,
}

/// h2load's `-c` (connections) and `-m` (streams per connection).
const SHAPES: [(u32, u32); 2] = [(10, 20), (100, 10)];

/// Worker threads for nghttpx and HAProxy: the agent's tokio runtime has two.
const PROXY_THREADS: u32 = 2;

/// The CPU h2load runs on, and the one for grpc-go and the proxy, when pinned.
const LOAD_CPU: &str = "0";
const SERVER_CPU: &str = "1";

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// The health service's answer `{status: SERVING}` as a gRPC message: flag, length 2, `08 01`.
const SERVING: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// h2load straight at grpc-go.
    Direct,
    /// `agent run --listen 127.0.0.1:0 --upstream GRPC`.
    Agent,
    /// nghttpx, h2c frontend and h2c backend.
    Nghttpx,
    /// HAProxy, `mode http`, `proto h2` on the bind and the server line.
    Haproxy,
}

const MODES: [Mode; 4] = [Mode::Direct, Mode::Agent, Mode::Nghttpx, Mode::Haproxy];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Agent => "agent",
            Mode::Nghttpx => "nghttpx",
            Mode::Haproxy => "haproxy",
        }
    }
}

/// What the bench needs to start things: built binaries, paths, pinning.
struct Setup {
    agent_bin: PathBuf,
    bench_dir: PathBuf,
    body: PathBuf,
    backend: SocketAddr,
    pin: bool,
    opts: Options,
}

impl Setup {
    fn command(&self, cpu: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command(self.pin, cpu, program)
    }
}

/// `program`, under `taskset -c CPU` when pinning.
fn command(pin: bool, cpu: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    if pin {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", cpu]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

pub fn run(opts: Options) -> Result<()> {
    if opts.runs == 0 || opts.duration == 0 {
        bail!("--runs and --duration must be at least 1");
    }
    let pin = !opts.no_pin;
    if pin && std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        bail!(
            "pinning needs two CPUs (h2load on one, grpc-go and the proxy on the other); use --no-pin"
        );
    }
    let root = workspace_root()?;
    eprintln!("bench proxy: building the agent (release) and the grpc-go server");
    let agent_bin = crate::run::build_release_agent(&root)?;
    let grpcpeer = build_go_peer(&root, "grpcpeer")?;
    let bench_dir = root.join("target/bench");
    std::fs::create_dir_all(&bench_dir)?;
    // An empty HealthCheckRequest: uncompressed flag, length 0.
    let body = bench_dir.join("grpc-empty.bin");
    std::fs::write(&body, [0u8; 5])?;

    let server = GrpcServer::start(&mut command(pin, SERVER_CPU, &grpcpeer))?;
    let setup = Setup {
        agent_bin,
        bench_dir,
        body,
        backend: server.addr,
        pin,
        opts,
    };
    let opts = &setup.opts;
    eprintln!(
        "bench proxy: h2load -D {}s (after {}s warm-up) against grpc-go at {}, {HEALTH_CHECK}; {} runs per mode and shape, interleaved; {}; nghttpx and HAProxy with {PROXY_THREADS} threads, the agent with one per CPU it may use",
        opts.duration,
        opts.warm_up,
        server.addr,
        opts.runs,
        if pin {
            format!("h2load on CPU {LOAD_CPU}, grpc-go and the proxy on CPU {SERVER_CPU}")
        } else {
            "CPUs not pinned".to_owned()
        },
    );

    let mut shapes_json = Vec::new();
    let mut summaries = Vec::new();
    for (clients, streams) in SHAPES {
        let shape = format!("-c {clients} -m {streams}");
        let mut results: [Vec<Measured>; 4] = Default::default();
        for i in 0..opts.runs {
            for k in 0..MODES.len() {
                let m = (i + k) % MODES.len();
                let measured = measure(&setup, MODES[m], clients, streams, i == 0)
                    .with_context(|| format!("{shape}, {} run {}", MODES[m].name(), i + 1))?;
                results[m].push(measured);
            }
            let line: Vec<String> = MODES
                .iter()
                .zip(&results)
                .map(|(mode, r)| {
                    let x = &r[i];
                    format!(
                        "{} {:.0} req/s p50 {:.2} p99 {:.2} ms",
                        mode.name(),
                        x.requests_per_s,
                        x.p50_ms,
                        x.p99_ms
                    )
                })
                .collect();
            println!("  {shape} run {}: {}", i + 1, line.join("; "));
        }
        let summary = Summary::of(&shape, &results);
        summary.print();
        shapes_json.push(summary.json(clients, streams, &results));
        summaries.push(summary);
    }
    drop(server);

    println!("\n== agent's proxy vs direct and vs the faster of nghttpx and HAProxy ==");
    for s in &summaries {
        s.print_ratios();
    }

    let results = json!({
        "call": HEALTH_CHECK,
        "duration_s": opts.duration,
        "warm_up_s": opts.warm_up,
        "runs": opts.runs,
        "pinned": pin.then(|| json!({"h2load": LOAD_CPU, "grpc_go_and_proxy": SERVER_CPU})),
        "proxy_threads": PROXY_THREADS,
        "shapes": shapes_json,
    });
    let path = setup.bench_dir.join("proxy.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("\n{results}");
    println!("\nresults also in {}", path.display());
    Ok(())
}

/// One h2load run in `mode`, the proxy (if any) started before and stopped after it.
fn measure(setup: &Setup, mode: Mode, clients: u32, streams: u32, check: bool) -> Result<Measured> {
    let proxy = match mode {
        Mode::Direct => None,
        Mode::Agent => Some(Proxy::agent(setup)?),
        Mode::Nghttpx => Some(Proxy::nghttpx(setup)?),
        Mode::Haproxy => Some(Proxy::haproxy(setup)?),
    };
    let target = proxy.as_ref().map_or(setup.backend, |p| p.addr);
    if check {
        check_grpc_status(target, &setup.body)
            .with_context(|| format!("checking the call through {}", mode.name()))?;
    }
    let log = setup
        .bench_dir
        .join(format!("proxy-h2load-{}.log", mode.name()));
    // h2load appends to its log file: start each run with none.
    match std::fs::remove_file(&log) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", log.display()));
        }
        _ => {}
    }
    let mut h2load = setup.command(LOAD_CPU, "h2load");
    h2load
        .arg(format!("-D{}", setup.opts.duration))
        .arg(format!("--warm-up-time={}s", setup.opts.warm_up))
        .args(["-c", &clients.to_string(), "-m", &streams.to_string()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&setup.body)
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("http://{target}{HEALTH_CHECK}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = h2load
        .spawn()
        .with_context(|| format!("cannot start `{}`", display(&h2load)))?;
    // The proxy's CPU over the measured part of the run only: from the end of the warm-up to
    // the end of the run.
    std::thread::sleep(Duration::from_secs(setup.opts.warm_up));
    let cpu_before = proxy.as_ref().map(Proxy::cpu_seconds);
    let out = child.wait_with_output().context("waiting for h2load")?;
    let cpu_after = proxy.as_ref().map(Proxy::cpu_seconds);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{text}{}",
            display(&h2load),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let counts =
        h2load::parse(&text).with_context(|| format!("unexpected h2load output:\n{text}"))?;
    counts
        .all_succeeded(None)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("h2load through {}:\n{text}", mode.name()))?;
    let done = counts.requests.map_or(0, |r| r.done);
    let latencies = read_latency_log(&log)?;
    // The log holds the measured requests only; a gap would mean some went unrecorded.
    if latencies.len() as u64 != done {
        bail!(
            "h2load logged {} requests but reported {done} done",
            latencies.len(),
        );
    }
    let ms = |q| quantile(&latencies, q).map_or(f64::NAN, |us| us / 1e3);
    let (p50_ms, p99_ms) = (ms(0.50), ms(0.99));
    let (peak_kib, end_kib) = match &proxy {
        Some(p) => {
            let (hwm, rss) = p.memory_kib()?;
            (Some(hwm), Some(rss))
        }
        None => (None, None),
    };
    let cpu_us_per_request = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) => {
            Some((after? - before?) * 1e6 / (counts.requests_per_s * setup.opts.duration as f64))
        }
        _ => None,
    };
    if let Some(p) = proxy {
        p.stop()?;
    }
    Ok(Measured {
        requests_per_s: counts.requests_per_s,
        requests: done,
        p50_ms,
        p99_ms,
        peak_rss_kib: peak_kib,
        end_rss_kib: end_kib,
        cpu_us_per_request,
    })
}

/// One run's figures; the proxy's are None in the direct mode.
struct Measured {
    requests_per_s: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_kib: Option<u64>,
    end_rss_kib: Option<u64>,
    cpu_us_per_request: Option<f64>,
}

impl Measured {
    fn json(&self) -> Value {
        json!({
            "requests_per_s": self.requests_per_s,
            "requests": self.requests,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "proxy_peak_rss_kib": self.peak_rss_kib,
            "proxy_end_rss_kib": self.end_rss_kib,
            "proxy_cpu_us_per_request": self.cpu_us_per_request,
        })
    }
}

/// Medians of one mode's runs.
struct Medians {
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_mib: Option<f64>,
    end_rss_mib: Option<f64>,
    cpu_us_per_request: Option<f64>,
    spread: String,
}

impl Medians {
    fn of(runs: &[Measured]) -> Self {
        let med = |f: &dyn Fn(&Measured) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(f).collect();
            median(&v)
        };
        let rps: Vec<f64> = runs.iter().map(|r| r.requests_per_s).collect();
        Self {
            requests_per_s: med(&|r| Some(r.requests_per_s)).unwrap_or(f64::NAN),
            p50_ms: med(&|r| Some(r.p50_ms)).unwrap_or(f64::NAN),
            p99_ms: med(&|r| Some(r.p99_ms)).unwrap_or(f64::NAN),
            peak_rss_mib: med(&|r| r.peak_rss_kib.map(|k| k as f64 / 1024.0)),
            end_rss_mib: med(&|r| r.end_rss_kib.map(|k| k as f64 / 1024.0)),
            cpu_us_per_request: med(&|r| r.cpu_us_per_request),
            spread: spread(&rps),
        }
    }
}

/// One shape's medians per mode, and which of nghttpx and HAProxy was faster.
struct Summary {
    shape: String,
    medians: Vec<Medians>,
    best: Mode,
}

impl Summary {
    fn of(shape: &str, results: &[Vec<Measured>; 4]) -> Self {
        let medians: Vec<Medians> = results.iter().map(|r| Medians::of(r)).collect();
        let best = if medians[idx(Mode::Haproxy)].requests_per_s
            > medians[idx(Mode::Nghttpx)].requests_per_s
        {
            Mode::Haproxy
        } else {
            Mode::Nghttpx
        };
        Self {
            shape: shape.to_owned(),
            medians,
            best,
        }
    }

    fn get(&self, mode: Mode) -> &Medians {
        &self.medians[idx(mode)]
    }

    fn print(&self) {
        let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
        println!(
            "\n== h2load {}, gRPC unary {HEALTH_CHECK}: medians ==",
            self.shape
        );
        println!(
            "{:<9} {:>9} {:>8} {:>8} {:>13} {:>13} {:>12}  spread of req/s",
            "mode", "req/s", "p50 ms", "p99 ms", "CPU us/call", "peak RSS MiB", "end RSS MiB"
        );
        for mode in MODES {
            let m = self.get(mode);
            println!(
                "{:<9} {:>9.0} {:>8.2} {:>8.2} {:>13} {:>13} {:>12}  {}",
                mode.name(),
                m.requests_per_s,
                m.p50_ms,
                m.p99_ms,
                opt(m.cpu_us_per_request, 1),
                opt(m.peak_rss_mib, 1),
                opt(m.end_rss_mib, 1),
                m.spread,
            );
        }
    }

    /// The agent's ratios to `other`: requests/s, p50, p99 (above 1 is slower for latency).
    fn ratios(&self, other: Mode) -> (f64, f64, f64) {
        let (a, o) = (self.get(Mode::Agent), self.get(other));
        (
            a.requests_per_s / o.requests_per_s,
            a.p50_ms / o.p50_ms,
            a.p99_ms / o.p99_ms,
        )
    }

    fn print_ratios(&self) {
        let (r, p50, p99) = self.ratios(Mode::Direct);
        println!(
            "{:<14} agent/direct:  {r:.3}x req/s, {p50:.2}x p50, {p99:.2}x p99",
            self.shape
        );
        let (r, p50, p99) = self.ratios(self.best);
        let (a, b) = (self.get(Mode::Agent), self.get(self.best));
        let mem = match (
            a.peak_rss_mib,
            b.peak_rss_mib,
            a.cpu_us_per_request,
            b.cpu_us_per_request,
        ) {
            (Some(am), Some(bm), Some(ac), Some(bc)) => {
                format!(", {:.2}x CPU per call, {:.2}x peak RSS", ac / bc, am / bm)
            }
            _ => String::new(),
        };
        println!(
            "{:<14} agent/{:<7}: {r:.3}x req/s, {p50:.2}x p50, {p99:.2}x p99{mem}   (the faster proxy here)",
            "",
            self.best.name(),
        );
    }

    fn json(&self, clients: u32, streams: u32, results: &[Vec<Measured>; 4]) -> Value {
        let mut modes = serde_json::Map::new();
        for mode in MODES {
            let m = self.get(mode);
            modes.insert(
                mode.name().to_owned(),
                json!({
                    "runs": results[idx(mode)].iter().map(Measured::json).collect::<Vec<_>>(),
                    "median_requests_per_s": m.requests_per_s,
                    "median_p50_ms": m.p50_ms,
                    "median_p99_ms": m.p99_ms,
                    "median_proxy_cpu_us_per_request": m.cpu_us_per_request,
                    "median_proxy_peak_rss_mib": m.peak_rss_mib,
                    "median_proxy_end_rss_mib": m.end_rss_mib,
                    "spread": m.spread,
                }),
            );
        }
        let ratio = |other| {
            let (r, p50, p99) = self.ratios(other);
            json!({"requests_per_s": r, "p50": p50, "p99": p99})
        };
        json!({
            "clients": clients,
            "streams": streams,
            "modes": modes,
            "agent_vs_direct": ratio(Mode::Direct),
            "faster_proxy": self.best.name(),
            "agent_vs_faster_proxy": ratio(self.best),
        })
    }
}

fn idx(mode: Mode) -> usize {
    MODES.iter().position(|m| *m == mode).unwrap_or(0)
}

/// A proxy started for one run, killed on drop.
struct Proxy {
    name: &'static str,
    /// Killed when dropped; [`Proxy::stop`] is the clean way.
    child: Supervised,
    addr: SocketAddr,
    log: PathBuf,
    /// The agent's stdout, kept open after its ready line.
    _stdout: Option<BufReader<ChildStdout>>,
}

impl Proxy {
    fn agent(setup: &Setup) -> Result<Proxy> {
        let log = setup.bench_dir.join("proxy-agent.log");
        let mut cmd = setup.command(SERVER_CPU, &setup.agent_bin);
        cmd.args(["run", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(setup.backend.to_string())
            .env("AGENT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log)?);
        let mut child = Supervised::spawn("agent", &mut cmd, Supervision::KILL)?;
        let mut stdout = BufReader::new(child.child_mut().stdout.take().context("agent stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let addr = serde_json::from_str::<Value>(&line)
            .ok()
            .filter(|v| v["kind"] == "ready")
            .and_then(|v| v["listeners"][0]["address"].as_str()?.parse().ok());
        let Some(addr) = addr else {
            bail!(
                "the agent said {line:?} instead of its ready line; stderr:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Ok(Proxy {
            name: "agent",
            child,
            addr,
            log,
            _stdout: Some(stdout),
        })
    }

    fn nghttpx(setup: &Setup) -> Result<Proxy> {
        let addr = free_port()?;
        let log = setup.bench_dir.join("proxy-nghttpx.log");
        let mut cmd = setup.command(SERVER_CPU, "nghttpx");
        cmd.arg("--conf=/dev/null")
            .arg(format!("--frontend=127.0.0.1,{};no-tls", addr.port()))
            .arg(format!(
                "--backend={},{};;proto=h2;no-tls",
                setup.backend.ip(),
                setup.backend.port()
            ))
            .arg(format!("--workers={PROXY_THREADS}"))
            .arg("--log-level=WARN");
        Proxy::spawn("nghttpx", cmd, addr, log)
    }

    fn haproxy(setup: &Setup) -> Result<Proxy> {
        let addr = free_port()?;
        let config = setup.bench_dir.join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "# Written by `cargo xtask bench proxy` for one run.\n\
                 global\n    nbthread {PROXY_THREADS}\n\n\
                 defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
                 frontend grpc\n    bind {addr} proto h2\n    default_backend grpc_go\n\n\
                 backend grpc_go\n    server s1 {} proto h2\n",
                setup.backend
            ),
        )?;
        let log = setup.bench_dir.join("proxy-haproxy.log");
        let mut cmd = setup.command(SERVER_CPU, "haproxy");
        cmd.arg("-db").arg("-f").arg(&config);
        Proxy::spawn("haproxy", cmd, addr, log)
    }

    /// Starts `cmd` (output to `log`) and waits until `addr` accepts connections.
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        addr: SocketAddr,
        log: PathBuf,
    ) -> Result<Proxy> {
        let out = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = Supervised::spawn(name, &mut cmd, Supervision::KILL)?;
        let mut proxy = Proxy {
            name,
            child,
            addr,
            log,
            _stdout: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Some(status) = proxy.child.exited() {
                bail!(
                    "{name} exited ({status}) before listening:\n{}",
                    proxy.log_text()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} did not listen on {addr} within 10 s:\n{}",
                    proxy.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The proxy's process and its descendants (nghttpx forks a worker process).
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.child.pid()];
        let mut i = 0;
        while let Some(&pid) = pids.get(i) {
            pids.extend(children(pid));
            i += 1;
        }
        pids
    }

    fn cpu_seconds(&self) -> Result<f64> {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    /// VmHWM and VmRSS, in KiB, summed over the proxy's processes.
    fn memory_kib(&self) -> Result<(u64, u64)> {
        let (mut hwm, mut rss) = (0, 0);
        for pid in self.pids() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("cannot read /proc/{pid}/status"))?;
            hwm += status_kib(&status, "VmHWM:").unwrap_or(0);
            rss += status_kib(&status, "VmRSS:").unwrap_or(0);
        }
        Ok((hwm, rss))
    }

    /// SIGTERM and wait. The agent must drain and exit 0; nghttpx and HAProxy stop on SIGTERM
    /// without a drain, by the signal.
    fn stop(mut self) -> Result<()> {
        let Some(status) = self.child.terminate(Duration::from_secs(30)) else {
            bail!("{} did not exit within 30 s of SIGTERM; killed", self.name);
        };
        let by_sigterm = self.name != "agent" && status.signal() == Some(libc::SIGTERM);
        if !status.success() && !by_sigterm {
            bail!("{} exited with {status}:\n{}", self.name, self.log_text());
        }
        Ok(())
    }
}

/// Child processes of `pid`, from every thread's `children` list.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// `VmHWM:    13804 kB` -> 13804.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// Asks `/grpc.health.v1.Health/Check` once through `addr` with nghttp (`body` being the empty
/// request): h2load counts any 200 as a success, gRPC's own status is in the trailers.
fn check_grpc_status(addr: SocketAddr, body: &Path) -> Result<()> {
    let mut cmd = Command::new("nghttp");
    cmd.arg("-v")
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(body)
        .arg(format!("http://{addr}{HEALTH_CHECK}"));
    let out = output_any_status(&mut cmd)?;
    // -v prints received header fields as "[  0.002] recv (stream_id=13) grpc-status: 0" and
    // the response body as it is.
    let text = String::from_utf8_lossy(&out.stdout);
    let grpc_ok = text
        .lines()
        .any(|l| l.contains("] recv (stream_id=") && l.trim_end().ends_with(" grpc-status: 0"));
    let serving = out.stdout.windows(SERVING.len()).any(|w| w == SERVING);
    if !out.status.success() || !grpc_ok || !serving {
        bail!(
            "`{}` did not get grpc-status 0 and SERVING ({}):\n{text}",
            display(&cmd),
            out.status
        );
    }
    Ok(())
}

/// Per-request durations (µs) from h2load's `--log-file`: `start_us\tstatus\tduration_us`.
/// Any status but 200 (-1 is a failed stream) is an error.
fn read_latency_log(path: &Path) -> Result<Vec<f64>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut durations = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        let Some((status, duration)) = parse_log_line(&line) else {
            bail!("unexpected line in {}: {line:?}", path.display());
        };
        if status != 200 {
            bail!(
                "h2load logged status {status} in {}: {line:?}",
                path.display()
            );
        }
        durations.push(duration);
    }
    Ok(durations)
}

fn parse_log_line(line: &str) -> Option<(i32, f64)> {
    let mut cols = line.split('\t');
    let _start = cols.next()?;
    let status = cols.next()?.parse().ok()?;
    let duration = cols.next()?.trim().parse().ok()?;
    Some((status, duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_latency_log_lines() {
        assert_eq!(
            parse_log_line("1795402101176412\t200\t1294"),
            Some((200, 1294.0))
        );
        assert_eq!(parse_log_line("1795402101176412\t-1\t5"), Some((-1, 5.0)));
        assert_eq!(parse_log_line("garbage"), None);
    }

    #[test]
    fn reads_proc_status() {
        let status = "Name:\tagent\nVmHWM:\t   13804 kB\nVmRSS:\t   13216 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(13804));
        assert_eq!(status_kib(status, "VmRSS:"), Some(13216));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }
}
