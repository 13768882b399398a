//! HTTP/2 frame tracking on the wire: cgroup_skb on a cgroup (v2 root by default: every local
//! socket, whatever the CNI), or TC on named interfaces.
//!
//! Each direction of a TCP connection is a flow with its own sequence space (see
//! `agent_common::h2`). The program follows frame boundaries through it segment by segment:
//! a frame split over many segments, many frames in one segment, a GSO super-packet, all walk
//! the same cursor. Bytes it has followed once are never parsed again, which is what makes a
//! frame count once on loopback, where the same segment passes egress and then ingress.
//!
//! Nothing is guessed: a gap, an oversized frame or an exhausted budget marks the flow lost
//! (counted, with an event), and it is picked up again only at a segment that starts with a
//! plausible frame header.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "H2_FLOWS' keys and values go to the map helpers by reference: aya-ebpf takes \
              `impl Borrow<K>`, and one passed by value is first copied onto the 512-byte BPF \
              stack (a FlowState lives in H2_SCRATCH because it does not fit there)"
)]

use agent_common::{
    counters::Counter,
    events::EventKind,
    h2::{
        CLIENT_PREFACE, CompactFrame, DEFAULT_MAX_FRAME_SIZE, FRAME_BATCH,
        FRAME_BATCH_HEADER_BYTES, FRAME_HEADER_LEN, FRAME_TYPE_SLOTS, FlowChange, FlowKey,
        FlowState, H2Config, H2FlowEvent, H2FrameBatchEvent, H2FrameEvent, Hook, LostReason,
        PAYLOAD_CAPTURE, Role, frame_type as ft, phase,
    },
};
use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_UNSPEC},
    helpers::generated::{bpf_loop, bpf_skb_cgroup_id, bpf_skb_load_bytes},
    macros::{cgroup_skb, classifier, map},
    maps::{LruHashMap, PerCpuArray},
    programs::{SkBuffContext, TcContext},
};
use core::ffi::c_void;

use crate::maps::{EVENTS, bump, bump_by, header, wakeup_flags};

/// Flow state, one entry per direction of each HTTP/2 connection (and per candidate flow
/// that started with a plausible frame header). LRU: connections that end without a FIN we
/// saw age out by themselves.
#[map]
static H2_FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(65536, 0);

/// Room to build a new flow's state: it is too big for the 512-byte BPF stack next to the rest.
#[map]
static H2_SCRATCH: PerCpuArray<FlowState> = PerCpuArray::with_max_entries(1, 0);

/// The header-only frames of the walk under way (see `H2FrameBatchEvent`), one buffer per
/// nesting level: an interrupt's softirq may walk a segment on this CPU while a walk in process
/// context (egress) is under way. Deeper nesting reports frames one record each.
#[map]
static H2_BATCH: PerCpuArray<H2FrameBatchEvent> = PerCpuArray::with_max_entries(BATCH_LEVELS, 0);

/// Walks under way on this CPU (the `H2_BATCH` level the next walk takes).
#[map]
static H2_NESTING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

const BATCH_LEVELS: u32 = 2;

/// Set by the agent before loading (see `H2Config`).
#[unsafe(no_mangle)]
static H2_CONFIG: H2Config = H2Config::DEFAULT;

#[inline(always)]
fn config() -> H2Config {
    // SAFETY: a plain static; volatile so the placeholder is not constant-folded.
    unsafe { core::ptr::read_volatile(&raw const H2_CONFIG) }
}

const ETH_HLEN: u32 = 14;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;

#[cgroup_skb(egress)]
pub fn h2_cgroup_egress(ctx: SkBuffContext) -> i32 {
    track(ctx.skb.skb, 0, Hook::CgroupEgress);
    1
}

#[cgroup_skb(ingress)]
pub fn h2_cgroup_ingress(ctx: SkBuffContext) -> i32 {
    track(ctx.skb.skb, 0, Hook::CgroupIngress);
    1
}

