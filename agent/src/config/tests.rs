#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::*;
use crate::config::proxy::Source;

fn errors(text: &str) -> Vec<ConfigError> {
    parse(text).expect_err("the config should be refused")
}

const MINIMAL: &str = r#"
[[listener]]
name = "in"
address = "127.0.0.1:15001"
[[listener.route]]
cluster = "c"

[[cluster]]
name = "c"
endpoints = ["127.0.0.1:50051"]
"#;

#[test]
fn the_annotated_example_parses() {
    let text = include_str!("../../../deploy/agent.example.toml");
    let c = parse(text).unwrap();
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.clusters.len(), 2);
    let routes = &c.listeners[0].routes;
    assert_eq!(routes[0].path_prefix, "/orders.v1.Orders/");
    assert_eq!(routes[1].authority.as_deref(), Some("payments.internal"));
    assert_eq!(c.clusters[routes[1].cluster].name, "payments");
    assert_eq!(c.timeouts.drain, Duration::from_secs(30));
    assert_eq!(c.limits.max_concurrent_streams, 100);
}

#[test]
fn minimal_config_gets_the_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.listeners[0].routes[0].path_prefix, "/");
    assert_eq!(c.clusters[0].max_connections_per_endpoint, 4);
    assert_eq!(c.clusters[0].connect_timeout, Duration::from_secs(2));
    assert_eq!(c.timeouts.header_read, Duration::from_secs(10));
}

#[test]
fn unknown_keys_and_bad_durations_name_their_line() {
    let text = MINIMAL.replace("name = \"in\"", "name = \"in\"\nadress = \"x\"");
    let e = errors(&text);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].line, 4, "{e:?}");
    assert!(e[0].message().contains("adress"), "{e:?}");

    let text = format!("{MINIMAL}\n[timeouts]\nidle = \"soon\"\n");
    let e = errors(&text);
    assert_eq!(e[0].line, 13, "{e:?}");
    assert!(e[0].message().contains("not a duration"), "{e:?}");
}

#[test]
fn every_semantic_problem_is_reported_with_its_line() {
    let text = r#"
[[listener]]
name = "in"
address = "localhost:80"
[[listener.route]]
path_prefix = "no-slash"
cluster = "missing"

[[cluster]]
name = "c"
endpoints = ["127.0.0.1:0", "not a host:1", "ok.example:50051"]
max_connections_per_endpoint = 0

[[cluster]]
name = "c"
endpoints = []
"#;
    let e = errors(text);
    let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
    assert_eq!(lines, [4, 6, 7, 11, 11, 12, 15, 16], "{e:#?}");
    assert!(e[0].message().contains("not IP:PORT"));
    assert!(e[2].message().contains("no [[cluster]] named \"missing\""));
    assert!(e[6].message().contains("defined twice"));
    assert!(e[7].message().contains("no endpoints"));
}

#[test]
fn no_listener_is_an_error() {
    let e = errors("[[cluster]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n");
    assert!(e[0].message().contains("no [[listener]]"), "{e:?}");
}

#[test]
fn quick_mode() {
    let c = quick(
        "127.0.0.1:15001".parse().unwrap(),
        &["127.0.0.1:50051".into(), "backend:50051".into()],
    )
    .unwrap();
    assert_eq!(c.clusters[0].endpoints.len(), 2);
    assert!(quick("127.0.0.1:1".parse().unwrap(), &["nope".into()]).is_err());
    assert!(quick("127.0.0.1:1".parse().unwrap(), &[]).is_err());
}

#[test]
fn positions_are_one_based() {
    assert_eq!(position("ab\ncd", 0), (1, 1));
    assert_eq!(position("ab\ncd", 4), (2, 2));
}

