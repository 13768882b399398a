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

use std::{future::poll_fn, net::SocketAddr, sync::Arc, task::Poll};

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
}

pub async fn forward(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
) {
    let start = Instant::now();
    let (parts, mut client_body) = req.into_parts();
    let grpc = grpc::is_grpc(&parts.headers);
    let deadline = grpc::parse_timeout(&parts.headers).map(|t| start + t);
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
    };

    let request_done = client_body.is_end_stream();
    let opened = open_upstream(&shared, &conn, parts, request_done, deadline, &mut out).await;
    let (_lease, response, mut up_send) = match opened {
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

    let mut client_send: Option<SendStream<Bytes>> = None;
    let mut trailers: Option<HeaderMap> = None;
    let end = {
        let expiry = async {
            match deadline {
                Some(d) => sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        let request_pump = pump(&mut client_body, &mut up_send, &mut out.request_bytes);
        tokio::pin!(request_pump);
        let mut request_done = request_done;
        tokio::pin!(response);

        // Until the upstream's response headers. A failed request pump ends nothing here: a
        // client that failed shows up as a client reset, an upstream that stopped reading
        // says why in its response.
        let head = loop {
            tokio::select! {
                r = &mut response => break r.map_err(|e| upstream_end(&e)),
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
                let (mut head, mut up_body) = head.into_parts();
                out.http_status = Some(head.status.as_u16());
                grpc::strip_hop_by_hop(&mut head.headers);
                let trailers_only = up_body.is_end_stream();
                if trailers_only {
                    out.grpc_status = grpc::status_of(&head.headers);
                }
                match respond.send_response(http::Response::from_parts(head, ()), trailers_only) {
                    Err(e) => End::ClientReset(e.reason()),
                    Ok(_) if trailers_only => End::Done,
                    Ok(s) => {
                        let client = client_send.insert(s);
                        let response_pump = pump(&mut up_body, client, &mut out.response_bytes);
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
    }
    finish(&shared, out, start);
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
    mut parts: http::request::Parts,
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

    grpc::strip_hop_by_hop(&mut parts.headers);
    if let Some(d) = deadline {
        // The upstream gets what is left, never more.
        parts.headers.insert(
            "grpc-timeout",
            grpc::format_timeout(d.saturating_duration_since(Instant::now())),
        );
    }
    let (response, up_send) = sender
        .send_request(Request::from_parts(parts, ()), end_of_stream)
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
        send_all(dst, chunk).await?;
        *bytes += n as u64;
        // Only now may the source send more: end-to-end flow control.
        let _ = src.flow_control().release_capacity(n);
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
