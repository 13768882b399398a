//! Whose fault was it? A call's result, read from its gRPC status (trailers, or a
//! trailers-only response) and how it ended, as a mark for the upstream's breakers and one for
//! the client's. Counting every non-OK status against the upstream is how breakers eject
//! healthy servers for their clients' bad arguments; this is the table that prevents it.

use serde::Deserialize;
use tonic::Code;

use super::circuit::Mark;

/// Who a status like RESOURCE_EXHAUSTED (quota or overload) is held against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    Upstream,
    Client,
    /// Neither: no mark at all.
    #[default]
    Ignore,
}

/// How a call ended, as far as blame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The upstream answered (a status, in trailers or trailers-only, or an HTTP status).
    Answered,
    /// No upstream stream could be had: resolve, connect, handshake, a refused stream.
    NotReached,
    /// The upstream reset the stream or its connection died mid-call.
    UpstreamReset,
    /// The proxy's deadline timer fired.
    DeadlineExceeded,
    /// The client cancelled or reset.
    ClientCancelled,
}

/// What is known of a finished call.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    pub grpc: bool,
    pub ended: Ended,
    pub grpc_status: Option<u32>,
    pub http_status: Option<u16>,
    /// The call's JWT had expired (`exp` in the past).
    pub token_expired: bool,
    /// The client had sent its whole request (so a deadline that fired was the upstream's
    /// slowness, not the client's).
    pub request_complete: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub upstream: Mark,
    pub client: Mark,
}

/// The status a `grpc-status` value names; None for a value outside the 17 codes (tonic maps
/// those to UNKNOWN, which would make a server's odd but answered status a failure).
fn known_code(status: u32) -> Option<Code> {
    let code = Code::from(i32::try_from(status).ok()?);
    (code as u32 == status).then_some(code)
}

pub fn classify(f: &Facts, resource_exhausted: Attribution) -> Verdict {
    use Mark::{Failure, Neutral, Success};
    let v = |upstream, client| Verdict { upstream, client };
    match f.ended {
        Ended::NotReached | Ended::UpstreamReset => v(Failure, Success),
        Ended::ClientCancelled => v(Neutral, Neutral),
        // A client still sending when its own deadline came was too slow itself.
        Ended::DeadlineExceeded if f.request_complete => v(Failure, Success),
        Ended::DeadlineExceeded => v(Neutral, Neutral),
        Ended::Answered if !f.grpc => match f.http_status {
            // 501: the server does not do this, which is the request's problem.
            Some(s) if s >= 500 && s != 501 => v(Failure, Success),
            Some(_) => v(Success, Success),
            None => v(Failure, Success),
        },
        Ended::Answered => match f.grpc_status.map(known_code) {
            Some(Some(Code::Ok)) => v(Success, Success),
            // The server's view of the client's cancel.
            Some(Some(Code::Cancelled)) => v(Neutral, Neutral),
            Some(Some(
                Code::Unknown
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
                | Code::DeadlineExceeded,
            )) => v(Failure, Success),
            Some(Some(Code::ResourceExhausted)) => match resource_exhausted {
                Attribution::Upstream => v(Failure, Success),
                Attribution::Client => v(Success, Failure),
                Attribution::Ignore => v(Neutral, Neutral),
            },
            // An expired token is the client's fault alone: the server that refused it is
            // healthy, the client that keeps sending it is not.
            Some(Some(Code::Unauthenticated)) if f.token_expired => v(Success, Failure),
            // INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED,
            // FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, UNAUTHENTICATED:
            // the server answered, correctly, about the request.
            Some(_) => v(Success, Success),
            // A gRPC response with no grpc-status is broken (clients see INTERNAL).
            None => v(Failure, Success),
        },
    }
}

#[cfg(test)]
mod tests;
