#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};

use super::*;
use crate::context::{ContextConfig, ContextError, Extractor};

// Made for these tests with `openssl genrsa -traditional 2048` / `openssl rsa -pubout`,
// `openssl ecparam -genkey -name prime256v1 | openssl pkcs8 -topk8 -nocrypt` / `openssl ec
// -pubout`, `openssl genpkey -algorithm ed25519` / `openssl pkey -pubout`.
const RSA_PRIVATE: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEA0CkyYHmVJt7fW5YSrlBrplL7KXdEdgh/e96k1ofpuMKd8O7w
zpCa4yO7dgZ+3/CV3E4DUXFw6v8WDIP+nyCp+kilvTR2Z5RfikmhGuNfk6y0LuT4
a9tm0oZcM1uke1Z2k+L+PONCmTg1b7DbMiyaE4y1DmZEtUGEW0uKGYf/3LR+1tSb
rDlgSAv58NTb9mVAZW8OEklveWpjJCtET/4PBYip6LkLEBS6Zq0VwYC7LxpXByEg
xXnkQCmE4hEq1lYS9SFwiHKS9gbxMn+JFDBU9E+H3fU2tyUX/Ks9QVLkPproWusM
zomXoAPfklxF58Kk1U4lE9drum7xeXmF2Q8kBwIDAQABAoIBAEXYBNCtCtgTgOMk
jBkT38LbZe2IWJ64BDpmPm3DBa9aEY+FRKQyjd23oA8eZ9Swzz+vp1pc01PuChJh
+X2gAph5Zq8A2tevR41JXjZ84xVUJdL0PcxGvg3WSjprPdmqbbf6Om7om/B4FSno
L+v6XipAFIID23rrxEKzql8drEJ7a+vBurmso3Grwrc6b03zz2uxr5WfmlJTiYSH
M8bVIo2t55rW7L/4JvtOjs8E90MnNawoyH3X7eQfxuIAWjGusnCS7DCrKtIYkdTM
+b4hZVfuq0DXB5nB157ltl69RXNFLU4HE3qONllae3sB/8D2856MT+3HSZEaJWuJ
V3510y0CgYEA/EbGHxalnbFZapCXZ+IIGS5cykRgOtWn7s6g7jyjOGUiJ5CSvkLY
DuE/rhY2McHjw61GsVfc6oRb+rMf3mJO+2woxctYP41fGpF6iYokj/zeF9XUT0CR
vdijfLWc1y2QUvJqKHe3E1rWT3mk84IZuYfEtVj7qwhGlmRq7r3N3LUCgYEA0zu7
f1gz28FAjVO8IPgdCWrmYhrKwb8UOShSErcNiw4hv6jT6LqfaVlYQwrwH1UY5wFq
ep7TEqKSqSLQlSOfwb+XTXB0P4V2/t1ug6UKvsZrOXjHPSB9df3CaOTwYXPZxKeR
s+s7Nq0Siz3ye6mNmbRk3pPQkQ74agLJq3P5b0sCgYBc4LGQQIY4yFJjKViUpmLU
4nzG+uVyw7ZP9ULKcwikepdYeaGM6o8g60zGiubo6rkwEVs1b2Ol85Tpd4kEFq19
YxSfvX1/6ExbO7QhbvqHCFG79L11cBA4FMob38Eed2frIdRzkZ+VQJwmJmLUQ9G0
vIdvPJNrJGDYfZ/gxYBFAQKBgFM/9myA8adJacyJVNrVjnQYuoWts31adnj0aCxS
ErdcMXbc7e+KJauad8uscuiWXEMm7rU3BU8R3aVlQDmXGa59eP8fM+GZE0XtNVIS
6MI5Zyb2b+eqd2faRBWdLRPrWcdEl4sGSYcJ/QX9uyR7tX//dcW3EfspoEP/p0W4
ZnUzAoGBAKQd6rv/dZnzWeF6g6hLBJZxiP2YD4Q9zUtljc6UgGOXbVmOPHPZIi2H
DNTcYO4rAWyMsdXT99euEbJ7JjgOX+EqAu1CVeo124emBliOGJFAZPDZcQgS+7If
PCSW2K3yQkhL5/MNwvkm+hqorgWcLHdhHgD3uGxibMlqwCgcrh2o
-----END RSA PRIVATE KEY-----
";
const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA0CkyYHmVJt7fW5YSrlBr
plL7KXdEdgh/e96k1ofpuMKd8O7wzpCa4yO7dgZ+3/CV3E4DUXFw6v8WDIP+nyCp
+kilvTR2Z5RfikmhGuNfk6y0LuT4a9tm0oZcM1uke1Z2k+L+PONCmTg1b7DbMiya
E4y1DmZEtUGEW0uKGYf/3LR+1tSbrDlgSAv58NTb9mVAZW8OEklveWpjJCtET/4P
BYip6LkLEBS6Zq0VwYC7LxpXByEgxXnkQCmE4hEq1lYS9SFwiHKS9gbxMn+JFDBU
9E+H3fU2tyUX/Ks9QVLkPproWusMzomXoAPfklxF58Kk1U4lE9drum7xeXmF2Q8k
BwIDAQAB
-----END PUBLIC KEY-----
";
const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgg9JOjSN0nGXM/2dF
/td/hcm6GH0TU1po9BNs6LE15KihRANCAATvrJSzZnQLL7ZMw0Dyll2U5hYWWNeP
8r5+SviJVb9Z0uTQCx+g6i8CXqNxb+GdMa8RxjLAmkwT4lrpJLFM96Iy
-----END PRIVATE KEY-----
";
const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE76yUs2Z0Cy+2TMNA8pZdlOYWFljX
j/K+fkr4iVW/WdLk0AsfoOovAl6jcW/hnTGvEcYywJpME+Ja6SSxTPeiMg==
-----END PUBLIC KEY-----
";
/// Another P-256 key, to sign with the wrong key.
const OTHER_EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg3EMfdz7k8vFNgxnT
puCy2BAb05rns/LdqC5CWOO2NqKhRANCAARpxniEvMBJty6ylatNdUsRaHvtvRc9
7O366BxSbeO/PJs017SI9zY8njAFj9Seg2aGIB1KDaAB2ENM9knagxA7
-----END PRIVATE KEY-----
";
const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIKMCOsie8EdI4tOsIEu5Wv13VVd9djyDHysTgXQr6d/x
-----END PRIVATE KEY-----
";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA36l0kWFNukZZalzOVifvb4wwFKrE5AiMcO8JRoXWIPQ=
-----END PUBLIC KEY-----
";

