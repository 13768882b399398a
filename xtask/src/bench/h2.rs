//! `cargo xtask bench h2`: what following HTTP/2 frames in the kernel costs real traffic.
//!
//! h2load drives gRPC unary calls at the grpc-go test server over loopback in three modes,
//! interleaved (the order rotates each round, so drift on a noisy machine hits every mode):
//! without the agent; with the tracker (kernel programs attached, every event read, decoded
//! and fed to the rapid-reset detector, as the daemon consumes them); and with `agent trace
//! --json` printing every event to a pipe. Printed: each mode's median requests/s and its ratio
//! to no agent, the tracker's frames followed and events per second, the agent's CPU, and
//! anything lost or dropped.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use test_support::h2load;

use super::{GrpcServer, agent::Agent, build_go_peer, median, spread};
use crate::util::{output, workspace_root};

#[derive(Debug, clap::Parser)]
pub struct Options {
    /// Runs with the tracker attached and as many without.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Requests per h2load run (`-n`).
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Connections per h2load run (`-c`).
    #[arg(long, default_value_t = 50)]
    clients: u32,
    /// Concurrent streams per connection (`-m`).
    #[arg(long, default_value_t = 100)]
    streams: u32,
    /// Also emit DATA, WINDOW_UPDATE, PING, ... as events (`agent trace --all-frames`).
    #[arg(long)]
    all_frames: bool,
}

