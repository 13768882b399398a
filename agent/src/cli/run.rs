//! `agent run`: the proxy (with a configuration file, or the quick mode), until SIGTERM.

use std::{io::Write as _, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use serde_json::json;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{oneshot, watch},
};
use tracing::info;

use crate::{
    api::{Api, Sources, StatusService},
    config,
    correlate::feed::{KernelFeed, Tap, Tapped},
    events::{
        journal::Journal,
        writer::{JournalStats, JournaledEvents, write_transitions},
    },
    export::{
        metrics::Metrics,
        otlp_logs::{LogExporter, LogStats},
        prometheus,
    },
    probes::go_processes::BinaryNames,
    proxy::server::Proxy,
    signals::Signal,
};

use super::signal_print::{Output, PrintKind, Printed};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Configuration file (TOML; see deploy/agent.example.toml).
    #[arg(long, conflicts_with_all = ["listen", "upstream"])]
    config: Option<PathBuf>,
    /// Quick mode: listen here (cleartext HTTP/2) ...
    #[arg(long, requires = "upstream")]
    listen: Option<SocketAddr>,
    /// ... and send every call to these HOST:PORT endpoints.
    #[arg(long, value_delimiter = ',', requires = "listen")]
    upstream: Vec<String>,
    /// Print each stream's outcome record as a JSON line on stdout.
    #[arg(long)]
    print_outcomes: bool,
    /// Print each breaker transition as a JSON line on stdout.
    #[arg(long)]
    print_breakers: bool,
    /// Print every kernel signal and Go process event the correlator gets, as `agent trace
    /// --json` prints them (a busy node's HTTP/2 frames are many lines).
    #[arg(long)]
    print_signals: bool,
    /// Turn every circuit breaker off (as `[breakers] enabled = false`).
    #[arg(long)]
    no_breakers: bool,
    /// Journal breaker events in this directory (as `[events] journal`).
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Attach no kernel probes: no kernel signals reach the breakers (as `[signals] probes =
    /// []`). Without root the probes cannot be attached.
    #[arg(long)]
    no_probes: bool,
    /// Send the journal's events and the metrics to this OTLP/gRPC receiver,
    /// http://HOST:PORT (as `[export] otlp_endpoint`; needs the journal).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Serve the metrics in the Prometheus text format at http://ADDR/metrics (as `[export]
    /// prometheus_listen`).
    #[arg(long, value_name = "ADDR")]
    prometheus_listen: Option<SocketAddr>,
    /// Serve the status API on this address (as `[api] listen`; default 127.0.0.1:9470).
    #[arg(long, value_name = "ADDR")]
    api_listen: Option<SocketAddr>,
    /// No status API (as `[api] enabled = false`).
    #[arg(long)]
    no_api: bool,
    /// The node listener of `[intercept]` (as `node_listen`): in a DaemonSet,
    /// `$(NODE_IP):15002` from the downward API, since each node has its own address.
    #[arg(long, value_name = "ADDR")]
    intercept_node_listen: Option<SocketAddr>,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let Checked {
        config,
        signals,
        export,
        admin_token,
        config_bytes,
    } = checked_config(&opts)?;
    // The journal first: a directory in use or unwritable stops the agent before it serves.
    let journal = match config.events.journal().map_err(|e| anyhow::anyhow!(e))? {
        Some(c) => {
            let fsync = c.fsync;
            let dir = c.dir.clone();
            let (j, recovery) = Journal::open(c)?;
            if recovery.torn_bytes > 0 {
                tracing::warn!(dir = %dir.display(), torn_bytes = recovery.torn_bytes, last_seq = recovery.last_seq, "journal: a torn last line was cut off");
            }
            Some((j, recovery, fsync, dir))
        }
        None => None,
    };
    let mut proxy = Proxy::bind(&config).await?;
    // A taken API port stops the agent now, not later.
    let api = match config.api.enabled {
        true => Some(Api::bind(config.api.listen).await?),
        false => None,
    };
    let listeners: Vec<_> = proxy
        .local_addrs()
        .into_iter()
        .map(|(name, addr)| json!({"name": name, "address": addr.to_string()}))
        .collect();
    // The probes before serving: a call's connection is tracked from the start.
    let kernel = if config.signals.probes.is_empty() {
        None
    } else {
        let tap = opts.print_signals.then(signal_tap);
        Some(KernelFeed::start(
            &config.signals,
            signals,
            proxy.shared().correlation_targets(),
            tap,
        )?)
    };
    // Interception last before serving: its listener is bound, and a redirected connection
    // is tracked and correlated from its first byte.
    let intercept_line = start_interception(&config, &mut proxy)?;
    let probes_line = kernel
        .as_ref()
        .map(|k| json!(k.status))
        .unwrap_or(json!([]));
    let joins = proxy.shared().joins.clone();
    let stats = proxy.stats();
    let journal_stats = Arc::new(JournalStats::default());
    let (journal_done, journal_done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut journal_line = serde_json::Value::Null;
    // Everything that reports breaker events does so after the journal, when there is one.
    let journaled = Arc::new(JournaledEvents::new(16 * 1024));
    let mut printed_journaled =
        (opts.print_breakers && journal.is_some()).then(|| journaled.subscribe());
    let mut journal_dir = None;
    let writer = journal.map(|(j, recovery, fsync, dir)| {
        journal_line = json!({"dir": dir.display().to_string(), "recovery": recovery});
        journal_dir = Some((dir, recovery.last_seq));
        tokio::spawn(write_transitions(
            j,
            proxy.breaker_events().subscribe(),
            journal_stats.clone(),
            journaled.clone(),
            fsync,
            journal_done_rx,
        ))
    });
    let journal_dir_path = journal_dir
        .as_ref()
        .map(|(d, _): &(PathBuf, u64)| d.clone());
    let journal_dir = journal_dir.as_ref().map(|(d, last)| (d.as_path(), *last));
    let exporting = Exporting::start(
        &export,
        &proxy,
        journal_dir,
        &journal_stats,
        kernel.as_ref().map(KernelFeed::counters),
    )
    .await?;
    let mut outcomes = opts.print_outcomes.then(|| proxy.outcomes().subscribe());
    let mut breakers = (opts.print_breakers && printed_journaled.is_none())
        .then(|| proxy.breaker_events().subscribe());
    let (api_stop, api_stopped) = watch::channel(false);
    let api_addr = api.as_ref().and_then(Api::local_addr);
    let api_task = api.map(|api| {
        let service = StatusService::new(Sources {
            shared: proxy.shared(),
            stats: proxy.stats(),
            probes: kernel
                .as_ref()
                .map(|k| k.status.clone())
                .unwrap_or_default(),
            probe_counters: kernel.as_ref().map(KernelFeed::counters),
            reader: kernel.as_ref().map(|k| k.reader.clone()),
            journal_dir: journal_dir_path.clone(),
            journal_stats: journal_stats.clone(),
            journaled_seq: journal_stats.journaled.subscribe(),
            config_bytes,
            listeners: proxy
                .local_addrs()
                .into_iter()
                .map(|(name, addr)| format!("{name} {addr}"))
                .chain(
                    proxy
                        .intercept_addrs()
                        .iter()
                        .map(|a| format!("intercept {a}")),
                )
                .collect(),
            admin_token,
            stopping: api_stopped.clone(),
        });
        tokio::spawn(api.serve(service, api_stopped))
    });
    let (stop, shutdown) = watch::channel(false);
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
    let mut served = tokio::spawn(proxy.serve(shutdown));
    print_line(&json!({
        "kind": "ready",
        "listeners": listeners,
        "intercept": intercept_line,
        "journal": journal_line,
        "probes": probes_line,
        "otlp": export.otlp_endpoint,
        "prometheus": exporting.prometheus_addr.map(|a| a.to_string()),
        "api": api_addr.map(|a| a.to_string()),
    }));
    let (printed_all, mut served_all) = tokio::sync::oneshot::channel::<()>();
    let printer = tokio::spawn(async move {
        let mut done = false;
        while !done {
            tokio::select! {
                biased;
                r = next(&mut breakers) => if !print_one(r, print_breaker_event) { breakers = None },
                r = next(&mut printed_journaled) => if !print_one(r, print_journaled) { printed_journaled = None },
                r = next(&mut outcomes) => if !print_one(r, print_outcome) { outcomes = None },
                // The proxy is done: what is queued is all there will be.
                _ = &mut served_all => done = true,
            }
        }
        drain(&mut breakers, print_breaker_event);
        drain(&mut printed_journaled, print_journaled);
        drain(&mut outcomes, print_outcome);
    });
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break }
            _ = sigint.recv() => { info!("SIGINT: draining"); break }
            // What the proxy holds right now, as a JSON line on stdout (`agent status` asks the API).
            _ = sigusr1.recv() => print_line(&stats_line(&stats, &journal_stats, &joins, kernel.as_ref(), &exporting)),
            r = &mut served => {
                r.context("the proxy task failed")?;
                bail!("the proxy stopped serving on its own");
            }
        }
    }
    let _ = stop.send(true);
    let left = served.await.context("the proxy task failed")?;
    if let Some(k) = kernel {
        k.stop().await;
    }
    // The writer's last batch first: the printer reports what it journaled.
    let _ = journal_done.send(());
    if let Some(w) = writer {
        let _ = w.await;
    }
    // After the journal's last event: the exporter sends what it can of the rest.
    exporting.stop().await;
    let _ = printed_all.send(());
    let _ = printer.await;
    // Last: watchers get every event journaled until the end.
    let _ = api_stop.send(true);
    if let Some(t) = api_task {
        let _ = t.await;
    }
    if left > 0 {
        bail!("{left} streams were still open when the drain timeout passed");
    }
    info!("drained");
    Ok(())
}

