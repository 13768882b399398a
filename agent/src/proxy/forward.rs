//! One client stream forwarded to one upstream stream, full duplex: headers, DATA and trailers
//! pass unchanged (hop-by-hop headers aside), in both directions at once, so unary and every
//! kind of streaming call work alike.
//!
//! Flow control is end to end: a chunk from one side is released back to that side's window
//! only once the other side has taken it, so a stream never holds more than its window in the
//! proxy however fast one side writes and however slow the other reads.
//!
//! The proxy keeps the call's deadline (`grpc-timeout`), passes what is left of it upstream,
//! and on expiry answers DEADLINE_EXCEEDED and cancels the upstream stream. A client reset
//! cancels the upstream stream; an upstream reset or a dead upstream connection answers
//! UNAVAILABLE at once.

use std::{
    future::poll_fn,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::Poll,
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, client::ResponseFuture, server::SendResponse};
use http::{HeaderMap, Request, StatusCode};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info};

use super::{
    grpc::{self, Code},
    retry::{RetryBudget, RetryConfig, RetryGuard},
    route::route,
    upstream::{ClusterPool, Endpoint, Lease, UpstreamError},
};
use crate::{
    breaker::{
        circuit::{Mark, Reason as BreakerReason},
        classify::{Ended, Facts, classify},
        config::Scope,
        registry::{BreakerId, Breakers, CallPermits, Rejected, Transition},
    },
    config::proxy::Route,
    context::Extractor,
    correlate::{
        Joins,
        table::{ConnGuard, StreamGuard, StreamTag},
    },
    events::{
        bus::Bus,
        outcome::{Ending, StreamOutcome},
    },
};

/// What every stream of the proxy shares.
pub struct Shared {
    pub clusters: Vec<ClusterPool>,
    /// Where stream outcomes and breaker events are published.
    pub bus: Arc<Bus>,
    pub breakers: Arc<Breakers>,
    pub context: Extractor,
    pub retries: RetryConfig,
    pub budget: RetryBudget,
    /// See [`crate::config::proxy::Timeouts::grpc_timeout_offset`].
    pub grpc_timeout_offset: std::time::Duration,
    /// The proxy's connections and streams for the kernel signals to be joined to.
    pub joins: Arc<Joins>,
}

/// What a stream knows of its client connection.
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub routes: Arc<[Route]>,
    /// This connection in the correlation table (when kernel signals are joined); marked
    /// closed when the connection and its last stream are done.
    pub tracked: Option<ConnGuard>,
    /// Set when the kernel steered the connection here: its calls go where this says, not
    /// by the listener's routes.
    pub intercepted: Option<Intercepted>,
}

/// Where an intercepted connection's calls go.
#[derive(Clone)]
pub struct Intercepted {
    /// What the application dialed.
    pub original: SocketAddr,
    /// The cluster that claims it, or the passthrough cluster.
    pub cluster: usize,
    /// In the passthrough cluster, the original destination's endpoint; None: the claiming
    /// cluster picks among its endpoints.
    pub endpoint: Option<Arc<Endpoint>>,
}

/// Why a pump stopped early.
enum PumpError {
    /// The side we read from failed (reset, connection gone).
    Source(h2::Error),
    /// The side we write to failed.
    Sink(h2::Error),
    /// The side we write to closed its stream.
    SinkClosed,
    /// The side we write to reset the stream.
    SinkReset(Reason),
}

/// Why a call ends other than by the whole response reaching the client: how its outcome
/// records it, what the client is told, and whether it may be sent again. The one error type
/// of a call's lifecycle, from opening the upstream stream to the last byte.
struct Failure {
    ending: Ending,
    /// What the client is told; None when the client itself reset the stream.
    answer: Option<Answer>,
    /// The reset reason the outcome records.
    reset_reason: Option<String>,
    /// The upstream stream goes on for nobody: reset it (CANCEL).
    cancel_upstream: bool,
    retry: RetryKind,
}

/// A gRPC status (or, for other requests, an HTTP status) and its message.
struct Answer {
    code: Code,
    status: StatusCode,
    message: String,
}

/// Whether a failed try may go to another endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RetryKind {
    /// The call is the upstream's (or the client's): never sent again.
    Never,
    /// Nothing was sent (no connection): again after a backoff, the budget allowing.
    NotReached,
    /// The upstream refused the stream before processing any of it (GOAWAY above its
    /// last-stream-id, REFUSED_STREAM): again at once, as gRPC's transparent retry does.
    Refused,
    /// An idempotent call answered with a trailers-only UNAVAILABLE, not yet passed on:
    /// again after a backoff.
    Unavailable,
}

impl Failure {
    fn answered(
        ending: Ending,
        code: Code,
        status: StatusCode,
        message: impl Into<String>,
    ) -> Self {
        Self {
            ending,
            answer: Some(Answer {
                code,
                status,
                message: message.into(),
            }),
            reset_reason: None,
            cancel_upstream: false,
            retry: RetryKind::Never,
        }
    }