pub fn run(opts: Options) -> Result<()> {
    let root = workspace_root()?;
    eprintln!("bench h2: building the agent (release) and the grpc-go server");
    let agent_bin = crate::run::build_release_agent(&root)?;
    let grpcpeer = build_go_peer(&root, "grpcpeer")?;
    let server = GrpcServer::start(&mut Command::new(&grpcpeer))?;
    let body = root.join("target/bench/grpc-32.bin");
    std::fs::create_dir_all(body.parent().context("bench dir")?)?;
    // One gRPC message: uncompressed flag, 4-byte length, 32 bytes.
    let mut framed = vec![0u8, 0, 0, 0, 32];
    framed.extend([7u8; 32]);
    std::fs::write(&body, framed)?;
    let load = Load {
        url: format!("http://{}/test.Echo/Unary", server.addr),
        body,
        opts: &opts,
    };

    // One unmeasured run so both sides start with a warm server (Go's heap, page cache).
    eprintln!("bench h2: warm-up run");
    load.run()?;

    let mut tracker_args = vec!["--probes", "h2-frames", "--print", "rapid_reset"];
    let mut printing_args = vec!["--probes", "h2-frames"];
    if opts.all_frames {
        tracker_args.push("--all-frames");
        printing_args.push("--all-frames");
    }
    eprintln!(
        "bench h2: h2load -n {} -c {} -m {} against grpc-go at {}; {} runs each without the agent, with the tracker, with every event printed; interleaved",
        opts.requests, opts.clients, opts.streams, server.addr, opts.runs
    );
    let modes = [Mode::Without, Mode::Tracker, Mode::Printing];
    let mut results: [Vec<Measured>; 3] = Default::default();
    for i in 0..opts.runs {
        // Rotate the order each round so drift on a noisy machine hits every mode alike.
        for k in 0..modes.len() {
            let m = (i + k) % modes.len();
            let measured = match modes[m] {
                Mode::Without => Measured::plain(load.run()?),
                Mode::Tracker => measure_with_agent(&agent_bin, &tracker_args, &load)?,
                Mode::Printing => measure_with_agent(&agent_bin, &printing_args, &load)?,
            };
            results[m].push(measured);
        }
        let [off, tracker, printing] = &results;
        let (off, tracker, printing) = (&off[i], &tracker[i], &printing[i]);
        println!(
            "  run {}: without {:.0} req/s; tracker {:.0} req/s ({:.4}x, {} frames followed, {} events, {} lost, {} dropped); printing {:.0} req/s ({:.4}x, {} lines)",
            i + 1,
            off.run.requests_per_s,
            tracker.run.requests_per_s,
            tracker.run.requests_per_s / off.run.requests_per_s,
            tracker.frames,
            tracker.events,
            lost_total(&tracker.h2),
            tracker.h2["dropped_in_kernel"],
            printing.run.requests_per_s,
            printing.run.requests_per_s / off.run.requests_per_s,
            printing.printed,
        );
    }
    drop(server);

    let med = |v: Vec<f64>| median(&v).unwrap_or(f64::NAN);
    let rps = |m: &[Measured]| m.iter().map(|x| x.run.requests_per_s).collect::<Vec<_>>();
    let per_s = |m: &[Measured], f: fn(&Measured) -> f64| {
        med(m.iter().map(|x| f(x) / x.run.seconds).collect())
    };
    let [off, tracker, printing] = &results;
    let (med_off, med_tracker, med_printing) =
        (med(rps(off)), med(rps(tracker)), med(rps(printing)));
    println!("\n== h2load vs grpc-go: HTTP/2 frame tracker attached vs not ==");
    println!(
        "tracker                 {med_tracker:.0} req/s with, {med_off:.0} req/s without = {:.4}x   (target >= 0.97)",
        med_tracker / med_off
    );
    println!(
        "                        {:.0} frames followed/s, {:.0} events/s decoded ({}), agent CPU {:.3} cores",
        per_s(tracker, |x| x.frames as f64),
        per_s(tracker, |x| x.events as f64),
        if opts.all_frames {
            "every frame"
        } else {
            "SETTINGS, HEADERS, RST_STREAM, GOAWAY"
        },
        per_s(tracker, |x| x.agent_cpu_seconds),
    );
    println!(
        "printing every event    {med_printing:.0} req/s = {:.4}x; {:.0} JSON lines/s to a pipe, agent CPU {:.3} cores (`agent trace --json`, a debugging view)",
        med_printing / med_off,
        per_s(printing, |x| x.printed as f64),
        per_s(printing, |x| x.agent_cpu_seconds),
    );
    println!(
        "run-to-run spread       without {}, tracker {}, printing {} around their medians",
        spread(&rps(off)),
        spread(&rps(tracker)),
        spread(&rps(printing)),
    );
    let incomplete: u64 = tracker
        .iter()
        .chain(printing)
        .map(|x| lost_total(&x.h2))
        .sum();
    let dropped: u64 = tracker
        .iter()
        .chain(printing)
        .map(|x| x.h2["dropped_in_kernel"].as_u64().unwrap_or(0))
        .sum();
    println!("flows lost, events dropped   {incomplete}, {dropped} over all runs   (target 0)");

    let rows = |m: &[Measured]| m.iter().map(Measured::json).collect::<Vec<_>>();
    let results = json!({
        "h2load": { "requests": opts.requests, "clients": opts.clients, "streams": opts.streams },
        "all_frames": opts.all_frames,
        "without": rows(off),
        "tracker": rows(tracker),
        "printing": rows(printing),
        "median_without_requests_per_s": med_off,
        "median_tracker_requests_per_s": med_tracker,
        "median_printing_requests_per_s": med_printing,
        "tracker_ratio": med_tracker / med_off,
        "printing_ratio": med_printing / med_off,
        "median_frames_followed_per_s": per_s(tracker, |x| x.frames as f64),
        "median_events_per_s": per_s(tracker, |x| x.events as f64),
        "median_tracker_agent_cores": per_s(tracker, |x| x.agent_cpu_seconds),
    });
    let path = root.join("target/bench/h2.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("\nresults also in {}", path.display());
    Ok(())
}

#[derive(Clone, Copy)]
enum Mode {
    /// h2load alone.
    Without,
    /// `agent trace --probes h2-frames --print rapid_reset`: every event read from the ring,
    /// decoded and fed to the rapid-reset detector, as the daemon consumes them; none printed.
    Tracker,
    /// `agent trace --probes h2-frames --json`: every event also printed to a pipe.
    Printing,
}

/// One h2load run and, when the agent ran, what it reported.
#[derive(Default)]
struct Measured {
    run: LoadRun,
    /// Frames the kernel program followed (every type), from the agent's summary.
    frames: u64,
    /// Signals the agent decoded from the ring (every frame event, batched or not).
    events: u64,
    /// Event lines the agent printed.
    printed: u64,
    agent_cpu_seconds: f64,
    h2: Value,
}

impl Measured {
    fn plain(run: LoadRun) -> Self {
        Self {
            run,
            ..Self::default()
        }
    }

    fn json(&self) -> Value {
        json!({
            "requests_per_s": self.run.requests_per_s,
            "seconds": self.run.seconds,
            "frames_followed": self.frames,
            "events": self.events,
            "printed": self.printed,
            "agent_cpu_seconds": self.agent_cpu_seconds,
            "h2": self.h2,
        })
    }
}

/// One h2load run with `agent trace --json ARGS` started before and stopped after it.
fn measure_with_agent(agent_bin: &Path, args: &[&str], load: &Load<'_>) -> Result<Measured> {
    let agent = Agent::start(agent_bin, args)?;
    let cpu_before = agent.cpu_seconds()?;
    let run = load.run()?;
    // The ring is read every 10 ms: give the agent time to print what it read.
    agent.wait_for(Duration::from_secs(30), Duration::from_millis(500), |_| {
        false
    });
    let cpu = agent.cpu_seconds()? - cpu_before;
    let (printed, bad_lines) = agent.with(|t| (t.events, t.bad_lines));
    let summary = agent.stop()?;
    if bad_lines > 0 {
        bail!("the agent printed {bad_lines} lines that are not JSON");
    }
    let mut h2 = summary["probes"]["h2-frames"].clone();
    // Per-flow counts are for the tests; here they would only bloat the results file.
    if let Some(m) = h2.as_object_mut() {
        m.remove("flows");
    }
    Ok(Measured {
        run,
        frames: h2["frames"].as_u64().unwrap_or(0),
        events: summary["reader"]["signals"].as_u64().unwrap_or(0),
        printed,
        agent_cpu_seconds: cpu,
        h2,
    })
}

fn lost_total(h2: &Value) -> u64 {
    h2["lost"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

struct Load<'a> {
    url: String,
    body: PathBuf,
    opts: &'a Options,
}

#[derive(Default)]
struct LoadRun {
    requests_per_s: f64,
    seconds: f64,
}

impl Load<'_> {
    fn run(&self) -> Result<LoadRun> {
        let n = self.opts.requests.to_string();
        let text = output(
            Command::new("h2load")
                .args(["-n", &n])
                .args(["-c", &self.opts.clients.to_string()])
                .args(["-m", &self.opts.streams.to_string()])
                .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
                .arg("-d")
                .arg(&self.body)
                .arg(&self.url),
        )?;
        let summary =
            h2load::parse(&text).with_context(|| format!("unexpected h2load output:\n{text}"))?;
        summary
            .all_succeeded(Some(self.opts.requests))
            .map_err(|e| anyhow::anyhow!("h2load did not complete every request: {e}\n{text}"))?;
        Ok(LoadRun {
            requests_per_s: summary.requests_per_s,
            seconds: summary.seconds,
        })
    }
}