/// What the agent holds right now, the SIGUSR1 line.
/// Loads and attaches interception's programs (`[intercept]`) for the bound proxy to serve;
/// what the ready line says of it.
fn start_interception(
    config: &config::AgentConfig,
    proxy: &mut Proxy,
) -> anyhow::Result<serde_json::Value> {
    let Some(i) = &config.intercept else {
        return Ok(serde_json::Value::Null);
    };
    let loaded = crate::probes::intercept::InterceptKernel::load(&i.kernel_settings())
        .context("interception ([intercept]) cannot start")?;
    proxy.set_interception(Arc::new(loaded));
    let listen: Vec<String> = proxy
        .intercept_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    let cgroups: Vec<String> = i.cgroups.iter().map(|c| c.display().to_string()).collect();
    Ok(json!({"listen": listen, "cgroups": cgroups, "own_mark": i.own_mark}))
}

fn stats_line(
    stats: &crate::proxy::server::StatsSource,
    journal_stats: &JournalStats,
    joins: &crate::correlate::Joins,
    kernel: Option<&KernelFeed>,
    exporting: &Exporting,
) -> serde_json::Value {
    let mut line = serde_json::to_value(stats.snapshot()).unwrap_or_default();
    line["kind"] = "stats".into();
    line["journal"] = serde_json::to_value(journal_stats.figures()).unwrap_or_default();
    line["signals"] = joins.stats.figures();
    let (conns, streams) = joins.tracked.counts();
    let evidence_dropped = joins
        .board
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    line["tracked"] =
        json!({"connections": conns, "streams": streams, "evidence_dropped": evidence_dropped});
    if let Some(k) = kernel {
        line["probes"] = k.figures();
    }
    if let Some(l) = &exporting.log_stats {
        line["otlp_logs"] = serde_json::to_value(l.figures()).unwrap_or_default();
    }
    line
}

