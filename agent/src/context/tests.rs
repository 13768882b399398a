#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use serde_json::{Value, json};

use super::*;

const NOW: u64 = 1_700_000_000;

fn extractor(toml: &str) -> Extractor {
    let config: ContextConfig = toml::from_str(toml).unwrap();
    Extractor::new(&config).unwrap()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_str(value).unwrap());
    }
    map
}

/// An unsigned token (`alg: none`) with these claims: never verified.
fn unsigned_token(claims: &Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn claims(sub: &str, verified: bool) -> Option<Arc<Claims>> {
    Some(Arc::new(Claims {
        values: BTreeMap::from([("sub".to_owned(), json!(sub))]),
        verified,
        expired: false,
    }))
}

#[test]
fn config_defaults_and_unknown_keys() {
    let config: ContextConfig = toml::from_str("").unwrap();
    assert_eq!(config, ContextConfig::default());
    assert_eq!(config.session_header, "x-session-id");
    assert_eq!(config.jwt.claims, ["sub", "scope", "client_id", "exp"]);
    assert_eq!(config.jwt.cache_entries, 4096);
    assert!(!config.jwt.client_key_trusts_unverified_subject);
    assert!(config.jwt.hmac_secret_file.is_none());

    let config: ContextConfig = toml::from_str(
        "session_header = \"x-user-session\"\n\
         [jwt]\nclaims = [\"sub\", \"tenant\"]\ncache_entries = 16\n\
         issuer = \"https://issuer.example\"\n",
    )
    .unwrap();
    assert_eq!(config.session_header, "x-user-session");
    assert_eq!(config.jwt.claims, ["sub", "tenant"]);
    assert_eq!(config.jwt.cache_entries, 16);
    assert_eq!(config.jwt.audience, None);

    assert!(toml::from_str::<ContextConfig>("sesion_header = \"x\"").is_err());
    assert!(toml::from_str::<ContextConfig>("[jwt]\nsecret = \"x\"").is_err());
}

#[test]
fn bad_session_header_name_is_an_error() {
    let config = ContextConfig {
        session_header: "not a header".to_owned(),
        ..ContextConfig::default()
    };
    let err = Extractor::new(&config).unwrap_err();
    assert!(matches!(err, ContextError::SessionHeader { .. }));
    assert!(err.to_string().contains("not a header"), "{err}");
}

#[test]
fn session_id_default_and_custom_header() {
    let ex = extractor("");
    let ctx = ex.extract(&headers(&[("x-session-id", "abc-123")]), NOW);
    assert_eq!(ctx.session_id.as_deref(), Some("abc-123"));
    // Header names are case-insensitive, in the configuration too.
    let ex = extractor("session_header = \"X-User-Session\"");
    let ctx = ex.extract(
        &headers(&[("x-user-session", "s1"), ("x-session-id", "other")]),
        NOW,
    );
    assert_eq!(ctx.session_id.as_deref(), Some("s1"));
    let ctx = ex.extract(&headers(&[("x-session-id", "other")]), NOW);
    assert_eq!(ctx.session_id, None);
    // Empty: no session, not an invalid one.
    let ctx = ex.extract(&headers(&[("x-user-session", "")]), NOW);
    assert_eq!(ctx.session_id, None);
    assert_eq!(ex.stats().invalid_session_ids, 0);
}

#[test]
fn oversize_or_non_utf8_session_id_is_ignored_and_counted() {
    let ex = extractor("");
    let longest = "s".repeat(MAX_SESSION_ID);
    let ctx = ex.extract(&headers(&[("x-session-id", &longest)]), NOW);
    assert_eq!(ctx.session_id.as_deref(), Some(longest.as_str()));

    let oversize = "s".repeat(MAX_SESSION_ID + 1);
    let ctx = ex.extract(&headers(&[("x-session-id", &oversize)]), NOW);
    assert_eq!(ctx.session_id, None);
    assert_eq!(ex.stats().invalid_session_ids, 1);

    let mut map = HeaderMap::new();
    map.insert("x-session-id", HeaderValue::from_bytes(b"caf\xe9").unwrap());
    assert_eq!(ex.extract(&map, NOW).session_id, None);
    assert_eq!(ex.stats().invalid_session_ids, 2);

    // UTF-8 beyond ASCII is kept.
    let mut map = HeaderMap::new();
    map.insert(
        "x-session-id",
        HeaderValue::from_bytes("café".as_bytes()).unwrap(),
    );
    assert_eq!(ex.extract(&map, NOW).session_id.as_deref(), Some("café"));
}

#[test]
fn client_key_rules() {
    // Verified subject first.
    let ctx = RequestContext {
        session_id: Some("abc".to_owned()),
        claims: claims("user-1", true),
        ..RequestContext::default()
    };
    assert_eq!(
        ctx.client_key(),
        Some(ClientKey::Subject("user-1".to_owned()))
    );
    assert_eq!(ctx.client_key().unwrap().to_string(), "sub:user-1");

    // An unverified subject is forgeable: the session id instead, else nobody.
    let ctx = RequestContext {
        session_id: Some("abc".to_owned()),
        claims: claims("user-1", false),
        ..RequestContext::default()
    };
    assert_eq!(ctx.client_key(), Some(ClientKey::Session("abc".to_owned())));
    assert_eq!(ctx.client_key().unwrap().to_string(), "session:abc");
    let ctx = RequestContext {
        claims: claims("user-1", false),
        ..RequestContext::default()
    };
    assert_eq!(ctx.client_key(), None);

    // ...unless the configuration trusts it.
    let ctx = RequestContext {
        session_id: Some("abc".to_owned()),
        claims: claims("user-1", false),
        trust_unverified_subject: true,
        ..RequestContext::default()
    };
    assert_eq!(
        ctx.client_key(),
        Some(ClientKey::Subject("user-1".to_owned()))
    );

    // A verified token without a usable subject falls back to the session.
    let ctx = RequestContext {
        session_id: Some("abc".to_owned()),
        claims: claims("", true),
        ..RequestContext::default()
    };
    assert_eq!(ctx.client_key(), Some(ClientKey::Session("abc".to_owned())));
    let ctx = RequestContext {
        session_id: Some("abc".to_owned()),
        claims: Some(Arc::new(Claims {
            values: BTreeMap::from([("sub".to_owned(), json!(42))]),
            verified: true,
            expired: false,
        })),
        ..RequestContext::default()
    };
    assert_eq!(ctx.client_key(), Some(ClientKey::Session("abc".to_owned())));
    assert_eq!(RequestContext::default().client_key(), None);

    assert_eq!(
        serde_json::to_string(&ClientKey::Subject("u".to_owned())).unwrap(),
        "\"sub:u\""
    );
}

#[test]
fn client_key_through_the_extractor() {
    let token = unsigned_token(&json!({"sub": "admin"}));
    let bearer = format!("Bearer {token}");
    let request = headers(&[("authorization", bearer.as_str()), ("x-session-id", "abc")]);
    let ex = extractor("");
    let ctx = ex.extract(&request, NOW);
    assert!(!ctx.claims.as_ref().unwrap().verified);
    assert_eq!(ctx.client_key(), Some(ClientKey::Session("abc".to_owned())));

    let ex = extractor("[jwt]\nclient_key_trusts_unverified_subject = true");
    let ctx = ex.extract(&request, NOW);
    assert_eq!(
        ctx.client_key(),
        Some(ClientKey::Subject("admin".to_owned()))
    );
}

#[test]
fn extract_everything_and_serialize() {
    let ex = extractor("");
    let token = unsigned_token(&json!({"sub": "u1", "exp": NOW - 1, "email": "x@example.com"}));
    let bearer = format!("Bearer {token}");
    let ctx = ex.extract(
        &headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-session-id", "abc"),
            ("authorization", bearer.as_str()),
        ]),
        NOW,
    );
    assert_eq!(
        serde_json::to_value(&ctx).unwrap(),
        json!({
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "span_id": "00f067aa0ba902b7",
            "trace_format": "w3c",
            "session_id": "abc",
            "jwt_claims": {"sub": "u1", "exp": NOW - 1, "verified": false, "expired": true},
        })
    );
    assert!(!format!("{ctx:?}").contains(&token));

    // Nothing: an empty object.
    let empty = ex.extract(&HeaderMap::new(), NOW);
    assert_eq!(serde_json::to_string(&empty).unwrap(), "{}");

    let mut map = HeaderMap::new();
    map.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
    assert!(ex.extract(&map, NOW).claims.is_none());
    let stats = ex.stats();
    assert_eq!(stats.malformed_tokens, 1);
    assert_eq!(stats.tokens_unverified, 1);
    assert_eq!(
        serde_json::to_value(stats).unwrap()["malformed_tokens"],
        json!(1)
    );
}

#[test]
fn extractor_is_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Extractor>();
    assert_send_sync::<RequestContext>();
}
