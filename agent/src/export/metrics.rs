//! The agent's metrics: one OpenTelemetry SDK meter provider, read by a periodic OTLP
//! exporter and by the Prometheus endpoint ([`super::prometheus`]), so both show the same
//! figures. Names follow OpenTelemetry's conventions and come out in Prometheus as a
//! collector would write them: counters get `_total`, the latency histogram (unit `s`)
//! `_seconds`.
//!
//! | metric (Prometheus name) | labels |
//! |---|---|
//! | `agent_breaker_state` (0 closed, 1 half-open, 2 open) | `scope`, `name`, `class` |
//! | `agent_breaker_transitions_total` | `scope`, `to`, `reason` |
//! | `agent_proxy_streams_total` | `method`, `grpc_status`, `ending` |
//! | `agent_proxy_stream_duration_seconds` (histogram) | `method`, `grpc_status` |
//! | `agent_events_dropped_total` | `stage` |
//! | `agent_otlp_log_records_exported_total`, `agent_otlp_log_export_failures_total` | |
//! | `agent_metric_label_values_folded_total` | `label` |
//! | `agent_kernel_tcp_resets_total` | `direction` (of the socket that saw it), `by` (`upstream`, `agent`, `client`; empty: not the proxy's connection), `endpoint` |
//! | `agent_kernel_h2_frames_total` | `type` (`RST_STREAM`, `GOAWAY`), `error`, `by`, `endpoint` |
//! | `agent_kernel_rapid_resets_total` | `target` (`proxy`, `other`) |
//! | `agent_go_stw_pause_seconds` (histogram) | `process`, `endpoint` (the upstream it serves; empty: none) |
//! | `agent_kernel_signals_total` | `kind` (`tcp_reset`, `rst_stream`, `goaway`, `go_stw`, `rapid_reset`), `stage` (`seen`, `joined`, `acted`, `duplicate`) |
//! | `agent_tracked` | `what` (`connections`, `streams`) |
//! | `agent_probe_events_total` | `counter` (the kernel programs' counters; drops end in `_dropped`) |
//! | `agent_intercept_connections_total` | `outcome` (`accepted`, `proxied_claimed`, `proxied_passthrough`, `spliced_not_http2`, `spliced_silent`, `spliced_passthrough_full`, `splice_connect_failed`, `refused_breaker_open`, `no_original`) |
//! | `agent_intercept_spliced_bytes_total` | `direction` (`to_destination`, `to_client`) |
//! | `agent_discovery_lookups_total` | `cluster`, `name` (the entry as written, or the file), `source` (`dns`, `file`), `result` (`answered`, `empty`, `failed`) |
//! | `agent_discovery_addresses` | `cluster`, `name`, `source` |
//! | `agent_upstream_endpoints` | `cluster`, `state` (`active`, `draining`) |
//! | `agent_upstream_tls_reloads_total` | `cluster`, `result` (`loaded`, `refused`) |
//! | `agent_intercept_kernel_total` | `counter` (`redirected`, `redirected_to_node`, `own_skipped`, `other_netns_skipped`, `no_listener_skipped`, `store_failed`, `peer_name_restored`, `peer_published`, `peer_publish_failed`) |
//!
//! Client breakers are in `agent_breaker_state` only while not closed (there may be
//! thousands). Methods come from clients: past [`MAX_METHODS`] distinct ones, the rest are
//! labelled `other` and counted as folded.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, Meter, MeterProvider as _},
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
};
use tokio::sync::{
    broadcast::{self, error::RecvError},
    oneshot,
};
use tracing::warn;

use super::otlp_logs::LogStats;
use crate::{
    breaker::{circuit::State, config::Scope},
    correlate::SignalRecord,
    events::{BreakerEvent, outcome::StreamOutcome, writer::JournalStats},
    proxy::server::StatsSource,
    signals::SignalKind,
};

/// Distinct `method` label values at most; the rest are `other`.
pub const MAX_METHODS: usize = 200;

