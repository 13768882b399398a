//! Circuit breakers with gRPC semantics. The engine is pure: no I/O and no clock (time is
//! passed in), so every transition is tested with injected time.
//!
//! - [`circuit`]: one breaker's state machine and policies;
//! - [`window`], [`latency`]: the sliding window of results and the recent p95;
//! - [`classify`]: whose fault a call's result is;
//! - [`registry`]: every breaker by scope (endpoint, subset, cluster, method, client) and
//!   priority class, and one call's admission through them;
//! - [`config`], [`policy`]: the `[breakers]` configuration.

pub mod circuit;
pub mod classify;
pub mod config;
pub mod latency;
pub mod policy;
pub mod registry;
pub mod window;
