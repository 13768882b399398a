#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use http::{HeaderMap, HeaderValue};

use super::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

fn ids(trace_id: &str, span_id: &str, format: &'static str) -> Option<TraceIds> {
    Some(TraceIds {
        trace_id: trace_id.to_owned(),
        span_id: span_id.to_owned(),
        format,
    })
}

/// What a gRPC client sends for these ids: version 0, fields 0, 1 and 2.
fn grpc_trace_bin_value(trace: &[u8; 16], span: &[u8; 8], padded: bool) -> String {
    let mut bytes = vec![0, 0];
    bytes.extend_from_slice(trace);
    bytes.push(1);
    bytes.extend_from_slice(span);
    bytes.extend_from_slice(&[2, 1]);
    if padded {
        STANDARD.encode(&bytes)
    } else {
        STANDARD_NO_PAD.encode(&bytes)
    }
}

fn decode_hex<const N: usize>(hex: &str) -> [u8; N] {
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

#[test]
fn traceparent_valid() {
    let value = format!("00-{TRACE}-{SPAN}-01");
    assert_eq!(
        extract(&headers(&[("traceparent", &value)])),
        ids(TRACE, SPAN, W3C)
    );
    // Unsampled.
    let value = format!("00-{TRACE}-{SPAN}-00");
    assert_eq!(
        extract(&headers(&[("traceparent", &value)])),
        ids(TRACE, SPAN, W3C)
    );
    // A later version may append fields.
    let value = format!("01-{TRACE}-{SPAN}-01-what-comes-next");
    assert_eq!(
        extract(&headers(&[("traceparent", &value)])),
        ids(TRACE, SPAN, W3C)
    );
}

#[test]
fn traceparent_invalid() {
    let zero_trace = "0".repeat(32);
    let zero_span = "0".repeat(16);
    let upper = TRACE.to_uppercase();
    for value in [
        format!("ff-{TRACE}-{SPAN}-01"),
        format!("00-{zero_trace}-{SPAN}-01"),
        format!("00-{TRACE}-{zero_span}-01"),
        format!("00-{upper}-{SPAN}-01"),
        format!("00-{TRACE}-{SPAN}-01-extra"),
        format!("01-{TRACE}-{SPAN}-01x"),
        format!("00-{}-{SPAN}-01", &TRACE[1..]),
        format!("00-{TRACE}0-{SPAN}-01"),
        format!("00-{TRACE}-{}-01", &SPAN[1..]),
        format!("00-{TRACE}-{SPAN}-1"),
        format!("00-{TRACE}-{SPAN}-0g"),
        format!("0-{TRACE}-{SPAN}-01"),
        format!("00_{TRACE}_{SPAN}_01"),
        format!("zz-{TRACE}-{SPAN}-01"),
        format!(" 00-{TRACE}-{SPAN}-01"),
        String::new(),
        "00".to_owned(),
    ] {
        assert_eq!(
            extract(&headers(&[("traceparent", &value)])),
            None,
            "{value:?}"
        );
    }
    // Sent twice: ambiguous, ignored.
    let value = format!("00-{TRACE}-{SPAN}-01");
    assert_eq!(
        extract(&headers(&[
            ("traceparent", &value),
            ("traceparent", &value)
        ])),
        None
    );
}

#[test]
fn grpc_trace_bin_round_trip() {
    let trace = decode_hex::<16>(TRACE);
    let span = decode_hex::<8>(SPAN);
    for padded in [true, false] {
        let value = grpc_trace_bin_value(&trace, &span, padded);
        assert_eq!(value.ends_with('='), padded);
        assert_eq!(
            extract(&headers(&[("grpc-trace-bin", &value)])),
            ids(TRACE, SPAN, GRPC_TRACE_BIN),
            "{value}"
        );
    }
    // Without the options field.
    let mut bytes = vec![0, 0];
    bytes.extend_from_slice(&trace);
    bytes.push(1);
    bytes.extend_from_slice(&span);
    let value = STANDARD_NO_PAD.encode(&bytes);
    assert_eq!(
        extract(&headers(&[("grpc-trace-bin", &value)])),
        ids(TRACE, SPAN, GRPC_TRACE_BIN)
    );
}

#[test]
fn grpc_trace_bin_invalid() {
    let trace = decode_hex::<16>(TRACE);
    let span = decode_hex::<8>(SPAN);
    let valid = {
        let mut bytes = vec![0, 0];
        bytes.extend_from_slice(&trace);
        bytes.push(1);
        bytes.extend_from_slice(&span);
        bytes
    };
    let mut version_1 = valid.clone();
    version_1[0] = 1;
    let mut span_first = valid.clone();
    span_first[1] = 1;
    let truncated = valid[..valid.len() - 1].to_vec();
    let no_span = valid[..18].to_vec();
    let mut zero_trace = valid.clone();
    zero_trace[2..18].fill(0);
    let mut zero_span = valid.clone();
    zero_span[19..27].fill(0);
    for bytes in [
        version_1,
        span_first,
        truncated,
        no_span,
        zero_trace,
        zero_span,
        vec![],
    ] {
        let value = STANDARD.encode(&bytes);
        assert_eq!(
            extract(&headers(&[("grpc-trace-bin", &value)])),
            None,
            "{bytes:?}"
        );
    }
    // Not base64.
    assert_eq!(
        extract(&headers(&[("grpc-trace-bin", "not base64!")])),
        None
    );
}

#[test]
fn b3_single_header() {
    // 128-bit trace id, with sampling decision and parent.
    let value = format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90");
    assert_eq!(extract(&headers(&[("b3", &value)])), ids(TRACE, SPAN, B3));
    // 64-bit trace id: left-padded.
    let value = format!("a3ce929d0e0e4736-{SPAN}");
    assert_eq!(
        extract(&headers(&[("b3", &value)])),
        ids("0000000000000000a3ce929d0e0e4736", SPAN, B3)
    );
    let value = format!("{TRACE}-{SPAN}-d");
    assert_eq!(extract(&headers(&[("b3", &value)])), ids(TRACE, SPAN, B3));
}

#[test]
fn b3_single_invalid() {
    for value in [
        "0".to_owned(),
        "1".to_owned(),
        "d".to_owned(),
        TRACE.to_owned(),
        format!("{TRACE}-{SPAN}-2"),
        format!("{TRACE}-{SPAN}-1-short"),
        format!("{TRACE}-{SPAN}-1-05e3ac9a4f6e3b90-more"),
        format!("{}-{SPAN}", &TRACE[..20]),
        format!("{}-{SPAN}", TRACE.to_uppercase()),
        format!("{}-{SPAN}", "0".repeat(32)),
        format!("{TRACE}-{}", "0".repeat(16)),
    ] {
        assert_eq!(extract(&headers(&[("b3", &value)])), None, "{value:?}");
    }
}

#[test]
fn b3_multi_header() {
    assert_eq!(
        extract(&headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)])),
        ids(TRACE, SPAN, B3)
    );
    assert_eq!(
        extract(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ])),
        ids("0000000000000000a3ce929d0e0e4736", SPAN, B3)
    );
    // Both are needed.
    assert_eq!(extract(&headers(&[("x-b3-traceid", TRACE)])), None);
    assert_eq!(extract(&headers(&[("x-b3-spanid", SPAN)])), None);
    assert_eq!(
        extract(&headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", "xyz")])),
        None
    );
}

