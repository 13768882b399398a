#![allow(clippy::unwrap_used)]

use super::*;

// Verbatim from Linux 6.18 (/sys/kernel/tracing/events/tcp/*/format), shortened print fmt.
const SEND_RESET_6_18: &str = r#"name: tcp_send_reset
ID: 2280
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:const void * skbaddr;	offset:8;	size:8;	signed:0;
	field:const void * skaddr;	offset:16;	size:8;	signed:0;
	field:int state;	offset:24;	size:4;	signed:1;
	field:enum sk_rst_reason reason;	offset:28;	size:4;	signed:0;
	field:__u8 saddr[28];	offset:32;	size:28;	signed:0;
	field:__u8 daddr[28];	offset:60;	size:28;	signed:0;

print fmt: "skbaddr=%p skaddr=%p src=%pISpc dest=%pISpc state=%s reason=%s", REC->skbaddr, REC->skaddr, REC->saddr, REC->daddr, REC->state ? __print_symbolic(REC->state, { TCP_ESTABLISHED, "TCP_ESTABLISHED" }, { TCP_SYN_SENT, "TCP_SYN_SENT" }) : "UNKNOWN", __print_symbolic(REC->reason, { 0, "NOT_SPECIFIED" }, { 1, "NO_SOCKET" }, { 11, "TCP_ABORT_ON_CLOSE" }, { 12, "TCP_ABORT_ON_LINGER" })
"#;

const RECEIVE_RESET_6_18: &str = r#"name: tcp_receive_reset
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:__u16 sport;	offset:16;	size:2;	signed:0;
	field:__u16 dport;	offset:18;	size:2;	signed:0;
	field:__u16 family;	offset:20;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:22;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:26;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:30;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:46;	size:16;	signed:0;
	field:__u64 sock_cookie;	offset:64;	size:8;	signed:0;

print fmt: "family=%s sport=%hu", __print_symbolic(REC->family, { 2, "AF_INET" }, { 10, "AF_INET6" }), REC->sport
"#;

#[test]
fn parses_fields_and_arrays() {
    let f = TracepointFormat::parse("tcp/tcp_send_reset", SEND_RESET_6_18).unwrap();
    assert_eq!(
        f.field("skaddr"),
        Some(&Field {
            offset: 16,
            size: 8
        })
    );
    assert_eq!(
        f.field("saddr"),
        Some(&Field {
            offset: 32,
            size: 28
        })
    );
    assert_eq!(
        f.field("reason"),
        Some(&Field {
            offset: 28,
            size: 4
        })
    );
    assert_eq!(f.record_len(), 88);
    let r = TracepointFormat::parse("tcp/tcp_receive_reset", RECEIVE_RESET_6_18).unwrap();
    assert_eq!(
        r.field("daddr_v6"),
        Some(&Field {
            offset: 46,
            size: 16
        })
    );
    assert_eq!(r.record_len(), 72);
}

#[test]
fn symbol_tables_only_with_numeric_values() {
    let f = TracepointFormat::parse("tcp/tcp_send_reset", SEND_RESET_6_18).unwrap();
    let reasons = &f.symbols["reason"];
    assert_eq!(reasons[&11], "TCP_ABORT_ON_CLOSE");
    assert_eq!(reasons[&1], "NO_SOCKET");
    // `state` uses unresolved enum names: no table rather than a wrong one.
    assert!(!f.symbols.contains_key("state"));
    let r = TracepointFormat::parse("tcp/tcp_receive_reset", RECEIVE_RESET_6_18).unwrap();
    assert_eq!(r.symbols["family"][&10], "AF_INET6");
}

#[test]
fn malformed_field_is_an_error_not_a_panic() {
    let err = TracepointFormat::parse("x/y", "format:\n\tfield:int x;\toffset:zz;\tsize:4;\n");
    assert!(matches!(err, Err(TracefsError::Malformed { .. })));
    // Truncated print fmt tables are ignored.
    let f = TracepointFormat::parse(
        "x/y",
        "print fmt: \"%d\", __print_symbolic(REC->a, { 1, \"A\"",
    )
    .unwrap();
    assert!(f.symbols.is_empty() || f.symbols["a"][&1] == "A");
}
