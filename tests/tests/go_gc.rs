//! Go GC stop-the-world pauses against the runtime's own figures (GODEBUG=gctrace=1), for a Go
//! process started before the agent, one started after, a stripped binary, and two at once; and
//! no probe, link or map entry left behind by 100 short-lived Go processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use e2e::{
    Trace, collect_lines,
    gc::{Agreement, agent_cycles, gctrace_cycles},
    go_peer,
};
use serde_json::Value;
use test_support::supervised::{Supervised, Supervision};

const CYCLES: usize = 60;

/// gcstress waiting on stdin with gctrace on; stderr (gctrace) is collected. Killed if dropped
/// before [`GcStress::finish`] waited for it (a failed test).
struct GcStress {
    child: Supervised,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
    stderr: Arc<Mutex<String>>,
}

impl GcStress {
    fn start(binary: &Path) -> GcStress {
        let mut child = Supervised::spawn(
            "gcstress",
            Command::new(binary)
                .args(["-wait", "-cycles", &CYCLES.to_string()])
                .env("GODEBUG", "gctrace=1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            Supervision::KILL,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let stdin = child.child_mut().stdin.take();
        let mut stdout = BufReader::new(child.child_mut().stdout.take().unwrap());
        let stderr = collect_lines(child.child_mut().stderr.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        GcStress {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn go(&mut self) {
        self.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }

    /// Waits for the cycles to finish; returns gctrace's (sweep termination, mark termination)
    /// STW clock figures in microseconds, one pair per cycle.
    fn finish(mut self) -> Vec<(f64, f64)> {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "done");
        let status = self.child.wait().unwrap();
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(50));
        let stderr = self.stderr.lock().unwrap().clone();
        gctrace_cycles(&stderr)
    }
}

/// Checks the acceptance bound and prints the figures.
fn compare(label: &str, gctrace: &[(f64, f64)], agent: &[(f64, f64)]) {
    assert_eq!(gctrace.len(), CYCLES, "{label}: gctrace cycles");
    let a = Agreement::of(label, gctrace, agent);
    eprintln!("{label}: {a}");
    assert!(
        a.share() >= 0.95,
        "{label}: only {:.1}% of pauses within tolerance",
        a.share() * 100.0
    );
}

fn attached(events: &[Value], pid: u32) -> Option<&Value> {
    events
        .iter()
        .find(|e| e["kind"] == "go_process" && e["state"] == "attached" && e["pid"] == pid)
}

fn wait_attached(trace: &mut Trace, pid: u32) -> Value {
    assert!(
        trace.wait_for(Duration::from_secs(10), |ev| attached(ev, pid).is_some()),
        "agent did not attach to Go process {pid}"
    );
    attached(&trace.events, pid).unwrap().clone()
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn pauses_of_a_process_started_before_the_agent() {
    let mut go = GcStress::start(&go_peer("gcstress", false));
    let mut trace = Trace::start(&["--probes", "go-gc"]);
    // Found by the start-up scan, reported before the ready line.
    let a = wait_attached(&mut trace, go.pid());
    assert_eq!(a["symbols"], "symtab");
    assert!(a["go_version"].as_str().unwrap().starts_with("go1."));
    go.go();
    let pid = go.pid();
    let gctrace = go.finish();
    let out = trace.stop();
    compare("started before", &gctrace, &agent_cycles(&out.events, pid));
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn pauses_of_a_process_started_after_the_agent_stripped_too() {
    for stripped in [false, true] {
        let mut trace = Trace::start(&["--probes", "go-gc"]);
        let mut go = GcStress::start(&go_peer("gcstress", stripped));
        // Found through sched_process_exec.
        let a = wait_attached(&mut trace, go.pid());
        assert_eq!(a["symbols"], if stripped { "pclntab" } else { "symtab" });
        go.go();
        let pid = go.pid();
        let gctrace = go.finish();
        let out = trace.stop();
        let label = if stripped {
            "started after, stripped"
        } else {
            "started after"
        };
        compare(label, &gctrace, &agent_cycles(&out.events, pid));
    }
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn two_go_processes_at_once_are_not_mixed_up() {
    let mut trace = Trace::start(&["--probes", "go-gc"]);
    let binary = go_peer("gcstress", false);
    let mut a = GcStress::start(&binary);
    let mut b = GcStress::start(&binary);
    wait_attached(&mut trace, a.pid());
    let second = wait_attached(&mut trace, b.pid());
    assert_eq!(
        second["new_binary"], false,
        "one set of probes serves both processes"
    );
    let (pa, pb) = (a.pid(), b.pid());
    a.go();
    b.go();
    let (ga, gb) = (a.finish(), b.finish());
    let out = trace.stop();
    compare("concurrent A", &ga, &agent_cycles(&out.events, pa));
    compare("concurrent B", &gb, &agent_cycles(&out.events, pb));
    let other = out
        .events
        .iter()
        .filter(|e| e["kind"] == "gc_stw" && e["pid"] != pa && e["pid"] != pb)
        .count();
    eprintln!("pauses of other processes during the test: {other}");
}

/// Uprobe links of the STW programs, as the kernel sees them (`bpftool link show`; the agent
/// attaches through bpf_link, and Debian's bpftool does not decode uprobe link details, so the
/// links are recognised by their program's name).
fn kernel_uprobes() -> usize {
    let json = |args: &[&str]| -> Value {
        let out = Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .expect("bpftool (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]))
    };
    let stw_programs: Vec<u64> = json(&["prog", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("go_stw_")))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    json(&["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["prog_id"]
                .as_u64()
                .is_some_and(|id| stw_programs.contains(&id))
        })
        .count()
}

/// Entries of one of the agent's maps, as the kernel sees them (bpftool map dump).
fn map_entries(name: &str) -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "name", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool map dump {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().map_or(0, Vec::len)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn short_lived_go_processes_leave_nothing_behind() {
    // The binary's probes stay attached for the linger after its last process, then go.
    let mut trace = Trace::start(&["--probes", "go-gc", "--go-linger", "1s"]);
    let agent = trace.pid();
    let before = (
        kernel_uprobes(),
        map_entries("TRACKED_PIDS"),
        map_entries("GO_STW_INFLIGHT"),
        open_fds(agent),
    );
    let binary = go_peer("gcstress", false);
    let mut peak_uprobes = 0;
    let mut pids = Vec::new();
    for _wave in 0..10 {
        // Killed if a failed assertion drops them before they are waited for.
        let mut wave: Vec<Supervised> = (0..10)
            .map(|_| {
                Supervised::spawn(
                    "gcstress",
                    Command::new(&binary).args(["-sleep", "300ms"]),
                    Supervision::KILL,
                )
                .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        pids.extend(wave.iter().map(Supervised::pid));
        let last = wave.last().unwrap().pid();
        assert!(
            trace.wait_for(Duration::from_secs(10), |ev| attached(ev, last).is_some()),
            "process {last} not attached; agent log:\n{}",
            trace.stderr()
        );
        peak_uprobes = peak_uprobes.max(kernel_uprobes());
        for child in &mut wave {
            assert!(child.wait().unwrap().success());
        }
    }
    let detached = |ev: &[Value]| {
        pids.iter().all(|pid| {
            ev.iter()
                .any(|e| e["kind"] == "go_process" && e["state"] == "detached" && e["pid"] == *pid)
        })
    };
    assert!(
        trace.wait_for(Duration::from_secs(10), detached),
        "not every short-lived process was released"
    );
    let released = |ev: &[Value]| {
        ev.iter()
            .any(|e| e["kind"] == "go_process" && e["state"] == "released")
    };
    assert!(
        trace.wait_for(Duration::from_secs(10), released),
        "the binary's probes were not released after the linger"
    );
    let attached_count = pids
        .iter()
        .filter(|pid| attached(&trace.events, **pid).is_some())
        .count();
    // Links are dropped on a background thread (each uprobe unregistration waits for an SRCU
    // grace period): give the kernel a moment to show the release.
    let counts = || {
        (
            kernel_uprobes(),
            map_entries("TRACKED_PIDS"),
            map_entries("GO_STW_INFLIGHT"),
            open_fds(agent),
        )
    };
    let mut after = counts();
    for _ in 0..50 {
        if after == before {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        after = counts();
    }
    eprintln!(
        "100 short-lived Go processes: {attached_count} attached; peak kernel uprobes {peak_uprobes}; \
         (uprobes, TRACKED_PIDS, GO_STW_INFLIGHT, agent fds) before {before:?} after {after:?}"
    );
    assert_eq!(
        attached_count, 100,
        "every process lived long enough to be found"
    );
    assert!(
        peak_uprobes >= 3,
        "probes were attached while the processes ran ({peak_uprobes})"
    );
    assert_eq!(before, after, "something leaked");
    let out = trace.stop();
    let tracker = &out.summary["probes"]["go-gc"]["tracker_at_exit"];
    assert_eq!(tracker["processes"], 0, "{tracker}");
    assert_eq!(tracker["uprobe_links"], 0, "{tracker}");
}