/// The configuration with the command line's overrides, every section checked.
struct Checked {
    config: config::AgentConfig,
    signals: config::signals::Parsed,
    export: config::export::Export,
    admin_token: Option<Vec<u8>>,
    /// The file as read, for the status API.
    config_bytes: Vec<u8>,
}

fn checked_config(opts: &Options) -> anyhow::Result<Checked> {
    let mut config = match (&opts.config, opts.listen) {
        (Some(path), _) => config::load(path)?,
        (None, Some(listen)) => {
            config::quick(listen, &opts.upstream).map_err(|e| anyhow::anyhow!(e))?
        }
        (None, None) => bail!("give --config FILE, or --listen ADDR --upstream HOST:PORT,..."),
    };
    if opts.no_breakers {
        config.breakers.disable();
    }
    if let Some(dir) = &opts.journal {
        config.events.journal = Some(dir.clone());
    }
    if opts.no_probes {
        config.signals.probes.clear();
    }
    let signals = config.signals.check().map_err(|e| anyhow::anyhow!(e))?;
    if let Some(url) = &opts.otlp_endpoint {
        config.export.otlp_endpoint = Some(url.clone());
    }
    if let Some(addr) = opts.prometheus_listen {
        config.export.prometheus_listen = Some(addr);
    }
    let export = config.export.check().map_err(|e| anyhow::anyhow!(e))?;
    if let Some(addr) = opts.api_listen {
        config.api.listen = addr;
    }
    if opts.no_api {
        config.api.enabled = false;
    }
    if let Some(addr) = opts.intercept_node_listen {
        let Some(intercept) = config.intercept.as_mut() else {
            bail!("--intercept-node-listen needs an [intercept] section in the configuration");
        };
        if addr.port() == 0 {
            bail!("--intercept-node-listen {addr}: the port must not be 0");
        }
        match addr {
            SocketAddr::V4(_) => intercept.node_listen = Some(addr),
            SocketAddr::V6(_) => intercept.node_listen6 = Some(addr),
        }
    }
    let admin_token = config.api.check()?;
    let config_bytes = match &opts.config {
        Some(path) => std::fs::read(path).unwrap_or_default(),
        None => Vec::new(),
    };
    if export.otlp_endpoint.is_some() && config.events.journal.is_none() {
        bail!(
            "export.otlp_endpoint (--otlp-endpoint) sends the journal's events, from a cursor kept \
             beside them: give [events] journal (or --journal DIR) too"
        );
    }
    Ok(Checked {
        config,
        signals,
        export,
        admin_token,
        config_bytes,
    })
}

