//! Claims of the `authorization: Bearer` JWT: decoded, filtered to an allowlist, and verified
//! when a key is configured.
//!
//! The raw token is never kept: not in [`Claims`], not in the cache (keyed by a keyed hash of
//! the token), not in a log line. A token that is not a JWT is counted and logged at `debug`
//! without its text; it is the client's problem, not the proxy's.

use std::{
    collections::{BTreeMap, HashMap, hash_map::RandomState},
    hash::BuildHasher as _,
    path::PathBuf,
    str::FromStr as _,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, header::AUTHORIZATION};
use jsonwebtoken::{Algorithm, errors::ErrorKind};
use serde::{Deserialize, Serialize, de::IgnoredAny};
use serde_json::{Map, Value};
use tracing::debug;

use super::{
    ContextError,
    keys::{KeySet, NoKey},
};

/// `[context.jwt]`: which claims to keep and how to verify them.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Claims kept in the context; others are dropped. The client key needs `sub`.
    pub claims: Vec<String>,
    /// HMAC secret (HS256/384/512): the file's bytes, less a trailing newline.
    pub hmac_secret_file: Option<PathBuf>,
    /// RSA (RS*/PS*), EC P-256/P-384 (ES256/ES384) or Ed25519 (EdDSA) public key, PEM.
    pub public_key_pem_file: Option<PathBuf>,
    /// JSON Web Key Set; a token's `kid` picks the key (with no `kid`, a set of one key is used).
    pub jwks_file: Option<PathBuf>,
    /// When set, a verified token must carry this `iss`, else it counts as not verified.
    pub issuer: Option<String>,
    /// When set, a verified token's `aud` must contain this, else it counts as not verified.
    pub audience: Option<String>,
    /// Verdicts remembered (per distinct token); the cache is emptied when full. 0: none.
    pub cache_entries: usize,
    /// Key the per-client breaker on `sub` even when the signature was not verified. Off by
    /// default: see [`super::RequestContext::client_key`].
    pub client_key_trusts_unverified_subject: bool,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            claims: ["sub", "scope", "client_id", "exp"]
                .map(str::to_owned)
                .to_vec(),
            hmac_secret_file: None,
            public_key_pem_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            cache_entries: 4096,
            client_key_trusts_unverified_subject: false,
        }
    }
}

/// The allowlisted claims of a request's token, and what is known of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Claims {
    #[serde(flatten)]
    pub values: BTreeMap<String, Value>,
    /// A configured key checked the signature (and the issuer and audience, when configured).
    pub verified: bool,
    /// The token has an `exp` at or before the request's time (an `exp` that is not a number
    /// counts as expired). Reported beside `verified`, not folded into it.
    pub expired: bool,
}

impl Claims {
    /// `sub`, when it is a non-empty string (and allowlisted).
    pub fn subject(&self) -> Option<&str> {
        self.values
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub malformed_tokens: AtomicU64,
    pub tokens_verified: AtomicU64,
    pub tokens_unverified: AtomicU64,
    pub bad_signatures: AtomicU64,
    pub unsigned_tokens: AtomicU64,
    pub unknown_key_ids: AtomicU64,
    pub unsupported_algorithms: AtomicU64,
    pub rejected_claims: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
}

/// What verification made of a well-formed token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Verified,
    /// No key is configured: claims are decoded, not verified.
    NoKey,
    /// `alg: none`.
    Unsigned,
    UnknownKid,
    UnsupportedAlgorithm,
    BadSignature,
    /// Signature good, but the issuer or audience is not the configured one.
    RejectedClaims,
}

pub(super) struct JwtExtractor {
    allowlist: Vec<String>,
    keys: KeySet,
    cache: Cache,
    pub counters: Counters,
}