#[test]
fn precedence() {
    const OTHER_TRACE: &str = "11111111111111111111111111111111";
    const OTHER_SPAN: &str = "2222222222222222";
    let traceparent = format!("00-{TRACE}-{SPAN}-01");
    let bin = grpc_trace_bin_value(
        &decode_hex::<16>(OTHER_TRACE),
        &decode_hex::<8>(OTHER_SPAN),
        false,
    );
    let b3 = format!("{OTHER_TRACE}-{OTHER_SPAN}");
    let all = [
        ("b3", b3.as_str()),
        ("x-b3-traceid", OTHER_TRACE),
        ("x-b3-spanid", OTHER_SPAN),
        ("grpc-trace-bin", bin.as_str()),
        ("traceparent", traceparent.as_str()),
    ];
    // traceparent wins over everything.
    assert_eq!(extract(&headers(&all)), ids(TRACE, SPAN, W3C));
    // Then grpc-trace-bin.
    assert_eq!(
        extract(&headers(&all[..4])),
        ids(OTHER_TRACE, OTHER_SPAN, GRPC_TRACE_BIN)
    );
    // An invalid traceparent falls through to the next format.
    let mut invalid = all;
    invalid[4].1 = "00-garbage";
    assert_eq!(
        extract(&headers(&invalid)),
        ids(OTHER_TRACE, OTHER_SPAN, GRPC_TRACE_BIN)
    );
    // Single b3 before the multi-header form.
    let mixed = [
        ("x-b3-traceid", TRACE),
        ("x-b3-spanid", SPAN),
        ("b3", b3.as_str()),
    ];
    assert_eq!(extract(&headers(&mixed)), ids(OTHER_TRACE, OTHER_SPAN, B3));
    assert_eq!(extract(&HeaderMap::new()), None);
}
