//! Kernel signals joined to the proxy's streams and fed to its breakers, end to end: the agent
//! runs with its probes attached (`agent run`, `[signals]`), real peers make the signals
//! (`ss -K` resets an upstream's connections, a grpc-go upstream in its own network namespace
//! collects garbage, a client floods HTTP/2 rapid resets), and the `breaker_trip/v1` events the
//! agent prints (`--print-breakers`) must name the signal, the stream's context and the kernel
//! evidence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use e2e::{
    Netns, go_peer, grpc_server_from,
    proxy::{AgentProxy, JsonChild, config_file, grpcio_client, grpcio_server, python},
    require_root,
};
use serde_json::Value;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const SECRET: &[u8] = b"correlate-test-secret-0123456789";

/// A scratch directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("e2e-correlate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `agent run --config` with the probes on, one listener routing everything to cluster `svc`,
/// printing breaker events.
fn agent(dir: &std::path::Path, clusters_and_more: &str) -> AgentProxy {
    let config = config_file(dir, clusters_and_more);
    AgentProxy::start_with_probes(&["--config", config.to_str().unwrap(), "--print-breakers"])
}

fn token(sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "sub": sub, "scope": "read:test", "client_id": "correlate-app", "exp": now + 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn is_breaker(l: &Value, to: &str) -> bool {
    l["kind"] == "breaker" && l["breaker"]["to"] == to
}

/// Established TCP connections whose local port is `port` (the upstream's accepted ones).
fn established_on(port: u16) -> usize {
    let out = Command::new("ss")
        .args([
            "-tnH",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Resets every established connection of the upstream on `port`, as `ss -K` does: the
/// kernel aborts the upstream's sockets, which sends a TCP reset to the proxy.
fn kill_connections(port: u16) {
    let st = Command::new("ss")
        .args([
            "-K",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ss (iproute2, with CONFIG_INET_DIAG_DESTROY)");
    assert!(st.success(), "ss -K failed");
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The upstream's connections are reset (by `ss -K`) 100 times while a client streams
/// through the proxy: each time the endpoint's breaker opens with reason `tcp_reset`, the
/// client's trace id, session id and verified claims, and the reset as evidence, with the time
/// from the kernel event to the trip.
#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn upstream_tcp_resets_trip_its_breaker_with_the_streams_context() {
    require_root();
    let (server, up) = grpcio_server();
    let dir = scratch("reset");
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let mut proxy = agent(
        &dir,
        &format!(
            r#"
[[cluster]]
name = "svc"
endpoints = ["{up}"]
[breakers.endpoint]
open_for = "100ms"
jitter = 0.0
half_open_probes = 1
half_open_successes = 1
[context.jwt]
hmac_secret_file = {secret_file:?}
[signals]
probes = ["tcp-reset"]
"#
        ),
    );
    let bearer = format!("authorization=Bearer {}", token("alice"));
    let traceparent = format!("traceparent={TRACEPARENT}");
    // Streams of 2000 messages, two at a time, until the test ends; refusals while the
    // breaker is open are expected.
    let _client = grpcio_client(
        proxy.addr,
        "load",
        &[
            "--method",
            "server-stream",
            "--stream-count",
            "2000",
            "--count",
            "100000000",
            "--concurrency",
            "2",
            "--pause-ms",
            "5",
            "--expect-codes",
            "OK,UNAVAILABLE",
            "--header",
            &traceparent,
            "--header",
            "x-session-id=sess_reset",
            "--header",
            &bearer,
        ],
    );
    let mut delays_us = Vec::new();
    // The first connection has been up a moment (its serving process found) before it dies.
    std::thread::sleep(Duration::from_secs(1));
    for trial in 0..100 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while established_on(up.port()) == 0 {
            assert!(
                Instant::now() < deadline,
                "trial {trial}: no upstream connection"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mark = proxy.process.drain().len();
        kill_connections(up.port());
        let trip = proxy
            .process
            .wait_line_from(mark, Duration::from_secs(10), |l| is_breaker(l, "open"));
        assert_eq!(
            trip["breaker"]["reason"], "tcp_reset",
            "trial {trial}: {trip}"
        );
        assert_eq!(trip["breaker"]["name"], format!("endpoint svc/{up}"));
        let evidence = trip["evidence"].as_array().unwrap();
        let last = evidence.last().unwrap();
        assert_eq!(last["kind"], "tcp_reset", "{trip}");
        delays_us.push(last["kernel_to_transition_us"].as_u64().unwrap());
        if trial == 0 {
            assert_eq!(last["by"], "upstream", "{last}");
            assert_eq!(last["peer"], up.to_string(), "{last}");
            assert_eq!(last["state"], "ESTABLISHED", "{last}");
            // The stream the reset hit (or the last that ended on that connection).
            let stream = &trip["stream"];
            assert_eq!(stream["method"], "/proxytest.Test/ServerStream", "{trip}");
            assert_eq!(
                stream["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
                "{trip}"
            );
            assert_eq!(stream["session_id"], "sess_reset", "{trip}");
            assert_eq!(trip["jwt_claims"]["sub"], "alice", "{trip}");
            assert_eq!(trip["jwt_claims"]["verified"], true, "{trip}");
            // The endpoint is served by the grpcio server: found by its socket.
            assert_eq!(trip["upstream"]["pid"], server.pid(), "{trip}");
        }
        // Closed again (half-open, one probe) before the next trial.
        proxy
            .process
            .wait_line_from(mark, Duration::from_secs(10), |l| is_breaker(l, "closed"));
    }
    let all = delays_us.clone();
    let med = median(&mut delays_us);
    let p90 = delays_us[delays_us.len() * 9 / 10];
    eprintln!(
        "kernel reset -> breaker open over {} trials: median {med} us, p90 {p90} us, max {} us (target: median < 5000 us); all: {all:?}",
        delays_us.len(),
        delays_us.last().unwrap()
    );
    let stats = proxy.stats();
    eprintln!("signals: {}", stats["signals"]);
    assert!(
        stats["signals"]["tcp_reset"]["acted"].as_u64().unwrap() >= 100,
        "{stats}"
    );
}

/// A grpc-go upstream (Debian's grpc-go) in its own network namespace, collecting garbage
/// every 200 ms, with a 1 µs stop-the-world threshold: its pauses trip its endpoint's breaker,
/// and the event names its process, found across the namespace by the socket it serves on.
#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn a_go_upstreams_gc_pause_is_attributed_to_its_endpoint_across_namespaces() {
    require_root();
    let net = Netns::create("cor", "10.213.78");
    let bin = go_peer("grpcpeer", false);
    let mut cmd = net.command(&bin);
    cmd.args([
        "server",
        "-addr",
        &format!("{}:0", net.ns_ip),
        "-gc-every",
        "200ms",
    ]);
    let (server, up) = grpc_server_from(cmd);
    let go_pid = server.pid();
    let dir = scratch("stw");
    let mut proxy = agent(
        &dir,
        &format!(
            r#"
[[cluster]]
name = "svc"
endpoints = ["{up}"]
[breakers.endpoint]
open_for = "60s"
[signals]
probes = ["go-gc"]
stw_threshold = "1us"
upstream_stw = "trip"
"#
        ),
    );
    // Calls through the proxy make its connection to the endpoint.
    let client = Command::new(&bin)
        .args(["client", "-addr", &proxy.addr.to_string(), "-calls", "50"])
        .output()
        .unwrap();
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let trip = proxy
        .process
        .wait_line(Duration::from_secs(30), |l| is_breaker(l, "open"));
    assert_eq!(trip["breaker"]["reason"], "go_stw", "{trip}");
    assert_eq!(
        trip["breaker"]["name"],
        format!("endpoint svc/{up}"),
        "{trip}"
    );
    assert_eq!(trip["upstream"]["pid"], go_pid, "{trip}");
    let go_netns = std::fs::read_link(format!("/proc/{go_pid}/ns/net")).unwrap();
    let own_netns = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(go_netns, own_netns);
    let ev = trip["evidence"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(ev["kind"], "go_stw", "{trip}");
    assert_eq!(ev["pid"], go_pid, "{ev}");
    assert_eq!(
        format!("net:[{}]", ev["netns"]),
        go_netns.to_string_lossy(),
        "{ev}"
    );
    assert!(
        ev["duration_us"].is_u64() && ev["world_stopped_us"].is_u64(),
        "{ev}"
    );
    eprintln!("go stw trip: {trip}");
}

/// A client flooding rapid resets (HEADERS then RST_STREAM, CVE-2023-44487) under session id
/// `attacker` trips that client's breaker; its next calls are refused at once while another
/// client's all succeed.
#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn a_rapid_reset_client_trips_only_its_own_breaker() {
    require_root();
    let (_server, up) = grpcio_server();
    let dir = scratch("rapid");
    let mut proxy = agent(
        &dir,
        &format!(
            r#"
[[cluster]]
name = "svc"
endpoints = ["{up}"]
[breakers.client]
open_for = "60s"
[signals]
probes = ["h2-frames"]
rapid_reset_rate = 50
"#
        ),
    );
    let (host, port) = ("127.0.0.1".to_owned(), proxy.addr.port().to_string());
    let attacker = JsonChild::spawn(
        "rapid-reset",
        &mut python(
            "h2py/attacks.py",
            &[
                &host,
                &port,
                "rapid-reset",
                "--duration",
                "3",
                "--rate",
                "2000",
                "--header",
                "x-session-id=attacker",
            ],
        ),
    );
    let trip = proxy
        .process
        .wait_line(Duration::from_secs(30), |l| is_breaker(l, "open"));
    assert_eq!(trip["breaker"]["reason"], "rapid_reset", "{trip}");
    assert_eq!(trip["breaker"]["scope"], "client", "{trip}");
    assert_eq!(trip["breaker"]["name"], "client session:attacker", "{trip}");
    let ev = trip["evidence"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(ev["kind"], "rapid_reset", "{ev}");
    assert!(ev["resets_last_second"].as_u64().unwrap() > 50, "{ev}");
    let _ = attacker.finish(Duration::from_secs(60));
    // The attacker's own calls are refused; another client's are served.
    let refused = grpcio_client(
        proxy.addr,
        "load",
        &[
            "--count",
            "5",
            "--header",
            "x-session-id=attacker",
            "--expect-codes",
            "UNAVAILABLE",
        ],
    );
    let (st, _, err) = refused.finish(Duration::from_secs(60));
    assert!(st.success(), "{err}");
    let good = grpcio_client(
        proxy.addr,
        "load",
        &[
            "--count",
            "50",
            "--concurrency",
            "5",
            "--header",
            "x-session-id=good",
        ],
    );
    let (st, lines, err) = good.finish(Duration::from_secs(60));
    assert!(st.success(), "{lines:?} {err}");
    let opened: Vec<Value> = proxy
        .process
        .drain()
        .iter()
        .filter(|l| is_breaker(l, "open"))
        .cloned()
        .collect();
    assert!(
        opened
            .iter()
            .all(|l| l["breaker"]["name"] == "client session:attacker"),
        "{opened:?}"
    );
}
