//! The `[events]` section: where the durable journal of breaker-trip events lives and how
//! often it reaches the disk (see `events::journal`).

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

/// What is wrong in `[events]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventsError {
    #[error("events.fsync {value:?} is not \"always\", \"never\" or a period ({reason})")]
    Fsync { value: String, reason: String },
    #[error("events.fsync: a period of at least 1ms")]
    FsyncPeriod,
    #[error("events.max_file_bytes must be at least 4096")]
    MaxFileBytes,
    #[error("events.max_files must be at least 1")]
    MaxFiles,
}

/// When appended events reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Before `append` returns (the default).
    Always,
    /// At most this long after (a crash may lose the last events of that time).
    Every(Duration),
    /// When the kernel flushes (a crash of the machine may lose events; of the agent, not).
    Never,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalConfig {
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub max_file_bytes: u64,
    pub max_files: usize,
}

impl JournalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            fsync: Fsync::Always,
            max_file_bytes: 64 * 1024 * 1024,
            max_files: 8,
        }
    }
}

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
    pub fn journal(&self) -> Result<Option<JournalConfig>, EventsError> {
        let Some(dir) = &self.journal else {
            return Ok(None);
        };
        let fsync = match self.fsync.as_deref() {
            None | Some("always") => Fsync::Always,
            Some("never") => Fsync::Never,
            Some(p) => {
                Fsync::Every(
                    humantime::parse_duration(p).map_err(|e| EventsError::Fsync {
                        value: p.to_owned(),
                        reason: e.to_string(),
                    })?,
                )
            }
        };
        if matches!(fsync, Fsync::Every(d) if d < Duration::from_millis(1)) {
            return Err(EventsError::FsyncPeriod);
        }
        let mut c = JournalConfig::new(dir);
        c.fsync = fsync;
        if let Some(n) = self.max_file_bytes {
            if n < 4096 {
                return Err(EventsError::MaxFileBytes);
            }
            c.max_file_bytes = n;
        }
        if let Some(n) = self.max_files {
            if n == 0 {
                return Err(EventsError::MaxFiles);
            }
            c.max_files = n;
        }
        Ok(Some(c))
    }
}