const SECRET: &[u8] = b"a test secret of some length";
const NOW: u64 = 1_700_000_000;

/// A file of its own under the temp dir (tests run in parallel).
fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "agent-context-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&path, contents).unwrap();
    path
}

fn hmac_config() -> JwtConfig {
    let mut with_newline = SECRET.to_vec();
    with_newline.push(b'\n');
    JwtConfig {
        hmac_secret_file: Some(temp_file("secret", &with_newline)),
        ..JwtConfig::default()
    }
}

fn pem_config(pem: &str) -> JwtConfig {
    JwtConfig {
        public_key_pem_file: Some(temp_file("key.pem", pem.as_bytes())),
        ..JwtConfig::default()
    }
}

/// Keys are read once, when the extractor is made: the files can go right after.
fn remove_files(config: &JwtConfig) {
    for path in [
        &config.hmac_secret_file,
        &config.public_key_pem_file,
        &config.jwks_file,
    ]
    .into_iter()
    .flatten()
    {
        let _ = fs::remove_file(path);
    }
}

fn verifier(config: &JwtConfig) -> JwtExtractor {
    let jwt = JwtExtractor::new(config);
    remove_files(config);
    jwt.unwrap()
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(SECRET),
    )
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap()
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap()
}

/// `base64url(header).base64url(payload).signature`, by hand.
fn raw_token(header: &Value, payload: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string())
    )
}

