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
    time::{Duration, SystemTime},
};

use tokio::sync::broadcast::{self, error::RecvError};
use tracing::warn;

use super::{
    journal::{Fsync, Journal},
    trip::breaker_trip,
};
use crate::proxy::outcome::BreakerEvent;

#[derive(Debug, Default)]
pub struct JournalStats {
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
    pub last_seq: AtomicU64,
    /// Poked after each event written, for readers that follow the journal (the exporter).
    pub appended: tokio::sync::Notify,
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

/// Writes every event of `rx` until `done` (the proxy stopped: what is queued is all there
/// will be), then syncs.
pub async fn write_transitions(
    mut journal: Journal,
    mut rx: broadcast::Receiver<BreakerEvent>,
    stats: Arc<JournalStats>,
    fsync: Fsync,
    mut done: tokio::sync::oneshot::Receiver<()>,
) {
    stats
        .last_seq
        .store(journal.next_seq().saturating_sub(1), Ordering::Relaxed);
    let period = match fsync {
        Fsync::Every(d) => d,
        _ => Duration::from_secs(3600),
    };
    let mut tick = tokio::time::interval(period);
    let write = |journal: &mut Journal, e: &BreakerEvent| {
        let event = breaker_trip(e, SystemTime::now());
        // The journal's write and fsync block: off the runtime's other tasks.
        match tokio::task::block_in_place(|| journal.append(&event)) {
            Ok(seq) => {
                stats.written.fetch_add(1, Ordering::Relaxed);
                stats.last_seq.store(seq, Ordering::Relaxed);
                stats.appended.notify_one();
            }
            Err(error) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(%error, "breaker event not journaled");
            }
        }
    };
    let lagged = |n: u64| {
        stats.dropped.fetch_add(n, Ordering::Relaxed);
        warn!(
            lost = n,
            "journal writer fell behind: breaker events dropped"
        );
    };
    loop {
        tokio::select! {
            biased;
            r = rx.recv() => match r {
                Ok(e) => write(&mut journal, &e),
                Err(RecvError::Lagged(n)) => lagged(n),
                Err(RecvError::Closed) => break,
            },
            _ = &mut done => {
                loop {
                    match rx.try_recv() {
                        Ok(e) => write(&mut journal, &e),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => lagged(n),
                        Err(_) => break,
                    }
                }
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
