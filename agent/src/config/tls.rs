//! A TLS listener's identity, from the PEM files its configuration names: loaded when the
//! configuration is checked (a bad chain or key is reported there, not at the first client)
//! and again when the listener is bound. rustls (ring provider), ALPN `h2` only.

use std::{path::Path, sync::Arc};

use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

use super::proxy::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {source}")]
    Certs {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)")]
    NoCerts { path: String },
    #[error("cannot read a private key from {path}: {source}")]
    Key {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate {cert} and key {key} do not make a server identity: {source}")]
    Identity {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
}

/// The server side of a TLS listener, from its PEM certificate chain and private key.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let shown = |p: &Path| p.display().to_string();
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certs {
            path: shown(&files.cert),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts {
            path: shown(&files.cert),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Key {
        path: shown(&files.key),
        source,
    })?;
    let identity_error = |source| TlsError::Identity {
        cert: shown(&files.cert),
        key: shown(&files.key),
        source,
    };
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(identity_error)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(identity_error)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
