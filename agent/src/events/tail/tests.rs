#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, io::Write as _};

use serde_json::json;

use super::*;
use crate::events::journal::{Journal, JournalConfig};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "agent-tail-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let _ = fs::remove_dir_all(&d);
    d
}

fn seqs(events: &[(u64, String)]) -> Vec<u64> {
    events.iter().map(|(s, _)| *s).collect()
}

#[test]
fn follows_the_journal_as_it_grows_and_rotates() {
    let dir = temp_dir("rotate");
    let mut c = JournalConfig::new(&dir);
    c.max_file_bytes = 4096;
    let (mut j, _) = Journal::open(c).unwrap();
    let mut tail = Tail::new(&dir, 1);
    assert!(tail.read(10).unwrap().is_empty());
    for i in 0..3 {
        j.append(&json!({"i": i})).unwrap();
    }
    let got = tail.read(2).unwrap();
    assert_eq!(seqs(&got), [1, 2]);
    assert_eq!(got[0].1, r#"{"seq":1,"i":0}"#);
    assert_eq!(seqs(&tail.read(10).unwrap()), [3]);
    // Enough to fill several files.
    let pad = "x".repeat(500);
    for _ in 0..40 {
        j.append(&json!({"pad": pad})).unwrap();
    }
    assert!(files(&dir).unwrap().len() > 3);
    let mut all = Vec::new();
    loop {
        let got = tail.read(7).unwrap();
        if got.is_empty() {
            break;
        }
        all.extend(seqs(&got));
    }
    assert_eq!(all, (4..=43).collect::<Vec<_>>());
    assert_eq!((tail.next, tail.skipped()), (44, 0));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn starts_mid_journal_and_counts_what_retention_deleted() {
    let dir = temp_dir("retention");
    let mut c = JournalConfig::new(&dir);
    c.max_file_bytes = 4096;
    c.max_files = 2;
    let (mut j, _) = Journal::open(c).unwrap();
    let pad = "x".repeat(500);
    for _ in 0..40 {
        j.append(&json!({"pad": pad})).unwrap();
    }
    let oldest = files(&dir).unwrap()[0].0;
    assert!(oldest > 5);
    let mut tail = Tail::new(&dir, 5);
    let got = tail.read(1000).unwrap();
    assert_eq!(got.first().unwrap().0, oldest);
    assert_eq!(got.last().unwrap().0, 40);
    assert_eq!(tail.skipped(), oldest - 5);
    // From a sequence number inside the last file.
    let mut tail = Tail::new(&dir, 39);
    assert_eq!(seqs(&tail.read(1000).unwrap()), [39, 40]);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_line_being_written_is_left_for_the_next_read() {
    let dir = temp_dir("partial");
    let (mut j, _) = Journal::open(JournalConfig::new(&dir)).unwrap();
    j.append(&json!({"i": 1})).unwrap();
    let path = files(&dir).unwrap()[0].1.clone();
    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"seq":2,"i""#).unwrap();
    let mut tail = Tail::new(&dir, 1);
    assert_eq!(seqs(&tail.read(10).unwrap()), [1]);
    assert!(tail.read(10).unwrap().is_empty());
    f.write_all(b":2}\n").unwrap();
    let got = tail.read(10).unwrap();
    assert_eq!(got, [(2, r#"{"seq":2,"i":2}"#.to_owned())]);
    fs::remove_dir_all(&dir).unwrap();
}