#[classifier]
pub fn h2_tc_egress(ctx: TcContext) -> i32 {
    track(ctx.skb.skb, ETH_HLEN, Hook::TcEgress);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn h2_tc_ingress(ctx: TcContext) -> i32 {
    track(ctx.skb.skb, ETH_HLEN, Hook::TcIngress);
    TC_ACT_UNSPEC
}

/// A TCP segment's flow, sequence number and payload position in the skb.
struct Segment {
    key: FlowKey,
    seq: u32,
    /// Offset of the TCP payload from the start of the skb data.
    payload_off: u32,
    payload_len: u32,
    syn: bool,
}

#[inline(always)]
fn load<T: Copy>(skb: *mut __sk_buff, offset: u32) -> Option<T> {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes exactly size_of::<T>() bytes or fails.
    let rc = unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            offset,
            v.as_mut_ptr() as *mut c_void,
            core::mem::size_of::<T>() as u32,
        )
    };
    // SAFETY: rc == 0 means every byte was written.
    (rc == 0).then(|| unsafe { v.assume_init() })
}

#[inline(always)]
fn skb_len(skb: *mut __sk_buff) -> u32 {
    // SAFETY: skb is the program's context.
    unsafe { (*skb).len }
}

/// Parses IPv4/IPv6 and TCP headers starting at `l3` (0 for cgroup_skb, 14 for TC) into
/// `out`. Not inlined: its header buffers live in its own stack frame, not the caller's.
#[inline(never)]
fn parse_segment(skb: *mut __sk_buff, l3: u32, out: &mut Segment) -> bool {
    match parse_segment_inner(skb, l3) {
        Some(seg) => {
            *out = seg;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn parse_segment_inner(skb: *mut __sk_buff, l3: u32) -> Option<Segment> {
    let mut key = FlowKey::default();
    let skb_len = skb_len(skb);
    let (l4, ip_end) = if l3 == ETH_HLEN {
        let proto: [u8; 2] = load(skb, 12)?;
        match u16::from_be_bytes(proto) {
            0x0800 => ipv4(skb, l3, &mut key)?,
            0x86dd => ipv6(skb, l3, &mut key)?,
            _ => return None,
        }
    } else {
        let version: u8 = load(skb, l3)?;
        match version >> 4 {
            4 => ipv4(skb, l3, &mut key)?,
            6 => ipv6(skb, l3, &mut key)?,
            _ => return None,
        }
    };
    let tcp: [u8; 20] = load(skb, l4)?;
    key.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    key.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let doff = u32::from(tcp[12] >> 4) * 4;
    if doff < 20 {
        return None;
    }
    let payload_off = l4 + doff;
    // The IP length bounds the payload (a NIC may pad short frames); 0 means "see skb->len"
    // (GSO super-packets and IPv6 jumbograms).
    let end = if ip_end > payload_off && ip_end < skb_len {
        ip_end
    } else {
        skb_len
    };
    Some(Segment {
        key,
        seq,
        payload_off,
        payload_len: end.saturating_sub(payload_off),
        syn: tcp[13] & TCP_SYN != 0,
    })
}

/// Returns (TCP header offset, end of the IP packet or 0).
#[inline(always)]
fn ipv4(skb: *mut __sk_buff, l3: u32, key: &mut FlowKey) -> Option<(u32, u32)> {
    let ip: [u8; 20] = load(skb, l3)?;
    if ip[9] != IPPROTO_TCP {
        return None;
    }
    // Not the first fragment: no TCP header here.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return None;
    }
    let ihl = u32::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    key.family = AF_INET;
    key.saddr[..4].copy_from_slice(&ip[12..16]);
    key.daddr[..4].copy_from_slice(&ip[16..20]);
    let tot_len = u32::from(u16::from_be_bytes([ip[2], ip[3]]));
    Some((l3 + ihl, if tot_len == 0 { 0 } else { l3 + tot_len }))
}

#[inline(always)]
fn ipv6(skb: *mut __sk_buff, l3: u32, key: &mut FlowKey) -> Option<(u32, u32)> {
    let ip: [u8; 40] = load(skb, l3)?;
    // Extension headers are not walked: such segments are not followed.
    if ip[6] != IPPROTO_TCP {
        return None;
    }
    key.family = AF_INET6;
    key.saddr.copy_from_slice(&ip[8..24]);
    key.daddr.copy_from_slice(&ip[24..40]);
    let payload_len = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
    Some((
        l3 + 40,
        if payload_len == 0 {
            0
        } else {
            l3 + 40 + payload_len
        },
    ))
}

/// A new connection on this 4-tuple: whatever we knew of an old one is void.
#[inline(never)]
fn forget(key: &FlowKey) {
    let _ = H2_FLOWS.remove(key);
    let _ = H2_FLOWS.remove(&key.reversed());
}

#[inline(always)]
fn track(skb: *mut __sk_buff, l3: u32, hook: Hook) {
    let mut seg = Segment {
        key: FlowKey::default(),
        seq: 0,
        payload_off: 0,
        payload_len: 0,
        syn: false,
    };
    if !parse_segment(skb, l3, &mut seg) {
        return;
    }
    if seg.syn {
        forget(&seg.key);
    }
    if seg.payload_len == 0 {
        return;
    }
    let (state, started) = match H2_FLOWS.get_ptr_mut(&seg.key) {
        Some(state) => (state, false),
        None => match start_flow(skb, &seg, hook) {
            Some(state) => (state, true),
            None => return,
        },
    };
    bump(Counter::H2Segments);
    // SAFETY: a valid pointer to this flow's map value; only this CPU's program touches it
    // for this packet (a flow's segments are serialised by its socket).
    let st = unsafe { &mut *state };
    let seg_end = seg.seq.wrapping_add(seg.payload_len);
    if started && st.cursor == seg_end {
        // A segment of nothing but (a piece of) the preface.
        return;
    }
    if (seg_end.wrapping_sub(st.cursor) as i32) <= 0 {
        // Followed already: the ingress copy of a loopback segment, or a retransmission.
        bump(Counter::H2SegmentsSeen);
        return;
    }
    if st.phase == phase::PREFACE && !continue_preface(skb, st, &seg, hook) {
        return;
    }
    let ahead = seg.seq.wrapping_sub(st.cursor) as i32;
    if st.phase == phase::LOST || ahead > 0 {
        if st.phase != phase::LOST {
            lose(st, &seg.key, LostReason::Gap, st.cursor, hook);
        }
        // Only a segment that starts at or after what was already looked at may re-sync:
        // the ingress copy of a segment that lost the flow must not be parsed again.
        if ahead >= 0 && plausible_header(skb, seg.payload_off, DEFAULT_MAX_FRAME_SIZE) {
            st.phase = phase::HEADER;
            st.cursor = seg.seq;
            st.hdr_len = 0;
            st.want = 0;
            st.resyncs = st.resyncs.wrapping_add(1);
            bump(Counter::H2Syncs);
            flow_event(&seg.key, FlowChange::Synced, 0, seg.seq, hook);
        } else {
            st.cursor = seg_end;
            bump(Counter::H2SegmentsNotFollowed);
            return;
        }
    }
    walk(skb, state, &seg, hook);
}

/// A flow we have no state for: start one at a client preface or at a plausible frame header.
#[inline(never)]
fn start_flow(skb: *mut __sk_buff, seg: &Segment, hook: Hook) -> Option<*mut FlowState> {
    let start = preface_start(skb, seg);
    let (cursor, role, phase, matched) = if start == CLIENT_PREFACE.len() as u32 {
        (seg.seq.wrapping_add(start), Role::Client, phase::HEADER, 0)
    } else if start > 0 {
        // A preface in pieces: a candidate until the rest of it arrives.
        (
            seg.seq.wrapping_add(start),
            Role::Unknown,
            phase::PREFACE,
            start as u8,
        )
    } else if plausible_header(skb, seg.payload_off, DEFAULT_MAX_FRAME_SIZE) {
        (seg.seq, Role::Unknown, phase::HEADER, 0)
    } else {
        return None;
    };
    let role = if role == Role::Client {
        claim_client(&seg.key)
    } else if phase == phase::PREFACE {
        Role::Unknown
    } else {
        match H2_FLOWS.get_ptr_mut(&seg.key.reversed()) {
            // SAFETY: valid map value pointer.
            Some(peer) if unsafe { (*peer).role } == Role::Client as u8 => Role::Server,
            _ => Role::Unknown,
        }
    };
    let state = H2_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot; every field is written before the insert reads it.
    unsafe {
        (*state).cursor = cursor;
        (*state).frame_end = cursor;
        (*state).max_frame = DEFAULT_MAX_FRAME_SIZE;
        (*state).frame_seq = cursor;
        (*state).phase = phase;
        (*state).role = role as u8;
        (*state).hdr_len = matched;
        (*state).have = 0;
        (*state).want = 0;
        (*state)._pad = [0; 3];
        (*state).hdr = [0; 12];
        (*state).payload = [0; PAYLOAD_CAPTURE];
        (*state).frames = [0; FRAME_TYPE_SLOTS];
        (*state).lost = 0;
        (*state).resyncs = 0;
        (*state).last_lost = 0;
        (*state)._pad2 = 0;
        (*state).cgroup_id = match hook {
            Hook::CgroupEgress | Hook::CgroupIngress => bpf_skb_cgroup_id(skb),
            _ => 0,
        };
    }
    // SAFETY: filled above.
    if H2_FLOWS.insert(&seg.key, unsafe { &*state }, 0).is_err() {
        bump(Counter::H2FlowsFull);
        return None;
    }
    if role == Role::Client {
        bump(Counter::H2Prefaces);
        flow_event(&seg.key, FlowChange::Preface, 0, seg.seq, hook);
    } else if phase == phase::PREFACE {
        // Reported once the whole preface is in (`continue_preface`).
    } else {
        bump(Counter::H2Syncs);
        flow_event(&seg.key, FlowChange::Synced, 0, seg.seq, hook);
    }
    H2_FLOWS.get_ptr_mut(&seg.key)
}

/// This flow's sender is the client (it sent the preface), so the other direction's is the
/// server.
#[inline(never)]
fn claim_client(key: &FlowKey) -> Role {
    if let Some(peer) = H2_FLOWS.get_ptr_mut(&key.reversed()) {
        // SAFETY: valid map value pointer.
        unsafe { (*peer).role = Role::Server as u8 };
    }
    Role::Client
}

/// How many bytes of a client preface the segment starts with: 24 for the whole of it, the
/// segment's length for a segment shorter than the preface that is all preface (the first
/// piece of one sent in pieces), else 0.
#[inline(never)]
fn preface_start(skb: *mut __sk_buff, seg: &Segment) -> u32 {
    let n = seg.payload_len.min(CLIENT_PREFACE.len() as u32);
    let Some(scratch) = H2_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot; `start_flow` fills it only after this returns.
    let buf = unsafe { &mut (*scratch).payload };
    if matches_preface(skb, seg.payload_off, 0, n, buf) {
        n
    } else {
        0
    }
}

/// Whether the `n` (1..=24) packet bytes at `at` are the preface's bytes from `from` on.
/// `buf` is map memory to read them into (a variable offset into the stack is not allowed).
#[inline(always)]
fn matches_preface(
    skb: *mut __sk_buff,
    at: u32,
    from: u32,
    n: u32,
    buf: &mut [u8; PAYLOAD_CAPTURE],
) -> bool {
    // The bytes land where they sit in the preface, so both sides are indexed by constants
    // (a variable index into the preface is one the verifier cannot bound).
    if n == 0 || from + n > CLIENT_PREFACE.len() as u32 || !load_into(skb, at, buf, from, n) {
        return false;
    }
    let end = from + n;
    for (i, (a, b)) in buf.iter().zip(CLIENT_PREFACE.iter()).enumerate() {
        let i = i as u32;
        if i >= from && i < end && a != b {
            return false;
        }
    }
    true
}

/// The next piece of a preface sent in pieces (phase PREFACE). True when the preface is
/// complete and the segment holds more (frames follow: walk them); false when the segment is
/// used up, or the candidate was dropped (a gap, or bytes that are not the preface's).
#[inline(never)]
fn continue_preface(skb: *mut __sk_buff, st: &mut FlowState, seg: &Segment, hook: Hook) -> bool {
    let matched = u32::from(st.hdr_len).min(CLIENT_PREFACE.len() as u32);
    let left = CLIENT_PREFACE.len() as u32 - matched;
    let n = seg.payload_len.min(left);
    if seg.seq != st.cursor || !matches_preface(skb, seg.payload_off, matched, n, &mut st.payload) {
        let _ = H2_FLOWS.remove(&seg.key);
        return false;
    }
    st.cursor = st.cursor.wrapping_add(n);
    st.frame_end = st.cursor;
    st.frame_seq = st.cursor;
    st.hdr_len = (matched + n) as u8;
    if matched + n < CLIENT_PREFACE.len() as u32 {
        return false;
    }
    st.hdr_len = 0;
    st.phase = phase::HEADER;
    st.role = claim_client(&seg.key) as u8;
    bump(Counter::H2Prefaces);
    let first = seg.seq.wrapping_sub(matched);
    flow_event(&seg.key, FlowChange::Preface, 0, first, hook);
    n < seg.payload_len
}

/// Whether 9 bytes at `off` are a frame header a conforming peer could send: a known type,
/// a length within `max_frame` and what the type requires, defined flags only, and the
/// stream (zero or not) the type requires. Strict on purpose: it decides where frames start.
#[inline(never)]
fn plausible_header(skb: *mut __sk_buff, off: u32, max_frame: u32) -> bool {
    let Some(h) = load::<[u8; 9]>(skb, off) else {
        return false;
    };
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
    let flags = h[4];
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    if len > max_frame {
        return false;
    }
    match h[3] {
        ft::DATA => stream != 0 && flags & !0x09 == 0,
        ft::HEADERS => stream != 0 && flags & !0x2d == 0,
        ft::PRIORITY => stream != 0 && flags == 0 && len == 5,
        ft::RST_STREAM => stream != 0 && flags == 0 && len == 4,
        ft::SETTINGS => {
            stream == 0 && (flags == 0 && len.is_multiple_of(6) || flags == 1 && len == 0)
        }
        ft::PUSH_PROMISE => stream != 0 && flags & !0x0c == 0 && len >= 4,
        ft::PING => stream == 0 && flags & !0x01 == 0 && len == 8,
        ft::GOAWAY => stream == 0 && flags == 0 && len >= 8,
        ft::WINDOW_UPDATE => flags == 0 && len == 4,
        ft::CONTINUATION => stream != 0 && flags & !0x04 == 0,
        _ => false,
    }
}

/// Payload bytes worth capturing for a reported frame of this type.
#[inline(always)]
fn wanted_payload(frame_type: u8, len: u32) -> u8 {
    let want: u32 = match frame_type {
        ft::RST_STREAM | ft::WINDOW_UPDATE => 4,
        // PUSH_PROMISE may start with a pad-length byte.
        ft::PRIORITY | ft::PUSH_PROMISE => 5,
        ft::PING | ft::GOAWAY => 8,
        ft::SETTINGS => PAYLOAD_CAPTURE as u32,
        _ => 0,
    };
    want.min(len) as u8
}

#[inline(always)]
fn reported(frame_type: u8, all_frames: bool) -> bool {
    all_frames
        || matches!(
            frame_type,
            ft::HEADERS | ft::RST_STREAM | ft::SETTINGS | ft::GOAWAY
        )
}

#[inline(never)]
fn lose(st: &mut FlowState, key: &FlowKey, reason: LostReason, seq: u32, hook: Hook) {
    st.phase = phase::LOST;
    st.lost = st.lost.wrapping_add(1);
    st.last_lost = reason as u32;
    bump(match reason {
        LostReason::Gap => Counter::H2LostGap,
        LostReason::Oversize => Counter::H2LostOversize,
        LostReason::Budget => Counter::H2LostBudget,
        LostReason::Unreadable => Counter::H2LostUnreadable,
    });
    flow_event(key, FlowChange::Lost, reason as u32, seq, hook);
}

#[inline(never)]
fn flow_event(key: &FlowKey, change: FlowChange, reason: u32, seq: u32, hook: Hook) {
    let flags = wakeup_flags(core::mem::size_of::<H2FlowEvent>() as u64);
    let Some(mut entry) = EVENTS.reserve::<H2FlowEvent>(0) else {
        bump(Counter::H2FlowEventsDropped);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is a reservation of exactly one H2FlowEvent, filled completely here.
    unsafe {
        (*ev).header = header(EventKind::H2Flow as u32);
        (*ev).flow = *key;
        (*ev).change = change as u32;
        (*ev).reason = reason;
        (*ev).seq = seq;
        (*ev).hook = hook as u32;
    }
    entry.submit(flags);
}

/// What the frame walk needs; lives on the caller's stack, passed to each `bpf_loop` step.
#[repr(C)]
struct Walk {
    skb: *mut __sk_buff,
    state: *mut FlowState,
    key: *const FlowKey,
    seq: u32,
    payload_off: u32,
    len: u32,
    /// Offset into the payload of the next byte to look at.
    off: u32,
    /// This walk's `H2_BATCH` buffer; used only when `batching` is set.
    batch: *mut H2FrameBatchEvent,
    hook: Hook,
    all_frames: u8,
    /// Set when the walk ended the segment (consumed or lost).
    done: u8,
    batching: u8,
}

#[inline(always)]
fn walk(skb: *mut __sk_buff, state: *mut FlowState, seg: &Segment, hook: Hook) {
    let Some(nesting) = H2_NESTING.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; a nested walk restores it before we run again.
    let level = unsafe { *nesting };
    let Some(batch) = H2_BATCH.get_ptr_mut(level.min(BATCH_LEVELS - 1)) else {
        return;
    };
    // SAFETY: as above.
    unsafe { *nesting = level.wrapping_add(1) };
    walk_frames(skb, state, seg, hook, batch, level < BATCH_LEVELS);
    // SAFETY: as above.
    unsafe { *nesting = level };
}

#[inline(always)]
fn walk_frames(
    skb: *mut __sk_buff,
    state: *mut FlowState,
    seg: &Segment,
    hook: Hook,
    batch: *mut H2FrameBatchEvent,
    batching: bool,
) {
    let cfg = config();
    // SAFETY: valid map value pointer.
    let cursor = unsafe { (*state).cursor };
    if batching {
        // SAFETY: this walk's batch buffer (see `H2_BATCH`); valid map value pointer.
        unsafe {
            (*batch).head.flow = seg.key;
            (*batch).head.cgroup_id = (*state).cgroup_id;
            (*batch).head.hook = hook as u8;
            (*batch).head.role = (*state).role;
            (*batch).head.count = 0;
            (*batch).head._pad = [0; 5];
        }
    }
    let mut w = Walk {
        skb,
        state,
        key: &seg.key,
        seq: seg.seq,
        payload_off: seg.payload_off,
        len: seg.payload_len,
        off: cursor.wrapping_sub(seg.seq),
        batch,
        hook,
        all_frames: u8::from(cfg.all_frames != 0),
        done: 0,
        batching: u8::from(batching),
    };
    let budget = cfg.max_frames_per_segment.clamp(1, 1 << 16);
    // SAFETY: `step` has the callback signature bpf_loop expects; `w` outlives the call.
    unsafe {
        bpf_loop(
            budget,
            step as *mut c_void,
            (&raw mut w).cast::<c_void>(),
            0,
        )
    };
    flush(&w);
    if w.done == 0 && w.off < w.len {
        // SAFETY: valid map value pointer.
        let st = unsafe { &mut *state };
        lose(st, &seg.key, LostReason::Budget, st.cursor, hook);
        st.cursor = seg.seq.wrapping_add(seg.payload_len);
    }
}

/// One step of the frame walk: a frame header, or the captured start of a payload.
/// Returns 1 to stop (segment consumed or flow lost), 0 to go on.
#[inline(never)]
extern "C" fn step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `walk` gave it.
    let w = unsafe { &mut *(ctx as *mut Walk) };
    if w.off >= w.len {
        w.done = 1;
        return 1;
    }
    // SAFETY: a valid map value pointer (the element stays allocated while we run).
    let st = unsafe { &mut *w.state };
    let avail = w.len - w.off;
    let at = w.payload_off + w.off;
    if st.phase == phase::CAPTURE {
        let have = u32::from(st.have).min(PAYLOAD_CAPTURE as u32);
        let n = u32::from(st.want)
            .min(avail)
            .min(PAYLOAD_CAPTURE as u32 - have);
        if n > 0 && !load_into(w.skb, at, &mut st.payload, have, n) {
            return unreadable(w, st);
        }
        st.have = (have + n) as u8;
        st.want = st.want.saturating_sub(n as u8);
        st.cursor = st.cursor.wrapping_add(n);
        w.off += n;
        if st.want == 0 || n == 0 {
            emit(w, st);
            st.phase = phase::HEADER;
            st.cursor = st.frame_end;
            w.off = st.frame_end.wrapping_sub(w.seq);
        }
        return 0;
    }
    // phase::HEADER
    let hdr_len = u32::from(st.hdr_len).min(FRAME_HEADER_LEN - 1);
    if hdr_len == 0 {
        st.frame_seq = w.seq.wrapping_add(w.off);
    }
    let n = (FRAME_HEADER_LEN - hdr_len).min(avail);
    if !load_into(w.skb, at, &mut st.hdr, hdr_len, n) {
        return unreadable(w, st);
    }
    st.cursor = st.cursor.wrapping_add(n);
    w.off += n;
    if hdr_len + n < FRAME_HEADER_LEN {
        // The header continues in the next segment.
        st.hdr_len = (hdr_len + n) as u8;
        w.done = 1;
        return 1;
    }
    st.hdr_len = 0;
    let h = st.hdr;
    let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
    let frame_type = h[3];
    if len > st.max_frame {
        flush(w);
        // SAFETY: `key` points to the caller's segment, alive for the whole walk.
        lose(
            st,
            unsafe { &*w.key },
            LostReason::Oversize,
            st.frame_seq,
            w.hook,
        );
        st.cursor = w.seq.wrapping_add(w.len);
        w.done = 1;
        return 1;
    }
    let slot = (frame_type as usize).min(FRAME_TYPE_SLOTS - 1);
    if let Some(count) = st.frames.get_mut(slot) {
        *count = count.wrapping_add(1);
    }
    bump(Counter::H2Frames);
    st.frame_end = st.frame_seq.wrapping_add(FRAME_HEADER_LEN + len);
    st.have = 0;
    st.want = 0;
    if reported(frame_type, w.all_frames != 0) {
        let want = wanted_payload(frame_type, len);
        if want > 0 {
            st.phase = phase::CAPTURE;
            st.want = want;
            return 0;
        }
        emit(w, st);
    }
    st.cursor = st.frame_end;
    w.off = st.frame_end.wrapping_sub(w.seq);
    0
}

fn unreadable(w: &mut Walk, st: &mut FlowState) -> i64 {
    flush(w);
    // SAFETY: as in `step`.
    lose(
        st,
        unsafe { &*w.key },
        LostReason::Unreadable,
        st.cursor,
        w.hook,
    );
    st.cursor = w.seq.wrapping_add(w.len);
    w.done = 1;
    1
}

/// Copies `n` packet bytes at `at` into `dst[from..from + n]`; `from + n` never exceeds the
/// array (both are clamped), and `n` is at least 1.
#[inline(always)]
fn load_into<const N: usize>(
    skb: *mut __sk_buff,
    at: u32,
    dst: &mut [u8; N],
    from: u32,
    n: u32,
) -> bool {
    let from = from.min(N as u32 - 1);
    let n = n.min(N as u32 - from);
    if n == 0 {
        return true;
    }
    // SAFETY: dst[from..from + n] is inside the array.
    let rc = unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            at,
            dst.as_mut_ptr().add(from as usize) as *mut c_void,
            n,
        )
    };
    rc == 0
}

