//! An independent witness of the time a thread lost: the kernel's own record (`perf record`,
//! on CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` and Go's `nanotime` read) of when each
//! thread was switched out, interrupted, or (on a VM) not run by the hypervisor.
//!
//! The Go pause tests use it where the agent and gctrace disagree. The two read their clocks at
//! different instructions (gctrace just before `stopTheWorldWithSema` is called, the agent when
//! its uprobe's handler runs after the trap), so whatever delays the thread between them counts
//! on one side only. A difference is accepted only when this record shows the pausing thread
//! losing at least that much time (less the tolerance) where one window runs and the other
//! does not.
//!
//! What it records, per thread:
//! - off CPU: from `sched_switch` out to `sched_switch` back in (preempted or blocked);
//! - interrupts: hard IRQs, softirqs and the x86 vectors (timer, IPIs) taken while it was current;
//! - steal: with `CONFIG_PARAVIRT_TIME_ACCOUNTING` the scheduler's task clock leaves out time
//!   the hypervisor ran something else, so between two `sched_stat_runtime` updates of a thread
//!   that stayed on CPU, wall time minus reported runtime is what the vCPU lost. The kernel only
//!   updates at ticks and switches (every few ms), so where in that interval it was lost is not
//!   known: it is counted as at most the interval's overlap with the window asked about.

use std::{
    collections::HashMap,
    os::unix::process::ExitStatusExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use test_support::supervised::{Supervised, Supervision};

const EVENTS: &[&str] = &[
    "sched:sched_switch",
    "sched:sched_stat_runtime",
    "irq:irq_handler_entry",
    "irq:irq_handler_exit",
    "irq:softirq_entry",
    "irq:softirq_exit",
    "irq_vectors:local_timer_entry",
    "irq_vectors:local_timer_exit",
    "irq_vectors:reschedule_entry",
    "irq_vectors:reschedule_exit",
    "irq_vectors:call_function_entry",
    "irq_vectors:call_function_exit",
    "irq_vectors:call_function_single_entry",
    "irq_vectors:call_function_single_exit",
];

/// `perf record` of every CPU, running until [`Witness::stop`] (killed if dropped before: a
/// failed test leaves no recording running).
pub struct Witness {
    perf: Supervised,
    data: PathBuf,
}

/// Why a thread lost time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    OffCpu,
    Interrupt,
    /// At most this much, somewhere in the interval (see the module comment).
    Steal(u64),
}

/// Per thread, the intervals `[from, to)` (CLOCK_MONOTONIC ns) in which it lost time.
pub struct Record {
    lost: HashMap<u32, Vec<(u64, u64, Loss)>>,
}