impl JwtExtractor {
    pub fn new(config: &JwtConfig) -> Result<Self, ContextError> {
        // jsonwebtoken 10+ verifies through a process-wide provider. It picks RustCrypto by
        // itself when that is its only crypto feature, but panics at the first verification if
        // another crate in the build also enables aws_lc_rs: choosing it here avoids that. An
        // error means a provider is already installed, which is as good.
        let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
            &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        );
        Ok(Self {
            allowlist: config.claims.clone(),
            keys: KeySet::load(config)?,
            cache: Cache::new(config.cache_entries),
            counters: Counters::default(),
        })
    }

    /// Claims of the request's bearer token; None when there is none or it is malformed.
    pub fn claims(&self, headers: &HeaderMap, now_unix: u64) -> Option<Arc<Claims>> {
        let token = match bearer_token(headers)? {
            Ok(token) => token,
            Err(reason) => return self.malformed(reason),
        };
        let hashes = self.cache.hashes(token);
        if let Some(hashes) = hashes
            && let Some((verdict, claims)) = self.cache.get(hashes, now_unix)
        {
            self.counters.cache_hits.fetch_add(1, Relaxed);
            self.count(verdict);
            return Some(claims);
        }
        let decoded = match decode(token, &self.allowlist) {
            Ok(decoded) => decoded,
            Err(reason) => return self.malformed(reason),
        };
        if hashes.is_some() {
            self.counters.cache_misses.fetch_add(1, Relaxed);
        }
        let verdict = self.verify(token, &decoded);
        if !matches!(verdict, Verdict::Verified | Verdict::NoKey) {
            debug!(?verdict, "bearer token not verified");
        }
        self.count(verdict);
        let entry = Entry::new(decoded, verdict);
        let claims = entry.claims(now_unix);
        if let Some(hashes) = hashes {
            self.cache.insert(hashes, entry);
        }
        Some(claims)
    }

    fn verify(&self, token: &str, decoded: &Decoded) -> Verdict {
        if self.keys.is_empty() {
            return Verdict::NoKey;
        }
        // `none` (in any case) is not an algorithm jsonwebtoken knows: it never verifies.
        if decoded.alg.eq_ignore_ascii_case("none") {
            return Verdict::Unsigned;
        }
        let Ok(alg) = Algorithm::from_str(&decoded.alg) else {
            return Verdict::UnsupportedAlgorithm;
        };
        let key = match self.keys.select(alg, decoded.kid.as_deref()) {
            Ok(key) => key,
            Err(NoKey::UnknownKid) => return Verdict::UnknownKid,
            Err(NoKey::UnsupportedAlgorithm) => return Verdict::UnsupportedAlgorithm,
        };
        match jsonwebtoken::decode::<IgnoredAny>(token, &key.key, &key.validation) {
            Ok(_) => Verdict::Verified,
            Err(e) => match e.kind() {
                ErrorKind::InvalidIssuer
                | ErrorKind::InvalidAudience
                | ErrorKind::MissingRequiredClaim(_) => Verdict::RejectedClaims,
                _ => Verdict::BadSignature,
            },
        }
    }

    fn count(&self, verdict: Verdict) {
        let c = &self.counters;
        let reason = match verdict {
            Verdict::Verified => {
                c.tokens_verified.fetch_add(1, Relaxed);
                return;
            }
            Verdict::NoKey => None,
            Verdict::Unsigned => Some(&c.unsigned_tokens),
            Verdict::UnknownKid => Some(&c.unknown_key_ids),
            Verdict::UnsupportedAlgorithm => Some(&c.unsupported_algorithms),
            Verdict::BadSignature => Some(&c.bad_signatures),
            Verdict::RejectedClaims => Some(&c.rejected_claims),
        };
        c.tokens_unverified.fetch_add(1, Relaxed);
        if let Some(counter) = reason {
            counter.fetch_add(1, Relaxed);
        }
    }

    fn malformed(&self, reason: &'static str) -> Option<Arc<Claims>> {
        self.counters.malformed_tokens.fetch_add(1, Relaxed);
        debug!(reason, "malformed bearer token ignored");
        None
    }
}

/// The token of an `authorization: Bearer <token>` header (scheme in any case); None for no
/// header or another scheme, an error for a bearer header with no usable token.
fn bearer_token(headers: &HeaderMap) -> Option<Result<&str, &'static str>> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = match value.iter().position(|&b| b == b' ') {
        Some(space) => value.split_at(space),
        None => (value, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return Some(Err("empty token"));
    }
    Some(std::str::from_utf8(token).map_err(|_| "not ascii"))
}

