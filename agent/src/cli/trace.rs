//! `agent trace`: attach the probes and print every kernel signal as it happens.
//!
//! With `--json`, stdout carries one JSON object per line: first `{"kind":"ready",...}` once
//! every probe is attached, then events, and a `{"kind":"summary",...}` line at exit.

use std::time::Duration;

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use super::signal_print::{Output, PrintKind, Printed};
use crate::{
    probes::{
        LoadOptions, ProbeName, Probes,
        go_processes::{BinaryNames, DiscoveryOptions, GoProcessEvent},
        h2_hooks::H2Options,
        pipeline::{DEFAULT_RING_POLL_INTERVAL, Pipeline, PipelineOptions, SignalSink},
    },
    signals::{
        Signal,
        rapid_reset::{RapidResetDetector, RapidResetPolicy},
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
    #[arg(long, default_value = DEFAULT_RING_POLL_INTERVAL, value_parser = parse_poll_interval)]
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
    /// go-gc: how long a Go binary's probes stay attached after its last process exits, so a
    /// process that runs it again has them at exec (0s: release at once).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    go_linger: Duration,
    /// go-gc: do not expedite the kernel's RCU grace periods (system-wide,
    /// /sys/kernel/rcu_expedited) for the millisecond it takes to attach a new Go binary: its
    /// exec-to-attach is then about one grace period (10-35 ms) instead of about 1 ms.
    #[arg(long)]
    go_attach_normal_rcu: bool,
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

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let pipeline = Pipeline::start(PipelineOptions {
        load: LoadOptions {
            probes: opts.probes.clone(),
            ring_buffer_bytes: opts.ring_buffer_bytes,
            h2: H2Options {
                all_frames: opts.all_frames,
                cgroup: opts.cgroup.clone(),
                tc_interfaces: opts.tc_interfaces.clone(),
            },
        },
        ring_poll_interval: opts.ring_poll_interval,
        discovery: DiscoveryOptions {
            linger: opts.go_linger,
            expedite_rcu: !opts.go_attach_normal_rcu,
        },
    })
    .context("cannot attach the probes")?;
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let mut printer = Printer {
        out: Output::new(
            opts.json,
            Printed::from_kinds(&opts.print),
            Box::new(stdout),
        ),
        rapid_reset: RapidResetDetector::new(RapidResetPolicy {
            max_resets_per_sec: opts.rapid_reset_rate,
            cooldown_ns: 10_000_000_000,
        }),
        names: BinaryNames::default(),
    };
    let (stop, stopped) = watch::channel(false);
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let signals = tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        let _ = stop.send(true);
    });
    let finished = pipeline.run(&mut printer, None, stopped).await;
    signals.abort();
    let discovery_figures = finished.discovery.as_ref().map(|d| d.figures.figures());
    let (go_before_release, go_after_release) = finished
        .discovery
        .map(|d| tokio::task::block_in_place(|| d.stop()))
        .unzip();
    printer.out.summary(
        &finished.probes,
        &finished.reader,
        go_before_release,
        go_after_release,
        discovery_figures,
    );
    Ok(())
}

/// Prints every signal as it comes, and the rapid resets its detector finds among them.
struct Printer {
    out: Output,
    rapid_reset: RapidResetDetector,
    names: BinaryNames,
}

impl SignalSink for Printer {
    fn started(&mut self, probes: &Probes, names: &BinaryNames) {
        self.names = names.clone();
        self.out.ready(probes);
    }

    fn signal(&mut self, signal: Signal) {
        match signal {
            Signal::TcpReset(reset) => self.out.tcp_reset(&reset),
            Signal::GoStw(pause) => self.out.gc_stw(&pause, &self.names),
            Signal::H2Frame(frame) => {
                if let Some(signal) = self.rapid_reset.observe(&frame) {
                    self.out.rapid_reset(&signal);
                }
                self.out.h2_frame(&frame);
            }
            Signal::H2Flow(change) => self.out.h2_flow(&change),
        }
    }

    fn go_process(&mut self, event: &GoProcessEvent) {
        self.out.go_process(event);
    }

    /// Lines are written in batches: flushed once the queue is empty, not per line.
    fn idle(&mut self) {
        self.out.flush();
    }
}