    /// No upstream connection could be had.
    fn not_reached(e: impl std::fmt::Display) -> Self {
        Self {
            retry: RetryKind::NotReached,
            ..Self::answered(
                Ending::ConnectFailed,
                Code::Unavailable,
                StatusCode::BAD_GATEWAY,
                format!("upstream unavailable: {e}"),
            )
        }
    }

    fn deadline() -> Self {
        Self {
            reset_reason: Some("CANCEL".into()),
            cancel_upstream: true,
            ..Self::answered(
                Ending::DeadlineExceeded,
                Code::DeadlineExceeded,
                StatusCode::GATEWAY_TIMEOUT,
                "deadline exceeded",
            )
        }
    }

    fn client_reset(reason: Option<Reason>) -> Self {
        Self {
            ending: Ending::ClientCancelled,
            answer: None,
            reset_reason: reason.map(|r| format!("{r:?}")),
            cancel_upstream: true,
            retry: RetryKind::Never,
        }
    }

    fn upstream(e: &h2::Error) -> Self {
        Self {
            reset_reason: e.reason().map(|r| format!("{r:?}")),
            ..Self::answered(
                Ending::UpstreamReset,
                Code::Unavailable,
                StatusCode::BAD_GATEWAY,
                format!("upstream failed mid-call: {e}"),
            )
        }
    }

    /// Refused unprocessed on try `attempt`.
    fn refused(why: impl std::fmt::Display, attempt: u32) -> Self {
        Self {
            reset_reason: Some("REFUSED_STREAM".into()),
            retry: RetryKind::Refused,
            ..Self::answered(
                Ending::UpstreamReset,
                Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream refused the call {attempt} times: {why}"),
            )
        }
    }

    /// A trailers-only UNAVAILABLE kept from the client for a retry, on try `attempt`.
    fn unavailable(attempt: u32) -> Self {
        Self {
            retry: RetryKind::Unavailable,
            // The upstream answered: the call completed, with the upstream's status.
            ..Self::answered(
                Ending::Completed,
                Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream answered UNAVAILABLE {attempt} times"),
            )
        }
    }
}

/// Tries per call: the first, and retries of calls an upstream refused unprocessed.
const MAX_ATTEMPTS: u32 = 3;

/// Request bytes kept for a retry; a call that sent more before its response started is not
/// retried (as Envoy's retry buffer).
const REPLAY_LIMIT: usize = 64 * 1024;

/// The client's side of a call, across its tries.
struct Downstream {
    respond: SendResponse<Bytes>,
    body: RecvStream,
    /// The response body's sink, once the response headers went to the client.
    send: Option<SendStream<Bytes>>,
    /// The response's trailers, once passed on.
    trailers: Option<HeaderMap>,
    replay: Mutex<Replay>,
}

/// The tries of a call.
struct Attempts<'a> {
    count: u32,
    /// Endpoints tried so far (another is preferred).
    tried: Vec<Arc<Endpoint>>,
    /// The call's place in the retry budget, taken at its first retry.
    retrying: Option<RetryGuard<'a>>,
    idempotent: bool,
}

/// An upstream stream opened for one try.
struct Upstream {
    lease: Lease,
    response: ResponseFuture,
    send: SendStream<Bytes>,
}

/// Forwards one client stream: admit it (route, breakers), try it on an endpoint until one
/// try is final (retries where nothing reached an upstream or it refused the stream), then
/// finish it (the answer, the breakers' record, the outcome).
pub async fn forward(
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
) {
    let _in_flight = shared.budget.call();
    let (mut parts, body) = req.into_parts();
    let mut call = Call::new(&shared, &conn, &mut parts);
    let mut down = Downstream {
        respond,
        replay: Mutex::new(Replay::new(body.is_end_stream())),
        body,
        send: None,
        trailers: None,
    };
    // The stream in the correlation table, under its id on the client's connection (and,
    // below, on the upstream's), for kernel signals about it to find its context.
    let tag = conn.tracked.as_ref().map(|_| call.stream_tag());
    let _downstream_stream = conn
        .tracked
        .as_ref()
        .zip(tag.as_ref())
        .map(|(c, t)| c.conn.stream(down.respond.stream_id().as_u32(), t.clone()));
    let Some(cluster) = call.admit(&conn, &parts, &mut down.respond) else {
        return call.finish();
    };
    // The upstream stream's entry in the correlation table, kept to the end like the lease.
    let mut _upstream_stream: Option<StreamGuard> = None;
    let Tried::Final {
        ended,
        up_send,
        lease: _lease,
    } = attempt(
        &mut call,
        &mut down,
        &parts,
        cluster,
        tag.as_ref(),
        &mut _upstream_stream,
    )
    .await
    else {
        return call.finish();
    };
    match ended {
        Ok(()) => {
            if let Some(t) = &down.trailers {
                call.out.grpc_status = grpc::status_of(t).or(call.out.grpc_status);
            }
        }
        Err(failure) => call.fail(&mut down, Some(up_send), failure),
    }
    call.finish();
}

