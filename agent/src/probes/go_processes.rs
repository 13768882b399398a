//! Go process discovery: finds Go processes (running at start-up and exec'd later), attaches
//! the STW uprobes to their binaries, and releases them once no process has run a binary for a
//! while.
//!
//! Discovery runs on threads of its own and reads exec and exit events from a ring of its own
//! (`PROCESS_EVENTS`), so nothing else the agent does can hold up a new process: not a slow
//! consumer of the other signals (a stdout pipe nobody reads blocked `agent trace` and, with it,
//! every exec behind it), not the inspection of another binary, not an unregistration.
//!
//! - The discovery thread handles each exec in microseconds: it opens `/proc/PID/exe`, and a
//!   binary it already knows (attached, being inspected, or not Go) needs nothing more.
//! - A binary it has not seen goes to a worker, which maps it, finds the runtime's functions
//!   and attaches the probes; workers run side by side, so a big binary does not delay others.
//! - Released links go to a reaper thread: each unregistration waits for grace periods
//!   (60-100 ms measured here) while holding the kernel's `event_mutex`, which every new uprobe
//!   perf event needs too: an attach that meets an unregistration waits for it (a new binary
//!   took 90-130 ms instead of 10-20 ms). So nothing is released while binaries are being
//!   attached: a binary past its linger goes only after `QUIET` without an attach, and the
//!   reaper closes one link at a time, each only after `QUIET`.
//!
//! Uprobes attach to a file, not a process: one set of links serves every process running the
//! binary, from the moment it is attached, even a process the agent has not registered yet. The
//! attach cookie names the binary and its Go version, so such a pause is still interpreted.
//! A binary's probes stay attached for `linger` after its last process exits, so a process that
//! runs it again (a restart, a cron job, a crash loop) has its probes at exec, at no cost.
//!
//! The binary is opened through `/proc/PID/exe`, which also reaches binaries in other mount
//! namespaces (containers).

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_common::events::{EventHeader, EventKind, ProcessExecEvent, ProcessExitEvent};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use serde::Serialize;
use tracing::{debug, info, trace, warn};

use super::{
    GO_STW_START_PROGRAM, GO_STW_START_RETURN_PROGRAM, GO_STW_STOP_PROGRAM, ProbeError,
    go_binary::{self, GoBinaryError, SymbolSource},
};
use crate::signals::{go_stw::StwCookie, monotonic_ns, read_record};

const STOP_THE_WORLD: &str = "runtime.stopTheWorldWithSema";
const START_THE_WORLD: &str = "runtime.startTheWorldWithSema";
const WAKEP: &str = "runtime.wakep";
/// Binaries remembered as "not Go"; the cache is cleared when it grows past this.
const REJECTED_CACHE: usize = 8192;
/// Binaries waiting for a worker; an exec of a new binary beyond this is counted and skipped.
const MAX_INSPECTING: usize = 1024;
/// Workers that inspect and attach new binaries side by side.
const MAX_WORKERS: usize = 4;
/// How often processes that exited unseen and binaries past their linger are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a released binary's name stays known, for pauses already on their way.
const RETIRED_NAMES_FOR: Duration = Duration::from_secs(30);
/// How long discovery must have attached nothing before probes are released (see above).
const QUIET: Duration = Duration::from_secs(1);
/// Released anyway after waiting this long for a quiet moment, so a node that never stops
/// starting new binaries does not keep every old one attached.
const MAX_RELEASE_DELAY: Duration = Duration::from_secs(30);
/// Events for the consumer (printing, logging) that may wait; more are counted as dropped.
const EVENT_QUEUE: usize = 4096;

/// A binary file, as the kernel identifies it. mtime guards against a file rewritten in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BinaryKey {
    dev: u64,
    ino: u64,
    mtime_ns: i64,
}

/// What a pause needs to be printed: the binary's path and Go version, by binary id.
#[derive(Clone, Debug)]
pub struct BinaryName {
    pub exe: PathBuf,
    pub go_version: Option<String>,
}

/// Binary ids (the attach cookie's) to names, shared with the signal consumers.
#[derive(Clone, Default)]
pub struct BinaryNames(Arc<RwLock<HashMap<u32, Arc<BinaryName>>>>);

impl BinaryNames {
    pub fn get(&self, binary: u32) -> Option<Arc<BinaryName>> {
        self.0.read().ok()?.get(&binary).cloned()
    }

    fn insert(&self, binary: u32, name: Arc<BinaryName>) {
        if let Ok(mut names) = self.0.write() {
            names.insert(binary, name);
        }
    }

