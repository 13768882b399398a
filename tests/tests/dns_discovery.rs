//! Discovery: endpoints that follow a zone served by a real DNS server (dnsmasq) on loopback,
//! and a canary subset that follows an endpoints file (Prometheus file_sd) as a ConfigMap
//! volume swaps it.
//!
//! The pods are grpcio servers (`tests/peers/grpcpy/server.py`) on 127.0.0.2, .3, ... (all
//! loopback), one port; the agent's cluster names them by `orders.test:PORT` (A records) or
//! `_grpc._tcp.orders.test` (SRV), and a grpcio client (`client.py load`) calls through it
//! while the test changes the zone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpListener},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use e2e::{
    agent_bin,
    dns::DnsServer,
    proxy::{
        AgentProxy, JsonChild, config_file, grpcio_client, grpcio_server_with, load_summary, metric,
    },
};
use serde_json::Value;

/// A port free on every loopback address the test uses (each pod listens on its own).
fn free_port(ips: &[&str]) -> u16 {
    'next: for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.2:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for ip in ips {
            if TcpListener::bind((ip.parse::<IpAddr>().unwrap(), port)).is_err() {
                continue 'next;
            }
        }
        return port;
    }
    panic!("no port free on all of {ips:?}")
}

/// The pods: a grpcio server per address.
struct Pods {
    port: u16,
    running: BTreeMap<String, JsonChild>,
}

impl Pods {
    fn start(&mut self, ip: &str) -> SocketAddr {
        let listen = format!("{ip}:{}", self.port);
        let (server, addr) = grpcio_server_with(&["--listen", &listen]);
        self.running.insert(ip.to_owned(), server);
        addr
    }

    /// SIGTERM: the server stops taking calls and gives in-flight ones 1 s (a pod's
    /// graceful shutdown, after it left the endpoints).
    fn stop(&mut self, ip: &str) {
        let server = self.running.remove(ip).unwrap();
        server.signal(libc::SIGTERM);
        let (status, _, stderr) = server.finish(Duration::from_secs(10));
        assert!(status.success(), "server {ip}: {stderr}");
    }

