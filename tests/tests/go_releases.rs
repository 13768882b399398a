//! Go process discovery keeps up whatever else the agent does, for every tested Go release.
//!
//! Fifty processes of seven Go releases (Debian's 1.19 and the releases of
//! `tests/peers/go-releases.txt`), each plain and stripped, first one after another and then
//! twenty at once (of fresh copies: binaries the agent has not seen). Each process sleeps 100 ms
//! before its GC cycles and is told nothing about the agent: every one must be attached and
//! every pause reported, within max(10 %, 50 us) of the runtime's own gctrace. Once with
//! `agent trace`, once with `agent run` (its correlator consuming), and once with `agent
//! trace` writing into a pipe nobody reads until the end: that stalled the one loop that also
//! handled execs, and every process started meanwhile went unseen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use e2e::{
    Trace, agent_bin, collect_lines,
    gc::{Agreement, agent_cycles, gctrace_cycles, within_tolerance},
    go_peer_built_by, go_releases,
    proxy::{AgentProxy, config_file},
    require_root,
};
use serde_json::Value;

const CYCLES: usize = 10;
/// How long each process lives before its first GC: the time the agent has to attach.
const DELAY: &str = "100ms";
const ONE_AFTER_ANOTHER: usize = 30;
const AT_ONCE: usize = 20;

/// gcstress built by Debian's Go and by each release, plain and stripped.
fn binaries() -> Vec<(String, PathBuf)> {
    let mut releases: Vec<Option<String>> = vec![None];
    releases.extend(go_releases().into_iter().map(Some));
    let mut out = Vec::new();
    for release in &releases {
        for stripped in [false, true] {
            let label = format!(
                "go{}{}",
                release.as_deref().unwrap_or("1.19 (Debian)"),
                if stripped { " stripped" } else { "" }
            );
            out.push((
                label,
                go_peer_built_by(release.as_deref(), "gcstress", stripped),
            ));
        }
    }
    out
}

