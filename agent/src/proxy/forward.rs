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
use tracing::debug;

use super::{
    config::Route,
    grpc::{self, Code},
    outcome::{Ending, Outcomes, StreamOutcome},
    upstream::{ClusterPool, Lease, UpstreamError},
};

/// What every stream of the proxy shares.
pub struct Shared {
    pub clusters: Vec<ClusterPool>,
    pub outcomes: Outcomes,
    /// See [`super::config::Timeouts::grpc_timeout_offset`].
    pub grpc_timeout_offset: std::time::Duration,
}

/// What a stream knows of its client connection.
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub routes: Arc<[Route]>,
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
    let (mut parts, mut client_body) = req.into_parts();
    let grpc = grpc::is_grpc(&parts.headers);
    let deadline = grpc::parse_timeout(&parts.headers).map(|t| start + t);
    grpc::strip_hop_by_hop(&mut parts.headers);
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
    };

    let replay = Mutex::new(Replay::new(client_body.is_end_stream()));
    let mut client_send: Option<SendStream<Bytes>> = None;
    let mut trailers: Option<HeaderMap> = None;
    let mut attempt = 0;
    // Each pass opens an upstream stream and forwards the call on it; a pass ends early, for
    // another, only when the upstream refused the stream before processing any of it.
    let (end, mut up_send, _lease) = loop {
        attempt += 1;
        let request_in_headers = lock(&replay).fits_in_headers();
        let opened = open_upstream(
            &shared,
            &conn,
            &parts,
            request_in_headers,
            deadline,
            &mut out,
        )
        .await;
        let (lease, response, mut up_send) = match opened {
            Ok(ok) => ok,
            Err(r) => {
                out.ending = r.ending;
                answer(
                    &mut respond,
                    None,
                    &mut out,
                    grpc,
                    r.code,
                    r.status,
                    &r.message,
                );
                return finish(&shared, out, start);
            }
        };
        let stream_id = response.stream_id();
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
                    // The response started: the call is the upstream's now, never retried.
                    lock(replay).give_up();
                    let (mut head, mut up_body) = head.into_parts();
                    out.http_status = Some(head.status.as_u16());
                    grpc::strip_hop_by_hop(&mut head.headers);
                    let trailers_only = up_body.is_end_stream();
                    if trailers_only {
                        out.grpc_status = grpc::status_of(&head.headers);
                    }
                    match respond.send_response(http::Response::from_parts(head, ()), trailers_only)
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
        };
        let replayable = lock(&replay).intact();
        if let End::Refused(why) = &end
            && attempt < MAX_ATTEMPTS
            && replayable
        {
            debug!(method = %out.method, endpoint = ?out.endpoint, %why, "upstream refused the stream unprocessed: retrying");
            out.retries += 1;
            // A send cut short left its bytes unreleased: they are in the replay now.
            let n = std::mem::take(&mut lock(&replay).unreleased);
            let _ = client_body.flow_control().release_capacity(n);
            continue;
        }
        break (end, up_send, lease);
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
    finish(&shared, out, start);
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

/// Routes the call, picks an endpoint, and opens the upstream stream (within the deadline),
/// sending the request headers: the lease that holds the slot, the response to come, and
/// the request body's sink.
async fn open_upstream(
    shared: &Shared,
    conn: &ConnInfo,
    parts: &http::request::Parts,
    end_of_stream: bool,
    deadline: Option<Instant>,
    out: &mut StreamOutcome,
) -> Result<(Lease, ResponseFuture, SendStream<Bytes>), Refusal> {
    let cluster = route(
        &conn.routes,
        parts.uri.authority().map(|a| a.as_str()),
        parts.uri.path(),
    )
    .and_then(|i| shared.clusters.get(i))
    .ok_or_else(|| {
        Refusal::new(
            Ending::NoRoute,
            Code::Unimplemented,
            StatusCode::NOT_FOUND,
            "no route for this request",
        )
    })?;
    out.cluster = Some(cluster.name.clone());
    let endpoint = cluster.pick().ok_or_else(|| {
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

fn finish(shared: &Shared, mut out: StreamOutcome, start: Instant) {
    out.latency = start.elapsed();
    debug!(method = %out.method, ending = ?out.ending, grpc_status = ?out.grpc_status, latency = ?out.latency, "stream done");
    shared.outcomes.publish(out);
}

#[cfg(test)]
mod tests;
