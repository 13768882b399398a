//! Loading and attaching the kernel programs, finding Go processes, and reading the ring buffer.
//!
//! Feature gating lives in one table ([`TRACEPOINTS`]): a hook this kernel lacks disables what
//! depends on it, with a message, and the other probes run.

pub mod environment;
pub mod go_binary;
pub mod go_processes;
pub mod h2_hooks;
pub mod intercept;
pub mod kernel_layout;
pub mod pipeline;
pub mod ring;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use agent_common::{
    counters::{COUNTER_SLOTS, Counter},
    h2::{FlowKey, FlowState, H2Config},
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{TracePoint, UProbe},
};
use serde::Serialize;
use tracing::{info, warn};

use crate::signals::{
    Decoder, TcpResetDecoder, tcp_reset::RecordLayout, tracepoint::TracepointFormat,
};

/// The kernel object built by `build.rs` from `agent-ebpf`.
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-probes"));

/// Probe families a user can turn on.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    clap::ValueEnum,
    Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeName {
    /// TCP resets sent and received.
    TcpReset,
    /// Go runtime stop-the-world pauses (GC), with Go process discovery.
    GoGc,
    /// HTTP/2 frames on the wire (cgroup_skb, or TC on named interfaces).
    H2Frames,
}

impl ProbeName {
    pub const fn as_str(self) -> &'static str {
        match self {
            ProbeName::TcpReset => "tcp-reset",
            ProbeName::GoGc => "go-gc",
            ProbeName::H2Frames => "h2-frames",
        }
    }
}

/// One tracepoint program and what losing it costs.
struct TracepointSpec {
    probe: ProbeName,
    program: &'static str,
    category: &'static str,
    name: &'static str,
    /// Without a required hook the probe is off; without an optional one it runs with less.
    required: bool,
    without_it: &'static str,
}

const TRACEPOINTS: &[TracepointSpec] = &[
    TracepointSpec {
        probe: ProbeName::TcpReset,
        program: "tcp_send_reset",
        category: "tcp",
        name: "tcp_send_reset",
        required: true,
        without_it: "sent resets are not seen",
    },
    TracepointSpec {
        probe: ProbeName::TcpReset,
        program: "tcp_receive_reset",
        category: "tcp",
        name: "tcp_receive_reset",
        required: true,
        without_it: "received resets are not seen",
    },
    TracepointSpec {
        probe: ProbeName::TcpReset,
        program: "softirq_entry",
        category: "irq",
        name: "softirq_entry",
        required: false,
        without_it: "resets are reported without a pid",
    },
    TracepointSpec {
        probe: ProbeName::TcpReset,
        program: "softirq_exit",
        category: "irq",
        name: "softirq_exit",
        required: false,
        without_it: "resets are reported without a pid",
    },
    TracepointSpec {
        probe: ProbeName::GoGc,
        program: "sched_process_exec",
        category: "sched",
        name: "sched_process_exec",
        required: true,
        without_it: "Go processes started after the agent are not found",
    },
    TracepointSpec {
        probe: ProbeName::GoGc,
        program: "sched_process_exit",
        category: "sched",
        name: "sched_process_exit",
        required: true,
        without_it: "probes of exited Go processes are released only by the periodic sweep",
    },
];

