//! `agent trace`: attach the probes and print every kernel signal as it happens.
//!
//! With `--json`, stdout carries one JSON object per line: first `{"kind":"ready",...}` once
//! every probe is attached, then events, and a `{"kind":"summary",...}` line at exit.

use std::{
    io::Write as _,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;

use serde::Serialize;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    probes::{
        LoadOptions, ProbeName, Probes,
        go_processes::{GoProcessEvent, GoTracker},
        h2_hooks::H2Options,
        ring::{self, ReaderStats},
    },
    signals::{
        GoStwPause, Signal, TcpReset,
        h2_frame::{H2FlowChange, H2Frame},
        rapid_reset::{RapidReset, RapidResetDetector, RapidResetPolicy},
    },
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Probes to attach, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["tcp-reset", "go-gc"])]
    probes: Vec<ProbeName>,
    /// One JSON object per line on stdout (first line: {"kind":"ready",...}).
    #[arg(long)]
    json: bool,
    /// Size of the kernel ring buffer; a power of two, at least one page.
    #[arg(long, default_value_t = 16 * 1024 * 1024, value_parser = parse_ring_size)]
    ring_buffer_bytes: u32,
    /// How often the ring buffer is read when the kernel has not woken the agent (it does once
    /// the ring is 1/16 full): the most a signal waits before the agent sees it.
    #[arg(long, default_value = "10ms", value_parser = parse_poll_interval)]
    ring_poll_interval: Duration,
    /// h2-frames: report every frame type, not only HEADERS, RST_STREAM, SETTINGS and GOAWAY.
    #[arg(long)]
    all_frames: bool,
    /// h2-frames: cgroup v2 directory to attach to (default: the cgroup v2 root, every socket).
    #[arg(long)]
    cgroup: Option<std::path::PathBuf>,
    /// h2-frames: attach with TC to these interfaces instead of cgroup_skb.
    #[arg(long = "tc-interface", value_delimiter = ',')]
    tc_interfaces: Vec<String>,
    /// h2-frames: client RST_STREAM frames per second one connection may sustain before a
    /// `rapid_reset` signal (CVE-2023-44487).
    #[arg(long, default_value_t = 100)]
    rapid_reset_rate: u32,
    /// Event kinds to print, comma-separated (default: all). The others are still decoded,
    /// fed to the detectors (a `rapid_reset` needs the h2 frames) and counted in the summary;
    /// e.g. `--print rapid_reset` watches for attacks without printing every frame.
    #[arg(long, value_delimiter = ',', default_values = ["all"])]
    print: Vec<PrintKind>,
}

/// What `--print` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
enum PrintKind {
    All,
    TcpReset,
    GcStw,
    GoProcess,
    H2Frame,
    H2Flow,
    RapidReset,
}

/// The kinds `--print` selected, as one flag each.
#[derive(Debug, Clone, Copy)]
struct Printed {
    tcp_reset: bool,
    gc_stw: bool,
    go_process: bool,
    h2_frame: bool,
    h2_flow: bool,
    rapid_reset: bool,
}

impl Printed {
    fn from_kinds(kinds: &[PrintKind]) -> Self {
        let on = |k| kinds.contains(&PrintKind::All) || kinds.contains(&k);
        Self {
            tcp_reset: on(PrintKind::TcpReset),
            gc_stw: on(PrintKind::GcStw),
            go_process: on(PrintKind::GoProcess),
            h2_frame: on(PrintKind::H2Frame),
            h2_flow: on(PrintKind::H2Flow),
            rapid_reset: on(PrintKind::RapidReset),
        }
    }
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if v < 4096 || !v.is_power_of_two() {
        return Err("must be a power of two of at least 4096".to_owned());
    }
    Ok(v)
}

fn parse_poll_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(1) {
        return Err("must be between 1ms and 1s".to_owned());
    }
    Ok(d)
}

