//! What happened to each stream: the proxy's record of a call, published on the bus
//! ([`super::bus`]) for the metrics, the trip events and `agent run --print-outcomes`.

use std::{net::SocketAddr, time::Duration};

use serde::Serialize;

use crate::context::RequestContext;

/// How a stream ended, from the proxy's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The upstream answered and the response reached the client.
    Completed,
    /// No route for the request.
    NoRoute,
    /// No upstream stream could be had (resolve, connect, handshake, closed connection).
    ConnectFailed,
    /// The upstream reset the stream, or its connection died, mid-call.
    UpstreamReset,
    /// The client's `grpc-timeout` passed; the upstream stream was cancelled.
    DeadlineExceeded,
    /// The client reset the stream (cancelled); the upstream stream was cancelled.
    ClientCancelled,
    /// A circuit breaker refused the call (answered UNAVAILABLE, or 503).
    BreakerOpen,
}

#[derive(Clone, Debug, Serialize)]
pub struct StreamOutcome {
    pub listener: String,
    pub client: SocketAddr,
    pub cluster: Option<String>,
    pub endpoint: Option<String>,
    /// `:path`, which for gRPC is `/package.Service/Method`.
    pub method: String,
    pub grpc: bool,
    pub http_status: Option<u16>,
    /// From the trailers (or a trailers-only response); the proxy's own when it answered.
    pub grpc_status: Option<u32>,
    pub ending: Ending,
    /// HTTP/2 error code of a reset, by whichever side sent it.
    pub reset_reason: Option<String>,
    #[serde(with = "as_micros")]
    pub latency: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Times the call was sent again: an upstream refused it unprocessed (GOAWAY above its
    /// last-stream-id, REFUSED_STREAM), could not be reached, or (idempotent calls) answered
    /// UNAVAILABLE before anything else.
    pub retries: u32,
    /// From the request headers: trace, session, JWT claims (never the token).
    #[serde(flatten)]
    pub context: RequestContext,
    /// The call's priority class, when not the default one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// The breaker that refused the call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<String>,
    /// Whose fault the result was, for the breakers: `upstream`, `client`, or none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blame: Option<&'static str>,
    /// Until the upstream's response headers (what the slow-call rule measures).
    #[serde(with = "opt_micros", skip_serializing_if = "Option::is_none")]
    pub first_byte: Option<Duration>,
    /// Where the application dialed, when the kernel steered its connection here
    /// (interception); absent for connections made to a listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_destination: Option<SocketAddr>,
    /// What went wrong, when the proxy answered the call itself or a try failed before an
    /// upstream took it (a refused connect, a TLS handshake's reason), the last of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

mod opt_micros {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::as_micros::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

mod as_micros {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }
}
