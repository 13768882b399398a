//! Support for the proxy's end-to-end tests: run `agent run`, and peers that print JSON lines.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use serde_json::Value;
use test_support::supervised::{Supervised, Supervision};

use crate::{agent_bin, collect_lines, read_json_lines, workspace_root};

/// A child process whose stdout is JSON lines, read as they come; stderr kept for failure
/// messages. Killed when dropped.
pub struct JsonChild {
    pub name: String,
    child: Supervised,
    lines: mpsc::Receiver<Value>,
    stderr: Arc<Mutex<String>>,
    /// Lines received so far.
    pub seen: Vec<Value>,
}

impl JsonChild {
    pub fn spawn(name: &str, cmd: &mut Command) -> JsonChild {
        let mut child = Supervised::spawn(
            name,
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            Supervision::KILL,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let lines = read_json_lines(name, child.child_mut().stdout.take().unwrap());
        let stderr = collect_lines(child.child_mut().stderr.take().unwrap());
        JsonChild {
            name: name.to_owned(),
            child,
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    /// Its exit status, if it has exited (without waiting).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.exited()
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends a signal (SIGTERM, SIGKILL, ...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.pid() as i32, signal) };
    }

    /// Reads lines until one satisfies `want` (returned) or `timeout` passes (panics, with
    /// what was seen and the child's stderr).
    pub fn wait_line(&mut self, timeout: Duration, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| want(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if want(&v) {
                        return v;
                    }
                }
                Err(e) => panic!(
                    "{}: the line awaited did not come ({e:?}); lines so far: {:?}\nstderr:\n{}",
                    self.name,
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// Like [`Self::wait_line`], but only lines that come from now on count.
    pub fn wait_new_line(&mut self, timeout: Duration, want: impl Fn(&Value) -> bool) -> Value {
        let from = self.drain().len();
        self.wait_line_from(from, timeout, want)
    }

    /// Like [`Self::wait_line`], but only lines from the `from`th on (as [`Self::drain`]
    /// counts them) count.
    pub fn wait_line_from(
        &mut self,
        from: usize,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.seen[from..].iter().find(|v| want(v)) {
                return v.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(e) => panic!(
                    "{}: the line awaited did not come ({e:?}); new lines: {:?}\nstderr:\n{}",
                    self.name,
                    &self.seen[from..],
                    self.stderr()
                ),
            }
        }
    }

    /// Every line until the child exits, and its status (panics after `timeout`).
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<Value>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.child.kill();
                    panic!(
                        "{} did not finish within {timeout:?}; lines: {:?}\nstderr:\n{}",
                        self.name,
                        self.seen,
                        self.stderr()
                    );
                }
            }
        }
        let status = self.child.wait().unwrap();
        // The stderr reader may still be copying the last lines.
        std::thread::sleep(Duration::from_millis(20));
        let stderr = self.stderr();
        (status, std::mem::take(&mut self.seen), stderr)
    }

    /// Lines received so far, without waiting.
    pub fn drain(&mut self) -> &[Value] {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
        &self.seen
    }
}

/// `python3 tests/peers/<script>` with `args`.
pub fn python(script: &str, args: &[&str]) -> Command {
    let path: PathBuf = workspace_root().join("tests/peers").join(script);
    let mut cmd = Command::new("python3");
    cmd.arg("-u").arg(path).args(args);
    cmd
}

/// A running `agent run` and the address of its (first) listener.
pub struct AgentProxy {
    pub process: JsonChild,
    pub addr: SocketAddr,
    pub ready: Value,
}

impl AgentProxy {
    /// `agent run --no-probes ARGS`, once it says it is ready: the proxy alone, for tests of
    /// what it does with calls (the kernel side has tests of its own, and the ones with
    /// [`Self::start_with_probes`]).
    pub fn start(args: &[&str]) -> AgentProxy {
        let mut all = vec!["--no-probes"];
        all.extend_from_slice(args);
        AgentProxy::start_with_probes(&all)
    }

