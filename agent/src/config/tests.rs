#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use super::*;

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
    assert_eq!(
        cluster.endpoints,
        ["127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]
    );
    assert_eq!(cluster.endpoint_subset, [0, 0, 1]);
    // Without subsets: one, unnamed, and no subset breaker.
    let plain = parse(MINIMAL).unwrap();
    assert!(plain.clusters[0].subsets.is_empty());
    assert_eq!(plain.clusters[0].endpoint_subset, [0]);
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
