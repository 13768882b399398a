//! The journal under a storm of breaker trips, with `kill -9` in the middle of it: each of
//! 10,000 calls is another client (its own expired token) that an upstream answers
//! UNAUTHENTICATED, so each opens its own client breaker. The agent is killed while it
//! journals; every event it had reported (printed after the journal wrote it) must be in the
//! journal after a restart, unchanged, with contiguous sequence numbers and no torn line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, time::Duration};

use e2e::proxy::{AgentProxy, config_file, grpcio_client, grpcio_server, journal_files};
use serde_json::Value;

const CALLS: usize = 10_000;
/// Reported events before the kill.
const KILL_AFTER: usize = 3_000;

fn agent(config: &std::path::Path) -> AgentProxy {
    AgentProxy::start(&["--config", config.to_str().unwrap(), "--print-breakers"])
}

/// The reported events among the agent's lines, by sequence number, without the `kind` tag.
fn reported(lines: &[Value]) -> BTreeMap<u64, Value> {
    lines
        .iter()
        .filter(|l| l["kind"] == "breaker")
        .map(|l| {
            let mut e = l.clone();
            e.as_object_mut().unwrap().remove("kind");
            (e["seq"].as_u64().unwrap(), e)
        })
        .collect()
}

/// Every journal line, parsed; panics on a line that is not whole JSON.
fn journal(dir: &std::path::Path) -> Vec<Value> {
    let mut out = Vec::new();
    for (f, text) in journal_files(dir) {
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{f:?} ends in a torn line"
        );
        for (i, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{f:?} line {}: {e}: {line}", i + 1));
            out.push(v);
        }
    }
    out
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn kill_9_during_a_storm_of_10000_trips_loses_no_reported_event() {
    e2e::require_root();
    let (_server, up) = grpcio_server();
    let dir = std::env::temp_dir().join(format!("e2e-journal-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, b"journal-crash-secret-0123456789ab").unwrap();
    let journal_dir = dir.join("journal");

    let config = config_file(
        &dir,
        &format!(
            r#"[[cluster]]
name = "svc"
endpoints = ["{up}"]
[breakers]
max_clients = 20000
[breakers.client]
consecutive_failures = 1
open_for = "60s"
[context.jwt]
hmac_secret_file = {secret:?}
[events]
journal = {journal_dir:?}
fsync = "always"
"#
        ),
    );
    // Every call is answered UNAUTHENTICATED; with its expired token that is the client's
    // fault, and its client's breaker opens.
    let c = grpcio_client(up, "control", &["--code", "UNAUTHENTICATED"]);
    assert!(c.finish(Duration::from_secs(30)).0.success());

    let mut proxy = agent(&config);
    let secret_arg = secret.to_str().unwrap();
    let count = CALLS.to_string();
    let storm = grpcio_client(
        proxy.addr,
        "load",
        &[
            "--method",
            "unary",
            "--count",
            &count,
            "--concurrency",
            "8",
            "--token-per-call",
            secret_arg,
            "--expect-codes",
            "UNAUTHENTICATED,UNAVAILABLE",
        ],
    );
    // Mid-storm: once KILL_AFTER events were reported.
    let mut seen = 0;
    while seen < KILL_AFTER {
        proxy
            .process
            .wait_new_line(Duration::from_secs(60), |l| l["kind"] == "breaker");
        seen = proxy
            .process
            .drain()
            .iter()
            .filter(|l| l["kind"] == "breaker")
            .count();
    }
    proxy.process.signal(libc::SIGKILL);
    let (_, lines, _) = proxy.process.finish(Duration::from_secs(30));
    let before = reported(&lines);
    eprintln!(
        "reported before kill -9: {} events (seq {:?}..={:?})",
        before.len(),
        before.keys().next(),
        before.keys().last()
    );

    // Restarted on the same journal.
    let proxy = agent(&config);
    let recovery = proxy.ready["journal"]["recovery"].clone();
    eprintln!("recovery after kill -9: {recovery}");
    let journaled = journal(&journal_dir);
    let seqs: Vec<u64> = journaled
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.first(), Some(&1));
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "not contiguous");
    assert_eq!(recovery["last_seq"].as_u64(), seqs.last().copied());
    let by_seq: BTreeMap<u64, &Value> = journaled
        .iter()
        .map(|e| (e["seq"].as_u64().unwrap(), e))
        .collect();
    for (seq, event) in &before {
        assert_eq!(
            by_seq.get(seq),
            Some(&event),
            "reported event {seq} is not in the journal as reported"
        );
    }
    assert!(before.len() >= KILL_AFTER);
    let last = *seqs.last().unwrap();

    // The calls the dead agent never took are made again, as new clients, until 10,000
    // trips in all were journaled.
    let _ = storm.finish(Duration::from_secs(300));
    let journaled_now = journal(&journal_dir).len();
    let rest = (CALLS - journaled_now).to_string();
    let second = grpcio_client(
        proxy.addr,
        "load",
        &[
            "--method",
            "unary",
            "--count",
            &rest,
            "--concurrency",
            "8",
            "--token-per-call",
            secret_arg,
            "--token-sub-prefix",
            "again-",
            "--expect-codes",
            "UNAUTHENTICATED",
        ],
    );
    let done = second.finish(Duration::from_secs(300));
    assert!(done.0.success(), "{}", done.2);
    let (status, lines, stderr) = proxy.terminate(Duration::from_secs(40));
    assert!(status.success(), "{stderr}");
    // Numbering went on after the restart from the last event journaled.
    let after = reported(&lines);
    assert_eq!(after.keys().next(), Some(&(last + 1)));
    let all = journal(&journal_dir);
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "not contiguous after the restart"
    );
    let trips = all.iter().filter(|e| e["breaker"]["to"] == "open").count();
    eprintln!(
        "journal: {} events, {trips} trips; {} reported before the kill",
        seqs.len(),
        before.len()
    );
    assert_eq!(trips, CALLS);
    let _ = std::fs::remove_dir_all(&dir);
}
