#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn with_timeout(v: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
    h
}

#[test]
fn timeouts_parse_in_every_unit() {
    let p = |v| parse_timeout(&with_timeout(v));
    assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(p("2M"), Some(Duration::from_secs(120)));
    assert_eq!(p("3S"), Some(Duration::from_secs(3)));
    assert_eq!(p("200m"), Some(Duration::from_millis(200)));
    assert_eq!(p("5u"), Some(Duration::from_micros(5)));
    assert_eq!(p("99999999n"), Some(Duration::from_nanos(99_999_999)));
    for bad in ["", "m", "100", "123456789m", "1x", "-1S", "1.5S", " 1S"] {
        assert_eq!(p(bad), None, "{bad:?}");
    }
    assert_eq!(parse_timeout(&HeaderMap::new()), None);
}

#[test]
fn timeouts_format_in_eight_digits_never_rounding_up() {
    let f = |d| format_timeout(d).to_str().unwrap().to_owned();
    assert_eq!(f(Duration::from_nanos(199_999_999)), "199999u");
    assert_eq!(f(Duration::from_millis(150)), "150000u");
    assert_eq!(f(Duration::from_secs(100)), "100000m");
    assert_eq!(f(Duration::from_secs(200_000)), "200000S");
    assert_eq!(f(Duration::ZERO), "0n");
    // Round trip: never more than what was given.
    for ms in [1u64, 7, 199, 1_000, 86_400_000] {
        let d = Duration::from_millis(ms);
        assert!(parse_timeout(&with_timeout(&f(d))).unwrap() <= d);
    }
}

#[test]
fn messages_are_percent_encoded() {
    assert_eq!(encode_message("plain text"), "plain text");
    assert_eq!(encode_message("50% off\n"), "50%25 off%0A");
    assert_eq!(encode_message("é"), "%C3%A9");
}

#[test]
fn trailers_only_responses_carry_the_status_in_headers() {
    let r = trailers_only(Code::Unavailable, "no upstream");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/grpc");
    assert_eq!(status_of(r.headers()), Some(14));
    assert_eq!(r.headers()["grpc-message"], "no upstream");
}

#[test]
fn grpc_content_types() {
    let mut h = HeaderMap::new();
    assert!(!is_grpc(&h));
    for (ct, want) in [
        ("application/grpc", true),
        ("application/grpc+proto", true),
        ("application/grpc-web", false),
        ("text/plain", false),
    ] {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        assert_eq!(is_grpc(&h), want, "{ct}");
    }
}

#[test]
fn hop_by_hop_headers_are_dropped_te_trailers_kept() {
    let mut h = HeaderMap::new();
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    h.insert("keep-alive", HeaderValue::from_static("5"));
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert("x-custom-bin", HeaderValue::from_static("AAEC"));
    strip_hop_by_hop(&mut h);
    assert!(h.get(header::CONNECTION).is_none() && h.get("keep-alive").is_none());
    assert_eq!(h[header::TE], "trailers");
    assert_eq!(h["x-custom-bin"], "AAEC");
    h.insert(header::TE, HeaderValue::from_static("gzip"));
    strip_hop_by_hop(&mut h);
    assert!(h.get(header::TE).is_none());
}

#[test]
fn the_upstream_gets_the_offset_less_unless_the_deadline_is_short() {
    let ms = Duration::from_millis;
    assert_eq!(upstream_timeout(ms(200), ms(5)), ms(195));
    assert_eq!(upstream_timeout(ms(11), ms(5)), ms(6));
    assert_eq!(upstream_timeout(ms(10), ms(5)), ms(10));
    assert_eq!(upstream_timeout(ms(3), ms(5)), ms(3));
    assert_eq!(upstream_timeout(ms(200), ms(0)), ms(200));
}
