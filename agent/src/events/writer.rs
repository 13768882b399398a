//! The task that writes breaker transitions to the journal as they are published. A
//! transition is journaled (and, with the default fsync policy, on disk) before anything
//! downstream of the journal reports it. What could not be written is counted, never
//! silently lost: `dropped` (the writer fell behind the broadcast) and `failed` (the
//! journal refused it: a full disk, say).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::broadcast::{self, error::RecvError};
use tracing::warn;

use super::{BreakerEvent, bus::Published};
use super::{
    journal::{Fsync, Journal},
    trip::breaker_trip,
};

#[derive(Debug, Default)]
pub struct JournalStats {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
    pub last_seq: AtomicU64,
    /// Poked after each event written, for readers that follow the journal (the exporter).
    pub appended: tokio::sync::Notify,
    /// The last sequence number journaled, for any number of followers (the API's watchers).
    pub journaled: tokio::sync::watch::Sender<u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct JournalFigures {
    pub written: u64,
    pub dropped: u64,
    pub failed: u64,
    pub last_seq: u64,
}

impl JournalStats {
    pub fn figures(&self) -> JournalFigures {
        JournalFigures {
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            last_seq: self.last_seq.load(Ordering::Relaxed),
        }
    }
}

/// Puts each breaker's events of a batch in the order of its changes (`breaker.generation`),
/// in the places its events hold: two changes of one breaker made on two threads at once (the
/// timer turning it half-open, a call's result) can be published the other way round.
fn in_breaker_order(batch: &mut [serde_json::Value]) {
    let mut by_breaker: std::collections::HashMap<String, Vec<usize>> =
        std::collections::HashMap::new();
    for (i, v) in batch.iter().enumerate() {
        let name = v["breaker"]["name"].as_str().unwrap_or_default().to_owned();
        by_breaker.entry(name).or_default().push(i);
    }
    for places in by_breaker.values().filter(|p| p.len() > 1) {
        let mut events: Vec<serde_json::Value> = places
            .iter()
            .map(|&i| std::mem::take(&mut batch[i]))
            .collect();
        events.sort_by_key(|v| v["breaker"]["generation"].as_u64().unwrap_or(0));
        for (&i, e) in places.iter().zip(events) {
            batch[i] = e;
        }
    }
}

/// An event as journaled, for what reports events after the journal (the printer, the
/// exporters): its line. Reported means durable (with the default
/// fsync policy).
#[derive(Clone, Debug)]
pub struct Journaled {
    pub line: Arc<str>,
}

pub type JournaledEvents = Published<Journaled>;

/// Events written with one sync at most (a group commit).
const BATCH: usize = 1024;

/// Writes every event of `rx` until `done` (the proxy stopped: what is queued is all there
/// will be), then syncs. What is queued when the writer wakes is written as one batch with
/// one sync, then published on `journaled`.
pub async fn write_transitions(
    mut journal: Journal,
    mut rx: broadcast::Receiver<BreakerEvent>,
    stats: Arc<JournalStats>,
    journaled: Arc<JournaledEvents>,
    fsync: Fsync,
    mut done: tokio::sync::oneshot::Receiver<()>,
) {
    stats
        .last_seq
        .store(journal.next_seq().saturating_sub(1), Ordering::Relaxed);
    stats
        .journaled
        .send_replace(journal.next_seq().saturating_sub(1));
    let period = match fsync {
        Fsync::Every(d) => d,
        _ => Duration::from_secs(3600),
    };
    let mut tick = tokio::time::interval(period);
    let lagged = |n: u64| {
        stats.dropped.fetch_add(n, Ordering::Relaxed);
        warn!(
            lost = n,
            "journal writer fell behind: breaker events dropped"
        );
    };
    let mut batch: Vec<serde_json::Value> = Vec::with_capacity(BATCH);
    // Takes what else is queued, up to a batch; false once the channel is closed.
    let fill = |rx: &mut broadcast::Receiver<BreakerEvent>, batch: &mut Vec<serde_json::Value>| {
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(breaker_trip(&e, e.at)),
                Err(broadcast::error::TryRecvError::Lagged(n)) => lagged(n),
                Err(broadcast::error::TryRecvError::Empty) => return true,
                Err(broadcast::error::TryRecvError::Closed) => return false,
            }
        }
        true
    };
    let write = |journal: &mut Journal, batch: &mut Vec<serde_json::Value>| {
        if batch.is_empty() {
            return;
        }
        in_breaker_order(batch);
        // The journal's write and fsync block: off the runtime's other tasks.
        let (written, error) = tokio::task::block_in_place(|| journal.append_batch(batch));
        let failed = batch.len() - written.len();
        batch.clear();
        if let Some(error) = error {
            // Written but not known to be on disk, or not written: not reported.
            stats
                .failed
                .fetch_add((failed + written.len()) as u64, Ordering::Relaxed);
            warn!(%error, "breaker events not journaled");
            return;
        }
        stats
            .written
            .fetch_add(written.len() as u64, Ordering::Relaxed);
        for (seq, line) in written {
            stats.last_seq.store(seq, Ordering::Relaxed);
            journaled.publish(Journaled { line: line.into() });
        }
        // The followers of the journal (the OTLP exporter, the API's watchers) read on.
        stats.appended.notify_one();
        stats
            .journaled
            .send_replace(stats.last_seq.load(Ordering::Relaxed));
    };
    loop {
        tokio::select! {
            biased;
            r = rx.recv() => match r {
                Ok(e) => {
                    batch.push(breaker_trip(&e, e.at));
                    let open = fill(&mut rx, &mut batch);
                    write(&mut journal, &mut batch);
                    if !open {
                        break;
                    }
                }
                Err(RecvError::Lagged(n)) => lagged(n),
                Err(RecvError::Closed) => break,
            },
            _ = &mut done => {
                while fill(&mut rx, &mut batch) && !batch.is_empty() {
                    write(&mut journal, &mut batch);
                }
                write(&mut journal, &mut batch);
                break;
            }
            _ = tick.tick() => {
                if let Err(error) = tokio::task::block_in_place(|| journal.sync()) {
                    warn!(%error, "journal sync failed");
                }
            }
        }
    }
    if let Err(error) = tokio::task::block_in_place(|| journal.sync()) {
        warn!(%error, "journal sync failed");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::in_breaker_order;

    #[test]
    fn a_breakers_events_are_put_in_generation_order_in_their_own_places() {
        let e = |name: &str, g: u64| json!({"breaker": {"name": name, "generation": g}});
        let mut batch = vec![e("a", 3), e("b", 7), e("a", 2), e("c", 1), e("a", 4)];
        in_breaker_order(&mut batch);
        let got: Vec<(String, u64)> = batch
            .iter()
            .map(|v| {
                (
                    v["breaker"]["name"].as_str().unwrap_or_default().to_owned(),
                    v["breaker"]["generation"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        let want = [("a", 2), ("b", 7), ("a", 3), ("c", 1), ("a", 4)];
        assert_eq!(got, want.map(|(n, g)| (n.to_owned(), g)).to_vec());
    }
}
