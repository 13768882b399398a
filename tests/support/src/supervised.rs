//! A child process that is stopped when its guard is dropped: SIGTERM, then SIGKILL after a
//! grace period (none: SIGKILL at once). Optionally in a process group of its own and told by
//! the kernel (`PR_SET_PDEATHSIG`) to stop should the parent die without dropping the guard.

use std::{
    io::{BufRead as _, BufReader, Read},
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    process::{Child, Command, ExitStatus},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

/// How a [`Supervised`] child is started and stopped.
#[derive(Clone, Copy, Debug)]
pub struct Supervision {
    /// Between SIGTERM and SIGKILL when stopped; zero: SIGKILL at once.
    pub grace: Duration,
    /// A process group of its own: a terminal's Ctrl-C reaches the parent alone, which then
    /// stops its children in order.
    pub own_group: bool,
    /// The signal the kernel sends it when the parent dies.
    pub parent_death_signal: Option<libc::c_int>,
}

impl Supervision {
    /// SIGKILL when dropped: peers and load generators whose exit nobody needs to be clean.
    pub const KILL: Supervision = Supervision {
        grace: Duration::ZERO,
        own_group: false,
        parent_death_signal: Some(libc::SIGKILL),
    };

    /// SIGTERM, then SIGKILL after `grace`: programs whose own shutdown matters (the agent).
    pub fn term(grace: Duration) -> Supervision {
        Supervision {
            grace,
            own_group: false,
            parent_death_signal: Some(libc::SIGTERM),
        }
    }

    /// [`Supervision::term`] in a process group of its own (the demo, run from a terminal).
    pub fn term_in_own_group(grace: Duration) -> Supervision {
        Supervision {
            own_group: true,
            ..Supervision::term(grace)
        }
    }
}

/// A child that could not be started, with the command line that was tried.
#[derive(Debug)]
pub struct SpawnError {
    pub name: String,
    pub command: String,
    pub source: std::io::Error,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot start {} (`{}`): {}",
            self.name, self.command, self.source
        )
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A child process, stopped when dropped.
pub struct Supervised {
    name: String,
    child: Child,
    how: Supervision,
    status: Option<ExitStatus>,
}

impl Supervised {
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        how: Supervision,
    ) -> Result<Supervised, SpawnError> {
        if how.own_group {
            cmd.process_group(0);
        }
        if let Some(sig) = how.parent_death_signal {
            // SAFETY: prctl is async-signal-safe and touches no memory of ours.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, sig) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|source| SpawnError {
            name: name.to_owned(),
            command: command_line(cmd),
            source,
        })?;
        Ok(Supervised {
            name: name.to_owned(),
            child,
            how,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child itself, e.g. to take its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
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

    /// Waits for the exit until `deadline`: None if it is still running then.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit as long as it takes.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }

    /// Waits for the exit as long as it takes, like [`Supervised::wait`], with what the kernel
    /// counted of its resources (`wait4(2)`: user and system CPU time, peak RSS, ...). An error
    /// when its exit was collected already: the usage went with it.
    pub fn wait_with_usage(&mut self) -> std::io::Result<(ExitStatus, libc::rusage)> {
        if self.status.is_some() {
            return Err(std::io::Error::other(format!(
                "{}: its exit was collected already, and its resource usage with it",
                self.name
            )));
        }
        let mut raw = 0;
        // SAFETY: rusage is plain data, filled by the kernel.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: valid pointers, on our own child; if it was reaped behind our back
            // (through `child_mut`), wait4 fails with ECHILD.
            let rc =
                unsafe { libc::wait4(self.child.id() as libc::pid_t, &mut raw, 0, &mut usage) };
            if rc >= 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        // Recorded, so that nothing signals its pid again (std's Child does not know it is
        // reaped).
        let status = ExitStatus::from_raw(raw);
        self.status = Some(status);
        Ok((status, usage))
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// SIGTERM and its exit status, or None when it had to be killed after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let status = self.wait_until(Instant::now() + grace);
        if status.is_none() {
            self.kill();
        }
        status
    }

    /// Stops it as its [`Supervision`] says (what dropping it does).
    pub fn stop(&mut self) {
        if self.how.grace.is_zero() {
            self.kill();
        } else if self.exited().is_none() && self.terminate(self.how.grace).is_none() {
            eprintln!(
                "{} did not stop within {:?} of SIGTERM; killed",
                self.name, self.how.grace
            );
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Lines of `pipe`, read to the end by a thread of their own; nobody listening, it reads on,
/// so the child never blocks on a full pipe.
pub fn line_reader(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// Everything `pipe` says, gathered by a thread of its own (for stderr in failure messages).
pub fn collect_lines(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut text = sink
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            text.push_str(&line);
            text.push('\n');
        }
    });
    text
}

/// `KEY=value program arg ...` (the variables the command sets), for messages.
pub fn command_line(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(key, value)| {
            value.map(|v| format!("{}={}", key.to_string_lossy(), v.to_string_lossy()))
        })
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Supervised {
        Supervised::spawn(
            "sh",
            Command::new("sh").args(["-c", script]),
            Supervision::KILL,
        )
        .unwrap()
    }

    #[test]
    fn wait_with_usage_reaps_once() {
        let mut child = sh("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exit 3");
        let (status, usage) = child.wait_with_usage().unwrap();
        assert_eq!(status.code(), Some(3));
        assert!(usage.ru_utime.tv_sec >= 0 && usage.ru_maxrss > 0);
        // Known as exited from then on; the usage cannot be had twice.
        assert_eq!(child.exited(), Some(status));
        assert_eq!(child.wait().unwrap(), status);
        assert!(child.wait_with_usage().is_err());
    }

    #[test]
    fn a_signal_stops_it_and_its_status_says_so() {
        let mut child = sh("exec sleep 60");
        child.signal(libc::SIGINT);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGINT));
    }

    #[test]
    fn dropping_it_kills_it() {
        let child = sh("exec sleep 60");
        let pid = child.pid();
        let started = Instant::now();
        drop(child);
        // Reaped by the drop: no child of ours, not even a zombie, has that pid any more.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        assert_ne!(ppid, Some(std::process::id()), "{stat}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
