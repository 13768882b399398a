//! `cargo xtask bench intercept`: what transparent interception costs a connection and a call.
//!
//! One `agent run` (probes attached, breakers on, as deployed) with an explicit listener in front
//! of the grpc-go test server and `[intercept]` steering connects to the server's address from
//! one cgroup the bench creates. h2load reaches the server three ways, interleaved (the order
//! rotates each round): **direct** (from a cgroup interception is not attached to),
//! **intercepted** (from the attached cgroup, dialing the server's own address), and
//! **explicit** (dialing the agent's listener). Everything is on loopback.
//!
//! Two shapes per round:
//! - setup: `tests/peers/h2py/first_byte.py` opens fresh connections one after another, one
//!   gRPC call each, from connect() to the response's headers (and to the first byte the server
//!   sent). Intercepted and explicit take turns connection by connection in one process inside
//!   the intercepted cgroup (a connect to the agent's listener is not a selected destination);
//!   direct runs in a second process outside it;
//! - throughput: h2load `-c 10 -m 20` gRPC unary calls for `--seconds`, the three modes in
//!   rotating order; requests/s.
//!
//! Printed: medians per mode; interception's added setup time (intercepted - explicit: the
//! connect redirected, the original destination looked up, the preface detected) against the
//! 50 us target, and intercepted / explicit requests/s (nothing per call beyond the proxy).
//! Results also in `target/bench/intercept.json`.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use test_support::{
    h2load,
    supervised::{Supervised, Supervision},
};

use super::{GrpcServer, build_go_peer, free_port, median, spread};
use crate::util::{output, workspace_root};

#[derive(Debug, clap::Parser)]
pub struct Options {
    /// Rounds (each measures every mode once, in rotating order).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Connections per mode of each setup run (one call each).
    #[arg(long, default_value_t = 500)]
    connections: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    Intercepted,
    Explicit,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Direct, Mode::Intercepted, Mode::Explicit];

    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Intercepted => "intercepted",
            Mode::Explicit => "explicit",
        }
    }
}

/// One round's figures of one mode: medians of its setup samples, and its throughput.
#[derive(Clone, Copy, Default)]
struct Figures {
    response_us: f64,
    first_byte_us: f64,
    requests_per_s: f64,
}

/// A cgroup for the intercepted runs; removed on drop.
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn cgroup2_root() -> Result<PathBuf> {
    test_support::cgroup::cgroup2_root()
        .context("no cgroup v2 hierarchy mounted (interception attaches to cgroup v2)")
}