/// Copies of `bins` in a scratch directory: new inodes, so new binaries to the agent.
fn fresh_copies(bins: &[(String, PathBuf)], tag: &str) -> Vec<(String, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("e2e-go-releases-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    bins.iter()
        .enumerate()
        .map(|(i, (label, path))| {
            let copy = dir.join(format!("gcstress-copy-{i}"));
            std::fs::copy(path, &copy).unwrap();
            (format!("{label} (fresh copy)"), copy)
        })
        .collect()
}

struct Running {
    label: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
}

struct Finished {
    label: String,
    pid: u32,
    gctrace: Vec<(f64, f64)>,
}

fn spawn(label: &str, binary: &Path, cycles: usize, interval: &str) -> Running {
    let mut child = Command::new(binary)
        .args([
            "-cycles",
            &cycles.to_string(),
            "-delay",
            DELAY,
            "-interval",
            interval,
        ])
        .env("GODEBUG", "gctrace=1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect_lines(child.stderr.take().unwrap());
    Running {
        label: label.to_owned(),
        child,
        stderr,
    }
}

/// Thirty processes one after another, then twenty at once from fresh copies.
fn workload(bins: &[(String, PathBuf)], tag: &str) -> Vec<Finished> {
    let mut done = Vec::new();
    for i in 0..ONE_AFTER_ANOTHER {
        let (label, bin) = &bins[i % bins.len()];
        done.push(finish(spawn(label, bin, CYCLES, "20ms"), CYCLES));
    }
    let copies = fresh_copies(bins, tag);
    let burst: Vec<Running> = (0..AT_ONCE)
        .map(|i| {
            let (label, bin) = &copies[i % copies.len()];
            // Cycles far enough apart that twenty processes do not overload two cores: a
            // pause's thread preempted at a probe's trap would be measured a time slice long.
            spawn(label, bin, CYCLES, "100ms")
        })
        .collect();
    done.extend(burst.into_iter().map(|r| finish(r, CYCLES)));
    done
}

/// Every process attached, every cycle's two pauses reported and within tolerance.
fn check(session: &str, events: &[Value], finished: &[Finished]) {
    let attached = |pid: u32| {
        events
            .iter()
            .find(|e| e["kind"] == "go_process" && e["state"] == "attached" && e["pid"] == pid)
    };
    let missing: Vec<String> = finished
        .iter()
        .filter(|f| attached(f.pid).is_none())
        .map(|f| format!("{} (pid {})", f.label, f.pid))
        .collect();
    assert!(
        missing.is_empty(),
        "{session}: processes never attached: {missing:?}"
    );
    let mut gctrace_all = Vec::new();
    let mut agent_all = Vec::new();
    for f in finished {
        let agent = agent_cycles(events, f.pid);
        let pauses: Vec<&Value> = events
            .iter()
            .filter(|e| e["kind"] == "gc_stw" && e["pid"] == f.pid)
            .collect();
        assert_eq!(
            agent.len(),
            f.gctrace.len(),
            "{session}: {} (pid {}): the agent must report both pauses of every cycle\nattached: {:?}\npauses: {pauses:?}\ngctrace: {:?}",
            f.label,
            f.pid,
            attached(f.pid),
            f.gctrace
        );
        for ((gs, gm), (a_s, a_m)) in f.gctrace.iter().zip(&agent) {
            for (g, a) in [(gs, a_s), (gm, a_m)] {
                if !within_tolerance(*g, *a) {
                    eprintln!(
                        "{session}: {} (pid {}): gctrace {g:.1}us, agent {a:.1}us",
                        f.label, f.pid
                    );
                }
            }
        }
        gctrace_all.extend_from_slice(&f.gctrace);
        agent_all.extend(agent);
    }
    let agreement = Agreement::of(session, &gctrace_all, &agent_all);
    let mut new_binary_us: Vec<u64> = finished
        .iter()
        .filter_map(|f| attached(f.pid))
        .filter(|e| e["new_binary"] == true)
        .filter_map(|e| e["exec_to_attach_us"].as_u64())
        .collect();
    new_binary_us.sort_unstable();
    let q = |p: f64| {
        new_binary_us
            .get(((new_binary_us.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    eprintln!(
        "{session}: {} processes attached; {agreement}; exec-to-attach of {} new binaries: median {} us, max {} us",
        finished.len(),
        new_binary_us.len(),
        q(0.5),
        q(1.0)
    );
    // Every pause is reported (above). A few can differ from gctrace by a time slice: a probe
    // is a trap, and the kernel may preempt the stopping thread on the way back to Go, inside
    // the window one side measures and outside the other's (those are printed above).
    assert!(
        agreement.share() >= 0.98,
        "{session}: only {:.1}% of pauses within max(10%, 50us) of gctrace",
        agreement.share() * 100.0
    );
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn agent_trace_attaches_every_go_process_of_every_release() {
    let bins = binaries();
    let mut trace = Trace::start(&["--probes", "go-gc"]);
    let finished = workload(&bins, "trace");
    let last = finished.last().unwrap().pid;
    assert!(
        trace.wait_for(Duration::from_secs(10), |ev| ev
            .iter()
            .any(|e| e["state"] == "detached" && e["pid"] == last)),
        "the last process's exit was not seen"
    );
    // Stopping drains what the kernel still holds.
    let out = trace.stop();
    check("agent trace", &out.events, &finished);
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn agent_run_attaches_every_go_process_of_every_release() {
    let bins = binaries();
    let dir = std::env::temp_dir().join(format!("e2e-go-releases-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // No linger: each binary's probes go with its last process and come again with the next.
    let config = config_file(
        &dir,
        "[[cluster]]\nname = \"svc\"\nendpoints = [\"127.0.0.1:9\"]\n\n[signals]\nprobes = [\"go-gc\"]\ngo_linger = \"0s\"\n",
    );
    let mut agent =
        AgentProxy::start_with_probes(&["--config", config.to_str().unwrap(), "--print-signals"]);
    let finished = workload(&bins, "run");
    let last = finished.last().unwrap().pid;
    agent.process.wait_line(Duration::from_secs(10), |v| {
        v["state"] == "detached" && v["pid"] == last
    });
    let (status, lines, stderr) = agent.terminate(Duration::from_secs(30));
    assert!(status.success(), "agent run failed: {stderr}");
    check("agent run", &lines, &finished);
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn a_stdout_nobody_reads_holds_up_no_process() {
    require_root();
    let binary = go_peer_built_by(None, "gcstress", false);
    let mut agent = Command::new(agent_bin())
        .args(["trace", "--json", "--probes", "go-gc", "--go-linger", "0s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect_lines(agent.stderr.take().unwrap());
    let mut stdout = BufReader::new(agent.stdout.take().unwrap());
    let mut ready = String::new();
    stdout.read_line(&mut ready).unwrap();
    assert!(ready.contains("\"ready\""), "{ready}");
    // 7 x 30 cycles print about 100 KB: the pipe (64 KiB) fills during the fifth process, and
    // from then on the agent's printing waits for a reader that only comes at the end.
    let finished: Vec<Finished> = (0..7)
        .map(|i| finish(spawn(&format!("process {i}"), &binary, 30, "20ms"), 30))
        .collect();
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGINT) };
    let events: Vec<Value> = stdout
        .lines()
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    assert!(
        agent.wait().unwrap().success(),
        "{}",
        stderr.lock().unwrap()
    );
    for f in &finished {
        assert!(
            events.iter().any(|e| e["kind"] == "go_process"
                && e["state"] == "attached"
                && e["pid"] == f.pid),
            "{} (pid {}) was never attached; agent log:\n{}",
            f.label,
            f.pid,
            stderr.lock().unwrap()
        );
        let agent_side = agent_cycles(&events, f.pid);
        let a = Agreement::of(&f.label, &f.gctrace, &agent_side);
        assert!(a.share() >= 0.95, "{}: {a}", f.label);
    }
    eprintln!(
        "stalled stdout: 7 processes attached, {} lines printed once read",
        events.len()
    );
}

/// Waits for the process; its gctrace figures, `cycles` of them.
fn finish(mut r: Running, cycles: usize) -> Finished {
    let pid = r.child.id();
    assert!(r.child.wait().unwrap().success(), "{} failed", r.label);
    // The stderr thread reads to EOF; give it a moment after the exit.
    std::thread::sleep(Duration::from_millis(20));
    let gctrace = gctrace_cycles(&r.stderr.lock().unwrap());
    assert_eq!(gctrace.len(), cycles, "{}: gctrace cycles", r.label);
    Finished {
        label: r.label,
        pid,
        gctrace,
    }
}