    fn remove(&self, binary: u32) {
        if let Ok(mut names) = self.0.write() {
            names.remove(&binary);
        }
    }
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
        /// False when the binary's probes were already attached (for another process, or still
        /// lingering after one).
        new_binary: bool,
        /// From the exec to the moment the probes were live for this process: 0 when they were
        /// attached before it exec'd. None for a process found running at start-up.
        #[serde(skip_serializing_if = "Option::is_none")]
        exec_to_attach_us: Option<u64>,
    },
    Skipped {
        pid: u32,
        exe: PathBuf,
        reason: String,
    },
    Detached {
        pid: u32,
        /// True when this was the binary's last process and its probes were released at once
        /// (no linger); otherwise a `released` event follows after the linger.
        binary_released: bool,
    },
    /// A binary's probes were released: no process had run it for the linger.
    Released { exe: PathBuf, idle_ms: u64 },
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TrackerStats {
    pub processes: usize,
    /// Binaries with probes attached, lingering ones included.
    pub binaries: usize,
    /// Of those, binaries no process runs now, kept for `linger`.
    pub lingering: usize,
    /// Binaries a worker is inspecting or attaching.
    pub inspecting: usize,
    pub uprobe_links: usize,
    pub tracked_pids_map_entries: usize,
}

/// Counters of what discovery could not do; each one is a process that may go unseen.
#[derive(Debug, Default)]
pub struct DiscoveryFigures {
    pub execs: AtomicU64,
    pub exits: AtomicU64,
    pub undecodable: AtomicU64,
    /// New binaries not inspected because `MAX_INSPECTING` were waiting.
    pub inspect_queue_full: AtomicU64,
    /// Events the consumer was too slow to take (the tracking itself went on).
    pub events_dropped: AtomicU64,
}

impl DiscoveryFigures {
    /// As named counters beside the kernel programs' (status API, `agent_probe_events_total`);
    /// losses end in `_dropped`, as theirs do.
    pub fn named(&self) -> [(&'static str, u64); 5] {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("go_discovery_execs", load(&self.execs)),
            ("go_discovery_exits", load(&self.exits)),
            ("go_discovery_undecodable_dropped", load(&self.undecodable)),
            (
                "go_discovery_inspect_queue_full_dropped",
                load(&self.inspect_queue_full),
            ),
            ("go_discovery_events_dropped", load(&self.events_dropped)),
        ]
    }

    pub fn figures(&self) -> serde_json::Value {
        serde_json::json!({
            "execs": self.execs.load(Ordering::Relaxed),
            "exits": self.exits.load(Ordering::Relaxed),
            "undecodable": self.undecodable.load(Ordering::Relaxed),
            "inspect_queue_full": self.inspect_queue_full.load(Ordering::Relaxed),
            "events_dropped": self.events_dropped.load(Ordering::Relaxed),
        })
    }
}

pub struct DiscoveryOptions {
    /// How long a binary's probes stay attached after its last process exits.
    pub linger: Duration,
    /// Expedite RCU grace periods (`/sys/kernel/rcu_expedited`) while attaching a new binary.
    pub expedite_rcu: bool,
}

/// The first uprobe registered after a quiet spell waits for an RCU grace period (the kernel's
/// `dup_mmap_sem`): 10 ms median and 25-35 ms at p99 here, nearly all of a new binary's
/// exec-to-attach time; expedited, about 0.5 ms. The switch is system-wide, so it is on only
/// while the agent attaches (about a millisecond per new binary, and binaries are new to the
/// node only when an image is first run), unless the configuration says no.
const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// Present while the agent has `rcu_expedited` switched on: an agent killed in that millisecond
/// leaves it behind, and the next one to start puts the switch back. Under /run: it lives as
/// long as the switch (until reboot), and the DaemonSet mounts the directory from the host so
/// that it outlives the container.
const RCU_EXPEDITED_MARK_DIR: &str = "/run/grpc-resilience-agent";
const RCU_EXPEDITED_MARK: &str = "/run/grpc-resilience-agent/rcu-expedited";

/// Sets `rcu_expedited` for its lifetime when it was 0; puts 0 back when dropped.
struct ExpeditedRcu(bool);

/// Set once the switch or its mark could not be written (a read-only /sys or /run): warned
/// about once, not tried again for every binary.
static RCU_EXPEDITE_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

