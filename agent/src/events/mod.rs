//! Events the agent keeps and reports: what happened to each call ([`outcome`]), breaker
//! transitions as `breaker_trip/v1` events ([`trip`]), written by [`writer`] to the durable
//! [`journal`] before anything else reports them, all carried by the publish [`bus`]. [`tail`]
//! follows the journal for the exporters.

mod breaker_event;
pub mod bus;
pub mod journal;
pub mod outcome;
pub mod tail;
pub mod trip;
pub mod writer;

pub use self::breaker_event::BreakerEvent;
pub use crate::config::events::EventsConfig;
