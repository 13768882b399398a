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
    let mut outcomes = proxy.outcomes().subscribe();
    let (stop, shutdown) = watch::channel(false);
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let served = tokio::spawn(proxy.serve(shutdown));
    println!("{}", json!({"kind": "ready", "listeners": listeners}));
    let print = opts.print_outcomes;
    let printer = tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match outcomes.recv().await {
                Ok(o) if print => {
                    let mut line = serde_json::to_value(&o).unwrap_or_default();
                    line["kind"] = "stream".into();
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "outcome printer fell behind")
                }
                Err(RecvError::Closed) => break,
            }
        }
    });
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: draining"),
        _ = sigint.recv() => info!("SIGINT: draining"),
    }
    let _ = stop.send(true);
    let left = served.await.context("the proxy task failed")?;
    printer.abort();
    if left > 0 {
        bail!("{left} streams were still open when the drain timeout passed");
    }
    info!("drained");
    Ok(())
}
