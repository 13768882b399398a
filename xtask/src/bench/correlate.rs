//! `cargo xtask bench correlate`: what joining kernel signals to the proxy's streams costs.
//!
//! `agent/benches/correlate.rs` (optimised) registers live streams as the proxy does
//! (each with a trace, a session id and JWT claims) and feeds decoded kernel signals through
//! the real correlation stage in a busy node's proportions (DATA of the proxy's own flows,
//! RST_STREAM on its live streams, frames and resets of connections that are not its own).
//! Runs with 10,000 live streams and with 100 alternate, so that the ratio of the two says
//! what the table's size costs a signal. Reported, medians of `--runs`: signals joined per
//! second and ns per signal, ns to register and to let go of a stream, and resident bytes per
//! tracked stream.
//!
//! The time from a kernel event to the breaker trip it causes is measured end to end, with
//! real resets of real connections, by `tests/tests/correlate.rs` (100 trials; it prints the
//! median).

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::median;
use crate::util::{output, workspace_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Runs per table size (the figures are medians).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Signals per run.
    #[arg(long, default_value_t = 2_000_000)]
    signals: u64,
    /// Live streams of the large table.
    #[arg(long, default_value_t = 10_000)]
    streams: u32,
}

/// The small table the large one is compared with.
const FEW_STREAMS: u32 = 100;

pub fn run(opts: Options) -> Result<()> {
    if opts.runs == 0 || opts.signals == 0 || opts.streams == 0 {
        bail!("--runs, --signals and --streams must be at least 1");
    }
    let root = workspace_root()?;
    eprintln!("bench correlate: building agent/benches/correlate.rs (optimised)");
    let bench_bin = crate::run::build_agent_bench(&root, "correlate")?;
    let bench_dir = root.join("target/bench");
    std::fs::create_dir_all(&bench_dir)?;
    let sizes = [opts.streams, FEW_STREAMS];
    let mut runs: [Vec<Value>; 2] = Default::default();
    for _ in 0..opts.runs {
        for (k, streams) in sizes.into_iter().enumerate() {
            let text = output(
                std::process::Command::new(&bench_bin)
                    .args(["--streams", &streams.to_string()])
                    .args(["--signals", &opts.signals.to_string()])
                    .env("AGENT_LOG", "warn"),
            )?;
            let v = text
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
                .with_context(|| format!("the correlate bench printed no JSON line:\n{text}"))?;
            runs[k].push(v);
        }
    }
    let med = |k: usize, field: &str| {
        let values: Vec<f64> = runs[k].iter().filter_map(|v| v[field].as_f64()).collect();
        median(&values).unwrap_or(f64::NAN)
    };
    println!(
        "\n== correlation stage: {} signals per run, medians of {} runs ==",
        opts.signals, opts.runs
    );
    for (k, streams) in sizes.into_iter().enumerate() {
        println!(
            "{streams:>6} live streams tracked: {:>10.0} signals/s joined ({:.0} ns each); register {:.0} ns, let go {:.0} ns per stream; {:.0} resident bytes per tracked stream",
            med(k, "signals_per_s"),
            med(k, "ns_per_signal"),
            med(k, "register_ns_per_stream"),
            med(k, "release_ns_per_stream"),
            med(k, "rss_bytes_per_stream"),
        );
    }
    let ratio = med(0, "ns_per_signal") / med(1, "ns_per_signal");
    println!(
        "ns per signal with {} streams / with {FEW_STREAMS}: {ratio:.2}",
        opts.streams
    );
    let results = json!({
        "signals_per_run": opts.signals,
        "runs": opts.runs,
        "large": {
            "streams": opts.streams,
            "median_signals_per_s": med(0, "signals_per_s"),
            "median_ns_per_signal": med(0, "ns_per_signal"),
            "median_register_ns_per_stream": med(0, "register_ns_per_stream"),
            "median_release_ns_per_stream": med(0, "release_ns_per_stream"),
            "median_rss_bytes_per_stream": med(0, "rss_bytes_per_stream"),
            "runs": runs[0],
        },
        "small": {
            "streams": FEW_STREAMS,
            "median_signals_per_s": med(1, "signals_per_s"),
            "median_ns_per_signal": med(1, "ns_per_signal"),
            "runs": runs[1],
        },
        "ns_per_signal_large_over_small": ratio,
    });
    let path = bench_dir.join("correlate.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("\n{results}");
    println!("\nresults also in {}", path.display());
    Ok(())
}