pub fn run(opts: Options) -> Result<()> {
    let root = workspace_root()?;
    eprintln!("bench intercept: building the agent (release) and the grpc-go server");
    let agent_bin = crate::run::build_release_agent(&root)?;
    let grpcpeer = build_go_peer(&root, "grpcpeer")?;
    let server = GrpcServer::start(&mut Command::new(&grpcpeer))?;
    let bench_dir = root.join("target/bench");
    std::fs::create_dir_all(&bench_dir)?;
    let body = bench_dir.join("grpc-32.bin");
    let mut framed = vec![0u8, 0, 0, 0, 32];
    framed.extend([7u8; 32]);
    std::fs::write(&body, framed)?;

    let cgroup =
        Cgroup(cgroup2_root()?.join(format!("xtask-bench-intercept-{}", std::process::id())));
    std::fs::create_dir_all(&cgroup.0)?;
    let explicit = free_port()?;
    let intercept_listen = free_port()?;
    let config = bench_dir.join("intercept-agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"[[listener]]
name = "explicit"
address = "{explicit}"
[[listener.route]]
cluster = "grpc"

[[cluster]]
name = "grpc"
endpoints = ["{server}"]

[intercept]
listen = "{intercept_listen}"
cgroups = [{cgroup:?}]
[[intercept.destination]]
cidr = "{ip}"
ports = [{port}]

[api]
enabled = false
"#,
            server = server.addr,
            cgroup = cgroup.0,
            ip = server.addr.ip(),
            port = server.addr.port(),
        ),
    )?;
    let log = bench_dir.join("intercept-agent.log");
    let mut agent = Supervised::spawn(
        "agent run",
        Command::new(&agent_bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("AGENT_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?),
        Supervision::KILL,
    )?;
    let mut stdout = BufReader::new(agent.child_mut().stdout.take().context("agent stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let ready: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    if ready["kind"] != "ready" {
        bail!(
            "the agent said {line:?} instead of its ready line; stderr:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    let load = Load {
        grpc_body: &body,
        opts: &opts,
        cgroup: &cgroup.0,
        first_byte: root.join("tests/peers/h2py/first_byte.py"),
    };
    let target = |m: Mode| match m {
        Mode::Direct | Mode::Intercepted => server.addr,
        Mode::Explicit => explicit,
    };
    eprintln!(
        "bench intercept: grpc-go at {}, the agent's listener at {explicit}, interception to {intercept_listen} from {}; {} rounds of direct, intercepted and explicit, interleaved",
        server.addr,
        cgroup.0.display(),
        opts.runs
    );
    // Warm-up: the server, the agent's upstream connections, the page cache.
    for m in Mode::ALL {
        load.throughput(m, target(m), 1)?;
    }
    let mut results: [Vec<Figures>; 3] = Default::default();
    for round in 0..opts.runs {
        let inside = load.setup(
            Some(&cgroup.0),
            &[("intercepted", server.addr), ("explicit", explicit)],
        )?;
        let outside = load.setup(None, &[("direct", server.addr)])?;
        let mut rps = [0.0; 3];
        for k in 0..Mode::ALL.len() {
            let i = (round + k) % Mode::ALL.len();
            let m = Mode::ALL[i];
            rps[i] = load.throughput(m, target(m), opts.seconds)?;
        }
        for (i, m) in Mode::ALL.into_iter().enumerate() {
            let setup = if m == Mode::Direct { &outside } else { &inside };
            let (response_us, first_byte_us) = setup_medians(setup, m.name())?;
            results[i].push(Figures {
                response_us,
                first_byte_us,
                requests_per_s: rps[i],
            });
        }
        let row = |i: usize| {
            let f = results[i][round];
            format!(
                "{} {:.0} us to the response ({:.0} to the first byte), {:.0} req/s",
                Mode::ALL[i].name(),
                f.response_us,
                f.first_byte_us,
                f.requests_per_s
            )
        };
        println!("  round {}: {}; {}; {}", round + 1, row(0), row(1), row(2));
    }
    let stats = agent_stats(&mut agent, &mut stdout)?;
    drop(agent);

    let med = |i: usize, f: fn(&Figures) -> f64| {
        median(&results[i].iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    let (d, i, e) = (0, 1, 2);
    let response = |k| med(k, |f| f.response_us);
    let first_byte = |k| med(k, |f| f.first_byte_us);
    let rps = |k| med(k, |f| f.requests_per_s);
    let added = response(i) - response(e);
    println!(
        "\n== interception: direct vs intercepted vs the agent's explicit listener (medians of {}) ==",
        opts.runs
    );
    for k in [d, i, e] {
        println!(
            "{:<12} connect() to response {:>6.0} us (to the server's first byte {:>5.0} us), {:>8.0} req/s (spread {})",
            Mode::ALL[k].name(),
            response(k),
            first_byte(k),
            rps(k),
            spread(
                &results[k]
                    .iter()
                    .map(|f| f.requests_per_s)
                    .collect::<Vec<_>>()
            ),
        );
    }
    println!(
        "interception adds {added:.0} us to a connection's setup (to the response) over the explicit listener   (target < 50 us)"
    );
    println!(
        "the server's first byte comes {:.0} us later when intercepted: the agent says nothing before the client's first bytes show the protocol",
        first_byte(i) - first_byte(e)
    );
    println!(
        "intercepted / explicit requests/s = {:.3}x   (target: 1.0, nothing per call beyond the proxy); the proxy itself: explicit / direct = {:.3}x",
        rps(i) / rps(e),
        rps(e) / rps(d)
    );
    println!("agent's intercept figures: {}", stats["intercept"]);
    let rows = |k: usize| {
        results[k]
            .iter()
            .map(|f| json!({"response_us": f.response_us, "first_byte_us": f.first_byte_us, "requests_per_s": f.requests_per_s}))
            .collect::<Vec<_>>()
    };
    let out = json!({
        "runs": opts.runs,
        "direct": rows(d),
        "intercepted": rows(i),
        "explicit": rows(e),
        "median_response_us": {"direct": response(d), "intercepted": response(i), "explicit": response(e)},
        "median_first_byte_us": {"direct": first_byte(d), "intercepted": first_byte(i), "explicit": first_byte(e)},
        "median_requests_per_s": {"direct": rps(d), "intercepted": rps(i), "explicit": rps(e)},
        "setup_added_by_interception_us": added,
        "intercepted_over_explicit": rps(i) / rps(e),
        "agent_intercept": stats["intercept"],
    });
    let path = bench_dir.join("intercept.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
    println!("\nresults also in {}", path.display());
    Ok(())
}

/// The agent's stats line (SIGUSR1).
fn agent_stats(
    agent: &mut Supervised,
    stdout: &mut BufReader<std::process::ChildStdout>,
) -> Result<Value> {
    agent.signal(libc::SIGUSR1);
    let mut line = String::new();
    for _ in 0..10 {
        line.clear();
        if stdout.read_line(&mut line)? == 0 {
            break;
        }
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["kind"] == "stats"
        {
            return Ok(v);
        }
    }
    bail!("the agent printed no stats line")
}

struct Load<'a> {
    grpc_body: &'a Path,
    opts: &'a Options,
    cgroup: &'a Path,
    first_byte: PathBuf,
}

/// Medians of one target's setup samples: to the response, and to the first byte.
fn setup_medians(run: &Value, name: &str) -> Result<(f64, f64)> {
    let t = &run[name];
    if t["failed"].as_u64().unwrap_or(1) != 0 {
        bail!("setup run: connections to {name} failed: {t}");
    }
    let values = |key: &str| -> Vec<f64> {
        t[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let response = median(&values("response_us")).context("no setup samples")?;
    let first = median(&values("first_byte_us")).context("no setup samples")?;
    Ok((response, first))
}

impl Load<'_> {
    /// h2load, from the intercepted cgroup for [`Mode::Intercepted`].
    fn h2load(&self, mode: Mode) -> Command {
        let cgroup = (mode == Mode::Intercepted).then_some(self.cgroup);
        let mut cmd = test_support::cgroup::command_in(cgroup, "h2load");
        cmd.args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .arg("-d")
            .arg(self.grpc_body);
        cmd
    }

    fn url(to: std::net::SocketAddr) -> String {
        format!("http://{to}/test.Echo/Unary")
    }

    /// Fresh connections to each target in turn, one call each (`first_byte.py`), from
    /// `cgroup` when given.
    fn setup(
        &self,
        cgroup: Option<&Path>,
        targets: &[(&str, std::net::SocketAddr)],
    ) -> Result<Value> {
        let mut cmd = test_support::cgroup::command_in(cgroup, "python3");
        cmd.arg(&self.first_byte)
            .arg(self.opts.connections.to_string());
        for (name, addr) in targets {
            cmd.arg(format!("{name}={addr}"));
        }
        let text = output(&mut cmd)?;
        serde_json::from_str(&text).with_context(|| format!("first_byte.py said {text:?}"))
    }

    fn throughput(&self, mode: Mode, to: std::net::SocketAddr, seconds: u32) -> Result<f64> {
        let text = output(
            self.h2load(mode)
                .args(["-c", "10", "-m", "20", "-D", &seconds.to_string()])
                .args(["--warm-up-time", "1"])
                .arg(Self::url(to)),
        )?;
        Ok(check(&text, None)?.requests_per_s)
    }
}

fn check(text: &str, expected: Option<u64>) -> Result<h2load::Summary> {
    let summary =
        h2load::parse(text).with_context(|| format!("unexpected h2load output:\n{text}"))?;
    summary
        .all_succeeded(expected)
        .map_err(|e| anyhow::anyhow!("h2load did not complete every request: {e}\n{text}"))?;
    Ok(summary)
}
