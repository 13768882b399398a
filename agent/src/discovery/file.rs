//! Endpoints from a file in Prometheus' file_sd format, for cluster subsets (a canary, say)
//! whose endpoints a controller or a ConfigMap writes:
//!
//! ```yaml
//! - targets: ["10.0.0.7:50051", "10.0.0.8:50051"]
//!   labels: {track: canary, zone: a}
//! - targets: ["10.0.0.9:50051"]
//!   labels: {track: stable}
//! ```
//!
//! JSON is read by the same YAML parser (JSON is YAML's flow style). A file that cannot be read
//! or is not right in full gives no endpoints at all: its caller keeps the ones it had.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{self, Read},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A file_sd file is a few kilobytes; this bounds what a hostile or runaway writer can make
/// the agent hold.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Why a file's targets could not be read: the endpoints it gave last stay.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Missing, unreadable, or over 4 MiB (`ErrorKind::FileTooLarge`).
    #[error("reading {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a list of target groups: {reason}", .path.display())]
    Parse { path: PathBuf, reason: String },
    #[error(
        "{}: target {target:?} is not IP:PORT with a port other than 0 (names are not resolved here)",
        .path.display()
    )]
    Target { path: PathBuf, target: String },
    #[error("{}: more than {max} targets selected", .path.display())]
    TooMany { path: PathBuf, max: usize },
}

/// One target group, as Prometheus reads it. Unknown fields are refused, as Prometheus' strict
/// reading does: a misspelt `lables:` would otherwise make a group silently unlabelled.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    #[serde(default)]
    targets: Vec<String>,
    /// A number or bool value (`zone: 1`, `canary: true`) is kept as the text it is written
    /// with, as Prometheus' YAML reading does: so `version: 1.10` stays "1.10" (not 1.1) and
    /// matches a selector written as a string. A null or nested value is refused.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The addresses of the target groups whose labels include every `match_labels` pair (all
/// groups when empty), sorted, each once.
///
/// Every target of every group must be `IP:PORT`, selected or not: the file is one thing
/// replaced atomically by its writer, so one bad target refuses the whole file rather than
/// turning half a file into half a subset. An empty file is refused too (a writer caught
/// half-way would otherwise drain the cluster); `[]` says "no endpoints".
pub fn read_targets(
    path: &Path,
    match_labels: &BTreeMap<String, String>,
    max: usize,
) -> Result<Vec<SocketAddr>, FileError> {
    let bytes = read_bounded(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &bytes, match_labels, max)
}

fn parse(
    path: &Path,
    bytes: &[u8],
    match_labels: &BTreeMap<String, String>,
    max: usize,
) -> Result<Vec<SocketAddr>, FileError> {
    let parse_error = |reason: String| FileError::Parse {
        path: path.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| parse_error(format!("not UTF-8 after byte {}", e.valid_up_to())))?;
    if is_blank(text) {
        return Err(parse_error("empty (write [] for no targets)".to_owned()));
    }
    let options = serde_saphyr::options! {
        // The position goes into `reason`; a rendered snippet would not fit a log line.
        with_snippet: false,
    };
    let groups: Vec<Group> = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| parse_error(describe(&e)))?;
    let mut selected = BTreeSet::new();
    for group in &groups {
        let wanted = match_labels
            .iter()
            .all(|(k, v)| group.labels.get(k) == Some(v));
        for target in &group.targets {
            let address = parse_target(target).ok_or_else(|| FileError::Target {
                path: path.to_owned(),
                target: target.clone(),
            })?;
            if wanted {
                selected.insert(address);
                if selected.len() > max {
                    return Err(FileError::TooMany {
                        path: path.to_owned(),
                        max,
                    });
                }
            }
        }
    }
    Ok(selected.into_iter().collect())
}

/// `IP:PORT` or `[IPv6]:PORT`, port not 0 (as a cluster's static endpoints).
fn parse_target(target: &str) -> Option<SocketAddr> {
    target.parse::<SocketAddr>().ok().filter(|a| a.port() != 0)
}

/// Only whitespace and comments.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    })
}

