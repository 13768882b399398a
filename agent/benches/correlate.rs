//! `cargo bench -p agent --bench correlate -- [OPTIONS]`: what the correlation stage costs, for `cargo xtask bench
//! correlate`.
//!
//! It builds the proxy's shared state from a quick configuration (no traffic), registers
//! `--streams` live streams the way the proxy does (a client connection and an upstream one
//! per 100 streams, each stream with a request context of a W3C trace, a session id and a JWT's
//! claims), and then feeds decoded kernel signals through the real [`Correlator`], in the
//! proportions a busy node sends them: most frames are DATA and HEADERS of followed flows,
//! some are RST_STREAM on tracked streams, some belong to flows that are not the proxy's, and
//! a few are TCP resets (of untracked connections but for one per tracked connection).
//!
//! Prints one JSON line: signals per second joined, ns per signal, ns to register and let go
//! of a stream, and resident bytes per tracked stream (the process's RSS growth over the
//! registration, divided by the streams).

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use anyhow::bail;
use http::HeaderMap;
use serde_json::json;

use agent::{
    config,
    correlate::{
        Correlator,
        table::{Side, StreamGuard, StreamTag},
    },
    proxy::server::Proxy,
    signals::{
        TcpReset,
        h2_frame::{Flow, FrameDetail, H2Frame},
        tcp_reset::Direction,
    },
};

fn main() -> anyhow::Result<()> {
    let opts = <Options as clap::Parser>::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(&opts))
}

#[derive(Debug, clap::Parser)]
struct Options {
    /// Passed by `cargo bench`; nothing to do with the options here.
    #[arg(long, hide = true)]
    bench: bool,
    /// Live streams tracked while the signals are joined.
    #[arg(long, default_value_t = 10_000)]
    streams: u32,
    /// Signals fed through the correlator.
    #[arg(long, default_value_t = 2_000_000)]
    signals: u64,
}

/// Streams per connection (the proxy's client connections allow 100 at once).
const PER_CONNECTION: u32 = 100;

fn addr(a: u8, b: u8, c: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, a, b, c)), port)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

async fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.streams == 0 || opts.signals == 0 {
        bail!("--streams and --signals must be at least 1");
    }
    let upstreams: Vec<String> = (1..=10).map(|i| format!("10.9.0.{i}:50051")).collect();
    let mut cfg =
        config::quick("127.0.0.1:0".parse()?, &upstreams).map_err(|e| anyhow::anyhow!(e))?;
    // Only annotations: the figures are the join's, not breaker transitions'.
    cfg.signals.upstream_tcp_reset = agent::config::signals::SignalUse::Annotate;
    cfg.signals.upstream_rst_stream = agent::config::signals::SignalUse::Annotate;
    let parsed = cfg.signals.check().map_err(|e| anyhow::anyhow!(e))?;
    let proxy = Proxy::bind(&cfg).await?;
    let shared = proxy.shared();
    let joins = shared.joins.clone();
    let extractor = agent::context::Extractor::new(&cfg.context)?;

    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    // An unsigned token: its claims are read (allowlisted), not verified.
    headers.insert(
        "authorization",
        http::HeaderValue::from_static(
            "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyOjEwMDIzIiwic2NvcGUiOiJyZWFkOm9yZGVyIiwiY2xpZW50X2lkIjoibW9iaWxlLWFwcC12MiIsImV4cCI6NDEwMjQ0NDgwMH0.c2lnbmF0dXJl",
        ),
    );

    // Register: a client connection and an upstream one per PER_CONNECTION streams. The
    // tags (what the proxy makes per stream when tracking is on) count in the memory, not in
    // the time: the clock runs over the registrations only.
    let connections = opts.streams.div_ceil(PER_CONNECTION);
    let rss_before = rss_bytes();
    let mut tags: Vec<Vec<Arc<StreamTag>>> = Vec::new();
    for c in 0..connections {
        let client = addr(1, (c >> 8) as u8, c as u8, 40000);
        let mut per_conn = Vec::new();
        for s in 0..PER_CONNECTION.min(opts.streams - c * PER_CONNECTION) {
            let mut h = headers.clone();
            h.insert(
                "x-session-id",
                http::HeaderValue::from_str(&format!("sess-{c}-{s}"))?,
            );
            let context = extractor.extract(&h, 0);
            per_conn.push(Arc::new(StreamTag {
                method: "/orders.v1.Orders/Create".into(),
                client,
                client_key: context.client_key().map(|k| k.to_string()),
                original_destination: None,
                context,
            }));
        }
        tags.push(per_conn);
    }
    let mut register = std::time::Duration::ZERO;
    let mut held = Vec::new();
    let mut guards: Vec<StreamGuard> = Vec::with_capacity(opts.streams as usize * 2);
    let mut flows = Vec::new();
    for (c, per_conn) in (0..connections).zip(tags) {
        let client = addr(1, (c >> 8) as u8, c as u8, 40000);
        let local = addr(0, 0, 1, 8080);
        let up_local = addr(0, 0, 1, 30000u16.wrapping_add(c as u16));
        let up_peer: SocketAddr = upstreams[(c % 10) as usize].parse()?;
        let started = Instant::now();
        let (Some(down), Some(up)) = (
            joins.tracked.connection(
                Side::Downstream {
                    listener: "quick".into(),
                },
                local,
                client,
            ),
            joins.tracked.connection(
                Side::Upstream {
                    endpoint: shared.clusters[0].endpoints()[(c % 10) as usize]
                        .breakers
                        .clone(),
                },
                up_local,
                up_peer,
            ),
        ) else {
            bail!("tracking is off");
        };
        for (s, tag) in (0u32..).zip(per_conn) {
            let id = 1 + 2 * s;
            guards.push(down.conn.stream(id, tag.clone()));
            guards.push(up.conn.stream(id, tag));
        }
        register += started.elapsed();
        flows.push((client, local, up_local, up_peer));
        held.push((down, up));
    }
    let register_ns = register.as_nanos() as f64 / f64::from(opts.streams);
    let rss_after = rss_bytes();
    let (tracked_conns, tracked_streams) = joins.tracked.counts();

    // The signals, made up front: the loop measures the join, not their construction.
    let kinds = 100usize;
    let mut signals: Vec<Result<H2Frame, TcpReset>> = Vec::with_capacity(kinds * 16);
    for i in 0..kinds * 16 {
        let (client, local, up_local, up_peer) = flows[i % flows.len()];
        let sid = 1 + 2 * (i as u32 % PER_CONNECTION);
        let frame = |flow: Flow, type_id: u8, detail: FrameDetail, sender| H2Frame {
            ktime_ns: i as u64,
            flow,
            direction: "ingress",
            hook: "cgroup",
            sender,
            frame_type: "",
            type_id,
            flags: 0,
            length: 16,
            stream_id: sid,
            detail,
            cgroup_id: None,
        };
        let data = FrameDetail::Data { end_stream: false };
        signals.push(match i % 10 {
            // DATA both ways on the proxy's own flows.
            0..=2 => Ok(frame(
                Flow {
                    src: client,
                    dst: local,
                },
                0,
                data,
                Some("client"),
            )),
            3..=5 => Ok(frame(
                Flow {
                    src: up_peer,
                    dst: up_local,
                },
                0,
                data,
                Some("server"),
            )),
            // RST_STREAM(CANCEL) from an upstream on a live stream.
            6 => Ok(frame(
                Flow {
                    src: up_peer,
                    dst: up_local,
                },
                3,
                FrameDetail::RstStream {
                    error_code: 8,
                    error: "CANCEL",
                },
                Some("server"),
            )),
            // Somebody else's flows on this node.
            7 | 8 => Ok(frame(
                Flow {
                    src: addr(200, 0, (i >> 8) as u8, 443),
                    dst: addr(201, 0, i as u8, 55000),
                },
                3,
                FrameDetail::RstStream {
                    error_code: 8,
                    error: "CANCEL",
                },
                Some("server"),
            )),
            // A TCP reset of somebody else's connection.
            _ => Err(TcpReset {
                ktime_ns: i as u64,
                direction: Direction::Received,
                local: addr(202, 0, (i >> 8) as u8, 55001),
                remote: addr(203, 0, i as u8, 443),
                state: Some("ESTABLISHED"),
                reason: None,
                task: None,
                netns: None,
                cgroup_id: None,
                sock_cookie: None,
            }),
        });
    }
    let mut correlator = Correlator::new(shared.correlation_targets(), cfg.signals.clone(), parsed);
    let started = Instant::now();
    for i in 0..opts.signals {
        match &signals[(i % signals.len() as u64) as usize] {
            Ok(f) => correlator.h2_frame(black_box(f)),
            Err(r) => correlator.tcp_reset(black_box(r)),
        }
    }
    let elapsed = started.elapsed();
    let stats = joins.stats.figures();

    // Letting the streams go, as they end.
    let started = Instant::now();
    let n = guards.len();
    drop(guards);
    let release_ns = started.elapsed().as_nanos() as f64 / n as f64 * 2.0;
    drop(held);
    println!(
        "{}",
        json!({
            "streams": opts.streams,
            "tracked_connections": tracked_conns,
            "tracked_streams": tracked_streams,
            "signals": opts.signals,
            "signals_per_s": opts.signals as f64 / elapsed.as_secs_f64(),
            "ns_per_signal": elapsed.as_nanos() as f64 / opts.signals as f64,
            "register_ns_per_stream": register_ns,
            "release_ns_per_stream": release_ns,
            "rss_bytes_per_stream": rss_after.saturating_sub(rss_before) as f64 / f64::from(opts.streams),
            "joined": stats,
        })
    );
    Ok(())
}