#[test]
fn tls_material_is_loaded_at_check_time() {
    let dir = std::env::temp_dir().join(format!("agent-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, "not a certificate\n").unwrap();
    std::fs::write(&key, "not a key either\n").unwrap();
    let text = MINIMAL.replace(
        "address = \"127.0.0.1:15001\"\n",
        &format!(
            "address = \"127.0.0.1:15001\"\n[listener.tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let e = errors(&text);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].line, 6, "{e:?}");
    assert!(e[0].message().contains("holds no certificate"), "{e:?}");
}

#[test]
fn subsets_label_their_endpoints() {
    let text = MINIMAL.replace(
        "endpoints = [\"127.0.0.1:50051\"]\n",
        "endpoints = [\"127.0.0.1:50051\", \"127.0.0.1:50052\"]\n\
         [[cluster.subset]]\nname = \"canary\"\nendpoints = [\"127.0.0.1:50053\"]\n",
    );
    let c = parse(&text).unwrap();
    let cluster = &c.clusters[0];
    assert_eq!(cluster.subsets, ["default", "canary"]);
    let listed: Vec<(&str, usize)> = cluster
        .endpoints
        .iter()
        .map(|e| (e.text.as_str(), e.subset))
        .collect();
    assert_eq!(
        listed,
        [
            ("127.0.0.1:50051", 0),
            ("127.0.0.1:50052", 0),
            ("127.0.0.1:50053", 1)
        ]
    );
    // Without subsets: one, unnamed, and no subset breaker.
    let plain = parse(MINIMAL).unwrap();
    assert!(plain.clusters[0].subsets.is_empty());
    assert_eq!(plain.clusters[0].endpoints[0].subset, 0);
}

#[test]
fn an_endpoint_in_two_subsets_is_refused() {
    let text = MINIMAL.replace(
        "endpoints = [\"127.0.0.1:50051\"]\n",
        "endpoints = [\"127.0.0.1:50051\"]\n\
         [[cluster.subset]]\nname = \"canary\"\nendpoints = [\"127.0.0.1:50051\"]\n",
    );
    let e = errors(&text);
    assert!(e[0].message().contains("listed twice"), "{e:?}");
}

#[test]
fn breaker_retry_and_context_mistakes_are_reported() {
    let text = format!(
        "{MINIMAL}\n[breakers.endpoint]\nfailure_ratio = 2.0\n[retries]\nmax_attempts = 0\n\
         [context.jwt]\nhmac_secret_file = \"/nonexistent/secret\"\n"
    );
    let e = errors(&text);
    let all: Vec<String> = e.iter().map(ConfigError::message).collect();
    assert!(all.iter().any(|m| m.contains("failure_ratio")), "{all:?}");
    assert!(all.iter().any(|m| m.contains("max_attempts")), "{all:?}");
    assert!(
        all.iter().any(|m| m.contains("/nonexistent/secret")),
        "{all:?}"
    );
    let text = format!("{MINIMAL}\n[breakers]\nresource_exhausted = \"maybe\"\n");
    assert!(
        errors(&text)[0].message().contains("resource_exhausted")
            || errors(&text)[0].message().contains("maybe")
    );
}

#[test]
fn breaker_and_context_errors_keep_their_type() {
    use crate::{
        breaker::{
            config::{BreakersError, Scope},
            policy::PolicyError,
        },
        context::ContextError,
    };

    let text = format!(
        "{MINIMAL}\n[breakers.client]\njitter = 2.0\n\
         [context.jwt]\nhmac_secret_file = \"/nonexistent/secret\"\n"
    );
    let e = errors(&text);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(
        e[0].kind,
        ConfigErrorKind::Breakers(BreakersError::ScopePolicy {
            scope: Scope::Client,
            class: "default".into(),
            problem: PolicyError::Ratio {
                key: "jitter",
                value: 2.0
            },
        })
    );
    assert_eq!(
        e[0].message(),
        "breakers (client scope, class \"default\"): jitter must be between 0 and 1, not 2"
    );
    let ConfigErrorKind::Context(context) = &e[1].kind else {
        panic!("not a context error: {e:?}");
    };
    assert!(
        matches!(context.error(), ContextError::ReadFile { .. }),
        "{context:?}"
    );
    assert!(
        e[1].message().starts_with("context: cannot read ")
            && e[1].message().contains("/nonexistent/secret"),
        "{e:?}"
    );
    // Equal to itself, cloned, and to the same problem found again.
    assert_eq!(e[1].clone(), e[1]);
    assert_eq!(errors(&text)[1], e[1]);
}

const INTERCEPT: &str = r#"
[intercept]
listen = "127.0.0.1:15001"
cgroups = ["/proc/self"]

[[intercept.destination]]
cidr = "10.96.0.0/12"
ports = [50051, 443]

[[intercept.destination]]
cidr = "fd00::7"
"#;

#[test]
fn intercept_alone_is_a_whole_config_with_a_passthrough_cluster() {
    // /proc/self has no cgroup.procs: the one error expected, at its place.
    let e = errors(INTERCEPT);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].message().contains("not a cgroup v2 directory"),
        "{e:?}"
    );
    assert_eq!((e[0].line, e[0].column), (4, 12));
    let root = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|m| crate::probes::h2_hooks::cgroup2_root(&m));
    let Some(root) = root else { return };
    let text = INTERCEPT.replace("/proc/self", root.to_str().unwrap());
    let c = parse(&text).unwrap();
    let i = c.intercept.as_ref().unwrap();
    assert_eq!(i.destinations.len(), 2);
    assert_eq!(i.destinations[0].ports, [443, 50051]);
    assert_eq!(i.destinations[1].net.to_string(), "fd00::7/128");
    assert_eq!(c.clusters.last().unwrap().name, "passthrough");
    assert!(c.listeners.is_empty());
}

#[test]
fn intercept_mistakes_are_placed() {
    let text = r#"
[intercept]
listen = "127.0.0.1:0"
listen6 = "127.0.0.1:15002"
own_mark = 0

[[intercept.destination]]
cidr = "10.96.0.0/33"
ports = [0]

[[cluster]]
name = "passthrough"
endpoints = ["127.0.0.1:50051"]
claims = [{ cidr = "10.96.0.10" }, { cidr = "10.96.0.10/32" }]
"#;
    let messages: Vec<String> = errors(text).iter().map(ToString::to_string).collect();
    let has = |want: &str| messages.iter().any(|m| m.contains(want));
    assert!(
        has("line 3, column 10: the intercept listeners need fixed ports"),
        "{messages:?}"
    );
    assert!(
        has("line 4, column 11: intercept.listen6 must be an IPv6"),
        "{messages:?}"
    );
    assert!(
        has("line 5, column 12: intercept.own_mark must not be 0"),
        "{messages:?}"
    );
    assert!(
        has("line 8, column 8: \"10.96.0.0/33\" is not an address or CIDR"),
        "{messages:?}"
    );
    assert!(has("port 0 in ports"), "{messages:?}");
    assert!(has("cannot be named \"passthrough\""), "{messages:?}");
    assert!(
        has("10.96.0.10/32 (every port) claimed by two clusters"),
        "{messages:?}"
    );
}

#[test]
fn claims_need_interception() {
    let text = format!("{MINIMAL}claims = [{{ cidr = \"10.0.0.0/8\", ports = [50051] }}]\n");
    let messages: Vec<String> = errors(&text).iter().map(ToString::to_string).collect();
    assert!(
        messages[0].contains("claims need an [intercept] section"),
        "{messages:?}"
    );
}

#[test]
fn endpoint_entries_are_addresses_dns_names_srv_names_or_files() {
    let text = MINIMAL.replace(
        "endpoints = [\"127.0.0.1:50051\"]\n",
        "endpoints = [\"127.0.0.1:50051\", \"orders.default.svc.cluster.local:50051\", \"_grpc._tcp.orders.default.svc\"]\n\
         dns = { min_refresh = \"500ms\", max_refresh = \"10s\", family = \"all\" }\n\
         [[cluster.subset]]\nname = \"canary\"\nendpoints_file = \"/etc/agent/canary.yaml\"\n\
         match_labels = { track = \"canary\" }\n\
         [dns]\nservers = [\"127.0.0.1:5353\"]\n",
    );
    let c = parse(&text).unwrap();
    let sources: Vec<&Source> = c.clusters[0].endpoints.iter().map(|e| &e.source).collect();
    assert!(matches!(sources[0], Source::Address(_)));
    assert!(
        matches!(sources[1], Source::Dns { host, port: 50051 } if host == "orders.default.svc.cluster.local")
    );
    assert!(matches!(sources[2], Source::Srv { name } if name == "_grpc._tcp.orders.default.svc"));
    assert!(
        matches!(sources[3], Source::File { match_labels, .. } if match_labels["track"] == "canary")
    );
    assert_eq!(c.clusters[0].endpoints[3].subset, 1);
    assert_eq!(c.clusters[0].dns.family, crate::config::dns::DnsFamily::All);
    assert_eq!(
        c.dns.servers,
        ["127.0.0.1:5353".parse::<SocketAddr>().unwrap()]
    );
}

#[test]
fn bad_discovery_and_upstream_tls_settings_are_refused_with_their_line() {
    for (extra, want) in [
        ("endpoints = [\"_grpc._udp.x\"]\n", "not an SRV name"),
        (
            "endpoints = [\"a.b:1\"]\ndns = { min_refresh = \"10s\", max_refresh = \"1s\" }\n",
            "min_refresh",
        ),
        (
            "endpoints = [\"a.b:1\"]\n[cluster.tls]\nca = \"/nonexistent/ca.pem\"\n",
            "not a readable file",
        ),
        (
            "endpoints = [\"a.b:1\"]\n[cluster.tls]\nca = \"/etc/hostname\"\ncert = \"/etc/hostname\"\n",
            "cert and key go together",
        ),
        (
            "endpoints = [\"a.b:1\"]\n[cluster.tls]\nca = \"/etc/hostname\"\n",
            "no CA certificate",
        ),
    ] {
        let text = MINIMAL.replace("endpoints = [\"127.0.0.1:50051\"]\n", extra);
        let e = errors(&text);
        assert!(
            e.iter().any(|e| e.line > 0 && e.message().contains(want)),
            "{extra}: {e:?}"
        );
    }
    let e = errors(&format!("{MINIMAL}\n[dns]\nservers = [\"nope\"]\n"));
    assert!(e[0].message().contains("dns.servers"), "{e:?}");
}
