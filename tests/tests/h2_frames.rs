//! HTTP/2 frames on the wire: for each connection of a corpus, the frames `agent trace
//! --probes h2-frames --all-frames` reports equal, per direction and type, the frames the
//! client itself logged sending and receiving: `nghttp -nv` against `nghttpd` and against a
//! grpc-go server built from Debian's sources, over IPv4 and IPv6.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use e2e::{
    Trace, WireFrame, grpc_server, json_lines, nghttpd, of_kind, parse_nghttp, workspace_root,
};
use serde_json::Value;
use test_support::supervised::{Supervised, Supervision};

/// (direction as the client saw it: "send" / "recv", frame type) -> frames.
type Counts = BTreeMap<(String, String), u64>;

fn counts(frames: &[WireFrame]) -> Counts {
    let mut c = Counts::new();
    for f in frames {
        *c.entry((f.dir.clone(), f.frame_type.clone())).or_default() += 1;
    }
    c
}

/// The agent's frames on connections to `server`, as the client would count them, with the
/// client address of each connection.
fn reported(events: &[Value], server: SocketAddr) -> BTreeMap<SocketAddr, (Counts, Vec<Value>)> {
    let mut out: BTreeMap<SocketAddr, (Counts, Vec<Value>)> = BTreeMap::new();
    for e in of_kind(events, "h2_frame") {
        let src: SocketAddr = e["src"].as_str().unwrap().parse().unwrap();
        let dst: SocketAddr = e["dst"].as_str().unwrap().parse().unwrap();
        let (client, dir) = if dst == server {
            (src, "send")
        } else if src == server {
            (dst, "recv")
        } else {
            continue;
        };
        let entry = out.entry(client).or_default();
        *entry
            .0
            .entry((dir.to_owned(), e["type"].as_str().unwrap().to_owned()))
            .or_default() += 1;
        entry.1.push(e.clone());
    }
    // Connections that sent nothing are not clients' (e.g. the harness checking that the
    // server listens: the server still sends its SETTINGS on it).
    out.retain(|_, (c, _)| c.keys().any(|(dir, _)| dir == "send"));
    out
}

/// Frames from the JSON-lines log of `tests/peers/h2py/h2client.py`.
fn parse_h2py(out: &str) -> Vec<WireFrame> {
    json_lines(out.as_bytes())
        .into_iter()
        .filter(|v| v["dir"].is_string() && v["type_id"].is_u64())
        .map(|v| WireFrame {
            dir: v["dir"].as_str().unwrap().to_owned(),
            frame_type: v["type"].as_str().unwrap().to_owned(),
            flags: v["flags"].as_u64().unwrap(),
            stream: v["stream"].as_u64().unwrap(),
            length: v["length"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// The client that logs its own frames.
enum Client {
    /// `nghttp -nv ARGS`
    Nghttp(Vec<String>),
    /// `python3 tests/peers/h2py/h2client.py ARGS`
    H2py(Vec<String>),
}

struct Case<'a> {
    name: String,
    server: SocketAddr,
    client: Client,
    /// Runs while the client is connected (e.g. stop the server for a GOAWAY).
    during: Option<Box<dyn FnOnce() + 'a>>,
}

/// Runs the client for one case, waits for the agent to report the connection, and returns
/// (client's frames, agent's frames for that connection) or a description of the mismatch.
fn run_case(trace: &mut Trace, case: Case<'_>) -> Result<(Vec<WireFrame>, Vec<Value>), String> {
    let before = trace.events.len();
    let (mut cmd, parse): (Command, fn(&str) -> Vec<WireFrame>) = match &case.client {
        Client::Nghttp(args) => {
            let mut c = Command::new("nghttp");
            c.arg("-nv").args(args);
            (c, parse_nghttp)
        }
        Client::H2py(args) => {
            let mut c = Command::new("python3");
            c.arg(workspace_root().join("tests/peers/h2py/h2client.py"))
                .args(args);
            (c, parse_h2py)
        }
    };
    // Killed if `during` fails the test before the client is waited for.
    let mut child = Supervised::spawn(
        "client",
        cmd.stdout(Stdio::piped()).stderr(Stdio::null()),
        Supervision::KILL,
    )
    .unwrap_or_else(|e| {
        panic!(
            "run the client (nghttp2-client and python3-h2; cargo xtask setup installs them): {e}"
        )
    });
    let stdout = child.child_mut().stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            text.push_str(&line.unwrap_or_default());
            text.push('\n');
        }
        text
    });
    if let Some(during) = case.during {
        during();
    }
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    let truth = parse(&out);
    if truth.is_empty() {
        return Err(format!(
            "{}: the client logged no frames ({status}):\n{out}",
            case.name
        ));
    }
    let server = case.server;
    trace.wait_for(Duration::from_secs(5), |events| {
        matches(&truth, &reported(&events[before..], server)).is_ok()
    });
    let got = reported(&trace.events[before..], server);
    match matches(&truth, &got) {
        Ok(events) => Ok((truth, events)),
        Err(why) => Err(format!(
            "{}: {why}\n  client: {:?}\n  agent:  {:?}",
            case.name,
            counts(&truth),
            got.values().map(|(c, _)| c).collect::<Vec<_>>()
        )),
    }
}