fn user_claims() -> Value {
    json!({"sub": "user-1", "scope": "read write", "exp": NOW + 3600, "email": "u@example.com"})
}

fn claims_of(jwt: &JwtExtractor, token: &str, now: u64) -> Arc<Claims> {
    jwt.claims(&bearer(token), now).expect("claims")
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Relaxed)
}

#[test]
fn hs256_verifies_with_secret_file() {
    let jwt = verifier(&hmac_config());
    let claims = claims_of(&jwt, &hs256(&user_claims()), NOW);
    assert!(claims.verified);
    assert!(!claims.expired);
    assert_eq!(claims.values["sub"], json!("user-1"));
    assert_eq!(claims.values["scope"], json!("read write"));
    assert_eq!(claims.values["exp"], json!(NOW + 3600));
    assert_eq!(count(&jwt.counters.tokens_verified), 1);

    let hs512 = sign(
        Algorithm::HS512,
        None,
        &user_claims(),
        &EncodingKey::from_secret(SECRET),
    );
    assert!(claims_of(&jwt, &hs512, NOW).verified);
}

#[test]
fn rs256_and_ps256_verify_with_pem_key() {
    let jwt = verifier(&pem_config(RSA_PUBLIC));
    let key = rsa_key();
    for alg in [Algorithm::RS256, Algorithm::PS256] {
        let token = sign(alg, None, &user_claims(), &key);
        let claims = claims_of(&jwt, &token, NOW);
        assert!(claims.verified, "{alg:?}");
        assert_eq!(claims.subject(), Some("user-1"));
    }
    assert_eq!(count(&jwt.counters.tokens_verified), 2);
}

#[test]
fn es256_verifies_with_pem_key() {
    let jwt = verifier(&pem_config(EC_PUBLIC));
    let token = sign(Algorithm::ES256, None, &user_claims(), &ec_key());
    assert!(claims_of(&jwt, &token, NOW).verified);
}

#[test]
fn eddsa_verifies_with_pem_key() {
    let jwt = verifier(&pem_config(ED_PUBLIC));
    let key = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
    let token = sign(Algorithm::EdDSA, None, &user_claims(), &key);
    assert!(claims_of(&jwt, &token, NOW).verified);
}

#[test]
fn bad_signature_is_not_verified() {
    let jwt = verifier(&hmac_config());
    let other = sign(
        Algorithm::HS256,
        None,
        &user_claims(),
        &EncodingKey::from_secret(b"another secret"),
    );
    let claims = claims_of(&jwt, &other, NOW);
    assert!(!claims.verified);
    assert_eq!(claims.subject(), Some("user-1"));
    assert_eq!(count(&jwt.counters.bad_signatures), 1);

    // A payload swapped under a good signature.
    let good = hs256(&user_claims());
    let forged_payload = URL_SAFE_NO_PAD.encode(json!({"sub": "admin"}).to_string());
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    let claims = claims_of(&jwt, &forged, NOW);
    assert!(!claims.verified);
    assert_eq!(claims.subject(), Some("admin"));
    assert_eq!(count(&jwt.counters.bad_signatures), 2);
    assert_eq!(count(&jwt.counters.tokens_unverified), 2);
    assert_eq!(count(&jwt.counters.tokens_verified), 0);
}

#[test]
fn rsa_signature_checked_against_the_pem_key() {
    let jwt = verifier(&pem_config(RSA_PUBLIC));
    let token = sign(Algorithm::RS256, None, &user_claims(), &rsa_key());
    // Flip one character of the signature.
    let (message, signature) = token.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    let tampered = format!("{message}.{flipped}{}", &signature[1..]);
    assert!(!claims_of(&jwt, &tampered, NOW).verified);
    assert_eq!(count(&jwt.counters.bad_signatures), 1);
}

