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
    events::{
        journal::Journal,
        writer::{JournalStats, write_transitions},
    },
    export::{
        metrics::Metrics,
        otlp_logs::{LogExporter, LogStats},
        prometheus,
    },
    proxy::{config, server::Proxy},
};

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
    /// Turn every circuit breaker off (as `[breakers] enabled = false`).
    #[arg(long)]
    no_breakers: bool,
    /// Journal breaker events in this directory (as `[events] journal`).
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Send the journal's events and the metrics to this OTLP/gRPC receiver,
    /// http://HOST:PORT (as `[export] otlp_endpoint`; needs the journal).
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Serve the metrics in the Prometheus text format at http://ADDR/metrics (as `[export]
    /// prometheus_listen`).
    #[arg(long, value_name = "ADDR")]
    prometheus_listen: Option<SocketAddr>,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
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
    if let Some(url) = &opts.otlp_endpoint {
        config.export.otlp_endpoint = Some(url.clone());
    }
    if let Some(addr) = opts.prometheus_listen {
        config.export.prometheus_listen = Some(addr);
    }
    let export = config.export.check().map_err(|e| anyhow::anyhow!(e))?;
    if export.otlp_endpoint.is_some() && config.events.journal.is_none() {
        bail!(
            "export.otlp_endpoint (--otlp-endpoint) sends the journal's events, from a cursor kept \
             beside them: give [events] journal (or --journal DIR) too"
        );
    }
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
    let proxy = Proxy::bind(&config).await?;
    let listeners: Vec<_> = proxy
        .local_addrs()
        .into_iter()
        .map(|(name, addr)| json!({"name": name, "address": addr.to_string()}))
        .collect();
    let stats = proxy.stats();
    let journal_stats = Arc::new(JournalStats::default());
    let (journal_done, journal_done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut journal_line = serde_json::Value::Null;
    let mut journal_dir = None;
    let writer = journal.map(|(j, recovery, fsync, dir)| {
        journal_line = json!({"dir": dir.display().to_string(), "recovery": recovery});
        journal_dir = Some((dir, recovery.last_seq));
        tokio::spawn(write_transitions(
            j,
            proxy.breaker_events().subscribe(),
            journal_stats.clone(),
            fsync,
            journal_done_rx,
        ))
    });
    let journal_dir = journal_dir.as_ref().map(|(d, last)| (d.as_path(), *last));
    let exporting = Exporting::start(&export, &proxy, journal_dir, &journal_stats).await?;
    let mut outcomes = opts.print_outcomes.then(|| proxy.outcomes().subscribe());
    let mut breakers = opts
        .print_breakers
        .then(|| proxy.breaker_events().subscribe());
    let (stop, shutdown) = watch::channel(false);
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
    let mut served = tokio::spawn(proxy.serve(shutdown));
    print_line(&json!({
        "kind": "ready",
        "listeners": listeners,
        "journal": journal_line,
        "otlp": export.otlp_endpoint,
        "prometheus": exporting.prometheus_addr.map(|a| a.to_string()),
    }));
    let (printed_all, mut served_all) = tokio::sync::oneshot::channel::<()>();
    let printer = tokio::spawn(async move {
        let mut done = false;
        while !done {
            tokio::select! {
                biased;
                r = next(&mut breakers) => if !print_one(r, print_breaker_event) { breakers = None },
                r = next(&mut outcomes) => if !print_one(r, print_outcome) { outcomes = None },
                // The proxy is done: what is queued is all there will be.
                _ = &mut served_all => done = true,
            }
        }
        drain(&mut breakers, print_breaker_event);
        drain(&mut outcomes, print_outcome);
    });
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break }
            _ = sigint.recv() => { info!("SIGINT: draining"); break }
            // What the proxy holds right now, as a JSON line (until the status API comes).
            _ = sigusr1.recv() => {
                let mut line = serde_json::to_value(stats.snapshot()).unwrap_or_default();
                line["kind"] = "stats".into();
                line["journal"] = serde_json::to_value(journal_stats.figures()).unwrap_or_default();
                if let Some(l) = &exporting.log_stats {
                    line["otlp_logs"] = serde_json::to_value(l.figures()).unwrap_or_default();
                }
                print_line(&line);
            }
            r = &mut served => {
                r.context("the proxy task failed")?;
                bail!("the proxy stopped serving on its own");
            }
        }
    }
    let _ = stop.send(true);
    let left = served.await.context("the proxy task failed")?;
    let _ = printed_all.send(());
    let _ = journal_done.send(());
    if let Some(w) = writer {
        let _ = w.await;
    }
    // After the journal's last event: the exporter sends what it can of the rest.
    exporting.stop().await;
    let _ = printer.await;
    if left > 0 {
        bail!("{left} streams were still open when the drain timeout passed");
    }
    info!("drained");
    Ok(())
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

fn print_breaker_event(e: &crate::proxy::outcome::BreakerEvent) {
    let t = &e.transition;
    let c = &t.change;
    let trigger = e.trigger.as_ref().map(|o| {
        json!({
            "method": o.method,
            "endpoint": o.endpoint,
            "grpc_status": o.grpc_status,
            "ending": o.ending,
            "trace_id": o.context.trace_id,
            "session_id": o.context.session_id,
            "jwt_claims": o.context.claims.as_deref(),
        })
    });
    print_line(&json!({
        "kind": "breaker",
        "breaker": t.breaker.to_string(),
        "scope": t.breaker.scope,
        "name": t.breaker.name,
        "class": t.breaker.class,
        "from": c.from,
        "to": c.to,
        "reason": c.reason,
        "open_for_ms": c.open_for.map(|d| d.as_millis() as u64),
        "window": c.counts,
        "consecutive_failures": c.consecutive_failures,
        "trigger": trigger,
    }));
}

fn print_outcome(o: &crate::proxy::outcome::StreamOutcome) {
    let mut line = serde_json::to_value(o).unwrap_or_default();
    line["kind"] = "stream".into();
    print_line(&line);
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
            done_rx,
        );
        exporting.recorder = Some((done, task));
        metrics.observe_breakers(proxy.stats());
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
