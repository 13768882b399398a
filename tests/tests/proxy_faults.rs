//! Deadlines, cancels, dead upstreams and the drain, through the proxy, with real peers:
//! grpcio client and server (`tests/peers/grpcpy`), and a scripted `h2` upstream that logs the
//! `grpc-timeout` and RST_STREAMs it receives (`tests/peers/h2py/h2_upstream.py`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use e2e::proxy::{AgentProxy, JsonChild, grpcio_client, grpcio_server, h2_upstream, python};
use serde_json::Value;

fn done_line(lines: &[Value]) -> &Value {
    lines
        .iter()
        .rev()
        .find(|l| l["event"] == "done")
        .unwrap_or_else(|| panic!("no done line: {lines:?}"))
}

/// CLOCK_MONOTONIC in seconds: the clock of the peers' `t` fields.
fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// `grpc-timeout` as sent on the wire ("198744u"), in seconds.
fn grpc_timeout_secs(v: &str) -> f64 {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: f64 = n.parse().unwrap();
    n * match unit {
        "H" => 3600.0,
        "M" => 60.0,
        "S" => 1.0,
        "m" => 1e-3,
        "u" => 1e-6,
        "n" => 1e-9,
        _ => panic!("bad grpc-timeout unit in {v:?}"),
    }
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_200ms_deadline_ends_in_deadline_exceeded_and_cancels_the_upstream_stream() {
    let (mut upstream, upstream_addr) = h2_upstream("hold");
    let proxy = AgentProxy::quick(&[upstream_addr]);
    let c = grpcio_client(
        proxy.addr,
        "deadline",
        &["--timeout-ms", "200", "--count", "5"],
    );
    let (status, lines, stderr) = c.finish(Duration::from_secs(60));
    let done = done_line(&lines);
    assert!(status.success(), "{done}\n{stderr}");
    assert_eq!(done["codes"]["DEADLINE_EXCEEDED"], 5, "{done}");
    let slowest = done["max_elapsed_ms"].as_f64().unwrap();
    assert!(slowest < 250.0, "DEADLINE_EXCEEDED after {slowest} ms");

    // Each upstream stream got a grpc-timeout below 200 ms, then RST_STREAM(CANCEL) about
    // when it ran out.
    let headers: Vec<Value> = (0..5)
        .map(|i| {
            upstream.wait_line(Duration::from_secs(5), |l| {
                l["event"] == "headers" && l["stream"] == 2 * i + 1
            })
        })
        .collect();
    for h in &headers {
        let timeout = grpc_timeout_secs(h["grpc_timeout"].as_str().unwrap());
        assert!(timeout < 0.200 && timeout > 0.150, "upstream saw {h}");
        let stream = h["stream"].clone();
        let reset = upstream.wait_line(Duration::from_secs(5), |l| {
            l["event"] == "reset" && l["stream"] == stream
        });
        assert_eq!(reset["error"], "CANCEL", "{reset}");
        let late = reset["t"].as_f64().unwrap() - h["t"].as_f64().unwrap() - timeout;
        assert!(
            late.abs() < 0.05,
            "cancel {late:.3} s off the deadline: {h} {reset}"
        );
    }
    let (status, out, _) = proxy.terminate(Duration::from_secs(10));
    assert!(status.success());
    let endings: Vec<&Value> = out.iter().filter(|l| l["kind"] == "stream").collect();
    assert_eq!(endings.len(), 5);
    // grpcio rounds the grpc-timeout it sends up to the next millisecond, so its own timer
    // (and its RST_STREAM) usually beats the proxy's by a hair: either ending is right here.
    // `the_proxy_enforces_grpc_timeout_itself` covers a client that never gives up.
    assert!(
        endings
            .iter()
            .all(|o| o["ending"] == "deadline_exceeded" || o["ending"] == "client_cancelled"),
        "{endings:?}"
    );
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn the_proxy_enforces_grpc_timeout_itself() {
    let (mut upstream, upstream_addr) = h2_upstream("hold");
    let proxy = AgentProxy::quick(&[upstream_addr]);
    let body = std::env::temp_dir().join(format!("e2e-grpc-empty-{}", std::process::id()));
    std::fs::write(&body, [0u8; 5]).unwrap();
    // nghttp waits for whatever comes back: only the proxy can end this call.
    let started = std::time::Instant::now();
    let out = std::process::Command::new("nghttp")
        .args([
            "-v",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
        ])
        .args(["-H", "grpc-timeout: 200m", "-d"])
        .arg(&body)
        .arg(format!("http://{}/proxytest.Test/Sleep", proxy.addr))
        .output()
        .expect("nghttp (cargo xtask setup installs nghttp2-client)");
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&body);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("grpc-status: 4"), "{text}");
    assert!(
        elapsed < Duration::from_millis(250),
        "answered after {elapsed:?}"
    );
    let h = upstream.wait_line(Duration::from_secs(5), |l| l["event"] == "headers");
    assert!(
        grpc_timeout_secs(h["grpc_timeout"].as_str().unwrap()) < 0.200,
        "{h}"
    );
    let stream = h["stream"].clone();
    let reset = upstream.wait_line(Duration::from_secs(5), |l| {
        l["event"] == "reset" && l["stream"] == stream
    });
    assert_eq!(reset["error"], "CANCEL", "{reset}");
    let (status, out, _) = proxy.terminate(Duration::from_secs(10));
    assert!(status.success());
    let o = out.iter().find(|l| l["kind"] == "stream").unwrap();
    assert_eq!(
        (&o["ending"], &o["grpc_status"]),
        (&"deadline_exceeded".into(), &4.into()),
        "{o}"
    );
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_thousand_expired_calls_leave_no_stream_open() {
    let (_server, upstream) = grpcio_server();
    // Breakers off: a thousand timeouts would open the endpoint's, and the calls then end at
    // once with UNAVAILABLE; this is about what the deadline leaves behind.
    let mut proxy = AgentProxy::quick_with(&[upstream], &["--no-breakers"]);
    let c = grpcio_client(
        proxy.addr,
        "deadline",
        &[
            "--timeout-ms",
            "200",
            "--sleep-ms",
            "1000",
            "--count",
            "1000",
            "--concurrency",
            "25",
        ],
    );
    let (status, lines, stderr) = c.finish(Duration::from_secs(300));
    let done = done_line(&lines);
    assert!(status.success(), "{done}\n{stderr}");
    assert_eq!(done["codes"]["DEADLINE_EXCEEDED"], 1000, "{done}");
    // The upstream handlers notice a cancel within 5 ms; give them a moment.
    std::thread::sleep(Duration::from_millis(300));
    let stats = grpcio_client(upstream, "stats", &[]);
    let (_, lines, _) = stats.finish(Duration::from_secs(30));
    let s = lines.iter().find(|l| l["event"] == "stats").unwrap();
    assert_eq!(s["active"], 0, "upstream handlers still running: {s}");
    assert_eq!(s["calls_cancelled"], 1000, "{s}");
    assert_eq!(proxy.streams_open(), 0, "{}", proxy.stats());
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn sigkill_of_the_upstream_mid_stream_gives_unavailable_at_once() {
    let (server, upstream) = grpcio_server();
    let proxy = AgentProxy::quick(&[upstream]);
    let mut c = grpcio_client(
        proxy.addr,
        "server-stream-slow",
        &["--count", "1000", "--interval-ms", "20"],
    );
    c.wait_line(Duration::from_secs(30), |l| {
        l["event"] == "message" && l["seq"] == 10
    });
    let killed_at = monotonic();
    server.signal(libc::SIGKILL);
    let (status, lines, stderr) = c.finish(Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    let end = lines.iter().find(|l| l["event"] == "status").unwrap();
    assert_eq!(end["code"], "UNAVAILABLE", "{end}");
    let after = end["t"].as_f64().unwrap() - killed_at;
    assert!(
        after < 0.100,
        "UNAVAILABLE {:.1} ms after the kill",
        after * 1e3
    );
    drop(server);
    let (status, out, _) = proxy.terminate(Duration::from_secs(10));
    assert!(status.success());
    let o = out.iter().find(|l| l["kind"] == "stream").unwrap();
    assert_eq!(
        (&o["ending"], &o["grpc_status"]),
        (&"upstream_reset".into(), &14.into()),
        "{o}"
    );
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn sigterm_drains_100_inflight_streams_then_exits_0() {
    let (_server, upstream) = grpcio_server();
    let proxy = AgentProxy::quick(&[upstream]);
    let mut c = grpcio_client(
        proxy.addr,
        "inflight",
        &["--count", "100", "--sleep-ms", "1500"],
    );
    c.wait_line(Duration::from_secs(30), |l| l["event"] == "started");
    let (status, out, stderr) = proxy.terminate(Duration::from_secs(30));
    let (client_status, lines, client_err) = c.finish(Duration::from_secs(30));
    let done = done_line(&lines);
    let not_ok: Vec<&Value> = out
        .iter()
        .filter(|l| l["kind"] == "stream" && l["grpc_status"] != 0)
        .collect();
    assert!(
        client_status.success(),
        "{done}\n{client_err}\nproxy's failed streams: {not_ok:?}\n{stderr}"
    );
    assert_eq!(done["codes"]["OK"], 100, "{done}");
    assert!(status.success(), "agent run exited {status}:\n{stderr}");
    let sleeps: Vec<&Value> = out
        .iter()
        .filter(|l| l["kind"] == "stream" && l["method"] == "/proxytest.Test/Sleep")
        .collect();
    assert_eq!(sleeps.len(), 100);
    assert!(
        sleeps
            .iter()
            .all(|o| o["ending"] == "completed" && o["grpc_status"] == 0),
        "{sleeps:?}"
    );
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_client_cancel_cancels_the_upstream_stream() {
    let (mut upstream, upstream_addr) = h2_upstream("hold");
    let proxy = AgentProxy::quick(&[upstream_addr]);
    let port = proxy.addr.port().to_string();
    let cancel = JsonChild::spawn(
        "h2client --cancel",
        &mut python(
            "h2py/h2client.py",
            &[
                "127.0.0.1",
                &port,
                "--cancel",
                "--cancel-after",
                "0.2",
                "--path",
                "/held",
            ],
        ),
    );
    let (status, _, stderr) = cancel.finish(Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    let h = upstream.wait_line(Duration::from_secs(5), |l| l["event"] == "headers");
    let stream = h["stream"].clone();
    let reset = upstream.wait_line(Duration::from_secs(5), |l| {
        l["event"] == "reset" && l["stream"] == stream
    });
    assert_eq!(reset["error"], "CANCEL", "{reset}");
    let (status, out, _) = proxy.terminate(Duration::from_secs(10));
    assert!(status.success());
    let o = out.iter().find(|l| l["kind"] == "stream").unwrap();
    assert_eq!(
        (&o["ending"], &o["reset_reason"]),
        (&"client_cancelled".into(), &"CANCEL".into()),
        "{o}"
    );
}
