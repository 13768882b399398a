//! The status API's CLI against a running agent: `agent status`, `agent breakers [--watch]`,
//! `agent events [--follow] [--since]`, `agent breaker trip|reset|get`, as tables and as JSON,
//! with their exit codes; and `agent status` against a stopped agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Command, Output},
    time::Duration,
};

use e2e::{
    agent_bin,
    proxy::{AgentProxy, JsonChild, config_file, grpcio_client, grpcio_server},
};
use serde_json::Value;

fn cli(api: &str, args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .env("AGENT_API", api)
        .env("AGENT_LOG", "warn")
        .output()
        .unwrap()
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs the agent binary (`cargo build -p agent`); run by `cargo xtask test`"]
fn the_cli_reads_and_drives_a_running_agent() {
    let (_server, up) = grpcio_server();
    let c = grpcio_client(up, "control", &["--code", "UNAVAILABLE"]);
    assert!(c.finish(Duration::from_secs(30)).0.success());
    let dir = std::env::temp_dir().join(format!("e2e-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("admin-token");
    std::fs::write(&token, "cli-test-admin-token\n").unwrap();
    let journal = dir.join("journal");
    let config = config_file(
        &dir,
        &format!(
            r#"
[[cluster]]
name = "svc"
endpoints = ["{up}"]
[breakers.endpoint]
consecutive_failures = 3
open_for = "60s"
[events]
journal = {journal:?}
[api]
admin_token_file = {token:?}
"#
        ),
    );
    let proxy = AgentProxy::start(&["--config", config.to_str().unwrap()]);
    let api = proxy.ready["api"].as_str().unwrap().to_owned();
    let endpoint = format!("endpoint svc/{up}");

    // status
    let out = cli(&api, &["status", "-o", "json"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let status = &json_lines(&out)[0];
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["journal"]["dir"], journal.display().to_string());
    assert_eq!(status["config_sha256"].as_str().unwrap().len(), 64);
    let out = cli(&api, &["status"]);
    let (table, _) = text(&out);
    assert!(
        out.status.success() && table.contains("SIGNAL") && table.contains("journal: "),
        "{table}"
    );

    // breakers: closed, then open after three failures
    let out = cli(&api, &["breakers", "-o", "json", "--scope", "endpoint"]);
    let list = json_lines(&out);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["state"], "closed");
    let mut follower = JsonChild::spawn(
        "agent events --follow",
        Command::new(agent_bin())
            .args(["events", "--follow", "-o", "json"])
            .env("AGENT_API", &api),
    );
    let load = grpcio_client(
        proxy.addr,
        "load",
        &["--count", "3", "--expect-codes", "UNAVAILABLE"],
    );
    assert!(load.finish(Duration::from_secs(60)).0.success());
    let trip = follower.wait_line(Duration::from_secs(30), |l| l["breaker"]["to"] == "open");
    assert_eq!(trip["seq"], 1);
    assert_eq!(trip["breaker"]["name"], endpoint);
    let out = cli(&api, &["breakers", "--not-closed"]);
    let (table, _) = text(&out);
    assert!(
        table.starts_with("BREAKER") && table.contains(&endpoint) && table.contains("open"),
        "{table}"
    );

    // events, as JSON and as a table, from a sequence number
    let out = cli(&api, &["events", "-o", "json"]);
    let events = json_lines(&out);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["breaker"]["reason"], "consecutive_failures");
    let out = cli(&api, &["events", "--since", "2"]);
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{:?}",
        text(&out)
    );

    // admin: refused without the token (exit 4, one line), then reset and trip with it
    let out = cli(&api, &["breaker", "reset", &endpoint]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("Unauthenticated"), "{err}");
    let token_arg = token.to_str().unwrap();
    let out = cli(
        &api,
        &[
            "breaker",
            "reset",
            &endpoint,
            "--token-file",
            token_arg,
            "-o",
            "json",
        ],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let r = &json_lines(&out)[0];
    assert_eq!(
        (r["changed"].as_bool(), r["breaker"]["state"].as_str()),
        (Some(true), Some("closed"))
    );
    let mut watcher = JsonChild::spawn(
        "agent breakers --watch",
        Command::new(agent_bin())
            .args(["breakers", "--watch", "-o", "json"])
            .env("AGENT_API", &api),
    );
    // The list first (every breaker, the endpoint's closed again), then transitions.
    watcher.wait_line(Duration::from_secs(30), |l| {
        l["scope"] == "endpoint" && l["state"] == "closed"
    });
    let out = cli(
        &api,
        &["breaker", "trip", &endpoint, "--token-file", token_arg],
    );
    let (table, err) = text(&out);
    assert!(
        out.status.success() && table.contains("tripped"),
        "{table} {err}"
    );
    let admin = watcher.wait_line(Duration::from_secs(30), |l| {
        l["breaker"]["reason"] == "admin" && l["breaker"]["to"] == "open"
    });
    assert_eq!(admin["seq"], 3, "{admin}");
    follower.wait_line(Duration::from_secs(30), |l| l["seq"] == 3);

    // get: one breaker; an unknown one is exit 1
    let out = cli(&api, &["breaker", "get", &endpoint, "-o", "json"]);
    assert_eq!(json_lines(&out)[0]["state"], "open");
    let out = cli(&api, &["breaker", "get", "no such breaker"]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));

    drop(watcher);
    drop(follower);
    let (status, _, stderr) = proxy.terminate(Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    // A stopped agent: exit 3 and one line that says why.
    let out = cli(&api, &["status"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach") && err.contains(&api), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
