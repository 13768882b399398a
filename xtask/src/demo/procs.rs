//! The demo's child processes ([`test_support::supervised`]): each one stopped when its guard is
//! dropped, and by the kernel if xtask dies without dropping it; Ctrl-C and SIGTERM end the demo
//! through those guards.

use std::{
    process::{ChildStdout, Command},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
pub use test_support::supervised::line_reader;
use test_support::supervised::{Supervised, Supervision};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether SIGINT or SIGTERM came since [`catch_signals`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Until the guard is dropped, SIGINT and SIGTERM only set [`interrupted`], so the demo
/// unwinds and its guards stop what it started.
pub fn catch_signals() -> SignalGuard {
    INTERRUPTED.store(false, Ordering::SeqCst);
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler) };
    }
    SignalGuard
}

pub struct SignalGuard;

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: restoring the default disposition has no preconditions.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
}

/// The demo's children: SIGTERM when dropped, SIGKILL after their grace period; a process group
/// of their own, SIGTERM from the kernel should xtask die first.
pub type Proc = Supervised;

/// Starts `cmd` as a [`Proc`].
pub fn spawn(name: &str, cmd: &mut Command, grace: Duration) -> Result<Proc> {
    Ok(Supervised::spawn(
        name,
        cmd,
        Supervision::term_in_own_group(grace),
    )?)
}

/// The stdout of a child started with it piped.
pub fn take_stdout(proc: &mut Proc) -> Result<ChildStdout> {
    let name = proc.name().to_owned();
    proc.child_mut()
        .stdout
        .take()
        .with_context(|| format!("{name}: stdout not piped"))
}
