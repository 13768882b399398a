//! `cargo xtask bench probes`: what the kernel probes cost and whether they keep up.
//!
//! 1. Reset storm: at least 100,000 TCP resets made as fast as two threads can, in a network
//!    namespace of the storm's own. Reported vs made (the storm's count, cross-checked with the
//!    kernel's `OutRsts`), drops, the agent's CPU seconds per million events, and the storm's
//!    wall time with the probes vs without (what the tracepoint programs cost the kernel).
//! 2. GC-heavy Go program: wall time with the probes attached vs not, interleaved runs
//!    (off/on, then on/off, ...) so drift on a noisy machine hits both sides; median of each.
//! 3. Exec-to-attach latency: how long after exec a new Go process has its probes, as the agent
//!    measures it (kernel exec timestamp to the last probe attached) and as the bench sees it
//!    (spawn to the attached line): for binaries the agent has never seen (a fresh copy each
//!    time, so every exec means inspecting and attaching) and for one it knows.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use test_support::supervised::{Supervised, Supervision};

use super::{agent::Agent, build_go_peer, median, quantile, reset_storm::run_storm_child, spread};
use crate::util::workspace_root;

#[derive(Debug, clap::Parser)]
pub struct Options {
    /// Resets in the storm (each seen twice by the agent: sent and received).
    #[arg(long, default_value_t = 100_000)]
    resets: u64,
    /// Runs of the GC-heavy program with probes and as many without.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// MiB of garbage the GC-heavy program churns through per run.
    #[arg(long, default_value_t = 12_000)]
    alloc_mb: u64,
    /// Go processes started one after another to time exec-to-attach, of each kind.
    #[arg(long, default_value_t = 100)]
    exec_samples: usize,
    /// Parts to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', default_values = ["reset-storm", "gc-overhead", "exec-to-attach"])]
    only: Vec<Part>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    ResetStorm,
    GcOverhead,
    ExecToAttach,
}

