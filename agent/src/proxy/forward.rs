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
    upstream::{ClusterPool, Lease, UpstreamError},
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
}

/// The first route that matches the request, as an index into the clusters.
pub fn route(routes: &[Route], authority: Option<&str>, path: &str) -> Option<usize> {
    let authority = authority.map(str::to_ascii_lowercase);
    routes.iter().find_map(|r| {
        let authority_ok = match (&r.authority, &authority) {
            (None, _) => true,
            (Some(want), Some(got)) => {
                got == want
                    || got
                        .rsplit_once(':')
                        .is_some_and(|(host, port)| host == want && port.parse::<u16>().is_ok())
            }
            (Some(_), None) => false,
        };
        (authority_ok && path.starts_with(&r.path_prefix)).then_some(r.cluster)
    })
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

/// How the call ended, decided while both directions ran.
enum End {
    /// The response, trailers included, reached the client.
    Done,
    Deadline,
    ClientReset(Option<Reason>),
    Upstream(String, Option<Reason>),
    /// The upstream refused the stream before processing any of it (GOAWAY above its
    /// last-stream-id, REFUSED_STREAM): safe to send again.
    Refused(String),
    /// An idempotent call answered with a trailers-only UNAVAILABLE, not yet passed on.
    Unavailable,
}

/// Tries per call: the first, and retries of calls an upstream refused unprocessed.
const MAX_ATTEMPTS: u32 = 3;

/// Request bytes kept for a retry; a call that sent more before its response started is not
/// retried (as Envoy's retry buffer).
const REPLAY_LIMIT: usize = 64 * 1024;

pub async fn forward(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
) {
    let start = Instant::now();
    let _in_flight = shared.budget.call();
    let (mut parts, mut client_body) = req.into_parts();
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
    let mut out = StreamOutcome {
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
    };
    // The stream in the correlation table, under its id on the client's connection (and,
    // below, on the upstream's), for kernel signals about it to find its context.
    let tag = conn.tracked.as_ref().map(|_| {
        Arc::new(StreamTag {
            method: out.method.clone(),
            client: conn.client,
            context: out.context.clone(),
            client_key: out.context.client_key().map(|k| k.to_string()),
        })
    });
    let _downstream_stream = conn
        .tracked
        .as_ref()
        .zip(tag.as_ref())
        .map(|(c, t)| c.conn.stream(respond.stream_id().as_u32(), t.clone()));
    let mut _upstream_stream: Option<StreamGuard> = None;
    let mut call = Call {
        shared: &shared,
        start,
        permits: None,
        client_key: None,
        transitions: Vec::new(),
        request_complete: false,
    };

    let Some(cluster_index) = route(
        &conn.routes,
        parts.uri.authority().map(|a| a.as_str()),
        parts.uri.path(),
    )
    .filter(|&i| i < shared.clusters.len()) else {
        out.ending = Ending::NoRoute;
        answer(
            &mut respond,
            None,
            &mut out,
            grpc,
            Code::Unimplemented,
            StatusCode::NOT_FOUND,
            "no route for this request",
        );
        return call.finish(out);
    };
    let cluster = &shared.clusters[cluster_index];
    out.cluster = Some(cluster.name.clone());
    // The client's, cluster's and method's breakers, before any endpoint is looked at.
    call.client_key = out.context.client_key().map(|k| k.to_string());
    match breakers.admit_call(
        cluster_index,
        class,
        &out.method,
        call.client_key.as_deref(),
        start.into_std(),
        &mut call.transitions,
    ) {
        Ok(p) => call.permits = Some(p),
        Err(rejected) => {
            refuse(&mut respond, &mut out, grpc, &rejected);
            return call.finish(out);
        }
    }

    let replay = Mutex::new(Replay::new(client_body.is_end_stream()));
    let mut client_send: Option<SendStream<Bytes>> = None;
    let mut trailers: Option<HeaderMap> = None;
    let mut attempt = 0;
    let mut tried: Vec<usize> = Vec::new();
    let mut retrying: Option<RetryGuard<'_>> = None;
    let idempotent = shared.retries.idempotent(&out.method);
    // Each pass picks an endpoint, opens an upstream stream and forwards the call on it; a
    // pass ends early, for another, only when the call never reached an upstream (no
    // connection, a stream refused unprocessed) or, for an idempotent call, the upstream
    // answered UNAVAILABLE before anything else.
    let (end, mut up_send, _lease) = loop {
        attempt += 1;
        let now = Instant::now();
        let endpoint_index = match pick_endpoint(cluster_index, class, &tried, &mut call) {
            Ok(i) => i,
            Err(rejected) => {
                // Every endpoint's breaker is open: the call never reaches one.
                call.permits = None;
                refuse(&mut respond, &mut out, grpc, &rejected);
                return call.finish(out);
            }
        };
        tried.push(endpoint_index);
        let request_in_headers = lock(&replay).fits_in_headers();
        let opened = open_upstream(
            &shared,
            cluster,
            endpoint_index,
            &parts,
            request_in_headers,
            deadline,
            &mut out,
        )
        .await;
        let (lease, response, mut up_send) = match opened {
            Ok(ok) => ok,
            Err(r) => {
                // Nothing was sent: safe to try another endpoint, if the budget allows.
                if r.ending == Ending::ConnectFailed
                    && attempt < shared.retries.max_attempts
                    && retry_allowed(&shared, &mut retrying)
                    && wait_backoff(&shared, attempt, deadline).await
                {
                    debug!(method = %out.method, endpoint = ?out.endpoint, why = %r.message, "upstream not reached: retrying");
                    call.attempt_failed(Mark::Failure, now);
                    out.retries += 1;
                    continue;
                }
                out.ending = r.ending;
                // The upstream was too slow to connect: its fault, not the client's.
                call.request_complete = true;
                answer(
                    &mut respond,
                    None,
                    &mut out,
                    grpc,
                    r.code,
                    r.status,
                    &r.message,
                );
                return call.finish(out);
            }
        };
        let stream_id = response.stream_id();
        _upstream_stream = lease
            .tracked()
            .zip(tag.as_ref())
            .map(|(c, t)| c.stream(stream_id.as_u32(), t.clone()));
        // A GOAWAY that came while the stream was being opened already refused it.
        let end = if lease.refused(stream_id) {
            End::Refused("the upstream sent GOAWAY before this stream".into())
        } else {
            let expiry = async {
                match deadline {
                    Some(d) => sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expiry);
            let request_bytes = &mut out.request_bytes;
            let (up, client, replay) = (&mut up_send, &mut client_body, &replay);
            let request_pump = async move {
                let client_done = resend(replay, up, request_in_headers).await?;
                if client_done {
                    return Ok(None);
                }
                pump(client, up, request_bytes, Some(replay)).await
            };
            tokio::pin!(request_pump);
            let mut request_done = request_in_headers;
            tokio::pin!(response);

            // Until the upstream's response headers. A failed request pump ends nothing here:
            // a client that failed shows up as a client reset, an upstream that stopped
            // reading says why in its response.
            let head = loop {
                tokio::select! {
                    r = &mut response => break r.map_err(|e| {
                        let refused = e.is_reset() && e.is_remote() && e.reason() == Some(Reason::REFUSED_STREAM);
                        if refused || lease.refused(stream_id) {
                            End::Refused(e.to_string())
                        } else {
                            upstream_end(&e)
                        }
                    }),
                    r = &mut request_pump, if !request_done => {
                        request_done = true;
                        if let Err(PumpError::Source(e)) = r {
                            debug!(error = %e, "client request body failed");
                        }
                    }
                    () = &mut expiry => break Err(End::Deadline),
                    reason = poll_fn(|cx| respond.poll_reset(cx)) => {
                        break Err(End::ClientReset(reason.ok()));
                    }
                }
            };
            match head {
                Err(end) => end,
                Ok(head) => {
                    out.first_byte = Some(start.elapsed());
                    let (mut head, mut up_body) = head.into_parts();
                    out.http_status = Some(head.status.as_u16());
                    grpc::strip_hop_by_hop(&mut head.headers);
                    let trailers_only = up_body.is_end_stream();
                    if trailers_only {
                        out.grpc_status = grpc::status_of(&head.headers);
                    }
                    // An idempotent call the upstream turned away with nothing but
                    // UNAVAILABLE may go to another endpoint; the client has seen nothing.
                    if trailers_only
                        && idempotent
                        && out.grpc_status == Some(Code::Unavailable as u32)
                        && attempt < shared.retries.max_attempts
                        && lock(replay).intact()
                        && retry_allowed(&shared, &mut retrying)
                    {
                        End::Unavailable
                    } else {
                        // The response started: the call is the upstream's now, never retried.
                        lock(replay).give_up();
                        match respond
                            .send_response(http::Response::from_parts(head, ()), trailers_only)
                        {
                            Err(e) => End::ClientReset(e.reason()),
                            Ok(_) if trailers_only => End::Done,
                            Ok(s) => {
                                let client = client_send.insert(s);
                                let response_pump =
                                    pump(&mut up_body, client, &mut out.response_bytes, None);
                                tokio::pin!(response_pump);
                                loop {
                                    tokio::select! {
                                        r = &mut response_pump => break match r {
                                            Ok(t) => { trailers = t; End::Done }
                                            Err(PumpError::Source(e)) => upstream_end(&e),
                                            Err(PumpError::Sink(e)) => End::ClientReset(e.reason()),
                                            Err(PumpError::SinkClosed) => End::ClientReset(None),
                                            Err(PumpError::SinkReset(reason)) => End::ClientReset(Some(reason)),
                                        },
                                        r = &mut request_pump, if !request_done => {
                                            request_done = true;
                                            // An upstream reset of its side: the response pump sees it.
                                            if let Err(PumpError::Source(e)) = r {
                                                break End::ClientReset(e.reason());
                                            }
                                        }
                                        () = &mut expiry => break End::Deadline,
                                    }
                                }
                            }
                        }
                    }
                }
            }
        };
        let replayable = lock(&replay).intact();
        // Whether to go again, and whether to wait before.
        let again = match &end {
            // Refused unprocessed: no fault of the endpoint's (a graceful shutdown, or a
            // stream limit), and sent again at once, as gRPC's transparent retry does.
            End::Refused(why)
                if attempt < shared.retries.max_attempts.max(MAX_ATTEMPTS)
                    && replayable
                    && retry_allowed(&shared, &mut retrying) =>
            {
                debug!(method = %out.method, endpoint = ?out.endpoint, %why, "upstream refused the stream unprocessed: retrying");
                call.attempt_failed(Mark::Neutral, now);
                Some(false)
            }
            End::Unavailable => {
                debug!(method = %out.method, endpoint = ?out.endpoint, "idempotent call answered UNAVAILABLE: retrying");
                call.attempt_failed(Mark::Failure, now);
                Some(true)
            }
            _ => None,
        };
        call.request_complete = lock(&replay).ended;
        let Some(wait) = again else {
            break (end, up_send, Some(lease));
        };
        // The endpoint's slot is not held while waiting.
        drop(lease);
        if wait && !wait_backoff(&shared, attempt, deadline).await {
            // Too close to the deadline to try again: the client gets the upstream's answer.
            break (end, up_send, None);
        }
        out.retries += 1;
        out.grpc_status = None;
        out.http_status = None;
        out.first_byte = None;
        // A send cut short left its bytes unreleased: they are in the replay now.
        let n = std::mem::take(&mut lock(&replay).unreleased);
        let _ = client_body.flow_control().release_capacity(n);
    };

    match end {
        End::Done => {
            if let Some(t) = &trailers {
                out.grpc_status = grpc::status_of(t).or(out.grpc_status);
            }
        }
        End::Deadline => {
            up_send.send_reset(Reason::CANCEL);
            out.ending = Ending::DeadlineExceeded;
            out.reset_reason = Some("CANCEL".into());
            answer(
                &mut respond,
                client_send.as_mut(),
                &mut out,
                grpc,
                Code::DeadlineExceeded,
                StatusCode::GATEWAY_TIMEOUT,
                "deadline exceeded",
            );
        }
        End::ClientReset(reason) => {
            up_send.send_reset(Reason::CANCEL);
            out.ending = Ending::ClientCancelled;
            out.reset_reason = reason.map(|r| format!("{r:?}"));
            if grpc {
                out.grpc_status = Some(Code::Cancelled as u32);
            }
        }
        End::Upstream(why, reason) => {
            out.ending = Ending::UpstreamReset;
            out.reset_reason = reason.map(|r| format!("{r:?}"));
            let msg = format!("upstream failed mid-call: {why}");
            answer(
                &mut respond,
                client_send.as_mut(),
                &mut out,
                grpc,
                Code::Unavailable,
                StatusCode::BAD_GATEWAY,
                &msg,
            );
        }
        End::Unavailable => {
            answer(
                &mut respond,
                None,
                &mut out,
                grpc,
                Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("upstream answered UNAVAILABLE {attempt} times"),
            );
        }
        End::Refused(why) => {
            out.ending = Ending::UpstreamReset;
            out.reset_reason = Some("REFUSED_STREAM".into());
            let msg = format!("upstream refused the call {attempt} times: {why}");
            answer(
                &mut respond,
                None,
                &mut out,
                grpc,
                Code::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                &msg,
            );
        }
    }
    call.finish(out);
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

/// Why a call was answered by the proxy before reaching an upstream.
struct Refusal {
    ending: Ending,
    code: Code,
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(ending: Ending, code: Code, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            ending,
            code,
            status,
            message: message.into(),
        }
    }

    fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::new(
            Ending::ConnectFailed,
            Code::Unavailable,
            StatusCode::BAD_GATEWAY,
            format!("upstream unavailable: {e}"),
        )
    }
}

/// Opens the upstream stream on a picked endpoint (within the deadline), sending the
/// request headers: the lease that holds the slot, the response to come, and the request
/// body's sink.
async fn open_upstream(
    shared: &Shared,
    cluster: &ClusterPool,
    endpoint_index: usize,
    parts: &http::request::Parts,
    end_of_stream: bool,
    deadline: Option<Instant>,
    out: &mut StreamOutcome,
) -> Result<(Lease, ResponseFuture, SendStream<Bytes>), Refusal> {
    let endpoint = cluster.endpoint(endpoint_index).ok_or_else(|| {
        Refusal::new(
            Ending::ConnectFailed,
            Code::Unavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster has no endpoints",
        )
    })?;
    out.endpoint = Some(endpoint.address.clone());

    let acquired = until(deadline, async {
        let lease = cluster.lease(endpoint).await?;
        let sender = lease.ready().await?;
        Ok::<_, UpstreamError>((lease, sender))
    })
    .await;
    let (lease, mut sender) = match acquired {
        None => {
            return Err(Refusal::new(
                Ending::DeadlineExceeded,
                Code::DeadlineExceeded,
                StatusCode::GATEWAY_TIMEOUT,
                "deadline exceeded before an upstream connection was ready",
            ));
        }
        Some(r) => r.map_err(Refusal::unavailable)?,
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
    let (response, up_send) = sender
        .send_request(request, end_of_stream)
        .map_err(Refusal::unavailable)?;
    Ok((lease, response, up_send))
}

fn upstream_end(e: &h2::Error) -> End {
    End::Upstream(e.to_string(), e.reason())
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

/// What one call holds of the breakers, until it is done.
struct Call<'a> {
    shared: &'a Shared,
    start: Instant,
    permits: Option<CallPermits<'a>>,
    /// The key of the client's breaker (`sub:...`, `session:...`).
    client_key: Option<String>,
    transitions: Vec<Transition>,
    /// The client had sent all of its request (for whose fault a deadline was).
    request_complete: bool,
}

impl Call<'_> {
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
    fn finish(mut self, mut out: StreamOutcome) {
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
    class: usize,
    tried: &[usize],
    call: &mut Call<'_>,
) -> Result<usize, Rejected> {
    let shared = call.shared;
    let breakers = &shared.breakers;
    let pool = &shared.clusters[cluster];
    let now = Instant::now().into_std();
    // A few tries: another call may take the last half-open probe between the look and
    // the admission.
    for _ in 0..3 {
        let admissible = |i: usize| breakers.endpoint_admissible(cluster, class, i, now);
        let Some(i) = pool
            .pick(|i| !tried.contains(&i) && admissible(i))
            .or_else(|| pool.pick(admissible))
        else {
            break;
        };
        let Some(permits) = call.permits.as_mut() else {
            return Ok(i);
        };
        match breakers.admit_endpoint(permits, cluster, class, i, now, &mut call.transitions) {
            Ok(()) => return Ok(i),
            Err(_) => continue,
        }
    }
    Err(breakers
        .no_endpoint(cluster, class, now)
        .unwrap_or_else(|| Rejected {
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

#[cfg(test)]
mod tests;
