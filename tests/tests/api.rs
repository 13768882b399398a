//! The status API (`agent.v1.AgentStatus`, issue 7) from the outside: a Python grpcio client
//! generated at run time from `proto/agent/v1/status.proto` (`tests/peers/api/client.py`)
//! calls every method, grpc.health.v1 and reflection answer; watchers resume across a restart
//! with exactly the events they missed; 100 watchers follow a storm of 10,000 trips, each
//! getting every event in order, while a stalled one is told where to resume; admin calls
//! without the token change nothing.
//!
//! Breaker events come from client breakers: every call carries its own expired token and the
//! upstream answers UNAUTHENTICATED, so each call opens one breaker (as in journal_crash.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use e2e::proxy::{
    AgentProxy, JsonChild, config_file, grpcio_client, grpcio_server, journal_files, python,
};
use serde_json::Value;

const ADMIN_TOKEN: &str = "api-e2e-admin-token-5f2c";

/// A test's directory, upstream (answering UNAUTHENTICATED), secret, token and configuration.
struct Setup {
    dir: PathBuf,
    journal: PathBuf,
    secret: PathBuf,
    config: PathBuf,
    _upstream: JsonChild,
}

impl Setup {
    /// `admin`: whether `[api] admin_token_file` is set.
    fn new(name: &str, admin: bool) -> Setup {
        let (upstream, up) = grpcio_server();
        let dir = std::env::temp_dir().join(format!("e2e-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"api-e2e-secret-0123456789abcdef").unwrap();
        let token = dir.join("admin-token");
        // Surrounding white space is not part of the token.
        std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
        let journal = dir.join("journal");
        let api = if admin {
            format!("[api]\nadmin_token_file = {token:?}\n")
        } else {
            String::new()
        };
        let config = config_file(
            &dir,
            &format!(
                r#"[[cluster]]
name = "svc"
endpoints = ["{up}"]
[breakers]
max_clients = 40000
[breakers.client]
consecutive_failures = 1
open_for = "1800s"
max_open_for = "1800s"
[context.jwt]
hmac_secret_file = {secret:?}
[events]
journal = {journal:?}
{api}"#
            ),
        );
        let c = grpcio_client(up, "control", &["--code", "UNAUTHENTICATED"]);
        assert!(c.finish(Duration::from_secs(30)).0.success());
        Setup {
            dir,
            journal,
            secret,
            config,
            _upstream: upstream,
        }
    }

    fn agent(&self) -> Agent {
        let proxy = AgentProxy::start(&[
            "--config",
            self.config.to_str().unwrap(),
            "--print-breakers",
        ]);
        let api = proxy.ready["api"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("ready line without an api address: {}", proxy.ready));
        Agent { proxy, api }
    }

    /// `count` calls through the agent, each another client (subject PREFIX<i>) that trips its
    /// own breaker; running.
    fn storm(&self, agent: &Agent, count: usize, prefix: &str) -> JsonChild {
        grpcio_client(
            agent.proxy.addr,
            "load",
            &[
                "--method",
                "unary",
                "--count",
                &count.to_string(),
                "--concurrency",
                "8",
                "--token-per-call",
                self.secret.to_str().unwrap(),
                "--token-sub-prefix",
                prefix,
                // UNAVAILABLE: the calls of a storm the agent is stopped in the middle of.
                "--expect-codes",
                "UNAUTHENTICATED,UNAVAILABLE",
            ],
        )
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

struct Agent {
    proxy: AgentProxy,
    api: SocketAddr,
}

impl Agent {
    /// Waits until the agent has reported (journaled) the event `seq`.
    fn wait_seq(&mut self, seq: u64, timeout: Duration) {
        self.proxy.process.wait_line(timeout, |l| {
            l["kind"] == "breaker" && l["seq"].as_u64().is_some_and(|s| s >= seq)
        });
    }
}

/// `tests/peers/api/client.py COMMAND ADDR ARGS`, running.
fn api_client(command: &str, addr: SocketAddr, args: &[&str]) -> JsonChild {
    let addr = addr.to_string();
    let mut all = vec![command, addr.as_str()];
    all.extend_from_slice(args);
    JsonChild::spawn(
        &format!("api client {command}"),
        &mut python("api/client.py", &all),
    )
}

/// Runs the client to its end: its lines, the last being `done` (which must say ok).
fn api_ok(command: &str, addr: SocketAddr, args: &[&str]) -> Vec<Value> {
    let (status, lines, stderr) = api_client(command, addr, args).finish(Duration::from_secs(120));
    let done = lines.last().cloned().unwrap_or_default();
    assert!(
        status.success() && done["event"] == "done" && done["ok"] == true,
        "client.py {command} {args:?} failed ({status}): {done}\nlines: {lines:?}\nstderr:\n{stderr}"
    );
    lines
}

/// The line of an event, panicking with every line when there is none.
fn line<'a>(lines: &'a [Value], event: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["event"] == event)
        .unwrap_or_else(|| panic!("no {event:?} line among {lines:?}"))
}

/// An admin call: (grpc code name, the whole line).
fn admin(api: SocketAddr, action: &str, name: &str, token: Option<&str>) -> (String, Value) {
    let mut args = vec![action, name];
    if let Some(t) = token {
        args.extend(["--token", t]);
    }
    let lines = api_ok("admin", api, &args);
    let l = line(&lines, "admin").clone();
    (l["code"].as_str().unwrap().to_owned(), l)
}

/// GetBreaker: the breaker as the API shows it (panics on NOT_FOUND).
fn breaker(api: SocketAddr, name: &str) -> Value {
    let lines = api_ok("breaker", api, &[name]);
    let l = line(&lines, "breaker");
    assert_eq!(l["code"], "OK", "GetBreaker({name:?}): {l}");
    l["breaker"].clone()
}

/// The journal's lines by sequence number, raw (as journaled) and parsed; panics on a line
/// that is not whole JSON or numbers that are not contiguous from 1.
fn journal(dir: &Path) -> BTreeMap<u64, (String, Value)> {
    let mut out = BTreeMap::new();
    for (f, text) in journal_files(dir) {
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{f:?} ends in a torn line"
        );
        for line in text.lines() {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{f:?}: {e}: {line}"));
            out.insert(v["seq"].as_u64().unwrap(), (line.to_owned(), v));
        }
    }
    let seqs: Vec<u64> = out.keys().copied().collect();
    assert!(
        seqs.first().is_none_or(|s| *s == 1) && seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "journal not contiguous from 1: {:?}..{:?} ({} lines)",
        seqs.first(),
        seqs.last(),
        seqs.len()
    );
    out
}

/// sha256 (hex) of the journal lines `from..=to`, each with its newline, as the watch client
/// digests the events it gets (`sha256sum`: the test crate has no hash of its own).
fn journal_sha256(j: &BTreeMap<u64, (String, Value)>, from: u64, to: u64) -> String {
    let mut text = String::new();
    for seq in from..=to {
        let (line, _) = j
            .get(&seq)
            .unwrap_or_else(|| panic!("journal has no event {seq}"));
        text.push_str(line);
        text.push('\n');
    }
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// CLOCK_MONOTONIC in seconds, as Python's `time.monotonic()` reads it.
fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn percentiles(mut xs: Vec<f64>) -> String {
    if xs.is_empty() {
        return "none".into();
    }
    xs.sort_by(f64::total_cmp);
    let at = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize];
    format!(
        "min {:.2} p50 {:.2} p90 {:.2} max {:.2}",
        at(0.0),
        at(0.5),
        at(0.9),
        at(1.0)
    )
}

// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_client_generated_from_the_proto_calls_every_method_health_and_reflection_answer() {
    let setup = Setup::new("methods", true);
    let mut agent = setup.agent();
    let storm = setup.storm(&agent, 3, "m-");
    assert!(storm.finish(Duration::from_secs(60)).0.success());
    agent.wait_seq(3, Duration::from_secs(30));

