//! TLS listeners: rustls (ring provider), ALPN `h2` only. A client that offers ALPN without
//! `h2` is refused in the handshake (rustls sends `no_application_protocol`); a client that
//! offers no ALPN at all is served HTTP/2 as if by prior knowledge, as grpc-go and Envoy do.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

pub use crate::config::tls::TlsError;
use crate::config::{proxy::TlsFiles, tls::server_config};

/// The server side of a TLS listener, from its PEM certificate chain and private key.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(Arc::new(server_config(files)?)))
}