pub fn run(opts: Options) -> Result<()> {
    let root = workspace_root()?;
    eprintln!("bench probes: building the agent (release) and the Go load");
    let agent_bin = crate::run::build_release_agent(&root)?;
    let gcstress = build_go_peer(&root, "gcstress")?;

    let mut results = serde_json::Map::new();
    if opts.only.contains(&Part::ResetStorm) {
        results.insert("reset_storm".into(), reset_storm(&agent_bin, &opts)?);
    }
    if opts.only.contains(&Part::GcOverhead) {
        results.insert(
            "gc_overhead".into(),
            gc_overhead(&agent_bin, &gcstress, &opts)?,
        );
    }
    if opts.only.contains(&Part::ExecToAttach) {
        results.insert(
            "exec_to_attach".into(),
            exec_to_attach(&agent_bin, &gcstress, &opts)?,
        );
    }
    let results = Value::Object(results);
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("probes.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("\nresults also in {}", path.display());
    Ok(())
}

fn reset_storm(agent_bin: &Path, opts: &Options) -> Result<Value> {
    eprintln!(
        "bench probes: reset storm of {} resets, first without the agent",
        opts.resets
    );
    let baseline = run_storm_child(opts.resets)?;

    eprintln!("bench probes: reset storm with the agent");
    let agent = Agent::start(agent_bin, &[])?;
    let (cpu_before, events_before) = (agent.cpu_seconds()?, agent.with(|t| t.events));
    let storm = run_storm_child(opts.resets)?;
    let made = storm.resets_made();
    let seen = |t: &super::agent::Tally, dir: &str| {
        t.resets
            .get(&(storm.netns, dir.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    // Wait for the agent to print every reset, or to go quiet for 5 s.
    agent.wait_for(Duration::from_secs(300), Duration::from_secs(5), |t| {
        seen(t, "sent") >= made && seen(t, "received") >= made
    });
    let (cpu_after, events_after) = (agent.cpu_seconds()?, agent.with(|t| t.events));
    let (sent, received, bad_lines) =
        agent.with(|t| (seen(t, "sent"), seen(t, "received"), t.bad_lines));
    let summary = agent.stop()?;

    let probe = &summary["probes"]["tcp-reset"];
    let dropped = probe["dropped_in_kernel"].as_u64().unwrap_or(0);
    let undecodable = summary["reader"]["undecodable"].as_u64().unwrap_or(0);
    let events = events_after - events_before;
    let cpu = cpu_after - cpu_before;
    let cpu_per_million = if events > 0 {
        cpu / events as f64 * 1e6
    } else {
        f64::NAN
    };
    let ratio_sent = sent as f64 / made as f64;
    let ratio_received = received as f64 / made as f64;

    println!("\n== reset storm ==");
    println!(
        "resets made             {made} ({} abortive close, {} closed port; kernel OutRsts {})",
        storm.abortive_closes, storm.closed_port_connects, storm.kernel_out_rsts
    );
    println!(
        "reported / made         sent {sent}/{made} = {ratio_sent:.4}, received {received}/{made} = {ratio_received:.4}   (target 1.0)"
    );
    println!(
        "dropped                 {dropped} in the kernel, {undecodable} undecodable, {bad_lines} non-JSON lines   (target 0)"
    );
    println!(
        "agent CPU               {cpu:.2} s for {events} events = {cpu_per_million:.2} CPU s per million events"
    );
    println!(
        "storm wall time         {:.2} s with probes, {:.2} s without = {:.3}x ({:.0} vs {:.0} resets/s)",
        storm.seconds,
        baseline.seconds,
        storm.seconds / baseline.seconds,
        made as f64 / storm.seconds,
        baseline.resets_made() as f64 / baseline.seconds,
    );
    if storm.kernel_out_rsts != made {
        println!(
            "note: the kernel counted {} RSTs sent, the storm made {made}",
            storm.kernel_out_rsts
        );
    }

    Ok(json!({
        "resets_made": made,
        "kernel_out_rsts": storm.kernel_out_rsts,
        "reported_sent": sent,
        "reported_received": received,
        "ratio_sent": ratio_sent,
        "ratio_received": ratio_received,
        "dropped_in_kernel": dropped,
        "undecodable": undecodable,
        "agent_cpu_seconds": cpu,
        "agent_events": events,
        "agent_cpu_seconds_per_million_events": cpu_per_million,
        "storm_seconds_with_probes": storm.seconds,
        "storm_seconds_without_probes": baseline.seconds,
    }))
}

/// One run of the GC-heavy program: wall seconds of its work, GC cycles it reported.
struct GcRun {
    seconds: f64,
    /// User + system CPU seconds of the whole process (start-up included).
    cpu_seconds: f64,
    gc_cycles: u64,
    pid: u32,
}

/// Starts gcstress, lets it allocate once it is ready, times the work to its exit.
/// `before_work` runs between start and the go signal (waiting for the agent's attach).
fn gc_run(
    gcstress: &Path,
    alloc_mb: u64,
    before_work: impl FnOnce(u32) -> Result<()>,
) -> Result<GcRun> {
    // Killed if the run fails before it is waited for.
    let mut child = Supervised::spawn(
        "gcstress",
        Command::new(gcstress)
            .args(["-wait", "-alloc-mb", &alloc_mb.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
        Supervision::KILL,
    )?;
    let pid = child.pid();
    let mut stdout = BufReader::new(child.child_mut().stdout.take().context("gcstress stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("gcstress printed {line:?} instead of ready");
    }
    before_work(pid)?;
    let mut stdin = child.child_mut().stdin.take().context("gcstress stdin")?;
    let start = Instant::now();
    stdin.write_all(b"go\n")?;
    line.clear();
    stdout.read_line(&mut line)?;
    let (status, usage) = child.wait_with_usage().context("wait4 gcstress")?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu_seconds = cpu_seconds(&usage);
    if !status.success() {
        bail!("gcstress exited with wait status {:#x}", status.into_raw());
    }
    let gc_cycles = line
        .trim()
        .strip_prefix("gc_cycles ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("gcstress printed {line:?} instead of gc_cycles N"))?;
    Ok(GcRun {
        seconds,
        cpu_seconds,
        gc_cycles,
        pid,
    })
}

/// A reaped child's user + system CPU seconds (wait4(2)'s usage).
fn cpu_seconds(usage: &libc::rusage) -> f64 {
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn gc_overhead(agent_bin: &Path, gcstress: &Path, opts: &Options) -> Result<Value> {
    eprintln!(
        "bench probes: GC-heavy Go program ({} MiB of garbage), {} runs with probes and {} without, interleaved",
        opts.alloc_mb, opts.runs, opts.runs
    );
    let (mut off, mut on, mut off_cpu, mut on_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rows = Vec::new();
    for i in 0..opts.runs {
        let attached_first = i % 2 == 1;
        let mut pair = [None, None];
        for attached in [attached_first, !attached_first] {
            let run = if attached {
                let agent = Agent::start(agent_bin, &[])?;
                let run = gc_run(gcstress, opts.alloc_mb, |pid| {
                    let ok =
                        agent.wait_for(Duration::from_secs(10), Duration::from_secs(10), |t| {
                            t.attached.contains_key(&pid)
                        });
                    if ok {
                        Ok(())
                    } else {
                        bail!(
                            "the agent did not attach to gcstress pid {pid}; stderr:\n{}",
                            agent.stderr()
                        )
                    }
                })?;
                // Two pauses per cycle, plus one for ReadMemStats at the end.
                let expected = 2 * run.gc_cycles + 1;
                agent.wait_for(Duration::from_secs(60), Duration::from_secs(3), |t| {
                    t.pauses.get(&run.pid).copied().unwrap_or(0) >= expected
                });
                let reported = agent.with(|t| t.pauses.get(&run.pid).copied().unwrap_or(0));
                agent.stop()?;
                (run, Some((reported, expected)))
            } else {
                (gc_run(gcstress, opts.alloc_mb, |_| Ok(()))?, None)
            };
            pair[usize::from(attached)] = Some(run);
        }
        let [
            Some((off_run, _)),
            Some((on_run, Some((reported, expected)))),
        ] = pair
        else {
            bail!("internal: a run of the pair is missing");
        };
        println!(
            "  run {}: without {:.3} s, with {:.3} s ({:.4}x); {} GC cycles, {reported}/{expected} pauses reported",
            i + 1,
            off_run.seconds,
            on_run.seconds,
            on_run.seconds / off_run.seconds,
            on_run.gc_cycles,
        );
        off.push(off_run.seconds);
        on.push(on_run.seconds);
        off_cpu.push(off_run.cpu_seconds);
        on_cpu.push(on_run.cpu_seconds);
        rows.push(json!({
            "without_seconds": off_run.seconds,
            "with_seconds": on_run.seconds,
            "without_cpu_seconds": off_run.cpu_seconds,
            "with_cpu_seconds": on_run.cpu_seconds,
            "gc_cycles_with": on_run.gc_cycles,
            "gc_cycles_without": off_run.gc_cycles,
            "pauses_reported": reported,
            "pauses_expected": expected,
        }));
    }
    let med_off = median(&off).unwrap_or(f64::NAN);
    let med_on = median(&on).unwrap_or(f64::NAN);
    let pair_ratios: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
    let cycles: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["gc_cycles_with"].as_f64())
        .collect();
    let cycles_per_s = median(&cycles).unwrap_or(f64::NAN) / med_on;
    println!("\n== GC-heavy Go program, probes attached vs not ==");
    println!(
        "median wall time        {med_on:.3} s with, {med_off:.3} s without = {:.4}x   (target <= 1.01)",
        med_on / med_off
    );
    let (cpu_on, cpu_off) = (
        median(&on_cpu).unwrap_or(f64::NAN),
        median(&off_cpu).unwrap_or(f64::NAN),
    );
    println!(
        "run-to-run spread       with {}, without {} around their medians",
        spread(&on),
        spread(&off)
    );
    println!(
        "median of pair ratios   {:.4}x; about {cycles_per_s:.0} GC cycles/s, {:.0} pauses/s",
        median(&pair_ratios).unwrap_or(f64::NAN),
        2.0 * cycles_per_s,
    );
    println!(
        "median CPU time         {cpu_on:.3} s with, {cpu_off:.3} s without = {:.4}x (user + system of the Go process)",
        cpu_on / cpu_off
    );
    Ok(json!({
        "alloc_mb": opts.alloc_mb,
        "runs": rows,
        "median_with_seconds": med_on,
        "median_without_seconds": med_off,
        "ratio_of_medians": med_on / med_off,
        "median_pair_ratio": median(&pair_ratios),
        "median_with_cpu_seconds": cpu_on,
        "median_without_cpu_seconds": cpu_off,
    }))
}

fn exec_to_attach(agent_bin: &Path, gcstress: &Path, opts: &Options) -> Result<Value> {
    eprintln!(
        "bench probes: exec-to-attach latency, {} new and {} known Go binaries one after another, then {} new with --go-attach-normal-rcu",
        opts.exec_samples, opts.exec_samples, opts.exec_samples
    );
    let copies = std::env::temp_dir().join(format!("bench-exec-to-attach-{}", std::process::id()));
    std::fs::create_dir_all(&copies)?;
    let mut kinds = Vec::new();
    // As deployed (RCU expedited for each attach), then `--go-attach-normal-rcu`, which shows
    // what the rest is (an RCU grace period).
    for (kind, normal_rcu) in [
        ("new binary", false),
        ("known binary", false),
        ("new, normal RCU", true),
    ] {
        let mut args = vec!["--probes", "go-gc"];
        if normal_rcu {
            args.push("--go-attach-normal-rcu");
        }
        let agent = Agent::start(agent_bin, &args)?;
        let mut agent_ms = Vec::new();
        let mut seen_ms = Vec::new();
        for i in 0..opts.exec_samples {
            let binary = if kind != "known binary" {
                // A copy is a new inode: to the agent a binary it has never seen.
                let copy = copies.join(format!("gcstress-{kind}-{i}"));
                std::fs::copy(gcstress, &copy)?;
                copy
            } else {
                gcstress.to_path_buf()
            };
            let start = Instant::now();
            // Killed if the bench gives up before it is waited for.
            let mut child = Supervised::spawn(
                "gcstress",
                Command::new(&binary)
                    .args(["-sleep", "200ms"])
                    .stdout(Stdio::null()),
                Supervision::KILL,
            )?;
            let pid = child.pid();
            let attached = agent.wait_for(Duration::from_secs(10), Duration::from_secs(10), |t| {
                t.attached.contains_key(&pid)
            });
            let (at, us) = agent.with(|t| {
                (
                    t.attached.get(&pid).copied(),
                    t.exec_to_attach_us.get(&pid).copied(),
                )
            });
            child.wait()?;
            match (attached, at, us) {
                (true, Some(at), Some(us)) => {
                    seen_ms.push(at.duration_since(start).as_secs_f64() * 1e3);
                    agent_ms.push(us as f64 / 1e3);
                }
                _ => bail!(
                    "the agent did not attach to pid {pid}; stderr:\n{}",
                    agent.stderr()
                ),
            }
            // Processes a little apart, as a node starts them (not one exec's exit racing
            // the next's).
            std::thread::sleep(Duration::from_millis(20));
        }
        agent.stop()?;
        kinds.push((kind, agent_ms, seen_ms));
    }
    let _ = std::fs::remove_dir_all(&copies);
    println!(
        "\n== exec to attach ({} processes of each kind) ==",
        opts.exec_samples
    );
    let mut out = serde_json::Map::new();
    for (kind, agent_ms, seen_ms) in kinds {
        let p = |v: &[f64], q| quantile(v, q).unwrap_or(f64::NAN);
        println!(
            "{kind:<15} agent: median {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms   (target p99 < 20 ms)",
            p(&agent_ms, 0.5),
            p(&agent_ms, 0.95),
            p(&agent_ms, 0.99),
            p(&agent_ms, 1.0)
        );
        println!(
            "{:<15} spawn to attached line: median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            "",
            p(&seen_ms, 0.5),
            p(&seen_ms, 0.99),
            p(&seen_ms, 1.0)
        );
        out.insert(
            kind.replace([' ', ','], "_").replace("__", "_"),
            json!({
                "agent_ms": agent_ms,
                "agent_median_ms": p(&agent_ms, 0.5),
                "agent_p95_ms": p(&agent_ms, 0.95),
                "agent_p99_ms": p(&agent_ms, 0.99),
                "agent_max_ms": p(&agent_ms, 1.0),
                "spawn_to_line_ms": seen_ms,
                "spawn_to_line_median_ms": p(&seen_ms, 0.5),
                "spawn_to_line_p99_ms": p(&seen_ms, 0.99),
            }),
        );
    }
    Ok(Value::Object(out))
}
