//! The keys that verify JWT signatures, loaded once from the files the configuration names:
//! an HMAC secret, a PEM public key, a JWKS. Each key accepts only the algorithms of its own
//! type, so a token cannot pick an algorithm the key was not meant for (an RSA public key used
//! as an HMAC secret, `alg: none`).

use std::{fs, path::Path, str::FromStr as _};

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation, jwk::Jwk};
use serde_json::Value;
use tracing::warn;

use super::{ContextError, JwtConfig};

pub(super) struct VerifyKey {
    /// `kid` of a JWKS key; None for the HMAC secret and the PEM key.
    kid: Option<String>,
    pub key: DecodingKey,
    /// Also says which algorithms the key accepts (`validation.algorithms`).
    pub validation: Validation,
}

impl VerifyKey {
    fn new(
        kid: Option<String>,
        key: DecodingKey,
        algorithms: &[Algorithm],
        config: &JwtConfig,
    ) -> Self {
        let mut validation = Validation::new_for_family(key.family());
        validation.algorithms = algorithms.to_vec();
        // Expiry is reported, not enforced (`Claims::expired`), and jsonwebtoken would read the
        // wall clock for it: no time-based check here.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.required_spec_claims.clear();
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        Self {
            kid,
            key,
            validation,
        }
    }

    fn accepts(&self, alg: Algorithm) -> bool {
        self.validation.algorithms.contains(&alg)
    }
}

/// Why no key was chosen for a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NoKey {
    /// The JWKS has no key for the token's `kid` (or the token names none and the set has
    /// several), and no other key takes its algorithm.
    UnknownKid,
    /// No key accepts the token's algorithm.
    UnsupportedAlgorithm,
}

#[derive(Default)]
pub(super) struct KeySet {
    /// The HMAC secret and the PEM key: their algorithms never overlap.
    fixed: Vec<VerifyKey>,
    jwks: Vec<VerifyKey>,
}

impl KeySet {
    pub fn load(config: &JwtConfig) -> Result<Self, ContextError> {
        let mut keys = Self::default();
        if let Some(path) = &config.hmac_secret_file {
            let key = hmac_secret(path)?;
            keys.fixed.push(VerifyKey::new(
                None,
                key,
                AlgorithmFamily::Hmac.algorithms(),
                config,
            ));
        }
        if let Some(path) = &config.public_key_pem_file {
            let (key, algorithms) = public_key(path)?;
            keys.fixed
                .push(VerifyKey::new(None, key, algorithms, config));
        }
        if let Some(path) = &config.jwks_file {
            keys.jwks = jwks(path, config)?;
        }
        Ok(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty() && self.jwks.is_empty()
    }

    /// The JWKS key the token's `kid` names (or the only one, when the token names none), else
    /// the HMAC or PEM key; the key must accept the token's algorithm.
    pub fn select(&self, alg: Algorithm, kid: Option<&str>) -> Result<&VerifyKey, NoKey> {
        let from_jwks = match kid {
            Some(kid) => self.jwks.iter().find(|key| key.kid.as_deref() == Some(kid)),
            None => match self.jwks.as_slice() {
                [only] => Some(only),
                _ => None,
            },
        };
        if let Some(key) = from_jwks
            && key.accepts(alg)
        {
            return Ok(key);
        }
        if let Some(key) = self.fixed.iter().find(|key| key.accepts(alg)) {
            return Ok(key);
        }
        if from_jwks.is_none() && !self.jwks.is_empty() {
            Err(NoKey::UnknownKid)
        } else {
            Err(NoKey::UnsupportedAlgorithm)
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ContextError> {
    fs::read(path).map_err(|source| ContextError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The secret is the file's bytes, less one trailing newline (`echo secret > file`).
fn hmac_secret(path: &Path) -> Result<DecodingKey, ContextError> {
    let bytes = read("jwt hmac secret", path)?;
    let secret = bytes
        .strip_suffix(b"\n")
        .map_or(bytes.as_slice(), |s| s.strip_suffix(b"\r").unwrap_or(s));
    if secret.is_empty() {
        return Err(ContextError::EmptySecret {
            path: path.to_owned(),
        });
    }
    Ok(DecodingKey::from_secret(secret))
}

/// An RSA, EC (P-256 or P-384) or Ed25519 public key: SPKI (`PUBLIC KEY`) or PKCS#1
/// (`RSA PUBLIC KEY`).
fn public_key(path: &Path) -> Result<(DecodingKey, &'static [Algorithm]), ContextError> {
    let pem = read("jwt public key", path)?;
    let bad = |reason: &'static str| ContextError::BadPublicKey {
        path: path.to_owned(),
        reason,
    };
    if pem.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(bad(
            "it is a private key; give the public key (`openssl pkey -pubout`)",
        ));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, AlgorithmFamily::Rsa.algorithms()));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        // An uncompressed point: 0x04, x, y.
        let algorithms: &[Algorithm] = match key.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => &[Algorithm::ES256],
            Ok(97) => &[Algorithm::ES384],
            _ => return Err(bad("only the P-256 and P-384 curves are supported")),
        };
        return Ok((key, algorithms));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, &[Algorithm::EdDSA]));
    }
    Err(bad(
        "not a PEM RSA, EC (P-256, P-384) or Ed25519 public key",
    ))
}

