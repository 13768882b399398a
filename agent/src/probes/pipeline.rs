//! The kernel side, once for both of its users: load and attach the probes, read the ring, and
//! follow Go processes, handing everything to a [`SignalSink`]. `agent trace` prints what it
//! gets (`cli::trace`), `agent run` correlates it (`correlate::feed`).
//!
//! Go process discovery runs on threads of its own: a sink that blocks (a stdout nobody reads)
//! holds up the signals, never the handling of a new exec.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    LoadOptions, ProbeError, ProbeName, Probes,
    go_processes::{self, BinaryNames, DiscoveryOptions, GoDiscovery, GoProcessEvent},
    ring::{self, ReaderStats},
};
use crate::signals::Signal;

/// How often the ring is read at least, unless configured (`--ring-poll-interval`,
/// `[signals] ring_poll_interval`): TCP resets wake the reader at once; the others wait at most
/// this long.
pub const DEFAULT_RING_POLL_INTERVAL: &str = "5ms";

/// What to attach and how to read it.
pub struct PipelineOptions {
    pub load: LoadOptions,
    pub ring_poll_interval: Duration,
    /// Go process discovery's, when `go-gc` is attached.
    pub discovery: DiscoveryOptions,
}

/// What consumes the pipeline: called from one task, in the order things happened.
pub trait SignalSink {
    /// Once, before any signal: the probes are attached and the Go processes already running
    /// have theirs (their `go_process` events came first).
    fn started(&mut self, _probes: &Probes, _names: &BinaryNames) {}
    fn signal(&mut self, signal: Signal);
    fn go_process(&mut self, event: &GoProcessEvent);
    /// Everything queued so far has been handed over (a moment to flush).
    fn idle(&mut self) {}
    /// Every `tick` of [`Pipeline::run`].
    fn tick(&mut self, _probes: &Probes, _discovery: Option<&GoDiscovery>) {}
}

/// The kernel side, attached and reading.
pub struct Pipeline {
    probes: Probes,
    reader: ring::Reader,
    discovery: Option<GoDiscovery>,
}

/// What is left once the ring has closed.
pub struct Finished {
    pub probes: Probes,
    pub reader: Arc<ReaderStats>,
    /// Still attached: [`GoDiscovery::stop`] releases the Go probes.
    pub discovery: Option<GoDiscovery>,
}

impl Pipeline {
    /// Attaches the probes and starts reading; returns once the Go processes already running
    /// have their probes.
    pub fn start(opts: PipelineOptions) -> Result<Pipeline, PipelineError> {
        let (probes, ring, decoder) = Probes::load(&opts.load)?;
        let reader =
            ring::start(ring, decoder, opts.ring_poll_interval).map_err(PipelineError::Ring)?;
        let discovery = if probes.is_attached(ProbeName::GoGc) {
            Some(tokio::task::block_in_place(|| {
                GoDiscovery::start(probes.ebpf.clone(), opts.discovery)
            })?)
        } else {
            None
        };
        Ok(Pipeline {
            probes,
            reader,
            discovery,
        })
    }

    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    pub fn reader_stats(&self) -> Arc<ReaderStats> {
        self.reader.stats.clone()
    }

    pub fn discovery(&self) -> Option<&GoDiscovery> {
        self.discovery.as_ref()
    }

    /// Hands everything to `sink` until `stop` turns true (or its sender goes), then drains
    /// what the kernel still holds and what discovery still has queued: nothing seen is lost.
    pub async fn run(
        mut self,
        sink: &mut impl SignalSink,
        tick: Option<Duration>,
        mut stop: watch::Receiver<bool>,
    ) -> Finished {
        if let Some(d) = self.discovery.as_mut() {
            while let Ok(event) = d.events.try_recv() {
                sink.go_process(&event);
            }
        }
        let names = self
            .discovery
            .as_ref()
            .map(|d| d.names.clone())
            .unwrap_or_default();
        sink.started(&self.probes, &names);
        let ring::Reader {
            signals: mut rx,
            stats,
            stop: stop_reader,
            task,
        } = self.reader;
        let mut ticker = tick.map(tokio::time::interval);
        let mut stopping = false;
        loop {
            tokio::select! {
                batch = rx.recv() => {
                    let Some(batch) = batch else { break };
                    for signal in batch {
                        sink.signal(signal);
                    }
                    if rx.is_empty() {
                        sink.idle();
                    }
                }
                Some(event) = go_processes::next_event(self.discovery.as_mut()) => {
                    sink.go_process(&event);
                    sink.idle();
                }
                _ = next_tick(ticker.as_mut()) => sink.tick(&self.probes, self.discovery.as_ref()),
                _ = stop.wait_for(|s| *s), if !stopping => {
                    // The reader drains the ring, then closes it, which ends this loop.
                    stopping = true;
                    let _ = stop_reader.send(true);
                }
            }
        }
        let _ = task.await;
        // Go process events still queued (the sink may have been held up) are handed over too.
        if let Some(d) = self.discovery.as_mut() {
            while let Ok(event) = d.events.try_recv() {
                sink.go_process(&event);
            }
        }
        sink.idle();
        Finished {
            probes: self.probes,
            reader: stats,
            discovery: self.discovery,
        }
    }
}

/// The next tick; pending for ever without a ticker.
async fn next_tick(ticker: Option<&mut tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Probes(#[from] ProbeError),
    #[error("cannot poll the ring buffer")]
    Ring(#[source] std::io::Error),
}
