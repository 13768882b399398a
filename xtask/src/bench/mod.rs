//! `cargo xtask bench SUITE`: benchmarks, not tests. Each suite runs its measurements side by
//! side in one run against real peers and prints ratios, so a noisy machine shifts both sides
//! alike. Nothing here asserts a time: the figures are for people to read and compare.

mod agent;
mod probes;
pub mod reset_storm;

use anyhow::{Result, bail};

#[derive(Debug, clap::Parser)]
pub struct Options {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Debug, clap::Subcommand)]
enum Suite {
    /// Kernel probes: a TCP reset storm (reported/made, drops, agent CPU per million events),
    /// a GC-heavy Go program with and without the probes, and exec-to-attach latency.
    Probes(probes::Options),
}

pub fn run(opts: Options) -> Result<()> {
    crate::setup::run(crate::setup::Options { check: false })?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks load eBPF programs and need root; run `sudo -E cargo xtask bench`");
    }
    match opts.suite {
        Suite::Probes(o) => probes::run(o),
    }
}

/// Median of `values` (mean of the middle two for an even count); None when empty.
fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// The value below which `q` (0..=1) of `values` fall (nearest rank); None when empty.
fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn quantile_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.95), Some(19.0));
        assert_eq!(quantile(&v, 1.0), Some(20.0));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
    }
}
