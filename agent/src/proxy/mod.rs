//! The built-in HTTP/2 / gRPC stream proxy.

pub mod config;
pub mod forward;
pub mod grpc;
pub mod outcome;
pub mod server;
pub mod tls;
pub mod upstream;
