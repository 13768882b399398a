#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use super::*;

/// Attributes by key, their values as JSON-ish text for comparison.
fn by_key(attrs: &[KeyValue]) -> BTreeMap<String, String> {
    fn text(v: &AnyValue) -> String {
        match &v.value {
            Some(any_value::Value::StringValue(s)) => format!("{s:?}"),
            Some(any_value::Value::IntValue(i)) => i.to_string(),
            Some(any_value::Value::BoolValue(b)) => b.to_string(),
            Some(any_value::Value::DoubleValue(d)) => d.to_string(),
            Some(any_value::Value::ArrayValue(a)) => {
                format!(
                    "[{}]",
                    a.values.iter().map(text).collect::<Vec<_>>().join(",")
                )
            }
            Some(any_value::Value::KvlistValue(l)) => format!(
                "{{{}}}",
                l.values
                    .iter()
                    .map(|kv| format!("{}={}", kv.key, text(kv.value.as_ref().unwrap())))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            other => format!("{other:?}"),
        }
    }
    attrs
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref().unwrap())))
        .collect()
}

const TRIP: &str = r#"{"seq":1234,"schema":"breaker_trip/v1","ts":"2024-05-30T00:58:00.123Z","breaker":{"name":"endpoint orders/10.0.0.7:50051","scope":"endpoint","from":"closed","to":"open","reason":"consecutive_failures","open_for_ms":5000},"window":{"calls":5,"failures":5,"slow":0},"consecutive_failures":5,"evidence":[{"kind":"tcp_reset","direction":"received"}],"upstream":{"cluster":"orders","endpoint":"10.0.0.7:50051"},"stream":{"method":"/orders.v1.Orders/Create","grpc_status":14,"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7","session_id":"sess_9z8y","latency_us":1200},"jwt_claims":{"sub":"user:10023","scope":["read:order","write:order"],"exp":1717023480,"verified":false,"iss":null}}"#;

#[test]
fn every_field_is_an_attribute_nested_ones_dotted() {
    let r = log_record(TRIP, 7);
    let a = by_key(&r.attributes);
    assert_eq!(a["seq"], "1234");
    assert_eq!(a["schema"], r#""breaker_trip/v1""#);
    assert_eq!(a["breaker.name"], r#""endpoint orders/10.0.0.7:50051""#);
    assert_eq!(a["breaker.reason"], r#""consecutive_failures""#);
    assert_eq!(a["breaker.open_for_ms"], "5000");
    assert_eq!(a["window.failures"], "5");
    assert_eq!(a["upstream.endpoint"], r#""10.0.0.7:50051""#);
    assert_eq!(a["stream.grpc_status"], "14");
    assert_eq!(
        a["stream.trace_id"],
        r#""4bf92f3577b34da6a3ce929d0e0e4736""#
    );
    assert_eq!(a["jwt_claims.sub"], r#""user:10023""#);
    assert_eq!(a["jwt_claims.scope"], r#"["read:order","write:order"]"#);
    assert_eq!(a["jwt_claims.verified"], "false");
    assert_eq!(
        a["evidence"],
        r#"[{direction="received",kind="tcp_reset"}]"#
    );
    // Nulls are left out; nothing else is.
    assert!(!a.contains_key("jwt_claims.iss"));
    assert_eq!(a.len(), 26, "{a:#?}");

    assert_eq!(r.body, Some(string_value(TRIP)));
    assert_eq!(r.event_name, "breaker_trip");
    assert_eq!(r.severity_number, SeverityNumber::Warn as i32);
    assert_eq!(r.severity_text, "WARN");
    assert_eq!(r.time_unix_nano, 1_717_030_680_123_000_000);
    assert_eq!(r.observed_time_unix_nano, 7);
    assert_eq!(
        r.trace_id,
        [
            0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
            0x47, 0x36
        ]
    );
    assert_eq!(r.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
}

#[test]
fn ids_that_are_not_w3c_ones_are_left_out_of_the_record() {
    for (trace, span) in [
        ("00000000000000000000000000000000", "00f067aa0ba902b7"),
        ("4bf92f3577b34da6a3ce929d0e0e473", "00f067aa0ba902b7"),
        ("zzf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
    ] {
        let line = format!(
            r#"{{"seq":1,"breaker":{{"to":"closed"}},"stream":{{"trace_id":"{trace}","span_id":"{span}"}}}}"#
        );
        let r = log_record(&line, 0);
        assert!(r.trace_id.is_empty() && r.span_id.is_empty(), "{line}");
        // Still an attribute: it is what the call carried.
        assert_eq!(
            by_key(&r.attributes)["stream.trace_id"],
            format!("{trace:?}")
        );
        assert_eq!(r.severity_number, SeverityNumber::Info as i32);
    }
    let big = log_record(r#"{"seq":18446744073709551615,"x":1.5}"#, 0);
    let a = by_key(&big.attributes);
    assert_eq!(a["seq"], r#""18446744073709551615""#);
    assert_eq!(a["x"], "1.5");
}

#[test]
fn the_cursor_survives_a_round_trip_and_a_bad_file_is_an_error() {
    let dir = std::env::temp_dir().join(format!(
        "agent-cursor-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    fs::create_dir_all(&dir).unwrap();
    assert_eq!(read_cursor(&dir).unwrap(), None);
    write_cursor(&dir, 42).unwrap();
    assert_eq!(read_cursor(&dir).unwrap(), Some(42));
    write_cursor(&dir, 43).unwrap();
    assert_eq!(read_cursor(&dir).unwrap(), Some(43));
    assert!(!dir.join(format!("{CURSOR_FILE}.tmp")).exists());
    fs::write(dir.join(CURSOR_FILE), "4x\n").unwrap();
    assert!(read_cursor(&dir).is_err());
    // Where the exporter starts: the cursor, unless it is gone, bad, or past the journal.
    assert_eq!(start_seq(Ok(Some(43)), 42), 43);
    assert_eq!(start_seq(Ok(Some(10)), 42), 10);
    assert_eq!(start_seq(Ok(None), 42), 1);
    assert_eq!(start_seq(Ok(Some(44)), 42), 1);
    assert_eq!(start_seq(read_cursor(&dir), 42), 1);
    fs::remove_dir_all(&dir).unwrap();
}