#[test]
fn algorithm_confusion_is_refused() {
    // An HS256 token whose "secret" is the RSA public key: an RSA key never takes HMAC.
    let jwt = verifier(&pem_config(RSA_PUBLIC));
    let token = sign(
        Algorithm::HS256,
        None,
        &user_claims(),
        &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
    );
    assert!(!claims_of(&jwt, &token, NOW).verified);
    assert_eq!(count(&jwt.counters.unsupported_algorithms), 1);
    // Nor does an HMAC secret take RS256.
    let jwt = verifier(&hmac_config());
    let token = sign(Algorithm::RS256, None, &user_claims(), &rsa_key());
    assert!(!claims_of(&jwt, &token, NOW).verified);
    assert_eq!(count(&jwt.counters.unsupported_algorithms), 1);
}

#[test]
fn alg_none_is_never_verified() {
    let payload = json!({"sub": "admin", "exp": NOW + 60});
    for config in [hmac_config(), pem_config(RSA_PUBLIC), JwtConfig::default()] {
        let jwt = verifier(&config);
        for alg in ["none", "None", "NONE"] {
            for signature in ["", "c2lnbmF0dXJl"] {
                let token = raw_token(&json!({"alg": alg, "typ": "JWT"}), &payload, signature);
                let claims = claims_of(&jwt, &token, NOW);
                assert!(!claims.verified, "{alg} {signature:?}");
                assert_eq!(claims.subject(), Some("admin"));
            }
        }
        assert_eq!(count(&jwt.counters.malformed_tokens), 0);
        assert_eq!(count(&jwt.counters.tokens_verified), 0);
        let unsigned = if config.hmac_secret_file.is_some() || config.public_key_pem_file.is_some()
        {
            6
        } else {
            0
        };
        assert_eq!(count(&jwt.counters.unsigned_tokens), unsigned);
    }
}

#[test]
fn expired_is_reported_beside_a_valid_signature() {
    let jwt = verifier(&hmac_config());
    let token = hs256(&json!({"sub": "user-1", "exp": NOW - 10}));
    let claims = claims_of(&jwt, &token, NOW);
    assert!(claims.verified);
    assert!(claims.expired);

    // `exp` equal to now has expired; one second later has not.
    let token = hs256(&json!({"sub": "user-1", "exp": NOW}));
    assert!(claims_of(&jwt, &token, NOW).expired);
    assert!(!claims_of(&jwt, &token, NOW - 1).expired);

    // No exp: never expired.
    let token = hs256(&json!({"sub": "user-1"}));
    assert!(!claims_of(&jwt, &token, u64::MAX).expired);

    // An exp that is not a NumericDate counts as expired; a fractional one is floored.
    let token = hs256(&json!({"sub": "user-1", "exp": "tomorrow"}));
    let claims = claims_of(&jwt, &token, NOW);
    assert!(claims.verified && claims.expired);
    let token = hs256(&json!({"sub": "user-1", "exp": -5}));
    assert!(claims_of(&jwt, &token, 0).expired);
    let token = hs256(&json!({"sub": "user-1", "exp": (NOW as f64) + 0.5}));
    assert!(claims_of(&jwt, &token, NOW).expired);
    assert!(!claims_of(&jwt, &token, NOW - 1).expired);
}

