//! Finds Go processes (running at start-up and exec'd later), attaches the STW uprobes to their
//! binaries, and releases them when the last process of a binary exits.
//!
//! Uprobes attach to a file, not a process: one pair of links serves every process running the
//! same binary. The binary is opened through `/proc/PID/exe`, which also reaches binaries in
//! other mount namespaces (containers).

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::Read as _,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::mpsc,
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        UProbe,
        uprobe::{UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use serde::Serialize;
use tracing::{debug, info, trace, warn};

use super::{
    GO_STW_START_PROGRAM, GO_STW_START_RETURN_PROGRAM, GO_STW_STOP_PROGRAM, ProbeError,
    go_binary::{self, GoBinaryError, SymbolSource},
};

const STOP_THE_WORLD: &str = "runtime.stopTheWorldWithSema";
const START_THE_WORLD: &str = "runtime.startTheWorldWithSema";
const WAKEP: &str = "runtime.wakep";
/// Binaries remembered as "not Go"; the cache is cleared when it grows past this.
const REJECTED_CACHE: usize = 8192;

/// A binary file, as the kernel identifies it. mtime guards against a file rewritten in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BinaryKey {
    dev: u64,
    ino: u64,
    mtime_ns: i64,
}

struct AttachedBinary {
    exe: PathBuf,
    go_version: Option<String>,
    go_minor: Option<u32>,
    symbols: SymbolSource,
    /// Entry of stop and start, and one per return instruction of start.
    links: Vec<(&'static str, UProbeLinkId)>,
    pids: HashSet<u32>,
}

struct TrackedProcess {
    key: BinaryKey,
    /// `/proc/PID/stat` start time, to tell a reused pid from the process we attached for.
    start_time: u64,
}

/// What the tracker did, for the user to see.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GoProcessEvent {
    Attached {
        pid: u32,
        exe: PathBuf,
        go_version: Option<String>,
        symbols: &'static str,
        /// False when the binary's probes were already attached for another process.
        new_binary: bool,
    },
    Skipped {
        pid: u32,
        exe: PathBuf,
        reason: String,
    },
    Detached {
        pid: u32,
        binary_released: bool,
    },
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TrackerStats {
    pub processes: usize,
    pub binaries: usize,
    pub uprobe_links: usize,
    pub tracked_pids_map_entries: usize,
}

pub struct GoTracker {
    binaries: HashMap<BinaryKey, AttachedBinary>,
    rejected: HashMap<BinaryKey, String>,
    processes: HashMap<u32, TrackedProcess>,
    tracked_pids: BpfHashMap<MapData, u32, u8>,
    own_pid: u32,
    /// Released links go to a thread that drops them: each uprobe unregistration waits for an
    /// SRCU grace period (tens of ms), which must not hold up the handling of new processes.
    reaper: mpsc::Sender<Vec<UProbeLink>>,
}

impl GoTracker {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        let map = ebpf
            .take_map("TRACKED_PIDS")
            .ok_or(ProbeError::NoMap("TRACKED_PIDS"))?;
        let tracked_pids = BpfHashMap::try_from(map).map_err(|source| ProbeError::Map {
            name: "TRACKED_PIDS",
            source,
        })?;
        let (reaper, released) = mpsc::channel::<Vec<UProbeLink>>();
        std::thread::Builder::new()
            .name("uprobe-reaper".into())
            .spawn(move || {
                for links in released {
                    drop(links);
                }
            })
            .map_err(ProbeError::Reaper)?;
        Ok(Self {
            reaper,
            binaries: HashMap::new(),
            rejected: HashMap::new(),
            processes: HashMap::new(),
            tracked_pids,
            own_pid: std::process::id(),
        })
    }

