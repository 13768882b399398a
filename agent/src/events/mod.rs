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

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

pub use self::breaker_event::BreakerEvent;
use self::journal::{Fsync, JournalConfig};

/// The `[events]` section.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Directory of the journal; none: breaker events are not journaled.
    pub journal: Option<PathBuf>,
    /// `"always"` (each event on disk before it is reported; the default), a period such as
    /// `"100ms"`, or `"never"` (left to the kernel).
    pub fsync: Option<String>,
    /// A journal file is closed at this size and a new one started (64 MiB).
    pub max_file_bytes: Option<u64>,
    /// Journal files kept; the oldest go (8).
    pub max_files: Option<usize>,
}

impl EventsConfig {
    /// The journal's configuration, if one is asked for.
    pub fn journal(&self) -> Result<Option<JournalConfig>, String> {
        let Some(dir) = &self.journal else {
            return Ok(None);
        };
        let fsync = match self.fsync.as_deref() {
            None | Some("always") => Fsync::Always,
            Some("never") => Fsync::Never,
            Some(p) => Fsync::Every(humantime::parse_duration(p).map_err(|e| {
                format!("events.fsync {p:?} is not \"always\", \"never\" or a period ({e})")
            })?),
        };
        if matches!(fsync, Fsync::Every(d) if d < Duration::from_millis(1)) {
            return Err("events.fsync: a period of at least 1ms".into());
        }
        let mut c = JournalConfig::new(dir);
        c.fsync = fsync;
        if let Some(n) = self.max_file_bytes {
            if n < 4096 {
                return Err("events.max_file_bytes must be at least 4096".into());
            }
            c.max_file_bytes = n;
        }
        if let Some(n) = self.max_files {
            if n == 0 {
                return Err("events.max_files must be at least 1".into());
            }
            c.max_files = n;
        }
        Ok(Some(c))
    }
}