impl ExpeditedRcu {
    fn on(wanted: bool) -> Self {
        if !wanted
            || RCU_EXPEDITE_UNAVAILABLE.load(Ordering::Relaxed)
            || !std::fs::read_to_string(RCU_EXPEDITED).is_ok_and(|v| v.trim() == "0")
        {
            return Self(false);
        }
        let unavailable = |path: &str, e: std::io::Error| {
            RCU_EXPEDITE_UNAVAILABLE.store(true, Ordering::Relaxed);
            warn!(path, error = %e, "cannot expedite RCU while attaching Go probes: new binaries wait a grace period (10-35 ms) for theirs");
            Self(false)
        };
        // The mark first: no switch left on without it.
        if let Err(e) = std::fs::create_dir_all(RCU_EXPEDITED_MARK_DIR)
            .and_then(|()| std::fs::write(RCU_EXPEDITED_MARK, b""))
        {
            return unavailable(RCU_EXPEDITED_MARK, e);
        }
        match std::fs::write(RCU_EXPEDITED, "1") {
            Ok(()) => Self(true),
            Err(e) => {
                let _ = std::fs::remove_file(RCU_EXPEDITED_MARK);
                unavailable(RCU_EXPEDITED, e)
            }
        }
    }

    /// At start: a mark left by an agent that died with the switch on puts it back to 0.
    fn recover() {
        if std::fs::metadata(RCU_EXPEDITED_MARK).is_err() {
            return;
        }
        match std::fs::write(RCU_EXPEDITED, "0") {
            Ok(()) => warn!("an earlier agent left rcu_expedited on; put back to 0"),
            Err(e) => warn!(error = %e, "cannot put rcu_expedited back to 0"),
        }
        let _ = std::fs::remove_file(RCU_EXPEDITED_MARK);
    }
}

impl Drop for ExpeditedRcu {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        match std::fs::write(RCU_EXPEDITED, "0") {
            Ok(()) => {
                let _ = std::fs::remove_file(RCU_EXPEDITED_MARK);
            }
            Err(e) => warn!(error = %e, "cannot put rcu_expedited back to 0"),
        }
    }
}

