//! `agent run`'s kernel side: attach the probes, read the ring, follow Go processes, and hand
//! every signal to the [`Correlator`].

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, warn};

use super::{Correlator, config::Parsed, config::SignalsConfig};
use crate::{
    probes::{
        LoadOptions, ProbeName, ProbeStatus, Probes,
        go_processes::GoTracker,
        h2_hooks::H2Options,
        ring::{self, ReaderStats},
    },
    proxy::forward::Shared,
    signals::Signal,
};

/// How often closed connections, old evidence and Go processes are swept, and new upstream
/// connections' serving processes looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The kernel programs' counters as of the last sweep, by name.
#[derive(Clone, Default)]
pub struct ProbeCounters(Arc<std::sync::Mutex<Vec<(String, u64)>>>);

impl ProbeCounters {
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.0.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn set(&self, counters: impl IntoIterator<Item = (String, u64)>) {
        if let Ok(mut c) = self.0.lock() {
            *c = counters.into_iter().collect();
        }
    }
}

/// The running kernel side.
pub struct KernelFeed {
    pub status: Vec<ProbeStatus>,
    pub reader: Arc<ReaderStats>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    counters: ProbeCounters,
}

impl KernelFeed {
    /// Attaches the configured probes and starts correlating.
    pub fn start(
        config: &SignalsConfig,
        parsed: Parsed,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Self> {
        let (mut probes, ring, decoder) = Probes::load(&LoadOptions {
            probes: config.probes.clone(),
            ring_buffer_bytes: config.ring_buffer_bytes,
            h2: H2Options {
                all_frames: false,
                cgroup: config.cgroup.clone(),
                tc_interfaces: config.tc_interfaces.clone(),
            },
        })
        .context("cannot attach the kernel probes (run as root, or give --no-probes)")?;
        let ring::Reader {
            signals: mut rx,
            stats: reader_stats,
            stop: stop_reader,
            task: reader,
        } = ring::start(ring, decoder, parsed.ring_poll_interval)
            .context("cannot poll the ring buffer")?;
        let mut tracker = if probes.is_attached(ProbeName::GoGc) {
            let mut t = GoTracker::new(&mut probes.ebpf)?;
            let found = t.scan_running(&mut probes.ebpf);
            debug!(processes = found.len(), "Go processes at start");
            Some(t)
        } else {
            None
        };
        let status = probes.status.clone();
        let counters = ProbeCounters::default();
        let counters_out = counters.clone();
        let (stop, mut stopped) = watch::channel(false);
        let joins = shared.joins.clone();
        let mut correlator = Correlator::new(shared, config.clone(), parsed);
        let task = tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    batch = rx.recv() => {
                        let Some(batch) = batch else { break };
                        for signal in batch {
                            match signal {
                                Signal::TcpReset(r) => correlator.tcp_reset(&r),
                                Signal::H2Frame(f) => correlator.h2_frame(&f),
                                Signal::GoStw(p) => {
                                    let minor = tracker.as_ref().and_then(|t| t.go_minor(p.pid));
                                    correlator.go_stw(&p, minor);
                                }
                                Signal::ProcessExec { pid } => {
                                    if let Some(t) = tracker.as_mut() {
                                        tokio::task::block_in_place(|| t.process_started(&mut probes.ebpf, pid));
                                    }
                                }
                                Signal::ProcessExit { pid } => {
                                    if let Some(t) = tracker.as_mut() {
                                        t.process_exited(&mut probes.ebpf, pid);
                                    }
                                }
                                Signal::H2Flow(_) => {}
                            }
                        }
                    }
                    _ = sweep.tick() => {
                        if let Some(t) = tracker.as_mut() {
                            tokio::task::block_in_place(|| t.sweep(&mut probes.ebpf));
                        }
                        correlator.sweep().await;
                        counters_out.set(probes.counters().into_iter().map(|(k, v)| (k.to_owned(), v)));
                    }
                    _ = joins.tracked.upstream_opened.notified() => correlator.look_up_owners().await,
                    _ = stopped.changed() => { let _ = stop_reader.send(true); }
                }
            }
            let _ = reader.await;
            if let Some(t) = tracker.as_mut() {
                t.release_all(&mut probes.ebpf);
            }
        });
        Ok(Self {
            status,
            reader: reader_stats,
            stop,
            task,
            counters,
        })
    }

    pub fn counters(&self) -> ProbeCounters {
        self.counters.clone()
    }

    /// The kernel programs' counters (as of the last sweep) and the ring reader's.
    pub fn figures(&self) -> Value {
        let kernel: serde_json::Map<String, Value> = self
            .counters
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
        json!({
            "kernel": kernel,
            "reader": self.reader.figures(),
        })
    }

    /// Stops reading (after a last drain) and detaches.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            warn!(error = %e, "the kernel signal task failed");
        }
    }
}
