//! HTTP/2 frames and flow changes seen on the wire by the kernel tracker.
//!
//! The kernel reports a frame's header and its first payload bytes; this module names the type,
//! flags, error codes and settings (RFC 9113) so the rest of the agent works with meanings, not
//! numbers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agent_common::h2::{
    CompactFrame, FRAME_BATCH, FRAME_BATCH_HEADER_BYTES, FlowChange, FlowKey, H2FlowEvent,
    H2FrameBatchHead, H2FrameEvent, Hook, LostReason, PAYLOAD_CAPTURE, Role, frame_type as ft,
};
use serde::Serialize;

use super::{DecodeError, read_record};

/// Connection endpoints of a flow: `src` sent the frame, `dst` receives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Flow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Flow {
    pub fn from_key(k: &FlowKey) -> Result<Flow, DecodeError> {
        let ip = |a: &[u8; 16]| -> Result<IpAddr, DecodeError> {
            match k.family {
                2 => Ok(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
                10 => Ok(IpAddr::V6(Ipv6Addr::from(*a))),
                _ => Err(DecodeError::H2("unknown address family")),
            }
        };
        Ok(Flow {
            src: SocketAddr::new(ip(&k.saddr)?, k.sport),
            dst: SocketAddr::new(ip(&k.daddr)?, k.dport),
        })
    }
}

/// Type-specific fields of a frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum FrameDetail {
    Data {
        end_stream: bool,
    },
    Headers {
        end_stream: bool,
        end_headers: bool,
    },
    RstStream {
        error_code: u32,
        error: &'static str,
    },
    Settings {
        ack: bool,
        settings: Vec<Setting>,
        /// More parameters than the kernel captures (8): the rest are not listed.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    GoAway {
        last_stream_id: u32,
        error_code: u32,
        error: &'static str,
    },
    Ping {
        ack: bool,
        opaque: u64,
    },
    WindowUpdate {
        increment: u32,
    },
    Priority {
        depends_on: u32,
        exclusive: bool,
        weight: u16,
    },
    PushPromise {
        promised_stream_id: u32,
    },
    Continuation {
        end_headers: bool,
    },
    /// A frame whose payload was not captured, or an unknown type.
    Other {},
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Setting {
    pub id: u16,
    pub name: &'static str,
    pub value: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct H2Frame {
    #[serde(skip)]
    pub ktime_ns: u64,
    #[serde(flatten)]
    pub flow: Flow,
    /// "egress" (sent by a local socket) or "ingress" (received).
    pub direction: &'static str,
    /// "cgroup" or "tc".
    pub hook: &'static str,
    /// Which end sent it: "client" (sent the preface), "server", or null when the connection
    /// was picked up mid-way and it is not known.
    pub sender: Option<&'static str>,
    #[serde(rename = "type")]
    pub frame_type: &'static str,
    pub type_id: u8,
    pub flags: u8,
    pub length: u32,
    pub stream_id: u32,
    #[serde(flatten)]
    pub detail: FrameDetail,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

/// A flow started, was picked up, or lost.
#[derive(Clone, Debug, Serialize)]
pub struct H2FlowChange {
    #[serde(skip)]
    pub ktime_ns: u64,
    #[serde(flatten)]
    pub flow: Flow,
    /// "preface", "synced" or "lost".
    pub change: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub direction: &'static str,
    pub hook: &'static str,
}

fn hook_names(hook: u32) -> (&'static str, &'static str) {
    match hook {
        h if h == Hook::CgroupEgress as u32 => ("egress", "cgroup"),
        h if h == Hook::CgroupIngress as u32 => ("ingress", "cgroup"),
        h if h == Hook::TcEgress as u32 => ("egress", "tc"),
        _ => ("ingress", "tc"),
    }
}

pub fn decode_frame(bytes: &[u8]) -> Result<H2Frame, DecodeError> {
    let ev: H2FrameEvent = read_record(bytes, "h2 frame")?;
    let (direction, hook) = hook_names(u32::from(ev.hook));
    let captured = usize::from(ev.captured).min(PAYLOAD_CAPTURE);
    let payload = &ev.payload[..captured];
    Ok(H2Frame {
        ktime_ns: ev.header.ktime_ns,
        flow: Flow::from_key(&ev.flow)?,
        direction,
        hook,
        sender: role_name(ev.role),
        frame_type: type_name(ev.frame_type),
        type_id: ev.frame_type,
        flags: ev.flags,
        length: ev.length,
        stream_id: ev.stream_id,
        detail: detail(ev.frame_type, ev.flags, ev.length, payload),
        cgroup_id: (ev.cgroup_id != 0).then_some(ev.cgroup_id),
    })
}

/// Hands each frame of a batch record (header-only frames of one flow, in wire order) to
/// `each`.
pub fn decode_batch(bytes: &[u8], mut each: impl FnMut(H2Frame)) -> Result<(), DecodeError> {
    let head: H2FrameBatchHead = read_record(bytes, "h2 frame batch")?;
    let count = usize::from(head.count);
    if count > FRAME_BATCH {
        return Err(DecodeError::H2("frame batch count over its capacity"));
    }
    let entry = std::mem::size_of::<CompactFrame>();
    let need = FRAME_BATCH_HEADER_BYTES + count * entry;
    let frames = bytes
        .get(FRAME_BATCH_HEADER_BYTES..need)
        .ok_or(DecodeError::Short {
            what: "h2 frame batch",
            len: bytes.len(),
            need,
        })?;
    let flow = Flow::from_key(&head.flow)?;
    let (direction, hook) = hook_names(u32::from(head.hook));
    let sender = role_name(head.role);
    let cgroup_id = (head.cgroup_id != 0).then_some(head.cgroup_id);
    for raw in frames.chunks_exact(entry) {
        let f: CompactFrame = read_record(raw, "h2 frame batch entry")?;
        each(H2Frame {
            ktime_ns: head.header.ktime_ns,
            flow,
            direction,
            hook,
            sender,
            frame_type: type_name(f.frame_type),
            type_id: f.frame_type,
            flags: f.flags,
            length: f.length,
            stream_id: f.stream_id,
            detail: detail(f.frame_type, f.flags, f.length, &[]),
            cgroup_id,
        });
    }
    Ok(())
}

pub fn decode_flow(bytes: &[u8]) -> Result<H2FlowChange, DecodeError> {
    let ev: H2FlowEvent = read_record(bytes, "h2 flow")?;
    let (direction, hook) = hook_names(ev.hook);
    let change = match ev.change {
        c if c == FlowChange::Preface as u32 => "preface",
        c if c == FlowChange::Synced as u32 => "synced",
        c if c == FlowChange::Lost as u32 => "lost",
        _ => return Err(DecodeError::H2("unknown flow change")),
    };
    Ok(H2FlowChange {
        ktime_ns: ev.header.ktime_ns,
        flow: Flow::from_key(&ev.flow)?,
        change,
        reason: LostReason::from_u32(ev.reason).map(|r| match r {
            LostReason::Gap => "gap: bytes before this segment were not seen",
            LostReason::Oversize => "frame longer than the receiver's SETTINGS_MAX_FRAME_SIZE",
            LostReason::Budget => "more frames in one segment than the per-segment budget",
            LostReason::Unreadable => "segment could not be read",
        }),
        direction,
        hook,
    })
}

/// A flow sender's [`Role`] as the events name it; None when unknown.
pub fn role_name(role: u8) -> Option<&'static str> {
    match role {
        r if r == Role::Client as u8 => Some("client"),
        r if r == Role::Server as u8 => Some("server"),
        _ => None,
    }
}

pub fn type_name(t: u8) -> &'static str {
    match t {
        ft::DATA => "DATA",
        ft::HEADERS => "HEADERS",
        ft::PRIORITY => "PRIORITY",
        ft::RST_STREAM => "RST_STREAM",
        ft::SETTINGS => "SETTINGS",
        ft::PUSH_PROMISE => "PUSH_PROMISE",
        ft::PING => "PING",
        ft::GOAWAY => "GOAWAY",
        ft::WINDOW_UPDATE => "WINDOW_UPDATE",
        ft::CONTINUATION => "CONTINUATION",
        _ => "UNKNOWN",
    }
}