#[test]
fn malformed_tokens_are_counted_not_errors() {
    let not_object = URL_SAFE_NO_PAD.encode("[1, 2]");
    let object = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#);
    let not_json = URL_SAFE_NO_PAD.encode("not json");
    let good = hs256(&user_claims());
    let cases = [
        "Bearer abc".to_owned(),
        "Bearer a.b.c".to_owned(),
        "Bearer ###.###.###".to_owned(),
        format!("Bearer {good}.extra"),
        "Bearer a.b.c.d".to_owned(),
        "Bearer ".to_owned(),
        "Bearer".to_owned(),
        "Bearer ..".to_owned(),
        format!("Bearer {not_object}.{object}.c2ln"),
        format!("Bearer {object}.{not_object}.c2ln"),
        format!("Bearer {object}.{not_json}.c2ln"),
        format!("Bearer {object}.{object}.not+base64url"),
        format!("Bearer {object}.{object}.abcde"),
        // Padded parts are not JWS compact serialization.
        format!("Bearer {object}=.{object}.c2ln"),
        // No alg; a kid that is not a string.
        format!(
            "Bearer {}.{object}.",
            URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT"}"#)
        ),
        format!(
            "Bearer {}.{object}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":7}"#)
        ),
    ];
    for config in [JwtConfig::default(), hmac_config()] {
        let jwt = verifier(&config);
        for (i, case) in cases.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, HeaderValue::from_str(case).unwrap());
            assert!(jwt.claims(&headers, NOW).is_none(), "{case}");
            assert_eq!(
                count(&jwt.counters.malformed_tokens),
                i as u64 + 1,
                "{case}"
            );
        }
        assert_eq!(count(&jwt.counters.tokens_verified), 0);
        assert_eq!(count(&jwt.counters.tokens_unverified), 0);
    }
}

#[test]
fn other_schemes_and_scheme_case() {
    let jwt = verifier(&hmac_config());
    let mut headers = HeaderMap::new();
    assert!(jwt.claims(&headers, NOW).is_none());
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwdw=="),
    );
    assert!(jwt.claims(&headers, NOW).is_none());
    headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearerish x.y.z"));
    assert!(jwt.claims(&headers, NOW).is_none());
    assert_eq!(count(&jwt.counters.malformed_tokens), 0);

    let token = hs256(&user_claims());
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("{scheme}  {token} ")).unwrap(),
        );
        assert!(jwt.claims(&headers, NOW).unwrap().verified, "{scheme}");
    }
}

#[test]
fn only_allowlisted_claims_are_kept() {
    let payload = json!({
        "sub": "user-1", "scope": "read", "client_id": "app", "exp": NOW + 5,
        "email": "u@example.com", "name": "User One", "tenant": "t1",
    });
    let jwt = verifier(&hmac_config());
    let claims = claims_of(&jwt, &hs256(&payload), NOW);
    let names: Vec<&str> = claims.values.keys().map(String::as_str).collect();
    assert_eq!(names, ["client_id", "exp", "scope", "sub"]);

    let config = JwtConfig {
        claims: vec!["tenant".to_owned(), "missing".to_owned()],
        ..hmac_config()
    };
    let jwt = verifier(&config);
    let claims = claims_of(&jwt, &hs256(&payload), NOW + 10);
    assert_eq!(
        claims.values,
        BTreeMap::from([("tenant".to_owned(), json!("t1"))])
    );
    // Expiry is computed from `exp` even when it is not kept.
    assert!(claims.expired);
    assert_eq!(claims.subject(), None);
}

#[test]
fn no_key_decodes_without_verifying() {
    let jwt = verifier(&JwtConfig::default());
    let claims = claims_of(&jwt, &hs256(&user_claims()), NOW);
    assert!(!claims.verified);
    assert_eq!(claims.subject(), Some("user-1"));
    assert_eq!(count(&jwt.counters.tokens_unverified), 1);
    assert_eq!(count(&jwt.counters.bad_signatures), 0);
}

