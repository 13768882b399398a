//! The CLI of the status API: `agent status`, `agent breakers [--watch]`, `agent events
//! [--follow] [--since SEQ]`, `agent breaker trip|reset NAME`. Tables by default, `--output
//! json` for tools.
//!
//! Exit codes: 0 done; 1 the agent answered with an error (no such breaker, no journal, ...);
//! 3 the agent cannot be reached; 4 an admin call was refused (no token, a wrong one).

use std::{path::PathBuf, time::Duration};

use serde_json::{Value, json};
use tonic::{Code, Request, Status, transport::Channel};

use crate::api::{
    DEFAULT_LISTEN,
    pb::{self, agent_status_client::AgentStatusClient, watch_event},
};

/// An exit code other than 1, with the one line that explains it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitWith {
    pub code: u8,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Connection {
    /// The agent's status API.
    #[arg(long, env = "AGENT_API", default_value = DEFAULT_LISTEN, global = true)]
    api: String,
    /// `table` for people, `json` (one object per line) for tools.
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct StatusOptions {
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, clap::Args)]
pub struct BreakersOptions {
    #[command(flatten)]
    conn: Connection,
    /// Only breakers of this scope (endpoint, subset, cluster, method, client).
    #[arg(long)]
    scope: Option<String>,
    /// Only breakers that are not closed.
    #[arg(long)]
    not_closed: bool,
    /// Then print each breaker transition as it happens (until Ctrl-C).
    #[arg(long)]
    watch: bool,
}

#[derive(Debug, clap::Args)]
pub struct EventsOptions {
    #[command(flatten)]
    conn: Connection,
    /// The first sequence number (default: everything the journal holds).
    #[arg(long, default_value_t = 1)]
    since: u64,
    /// Keep printing new events as they are journaled (until Ctrl-C).
    #[arg(long, short)]
    follow: bool,
}

#[derive(Debug, clap::Args)]
pub struct BreakerOptions {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    action: BreakerAction,
    /// File holding the admin token (the agent's `[api] admin_token_file`).
    #[arg(long, env = "AGENT_ADMIN_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum BreakerAction {
    /// Open a breaker now, for one open period.
    Trip { name: String },
    /// Close a breaker now.
    Reset { name: String },
    /// One breaker's figures.
    Get { name: String },
}

async fn connect(conn: &Connection) -> anyhow::Result<AgentStatusClient<Channel>> {
    let url = if conn.api.contains("://") {
        conn.api.clone()
    } else {
        format!("http://{}", conn.api)
    };
    let unreachable = |why: String| ExitWith {
        code: 3,
        message: format!(
            "cannot reach the agent's status API at {}: {why} (is the agent running? --api ADDR or AGENT_API picks another address)",
            conn.api
        ),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await.map_err(|e| {
        // The root cause ("Connection refused"), not tonic's wrappers around it.
        let mut why: &dyn std::error::Error = &e;
        while let Some(source) = why.source() {
            why = source;
        }
        unreachable(why.to_string())
    })?;
    Ok(AgentStatusClient::new(channel))
}

/// An error status as the CLI reports it.
fn answered(s: Status) -> anyhow::Error {
    let code = match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => 4,
        Code::Unavailable => 3,
        _ => 1,
    };
    ExitWith {
        code,
        message: format!("the agent said {:?}: {}", s.code(), s.message()),
    }
    .into()
}

fn print_json(v: &Value) {
    println!("{v}");
}