/// (type, flags, stream) of each frame in one direction, in order.
fn sequence<'a>(frames: impl Iterator<Item = &'a WireFrame>) -> Vec<(String, u64, u64)> {
    frames
        .map(|f| (f.frame_type.clone(), f.flags, f.stream))
        .collect()
}

/// The agent saw exactly one client connection, and on it exactly the frames the client
/// sent, in order, and the frames it received, in order. The one allowance: frames the
/// server sent after the client stopped reading (it closes once its streams are done) are on
/// the wire, so the agent reports them, but no client can log them; they may only follow,
/// never precede or replace, what the client read.
fn matches(
    truth: &[WireFrame],
    got: &BTreeMap<SocketAddr, (Counts, Vec<Value>)>,
) -> Result<Vec<Value>, String> {
    if got.len() != 1 {
        return Err(format!("{} client connections reported, want 1", got.len()));
    }
    let events = &got.values().next().unwrap().1;
    let as_wire = |dir: &str| -> Vec<WireFrame> {
        events
            .iter()
            .filter(|e| (e["sender"] == "client") == (dir == "send"))
            .map(|e| WireFrame {
                dir: dir.to_owned(),
                frame_type: e["type"].as_str().unwrap().to_owned(),
                flags: e["flags"].as_u64().unwrap(),
                stream: e["stream_id"].as_u64().unwrap(),
                length: e["length"].as_u64().unwrap(),
            })
            .collect()
    };
    let (sent, received) = (as_wire("send"), as_wire("recv"));
    let want_sent = sequence(truth.iter().filter(|f| f.dir == "send"));
    let want_received = sequence(truth.iter().filter(|f| f.dir == "recv"));
    if sequence(sent.iter()) != want_sent {
        return Err("client-sent frames differ".into());
    }
    let got_received = sequence(received.iter());
    if !got_received.starts_with(&want_received) {
        return Err("server-sent frames differ".into());
    }
    Ok(events.clone())
}

fn record(
    failures: &mut Vec<String>,
    passed: &mut Vec<String>,
    result: Result<(Vec<WireFrame>, Vec<Value>), String>,
    name: &str,
) {
    match result {
        Ok((truth, _)) => passed.push(format!("{name}: {} frames", truth.len())),
        Err(e) => failures.push(e),
    }
}

fn grpc_body(path: &Path, payload_len: usize) -> PathBuf {
    // gRPC message framing: compressed flag, 4-byte big-endian length, payload.
    let mut body = vec![0u8];
    body.extend((payload_len as u32).to_be_bytes());
    body.extend((0..payload_len).map(|i| (i % 251) as u8));
    std::fs::write(path, body).unwrap();
    path.to_owned()
}

fn url(server: SocketAddr, path: &str) -> String {
    format!("http://{server}{path}")
}