#[test]
fn raw_token_never_in_debug_or_json() {
    let config = ContextConfig {
        jwt: hmac_config(),
        ..ContextConfig::default()
    };
    let extractor = Extractor::new(&config).unwrap();
    remove_files(&config.jwt);
    let token = hs256(&user_claims());
    let signature = token.rsplit('.').next().unwrap();
    let payload = token.split('.').nth(1).unwrap();
    let ctx = extractor.extract(&bearer(&token), NOW);
    assert!(ctx.claims.as_ref().unwrap().verified);
    let debug = format!("{ctx:?}");
    let pretty = format!("{ctx:#?}");
    let json = serde_json::to_string(&ctx).unwrap();
    for output in [&debug, &pretty, &json] {
        assert!(!output.contains(&token), "{output}");
        assert!(!output.contains(signature), "{output}");
        assert!(!output.contains(payload), "{output}");
    }
    let stats = format!("{extractor:?}");
    assert!(!stats.contains(signature));
    // And the claims are there.
    assert_eq!(
        serde_json::from_str::<Value>(&json).unwrap()["jwt_claims"],
        json!({"sub": "user-1", "scope": "read write", "exp": NOW + 3600,
               "verified": true, "expired": false})
    );
}

#[test]
fn cache_hit_keeps_verdict_and_recomputes_expiry() {
    let jwt = verifier(&pem_config(RSA_PUBLIC));
    let good = sign(
        Algorithm::RS256,
        None,
        &json!({"sub": "user-1", "exp": NOW + 60}),
        &rsa_key(),
    );
    let first = claims_of(&jwt, &good, NOW);
    assert!(first.verified && !first.expired);
    assert_eq!(count(&jwt.counters.cache_misses), 1);
    let second = claims_of(&jwt, &good, NOW + 1);
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(count(&jwt.counters.cache_hits), 1);
    let later = claims_of(&jwt, &good, NOW + 60);
    assert!(later.verified && later.expired);
    assert_eq!(later.values, first.values);
    assert_eq!(count(&jwt.counters.cache_hits), 2);
    assert_eq!(count(&jwt.counters.tokens_verified), 3);

    // A bad verdict is cached too, and counted on every request.
    let forged = format!("{}x", &good[..good.len() - 1]);
    let forged = if forged == good {
        format!("{}y", &good[..good.len() - 1])
    } else {
        forged
    };
    for _ in 0..3 {
        assert!(!claims_of(&jwt, &forged, NOW).verified);
    }
    assert_eq!(count(&jwt.counters.bad_signatures), 3);
    assert_eq!(count(&jwt.counters.cache_hits), 4);
    assert_eq!(count(&jwt.counters.cache_misses), 2);
    assert_eq!(jwt.cache.len(), 2);
}

#[test]
fn cache_is_bounded() {
    let config = JwtConfig {
        cache_entries: 3,
        ..hmac_config()
    };
    let jwt = verifier(&config);
    for i in 0..10 {
        let token = hs256(&json!({"sub": format!("user-{i}")}));
        assert!(claims_of(&jwt, &token, NOW).verified);
        assert!(jwt.cache.len() <= 3);
    }
    assert_eq!(count(&jwt.counters.cache_misses), 10);

    let config = JwtConfig {
        cache_entries: 0,
        ..hmac_config()
    };
    let jwt = verifier(&config);
    let token = hs256(&user_claims());
    for _ in 0..2 {
        assert!(claims_of(&jwt, &token, NOW).verified);
    }
    assert_eq!(count(&jwt.counters.cache_hits), 0);
    assert_eq!(jwt.cache.len(), 0);
}

fn jwk(key: &EncodingKey, alg: Algorithm, kid: Option<&str>, declare_alg: bool) -> Value {
    let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
    jwk.common.key_id = kid.map(str::to_owned);
    if !declare_alg {
        jwk.common.key_algorithm = None;
    }
    serde_json::to_value(&jwk).unwrap()
}

fn jwks_config(keys: &[Value]) -> JwtConfig {
    let set = json!({ "keys": keys });
    JwtConfig {
        jwks_file: Some(temp_file("jwks.json", set.to_string().as_bytes())),
        ..JwtConfig::default()
    }
}

