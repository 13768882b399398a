//! `cargo xtask demo`: the agent's proxy in front of two grpc-go upstreams (Debian's grpc-go),
//! a steady load client through it, and one fault after another: an upstream killed, GC
//! pressure, expired tokens, rapid reset. Every breaker transition is printed as it happens;
//! at the end a table says which trips each fault caused, and the demo fails if a fault caused
//! none. Whatever it started is stopped on the way out, on an error, Ctrl-C or SIGTERM too.
//!
//! With `--check-dashboards`, Debian's Prometheus scrapes the agent throughout and afterwards
//! every panel's expression in `dashboards/*.json` is evaluated against it ([`dashboards`]).

mod dashboards;
mod procs;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use self::procs::{Proc, interrupted};
use crate::{
    setup,
    util::{build_go_peer, run_status, workspace_root},
};

#[derive(Debug, clap::Parser)]
pub struct Options {
    /// Also scrape the agent with Debian's Prometheus (every second) and evaluate every panel's
    /// expression of `dashboards/*.json` against it: each must return data, and every
    /// `agent_*` name in them must be one the agent serves.
    #[arg(long)]
    pub check_dashboards: bool,
    /// Seconds each fault lasts (the baseline gets two thirds of it).
    #[arg(long, default_value_t = DEFAULT_PHASE_SECS, value_parser = clap::value_parser!(u64).range(6..=120))]
    pub phase_secs: u64,
}

pub const DEFAULT_PHASE_SECS: u64 = 12;

const CLUSTER: &str = "echo";
/// The Service address the steady load client dials: made as kube-proxy makes one (nftables
/// DNAT to the upstreams, for whoever is not intercepted), claimed by the cluster, and reached
/// through interception, not by pointing the client at the agent.
const SERVICE_IP: &str = "127.77.0.10";
const SERVICE_PORT: u16 = 50051;

/// Forced collections of a small grpc-go server pause it 3 µs to 1 ms, median ~15 µs, ~7% of
/// them at least 100 µs (measured with `agent trace --probes go-gc`): a 10 ms collection loop
/// crosses this many times a second. The upstreams run with GOGC=off, so no collection of
/// their own trips them outside the GC phase.
const STW_THRESHOLD: &str = "100us";
const GC_EVERY: &str = "10ms";

/// The faults, in the order they are injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Baseline,
    UpstreamKilled,
    GcPressure,
    ExpiredTokens,
    RapidReset,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::Baseline,
        Fault::UpstreamKilled,
        Fault::GcPressure,
        Fault::ExpiredTokens,
        Fault::RapidReset,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::Baseline => "baseline",
            Fault::UpstreamKilled => "upstream killed",
            Fault::GcPressure => "GC pressure",
            Fault::ExpiredTokens => "expired tokens",
            Fault::RapidReset => "rapid reset",
        }
    }

    /// Whether a trip is one this fault should cause (the killed upstream's breaker is named
    /// `killed`).
    fn expects(self, trip: &Value, killed: &str) -> bool {
        let b = &trip["breaker"];
        match self {
            Fault::Baseline => false,
            Fault::UpstreamKilled => b["name"] == killed,
            Fault::GcPressure => b["reason"] == "go_stw",
            Fault::ExpiredTokens => b["scope"] == "client" && trip["jwt_claims"]["expired"] == true,
            Fault::RapidReset => b["scope"] == "client" && b["reason"] == "rapid_reset",
        }
    }
}

pub fn run(opts: Options) -> Result<()> {
    setup::run(setup::Options { check: false })?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo's agent attaches eBPF probes and needs root; run `sudo -E cargo xtask demo`"
        );
    }
    let root = workspace_root()?;
    // Debug: `cargo xtask test` has built it already, and a release build takes minutes on a
    // small machine; a few hundred calls a second are nothing to it either way.
    run_status(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--package", "agent"]),
    )?;
    let grpcpeer = build_go_peer(&root, "grpcpeer")?;
    let dir = root.join("target/demo");
    // Each run starts afresh: its own journal (numbered from 1) and Prometheus database.
    for old in ["journal", "prometheus-data"] {
        let path = dir.join(old);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    std::fs::create_dir_all(&dir)?;
    let _signals = procs::catch_signals();
    let setup = Setup {
        agent_bin: root.join("target/debug/agent"),
        root,
        dir,
        grpcpeer,
        phase: Duration::from_secs(opts.phase_secs),
    };
    demo(&setup, opts.check_dashboards)
}

