//! The durable journal: events as JSON lines, each with a sequence number one above the
//! last, in files named by their first sequence number (`journal-00000000000000001234.jsonl`).
//!
//! - **Durability** ([`Fsync`]): by default every event is on disk (`fdatasync`) before
//!   [`Journal::append`] returns, so an event reported done survives a crash or `kill -9`.
//! - **Rotation**: a file that reached `max_file_bytes` is closed and a new one started; the
//!   oldest files beyond `max_files` are deleted.
//! - **Recovery**: a crash can leave the last line cut short. [`Journal::open`] finds the last
//!   complete line that parses, cuts the file there, and goes on from its sequence number.
//! - **One writer**: the directory is locked (`flock`) while a journal is open.
//!
//! Errors (a full disk, say) are returned, never panicked on; the caller counts what it could
//! not write.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Deserialize;

pub use crate::config::events::{Fsync, JournalConfig};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal directory {dir} is in use by another process")]
    Locked { dir: PathBuf },
    #[error("journal file {file}: {source}")]
    File {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal file {file}: line {line} is not an event with a seq ({why})")]
    Corrupt {
        file: PathBuf,
        line: usize,
        why: String,
    },
    #[error("an event must be a JSON object, not {0}")]
    NotAnObject(String),
}

/// What opening found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    /// Bytes cut off the end of the last file (a line a crash left incomplete).
    pub torn_bytes: u64,
    /// The last sequence number in the journal (0: empty).
    pub last_seq: u64,
    pub files: usize,
}