#[test]
fn jwks_selects_the_key_by_kid() {
    let rsa = rsa_key();
    let ec = ec_key();
    let jwt = verifier(&jwks_config(&[
        jwk(&rsa, Algorithm::RS256, Some("rsa-1"), false),
        jwk(&ec, Algorithm::ES256, Some("ec-1"), true),
        // Skipped: an encryption key.
        json!({"kty": "oct", "use": "enc", "kid": "enc-1", "k": "c2VjcmV0"}),
    ]));
    let claims = user_claims();
    assert!(
        claims_of(
            &jwt,
            &sign(Algorithm::RS256, Some("rsa-1"), &claims, &rsa),
            NOW
        )
        .verified
    );
    // The RSA key declares no alg: PS256 is fine too.
    assert!(
        claims_of(
            &jwt,
            &sign(Algorithm::PS256, Some("rsa-1"), &claims, &rsa),
            NOW
        )
        .verified
    );
    assert!(
        claims_of(
            &jwt,
            &sign(Algorithm::ES256, Some("ec-1"), &claims, &ec),
            NOW
        )
        .verified
    );
    assert_eq!(count(&jwt.counters.tokens_verified), 3);

    // The wrong key for the kid: a bad signature.
    let other = EncodingKey::from_ec_pem(OTHER_EC_PRIVATE.as_bytes()).unwrap();
    let wrong = sign(Algorithm::ES256, Some("ec-1"), &json!({"sub": "x"}), &other);
    assert!(!claims_of(&jwt, &wrong, NOW).verified);
    assert_eq!(count(&jwt.counters.bad_signatures), 1);

    // Unknown kid, and no kid with several keys in the set.
    let unknown = sign(Algorithm::RS256, Some("rsa-2"), &claims, &rsa);
    assert!(!claims_of(&jwt, &unknown, NOW).verified);
    assert_eq!(count(&jwt.counters.unknown_key_ids), 1);
    let no_kid = sign(Algorithm::ES256, None, &claims, &ec);
    assert!(!claims_of(&jwt, &no_kid, NOW).verified);
    assert_eq!(count(&jwt.counters.unknown_key_ids), 2);

    // The key for the kid does not take the token's algorithm.
    let mismatch = sign(
        Algorithm::HS256,
        Some("ec-1"),
        &claims,
        &EncodingKey::from_secret(SECRET),
    );
    assert!(!claims_of(&jwt, &mismatch, NOW).verified);
    assert_eq!(count(&jwt.counters.unsupported_algorithms), 1);
}

#[test]
fn jwks_of_one_key_serves_tokens_without_kid() {
    let ec = ec_key();
    let jwt = verifier(&jwks_config(&[jwk(
        &ec,
        Algorithm::ES256,
        Some("ec-1"),
        true,
    )]));
    let token = sign(Algorithm::ES256, None, &user_claims(), &ec);
    assert!(claims_of(&jwt, &token, NOW).verified);
}

#[test]
fn jwk_alg_restricts_the_key() {
    let rsa = rsa_key();
    let jwt = verifier(&jwks_config(&[jwk(
        &rsa,
        Algorithm::RS256,
        Some("rsa-1"),
        true,
    )]));
    let ps256 = sign(Algorithm::PS256, Some("rsa-1"), &user_claims(), &rsa);
    assert!(!claims_of(&jwt, &ps256, NOW).verified);
    assert_eq!(count(&jwt.counters.unsupported_algorithms), 1);
}

#[test]
fn pem_key_and_jwks_together() {
    // The HMAC secret serves tokens whose kid the JWKS does not know.
    let ec = ec_key();
    let config = JwtConfig {
        jwks_file: jwks_config(&[jwk(&ec, Algorithm::ES256, Some("ec-1"), true)]).jwks_file,
        ..hmac_config()
    };
    let jwt = verifier(&config);
    let hs = sign(
        Algorithm::HS256,
        Some("hmac"),
        &user_claims(),
        &EncodingKey::from_secret(SECRET),
    );
    assert!(claims_of(&jwt, &hs, NOW).verified);
    let es = sign(Algorithm::ES256, Some("ec-1"), &user_claims(), &ec);
    assert!(claims_of(&jwt, &es, NOW).verified);
}