    // Every method; the admin calls on the cluster's breaker (closed): trip, then reset.
    let lines = api_ok(
        "all-methods",
        agent.api,
        &[
            "--token",
            ADMIN_TOKEN,
            "--breaker",
            "cluster svc",
            "--watch-count",
            "3",
        ],
    );
    let done = line(&lines, "done");
    eprintln!("all-methods: {done}");
    assert_eq!(
        done["methods"],
        serde_json::json!([
            "GetBreaker",
            "GetStatus",
            "ListBreakers",
            "ResetBreaker",
            "TripBreaker",
            "Watch"
        ])
    );
    let status = &line(&lines, "GetStatus")["status"];
    assert_eq!(status["pid"].as_u64(), Some(u64::from(agent.proxy.pid())));
    assert_eq!(status["journal"]["last_seq"], "3", "{status}");
    assert_eq!(
        status["journal"]["dir"].as_str(),
        setup.journal.to_str(),
        "{status}"
    );
    assert_eq!(status["config_sha256"].as_str().map(str::len), Some(64));
    let listed = &line(&lines, "ListBreakers")["breakers"];
    let open: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "open")
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(open.len(), 3, "the three clients' breakers: {listed}");
    assert!(
        open.iter().all(|n| n.starts_with("client sub:m-")),
        "{open:?}"
    );
    assert_eq!(line(&lines, "GetBreaker")["breaker"]["name"], "cluster svc");
    assert_eq!(line(&lines, "GetBreaker-unknown")["code"], "NOT_FOUND");
    let trip = line(&lines, "TripBreaker");
    let reset = line(&lines, "ResetBreaker");
    assert_eq!(
        (&trip["changed"], &trip["state"]),
        (&true.into(), &"open".into())
    );
    assert_eq!(
        (&reset["changed"], &reset["state"]),
        (&true.into(), &"closed".into())
    );

    // Watch from 1 got the journal's first three events, as journaled.
    agent.wait_seq(5, Duration::from_secs(30));
    let j = journal(&setup.journal);
    let watched = line(&lines, "Watch")["events"].as_array().unwrap().clone();
    assert_eq!(watched.len(), 3);
    for e in &watched {
        let (_, v) = &j[&e["seq"].as_u64().unwrap()];
        assert_eq!(e["breaker"], v["breaker"]["name"]);
        assert_eq!(e["to"], v["breaker"]["to"]);
        assert_eq!(e["reason"], v["breaker"]["reason"]);
    }
    // The admin calls journaled their transitions.
    assert_eq!(j.len(), 5, "3 trips and 2 admin transitions");
    for (seq, to) in [(4, "open"), (5, "closed")] {
        let b = &j[&seq].1["breaker"];
        assert_eq!(
            (b["name"].as_str(), b["to"].as_str(), b["reason"].as_str()),
            (Some("cluster svc"), Some(to), Some("admin")),
            "journal event {seq}"
        );
    }

    // grpc.health.v1 (grpcio-health-checking): the server and the service are SERVING.
    let lines = api_ok("health", agent.api, &[]);
    let done = line(&lines, "done");
    eprintln!("health: {}", done["statuses"]);
    assert_eq!(done["statuses"][""], "SERVING");
    assert_eq!(done["statuses"]["agent.v1.AgentStatus"], "SERVING");

    // Reflection, v1alpha (grpcio-reflection) and v1: both list the service and health, and
    // describe the service's six methods.
    let lines = api_ok(
        "reflection",
        agent.api,
        &[
            "--expect",
            "agent.v1.AgentStatus",
            "--expect",
            "grpc.health.v1.Health",
        ],
    );
    let done = line(&lines, "done");
    eprintln!(
        "reflection: {} methods {}",
        done["services"], done["methods"]
    );
    for v in ["v1alpha", "v1"] {
        let list = done["services"][v].as_array().unwrap();
        assert!(
            list.contains(&"agent.v1.AgentStatus".into()),
            "{v}: {list:?}"
        );
        assert!(
            list.contains(&"grpc.health.v1.Health".into()),
            "{v}: {list:?}"
        );
    }
    assert_eq!(done["methods"].as_array().map(Vec::len), Some(6));

    let (status, _, stderr) = agent.proxy.terminate(Duration::from_secs(40));
    assert!(status.success(), "{stderr}");
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_watcher_stopped_with_the_agent_resumes_after_a_restart_with_exactly_the_missed_events() {
    let setup = Setup::new("resume", false);
    let mut agent = setup.agent();
    let first = setup.storm(&agent, 100, "a-");
    assert!(first.finish(Duration::from_secs(60)).0.success());
    agent.wait_seq(100, Duration::from_secs(30));

    // A watcher from 1: what the journal holds, then live events, until the agent stops. It
    // stops reading for 3 s after 150 events (less than the 5 s after which the agent would
    // let it go), so that it is behind when the agent stops.
    let mut watcher = api_client(
        "watch",
        agent.api,
        &[
            "--from",
            "1",
            "--to-end",
            "--print-events",
            "--stall-after",
            "150",
            "--stall-seconds",
            "3",
            "--timeout",
            "120",
        ],
    );
    watcher.wait_line(Duration::from_secs(30), |l| {
        l["event"] == "event" && l["seq"] == 100
    });
    // Live: a storm the agent is stopped in the middle of (SIGTERM), while the watcher does
    // not read and 500 more events than it took were journaled.
    let second = setup.storm(&agent, 3000, "b-");
    watcher.wait_line(Duration::from_secs(60), |l| l["event"] == "stalling");
    agent.wait_seq(650, Duration::from_secs(60));
    let t = Instant::now();
    let (status, _, stderr) = agent.proxy.terminate(Duration::from_secs(60));
    let stopped_in = t.elapsed();
    assert!(status.success(), "{stderr}");
    let _ = second.finish(Duration::from_secs(60));
    let (_, wlines, wstderr) = watcher.finish(Duration::from_secs(30));
    let w = line(&wlines, "watcher").clone();
    let got: Vec<(u64, String)> = wlines
        .iter()
        .filter(|l| l["event"] == "event")
        .map(|l| {
            (
                l["seq"].as_u64().unwrap(),
                l["json"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let k = got.last().unwrap().0;
    let before = journal(&setup.journal);
    let last_before = *before.keys().last().unwrap();
    eprintln!(
        "first run: watcher got 1..={k} ({} events; end {}; problem {}), journal 1..={last_before}, \
         agent stopped in {stopped_in:?}",
        got.len(),
        w["end"],
        w["problem"]
    );
    assert!(w["problem"].is_null(), "{w}\n{wstderr}");
    assert!(k >= 150 && k <= last_before);
    for (i, (seq, json)) in got.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "watcher events out of order");
        assert_eq!(json, &before[seq].0, "event {seq} is not as journaled");
    }

    // Restarted on the same journal; more events; the watcher resumes from k + 1.
    let mut agent = setup.agent();
    let third = setup.storm(&agent, 100, "c-");
    assert!(third.finish(Duration::from_secs(60)).0.success());
    agent.wait_seq(last_before + 100, Duration::from_secs(30));
    let after = journal(&setup.journal);
    let last = *after.keys().last().unwrap();
    assert_eq!(last, last_before + 100);
    let from = (k + 1).to_string();
    let until = last.to_string();
    let lines = api_ok(
        "watch",
        agent.api,
        &["--from", &from, "--until", &until, "--print-events"],
    );
    let resumed: Vec<(u64, String)> = lines
        .iter()
        .filter(|l| l["event"] == "event")
        .map(|l| {
            (
                l["seq"].as_u64().unwrap(),
                l["json"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = after
        .range(k + 1..=last)
        .map(|(s, (l, _))| (*s, l.clone()))
        .collect();
    eprintln!(
        "resumed from {from}: {} events ({}..={}), of which {} journaled before the stop and \
         missed, {} after the restart",
        resumed.len(),
        resumed.first().map_or(0, |e| e.0),
        resumed.last().map_or(0, |e| e.0),
        last_before - k,
        last - last_before
    );
    assert_eq!(resumed.len(), want.len(), "not exactly the missed events");
    assert!(
        resumed == want,
        "the missed events, not in order or not as journaled"
    );

    let (status, _, stderr) = agent.proxy.terminate(Duration::from_secs(40));
    assert!(status.success(), "{stderr}");
}

/// Figures of one storm with its watchers.
struct StormRun {
    /// Per unstalled watcher: seconds from the storm's end to its last event.
    behind: Vec<f64>,
    /// Per unstalled watcher: the largest sampled delay from an event's journal time to its
    /// receipt.
    latency: Vec<f64>,
    storm_s: f64,
    stalled: Option<Value>,
}

/// `CALLS` trips (seq `from`.. on) watched by `WATCHERS` watchers (the first stalled when
/// `stall`); every watcher must get every event in order, as journaled.
fn storm_with_watchers(
    setup: &Setup,
    agent: &mut Agent,
    from: u64,
    prefix: &str,
    stall: bool,
) -> StormRun {
    const CALLS: u64 = 10_000;
    const WATCHERS: usize = 100;
    let from_s = from.to_string();
    let count = CALLS.to_string();
    let watchers = WATCHERS.to_string();
    let mut args = vec![
        "--from",
        &from_s,
        "--count",
        &count,
        "--watchers",
        &watchers,
        "--latency",
        "--timeout",
        "600",
    ];
    if stall {
        // Stops reading after 100 events for 15 s (the agent lets it go after 5 s), reads what
        // was sent, checks `lagged` says the next seq due, and watches again from there.
        args.extend([
            "--stall-after",
            "100",
            "--stall-seconds",
            "15",
            "--resume-on-lag",
        ]);
    }
    let mut watch = api_client("watch", agent.api, &args);
    watch.wait_line(Duration::from_secs(60), |l| l["event"] == "connected");
    // The streams are open before the first event.
    std::thread::sleep(Duration::from_millis(500));
    let started = monotonic();
    let storm = setup.storm(agent, CALLS as usize, prefix);
    let (status, slines, serr) = storm.finish(Duration::from_secs(600));
    let storm_end = monotonic();
    assert!(status.success(), "storm: {:?}\n{serr}", slines.last());
    let (status, lines, stderr) = watch.finish(Duration::from_secs(600));
    let done = lines.last().cloned().unwrap_or_default();
    let results: Vec<&Value> = lines.iter().filter(|l| l["event"] == "watcher").collect();
    assert!(
        status.success() && done["ok"] == true,
        "watchers: {done}\n{:?}\nstderr:\n{stderr}",
        results
            .iter()
            .filter(|r| !r["problem"].is_null())
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(results.len(), WATCHERS);

    // Every event the storm made is in the journal, and every watcher got them all, in order
    // and as journaled (the same sha256 over the lines).
    agent.wait_seq(from + CALLS - 1, Duration::from_secs(60));
    let j = journal(&setup.journal);
    let last = from + CALLS - 1;
    assert_eq!(j.keys().last(), Some(&last), "one event per call");
    let trips = j
        .range(from..=last)
        .filter(|(_, (_, v))| v["breaker"]["to"] == "open")
        .count();
    assert_eq!(trips as u64, CALLS);
    let want = journal_sha256(&j, from, last);
    for r in &results {
        assert_eq!(
            (r["first"].as_u64(), r["last"].as_u64(), r["count"].as_u64()),
            (Some(from), Some(last), Some(CALLS)),
            "{r}"
        );
        assert_eq!(
            r["sha256"],
            want.as_str(),
            "watcher's events differ from the journal: {r}"
        );
    }
    let stalled = results
        .iter()
        .find(|r| r["stalled"] == true)
        .map(|r| (*r).clone());
    let others = results.iter().filter(|r| r["stalled"] == false);
    StormRun {
        behind: others
            .clone()
            .map(|r| f(&r["last_t"]) - storm_end)
            .collect(),
        latency: others.map(|r| f(&r["max_latency_s"])).collect(),
        storm_s: storm_end - started,
        stalled,
    }
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_hundred_watchers_follow_a_storm_of_10000_trips_in_order_and_a_stalled_one_is_told_where_to_resume()
 {
    let setup = Setup::new("storm", false);
    let mut agent = setup.agent();

    // With one watcher stalled.
    let with = storm_with_watchers(&setup, &mut agent, 1, "s-", true);
    let stalled = with.stalled.clone().expect("a stalled watcher's line");
    let lagged = stalled["lagged"].as_array().unwrap();
    eprintln!(
        "storm 1 (10,000 trips in {:.1} s, 100 watchers, 1 stalled after 100 events for 15 s):\n  \
         99 others finished behind the storm's end by {}\n  their largest delay journal->receipt {}\n  \
         stalled: lagged {}, {} streams, {} events",
        with.storm_s,
        percentiles(with.behind.clone()),
        percentiles(with.latency.clone()),
        stalled["lagged"],
        stalled["streams"],
        stalled["count"]
    );
    assert_eq!(lagged.len(), 1, "one lagged message: {stalled}");
    let resume = lagged[0]["resume_from_seq"].as_u64().unwrap();
    let after = lagged[0]["after"].as_u64().unwrap();
    // The next event due after what it had taken (the client checks the same), and only after
    // it had read what was already on its way when it stopped.
    assert_eq!(resume, after + 1, "{stalled}");
    assert!(after > 100, "{stalled}");
    assert_eq!(
        stalled["streams"], 2,
        "it watched again from {resume}: {stalled}"
    );

    // The same without a stalled watcher, for comparison.
    let without = storm_with_watchers(&setup, &mut agent, 10_001, "t-", false);
    eprintln!(
        "storm 2 (10,000 trips in {:.1} s, 100 watchers, none stalled):\n  \
         finished behind the storm's end by {}\n  largest delay journal->receipt {}",
        without.storm_s,
        percentiles(without.behind.clone()),
        percentiles(without.latency.clone()),
    );
    // The stalled watcher held no one up: the others kept the pace of the run without it (the
    // watchers share one Python process and two cores with the agent and the storm, so the
    // figures are the client's pace; the allowance is for that noise).
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let (a, b) = (median(with.behind), median(without.behind));
    assert!(
        a <= 1.5 * b.max(1.0) + 5.0,
        "with a stalled watcher the others finished {a:.2} s after the storm (median), without \
         {b:.2} s"
    );

    let (status, _, stderr) = agent.proxy.terminate(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn admin_calls_without_the_right_token_change_nothing_and_with_it_trip_and_reset() {
    let setup = Setup::new("admin", true);
    let mut agent = setup.agent();
    let storm = setup.storm(&agent, 1, "x-");
    assert!(storm.finish(Duration::from_secs(60)).0.success());
    agent.wait_seq(1, Duration::from_secs(30));
    let client = "client sub:x-0";
    let cluster = "cluster svc";
    assert_eq!(breaker(agent.api, client)["state"], "open");
    assert_eq!(breaker(agent.api, cluster)["state"], "closed");
    let journaled = journal(&setup.journal).len();
    assert_eq!(journaled, 1);

    // Refused: no token, a wrong one, the right one less its last byte; trip and reset.
    let mut refused = Vec::new();
    for (token, code) in [
        (None, "UNAUTHENTICATED"),
        (Some("wrong-token"), "PERMISSION_DENIED"),
        (
            Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
            "PERMISSION_DENIED",
        ),
    ] {
        for (action, name) in [("trip", cluster), ("reset", client)] {
            let (got, l) = admin(agent.api, action, name, token);
            assert_eq!(got, code, "{action} {name:?} with token {token:?}: {l}");
            refused.push(format!("{action}/{}: {got}", token.unwrap_or("none")));
        }
    }
    eprintln!("refused: {refused:?}");
    // Nothing changed: states, the journal, what the agent reported.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(breaker(agent.api, client)["state"], "open");
    assert_eq!(breaker(agent.api, cluster)["state"], "closed");
    assert_eq!(
        journal(&setup.journal).len(),
        journaled,
        "a refused call journaled"
    );
    let reported = agent
        .proxy
        .process
        .drain()
        .iter()
        .filter(|l| l["kind"] == "breaker")
        .count();
    assert_eq!(reported, 1, "a refused call made a transition");

    // With the token: trip the cluster's breaker, reset it, reset the client's.
    let (code, l) = admin(agent.api, "trip", cluster, Some(ADMIN_TOKEN));
    assert_eq!((code.as_str(), &l["changed"]), ("OK", &true.into()), "{l}");
    assert_eq!(l["breaker"]["state"], "open");
    assert_eq!(breaker(agent.api, cluster)["state"], "open");
    let (code, l) = admin(agent.api, "reset", cluster, Some(ADMIN_TOKEN));
    assert_eq!((code.as_str(), &l["changed"]), ("OK", &true.into()), "{l}");
    assert_eq!(breaker(agent.api, cluster)["state"], "closed");
    // Already closed: nothing to change, nothing journaled.
    let (code, l) = admin(agent.api, "reset", cluster, Some(ADMIN_TOKEN));
    assert_eq!((code.as_str(), &l["changed"]), ("OK", &false.into()), "{l}");
    let (code, l) = admin(agent.api, "reset", client, Some(ADMIN_TOKEN));
    assert_eq!((code.as_str(), &l["changed"]), ("OK", &true.into()), "{l}");
    assert_eq!(breaker(agent.api, client)["state"], "closed");
    let (code, _) = admin(agent.api, "trip", "no such breaker", Some(ADMIN_TOKEN));
    assert_eq!(code, "NOT_FOUND");

    agent.wait_seq(4, Duration::from_secs(30));
    let j = journal(&setup.journal);
    let admin_events: Vec<(String, String, String, String)> = j
        .range(2..)
        .map(|(_, (_, v))| {
            let b = &v["breaker"];
            let s = |k: &str| b[k].as_str().unwrap_or_default().to_owned();
            (s("name"), s("from"), s("to"), s("reason"))
        })
        .collect();
    eprintln!("journaled admin transitions: {admin_events:?}");
    let e = |n: &str, f: &str, t: &str| (n.into(), f.into(), t.into(), "admin".into());
    assert_eq!(
        admin_events,
        vec![
            e(cluster, "closed", "open"),
            e(cluster, "open", "closed"),
            e(client, "open", "closed"),
        ]
    );
    let (status, _, stderr) = agent.proxy.terminate(Duration::from_secs(40));
    assert!(status.success(), "{stderr}");

    // An agent without [api] admin_token_file refuses every admin call, token or not.
    let setup = Setup::new("admin-off", false);
    let agent = setup.agent();
    for token in [None, Some(ADMIN_TOKEN)] {
        let (code, l) = admin(agent.api, "trip", cluster, token);
        assert_eq!(code, "PERMISSION_DENIED", "{l}");
    }
    assert_eq!(breaker(agent.api, cluster)["state"], "closed");
    let (status, _, stderr) = agent.proxy.terminate(Duration::from_secs(40));
    assert!(status.success(), "{stderr}");
}
