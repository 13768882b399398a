//! `GET /metrics`: the metrics of [`super::metrics`] in the Prometheus text format (the
//! `prometheus` crate's encoder, fed by `opentelemetry-prometheus`). HTTP/1.1 only, as
//! Prometheus scrapes; every other path is 404.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder as _, TextEncoder};
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
#[error("prometheus endpoint {address}: {source}")]
pub struct BindError {
    address: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds now, so a taken port stops the agent at start.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BindError { address, source })
}

/// Serves scrapes until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    registry: prometheus::Registry,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, say: wait rather than spin.
                    warn!(%error, "prometheus endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(answer(&req, &registry)) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                debug!(%error, "prometheus endpoint: connection ended");
            }
        });
    }
}

fn answer(req: &Request<Incoming>, registry: &prometheus::Registry) -> Response<Full<Bytes>> {
    let reply = |status, content_type: &str, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"GET only\n".to_vec(),
        );
    }
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    // The callbacks of the observable metrics run here; they only read counters.
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => reply(StatusCode::OK, encoder.format_type(), body),
        Err(error) => {
            warn!(%error, "prometheus endpoint: encoding failed");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{error}\n").into_bytes(),
            )
        }
    }
}
