//! How the proxy hands its breaker transitions on: joined to the correlation stage's
//! evidence, as breaker events on the bus; and what the correlation stage acts on.

use std::sync::Arc;

use super::forward::Shared;
use crate::{
    breaker::registry::Transition,
    correlate::{Targets, table::StreamTag},
    events::{BreakerEvent, outcome::StreamOutcome},
};

impl Shared {
    /// Publishes a transition (of a call, the timer or the API) with the evidence the
    /// correlation stage holds for it.
    pub fn publish_transition(
        &self,
        transition: Transition,
        trigger: Option<Arc<StreamOutcome>>,
        stream: Option<Arc<StreamTag>>,
    ) {
        let endpoint = trigger
            .as_ref()
            .and_then(|t| Some(format!("{}/{}", t.cluster.as_ref()?, t.endpoint.as_ref()?)));
        let joined = self.joins.join(transition, stream, endpoint.as_deref());
        self.bus
            .breaker_events
            .publish(BreakerEvent::new(joined, trigger));
    }

    /// The breakers, endpoints, connection table and bus the correlation stage works with.
    pub fn correlation_targets(&self) -> Targets {
        Targets {
            breakers: self.breakers.clone(),
            joins: self.joins.clone(),
            outlet: self.bus.clone(),
        }
    }
}