/// How a call's tries ended.
enum Tried {
    /// The last try's result on its upstream stream, with the endpoint's slot while the
    /// answer is finished (None when it was let go to wait for a retry that did not come).
    Final {
        ended: Result<(), Failure>,
        up_send: SendStream<Bytes>,
        lease: Option<Lease>,
    },
    /// The call was answered already: every breaker open, or no upstream reached.
    Answered,
}

/// Tries the call on an endpoint until one try is final: a try ends early, for another, only
/// when the call never reached an upstream (no connection, a stream refused unprocessed) or,
/// for an idempotent call, the upstream answered UNAVAILABLE before anything else.
async fn attempt<'a>(
    call: &mut Call<'a>,
    down: &mut Downstream,
    parts: &http::request::Parts,
    cluster: usize,
    tag: Option<&Arc<StreamTag>>,
    upstream_stream: &mut Option<StreamGuard>,
) -> Tried {
    let shared = call.shared;
    let mut attempts = Attempts {
        count: 0,
        tried: Vec::new(),
        retrying: None,
        idempotent: shared.retries.idempotent(&call.out.method),
    };
    loop {
        attempts.count += 1;
        let now = Instant::now();
        // Read once a try: DNS may change the set meanwhile; this try picks from the one it saw.
        let set = shared.clusters[cluster].endpoints();
        if call.pinned.is_none() && set.is_empty() {
            // A DNS name with no address now (scaled to zero), or not answered yet: no
            // upstream's fault, so no breaker records it.
            call.permits = None;
            let message = format!(
                "no endpoint: cluster {} has none now",
                shared.clusters[cluster].name
            );
            let failure = Failure::answered(
                Ending::ConnectFailed,
                Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                message,
            );
            call.fail(down, None, failure);
            return Tried::Answered;
        }
        let endpoint = match pick_endpoint(cluster, &set, &attempts.tried, call) {
            Ok(e) => e,
            Err(rejected) => {
                // Every endpoint's breaker is open: the call never reaches one.
                call.permits = None;
                refuse(&mut down.respond, &mut call.out, call.grpc, &rejected);
                return Tried::Answered;
            }
        };
        attempts.tried.push(endpoint.clone());
        let request_in_headers = lock(&down.replay).fits_in_headers();
        let mut up = match open_upstream(call, cluster, endpoint, parts, request_in_headers).await {
            Ok(up) => up,
            Err(failure) => {
                // Nothing was sent: safe to try another endpoint, if the budget allows.
                if failure.retry == RetryKind::NotReached
                    && attempts.count < shared.retries.max_attempts
                    && retry_allowed(shared, &mut attempts.retrying)
                    && wait_backoff(shared, attempts.count, call.deadline).await
                {
                    debug!(method = %call.out.method, endpoint = ?call.out.endpoint, "upstream not reached: retrying");
                    call.out.error = failure.answer.as_ref().map(|a| a.message.clone());
                    call.attempt_failed(Mark::Failure, now);
                    call.out.retries += 1;
                    continue;
                }
                // The upstream was too slow to connect: its fault, not the client's.
                call.request_complete = true;
                call.fail(down, None, failure);
                return Tried::Answered;
            }
        };
        let stream_id = up.response.stream_id();
        *upstream_stream = up
            .lease
            .tracked()
            .zip(tag)
            .map(|(c, t)| c.stream(stream_id.as_u32(), t.clone()));
        // A GOAWAY that came while the stream was being opened already refused it.
        let ended = if up.lease.refused(stream_id) {
            Err(Failure::refused(
                "the upstream sent GOAWAY before this stream",
                attempts.count,
            ))
        } else {
            exchange(call, down, &mut up, request_in_headers, &mut attempts).await
        };
        let replayable = lock(&down.replay).intact();
        // Whether to go again, and whether to wait before.
        let again = match &ended {
            // Refused unprocessed: no fault of the endpoint's (a graceful shutdown, or a
            // stream limit), and sent again at once.
            Err(f)
                if f.retry == RetryKind::Refused
                    && attempts.count < shared.retries.max_attempts.max(MAX_ATTEMPTS)
                    && replayable
                    && retry_allowed(shared, &mut attempts.retrying) =>
            {
                debug!(method = %call.out.method, endpoint = ?call.out.endpoint, "upstream refused the stream unprocessed: retrying");
                call.attempt_failed(Mark::Neutral, now);
                Some(false)
            }
            Err(f) if f.retry == RetryKind::Unavailable => {
                debug!(method = %call.out.method, endpoint = ?call.out.endpoint, "idempotent call answered UNAVAILABLE: retrying");
                call.attempt_failed(Mark::Failure, now);
                Some(true)
            }
            _ => None,
        };
        call.request_complete = lock(&down.replay).ended;
        let Some(wait) = again else {
            return Tried::Final {
                ended,
                up_send: up.send,
                lease: Some(up.lease),
            };
        };
        // The endpoint's slot is not held while waiting.
        drop(up.lease);
        if wait && !wait_backoff(shared, attempts.count, call.deadline).await {
            // Too close to the deadline to try again: the client gets the upstream's answer.
            return Tried::Final {
                ended,
                up_send: up.send,
                lease: None,
            };
        }
        call.out.retries += 1;
        call.out.grpc_status = None;
        call.out.http_status = None;
        call.out.first_byte = None;
        // A send cut short left its bytes unreleased: they are in the replay now.
        let n = std::mem::take(&mut lock(&down.replay).unreleased);
        let _ = down.body.flow_control().release_capacity(n);
    }
}

