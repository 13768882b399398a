//! The status API (`proto/agent/v1/status.proto`), with `grpc.health.v1` and server
//! reflection on the same server: loopback by default, admin calls behind a bearer token.

mod service;

use std::net::SocketAddr;

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

pub use crate::config::api::{ApiConfig, ApiConfigError, DEFAULT_LISTEN};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {address} for the status API: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
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