/// How often tracked Go processes are checked for a missed exit.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let (mut probes, ring, decoder) = Probes::load(&LoadOptions {
        probes: opts.probes.clone(),
        ring_buffer_bytes: opts.ring_buffer_bytes,
        h2: H2Options {
            all_frames: opts.all_frames,
            cgroup: opts.cgroup.clone(),
            tc_interfaces: opts.tc_interfaces.clone(),
        },
    })
    .context("cannot attach the probes")?;

    let mut reader = ring::start(ring, decoder, opts.ring_poll_interval)
        .context("cannot poll the ring buffer")?;

    let mut out = Output::new(opts.json, Printed::from_kinds(&opts.print));
    let mut tracker = if probes.is_attached(ProbeName::GoGc) {
        let mut tracker = GoTracker::new(&mut probes.ebpf)?;
        // Exec events that arrive while scanning are handled after it; a process seen twice is
        // recognised by its pid and start time.
        let found = tokio::task::block_in_place(|| tracker.scan_running(&mut probes.ebpf));
        for event in &found {
            out.go_process(event);
        }
        Some(tracker)
    } else {
        None
    };
    out.ready(&probes);

    let mut rapid_reset = RapidResetDetector::new(RapidResetPolicy {
        max_resets_per_sec: opts.rapid_reset_rate,
        cooldown_ns: 10_000_000_000,
    });
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut stopping = false;
    loop {
        tokio::select! {
            batch = reader.signals.recv() => {
                let Some(batch) = batch else { break };
                for signal in batch {
                    match signal {
                        Signal::TcpReset(reset) => out.tcp_reset(&reset),
                        Signal::GoStw(pause) => out.gc_stw(&pause, tracker.as_ref()),
                        Signal::ProcessExec { pid, .. } => {
                            if let Some(t) = tracker.as_mut()
                                && let Some(e) = tokio::task::block_in_place(|| t.process_started(&mut probes.ebpf, pid)) {
                                    out.go_process(&e);
                                }
                        }
                        Signal::ProcessExit { pid } => {
                            if let Some(e) = tracker.as_mut().and_then(|t| t.process_exited(&mut probes.ebpf, pid)) {
                                out.go_process(&e);
                            }
                        }
                        Signal::H2Frame(frame) => {
                            if let Some(signal) = rapid_reset.observe(&frame) {
                                out.rapid_reset(&signal);
                            }
                            out.h2_frame(&frame);
                        }
                        Signal::H2Flow(change) => out.h2_flow(&change),
                    }
                }
                // Lines are written in batches: flush once the queue is empty, not per line.
                if reader.signals.is_empty() {
                    out.flush();
                }
            }
            _ = sweep.tick() => {
                if let Some(t) = tracker.as_mut() {
                    for e in tokio::task::block_in_place(|| t.sweep(&mut probes.ebpf)) {
                        out.go_process(&e);
                    }
                }
            }
            _ = sigint.recv(), if !stopping => { stopping = true; let _ = reader.stop.send(true); }
            _ = sigterm.recv(), if !stopping => { stopping = true; let _ = reader.stop.send(true); }
        }
    }
    let _ = reader.task.await;
    let go_before_release = tracker.as_ref().map(GoTracker::stats);
    if let Some(t) = tracker.as_mut() {
        t.release_all(&mut probes.ebpf);
    }
    let go_after_release = tracker.as_ref().map(GoTracker::stats);
    out.summary(&probes, &reader.stats, go_before_release, go_after_release);
    Ok(())
}

/// Prints signals as text or JSON lines; counts what it printed.
struct Output {
    json: bool,
    print: Printed,
    /// Buffered: a write(2) per event line cost more than formatting it.
    stdout: std::io::BufWriter<std::io::StdoutLock<'static>>,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, to turn kernel timestamps into wall time.
    boot_offset_ns: i128,
    printed_resets: u64,
    printed_pauses: u64,
    printed_frames: u64,
    /// The last frame's kernel time and its wall-clock text.
    frame_time: (u64, String),
}