fn scratch() -> PathBuf {
    let dir = workspace_root().join("target/e2e-h2");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn frames_match_nghttp_for_every_connection_of_the_corpus() {
    let dir = scratch();
    std::fs::write(dir.join("index.html"), "<html>hello</html>\n".repeat(500)).unwrap();
    for name in ["a", "b", "c"] {
        std::fs::write(dir.join(name), name.repeat(3000)).unwrap();
    }
    let big = dir.join("big.bin");
    std::fs::write(&big, vec![7u8; 1 << 20]).unwrap();
    let grpc_small = grpc_body(&dir.join("grpc-small.bin"), 32);
    let grpc_big = grpc_body(&dir.join("grpc-big.bin"), 1 << 20);
    let grpc_reset = grpc_body(&dir.join("grpc-reset.bin"), 300 * 1024);
    let grpc = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let mut trace = Trace::start(&["--probes", "h2-frames", "--all-frames"]);
    let mut failures = Vec::new();
    let mut passed = Vec::new();

    for ip in ["127.0.0.1", "::1"] {
        let (_nghttpd, web) = nghttpd(ip, &dir);
        let (mut grpc_peer, g) = grpc_server(ip, &["-static-window", "-max-streams", "128"]);
        let big_s = big.to_str().unwrap();
        let cases: Vec<(&str, SocketAddr, Vec<String>)> = vec![
            ("nghttpd GET", web, s(&[&url(web, "/index.html")])),
            (
                "nghttpd three GETs",
                web,
                s(&[&url(web, "/a"), &url(web, "/b"), &url(web, "/c")]),
            ),
            (
                "nghttpd POST 1 MiB",
                web,
                s(&["-d", big_s, &url(web, "/index.html")]),
            ),
            (
                "nghttpd 100 concurrent streams",
                web,
                s(&["-m", "100", &url(web, "/a")]),
            ),
            (
                "grpc unary",
                g,
                grpc(&[
                    "-d",
                    grpc_small.to_str().unwrap(),
                    &url(g, "/test.Echo/Unary"),
                ]),
            ),
            (
                "grpc unary 1 MiB",
                g,
                grpc(&[
                    "-d",
                    grpc_big.to_str().unwrap(),
                    &url(g, "/test.Echo/Unary"),
                ]),
            ),
            (
                "grpc 100 concurrent streams",
                g,
                grpc(&[
                    "-m",
                    "100",
                    "-d",
                    grpc_small.to_str().unwrap(),
                    &url(g, "/test.Echo/Unary"),
                ]),
            ),
            (
                "grpc server RST_STREAM",
                g,
                grpc(&[
                    "-d",
                    grpc_reset.to_str().unwrap(),
                    &url(g, "/test.Echo/Reset"),
                ]),
            ),
            ("grpc plain GET (server resets it)", g, s(&[&url(g, "/")])),
        ];
        for (name, server, args) in cases {
            let name = format!("{name} [{ip}]");
            let result = run_case(
                &mut trace,
                Case {
                    name: name.clone(),
                    server,
                    client: Client::Nghttp(args),
                    during: None,
                },
            );
            if let Ok((_, events)) = &result
                && name.starts_with("grpc server RST_STREAM")
                && !events
                    .iter()
                    .any(|e| e["type"] == "RST_STREAM" && e["sender"] == "server")
            {
                failures.push(format!("{name}: no server RST_STREAM reported"));
            }
            record(&mut failures, &mut passed, result, &name);
        }

        // The server's SETTINGS carry MAX_CONCURRENT_STREAMS=128, with its value.
        let settings_ok = of_kind(&trace.events, "h2_frame").any(|e| {
            e["src"] == g.to_string()
                && e["type"] == "SETTINGS"
                && e["settings"].as_array().is_some_and(|s| {
                    s.iter()
                        .any(|p| p["name"] == "MAX_CONCURRENT_STREAMS" && p["value"] == 128)
                })
        });
        if !settings_ok {
            failures.push(format!(
                "[{ip}] no server SETTINGS with MAX_CONCURRENT_STREAMS=128"
            ));
        }

        // GOAWAY at server shutdown: a slow call in flight while the server stops gracefully.
        let (slow_peer, slow) = grpc_server(ip, &["-slow", "1s"]);
        let stop = || {
            std::thread::sleep(Duration::from_millis(400));
            slow_peer.signal(libc::SIGTERM);
        };
        let name = format!("grpc GOAWAY at shutdown [{ip}]");
        let result = run_case(
            &mut trace,
            Case {
                name: name.clone(),
                server: slow,
                client: Client::Nghttp(grpc(&[
                    "-d",
                    grpc_small.to_str().unwrap(),
                    &url(slow, "/test.Echo/Slow"),
                ])),
                during: Some(Box::new(stop)),
            },
        );
        if let Ok((truth, _)) = &result
            && !truth
                .iter()
                .any(|f| f.dir == "recv" && f.frame_type == "GOAWAY")
        {
            failures.push(format!("{name}: nghttp saw no GOAWAY (test setup)"));
        }
        record(&mut failures, &mut passed, result, &name);

        // A client cancel: RST_STREAM(CANCEL) once the response has started (nghttp cannot
        // cancel a stream, so the h2-library client, which logs every frame, is the truth).
        let name = format!("client cancel [{ip}]");
        let result = run_case(
            &mut trace,
            Case {
                name: name.clone(),
                server: web,
                client: Client::H2py(s(&[
                    ip,
                    &web.port().to_string(),
                    "--cancel",
                    "--path",
                    "/big.bin",
                ])),
                during: None,
            },
        );
        if let Ok((_, events)) = &result
            && !events.iter().any(|e| {
                e["type"] == "RST_STREAM" && e["sender"] == "client" && e["error"] == "CANCEL"
            })
        {
            failures.push(format!("{name}: no client RST_STREAM(CANCEL) reported"));
        }
        record(&mut failures, &mut passed, result, &name);
        grpc_peer.process.kill();
    }

    let out = trace.stop();
    let h2 = &out.summary["probes"]["h2-frames"];
    eprintln!("{}", passed.join("\n"));
    eprintln!("summary: {h2}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(h2["dropped_in_kernel"], 0, "{h2}");
    for reason in ["gap", "oversize", "budget", "unreadable"] {
        assert_eq!(
            h2["lost"][reason], 0,
            "flows lost ({reason}) on clean traffic: {h2}"
        );
    }
}