/// The parser's message, led by its position when it has one (the crate's own text ends with
/// it; that ending is dropped rather than said twice).
fn describe(e: &serde_saphyr::Error) -> String {
    let text = e.to_string();
    match e.location() {
        Some(at) => {
            let (line, column) = (at.line(), at.column());
            let ending = format!(" at line {line}, column {column}");
            let message = text.strip_suffix(&ending).unwrap_or(&text);
            format!("line {line}, column {column}: {message}")
        }
        None => text,
    }
}

/// The file's bytes, refused past `MAX_FILE_BYTES` without reading further.
fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let (_, bytes) = read_prefix(File::open(path)?)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("over {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// The metadata of the open file (so it describes the bytes read, even if the path is
/// replaced meanwhile) and its first `MAX_FILE_BYTES + 1` bytes.
fn read_prefix(file: File) -> io::Result<(fs::Metadata, Vec<u8>)> {
    let meta = file.metadata()?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    Ok((meta, bytes))
}

/// Tells whether a file changed since the last look, by its metadata and content: a ConfigMap
/// volume swaps a symlink (`..data`), so the check follows symlinks and compares (device,
/// inode, len, mtime, ctime) of the target and, when those differ, a hash of the content, so
/// that touching a file without changing it is no change.
pub struct FileWatch {
    path: PathBuf,
    last: Last,
}

enum Last {
    Never,
    /// The last look could not read the file.
    Failed,
    Seen {
        stamp: Stamp,
        digest: [u8; 32],
    },
}

/// What the metadata says of a file's version. ctime as well as mtime: a writer can set mtime
/// back (`cp -p`, `tar`), not ctime.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

impl FileWatch {
    pub fn new(path: PathBuf) -> Self {
        FileWatch {
            path,
            last: Last::Never,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True the first time, then when the file changed (or became readable again after
    /// failing). A file that becomes unreadable (deleted, say) is a change once, so that the
    /// read that follows reports why; it is no change again until it can be read.
    pub fn changed(&mut self) -> bool {
        // The same metadata is taken as the same content, unread: every poll's cheap path.
        if let Last::Seen { stamp, .. } = &self.last
            && fs::metadata(&self.path).is_ok_and(|m| Stamp::of(&m) == *stamp)
        {
            return false;
        }
        match File::open(&self.path).and_then(read_prefix) {
            Ok((meta, bytes)) => {
                let digest: [u8; 32] = Sha256::digest(&bytes).into();
                let changed = !matches!(&self.last, Last::Seen { digest: d, .. } if *d == digest);
                self.last = Last::Seen {
                    stamp: Stamp::of(&meta),
                    digest,
                };
                changed
            }
            Err(_) => {
                let changed = !matches!(self.last, Last::Failed);
                self.last = Last::Failed;
                changed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::{
        sync::atomic::{AtomicU64, Ordering},
        time::{Duration, SystemTime},
    };

    use super::*;

    /// A fresh directory under the system's temporary one, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "agent-file-sd-{}-{}-{name}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    const YAML: &str = "\
# written by the canary controller
- targets: [\"10.0.0.8:50051\", \"10.0.0.7:50051\"]
  labels: {track: canary, zone: a}
- targets:
    - 10.0.0.9:50051
    - 10.0.0.7:50051
  labels:
    track: stable
    zone: b
";

    const JSON: &str = r#"[
  {"targets": ["10.0.0.8:50051", "10.0.0.7:50051"], "labels": {"track": "canary", "zone": "a"}},
  {"targets": ["10.0.0.9:50051", "10.0.0.7:50051"], "labels": {"track": "stable", "zone": "b"}}
]"#;

    #[test]
    fn yaml_and_json_give_the_same_addresses() {
        let dir = TempDir::new("formats");
        let yaml = dir.write("targets.yaml", YAML);
        let json = dir.write("targets.json", JSON);
        let all = addrs(&["10.0.0.7:50051", "10.0.0.8:50051", "10.0.0.9:50051"]);
        assert_eq!(read_targets(&yaml, &labels(&[]), 100).unwrap(), all);
        assert_eq!(read_targets(&json, &labels(&[]), 100).unwrap(), all);
        let canary = labels(&[("track", "canary")]);
        assert_eq!(
            read_targets(&yaml, &canary, 100).unwrap(),
            read_targets(&json, &canary, 100).unwrap()
        );
    }

    #[test]
    fn labels_select_groups() {
        let dir = TempDir::new("labels");
        let path = dir.write("targets.yaml", YAML);
        let read = |pairs: &[(&str, &str)]| read_targets(&path, &labels(pairs), 100).unwrap();
        assert_eq!(
            read(&[("track", "canary")]),
            addrs(&["10.0.0.7:50051", "10.0.0.8:50051"])
        );
        assert_eq!(
            read(&[("track", "stable"), ("zone", "b")]),
            addrs(&["10.0.0.7:50051", "10.0.0.9:50051"])
        );
        // Every pair must match, and a label the groups lack matches none.
        assert_eq!(read(&[("track", "canary"), ("zone", "b")]), vec![]);
        assert_eq!(read(&[("region", "eu")]), vec![]);
    }

    #[test]
    fn non_string_label_values_compare_as_written() {
        let dir = TempDir::new("scalars");
        let path = dir.write(
            "targets.yaml",
            "- targets: [\"10.0.0.1:1\"]\n  labels: {zone: 1, canary: true, version: 1.10, ok: yes}\n",
        );
        let read = |pairs: &[(&str, &str)]| read_targets(&path, &labels(pairs), 100).unwrap();
        let one = addrs(&["10.0.0.1:1"]);
        assert_eq!(read(&[("zone", "1"), ("canary", "true")]), one);
        assert_eq!(read(&[("version", "1.10"), ("ok", "yes")]), one);
        assert_eq!(read(&[("version", "1.1")]), vec![]);

        let null = dir.write(
            "null.yaml",
            "- targets: [\"10.0.0.1:1\"]\n  labels: {zone: ~}\n",
        );
        assert!(matches!(
            read_targets(&null, &labels(&[]), 100),
            Err(FileError::Parse { .. })
        ));
    }

    #[test]
    fn ipv6_targets() {
        let dir = TempDir::new("ipv6");
        let path = dir.write(
            "targets.yaml",
            "- targets: [\"[fd00::1]:50051\", \"[fd00::2]:50051\", \"10.0.0.1:50051\"]\n",
        );
        assert_eq!(
            read_targets(&path, &labels(&[]), 100).unwrap(),
            addrs(&["10.0.0.1:50051", "[fd00::1]:50051", "[fd00::2]:50051"])
        );
    }

    #[test]
    fn an_invalid_target_refuses_the_whole_file() {
        let dir = TempDir::new("invalid");
        for bad in [
            "orders.default.svc:50051",
            "10.0.0.1:0",
            "10.0.0.1",
            "fd00::1:50051",
        ] {
            let path = dir.write(
                "targets.yaml",
                &format!(
                    "- targets: [\"10.0.0.1:50051\"]\n  labels: {{track: canary}}\n\
                     - targets: [\"10.0.0.2:50051\", \"{bad}\"]\n  labels: {{track: stable}}\n"
                ),
            );
            // Even a selector that leaves the bad group out.
            let err = read_targets(&path, &labels(&[("track", "canary")]), 100).unwrap_err();
            match &err {
                FileError::Target { target, .. } => assert_eq!(target, bad),
                other => panic!("{other:?}"),
            }
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn a_truncated_file_is_a_parse_error_with_a_position() {
        let dir = TempDir::new("truncated");
        let yaml = dir.write("targets.yaml", &YAML[..YAML.len() - 30]);
        let json = dir.write("targets.json", &JSON[..JSON.len() - 40]);
        for path in [yaml, json] {
            match read_targets(&path, &labels(&[]), 100) {
                Err(FileError::Parse { reason, .. }) => {
                    // "line 7, column 9: expected mapping start", the position said once.
                    assert!(reason.starts_with("line "), "{reason}");
                    assert!(reason.contains(", column "), "{reason}");
                    assert!(!reason.contains(" at line "), "{reason}");
                }
                other => panic!("{}: {other:?}", path.display()),
            }
        }
    }

    #[test]
    fn empty_list_missing_file_and_bounds() {
        let dir = TempDir::new("bounds");
        let empty = dir.write("empty.yaml", "[]\n");
        assert_eq!(read_targets(&empty, &labels(&[]), 100).unwrap(), vec![]);

        for blank in ["", "\n  \n# nothing yet\n"] {
            let path = dir.write("blank.yaml", blank);
            assert!(matches!(
                read_targets(&path, &labels(&[]), 100),
                Err(FileError::Parse { .. })
            ));
        }

        let missing = dir.0.join("missing.yaml");
        match read_targets(&missing, &labels(&[]), 100) {
            Err(FileError::Read { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }

        // Duplicates count once against max.
        let path = dir.write("targets.yaml", YAML);
        assert_eq!(read_targets(&path, &labels(&[]), 3).unwrap().len(), 3);
        assert!(matches!(
            read_targets(&path, &labels(&[]), 2),
            Err(FileError::TooMany { max: 2, .. })
        ));

        let huge = dir.0.join("huge.yaml");
        let mut text = String::from("[]\n");
        while u64::try_from(text.len()).unwrap() <= MAX_FILE_BYTES {
            text.push_str("# padding padding padding padding padding padding padding\n");
        }
        fs::write(&huge, text).unwrap();
        match read_targets(&huge, &labels(&[]), 100) {
            Err(FileError::Read { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::FileTooLarge);
            }
            other => panic!("{other:?}"),
        }

        let unknown = dir.write(
            "unknown.yaml",
            "- targets: [\"10.0.0.1:1\"]\n  lables: {a: b}\n",
        );
        assert!(matches!(
            read_targets(&unknown, &labels(&[]), 100),
            Err(FileError::Parse { .. })
        ));
    }

    #[test]
    fn watch_sees_content_changes_not_touches() {
        let dir = TempDir::new("watch");
        let path = dir.write("targets.yaml", YAML);
        let mut watch = FileWatch::new(path.clone());
        assert!(watch.changed(), "first look");
        assert!(!watch.changed(), "unchanged");

        // Touched: new mtime (and ctime), same bytes.
        let later = SystemTime::now() + Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(!watch.changed(), "touched only");
        assert!(!watch.changed());

        // Replaced by rename, as an atomic writer does.
        let tmp = dir.write(".targets.yaml.tmp", JSON);
        fs::rename(&tmp, &path).unwrap();
        assert!(watch.changed(), "renamed over with new content");
        assert!(!watch.changed());

        // Replaced by rename with the same content: another inode, no change.
        let tmp = dir.write(".targets.yaml.tmp", JSON);
        fs::rename(&tmp, &path).unwrap();
        assert!(!watch.changed(), "renamed over with the same content");

        // Deleted: a change once (the read that follows says why), then none until it is back.
        fs::remove_file(&path).unwrap();
        assert!(watch.changed(), "deleted");
        assert!(!watch.changed(), "still deleted");
        dir.write("targets.yaml", JSON);
        assert!(watch.changed(), "recreated, even with the content it had");
        assert!(!watch.changed());
    }

    #[test]
    fn watch_follows_a_configmap_symlink_swap() {
        use std::os::unix::fs::symlink;

        // A ConfigMap volume: targets.yaml -> ..data/targets.yaml, ..data -> ..<timestamp>.
        let dir = TempDir::new("configmap");
        let version = |name: &str, text: &str| {
            fs::create_dir(dir.0.join(name)).unwrap();
            fs::write(dir.0.join(name).join("targets.yaml"), text).unwrap();
        };
        let swap = |name: &str| {
            let tmp = dir.0.join("..data_tmp");
            symlink(name, &tmp).unwrap();
            fs::rename(&tmp, dir.0.join("..data")).unwrap();
        };
        version("..2024_01_01_00_00_00.1", YAML);
        symlink("..2024_01_01_00_00_00.1", dir.0.join("..data")).unwrap();
        let path = dir.0.join("targets.yaml");
        symlink("..data/targets.yaml", &path).unwrap();

        let mut watch = FileWatch::new(path.clone());
        assert!(watch.changed(), "first look");
        assert!(!watch.changed(), "unchanged");

        version("..2024_01_01_00_01_00.2", JSON);
        swap("..2024_01_01_00_01_00.2");
        assert!(watch.changed(), "..data swapped to new content");
        assert!(!watch.changed());
        assert_eq!(
            read_targets(&path, &labels(&[]), 100).unwrap(),
            addrs(&["10.0.0.7:50051", "10.0.0.8:50051", "10.0.0.9:50051"])
        );

        // A resync that writes the same content anew is no change.
        version("..2024_01_01_00_02_00.3", JSON);
        swap("..2024_01_01_00_02_00.3");
        assert!(!watch.changed(), "..data swapped to the same content");
    }
}
