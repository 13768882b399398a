//! The agent: kernel signals of gRPC / HTTP/2 traffic, circuit breakers that act on them, and
//! the proxy that applies the breakers.
//!
//! Modules follow the data path, each importing only those before it:
//!
//! - `context`, `breaker`, `signals`: request context (trace, session, JWT claims), the pure
//!   breaker engine, and typed kernel events;
//! - `probes`: the kernel programs, their ring buffer and the Go process discovery, feeding a
//!   [`probes::pipeline::SignalSink`];
//! - `config`: the agent's configuration file, each section validating itself;
//! - `discovery`: the clusters' DNS names followed at their TTL, each address an endpoint;
//! - `correlate`: kernel signals joined to the proxy's connections, streams and upstream
//!   processes, and applied to the breakers;
//! - `events`: the publish bus, durable breaker-trip events (journal) and their tail;
//! - `proxy`: the HTTP/2 stream proxy that admits, forwards and records every call;
//! - `export`, `api`: OTLP and Prometheus export, the gRPC status API;
//! - `cli`: what a user runs.

pub mod api;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod context;
pub mod correlate;
pub mod discovery;
pub mod events;
pub mod export;
pub mod probes;
pub mod proxy;
pub mod signals;