pub struct Journal {
    config: JournalConfig,
    file: File,
    path: PathBuf,
    size: u64,
    next_seq: u64,
    unsynced: bool,
    last_sync: Instant,
    /// Held for the flock.
    _lock: File,
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// How long `open` tries to take the directory's lock before it says another writer has it.
const LOCK_WAIT: Duration = Duration::from_millis(500);

fn file_name(first_seq: u64) -> String {
    format!("journal-{first_seq:020}.jsonl")
}

/// The journal files of `dir`, oldest first, with their first sequence numbers.
pub fn files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let dir_err = |source| JournalError::Dir {
        dir: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(dir_err)? {
        let entry = entry.map_err(dir_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_prefix("journal-")
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

impl Journal {
    /// Opens (or creates) the journal in `config.dir`, repairing a torn last line.
    pub fn open(config: JournalConfig) -> Result<(Journal, Recovery), JournalError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(|source| JournalError::Dir {
            dir: dir.clone(),
            source,
        })?;
        let lock_path = dir.join("journal.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| JournalError::File {
                file: lock_path.clone(),
                source,
            })?;
        // Tried for a moment: a lock may still be held through a descriptor a child process
        // inherited between its fork and its exec (the previous holder is gone a moment later).
        let deadline = Instant::now() + LOCK_WAIT;
        // SAFETY: flock on a descriptor we own; non-blocking, so it cannot hang.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if Instant::now() >= deadline {
                return Err(JournalError::Locked { dir });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let existing = files(&dir)?;
        let mut recovery = Recovery {
            files: existing.len(),
            ..Recovery::default()
        };
        let (path, last_seq, torn) = match existing.last() {
            None => (dir.join(file_name(1)), 0, 0),
            Some((first, path)) => {
                let (last, torn) = repair(path)?;
                // An empty last file continues from the one before it (or its own name).
                let last = match last {
                    Some(s) => s,
                    None => first.saturating_sub(1),
                };
                (path.clone(), last, torn)
            }
        };
        recovery.torn_bytes = torn;
        recovery.last_seq = last_seq;
        let file = open_append(&path)?;
        let size = file
            .metadata()
            .map_err(|source| JournalError::File {
                file: path.clone(),
                source,
            })?
            .len();
        sync_dir(&dir);
        Ok((
            Journal {
                config,
                file,
                path,
                size,
                next_seq: last_seq + 1,
                unsynced: false,
                last_sync: Instant::now(),
                _lock: lock,
            },
            recovery,
        ))
    }

    /// The sequence number the next event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Writes `event` (a JSON object) with the next sequence number, durable as the fsync
    /// policy says before this returns. Returns the sequence number. On an error the event is
    /// not in the journal and the number is not used.
    #[cfg(test)]
    pub fn append(&mut self, event: &serde_json::Value) -> Result<u64, JournalError> {
        let (seq, _) = self.write_one(event)?;
        self.sync_as_configured()?;
        Ok(seq)
    }

    /// Writes `events` in order with one sync for all of them (a group commit: under a storm
    /// the disk's flush latency is paid once per batch, not per event). Returns each written
    /// event's sequence number and line, and the error that stopped the batch, if one did.
    /// What is returned is durable as the policy says only when there is no error: a failed
    /// sync leaves the lines written but not known to be on disk.
    pub fn append_batch(
        &mut self,
        events: &[serde_json::Value],
    ) -> (Vec<(u64, String)>, Option<JournalError>) {
        let mut written = Vec::with_capacity(events.len());
        for e in events {
            match self.write_one(e) {
                Ok(w) => written.push(w),
                Err(error) => {
                    let synced = self.sync_as_configured().err();
                    return (written, Some(synced.unwrap_or(error)));
                }
            }
        }
        let error = self.sync_as_configured().err();
        (written, error)
    }

    /// One line, unsynced: its sequence number and text.
    fn write_one(&mut self, event: &serde_json::Value) -> Result<(u64, String), JournalError> {
        let body = match event {
            serde_json::Value::Object(m) if m.is_empty() => String::new(),
            serde_json::Value::Object(_) => {
                let text = event.to_string();
                format!(",{}", &text[1..text.len() - 1])
            }
            other => return Err(JournalError::NotAnObject(other.to_string())),
        };
        let seq = self.next_seq;
        let line = format!("{{\"seq\":{seq}{body}}}\n");
        if self.size > 0 && self.size + line.len() as u64 > self.config.max_file_bytes {
            self.rotate(seq)?;
        }
        let err = |source| JournalError::File {
            file: self.path.clone(),
            source,
        };
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            // A part may be written (a full disk): cut it off so the file stays whole.
            let _ = self.file.set_len(self.size);
            return Err(err(e));
        }
        self.size += line.len() as u64;
        self.next_seq += 1;
        self.unsynced = true;
        let mut line = line;
        line.pop();
        Ok((seq, line))
    }

    fn sync_as_configured(&mut self) -> Result<(), JournalError> {
        match self.config.fsync {
            Fsync::Always => self.sync(),
            Fsync::Every(d) if self.last_sync.elapsed() >= d => self.sync(),
            _ => Ok(()),
        }
    }

    /// Puts what was appended on disk (for [`Fsync::Every`], on a timer and at shutdown).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.unsynced {
            self.file.sync_data().map_err(|source| JournalError::File {
                file: self.path.clone(),
                source,
            })?;
            self.unsynced = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    fn rotate(&mut self, first_seq: u64) -> Result<(), JournalError> {
        self.sync()?;
        let path = self.config.dir.join(file_name(first_seq));
        self.file = open_append(&path)?;
        self.path = path;
        self.size = 0;
        sync_dir(&self.config.dir);
        // Retention: the oldest files beyond the limit go.
        let all = files(&self.config.dir)?;
        let excess = all.len().saturating_sub(self.config.max_files.max(1));
        for (_, old) in all.into_iter().take(excess) {
            let _ = fs::remove_file(old);
        }
        Ok(())
    }
}

/// Cuts a torn end off `path`: returns the last sequence number in it (None if it has no
/// complete event) and how many bytes were cut. Only the tail is read: a crash can only have
/// damaged the end.
fn repair(path: &Path) -> Result<(Option<u64>, u64), JournalError> {
    const TAIL: u64 = 1024 * 1024;
    let err = |source| JournalError::File {
        file: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    let base = len.saturating_sub(TAIL);
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(base)).map_err(err)?;
    (&mut file).take(TAIL).read_to_end(&mut buf).map_err(err)?;
    // From the end back: the last line that ends in a newline and parses is the last event;
    // anything after it is torn.
    let mut region = buf.len();
    let found = loop {
        let Some(nl) = buf[..region].iter().rposition(|&b| b == b'\n') else {
            break None;
        };
        let start = buf[..nl]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        if start == 0 && base > 0 {
            // The line may begin before the tail: read the file whole.
            return repair_by_scan(path, &mut file, len);
        }
        match serde_json::from_slice::<SeqOnly>(&buf[start..nl]) {
            Ok(s) => break Some((s.seq, base + nl as u64 + 1)),
            Err(_) => region = start,
        }
    };
    let (last, good_end) = match found {
        Some((seq, end)) => (Some(seq), end),
        None if base > 0 => return repair_by_scan(path, &mut file, len),
        None => (None, 0),
    };
    let torn = len - good_end;
    if torn > 0 {
        file.set_len(good_end).map_err(err)?;
        file.sync_all().map_err(err)?;
    }
    Ok((last, torn))
}

fn repair_by_scan(
    path: &Path,
    file: &mut File,
    len: u64,
) -> Result<(Option<u64>, u64), JournalError> {
    let err = |source| JournalError::File {
        file: path.to_owned(),
        source,
    };
    file.seek(SeekFrom::Start(0)).map_err(err)?;
    let mut reader = BufReader::new(&mut *file);
    let (mut good_end, mut pos, mut last) = (0u64, 0u64, None);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(err)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        pos += n as u64;
        match serde_json::from_slice::<SeqOnly>(&line[..n - 1]) {
            Ok(s) => {
                last = Some(s.seq);
                good_end = pos;
            }
            Err(_) => break,
        }
    }
    drop(reader);
    let torn = len - good_end;
    if torn > 0 {
        file.set_len(good_end).map_err(err)?;
        file.sync_all().map_err(err)?;
    }
    Ok((last, torn))
}

/// A journal file to append to, made if new.
fn open_append(path: &Path) -> Result<File, JournalError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| JournalError::File {
            file: path.to_owned(),
            source,
        })
}

/// Makes a new or renamed file's directory entry durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests;