impl Output {
    fn new(json: bool, print: Printed) -> Self {
        Self {
            json,
            print,
            stdout: std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock()),
            boot_offset_ns: realtime_minus_monotonic_ns(),
            printed_resets: 0,
            printed_pauses: 0,
            printed_frames: 0,
            frame_time: (0, String::new()),
        }
    }

    fn wall_time(&self, ktime_ns: u64) -> String {
        let ns = i128::from(ktime_ns) + self.boot_offset_ns;
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0));
        humantime::format_rfc3339_micros(t).to_string()
    }

    /// Writes one line into the buffer; `flush` sends it. A closed stdout (e.g. `| head`) must
    /// not kill the agent, so write errors are ignored.
    fn line(&mut self, text: &str) {
        let _ = writeln!(self.stdout, "{text}");
    }

    fn json_line(&mut self, value: impl Serialize) {
        let _ = serde_json::to_writer(&mut self.stdout, &value);
        let _ = self.stdout.write_all(b"\n");
    }

    fn flush(&mut self) {
        let _ = self.stdout.flush();
    }

    fn ready(&mut self, probes: &Probes) {
        if self.json {
            self.json_line(json!({
                "kind": "ready",
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "probes": probes.status,
            }));
        } else {
            for s in &probes.status {
                let state = if s.attached { "attached" } else { "DISABLED" };
                self.line(&format!("probe {:<10} {state}", s.name.as_str()));
                for d in &s.degraded {
                    self.line(&format!("  degraded: {d}"));
                }
            }
            self.line("ready: printing kernel signals (Ctrl-C to stop)");
        }
        self.flush();
    }

    fn tcp_reset(&mut self, r: &TcpReset) {
        if !self.print.tcp_reset {
            return;
        }
        self.printed_resets += 1;
        let time = self.wall_time(r.ktime_ns);
        if self.json {
            self.json_line(Tagged {
                kind: "tcp_reset",
                time: Some(&time),
                event: r,
            });
            return;
        }
        let arrow = match r.direction {
            crate::signals::tcp_reset::Direction::Sent => "->",
            crate::signals::tcp_reset::Direction::Received => "<-",
        };
        let mut text = format!(
            "{time} tcp_reset {:<8} {} {arrow} {} state={}",
            format!("{:?}", r.direction).to_lowercase(),
            r.local,
            r.remote,
            r.state.unwrap_or("-"),
        );
        if let Some(reason) = &r.reason {
            text.push_str(&format!(" reason={reason}"));
        }
        match &r.task {
            Some(t) => text.push_str(&format!(" pid={} comm={}", t.pid, t.comm)),
            None => text.push_str(" pid=unknown"),
        }
        if let Some(ns) = r.netns {
            text.push_str(&format!(" netns={ns}"));
        }
        self.line(&text);
    }

    fn gc_stw(&mut self, p: &GoStwPause, tracker: Option<&GoTracker>) {
        if !self.print.gc_stw {
            return;
        }
        self.printed_pauses += 1;
        let time = self.wall_time(p.stop_ns);
        let go_version = tracker.and_then(|t| t.go_version(p.pid)).map(str::to_owned);
        let view = p.view(tracker.and_then(|t| t.go_minor(p.pid)));
        if self.json {
            self.json_line(json!({
                "kind": "gc_stw",
                "time": time,
                "pid": p.pid,
                "tid": p.tid,
                "comm": p.comm,
                "start_ns": p.stop_ns,
                "duration_ns": view.duration_ns,
                "world_stopped_ns": view.world_stopped_ns,
                "reason": view.reason,
                "go_version": go_version,
            }));
            return;
        }
        let mut text = format!(
            "{time} gc_stw    pid={} comm={} duration={:.1}µs world_stopped={:.1}µs",
            p.pid,
            p.comm,
            view.duration_ns as f64 / 1000.0,
            view.world_stopped_ns as f64 / 1000.0,
        );
        if let Some(reason) = view.reason {
            text.push_str(&format!(" reason={reason:?}"));
        }
        if let Some(v) = go_version {
            text.push_str(&format!(" go={v}"));
        }
        self.line(&text);
    }

    fn h2_frame(&mut self, f: &H2Frame) {
        if !self.print.h2_frame {
            return;
        }
        self.printed_frames += 1;
        // The frames of one batch record share their time: format it once.
        if self.frame_time.0 != f.ktime_ns || self.frame_time.1.is_empty() {
            self.frame_time = (f.ktime_ns, self.wall_time(f.ktime_ns));
        }
        let time = std::mem::take(&mut self.frame_time.1);
        if self.json {
            self.json_line(Tagged {
                kind: "h2_frame",
                time: Some(&time),
                event: f,
            });
            self.frame_time.1 = time;
            return;
        }
        let detail = serde_json::to_string(&f.detail).unwrap_or_default();
        let text = format!(
            "{time} h2_frame  {} -> {} {:<7} {:<13} stream={} flags={:#04x} len={} {detail}",
            f.flow.src, f.flow.dst, f.direction, f.frame_type, f.stream_id, f.flags, f.length
        );
        self.line(&text);
        self.frame_time.1 = time;
    }

    fn h2_flow(&mut self, c: &H2FlowChange) {
        if !self.print.h2_flow {
            return;
        }
        let time = self.wall_time(c.ktime_ns);
        if self.json {
            self.json_line(Tagged {
                kind: "h2_flow",
                time: Some(&time),
                event: c,
            });
            return;
        }
        let text = format!(
            "{time} h2_flow   {} -> {} {} {}",
            c.flow.src,
            c.flow.dst,
            c.change,
            c.reason.unwrap_or("")
        );
        self.line(&text);
    }

    fn rapid_reset(&mut self, r: &RapidReset) {
        if !self.print.rapid_reset {
            return;
        }
        let time = self.wall_time(r.ktime_ns);
        if self.json {
            self.json_line(Tagged {
                kind: "rapid_reset",
                time: Some(&time),
                event: r,
            });
        } else {
            let text = format!(
                "{time} RAPID_RESET client {} -> server {}: {} resets in the last second (limit {}/s), {} in all",
                r.flow.src, r.flow.dst, r.resets_last_second, r.max_resets_per_sec, r.resets_total
            );
            self.line(&text);
        }
        self.flush();
    }

    fn go_process(&mut self, e: &GoProcessEvent) {
        if !self.print.go_process {
            return;
        }
        if self.json {
            self.json_line(Tagged {
                kind: "go_process",
                time: None,
                event: e,
            });
            self.flush();
            return;
        }
        let text = match e {
            GoProcessEvent::Attached {
                pid,
                exe,
                go_version,
                symbols,
                ..
            } => format!(
                "go_process attached pid={pid} exe={} go={} symbols={symbols}",
                exe.display(),
                go_version.as_deref().unwrap_or("unknown")
            ),
            GoProcessEvent::Skipped { pid, exe, reason } => {
                format!(
                    "go_process skipped pid={pid} exe={} reason={reason}",
                    exe.display()
                )
            }
            GoProcessEvent::Detached {
                pid,
                binary_released,
            } => {
                format!("go_process detached pid={pid} binary_released={binary_released}")
            }
        };
        self.line(&text);
        self.flush();
    }

    fn summary(
        &mut self,
        probes: &Probes,
        reader: &ReaderStats,
        go_before: Option<crate::probes::go_processes::TrackerStats>,
        go_after: Option<crate::probes::go_processes::TrackerStats>,
    ) {
        let c = probes.counters();
        let get = |name: &str| c.get(name).copied().unwrap_or(0);
        let mut per_probe = serde_json::Map::new();
        if probes.is_attached(ProbeName::TcpReset) {
            per_probe.insert(
                "tcp-reset".into(),
                json!({
                    "sent": get("tcp_reset_sent"),
                    "received": get("tcp_reset_received"),
                    "dropped_in_kernel": get("tcp_reset_dropped"),
                    "printed": self.printed_resets,
                }),
            );
        }
        if probes.is_attached(ProbeName::GoGc) {
            per_probe.insert(
                "go-gc".into(),
                json!({
                    "pauses": get("go_stw_pauses"),
                    "dropped_in_kernel": get("go_stw_dropped"),
                    "unmatched_starts": get("go_stw_unmatched"),
                    "inflight_full": get("go_stw_inflight_full"),
                    "process_execs": get("process_execs"),
                    "process_exec_dropped": get("process_exec_dropped"),
                    "process_exit_dropped": get("process_exit_dropped"),
                    "printed": self.printed_pauses,
                    "tracker_at_exit": go_before,
                    "tracker_after_release": go_after,
                }),
            );
        }
        if probes.is_attached(ProbeName::H2Frames) {
            per_probe.insert(
                "h2-frames".into(),
                h2_summary(probes, &get, self.printed_frames),
            );
        }
        let reader = reader.figures();
        if self.json {
            self.json_line(json!({ "kind": "summary", "probes": per_probe, "reader": reader }));
        } else {
            self.line("summary:");
            for (name, v) in &per_probe {
                self.line(&format!("  {name}: {v}"));
            }
            self.line(&format!("  ring reader: {reader}"));
        }
        self.flush();
    }
}

