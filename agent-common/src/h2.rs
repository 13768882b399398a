//! HTTP/2 frame tracking: the per-flow state the kernel keeps, the events it writes, and the
//! load-time configuration.
//!
//! A *flow* is one direction of a TCP connection (sender to receiver), so its bytes form one
//! sequence space. The kernel follows frame boundaries in that space: `cursor` is the sequence
//! number of the next byte it needs. A segment that ends at or before the cursor was already
//! followed (the same bytes pass egress and then ingress on loopback, or were retransmitted) and
//! is skipped; one that starts after it left a gap, and the flow is *lost* until a segment that
//! starts with a plausible frame header re-synchronises it.

use crate::events::EventHeader;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const CLIENT_PREFACE: [u8; 24] = *b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
pub const FRAME_HEADER_LEN: u32 = 9;
/// `SETTINGS_MAX_FRAME_SIZE` until the receiver says otherwise (RFC 9113 §6.5.2).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
/// Payload bytes the kernel captures of a frame whose fields are reported (RST_STREAM,
/// GOAWAY, SETTINGS, PING, WINDOW_UPDATE, PRIORITY, PUSH_PROMISE): 8 SETTINGS parameters.
pub const PAYLOAD_CAPTURE: usize = 48;
/// Frame types 0..=9 are counted by type; every other type in the last slot.
pub const FRAME_TYPE_SLOTS: usize = 11;

pub mod frame_type {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const PRIORITY: u8 = 2;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PUSH_PROMISE: u8 = 5;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const WINDOW_UPDATE: u8 = 8;
    pub const CONTINUATION: u8 = 9;
}

/// Where the kernel program saw the packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    CgroupEgress = 0,
    CgroupIngress = 1,
    TcEgress = 2,
    TcIngress = 3,
}

/// Which end of the connection sent a flow's bytes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The flow was picked up mid-connection and its peer's role is not known either.
    Unknown = 0,
    /// Sent the connection preface.
    Client = 1,
    Server = 2,
}

/// One direction of a TCP connection: the packet's source and destination.
/// IPv4 addresses use the first 4 bytes of each array; the rest are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    pub _pad: u16,
}

impl FlowKey {
    /// The other direction of the same connection.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            family: self.family,
            _pad: 0,
        }
    }
}

/// Values of [`FlowState::phase`].
pub mod phase {
    /// Frame boundaries are known: `cursor` is where the next frame header (or the rest of a
    /// split one, held in `hdr`) starts.
    pub const HEADER: u8 = 0;
    /// Capturing the payload of the frame in `hdr`: `cursor` is the next payload byte wanted.
    pub const CAPTURE: u8 = 1;
    /// Boundaries unknown since `cursor`; waiting for a segment that starts with a plausible
    /// frame header at or after it.
    pub const LOST: u8 = 2;
    /// The first segments of a client preface split into pieces shorter than the whole:
    /// `hdr_len` bytes of it matched so far, `cursor` is where the rest must start. Any
    /// other byte, or a gap, drops the candidate flow (it is not HTTP/2).
    pub const PREFACE: u8 = 3;
}

/// Per-flow state in the `H2_FLOWS` LRU map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FlowState {
    /// Sequence number of the next byte the tracker needs.
    pub cursor: u32,
    /// Sequence number of the next frame header while capturing a payload.
    pub frame_end: u32,
    /// Largest frame this flow's sender may send (the receiver's SETTINGS_MAX_FRAME_SIZE).
    pub max_frame: u32,
    /// Sequence number of the first byte of the frame header held in `hdr`.
    pub frame_seq: u32,
    pub phase: u8,
    /// A [`Role`].
    pub role: u8,
    /// Bytes of `hdr` filled (a frame header split over segments has fewer than 9).
    pub hdr_len: u8,
    /// Payload bytes captured into `payload`.
    pub have: u8,
    /// Payload bytes still wanted.
    pub want: u8,
    pub _pad: [u8; 3],
    pub hdr: [u8; 12],
    pub payload: [u8; PAYLOAD_CAPTURE],
    /// Frames followed, by type (see [`FRAME_TYPE_SLOTS`]).
    pub frames: [u32; FRAME_TYPE_SLOTS],
    /// Times the flow was lost, and re-synchronised.
    pub lost: u32,
    pub resyncs: u32,
    /// Reason of the last loss (a [`LostReason`]); 0 never lost.
    pub last_lost: u32,
    pub _pad2: u32,
    /// cgroup v2 id of the local socket (cgroup hooks only; 0 otherwise).
    pub cgroup_id: u64,
}

