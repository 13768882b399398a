//! `agent run`'s kernel side: attach the probes, read the ring, follow Go processes, and hand
//! every signal to the [`Correlator`].

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, warn};

use super::{Correlator, Targets, owners::OwnerLookup};
use crate::config::signals::{Parsed, SignalsConfig};
use crate::{
    probes::{
        LoadOptions, ProbeName, ProbeStatus, Probes,
        go_processes::{self, BinaryNames, DiscoveryOptions, GoDiscovery, GoProcessEvent},
        h2_hooks::H2Options,
        ring::{self, ReaderStats},
    },
    signals::Signal,
};

/// How often closed connections and old evidence are swept, and new upstream
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

/// What `agent run --print-signals` sees: every kernel signal and Go process event, as the
/// correlator gets them.
pub enum Tapped<'a> {
    /// Once, first: the names of the Go binaries whose pauses follow.
    Names(&'a BinaryNames),
    Signal(&'a Signal),
    GoProcess(&'a GoProcessEvent),
    /// The correlator has taken every signal queued so far.
    Idle,
}

pub type Tap = Box<dyn FnMut(Tapped<'_>) + Send>;

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
        targets: Targets,
        mut tap: Option<Tap>,
    ) -> anyhow::Result<Self> {
        let (probes, ring, decoder) = Probes::load(&LoadOptions {
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
        let mut discovery = if probes.is_attached(ProbeName::GoGc) {
            let d = tokio::task::block_in_place(|| {
                GoDiscovery::start(
                    probes.ebpf.clone(),
                    DiscoveryOptions {
                        linger: parsed.go_linger,
                        expedite_rcu: config.go_attach_expedited,
                    },
                )
            })?;
            debug!(stats = ?d.stats(), "Go processes at start");
            Some(d)
        } else {
            None
        };
        if let Some(tap) = tap.as_mut() {
            let names = discovery
                .as_ref()
                .map(|d| d.names.clone())
                .unwrap_or_default();
            tap(Tapped::Names(&names));
        }
        let status = probes.status.clone();
        let counters = ProbeCounters::default();
        let counters_out = counters.clone();
        let (stop, mut stopped) = watch::channel(false);
        let owners = OwnerLookup {
            joins: targets.joins.clone(),
            endpoints: targets.endpoints.clone(),
        }
        .spawn(SWEEP_INTERVAL, stopped.clone());
        let mut correlator = Correlator::new(targets, config.clone(), parsed);
        let task = tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    batch = rx.recv() => {
                        let Some(batch) = batch else { break };
                        for signal in batch {
                            if let Some(tap) = tap.as_mut() {
                                tap(Tapped::Signal(&signal));
                            }
                            match signal {
                                Signal::TcpReset(r) => correlator.tcp_reset(&r),
                                Signal::H2Frame(f) => correlator.h2_frame(&f),
                                Signal::GoStw(p) => correlator.go_stw(&p),
                                Signal::H2Flow(_) => {}
                            }
                        }
                        if rx.is_empty() && let Some(tap) = tap.as_mut() {
                            tap(Tapped::Idle);
                        }
                    }
                    Some(event) = go_processes::next_event(discovery.as_mut()) => {
                        if let Some(tap) = tap.as_mut() {
                            tap(Tapped::GoProcess(&event));
                            tap(Tapped::Idle);
                        }
                    }
                    _ = sweep.tick() => {
                        correlator.sweep();
                        let discovered = discovery.as_ref().map(|d| d.figures.named()).into_iter().flatten();
                        counters_out.set(
                            probes.counters().into_iter().chain(discovered).map(|(k, v)| (k.to_owned(), v)),
                        );
                    }
                    _ = stopped.changed() => { let _ = stop_reader.send(true); }
                }
            }
            let _ = reader.await;
            owners.abort();
            // Go process events still queued when the ring closed are tapped, not lost.
            if let (Some(d), Some(tap)) = (discovery.as_mut(), tap.as_mut()) {
                while let Ok(event) = d.events.try_recv() {
                    tap(Tapped::GoProcess(&event));
                }
                tap(Tapped::Idle);
            }
            if let Some(d) = discovery {
                tokio::task::block_in_place(|| d.stop());
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