/// Most flows listed in the summary.
const SUMMARY_FLOWS: usize = 4096;

fn h2_summary(probes: &Probes, get: &dyn Fn(&str) -> u64, printed: u64) -> serde_json::Value {
    use agent_common::h2::FRAME_TYPE_SLOTS;
    let flows: Vec<serde_json::Value> = probes
        .h2_flows(SUMMARY_FLOWS)
        .iter()
        .map(|(key, st)| {
            let flow = crate::signals::h2_frame::Flow::from_key(key).ok();
            let mut frames = serde_json::Map::new();
            for (t, n) in st.frames.iter().enumerate().take(FRAME_TYPE_SLOTS) {
                if *n > 0 {
                    let name = if t + 1 == FRAME_TYPE_SLOTS {
                        "OTHER"
                    } else {
                        crate::signals::h2_frame::type_name(t as u8)
                    };
                    frames.insert(name.into(), (*n).into());
                }
            }
            json!({
                "src": flow.map(|f| f.src.to_string()),
                "dst": flow.map(|f| f.dst.to_string()),
                "sender": crate::signals::h2_frame::role_name(st.role),
                "frames": frames,
                "lost": st.lost,
                "resyncs": st.resyncs,
                "following": st.phase != agent_common::h2::phase::LOST,
            })
        })
        .collect();
    json!({
        "attachment": probes.h2_attachment,
        "frames": get("h2_frames"),
        "printed": printed,
        "dropped_in_kernel": get("h2_frames_dropped"),
        "flow_events_dropped": get("h2_flow_events_dropped"),
        "segments": get("h2_segments"),
        "segments_already_seen": get("h2_segments_already_seen"),
        "segments_not_followed": get("h2_segments_not_followed"),
        "lost": {
            "gap": get("h2_lost_gap"),
            "oversize": get("h2_lost_oversize"),
            "budget": get("h2_lost_budget"),
            "unreadable": get("h2_lost_unreadable"),
        },
        "prefaces": get("h2_prefaces"),
        "syncs": get("h2_syncs"),
        "flows_full": get("h2_flows_full"),
        "flows": flows,
    })
}

/// An event as a JSON line: `kind` (and `time`) first, then the event's own fields.
#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'a str>,
    #[serde(flatten)]
    event: &'a T,
}

fn realtime_minus_monotonic_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid clock id and pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}
