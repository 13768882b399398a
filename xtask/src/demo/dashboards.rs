//! `demo --check-dashboards`: Debian's Prometheus scrapes the agent every second while the
//! faults run; then every panel target's `expr` in `dashboards/*.json` is evaluated through
//! Prometheus' HTTP API with Grafana's variables filled in, and must return at least one series
//! with a number. Every `agent_*` name the dashboards use must be one the agent's `/metrics`
//! serves, so dashboards and agent cannot drift apart.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::procs::{self, Proc, interrupted};

/// Grafana's `$__rate_interval` is at least four scrape intervals; the demo's phases are
/// longer than this, so the last one's counters still move inside it.
const RATE_INTERVAL: &str = "30s";

/// Debian's `prometheus` with a database of the demo's own, scraping the agent every second.
pub struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
    started: Instant,
}

impl Prometheus {
    pub fn start(dir: &Path, agent_metrics: SocketAddr) -> Result<Prometheus> {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "# Written by `cargo xtask demo --check-dashboards`.\n\
                 global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: agent\n    static_configs:\n      - targets: ['{agent_metrics}']\n"
            ),
        )?;
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = dir.join("prometheus.log");
        let proc = procs::spawn(
            "prometheus",
            Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("prometheus-data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?),
            Duration::from_secs(10),
        )?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(30);
        loop {
            if interrupted() {
                bail!("interrupted");
            }
            if matches!(http_get(addr, "/-/ready"), Ok((200, _))) {
                break;
            }
            if Instant::now() >= deadline {
                bail!("prometheus not ready within 30 s; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("demo: prometheus http://{addr} scrapes the agent every second");
        Ok(Prometheus {
            _proc: proc,
            addr,
            started,
        })
    }

    /// An instant query; the API's `data` on success.
    fn query(&self, promql: &str) -> Result<Value> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {status} with no JSON: {body}"))?;
        if v["status"] != "success" {
            bail!(
                "{}: {}",
                v["errorType"].as_str().unwrap_or("error"),
                v["error"].as_str().unwrap_or(&body)
            );
        }
        Ok(v["data"].clone())
    }
}

/// A panel target's expression, with where it comes from.
struct Target {
    file: String,
    panel: String,
    expr: String,
}

/// Evaluates every dashboard expression and checks their metric names against the agent's
/// `/metrics`; prints a table either way, fails if anything came back empty or in error.
pub fn check(root: &Path, prometheus: &Prometheus, agent_metrics: SocketAddr) -> Result<()> {
    let (targets, variable_queries) = dashboard_targets(&root.join("dashboards"))?;
    let range = format!("{}s", prometheus.started.elapsed().as_secs().max(60));
    println!(
        "\n== dashboards: {} panel expressions against Prometheus ($instance=.*, $__rate_interval={RATE_INTERVAL}, $__range={range}) ==",
        targets.len()
    );
    let mut failures = Vec::new();
    match prometheus.query("up{job=\"agent\"}") {
        Ok(data) if series_with_numbers(&data) > 0 => {}
        other => failures.push(format!("prometheus did not scrape the agent: {other:?}")),
    }
    println!("{:<20} {:<52} {:>6}", "dashboard", "panel", "series");
    for t in &targets {
        let result = grafana_vars(&t.expr, &range).and_then(|q| prometheus.query(&q));
        let cell = match &result {
            Ok(data) => {
                let n = series_with_numbers(data);
                if n == 0 {
                    failures.push(format!("{} / {}: no data: {}", t.file, t.panel, t.expr));
                    "NO DATA".to_owned()
                } else {
                    n.to_string()
                }
            }
            Err(e) => {
                failures.push(format!("{} / {}: {e:#}: {}", t.file, t.panel, t.expr));
                "ERROR".to_owned()
            }
        };
        println!("{:<20} {:<52} {cell:>6}", t.file, t.panel);
    }

    // The names: every agent_* name in an expression or a variable's query.
    let (status, text) = http_get(agent_metrics, "/metrics")?;
    if status != 200 {
        bail!("the agent's /metrics answered {status}");
    }
    let served = served_names(&text);
    let mut used = BTreeSet::new();
    for text in targets
        .iter()
        .map(|t| t.expr.as_str())
        .chain(variable_queries.iter().map(String::as_str))
    {
        used.extend(metric_names(text));
    }
    let drifted: Vec<&String> = used.iter().filter(|n| !served.contains(*n)).collect();
    for name in &drifted {
        failures.push(format!(
            "{name} is in a dashboard but not in the agent's /metrics"
        ));
    }
    // The other way round is no error: not every metric needs a panel.
    let families: BTreeSet<String> = served.iter().map(|n| family(n).to_owned()).collect();
    let used_families: BTreeSet<String> = used.iter().map(|n| family(n).to_owned()).collect();
    let unshown: Vec<&String> = families.difference(&used_families).collect();
    println!(
        "metric names: {} used by the dashboards, all served by the agent{}",
        used.len(),
        if drifted.is_empty() {
            ""
        } else {
            " EXCEPT those below"
        }
    );
    if !unshown.is_empty() {
        println!(
            "agent metrics no panel shows: {}",
            unshown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !failures.is_empty() {
        bail!("dashboard check failed:\n  {}", failures.join("\n  "));
    }
    println!("dashboards: every panel returned data");
    Ok(())
}

/// Every panel target's expression (rows' panels included) and every variable's query, of
/// every `*.json` in `dir`.
fn dashboard_targets(dir: &Path) -> Result<(Vec<Target>, Vec<String>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut targets = Vec::new();
    let mut queries = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)?;
        let dashboard: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        collect_panels(&file, &dashboard["panels"], &mut targets);
        for var in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let q = &var["query"];
            if let Some(q) = q["query"].as_str().or(q.as_str())
                && var["type"] == "query"
            {
                queries.push(q.to_owned());
            }
        }
    }
    if targets.is_empty() {
        bail!("no panel expressions in {}", dir.display());
    }
    Ok((targets, queries))
}