struct Setup {
    root: PathBuf,
    dir: PathBuf,
    grpcpeer: PathBuf,
    agent_bin: PathBuf,
    phase: Duration,
}

fn demo(setup: &Setup, check_dashboards: bool) -> Result<()> {
    let t0 = Instant::now();
    let secret = setup.dir.join("hmac.secret");
    std::fs::write(&secret, b"demo-secret-not-for-production-0123")?;

    eprintln!(
        "demo: starting two grpc-go upstreams and the agent (logs in {})",
        setup.dir.display()
    );
    let mut a = GoServer::start(setup, "upstream-a", "127.0.0.1:0")?;
    let mut b = GoServer::start(setup, "upstream-b", "127.0.0.1:0")?;
    let service = Service::create(a.addr, b.addr)?;
    let mut agent = Agent::start(setup, &secret, a.addr, b.addr, &service)?;
    eprintln!(
        "demo: agent pid {} proxy {} metrics http://{}/metrics api {}; upstream A {} (pid {}), B {} (pid {})",
        agent.proc.pid(),
        agent.proxy,
        agent.prometheus,
        agent.api,
        a.addr,
        a.proc.pid(),
        b.addr,
        b.proc.pid()
    );
    let prometheus = if check_dashboards {
        Some(dashboards::Prometheus::start(&setup.dir, agent.prometheus)?)
    } else {
        None
    };
    eprintln!(
        "demo: the load client dials the Service address {SERVICE_IP}:{SERVICE_PORT} from cgroup {}; interception steers it through the agent",
        service.cgroup.display()
    );
    let mut load = LoadClient::start_in(
        setup,
        "load",
        SocketAddr::from(([127, 77, 0, 10], SERVICE_PORT)),
        Some(&service.cgroup),
        &[
            "-concurrency",
            "4",
            "-pause",
            "20ms",
            "-duration",
            "1h",
            "-token-secret",
            path_str(&secret)?,
            "-subject",
            "user",
            "-subjects",
            "3",
            "-session",
            "steady",
            "-traceparent",
        ],
    )?;

    let mut log = TripLog {
        t0,
        killed: format!("endpoint {CLUSTER}/{}", a.addr),
        current: 0,
        trips: Vec::new(),
    };
    for (i, fault) in Fault::ALL.into_iter().enumerate() {
        log.current = i;
        let started = Instant::now();
        println!(
            "\n== [{:5.1}s] phase {}: {} ==",
            t0.elapsed().as_secs_f64(),
            i + 1,
            fault.name()
        );
        let full = setup.phase;
        match fault {
            Fault::Baseline => {
                println!("   steady load through the proxy (3 users, 4 calls in flight), no fault");
                log.follow(&mut agent, full * 2 / 3)?;
            }
            Fault::UpstreamKilled => {
                println!(
                    "   SIGKILL upstream A ({}, pid {}); restarted halfway",
                    a.addr,
                    a.proc.pid()
                );
                a.proc.kill();
                log.follow(&mut agent, full / 2)?;
                a = GoServer::start(setup, "upstream-a", &a.addr.to_string())?;
                println!(
                    "   [{:5.1}s] upstream A restarted (pid {})",
                    t0.elapsed().as_secs_f64(),
                    a.proc.pid()
                );
                log.follow(&mut agent, full / 2)?;
            }
            Fault::GcPressure => {
                println!(
                    "   upstream B (pid {}) collects garbage every {GC_EVERY} (stw_threshold {STW_THRESHOLD})",
                    b.proc.pid()
                );
                b.toggle_gc("gc on")?;
                log.follow(&mut agent, full)?;
                b.toggle_gc("gc off")?;
            }
            Fault::ExpiredTokens => {
                println!(
                    "   a second client calls with expired tokens (sub mallory-0, mallory-1); upstreams answer UNAUTHENTICATED"
                );
                let secs = format!("{}s", full.as_secs().saturating_sub(2));
                let mut expired = LoadClient::start(
                    setup,
                    "expired",
                    agent.proxy,
                    &[
                        "-concurrency",
                        "2",
                        "-pause",
                        "20ms",
                        "-duration",
                        &secs,
                        "-token-secret",
                        path_str(&secret)?,
                        "-token-expired",
                        "-subject",
                        "mallory",
                        "-subjects",
                        "2",
                    ],
                )?;
                log.follow(&mut agent, full)?;
                expired.proc.stop();
                println!("   expired-token client: {}", expired.codes_text());
            }
            Fault::RapidReset => {
                println!("   attacks.py rapid-reset at 1000 streams/s for 5 s, session 'attacker'");
                let attack_log = setup.dir.join("rapid-reset.log");
                let mut attacker = procs::spawn(
                    "rapid-reset attacker",
                    Command::new("python3")
                        .arg("-u")
                        .arg(setup.root.join("tests/peers/h2py/attacks.py"))
                        .args([
                            "127.0.0.1",
                            &agent.proxy.port().to_string(),
                            "rapid-reset",
                            "--duration",
                            "5",
                            "--rate",
                            "1000",
                            "--header",
                            "x-session-id=attacker",
                        ])
                        .stdout(std::fs::File::create(&attack_log)?)
                        .stderr(Stdio::null()),
                    Duration::from_secs(2),
                )?;
                log.follow(&mut agent, full)?;
                attacker.stop();
            }
        }
        println!(
            "   [{:5.1}s] {} done in {:.1} s; steady load: {}",
            t0.elapsed().as_secs_f64(),
            fault.name(),
            started.elapsed().as_secs_f64(),
            load.take_codes_text()
        );
    }

    let dashboards = match &prometheus {
        Some(p) => {
            // The last scrapes.
            log.follow(&mut agent, Duration::from_secs(2))?;
            Some(dashboards::check(&setup.root, p, agent.prometheus))
        }
        None => None,
    };
    load.proc.stop();
    agent.proc.stop();
    drop(prometheus);
    let total = t0.elapsed();

    let missing = log.summary(total);
    if let Some(result) = dashboards {
        result?;
    }
    if !missing.is_empty() {
        bail!(
            "no trip for: {} (logs in {})",
            missing.join(", "),
            setup.dir.display()
        );
    }
    println!(
        "\ndemo: every fault tripped a breaker ({:.0} s)",
        total.as_secs_f64()
    );
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The breaker transitions seen, each with the phase it came in.
struct TripLog {
    t0: Instant,
    /// The killed upstream's breaker.
    killed: String,
    current: usize,
    trips: Vec<(usize, Value)>,
}

impl TripLog {
    /// Prints the agent's breaker transitions as they come, for `d`.
    fn follow(&mut self, agent: &mut Agent, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        loop {
            if interrupted() {
                bail!("interrupted");
            }
            if let Some(status) = agent.proc.exited() {
                bail!("the agent exited ({status}); see {}", agent.log.display());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match agent
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) if line["kind"] == "breaker" => {
                    println!("{}", transition_line(self.t0.elapsed(), &line));
                    self.trips.push((self.current, line));
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The exit itself is reported above, on the next turn.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Prints the table of trips per fault; returns the faults that caused none.
    fn summary(&self, total: Duration) -> Vec<&'static str> {
        println!("\n== summary: {:.0} s ==", total.as_secs_f64());
        println!(
            "{:<16} {:>5}  breakers opened (reason, times)",
            "fault", "trips"
        );
        let mut missing = Vec::new();
        for (i, fault) in Fault::ALL.into_iter().enumerate() {
            let mut opened: BTreeMap<(String, String), usize> = BTreeMap::new();
            let mut expected = 0;
            for (_, t) in self
                .trips
                .iter()
                .filter(|(p, t)| *p == i && t["breaker"]["to"] == "open")
            {
                let b = &t["breaker"];
                let key = (
                    b["name"].as_str().unwrap_or("?").to_owned(),
                    b["reason"].as_str().unwrap_or("?").to_owned(),
                );
                *opened.entry(key).or_default() += 1;
                if fault.expects(t, &self.killed) {
                    expected += 1;
                }
            }
            let trips: usize = opened.values().sum();
            let mut text = String::new();
            for ((name, reason), n) in &opened {
                let _ = write!(
                    text,
                    "{}{name} ({reason}, {n})",
                    if text.is_empty() { "" } else { "; " }
                );
            }
            if text.is_empty() {
                text.push('-');
            }
            let verdict = if fault == Fault::Baseline {
                ""
            } else if expected > 0 {
                "  ok"
            } else {
                missing.push(fault.name());
                "  NO TRIP"
            };
            println!("{:<16} {trips:>5}  {text}{verdict}", fault.name());
        }
        missing
    }
}

/// One readable line for a breaker transition: time, breaker, from -> to, reason, the
/// call's session, token subject and trace, and the latest kernel evidence.
fn transition_line(at: Duration, t: &Value) -> String {
    let b = &t["breaker"];
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let to = s(&b["to"]);
    let mut line = format!(
        "   [{:5.1}s] {} {:<34} {} -> {:<9} {}",
        at.as_secs_f64(),
        if to == "open" { "TRIP" } else { "    " },
        s(&b["name"]),
        s(&b["from"]),
        to,
        s(&b["reason"]),
    );
    let stream = &t["stream"];
    if let Some(session) = stream["session_id"].as_str() {
        let _ = write!(line, " session={session}");
    }
    if let Some(sub) = t["jwt_claims"]["sub"].as_str() {
        let expired = if t["jwt_claims"]["expired"] == true {
            " (expired)"
        } else {
            ""
        };
        let _ = write!(line, " sub={sub}{expired}");
    }
    if let Some(trace) = stream["trace_id"].as_str() {
        let _ = write!(line, " trace={}", trace.get(..16).unwrap_or(trace));
    }
    if let Some(evidence) = t["evidence"].as_array()
        && let Some(last) = evidence.last()
    {
        // The newest signal of the kind that tripped it, else the newest of all.
        let shown = evidence
            .iter()
            .rev()
            .find(|e| e["kind"] == b["reason"])
            .unwrap_or(last);
        let _ = write!(line, " | evidence: {}", evidence_text(shown));
        if evidence.len() > 1 {
            let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
            for e in evidence {
                *kinds.entry(e["kind"].as_str().unwrap_or("?")).or_default() += 1;
            }
            let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            let _ = write!(line, " [{} in 30 s: {}]", evidence.len(), kinds.join(", "));
        }
    }
    line
}

fn evidence_text(e: &Value) -> String {
    let kind = e["kind"].as_str().unwrap_or("?");
    let by = e["by"].as_str().unwrap_or("?");
    match kind {
        "go_stw" => format!(
            "go_stw {} us pause of pid {} ({})",
            e["duration_us"],
            e["pid"],
            e["comm"].as_str().unwrap_or("?")
        ),
        "tcp_reset" => format!(
            "tcp_reset {} by {by} ({})",
            e["direction"].as_str().unwrap_or("?"),
            e["kernel_reason"].as_str().unwrap_or("?")
        ),
        "rapid_reset" => format!(
            "rapid_reset {} RST_STREAM/s from {}",
            e["resets_last_second"],
            e["client"].as_str().unwrap_or("?")
        ),
        "rst_stream" | "goaway" => {
            format!("{kind} {} by {by}", e["error"].as_str().unwrap_or("?"))
        }
        other => other.to_owned(),
    }
}

/// A grpc-go upstream: `grpcpeer server` with forced collections off until SIGUSR1, and
/// expired tokens refused. Its stdout is read to the end (a write to a closed stdout would
/// kill it).
struct GoServer {
    proc: Proc,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl GoServer {
    fn start(setup: &Setup, name: &str, addr: &str) -> Result<GoServer> {
        let log = setup.dir.join(format!("{name}.log"));
        let mut proc = procs::spawn(
            name,
            Command::new(&setup.grpcpeer)
                .args([
                    "server",
                    "-addr",
                    addr,
                    "-gc-every",
                    GC_EVERY,
                    "-gc-on-signal",
                    "-reject-expired",
                ])
                // No collections but the forced ones: a pause outside the GC phase would
                // trip the endpoint there too.
                .env("GOGC", "off")
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?),
            Duration::from_secs(2),
        )?;
        let lines = procs::line_reader(procs::take_stdout(&mut proc)?);
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .with_context(|| {
                format!("{name} printed nothing within 10 s; see {}", log.display())
            })?;
        let addr = line
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("{name} said {line:?} instead of listening ADDR"))?;
        Ok(GoServer { proc, addr, lines })
    }

    /// SIGUSR1 switches its collections on or off; it says which.
    fn toggle_gc(&mut self, expect: &str) -> Result<()> {
        self.proc.signal(libc::SIGUSR1);
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .context("no answer to SIGUSR1")?;
        if line != expect {
            bail!("upstream said {line:?} after SIGUSR1, not {expect:?}");
        }
        Ok(())
    }
}

/// `agent run` with the demo's configuration, its breaker transitions read by a thread.
struct Agent {
    proc: Proc,
    lines: mpsc::Receiver<Value>,
    log: PathBuf,
    proxy: SocketAddr,
    prometheus: SocketAddr,
    api: SocketAddr,
}

impl Agent {
    fn start(
        setup: &Setup,
        secret: &Path,
        a: SocketAddr,
        b: SocketAddr,
        service: &Service,
    ) -> Result<Agent> {
        let config = setup.dir.join("agent.toml");
        std::fs::write(&config, agent_config(secret, a, b, service)?)?;
        let log = setup.dir.join("agent.log");
        let mut proc = procs::spawn(
            "agent",
            Command::new(&setup.agent_bin)
                .arg("run")
                .arg("--config")
                .arg(&config)
                .arg("--print-breakers")
                .arg("--journal")
                .arg(setup.dir.join("journal"))
                .args([
                    "--prometheus-listen",
                    "127.0.0.1:0",
                    "--api-listen",
                    "127.0.0.1:0",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?),
            // Its drain (2 s in the config) and detaching the probes.
            Duration::from_secs(10),
        )?;
        let raw = procs::line_reader(procs::take_stdout(&mut proc)?);
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in raw {
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        // Loading and attaching the probes takes a few seconds in a debug build.
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = loop {
            if interrupted() {
                bail!("interrupted");
            }
            match lines.recv_timeout(Duration::from_millis(200)) {
                Ok(v) if v["kind"] == "ready" => break v,
                Ok(v) => bail!("the agent's first line is not the ready line: {v}"),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => bail!(
                    "the agent printed no ready line; see {}:\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        };
        let addr = |v: &Value| -> Result<SocketAddr> {
            v.as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("no address in the ready line: {ready}"))
        };
        Ok(Agent {
            proxy: addr(&ready["listeners"][0]["address"])?,
            prometheus: addr(&ready["prometheus"])?,
            api: addr(&ready["api"])?,
            proc,
            lines,
            log,
        })
    }
}

fn agent_config(secret: &Path, a: SocketAddr, b: SocketAddr, service: &Service) -> Result<String> {
    let secret = path_str(secret)?;
    let cgroup = path_str(&service.cgroup)?;
    let intercept_listen = service.listen;
    let a_port = a.port();
    Ok(format!(
        r#"# Written by `cargo xtask demo`.
[[listener]]
name = "demo"
address = "127.0.0.1:0"
[[listener.route]]
path_prefix = "/"
cluster = "{CLUSTER}"

[[cluster]]
name = "{CLUSTER}"
# One endpoint by name (localhost, from /etc/hosts): discovery's path, as a Service name's.
endpoints = ["localhost:{a_port}", "{b}"]
connect_timeout = "1s"
# The Service address: intercepted calls to it are this cluster's, balanced over its endpoints.
claims = [{{ cidr = "{SERVICE_IP}", ports = [{SERVICE_PORT}] }}]

# Connects to the Service from the demo's cgroup go through the agent.
[intercept]
listen = "{intercept_listen}"
cgroups = [{cgroup:?}]
[[intercept.destination]]
cidr = "{SERVICE_IP}"
ports = [{SERVICE_PORT}]

# Verified tokens: the client breaker is keyed by their subject, and an expired one makes
# UNAUTHENTICATED the client's fault.
[context.jwt]
hmac_secret_file = {secret:?}

# Back (half-open) within a phase, so one fault can trip it more than once.
[breakers.endpoint]
open_for = "3s"

[timeouts]
drain = "2s"

[signals]
upstream_tcp_reset = "trip"
upstream_stw = "trip"
stw_threshold = "{STW_THRESHOLD}"
rapid_reset = "trip"
rapid_reset_rate = 100
"#
    ))
}

/// The demo's Service address: an nftables table DNATing it to the upstreams (as kube-proxy
/// does, for processes that are not intercepted), the cgroup whose connects are intercepted,
/// and the intercept listener's address. The table and the cgroup go on drop.
struct Service {
    cgroup: PathBuf,
    listen: SocketAddr,
}

const NFT_TABLE: &str = "agent_demo";

impl Service {
    fn create(a: SocketAddr, b: SocketAddr) -> Result<Service> {
        let rules = format!(
            "table ip {NFT_TABLE} {{\n chain out {{\n  type nat hook output priority -100; policy accept;\n  ip daddr {SERVICE_IP} tcp dport {SERVICE_PORT} dnat ip to numgen inc mod 2 map {{ 0 : {} . {}, 1 : {} . {} }}\n }}\n}}\n",
            a.ip(),
            a.port(),
            b.ip(),
            b.port()
        );
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", NFT_TABLE])
            .stderr(Stdio::null())
            .status();
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("nft (nftables, installed by setup)")?;
        std::io::Write::write_all(
            &mut nft.stdin.take().context("nft stdin")?,
            rules.as_bytes(),
        )?;
        if !nft.wait()?.success() {
            bail!("nft refused the demo's Service rules:\n{rules}");
        }
        let root = cgroup2_root()?;
        let cgroup = root.join(format!("agent-demo-{}", std::process::id()));
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
        let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        Ok(Service { cgroup, listen })
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(100));
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", NFT_TABLE])
            .status();
    }
}

fn cgroup2_root() -> Result<PathBuf> {
    test_support::cgroup::cgroup2_root()
        .context("no cgroup v2 hierarchy mounted (interception attaches to cgroup v2)")
}

/// A `grpcpeer client`; the status codes of its calls are counted by a thread.
struct LoadClient {
    proc: Proc,
    codes: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl LoadClient {
    fn start(setup: &Setup, name: &str, proxy: SocketAddr, args: &[&str]) -> Result<LoadClient> {
        LoadClient::start_in(setup, name, proxy, None, args)
    }

    /// A client dialing `to`, from `cgroup` when given (the intercepted one).
    fn start_in(
        setup: &Setup,
        name: &str,
        to: SocketAddr,
        cgroup: Option<&Path>,
        args: &[&str],
    ) -> Result<LoadClient> {
        let log = setup.dir.join(format!("client-{name}.log"));
        let mut cmd = test_support::cgroup::command_in(cgroup, &setup.grpcpeer);
        let mut proc = procs::spawn(
            name,
            cmd.args(["client", "-addr", &to.to_string(), "-method", "unary"])
                .args(args)
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?),
            Duration::from_secs(2),
        )?;
        let stdout = procs::take_stdout(&mut proc)?;
        let codes = Arc::new(Mutex::new(BTreeMap::new()));
        let counted = Arc::clone(&codes);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // "call I CODE"
                if let Some(code) = line.strip_prefix("call ").and_then(|r| r.split(' ').nth(1))
                    && let Ok(mut codes) = counted.lock()
                {
                    *codes.entry(code.to_owned()).or_insert(0) += 1;
                }
            }
        });
        Ok(LoadClient { proc, codes })
    }

    /// The calls' codes since the last time, e.g. "OK 1650, Unavailable 3".
    fn take_codes_text(&mut self) -> String {
        let codes = self
            .codes
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        codes_text(&codes)
    }

    fn codes_text(&self) -> String {
        self.codes
            .lock()
            .map(|c| codes_text(&c))
            .unwrap_or_default()
    }
}

fn codes_text(codes: &BTreeMap<String, u64>) -> String {
    if codes.is_empty() {
        return "no calls".to_owned();
    }
    let mut by_count: Vec<_> = codes.iter().collect();
    by_count.sort_by(|x, y| y.1.cmp(x.1));
    by_count
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