/// Reports the frame in `st.hdr`: into the walk's batch when nothing of its payload was
/// captured, else as a record of its own (after the batch so far, to keep wire order). A
/// SETTINGS frame's MAX_FRAME_SIZE also bounds what the other direction may send from now on.
#[inline(never)]
fn emit(w: &Walk, st: &FlowState) {
    let h = st.hdr;
    let frame_type = h[3];
    let flags = h[4];
    // SAFETY: as in `step`.
    let key = unsafe { &*w.key };
    if frame_type == ft::SETTINGS && flags & 1 == 0 {
        apply_max_frame_size(key, st);
    }
    let length = u32::from_be_bytes([0, h[0], h[1], h[2]]);
    let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    if w.batching != 0 && st.have == 0 {
        // SAFETY: this walk's batch buffer, a valid map value pointer.
        let batch = unsafe { &mut *w.batch };
        let i = usize::from(batch.head.count);
        if let Some(slot) = batch.frames.get_mut(i) {
            slot.frame_seq = st.frame_seq;
            slot.stream_id = stream_id;
            slot.length = length;
            slot.frame_type = frame_type;
            slot.flags = flags;
            slot._pad = [0; 2];
            batch.head.count += 1;
        }
        if usize::from(batch.head.count) >= FRAME_BATCH {
            flush(w);
        }
        return;
    }
    flush(w);
    let wakeup = wakeup_flags(core::mem::size_of::<H2FrameEvent>() as u64);
    let Some(mut entry) = EVENTS.reserve::<H2FrameEvent>(0) else {
        bump(Counter::H2FramesDropped);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is a reservation of exactly one H2FrameEvent, filled completely here.
    unsafe {
        (*ev).header = header(EventKind::H2Frame as u32);
        (*ev).flow = *key;
        (*ev).cgroup_id = st.cgroup_id;
        (*ev).frame_seq = st.frame_seq;
        (*ev).length = length;
        (*ev).stream_id = stream_id;
        (*ev).frame_type = frame_type;
        (*ev).flags = flags;
        (*ev).hook = w.hook as u8;
        (*ev).role = st.role;
        (*ev).captured = st.have;
        (*ev)._pad = [0; 7];
        (*ev).payload = st.payload;
    }
    entry.submit(wakeup);
}

/// Writes the walk's batched frames to the ring (only the entries in use) and empties it.
#[inline(never)]
fn flush(w: &Walk) {
    if w.batching == 0 {
        return;
    }
    // SAFETY: this walk's batch buffer, a valid map value pointer.
    let batch = unsafe { &mut *w.batch };
    let count = usize::from(batch.head.count).min(FRAME_BATCH);
    if count == 0 {
        return;
    }
    batch.head.header = header(EventKind::H2FrameBatch as u32);
    let bytes = FRAME_BATCH_HEADER_BYTES + count * core::mem::size_of::<CompactFrame>();
    let bytes = bytes.min(core::mem::size_of::<H2FrameBatchEvent>());
    // SAFETY: `bytes` is within the buffer, which is plain data.
    let record = unsafe {
        core::slice::from_raw_parts((batch as *const H2FrameBatchEvent).cast::<u8>(), bytes)
    };
    if EVENTS
        .output::<[u8]>(record, wakeup_flags(bytes as u64))
        .is_err()
    {
        bump_by(Counter::H2FramesDropped, count as u64);
    }
    batch.head.count = 0;
}

/// SETTINGS_MAX_FRAME_SIZE (0x5) sent by this flow's sender limits the reverse flow.
#[inline(never)]
fn apply_max_frame_size(key: &FlowKey, st: &FlowState) {
    let Some(peer) = H2_FLOWS.get_ptr_mut(&key.reversed()) else {
        return;
    };
    let params = (u32::from(st.have) / 6).min((PAYLOAD_CAPTURE / 6) as u32) as usize;
    let p = st.payload;
    for i in 0..PAYLOAD_CAPTURE / 6 {
        if i >= params {
            break;
        }
        let b = i * 6;
        if u16::from_be_bytes([p[b], p[b + 1]]) == 0x5 {
            let v = u32::from_be_bytes([p[b + 2], p[b + 3], p[b + 4], p[b + 5]]);
            // RFC 9113: between 2^14 and 2^24-1; anything else is a protocol error.
            if (DEFAULT_MAX_FRAME_SIZE..=0x00ff_ffff).contains(&v) {
                // SAFETY: valid map value pointer.
                unsafe { (*peer).max_frame = v };
            }
        }
    }
}