/// One try on an opened upstream stream, both directions at once, until the response has
/// reached the client (Ok) or the try failed.
async fn exchange<'a>(
    call: &mut Call<'a>,
    down: &mut Downstream,
    up: &mut Upstream,
    request_in_headers: bool,
    attempts: &mut Attempts<'a>,
) -> Result<(), Failure> {
    let (shared, start, deadline) = (call.shared, call.start, call.deadline);
    let stream_id = up.response.stream_id();
    let expiry = async {
        match deadline {
            Some(d) => sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    let out = &mut call.out;
    let Downstream {
        respond,
        body: client,
        send: client_send,
        trailers,
        replay,
    } = down;
    let (up_send, lease, replay) = (&mut up.send, &up.lease, &*replay);
    let request_bytes = &mut out.request_bytes;
    let request_pump = async move {
        let client_done = resend(replay, up_send, request_in_headers).await?;
        if client_done {
            return Ok(None);
        }
        pump(client, up_send, request_bytes, Some(replay)).await
    };
    tokio::pin!(request_pump);
    let mut request_done = request_in_headers;
    let response = &mut up.response;

    // Until the upstream's response headers. A failed request pump ends nothing here: a
    // client that failed shows up as a client reset, an upstream that stopped reading says
    // why in its response.
    let head = loop {
        tokio::select! {
            r = &mut *response => break r.map_err(|e| {
                let refused = e.is_reset() && e.is_remote() && e.reason() == Some(Reason::REFUSED_STREAM);
                if refused || lease.refused(stream_id) {
                    Failure::refused(&e, attempts.count)
                } else {
                    Failure::upstream(&e)
                }
            })?,
            r = &mut request_pump, if !request_done => {
                request_done = true;
                if let Err(PumpError::Source(e)) = r {
                    debug!(error = %e, "client request body failed");
                }
            }
            () = &mut expiry => return Err(Failure::deadline()),
            reason = poll_fn(|cx| respond.poll_reset(cx)) => {
                return Err(Failure::client_reset(reason.ok()));
            }
        }
    };
    out.first_byte = Some(start.elapsed());
    let (mut head, mut up_body) = head.into_parts();
    out.http_status = Some(head.status.as_u16());
    grpc::strip_hop_by_hop(&mut head.headers);
    let trailers_only = up_body.is_end_stream();
    if trailers_only {
        out.grpc_status = grpc::status_of(&head.headers);
    }
    // An idempotent call the upstream turned away with nothing but UNAVAILABLE may go to
    // another endpoint; the client has seen nothing.
    if trailers_only
        && attempts.idempotent
        && out.grpc_status == Some(Code::Unavailable as u32)
        && attempts.count < shared.retries.max_attempts
        && lock(replay).intact()
        && retry_allowed(shared, &mut attempts.retrying)
    {
        return Err(Failure::unavailable(attempts.count));
    }
    // The response started: the call is the upstream's now, never retried.
    lock(replay).give_up();
    let sent = respond.send_response(http::Response::from_parts(head, ()), trailers_only);
    let client_sink = match sent {
        Err(e) => return Err(Failure::client_reset(e.reason())),
        Ok(_) if trailers_only => return Ok(()),
        Ok(s) => client_send.insert(s),
    };
    let response_pump = pump(&mut up_body, client_sink, &mut out.response_bytes, None);
    tokio::pin!(response_pump);
    loop {
        tokio::select! {
            r = &mut response_pump => return match r {
                Ok(t) => { *trailers = t; Ok(()) }
                Err(PumpError::Source(e)) => Err(Failure::upstream(&e)),
                Err(PumpError::Sink(e)) => Err(Failure::client_reset(e.reason())),
                Err(PumpError::SinkClosed) => Err(Failure::client_reset(None)),
                Err(PumpError::SinkReset(reason)) => Err(Failure::client_reset(Some(reason))),
            },
            r = &mut request_pump, if !request_done => {
                request_done = true;
                // An upstream reset of its side: the response pump sees it.
                if let Err(PumpError::Source(e)) = r {
                    return Err(Failure::client_reset(e.reason()));
                }
            }
            () = &mut expiry => return Err(Failure::deadline()),
        }
    }
}

/// The stream's own replay: one task, never contended (a Mutex only so the future is Send).
fn lock(replay: &Mutex<Replay>) -> MutexGuard<'_, Replay> {
    replay.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What was sent upstream of the request so far, kept while a retry may need it.
struct Replay {
    chunks: Vec<Bytes>,
    size: usize,
    /// Too much was sent, or the response started: no retry.
    spoiled: bool,
    /// The request ended (the client's END_STREAM), with these trailers if any.
    ended: bool,
    trailers: Option<HeaderMap>,
    /// Taken from the client but not yet released to its window (a send cut short by a retry).
    unreleased: usize,
}

impl Replay {
    fn new(ended: bool) -> Self {
        Self {
            chunks: Vec::new(),
            size: 0,
            spoiled: false,
            ended,
            trailers: None,
            unreleased: 0,
        }
    }

    /// The whole request is its headers (END_STREAM on HEADERS).
    fn fits_in_headers(&self) -> bool {
        self.ended && self.chunks.is_empty() && self.trailers.is_none()
    }

    fn intact(&self) -> bool {
        !self.spoiled
    }

    fn record(&mut self, chunk: &Bytes) {
        self.unreleased = chunk.len();
        if self.spoiled {
            return;
        }
        self.size += chunk.len();
        if self.size > REPLAY_LIMIT {
            self.give_up();
        } else {
            self.chunks.push(chunk.clone());
        }
    }

    fn give_up(&mut self) {
        self.spoiled = true;
        self.chunks = Vec::new();
    }
}

/// Sends a retried call what the client had sent so far (nothing on a first try). Returns
/// whether the client's request is complete.
async fn resend(
    replay: &Mutex<Replay>,
    dst: &mut SendStream<Bytes>,
    ended_in_headers: bool,
) -> Result<bool, PumpError> {
    let (chunks, ended, trailers) = {
        let r = lock(replay);
        (r.chunks.clone(), r.ended, r.trailers.clone())
    };
    for chunk in chunks {
        send_all(dst, chunk).await?;
    }
    if ended && !ended_in_headers {
        match trailers {
            Some(t) => dst.send_trailers(t),
            None => dst.send_data(Bytes::new(), true),
        }
        .map_err(PumpError::Sink)?;
    }
    Ok(ended)
}

/// Opens the upstream stream on a picked endpoint (within the deadline), sending the
/// request headers: the lease that holds the slot, the response to come, and the request
/// body's sink.
async fn open_upstream(
    call: &mut Call<'_>,
    cluster_index: usize,
    endpoint: Arc<Endpoint>,
    parts: &http::request::Parts,
    end_of_stream: bool,
) -> Result<Upstream, Failure> {
    let (shared, deadline) = (call.shared, call.deadline);
    let cluster = &shared.clusters[cluster_index];
    call.out.endpoint = Some(endpoint.address.clone());

    let acquired = until(deadline, async {
        let lease = cluster.lease(endpoint).await?;
        let sender = lease.ready().await?;
        Ok::<_, UpstreamError>((lease, sender))
    })
    .await;
    let (lease, mut sender) = match acquired {
        None => {
            return Err(Failure::answered(
                Ending::DeadlineExceeded,
                Code::DeadlineExceeded,
                StatusCode::GATEWAY_TIMEOUT,
                "deadline exceeded before an upstream connection was ready",
            ));
        }
        Some(r) => r.map_err(Failure::not_reached)?,
    };

    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.headers_mut() = parts.headers.clone();
    if let Some(d) = deadline {
        // The upstream gets what is left, never more (less the offset).
        request.headers_mut().insert(
            "grpc-timeout",
            grpc::format_timeout(grpc::upstream_timeout(
                d.saturating_duration_since(Instant::now()),
                shared.grpc_timeout_offset,
            )),
        );
    }
    let (response, send) = sender
        .send_request(request, end_of_stream)
        .map_err(Failure::not_reached)?;
    Ok(Upstream {
        lease,
        response,
        send,
    })
}

/// Runs `f` until `deadline`; None when the deadline came first.
async fn until<T>(deadline: Option<Instant>, f: impl std::future::Future<Output = T>) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}

/// Copies a body and its trailers from `src` to `dst`. Returns the trailers (None when the
/// body ended without). While it waits for `src` it watches `dst` for a reset, so a reset on
/// either side ends the pump at once, however quiet the other side is.
async fn pump(
    src: &mut RecvStream,
    dst: &mut SendStream<Bytes>,
    bytes: &mut u64,
    replay: Option<&Mutex<Replay>>,
) -> Result<Option<HeaderMap>, PumpError> {
    while let Some(chunk) = poll_fn(|cx| {
        if let Poll::Ready(r) = dst.poll_reset(cx) {
            return Poll::Ready(Some(Err(match r {
                Ok(reason) => PumpError::SinkReset(reason),
                Err(e) => PumpError::Sink(e),
            })));
        }
        src.poll_data(cx)
            .map(|c| c.map(|r| r.map_err(PumpError::Source)))
    })
    .await
    {
        let chunk = chunk?;
        let n = chunk.len();
        *bytes += n as u64;
        if let Some(r) = replay {
            lock(r).record(&chunk);
        }
        send_all(dst, chunk).await?;
        // Only now may the source send more: end-to-end flow control.
        let _ = src.flow_control().release_capacity(n);
        if let Some(r) = replay {
            lock(r).unreleased = 0;
        }
    }
    let trailers = poll_fn(|cx| {
        if let Poll::Ready(r) = dst.poll_reset(cx) {
            return Poll::Ready(Err(match r {
                Ok(reason) => PumpError::SinkReset(reason),
                Err(e) => PumpError::Sink(e),
            }));
        }
        src.poll_trailers(cx).map_err(PumpError::Source)
    })
    .await?;
    if let Some(r) = replay {
        let mut r = lock(r);
        r.ended = true;
        r.trailers.clone_from(&trailers);
    }
    match trailers {
        Some(t) => {
            dst.send_trailers(t.clone()).map_err(PumpError::Sink)?;
            Ok(Some(t))
        }
        None => {
            dst.send_data(Bytes::new(), true).map_err(PumpError::Sink)?;
            Ok(None)
        }
    }
}

/// Sends `data` as the receiver's window allows (h2 holds at most what it reserved).
async fn send_all(dst: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), PumpError> {
    while !data.is_empty() {
        dst.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| dst.poll_capacity(cx)).await {
            None => return Err(PumpError::SinkClosed),
            Some(r) => r.map_err(PumpError::Sink)?,
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        dst.send_data(chunk, false).map_err(PumpError::Sink)?;
    }
    Ok(())
}

/// Ends the client's stream with `code`: trailers-only when nothing was sent yet, else
/// trailers after what was (gRPC); for other requests a status, or a reset once the response
/// started.
fn answer(
    respond: &mut SendResponse<Bytes>,
    started: Option<&mut SendStream<Bytes>>,
    out: &mut StreamOutcome,
    grpc: bool,
    code: Code,
    status: StatusCode,
    message: &str,
) {
    match (grpc, started) {
        (true, None) => {
            out.http_status = Some(200);
            out.grpc_status = Some(code as u32);
            let _ = respond.send_response(grpc::trailers_only(code, message), true);
        }
        (true, Some(s)) => {
            out.grpc_status = Some(code as u32);
            let _ = s.send_trailers(grpc::status_trailers(code, message));
        }
        (false, None) => {
            out.http_status = Some(status.as_u16());
            let _ = respond.send_response(grpc::plain_error(status, None), true);
        }
        (false, Some(s)) => s.send_reset(Reason::INTERNAL_ERROR),
    }
}

/// One call: what it holds of the breakers until it is done, and the outcome that will be
/// reported of it.
struct Call<'a> {
    shared: &'a Shared,
    start: Instant,
    grpc: bool,
    deadline: Option<Instant>,
    /// The priority class of the request (`[breakers] classes`).
    class: usize,
    out: StreamOutcome,
    permits: Option<CallPermits<'a>>,
    /// The key of the client's breaker (`sub:...`, `session:...`).
    client_key: Option<String>,
    transitions: Vec<Transition>,
    /// The client had sent all of its request (for whose fault a deadline was).
    request_complete: bool,
    /// The only endpoint the call may go to (an intercepted connection's original
    /// destination, in the passthrough cluster).
    pinned: Option<Arc<Endpoint>>,
}

