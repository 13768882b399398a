//! The status API (`proto/agent/v1/status.proto`), with `grpc.health.v1` and server
//! reflection on the same server: loopback by default, admin calls behind a bearer token.

mod service;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use tokio::sync::watch;
use tracing::info;

pub use self::service::{Sources, StatusService};

/// The code generated from `proto/agent/v1/status.proto` (by `build.rs`).
pub mod pb {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
    tonic::include_proto!("agent.v1");

    /// The file descriptor set, for server reflection.
    pub const DESCRIPTOR: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/status_descriptor.bin"));
}

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

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "api.listen {0} is not a loopback address and no api.admin_token_file is set: set a token, \
         or api.insecure_non_loopback = true if that is really meant"
    )]
    Unprotected(SocketAddr),
    #[error("api.admin_token_file {}: {source}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("api.admin_token_file {}: the token is empty", .0.display())]
    EmptyToken(PathBuf),
    #[error("cannot listen on {address} for the status API: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ApiConfig {
    /// Checks what can be checked without binding, and reads the admin token.
    pub fn check(&self) -> Result<Option<Vec<u8>>, ApiError> {
        let token = match &self.admin_token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        if self.enabled
            && !self.listen.ip().is_loopback()
            && token.is_none()
            && !self.insecure_non_loopback
        {
            return Err(ApiError::Unprotected(self.listen));
        }
        Ok(token)
    }
}

fn read_token(path: &Path) -> Result<Vec<u8>, ApiError> {
    let bytes = std::fs::read(path).map_err(|source| ApiError::Token {
        path: path.to_owned(),
        source,
    })?;
    let token = bytes.trim_ascii().to_vec();
    if token.is_empty() {
        return Err(ApiError::EmptyToken(path.to_owned()));
    }
    Ok(token)
}

/// A bound API server, serving once spawned.
pub struct Api {
    listener: tokio::net::TcpListener,
}

impl Api {
    pub async fn bind(address: SocketAddr) -> Result<Api, ApiError> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| ApiError::Bind { address, source })?;
        Ok(Api { listener })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves the status API, health and reflection until `stop` turns true.
    pub async fn serve(self, service: StatusService, mut stop: watch::Receiver<bool>) {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<pb::agent_status_server::AgentStatusServer<StatusService>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1();
        // grpcurl and most tools still ask the v1alpha service.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha();
        let mut router = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(pb::agent_status_server::AgentStatusServer::new(service));
        if let Ok(r) = reflection_v1 {
            router = router.add_service(r);
        }
        if let Ok(r) = reflection_v1alpha {
            router = router.add_service(r);
        }
        let address = self.local_addr();
        info!(address = ?address, "status API listening");
        // TCP_NODELAY on every connection, as the proxy's listeners have: without it a watcher's
        // small event messages wait for the peer's delayed ACK (Nagle), 40 ms at a time.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(self.listener),
            |conn| {
                if let Ok(tcp) = &conn {
                    let _ = tcp.set_nodelay(true);
                }
                conn
            },
        );
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::warn!(error = %e, "status API stopped");
        }
    }
}

#[cfg(test)]
mod tests;
