//! Out-of-order and retransmitted segments, on a real TCP connection through a veth pair: the
//! tracker (TC on the host end) marks the flow lost at the first gap, counts it, never reports a
//! frame that was not on the wire, picks the flow up again, and neither the agent nor the
//! transfer suffers. A clean connection after it is followed exactly.
//!
//! This kernel has no netem, so the reordering is made with what it has: on the server's end an
//! HTB qdisc sends segments whose TCP sequence number has bit 12 set through a 20 Mbit/s class
//! and the rest through a 1 Gbit/s one, so the slow ones arrive after later fast ones (and TCP
//! retransmits some of them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use e2e::{
    Netns, Peer, Trace, WireFrame, of_kind, parse_nghttp, require_root, sh, wait_listening,
    workspace_root,
};
use serde_json::Value;

/// The reordering qdisc on the namespace's end of the veth pair.
trait Reorder {
    fn tc(&self, args: &[&str]);
    fn reorder_egress(&self);
    fn stop_reordering(&self);
}

impl Reorder for Netns {
    fn tc(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("tc", &all);
    }

    /// Reorders what the namespace sends (see the module comment).
    fn reorder_egress(&self) {
        let dev = self.ns_if.as_str();
        self.tc(&[
            "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10",
        ]);
        self.tc(&[
            "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "1gbit",
        ]);
        self.tc(&[
            "class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", "20mbit",
        ]);
        // IPv4 header without options (20 bytes), then the TCP sequence number at offset 4.
        self.tc(&[
            "filter",
            "add",
            "dev",
            dev,
            "parent",
            "1:",
            "protocol",
            "ip",
            "u32",
            "match",
            "u32",
            "0x00001000",
            "0x00001000",
            "at",
            "24",
            "flowid",
            "1:20",
        ]);
    }

    fn stop_reordering(&self) {
        self.tc(&["qdisc", "del", "dev", &self.ns_if, "root"]);
    }
}

/// A `TcpExt` counter of this network namespace (`/proc/net/netstat`).
fn tcp_ext(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (names, values) = (lines[0], lines[1]);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no TcpExt {name}"))
}

/// `len` bytes no HTTP/2 parser could mistake for frames by accident too often.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn nghttp(url: &str) -> Vec<WireFrame> {
    let out = Command::new("nghttp")
        .args(["-nv", url])
        .output()
        .expect("run nghttp (nghttp2-client)");
    assert!(
        out.status.success(),
        "nghttp {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_nghttp(&String::from_utf8_lossy(&out.stdout))
}

/// (type, flags, stream, length) of a frame, the client's view or the agent's.
type Key = (String, u64, u64, u64);

fn key_of(f: &WireFrame) -> Key {
    (f.frame_type.clone(), f.flags, f.stream, f.length)
}

fn key_of_event(e: &Value) -> Key {
    (
        e["type"].as_str().unwrap().to_owned(),
        e["flags"].as_u64().unwrap(),
        e["stream_id"].as_u64().unwrap(),
        e["length"].as_u64().unwrap(),
    )
}

/// Whether `sub` appears in `seq` in order (not necessarily adjacent).
fn is_subsequence(sub: &[Key], seq: &[Key]) -> bool {
    let mut it = seq.iter();
    sub.iter().all(|k| it.any(|s| s == k))
}

/// The agent's frames on the connection from `client`, per direction, in order.
fn frames_of(events: &[Value], client: SocketAddr, sent_by_client: bool) -> Vec<Key> {
    of_kind(events, "h2_frame")
        .filter(|e| {
            let end = if sent_by_client { "src" } else { "dst" };
            e[end] == client.to_string()
        })
        .map(key_of_event)
        .collect()
}

/// Client addresses the agent saw a preface from, in order.
fn clients(events: &[Value]) -> Vec<SocketAddr> {
    of_kind(events, "h2_flow")
        .filter(|e| e["change"] == "preface")
        .map(|e| e["src"].as_str().unwrap().parse().unwrap())
        .collect()
}