/// A well-formed token: header and payload decode, both JSON objects.
#[derive(Debug)]
struct Decoded {
    alg: String,
    kid: Option<String>,
    values: BTreeMap<String, Value>,
    /// `exp` in unix seconds; 0 when it is not a number (expired: fail closed).
    exp: Option<u64>,
}

fn decode(token: &str, allowlist: &[String]) -> Result<Decoded, &'static str> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not three parts");
    };
    let mut header = json_object(header).ok_or("header is not a base64url json object")?;
    let mut payload = json_object(payload).ok_or("payload is not a base64url json object")?;
    if !is_base64url(signature) {
        return Err("signature is not base64url");
    }
    let Some(Value::String(alg)) = header.remove("alg") else {
        return Err("no alg");
    };
    let kid = match header.remove("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid),
        Some(_) => return Err("kid is not a string"),
    };
    let exp = payload.get("exp").map(numeric_date);
    let values = allowlist
        .iter()
        .filter_map(|name| payload.remove_entry(name))
        .collect();
    Ok(Decoded {
        alg,
        kid,
        values,
        exp,
    })
}

fn json_object(part: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Checked without decoding: unpadded base64url has no length that is 1 modulo 4.
fn is_base64url(part: &str) -> bool {
    part.len() % 4 != 1
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A NumericDate (RFC 7519): seconds, possibly fractional; negative and non-numbers are 0.
fn numeric_date(value: &Value) -> u64 {
    match value {
        // `as` saturates: negative and NaN are 0, too large is u64::MAX.
        Value::Number(n) => n
            .as_u64()
            .unwrap_or_else(|| n.as_f64().map_or(0, |f| f as u64)),
        _ => 0,
    }
}

/// A verdict and its claims, kept without the token. Both versions of the claims are made once,
/// so that a request only clones an `Arc`, whichever side of `exp` it falls.
struct Entry {
    verdict: Verdict,
    current: Arc<Claims>,
    /// `exp`, and the claims as they are from then on.
    expires: Option<(u64, Arc<Claims>)>,
}

impl Entry {
    fn new(decoded: Decoded, verdict: Verdict) -> Self {
        let claims = Claims {
            values: decoded.values,
            verified: verdict == Verdict::Verified,
            expired: false,
        };
        let expires = decoded.exp.map(|exp| {
            let expired = Claims {
                expired: true,
                ..claims.clone()
            };
            (exp, Arc::new(expired))
        });
        Self {
            verdict,
            current: Arc::new(claims),
            expires,
        }
    }

    fn claims(&self, now_unix: u64) -> Arc<Claims> {
        match &self.expires {
            Some((exp, expired)) if *exp <= now_unix => Arc::clone(expired),
            _ => Arc::clone(&self.current),
        }
    }
}

/// Hashes of a token: where it is filed, and a second, independent one to tell two tokens
/// apart that land on the same place. Both are keyed (SipHash with random keys), so a client
/// cannot make its token collide with another's.
#[derive(Clone, Copy)]
struct Hashes {
    index: u64,
    check: u64,
}

struct Cache {
    capacity: usize,
    index: RandomState,
    check: RandomState,
    entries: RwLock<HashMap<u64, (u64, Entry)>>,
}

impl Cache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            index: RandomState::new(),
            check: RandomState::new(),
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// None when caching is off.
    fn hashes(&self, token: &str) -> Option<Hashes> {
        (self.capacity > 0).then(|| Hashes {
            index: self.index.hash_one(token),
            check: self.check.hash_one(token),
        })
    }

    fn get(&self, hashes: Hashes, now_unix: u64) -> Option<(Verdict, Arc<Claims>)> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        match entries.get(&hashes.index) {
            Some((check, entry)) if *check == hashes.check => {
                Some((entry.verdict, entry.claims(now_unix)))
            }
            _ => None,
        }
    }

    /// Bounded the simple way: a full cache is emptied.
    fn insert(&self, hashes: Hashes, entry: Entry) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity && !entries.contains_key(&hashes.index) {
            entries.clear();
        }
        entries.insert(hashes.index, (hashes.check, entry));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests;
