//! Where the cgroup v2 hierarchy is mounted: interception attaches to cgroups of it, and the
//! tests, benchmarks and demo make cgroups of their own there.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

/// The cgroup v2 root from mountinfo text: `/sys/fs/cgroup` on unified systems,
/// `/sys/fs/cgroup/unified` in hybrid mode.
pub fn cgroup2_root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        // "36 35 0:31 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw"
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// This process's view of the cgroup v2 root; None when none is mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    cgroup2_root_in(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// `program`, started inside `cgroup` when one is given: a shell moves itself into it, then
/// becomes the program (so the program and its children are in it from their first
/// instruction). If the move fails the shell exits 1 and the program never runs outside.
pub fn command_in(cgroup: Option<&Path>, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"if [ -n "$1" ]; then echo $$ > "$1/cgroup.procs" || exit 1; fi; shift; exec "$@""#)
        .arg("sh")
        .arg(cgroup.map(Path::as_os_str).unwrap_or_default())
        .arg(program);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_roots() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_root_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "36 35 0:31 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_root_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_root_in("1 2 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }

    #[test]
    fn runs_the_program_and_refuses_a_cgroup_it_cannot_enter() {
        let out = command_in(None, "echo").arg("ran").output();
        assert!(out.is_ok_and(|o| o.status.success() && o.stdout == b"ran\n"));
        let missing = Path::new("/nonexistent-cgroup-for-this-test");
        let out = command_in(Some(missing), "echo").arg("ran").output();
        assert!(out.is_ok_and(|o| !o.status.success() && o.stdout.is_empty()));
    }
}