    /// Go processes already running.
    pub fn scan_running(&mut self, ebpf: &mut Ebpf) -> Vec<GoProcessEvent> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            warn!("cannot list /proc: running Go processes are not found");
            return Vec::new();
        };
        let pids: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.into_iter()
            .filter_map(|pid| self.process_started(ebpf, pid))
            .collect()
    }

    /// A process exec'd (or was found running): attach if it runs a Go binary. None when there is
    /// nothing to report (not Go, gone already, or already known).
    pub fn process_started(&mut self, ebpf: &mut Ebpf, pid: u32) -> Option<GoProcessEvent> {
        if pid == self.own_pid {
            return None;
        }
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        // Kernel threads have no exe; a process may also be gone already. From here on we use
        // our own descriptor, so the process exiting does not matter any more.
        let Ok(file) = File::open(&exe) else {
            trace!(pid, "no executable to inspect (kernel thread, or exited)");
            return None;
        };
        let meta = file.metadata().ok()?;
        let key = BinaryKey {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        };
        let start_time = process_start_time(pid)?;
        // A re-exec replaces the image: let go of the old binary first.
        if let Some(old) = self.processes.get(&pid) {
            if old.key == key && old.start_time == start_time {
                return None;
            }
            self.process_exited(ebpf, pid);
        }
        if let Some(reason) = self.rejected.get(&key) {
            debug!(pid, %reason, "binary already rejected");
            return None;
        }
        let exe_path = std::fs::read_link(&exe).unwrap_or_else(|_| exe.clone());
        let new_binary = !self.binaries.contains_key(&key);
        if new_binary {
            match attach_binary(ebpf, file, exe_path.clone()) {
                Ok(binary) => {
                    info!(pid, exe = %exe_path.display(), go = ?binary.go_version, "attached Go STW probes");
                    self.binaries.insert(key, binary);
                }
                Err(AttachError::NotGo) => {
                    debug!(pid, exe = %exe_path.display(), "not a Go binary");
                    self.remember_rejected(key, "not a Go binary".to_owned());
                    return None;
                }
                Err(AttachError::Unreadable(e)) => {
                    warn!(pid, exe = %exe_path.display(), error = %e, "cannot read binary");
                    return None;
                }
                Err(AttachError::Failed(reason)) => {
                    warn!(pid, exe = %exe_path.display(), %reason, "Go binary skipped");
                    self.remember_rejected(key, reason.clone());
                    return Some(GoProcessEvent::Skipped {
                        pid,
                        exe: exe_path,
                        reason,
                    });
                }
            }
        }
        let binary = self.binaries.get_mut(&key)?;
        binary.pids.insert(pid);
        self.processes
            .insert(pid, TrackedProcess { key, start_time });
        if let Err(e) = self.tracked_pids.insert(pid, 1, 0) {
            // The periodic sweep still releases this process; it only loses the prompt exit.
            warn!(pid, error = %e, "cannot watch exit of Go process");
        }
        Some(GoProcessEvent::Attached {
            pid,
            exe: binary.exe.clone(),
            go_version: binary.go_version.clone(),
            symbols: symbol_source_name(binary.symbols),
            new_binary,
        })
    }

    /// A tracked process exited: release its binary's probes if it was the last one.
    pub fn process_exited(&mut self, ebpf: &mut Ebpf, pid: u32) -> Option<GoProcessEvent> {
        let process = self.processes.remove(&pid)?;
        // Already gone when the kernel reported the exit; present when we got here by sweep.
        let _ = self.tracked_pids.remove(&pid);
        let mut binary_released = false;
        if let Some(binary) = self.binaries.get_mut(&process.key) {
            binary.pids.remove(&pid);
            if binary.pids.is_empty()
                && let Some(binary) = self.binaries.remove(&process.key)
            {
                self.detach_binary(ebpf, binary);
                binary_released = true;
            }
        }
        Some(GoProcessEvent::Detached {
            pid,
            binary_released,
        })
    }

    /// Releases processes that exited without the kernel telling us (exit event dropped, or the
    /// process died between discovery and registration).
    pub fn sweep(&mut self, ebpf: &mut Ebpf) -> Vec<GoProcessEvent> {
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(pid, p)| process_start_time(**pid) != Some(p.start_time))
            .map(|(pid, _)| *pid)
            .collect();
        gone.into_iter()
            .filter_map(|pid| self.process_exited(ebpf, pid))
            .collect()
    }

    /// The Go minor version of a tracked process (e.g. 19 for go1.19.8). Go 2 does not exist;
    /// a major version other than 1 reads as unknown.
    pub fn go_minor(&self, pid: u32) -> Option<u32> {
        let p = self.processes.get(&pid)?;
        self.binaries.get(&p.key)?.go_minor
    }

    pub fn go_version(&self, pid: u32) -> Option<&str> {
        let p = self.processes.get(&pid)?;
        self.binaries.get(&p.key)?.go_version.as_deref()
    }

    pub fn stats(&self) -> TrackerStats {
        TrackerStats {
            processes: self.processes.len(),
            binaries: self.binaries.len(),
            uprobe_links: self.binaries.values().map(|b| b.links.len()).sum(),
            tracked_pids_map_entries: self.tracked_pids.keys().filter(Result::is_ok).count(),
        }
    }

    /// Detaches everything (at shutdown, so the counts can be checked).
    pub fn release_all(&mut self, ebpf: &mut Ebpf) {
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        for pid in pids {
            self.process_exited(ebpf, pid);
        }
    }

    fn detach_binary(&self, ebpf: &mut Ebpf, binary: AttachedBinary) {
        let links = binary
            .links
            .into_iter()
            .filter_map(|(program, link)| take_link(ebpf, program, link))
            .collect();
        if self.reaper.send(links).is_err() {
            warn!("uprobe reaper thread is gone; links are released at exit");
        }
        info!(exe = %binary.exe.display(), "released Go STW probes");
    }

    fn remember_rejected(&mut self, key: BinaryKey, reason: String) {
        if self.rejected.len() >= REJECTED_CACHE {
            self.rejected.clear();
        }
        self.rejected.insert(key, reason);
    }
}

