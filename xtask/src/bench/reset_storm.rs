//! The reset storm: `xtask reset-storm` (hidden) makes TCP resets as fast as it can in a network
//! namespace of its own, so the benchmark can tell its resets from any others by the namespace
//! inode the agent reports, and can check its own count against the kernel's (`Tcp: OutRsts`
//! of that namespace, which starts at zero).

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use socket2::SockRef;

use crate::util::run_quiet;

#[derive(Debug, clap::Parser)]
pub struct Options {
    /// Resets to make in total: half by abortive close (SO_LINGER 0), half by connecting to a
    /// closed port. Each is one RST segment, seen once sent and once received.
    #[arg(long, default_value_t = 100_000)]
    pub resets: u64,
    /// Threads making resets at once (half IPv4, half IPv6).
    #[arg(long, default_value_t = 2)]
    pub threads: u64,
}

/// What the storm printed (one JSON line on stdout).
#[derive(Debug, Serialize, Deserialize)]
pub struct StormReport {
    /// Inode of the storm's network namespace, as the agent reports it.
    pub netns: u64,
    pub abortive_closes: u64,
    pub closed_port_connects: u64,
    /// The kernel's count of RST segments sent in the namespace.
    pub kernel_out_rsts: u64,
    pub seconds: f64,
}

impl StormReport {
    pub fn resets_made(&self) -> u64 {
        self.abortive_closes + self.closed_port_connects
    }
}

pub fn run(opts: Options) -> Result<()> {
    // Before any thread exists, so every thread we start inherits the namespace.
    // SAFETY: unshare(2) with a valid flag; we are still single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET) (needs root)");
    }
    run_quiet(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    let netns = std::fs::metadata("/proc/thread-self/ns/net")
        .context("cannot stat our network namespace")?
        .ino();

    let threads = opts.threads.max(1);
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            // Spread the total over the threads; the first ones take the remainder.
            let share = opts.resets / threads + u64::from(i < opts.resets % threads);
            let ip = if i % 2 == 0 { "127.0.0.1" } else { "::1" };
            std::thread::spawn(move || storm(ip, share))
        })
        .collect();
    let mut report = StormReport {
        netns,
        abortive_closes: 0,
        closed_port_connects: 0,
        kernel_out_rsts: 0,
        seconds: 0.0,
    };
    for worker in workers {
        let (abortive, closed) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a storm thread panicked"))??;
        report.abortive_closes += abortive;
        report.closed_port_connects += closed;
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.kernel_out_rsts = out_rsts()?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Makes `count` resets on `ip`, alternating the two ways; returns how many of each.
fn storm(ip: &str, count: u64) -> Result<(u64, u64)> {
    let listener = TcpListener::bind((ip, 0)).context("bind")?;
    let server = listener.local_addr()?;
    let closed = {
        let l = TcpListener::bind((ip, 0)).context("bind")?;
        l.local_addr()?
    };
    let (mut abortive, mut refused) = (0, 0);
    for i in 0..count {
        if i % 2 == 0 {
            abortive_close(&listener, server)?;
            abortive += 1;
        } else {
            connect_closed(closed)?;
            refused += 1;
        }
    }
    Ok((abortive, refused))
}

/// Connect, accept, close the client with SO_LINGER 0: one RST from client to server.
fn abortive_close(listener: &TcpListener, server: SocketAddr) -> Result<()> {
    let client = TcpStream::connect(server).context("connect")?;
    let (accepted, _) = listener.accept().context("accept")?;
    SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .context("SO_LINGER")?;
    drop(client);
    drop(accepted);
    Ok(())
}

/// A SYN to a port nobody listens on: the kernel answers with one RST.
fn connect_closed(closed: SocketAddr) -> Result<()> {
    match TcpStream::connect(closed) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e).context("connect to a closed port"),
        Ok(_) => bail!("connect to {closed} succeeded: something listens there"),
    }
}

/// `Tcp: OutRsts` from /proc/net/snmp (of this thread's namespace).
fn out_rsts() -> Result<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")
        .context("cannot read /proc/thread-self/net/snmp")?;
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let [names, values] = tcp[..] else {
        bail!("unexpected /proc/net/snmp: no Tcp header and values lines");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "OutRsts")
        .and_then(|(_, v)| v.parse().ok())
        .context("no Tcp OutRsts in /proc/net/snmp")
}

/// Runs the storm as a child process (its namespace must not become ours) and reads its report.
pub fn run_storm_child(resets: u64) -> Result<StormReport> {
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let out = crate::util::output(
        Command::new(exe)
            .args(["reset-storm", "--resets", &resets.to_string()])
            .stdin(std::process::Stdio::null()),
    )?;
    serde_json::from_str(out.trim()).with_context(|| format!("the storm printed {out:?}"))
}