impl<'a> Call<'a> {
    /// A new call from its request headers (hop-by-hop headers are taken out of them).
    fn new(shared: &'a Shared, conn: &ConnInfo, parts: &mut http::request::Parts) -> Self {
        let start = Instant::now();
        let grpc = grpc::is_grpc(&parts.headers);
        let deadline = grpc::parse_timeout(&parts.headers).map(|t| start + t);
        grpc::strip_hop_by_hop(&mut parts.headers);
        let breakers = &shared.breakers;
        let class = breakers.config().class_of(
            parts
                .headers
                .get(&breakers.config().priority_header)
                .map(|v| v.as_bytes()),
        );
        let out = StreamOutcome {
            listener: conn.listener.to_string(),
            client: conn.client,
            cluster: None,
            endpoint: None,
            method: parts.uri.path().to_owned(),
            grpc,
            http_status: None,
            grpc_status: None,
            ending: Ending::Completed,
            reset_reason: None,
            latency: std::time::Duration::ZERO,
            request_bytes: 0,
            response_bytes: 0,
            retries: 0,
            context: shared.context.extract(&parts.headers, unix_now()),
            class: (class != 0)
                .then(|| breakers.config().classes.get(class).cloned())
                .flatten(),
            breaker: None,
            blame: None,
            first_byte: None,
            original_destination: conn.intercepted.as_ref().map(|i| i.original),
            error: None,
        };
        Call {
            shared,
            start,
            grpc,
            deadline,
            class,
            out,
            permits: None,
            client_key: None,
            transitions: Vec::new(),
            request_complete: false,
            pinned: conn.intercepted.as_ref().and_then(|i| i.endpoint.clone()),
        }
    }

