//! The demo's child processes: each one stopped when its guard is dropped, and killed by the
//! kernel if xtask dies without dropping it; Ctrl-C and SIGTERM end the demo through those
//! guards.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdout, Command, ExitStatus},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::util::display;

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

/// A child process, stopped on drop: SIGTERM, then SIGKILL after its grace period.
pub struct Proc {
    name: String,
    child: Child,
    grace: Duration,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` in a process group of its own (a terminal's Ctrl-C reaches xtask alone,
    /// which then stops the children in order), to get SIGTERM should xtask die first.
    pub fn spawn(name: &str, cmd: &mut Command, grace: Duration) -> Result<Proc> {
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", display(cmd)))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            grace,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn take_stdout(&mut self) -> Result<ChildStdout> {
        self.child
            .stdout
            .take()
            .with_context(|| format!("{}: stdout not piped", self.name))
    }

    /// Sends `sig` unless it has been reaped (its pid may be another process's by then).
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.exited().is_none() {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// Its exit status once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM, then SIGKILL if it is still there after its grace period.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while self.exited().is_none() {
            if Instant::now() >= deadline {
                eprintln!(
                    "demo: {} did not stop within {:?}; killing it",
                    self.name, self.grace
                );
                self.kill();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Lines of `pipe`, read to the end by a thread of their own.
pub fn line_reader(pipe: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            // Nobody listening: go on reading, so the child never blocks on a full pipe.
            let _ = tx.send(line);
        }
    });
    rx
}
