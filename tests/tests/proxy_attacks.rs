//! Hostile clients against the proxy (`tests/peers/h2py/attacks.py`, Python `h2` and raw
//! frames): rapid reset, CONTINUATION flood, HPACK bomb, SETTINGS and PING floods, slowloris
//! and a zero-window reader. For each, while the attack runs, a well-behaved grpcio client
//! makes its calls through the same proxy and every one must succeed; the proxy must stay up
//! (it answers, drains and exits 0) and grow by less than 64 MiB of RSS (peak, VmHWM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use e2e::proxy::{AgentProxy, JsonChild, grpcio_client, grpcio_server, python};

const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// Runs `attack` (with `args`) for `seconds` against a fresh proxy in front of a grpcio
/// server, with a good client calling through it meanwhile; checks the proxy coped.
fn survive(attack: &str, args: &[&str], seconds: u64) {
    let (_server, upstream) = grpcio_server();
    let mut proxy = AgentProxy::quick(&[upstream]);
    let rss_before = proxy.status_kib("VmRSS");
    let (host, port) = ("127.0.0.1".to_owned(), proxy.addr.port().to_string());
    let duration = seconds.to_string();
    let mut all = vec![
        host.as_str(),
        port.as_str(),
        attack,
        "--duration",
        &duration,
    ];
    all.extend_from_slice(args);
    let mut attacker = JsonChild::spawn(attack, &mut python("h2py/attacks.py", &all));
    // Once the attack is under way, a good client makes its calls.
    attacker.wait_line(Duration::from_secs(30), |l| {
        l["event"] == "progress" || l["event"] == "streams_opened"
    });
    let good = grpcio_client(proxy.addr, "unary", &[]);
    let (status, lines, stderr) = good.finish(Duration::from_secs(seconds + 60));
    let done = lines.iter().rev().find(|l| l["event"] == "done");
    assert!(
        status.success(),
        "{attack}: the good client's calls failed during the attack: {done:?}\n{stderr}"
    );
    let (attack_status, attack_lines, attack_err) =
        attacker.finish(Duration::from_secs(seconds + 60));
    let summary = attack_lines.iter().rev().find(|l| l["event"] == "done");
    assert!(
        attack_status.success() && summary.is_some_and(|d| d["ok"] == true),
        "{attack}: the attack itself did not run as designed: {summary:?}\n{attack_err}"
    );
    let peak = proxy.status_kib("VmHWM");
    assert!(
        peak.saturating_sub(rss_before) < RSS_GROWTH_LIMIT_KIB,
        "{attack}: RSS grew from {rss_before} KiB to a peak of {peak} KiB"
    );
    // Still serving, and nothing left behind once the attacker is gone.
    let stats = proxy.stats();
    assert_eq!(stats["client_streams"], 0, "{attack}: {stats}");
    let (status, _, stderr) = proxy.terminate(Duration::from_secs(40));
    assert!(
        status.success(),
        "{attack}: agent run exited {status}\n{stderr}"
    );
    eprintln!(
        "{attack}: RSS {rss_before} KiB before, peak {peak} KiB; attacker: {}",
        summary.unwrap()
    );
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn rapid_reset() {
    survive("rapid-reset", &[], 5);
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn continuation_flood() {
    survive("continuation-flood", &[], 5);
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn hpack_bomb() {
    survive("hpack-bomb", &[], 5);
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn settings_flood() {
    survive("settings-flood", &[], 5);
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn ping_flood() {
    survive("ping-flood", &[], 5);
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn slowloris() {
    // Past the 10 s header-read timeout, so the proxy must have closed them by the end.
    survive("slowloris", &["--connections", "50"], 12);
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn zero_window_readers() {
    // 100 streams per connection on 3 connections, each asking for 64 x 16 KiB and reading
    // none of it.
    survive("zero-window", &["--connections", "3"], 8);
}
