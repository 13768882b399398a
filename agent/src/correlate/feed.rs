//! `agent run`'s kernel side: the probe pipeline ([`crate::probes::pipeline`]) with the
//! [`Correlator`] as its sink.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, warn};

use super::{Correlator, Targets, owners::OwnerLookup};
use crate::config::signals::{Parsed, SignalsConfig};
use crate::{
    probes::{
        LoadOptions, ProbeStatus, Probes,
        go_processes::{BinaryNames, DiscoveryOptions, GoDiscovery, GoProcessEvent},
        h2_hooks::H2Options,
        pipeline::{Pipeline, PipelineOptions, SignalSink},
        ring::ReaderStats,
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

/// The correlator as the pipeline's sink, with `--print-signals`' tap beside it.
struct Correlating {
    correlator: Correlator,
    tap: Option<Tap>,
    counters: ProbeCounters,
}

impl SignalSink for Correlating {
    fn started(&mut self, _probes: &Probes, names: &BinaryNames) {
        if let Some(tap) = self.tap.as_mut() {
            tap(Tapped::Names(names));
        }
    }

    fn signal(&mut self, signal: Signal) {
        if let Some(tap) = self.tap.as_mut() {
            tap(Tapped::Signal(&signal));
        }
        match signal {
            Signal::TcpReset(r) => self.correlator.tcp_reset(&r),
            Signal::H2Frame(f) => self.correlator.h2_frame(&f),
            Signal::GoStw(p) => self.correlator.go_stw(&p),
            Signal::H2Flow(_) => {}
        }
    }

    fn go_process(&mut self, event: &GoProcessEvent) {
        if let Some(tap) = self.tap.as_mut() {
            tap(Tapped::GoProcess(event));
        }
    }

    fn idle(&mut self) {
        if let Some(tap) = self.tap.as_mut() {
            tap(Tapped::Idle);
        }
    }

    /// Every [`SWEEP_INTERVAL`]: closed connections and old evidence go; the counters are read.
    fn tick(&mut self, probes: &Probes, discovery: Option<&GoDiscovery>) {
        self.correlator.sweep();
        let discovered = discovery.map(|d| d.figures.named()).into_iter().flatten();
        self.counters.set(
            probes
                .counters()
                .into_iter()
                .chain(discovered)
                .map(|(k, v)| (k.to_owned(), v)),
        );
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
        targets: Targets,
        tap: Option<Tap>,
    ) -> anyhow::Result<Self> {
        let pipeline = Pipeline::start(PipelineOptions {
            load: LoadOptions {
                probes: config.probes.clone(),
                ring_buffer_bytes: config.ring_buffer_bytes,
                h2: H2Options {
                    all_frames: false,
                    cgroup: config.cgroup.clone(),
                    tc_interfaces: config.tc_interfaces.clone(),
                },
            },
            ring_poll_interval: parsed.ring_poll_interval,
            discovery: DiscoveryOptions {
                linger: parsed.go_linger,
                expedite_rcu: config.go_attach_expedited,
            },
        })
        .context("cannot attach the kernel probes (run as root, or give --no-probes)")?;
        if let Some(d) = pipeline.discovery() {
            debug!(stats = ?d.stats(), "Go processes at start");
        }
        let status = pipeline.probes().status.clone();
        let reader = pipeline.reader_stats();
        let counters = ProbeCounters::default();
        let (stop, stopped) = watch::channel(false);
        let owners = OwnerLookup {
            joins: targets.joins.clone(),
        }
        .spawn(SWEEP_INTERVAL, stopped.clone());
        let mut sink = Correlating {
            correlator: Correlator::new(targets, config.clone(), parsed),
            tap,
            counters: counters.clone(),
        };
        let task = tokio::spawn(async move {
            let finished = pipeline.run(&mut sink, Some(SWEEP_INTERVAL), stopped).await;
            owners.abort();
            if let Some(d) = finished.discovery {
                tokio::task::block_in_place(|| d.stop());
            }
        });
        Ok(Self {
            status,
            reader,
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