    /// What the correlation table knows of the stream.
    fn stream_tag(&self) -> Arc<StreamTag> {
        Arc::new(StreamTag {
            method: self.out.method.clone(),
            client: self.out.client,
            context: self.out.context.clone(),
            client_key: self.out.context.client_key().map(|k| k.to_string()),
            original_destination: self.out.original_destination,
        })
    }

    /// Routes the call and asks the client's, cluster's and method's breakers, before any
    /// endpoint is looked at: its cluster, or None when it was answered (no route, a breaker
    /// open).
    fn admit(
        &mut self,
        conn: &ConnInfo,
        parts: &http::request::Parts,
        respond: &mut SendResponse<Bytes>,
    ) -> Option<usize> {
        let shared = self.shared;
        let routed = match &conn.intercepted {
            Some(i) => Some(i.cluster),
            None => route(
                &conn.routes,
                parts.uri.authority().map(|a| a.as_str()),
                parts.uri.path(),
            ),
        }
        .filter(|&i| i < shared.clusters.len());
        let Some(cluster) = routed else {
            self.out.ending = Ending::NoRoute;
            answer(
                respond,
                None,
                &mut self.out,
                self.grpc,
                Code::Unimplemented,
                StatusCode::NOT_FOUND,
                "no route for this request",
            );
            return None;
        };
        self.out.cluster = Some(shared.clusters[cluster].name.clone());
        self.client_key = self.out.context.client_key().map(|k| k.to_string());
        match shared.breakers.admit_call(
            cluster,
            self.class,
            &self.out.method,
            self.client_key.as_deref(),
            self.start.into_std(),
            &mut self.transitions,
        ) {
            Ok(p) => {
                self.permits = Some(p);
                Some(cluster)
            }
            Err(rejected) => {
                refuse(respond, &mut self.out, self.grpc, &rejected);
                None
            }
        }
    }

