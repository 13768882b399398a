//! A breaker's change of state as the agent reports it: the transition, what caused it, and
//! the kernel evidence the correlation stage joined to it.

use std::sync::Arc;

use super::outcome::StreamOutcome;
use crate::{
    breaker::registry::Transition,
    correlate::{Joined, process::Owner, table::StreamTag},
};

/// A breaker changed state; with the call whose result made it change, if one did, or the
/// stream a kernel signal hit, and the kernel evidence about what the breaker guards.
#[derive(Clone, Debug)]
pub struct BreakerEvent {
    pub transition: Transition,
    pub trigger: Option<Arc<StreamOutcome>>,
    /// A stream still in flight (or just ended) that the signal behind the change hit.
    pub stream: Option<Arc<StreamTag>>,
    /// `breaker_trip/v1` evidence objects, oldest first.
    pub evidence: Vec<serde_json::Value>,
    /// The process serving the endpoint, when it runs on this host.
    pub upstream_owner: Option<Owner>,
    /// When the change was published (the event's `ts`).
    pub at: std::time::SystemTime,
}

impl BreakerEvent {
    /// The event of a transition the correlation stage joined to its evidence, caused by
    /// `trigger` when a call's result made it.
    pub fn new(joined: Joined, trigger: Option<Arc<StreamOutcome>>) -> Self {
        Self {
            transition: joined.transition,
            trigger,
            stream: joined.stream,
            evidence: joined.evidence,
            upstream_owner: joined.upstream_owner,
            at: std::time::SystemTime::now(),
        }
    }
}
