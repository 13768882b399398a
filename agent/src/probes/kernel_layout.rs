//! Offsets inside kernel structs, resolved from the running kernel's BTF, and inside
//! tracepoint records, from tracefs. The kernel programs cannot relocate field accesses
//! themselves (aya has no CO-RE for Rust programs), so the agent does it before loading.

use std::path::Path;

use agent_common::layout::{KernelLayout, UNKNOWN_OFFSET};
use btf_rs::{Btf, Type};
use tracing::warn;

use crate::signals::tracepoint::TracepointFormat;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read kernel BTF from {path}")]
    Btf {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("struct {name} not found in kernel BTF")]
    NoStruct { name: String },
    #[error("member {member} not found in struct {name}")]
    NoMember { name: String, member: String },
    #[error("{what}: {source}")]
    Resolve {
        what: String,
        #[source]
        source: btf_rs::Error,
    },
}

/// Resolves every offset the programs use. What cannot be resolved stays unknown (the program
/// then skips that read) and is logged once: a missing detail must not cost the whole probe.
pub fn resolve(
    tracefs: &Path,
    send_reset: Option<&TracepointFormat>,
    recv_reset: Option<&TracepointFormat>,
) -> KernelLayout {
    let mut layout = KernelLayout::UNKNOWN;
    if let Some(f) = send_reset {
        layout.send_reset_skaddr = field_offset(f, "skaddr");
        layout.send_reset_skbaddr = field_offset(f, "skbaddr");
        layout.send_reset_len = f.record_len() as u32;
    }
    if let Some(f) = recv_reset {
        layout.recv_reset_skaddr = field_offset(f, "skaddr");
        layout.recv_reset_len = f.record_len() as u32;
    }
    match TracepointFormat::read(tracefs, "sched", "sched_process_exit") {
        Ok(f) => layout.exit_group_dead = field_offset(&f, "group_dead"),
        Err(e) => warn!(error = %e, "sched_process_exit format unreadable"),
    }

    let btf = match Btf::from_file(VMLINUX_BTF) {
        Ok(btf) => btf,
        Err(source) => {
            let e = LayoutError::Btf {
                path: VMLINUX_BTF.to_owned(),
                source,
            };
            warn!(error = %e, "kernel BTF unavailable: resets will lack netns, state and cgroup");
            return layout;
        }
    };
    let set = |slot: &mut u32, strukt: &str, path: &[&str]| match member_offset(&btf, strukt, path)
    {
        Ok(off) => *slot = off,
        Err(e) => warn!(error = %e, member = %path.join("."), "kernel struct member not resolved"),
    };
    set(
        &mut layout.sock_net,
        "sock",
        &["__sk_common", "skc_net", "net"],
    );
    set(
        &mut layout.sock_state,
        "sock",
        &["__sk_common", "skc_state"],
    );
    set(&mut layout.sock_cgroup, "sock", &["sk_cgrp_data", "cgroup"]);
    set(&mut layout.net_inum, "net", &["ns", "inum"]);
    set(&mut layout.cgroup_kn, "cgroup", &["kn"]);
    set(&mut layout.kernfs_node_id, "kernfs_node", &["id"]);
    set(&mut layout.skb_dev, "sk_buff", &["dev"]);
    set(&mut layout.net_device_net, "net_device", &["nd_net", "net"]);
    layout
}

fn field_offset(format: &TracepointFormat, name: &str) -> u32 {
    format
        .field(name)
        .map_or(UNKNOWN_OFFSET, |f| f.offset as u32)
}

/// Byte offset of `path` (e.g. `["__sk_common", "skc_net", "net"]`) inside `struct strukt`,
/// looking through anonymous structs and unions as C does.
pub fn member_offset(btf: &Btf, strukt: &str, path: &[&str]) -> Result<u32, LayoutError> {
    let mut current = btf
        .resolve_types_by_name(strukt)
        .map_err(|source| LayoutError::Resolve {
            what: format!("struct {strukt}"),
            source,
        })?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .ok_or_else(|| LayoutError::NoStruct {
            name: strukt.to_owned(),
        })?;
    let mut offset_bits = 0u32;
    let mut owner = strukt.to_owned();
    for member in path {
        let (bits, ty) =
            find_member(btf, &current, member)?.ok_or_else(|| LayoutError::NoMember {
                name: owner.clone(),
                member: (*member).to_owned(),
            })?;
        offset_bits += bits;
        current = ty;
        owner = (*member).to_owned();
    }
    Ok(offset_bits / 8)
}

/// Finds `name` among the members of a struct/union type, descending into anonymous members.
/// Returns the bit offset and the member's type with typedefs and qualifiers peeled off.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Result<Option<(u32, Type)>, LayoutError> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return Ok(None),
    };
    let err = |source| LayoutError::Resolve {
        what: format!("member {name}"),
        source,
    };
    for m in members {
        let member_name = btf.resolve_name(m).unwrap_or_default();
        let member_ty = peel(btf, btf.resolve_chained_type(m).map_err(err)?)?;
        if member_name == name {
            return Ok(Some((m.bit_offset(), member_ty)));
        }
        if member_name.is_empty()
            && let Some((bits, found)) = find_member(btf, &member_ty, name)?
        {
            return Ok(Some((m.bit_offset() + bits, found)));
        }
    }
    Ok(None)
}

/// Strips typedef, const, volatile and restrict down to the underlying type.
fn peel(btf: &Btf, mut ty: Type) -> Result<Type, LayoutError> {
    // Bounded: qualifier chains in kernel BTF are a handful deep.
    for _ in 0..16 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => btf.resolve_chained_type(t),
            Type::TypeTag(t) => btf.resolve_chained_type(t),
            _ => return Ok(ty),
        }
        .map_err(|source| LayoutError::Resolve {
            what: "typedef chain".to_owned(),
            source,
        })?;
    }
    Ok(ty)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Checked against this kernel's BTF: `bpftool btf dump file /sys/kernel/btf/vmlinux` shows
    /// `struct sock_common` first in `struct sock`, and `skc_state` is a plain byte inside it.
    /// Skips (and says so) where the host has no BTF.
    #[test]
    fn resolves_sock_members_on_this_kernel() {
        let Ok(btf) = Btf::from_file(VMLINUX_BTF) else {
            eprintln!("skipped: no {VMLINUX_BTF} on this host");
            return;
        };
        // __sk_common is the first member of struct sock, so sock offsets equal sock_common's.
        let via_sock = member_offset(&btf, "sock", &["__sk_common", "skc_state"]).unwrap();
        let direct = member_offset(&btf, "sock_common", &["skc_state"]).unwrap();
        assert_eq!(via_sock, direct);
        let net = member_offset(&btf, "sock", &["__sk_common", "skc_net", "net"]).unwrap();
        assert!(net > 0 && net < 256, "skc_net at {net}");
        assert!(matches!(
            member_offset(&btf, "sock", &["no_such_member"]),
            Err(LayoutError::NoMember { .. })
        ));
    }
}
