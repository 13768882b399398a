//! The publish bus: broadcast channels from the stages that produce records (the proxy's
//! stream outcomes, breaker events, the correlator's signal records, the journal's lines) to
//! those that report them. A consumer that falls behind loses the oldest records and learns
//! how many (and the producer counts them); a producer never waits for a consumer.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;

use super::{BreakerEvent, outcome::StreamOutcome};
use crate::correlate::{Joined, SignalRecord};

/// Stream outcomes, as calls end.
pub type Outcomes = Published<StreamOutcome>;

/// Breaker transitions, as they happen.
pub type BreakerEvents = Published<BreakerEvent>;

pub struct Published<T> {
    tx: broadcast::Sender<T>,
    published: AtomicU64,
}

impl<T: Clone> Published<T> {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            tx,
            published: AtomicU64::new(0),
        }
    }

    pub fn publish(&self, o: T) {
        self.published.fetch_add(1, Ordering::Relaxed);
        // No subscriber is fine: nobody asked.
        let _ = self.tx.send(o);
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<T> {
        self.tx.subscribe()
    }
}

/// Kernel signals as the correlator joined them, for the metrics.
pub type SignalRecords = Published<SignalRecord>;

/// The channels of one agent. The correlation stage publishes through it as its
/// [`crate::correlate::Outlet`].
pub struct Bus {
    pub outcomes: Outcomes,
    pub breaker_events: BreakerEvents,
    pub signals: SignalRecords,
}

impl Default for Bus {
    fn default() -> Self {
        Self {
            outcomes: Outcomes::new(16 * 1024),
            breaker_events: BreakerEvents::new(4 * 1024),
            signals: SignalRecords::new(16 * 1024),
        }
    }
}

impl crate::correlate::Outlet for Bus {
    fn transition(&self, joined: Joined) {
        self.breaker_events.publish(BreakerEvent::new(joined, None));
    }

    fn signal(&self, record: SignalRecord) {
        self.signals.publish(record);
    }
}