/// Uprobe programs: loaded up front, attached per Go binary by `go_processes`.
pub const GO_STW_STOP_PROGRAM: &str = "go_stw_stop";
pub const GO_STW_START_PROGRAM: &str = "go_stw_start";
pub const GO_STW_START_RETURN_PROGRAM: &str = "go_stw_start_return";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Environment(#[from] environment::EnvironmentError),
    #[error("loading the kernel programs failed")]
    Load(#[source] aya::EbpfError),
    #[error("program {0} missing from the kernel object")]
    NoProgram(&'static str),
    #[error("map {0} missing from the kernel object")]
    NoMap(&'static str),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("cannot start Go process discovery")]
    Discovery(#[source] std::io::Error),
    #[error("no probe could be attached: {0}")]
    NothingAttached(String),
}

/// What happened to one probe family at start-up.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeStatus {
    pub name: ProbeName,
    pub attached: bool,
    /// Hooks that failed and what that costs, one sentence each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}

pub struct LoadOptions {
    pub probes: Vec<ProbeName>,
    pub ring_buffer_bytes: u32,
    pub h2: h2_hooks::H2Options,
}

/// The loaded programs and the handles the agent reads from.
pub struct Probes {
    /// Shared with Go process discovery, which attaches uprobes from its own threads.
    pub ebpf: Arc<Mutex<Ebpf>>,
    pub status: Vec<ProbeStatus>,
    /// Where the HTTP/2 tracker attached, when it did.
    pub h2_attachment: Option<h2_hooks::H2Attachment>,
    counters: PerCpuArray<MapData, u64>,
}

impl Probes {
    pub fn load(opts: &LoadOptions) -> Result<(Self, RingBuf<MapData>, Decoder), ProbeError> {
        for (probe, capability) in environment::check_capabilities(&opts.probes)? {
            let probe = probe.as_str();
            warn!(
                probe,
                capability,
                "{probe} needs {capability}, which the agent lacks: the kernel will refuse its programs"
            );
        }
        let tracefs = environment::ensure_tracefs()?;
        environment::raise_memlock_limit();

        let wants = |p: ProbeName| opts.probes.contains(&p);
        let read_format =
            |category: &str, name: &str| match TracepointFormat::read(&tracefs, category, name) {
                Ok(f) => Some(f),
                Err(e) => {
                    warn!(error = %e, "tracepoint format unavailable");
                    None
                }
            };
        let (send_fmt, recv_fmt) = if wants(ProbeName::TcpReset) {
            (
                read_format("tcp", "tcp_send_reset"),
                read_format("tcp", "tcp_receive_reset"),
            )
        } else {
            (None, None)
        };
        let layout = kernel_layout::resolve(&tracefs, send_fmt.as_ref(), recv_fmt.as_ref());
        let decoder = Decoder {
            tcp_reset: TcpResetDecoder {
                sent: send_fmt.as_ref().and_then(RecordLayout::from_format),
                received: recv_fmt.as_ref().and_then(RecordLayout::from_format),
            },
        };

        let h2_config = H2Config {
            all_frames: u32::from(opts.h2.all_frames),
            ..H2Config::DEFAULT
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &layout, true)
            .override_global("H2_CONFIG", &h2_config, true)
            .map_max_entries("EVENTS", opts.ring_buffer_bytes)
            .load(PROBES_OBJECT)
            .map_err(ProbeError::Load)?;

        let mut status = Vec::new();
        let mut h2_attachment = None;
        let mut requested: Vec<ProbeName> = opts.probes.clone();
        requested.sort();
        requested.dedup();
        for probe in requested {
            if probe == ProbeName::H2Frames {
                status.push(match h2_hooks::attach(&mut ebpf, &opts.h2) {
                    Ok(at) => {
                        info!(probe = probe.as_str(), attachment = ?at, "probe attached");
                        h2_attachment = Some(at);
                        ProbeStatus {
                            name: probe,
                            attached: true,
                            degraded: Vec::new(),
                        }
                    }
                    Err(e) => {
                        let msg = format!("{:#}", anyhow::Error::new(e));
                        warn!(probe = probe.as_str(), "{msg}");
                        ProbeStatus {
                            name: probe,
                            attached: false,
                            degraded: vec![msg],
                        }
                    }
                });
                continue;
            }
            status.push(attach_probe(&mut ebpf, probe, &decoder));
        }
        if !status.iter().any(|s| s.attached) {
            let why: Vec<String> = status.iter().flat_map(|s| s.degraded.clone()).collect();
            return Err(ProbeError::NothingAttached(why.join("; ")));
        }

        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or(ProbeError::NoMap("EVENTS"))?)
            .map_err(|source| ProbeError::Map {
            name: "EVENTS",
            source,
        })?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .ok_or(ProbeError::NoMap("COUNTERS"))?,
        )
        .map_err(|source| ProbeError::Map {
            name: "COUNTERS",
            source,
        })?;
        Ok((
            Self {
                ebpf: Arc::new(Mutex::new(ebpf)),
                status,
                h2_attachment,
                counters,
            },
            ring,
            decoder,
        ))
    }

    pub fn is_attached(&self, probe: ProbeName) -> bool {
        self.status.iter().any(|s| s.name == probe && s.attached)
    }

    /// The HTTP/2 tracker's flows and their per-type frame counts (at most `limit`).
    pub fn h2_flows(&self, limit: usize) -> Vec<(FlowKey, FlowState)> {
        let Ok(ebpf) = self.ebpf.lock() else {
            return Vec::new();
        };
        let Some(map) = ebpf.map("H2_FLOWS") else {
            return Vec::new();
        };
        let Ok(flows) = aya::maps::HashMap::<_, FlowKey, FlowState>::try_from(map) else {
            return Vec::new();
        };
        flows.iter().filter_map(Result::ok).take(limit).collect()
    }

    /// Kernel counters summed over CPUs, by name.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for counter in Counter::ALL {
            debug_assert!((counter as u32) < COUNTER_SLOTS);
            let total = self
                .counters
                .get(&(counter as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum::<u64>())
                .unwrap_or(0);
            out.insert(counter.name(), total);
        }
        out
    }
}

fn attach_probe(ebpf: &mut Ebpf, probe: ProbeName, decoder: &Decoder) -> ProbeStatus {
    let mut degraded = Vec::new();
    let mut required_failed = 0;
    let mut required_ok = 0;
    for spec in TRACEPOINTS.iter().filter(|s| s.probe == probe) {
        match attach_tracepoint(ebpf, spec) {
            Ok(()) => {
                if spec.required {
                    required_ok += 1;
                }
            }
            Err(e) => {
                let msg = format!(
                    "{}/{}: {:#}; {}",
                    spec.category,
                    spec.name,
                    anyhow::Error::new(e),
                    spec.without_it
                );
                warn!(probe = probe.as_str(), "{msg}");
                degraded.push(msg);
                if spec.required {
                    required_failed += 1;
                }
            }
        }
    }
    let mut attached = match probe {
        // Each reset tracepoint is useful alone.
        ProbeName::TcpReset => required_ok > 0,
        ProbeName::GoGc => required_failed == 0,
        ProbeName::H2Frames => false,
    };
    if probe == ProbeName::TcpReset
        && attached
        && (decoder.tcp_reset.sent.is_none() || decoder.tcp_reset.received.is_none())
    {
        degraded.push(
            "a tcp reset record layout was not understood; its events are counted as undecodable"
                .to_owned(),
        );
    }
    if probe == ProbeName::GoGc && attached {
        for name in [
            GO_STW_STOP_PROGRAM,
            GO_STW_START_PROGRAM,
            GO_STW_START_RETURN_PROGRAM,
        ] {
            if let Err(e) = load_uprobe(ebpf, name) {
                let msg = format!("{name}: {:#}", anyhow::Error::new(e));
                warn!(probe = probe.as_str(), "{msg}");
                degraded.push(msg);
                attached = false;
            }
        }
    }
    if attached {
        info!(probe = probe.as_str(), "probe attached");
    }
    ProbeStatus {
        name: probe,
        attached,
        degraded,
    }
}

fn attach_tracepoint(ebpf: &mut Ebpf, spec: &TracepointSpec) -> Result<(), ProbeError> {
    let program: &mut TracePoint = ebpf
        .program_mut(spec.program)
        .ok_or(ProbeError::NoProgram(spec.program))?
        .try_into()
        .map_err(|source| ProbeError::Program {
            name: spec.program,
            source,
        })?;
    program.load().map_err(|source| ProbeError::Program {
        name: spec.program,
        source,
    })?;
    program
        .attach(spec.category, spec.name)
        .map_err(|source| ProbeError::Program {
            name: spec.program,
            source,
        })?;
    Ok(())
}

fn load_uprobe(ebpf: &mut Ebpf, name: &'static str) -> Result<(), ProbeError> {
    let program: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or(ProbeError::NoProgram(name))?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })?;
    program
        .load()
        .map_err(|source| ProbeError::Program { name, source })
}
