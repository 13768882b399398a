//! Raw tokens are never written anywhere: calls with JWTs (verified, expired, signed with
//! another key, `alg: none`) make breaker transitions whose events carry their claims; then
//! the journal, the OTLP payloads as the receiver got them (raw protobuf bytes and decoded),
//! the Prometheus text, and the agent's stdout and logs (at debug level) are searched for each
//! token and each signature. The claims must be there (the search looks where the context
//! went), the tokens must not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use e2e::{
    agent_bin,
    proxy::{JsonChild, config_file, grpcio_client, grpcio_server, journal_files, python},
    require_root,
};
use serde_json::Value;

const SECRET: &[u8] = b"no-tokens-test-secret-0123456789";

fn token(sub: &str, exp_offset: i64, secret: &[u8]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "scope": "read:test", "client_id": "nt-app", "exp": now + exp_offset}),
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// An unsigned token (`alg: none`), as an attacker would send one.
fn unsigned(sub: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(&serde_json::json!({"sub": sub, "exp": 4_102_444_800u64}))
    )
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn files_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            all.extend(std::fs::read(&p).unwrap());
            all.push(b'\n');
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn no_raw_token_or_signature_is_written_anywhere() {
    require_root();
    let dir = std::env::temp_dir().join(format!("e2e-no-tokens-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let journal = dir.join("journal");
    let (out, raw) = (dir.join("otlp.jsonl"), dir.join("otlp.raw"));
    let mut receiver = JsonChild::spawn(
        "otlp receiver",
        &mut python(
            "otlp/receiver.py",
            &[
                "--out",
                out.to_str().unwrap(),
                "--raw",
                raw.to_str().unwrap(),
            ],
        ),
    );
    let listening = receiver.wait_line(Duration::from_secs(30), |l| l["event"] == "listening");
    let otlp = format!("http://{}", listening["address"].as_str().unwrap());

    let (_server, up) = grpcio_server();
    let c = grpcio_client(up, "control", &["--code", "UNAVAILABLE"]);
    assert!(c.finish(Duration::from_secs(30)).0.success());
    let config = config_file(
        &dir,
        &format!(
            r#"[[cluster]]
name = "svc"
endpoints = ["{up}"]
[breakers.endpoint]
consecutive_failures = 1
open_for = "50ms"
backoff_multiplier = 1.0
jitter = 0.0
half_open_probes = 1
half_open_successes = 1
# Only the endpoint's breaker: one that opens for the whole cluster would refuse the later
# tokens' calls before they could make a transition.
[breakers.cluster]
enabled = false
[breakers.method]
enabled = false
[context.jwt]
hmac_secret_file = {secret_file:?}
[events]
journal = {journal:?}
[export]
otlp_endpoint = "{otlp}"
otlp_interval = "1s"
prometheus_listen = "127.0.0.1:0"
[signals]
probes = ["tcp-reset"]
"#
        ),
    );
    let mut agent = JsonChild::spawn(
        "agent run",
        Command::new(agent_bin())
            .args([
                "run",
                "--api-listen",
                "127.0.0.1:0",
                "--config",
                config.to_str().unwrap(),
            ])
            .args(["--print-outcomes", "--print-breakers"])
            .env("AGENT_LOG", "debug"),
    );
    let ready = agent.wait_line(Duration::from_secs(30), |l| l["kind"] == "ready");
    let proxy: SocketAddr = ready["listeners"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let prometheus: SocketAddr = ready["prometheus"].as_str().unwrap().parse().unwrap();

    let tokens = [
        token("alice", 3600, SECRET),
        token("mallory", -3600, SECRET),
        token("eve", 3600, b"some-other-secret-not-the-agents"),
        unsigned("oscar"),
    ];
    for t in &tokens {
        let bearer = format!("authorization=Bearer {t}");
        let c = grpcio_client(
            proxy,
            "load",
            &[
                "--count",
                "20",
                "--pause-ms",
                "50",
                "--header",
                &bearer,
                "--header",
                "x-session-id=nt-session",
                "--expect-codes",
                "UNAVAILABLE",
            ],
        );
        let (st, _, err) = c.finish(Duration::from_secs(60));
        assert!(st.success(), "{err}");
    }
    // Everything journaled has reached the receiver, and metrics too.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let journaled = journal_files(&journal)
            .iter()
            .map(|(_, text)| text.lines().count())
            .sum::<usize>();
        let received = std::fs::read_to_string(&out).unwrap_or_default();
        let logs = received
            .lines()
            .filter(|l| l.contains("\"signal\":\"log\""))
            .count();
        let metrics = received
            .lines()
            .any(|l| l.contains("\"signal\":\"metric\""));
        if journaled > 0 && logs >= journaled && metrics {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the receiver got {logs} of {journaled} events, metrics: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics_text = http_get(prometheus, "/metrics");
    agent.signal(libc::SIGTERM);
    let (status, lines, stderr) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "{stderr}");
    let stdout: String = lines.iter().map(|l| l.to_string() + "\n").collect();

    let places: [(&str, Vec<u8>); 6] = [
        ("journal", files_bytes(&journal)),
        ("OTLP payloads (raw protobuf)", std::fs::read(&raw).unwrap()),
        ("OTLP records (decoded)", std::fs::read(&out).unwrap()),
        ("Prometheus /metrics", metrics_text.into_bytes()),
        ("agent stdout", stdout.into_bytes()),
        ("agent logs (debug)", stderr.into_bytes()),
    ];
    // The search looks where the context went: the claims are there...
    for sub in ["alice", "mallory", "eve", "oscar"] {
        assert!(
            contains(&places[0].1, sub),
            "{sub}'s claims are not in the journal"
        );
        assert!(
            contains(&places[1].1, sub),
            "{sub}'s claims are not in the OTLP payloads"
        );
    }
    // ...the tokens and their signatures are not.
    for t in &tokens {
        let signature = t.rsplit('.').next().unwrap();
        for (place, bytes) in &places {
            assert!(!contains(bytes, t), "a raw token is in the {place}");
            assert!(
                !contains(bytes, signature),
                "a token's signature is in the {place}"
            );
        }
    }
    eprintln!(
        "searched {} for {} tokens: {} bytes in all",
        places
            .iter()
            .map(|(p, _)| *p)
            .collect::<Vec<_>>()
            .join(", "),
        tokens.len(),
        places.iter().map(|(_, b)| b.len()).sum::<usize>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
