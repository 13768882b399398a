//! The TLS upstreams of the proxy's upstream-TLS tests, checked on their own, with no agent
//! between them and their clients: the grpcio server (`tests/peers/grpcpy/server.py`) and the
//! grpc-go server (`tests/peers/grpcpeer`) serve mTLS with certificates from `e2e::certs`, refuse
//! clients without a certificate their client CA signed, and take a rotated certificate at the
//! next handshake while the connections they have keep working. Their own clients (`client.py`,
//! `grpcpeer client`) say why a handshake failed; each test prints what they said.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use e2e::{
    Peer,
    certs::{Ca, KeyPair, install, replace_file},
    collect_lines, go_peer,
    proxy::{JsonChild, grpcio_client, grpcio_server_with},
};
use test_support::supervised::line_reader;

/// The name the server certificates are for, and the clients check.
const NAME: &str = "upstream.test";

/// The grpcpeer binary, built once (every `go_peer` runs `go build`, a few hundred ms even when
/// nothing changed: too slow for the rotation timing).
fn grpcpeer() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| go_peer("grpcpeer", false))
}

/// Certificates of one test, in a directory of its own (removed when dropped).
struct Pki {
    dir: PathBuf,
    /// The CA of the servers' first certificate (`server_a`, and `expired`).
    ca_a: Ca,
    /// The CA of the certificate they rotate to (`server_b`).
    ca_b: Ca,
    server_a: KeyPair,
    server_b: KeyPair,
    expired: KeyPair,
    /// The CA the servers require client certificates of, and one it signed.
    clients: Ca,
    client: KeyPair,
    /// A client certificate from another CA (`ca_b`), which the servers must refuse.
    stranger: KeyPair,
    /// The files the server serves, which rotation replaces.
    served_cert: PathBuf,
    served_key: PathBuf,
}

impl Pki {
    fn new(test: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("e2e-upstream-tls-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sans = [NAME, "127.0.0.1"];
        let ca_a = Ca::new(&dir, "ca-a");
        let ca_b = Ca::new(&dir, "ca-b");
        let clients = Ca::new(&dir, "clients");
        let pki = Pki {
            server_a: ca_a.issue_server(&dir, "server-a", &sans),
            server_b: ca_b.issue_server(&dir, "server-b", &sans),
            expired: ca_a.issue_expired_server(&dir, "expired", &sans),
            client: clients.issue_client(&dir, "client"),
            stranger: ca_b.issue_client(&dir, "stranger"),
            served_cert: dir.join("served.crt"),
            served_key: dir.join("served.key"),
            ca_a,
            ca_b,
            clients,
            dir,
        };
        install(&pki.server_a, &pki.served_cert, &pki.served_key);
        pki
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, Debug)]
enum Stack {
    Grpcio,
    GrpcGo,
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A running server of `stack` with the served files and, for mTLS, `pki.clients`.
enum Server {
    Grpcio(JsonChild),
    GrpcGo(Lines),
}

impl Server {
    fn start(stack: Stack, pki: &Pki) -> (Server, std::net::SocketAddr) {
        let (cert, key, ca) = (
            s(&pki.served_cert),
            s(&pki.served_key),
            s(&pki.clients.cert),
        );
        match stack {
            Stack::Grpcio => {
                let (server, addr) = grpcio_server_with(&[
                    "--tls-cert",
                    cert,
                    "--tls-key",
                    key,
                    "--tls-client-ca",
                    ca,
                ]);
                (Server::Grpcio(server), addr)
            }
            Stack::GrpcGo => {
                let mut server = Lines::spawn(
                    "grpcpeer server",
                    Command::new(grpcpeer()).args([
                        "server",
                        "-addr",
                        "127.0.0.1:0",
                        "-tls-cert",
                        cert,
                        "-tls-key",
                        key,
                        "-tls-client-ca",
                        ca,
                    ]),
                );
                let line = server.wait(Duration::from_secs(30), |l| l.starts_with("listening "));
                let addr = line["listening ".len()..].parse().unwrap();
                (Server::GrpcGo(server), addr)
            }
        }
    }

    /// Waits for the server to say it serves the certificate with `serial`.
    fn wait_loaded(&mut self, serial: &str) {
        let timeout = Duration::from_secs(10);
        match self {
            Server::Grpcio(p) => {
                p.wait_line(timeout, |v| {
                    v["event"] == "tls_loaded" && v["serial"] == serial
                });
            }
            Server::GrpcGo(p) => {
                let want = format!("tls loaded {serial}");
                p.wait(timeout, |l| l == want);
            }
        }
    }