fn print_line(line: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};

/// The next item of an optional subscription: pending for ever when there is none.
async fn next<T: Clone>(rx: &mut Option<broadcast::Receiver<T>>) -> Result<T, RecvError> {
    match rx.as_mut() {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Prints what [`next`] got; false once the channel closed.
fn print_one<T>(r: Result<T, RecvError>, print: impl Fn(&T)) -> bool {
    match r {
        Ok(item) => {
            print(&item);
            true
        }
        Err(RecvError::Lagged(n)) => {
            tracing::warn!(lost = n, "printer fell behind");
            true
        }
        Err(RecvError::Closed) => false,
    }
}

fn drain<T: Clone>(rx: &mut Option<broadcast::Receiver<T>>, print: impl Fn(&T)) {
    let Some(rx) = rx.as_mut() else { return };
    loop {
        match rx.try_recv() {
            Ok(item) => print(&item),
            Err(TryRecvError::Lagged(n)) => tracing::warn!(lost = n, "printer fell behind"),
            Err(_) => break,
        }
    }
}

/// A journaled event's line, tagged `"kind": "breaker"` (the journal's lines all begin with
/// `{"seq":`).
fn print_journaled(j: &crate::events::writer::Journaled) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{{\"kind\":\"breaker\",{}",
        j.line.get(1..).unwrap_or("}")
    );
    let _ = out.flush();
}

/// The `breaker_trip/v1` event (as journaled, without `seq`), tagged `"kind": "breaker"`.
fn print_breaker_event(e: &crate::events::BreakerEvent) {
    let mut line = crate::events::trip::breaker_trip(e, std::time::SystemTime::now());
    line["kind"] = "breaker".into();
    print_line(&line);
}

fn print_outcome(o: &crate::events::outcome::StreamOutcome) {
    let mut line = serde_json::to_value(o).unwrap_or_default();
    line["kind"] = "stream".into();
    print_line(&line);
}

/// The kernel side's figures as metrics: signals by kind and what became of them, the
/// connections and streams tracked for them, and the probes' own counters (drops included).
fn observe_kernel(
    metrics: &Metrics,
    joins: Arc<crate::correlate::Joins>,
    probes: Option<crate::correlate::feed::ProbeCounters>,
) {
    let j = joins.clone();
    metrics.observe_counters(
        "agent_kernel_signals",
        "Kernel signals by kind and stage: seen, joined to the proxy's connections, acted on (a breaker tripped or counted), duplicates (the other end of one reset)",
        Arc::new(move |observe| {
            for (kind, k) in j.stats.by_kind() {
                let f = k.figures();
                for (stage, v) in [
                    ("seen", f.seen),
                    ("joined", f.joined),
                    ("acted", f.acted),
                    ("duplicate", f.duplicates),
                ] {
                    observe(v, &[("kind", kind.as_str().into()), ("stage", stage.into())]);
                }
            }
        }),
    );
    metrics.observe_gauges(
        "agent_tracked",
        "Connections (open, and closed in the last 5 s) and live streams the correlation table holds",
        Arc::new(move |observe| {
            let (conns, streams) = joins.tracked.counts();
            observe(conns as u64, &[("what", "connections".into())]);
            observe(streams as u64, &[("what", "streams".into())]);
        }),
    );
    if let Some(p) = probes {
        metrics.observe_counters(
            "agent_probe_events",
            "The kernel programs' counters (as of the last sweep, every second), by name: events, and drops (names ending in _dropped)",
            Arc::new(move |observe| {
                for (name, v) in p.snapshot() {
                    observe(v, &[("counter", name)]);
                }
            }),
        );
    }
}

/// The exporters `agent run` started ([`crate::export`]).
struct Exporting {
    metrics: Option<Metrics>,
    recorder: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    logs: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    log_stats: Option<Arc<LogStats>>,
    prometheus_addr: Option<SocketAddr>,
    prometheus_stop: watch::Sender<bool>,
}

impl Exporting {
    async fn start(
        export: &crate::export::Export,
        proxy: &Proxy,
        journal: Option<(&std::path::Path, u64)>,
        journal_stats: &Arc<JournalStats>,
        probe_counters: Option<crate::correlate::feed::ProbeCounters>,
    ) -> anyhow::Result<Exporting> {
        let (prometheus_stop, prometheus_stopped) = watch::channel(false);
        let mut exporting = Exporting {
            metrics: None,
            recorder: None,
            logs: None,
            log_stats: None,
            prometheus_addr: None,
            prometheus_stop,
        };
        let listener = match export.prometheus_listen {
            Some(a) => Some(prometheus::bind(a).await?),
            None => None,
        };
        if export.otlp_endpoint.is_none() && listener.is_none() {
            return Ok(exporting);
        }
        let otlp = export
            .otlp_endpoint
            .as_deref()
            .map(|e| (e, export.otlp_interval));
        let metrics = Metrics::new(otlp, listener.is_some())?;
        if let (Some(endpoint), Some((dir, last_seq))) = (&export.otlp_endpoint, journal) {
            let stats = Arc::new(LogStats::default());
            let (done, done_rx) = oneshot::channel();
            let exporter = LogExporter::new(endpoint, dir)?;
            let task =
                tokio::spawn(exporter.run(last_seq, journal_stats.clone(), stats.clone(), done_rx));
            exporting.logs = Some((done, task));
            exporting.log_stats = Some(stats);
        }
        let (done, done_rx) = oneshot::channel();
        let (recorded, task) = metrics.record(
            proxy.outcomes().subscribe(),
            proxy.breaker_events().subscribe(),
            proxy.shared().bus.signals.subscribe(),
            done_rx,
        );
        exporting.recorder = Some((done, task));
        metrics.observe_breakers(proxy.stats());
        metrics.observe_intercept(proxy.stats());
        metrics.observe_discovery(proxy.stats());
        observe_kernel(&metrics, proxy.shared().joins.clone(), probe_counters);
        metrics.observe_pipeline(journal_stats.clone(), recorded, exporting.log_stats.clone());
        if let (Some(listener), Some(registry)) = (listener, metrics.registry()) {
            exporting.prometheus_addr = listener.local_addr().ok();
            tokio::spawn(prometheus::serve(listener, registry, prometheus_stopped));
        }
        exporting.metrics = Some(metrics);
        Ok(exporting)
    }

    /// Once the proxy and the journal are done: the last events and figures go out (bounded
    /// in time), then the endpoint closes.
    async fn stop(self) {
        if let Some((done, task)) = self.logs {
            let _ = done.send(());
            let _ = task.await;
        }
        if let Some((done, task)) = self.recorder {
            let _ = done.send(());
            let _ = task.await;
        }
        if let Some(m) = self.metrics {
            m.shutdown().await;
        }
        let _ = self.prometheus_stop.send(true);
    }
}

/// `--print-signals`: each signal as a JSON line, written whole (the other printers share
/// stdout) and flushed when the correlator has caught up.
fn signal_tap() -> Tap {
    let all = Printed::from_kinds(&[PrintKind::All]);
    let mut out = Output::new(true, all, Box::new(std::io::stdout()));
    let mut names = BinaryNames::default();
    Box::new(move |tapped| match tapped {
        Tapped::Names(n) => names = n.clone(),
        Tapped::Signal(Signal::TcpReset(r)) => out.tcp_reset(r),
        Tapped::Signal(Signal::GoStw(p)) => out.gc_stw(p, &names),
        Tapped::Signal(Signal::H2Frame(f)) => out.h2_frame(f),
        Tapped::Signal(Signal::H2Flow(c)) => out.h2_flow(c),
        Tapped::GoProcess(e) => out.go_process(e),
        Tapped::Idle => out.flush(),
    })
}