/// Latency buckets, in seconds: 0.5 ms to 30 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A source of counter values, read at each collection: it calls its argument once per
/// series, with the value and the series' labels.
pub type CounterSource = Arc<dyn Fn(&mut dyn FnMut(u64, &[(&'static str, String)])) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("otlp metrics exporter for {endpoint:?}: {source}")]
    Otlp {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("prometheus exporter: {0}")]
    Prometheus(#[source] opentelemetry_sdk::error::OTelSdkError),
}

pub struct Metrics {
    provider: SdkMeterProvider,
    meter: Meter,
    registry: Option<prometheus::Registry>,
}

impl Metrics {
    /// Metrics sent every `interval` to an OTLP `endpoint`, and/or kept for a Prometheus
    /// endpoint. Must be called inside the runtime (the OTLP channel lives on it).
    pub fn new(otlp: Option<(&str, Duration)>, prometheus: bool) -> Result<Metrics, MetricsError> {
        let mut builder = SdkMeterProvider::builder().with_resource(
            Resource::builder()
                .with_service_name("agent")
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        if let Some((endpoint, interval)) = otlp {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(|source| MetricsError::Otlp {
                    endpoint: endpoint.to_owned(),
                    source,
                })?;
            builder = builder.with_reader(
                PeriodicReader::builder(exporter)
                    .with_interval(interval)
                    .build(),
            );
        }
        let registry = if prometheus {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .build()
                .map_err(MetricsError::Prometheus)?;
            builder = builder.with_reader(exporter);
            Some(registry)
        } else {
            None
        };
        let provider = builder.build();
        let meter = provider.meter("agent");
        Ok(Metrics {
            provider,
            meter,
            registry,
        })
    }

    /// What the Prometheus endpoint serves (None: not asked for).
    pub fn registry(&self) -> Option<prometheus::Registry> {
        self.registry.clone()
    }

    /// A counter read from `source` at each collection (kernel signal counts, say): `name`
    /// without `_total` (Prometheus adds it), `help` its description.
    pub fn observe_counters(&self, name: &'static str, help: &'static str, source: CounterSource) {
        let _ = self
            .meter
            .u64_observable_counter(name)
            .with_description(help)
            .with_callback(move |o| {
                source(&mut |v, labels| o.observe(v, &key_values(labels)));
            })
            .build();
    }

    /// A gauge read from `source` at each collection.
    pub fn observe_gauges(&self, name: &'static str, help: &'static str, source: CounterSource) {
        let _ = self
            .meter
            .u64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |o| {
                source(&mut |v, labels| o.observe(v, &key_values(labels)));
            })
            .build();
    }

    /// `agent_breaker_state` from the proxy's breakers, read at each collection.
    pub fn observe_breakers(&self, stats: StatsSource) {
        self.observe_gauges(
            "agent_breaker_state",
            "State of each circuit breaker: 0 closed, 1 half-open, 2 open (client breakers only while not closed)",
            Arc::new(move |observe| {
                for b in stats.snapshot().breakers {
                    let state = match b.figures.state {
                        State::Closed => 0,
                        State::HalfOpen => 1,
                        State::Open => 2,
                    };
                    if b.id.scope == Scope::Client && state == 0 {
                        continue;
                    }
                    observe(
                        state,
                        &[
                            ("scope", b.id.scope.as_str().to_owned()),
                            ("name", b.id.name),
                            ("class", b.id.class.unwrap_or_else(|| "default".into())),
                        ],
                    );
                }
            }),
        );
    }

    /// Interception's counters, when it is on: connections by what became of them, bytes
    /// spliced, and the kernel programs' own counts.
    pub fn observe_intercept(&self, stats: StatsSource) {
        let connections = stats.clone();
        self.observe_counters(
            "agent_intercept_connections",
            "Intercepted connections, by what became of them",
            Arc::new(move |observe| {
                if let Some(f) = connections.intercept() {
                    for (outcome, v) in f.outcomes() {
                        observe(v, &[("outcome", outcome.to_owned())]);
                    }
                }
            }),
        );
        let bytes = stats.clone();
        self.observe_counters(
            "agent_intercept_spliced_bytes",
            "Bytes spliced between intercepted clients and their original destinations",
            Arc::new(move |observe| {
                if let Some(f) = bytes.intercept() {
                    for (direction, v) in f.spliced_bytes() {
                        observe(v, &[("direction", direction.to_owned())]);
                    }
                }
            }),
        );
        self.observe_counters(
            "agent_intercept_kernel",
            "The interception programs' counters (connects redirected, left alone, and why)",
            Arc::new(move |observe| {
                if let Some(f) = stats.intercept() {
                    for (name, v) in f.kernel {
                        observe(v, &[("counter", name.to_owned())]);
                    }
                }
            }),
        );
    }

    /// Discovery's figures: lookups of each DNS name by result, the addresses each stands
    /// for, and each cluster's endpoints (those draining apart).
    pub fn observe_discovery(&self, stats: StatsSource) {
        let lookups = stats.clone();
        self.observe_counters(
            "agent_discovery_lookups",
            "Lookups of each cluster's DNS names and reads of its endpoints files: answered (addresses, or none: empty) and failed (the endpoints stayed)",
            Arc::new(move |observe| {
                for n in lookups.discovery() {
                    let at = |result: &str| {
                        [
                            ("cluster", n.cluster.clone()),
                            ("name", n.name.clone()),
                            ("source", n.source.to_owned()),
                            ("result", result.to_owned()),
                        ]
                    };
                    observe(n.answered - n.empty, &at("answered"));
                    observe(n.empty, &at("empty"));
                    observe(n.failed, &at("failed"));
                }
            }),
        );
        let addresses = stats.clone();
        self.observe_gauges(
            "agent_discovery_addresses",
            "Addresses each cluster DNS name or endpoints file stands for now (its endpoints)",
            Arc::new(move |observe| {
                for n in addresses.discovery() {
                    observe(
                        n.addresses.len() as u64,
                        &[
                            ("cluster", n.cluster),
                            ("name", n.name),
                            ("source", n.source.to_owned()),
                        ],
                    );
                }
            }),
        );
        let tls = stats.clone();
        self.observe_counters(
            "agent_upstream_tls_reloads",
            "Times a cluster's upstream TLS files changed: loaded (new connections use them) or refused (the ones before stay)",
            Arc::new(move |observe| {
                for t in tls.upstream_tls() {
                    let at = |result: &str| [("cluster", t.cluster.clone()), ("result", result.to_owned())];
                    observe(t.reloads, &at("loaded"));
                    observe(t.reload_failures, &at("refused"));
                }
            }),
        );
        self.observe_gauges(
            "agent_upstream_endpoints",
            "Each cluster's endpoints: active (calls pick them) and draining (gone from DNS, finishing their calls)",
            Arc::new(move |observe| {
                let mut counts: std::collections::BTreeMap<(String, bool), u64> =
                    std::collections::BTreeMap::new();
                for e in stats.upstreams() {
                    *counts.entry((e.cluster, e.draining)).or_default() += 1;
                }
                for ((cluster, draining), n) in counts {
                    let state = if draining { "draining" } else { "active" };
                    observe(n, &[("cluster", cluster), ("state", state.to_owned())]);
                }
            }),
        );
    }

    /// `agent_events_dropped_total{stage}`: what the journal writer, this recorder and the OTLP
    /// log exporter lost; and the exporter's own counts.
    pub fn observe_pipeline(
        &self,
        journal: Arc<JournalStats>,
        recorded: Arc<Recorded>,
        logs: Option<Arc<LogStats>>,
    ) {
        let l = logs.clone();
        self.observe_counters(
            "agent_events_dropped",
            "Events lost on the way, by stage: journal_lagged and journal_failed (not journaled), metrics_outcomes_lagged, metrics_transitions_lagged and metrics_signals_lagged (not counted in these metrics), otlp_rejected (refused by the collector), otlp_retention (deleted from the journal before they were sent)",
            Arc::new(move |observe| {
                let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let mut stage = |v, name: &str| observe(v, &[("stage", name.to_owned())]);
                stage(load(&journal.dropped), "journal_lagged");
                stage(load(&journal.failed), "journal_failed");
                stage(load(&recorded.outcomes_lagged), "metrics_outcomes_lagged");
                stage(load(&recorded.transitions_lagged), "metrics_transitions_lagged");
                stage(load(&recorded.signals_lagged), "metrics_signals_lagged");
                if let Some(l) = &l {
                    stage(load(&l.rejected), "otlp_rejected");
                    stage(load(&l.skipped), "otlp_retention");
                }
            }),
        );
        let Some(logs) = logs else { return };
        let l = logs.clone();
        self.observe_counters(
            "agent_otlp_log_records_exported",
            "Journal events the OTLP collector acknowledged (again after a restart of the agent)",
            Arc::new(move |observe| observe(l.exported.load(Ordering::Relaxed), &[])),
        );
        self.observe_counters(
            "agent_otlp_log_export_failures",
            "OTLP log requests that failed (each batch is sent again until acknowledged)",
            Arc::new(move |observe| observe(logs.failures.load(Ordering::Relaxed), &[])),
        );
    }

    /// Records stream outcomes and breaker transitions as the proxy publishes them, until
    /// `done` (then what is queued).
    pub fn record(
        &self,
        outcomes: broadcast::Receiver<StreamOutcome>,
        transitions: broadcast::Receiver<BreakerEvent>,
        signals: broadcast::Receiver<SignalRecord>,
        done: oneshot::Receiver<()>,
    ) -> (Arc<Recorded>, tokio::task::JoinHandle<()>) {
        let recorded = Arc::new(Recorded::default());
        let folded = recorded.clone();
        self.observe_counters(
            "agent_metric_label_values_folded",
            "Observations whose label value was replaced by \"other\" (too many distinct values)",
            Arc::new(move |observe| {
                observe(
                    folded.methods.folded.load(Ordering::Relaxed),
                    &[("label", "method".into())],
                );
            }),
        );
        let instruments = Instruments {
            streams: self
                .meter
                .u64_counter("agent_proxy_streams")
                .with_description("Streams the proxy ended, by method, gRPC status and ending")
                .build(),
            duration: self
                .meter
                .f64_histogram("agent_proxy_stream_duration")
                .with_description("Stream latency, from its request headers to its end")
                .with_unit("s")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            transitions: self
                .meter
                .u64_counter("agent_breaker_transitions")
                .with_description("Circuit breaker state changes, by scope, new state and reason")
                .build(),
            tcp_resets: self
                .meter
                .u64_counter("agent_kernel_tcp_resets")
                .with_description("TCP resets the kernel saw on this node, by direction (of the socket that saw it), who reset (upstream, agent, client; empty: not the proxy's connection) and upstream endpoint")
                .build(),
            h2_frames: self
                .meter
                .u64_counter("agent_kernel_h2_frames")
                .with_description("RST_STREAM and GOAWAY frames on the wire, by type, error code, sender (upstream, client; empty: not the proxy's) and upstream endpoint")
                .build(),
            rapid_resets: self
                .meter
                .u64_counter("agent_kernel_rapid_resets")
                .with_description("Client connections flagged for rapid reset (CVE-2023-44487), by target: the proxy's listeners or another server on this node")
                .build(),
            stw: self
                .meter
                .f64_histogram("agent_go_stw_pause")
                .with_description("Go stop-the-world pauses, as the Go runtime accounts them, by process name and the upstream endpoint it serves (empty: none)")
                .with_unit("s")
                .with_boundaries(STW_BUCKETS.to_vec())
                .build(),
        };
        let task = tokio::spawn(record(
            instruments,
            recorded.clone(),
            outcomes,
            transitions,
            signals,
            done,
        ));
        (recorded, task)
    }

    /// Sends the last figures (to a collector that may be down: bounded) and stops.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let stop = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(Duration::from_secs(3))
        });
        match tokio::time::timeout(Duration::from_secs(5), stop).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => warn!(%error, "metrics: last export failed"),
            Ok(Err(_)) | Err(_) => warn!("metrics: shutdown did not finish"),
        }
    }
}

