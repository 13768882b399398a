//! Kernel signals and Go process events as lines on stdout: text, or one JSON object per line.
//! `agent trace` prints them; `agent run --print-signals` prints what its correlator gets.

use std::{
    io::Write as _,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use serde_json::json;

use crate::{
    probes::{
        ProbeName, Probes,
        go_processes::{BinaryNames, GoProcessEvent, TrackerStats},
        ring::ReaderStats,
    },
    signals::{
        GoStwPause, TcpReset,
        h2_frame::{H2FlowChange, H2Frame},
        rapid_reset::RapidReset,
    },
};

/// What `--print` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum PrintKind {
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
pub(crate) struct Printed {
    tcp_reset: bool,
    gc_stw: bool,
    go_process: bool,
    h2_frame: bool,
    h2_flow: bool,
    rapid_reset: bool,
}

impl Printed {
    pub(crate) fn from_kinds(kinds: &[PrintKind]) -> Self {
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

/// Prints signals as text or JSON lines; counts what it printed.
pub(crate) struct Output {
    json: bool,
    print: Printed,
    /// `agent trace` buffers (a write(2) per event line cost more than formatting it);
    /// `agent run`, whose other printers share stdout, writes each line whole.
    stdout: Box<dyn std::io::Write + Send>,
    /// Each line is formatted here first, then written with one call: another writer of the
    /// same stdout never cuts into it.
    scratch: Vec<u8>,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, to turn kernel timestamps into wall time.
    boot_offset_ns: i128,
    printed_resets: u64,
    printed_pauses: u64,
    printed_frames: u64,
    /// The last frame's kernel time and its wall-clock text.
    frame_time: (u64, String),
}

impl Output {
    pub(crate) fn new(json: bool, print: Printed, stdout: Box<dyn std::io::Write + Send>) -> Self {
        Self {
            json,
            print,
            stdout,
            scratch: Vec::with_capacity(1024),
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
        self.scratch.clear();
        self.scratch.extend_from_slice(text.as_bytes());
        self.scratch.push(b'\n');
        let _ = self.stdout.write_all(&self.scratch);
    }

    fn json_line(&mut self, value: impl Serialize) {
        self.scratch.clear();
        let _ = serde_json::to_writer(&mut self.scratch, &value);
        self.scratch.push(b'\n');
        let _ = self.stdout.write_all(&self.scratch);
    }

    pub(crate) fn flush(&mut self) {
        let _ = self.stdout.flush();
    }

    pub(crate) fn ready(&mut self, probes: &Probes) {
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

    pub(crate) fn tcp_reset(&mut self, r: &TcpReset) {
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

    pub(crate) fn gc_stw(&mut self, p: &GoStwPause, names: &BinaryNames) {
        if !self.print.gc_stw {
            return;
        }
        self.printed_pauses += 1;
        let time = self.wall_time(p.stop_ns);
        let go_version = names
            .get(p.cookie.binary)
            .and_then(|n| n.go_version.clone());
        let view = p.view(p.cookie.go_minor);
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

    pub(crate) fn h2_frame(&mut self, f: &H2Frame) {
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

    pub(crate) fn h2_flow(&mut self, c: &H2FlowChange) {
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

    pub(crate) fn rapid_reset(&mut self, r: &RapidReset) {
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

    pub(crate) fn go_process(&mut self, e: &GoProcessEvent) {
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
            GoProcessEvent::Released { exe, idle_ms } => {
                format!(
                    "go_process released exe={} idle_ms={idle_ms}",
                    exe.display()
                )
            }
        };
        self.line(&text);
        self.flush();
    }

    pub(crate) fn summary(
        &mut self,
        probes: &Probes,
        reader: &ReaderStats,
        go_before: Option<TrackerStats>,
        go_after: Option<TrackerStats>,
        discovery: Option<serde_json::Value>,
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
                    "discovery": discovery,
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
