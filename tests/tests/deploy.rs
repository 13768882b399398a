//! The Kubernetes manifests in `deploy/kubernetes/`: they validate against the Kubernetes
//! schemas (`kubernetes-validate --strict`, the current version it knows), the ConfigMap's
//! configuration passes `agent check-config`, and the DaemonSet's capability list is enough:
//! the agent run as root with only those capabilities (every other one dropped, as the
//! container runtime does) attaches every probe, proxies calls, and trips a breaker on a Go
//! upstream's GC pause (the uprobes are the probe that needs the most).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, process::Command, time::Duration};

use e2e::{
    agent_bin, go_peer, grpc_server,
    proxy::{AgentProxy, JsonChild, config_file},
    require_root, workspace_root,
};

fn manifests() -> Vec<PathBuf> {
    let dir = workspace_root().join("deploy/kubernetes");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    all.sort();
    all
}

#[test]
#[ignore = "needs kubernetes-validate (Python, from `cargo xtask setup`); run by `cargo xtask test`"]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let files = manifests();
    for kind in [
        "DaemonSet",
        "ConfigMap",
        "ServiceAccount",
        "Service",
        "Namespace",
        "Secret",
    ] {
        assert!(
            files.iter().any(|f| std::fs::read_to_string(f)
                .unwrap()
                .contains(&format!("kind: {kind}\n"))),
            "no {kind} in deploy/kubernetes"
        );
    }
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubernetes-validate (pip; cargo xtask setup installs it): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches(" passed for resource ").count(),
        files.len(),
        "{text}"
    );
    eprintln!("{}", text.trim());
}

/// `data.agent.toml` of the ConfigMap, unindented.
fn configmap_config() -> String {
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let (_, rest) = text
        .split_once("  agent.toml: |\n")
        .expect("the ConfigMap has data.agent.toml");
    rest.lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[ignore = "needs the agent binary (`cargo build -p agent`); run by `cargo xtask test`"]
fn the_configmaps_configuration_passes_check_config() {
    let dir = std::env::temp_dir().join(format!("e2e-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("admin-token");
    std::fs::write(&token, "t0ken").unwrap();
    let config = configmap_config().replace(
        "/etc/grpc-resilience-agent/admin/admin-token",
        token.to_str().unwrap(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(agent_bin())
        .args(["check-config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The DaemonSet's `capabilities.add`, as `setpriv` spells them (`+bpf,+perfmon,...`).
fn daemonset_capabilities() -> String {
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("add: ["))
        .expect("capabilities.add in the DaemonSet");
    let list = line.split_once('[').unwrap().1.trim_end_matches(']');
    list.split(',')
        .map(|c| format!("+{}", c.trim().trim_matches('"').to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
#[ignore = "needs root: loads eBPF programs; run by `cargo xtask test`"]
fn the_daemonsets_capabilities_are_enough_for_every_probe() {
    require_root();
    let caps = daemonset_capabilities();
    // A wrapper: the agent as root with only the DaemonSet's capabilities.
    let dir = std::env::temp_dir().join(format!("e2e-deploy-caps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wrapper = dir.join("agent");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set=-all,{caps} --inh-caps=-all --no-new-privs {} \"$@\"\n",
            agent_bin().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let bin = go_peer("grpcpeer", false);
    let (server, up) = grpc_server("127.0.0.1", &["-gc-every", "200ms"]);
    // Interception too, from a cgroup of this test's: its programs, SO_MARK and the listener.
    let cgroup = test_support::cgroup::cgroup2_root()
        .expect("a cgroup v2 hierarchy")
        .join(format!("e2e-deploy-caps-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).unwrap();
    let intercept_listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = config_file(
        &dir,
        &format!(
            "[[cluster]]\nname = \"svc\"\nendpoints = [\"{up}\"]\n[breakers.endpoint]\nopen_for = \"60s\"\n[signals]\nstw_threshold = \"1us\"\n\
             [intercept]\nlisten = \"{intercept_listen}\"\ncgroups = [{cgroup:?}]\n[[intercept.destination]]\ncidr = \"127.0.0.1\"\nports = [{}]\n",
            up.port()
        ),
    );
    let mut agent = JsonChild::spawn(
        "agent run (DaemonSet capabilities)",
        Command::new(&wrapper)
            .args([
                "run",
                "--api-listen",
                "127.0.0.1:0",
                "--print-breakers",
                "--print-outcomes",
                "--config",
            ])
            .arg(&config),
    );
    let ready = agent.wait_line(Duration::from_secs(30), |l| l["kind"] == "ready");
    assert_eq!(
        ready["intercept"]["listen"][0],
        intercept_listen.to_string(),
        "{ready}"
    );
    let probes = ready["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 3, "{ready}");
    assert!(
        probes
            .iter()
            .all(|p| p["attached"] == true && p.get("degraded").is_none()),
        "{ready}"
    );
    let proxy = AgentProxy {
        addr: ready["listeners"][0]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        ready: ready.clone(),
        process: agent,
    };
    let calls = Command::new(&bin)
        .args(["client", "-addr", &proxy.addr.to_string(), "-calls", "20"])
        .output()
        .unwrap();
    assert!(
        calls.status.success(),
        "{}",
        String::from_utf8_lossy(&calls.stderr)
    );
    let mut proxy = proxy;
    let intercepted = test_support::cgroup::command_in(Some(&cgroup), &bin)
        .args(["client", "-addr", &up.to_string(), "-calls", "5"])
        .output()
        .unwrap();
    assert!(
        intercepted.status.success(),
        "{}",
        String::from_utf8_lossy(&intercepted.stderr)
    );
    let seen = proxy.process.wait_line(Duration::from_secs(10), |l| {
        l["kind"] == "stream" && l["original_destination"] == up.to_string()
    });
    assert_eq!(seen["listener"], "intercept", "{seen}");
    let _ = std::fs::remove_dir(&cgroup);
    let trip = proxy.process.wait_line(Duration::from_secs(30), |l| {
        l["kind"] == "breaker" && l["breaker"]["reason"] == "go_stw"
    });
    assert_eq!(trip["upstream"]["pid"], server.pid(), "{trip}");
    let (status, _, stderr) = proxy.terminate(Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("Permission denied"), "{stderr}");
    eprintln!(
        "with only {caps}: every probe attached, interception attached and a connect steered, calls proxied, a Go GC pause tripped its endpoint"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