    fn stderr(&self) -> String {
        match self {
            Server::Grpcio(p) => p.stderr(),
            Server::GrpcGo(p) => p.stderr.lock().unwrap().clone(),
        }
    }
}

/// A child whose stdout is plain lines (grpcpeer's protocol), read as they come; killed when
/// dropped.
struct Lines {
    name: String,
    _peer: Peer,
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Lines {
    fn spawn(name: &str, cmd: &mut Command) -> Lines {
        let mut peer = Peer::spawn(
            name,
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let rx = line_reader(peer.child().stdout.take().unwrap());
        let stderr = collect_lines(peer.child().stderr.take().unwrap());
        Lines {
            name: name.to_owned(),
            _peer: peer,
            rx,
            seen: Vec::new(),
            stderr,
        }
    }

    /// The first line (seen before or coming within `timeout`) that `want` accepts.
    fn wait(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.seen.iter().find(|l| want(l)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(e) => panic!(
                    "{}: the line awaited did not come ({e:?}); lines: {:?}\nstderr:\n{}",
                    self.name,
                    self.seen,
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }
}

/// TLS arguments of a client of `stack`: trusting `ca`, checking `NAME`, presenting `client`.
fn tls_args(stack: Stack, ca: &Ca, client: Option<&KeyPair>) -> Vec<String> {
    let dash = match stack {
        Stack::Grpcio => "--",
        Stack::GrpcGo => "-",
    };
    let mut args = vec![("tls-ca", s(&ca.cert)), ("authority", NAME)];
    if let Some(c) = client {
        args.extend([("tls-cert", s(&c.cert)), ("tls-key", s(&c.key))]);
    }
    args.into_iter()
        .flat_map(|(flag, value)| [format!("{dash}{flag}"), value.to_owned()])
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// One client of `stack` making a few calls on a new connection: Ok, or what it said was wrong.
fn connect(
    stack: Stack,
    addr: std::net::SocketAddr,
    ca: &Ca,
    client: Option<&KeyPair>,
) -> Result<(), String> {
    let tls = tls_args(stack, ca, client);
    let tls = strs(&tls);
    match stack {
        Stack::Grpcio => {
            let (status, lines, stderr) =
                grpcio_client(addr, "unary", &tls).finish(Duration::from_secs(60));
            let done = lines.iter().rev().find(|l| l["event"] == "done");
            match done {
                Some(d) if status.success() && d["ok"] == true => Ok(()),
                Some(d) if d["error"].is_string() => Err(d["error"].as_str().unwrap().to_owned()),
                _ => Err(format!("client.py: {status}, lines {lines:?}\n{stderr}")),
            }
        }
        Stack::GrpcGo => go_client(addr, &tls, &["-calls", "5"]),
    }
}

/// `grpcpeer client -addr ADDR TLS MORE`, to the end: Ok, or its stderr.
fn go_client(addr: std::net::SocketAddr, tls: &[&str], more: &[&str]) -> Result<(), String> {
    let out = Command::new(grpcpeer())
        .args(["client", "-addr", &addr.to_string()])
        .args(tls)
        .args(more)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if out.status.success() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout
                .lines()
                .filter(|l| l.starts_with("call "))
                .all(|l| l.ends_with(" OK")),
            "grpcpeer client: calls failed:\n{stdout}"
        );
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Asserts that the client was refused, with an error containing one of `expected`, and prints
/// the error.
fn refused(what: &str, result: Result<(), String>, expected: &[&str]) {
    let error = match result {
        Ok(()) => panic!("{what}: the client got through"),
        Err(e) => e,
    };
    assert!(
        expected.iter().any(|x| error.contains(x)),
        "{what}: the error does not say {expected:?}:\n{error}"
    );
    println!("{what}: {error}");
}

fn mtls_is_required_and_verified(stack: Stack) {
    let pki = Pki::new(&format!("{stack:?}-mtls"));
    let (server, addr) = Server::start(stack, &pki);
    connect(stack, addr, &pki.ca_a, Some(&pki.client))
        .unwrap_or_else(|e| panic!("{stack:?}: an mTLS client was refused: {e}"));
    let (no_cert, unknown_ca, foreign_cert): (&[&str], &[&str], &[&str]) = match stack {
        // A client certificate refused, gRPC core's server closes the connection without an
        // alert that reaches the client: client.py says "Socket closed".
        Stack::Grpcio => (
            &["UNAVAILABLE"],
            &["CERTIFICATE_VERIFY_FAILED"],
            &["UNAVAILABLE"],
        ),
        Stack::GrpcGo => (
            &["bad certificate", "certificate required"],
            &["certificate signed by unknown authority"],
            &["bad certificate", "unknown certificate authority"],
        ),
    };
    refused(
        &format!("{stack:?}, no client certificate"),
        connect(stack, addr, &pki.ca_a, None),
        no_cert,
    );
    refused(
        &format!("{stack:?}, client certificate from another CA"),
        connect(stack, addr, &pki.ca_a, Some(&pki.stranger)),
        foreign_cert,
    );
    refused(
        &format!("{stack:?}, server certificate from a CA the client does not trust"),
        connect(stack, addr, &pki.ca_b, Some(&pki.client)),
        unknown_ca,
    );
    println!("{stack:?} server stderr:\n{}", server.stderr());
}

#[test]
#[ignore = "needs openssl, Go and grpcio: cargo xtask test"]
fn grpcio_server_requires_and_verifies_client_certificates() {
    mtls_is_required_and_verified(Stack::Grpcio);
}

#[test]
#[ignore = "needs openssl, Go and grpcio: cargo xtask test"]
fn grpc_go_server_requires_and_verifies_client_certificates() {
    mtls_is_required_and_verified(Stack::GrpcGo);
}

fn an_expired_server_certificate_is_refused(stack: Stack) {
    let pki = Pki::new(&format!("{stack:?}-expired"));
    install(&pki.expired, &pki.served_cert, &pki.served_key);
    let (mut server, addr) = Server::start(stack, &pki);
    server.wait_loaded(&pki.expired.serial);
    refused(
        &format!("{stack:?}, expired server certificate"),
        connect(stack, addr, &pki.ca_a, Some(&pki.client)),
        &["expired"],
    );
}

#[test]
#[ignore = "needs openssl, Go and grpcio: cargo xtask test"]
fn grpcio_client_refuses_an_expired_server_certificate() {
    an_expired_server_certificate_is_refused(Stack::Grpcio);
}

#[test]
#[ignore = "needs openssl, Go and grpcio: cargo xtask test"]
fn grpc_go_client_refuses_an_expired_server_certificate() {
    an_expired_server_certificate_is_refused(Stack::GrpcGo);
}

/// A client of `stack` making a call every 20 ms over one connection, trusting `ca_a` only.
enum Steady {
    Grpcio(JsonChild),
    GrpcGo(Lines),
}

impl Steady {
    fn start(stack: Stack, addr: std::net::SocketAddr, pki: &Pki) -> Steady {
        let tls = tls_args(stack, &pki.ca_a, Some(&pki.client));
        let tls = strs(&tls);
        match stack {
            Stack::Grpcio => {
                let mut args = vec![
                    "--count",
                    "100000",
                    "--interval-ms",
                    "20",
                    "--per-call",
                    "--timeout-ms",
                    "5000",
                ];
                args.extend(tls);
                Steady::Grpcio(grpcio_client(addr, "load", &args))
            }
            Stack::GrpcGo => {
                // grpcpeer's client never opens a second connection: a call after a reconnect
                // would fail (and one would fail the handshake with the rotated certificate).
                let mut cmd = Command::new(grpcpeer());
                cmd.args(["client", "-addr", &addr.to_string()])
                    .args(tls)
                    .args(["-duration", "10m", "-pause", "20ms", "-call-timeout", "5s"]);
                Steady::GrpcGo(Lines::spawn("steady grpcpeer client", &mut cmd))
            }
        }
    }

    /// Waits until at least `n` calls have ended, and asserts they all were OK; returns how
    /// many ended.
    fn wait_calls(&mut self, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (codes, stderr): (Vec<String>, String) = match self {
                Steady::Grpcio(c) => {
                    let codes = c
                        .drain()
                        .iter()
                        .filter(|l| l["event"] == "call")
                        .map(|l| format!("{} {}", l["code"].as_str().unwrap(), l["details"]))
                        .collect();
                    (codes, c.stderr())
                }
                Steady::GrpcGo(c) => {
                    c.seen.extend(c.rx.try_iter());
                    let codes = c
                        .seen
                        .iter()
                        .filter_map(|l| l.strip_prefix("call "))
                        .map(|l| l.split_once(' ').map_or(l, |(_, code)| code).to_owned())
                        .collect();
                    (codes, c.stderr.lock().unwrap().clone())
                }
            };
            let failed: Vec<&String> = codes
                .iter()
                .filter(|c| c.split(' ').next() != Some("OK"))
                .collect();
            assert!(
                failed.is_empty(),
                "the steady connection failed calls: {failed:?}\nstderr:\n{stderr}"
            );
            if codes.len() >= n {
                return codes.len();
            }
            assert!(
                Instant::now() < deadline,
                "the steady client made {} calls of {n} in 30 s; stderr:\n{stderr}",
                codes.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn rotation_keeps_connections_and_serves_the_new_certificate(stack: Stack) {
    let pki = Pki::new(&format!("{stack:?}-rotation"));
    let (mut server, addr) = Server::start(stack, &pki);
    server.wait_loaded(&pki.server_a.serial);
    let mut steady = Steady::start(stack, addr, &pki);
    let before = steady.wait_calls(5);

    // The key alone replaced (the moment between install's two renames): the files do not
    // match, and the server keeps what it serves.
    replace_file(&pki.server_b.key, &pki.served_key);
    connect(stack, addr, &pki.ca_a, Some(&pki.client))
        .unwrap_or_else(|e| panic!("{stack:?}: with a mismatched key on disk: {e}"));
    let stderr = server.stderr();
    let word = stderr.lines().find(|l| l.contains("not loading"));
    println!("{stack:?} server, the key replaced alone: {word:?}");
    assert!(
        word.is_some(),
        "{stack:?}: no word of the mismatched pair:\n{stderr}"
    );

    // Then the certificate: the next handshake gets it. The time that takes is measured with
    // grpcpeer's client, whose run (a process, one handshake) is timed first for comparison.
    let old_tls = tls_args(Stack::GrpcGo, &pki.ca_a, Some(&pki.client));
    let started = Instant::now();
    go_client(addr, &strs(&old_tls), &["-calls", "0"]).unwrap();
    let one_run = started.elapsed();
    replace_file(&pki.server_b.cert, &pki.served_cert);
    let swapped = Instant::now();
    let go_tls = tls_args(Stack::GrpcGo, &pki.ca_b, Some(&pki.client));
    let go_tls = strs(&go_tls);
    let mut attempts = 0;
    let seen_after = loop {
        attempts += 1;
        match go_client(addr, &go_tls, &["-calls", "0"]) {
            Ok(()) => break swapped.elapsed(),
            Err(e) if swapped.elapsed() > Duration::from_secs(10) => {
                panic!("{stack:?}: the new certificate is not served 10 s after the swap: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    println!(
        "{stack:?}: a handshake {seen_after:?} after the swap got the new certificate \
         (attempt {attempts}; a grpcpeer client run before the swap took {one_run:?})"
    );
    assert_eq!(
        attempts, 1,
        "{stack:?}: the first handshake after the swap got the old certificate"
    );
    server.wait_loaded(&pki.server_b.serial);

    connect(stack, addr, &pki.ca_b, Some(&pki.client))
        .unwrap_or_else(|e| panic!("{stack:?}: a client trusting the new CA: {e}"));
    refused(
        &format!("{stack:?}, after the rotation, a client trusting the old CA only"),
        connect(stack, addr, &pki.ca_a, Some(&pki.client)),
        &[
            "CERTIFICATE_VERIFY_FAILED",
            "certificate signed by unknown authority",
        ],
    );
    // The connection made before keeps working (it trusts the old CA only, so it cannot have
    // been made again).
    let after = steady.wait_calls(before + 10);
    println!("{stack:?}: the steady connection made {after} calls, all OK");
}

#[test]
#[ignore = "needs openssl, Go and grpcio: cargo xtask test"]
fn grpcio_server_rotates_its_certificate_without_dropping_connections() {
    rotation_keeps_connections_and_serves_the_new_certificate(Stack::Grpcio);
}

#[test]
#[ignore = "needs openssl, Go and grpcio: cargo xtask test"]
fn grpc_go_server_rotates_its_certificate_without_dropping_connections() {
    rotation_keeps_connections_and_serves_the_new_certificate(Stack::GrpcGo);
}
