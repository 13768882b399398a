//! TCP resets on loopback, IPv4 and IPv6: every reset the test makes is reported by
//! `agent trace`, sent and received, with the right addresses and ports; none missing, no extra.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{HashMap, HashSet},
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use e2e::Trace;
use serde_json::Value;
use socket2::SockRef;

/// Resets per address family: half by abortive close, half by connecting to a closed port.
const RESETS_PER_FAMILY: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Expected {
    direction: &'static str,
    local: SocketAddr,
    remote: SocketAddr,
}

/// How a reset was made, to check who the agent says caused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    /// close() with SO_LINGER 0: sent from our own task, so the agent must name our pid.
    AbortiveClose,
    /// The kernel answers a SYN to a closed port from softirq: no task to name.
    ClosedPort,
}

/// Expected events with how often each should appear: the kernel reuses an ephemeral port as
/// soon as a reset frees it, so the same 4-tuple can legitimately recur.
type Expectations = HashMap<Expected, (Cause, usize)>;

fn expect(out: &mut Expectations, key: Expected, cause: Cause) {
    out.entry(key).or_insert((cause, 0)).1 += 1;
}

/// Abortive close: the client sends RST (sent), the server's socket receives it (received).
fn abortive_close(listener: &TcpListener, out: &mut Expectations) {
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let (c, s) = (client.local_addr().unwrap(), server.local_addr().unwrap());
    SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    expect(
        out,
        Expected {
            direction: "sent",
            local: c,
            remote: s,
        },
        Cause::AbortiveClose,
    );
    expect(
        out,
        Expected {
            direction: "received",
            local: s,
            remote: c,
        },
        Cause::AbortiveClose,
    );
    drop(server);
}

/// A connect to a port nobody listens on: the kernel sends RST for the port (sent, no socket),
/// the connecting socket receives it (received).
fn closed_port(closed: SocketAddr, out: &mut Expectations) {
    let any: SocketAddr = if closed.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    // A socket whose ephemeral port is the closed port itself would connect to itself (TCP
    // simultaneous open) instead of being refused: take another one then.
    let (socket, local) = loop {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(closed),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        socket.bind(&any.into()).unwrap();
        let local = socket.local_addr().unwrap().as_socket().unwrap();
        if local.port() != closed.port() {
            break (socket, local);
        }
    };
    let err = socket
        .connect(&closed.into())
        .expect_err("connect to a closed port must fail");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    expect(
        out,
        Expected {
            direction: "sent",
            local: closed,
            remote: local,
        },
        Cause::ClosedPort,
    );
    expect(
        out,
        Expected {
            direction: "received",
            local,
            remote: closed,
        },
        Cause::ClosedPort,
    );
}

/// A port that was free a moment ago and that nothing listens on now.
fn closed_port_addr(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

fn make_resets(ip: &str, expected: &mut Expectations) -> HashSet<u16> {
    let listener = TcpListener::bind(format!("{ip}:0")).unwrap();
    let closed = closed_port_addr(ip);
    for _ in 0..RESETS_PER_FAMILY / 2 {
        abortive_close(&listener, expected);
        closed_port(closed, expected);
    }
    HashSet::from([listener.local_addr().unwrap().port(), closed.port()])
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {v}"))
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn every_reset_reported_once_ipv4_and_ipv6() {
    let mut trace = Trace::start(&["--probes", "tcp-reset"]);
    assert_eq!(trace.ready["probes"][0]["name"], "tcp-reset");
    assert_eq!(
        trace.ready["probes"][0]["attached"], true,
        "{}",
        trace.ready
    );

    let mut expected = Expectations::new();
    let mut server_ports = make_resets("127.0.0.1", &mut expected);
    server_ports.extend(make_resets("::1", &mut expected));
    let want: usize = expected.values().map(|(_, n)| n).sum();
    assert_eq!(
        want,
        2 * 2 * RESETS_PER_FAMILY,
        "each reset is one sent and one received event"
    );

    // Our resets are the events touching our server or closed ports.
    let ours = |e: &Value| {
        e["kind"] == "tcp_reset"
            && (server_ports.contains(&addr(&e["local"]).port())
                || server_ports.contains(&addr(&e["remote"]).port()))
    };
    let complete = trace.wait_for(Duration::from_secs(20), |events| {
        events.iter().filter(|e| ours(e)).count() >= want
    });
    let out = trace.stop();
    let seen: Vec<&Value> = out.events.iter().filter(|e| ours(e)).collect();
    assert!(
        complete,
        "only {} of {want} reset events arrived",
        seen.len()
    );

    let mut found: HashMap<Expected, usize> = HashMap::new();
    let own_pid = std::process::id();
    let mut pids_named = 0;
    for e in &seen {
        let direction = if e["direction"] == "sent" {
            "sent"
        } else {
            "received"
        };
        let key = Expected {
            direction,
            local: addr(&e["local"]),
            remote: addr(&e["remote"]),
        };
        let (cause, _) = *expected
            .get(&key)
            .unwrap_or_else(|| panic!("reset the test did not make: {e}"));
        *found.entry(key).or_default() += 1;
        // A pid is named only in task context, and then it is the process that really caused the
        // reset: here, always this test. (A received reset can run in task context too, when the
        // socket was owned by a syscall and the kernel processed the RST from its backlog.)
        if !e["task"].is_null() {
            assert_eq!(e["task"]["pid"], own_pid, "wrong pid: {e}");
            pids_named += 1;
        }
        match (direction, cause) {
            ("sent", Cause::AbortiveClose) => {
                assert_eq!(
                    e["task"]["pid"], own_pid,
                    "an abortive close runs in our task: {e}"
                )
            }
            // Answered from softirq, where "current" is whoever was interrupted.
            ("sent", Cause::ClosedPort) => {
                assert!(e["task"].is_null(), "softirq reset named a task: {e}")
            }
            _ => {}
        }
        assert!(
            e["netns"].as_u64().is_some_and(|n| n > 0),
            "netns missing: {e}"
        );
    }
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, (_, n))| found.get(*k).copied().unwrap_or(0) != *n)
        .map(|(k, (_, n))| (k, *n, found.get(k).copied().unwrap_or(0)))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "(event, expected, reported) mismatches, first 5: {wrong:?}"
    );
    assert_eq!(seen.len(), want);
    assert!(
        pids_named >= RESETS_PER_FAMILY,
        "at least every abortive close names our pid"
    );

    let summary = &out.summary["probes"]["tcp-reset"];
    assert_eq!(summary["dropped_in_kernel"], 0, "{summary}");
    assert!(
        summary["sent"].as_u64().unwrap() >= 2 * RESETS_PER_FAMILY as u64,
        "{summary}"
    );
    assert_eq!(out.summary["reader"]["undecodable"], 0, "{}", out.summary);
    eprintln!(
        "tcp resets: {} events checked ({} with our pid); summary {}",
        seen.len(),
        pids_named,
        out.summary
    );
}
