//! Support for the end-to-end tests: run `agent trace --json`, read its events, build and run
//! the real peers.
//!
//! These tests load eBPF programs: they need root, and say so by failing, never by passing
//! silently. `cargo xtask test` runs them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use serde_json::Value;
use test_support::supervised::{Supervised, Supervision};

pub mod certs;
pub mod dns;
pub mod gc;
pub mod proxy;
pub mod witness;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Fails the test (with the reason) unless we are root.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test loads eBPF programs and needs root: run it with `cargo xtask test`"
    );
}

/// The agent binary under test: `$AGENT_BIN`, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/agent"));
    assert!(
        path.exists(),
        "agent binary {} not found: build it (cargo xtask test does)",
        path.display()
    );
    path
}

/// A running `agent trace --json`.
pub struct Trace {
    /// Killed when dropped: a failed test must not leave an agent running with probes attached.
    child: Supervised,
    lines: mpsc::Receiver<Value>,
    stderr: Arc<Mutex<String>>,
    pub ready: Value,
    /// Events received so far (everything after the ready line).
    pub events: Vec<Value>,
}

/// What a stopped trace printed.
pub struct TraceOutput {
    pub events: Vec<Value>,
    pub summary: Value,
    pub stderr: String,
}

/// Reads JSON lines from `pipe` on a thread of its own (a line that is not JSON fails the
/// test, naming `who`); the channel closes at EOF.
pub fn read_json_lines(
    who: &str,
    pipe: impl std::io::Read + Send + 'static,
) -> mpsc::Receiver<Value> {
    let (tx, lines) = mpsc::channel();
    let who = who.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{who} printed a line that is not JSON ({e}): {line}"));
            if tx.send(value).is_err() {
                break;
            }
        }
    });
    lines
}

pub use test_support::supervised::collect_lines;

