#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use agent_common::events::{EventHeader, EventKind};

fn event(frame_type: u8, flags: u8, length: u32, payload: &[u8]) -> Vec<u8> {
    let mut flow = FlowKey {
        family: 10,
        sport: 40000,
        dport: 8080,
        ..FlowKey::default()
    };
    flow.saddr[15] = 1;
    flow.daddr[15] = 1;
    let mut ev = H2FrameEvent {
        header: EventHeader {
            kind: EventKind::H2Frame as u32,
            cpu: 0,
            ktime_ns: 42,
        },
        flow,
        cgroup_id: 7,
        frame_seq: 1000,
        length,
        stream_id: 3,
        frame_type,
        flags,
        hook: Hook::CgroupEgress as u8,
        role: Role::Client as u8,
        captured: payload.len() as u8,
        _pad: [0; 7],
        payload: [0; PAYLOAD_CAPTURE],
    };
    ev.payload[..payload.len()].copy_from_slice(payload);
    // SAFETY: a repr(C) integer-only struct viewed as its bytes.
    unsafe {
        std::slice::from_raw_parts(
            (&raw const ev).cast::<u8>(),
            std::mem::size_of::<H2FrameEvent>(),
        )
    }
    .to_vec()
}

#[test]
fn rst_stream_goaway_and_settings_are_named() {
    let f = decode_frame(&event(3, 0, 4, &8u32.to_be_bytes())).unwrap();
    assert_eq!(f.frame_type, "RST_STREAM");
    assert_eq!(f.flow.src, "[::1]:40000".parse().unwrap());
    assert_eq!(f.sender, Some("client"));
    assert_eq!(
        f.detail,
        FrameDetail::RstStream {
            error_code: 8,
            error: "CANCEL"
        }
    );

    let mut goaway = 0x8000_0005u32.to_be_bytes().to_vec();
    goaway.extend(0xbu32.to_be_bytes());
    let f = decode_frame(&event(7, 0, 8, &goaway)).unwrap();
    assert_eq!(
        f.detail,
        FrameDetail::GoAway {
            last_stream_id: 5,
            error_code: 11,
            error: "ENHANCE_YOUR_CALM"
        }
    );

    let mut settings = vec![0, 3, 0, 0, 0, 100];
    settings.extend([0, 5, 0, 0, 0x40, 0]);
    let f = decode_frame(&event(4, 0, 12, &settings)).unwrap();
    let FrameDetail::Settings {
        ack,
        settings,
        truncated,
    } = f.detail
    else {
        panic!("{:?}", f.detail)
    };
    assert!(!ack && !truncated);
    assert_eq!(settings[0].name, "MAX_CONCURRENT_STREAMS");
    assert_eq!(settings[0].value, 100);
    assert_eq!(settings[1].value, 16384);

    // 9 parameters declared, 8 captured.
    let f = decode_frame(&event(4, 0, 54, &[0u8; 48])).unwrap();
    assert!(matches!(
        f.detail,
        FrameDetail::Settings {
            truncated: true,
            ..
        }
    ));
}

#[test]
fn headers_flags_and_json_shape() {
    let f = decode_frame(&event(1, 0x5, 30, &[])).unwrap();
    assert_eq!(
        f.detail,
        FrameDetail::Headers {
            end_stream: true,
            end_headers: true
        }
    );
    let v = serde_json::to_value(&f).unwrap();
    assert_eq!(v["type"], "HEADERS");
    assert_eq!(v["src"], "[::1]:40000");
    assert_eq!(v["dst"], "[::1]:8080");
    assert_eq!(v["end_stream"], true);
    assert_eq!(v["direction"], "egress");
    assert_eq!(v["cgroup_id"], 7);
}

#[test]
fn short_or_hostile_records_are_errors_not_panics() {
    let good = event(3, 0, 4, &[0, 0, 0, 1]);
    for len in 0..good.len() {
        assert!(decode_frame(&good[..len]).is_err());
    }
    // Captured length beyond the array, unknown type, missing payload: decoded, no panic.
    let mut bad = event(0xee, 0xff, 0xff_ffff, &[]);
    let captured_at = std::mem::offset_of!(H2FrameEvent, captured);
    bad[captured_at] = 255;
    let f = decode_frame(&bad).unwrap();
    assert_eq!(f.frame_type, "UNKNOWN");
    let f = decode_frame(&event(7, 0, 8, &[1, 2])).unwrap();
    assert_eq!(f.detail, FrameDetail::Other {});
    // Unknown address family.
    let mut bad = event(1, 0, 0, &[]);
    let family_at =
        std::mem::offset_of!(H2FrameEvent, flow) + std::mem::offset_of!(FlowKey, family);
    bad[family_at] = 99;
    assert!(decode_frame(&bad).is_err());
}

