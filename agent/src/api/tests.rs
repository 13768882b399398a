#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

#[test]
fn a_non_loopback_api_needs_a_token_or_an_explicit_yes() {
    let mut c = ApiConfig {
        listen: "0.0.0.0:9470".parse().unwrap(),
        ..ApiConfig::default()
    };
    assert!(matches!(c.check(), Err(ApiConfigError::Unprotected(_))));
    c.insecure_non_loopback = true;
    assert!(c.check().unwrap().is_none());
    c.insecure_non_loopback = false;
    let dir = std::env::temp_dir().join(format!("agent-api-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "  s3cret\n").unwrap();
    c.admin_token_file = Some(token.clone());
    assert_eq!(c.check().unwrap().as_deref(), Some(&b"s3cret"[..]));
    std::fs::write(&token, "\n").unwrap();
    assert!(matches!(c.check(), Err(ApiConfigError::EmptyToken(_))));
    c.admin_token_file = Some(dir.join("missing"));
    assert!(matches!(c.check(), Err(ApiConfigError::Token { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
    // Loopback (the default) needs neither.
    assert!(ApiConfig::default().check().unwrap().is_none());
}