impl Trace {
    /// Starts the agent and waits for its ready line.
    pub fn start(args: &[&str]) -> Trace {
        require_root();
        let mut child = Supervised::spawn(
            "agent trace",
            Command::new(agent_bin())
                .arg("trace")
                .arg("--json")
                .args(args)
                .env(
                    "AGENT_LOG",
                    std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            Supervision::KILL,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let lines = read_json_lines("agent", child.child_mut().stdout.take().unwrap());
        let stderr = collect_lines(child.child_mut().stderr.take().unwrap());
        let mut trace = Trace {
            child,
            lines,
            stderr,
            ready: Value::Null,
            events: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match trace.lines.recv_timeout(left) {
                Ok(v) if v["kind"] == "ready" => {
                    trace.ready = v;
                    return trace;
                }
                // Events may precede ready only for Go processes found at start-up.
                Ok(v) => trace.events.push(v),
                Err(_) => {
                    trace.child.kill();
                    let status = trace.child.exited();
                    panic!(
                        "agent did not become ready (exit: {status:?}); stderr:\n{}",
                        trace.stderr.lock().unwrap()
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// What the agent logged so far (for failure messages).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Collects events until `done(&events)` holds or `timeout` passes; true if it held.
    pub fn wait_for(&mut self, timeout: Duration, mut done: impl FnMut(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.events) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(v) => {
                    self.events.push(v);
                    // Take everything already waiting before checking again: `done` may be costly.
                    self.events.extend(self.lines.try_iter());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return done(&self.events),
            }
        }
    }

    /// Sends `signal` to the agent (e.g. SIGUSR1 for a stats line).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our child.
        let rc = unsafe { libc::kill(self.child.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// SIGTERM, then everything the agent printed until it exited; asserts a clean exit.
    pub fn stop(mut self) -> TraceOutput {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut summary = Value::Null;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["kind"] == "summary" => summary = v,
                Ok(v) => self.events.push(v),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.child.kill();
                    panic!("agent did not exit within 30 s of SIGTERM");
                }
            }
        }
        let status = self.child.wait().expect("wait agent");
        // The stderr reader thread may still be flushing the last lines.
        std::thread::sleep(Duration::from_millis(50));
        let stderr = self.stderr.lock().unwrap().clone();
        assert!(
            status.success(),
            "agent exited with {status}; stderr:\n{stderr}"
        );
        assert!(
            summary.is_object(),
            "agent printed no summary; stderr:\n{stderr}"
        );
        TraceOutput {
            events: std::mem::take(&mut self.events),
            summary,
            stderr,
        }
    }
}

pub fn of_kind<'a>(events: &'a [Value], kind: &str) -> impl Iterator<Item = &'a Value> {
    events.iter().filter(move |e| e["kind"] == kind)
}

static GO_BUILD: Mutex<()> = Mutex::new(());

/// Builds `tests/peers/NAME` with Debian's Go (once per variant) and returns the binary.
/// `stripped` links with `-ldflags=-s -w` (no .symtab: the agent must use .gopclntab).
pub fn go_peer(name: &str, stripped: bool) -> PathBuf {
    go_peer_built_by(None, name, stripped)
}

/// The Go releases of `tests/peers/go-releases.txt`, which `cargo xtask setup` installs.
pub fn go_releases() -> Vec<String> {
    let path = workspace_root().join("tests/peers/go-releases.txt");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The `go` command of a release (None: Debian's, on PATH).
pub fn go_command(release: Option<&str>) -> PathBuf {
    let Some(version) = release else {
        return PathBuf::from("go");
    };
    let home = std::env::var_os("HOME").expect("HOME");
    let go = PathBuf::from(home)
        .join(".cache/agent-test-go")
        .join(version)
        .join("go/bin/go");
    assert!(
        go.exists(),
        "Go {version} is not installed at {} (cargo xtask setup installs it)",
        go.display()
    );
    go
}

/// Builds `tests/peers/NAME` with Go `release` (None: Debian's) once per variant.
pub fn go_peer_built_by(release: Option<&str>, name: &str, stripped: bool) -> PathBuf {
    let _guard = GO_BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let root = workspace_root();
    let out_dir = root.join("target/e2e-peers");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut file = name.to_owned();
    if let Some(v) = release {
        file.push_str(&format!("-go{v}"));
    }
    if stripped {
        file.push_str("-stripped");
    }
    let out = out_dir.join(file);
    let src = root.join("tests/peers").join(name);
    let mut cmd = Command::new(go_command(release));
    cmd.arg("build").arg("-o").arg(&out);
    if stripped {
        cmd.arg("-ldflags=-s -w");
    }
    cmd.arg(".")
        .current_dir(&src)
        .env("GO111MODULE", "off")
        // Debian's Go sources (grpc-go and its dependencies); no module proxy here.
        .env("GOPATH", "/usr/share/gocode")
        // A release never fetches another toolchain (go.mod or GOTOOLCHAIN would ask it to).
        .env("GOTOOLCHAIN", "local")
        .env("GOCACHE", root.join("target/go-cache"));
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run go (install golang-go; cargo xtask setup does): {e}")
    });
    assert!(
        output.status.success(),
        "go build {name} ({}) failed:\n{}",
        release.unwrap_or("Debian's Go"),
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// A port on `ip` that was free a moment ago.
pub fn free_port(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A peer process, killed when dropped.
pub struct Peer {
    pub process: Supervised,
}

impl Peer {
    pub fn spawn(name: &str, cmd: &mut Command) -> Peer {
        Peer {
            process: Supervised::spawn(name, cmd, Supervision::KILL)
                .unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The process itself, e.g. to take its pipes.
    pub fn child(&mut self) -> &mut Child {
        self.process.child_mut()
    }

    /// Sends a signal (e.g. SIGTERM for a graceful stop).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our child, reaped only when dropped or waited for.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }
}

/// `[ip]` for IPv6 literals, `ip` otherwise: the host part of `host:port`.
pub fn bracket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    }
}

/// `nghttpd` (cleartext HTTP/2) serving `docroot` on `ip` and a free port; POST and PUT bodies
/// are echoed back.
pub fn nghttpd(ip: &str, docroot: &Path) -> (Peer, std::net::SocketAddr) {
    let port = free_port(ip);
    let peer = Peer::spawn(
        "nghttpd",
        Command::new("nghttpd")
            .args(["--no-tls", "--echo-upload", "-a", ip, "-d"])
            .arg(docroot)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let addr = std::net::SocketAddr::new(ip.parse().unwrap(), port);
    wait_listening(addr);
    (peer, addr)
}

/// The grpc-go test server (`tests/peers/grpcpeer`) on `ip` and a port it picks, with extra
/// flags; returns once it says where it listens.
pub fn grpc_server(ip: &str, extra: &[&str]) -> (Peer, std::net::SocketAddr) {
    let bin = go_peer("grpcpeer", false);
    let mut cmd = Command::new(bin);
    cmd.args(["server", "-addr", &format!("{}:0", bracket(ip))])
        .args(extra);
    grpc_server_from(cmd)
}

/// Starts a grpcpeer server `cmd` made (e.g. inside a network namespace, `Netns::command`) and
/// returns once it says where it listens.
pub fn grpc_server_from(mut cmd: Command) -> (Peer, std::net::SocketAddr) {
    let mut peer = Peer::spawn("grpcpeer", cmd.stdout(Stdio::piped()));
    let mut line = String::new();
    BufReader::new(peer.child().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("grpcpeer said {line:?}"))
        .parse()
        .unwrap();
    (peer, addr)
}

/// The JSON objects among a peer's output lines (the Python peers log one per line).
pub fn json_lines(output: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(output)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// One frame as the client logged it.
#[derive(Debug, Clone)]
pub struct WireFrame {
    /// "send" or "recv", as the client saw it.
    pub dir: String,
    pub frame_type: String,
    pub flags: u64,
    pub stream: u64,
    /// Payload length.
    pub length: u64,
}

/// Frames from `nghttp -nv` output: `[  0.000] send SETTINGS frame <length=12, flags=0x00, stream_id=0>`.
pub fn parse_nghttp(out: &str) -> Vec<WireFrame> {
    out.lines()
        .filter_map(|line| {
            let rest = line.split_once("] ")?.1;
            let (dir, rest) = rest.split_once(' ')?;
            if dir != "send" && dir != "recv" {
                return None;
            }
            let (frame_type, rest) = rest.split_once(" frame <")?;
            let field = |name: &str| {
                rest.split(", ")
                    .find_map(|kv| kv.trim_end_matches('>').strip_prefix(name))
            };
            let flags = u64::from_str_radix(field("flags=0x")?, 16).ok()?;
            let stream = field("stream_id=")?.parse().ok()?;
            let length = field("length=")?.parse().ok()?;
            Some(WireFrame {
                dir: dir.to_owned(),
                frame_type: frame_type.to_owned(),
                flags,
                stream,
                length,
            })
        })
        .collect()
}

/// Runs `program args`, panicking with its stderr when it fails.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (iproute2): {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace joined to this one by a veth pair; deleted (with the pair) on drop.
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub ns_if: String,
    /// `<subnet>.1` on the host's end, `<subnet>.2` in the namespace.
    pub host_ip: String,
    pub ns_ip: String,
}

impl Netns {
    /// A namespace named from `prefix` and this process, on the /24 `subnet` (`"10.213.77"`).
    pub fn create(prefix: &str, subnet: &str) -> Netns {
        let id = std::process::id() % 100_000;
        let n = Netns {
            name: format!("{prefix}ns{id}"),
            host_if: format!("{prefix}{id}h"),
            ns_if: format!("{prefix}{id}s"),
            host_ip: format!("{subnet}.1"),
            ns_ip: format!("{subnet}.2"),
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &n.name])
            .stderr(Stdio::null())
            .status();
        sh("ip", &["netns", "add", &n.name]);
        sh(
            "ip",
            &[
                "link", "add", &n.host_if, "type", "veth", "peer", "name", &n.ns_if, "netns",
                &n.name,
            ],
        );
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", n.host_ip),
                "dev",
                &n.host_if,
            ],
        );
        sh("ip", &["link", "set", &n.host_if, "up"]);
        n.ip(&["addr", "add", &format!("{}/24", n.ns_ip), "dev", &n.ns_if]);
        n.ip(&["link", "set", &n.ns_if, "up"]);
        n.ip(&["link", "set", "lo", "up"]);
        n
    }

    /// `ip -n NAME args`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all);
    }

    /// `ip netns exec NAME program args`, ready to spawn.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
