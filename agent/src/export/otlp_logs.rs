//! The journal's events as OTLP log records, sent to a collector in order from a cursor: the
//! sequence number of the next event to send, kept in `otlp.cursor` in the journal's directory
//! and moved (written to a new file, renamed over the old) only after the collector
//! acknowledged a batch. A collector that is down or refuses gets the same batch again, after
//! an exponential backoff; a restart of the agent sends again what was not acknowledged. So
//! nothing is lost, and a record may arrive twice: its `seq` attribute tells.
//!
//! Each record: the event's JSON line as the body, every field as an attribute (nested objects
//! flattened with dots: `breaker.reason`, `stream.trace_id`, `jwt_claims.sub`; arrays as
//! arrays), the event's `ts` as its time, the triggering call's trace and span ids as its own.
//!
//! The records are built as opentelemetry-proto messages and sent with its generated tonic
//! client rather than through the SDK's `LogExporter`: the SDK lets no one outside build its
//! `SdkLogRecord`, its `LogBatch::new` is documented as about to become private, and its OTLP
//! exporter logs a partial success and moves on, where the cursor needs the answer.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::logs::v1::{ExportLogsServiceRequest, logs_service_client::LogsServiceClient},
    common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
};
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::events::{tail::Tail, writer::JournalStats};

