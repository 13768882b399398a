//! The `[api]` section: where the status API listens and the admin token that guards its
//! admin calls (see `api`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Where the API listens by default (and where the CLI looks for it).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9470";

/// The `[api]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Serve the API at all.
    pub enabled: bool,
    /// Loopback unless you mean it: see `insecure_non_loopback`.
    pub listen: SocketAddr,
    /// A file holding the admin token (surrounding white space ignored). Without it the admin
    /// calls are refused.
    pub admin_token_file: Option<PathBuf>,
    /// Serve on a non-loopback address although no admin token is set.
    pub insecure_non_loopback: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9470))),
            admin_token_file: None,
            insecure_non_loopback: false,
        }
    }
}

/// What is wrong in `[api]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiConfigError {
    #[error(
        "api.listen {0} is not a loopback address and no api.admin_token_file is set: set a token, \
         or api.insecure_non_loopback = true if that is really meant"
    )]
    Unprotected(SocketAddr),
    #[error("api.admin_token_file {}: {reason}", path.display())]
    Token { path: PathBuf, reason: String },
    #[error("api.admin_token_file {}: the token is empty", .0.display())]
    EmptyToken(PathBuf),
}

impl ApiConfig {
    /// Checks what can be checked without binding, and reads the admin token.
    pub fn check(&self) -> Result<Option<Vec<u8>>, ApiConfigError> {
        let token = match &self.admin_token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        if self.enabled
            && !self.listen.ip().is_loopback()
            && token.is_none()
            && !self.insecure_non_loopback
        {
            return Err(ApiConfigError::Unprotected(self.listen));
        }
        Ok(token)
    }
}

fn read_token(path: &Path) -> Result<Vec<u8>, ApiConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ApiConfigError::Token {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let token = bytes.trim_ascii().to_vec();
    if token.is_empty() {
        return Err(ApiConfigError::EmptyToken(path.to_owned()));
    }
    Ok(token)
}
