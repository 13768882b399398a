//! The one consumer of the `EVENTS` ring buffer: wait for readiness, drain, decode, hand on.
//!
//! Decoded signals go through a bounded channel with backpressure, a batch per message (one
//! channel operation per event cost more than decoding it): when the consumer is slow the
//! kernel ring fills up and the kernel programs count their drops, so no loss goes unseen.
//!
//! The kernel programs write most records without waking us (see `wakeup_flags` in the eBPF
//! crate): we read the ring every `poll_interval`, and are woken early only when it fills past
//! 1/16. A signal therefore reaches the daemon at most one interval after it happened.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::debug;

use crate::signals::{Decoder, Signal};

/// Records handed on per message (and per wake-up before yielding, so one burst cannot starve
/// the runtime).
const BATCH: usize = 4096;

/// Batches the channel holds before the reader waits: 16 batches of up to `BATCH` signals.
const CHANNEL_BATCHES: usize = 16;

#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Ring records read.
    pub records: AtomicU64,
    /// Signals decoded from them (a record of batched frames holds many).
    pub signals: AtomicU64,
    pub undecodable: AtomicU64,
}

impl ReaderStats {
    pub fn figures(&self) -> serde_json::Value {
        serde_json::json!({
            "records": self.records.load(Ordering::Relaxed),
            "signals": self.signals.load(Ordering::Relaxed),
            "undecodable": self.undecodable.load(Ordering::Relaxed),
        })
    }
}

/// A running reader: the batches of signals it hands on, its figures, and how to stop it.
pub struct Reader {
    pub signals: mpsc::Receiver<Vec<Signal>>,
    pub stats: Arc<ReaderStats>,
    /// Send true to stop it (after a last drain, so events already in the ring are delivered).
    pub stop: watch::Sender<bool>,
    pub task: JoinHandle<()>,
}

/// Starts the reader of `ring`, reading it at least every `poll_interval`.
pub fn start(
    ring: RingBuf<MapData>,
    decoder: Decoder,
    poll_interval: Duration,
) -> std::io::Result<Reader> {
    let (tx, signals) = mpsc::channel(CHANNEL_BATCHES);
    let (stop, shutdown) = watch::channel(false);
    let stats = Arc::new(ReaderStats::default());
    let task = spawn(ring, decoder, tx, shutdown, stats.clone(), poll_interval)?;
    Ok(Reader {
        signals,
        stats,
        stop,
        task,
    })
}

/// Spawns the reader. It returns when `shutdown` flips to true (after a last drain, so events
/// already in the ring are delivered) or when the receiver is gone.
fn spawn(
    ring: RingBuf<MapData>,
    decoder: Decoder,
    tx: mpsc::Sender<Vec<Signal>>,
    mut shutdown: watch::Receiver<bool>,
    stats: Arc<ReaderStats>,
    poll_interval: Duration,
) -> std::io::Result<JoinHandle<()>> {
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for the AsyncFd's life.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
    Ok(tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        let mut poll = tokio::time::interval(poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    if !drain_all(fd.get_mut(), &decoder, &stats, &mut batch, &tx).await {
                        return;
                    }
                }
                ready = fd.readable_mut() => {
                    let Ok(mut guard) = ready else { return };
                    let drained = drain(guard.get_inner_mut(), &decoder, &stats, &mut batch);
                    // Readiness is edge-triggered: clear it only once the ring is empty.
                    if drained {
                        guard.clear_ready();
                    }
                }
                _ = shutdown.changed() => {
                    if drain_all(fd.get_mut(), &decoder, &stats, &mut batch, &tx).await {
                        send_all(&tx, &mut batch).await;
                    }
                    return;
                }
            }
            if !send_all(&tx, &mut batch).await {
                return;
            }
        }
    }))
}

/// Moves up to `BATCH` records into `batch`; true when the ring is empty.
fn drain(
    ring: &mut RingBuf<MapData>,
    decoder: &Decoder,
    stats: &ReaderStats,
    batch: &mut Vec<Signal>,
) -> bool {
    while batch.len() < BATCH {
        let Some(item) = ring.next() else { return true };
        stats.records.fetch_add(1, Ordering::Relaxed);
        let before = batch.len();
        match decoder.decode_into(&item, batch) {
            Ok(()) => {
                let n = (batch.len() - before) as u64;
                stats.signals.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                stats.undecodable.fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "undecodable ring record");
            }
        }
    }
    false
}

/// Drains the ring completely, handing on each full batch (the last, partial one stays in
/// `batch`); false when the receiver is gone.
async fn drain_all(
    ring: &mut RingBuf<MapData>,
    decoder: &Decoder,
    stats: &ReaderStats,
    batch: &mut Vec<Signal>,
    tx: &mpsc::Sender<Vec<Signal>>,
) -> bool {
    while !drain(ring, decoder, stats, batch) {
        if !send_all(tx, batch).await {
            return false;
        }
    }
    true
}

/// Hands on `batch` (leaving it empty); false when the receiver is gone.
async fn send_all(tx: &mpsc::Sender<Vec<Signal>>, batch: &mut Vec<Signal>) -> bool {
    if batch.is_empty() {
        return true;
    }
    let full = std::mem::replace(batch, Vec::with_capacity(BATCH));
    tx.send(full).await.is_ok()
}
