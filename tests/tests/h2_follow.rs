//! The HTTP/2 tracker beyond clean new connections: picking up a connection that was open
//! before the agent started, and the rapid-reset (CVE-2023-44487) signal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use e2e::{Peer, Trace, json_lines, of_kind, workspace_root};
use serde_json::Value;
use test_support::h2load;

fn nghttpd(ip: &str) -> (Peer, SocketAddr) {
    let dir = workspace_root().join("target/e2e-h2-follow");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("page"), "x".repeat(20_000)).unwrap();
    e2e::nghttpd(ip, &dir)
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
    let mut stdin = client.child().stdin.take().unwrap();
    let mut lines = BufReader::new(client.child().stdout.take().unwrap()).lines();
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
    let _ = client.process.wait();
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
    let parsed = h2load::parse(&summary).unwrap_or_else(|| panic!("h2load said:\n{summary}"));
    if let Err(e) = parsed.all_succeeded(Some(20000)) {
        panic!("{e}\n{summary}");
    }
    trace.wait_for(Duration::from_millis(500), |_| false);
    let false_alarms = of_kind(&trace.events, "rapid_reset").count();
    assert_eq!(false_alarms, 0, "rapid_reset during h2load");

    // 1000 open-and-reset pairs a second on one connection.
    let out = h2client(web, &["--rapid-reset", "1000", "--duration", "2"])
        .output()
        .unwrap();
    let log: Vec<Value> = json_lines(&out.stdout);
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