    /// Tells the client how the call failed (after what it was sent, if anything), cancels the
    /// upstream stream when it would go on for nobody, and records the failure.
    fn fail(
        &mut self,
        down: &mut Downstream,
        up_send: Option<SendStream<Bytes>>,
        failure: Failure,
    ) {
        if failure.cancel_upstream
            && let Some(mut up) = up_send
        {
            up.send_reset(Reason::CANCEL);
        }
        self.out.ending = failure.ending;
        if let Some(a) = &failure.answer {
            self.out.error = Some(a.message.clone());
        }
        if failure.reset_reason.is_some() {
            self.out.reset_reason = failure.reset_reason;
        }
        match failure.answer {
            Some(a) => answer(
                &mut down.respond,
                down.send.as_mut(),
                &mut self.out,
                self.grpc,
                a.code,
                a.status,
                &a.message,
            ),
            // The client reset the stream: nobody to answer.
            None => {
                if self.grpc {
                    self.out.grpc_status = Some(Code::Cancelled as u32);
                }
            }
        }
    }

    /// One try went wrong before the call was the upstream's: the endpoint (and its subset)
    /// get the result now, and the call goes on to another.
    fn attempt_failed(&mut self, mark: Mark, now: Instant) {
        if let Some(p) = &mut self.permits {
            p.record_attempt(
                mark,
                now - self.start,
                now.into_std(),
                &mut self.transitions,
            );
        }
    }

