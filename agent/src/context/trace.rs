//! Trace and span ids from the propagation headers a request carries, in this order:
//! W3C `traceparent`, then OpenCensus `grpc-trace-bin`, then B3 (`b3`, then
//! `x-b3-traceid` / `x-b3-spanid`). A malformed header gives nothing and the next format is
//! tried: propagation headers come from peers, and a bad one is never an error.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use http::HeaderMap;

/// `trace_format` of a context taken from `traceparent`.
pub const W3C: &str = "w3c";
/// `trace_format` of a context taken from `grpc-trace-bin`.
pub const GRPC_TRACE_BIN: &str = "grpc-trace-bin";
/// `trace_format` of a context taken from `b3` or `x-b3-traceid` / `x-b3-spanid`.
pub const B3: &str = "b3";

/// Ids as lowercase hex: 32 digits for the trace, 16 for the span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: String,
    pub span_id: String,
    pub format: &'static str,
}

/// gRPC sends `-bin` metadata as standard base64, usually without padding; accept both.
const GRPC_BIN_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub fn extract(headers: &HeaderMap) -> Option<TraceIds> {
    single(headers, "traceparent")
        .and_then(traceparent)
        .or_else(|| single(headers, "grpc-trace-bin").and_then(grpc_trace_bin))
        .or_else(|| single(headers, "b3").and_then(b3_single))
        .or_else(|| b3_multi(headers))
}

/// The header's value when it is sent exactly once: two `traceparent`s (or two B3 ids) are
/// ambiguous, and W3C says to ignore them rather than pick one.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    match values.next() {
        Some(_) => None,
        None => Some(first.as_bytes()),
    }
}

/// `version-traceid-parentid-flags`, W3C Trace Context level 1: lowercase hex only, ids not all
/// zero, version `ff` invalid. Version 00 has exactly four fields; a later version may append
/// fields after a `-`, which are ignored.
fn traceparent(value: &[u8]) -> Option<TraceIds> {
    const LEN: usize = 55;
    let head = value.get(..LEN)?;
    let version = &head[..2];
    if !is_lower_hex(version) || version == b"ff" {
        return None;
    }
    if version == b"00" && value.len() != LEN {
        return None;
    }
    if value.len() > LEN && value[LEN] != b'-' {
        return None;
    }
    if head[2] != b'-' || head[35] != b'-' || head[52] != b'-' || !is_lower_hex(&head[53..55]) {
        return None;
    }
    Some(TraceIds {
        trace_id: hex_id(&head[3..35])?,
        span_id: hex_id(&head[36..52])?,
        format: W3C,
    })
}

/// The OpenCensus binary format: version 0, then field 0 (16-byte trace id), field 1 (8-byte
/// span id), field 2 (1-byte options), each introduced by its id, in that order. Parsing stops
/// at an unknown field id, as OpenCensus does; trace and span ids are both required.
fn grpc_trace_bin(value: &[u8]) -> Option<TraceIds> {
    let bytes = GRPC_BIN_BASE64.decode(value).ok()?;
    let (&version, fields) = bytes.split_first()?;
    if version != 0 {
        return None;
    }
    let (trace, rest) = match fields.split_first() {
        Some((0, rest)) => rest.split_at_checked(16)?,
        _ => return None,
    };
    let span = match rest.split_first() {
        Some((1, rest)) => rest.get(..8)?,
        _ => return None,
    };
    if is_zero(trace) || is_zero(span) {
        return None;
    }
    Some(TraceIds {
        trace_id: to_hex(trace),
        span_id: to_hex(span),
        format: GRPC_TRACE_BIN,
    })
}

/// `{traceid}-{spanid}[-{sampled}[-{parentspanid}]]`; a bare sampling decision (`0`, `1`, `d`)
/// carries no ids.
fn b3_single(value: &[u8]) -> Option<TraceIds> {
    let mut parts = value.split(|&b| b == b'-');
    let trace = parts.next()?;
    let span = parts.next()?;
    if let Some(sampled) = parts.next()
        && !matches!(sampled, b"0" | b"1" | b"d")
    {
        return None;
    }
    if let Some(parent) = parts.next()
        && (parent.len() != 16 || !is_lower_hex(parent))
    {
        return None;
    }
    if parts.next().is_some() {
        return None;
    }
    b3_ids(trace, span)
}

fn b3_multi(headers: &HeaderMap) -> Option<TraceIds> {
    b3_ids(
        single(headers, "x-b3-traceid")?,
        single(headers, "x-b3-spanid")?,
    )
}

/// A 64-bit trace id (16 digits) is left-padded with zeros to 128 bits.
fn b3_ids(trace: &[u8], span: &[u8]) -> Option<TraceIds> {
    let trace_id = match trace.len() {
        32 => hex_id(trace)?,
        16 => format!("{:0>32}", hex_id(trace)?),
        _ => return None,
    };
    if span.len() != 16 {
        return None;
    }
    Some(TraceIds {
        trace_id,
        span_id: hex_id(span)?,
        format: B3,
    })
}

/// The id as a `String` when it is lowercase hex and not all zeros.
fn hex_id(digits: &[u8]) -> Option<String> {
    if !is_lower_hex(digits) || digits.iter().all(|&b| b == b'0') {
        return None;
    }
    // Lowercase hex digits are ASCII.
    String::from_utf8(digits.to_vec()).ok()
}

fn is_lower_hex(digits: &[u8]) -> bool {
    digits
        .iter()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    hex
}

#[cfg(test)]
mod tests;
