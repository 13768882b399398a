//! Where the cgroup v2 hierarchy is mounted: interception attaches to cgroups of it, and the
//! tests, benchmarks and demo make cgroups of their own there.

use std::path::PathBuf;

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
}