enum AttachError {
    NotGo,
    Unreadable(std::io::Error),
    Failed(String),
}

fn attach_binary(
    ebpf: &mut Ebpf,
    mut file: File,
    exe_path: PathBuf,
) -> Result<AttachedBinary, AttachError> {
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(AttachError::Unreadable)?;
    // The kernel resolves this magic link to our open file: the same inode whatever the
    // process does now, and reachable even when it lives in another mount namespace.
    let exe = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let info = match go_binary::inspect(&data) {
        Ok(info) => info,
        Err(GoBinaryError::NotGo | GoBinaryError::NotElf) => return Err(AttachError::NotGo),
        Err(e) => return Err(AttachError::Failed(format!("{e}"))),
    };
    // One symbol pass for all three: on a stripped binary each pass walks the whole pclntab.
    let found = go_binary::find_functions(&data, &[STOP_THE_WORLD, START_THE_WORLD, WAKEP])
        .map_err(|e| AttachError::Failed(format!("{e}")))?;
    let required = |i: usize, name: &str| {
        found.get(i).copied().flatten().ok_or_else(|| {
            AttachError::Failed(
                GoBinaryError::SymbolNotFound {
                    name: name.to_owned(),
                }
                .to_string(),
            )
        })
    };
    let (stop, start) = (required(0, STOP_THE_WORLD)?, required(1, START_THE_WORLD)?);
    let wakep = found.get(2).copied().flatten().map(|f| f.file_offset);
    // The world runs again where startTheWorldWithSema calls wakep (just after the runtime reads
    // its clock), or at a return if that call is not found; the first to fire ends the pause.
    let returns = go_binary::exit_offsets(&data, start, wakep)
        .map_err(|e| AttachError::Failed(format!("{e}")))?;
    let entry = |code| {
        go_binary::entry_offset(&data, code).map_err(|e| AttachError::Failed(format!("{e}")))
    };
    let points = [
        (GO_STW_STOP_PROGRAM, entry(stop)?),
        (GO_STW_START_PROGRAM, entry(start)?),
    ]
    .into_iter()
    .chain(
        returns
            .into_iter()
            .map(|off| (GO_STW_START_RETURN_PROGRAM, off)),
    );
    let mut links = Vec::new();
    for (program, offset) in points {
        match attach_uprobe(ebpf, program, offset, &exe) {
            Ok(link) => links.push((program, link)),
            Err(e) => {
                // All or nothing: a partial set would report no pause or wrong ones.
                for (program, link) in links {
                    drop(take_link(ebpf, program, link));
                }
                return Err(e);
            }
        }
    }
    Ok(AttachedBinary {
        exe: exe_path,
        go_minor: info
            .go_version_number
            .and_then(|(major, minor)| (major == 1).then_some(minor)),
        go_version: info.go_version,
        symbols: info.symbol_source,
        links,
        pids: HashSet::new(),
    })
}

fn attach_uprobe(
    ebpf: &mut Ebpf,
    program: &'static str,
    offset: u64,
    exe: &Path,
) -> Result<UProbeLinkId, AttachError> {
    let uprobe: &mut UProbe = ebpf
        .program_mut(program)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| AttachError::Failed(format!("program {program} not loaded")))?;
    uprobe
        .attach(offset, exe, UProbeScope::AllProcesses)
        .map_err(|e| {
            AttachError::Failed(format!(
                "attaching {program} at {offset:#x}: {:#}",
                anyhow::Error::new(e)
            ))
        })
}

/// Takes ownership of a link so it can be dropped (detached) elsewhere.
fn take_link(ebpf: &mut Ebpf, program: &'static str, link: UProbeLinkId) -> Option<UProbeLink> {
    let result = ebpf
        .program_mut(program)
        .and_then(|p| <&mut UProbe>::try_from(p).ok())
        .map(|uprobe| uprobe.take_link(link));
    match result {
        Some(Ok(link)) => Some(link),
        Some(Err(e)) => {
            warn!(program, error = %e, "cannot take uprobe link for release");
            None
        }
        None => None,
    }
}

fn symbol_source_name(source: SymbolSource) -> &'static str {
    match source {
        SymbolSource::Symtab => "symtab",
        SymbolSource::Pclntab => "pclntab",
    }
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot). The command name can
/// contain spaces and parentheses, so fields are counted after the last ')'.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the comm come fields 3.. ; start time is field 22, the 20th here.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}
