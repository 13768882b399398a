//! The HTTP/2 tracker beyond clean new connections: picking up a connection that was open
//! before the agent started, and the rapid-reset (CVE-2023-44487) signal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use e2e::{Peer, Trace, free_port, of_kind, wait_listening, workspace_root};
use serde_json::Value;

fn nghttpd(ip: &str) -> (Peer, SocketAddr) {
    let dir = workspace_root().join("target/e2e-h2-follow");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("page"), "x".repeat(20_000)).unwrap();
    let port = free_port(ip);
    let peer = Peer::spawn(
        "nghttpd",
        Command::new("nghttpd")
            .args(["--no-tls", "-a", ip, "-d"])
            .arg(&dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let addr = SocketAddr::new(ip.parse().unwrap(), port);
    wait_listening(addr);
    (peer, addr)
}

fn h2client(server: SocketAddr, args: &[&str]) -> Command {
    let mut c = Command::new("python3");
    c.arg(workspace_root().join("tests/peers/h2py/h2client.py"))
        .arg(server.ip().to_string())
        .arg(server.port().to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

/// Reads JSON lines from the client until one satisfies `until`; returns them all.
fn read_until(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    until: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut out = Vec::new();
    for line in lines.by_ref() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let stop = until(&v);
        out.push(v);
        if stop {
            return out;
        }
    }
    panic!("client ended before the expected line; got {out:?}");
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn connection_open_before_the_agent_is_followed_after_resync() {
    let (_server, web) = nghttpd("127.0.0.1");
    let mut client = Peer::spawn("h2client", &mut h2client(web, &["--hold"]));
    let mut stdin = client.child.stdin.take().unwrap();
    let mut lines = BufReader::new(client.child.stdout.take().unwrap()).lines();
    let first = read_until(&mut lines, |v| v["event"] == "ready");
    let local: SocketAddr = first[0]["local"].as_str().unwrap().parse().unwrap();
    writeln!(stdin, "get /page").unwrap();
    read_until(&mut lines, |v| v["event"] == "ready");

    // The agent starts in the middle of the connection.
    let mut trace = Trace::start(&["--probes", "h2-frames", "--all-frames"]);
    writeln!(stdin, "get /page").unwrap();
    let after = read_until(&mut lines, |v| v["event"] == "ready");
    let frames: Vec<&Value> = after.iter().filter(|v| v["type_id"].is_u64()).collect();
    let want = |dir: &str| -> Vec<(String, u64)> {
        frames
            .iter()
            .filter(|f| f["dir"] == dir)
            .map(|f| {
                (
                    f["type"].as_str().unwrap().to_owned(),
                    f["stream"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let (sent, received) = (want("send"), want("recv"));
    assert!(!sent.is_empty() && !received.is_empty(), "{after:?}");
    let got = |src: SocketAddr, events: &[Value]| -> Vec<(String, u64)> {
        of_kind(events, "h2_frame")
            .filter(|e| e["src"] == src.to_string())
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_owned(),
                    e["stream_id"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let ok = trace.wait_for(Duration::from_secs(5), |events| {
        got(local, events) == sent && got(web, events) == received
    });
    assert!(
        ok,
        "after resync\n  client sent {sent:?}\n  agent       {:?}\n  client got  {received:?}\n  agent       {:?}",
        got(local, &trace.events),
        got(web, &trace.events)
    );
    let synced = of_kind(&trace.events, "h2_flow")
        .filter(|e| {
            e["change"] == "synced"
                && (e["src"] == local.to_string() || e["src"] == web.to_string())
        })
        .count();
    assert_eq!(synced, 2, "both directions picked up at a frame header");
    writeln!(stdin, "quit").unwrap();
    let _ = client.child.wait();
    let out = trace.stop();
    eprintln!(
        "resync: {} client frames and {} server frames followed after the agent started",
        sent.len(),
        received.len()
    );
    assert_eq!(out.summary["probes"]["h2-frames"]["lost"]["gap"], 0);
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn rapid_reset_signalled_within_a_second_and_never_for_h2load() {
    let (_server, web) = nghttpd("127.0.0.1");
    let mut trace = Trace::start(&["--probes", "h2-frames", "--rapid-reset-rate", "100"]);

    // Ordinary load first: no resets, no signal.
    let h2load = Command::new("h2load")
        .args(["-n", "20000", "-c", "10", "-m", "10"])
        .arg(format!("http://{web}/page"))
        .output()
        .expect("run h2load (nghttp2-client)");
    assert!(
        h2load.status.success(),
        "{}",
        String::from_utf8_lossy(&h2load.stderr)
    );
    let summary = String::from_utf8_lossy(&h2load.stdout);
    assert!(summary.contains("20000 succeeded"), "{summary}");
    trace.wait_for(Duration::from_millis(500), |_| false);
    let false_alarms = of_kind(&trace.events, "rapid_reset").count();
    assert_eq!(false_alarms, 0, "rapid_reset during h2load");

    // 1000 open-and-reset pairs a second on one connection.
    let out = h2client(web, &["--rapid-reset", "1000", "--duration", "2"])
        .output()
        .unwrap();
    let log: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let connected = log.iter().find(|v| v["event"] == "connected").unwrap();
    let client: SocketAddr = connected["local"].as_str().unwrap().parse().unwrap();
    let first_reset_s = log
        .iter()
        .find(|v| v["event"] == "first_reset")
        .and_then(|v| v["t"].as_f64())
        .expect("client reports its first reset");
    let start = Instant::now();
    let ok = trace.wait_for(Duration::from_secs(5), |events| {
        of_kind(events, "rapid_reset").any(|e| e["src"] == client.to_string())
    });
    assert!(
        ok,
        "no rapid_reset for {client} within {:?}",
        start.elapsed()
    );
    let signal = of_kind(&trace.events, "rapid_reset")
        .find(|e| e["src"] == client.to_string())
        .unwrap()
        .clone();
    let trace_out = trace.stop();
    // Both clocks are CLOCK_MONOTONIC: the client's `t` and the kernel's ktime.
    let signal_s = signal["ktime_ns"].as_f64().unwrap() / 1e9;
    let latency_ms = (signal_s - first_reset_s) * 1e3;
    eprintln!("rapid_reset {latency_ms:.0} ms after the first reset: {signal}");
    assert!(
        (0.0..1000.0).contains(&latency_ms),
        "signal {latency_ms:.0} ms after the first reset"
    );
    assert_eq!(
        of_kind(&trace_out.events, "rapid_reset")
            .filter(|e| e["src"] == client.to_string())
            .count(),
        1,
        "one signal per cooldown"
    );
}