    /// Records the call in its breakers, then publishes what changed and the outcome.
    fn finish(mut self) {
        let mut out = self.out;
        let now = Instant::now();
        out.latency = now - self.start;
        if let Some(mut permits) = self.permits.take() {
            let facts = Facts {
                grpc: out.grpc,
                ended: match out.ending {
                    Ending::Completed => Ended::Answered,
                    Ending::ConnectFailed | Ending::NoRoute | Ending::BreakerOpen => {
                        Ended::NotReached
                    }
                    Ending::UpstreamReset => Ended::UpstreamReset,
                    Ending::DeadlineExceeded => Ended::DeadlineExceeded,
                    Ending::ClientCancelled => Ended::ClientCancelled,
                },
                grpc_status: out.grpc_status,
                http_status: out.http_status,
                token_expired: out.context.claims.as_ref().is_some_and(|c| c.expired),
                request_complete: self.request_complete,
            };
            let verdict = classify(&facts, self.shared.breakers.config().resource_exhausted);
            out.blame = match (verdict.upstream, verdict.client) {
                (Mark::Failure, _) => Some("upstream"),
                (_, Mark::Failure) => Some("client"),
                _ => None,
            };
            permits.record_call(
                verdict,
                out.first_byte.unwrap_or(out.latency),
                now.into_std(),
                self.client_key.as_deref(),
                &mut self.transitions,
            );
        }
        debug!(method = %out.method, ending = ?out.ending, grpc_status = ?out.grpc_status, latency = ?out.latency, "stream done");
        let out = Arc::new(out);
        for transition in self.transitions.drain(..) {
            info!(breaker = %transition.breaker, from = transition.change.from.as_str(), to = transition.change.to.as_str(), reason = %transition.change.reason, "breaker");
            self.shared
                .publish_transition(transition, Some(out.clone()), None);
        }
        self.shared
            .bus
            .outcomes
            .publish(Arc::try_unwrap(out).unwrap_or_else(|o| (*o).clone()));
    }
}

/// Picks an endpoint whose breakers admit the call, preferring one not tried yet, and takes
/// its permits.
fn pick_endpoint(
    cluster: usize,
    set: &[Arc<Endpoint>],
    tried: &[Arc<Endpoint>],
    call: &mut Call<'_>,
) -> Result<Arc<Endpoint>, Rejected> {
    let (shared, class) = (call.shared, call.class);
    let breakers = &shared.breakers;
    let pool = &shared.clusters[cluster];
    let now = Instant::now().into_std();
    // A few tries: another call may take the last half-open probe between the look and
    // the admission.
    for _ in 0..3 {
        let admissible = |e: &Endpoint| breakers.endpoint_admissible(&e.breakers, class, now);
        let untried = |e: &Endpoint| !tried.iter().any(|t| std::ptr::eq(&**t, e));
        let picked = match &call.pinned {
            Some(e) => admissible(e).then(|| e.clone()),
            None => ClusterPool::pick(set, |e| untried(e) && admissible(e))
                .or_else(|| ClusterPool::pick(set, admissible)),
        };
        let Some(e) = picked else {
            break;
        };
        let Some(permits) = call.permits.as_mut() else {
            return Ok(e);
        };
        match breakers.admit_endpoint(permits, &e.breakers, class, now, &mut call.transitions) {
            Ok(()) => return Ok(e),
            Err(_) => continue,
        }
    }
    let refusal = match &call.pinned {
        Some(e) => breakers.endpoint_refusal(&e.breakers, class, now),
        None => breakers.no_endpoint(cluster, class, set.iter().map(|e| &*e.breakers), now),
    };
    Err(refusal.unwrap_or_else(|| Rejected {
        breaker: Arc::new(BreakerId {
            scope: Scope::Cluster,
            name: pool.name.clone(),
            class: None,
        }),
        reason: BreakerReason::OpenElapsed,
        retry_after: std::time::Duration::from_secs(1),
    }))
}

/// Whether this call may retry (the first retry takes a place in the budget, kept until
/// the call ends).
fn retry_allowed<'a>(shared: &'a Shared, guard: &mut Option<RetryGuard<'a>>) -> bool {
    if guard.is_none() {
        *guard = shared.budget.try_retry(&shared.retries);
    }
    guard.is_some()
}

/// Waits before retry `attempt`; false when the deadline would pass first.
async fn wait_backoff(shared: &Shared, attempt: u32, deadline: Option<Instant>) -> bool {
    let wait = shared.retries.backoff(attempt);
    if deadline.is_some_and(|d| Instant::now() + wait >= d) {
        return false;
    }
    tokio::time::sleep(wait).await;
    true
}

/// Answers a call a breaker refused: gRPC UNAVAILABLE naming the breaker and why, or 503
/// with Retry-After.
fn refuse(
    respond: &mut SendResponse<Bytes>,
    out: &mut StreamOutcome,
    grpc: bool,
    rejected: &Rejected,
) {
    out.ending = Ending::BreakerOpen;
    out.breaker = Some(rejected.breaker.to_string());
    let retry_after = rejected.retry_after.max(std::time::Duration::from_secs(1));
    if grpc {
        let message = format!(
            "circuit breaker open: {} ({}); retry in {:.1}s",
            rejected.breaker,
            rejected.reason,
            rejected.retry_after.as_secs_f64()
        );
        out.http_status = Some(200);
        out.grpc_status = Some(Code::Unavailable as u32);
        let _ = respond.send_response(grpc::trailers_only(Code::Unavailable, &message), true);
    } else {
        out.http_status = Some(503);
        let _ = respond.send_response(
            grpc::plain_error(StatusCode::SERVICE_UNAVAILABLE, Some(retry_after)),
            true,
        );
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