    /// `agent run ARGS` with the kernel probes `[signals]` configures (all by default).
    pub fn start_with_probes(args: &[&str]) -> AgentProxy {
        let mut process = JsonChild::spawn(
            "agent run",
            // The status API on a port of its own: agents of several tests may overlap.
            Command::new(agent_bin())
                .args(["run", "--api-listen", "127.0.0.1:0"])
                .args(args)
                .env(
                    "AGENT_LOG",
                    std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
                ),
        );
        let ready = process.wait_line(Duration::from_secs(30), |v| v["kind"] == "ready");
        let addr = ready["listeners"][0]["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("ready line without a listener address: {ready}"));
        AgentProxy {
            process,
            addr,
            ready,
        }
    }

    /// Quick mode on a free loopback port in front of `upstreams`, printing outcomes.
    pub fn quick(upstreams: &[SocketAddr]) -> AgentProxy {
        AgentProxy::quick_with(upstreams, &[])
    }

    /// [`Self::quick`] with more `agent run` arguments (`--no-breakers` for a test of what
    /// passes through, where failures are the point and must not trip anything).
    pub fn quick_with(upstreams: &[SocketAddr], more: &[&str]) -> AgentProxy {
        let list: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
        let list = list.join(",");
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &list,
            "--print-outcomes",
        ];
        args.extend_from_slice(more);
        AgentProxy::start(&args)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A `/proc/PID/status` figure in KiB (VmRSS, VmHWM, ...).
    pub fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid(), field)
    }

    /// What the proxy holds right now (SIGUSR1 makes it print a `stats` line).
    pub fn stats(&mut self) -> Value {
        // Asked again every few seconds: signals of one kind that arrive together are one.
        for _ in 0..5 {
            self.process.signal(libc::SIGUSR1);
            let from = self.process.drain().len();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Some(v) = self.process.seen[from..]
                    .iter()
                    .find(|v| v["kind"] == "stats")
                {
                    return v.clone();
                }
                std::thread::sleep(Duration::from_millis(20));
                self.process.drain();
            }
        }
        panic!(
            "agent run printed no stats line in 15 s of asking; stderr:\n{}",
            self.process.stderr()
        )
    }

    /// Streams open anywhere in the proxy: client side, and upstream leases and streams.
    pub fn streams_open(&mut self) -> u64 {
        let s = self.stats();
        let upstream: u64 = s["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["calls_in_flight"].as_u64().unwrap() + e["streams_open"].as_u64().unwrap())
            .sum();
        s["client_streams"].as_u64().unwrap() + upstream
    }

    /// Its `/metrics` text (it must have been started with `[export] prometheus_listen`).
    pub fn metrics(&self) -> String {
        let url = format!(
            "http://{}/metrics",
            self.ready["prometheus"]
                .as_str()
                .unwrap_or_else(|| panic!("no prometheus address in {}", self.ready))
        );
        let out = Command::new("curl").args(["-sS", &url]).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    /// SIGTERM, then everything it printed and its exit status.
    pub fn terminate(self, timeout: Duration) -> (ExitStatus, Vec<Value>, String) {
        self.process.signal(libc::SIGTERM);
        self.process.finish(timeout)
    }
}

/// A `/proc/PID/status` figure in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The address in a peer's `{"event":"listening","address":...}` line.
pub fn listening(peer: &mut JsonChild) -> SocketAddr {
    let line = peer.wait_line(Duration::from_secs(60), |v| v["event"] == "listening");
    line["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{}: bad listening line {line}", peer.name))
}

/// The grpcio test server (`tests/peers/grpcpy/server.py`) on a free loopback port.
pub fn grpcio_server() -> (JsonChild, SocketAddr) {
    grpcio_server_with(&[])
}

/// [`grpcio_server`] with `server.py` arguments (`--tls-cert`, `--fault`, ...).
pub fn grpcio_server_with(args: &[&str]) -> (JsonChild, SocketAddr) {
    let mut server = JsonChild::spawn("grpcio server", &mut python("grpcpy/server.py", args));
    let addr = listening(&mut server);
    (server, addr)
}

/// `tests/peers/grpcpy/client.py TARGET CASE ARGS`, running.
pub fn grpcio_client(target: SocketAddr, case: &str, args: &[&str]) -> JsonChild {
    let target = target.to_string();
    let mut all = vec![target.as_str(), case];
    all.extend_from_slice(args);
    JsonChild::spawn(case, &mut python("grpcpy/client.py", &all))
}

/// The summary line (`event: done`: codes, details) of a `client.py ... load` run, once it
/// is done; it must have exited 0 (its `--expect-codes` held).
pub fn load_summary(c: JsonChild) -> Value {
    let (status, lines, stderr) = c.finish(Duration::from_secs(180));
    let done = lines
        .iter()
        .rev()
        .find(|l| l["event"] == "done")
        .cloned()
        .unwrap_or_else(|| panic!("load printed no summary; stderr:\n{stderr}"));
    assert!(status.success(), "{done}\n{stderr}");
    done
}

/// The value of the first sample of `series` (a metric name and the start of its labels, as
/// the Prometheus text writes them) in `text`.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// The scripted h2 upstream (`tests/peers/h2py/h2_upstream.py --mode MODE`) on a free
/// loopback port.
pub fn h2_upstream(mode: &str) -> (JsonChild, SocketAddr) {
    let mut upstream = JsonChild::spawn(
        "h2_upstream",
        &mut python("h2py/h2_upstream.py", &["--mode", mode]),
    );
    let addr = listening(&mut upstream);
    (upstream, addr)
}

/// Writes `DIR/agent.toml`: a cleartext listener `in` on a free loopback port routing every
/// call to cluster `svc`, then `body` (the cluster and whatever else the test configures).
pub fn config_file(dir: &std::path::Path, body: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "[[listener]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\n[[listener.route]]\ncluster = \"svc\"\n\n{body}\n"
        ),
    )
    .unwrap();
    path
}

/// The agent's journal files in `dir` (`*.jsonl`), oldest first, each with its text.
pub fn journal_files(dir: &std::path::Path) -> Vec<(PathBuf, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (f, text)
        })
        .collect()
}
