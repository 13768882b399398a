//! The request context of a proxied stream, taken once from its request headers: trace and span
//! ids (`traceparent`, `grpc-trace-bin`, B3), a session id, and the allowlisted claims of its
//! bearer JWT. The proxy attaches it to what it reports of the stream; the per-client breaker
//! keys on [`RequestContext::client_key`].
//!
//! Everything here comes from the peer: a malformed header yields nothing (and is counted), it
//! is never an error. Time is passed in (`now_unix`), never read here.

use std::{
    fmt,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use http::{HeaderMap, HeaderName};
use serde::{Deserialize, Serialize};

mod jwt;
mod keys;
mod trace;

pub use jwt::{Claims, JwtConfig};

/// `[context]`: where the context of a request is found.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// Header (gRPC metadata key) carrying the session id.
    pub session_header: String,
    pub jwt: JwtConfig,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            session_header: "x-session-id".to_owned(),
            jwt: JwtConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("invalid session header name {name:?}")]
    SessionHeader {
        name: String,
        #[source]
        source: http::header::InvalidHeaderName,
    },
    #[error("cannot read {what} file {}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jwt hmac secret file {} is empty", path.display())]
    EmptySecret { path: PathBuf },
    #[error("jwt public key file {}: {reason}", path.display())]
    BadPublicKey { path: PathBuf, reason: &'static str },
    #[error("jwks file {}: {reason}", path.display())]
    BadJwks { path: PathBuf, reason: String },
}

/// Longest session id kept, in bytes.
pub const MAX_SESSION_ID: usize = 256;

/// The context of one request. Holds no credential: the bearer token itself is never kept.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestContext {
    /// 32 lowercase hex digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// 16 lowercase hex digits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    /// `"w3c"`, `"grpc-trace-bin"` or `"b3"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_format: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(
        rename = "jwt_claims",
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_claims"
    )]
    pub claims: Option<Arc<Claims>>,
    /// `jwt.client_key_trusts_unverified_subject`, for [`Self::client_key`].
    #[serde(skip)]
    pub trust_unverified_subject: bool,
}

impl RequestContext {
    /// Whom the per-client breaker counts this request against: the JWT subject when its
    /// signature was verified, else the session id, else nobody.
    ///
    /// An unverified `sub` is not used (unless `client_key_trusts_unverified_subject`): anyone
    /// can write any subject into an unsigned or badly signed token, and keying on it would let
    /// a client trip another user's breaker by sending failing requests in their name. A
    /// session id is no more authenticated, but it is an opaque value a client only learns by
    /// owning the session, where subjects (user names, ids) are often known or guessable. A
    /// verified but expired token still names its subject truthfully, so it is used.
    pub fn client_key(&self) -> Option<ClientKey> {
        if let Some(claims) = &self.claims
            && (claims.verified || self.trust_unverified_subject)
            && let Some(sub) = claims.subject()
        {
            return Some(ClientKey::Subject(sub.to_owned()));
        }
        self.session_id.clone().map(ClientKey::Session)
    }
}

/// serde serializes an `Arc` only with its `rc` feature, which this crate does not enable.
fn serialize_claims<S: serde::Serializer>(
    claims: &Option<Arc<Claims>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    claims.as_deref().serialize(serializer)
}

/// The key of a per-client breaker; displays as `sub:<subject>` or `session:<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    Subject(String),
    Session(String),
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Subject(sub) => write!(f, "sub:{sub}"),
            Self::Session(id) => write!(f, "session:{id}"),
        }
    }
}

impl Serialize for ClientKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Counters since the extractor was built. Token counters count requests (a cached verdict
/// counts again); `cache_hits` and `cache_misses` say how many were verified anew.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ContextStats {
    /// Bearer tokens that are not a JWT (not three base64url parts, JSON header and payload).
    pub malformed_tokens: u64,
    pub tokens_verified: u64,
    /// Well-formed tokens whose signature was not verified, for any reason below or because no
    /// key is configured.
    pub tokens_unverified: u64,
    /// Signature checked and wrong (or unreadable).
    pub bad_signatures: u64,
    /// `alg: none`.
    pub unsigned_tokens: u64,
    /// The JWKS has no key for the token's `kid` (or the token names none and the set has
    /// several), and no other key takes the token's algorithm.
    pub unknown_key_ids: u64,
    /// No configured key takes the token's `alg`.
    pub unsupported_algorithms: u64,
    /// Good signature, wrong or missing issuer or audience.
    pub rejected_claims: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Session headers ignored: longer than [`MAX_SESSION_ID`] bytes or not UTF-8.
    pub invalid_session_ids: u64,
}

/// Takes the context out of request headers; built once from the configuration and shared by
/// every connection.
pub struct Extractor {
    session_header: HeaderName,
    trust_unverified_subject: bool,
    jwt: jwt::JwtExtractor,
    invalid_session_ids: AtomicU64,
}

impl fmt::Debug for Extractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extractor")
            .field("session_header", &self.session_header)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Extractor {
    /// Loads the key files; also what `check-config` runs.
    pub fn new(config: &ContextConfig) -> Result<Self, ContextError> {
        let session_header =
            HeaderName::from_bytes(config.session_header.as_bytes()).map_err(|source| {
                ContextError::SessionHeader {
                    name: config.session_header.clone(),
                    source,
                }
            })?;
        Ok(Self {
            session_header,
            trust_unverified_subject: config.jwt.client_key_trusts_unverified_subject,
            jwt: jwt::JwtExtractor::new(&config.jwt)?,
            invalid_session_ids: AtomicU64::new(0),
        })
    }

    pub fn extract(&self, headers: &HeaderMap, now_unix: u64) -> RequestContext {
        let (trace_id, span_id, trace_format) = match trace::extract(headers) {
            Some(ids) => (Some(ids.trace_id), Some(ids.span_id), Some(ids.format)),
            None => (None, None, None),
        };
        RequestContext {
            trace_id,
            span_id,
            trace_format,
            session_id: self.session_id(headers),
            claims: self.jwt.claims(headers, now_unix),
            trust_unverified_subject: self.trust_unverified_subject,
        }
    }

    pub fn stats(&self) -> ContextStats {
        let c = &self.jwt.counters;
        ContextStats {
            malformed_tokens: c.malformed_tokens.load(Relaxed),
            tokens_verified: c.tokens_verified.load(Relaxed),
            tokens_unverified: c.tokens_unverified.load(Relaxed),
            bad_signatures: c.bad_signatures.load(Relaxed),
            unsigned_tokens: c.unsigned_tokens.load(Relaxed),
            unknown_key_ids: c.unknown_key_ids.load(Relaxed),
            unsupported_algorithms: c.unsupported_algorithms.load(Relaxed),
            rejected_claims: c.rejected_claims.load(Relaxed),
            cache_hits: c.cache_hits.load(Relaxed),
            cache_misses: c.cache_misses.load(Relaxed),
            invalid_session_ids: self.invalid_session_ids.load(Relaxed),
        }
    }

    /// The first value of the session header; an empty one is no session.
    fn session_id(&self, headers: &HeaderMap) -> Option<String> {
        let value = headers.get(&self.session_header)?.as_bytes();
        if value.is_empty() {
            return None;
        }
        match std::str::from_utf8(value) {
            Ok(id) if id.len() <= MAX_SESSION_ID => Some(id.to_owned()),
            _ => {
                self.invalid_session_ids.fetch_add(1, Relaxed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