impl Witness {
    /// Starts recording; panics (a test failure that says so) when perf is missing or refuses.
    pub fn start() -> Witness {
        let data =
            std::env::temp_dir().join(format!("e2e-witness-{}.perf.data", std::process::id()));
        let _ = std::fs::remove_file(&data);
        let mut cmd = Command::new("perf");
        cmd.args([
            "record",
            "-q",
            "-a",
            "-k",
            "CLOCK_MONOTONIC",
            "-m",
            "4096",
            "-o",
        ])
        .arg(&data);
        for e in EVENTS {
            cmd.args(["-e", e]);
        }
        let mut perf = Supervised::spawn(
            "perf record",
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
            Supervision::KILL,
        )
        .unwrap_or_else(|e| {
            panic!("the witness needs perf (Debian's linux-perf, from `cargo xtask setup`): {e}")
        });
        // perf writes its header once every event is open; until then nothing is recorded.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&data).map_or(0, |m| m.len()) == 0 {
            if let Some(status) = perf.exited() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(
                    &mut perf.child_mut().stderr.take().unwrap(),
                    &mut err,
                );
                panic!("perf record exited ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "perf record did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        Witness { perf, data }
    }

    /// Stops recording and reads what was recorded.
    pub fn stop(mut self) -> Record {
        self.perf.signal(libc::SIGINT);
        let status = self.perf.wait().unwrap();
        // perf record writes its data on SIGINT, then dies of the signal it caught.
        assert!(
            status.success() || status.signal() == Some(libc::SIGINT),
            "perf record failed: {status}"
        );
        let out = Command::new("perf")
            .args(["script", "-F", "tid,cpu,time,event,trace", "--ns", "-i"])
            .arg(&self.data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "perf script: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(&self.data);
        Record::parse(&String::from_utf8_lossy(&out.stdout))
    }
}

impl Record {
    /// Parses `perf script -F tid,cpu,time,event,trace --ns` output.
    pub fn parse(script: &str) -> Record {
        let mut lost: HashMap<u32, Vec<(u64, u64, Loss)>> = HashMap::new();
        // Per thread: when it was switched out; when its CPU time was last accounted.
        let mut switched_out: HashMap<u32, u64> = HashMap::new();
        let mut accounted: HashMap<u32, u64> = HashMap::new();
        // Per CPU: interrupt entries not yet exited (they nest), with the thread they hit.
        let mut in_interrupt: HashMap<u32, Vec<(u64, u32)>> = HashMap::new();
        for line in script.lines() {
            let Some(ev) = ScriptLine::parse(line) else {
                continue;
            };
            match ev.event {
                "sched:sched_switch" => {
                    let (Some(prev), Some(next)) =
                        (field(ev.trace, "prev_pid="), field(ev.trace, "next_pid="))
                    else {
                        continue;
                    };
                    switched_out.insert(prev, ev.time);
                    accounted.remove(&prev);
                    if let Some(out) = switched_out.remove(&next) {
                        lost.entry(next)
                            .or_default()
                            .push((out, ev.time, Loss::OffCpu));
                    }
                    accounted.insert(next, ev.time);
                }
                "sched:sched_stat_runtime" => {
                    let (Some(pid), Some(runtime)) =
                        (field(ev.trace, "pid="), field64(ev.trace, "runtime="))
                    else {
                        continue;
                    };
                    // Only while the thread stayed on CPU since the last account.
                    if let Some(since) = accounted.insert(pid, ev.time) {
                        let wall = ev.time.saturating_sub(since);
                        // A few microseconds of clock skew between the task clock and ktime.
                        let steal = wall.saturating_sub(runtime);
                        if steal > 5_000 {
                            lost.entry(pid)
                                .or_default()
                                .push((since, ev.time, Loss::Steal(steal)));
                        }
                    }
                }
                e if e.ends_with("_entry") => {
                    in_interrupt
                        .entry(ev.cpu)
                        .or_default()
                        .push((ev.time, ev.tid));
                }
                e if e.ends_with("_exit") => {
                    let stack = in_interrupt.entry(ev.cpu).or_default();
                    if let Some((from, tid)) = stack.pop()
                        && stack.is_empty()
                    {
                        lost.entry(tid)
                            .or_default()
                            .push((from, ev.time, Loss::Interrupt));
                    }
                }
                _ => {}
            }
        }
        Record { lost }
    }

    /// Nanoseconds thread `tid` lost within `[from, to)`.
    pub fn lost_ns(&self, tid: u32, from: u64, to: u64) -> u64 {
        self.lost.get(&tid).map_or(0, |spans| {
            spans
                .iter()
                .map(|&(a, b, why)| {
                    let overlap = b.min(to).saturating_sub(a.max(from));
                    match why {
                        Loss::Steal(n) => overlap.min(n),
                        Loss::OffCpu | Loss::Interrupt => overlap,
                    }
                })
                .sum()
        })
    }

    /// What thread `tid` lost around `[from, to)`, for a failure message.
    pub fn describe(&self, tid: u32, from: u64, to: u64) -> String {
        let spans: Vec<String> = self
            .lost
            .get(&tid)
            .into_iter()
            .flatten()
            .filter(|&&(a, b, _)| b + 200_000 > from && a < to + 200_000)
            .map(|&(a, b, why)| {
                format!(
                    "{:+.1}..{:+.1}us {why:?}",
                    (a as f64 - from as f64) / 1e3,
                    (b as f64 - from as f64) / 1e3
                )
            })
            .collect();
        if spans.is_empty() {
            "nothing lost within 200 us".to_owned()
        } else {
            spans.join(", ")
        }
    }
}

struct ScriptLine<'a> {
    tid: u32,
    cpu: u32,
    time: u64,
    event: &'a str,
    trace: &'a str,
}

impl<'a> ScriptLine<'a> {
    /// `  1234 [001] 11152.589533712: sched:sched_switch: prev_comm=...`
    fn parse(line: &'a str) -> Option<ScriptLine<'a>> {
        let mut rest = line.trim_start();
        let (tid, r) = rest.split_once(' ')?;
        rest = r.trim_start();
        let cpu = rest.strip_prefix('[')?.split_once(']')?;
        rest = cpu.1.trim_start();
        let (time, r) = rest.split_once(": ")?;
        let (event, trace) = r.split_once(": ").unwrap_or((r.trim_end_matches(':'), ""));
        let (secs, nanos) = time.split_once('.')?;
        Some(ScriptLine {
            tid: tid.parse().ok()?,
            cpu: cpu.0.parse().ok()?,
            time: secs.parse::<u64>().ok()? * 1_000_000_000 + nanos.parse::<u64>().ok()?,
            event: event.trim(),
            trace,
        })
    }
}

fn field(trace: &str, key: &str) -> Option<u32> {
    field64(trace, key).and_then(|v| u32::try_from(v).ok())
}

fn field64(trace: &str, key: &str) -> Option<u64> {
    // `pid=` must not match inside `prev_pid=`.
    let at = trace
        .match_indices(key)
        .find(|(i, _)| *i == 0 || trace.as_bytes()[i - 1] == b' ')?
        .0;
    let digits: String = trace[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}
