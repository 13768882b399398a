//! `cargo bench -p agent --bench breaker -- [OPTIONS]`: what the breaker engine costs one stream, for `cargo xtask
//! bench breaker`.
//!
//! It drives [`Breakers`] exactly as the proxy does per stream, without the network: one
//! cluster of three endpoints and the default [`BreakerConfig`]; per call, `Instant::now()`
//! once, the client's, cluster's and method's admission (`/pkg.S/M`, a client key out of
//! 1000), the look at two candidate endpoints, the picked one's admission, then the
//! classification of an answered OK call and its record in every breaker it went through.
//! `--threads 2` runs that loop on two threads at once over the same breakers: the cluster's
//! and method's breakers and the client map are shared, so their locks are contended.
//!
//! Prints one JSON line: `{"calls":N,"threads":T,"ns_per_call":X,...}`, where `calls` is per
//! thread and `ns_per_call` the mean over threads of a thread's wall time over its calls
//! (what one call waits, contention included).

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use agent::breaker::{
    classify::{Ended, Facts, classify},
    config::BreakerConfig,
    registry::{Breakers, ClusterShape, EndpointBreakers, Transition},
};

fn main() -> anyhow::Result<()> {
    run(&<Options as clap::Parser>::parse())
}

#[derive(Debug, clap::Parser)]
struct Options {
    /// Passed by `cargo bench`; nothing to do with the options here.
    #[arg(long, hide = true)]
    bench: bool,
    /// Calls per thread.
    #[arg(long, default_value_t = 1_000_000)]
    calls: u64,
    /// Threads calling at once, over the same breakers.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Give every client a breaker first (one client fault each), as after a storm of
    /// expired tokens: each call then goes through its client's breaker too. Without it,
    /// no client was ever at fault and none has one (the common case).
    #[arg(long)]
    clients_with_breakers: bool,
}

/// Distinct client keys (`sub:user-N`).
const CLIENTS: u64 = 1000;

const METHOD: &str = "/pkg.S/M";

/// What one thread did.
struct Loop {
    elapsed: Duration,
    rejected: u64,
    transitions: u64,
}

fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.calls == 0 || opts.threads == 0 {
        bail!("--calls and --threads must be at least 1");
    }
    let endpoints: Vec<String> = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
        .map(str::to_owned)
        .into();
    let subsets = vec!["default".to_owned()];
    let breakers = Breakers::new(
        BreakerConfig::default(),
        &[ClusterShape {
            name: "bench",
            subsets: &subsets,
            endpoints_only: false,
        }],
        Instant::now(),
    );
    let eps: Vec<Arc<EndpointBreakers>> = endpoints
        .iter()
        .map(|e| breakers.endpoint(0, e, 0))
        .collect();
    // Made before the clock starts: the proxy's own `to_string` of the key is not the engine's.
    let clients: Vec<String> = (0..CLIENTS).map(|i| format!("sub:user-{i}")).collect();
    // A warm-up pass creates the client and method breakers, so that the measured calls find
    // them, as in a proxy that has been running for a while.
    one_loop(&breakers, &eps, &clients, CLIENTS.min(opts.calls), 0);
    if opts.clients_with_breakers {
        let now = Instant::now();
        let mut out = Vec::new();
        let fault = classify(
            &Facts {
                grpc: true,
                ended: Ended::Answered,
                grpc_status: Some(16),
                http_status: Some(200),
                token_expired: true,
                request_complete: true,
            },
            breakers.config().resource_exhausted,
        );
        for client in &clients {
            if let Ok(mut permits) = breakers.admit_call(0, 0, METHOD, Some(client), now, &mut out)
            {
                permits.record_call(fault, Duration::ZERO, now, Some(client), &mut out);
            }
        }
    }

    let loops: Vec<Loop> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..opts.threads)
            .map(|t| {
                let (breakers, eps, clients) = (&breakers, &eps, &clients);
                s.spawn(move || one_loop(breakers, eps, clients, opts.calls, t as u64))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a bench thread panicked"))
            })
            .collect::<anyhow::Result<_>>()
    })
    .context("bench-breaker")?;

    let ns: Vec<f64> = loops
        .iter()
        .map(|l| l.elapsed.as_nanos() as f64 / opts.calls as f64)
        .collect();
    let wall = loops.iter().map(|l| l.elapsed).max().unwrap_or_default();
    let total = opts.calls * opts.threads as u64;
    println!(
        "{}",
        json!({
            "calls": opts.calls,
            "clients_with_breakers": opts.clients_with_breakers,
            "threads": opts.threads,
            "ns_per_call": ns.iter().sum::<f64>() / ns.len() as f64,
            "ns_per_call_by_thread": ns,
            "calls_per_s": total as f64 / wall.as_secs_f64(),
            "rejected": loops.iter().map(|l| l.rejected).sum::<u64>(),
            "transitions": loops.iter().map(|l| l.transitions).sum::<u64>(),
        })
    );
    Ok(())
}

/// `calls` streams through the breakers, as the proxy admits and records one; thread `t`
/// starts at another client than its peers.
fn one_loop(
    breakers: &Breakers,
    eps: &[Arc<EndpointBreakers>],
    clients: &[String],
    calls: u64,
    t: u64,
) -> Loop {
    let mut out: Vec<Transition> = Vec::with_capacity(4);
    let (mut rejected, mut transitions) = (0, 0);
    // An answered gRPC call with status 0, as `finish` describes it.
    let facts = Facts {
        grpc: true,
        ended: Ended::Answered,
        grpc_status: Some(0),
        http_status: Some(200),
        token_expired: false,
        request_complete: true,
    };
    let attribution = breakers.config().resource_exhausted;
    let start = Instant::now();
    for i in 0..calls {
        let n = i + t * 500;
        let now = Instant::now();
        let client = &clients[(n % CLIENTS) as usize];
        match breakers.admit_call(0, 0, METHOD, Some(client), now, &mut out) {
            Ok(mut permits) => {
                // Two candidates, as a power-of-two-choices pick looks at them.
                let (a, b) = ((n % 3) as usize, ((n + 1) % 3) as usize);
                let pick = if breakers.endpoint_admissible(&eps[a], 0, now) {
                    a
                } else if breakers.endpoint_admissible(&eps[b], 0, now) {
                    b
                } else {
                    rejected += 1;
                    continue;
                };
                if breakers
                    .admit_endpoint(&mut permits, &eps[pick], 0, now, &mut out)
                    .is_err()
                {
                    rejected += 1;
                    continue;
                }
                let verdict = classify(black_box(&facts), attribution);
                let latency = Duration::from_micros(200 + n % 800);
                permits.record_call(verdict, latency, now, Some(client), &mut out);
            }
            Err(_) => rejected += 1,
        }
        transitions += out.len() as u64;
        out.clear();
    }
    Loop {
        elapsed: start.elapsed(),
        rejected,
        transitions,
    }
}