fn batch(frames: &[(u8, u8, u32, u32)]) -> Vec<u8> {
    let mut flow = FlowKey {
        family: 2,
        sport: 40000,
        dport: 8080,
        ..FlowKey::default()
    };
    flow.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    flow.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
    let head = H2FrameBatchHead {
        header: EventHeader {
            kind: EventKind::H2FrameBatch as u32,
            cpu: 1,
            ktime_ns: 99,
        },
        flow,
        cgroup_id: 0,
        hook: Hook::CgroupIngress as u8,
        role: Role::Server as u8,
        count: frames.len() as u8,
        _pad: [0; 5],
    };
    let bytes_of = |p: *const u8, n: usize| {
        // SAFETY: repr(C) integer-only structs viewed as their bytes.
        unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
    };
    let mut out = bytes_of(
        (&raw const head).cast(),
        std::mem::size_of::<H2FrameBatchHead>(),
    );
    assert_eq!(out.len(), FRAME_BATCH_HEADER_BYTES);
    for (i, &(frame_type, flags, stream_id, length)) in frames.iter().enumerate() {
        let f = CompactFrame {
            frame_seq: 100 * i as u32,
            stream_id,
            length,
            frame_type,
            flags,
            _pad: [0; 2],
        };
        out.extend(bytes_of(
            (&raw const f).cast(),
            std::mem::size_of::<CompactFrame>(),
        ));
    }
    out
}

#[test]
fn batch_yields_each_frame_in_wire_order_with_the_shared_flow() {
    let bytes = batch(&[(1, 0x4, 1, 30), (0, 0x1, 1, 5), (1, 0x5, 1, 12)]);
    let mut frames = Vec::new();
    decode_batch(&bytes, |f| frames.push(f)).unwrap();
    let summary: Vec<_> = frames
        .iter()
        .map(|f| (f.frame_type, f.flags, f.stream_id, f.length))
        .collect();
    assert_eq!(
        summary,
        [
            ("HEADERS", 0x4, 1, 30),
            ("DATA", 0x1, 1, 5),
            ("HEADERS", 0x5, 1, 12)
        ]
    );
    let f = &frames[2];
    assert_eq!(f.flow.src.to_string(), "127.0.0.1:40000");
    assert_eq!(f.flow.dst.to_string(), "127.0.0.2:8080");
    assert_eq!(
        (f.direction, f.hook, f.sender),
        ("ingress", "cgroup", Some("server"))
    );
    assert_eq!(f.cgroup_id, None);
    assert_eq!(
        f.detail,
        FrameDetail::Headers {
            end_stream: true,
            end_headers: true
        }
    );
    // Through the decoder every signal of the record comes out.
    let d = crate::signals::Decoder {
        tcp_reset: crate::signals::TcpResetDecoder::default(),
    };
    let mut signals = Vec::new();
    d.decode_into(&bytes, &mut signals).unwrap();
    assert_eq!(signals.len(), 3);
}

#[test]
fn truncated_or_overfull_batches_are_errors() {
    let bytes = batch(&[(1, 0x4, 1, 30), (0, 0x1, 1, 5)]);
    for len in [0, 10, FRAME_BATCH_HEADER_BYTES, bytes.len() - 1] {
        let mut n = 0;
        assert!(decode_batch(&bytes[..len], |_| n += 1).is_err(), "{len}");
        assert_eq!(n, 0, "no frame of a bad record is handed on");
    }
    let mut overfull = bytes.clone();
    let count_at = std::mem::offset_of!(H2FrameBatchHead, count);
    overfull[count_at] = FRAME_BATCH as u8 + 1;
    assert!(decode_batch(&overfull, |_| {}).is_err());
    let mut empty = bytes;
    empty[count_at] = 0;
    let mut n = 0;
    decode_batch(&empty, |_| n += 1).unwrap();
    assert_eq!(n, 0);
}