/// Running discovery: the events it reports, and what it knows.
pub struct GoDiscovery {
    /// Attached, skipped, detached and released, in the order they happened.
    pub events: tokio::sync::mpsc::Receiver<GoProcessEvent>,
    pub names: BinaryNames,
    pub figures: Arc<DiscoveryFigures>,
    shared: Arc<Shared>,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl GoDiscovery {
    /// Takes the discovery maps, finds the Go processes already running (their probes are
    /// attached when this returns), and follows execs and exits from then on.
    pub fn start(ebpf: Arc<Mutex<Ebpf>>, opts: DiscoveryOptions) -> Result<Self, ProbeError> {
        let (ring, tracked_pids) = {
            let mut guard = lock(&ebpf);
            let ring = take_map(&mut guard, "PROCESS_EVENTS")?;
            let ring = RingBuf::try_from(ring).map_err(|source| ProbeError::Map {
                name: "PROCESS_EVENTS",
                source,
            })?;
            let pids = take_map(&mut guard, "TRACKED_PIDS")?;
            let pids = BpfHashMap::try_from(pids).map_err(|source| ProbeError::Map {
                name: "TRACKED_PIDS",
                source,
            })?;
            (ring, pids)
        };
        // Whatever this agent's setting: a switch an earlier one left on goes back.
        ExpeditedRcu::recover();
        let (reaper, released) = mpsc::channel::<Vec<UProbeLink>>();
        let activity = Arc::new(Activity::default());
        let reaper_activity = activity.clone();
        spawn_thread("uprobe-reaper", move || reap(&released, &reaper_activity))?;
        let (events_tx, events) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared {
            tracker: Mutex::new(Tracker {
                binaries: HashMap::new(),
                rejected: HashMap::new(),
                processes: HashMap::new(),
                retired_names: Vec::new(),
                tracked_pids,
                next_binary: 1,
            }),
            idle: std::sync::Condvar::new(),
            ebpf,
            names: BinaryNames::default(),
            figures: Arc::new(DiscoveryFigures::default()),
            events: events_tx,
            reaper,
            activity,
            linger: opts.linger,
            expedite_rcu: opts.expedite_rcu,
            own_pid: std::process::id(),
        });
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = std::thread::available_parallelism()
            .map_or(2, usize::from)
            .clamp(2, MAX_WORKERS);
        let mut worker_threads = Vec::new();
        for i in 0..workers {
            let (shared, job_rx) = (shared.clone(), job_rx.clone());
            worker_threads.push(spawn_thread(&format!("go-attach-{i}"), move || {
                worker(&shared, &job_rx);
            })?);
        }

        // Exec events that arrive while scanning wait in the ring; a process seen twice is
        // recognised by its pid and start time.
        shared.scan_running(&jobs);
        shared.wait_inspected(Duration::from_secs(30));

        // SAFETY: eventfd returns a new descriptor or -1.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if stop < 0 {
            return Err(ProbeError::Discovery(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor we own from here on.
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let stop_poll = stop.try_clone().map_err(ProbeError::Discovery)?;
        let thread_shared = shared.clone();
        let thread = spawn_thread("go-discovery", move || {
            discovery_loop(&thread_shared, ring, &stop_poll, jobs);
            // Workers finish what they hold (their queue is closed), then everything goes.
            for w in worker_threads {
                let _ = w.join();
            }
            thread_shared.release_all();
        })?;
        Ok(Self {
            events,
            names: shared.names.clone(),
            figures: shared.figures.clone(),
            shared,
            stop,
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> TrackerStats {
        self.shared.tracker().stats()
    }

    /// Stops following processes and releases every probe; returns the figures before the
    /// release and after it.
    pub fn stop(mut self) -> (TrackerStats, TrackerStats) {
        let before = self.stats();
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&raw const one).cast(),
                size_of::<u64>(),
            )
        };
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("the Go discovery thread panicked");
        }
        (before, self.stats())
    }
}

struct Shared {
    tracker: Mutex<Tracker>,
    /// Signalled when a worker finished a binary (the start-up scan waits for all of them).
    idle: std::sync::Condvar,
    /// The uprobe programs live in the loaded object; held only while attaching.
    ebpf: Arc<Mutex<Ebpf>>,
    names: BinaryNames,
    figures: Arc<DiscoveryFigures>,
    events: tokio::sync::mpsc::Sender<GoProcessEvent>,
    /// Released links go here to be dropped off every other path.
    reaper: mpsc::Sender<Vec<UProbeLink>>,
    activity: Arc<Activity>,
    linger: Duration,
    expedite_rcu: bool,
    own_pid: u32,
}

struct Tracker {
    binaries: HashMap<BinaryKey, Binary>,
    rejected: HashMap<BinaryKey, String>,
    processes: HashMap<u32, TrackedProcess>,
    /// Names of released binaries, dropped after `RETIRED_NAMES_FOR`.
    retired_names: Vec<(u32, Instant)>,
    tracked_pids: BpfHashMap<MapData, u32, u8>,
    next_binary: u32,
}

enum Binary {
    /// A worker is inspecting it; these processes wait for its probes.
    Inspecting {
        waiting: Vec<Waiting>,
    },
    Attached(AttachedBinary),
}

struct Waiting {
    pid: u32,
    start_time: u64,
    exec_ns: Option<u64>,
}

struct AttachedBinary {
    id: u32,
    name: Arc<BinaryName>,
    symbols: SymbolSource,
    /// Entry of stop and start, and one per return instruction of start; owned, so dropping
    /// them detaches.
    links: Vec<UProbeLink>,
    attached_ns: u64,
    pids: HashSet<u32>,
    /// Since when no process runs it.
    idle_since: Option<Instant>,
}

struct TrackedProcess {
    key: BinaryKey,
    /// `/proc/PID/stat` start time, to tell a reused pid from the process we attached for.
    start_time: u64,
}

/// A new binary for a worker.
struct Job {
    key: BinaryKey,
    id: u32,
    file: File,
    exe: PathBuf,
}

impl Shared {
    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn emit(&self, event: GoProcessEvent) {
        match &event {
            GoProcessEvent::Attached { pid, exe, .. } => {
                debug!(pid, exe = %exe.display(), "Go process attached");
            }
            GoProcessEvent::Detached { pid, .. } => debug!(pid, "Go process detached"),
            GoProcessEvent::Skipped { .. } | GoProcessEvent::Released { .. } => {}
        }
        if self.events.try_send(event).is_err() {
            self.figures.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn scan_running(&self, jobs: &mpsc::Sender<Job>) {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            warn!("cannot list /proc: running Go processes are not found");
            return;
        };
        let pids: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        for pid in pids {
            self.process_started(pid, None, jobs);
        }
    }

    /// Waits until no binary is being inspected (or `limit` passed).
    fn wait_inspected(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut tracker = self.tracker();
        while tracker.inspecting() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    binaries = tracker.inspecting(),
                    "Go binaries still being inspected at start-up; their processes follow"
                );
                return;
            }
            tracker = match self.idle.wait_timeout(tracker, left) {
                Ok((t, _)) => t,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// A process exec'd (`exec_ns` from the kernel) or was found running: attach if it runs a Go
    /// binary. Quick: a binary seen before needs no more than an open and a stat.
    fn process_started(&self, pid: u32, exec_ns: Option<u64>, jobs: &mpsc::Sender<Job>) {
        if pid == self.own_pid {
            return;
        }
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        // Kernel threads have no exe; a process may also be gone already. From here on we use
        // our own descriptor, so the process exiting does not matter any more.
        let Ok(file) = File::open(&exe) else {
            trace!(pid, "no executable to inspect (kernel thread, or exited)");
            return;
        };
        let Ok(meta) = file.metadata() else { return };
        let key = BinaryKey {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        };
        let Some(start_time) = process_start_time(pid) else {
            return;
        };
        let mut tracker = self.tracker();
        // A re-exec replaces the image: let go of the old binary first.
        if let Some(old) = tracker.processes.get(&pid) {
            if old.key == key && old.start_time == start_time {
                return;
            }
            self.process_exited(&mut tracker, pid);
        }
        if let Some(reason) = tracker.rejected.get(&key) {
            trace!(pid, %reason, "binary already rejected");
            return;
        }
        let waiting = Waiting {
            pid,
            start_time,
            exec_ns,
        };
        match tracker.binaries.get_mut(&key) {
            Some(Binary::Attached(_)) => {
                if let Some(event) = tracker.register(key, waiting) {
                    self.emit(event);
                }
            }
            Some(Binary::Inspecting { waiting: w, .. }) => w.push(waiting),
            None => {
                if tracker.inspecting() >= MAX_INSPECTING {
                    self.figures
                        .inspect_queue_full
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(
                        pid,
                        "too many binaries waiting for inspection; process skipped"
                    );
                    return;
                }
                let id = tracker.next_binary;
                tracker.next_binary = tracker.next_binary.wrapping_add(1).max(1);
                tracker.binaries.insert(
                    key,
                    Binary::Inspecting {
                        waiting: vec![waiting],
                    },
                );
                let exe = std::fs::read_link(&exe).unwrap_or(exe);
                self.activity.attaching();
                if jobs.send(Job { key, id, file, exe }).is_err() {
                    tracker.binaries.remove(&key);
                }
            }
        }
    }

    /// A tracked process exited: its binary lingers (or is released) if it was the last one.
    fn process_exited(&self, tracker: &mut Tracker, pid: u32) {
        let Some(process) = tracker.processes.remove(&pid) else {
            return;
        };
        // Already gone when the kernel reported the exit; present when we got here by sweep.
        let _ = tracker.tracked_pids.remove(&pid);
        let mut binary_released = false;
        if let Some(Binary::Attached(binary)) = tracker.binaries.get_mut(&process.key) {
            binary.pids.remove(&pid);
            if binary.pids.is_empty() {
                binary.idle_since = Some(Instant::now());
                if self.linger.is_zero() {
                    self.release(tracker, process.key);
                    binary_released = true;
                }
            }
        }
        self.emit(GoProcessEvent::Detached {
            pid,
            binary_released,
        });
    }

    /// Detaches a binary's probes (on the reaper thread).
    fn release(&self, tracker: &mut Tracker, key: BinaryKey) -> Option<Arc<BinaryName>> {
        let Some(Binary::Attached(binary)) = tracker.binaries.remove(&key) else {
            return None;
        };
        if self.reaper.send(binary.links).is_err() {
            warn!("uprobe reaper thread is gone; links are released at exit");
        }
        tracker.retired_names.push((binary.id, Instant::now()));
        info!(exe = %binary.name.exe.display(), "released Go STW probes");
        Some(binary.name)
    }

    /// Processes that exited unseen (exit event dropped, or died before their binary was
    /// attached), binaries past their linger, and names no pause can still need.
    fn sweep(&self) {
        // /proc is read without the lock: an exec must not wait for a scan of every process.
        let tracked: Vec<(u32, u64)> = self
            .tracker()
            .processes
            .iter()
            .map(|(pid, p)| (*pid, p.start_time))
            .collect();
        let gone: Vec<(u32, u64)> = tracked
            .into_iter()
            .filter(|(pid, start)| process_start_time(*pid) != Some(*start))
            .collect();
        let mut tracker = self.tracker();
        for (pid, start) in gone {
            // Still the process we found gone (not a new one registered meanwhile).
            if tracker
                .processes
                .get(&pid)
                .is_some_and(|p| p.start_time == start)
            {
                self.process_exited(&mut tracker, pid);
            }
        }
        let now = Instant::now();
        let quiet = self.activity.quiet_for() >= QUIET;
        let expired: Vec<(BinaryKey, Duration)> = tracker
            .binaries
            .iter()
            .filter_map(|(key, b)| match b {
                Binary::Attached(AttachedBinary {
                    idle_since: Some(since),
                    ..
                }) => {
                    let idle = now.duration_since(*since);
                    let due =
                        idle >= self.linger && (quiet || idle >= self.linger + MAX_RELEASE_DELAY);
                    due.then_some((*key, idle))
                }
                Binary::Attached(_) | Binary::Inspecting { .. } => None,
            })
            .collect();
        for (key, idle) in expired {
            if let Some(name) = self.release(&mut tracker, key) {
                self.emit(GoProcessEvent::Released {
                    exe: name.exe.clone(),
                    idle_ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
        let names = &self.names;
        tracker.retired_names.retain(|(id, at)| {
            let keep = now.duration_since(*at) < RETIRED_NAMES_FOR;
            if !keep {
                names.remove(*id);
            }
            keep
        });
    }

    /// Detaches everything (at shutdown, so the counts can be checked).
    fn release_all(&self) {
        let mut tracker = self.tracker();
        let pids: Vec<u32> = tracker.processes.keys().copied().collect();
        for pid in pids {
            self.process_exited(&mut tracker, pid);
        }
        let keys: Vec<BinaryKey> = tracker.binaries.keys().copied().collect();
        for key in keys {
            self.release(&mut tracker, key);
        }
    }

    /// A worker's result: the binary is attached (its waiting processes registered) or
    /// rejected.
    fn inspected(&self, job: &Job, result: Result<AttachedBinary, AttachError>) {
        let mut tracker = self.tracker();
        let waiting = match tracker.binaries.remove(&job.key) {
            Some(Binary::Inspecting { waiting, .. }) => waiting,
            other => {
                // Not ours any more (cannot happen: only workers finish inspections).
                if let Some(b) = other {
                    tracker.binaries.insert(job.key, b);
                }
                return;
            }
        };
        match result {
            Ok(mut binary) => {
                info!(exe = %job.exe.display(), go = ?binary.name.go_version,
                    links = binary.links.len(), "attached Go STW probes");
                self.names.insert(binary.id, binary.name.clone());
                binary.idle_since = Some(Instant::now());
                tracker.binaries.insert(job.key, Binary::Attached(binary));
                let mut first = true;
                for w in waiting {
                    // A process that exited meanwhile is not registered (the binary lingers),
                    // nor one that has exec'd another binary since.
                    if process_start_time(w.pid) != Some(w.start_time)
                        || tracker.processes.contains_key(&w.pid)
                    {
                        continue;
                    }
                    if let Some(mut event) = tracker.register(job.key, w) {
                        if let GoProcessEvent::Attached { new_binary, .. } = &mut event {
                            *new_binary = first;
                        }
                        first = false;
                        self.emit(event);
                    }
                }
            }
            Err(AttachError::NotGo) => {
                trace!(exe = %job.exe.display(), "not a Go binary");
                tracker.remember_rejected(job.key, "not a Go binary".to_owned());
            }
            Err(AttachError::Unreadable(e)) => {
                warn!(exe = %job.exe.display(), error = %e, "cannot read binary");
            }
            Err(AttachError::Failed(reason)) => {
                warn!(exe = %job.exe.display(), %reason, "Go binary skipped");
                tracker.remember_rejected(job.key, reason.clone());
                for w in waiting {
                    self.emit(GoProcessEvent::Skipped {
                        pid: w.pid,
                        exe: job.exe.clone(),
                        reason: reason.clone(),
                    });
                }
            }
        }
        drop(tracker);
        self.idle.notify_all();
    }
}

impl Tracker {
    fn inspecting(&self) -> usize {
        self.binaries
            .values()
            .filter(|b| matches!(b, Binary::Inspecting { .. }))
            .count()
    }

    /// Registers a process of an attached binary.
    fn register(&mut self, key: BinaryKey, w: Waiting) -> Option<GoProcessEvent> {
        let Some(Binary::Attached(binary)) = self.binaries.get_mut(&key) else {
            return None;
        };
        binary.pids.insert(w.pid);
        binary.idle_since = None;
        let exec_to_attach_us = w
            .exec_ns
            .map(|exec| binary.attached_ns.saturating_sub(exec) / 1000);
        let event = GoProcessEvent::Attached {
            pid: w.pid,
            exe: binary.name.exe.clone(),
            go_version: binary.name.go_version.clone(),
            symbols: symbol_source_name(binary.symbols),
            new_binary: false,
            exec_to_attach_us,
        };
        self.processes.insert(
            w.pid,
            TrackedProcess {
                key,
                start_time: w.start_time,
            },
        );
        if let Err(e) = self.tracked_pids.insert(w.pid, 1, 0) {
            // The periodic sweep still releases this process; it only loses the prompt exit.
            warn!(pid = w.pid, error = %e, "cannot watch exit of Go process");
        }
        Some(event)
    }

    fn remember_rejected(&mut self, key: BinaryKey, reason: String) {
        if self.rejected.len() >= REJECTED_CACHE {
            self.rejected.clear();
        }
        self.rejected.insert(key, reason);
    }

    fn stats(&self) -> TrackerStats {
        let attached = || {
            self.binaries.values().filter_map(|b| match b {
                Binary::Attached(a) => Some(a),
                Binary::Inspecting { .. } => None,
            })
        };
        TrackerStats {
            processes: self.processes.len(),
            binaries: attached().count(),
            lingering: attached().filter(|b| b.pids.is_empty()).count(),
            inspecting: self.inspecting(),
            uprobe_links: attached().map(|b| b.links.len()).sum(),
            tracked_pids_map_entries: self.tracked_pids.keys().filter(Result::is_ok).count(),
        }
    }
}

/// Reads exec and exit events until `stop` is written; sweeps every `SWEEP_INTERVAL`.
fn discovery_loop(
    shared: &Shared,
    mut ring: RingBuf<MapData>,
    stop: &OwnedFd,
    jobs: mpsc::Sender<Job>,
) {
    let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
    loop {
        let timeout = next_sweep.saturating_duration_since(Instant::now());
        let mut fds = [
            libc::pollfd {
                fd: ring.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(1000);
        // SAFETY: two valid pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            warn!(error = %std::io::Error::last_os_error(), "polling the process ring failed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Drain before stopping too: an exec already in the ring is handled.
        while let Some(item) = ring.next() {
            let record: &[u8] = &item;
            match decode_lifecycle(record) {
                Some(Lifecycle::Exec { pid, exec_ns }) => {
                    shared.figures.execs.fetch_add(1, Ordering::Relaxed);
                    shared.process_started(pid, Some(exec_ns), &jobs);
                }
                Some(Lifecycle::Exit { pid }) => {
                    shared.figures.exits.fetch_add(1, Ordering::Relaxed);
                    let mut tracker = shared.tracker();
                    shared.process_exited(&mut tracker, pid);
                }
                None => {
                    shared.figures.undecodable.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if fds[1].revents != 0 {
            return;
        }
        if Instant::now() >= next_sweep {
            shared.sweep();
            next_sweep = Instant::now() + SWEEP_INTERVAL;
        }
    }
}

enum Lifecycle {
    Exec { pid: u32, exec_ns: u64 },
    Exit { pid: u32 },
}

fn decode_lifecycle(bytes: &[u8]) -> Option<Lifecycle> {
    let header: EventHeader = read_record(bytes, "event header").ok()?;
    match EventKind::from_u32(header.kind)? {
        EventKind::ProcessExec => {
            let ev: ProcessExecEvent = read_record(bytes, "process exec").ok()?;
            Some(Lifecycle::Exec {
                pid: ev.pid,
                exec_ns: ev.header.ktime_ns,
            })
        }
        EventKind::ProcessExit => {
            let ev: ProcessExitEvent = read_record(bytes, "process exit").ok()?;
            Some(Lifecycle::Exit { pid: ev.pid })
        }
        EventKind::TcpReset
        | EventKind::GoStw
        | EventKind::H2Frame
        | EventKind::H2Flow
        | EventKind::H2FrameBatch => None,
    }
}

/// When discovery last queued or finished an attach, to keep unregistrations out of its way.
#[derive(Debug, Default)]
struct Activity {
    /// Monotonic nanoseconds of the last attach activity.
    last_ns: AtomicU64,
}

impl Activity {
    fn attaching(&self) {
        self.last_ns.store(monotonic_ns(), Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        Duration::from_nanos(monotonic_ns().saturating_sub(self.last_ns.load(Ordering::Relaxed)))
    }
}

/// Drops released links one at a time, each after `QUIET` without an attach (or once it has
/// waited `MAX_RELEASE_DELAY`), until the channel closes; what is left then goes at once.
fn reap(released: &mpsc::Receiver<Vec<UProbeLink>>, activity: &Activity) {
    let mut queue: std::collections::VecDeque<(UProbeLink, Instant)> = Default::default();
    loop {
        let wait = if queue.is_empty() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(50)
        };
        match released.recv_timeout(wait) {
            Ok(links) => {
                let now = Instant::now();
                queue.extend(links.into_iter().map(|l| (l, now)));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let overdue = queue
            .front()
            .is_some_and(|(_, at)| at.elapsed() >= MAX_RELEASE_DELAY);
        if (activity.quiet_for() >= QUIET || overdue)
            && let Some((link, _)) = queue.pop_front()
        {
            drop(link);
        }
    }
}

/// Takes jobs until the queue closes.
fn worker(shared: &Shared, jobs: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = {
            let Ok(rx) = jobs.lock() else { return };
            rx.recv()
        };
        let Ok(job) = job else { return };
        let result = attach_binary(shared, &job);
        shared.activity.attaching();
        shared.inspected(&job, result);
    }
}

enum AttachError {
    NotGo,
    Unreadable(std::io::Error),
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> AttachError {
    AttachError::Failed(e.to_string())
}

fn attach_binary(shared: &Shared, job: &Job) -> Result<AttachedBinary, AttachError> {
    let began = Instant::now();
    // SAFETY: a file being executed cannot be written (the kernel refuses with ETXTBSY), so
    // the mapping does not change under us; only the pages we read are faulted in, which for a
    // large binary is a small part of it.
    let map = unsafe { memmap2::Mmap::map(&job.file) }.map_err(AttachError::Unreadable)?;
    let data: &[u8] = &map;
    let info = match go_binary::inspect(data) {
        Ok(info) => info,
        Err(GoBinaryError::NotGo | GoBinaryError::NotElf) => return Err(AttachError::NotGo),
        Err(e) => return Err(failed(e)),
    };
    // One symbol pass for all three: on a stripped binary each pass walks the whole pclntab.
    let found = go_binary::find_functions(data, &[STOP_THE_WORLD, START_THE_WORLD, WAKEP])
        .map_err(failed)?;
    let required = |i: usize, name: &str| {
        found.get(i).copied().flatten().ok_or_else(|| {
            failed(GoBinaryError::SymbolNotFound {
                name: name.to_owned(),
            })
        })
    };
    let (stop, start) = (required(0, STOP_THE_WORLD)?, required(1, START_THE_WORLD)?);
    let wakep = found.get(2).copied().flatten().map(|f| f.file_offset);
    // The world runs again where startTheWorldWithSema calls wakep (just after the runtime reads
    // its clock), or at a return if that call is not found; the first to fire ends the pause.
    let returns = go_binary::exit_offsets(data, start, wakep).map_err(failed)?;
    let entry = |code| go_binary::entry_offset(data, code).map_err(failed);
    let points: Vec<(&'static str, u64)> = [
        (GO_STW_STOP_PROGRAM, entry(stop)?),
        (GO_STW_START_PROGRAM, entry(start)?),
    ]
    .into_iter()
    .chain(
        returns
            .into_iter()
            .map(|off| (GO_STW_START_RETURN_PROGRAM, off)),
    )
    .collect();
    let go_minor = info
        .go_version_number
        .and_then(|(major, minor)| (major == 1).then_some(minor));
    let cookie = StwCookie {
        binary: job.id,
        go_minor,
    }
    .encode();
    // The kernel resolves this magic link to our open file: the same inode whatever the
    // process does now, and reachable even when it lives in another mount namespace.
    let exe = PathBuf::from(format!("/proc/self/fd/{}", job.file.as_raw_fd()));
    let inspected = began.elapsed();
    let mut links = Vec::with_capacity(points.len());
    let mut ebpf = lock(&shared.ebpf);
    let expedited = ExpeditedRcu::on(shared.expedite_rcu);
    for (program, offset) in points {
        match attach_uprobe(&mut ebpf, program, offset, &exe, cookie) {
            Ok(link) => links.push(link),
            Err(e) => {
                // All or nothing: a partial set would report no pause or wrong ones.
                drop(expedited);
                drop(ebpf);
                let _ = shared.reaper.send(links);
                return Err(e);
            }
        }
    }
    drop(expedited);
    drop(ebpf);
    debug!(exe = %job.exe.display(), inspect_us = inspected.as_micros() as u64,
        attach_us = (began.elapsed() - inspected).as_micros() as u64, "Go binary inspected and attached");
    Ok(AttachedBinary {
        id: job.id,
        name: Arc::new(BinaryName {
            exe: job.exe.clone(),
            go_version: info.go_version,
        }),
        symbols: info.symbol_source,
        links,
        attached_ns: monotonic_ns(),
        pids: HashSet::new(),
        idle_since: None,
    })
}

/// Attaches one probe and takes ownership of its link (dropping it detaches).
fn attach_uprobe(
    ebpf: &mut Ebpf,
    program: &'static str,
    offset: u64,
    exe: &Path,
    cookie: u64,
) -> Result<UProbeLink, AttachError> {
    let uprobe: &mut UProbe = ebpf
        .program_mut(program)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| failed(format!("program {program} not loaded")))?;
    let point = UProbeAttachPoint {
        location: offset.into(),
        cookie: Some(cookie),
    };
    let describe = |e: aya::programs::ProgramError| {
        failed(format!(
            "attaching {program} at {offset:#x}: {:#}",
            anyhow::Error::new(e)
        ))
    };
    let id = uprobe
        .attach(point, exe, UProbeScope::AllProcesses)
        .map_err(describe)?;
    uprobe.take_link(id).map_err(describe)
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, ProbeError> {
    ebpf.take_map(name).ok_or(ProbeError::NoMap(name))
}

fn lock(ebpf: &Mutex<Ebpf>) -> MutexGuard<'_, Ebpf> {
    ebpf.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn spawn_thread(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, ProbeError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map_err(ProbeError::Discovery)
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

/// The next event of `discovery`; pending for ever when there is none (Go tracking off).
pub async fn next_event(discovery: Option<&mut GoDiscovery>) -> Option<GoProcessEvent> {
    match discovery {
        Some(d) => d.events.recv().await,
        None => std::future::pending().await,
    }
}
