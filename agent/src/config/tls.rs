//! TLS from the PEM files the configuration names: a listener's identity, and a cluster's
//! upstream TLS (CA bundle, client identity). Loaded when the configuration is checked (a bad
//! chain or key is reported there, not at the first connection) and again when used.
//! rustls (ring provider), ALPN `h2` only.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{ClientConfig, ServerConfig};
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
    let (certs, key) = identity(files)?;
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

/// `[cluster.tls]`: how the proxy speaks TLS to a cluster's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM CA certificates the endpoints' certificates must chain to.
    pub ca: PathBuf,
    /// The name their certificates are checked against (and sent as SNI); None: each entry's
    /// own DNS name (an SRV name's service name), or an IP entry's address.
    pub server_name: Option<String>,
    /// The proxy's client certificate chain and key, for endpoints that ask for one (mTLS).
    pub client: Option<TlsFiles>,
}

/// Why an upstream TLS configuration cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("cannot read CA certificates from {path}: {source}")]
    Ca {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no CA certificate rustls can use{}", .why.as_ref().map(|w| format!(" ({w})")).unwrap_or_default())]
    NoCa { path: String, why: Option<String> },
    #[error(transparent)]
    Client(#[from] TlsError),
    #[error("TLS: {0}")]
    Provider(#[source] rustls::Error),
    #[error("client certificate {cert} and key {key} do not make an identity: {source}")]
    ClientIdentity {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
}

/// The client side of a cluster's TLS, from its PEM files as they are now: the CA bundle,
/// the client identity if any, ALPN `h2`.
pub fn client_config(tls: &UpstreamTls) -> Result<ClientConfig, UpstreamTlsError> {
    let shown = |p: &Path| p.display().to_string();
    let cas = CertificateDer::pem_file_iter(&tls.ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| UpstreamTlsError::Ca {
            path: shown(&tls.ca),
            source,
        })?;
    let mut roots = rustls::RootCertStore::empty();
    let (_, refused) = roots.add_parsable_certificates(cas);
    if roots.is_empty() {
        return Err(UpstreamTlsError::NoCa {
            path: shown(&tls.ca),
            why: (refused > 0).then(|| format!("{refused} refused")),
        });
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(UpstreamTlsError::Provider)?
            .with_root_certificates(roots);
    let mut config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some(files) => {
            let (certs, key) = identity(files)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|source| UpstreamTlsError::ClientIdentity {
                    cert: shown(&files.cert),
                    key: shown(&files.key),
                    source,
                })?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A certificate chain and its key from PEM files.
fn identity(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
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
    Ok((certs, key))
}
