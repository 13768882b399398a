//! The `[export]` section: the OTLP receiver and the Prometheus endpoint (see `export`).

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

/// What is wrong in `[export]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("export.otlp_interval {value:?} is not a period ({reason})")]
    Interval { value: String, reason: String },
    #[error("export.otlp_interval: at least 100ms")]
    IntervalTooShort,
    #[error("export.otlp_endpoint {url:?}: {why}")]
    Endpoint { url: String, why: String },
}

/// The `[export]` section.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// OTLP/gRPC receiver, `http://HOST:PORT` (a collector's 4317); none: no OTLP export.
    pub otlp_endpoint: Option<String>,
    /// How often metrics are sent over OTLP ("10s").
    pub otlp_interval: Option<String>,
    /// Address of the Prometheus text endpoint (`GET /metrics`); none: not served.
    pub prometheus_listen: Option<SocketAddr>,
}

/// [`ExportConfig`], checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Export {
    pub otlp_endpoint: Option<String>,
    pub otlp_interval: Duration,
    pub prometheus_listen: Option<SocketAddr>,
}

impl ExportConfig {
    pub fn check(&self) -> Result<Export, ExportError> {
        let otlp_interval = match &self.otlp_interval {
            None => Duration::from_secs(10),
            Some(p) => humantime::parse_duration(p).map_err(|e| ExportError::Interval {
                value: p.clone(),
                reason: e.to_string(),
            })?,
        };
        if otlp_interval < Duration::from_millis(100) {
            return Err(ExportError::IntervalTooShort);
        }
        if let Some(url) = &self.otlp_endpoint {
            check_endpoint(url).map_err(|why| ExportError::Endpoint {
                url: url.clone(),
                why,
            })?;
        }
        Ok(Export {
            otlp_endpoint: self.otlp_endpoint.clone(),
            otlp_interval,
            prometheus_listen: self.prometheus_listen,
        })
    }
}

/// `http://HOST:PORT`: cleartext gRPC, as to a collector beside the agent. TLS is not built in.
fn check_endpoint(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(if url.starts_with("https://") {
            "https is not supported yet: send to a collector beside the agent over http://".into()
        } else {
            "not http://HOST:PORT".into()
        });
    };
    let authority = rest.trim_end_matches('/');
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            tonic::transport::Endpoint::from_shared(url.to_owned())
                .map(drop)
                .map_err(|e| e.to_string())
        }
        _ => Err("not http://HOST:PORT".into()),
    }
}