#[test]
fn issuer_and_audience_when_configured() {
    let config = JwtConfig {
        issuer: Some("https://issuer.example".to_owned()),
        audience: Some("orders".to_owned()),
        ..hmac_config()
    };
    let jwt = verifier(&config);
    let good = json!({"sub": "u", "iss": "https://issuer.example", "aud": ["orders", "billing"]});
    assert!(claims_of(&jwt, &hs256(&good), NOW).verified);
    let single_aud = json!({"sub": "u", "iss": "https://issuer.example", "aud": "orders"});
    assert!(claims_of(&jwt, &hs256(&single_aud), NOW).verified);
    for bad in [
        json!({"sub": "u", "iss": "https://other.example", "aud": "orders"}),
        json!({"sub": "u", "iss": "https://issuer.example", "aud": "billing"}),
        json!({"sub": "u", "aud": "orders"}),
        json!({"sub": "u", "iss": "https://issuer.example"}),
    ] {
        let claims = claims_of(&jwt, &hs256(&bad), NOW);
        assert!(!claims.verified, "{bad}");
    }
    assert_eq!(count(&jwt.counters.rejected_claims), 4);

    // Without an audience configured, a token's aud is not checked.
    let jwt = verifier(&hmac_config());
    assert!(claims_of(&jwt, &hs256(&json!({"sub": "u", "aud": "anyone"})), NOW).verified);
}

#[test]
fn key_file_errors_name_the_file() {
    let missing = std::env::temp_dir().join("agent-context-no-such-file");
    for config in [
        JwtConfig {
            hmac_secret_file: Some(missing.clone()),
            ..JwtConfig::default()
        },
        JwtConfig {
            public_key_pem_file: Some(missing.clone()),
            ..JwtConfig::default()
        },
        JwtConfig {
            jwks_file: Some(missing.clone()),
            ..JwtConfig::default()
        },
    ] {
        let err = JwtExtractor::new(&config).err().unwrap();
        assert!(matches!(err, ContextError::ReadFile { .. }), "{err:?}");
        assert!(
            err.to_string().contains("agent-context-no-such-file"),
            "{err}"
        );
    }

    let bad = |config: JwtConfig| {
        let result = JwtExtractor::new(&config);
        remove_files(&config);
        result.err().unwrap().to_string()
    };
    let empty = hmac_config();
    fs::write(empty.hmac_secret_file.as_ref().unwrap(), b"\n").unwrap();
    let message = bad(empty.clone());
    assert!(message.contains("is empty"), "{message}");
    assert!(message.contains(&*empty.hmac_secret_file.unwrap().to_string_lossy()));

    let message = bad(pem_config(RSA_PRIVATE));
    assert!(message.contains("private key"), "{message}");
    let message = bad(pem_config("not a key"));
    assert!(message.starts_with("jwt public key file"), "{message}");
    assert!(message.contains("key.pem"), "{message}");

    let garbage = JwtConfig {
        jwks_file: Some(temp_file("jwks.json", b"{not json")),
        ..JwtConfig::default()
    };
    assert!(bad(garbage).contains("jwks.json"));
    let message = bad(jwks_config(&[
        json!({"kty": "oct", "use": "enc", "k": "c2VjcmV0"}),
    ]));
    assert!(message.contains("no usable signing key"), "{message}");
    let message = bad(JwtConfig {
        jwks_file: Some(temp_file("jwks.json", b"[]")),
        ..JwtConfig::default()
    });
    assert!(message.contains("no \"keys\" array"), "{message}");
}
