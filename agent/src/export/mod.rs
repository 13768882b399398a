//! Export: the journal's breaker-trip events as OTLP log records ([`otlp_logs`], from a
//! cursor, so a collector outage loses nothing), and the agent's metrics ([`metrics`]) over
//! OTLP and on a Prometheus text endpoint ([`prometheus`]). To an OpenTelemetry Collector (or
//! anything that speaks OTLP/gRPC), not to anything home-made.

pub mod metrics;
pub mod otlp_logs;
pub mod prometheus;

pub use crate::config::export::{Export, ExportConfig};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

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