/// The cursor's file, in the journal's directory.
pub const CURSOR_FILE: &str = "otlp.cursor";
/// Events per request at most.
const BATCH: usize = 512;
/// How often the journal is looked at when nothing woke the exporter.
const POLL: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Short: a collector that comes back is sent to within seconds.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At shutdown: how long what is left may take to go out (the cursor keeps the rest).
const DRAIN: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct LogStats {
    /// Records the collector acknowledged.
    pub exported: AtomicU64,
    /// Requests that failed (each is sent again).
    pub failures: AtomicU64,
    /// Records the collector acknowledged but said it rejected (partial success; OTLP says not
    /// to send those again).
    pub rejected: AtomicU64,
    /// Events retention deleted from the journal before they were sent.
    pub skipped: AtomicU64,
    /// The cursor: the sequence number of the next event to send.
    pub next_seq: AtomicU64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LogFigures {
    pub exported: u64,
    pub failures: u64,
    pub rejected: u64,
    pub skipped: u64,
    pub next_seq: u64,
}

impl LogStats {
    pub fn figures(&self) -> LogFigures {
        LogFigures {
            exported: self.exported.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            next_seq: self.next_seq.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogExportError {
    #[error("otlp endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Sends the events of the journal in `dir` to `endpoint` until `done` (then, for a few
/// seconds, what is left).
pub struct LogExporter {
    client: LogsServiceClient<tonic::transport::Channel>,
    dir: PathBuf,
    resource: Resource,
}

impl LogExporter {
    /// Must be called inside the runtime; connects when it first sends.
    pub fn new(endpoint: &str, dir: &Path) -> Result<LogExporter, LogExportError> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(|source| LogExportError::Endpoint {
                endpoint: endpoint.to_owned(),
                source,
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(REQUEST_TIMEOUT)
            .connect_lazy();
        Ok(LogExporter {
            client: LogsServiceClient::new(channel),
            dir: dir.to_owned(),
            resource: resource(),
        })
    }

    /// `last_seq`: the journal's when it was opened.
    pub async fn run(
        mut self,
        last_seq: u64,
        journal: Arc<JournalStats>,
        stats: Arc<LogStats>,
        mut done: oneshot::Receiver<()>,
    ) {
        let from = start_seq(read_cursor(&self.dir), last_seq);
        stats.next_seq.store(from, Ordering::Relaxed);
        let mut tail = Tail::new(&self.dir, from);
        let mut batch: Vec<(u64, String)> = Vec::new();
        let mut backoff = BACKOFF_MIN;
        // Set once `done` fired: the end of what may still be sent.
        let mut drain_until: Option<tokio::time::Instant> = None;
        loop {
            if batch.is_empty() {
                match tokio::task::block_in_place(|| tail.read(BATCH)) {
                    Ok(b) => batch = b,
                    Err(error) => warn!(%error, "otlp export: journal unreadable"),
                }
                stats.skipped.store(tail.skipped(), Ordering::Relaxed);
            }
            if batch.is_empty() {
                if drain_until.is_some() {
                    break;
                }
                tokio::select! {
                    _ = journal.appended.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                    _ = &mut done => drain_until = Some(tokio::time::Instant::now() + DRAIN),
                }
                continue;
            }
            let request = self.request(&batch);
            let sent = match drain_until {
                None => self.client.export(request).await,
                Some(until) => {
                    match tokio::time::timeout_at(until, self.client.export(request)).await {
                        Ok(r) => r,
                        Err(_) => break,
                    }
                }
            };
            match sent {
                Ok(response) => {
                    let rejected = response
                        .into_inner()
                        .partial_success
                        .map_or(0, |p| p.rejected_log_records.max(0) as u64);
                    if rejected > 0 {
                        stats.rejected.fetch_add(rejected, Ordering::Relaxed);
                        warn!(rejected, "otlp collector rejected log records");
                    }
                    let next = batch.last().map_or(1, |(s, _)| s + 1);
                    if let Err(error) =
                        tokio::task::block_in_place(|| write_cursor(&self.dir, next))
                    {
                        // Still sent; a restart sends them again.
                        warn!(%error, "otlp cursor not saved");
                    }
                    stats
                        .exported
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    stats.next_seq.store(next, Ordering::Relaxed);
                    if backoff > BACKOFF_MIN {
                        info!(next_seq = next, "otlp collector reachable again");
                    }
                    batch.clear();
                    backoff = BACKOFF_MIN;
                }
                Err(status) => {
                    stats.failures.fetch_add(1, Ordering::Relaxed);
                    warn!(code = ?status.code(), message = status.message(), retry_in = ?backoff, "otlp log export failed");
                    if drain_until.is_some() {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut done => drain_until = Some(tokio::time::Instant::now() + DRAIN),
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        let left = journal
            .last_seq
            .load(Ordering::Relaxed)
            .saturating_sub(stats.next_seq.load(Ordering::Relaxed).saturating_sub(1));
        if left > 0 {
            info!(
                left,
                "otlp export stopped: the rest is sent after a restart"
            );
        }
    }

    fn request(&self, batch: &[(u64, String)]) -> ExportLogsServiceRequest {
        let now = unix_nanos(SystemTime::now());
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "agent.events".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    log_records: batch
                        .iter()
                        .map(|(_, line)| log_record(line, now))
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}

/// Where to start from the saved cursor, given the journal's last sequence number.
fn start_seq(cursor: io::Result<Option<u64>>, last_seq: u64) -> u64 {
    match cursor {
        Ok(None) => 1,
        // A journal started afresh beside an old cursor: its numbers begin at 1 again, and a
        // cursor beyond them would skip them all.
        Ok(Some(n)) if n > last_seq + 1 => {
            warn!(
                cursor = n,
                last_seq, "otlp cursor beyond the journal: sending the journal from its start"
            );
            1
        }
        Ok(Some(n)) => n,
        Err(error) => {
            // Everything again rather than a gap: duplicates are allowed, losses are not.
            warn!(%error, "otlp cursor unreadable: sending the journal from its start");
            1
        }
    }
}

/// One journal line as a log record (`observed` = now, in Unix nanoseconds).
pub fn log_record(line: &str, observed: u64) -> LogRecord {
    let event: Value = serde_json::from_str(line).unwrap_or(Value::Null);
    let stream = &event["stream"];
    let severity = if event["breaker"]["to"] == "open" {
        SeverityNumber::Warn
    } else {
        SeverityNumber::Info
    };
    let time = event["ts"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .map_or(0, unix_nanos);
    let trace_id = stream["trace_id"]
        .as_str()
        .and_then(|t| id_bytes(t, 16))
        .unwrap_or_default();
    // A span id without a trace id is not one.
    let span_id = match trace_id.is_empty() {
        true => Vec::new(),
        false => stream["span_id"]
            .as_str()
            .and_then(|t| id_bytes(t, 8))
            .unwrap_or_default(),
    };
    LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: observed,
        severity_number: severity as i32,
        severity_text: severity
            .as_str_name()
            .trim_start_matches("SEVERITY_NUMBER_")
            .into(),
        body: Some(string_value(line)),
        attributes: attributes(&event),
        event_name: event["schema"]
            .as_str()
            .map_or("breaker_trip", |s| s.split('/').next().unwrap_or(s))
            .into(),
        trace_id,
        span_id,
        ..Default::default()
    }
}

/// Every field of `event` as attributes: nested objects flattened with dots, arrays kept as
/// arrays (their objects as key-value lists), nulls left out.
pub fn attributes(event: &Value) -> Vec<KeyValue> {
    let mut out = Vec::new();
    flatten("", event, &mut out);
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<KeyValue>) {
    match v {
        Value::Null => {}
        Value::Object(m) => {
            for (k, v) in m {
                let key = match prefix {
                    "" => k.clone(),
                    p => format!("{p}.{k}"),
                };
                flatten(&key, v, out);
            }
        }
        other => out.push(KeyValue {
            key: prefix.to_owned(),
            value: Some(any_value(other)),
            ..Default::default()
        }),
    }
}

fn any_value(v: &Value) -> AnyValue {
    use any_value::Value as V;
    let value = match v {
        Value::Null => None,
        Value::Bool(b) => Some(V::BoolValue(*b)),
        Value::Number(n) => Some(match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => V::IntValue(i),
            // Beyond i64: as text rather than rounded.
            (None, Some(u)) => V::StringValue(u.to_string()),
            _ => V::DoubleValue(n.as_f64().unwrap_or(f64::NAN)),
        }),
        Value::String(s) => Some(V::StringValue(s.clone())),
        Value::Array(a) => Some(V::ArrayValue(ArrayValue {
            values: a.iter().map(any_value).collect(),
        })),
        Value::Object(m) => Some(V::KvlistValue(KeyValueList {
            values: m
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: Some(any_value(v)),
                    ..Default::default()
                })
                .collect(),
        })),
    };
    AnyValue { value }
}

fn string_value(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_owned())),
    }
}

/// A W3C id (`len` bytes as lowercase hex, not all zero) as bytes.
fn id_bytes(hex: &str, len: usize) -> Option<Vec<u8>> {
    if hex.len() != len * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Vec<u8> = (0..len)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.iter().any(|&b| b != 0).then_some(bytes)
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn resource() -> Resource {
    let kv = |k: &str, v: String| KeyValue {
        key: k.into(),
        value: Some(string_value(&v)),
        ..Default::default()
    };
    let mut attributes = vec![
        kv("service.name", "agent".into()),
        kv("service.version", env!("CARGO_PKG_VERSION").into()),
    ];
    if let Some(h) = hostname() {
        attributes.push(kv("host.name", h));
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is ours and its length is passed.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    String::from_utf8(buf[..end].to_vec()).ok()
}

/// The saved cursor (None: no file yet: from the start).
pub fn read_cursor(dir: &Path) -> io::Result<Option<u64>> {
    match fs::read_to_string(dir.join(CURSOR_FILE)) {
        Ok(text) => text.trim().parse().map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{CURSOR_FILE} holds {text:?}: {e}"),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Saves the cursor: a new file renamed over the old, so a crash leaves one or the other.
pub fn write_cursor(dir: &Path, next_seq: u64) -> io::Result<()> {
    let tmp = dir.join(format!("{CURSOR_FILE}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    writeln!(f, "{next_seq}")?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join(CURSOR_FILE))?;
    // The rename itself: without the directory's sync a crash could bring the old one back,
    // which only sends some events again.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
