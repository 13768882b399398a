//! Transparent interception end to end (issue 18): the kernel steers an application's connects
//! into the agent without the application being re-pointed.
//!
//! Everything lives in namespaces and cgroups this test creates, every address on interfaces it
//! created:
//!
//! - a "node" network namespace where the agent runs (`nsenter --net`, which keeps the host's
//!   `/sys/fs/cgroup`), with a Service address 10.96.0.10:50051 made as kube-proxy makes one:
//!   nftables DNAT in the output hook to the two pods;
//! - two "pods": namespaces joined to the node by veth pairs, each with a cgroup of its own and a
//!   grpc-go server (Debian's grpc-go) on POD:50051; pod 1 also has an HTTP/1.1 server on
//!   10.244.1.3:50051 and a TLS server on 10.244.1.4:50051 (the intercepted port, not HTTP/2);
//! - an "app" cgroup, the only one interception is attached to, and an "other" one.
//!
//! The grpc-go client (tests/peers/grpcpeer, `-targets` balancing round_robin over the pods'
//! addresses as grpc-go does with a headless service) runs in the app cgroup. Checked: its calls
//! pass through the proxy (the agent's outcomes name the original destination); getpeername
//! shows what it dialed; a killed pod trips that pod's breaker and the client's calls go on; the
//! Service address is proxied; HTTP/1.1 and TLS are spliced byte for byte; a process in the other
//! cgroup is not intercepted; and kill -9 of the agent is survived: new connections go where the
//! application dialed (measured: the time until the first direct connection, and the client's
//! failed calls).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use e2e::{
    Peer, agent_bin, go_peer, grpc_server_from, proxy::JsonChild, require_root, sh, workspace_root,
};
use serde_json::Value;
use test_support::supervised::{Supervised, Supervision};

const PORT: u16 = 50051;
const VIP: &str = "10.96.0.10";

/// The test's namespaces and cgroups; removed on drop.
struct Topology {
    id: u32,
    node: String,
    pods: Vec<String>,
    cgroups: Vec<PathBuf>,
    dir: PathBuf,
}

impl Topology {
    fn create() -> Topology {
        let id = std::process::id() % 100_000;
        let root = test_support::cgroup::cgroup2_root()
            .expect("a cgroup v2 hierarchy (interception attaches to cgroup v2)");
        let t = Topology {
            id,
            node: format!("icnode{id}"),
            pods: (1..=3).map(|k| format!("icpod{k}-{id}")).collect(),
            cgroups: ["app", "other", "pod1", "pod2", "pod3"]
                .iter()
                .map(|n| root.join(format!("e2e-intercept-{n}-{id}")))
                .collect(),
            dir: std::env::temp_dir().join(format!("e2e-intercept-{id}")),
        };
        let _ = std::fs::remove_dir_all(&t.dir);
        std::fs::create_dir_all(&t.dir).unwrap();
        for ns in std::iter::once(&t.node).chain(&t.pods) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            sh("ip", &["netns", "add", ns]);
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        for (k, pod) in t.pods.iter().enumerate() {
            let k = k + 1;
            let (node_if, pod_if) = (format!("ic{id}n{k}"), format!("ic{id}p{k}"));
            sh(
                "ip",
                &[
                    "link", "add", &node_if, "netns", &t.node, "type", "veth", "peer", "name",
                    &pod_if, "netns", pod,
                ],
            );
            let node_ip = format!("10.244.{k}.1/24");
            sh(
                "ip",
                &["-n", &t.node, "addr", "add", &node_ip, "dev", &node_if],
            );
            sh("ip", &["-n", &t.node, "link", "set", &node_if, "up"]);
            let node_ip6 = format!("fd00:244:{k}::1/64");
            sh(
                "ip",
                &[
                    "-n", &t.node, "addr", "add", &node_ip6, "dev", &node_if, "nodad",
                ],
            );
            let pod_ip = format!("10.244.{k}.2/24");
            sh("ip", &["-n", pod, "addr", "add", &pod_ip, "dev", &pod_if]);
            let pod_ip6 = format!("fd00:244:{k}::2/64");
            sh(
                "ip",
                &["-n", pod, "addr", "add", &pod_ip6, "dev", &pod_if, "nodad"],
            );
            if k == 1 {
                for extra in ["10.244.1.3/24", "10.244.1.4/24", "10.244.1.5/24"] {
                    sh("ip", &["-n", pod, "addr", "add", extra, "dev", &pod_if]);
                }
            }
            sh("ip", &["-n", pod, "link", "set", &pod_if, "up"]);
            let gw = format!("10.244.{k}.1");
            sh("ip", &["-n", pod, "route", "add", "default", "via", &gw]);
        }
        // Pod to pod goes through the node, as with a CNI's routes.
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &t.node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        // The Service address needs a route for the first lookup; DNAT then picks a pod.
        sh(
            "ip",
            &[
                "-n",
                &t.node,
                "route",
                "add",
                "10.96.0.0/16",
                "via",
                "10.244.1.2",
            ],
        );
        let rules = format!(
            "table ip e2esvc {{\n chain out {{\n  type nat hook output priority -100; policy accept;\n  ip daddr {VIP} tcp dport {PORT} dnat to numgen inc mod 2 map {{ 0 : 10.244.1.2, 1 : 10.244.2.2 }}\n }}\n}}\n"
        );
        let rules_file = t.dir.join("svc.nft");
        std::fs::write(&rules_file, rules).unwrap();
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &t.node,
                "nft",
                "-f",
                rules_file.to_str().unwrap(),
            ],
        );
        for cg in &t.cgroups {
            let _ = std::fs::create_dir(cg);
        }
        t
    }

    fn cgroup(&self, name: &str) -> &Path {
        let i = ["app", "other", "pod1", "pod2", "pod3"]
            .iter()
            .position(|n| *n == name)
            .unwrap();
        &self.cgroups[i]
    }

    /// `program args` in network namespace `ns` (nsenter: the host's /sys stays) and cgroup
    /// `cgroup`, started by a shell that moves itself into the cgroup first.
    fn command(&self, ns: &str, cgroup: &str, program: &Path, args: &[&str]) -> Command {
        let mut cmd = test_support::cgroup::command_in(Some(self.cgroup(cgroup)), "nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg(program)
            .args(args);
        cmd
    }
}

