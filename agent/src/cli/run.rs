//! `agent run`: the proxy (with a configuration file, or the quick mode), until SIGTERM.

use std::{io::Write as _, net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use serde_json::json;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::info;

use crate::proxy::{config, server::Proxy};

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
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let config = match (&opts.config, opts.listen) {
        (Some(path), _) => config::load(path)?,
        (None, Some(listen)) => {
            config::quick(listen, &opts.upstream).map_err(|e| anyhow::anyhow!(e))?
        }
        (None, None) => bail!("give --config FILE, or --listen ADDR --upstream HOST:PORT,..."),
    };
    let proxy = Proxy::bind(&config).await?;
    let listeners: Vec<_> = proxy
        .local_addrs()
        .into_iter()
        .map(|(name, addr)| json!({"name": name, "address": addr.to_string()}))
        .collect();
    let stats = proxy.stats();
    let mut outcomes = opts.print_outcomes.then(|| proxy.outcomes().subscribe());
    let (stop, shutdown) = watch::channel(false);
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
    let mut served = tokio::spawn(proxy.serve(shutdown));
    print_line(&json!({"kind": "ready", "listeners": listeners}));
    let (printed_all, mut served_all) = tokio::sync::oneshot::channel::<()>();
    let printer = tokio::spawn(async move {
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        let Some(outcomes) = outcomes.as_mut() else {
            return;
        };
        let lagged = |n| tracing::warn!(lost = n, "outcome printer fell behind");
        loop {
            tokio::select! {
                biased;
                r = outcomes.recv() => match r {
                    Ok(o) => print_outcome(&o),
                    Err(RecvError::Lagged(n)) => lagged(n),
                    Err(RecvError::Closed) => break,
                },
                // The proxy is done: what is queued is all there will be.
                _ = &mut served_all => {
                    loop {
                        match outcomes.try_recv() {
                            Ok(o) => print_outcome(&o),
                            Err(TryRecvError::Lagged(n)) => lagged(n),
                            Err(_) => break,
                        }
                    }
                    break;
                }
            }
        }
    });
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: draining"); break }
            _ = sigint.recv() => { info!("SIGINT: draining"); break }
            // What the proxy holds right now, as a JSON line (until the status API comes).
            _ = sigusr1.recv() => {
                let mut line = serde_json::to_value(stats.snapshot()).unwrap_or_default();
                line["kind"] = "stats".into();
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

fn print_outcome(o: &crate::proxy::outcome::StreamOutcome) {
    let mut line = serde_json::to_value(o).unwrap_or_default();
    line["kind"] = "stream".into();
    print_line(&line);
}