fn scratch() -> PathBuf {
    let dir = workspace_root().join("target/e2e-h2-reorder");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs root: creates a network namespace, loads eBPF programs; run by `cargo xtask test`"]
fn reordered_and_retransmitted_segments_are_counted_as_lost_never_misread() {
    require_root();
    let net = Netns::create("h2r", "10.213.77");
    // One MSS per skb, so the qdisc sorts segments, not 64 KiB super-packets.
    net.ip(&["link", "set", &net.ns_if, "gso_max_size", "1500"]);
    let docroot = scratch();
    const BIG: usize = 4 << 20;
    std::fs::write(docroot.join("big"), pseudo_random(BIG)).unwrap();
    std::fs::write(docroot.join("page"), b"after the storm\n").unwrap();
    let port = 8080;
    let _server = Peer::spawn(
        "nghttpd",
        Command::new("ip")
            .args([
                "netns", "exec", &net.name, "nghttpd", "--no-tls", "-a", &net.ns_ip, "-d",
            ])
            .arg(&docroot)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let server: SocketAddr = format!("{}:{port}", net.ns_ip).parse().unwrap();
    wait_listening(server);
    net.reorder_egress();

    let mut trace = Trace::start(&[
        "--probes",
        "h2-frames",
        "--all-frames",
        "--tc-interface",
        &net.host_if,
    ]);
    let (ofo_before, dsack_before) = (tcp_ext("TCPOFOQueue"), tcp_ext("TCPDSACKOldSent"));
    let big = nghttp(&format!("http://{server}/big"));
    let (ofo, dsack) = (
        tcp_ext("TCPOFOQueue") - ofo_before,
        tcp_ext("TCPDSACKOldSent") - dsack_before,
    );
    assert!(
        ofo > 0,
        "the qdisc did not reorder anything: no out-of-order queueing"
    );
    // The transfer itself is unaffected: every byte arrived.
    let data: u64 = big
        .iter()
        .filter(|f| f.dir == "recv" && f.frame_type == "DATA")
        .map(|f| f.length)
        .sum();
    assert_eq!(data, BIG as u64, "bytes of DATA the client received");

    net.stop_reordering();
    let clean = nghttp(&format!("http://{server}/page"));
    trace.wait_for(Duration::from_secs(5), |events| clients(events).len() >= 2);
    std::thread::sleep(Duration::from_millis(300));
    let out = trace.stop();
    let h2 = &out.summary["probes"]["h2-frames"];

    let seen = clients(&out.events);
    assert_eq!(seen.len(), 2, "client connections followed: {seen:?}");
    let (big_client, clean_client) = (seen[0], seen[1]);

    // The reordered direction (server to client): lost at a gap, counted, picked up again,
    // and every frame reported is one the client received, in the order it received them.
    let lost: Vec<&Value> = of_kind(&out.events, "h2_flow")
        .filter(|e| e["change"] == "lost" && e["dst"] == big_client.to_string())
        .collect();
    assert!(!lost.is_empty(), "no lost flow event; summary {h2}");
    assert!(
        lost.iter()
            .all(|e| e["reason"].as_str().unwrap().starts_with("gap")),
        "{lost:?}"
    );
    assert_eq!(
        h2["lost"]["gap"].as_u64().unwrap(),
        lost.len() as u64,
        "every loss counted, once"
    );
    let resyncs = of_kind(&out.events, "h2_flow")
        .filter(|e| e["change"] == "synced" && e["dst"] == big_client.to_string())
        .count();
    // A flow is lost again only after it was picked up: every loss but the last is followed
    // by a resync.
    assert!(
        resyncs + 1 >= lost.len(),
        "{resyncs} resyncs, {} losses",
        lost.len()
    );
    let truth_recv: Vec<Key> = big.iter().filter(|f| f.dir == "recv").map(key_of).collect();
    let got_recv = frames_of(&out.events, big_client, false);
    assert!(
        is_subsequence(&got_recv, &truth_recv),
        "a frame the client never received was reported"
    );
    assert!(got_recv.len() < truth_recv.len());
    assert!(h2["segments_not_followed"].as_u64().unwrap() > 0);

    // The other direction was never reordered: followed exactly.
    let truth_sent: Vec<Key> = big.iter().filter(|f| f.dir == "send").map(key_of).collect();
    assert_eq!(frames_of(&out.events, big_client, true), truth_sent);

    // And a connection after it is followed exactly, both ways.
    let want =
        |dir: &str| -> Vec<Key> { clean.iter().filter(|f| f.dir == dir).map(key_of).collect() };
    assert_eq!(frames_of(&out.events, clean_client, true), want("send"));
    let got_clean_recv = frames_of(&out.events, clean_client, false);
    assert!(
        got_clean_recv.starts_with(&want("recv")),
        "clean connection: {got_clean_recv:?} vs {:?}",
        want("recv")
    );
    eprintln!(
        "reorder: {ofo} segments queued out of order, {dsack} duplicate segments; agent: {} of {} server frames followed, {} losses (gap), {resyncs} resyncs, {} segments not followed, {} already seen",
        got_recv.len(),
        truth_recv.len(),
        lost.len(),
        h2["segments_not_followed"],
        h2["segments_already_seen"],
    );
}