fn key_values(labels: &[(&'static str, String)]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(k, v)| KeyValue::new(*k, v.clone()))
        .collect()
}

struct Instruments {
    streams: Counter<u64>,
    duration: Histogram<f64>,
    transitions: Counter<u64>,
    tcp_resets: Counter<u64>,
    h2_frames: Counter<u64>,
    rapid_resets: Counter<u64>,
    stw: Histogram<f64>,
}

/// Stop-the-world pause buckets, in seconds: 10 µs to 1 s.
const STW_BUCKETS: [f64; 15] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0,
];

/// Distinct Go process names kept as label values.
const MAX_PROCESSES: usize = 64;

/// What the recorder lost or folded.
#[derive(Debug)]
pub struct Recorded {
    /// Outcomes and transitions the recorder fell too far behind to see.
    pub outcomes_lagged: AtomicU64,
    pub transitions_lagged: AtomicU64,
    pub signals_lagged: AtomicU64,
    pub methods: LabelCap,
    pub processes: LabelCap,
}

impl Default for Recorded {
    fn default() -> Self {
        Recorded {
            outcomes_lagged: AtomicU64::new(0),
            transitions_lagged: AtomicU64::new(0),
            signals_lagged: AtomicU64::new(0),
            methods: LabelCap::new(MAX_METHODS),
            processes: LabelCap::new(MAX_PROCESSES),
        }
    }
}

async fn record(
    i: Instruments,
    recorded: Arc<Recorded>,
    mut outcomes: broadcast::Receiver<StreamOutcome>,
    mut transitions: broadcast::Receiver<BreakerEvent>,
    mut signals: broadcast::Receiver<SignalRecord>,
    mut done: oneshot::Receiver<()>,
) {
    let signal = |r: &SignalRecord| {
        let endpoint = KeyValue::new("endpoint", r.endpoint.as_deref().unwrap_or("").to_owned());
        match r.kind {
            SignalKind::TcpReset => i.tcp_resets.add(
                1,
                &[
                    KeyValue::new("direction", r.detail),
                    KeyValue::new("by", r.by),
                    endpoint,
                ],
            ),
            SignalKind::RstStream | SignalKind::Goaway => i.h2_frames.add(
                1,
                &[
                    KeyValue::new(
                        "type",
                        if r.kind == SignalKind::Goaway {
                            "GOAWAY"
                        } else {
                            "RST_STREAM"
                        },
                    ),
                    KeyValue::new("error", r.detail),
                    KeyValue::new("by", r.by),
                    endpoint,
                ],
            ),
            SignalKind::RapidReset => i.rapid_resets.add(1, &[KeyValue::new("target", r.detail)]),
            SignalKind::GoStw => {
                let process = recorded.processes.value(r.process.as_deref().unwrap_or(""));
                i.stw
                    .record(r.seconds, &[KeyValue::new("process", process), endpoint]);
            }
        }
    };
    let outcome = |o: &StreamOutcome| {
        let method = recorded.methods.value(&o.method);
        let status = o
            .grpc_status
            .map_or_else(|| "none".to_owned(), |s| s.to_string());
        let ending = serde_json::to_value(o.ending)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let labels = [
            KeyValue::new("method", method),
            KeyValue::new("grpc_status", status),
        ];
        i.duration.record(o.latency.as_secs_f64(), &labels);
        let [m, s] = labels;
        i.streams.add(1, &[m, s, KeyValue::new("ending", ending)]);
    };
    let transition = |e: &BreakerEvent| {
        let t = &e.transition;
        i.transitions.add(
            1,
            &[
                KeyValue::new("scope", t.breaker.scope.as_str()),
                KeyValue::new("to", t.change.to.as_str()),
                KeyValue::new("reason", t.change.reason.as_str().to_owned()),
            ],
        );
    };
    let lagged = |counter: &AtomicU64, n: u64| {
        counter.fetch_add(n, Ordering::Relaxed);
    };
    loop {
        tokio::select! {
            biased;
            r = transitions.recv() => match r {
                Ok(e) => transition(&e),
                Err(RecvError::Lagged(n)) => lagged(&recorded.transitions_lagged, n),
                Err(RecvError::Closed) => break,
            },
            r = signals.recv() => match r {
                Ok(s) => signal(&s),
                Err(RecvError::Lagged(n)) => lagged(&recorded.signals_lagged, n),
                Err(RecvError::Closed) => break,
            },
            r = outcomes.recv() => match r {
                Ok(o) => outcome(&o),
                Err(RecvError::Lagged(n)) => lagged(&recorded.outcomes_lagged, n),
                Err(RecvError::Closed) => break,
            },
            _ = &mut done => {
                while let Ok(e) = transitions.try_recv() {
                    transition(&e);
                }
                while let Ok(o) = outcomes.try_recv() {
                    outcome(&o);
                }
                while let Ok(s) = signals.try_recv() {
                    signal(&s);
                }
                break;
            }
        }
    }
}

/// Keeps a label's distinct values to a bound: the first `max` seen are kept, later new ones
/// become `other` (and are counted).
#[derive(Debug)]
pub struct LabelCap {
    max: usize,
    // Seeded hashing: the values are chosen by clients.
    seen: Mutex<HashSet<Box<str>, foldhash::quality::RandomState>>,
    pub folded: AtomicU64,
}

impl Default for LabelCap {
    fn default() -> Self {
        LabelCap::new(MAX_METHODS)
    }
}

impl LabelCap {
    pub fn new(max: usize) -> LabelCap {
        LabelCap {
            max,
            seen: Mutex::default(),
            folded: AtomicU64::new(0),
        }
    }

    pub fn value(&self, v: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(v) {
            return v.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(v.into());
            return v.to_owned();
        }
        self.folded.fetch_add(1, Ordering::Relaxed);
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn label_values_past_the_cap_are_other_and_counted() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.value("/a"), "/a");
        assert_eq!(cap.value("/b"), "/b");
        assert_eq!(cap.value("/c"), "other");
        assert_eq!(cap.value("/a"), "/a");
        assert_eq!(cap.value("/d"), "other");
        assert_eq!(cap.folded.load(Ordering::Relaxed), 2);
    }
}
