//! Export: the journal's breaker-trip events as OTLP log records ([`otlp_logs`], from a
//! cursor, so a collector outage loses nothing), and the agent's metrics ([`metrics`]) over
//! OTLP and on a Prometheus text endpoint ([`prometheus`]). To an OpenTelemetry Collector (or
//! anything that speaks OTLP/gRPC), not to anything home-made.

pub mod metrics;
pub mod otlp_logs;
pub mod prometheus;

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

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
    pub fn check(&self) -> Result<Export, String> {
        let otlp_interval = match &self.otlp_interval {
            None => Duration::from_secs(10),
            Some(p) => humantime::parse_duration(p)
                .map_err(|e| format!("export.otlp_interval {p:?} is not a period ({e})"))?,
        };
        if otlp_interval < Duration::from_millis(100) {
            return Err("export.otlp_interval: at least 100ms".into());
        }
        if let Some(url) = &self.otlp_endpoint {
            check_endpoint(url).map_err(|why| format!("export.otlp_endpoint {url:?}: {why}"))?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn endpoints_and_periods_are_checked() {
        let ok = ExportConfig {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            otlp_interval: Some("1s".into()),
            prometheus_listen: None,
        };
        assert_eq!(ok.check().unwrap().otlp_interval, Duration::from_secs(1));
        assert_eq!(
            ExportConfig::default().check().unwrap().otlp_interval,
            Duration::from_secs(10)
        );
        for bad in [
            "127.0.0.1:4317",
            "https://c:4317",
            "http://c",
            "http://:4317",
            "http://c:0",
        ] {
            let c = ExportConfig {
                otlp_endpoint: Some(bad.into()),
                ..ExportConfig::default()
            };
            assert!(c.check().is_err(), "{bad}");
        }
        let c = ExportConfig {
            otlp_interval: Some("1ms".into()),
            ..ExportConfig::default()
        };
        assert!(c.check().is_err());
    }
}