/// Columns padded to their widest cell.
fn print_table(head: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(head.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn breaker_json(b: &pb::Breaker) -> Value {
    serde_json::from_str(&b.json).unwrap_or_else(|_| json!({"name": b.name}))
}

fn breaker_row(b: &pb::Breaker) -> Vec<String> {
    vec![
        b.name.clone(),
        b.state.clone(),
        b.reason.clone(),
        if b.open_remaining_ms > 0 {
            format!("{:.1}s", b.open_remaining_ms as f64 / 1000.0)
        } else {
            String::new()
        },
        format!("{}/{}", b.window_failures, b.window_calls),
        b.window_slow.to_string(),
        b.consecutive_failures.to_string(),
    ]
}

const BREAKER_HEAD: [&str; 7] = [
    "BREAKER",
    "STATE",
    "REASON",
    "OPEN FOR",
    "FAILED/CALLS",
    "SLOW",
    "IN A ROW",
];

pub async fn status(opts: &StatusOptions) -> anyhow::Result<()> {
    let mut client = connect(&opts.conn).await?;
    let s = client
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(answered)?
        .into_inner();
    let journal = s.journal.clone().unwrap_or_default();
    if opts.conn.output == Output::Json {
        print_json(&json!({
            "version": s.version,
            "uptime_ms": s.uptime_ms,
            "pid": s.pid,
            "config_sha256": s.config_sha256,
            "listeners": s.listeners,
            "probes": s.probes.iter().map(|p| json!({"name": p.name, "attached": p.attached, "degraded": p.degraded})).collect::<Vec<_>>(),
            "probe_counters": s.probe_counters,
            "intercept": s.intercept,
            "signals": s.signals.iter().map(|k| json!({"kind": k.kind, "seen": k.seen, "joined": k.joined, "acted": k.acted, "duplicates": k.duplicates})).collect::<Vec<_>>(),
            "journal": {"dir": journal.dir, "last_seq": journal.last_seq, "written": journal.written, "dropped": journal.dropped, "failed": journal.failed},
            "dropped": s.dropped,
            "client_connections": s.client_connections,
            "client_streams": s.client_streams,
            "breakers_open": s.breakers_open,
            "endpoints": s.endpoints.iter().map(|e| json!({"cluster": e.cluster, "address": e.address, "subset": e.subset, "draining": e.draining, "calls_in_flight": e.calls_in_flight, "connections": e.connections})).collect::<Vec<_>>(),
            "discovery": s.discovery.iter().map(|n| json!({"cluster": n.cluster, "name": n.name, "source": n.source, "addresses": n.addresses, "answered": n.answered, "empty": n.empty, "failed": n.failed, "last_error": n.last_error, "ttl_secs": n.ttl_secs})).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    println!(
        "agent {} (pid {}), up {}",
        s.version,
        s.pid,
        humantime::format_duration(Duration::from_secs(s.uptime_ms / 1000))
    );
    if !s.config_sha256.is_empty() {
        println!("config sha256 {}", s.config_sha256);
    }
    println!("listeners: {}", s.listeners.join(", "));
    if !s.intercept.is_empty() {
        let get = |k: &str| s.intercept.get(k).copied().unwrap_or(0);
        println!(
            "intercept: {} connections accepted ({} proxied, {} spliced, {} refused: breaker open), {} connects redirected, {} of the agent's own left alone",
            get("accepted"),
            get("proxied_claimed") + get("proxied_passthrough"),
            get("spliced_not_http2") + get("spliced_silent") + get("spliced_passthrough_full"),
            get("refused_breaker_open"),
            get("kernel_redirected"),
            get("kernel_own_skipped"),
        );
    }
    println!(
        "clients: {} connections, {} streams; breakers not closed: {}",
        s.client_connections, s.client_streams, s.breakers_open
    );
    if journal.dir.is_empty() {
        println!("journal: none");
    } else {
        println!(
            "journal: {} (last seq {}, written {}, dropped {}, failed {})",
            journal.dir, journal.last_seq, journal.written, journal.dropped, journal.failed
        );
    }
    if s.probes.is_empty() {
        println!("probes: none attached (--no-probes, or [signals] probes = [])");
    } else {
        let rows: Vec<Vec<String>> = s
            .probes
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    if p.attached { "attached" } else { "DISABLED" }.into(),
                    p.degraded.join("; "),
                ]
            })
            .collect();
        print_table(&["PROBE", "STATE", "DEGRADED"], &rows);
    }
    if !s.discovery.is_empty() {
        let rows: Vec<Vec<String>> = s
            .discovery
            .iter()
            .map(|n| {
                vec![
                    format!("{}/{}", n.cluster, n.name),
                    n.addresses.len().to_string(),
                    n.answered.to_string(),
                    n.empty.to_string(),
                    n.failed.to_string(),
                    n.last_error.clone(),
                ]
            })
            .collect();
        print_table(
            &[
                "DISCOVERED",
                "ADDRESSES",
                "ANSWERED",
                "EMPTY",
                "FAILED",
                "LAST ERROR",
            ],
            &rows,
        );
    }
    let draining = s.endpoints.iter().filter(|e| e.draining).count();
    println!(
        "endpoints: {} ({} draining)",
        s.endpoints.len() - draining,
        draining
    );
    let rows: Vec<Vec<String>> = s
        .signals
        .iter()
        .map(|k| {
            vec![
                k.kind.clone(),
                k.seen.to_string(),
                k.joined.to_string(),
                k.acted.to_string(),
                k.duplicates.to_string(),
            ]
        })
        .collect();
    print_table(&["SIGNAL", "SEEN", "JOINED", "ACTED", "DUPLICATES"], &rows);
    let dropped: Vec<String> = s
        .dropped
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "dropped: {}",
        if dropped.is_empty() {
            "none".to_owned()
        } else {
            dropped.join(", ")
        }
    );
    Ok(())
}

pub async fn breakers(opts: &BreakersOptions) -> anyhow::Result<()> {
    let mut client = connect(&opts.conn).await?;
    // Subscribed before listing, so that no transition falls between the two.
    let mut stream = if opts.watch {
        Some(watch_stream(&mut client, 0).await?)
    } else {
        None
    };
    let list = client
        .list_breakers(pb::ListBreakersRequest {
            scope: opts.scope.clone().unwrap_or_default(),
            not_closed: opts.not_closed,
        })
        .await
        .map_err(answered)?
        .into_inner()
        .breakers;
    match opts.conn.output {
        Output::Json => {
            for b in &list {
                print_json(&breaker_json(b));
            }
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = list.iter().map(breaker_row).collect();
            print_table(&BREAKER_HEAD, &rows);
        }
    }
    if let Some(stream) = stream.as_mut() {
        follow(&mut client, stream, opts.conn.output, None).await?;
    }
    Ok(())
}

async fn watch_stream(
    client: &mut AgentStatusClient<Channel>,
    from_seq: u64,
) -> anyhow::Result<tonic::Streaming<pb::WatchEvent>> {
    Ok(client
        .watch(Request::new(pb::WatchRequest { from_seq }))
        .await
        .map_err(answered)?
        .into_inner())
}

/// Prints events until `until` (a sequence number) or for ever; a `lagged` message resumes
/// where it says.
async fn follow(
    client: &mut AgentStatusClient<Channel>,
    stream: &mut tonic::Streaming<pb::WatchEvent>,
    output: Output,
    until: Option<u64>,
) -> anyhow::Result<()> {
    let mut printed_head = false;
    loop {
        let Some(msg) = stream.message().await.map_err(answered)? else {
            return Err(ExitWith {
                code: 3,
                message: "the agent ended the watch (it stopped?)".into(),
            }
            .into());
        };
        match msg.kind {
            Some(watch_event::Kind::Event(e)) => {
                print_event(&e, output, &mut printed_head);
                if until.is_some_and(|u| e.seq >= u) {
                    return Ok(());
                }
            }
            Some(watch_event::Kind::Lagged(l)) => {
                eprintln!(
                    "agent: fell behind the agent's events; resuming from seq {}",
                    l.resume_from_seq
                );
                *stream = watch_stream(client, l.resume_from_seq).await?;
            }
            None => {}
        }
    }
}

fn print_event(e: &pb::Event, output: Output, printed_head: &mut bool) {
    if output == Output::Json {
        println!("{}", e.json);
        return;
    }
    let v: Value = serde_json::from_str(&e.json).unwrap_or(Value::Null);
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    if !*printed_head {
        println!("SEQ  TIME  BREAKER  FROM -> TO  REASON  TRACE  SESSION");
        *printed_head = true;
    }
    println!(
        "{}  {}  {}  {} -> {}  {}  {}  {}",
        e.seq,
        s("/ts"),
        e.breaker,
        e.from,
        e.to,
        e.reason,
        s("/stream/trace_id"),
        s("/stream/session_id")
    );
}

pub async fn events(opts: &EventsOptions) -> anyhow::Result<()> {
    let mut client = connect(&opts.conn).await?;
    let last = client
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(answered)?
        .into_inner()
        .journal
        .map_or(0, |j| j.last_seq);
    let mut stream = watch_stream(&mut client, opts.since.max(1)).await?;
    if opts.follow {
        return follow(&mut client, &mut stream, opts.conn.output, None).await;
    }
    if last < opts.since.max(1) {
        return Ok(());
    }
    follow(&mut client, &mut stream, opts.conn.output, Some(last)).await
}

pub async fn breaker(opts: &BreakerOptions) -> anyhow::Result<()> {
    let mut client = connect(&opts.conn).await?;
    let (name, open) = match &opts.action {
        BreakerAction::Get { name } => {
            let b = client
                .get_breaker(pb::GetBreakerRequest { name: name.clone() })
                .await
                .map_err(answered)?
                .into_inner();
            match opts.conn.output {
                Output::Json => print_json(&breaker_json(&b)),
                Output::Table => print_table(&BREAKER_HEAD, &[breaker_row(&b)]),
            }
            return Ok(());
        }
        BreakerAction::Trip { name } => (name, true),
        BreakerAction::Reset { name } => (name, false),
    };
    let mut req = Request::new(pb::BreakerAdminRequest { name: name.clone() });
    if let Some(path) = &opts.token_file {
        let token = std::fs::read_to_string(path).map_err(|e| ExitWith {
            code: 1,
            message: format!("cannot read the admin token file {}: {e}", path.display()),
        })?;
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ExitWith {
                code: 1,
                message: format!(
                    "the admin token in {} is not a valid header value",
                    path.display()
                ),
            })?;
        req.metadata_mut().insert("authorization", value);
    }
    let r = if open {
        client.trip_breaker(req).await
    } else {
        client.reset_breaker(req).await
    }
    .map_err(answered)?
    .into_inner();
    match opts.conn.output {
        Output::Json => print_json(&json!({
            "changed": r.changed,
            "breaker": r.breaker.as_ref().map(breaker_json),
        })),
        Output::Table => {
            let verb = if open { "tripped" } else { "reset" };
            if r.changed {
                println!("{name}: {verb}");
            } else {
                println!("{name}: already {}", if open { "open" } else { "closed" });
            }
            if let Some(b) = &r.breaker {
                print_table(&BREAKER_HEAD, &[breaker_row(b)]);
            }
        }
    }
    Ok(())
}
