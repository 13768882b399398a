//! gRPC through the proxy, end to end: a Python grpcio client and server
//! (`tests/peers/grpcpy`, service `proxytest.Test` of `tests/proto/test.proto`) and the grpc-go
//! server built from Debian's sources. Every case checks every byte, header and status the
//! client gets against what the server sent (see `tests/peers/grpcpy/README.md`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use e2e::{
    grpc_server,
    proxy::{AgentProxy, JsonChild, grpcio_client, grpcio_server, python},
};
use serde_json::Value;

/// Runs `client.py TARGET CASE ARGS` and fails the test unless its checks all passed.
fn client_case(target: SocketAddr, case: &str, args: &[&str]) -> Vec<Value> {
    let client = grpcio_client(target, case, args);
    let (status, lines, stderr) = client.finish(Duration::from_secs(120));
    let done = lines.iter().rev().find(|l| l["event"] == "done");
    assert!(
        status.success() && done.is_some_and(|d| d["ok"] == true),
        "case {case} failed through the proxy: {done:?}\nstderr:\n{stderr}"
    );
    lines
}

/// `case` between a grpcio client and server, through the proxy in quick mode; the proxy's
/// outcome records say the calls completed. Breakers off: some cases answer every status
/// code, which would (rightly) trip them.
fn grpcio_case(case: &str) -> Vec<Value> {
    let (_server, upstream) = grpcio_server();
    let proxy = AgentProxy::quick_with(&[upstream], &["--no-breakers"]);
    let lines = client_case(proxy.addr, case, &[]);
    let (status, out, stderr) = proxy.terminate(Duration::from_secs(10));
    assert!(status.success(), "agent run: {status}\n{stderr}");
    let outcomes: Vec<&Value> = out.iter().filter(|l| l["kind"] == "stream").collect();
    assert!(!outcomes.is_empty(), "no outcome records");
    for o in &outcomes {
        assert_eq!(o["ending"], "completed", "{o}");
        assert_eq!(
            o["method"].as_str().unwrap().split('/').nth(1),
            Some("proxytest.Test")
        );
    }
    lines
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn unary_calls_pass_unchanged() {
    grpcio_case("unary");
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn custom_and_binary_metadata_pass_both_ways_in_headers_and_trailers() {
    grpcio_case("metadata");
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_1000_message_server_stream_arrives_in_order() {
    grpcio_case("server-stream");
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_1000_message_client_stream_arrives_whole() {
    grpcio_case("client-stream");
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn bidi_ping_pong_round_trips() {
    grpcio_case("bidi");
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn four_mib_messages_pass_both_ways() {
    grpcio_case("large");
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn all_17_status_codes_pass_in_trailers_and_trailers_only() {
    let lines = grpcio_case("status");
    let calls: Vec<&Value> = lines.iter().filter(|l| l["event"] == "status").collect();
    assert_eq!(calls.len(), 34, "17 codes x (trailers, trailers-only)");
    assert!(calls.iter().all(|c| c["ok"] == true), "{calls:?}");
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn grpc_go_unary_and_streaming_calls_pass() {
    let (_server, upstream) = grpc_server("127.0.0.1", &[]);
    let proxy = AgentProxy::quick(&[upstream]);
    client_case(proxy.addr, "grpc-go", &[]);
    let (status, _, stderr) = proxy.terminate(Duration::from_secs(10));
    assert!(status.success(), "agent run: {status}\n{stderr}");
}

/// A throwaway CA-less identity: a self-signed certificate for `localhost` the client trusts.
fn self_signed(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

#[test]
#[ignore = "needs the agent binary and real peers (Go, grpcio) from `cargo xtask setup`; run by `cargo xtask test`"]
fn a_tls_listener_with_alpn_h2_serves_grpc() {
    let dir = std::env::temp_dir().join(format!("e2e-proxy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = self_signed(&dir);
    let (_server, upstream) = grpcio_server();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[listener]]
name = "tls"
address = "127.0.0.1:0"
[listener.tls]
cert = {cert:?}
key = {key:?}
[[listener.route]]
grpc_service = "proxytest.Test"
cluster = "grpcio"

[[cluster]]
name = "grpcio"
endpoints = ["{upstream}"]
"#
        ),
    )
    .unwrap();
    let proxy = AgentProxy::start(&[
        "--config",
        config.to_str().unwrap(),
        "--print-outcomes",
        "--no-breakers",
    ]);
    let ca = cert.to_str().unwrap();
    for case in ["unary", "bidi", "status"] {
        client_case(
            proxy.addr,
            case,
            &["--tls-ca", ca, "--authority", "localhost"],
        );
    }
    // A client that trusts another CA is refused in the handshake.
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let (other, _) = self_signed(&other_dir);
    let client = JsonChild::spawn(
        "wrong CA",
        &mut python(
            "grpcpy/client.py",
            &[
                &proxy.addr.to_string(),
                "unary",
                "--tls-ca",
                other.to_str().unwrap(),
                "--authority",
                "localhost",
            ],
        ),
    );
    let (status, _, _) = client.finish(Duration::from_secs(60));
    assert!(!status.success(), "a client with the wrong CA got through");
    let (status, _, stderr) = proxy.terminate(Duration::from_secs(10));
    assert!(status.success(), "agent run: {status}\n{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
