//! What the host must give the agent before any program loads: capabilities, tracefs, memlock.
//! Each failure names what is missing and how to provide it.

use std::path::PathBuf;

use tracing::{debug, info, warn};

use super::ProbeName;

#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error(
        "missing capabilities {missing}: run the agent as root, or grant CAP_BPF and CAP_PERFMON \
         (CAP_SYS_ADMIN on kernels before 5.8)"
    )]
    MissingCapabilities { missing: String },
    #[error("cannot read effective capabilities from /proc/self/status")]
    UnreadableCapabilities(#[source] std::io::Error),
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {source}; mount it \
         with `mount -t tracefs tracefs /sys/kernel/tracing` (in Kubernetes: a hostPath mount of \
         /sys/kernel/tracing)"
    )]
    Tracefs {
        #[source]
        source: std::io::Error,
    },
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Loading programs needs CAP_BPF, attaching tracepoints CAP_PERFMON; CAP_SYS_ADMIN covers
/// both on every kernel. Without those, an error. What single probes among `wanted` need
/// beyond that only degrades them: returned as (probe, capability) for the caller to warn.
/// The Go uprobes need CAP_SYS_ADMIN (`perf_event_open` refuses uprobes to CAP_PERFMON alone),
/// the HTTP/2 programs CAP_NET_ADMIN (cgroup_skb and TC attachment).
pub fn check_capabilities(
    wanted: &[ProbeName],
) -> Result<Vec<(ProbeName, &'static str)>, EnvironmentError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(EnvironmentError::UnreadableCapabilities)?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(wanted
            .iter()
            .filter_map(|probe| match probe {
                ProbeName::GoGc if !has(CAP_SYS_ADMIN) => Some((*probe, "CAP_SYS_ADMIN")),
                ProbeName::H2Frames if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) => {
                    Some((*probe, "CAP_NET_ADMIN"))
                }
                ProbeName::GoGc | ProbeName::H2Frames | ProbeName::TcpReset => None,
            })
            .collect());
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect();
    Err(EnvironmentError::MissingCapabilities {
        missing: missing.join(" and "),
    })
}

/// Returns where tracefs is mounted, mounting it at /sys/kernel/tracing when it is not.
pub fn ensure_tracefs() -> Result<PathBuf, EnvironmentError> {
    if let Some(path) = find_tracefs() {
        return Ok(path);
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: plain mount(2) with valid NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(EnvironmentError::Tracefs {
            source: std::io::Error::last_os_error(),
        });
    }
    info!(path = "/sys/kernel/tracing", "mounted tracefs");
    Ok(PathBuf::from("/sys/kernel/tracing"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Raising it needs CAP_SYS_RESOURCE,
/// which newer kernels do not need at all: warn (on old kernels only), never fail.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return;
    }
    let err = std::io::Error::last_os_error();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if kernel_at_least(&release, (5, 11)) {
        debug!(%err, "could not raise RLIMIT_MEMLOCK; not needed on this kernel (>= 5.11)");
    } else {
        warn!(
            %err,
            release = release.trim(),
            "could not raise RLIMIT_MEMLOCK: this kernel charges BPF maps to it, loading may fail"
        );
    }
}

/// Whether a kernel release string (`6.18.0-foo`) is at least `(major, minor)`; false when it
/// cannot be read.
fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= want,
        _ => false,
    }
}

/// Where tracefs is mounted, from /proc/self/mounts: its own mount, or debugfs' `tracing`.
pub fn find_tracefs() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mut debugfs = None;
    for line in mounts.lines() {
        let mut cols = line.split_whitespace();
        let (Some(_dev), Some(dir), Some(fstype)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        match fstype {
            "tracefs" => return Some(PathBuf::from(dir)),
            "debugfs" => debugfs = Some(PathBuf::from(dir).join("tracing")),
            _ => {}
        }
    }
    debugfs.filter(|p| p.join("events").is_dir())
}

#[cfg(test)]
mod tests {
    use super::kernel_at_least;

    #[test]
    fn kernel_release_comparison() {
        assert!(kernel_at_least("6.18.0-cloud-amd64\n", (5, 11)));
        assert!(kernel_at_least("5.11.0", (5, 11)));
        assert!(!kernel_at_least("5.10.209-1", (5, 11)));
        assert!(!kernel_at_least("4.19.0", (5, 11)));
        assert!(!kernel_at_least("", (5, 11)));
        assert!(!kernel_at_least("garbage", (5, 11)));
    }
}
