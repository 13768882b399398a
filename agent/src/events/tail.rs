//! Follows the journal from a sequence number as it grows, for an exporter: each call reads on
//! from where the last stopped (no file is read twice), into the next file after a rotation.
//! A line the writer has not finished is left for the next call.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::journal::{JournalError, files};

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

struct Open {
    first: u64,
    path: PathBuf,
    reader: BufReader<File>,
    /// The start of a line not yet ended by a newline.
    partial: Vec<u8>,
    line: usize,
}

pub struct Tail {
    dir: PathBuf,
    /// The sequence number of the next event to hand out.
    next: u64,
    open: Option<Open>,
    /// Events retention deleted before they were read.
    skipped: u64,
}

impl Tail {
    /// Events from `from` on (the first is 1).
    pub fn new(dir: &Path, from: u64) -> Tail {
        Tail {
            dir: dir.to_owned(),
            next: from.max(1),
            open: None,
            skipped: 0,
        }
    }

    /// Events that were gone (deleted by retention) before they could be read.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Up to `max` more events, in order, as raw JSON lines; none when the journal has no more
    /// yet.
    pub fn read(&mut self, max: usize) -> Result<Vec<(u64, String)>, JournalError> {
        let mut out = Vec::new();
        if self.open.is_none() && !self.open_file()? {
            return Ok(out);
        }
        loop {
            self.read_open(max, &mut out)?;
            if out.len() >= max {
                return Ok(out);
            }
            // At the end of this file: on into the next one if the writer started it. What was
            // written to this one before the rotation is read first (one more pass).
            let Some(current) = self.open.as_ref().map(|o| o.first) else {
                return Ok(out);
            };
            let Some((first, path)) = files(&self.dir)?.into_iter().find(|(f, _)| *f > current)
            else {
                return Ok(out);
            };
            self.read_open(max, &mut out)?;
            if out.len() >= max {
                return Ok(out);
            }
            if first > self.next {
                self.skipped += first - self.next;
                self.next = first;
            }
            self.open = Some(open(first, path)?);
        }
    }

    /// Opens the file holding `next` (or the oldest there is, when it was deleted); false if
    /// the journal has no file yet.
    fn open_file(&mut self) -> Result<bool, JournalError> {
        let all = files(&self.dir)?;
        let pick = all
            .iter()
            .rposition(|(first, _)| *first <= self.next)
            .or_else(|| (!all.is_empty()).then_some(0));
        let Some(i) = pick else { return Ok(false) };
        let (first, path) = all[i].clone();
        if first > self.next {
            self.skipped += first - self.next;
            self.next = first;
        }
        self.open = Some(open(first, path)?);
        Ok(true)
    }

    fn read_open(&mut self, max: usize, out: &mut Vec<(u64, String)>) -> Result<(), JournalError> {
        let Some(o) = self.open.as_mut() else {
            return Ok(());
        };
        while out.len() < max {
            let n = o
                .reader
                .read_until(b'\n', &mut o.partial)
                .map_err(|source| JournalError::File {
                    file: o.path.clone(),
                    source,
                })?;
            if n == 0 || o.partial.last() != Some(&b'\n') {
                // The end for now; a part-written line stays for the next call.
                return Ok(());
            }
            o.line += 1;
            let line = std::mem::take(&mut o.partial);
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let seq = serde_json::from_str::<SeqOnly>(&text)
                .map_err(|e| JournalError::Corrupt {
                    file: o.path.clone(),
                    line: o.line,
                    why: e.to_string(),
                })?
                .seq;
            if seq >= self.next {
                if seq > self.next {
                    self.skipped += seq - self.next;
                }
                self.next = seq + 1;
                out.push((seq, text));
            }
        }
        Ok(())
    }
}

fn open(first: u64, path: PathBuf) -> Result<Open, JournalError> {
    let file = File::open(&path).map_err(|source| JournalError::File {
        file: path.clone(),
        source,
    })?;
    Ok(Open {
        first,
        path,
        reader: BufReader::new(file),
        partial: Vec::new(),
        line: 0,
    })
}

#[cfg(test)]
mod tests;