    fn addr(&self, ip: &str) -> SocketAddr {
        format!("{ip}:{}", self.port).parse().unwrap()
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "e2e-dns-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The agent's endpoints of cluster `svc` by address: `false` active, `true` draining.
fn endpoints(agent: &mut AgentProxy) -> BTreeMap<String, bool> {
    agent.stats()["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cluster"] == "svc")
        .map(|e| {
            (
                e["endpoint"].as_str().unwrap().to_owned(),
                e["draining"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The active endpoints' addresses.
fn active(agent: &mut AgentProxy) -> Vec<String> {
    endpoints(agent)
        .into_iter()
        .filter(|(_, draining)| !draining)
        .map(|(a, _)| a)
        .collect()
}

/// Waits until the agent's active endpoints are `want` (addresses), and returns how long it
/// took.
fn wait_active(agent: &mut AgentProxy, want: &[SocketAddr]) -> Duration {
    let mut want: Vec<String> = want.iter().map(ToString::to_string).collect();
    want.sort();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        if active(agent) == want {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "the agent's endpoints are {:?}, not {want:?}, 15 s after the change",
        endpoints(agent)
    )
}

/// Waits until nothing of `addr` is left in the agent (no endpoint, draining or not).
fn wait_gone(agent: &mut AgentProxy, addr: SocketAddr) {
    let t = Instant::now();
    while endpoints(agent).contains_key(&addr.to_string()) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{addr} still drains 15 s after it left DNS: {:?}",
            endpoints(agent)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Calls a server finished (its own count).
fn served(server: SocketAddr) -> u64 {
    let c = grpcio_client(server, "stats", &[]);
    let (_, lines, stderr) = c.finish(Duration::from_secs(30));
    lines
        .into_iter()
        .find(|l| l["event"] == "stats")
        .unwrap_or_else(|| panic!("no stats from {server}: {stderr}"))["calls_finished"]
        .as_u64()
        .unwrap()
}

/// Waits until `server` has served calls beyond `before`.
fn wait_served(server: SocketAddr, before: u64) {
    let t = Instant::now();
    while served(server) <= before {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{server} got no call in 15 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `agent status --output json`.
fn status(agent: &AgentProxy) -> Value {
    let out = Command::new(agent_bin())
        .args([
            "status",
            "--output",
            "json",
            "--api",
            agent.ready["api"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("agent status: {e}: {out:?}"))
}

fn agent_for(dns: &DnsServer, endpoints: &str) -> (AgentProxy, PathBuf) {
    let dir = temp_dir("agent");
    let config = config_file(
        &dir,
        &format!(
            r#"[[cluster]]
name = "svc"
endpoints = [{endpoints:?}]
[cluster.dns]
min_refresh = "100ms"
max_refresh = "1s"

[dns]
servers = ["{dns}"]
timeout = "300ms"
attempts = 1

[breakers.endpoint]
consecutive_failures = 3
open_for = "60s"

[export]
prometheus_listen = "127.0.0.1:0"
"#,
            dns = dns.addr(),
        ),
    );
    let agent = AgentProxy::start(&["--config", config.to_str().unwrap()]);
    (agent, dir)
}

/// Scale up, scale down and a pod replaced while calls run: every call succeeds, each address
/// is an endpoint with its own breaker, the changes show within about a TTL, and a DNS server
/// that stops answering leaves the endpoints as they were (the failures counted in the
/// status API and the metrics).
#[test]
#[ignore = "needs root-less dnsmasq, dig, grpcio and curl: cargo xtask test"]
fn the_endpoints_follow_the_zone_under_load_without_a_failed_call() {
    let all = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
    let mut pods = Pods {
        port: free_port(&all),
        running: BTreeMap::new(),
    };
    let dns = DnsServer::start();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        pods.start(ip);
    }
    dns.set_addresses("orders.test", &ips(&["127.0.0.2", "127.0.0.3"]));
    let name = format!("orders.test:{}", pods.port);
    let (mut agent, dir) = agent_for(&dns, &name);
    // The first answer is in before the agent says it is ready.
    assert_eq!(
        active(&mut agent),
        [
            pods.addr("127.0.0.2").to_string(),
            pods.addr("127.0.0.3").to_string()
        ]
    );

    // At least 25 s of calls (4 at a time, 5 ms apart), across every change below.
    let mut load = grpcio_client(
        agent.addr,
        "load",
        &[
            "--count",
            "20000",
            "--concurrency",
            "4",
            "--interval-ms",
            "5",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));

    // Scale up: the new pod serves, then joins DNS.
    pods.start("127.0.0.4");
    let before = served(pods.addr("127.0.0.4"));
    dns.set_addresses(
        "orders.test",
        &ips(&["127.0.0.2", "127.0.0.3", "127.0.0.4"]),
    );
    let up = wait_active(
        &mut agent,
        &[
            pods.addr("127.0.0.2"),
            pods.addr("127.0.0.3"),
            pods.addr("127.0.0.4"),
        ],
    );
    wait_served(pods.addr("127.0.0.4"), before);
    eprintln!("scale up seen after {up:?}");

    // Scale down: out of DNS first; the pod stops once the agent let it go.
    dns.set_addresses("orders.test", &ips(&["127.0.0.2", "127.0.0.4"]));
    let down = wait_active(
        &mut agent,
        &[pods.addr("127.0.0.2"), pods.addr("127.0.0.4")],
    );
    wait_gone(&mut agent, pods.addr("127.0.0.3"));
    pods.stop("127.0.0.3");
    eprintln!("scale down seen after {down:?}");

    // A pod replaced: .5 in, .2 out, in one change.
    pods.start("127.0.0.5");
    dns.set_addresses("orders.test", &ips(&["127.0.0.4", "127.0.0.5"]));
    let replaced = wait_active(
        &mut agent,
        &[pods.addr("127.0.0.4"), pods.addr("127.0.0.5")],
    );
    wait_gone(&mut agent, pods.addr("127.0.0.2"));
    pods.stop("127.0.0.2");
    eprintln!("replacement seen after {replaced:?}");

    // The DNS server stops answering: lookups fail, the endpoints stay, calls go on.
    dns.pause();
    let t = Instant::now();
    let failed = loop {
        let s = agent.stats();
        let n = &s["discovery"][0];
        if n["failed"].as_u64().unwrap() >= 2 {
            break n.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no failed lookup: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(failed["addresses"].as_array().unwrap().len(), 2, "{failed}");
    assert!(!failed["last_error"].is_null(), "{failed}");
    assert_eq!(
        active(&mut agent),
        [
            pods.addr("127.0.0.4").to_string(),
            pods.addr("127.0.0.5").to_string()
        ]
    );
    let text = agent.metrics();
    let series = |result: &str| {
        format!(
            r#"agent_discovery_lookups_total{{cluster="svc",name="{name}",result="{result}",source="dns""#
        )
    };
    assert!(metric(&text, &series("failed")) >= 2.0, "{text}");
    assert!(metric(&text, &series("answered")) >= 4.0, "{text}");
    assert_eq!(
        metric(
            &text,
            r#"agent_upstream_endpoints{cluster="svc",state="active""#
        ),
        2.0
    );
    let st = status(&agent);
    assert!(st["discovery"][0]["failed"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(st["discovery"][0]["name"], name.as_str(), "{st}");
    assert!(
        !st["discovery"][0]["last_error"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{st}"
    );
    dns.resume();
    assert!(
        load.try_status().is_none(),
        "the load ended before the last change: make it longer"
    );
    let summary = load_summary(load);
    assert_eq!(summary["codes"]["OK"], 20000, "{summary}");

    // Each address has its own breaker: .4 fails, its breaker opens, .5's stays closed and
    // takes the calls.
    let c = grpcio_client(pods.addr("127.0.0.4"), "control", &["--code", "INTERNAL"]);
    assert!(c.finish(Duration::from_secs(30)).0.success());
    let _ = load_summary(grpcio_client(
        agent.addr,
        "load",
        &["--count", "40", "--expect-codes", "OK,INTERNAL"],
    ));
    let breakers = agent.stats()["breakers"].clone();
    let state = |addr: SocketAddr| {
        breakers
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["scope"] == "endpoint" && b["name"] == format!("svc/{addr}"))
            .unwrap_or_else(|| panic!("no breaker of {addr}: {breakers}"))["state"]
            .clone()
    };
    assert_eq!(state(pods.addr("127.0.0.4")), "open", "{breakers}");
    assert_eq!(state(pods.addr("127.0.0.5")), "closed", "{breakers}");
    let after = load_summary(grpcio_client(agent.addr, "load", &["--count", "20"]));
    assert_eq!(after["codes"]["OK"], 20, "{after}");

    let _ = agent.terminate(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(dir);
}

/// An SRV name: each target at its own port is an endpoint; targets come and go with the
/// records; no records at all drains the cluster and calls get UNAVAILABLE saying so.
#[test]
#[ignore = "needs dnsmasq, dig and grpcio: cargo xtask test"]
fn an_srv_name_gives_one_endpoint_per_target_and_port() {
    let dns = DnsServer::start();
    let (_a, a) = grpcio_server_with(&["--listen", "127.0.0.2:0"]);
    let (_b, b) = grpcio_server_with(&["--listen", "127.0.0.3:0"]);
    let (_c, c) = grpcio_server_with(&["--listen", "127.0.0.4:0"]);
    dns.set_addresses("a.orders.test", &[a.ip()]);
    dns.set_addresses("b.orders.test", &[b.ip()]);
    dns.set_addresses("c.orders.test", &[c.ip()]);
    dns.set_srv(
        "_grpc._tcp.orders.test",
        &[("a.orders.test", a.port()), ("b.orders.test", b.port())],
    );
    let (mut agent, dir) = agent_for(&dns, "_grpc._tcp.orders.test");
    let mut want = vec![a.to_string(), b.to_string()];
    want.sort();
    assert_eq!(active(&mut agent), want);
    let ok = load_summary(grpcio_client(agent.addr, "load", &["--count", "40"]));
    assert_eq!(ok["codes"]["OK"], 40, "{ok}");
    assert!(served(a) > 0 && served(b) > 0);

    dns.set_srv(
        "_grpc._tcp.orders.test",
        &[("b.orders.test", b.port()), ("c.orders.test", c.port())],
    );
    wait_active(&mut agent, &[b, c]);
    let before = served(c);
    let ok = load_summary(grpcio_client(agent.addr, "load", &["--count", "40"]));
    assert_eq!(ok["codes"]["OK"], 40, "{ok}");
    assert!(served(c) > before);

    // No records: an answer, not a failure; the endpoints drain and calls are refused at once.
    dns.set_srv("_grpc._tcp.orders.test", &[]);
    wait_active(&mut agent, &[]);
    let refused = load_summary(grpcio_client(
        agent.addr,
        "load",
        &["--count", "5", "--expect-codes", "UNAVAILABLE"],
    ));
    assert_eq!(refused["codes"]["UNAVAILABLE"], 5, "{refused}");
    let details = refused["details"]["UNAVAILABLE"][0].as_str().unwrap();
    assert!(details.contains("no endpoint"), "{details}");
    let s = agent.stats();
    assert!(s["discovery"][0]["empty"].as_u64().unwrap() >= 1, "{s}");

    let _ = agent.terminate(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(dir);
}

/// Writes `content` as a Kubernetes ConfigMap volume does: a new timestamped directory, then
/// the `..data` symlink swapped to it by rename, `endpoints.yaml` a symlink through `..data`.
fn configmap_write(dir: &std::path::Path, content: &str) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let version = format!(
        "..v{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    std::fs::create_dir_all(dir.join(&version)).unwrap();
    std::fs::write(dir.join(&version).join("endpoints.yaml"), content).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("endpoints.yaml");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/endpoints.yaml", &link).unwrap();
    }
}

fn groups(canary: &[SocketAddr], stable: &[SocketAddr]) -> String {
    let list = |v: &[SocketAddr]| {
        v.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "- targets: [{}]\n  labels: {{track: canary}}\n- targets: [{}]\n  labels: {{track: stable}}\n",
        list(canary),
        list(stable)
    )
}

/// A canary subset from an endpoints file: its targets with `track: canary` are the subset's
/// endpoints (with the subset's breaker), the file swapped as a ConfigMap volume is (scale
/// up, a pod replaced) under load with no failed call, and a file that does not parse keeps
/// the endpoints it gave, counted.
#[test]
#[ignore = "needs grpcio: cargo xtask test"]
fn a_canary_subset_follows_its_endpoints_file() {
    let mut pods = Pods {
        port: free_port(&["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]),
        running: BTreeMap::new(),
    };
    for ip in ["127.0.0.2", "127.0.0.3"] {
        pods.start(ip);
    }
    let dir = temp_dir("file-sd");
    let volume = dir.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let (stable, canary) = (pods.addr("127.0.0.2"), pods.addr("127.0.0.3"));
    // The stable pod is also listed, with another label: it is not the canary's.
    configmap_write(&volume, &groups(&[canary], &[stable]));
    let file = volume.join("endpoints.yaml");
    let config = config_file(
        &dir,
        &format!(
            r#"[[cluster]]
name = "svc"
endpoints = ["{stable}"]
[[cluster.subset]]
name = "canary"
endpoints_file = {file:?}
match_labels = {{ track = "canary" }}
"#,
            file = file.to_str().unwrap()
        ),
    );
    let mut agent = AgentProxy::start(&["--config", config.to_str().unwrap()]);
    let subsets = |agent: &mut AgentProxy| -> BTreeMap<String, String> {
        agent.stats()["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["draining"] == false)
            .map(|e| {
                (
                    e["endpoint"].as_str().unwrap().to_owned(),
                    e["subset"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let wait_subsets = |agent: &mut AgentProxy, want: &[(SocketAddr, &str)]| {
        let want: BTreeMap<String, String> = want
            .iter()
            .map(|(a, s)| (a.to_string(), (*s).to_owned()))
            .collect();
        let t = Instant::now();
        while subsets(agent) != want {
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "{:?}, not {want:?}",
                subsets(agent)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t.elapsed()
    };
    wait_subsets(&mut agent, &[(stable, "default"), (canary, "canary")]);

    let mut load = grpcio_client(
        agent.addr,
        "load",
        &[
            "--count",
            "10000",
            "--concurrency",
            "4",
            "--interval-ms",
            "5",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    // Scale the canary up.
    let canary_2 = pods.start("127.0.0.4");
    configmap_write(&volume, &groups(&[canary, canary_2], &[stable]));
    let up = wait_subsets(
        &mut agent,
        &[
            (stable, "default"),
            (canary, "canary"),
            (canary_2, "canary"),
        ],
    );
    eprintln!("file change seen after {up:?}");
    // A file that does not parse: nothing changes, the failure is counted.
    configmap_write(&volume, "- targets: [\"127.0.0.9:1\"\n  labels: {track");
    let t = Instant::now();
    loop {
        let s = agent.stats();
        if s["discovery"][0]["failed"].as_u64().unwrap() >= 1 {
            assert_eq!(s["discovery"][0]["source"], "file", "{s}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no failed read: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(subsets(&mut agent).len(), 3);
    // A canary pod replaced: .3 leaves the file, .5 comes; .3 stops once let go.
    let canary_3 = pods.start("127.0.0.5");
    configmap_write(&volume, &groups(&[canary_2, canary_3], &[stable]));
    wait_subsets(
        &mut agent,
        &[
            (stable, "default"),
            (canary_2, "canary"),
            (canary_3, "canary"),
        ],
    );
    wait_gone(&mut agent, canary);
    pods.stop("127.0.0.3");
    assert!(load.try_status().is_none(), "the load ended too soon");
    let summary = load_summary(load);
    assert_eq!(summary["codes"]["OK"], 10000, "{summary}");
    // The canary's endpoints have the subset's breaker over them.
    let breakers = agent.stats()["breakers"].clone();
    assert!(
        breakers
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["scope"] == "subset" && b["name"] == "svc/canary"),
        "{breakers}"
    );
    let _ = agent.terminate(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(dir);
}

/// The fixture itself: each change is served when its call returns, with TTL 1 s, and the
/// A records survive the restarts that SRV changes take.
#[test]
#[ignore = "needs dnsmasq and dig: cargo xtask test"]
fn dns_fixture_serves_changes() {
    let ips = |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|s| s.parse().unwrap()).collect() };
    let started = Instant::now();
    let dns = DnsServer::start();
    eprintln!("dnsmasq on {} after {:?}", dns.addr(), started.elapsed());
    assert_eq!(dns.answer("orders.test", "A").rcode, "NXDOMAIN");

    let timed = |what: &str, change: &dyn Fn()| {
        let t = Instant::now();
        change();
        let took = t.elapsed();
        eprintln!("{what}: served after {took:?}");
        took
    };

    timed("3 addresses", &|| {
        dns.set_addresses("orders.test", &ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]))
    });
    assert_eq!(
        dns.query("orders.test", "A"),
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    );
    let a = dns.answer("orders.test", "A");
    assert_eq!(a.rcode, "NOERROR");
    assert!(a.records.iter().all(|r| r.ttl == 1), "{a:?}");
    // A name with A records only: NODATA for AAAA, not NXDOMAIN.
    let aaaa = dns.answer("orders.test", "AAAA");
    assert_eq!((aaaa.rcode.as_str(), aaaa.records.len()), ("NOERROR", 0));

    // One replaced, one dropped, and an IPv6 address.
    timed("2 addresses + 1 IPv6", &|| {
        dns.set_addresses("orders.test", &ips(&["10.0.0.1", "10.0.0.4", "fd00::7"]))
    });
    assert_eq!(dns.query("orders.test", "A"), ["10.0.0.1", "10.0.0.4"]);
    assert_eq!(dns.query("orders.test", "AAAA"), ["fd00::7"]);
    timed("2 addresses", &|| {
        dns.set_addresses("orders.test", &ips(&["10.0.0.1", "10.0.0.4"]))
    });
    assert_eq!(dns.query("orders.test", "AAAA"), Vec::<String>::new());

    // SRV targets whose addresses come from set_addresses; they survive the restart.
    dns.set_addresses("a.orders.test", &ips(&["10.0.1.1"]));
    dns.set_addresses("b.orders.test", &ips(&["10.0.1.2"]));
    let srv = "_grpc._tcp.orders.test";
    timed("SRV with 2 targets (restart)", &|| {
        dns.set_srv(srv, &[("a.orders.test", 50051), ("b.orders.test", 50052)])
    });
    assert_eq!(
        dns.query(srv, "SRV"),
        ["0 0 50051 a.orders.test.", "0 0 50052 b.orders.test."]
    );
    let srv_answer = dns.answer(srv, "SRV");
    assert!(
        srv_answer.records.iter().all(|r| r.ttl == 1),
        "{srv_answer:?}"
    );
    assert_eq!(dns.query("a.orders.test", "A"), ["10.0.1.1"]);
    assert_eq!(dns.query("orders.test", "A"), ["10.0.0.1", "10.0.0.4"]);
    let restarts: Vec<Duration> = (0..5)
        .map(|i| {
            timed("SRV change (restart)", &|| {
                dns.set_srv(srv, &[("a.orders.test", 50051 + i % 2)])
            })
        })
        .collect();
    eprintln!("SRV restarts: {restarts:?}");
    assert_eq!(dns.query(srv, "SRV"), ["0 0 50051 a.orders.test."]);

    // Removed while names below it remain: an empty non-terminal, NODATA (RFC 8020).
    timed("no addresses", &|| dns.set_addresses("orders.test", &[]));
    assert_eq!(dns.query("orders.test", "A"), Vec::<String>::new());
    assert_eq!(dns.answer("orders.test", "A").rcode, "NOERROR");
    dns.set_srv(srv, &[]);
    assert_eq!(dns.answer(srv, "SRV").rcode, "NXDOMAIN");
    assert_eq!(dns.query("b.orders.test", "A"), ["10.0.1.2"]);
    // Nothing left below it: NXDOMAIN, with no SOA (nothing for a resolver to cache).
    dns.set_addresses("a.orders.test", &[]);
    dns.set_addresses("b.orders.test", &[]);
    for name in ["orders.test", "a.orders.test"] {
        let answer = dns.answer(name, "A");
        assert_eq!(
            (answer.rcode.as_str(), answer.records.len()),
            ("NXDOMAIN", 0)
        );
    }

    // Dropped: dnsmasq gone from the port, its directory removed.
    let addr = dns.addr();
    let log = dns.log();
    assert!(log.contains("query[A] orders.test"), "{log}");
    drop(dns);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "dnsmasq still on {addr}"
    );
    let ours = format!("e2e-dns-{}-", std::process::id());
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&ours))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
