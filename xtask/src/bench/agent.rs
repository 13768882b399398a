//! A running `agent trace --json` whose output a benchmark tallies as it streams, plus the
//! agent's own CPU time from /proc.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use test_support::supervised::{Supervised, Supervision};

/// What the agent printed so far, in the few forms the benchmarks need.
#[derive(Debug, Default)]
pub struct Tally {
    /// Every event line (everything but ready and summary).
    pub events: u64,
    /// tcp_reset events by (netns inode, direction).
    pub resets: HashMap<(u64, String), u64>,
    /// gc_stw events by pid.
    pub pauses: HashMap<u32, u64>,
    /// When the bench read each pid's `go_process` attached line.
    pub attached: HashMap<u32, Instant>,
    /// The agent's own exec-to-attach figure (kernel exec time to probes live), microseconds.
    pub exec_to_attach_us: HashMap<u32, u64>,
    pub summary: Option<Value>,
    /// Lines that were not JSON (a bug in the agent's JSON mode).
    pub bad_lines: u64,
}

pub struct Agent {
    /// Killed when dropped: a failed benchmark must not leave probes attached.
    child: Supervised,
    state: Arc<(Mutex<Tally>, Condvar)>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Starts `agent trace --json ARGS` and waits until its ready line says every probe is
    /// attached.
    pub fn start(bin: &Path, args: &[&str]) -> Result<Agent> {
        let mut child = Supervised::spawn(
            "agent trace",
            Command::new(bin)
                .args(["trace", "--json"])
                .args(args)
                .env("AGENT_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            Supervision::KILL,
        )?;
        let state = Arc::new((Mutex::new(Tally::default()), Condvar::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();

        let stdout = child.child_mut().stdout.take().context("agent stdout")?;
        let tally = state.clone();
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(event) = serde_json::from_str::<Line<'_>>(&line) else {
                    lock(&tally.0).bad_lines += 1;
                    continue;
                };
                if event.kind == "ready" || event.kind == "summary" {
                    let Ok(value) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    if event.kind == "ready" {
                        let _ = ready_tx.send(value);
                    } else {
                        lock(&tally.0).summary = Some(value);
                    }
                    continue;
                }
                let (mutex, changed) = &*tally;
                count(&mut lock(mutex), &event);
                changed.notify_all();
            }
            tally.1.notify_all();
        });
        let mut err_pipe = child.child_mut().stderr.take().context("agent stderr")?;
        let sink = stderr.clone();
        let err_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                lock(&sink).push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut agent = Agent {
            child,
            state,
            stderr,
            readers: vec![out_reader, err_reader],
        };
        let ready = match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(ready) => ready,
            Err(_) => {
                agent.child.kill();
                bail!(
                    "the agent did not become ready within 60 s; stderr:\n{}",
                    agent.stderr()
                );
            }
        };
        let detached: Vec<String> = ready["probes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["attached"] != true)
            .map(|p| p["name"].to_string())
            .collect();
        if !detached.is_empty() {
            bail!(
                "probes not attached: {}; ready line: {ready}",
                detached.join(", ")
            );
        }
        Ok(agent)
    }

    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Runs `f` on the tally.
    pub fn with<T>(&self, f: impl FnOnce(&Tally) -> T) -> T {
        f(&lock(&self.state.0))
    }

    /// Waits until `done(tally)` holds, `timeout` passes, or no event arrives for `quiet`
    /// (the agent has printed all it will); returns whether `done` held.
    pub fn wait_for(
        &self,
        timeout: Duration,
        quiet: Duration,
        mut done: impl FnMut(&Tally) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let (mutex, changed) = &*self.state;
        let mut tally = lock(mutex);
        let (mut seen, mut last_change) = (tally.events, Instant::now());
        loop {
            if done(&tally) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || now.duration_since(last_change) >= quiet {
                return false;
            }
            let wait = deadline.min(last_change + quiet).duration_since(now);
            tally = changed
                .wait_timeout(tally, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
            if tally.events != seen {
                (seen, last_change) = (tally.events, Instant::now());
            }
        }
    }

    /// User plus system CPU seconds the agent has used so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.child.pid())
    }

    /// SIGTERM; waits for exit and returns the summary line.
    pub fn stop(mut self) -> Result<Value> {
        self.child.signal(libc::SIGTERM);
        let status = self.child.wait().context("waiting for the agent")?;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        if !status.success() {
            bail!("the agent exited with {status}; stderr:\n{}", self.stderr());
        }
        let summary = lock(&self.state.0).summary.take();
        summary.with_context(|| format!("the agent printed no summary; stderr:\n{}", self.stderr()))
    }
}

/// The few fields of an event line the benchmarks need; parsing only these keeps the bench's
/// own CPU use per event small next to the agent's.
#[derive(serde::Deserialize)]
struct Line<'a> {
    kind: &'a str,
    netns: Option<u64>,
    direction: Option<&'a str>,
    pid: Option<u32>,
    state: Option<&'a str>,
    exec_to_attach_us: Option<u64>,
}

fn count(t: &mut Tally, e: &Line<'_>) {
    match e.kind {
        "tcp_reset" => {
            let dir = e.direction.unwrap_or("?").to_owned();
            *t.resets.entry((e.netns.unwrap_or(0), dir)).or_default() += 1;
        }
        "gc_stw" => {
            if let Some(pid) = e.pid {
                *t.pauses.entry(pid).or_default() += 1;
            }
        }
        "go_process" => {
            if e.state == Some("attached")
                && let Some(pid) = e.pid
            {
                t.attached.entry(pid).or_insert_with(Instant::now);
                if let Some(us) = e.exec_to_attach_us {
                    t.exec_to_attach_us.insert(pid, us);
                }
            }
        }
        _ => {}
    }
    t.events += 1;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// utime + stime of a process (and its reaped threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command, which is in parentheses and may itself contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; the first after the command is field 3.
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64)
            .context("unexpected /proc/PID/stat format")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}