/// Why a flow could not be followed. The values are the wire format.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// A segment started after the cursor: bytes in between were not seen (out of order,
    /// or missed).
    Gap = 1,
    /// A frame header declared a length over the receiver's SETTINGS_MAX_FRAME_SIZE.
    Oversize = 2,
    /// More frames in one segment than the per-segment budget.
    Budget = 3,
    /// The packet could not be read.
    Unreadable = 4,
}

impl LostReason {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Gap),
            2 => Some(Self::Oversize),
            3 => Some(Self::Budget),
            4 => Some(Self::Unreadable),
            _ => None,
        }
    }
}

/// One HTTP/2 frame, reported once.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct H2FrameEvent {
    pub header: EventHeader,
    pub flow: FlowKey,
    pub cgroup_id: u64,
    /// Sequence number of the frame header's first byte.
    pub frame_seq: u32,
    /// Declared payload length (24 bits).
    pub length: u32,
    /// Stream identifier, reserved bit cleared.
    pub stream_id: u32,
    pub frame_type: u8,
    pub flags: u8,
    /// A [`Hook`].
    pub hook: u8,
    /// The sender's [`Role`].
    pub role: u8,
    /// Bytes of `payload` that hold the frame's first payload bytes.
    pub captured: u8,
    pub _pad: [u8; 7],
    pub payload: [u8; PAYLOAD_CAPTURE],
}

/// Most header-only frames in one [`H2FrameBatchEvent`].
pub const FRAME_BATCH: usize = 32;

/// A frame that is reported by its header alone (nothing of its payload captured): HEADERS,
/// DATA, CONTINUATION, a SETTINGS ACK ...
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CompactFrame {
    /// Sequence number of the frame header's first byte.
    pub frame_seq: u32,
    /// Stream identifier, reserved bit cleared.
    pub stream_id: u32,
    /// Declared payload length (24 bits).
    pub length: u32,
    pub frame_type: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Header-only frames of one flow, in wire order, from one segment walk: one ring record for
/// up to [`FRAME_BATCH`] frames instead of one each (under load, reserving and reading a record
/// per HEADERS frame cost more than following the frames). Only the first `count` entries of
/// `frames` are written to the ring. Any other record of the same walk (a frame with a payload,
/// a lost flow) is preceded by the batch so far, so records stay in wire order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct H2FrameBatchEvent {
    pub head: H2FrameBatchHead,
    pub frames: [CompactFrame; FRAME_BATCH],
}

/// What the frames of an [`H2FrameBatchEvent`] share.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct H2FrameBatchHead {
    pub header: EventHeader,
    pub flow: FlowKey,
    pub cgroup_id: u64,
    /// A [`Hook`].
    pub hook: u8,
    /// The sender's [`Role`].
    pub role: u8,
    /// Entries of `frames` in use.
    pub count: u8,
    pub _pad: [u8; 5],
}

/// Bytes of an [`H2FrameBatchEvent`] before its `frames`.
pub const FRAME_BATCH_HEADER_BYTES: usize = core::mem::offset_of!(H2FrameBatchEvent, frames);

/// What happened to a flow, for the cases worth a line of their own.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowChange {
    /// A client preface started a flow.
    Preface = 1,
    /// A flow without state, or a lost one, was picked up at a plausible frame header.
    Synced = 2,
    /// The flow could not be followed any more (see `reason`).
    Lost = 3,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct H2FlowEvent {
    pub header: EventHeader,
    pub flow: FlowKey,
    /// A [`FlowChange`].
    pub change: u32,
    /// A [`LostReason`] for `Lost`, else 0.
    pub reason: u32,
    /// Sequence number where it happened.
    pub seq: u32,
    /// A [`Hook`].
    pub hook: u32,
}

/// Load-time switches of the HTTP/2 tracker.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct H2Config {
    /// Non-zero: emit every frame, not only HEADERS, RST_STREAM, SETTINGS and GOAWAY.
    pub all_frames: u32,
    /// Most frames followed in one segment; a GSO super-packet of zero-length frames holds
    /// at most 64 KiB / 9 = 7282.
    pub max_frames_per_segment: u32,
}

impl H2Config {
    pub const DEFAULT: H2Config = H2Config {
        all_frames: 0,
        max_frames_per_segment: 8192,
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, integers and byte arrays only; every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::H2Config {}
}
