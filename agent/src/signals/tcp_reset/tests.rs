#![allow(clippy::unwrap_used)]
use agent_common::events::{EventHeader, EventKind, TP_RECORD_MAX};

use super::*;

fn layouts() -> TcpResetDecoder {
    // Offsets as published by Linux 6.18 (see probes/tracefs/tests.rs for the full files).
    let send = TracepointFormat::parse(
        "tcp/tcp_send_reset",
        "\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
         \tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;\n\
         \tfield:int state;\toffset:24;\tsize:4;\tsigned:1;\n\
         \tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;\n\
         \tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;\n\
         \tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;\n\
         print fmt: \"\", __print_symbolic(REC->reason, { 12, \"TCP_ABORT_ON_LINGER\" })\n",
    )
    .unwrap();
    let recv = TracepointFormat::parse(
        "tcp/tcp_receive_reset",
        "\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
         \tfield:__u16 sport;\toffset:16;\tsize:2;\tsigned:0;\n\
         \tfield:__u16 dport;\toffset:18;\tsize:2;\tsigned:0;\n\
         \tfield:__u16 family;\toffset:20;\tsize:2;\tsigned:0;\n\
         \tfield:__u8 saddr[4];\toffset:22;\tsize:4;\tsigned:0;\n\
         \tfield:__u8 daddr[4];\toffset:26;\tsize:4;\tsigned:0;\n\
         \tfield:__u8 saddr_v6[16];\toffset:30;\tsize:16;\tsigned:0;\n\
         \tfield:__u8 daddr_v6[16];\toffset:46;\tsize:16;\tsigned:0;\n\
         \tfield:__u64 sock_cookie;\toffset:64;\tsize:8;\tsigned:0;\n",
    )
    .unwrap();
    TcpResetDecoder {
        sent: RecordLayout::from_format(&send),
        received: RecordLayout::from_format(&recv),
    }
}

fn event(direction: ResetDirection, record: &[u8], task: bool) -> Vec<u8> {
    let mut ev = TcpResetEvent {
        header: EventHeader {
            kind: EventKind::TcpReset as u32,
            cpu: 0,
            ktime_ns: 42,
        },
        direction: direction as u32,
        task_context: u32::from(task),
        pid: 100,
        tid: 101,
        comm: *b"client\0\0\0\0\0\0\0\0\0\0",
        netns_ino: 4026531840,
        sk_state: 1,
        cgroup_id: 0,
        record_len: record.len() as u32,
        _pad: 0,
        record: [0; TP_RECORD_MAX],
    };
    ev.record[..record.len()].copy_from_slice(record);
    // SAFETY: plain-integer repr(C) struct viewed as bytes.
    unsafe {
        std::slice::from_raw_parts(
            (&raw const ev).cast::<u8>(),
            std::mem::size_of::<TcpResetEvent>(),
        )
    }
    .to_vec()
}

#[test]
fn sent_ipv6_sockaddr_layout() {
    let mut r = vec![0u8; 88];
    r[28..32].copy_from_slice(&12u32.to_ne_bytes());
    // saddr: sockaddr_in6 [::1]:40000
    r[32..34].copy_from_slice(&AF_INET6.to_ne_bytes());
    r[34..36].copy_from_slice(&40000u16.to_be_bytes());
    r[40..56].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
    // daddr: [::1]:8080
    r[60..62].copy_from_slice(&AF_INET6.to_ne_bytes());
    r[62..64].copy_from_slice(&8080u16.to_be_bytes());
    r[68..84].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
    let reset = layouts()
        .decode(&event(ResetDirection::Sent, &r, true))
        .unwrap();
    assert_eq!(reset.direction, Direction::Sent);
    assert_eq!(reset.local, "[::1]:40000".parse().unwrap());
    assert_eq!(reset.remote, "[::1]:8080".parse().unwrap());
    assert_eq!(reset.reason.as_deref(), Some("TCP_ABORT_ON_LINGER"));
    assert_eq!(reset.state, Some("ESTABLISHED"));
    assert_eq!(reset.task.as_ref().map(|t| t.pid), Some(100));
    assert_eq!(reset.netns, Some(4026531840));
}

#[test]
fn received_ipv4_split_layout_has_no_task_in_softirq() {
    let mut r = vec![0u8; 72];
    r[16..18].copy_from_slice(&8080u16.to_ne_bytes());
    r[18..20].copy_from_slice(&40000u16.to_ne_bytes());
    r[20..22].copy_from_slice(&AF_INET.to_ne_bytes());
    r[22..26].copy_from_slice(&[127, 0, 0, 1]);
    r[26..30].copy_from_slice(&[127, 0, 0, 2]);
    r[64..72].copy_from_slice(&7u64.to_ne_bytes());
    let reset = layouts()
        .decode(&event(ResetDirection::Received, &r, false))
        .unwrap();
    assert_eq!(reset.local, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(reset.remote, "127.0.0.2:40000".parse().unwrap());
    assert_eq!(reset.task, None);
    assert_eq!(reset.reason, None);
    assert_eq!(reset.sock_cookie, Some(7));
}

#[test]
fn hostile_records_are_errors() {
    let d = layouts();
    assert!(d.decode(&[0u8; 10]).is_err());
    // Unknown family.
    let r = vec![0xffu8; 88];
    assert!(d.decode(&event(ResetDirection::Sent, &r, true)).is_err());
    // Record shorter than the fields.
    assert!(
        d.decode(&event(ResetDirection::Received, &[0u8; 20], true))
            .is_err()
    );
    let mut bytes = event(ResetDirection::Received, &[0u8; 72], true);
    bytes[16] = 9; // direction 9
    assert!(d.decode(&bytes).is_err());
}