impl Topology {
    /// [`Topology::command`], started, its lines kept.
    fn client(&self, name: &str, ns: &str, cgroup: &str, program: &Path, args: &[&str]) -> Lines {
        Lines::spawn(name, &mut self.command(ns, cgroup, program, args))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for cg in &self.cgroups {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
        }
        std::thread::sleep(Duration::from_millis(200));
        for cg in &self.cgroups {
            let _ = std::fs::remove_dir(cg);
        }
        for ns in self.pods.iter().chain(std::iter::once(&self.node)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child whose stdout lines are kept with when they came.
struct Lines {
    child: Supervised,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Lines {
    fn spawn(name: &str, cmd: &mut Command) -> Lines {
        let mut child = Supervised::spawn(
            name,
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()),
            Supervision::KILL,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let out = child.child_mut().stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                keep.lock().unwrap().push((Instant::now(), line));
            }
        });
        Lines { child, lines }
    }

    fn wait_done(&mut self, timeout: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.lines.lock().unwrap().iter().any(|(_, l)| l == "done") {
                let _ = self.child.wait();
                return self.lines.lock().unwrap().clone();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "client not done in {timeout:?}; it said: {:?}",
            self.lines.lock().unwrap()
        );
    }
}

/// Each "call I CODE PEER" line of a `-targets` client: (when, code, peer).
fn calls(lines: &[(Instant, String)]) -> Vec<(Instant, String, String)> {
    lines
        .iter()
        .filter_map(|(t, l)| {
            let mut w = l.split_whitespace();
            (w.next()? == "call").then_some(())?;
            let _i = w.next()?;
            Some((*t, w.next()?.to_owned(), w.next().unwrap_or("").to_owned()))
        })
        .collect()
}

/// Calls that ended OK.
fn oks(lines: &[(Instant, String)]) -> usize {
    lines.iter().filter(|(_, l)| l.ends_with(" OK")).count()
}

/// The REMOTE of each "connected LOCAL REMOTE" line: what getpeername said.
fn remotes(lines: &[(Instant, String)]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("connected ")?.split_whitespace().nth(1))
        .map(str::to_owned)
        .collect()
}

