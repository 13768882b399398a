//! The bits of gRPC-over-HTTP/2 the proxy must understand itself: `grpc-timeout`, status codes,
//! and the trailers-only responses it answers with when no upstream does.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

/// gRPC status codes: tonic's, the one definition the proxy, the breakers and the API share.
pub use tonic::Code;

/// Whether a request is gRPC (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct == "application/grpc"
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n). None when absent or
/// malformed (a malformed one is ignored, as gRPC servers do).
pub fn parse_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The shortest exact-enough `grpc-timeout` for `d`: the finest unit whose value fits in
/// 8 digits, rounded down (the upstream must never get more time than the client left).
/// The `grpc-timeout` to send upstream when `left` remains of the call: `offset` less, so
/// the upstream's deadline fires before the proxy's, unless that would take most of it.
pub fn upstream_timeout(left: Duration, offset: Duration) -> Duration {
    if left > offset * 2 {
        left - offset
    } else {
        left
    }
}

pub fn format_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let ns = d.as_nanos();
    let (value, unit) = [
        (ns, "n"),
        (ns / 1_000, "u"),
        (ns / 1_000_000, "m"),
        (ns / 1_000_000_000, "S"),
        (ns / 60_000_000_000, "M"),
        (ns / 3_600_000_000_000, "H"),
    ]
    .into_iter()
    .find(|(v, _)| *v <= MAX)
    .unwrap_or((MAX, "H"));
    HeaderValue::from_str(&format!("{value}{unit}")).unwrap_or(HeaderValue::from_static("1n"))
}

/// Percent-encodes a `grpc-message` (gRPC: every byte outside 0x20..=0x7E, and '%').
pub fn encode_message(msg: &str) -> HeaderValue {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static("error"))
}

/// Trailers carrying a status.
pub fn status_trailers(code: Code, message: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(code as i32));
    if !message.is_empty() {
        t.insert("grpc-message", encode_message(message));
    }
    t
}

/// A trailers-only gRPC response (HTTP 200 whose one HEADERS frame carries the status).
pub fn trailers_only(code: Code, message: &str) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.extend(status_trailers(code, message));
    r
}

/// The answer to a non-gRPC request the proxy cannot forward.
pub fn plain_error(status: StatusCode, retry_after: Option<Duration>) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    if let Some(d) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(d.as_secs().max(1)));
    }
    r
}

/// `grpc-status` of a response's headers or trailers.
pub fn status_of(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Headers that describe one hop, not the request (RFC 9110 §7.6.1, RFC 9113 §8.2.2); `te`
/// passes only as `trailers`, which gRPC needs.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests;
