//! Export, end to end: the agent sends its journal's breaker events as OTLP log records and its
//! metrics over OTLP to a real receiver (`tests/peers/otlp/receiver.py`: Python grpcio serving
//! the official opentelemetry-proto services, writing what it gets as JSON lines), and serves
//! the same metrics on a Prometheus text endpoint that `promtool check metrics` accepts.
//! Upstreams are the grpcio test server made to fail, so breakers trip again and again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use e2e::proxy::{
    AgentProxy, JsonChild, config_file, grpcio_client, grpcio_server, journal_files, listening,
    python,
};
use serde_json::Value;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("e2e-export-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The OTLP receiver on `listen` (port 0: any), appending to `out`.
fn receiver(out: &Path, listen: &str) -> (JsonChild, SocketAddr) {
    let mut r = JsonChild::spawn(
        "otlp receiver",
        &mut python(
            "otlp/receiver.py",
            &["--out", out.to_str().unwrap(), "--listen", listen],
        ),
    );
    let addr = listening(&mut r);
    (r, addr)
}

/// What the receiver wrote so far (a line it is still writing is left out).
fn received(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn logs(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["signal"] == "log").collect()
}

/// The sequence numbers of the journal in `dir`, from its files.
fn journal_seqs(dir: &Path) -> Vec<u64> {
    journal_files(dir)
        .iter()
        .flat_map(|(_, text)| {
            text.lines()
                .map(|l| {
                    serde_json::from_str::<Value>(l).unwrap()["seq"]
                        .as_u64()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `agent run --config` with the failing upstream `upstream` behind breakers that trip on
/// every failure and reopen 50 ms later (a storm of transitions), and `more` configuration.
fn agent(dir: &Path, upstream: SocketAddr, more: &str) -> AgentProxy {
    let config = config_file(
        dir,
        &format!(
            r#"
[[cluster]]
name = "svc"
endpoints = ["{upstream}"]

[breakers.endpoint]
consecutive_failures = 1
open_for = "50ms"
backoff_multiplier = 1.0
jitter = 0.0
half_open_probes = 1
half_open_successes = 1
[breakers.cluster]
enabled = false
[breakers.method]
enabled = false

{more}
"#
        ),
    );
    AgentProxy::start(&["--config", config.to_str().unwrap()])
}

/// A failing load through the proxy: `count` calls, 4 at a time, each worker pausing
/// `pause_ms` between calls, carrying a traceparent.
fn storm(proxy: SocketAddr, count: u32, pause_ms: u32) -> JsonChild {
    let count = count.to_string();
    let pause = pause_ms.to_string();
    let traceparent = format!("traceparent=00-{TRACE_ID}-00f067aa0ba902b7-01");
    grpcio_client(
        proxy,
        "load",
        &[
            "--count",
            &count,
            "--concurrency",
            "4",
            "--interval-ms",
            &pause,
            "--header",
            &traceparent,
            "--expect-codes",
            "UNAVAILABLE",
        ],
    )
}

fn load_done(c: JsonChild) -> Value {
    let (status, lines, stderr) = c.finish(Duration::from_secs(180));
    let done = lines
        .iter()
        .rev()
        .find(|l| l["event"] == "done")
        .cloned()
        .unwrap_or_else(|| panic!("load printed no summary; stderr:\n{stderr}"));
    assert!(status.success() && done["ok"] == true, "{done}\n{stderr}");
    done
}

/// Polls `f` every 200 ms until it returns Some, or panics with `what` after `timeout`.
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The latest data point of metric `name` whose attributes include `want`.
fn metric<'a>(lines: &'a [Value], name: &str, want: &[(&str, &str)]) -> Option<&'a Value> {
    lines.iter().rev().find(|l| {
        l["signal"] == "metric"
            && l["name"] == name
            && want.iter().all(|(k, v)| l["attributes"][*k] == *v)
    })
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn events_and_metrics_reach_the_collector_and_an_outage_loses_no_event() {
    let dir = temp_dir("otlp");
    let out = dir.join("received.jsonl");
    let journal = dir.join("journal");
    let (upstream, upstream_addr) = grpcio_server();
    let c = grpcio_client(upstream_addr, "control", &["--code", "UNAVAILABLE"]);
    assert!(c.finish(Duration::from_secs(30)).0.success());
    let (recv, recv_addr) = receiver(&out, "127.0.0.1:0");
    let mut proxy = agent(
        &dir,
        upstream_addr,
        &format!(
            r#"
[events]
journal = {journal:?}
[export]
otlp_endpoint = "http://{recv_addr}"
otlp_interval = "500ms"
"#
        ),
    );
    assert_eq!(proxy.ready["otlp"], format!("http://{recv_addr}"));

    // About 100 calls a second for some 55 s: a breaker cycle (open, half-open, open) every
    // 50-60 ms, several hundred events while the receiver is down.
    let started = Instant::now();
    let load = storm(proxy.addr, 5500, 40);
    wait_for(Duration::from_secs(30), "100 log records", || {
        (logs(&received(&out)).len() >= 100).then_some(())
    });
    recv.signal(libc::SIGKILL);
    let (_, _, _) = recv.finish(Duration::from_secs(10));
    let killed_at = Instant::now();
    let before = logs(&received(&out)).len();
    let journal_at_kill = journal_seqs(&journal).len();
    std::thread::sleep(Duration::from_secs(30));
    let at_restart = journal_seqs(&journal);
    let during = at_restart.len() - journal_at_kill;
    assert!(
        during >= 300,
        "only {during} events were journaled while the receiver was down"
    );
    let stats = proxy.stats();
    assert!(
        stats["otlp_logs"]["failures"].as_u64().unwrap() > 0,
        "{}",
        stats["otlp_logs"]
    );
    let (_recv2, again) = receiver(&out, &recv_addr.to_string());
    assert_eq!(again, recv_addr);
    let restarted_at = Instant::now();
    // The backlog of the outage goes out while the storm goes on.
    let backlog_last = *at_restart.last().unwrap();
    let backlog_secs = wait_for(Duration::from_secs(30), "the outage's backlog", || {
        let lines = received(&out);
        let seqs: std::collections::HashSet<u64> = logs(&lines)
            .iter()
            .map(|l| l["attributes"]["seq"].as_u64().unwrap())
            .collect();
        (1..=backlog_last)
            .all(|s| seqs.contains(&s))
            .then(|| restarted_at.elapsed().as_secs_f64())
    });
    let done = load_done(load);
    let storm_secs = started.elapsed().as_secs_f64();

    // Every journaled event reaches the receiver; duplicates (a batch sent again whose answer
    // was lost) are allowed, told apart by seq.
    let last = *journal_seqs(&journal).last().unwrap();
    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    wait_for(Duration::from_secs(30), "every seq at the receiver", || {
        let lines = received(&out);
        counts.clear();
        for l in logs(&lines) {
            *counts
                .entry(l["attributes"]["seq"].as_u64().unwrap())
                .or_default() += 1;
        }
        (1..=last).all(|s| counts.contains_key(&s)).then_some(())
    });
    let duplicates: u32 = counts.values().map(|n| n - 1).sum();
    let stats = proxy.stats();
    eprintln!(
        "storm: {:.1} s, calls {}, journal events {last}, received {before} before the kill, \
         {during} journaled during the {:.0} s outage, all {backlog_last} journaled by the restart \
         received {backlog_secs:.1} s after it, {duplicates} duplicates in the end; exporter {}",
        storm_secs,
        done["codes"],
        restarted_at.duration_since(killed_at).as_secs_f64(),
        stats["otlp_logs"],
    );
    assert!(last >= 500, "a storm of only {last} events");
    assert_eq!(stats["otlp_logs"]["rejected"], 0);
    assert_eq!(stats["otlp_logs"]["skipped"], 0);

    // The records: every field an attribute, the call's trace id the record's own.
    let lines = received(&out);
    let logs = logs(&lines);
    let trip = logs
        .iter()
        .find(|l| l["attributes"]["breaker.reason"] == "consecutive_failures")
        .unwrap_or_else(|| panic!("no first trip among {} records", logs.len()));
    let a = &trip["attributes"];
    assert_eq!(a["seq"], 1, "{trip}");
    assert_eq!(a["schema"], "breaker_trip/v1");
    assert_eq!(a["breaker.name"], format!("endpoint svc/{upstream_addr}"));
    assert_eq!(a["breaker.scope"], "endpoint");
    assert_eq!(a["breaker.to"], "open");
    assert_eq!(a["upstream.endpoint"], upstream_addr.to_string());
    assert_eq!(a["stream.method"], "/proxytest.Test/Unary");
    assert_eq!(a["stream.grpc_status"], 14);
    assert_eq!(a["stream.trace_id"], TRACE_ID);
    assert_eq!(trip["trace_id"], TRACE_ID);
    assert_eq!(trip["span_id"], "00f067aa0ba902b7");
    assert_eq!(trip["severity_text"], "WARN");
    assert_eq!(trip["event_name"], "breaker_trip");
    assert_eq!(trip["resource"]["service.name"], "agent");
    let body: Value = serde_json::from_str(trip["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["seq"], 1);
    let reasons: std::collections::BTreeSet<&str> = logs
        .iter()
        .filter_map(|l| l["attributes"]["breaker.reason"].as_str())
        .collect();
    assert!(
        reasons.is_superset(&["consecutive_failures", "open_elapsed", "probe_failed"].into()),
        "{reasons:?}"
    );

    // The metrics, with their attributes.
    let t = metric(
        &lines,
        "agent_breaker_transitions",
        &[
            ("scope", "endpoint"),
            ("to", "open"),
            ("reason", "probe_failed"),
        ],
    )
    .expect("agent_breaker_transitions{to=open,reason=probe_failed}");
    assert!(
        t["monotonic"] == true && t["value"].as_u64().unwrap() > 100,
        "{t}"
    );
    let s = metric(
        &lines,
        "agent_proxy_streams",
        &[
            ("method", "/proxytest.Test/Unary"),
            ("grpc_status", "14"),
            ("ending", "breaker_open"),
        ],
    )
    .expect("agent_proxy_streams{ending=breaker_open}");
    assert!(s["value"].as_u64().unwrap() > 1000, "{s}");
    let h = metric(
        &lines,
        "agent_proxy_stream_duration",
        &[("method", "/proxytest.Test/Unary"), ("grpc_status", "14")],
    )
    .expect("agent_proxy_stream_duration histogram");
    assert_eq!((&h["kind"], &h["unit"]), (&"histogram".into(), &"s".into()));
    assert!(h["count"].as_u64().unwrap() > 1000, "{h}");
    let b = metric(
        &lines,
        "agent_breaker_state",
        &[
            ("scope", "endpoint"),
            ("name", &format!("svc/{upstream_addr}")),
            ("class", "default"),
        ],
    )
    .expect("agent_breaker_state of the endpoint");
    assert_eq!(b["kind"], "gauge");
    let d = metric(
        &lines,
        "agent_events_dropped",
        &[("stage", "journal_lagged")],
    )
    .expect("agent_events_dropped{stage=journal_lagged}");
    assert_eq!(d["value"], 0, "{d}");
    let f = metric(&lines, "agent_otlp_log_export_failures", &[])
        .expect("agent_otlp_log_export_failures");
    assert!(f["value"].as_u64().unwrap() > 0, "{f}");

    let (status, _, stderr) = proxy.terminate(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    // The cursor says what was acknowledged: everything, so a restart sends nothing again.
    let cursor = std::fs::read_to_string(journal.join("otlp.cursor")).unwrap();
    let last = *journal_seqs(&journal).last().unwrap();
    assert_eq!(cursor.trim(), (last + 1).to_string());
    drop(upstream);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET PATH` over HTTP/1.1: status code and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn the_prometheus_endpoint_serves_text_that_promtool_accepts() {
    let dir = temp_dir("prometheus");
    let (upstream, upstream_addr) = grpcio_server();
    let c = grpcio_client(upstream_addr, "control", &["--code", "UNAVAILABLE"]);
    assert!(c.finish(Duration::from_secs(30)).0.success());
    let proxy = agent(
        &dir,
        upstream_addr,
        "[export]\nprometheus_listen = \"127.0.0.1:0\"\n",
    );
    let addr: SocketAddr = proxy.ready["prometheus"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no prometheus address in {}", proxy.ready));
    assert!(addr.ip().is_loopback());
    load_done(storm(proxy.addr, 200, 0));

    let (status, text) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}: it comes with Debian's prometheus package (cargo xtask setup)")
        });
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let result = check.wait_with_output().unwrap();
    assert!(
        result.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    let endpoint = format!("name=\"svc/{upstream_addr}\"");
    for want in [
        "# TYPE agent_breaker_state gauge",
        endpoint.as_str(),
        "# TYPE agent_breaker_transitions_total counter",
        "agent_breaker_transitions_total{reason=\"consecutive_failures\",scope=\"endpoint\",to=\"open\"",
        "# TYPE agent_proxy_streams_total counter",
        "agent_proxy_streams_total{ending=\"breaker_open\",grpc_status=\"14\",method=\"/proxytest.Test/Unary\"",
        "# TYPE agent_proxy_stream_duration_seconds histogram",
        "agent_proxy_stream_duration_seconds_bucket{grpc_status=\"14\",method=\"/proxytest.Test/Unary\"",
        "agent_events_dropped_total{stage=\"journal_lagged\"",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    let (status, _) = http_get(addr, "/other");
    assert_eq!(status, 404);
    let (status, _, stderr) = proxy.terminate(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    drop(upstream);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn otlp_export_without_a_journal_is_refused_with_a_reason() {
    let out = Command::new(e2e::agent_bin())
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--otlp-endpoint",
            "http://127.0.0.1:4317",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("give [events] journal (or --journal DIR) too"),
        "{stderr}"
    );
}
