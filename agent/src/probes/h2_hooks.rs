//! Where the HTTP/2 frame tracker attaches: cgroup_skb egress and ingress on a cgroup v2
//! directory (by default the root of the cgroup v2 hierarchy, which every local socket belongs
//! to, whatever the CNI), or TC (tcx) on named interfaces.

use std::{fs::File, path::PathBuf};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType},
};

use super::ProbeError;

pub const CGROUP_EGRESS: &str = "h2_cgroup_egress";
pub const CGROUP_INGRESS: &str = "h2_cgroup_ingress";
pub const TC_EGRESS: &str = "h2_tc_egress";
pub const TC_INGRESS: &str = "h2_tc_ingress";

#[derive(Clone, Debug, Default)]
pub struct H2Options {
    /// Emit every frame type, not only HEADERS, RST_STREAM, SETTINGS and GOAWAY.
    pub all_frames: bool,
    /// cgroup v2 directory to attach to; None: the root of the cgroup v2 mount.
    pub cgroup: Option<PathBuf>,
    /// Attach with TC to these interfaces instead of cgroup_skb.
    pub tc_interfaces: Vec<String>,
}

/// Where the hooks went, for the ready line.
#[derive(Clone, Debug, serde::Serialize)]
pub struct H2Attachment {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tc_interfaces: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum H2AttachError {
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); mount one or pass --cgroup"
    )]
    NoCgroup2,
    #[error("cannot open cgroup {path}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

pub fn attach(ebpf: &mut Ebpf, opts: &H2Options) -> Result<H2Attachment, H2AttachError> {
    if !opts.tc_interfaces.is_empty() {
        for (name, kind) in [
            (TC_EGRESS, TcAttachType::Egress),
            (TC_INGRESS, TcAttachType::Ingress),
        ] {
            let program: &mut SchedClassifier = program(ebpf, name)?;
            program
                .load()
                .map_err(|source| ProbeError::Program { name, source })?;
            for iface in &opts.tc_interfaces {
                program
                    .attach(iface, kind)
                    .map_err(|source| ProbeError::Program { name, source })?;
            }
        }
        return Ok(H2Attachment {
            cgroup: None,
            tc_interfaces: opts.tc_interfaces.clone(),
        });
    }
    let path = match &opts.cgroup {
        Some(p) => p.clone(),
        None => cgroup2_root(
            &std::fs::read_to_string("/proc/self/mountinfo").map_err(H2AttachError::MountInfo)?,
        )
        .ok_or(H2AttachError::NoCgroup2)?,
    };
    let dir = File::open(&path).map_err(|source| H2AttachError::OpenCgroup {
        path: path.clone(),
        source,
    })?;
    for (name, kind) in [
        (CGROUP_EGRESS, CgroupSkbAttachType::Egress),
        (CGROUP_INGRESS, CgroupSkbAttachType::Ingress),
    ] {
        let program: &mut CgroupSkb = program(ebpf, name)?;
        program
            .load()
            .map_err(|source| ProbeError::Program { name, source })?;
        // A bpf_link attachment (5.7+) sits beside other programs on the same cgroup (a CNI's,
        // say) without a multi flag; the kernel rejects BPF_F_ALLOW_MULTI on links.
        program
            .attach(&dir, kind, CgroupAttachMode::Single)
            .map_err(|source| ProbeError::Program { name, source })?;
    }
    Ok(H2Attachment {
        cgroup: Some(path),
        tc_interfaces: Vec::new(),
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProbeError::NoProgram(name))?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })
}

/// The mount point of the cgroup v2 hierarchy's root, from mountinfo text: `/sys/fs/cgroup`
/// on unified systems, `/sys/fs/cgroup/unified` in hybrid mode. A mount of a sub-tree
/// (root field not "/", as inside a container with a cgroup namespace) is used only if there
/// is nothing better.
pub fn cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        // "36 35 0:31 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape(mount_point));
        if *root == "/" {
            return Some(mount_point);
        }
        fallback.get_or_insert(mount_point);
    }
    fallback
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_roots() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_root(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let nested = "35 24 0:30 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                      36 24 0:30 / /host\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root(nested), Some(PathBuf::from("/host cgroup")));
        assert_eq!(cgroup2_root("garbage\n\n - \n"), None);
    }

    #[test]
    fn this_machine_has_one() {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = cgroup2_root(&info).expect("no cgroup2 mount on this machine");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }
}