/// The agent, in the node's namespace and inside the intercepted cgroup itself (as a
/// DaemonSet's agent is under the host's cgroup root): its own connects must be left alone.
fn start_agent(t: &Topology, config: &Path) -> JsonChild {
    let mut agent = JsonChild::spawn(
        "agent run",
        t.command(
            &t.node,
            "app",
            &agent_bin(),
            &[
                "run",
                "--config",
                config.to_str().unwrap(),
                "--print-outcomes",
                "--print-breakers",
            ],
        )
        .env("AGENT_LOG", "info"),
    );
    let ready = agent.wait_line(Duration::from_secs(30), |v| v["kind"] == "ready");
    assert_eq!(
        ready["intercept"]["listen"][0], "127.0.0.1:15001",
        "ready line: {ready}"
    );
    agent
}

/// The agent's `intercept` figures (SIGUSR1 prints a stats line).
fn intercept_stats(agent: &mut JsonChild) -> Value {
    let from = agent.drain().len();
    agent.signal(libc::SIGUSR1);
    let line = agent.wait_line_from(from, Duration::from_secs(5), |v| v["kind"] == "stats");
    line["intercept"].clone()
}

fn kernel_counter(stats: &Value, name: &str) -> u64 {
    stats["kernel"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap()
}

/// The agent's outcomes of calls to `destination`, among the lines from the `since`th on.
fn outcomes_to(agent: &mut JsonChild, since: usize, destination: &str) -> Vec<Value> {
    agent.drain()[since..]
        .iter()
        .filter(|v| v["kind"] == "stream" && v["original_destination"] == destination)
        .cloned()
        .collect()
}

#[test]
#[ignore = "needs root (eBPF cgroup programs, namespaces, nftables), the agent binary and the grpc-go peer: cargo xtask test"]
fn interception_end_to_end() {
    require_root();
    let t = Topology::create();
    let grpcpeer = go_peer("grpcpeer", false);
    let splice_peer = workspace_root().join("tests/peers/splice/server.py");

    // The pods' servers, each in its pod's namespace and cgroup (pod 3 is a client's).
    let mut pods: Vec<Peer> = Vec::new();
    for (k, pod) in t.pods.iter().take(2).enumerate() {
        let addr = format!("10.244.{}.2:{PORT}", k + 1);
        let cmd = t.command(
            pod,
            &format!("pod{}", k + 1),
            &grpcpeer,
            &["server", "-addr", &addr],
        );
        let (peer, listening) = grpc_server_from(cmd);
        assert_eq!(listening.to_string(), addr);
        pods.push(peer);
    }
    // Pod 1 over IPv6 too.
    let addr6 = format!("[fd00:244:1::2]:{PORT}");
    let (_pod1_v6, listening) =
        grpc_server_from(t.command(&t.pods[0], "pod1", &grpcpeer, &["server", "-addr", &addr6]));
    assert_eq!(listening.to_string(), addr6);
    let cert = t.dir.join("cert.pem");
    let key = t.dir.join("key.pem");
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=splice",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    let python = Path::new("/usr/bin/python3");
    let script = splice_peer.to_str().unwrap();
    let mut http_server = JsonChild::spawn(
        "http server",
        &mut t.command(
            &t.pods[0],
            "pod1",
            python,
            &[script, "http", "10.244.1.3", "50051"],
        ),
    );
    http_server.wait_line(Duration::from_secs(10), |v| v.get("listening").is_some());
    let mut tls_server = JsonChild::spawn(
        "tls server",
        &mut t.command(
            &t.pods[0],
            "pod1",
            python,
            &[
                script,
                "tls",
                "10.244.1.4",
                "50051",
                cert.to_str().unwrap(),
                key.to_str().unwrap(),
            ],
        ),
    );
    tls_server.wait_line(Duration::from_secs(10), |v| v.get("listening").is_some());
    let mut banner_server = JsonChild::spawn(
        "banner server",
        &mut t.command(
            &t.pods[0],
            "pod1",
            python,
            &[script, "banner", "10.244.1.5", "50051"],
        ),
    );
    banner_server.wait_line(Duration::from_secs(10), |v| v.get("listening").is_some());

    let journal = t.dir.join("journal");
    let config = t.dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[intercept]
listen = "127.0.0.1:15001"
listen6 = "[::1]:15001"
cgroups = [{app:?}, {client_pod:?}]
node_listen = "10.244.3.1:15001"
detect_timeout = "200ms"

[[intercept.destination]]
cidr = "10.244.0.0/16"
ports = [{PORT}]

[[intercept.destination]]
cidr = "10.96.0.0/16"
ports = [{PORT}]

# A cluster claiming a second Service address: its calls go to the cluster's endpoints.
[[cluster]]
name = "echo"
endpoints = ["10.244.1.2:{PORT}", "10.244.2.2:{PORT}"]
claims = [{{ cidr = "10.96.0.11", ports = [{PORT}] }}]

[[intercept.destination]]
cidr = "fd00:244::/32"
ports = [{PORT}]

[breakers.endpoint]
consecutive_failures = 3
open_for = "30s"

[events]
journal = {journal:?}

[api]
listen = "127.0.0.1:0"

[export]
prometheus_listen = "127.0.0.1:0"
"#,
            app = t.cgroup("app"),
            client_pod = t.cgroup("pod3"),
        ),
    )
    .unwrap();
    let mut agent = start_agent(&t, &config);

    // 1. Pods by address, balanced round_robin: every call through the proxy, getpeername
    //    shows the pod dialed, both pods served.
    let pod_targets = format!("10.244.1.2:{PORT},10.244.2.2:{PORT}");
    let mut client = t.client(
        "grpc-go client",
        &t.node,
        "app",
        &grpcpeer,
        &[
            "client",
            "-targets",
            &pod_targets,
            "-calls",
            "200",
            "-concurrency",
            "4",
        ],
    );
    let lines = client.wait_done(Duration::from_secs(30));
    let made = calls(&lines);
    assert_eq!(made.len(), 200, "{lines:?}");
    assert!(made.iter().all(|(_, code, _)| code == "OK"), "{made:?}");
    let mut seen_remotes = remotes(&lines);
    seen_remotes.sort();
    seen_remotes.dedup();
    assert_eq!(
        seen_remotes,
        [format!("10.244.1.2:{PORT}"), format!("10.244.2.2:{PORT}")],
        "getpeername must show the pods dialed, not the intercept listener"
    );
    std::thread::sleep(Duration::from_millis(300));
    let to_pod1 = outcomes_to(&mut agent, 0, &format!("10.244.1.2:{PORT}"));
    let to_pod2: Vec<Value> = agent
        .seen
        .iter()
        .filter(|v| {
            v["kind"] == "stream" && v["original_destination"] == format!("10.244.2.2:{PORT}")
        })
        .cloned()
        .collect();
    assert_eq!(
        to_pod1.len() + to_pod2.len(),
        200,
        "every call is the proxy's"
    );
    assert!(!to_pod1.is_empty() && !to_pod2.is_empty());
    assert!(to_pod1.iter().all(|o| o["cluster"] == "passthrough"
        && o["endpoint"] == format!("10.244.1.2:{PORT}")
        && o["listener"] == "intercept"));
    let s = intercept_stats(&mut agent);
    assert_eq!(s["proxied_passthrough"], 2, "{s}");
    assert_eq!(kernel_counter(&s, "redirected"), 2, "{s}");
    // The agent's upstream connections to the pods, from the intercepted cgroup, marked.
    assert!(kernel_counter(&s, "own_skipped") >= 2, "{s}");
    println!("pods by address: 200 calls proxied, stats {s}");

    // 1b. IPv6: connect6 to the IPv6 listener, getpeername6 as dialed.
    let mut client = t.client(
        "grpc-go client (IPv6)",
        &t.node,
        "app",
        &grpcpeer,
        &["client", "-addr", &addr6, "-calls", "20"],
    );
    let lines = client.wait_done(Duration::from_secs(30));
    assert_eq!(remotes(&lines), std::slice::from_ref(&addr6), "{lines:?}");
    assert_eq!(oks(&lines), 20, "{lines:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(outcomes_to(&mut agent, 0, &addr6).len(), 20);

    // 1c. A dual-stack socket dialing an IPv4 address (v4-mapped): steered to the IPv4
    //     listener, getpeername6 gives the mapped address back, and the bytes (HTTP/1.1 here)
    //     reach the destination.
    let mapped = t.dir.join("mapped.py");
    std::fs::write(
        &mapped,
        "import socket,json\ns=socket.socket(socket.AF_INET6)\ns.connect(('::ffff:10.244.1.3',50051))\nbody=b'x'*1000\ns.sendall(b'POST /echo HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 1000\\r\\nConnection: close\\r\\n\\r\\n'+body)\nr=b''\nwhile True:\n    d=s.recv(65536)\n    if not d: break\n    r+=d\nprint(json.dumps({'peername': s.getpeername()[0], 'echoed': r.endswith(body), 'status': r.split(b' ')[1].decode()}))\n",
    )
    .unwrap();
    let before = intercept_stats(&mut agent);
    let out = t
        .command(
            &t.node,
            "app",
            Path::new("/usr/bin/python3"),
            &[mapped.to_str().unwrap()],
        )
        .output()
        .unwrap();
    let said: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("mapped client: {e}: {out:?}"));
    assert_eq!(said["peername"], "::ffff:10.244.1.3", "{said}");
    assert_eq!(said["echoed"], true, "{said}");
    let after = intercept_stats(&mut agent);
    assert_eq!(
        after["spliced_not_http2"].as_u64().unwrap(),
        before["spliced_not_http2"].as_u64().unwrap() + 1,
        "{after}"
    );

    // 2. The Service address: proxied, getpeername shows the Service address.
    let mut client = t.client(
        "grpc-go client (service)",
        &t.node,
        "app",
        &grpcpeer,
        &["client", "-addr", &format!("{VIP}:{PORT}"), "-calls", "50"],
    );
    let lines = client.wait_done(Duration::from_secs(30));
    assert_eq!(remotes(&lines), [format!("{VIP}:{PORT}")]);
    assert_eq!(oks(&lines), 50, "{lines:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outcomes_to(&mut agent, 0, &format!("{VIP}:{PORT}")).len(),
        50
    );

    // 2b. A claimed address: the claiming cluster serves it, balanced over its endpoints.
    let mut client = t.client(
        "grpc-go client (claimed)",
        &t.node,
        "app",
        &grpcpeer,
        &[
            "client",
            "-addr",
            &format!("10.96.0.11:{PORT}"),
            "-calls",
            "40",
            "-concurrency",
            "4",
        ],
    );
    let lines = client.wait_done(Duration::from_secs(30));
    assert_eq!(remotes(&lines), [format!("10.96.0.11:{PORT}")]);
    assert_eq!(oks(&lines), 40, "{lines:?}");
    std::thread::sleep(Duration::from_millis(300));
    let claimed = outcomes_to(&mut agent, 0, &format!("10.96.0.11:{PORT}"));
    assert_eq!(claimed.len(), 40);
    assert!(
        claimed.iter().all(|o| o["cluster"] == "echo"),
        "{claimed:?}"
    );
    let mut endpoints: Vec<&str> = claimed
        .iter()
        .filter_map(|o| o["endpoint"].as_str())
        .collect();
    endpoints.sort_unstable();
    endpoints.dedup();
    assert_eq!(
        endpoints.len(),
        2,
        "balanced over the cluster's endpoints: {endpoints:?}"
    );
    let s = intercept_stats(&mut agent);
    assert!(s["proxied_claimed"].as_u64().unwrap() >= 1, "{s}");

    // 2c. A client in a pod of its own (its namespace, its cgroup): steered to the node
    //     listener, as a DaemonSet's agent serves the pods of its node.
    let before = intercept_stats(&mut agent);
    let seen_before = agent.drain().len();
    let mut client = t.client(
        "grpc-go client (in a pod)",
        &t.pods[2],
        "pod3",
        &grpcpeer,
        &[
            "client",
            "-addr",
            &format!("10.244.2.2:{PORT}"),
            "-calls",
            "30",
        ],
    );
    let lines = client.wait_done(Duration::from_secs(30));
    assert_eq!(remotes(&lines), [format!("10.244.2.2:{PORT}")], "{lines:?}");
    assert_eq!(oks(&lines), 30, "{lines:?}");
    std::thread::sleep(Duration::from_millis(300));
    let from_pod = outcomes_to(&mut agent, seen_before, &format!("10.244.2.2:{PORT}"));
    assert_eq!(from_pod.len(), 30);
    assert!(
        from_pod
            .iter()
            .all(|o| o["client"].as_str().unwrap().starts_with("10.244.3.2:")),
        "{from_pod:?}"
    );
    let after = intercept_stats(&mut agent);
    assert_eq!(
        kernel_counter(&after, "redirected_to_node"),
        kernel_counter(&before, "redirected_to_node") + 1,
        "{after}"
    );

    // 3. Another cgroup: not intercepted, the calls go straight to the pod.
    let before = intercept_stats(&mut agent);
    let mut other = t.client(
        "grpc-go client (other cgroup)",
        &t.node,
        "other",
        &grpcpeer,
        &[
            "client",
            "-addr",
            &format!("10.244.1.2:{PORT}"),
            "-calls",
            "10",
        ],
    );
    let lines = other.wait_done(Duration::from_secs(30));
    assert_eq!(oks(&lines), 10);
    let after = intercept_stats(&mut agent);
    assert_eq!(
        after["accepted"], before["accepted"],
        "another cgroup was intercepted"
    );
    assert_eq!(
        kernel_counter(&after, "redirected"),
        kernel_counter(&before, "redirected")
    );

    // 4. Not HTTP/2 on the intercepted port: HTTP/1.1 and TLS spliced byte for byte.
    let body = t.dir.join("body.bin");
    let payload: Vec<u8> = (0..1_048_576u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&body, &payload).unwrap();
    let echoed = t.dir.join("echoed.bin");
    let curl = t
        .command(
            &t.node,
            "app",
            Path::new("/usr/bin/curl"),
            &[
                "-sS",
                "--http1.1",
                "--data-binary",
                &format!("@{}", body.display()),
                "-H",
                "Content-Type: application/octet-stream",
                "-o",
                echoed.to_str().unwrap(),
                "-w",
                "%{http_code} %{remote_ip}:%{remote_port}",
                "http://10.244.1.3:50051/echo",
            ],
        )
        .output()
        .unwrap();
    let curl_said = String::from_utf8_lossy(&curl.stdout);
    assert_eq!(curl_said, "200 10.244.1.3:50051", "{curl:?}");
    assert_eq!(
        std::fs::read(&echoed).unwrap(),
        payload,
        "HTTP/1.1 body changed on the way"
    );
    let got = http_server.wait_line(Duration::from_secs(5), |v| v["received"] == 1_048_576);
    assert_eq!(got["received"], payload.len());
    assert_eq!(got["protocol"], "HTTP/1.1");
    let tls = t
        .command(
            &t.node,
            "app",
            python,
            &[script, "tls-client", "10.244.1.4", "50051", "1048576"],
        )
        .output()
        .unwrap();
    let tls_said: Value =
        serde_json::from_slice(&tls.stdout).unwrap_or_else(|e| panic!("tls client: {e}: {tls:?}"));
    assert_eq!(tls_said["echo_equal"], true, "{tls_said}");
    assert_eq!(tls_said["peername"], "10.244.1.4:50051");
    let got = tls_server.wait_line(Duration::from_secs(5), |v| v.get("received").is_some());
    assert_eq!(
        got["sha256"], tls_said["sha256"],
        "TLS bytes changed on the way"
    );
    // A server that speaks first: the client sends nothing until it has the banner, so the
    // agent sees silence for detect_timeout and splices.
    let banner = t
        .command(
            &t.node,
            "app",
            python,
            &[script, "banner-client", "10.244.1.5", "50051", "100000"],
        )
        .output()
        .unwrap();
    let banner_said: Value = serde_json::from_slice(&banner.stdout)
        .unwrap_or_else(|e| panic!("banner client: {e}: {banner:?}"));
    assert_eq!(banner_said["banner_equal"], true, "{banner_said}");
    assert_eq!(banner_said["echo_equal"], true, "{banner_said}");
    assert_eq!(banner_said["peername"], "10.244.1.5:50051", "{banner_said}");
    let got = banner_server.wait_line(Duration::from_secs(5), |v| v.get("received").is_some());
    assert_eq!(got["received"], 100_000);
    let s = intercept_stats(&mut agent);
    assert_eq!(s["spliced_silent"], 1, "{s}");
    println!(
        "server speaks first: the banner came after {} ms (detect_timeout 200 ms), then 100 kB both ways",
        banner_said["banner_ms"]
    );
    assert_eq!(s["spliced_not_http2"], 3, "{s}");
    assert!(
        s["spliced_bytes_to_destination"].as_u64().unwrap() >= 2 * 1_048_576,
        "{s}"
    );
    println!("splice: HTTP/1.1 and TLS 1 MiB each, byte-exact; stats {s}");

    // 5. A pod killed under load: its breaker trips, the client's calls go on to the other.
    let mut client = t.client(
        "grpc-go client (pod killed)",
        &t.node,
        "app",
        &grpcpeer,
        &[
            "client",
            "-targets",
            &pod_targets,
            "-duration",
            "6s",
            "-concurrency",
            "2",
            "-pause",
            "5ms",
            "-call-timeout",
            "1s",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = Instant::now();
    pods[1].signal(libc::SIGKILL);
    let trip = agent.wait_line(Duration::from_secs(10), |v| {
        v["kind"] == "breaker"
            && v["breaker"]["to"] == "open"
            && v["breaker"]["name"] == format!("endpoint passthrough/10.244.2.2:{PORT}")
    });
    let lines = client.wait_done(Duration::from_secs(30));
    let made = calls(&lines);
    let failed_after_kill = made
        .iter()
        .filter(|(at, code, _)| *at >= killed_at && code != "OK")
        .count();
    let ok_late = made
        .iter()
        .filter(|(at, code, peer)| {
            *at >= killed_at + Duration::from_secs(2)
                && code == "OK"
                && peer.starts_with("10.244.1.2")
        })
        .count();
    let failed_late = made
        .iter()
        .filter(|(at, code, _)| *at >= killed_at + Duration::from_secs(2) && code != "OK")
        .count();
    println!(
        "pod killed: trip {trip}; {} calls, {failed_after_kill} failed after the kill, {ok_late} OK and {failed_late} failed from 2 s after it",
        made.len()
    );
    assert!(ok_late > 50, "the client's calls did not go on: {made:?}");
    assert_eq!(failed_late, 0, "calls still failing 2 s after the pod died");
    assert_eq!(trip["upstream"]["cluster"], "passthrough");
    let journaled = e2e::proxy::journal_files(&journal);
    assert!(
        journaled
            .iter()
            .any(|(_, text)| text.contains("10.244.2.2:50051") && text.contains("\"open\"")),
        "the trip is journaled: {journaled:?}"
    );

    // 6. kill -9 of the agent: new connections go where they were dialed.
    let mut client = t.client(
        "grpc-go client (agent killed)",
        &t.node,
        "app",
        &grpcpeer,
        &[
            "client",
            "-targets",
            &format!("10.244.1.2:{PORT}"),
            "-duration",
            "7s",
            "-concurrency",
            "2",
            "-pause",
            "5ms",
            "-call-timeout",
            "1s",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let killed_at = Instant::now();
    agent.signal(libc::SIGKILL);
    // The first connect from the app cgroup that reaches the pod itself.
    let probe = t.dir.join("probe.py");
    std::fs::write(
        &probe,
        "import socket,sys,time\nt0=time.monotonic()\nwhile True:\n    try:\n        s=socket.create_connection(('10.244.1.2',50051),timeout=1)\n        print(s.getpeername()[0], round((time.monotonic()-t0)*1000,1)); break\n    except OSError:\n        time.sleep(0.005)\n",
    )
    .unwrap();
    let direct = t
        .command(&t.node, "app", python, &[probe.to_str().unwrap()])
        .output()
        .unwrap();
    let direct_after = killed_at.elapsed();
    drop(agent);
    // The agent comes back while the client goes on: its direct connection is not touched.
    std::thread::sleep(Duration::from_secs(1));
    let restarted_at = Instant::now();
    let mut agent = start_agent(&t, &config);
    let lines = client.wait_done(Duration::from_secs(30));
    let made = calls(&lines);
    let failed: Vec<_> = made.iter().filter(|(_, code, _)| code != "OK").collect();
    let last_failure = failed.iter().map(|(at, _, _)| *at).max();
    let recovered_after = last_failure.map(|t| t.saturating_duration_since(killed_at));
    let failed_after_restart = failed
        .iter()
        .filter(|(at, _, _)| *at >= restarted_at)
        .count();
    println!(
        "agent kill -9 and restart: first direct connection {:?} after the kill ({}), client: {} calls, {} failed, last failure {:?} after the kill, {failed_after_restart} failed from the restart on, connections {:?}",
        direct_after,
        String::from_utf8_lossy(&direct.stdout).trim(),
        made.len(),
        failed.len(),
        recovered_after,
        remotes(&lines)
    );
    assert_eq!(failed_after_restart, 0, "the restart broke calls");
    assert!(
        direct_after < Duration::from_secs(1),
        "fail-open took {direct_after:?}"
    );
    assert!(
        made.iter()
            .any(|(at, code, _)| *at > killed_at + Duration::from_secs(2) && code == "OK"),
        "the client's calls did not go on after the agent died"
    );
    assert!(
        recovered_after.is_none_or(|d| d < Duration::from_secs(2)),
        "calls failed until {recovered_after:?} after the kill"
    );

    // And the restarted agent intercepts new connections again.
    let mut client = t.client(
        "grpc-go client (agent restarted)",
        &t.node,
        "app",
        &grpcpeer,
        &[
            "client",
            "-addr",
            &format!("10.244.1.2:{PORT}"),
            "-calls",
            "5",
        ],
    );
    let lines = client.wait_done(Duration::from_secs(30));
    assert_eq!(oks(&lines), 5);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outcomes_to(&mut agent, 0, &format!("10.244.1.2:{PORT}")).len(),
        5
    );

    // 7. Kernel signals on a passthrough endpoint: pod 1 resets the proxy's connection (as
    //    `ss -K` aborts its sockets), and the TCP reset trips that pod's breaker with evidence.
    let mut client = t.client(
        "grpc-go client (pod resets)",
        &t.node,
        "app",
        &grpcpeer,
        &[
            "client",
            "-targets",
            &format!("10.244.1.2:{PORT}"),
            "-duration",
            "3s",
            "-concurrency",
            "2",
            "-pause",
            "5ms",
            "-call-timeout",
            "1s",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &t.pods[0],
            "ss",
            "-K",
            "-t",
            "state",
            "established",
            "sport",
            "=",
            ":50051",
        ],
    );
    let trip = agent.wait_line(Duration::from_secs(10), |v| {
        v["kind"] == "breaker"
            && v["breaker"]["to"] == "open"
            && v["breaker"]["name"] == format!("endpoint passthrough/10.244.1.2:{PORT}")
    });
    println!("pod reset: trip {trip}");
    assert_eq!(trip["breaker"]["reason"], "tcp_reset", "{trip}");
    let evidence = trip["evidence"].as_array().unwrap();
    assert!(
        evidence.iter().any(|e| e["kind"] == "tcp_reset"),
        "the trip carries the kernel's evidence: {trip}"
    );
    if let Some(stream) = trip.get("stream") {
        assert_eq!(
            stream["original_destination"],
            format!("10.244.1.2:{PORT}"),
            "{trip}"
        );
    }
    let _ = client.wait_done(Duration::from_secs(30));

    // Interception's counters are metrics too.
    let ready = agent
        .seen
        .iter()
        .find(|v| v["kind"] == "ready")
        .unwrap()
        .clone();
    let metrics_url = format!("http://{}/metrics", ready["prometheus"].as_str().unwrap());
    let scraped = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", t.node))
        .args(["curl", "-sS", &metrics_url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&scraped.stdout);
    let value = |series: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(series))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    assert!(value(r#"agent_intercept_connections_total{outcome="proxied_passthrough","#) >= 2.0);
    assert!(value(r#"agent_intercept_kernel_total{counter="redirected","#) >= 2.0);
    assert!(value(r#"agent_intercept_kernel_total{counter="own_skipped","#) >= 1.0);

    // And in the status API (`agent status`).
    let status = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", t.node))
        .arg(agent_bin())
        .args([
            "status",
            "--output",
            "json",
            "--api",
            ready["api"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("agent status: {e}: {status:?}"));
    assert!(
        status["intercept"]["accepted"].as_u64().unwrap() >= 2,
        "{status}"
    );
    assert_eq!(status["dropped"]["intercept_store_failed"], 0, "{status}");
    assert!(
        status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "intercept 127.0.0.1:15001"),
        "{status}"
    );
    let _ = t.id;
}
