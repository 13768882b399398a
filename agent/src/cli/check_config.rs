//! `agent check-config FILE`: every problem of a configuration file, with its line.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The TOML file to check.
    file: PathBuf,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    match crate::config::load(&opts.file) {
        Ok(c) => {
            println!(
                "{}: ok ({} listeners, {} clusters)",
                opts.file.display(),
                c.listeners.len(),
                c.clusters.len()
            );
            Ok(())
        }
        Err(e) => {
            for err in &e.errors {
                if err.line == 0 {
                    eprintln!("{}: {}", e.path, err.message());
                } else {
                    eprintln!("{}:{}:{}: {}", e.path, err.line, err.column, err.message());
                }
            }
            anyhow::bail!("{} problem(s) in {}", e.errors.len(), e.path)
        }
    }
}