/// Runs `hostile.py CASE` against `server`; returns its log and the client address.
fn hostile(server: SocketAddr, case: &str, extra: &[&str]) -> (Vec<Value>, SocketAddr) {
    let out = Command::new("python3")
        .arg(workspace_root().join("tests/peers/h2py/hostile.py"))
        .arg(server.ip().to_string())
        .arg(server.port().to_string())
        .arg(case)
        .args(extra)
        .output()
        .unwrap();
    let log: Vec<Value> = json_lines(&out.stdout);
    let client = log
        .iter()
        .find(|v| v["event"] == "connected")
        .unwrap_or_else(|| panic!("hostile.py {case}: {log:?}"))["local"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (log, client)
}

/// Hostile and awkward bytes: valid frames written a byte per segment, or hundreds in one
/// segment, or zero-length, are followed exactly; garbage and 16 MiB length fields mark the
/// flow lost (counted); a non-HTTP/2 client yields no frames. The server keeps serving, the
/// agent keeps running, and a clean connection afterwards is still followed exactly.
#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn hostile_bytes_are_followed_or_counted_never_harmful() {
    let (_server, web) = nghttpd("127.0.0.1");
    let mut trace = Trace::start(&["--probes", "h2-frames", "--all-frames"]);
    let client_frames = |events: &[Value], client: SocketAddr| -> Vec<(u64, u64, u64)> {
        of_kind(events, "h2_frame")
            .filter(|e| e["src"] == client.to_string())
            .map(|e| {
                (
                    e["type_id"].as_u64().unwrap(),
                    e["flags"].as_u64().unwrap(),
                    e["stream_id"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    // A truncated frame's header is on the wire, so it is reported; its missing payload only
    // shows when the connection ends. Garbage (malformed, no frame header) never counts.
    let logged = |log: &[Value]| -> Vec<(u64, u64, u64)> {
        log.iter()
            .filter(|v| {
                v["dir"] == "send"
                    && v["type_id"].is_u64()
                    && (v["malformed"] != true || v["truncated"] == true)
            })
            .map(|v| {
                (
                    v["type_id"].as_u64().unwrap(),
                    v["flags"].as_u64().unwrap(),
                    v["stream"].as_u64().unwrap(),
                )
            })
            .collect()
    };

    let mut report = Vec::new();
    for (case, extra) in [
        ("split", &[][..]),
        // The preface itself one byte per segment: recognised piece by piece.
        ("split", &["--split-preface"][..]),
        ("coalesced", &["--count", "500"][..]),
        ("zero-length", &["--valid-only"][..]),
        ("truncated-headers", &[][..]),
    ] {
        let (log, client) = hostile(web, case, extra);
        let want = logged(&log);
        assert!(!want.is_empty(), "{case}: nothing logged");
        let ok = trace.wait_for(Duration::from_secs(5), |ev| {
            client_frames(ev, client) == want
        });
        if !ok {
            let got = client_frames(&trace.events, client);
            let out = trace.stop();
            let mut h2 = out.summary["probes"]["h2-frames"].clone();
            let flows: Vec<Value> = h2["flows"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["src"] == client.to_string() || f["dst"] == client.to_string())
                .cloned()
                .collect();
            h2["flows"] = flows.into();
            let flow_events: Vec<&Value> = of_kind(&out.events, "h2_flow")
                .filter(|e| e["src"] == client.to_string() || e["dst"] == client.to_string())
                .collect();
            panic!(
                "{case} {extra:?}: client sent {} frames {want:?}\nagent reported {} {got:?}\nkernel counters and this client's flows: {h2}\nflow events: {flow_events:?}",
                want.len(),
                got.len(),
            );
        }
        if extra.contains(&"--split-preface") {
            let preface = of_kind(&trace.events, "h2_flow")
                .any(|e| e["src"] == client.to_string() && e["change"] == "preface");
            assert!(
                preface,
                "{case} {extra:?}: preface in pieces not recognised"
            );
        }
        report.push(format!(
            "{case} {extra:?}: {} frames followed exactly",
            want.len()
        ));
    }

    for (case, extra) in [("garbage", &["--seed", "7"][..]), ("huge-length", &[][..])] {
        let (_log, client) = hostile(web, case, extra);
        let ok = trace.wait_for(Duration::from_secs(5), |ev| {
            of_kind(ev, "h2_flow").any(|e| e["src"] == client.to_string() && e["change"] == "lost")
        });
        assert!(ok, "{case}: the client's flow was not marked lost");
        report.push(format!(
            "{case}: flow lost, {} frames reported before it",
            client_frames(&trace.events, client).len()
        ));
    }

    // An HTTP/1.1 client; and one that starts like a preface, a byte per segment, then is
    // not one (the candidate flow must be dropped, not reported).
    for case in ["not-h2", "near-miss"] {
        let (_log, client) = hostile(web, case, &[]);
        trace.wait_for(Duration::from_millis(300), |_| false);
        assert!(
            client_frames(&trace.events, client).is_empty(),
            "{case}: frames reported for a client that does not speak HTTP/2"
        );
        let started = of_kind(&trace.events, "h2_flow")
            .any(|e| e["src"] == client.to_string() && e["change"] == "preface");
        assert!(!started, "{case}: a preface reported");
        report.push(format!("{case}: no flow, no frames"));
    }

    // Still serving, still followed exactly.
    let out = h2client(web, &["--requests", "3", "--path", "/page"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "server no longer serves after the hostile cases"
    );
    let log: Vec<Value> = json_lines(&out.stdout);
    let client: SocketAddr = log[0]["local"].as_str().unwrap().parse().unwrap();
    let want = logged(&log);
    let ok = trace.wait_for(Duration::from_secs(5), |ev| {
        client_frames(ev, client) == want
    });
    assert!(
        ok,
        "clean connection after the hostile ones not followed exactly"
    );

    let out = trace.stop();
    let h2 = &out.summary["probes"]["h2-frames"];
    eprintln!(
        "{}\nsummary counters: lost {} not followed {}",
        report.join("\n"),
        h2["lost"],
        h2["segments_not_followed"]
    );
    assert!(h2["lost"]["oversize"].as_u64().unwrap() >= 2, "{h2}");
    assert_eq!(h2["dropped_in_kernel"], 0);
}

/// Under h2load (200,000 gRPC requests, 50 connections, 100 streams each) the tracker
/// follows at least 99.9% of the frames that make up the requests and responses, and any
/// frame it did not follow shows up in its loss counters.
#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn h2load_against_grpc_go_is_followed() {
    let (_server, addr) = e2e::grpc_server("127.0.0.1", &[]);
    let body = workspace_root().join("target/e2e-h2-follow/grpc-32.bin");
    std::fs::create_dir_all(body.parent().unwrap()).unwrap();
    let mut framed = vec![0u8, 0, 0, 0, 32];
    framed.extend([7u8; 32]);
    std::fs::write(&body, framed).unwrap();

    let trace = Trace::start(&["--probes", "h2-frames"]);
    let requests: u64 = 200_000;
    let out = Command::new("h2load")
        .args(["-n", &requests.to_string(), "-c", "50", "-m", "100"])
        .args([
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
        ])
        .arg(&body)
        .arg(format!("http://{addr}/test.Echo/Unary"))
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let parsed = h2load::parse(&text).unwrap_or_else(|| panic!("h2load said:\n{text}"));
    if let Err(e) = parsed.all_succeeded(Some(requests)) {
        panic!("{e}\n{text}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let summary = trace.stop().summary;
    let h2 = &summary["probes"]["h2-frames"];
    let mut seen = std::collections::BTreeMap::<(&str, &str), u64>::new();
    for flow in h2["flows"].as_array().unwrap() {
        let dir = if flow["dst"] == addr.to_string() {
            "client"
        } else if flow["src"] == addr.to_string() {
            "server"
        } else {
            continue;
        };
        for (t, n) in flow["frames"].as_object().unwrap() {
            let t: &str = match t.as_str() {
                "HEADERS" => "HEADERS",
                "DATA" => "DATA",
                _ => continue,
            };
            *seen.entry((dir, t)).or_default() += n.as_u64().unwrap();
        }
    }
    // Every unary call: client HEADERS + DATA(END_STREAM); server HEADERS, DATA, trailers.
    let expected = [
        (("client", "HEADERS"), requests),
        (("client", "DATA"), requests),
        (("server", "HEADERS"), 2 * requests),
        (("server", "DATA"), requests),
    ];
    let total_expected: u64 = expected.iter().map(|(_, n)| n).sum();
    let total_seen: u64 = expected
        .iter()
        .map(|(k, _)| seen.get(k).copied().unwrap_or(0))
        .sum();
    let ratio = total_seen as f64 / total_expected as f64;
    let lost: u64 = ["gap", "oversize", "budget", "unreadable"]
        .iter()
        .map(|r| h2["lost"][r].as_u64().unwrap())
        .sum();
    eprintln!(
        "h2load: {total_seen}/{total_expected} request/response frames followed ({:.4}%); by kind {seen:?}; losses {lost}, segments not followed {}, segments {}",
        ratio * 100.0,
        h2["segments_not_followed"],
        h2["segments"]
    );
    assert!(ratio >= 0.999, "{ratio}");
    assert!(
        total_seen == total_expected || lost > 0,
        "frames missing but no loss counted: {h2}"
    );
}
