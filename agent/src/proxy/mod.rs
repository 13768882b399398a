//! The built-in HTTP/2 / gRPC stream proxy.

mod coalesce;
pub mod forward;
mod goaway_watch;
pub mod grpc;
pub mod intercept;
mod publish;
pub mod retry;
pub mod route;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod upstream_tls;