fn collect_panels(file: &str, panels: &Value, out: &mut Vec<Target>) {
    for panel in panels.as_array().into_iter().flatten() {
        collect_panels(file, &panel["panels"], out);
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(Target {
                    file: file.to_owned(),
                    panel: panel["title"].as_str().unwrap_or("(untitled)").to_owned(),
                    expr: expr.to_owned(),
                });
            }
        }
    }
}

/// The expression as Grafana would send it for the demo's instance and range.
fn grafana_vars(expr: &str, range: &str) -> Result<String> {
    let mut q = expr.to_owned();
    for (var, value) in [
        ("__rate_interval", RATE_INTERVAL),
        ("__interval", "5s"),
        ("__range", range),
        ("instance", ".*"),
    ] {
        q = q
            .replace(&format!("${{{var}}}"), value)
            .replace(&format!("${var}"), value);
    }
    if q.contains('$') {
        bail!("a variable the demo does not know");
    }
    Ok(q)
}

/// Series in a query's result with a value that is a number (histogram_quantile over no
/// observations gives NaN: Grafana draws nothing for it).
fn series_with_numbers(data: &Value) -> usize {
    let finite = |v: &Value| {
        v[1].as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|s| finite(&s["value"])).count()),
        Some("scalar") => usize::from(finite(&data["result"])),
        _ => 0,
    }
}

/// `agent_*` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("agent_") {
        let before = rest[..at].chars().next_back();
        let name: String = rest[at..].chars().take_while(|&c| is_name(c)).collect();
        if !before.is_some_and(is_name) {
            names.insert(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
    names
}

/// Sample and family names in Prometheus text (`agent_x_bucket` and `agent_x` alike).
fn served_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(name.to_owned());
        }
    }
    names
}

/// A sample name's family: `_bucket`, `_count`, `_sum` dropped (counters keep `_total`, as
/// their `# TYPE` line does).
fn family(name: &str) -> &str {
    ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// GET over HTTP/1.0, so the answer is never chunked: it ends where the connection does.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading http://{addr}{path}"))?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("http://{addr}{path}: no HTTP status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn grafana_variables_are_filled_in() {
        let q = grafana_vars(
            "sum(rate(agent_x_total{instance=~\"$instance\"}[$__rate_interval])) + sum(increase(agent_y[${__range}]))",
            "90s",
        )
        .unwrap();
        assert_eq!(
            q,
            "sum(rate(agent_x_total{instance=~\".*\"}[30s])) + sum(increase(agent_y[90s]))"
        );
        assert!(grafana_vars("agent_x{job=\"$job\"}", "90s").is_err());
    }

    #[test]
    fn names_are_found_in_expressions_and_in_metrics_text() {
        let names = metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(agent_a_seconds_bucket{x=\"y\"}[1m]))) / agent_b_total or my_agent_c",
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["agent_a_seconds_bucket", "agent_b_total"]
        );
        let served = served_names(
            "# HELP agent_a_seconds x\n# TYPE agent_a_seconds histogram\nagent_a_seconds_bucket{le=\"1\"} 1\nagent_b_total 3\n",
        );
        assert!(served.contains("agent_a_seconds_bucket") && served.contains("agent_a_seconds"));
        assert!(served.contains("agent_b_total"));
        assert_eq!(family("agent_a_seconds_bucket"), "agent_a_seconds");
    }

    #[test]
    fn nan_is_no_data() {
        let data: Value = serde_json::from_str(
            r#"{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]},{"metric":{},"value":[1,"0"]}]}"#,
        )
        .unwrap();
        assert_eq!(series_with_numbers(&data), 1);
    }
}