/// Every signing key of the set; a key that cannot be used (encryption key, unknown type or
/// curve) is skipped with a warning, and a set with no usable key is an error.
fn jwks(path: &Path, config: &JwtConfig) -> Result<Vec<VerifyKey>, ContextError> {
    let bytes = read("jwks", path)?;
    let bad = |reason: String| ContextError::BadJwks {
        path: path.to_owned(),
        reason,
    };
    let set: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let Some(entries) = set.get("keys").and_then(Value::as_array) else {
        return Err(bad("no \"keys\" array".to_owned()));
    };
    let mut keys = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let kid = entry.get("kid").and_then(Value::as_str);
        match jwk(entry) {
            Ok((key, algorithms)) => keys.push(VerifyKey::new(
                kid.map(str::to_owned),
                key,
                &algorithms,
                config,
            )),
            Err(reason) => warn!(path = %path.display(), index, kid, reason, "jwks key skipped"),
        }
    }
    if keys.is_empty() {
        return Err(bad("no usable signing key".to_owned()));
    }
    Ok(keys)
}

fn jwk(entry: &Value) -> Result<(DecodingKey, Vec<Algorithm>), &'static str> {
    if entry.get("use").and_then(Value::as_str) == Some("enc") {
        return Err("an encryption key");
    }
    let parsed: Jwk = serde_json::from_value(entry.clone()).map_err(|_| "not a valid jwk")?;
    let key = DecodingKey::from_jwk(&parsed).map_err(|_| "unsupported key type")?;
    let by_type = match (key.family(), entry.get("crv").and_then(Value::as_str)) {
        (AlgorithmFamily::Ec, Some("P-256")) => vec![Algorithm::ES256],
        (AlgorithmFamily::Ec, Some("P-384")) => vec![Algorithm::ES384],
        (AlgorithmFamily::Ec, _) => return Err("unsupported curve"),
        (AlgorithmFamily::Ed, Some("Ed25519")) => vec![Algorithm::EdDSA],
        (AlgorithmFamily::Ed, _) => return Err("unsupported curve"),
        (family, _) => family.algorithms().to_vec(),
    };
    // A key that names its algorithm accepts only that one (RFC 7517 section 4.4).
    match entry.get("alg").and_then(Value::as_str) {
        None => Ok((key, by_type)),
        Some(alg) => match Algorithm::from_str(alg) {
            Ok(alg) if by_type.contains(&alg) => Ok((key, vec![alg])),
            _ => Err("its \"alg\" does not fit its key type"),
        },
    }
}