/// RFC 9113 §7 error code names.
pub fn error_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN",
    }
}

fn setting_name(id: u16) -> &'static str {
    match id {
        0x1 => "HEADER_TABLE_SIZE",
        0x2 => "ENABLE_PUSH",
        0x3 => "MAX_CONCURRENT_STREAMS",
        0x4 => "INITIAL_WINDOW_SIZE",
        0x5 => "MAX_FRAME_SIZE",
        0x6 => "MAX_HEADER_LIST_SIZE",
        0x8 => "ENABLE_CONNECT_PROTOCOL",
        0x9 => "NO_RFC7540_PRIORITIES",
        _ => "UNKNOWN",
    }
}

fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn detail(t: u8, flags: u8, length: u32, p: &[u8]) -> FrameDetail {
    let other = FrameDetail::Other {};
    match t {
        ft::DATA => FrameDetail::Data {
            end_stream: flags & END_STREAM != 0,
        },
        ft::HEADERS => FrameDetail::Headers {
            end_stream: flags & END_STREAM != 0,
            end_headers: flags & END_HEADERS != 0,
        },
        ft::CONTINUATION => FrameDetail::Continuation {
            end_headers: flags & END_HEADERS != 0,
        },
        ft::RST_STREAM => be32(p).map_or(other, |code| FrameDetail::RstStream {
            error_code: code,
            error: error_name(code),
        }),
        ft::GOAWAY => match (be32(p), p.get(4..).and_then(be32)) {
            (Some(last), Some(code)) => FrameDetail::GoAway {
                last_stream_id: last & 0x7fff_ffff,
                error_code: code,
                error: error_name(code),
            },
            _ => other,
        },
        ft::SETTINGS => FrameDetail::Settings {
            ack: flags & ACK != 0,
            settings: p
                .chunks_exact(6)
                .map(|c| {
                    let id = u16::from_be_bytes([c[0], c[1]]);
                    Setting {
                        id,
                        name: setting_name(id),
                        value: u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    }
                })
                .collect(),
            truncated: length as usize > p.len(),
        },
        ft::PING => match p.get(..8) {
            Some(b) => FrameDetail::Ping {
                ack: flags & ACK != 0,
                opaque: u64::from_be_bytes(b.try_into().unwrap_or_default()),
            },
            None => other,
        },
        ft::WINDOW_UPDATE => be32(p).map_or(other, |inc| FrameDetail::WindowUpdate {
            increment: inc & 0x7fff_ffff,
        }),
        ft::PRIORITY => match (be32(p), p.get(4)) {
            (Some(dep), Some(&w)) => FrameDetail::Priority {
                depends_on: dep & 0x7fff_ffff,
                exclusive: dep & 0x8000_0000 != 0,
                weight: u16::from(w) + 1,
            },
            _ => other,
        },
        ft::PUSH_PROMISE => {
            // PADDED (0x8): a pad-length byte comes first.
            let from = usize::from(flags & 0x8 != 0);
            p.get(from..)
                .and_then(be32)
                .map_or(other, |id| FrameDetail::PushPromise {
                    promised_stream_id: id & 0x7fff_ffff,
                })
        }
        _ => other,
    }
}

#[cfg(test)]
mod tests;
