//! The proxy's configuration: a TOML file (see `deploy/agent.example.toml`), or the quick mode
//! `--listen ADDR --upstream ADDR,...`. Every error names its line and column; `agent
//! check-config` prints them all at once.

use std::{collections::HashMap, net::SocketAddr, ops::Range, path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::retry::RetryConfig;
use crate::{
    api::ApiConfig,
    breaker::config::{BreakerConfig, RawBreakers},
    context::ContextConfig,
    correlate::config::SignalsConfig,
    events::EventsConfig,
    export::ExportConfig,
};

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub breakers: BreakerConfig,
    pub context: ContextConfig,
    pub retries: RetryConfig,
    pub events: EventsConfig,
    pub signals: SignalsConfig,
    pub export: ExportConfig,
    pub api: ApiConfig,
}

#[derive(Clone, Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// In order; the first that matches a request routes it.
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `:authority` (host, or host:port) to match exactly, case-insensitively; any if None.
    pub authority: Option<String>,
    /// Path prefix to match; a gRPC service `pkg.Service` is the prefix `/pkg.Service/`.
    pub path_prefix: String,
    /// Index into [`ProxyConfig::clusters`].
    pub cluster: usize,
}

#[derive(Clone, Debug)]
pub struct Cluster {
    pub name: String,
    /// `host:port`, resolved when a connection is made.
    pub endpoints: Vec<String>,
    /// Labelled subsets (`[[cluster.subset]]`, e.g. a canary), each with its own breaker;
    /// endpoints listed without one are in `default`. Empty: one subset, no subset breaker.
    pub subsets: Vec<String>,
    /// The subset of each endpoint, an index into `subsets`.
    pub endpoint_subset: Vec<usize>,
    pub connect_timeout: Duration,
    /// Connections opened to one endpoint at most; streams beyond what they allow
    /// (the endpoint's SETTINGS_MAX_CONCURRENT_STREAMS) wait for one to finish.
    pub max_connections_per_endpoint: usize,
}

/// Timeouts the `h2` crate does not have of its own.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From accepting a connection to its first complete request headers.
    #[serde(with = "duration")]
    pub header_read: Duration,
    /// A client connection with no open stream for this long is closed (GOAWAY).
    #[serde(with = "duration")]
    pub idle: Duration,
    /// PING a client connection that was quiet this long...
    #[serde(with = "duration")]
    pub keepalive_interval: Duration,
    /// ...and close it when the PING is not answered within this.
    #[serde(with = "duration")]
    pub keepalive_timeout: Duration,
    /// On SIGTERM: how long in-flight streams may take to finish after GOAWAY.
    #[serde(with = "duration")]
    pub drain: Duration,
    /// Taken off the `grpc-timeout` passed upstream (besides the time already spent), so the
    /// upstream's own deadline fires first and its DEADLINE_EXCEEDED gets back in time; the
    /// proxy still ends the call at the client's deadline if it does not. Not taken from
    /// deadlines shorter than twice this.
    #[serde(with = "duration")]
    pub grpc_timeout_offset: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(30),
            grpc_timeout_offset: Duration::from_millis(5),
        }
    }
}

/// Limits per client connection.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// SETTINGS_MAX_CONCURRENT_STREAMS the proxy announces.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE (decoded bytes); larger header blocks are refused.
    pub max_header_list_size: u32,
    /// Flow-control window of each stream: the most one stream buffers in the proxy.
    pub stream_window: u32,
    /// Flow-control window of each connection.
    pub connection_window: u32,
    /// Flow-control window of each upstream stream: what a client that stops reading can make
    /// the proxy hold of a response. Kept so that `max_concurrent_streams` of them fit in one
    /// upstream connection's window (`connection_window`): one stalled client connection
    /// cannot stall the upstream connection its neighbours share.
    pub upstream_stream_window: u32,
    /// Streams a client may reset before the proxy accepted them (CVE-2023-44487).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the proxy may reset for a client's protocol errors before it closes the
    /// connection.
    pub max_local_error_reset_streams: usize,
    /// Bytes queued to send on one stream before the proxy stops reading its source.
    pub max_send_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 100,
            max_header_list_size: 64 * 1024,
            stream_window: 1024 * 1024,
            connection_window: 8 * 1024 * 1024,
            upstream_stream_window: 64 * 1024,
            max_pending_accept_reset_streams: 100,
            max_local_error_reset_streams: 1024,
            max_send_buffer: 1024 * 1024,
        }
    }
}

/// One problem in a configuration file, where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

/// Every problem found in one file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ConfigErrors {
    pub path: String,
    pub errors: Vec<ConfigError>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
    #[serde(default, rename = "cluster")]
    clusters: Vec<RawCluster>,
    #[serde(default)]
    timeouts: Timeouts,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    breakers: RawBreakers,
    #[serde(default)]
    context: ContextConfig,
    #[serde(default)]
    retries: RetryConfig,
    #[serde(default)]
    events: EventsConfig,
    #[serde(default)]
    signals: SignalsConfig,
    #[serde(default)]
    export: ExportConfig,
    #[serde(default)]
    api: ApiConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    address: Spanned<String>,
    tls: Option<RawTls>,
    #[serde(default, rename = "route")]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    authority: Option<String>,
    path_prefix: Option<Spanned<String>>,
    grpc_service: Option<Spanned<String>>,
    cluster: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    endpoints: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "default_connect_timeout", with = "duration")]
    connect_timeout: Duration,
    #[serde(default = "default_max_connections")]
    max_connections_per_endpoint: Spanned<usize>,
    #[serde(default, rename = "subset")]
    subsets: Vec<RawSubset>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubset {
    name: Spanned<String>,
    endpoints: Vec<Spanned<String>>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_max_connections() -> Spanned<usize> {
    Spanned::new(0..0, 4)
}

/// Durations as text: "10s", "250ms", "5m".
pub(super) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write e.g. \"10s\" or \"250ms\""
            ))
        })
    }
}

/// Line and column (1-based) of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

struct Problems<'a> {
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Problems<'_> {
    /// A problem with no one place in the file (the message names the key).
    fn keyed(&mut self, message: impl Into<String>) {
        self.errors.push(ConfigError {
            line: 0,
            column: 0,
            message: message.into(),
        });
    }

    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = position(self.text, span.start);
        self.errors.push(ConfigError {
            line,
            column,
            message: message.into(),
        });
    }
}

/// Parses and validates a configuration file's text.
pub fn parse(text: &str) -> Result<ProxyConfig, Vec<ConfigError>> {
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let (line, column) = e.span().map_or((1, 1), |s| position(text, s.start));
            return Err(vec![ConfigError {
                line,
                column,
                message: e.message().trim().to_owned(),
            }]);
        }
    };
    let mut p = Problems {
        text,
        errors: Vec::new(),
    };
    let config = validate(raw, &mut p);
    if p.errors.is_empty() {
        Ok(config)
    } else {
        p.errors.sort_by_key(|e| (e.line, e.column));
        Err(p.errors)
    }
}

/// Reads and validates a configuration file.
pub fn load(path: &std::path::Path) -> Result<ProxyConfig, ConfigErrors> {
    let fail = |message: String| ConfigErrors {
        path: path.display().to_string(),
        errors: vec![ConfigError {
            line: 0,
            column: 0,
            message,
        }],
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    parse(&text).map_err(|errors| ConfigErrors {
        path: path.display().to_string(),
        errors,
    })
}

fn validate(raw: RawConfig, p: &mut Problems<'_>) -> ProxyConfig {
    let mut clusters = Vec::new();
    let mut cluster_index = HashMap::new();
    for c in raw.clusters {
        let name = c.name.get_ref().clone();
        if name.is_empty() {
            p.at(c.name.span(), "a cluster needs a name");
        }
        if cluster_index.insert(name.clone(), clusters.len()).is_some() {
            p.at(c.name.span(), format!("cluster {name:?} is defined twice"));
        }
        if c.endpoints.get_ref().is_empty() && c.subsets.iter().all(|s| s.endpoints.is_empty()) {
            p.at(
                c.endpoints.span(),
                format!("cluster {name:?} has no endpoints"),
            );
        }
        let mut endpoints: Vec<String> = Vec::new();
        let mut endpoint_subset = Vec::new();
        let mut subsets = Vec::new();
        if !c.endpoints.get_ref().is_empty() && !c.subsets.is_empty() {
            subsets.push("default".to_owned());
        }
        let labelled = c.subsets.into_iter().map(|s| (Some(s.name), s.endpoints));
        for (subset, list) in std::iter::once((None, c.endpoints.into_inner())).chain(labelled) {
            if let Some(s) = subset {
                if subsets.contains(s.get_ref()) || s.get_ref().is_empty() {
                    p.at(
                        s.span(),
                        format!("subset {:?} is empty or defined twice", s.get_ref()),
                    );
                }
                subsets.push(s.into_inner());
            }
            for e in list {
                if let Err(why) = check_host_port(e.get_ref()) {
                    p.at(e.span(), format!("endpoint {:?}: {why}", e.get_ref()));
                }
                if endpoints.contains(e.get_ref()) {
                    p.at(
                        e.span(),
                        format!("endpoint {:?} is listed twice", e.get_ref()),
                    );
                }
                endpoints.push(e.into_inner());
                endpoint_subset.push(subsets.len().saturating_sub(1));
            }
        }
        let max_conns = *c.max_connections_per_endpoint.get_ref();
        if max_conns == 0 {
            p.at(
                c.max_connections_per_endpoint.span(),
                "max_connections_per_endpoint must be at least 1",
            );
        }
        clusters.push(Cluster {
            name,
            endpoints,
            subsets,
            endpoint_subset,
            connect_timeout: c.connect_timeout,
            max_connections_per_endpoint: max_conns.max(1),
        });
    }

    let mut listeners = Vec::new();
    let mut names = HashMap::new();
    let mut addresses = HashMap::new();
    for l in raw.listeners {
        let name = l.name.get_ref().clone();
        if names.insert(name.clone(), ()).is_some() {
            p.at(l.name.span(), format!("listener {name:?} is defined twice"));
        }
        let address = match l.address.get_ref().parse::<SocketAddr>() {
            Ok(a) => {
                if addresses.insert(a, ()).is_some() {
                    p.at(l.address.span(), format!("two listeners on {a}"));
                }
                a
            }
            Err(e) => {
                p.at(
                    l.address.span(),
                    format!(
                        "listener address {:?} is not IP:PORT ({e})",
                        l.address.get_ref()
                    ),
                );
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        };
        let tls = l.tls.map(|t| {
            let mut readable = true;
            for file in [&t.cert, &t.key] {
                if !file.get_ref().is_file() {
                    readable = false;
                    p.at(
                        file.span(),
                        format!("{} is not a readable file", file.get_ref().display()),
                    );
                }
            }
            let span = t.cert.span();
            let files = TlsFiles {
                cert: t.cert.into_inner(),
                key: t.key.into_inner(),
            };
            // Load them now, so a bad chain or key is reported here, not at the first client.
            if readable && let Err(e) = super::tls::server_config(&files) {
                p.at(span, e.to_string());
            }
            files
        });
        if l.routes.is_empty() {
            p.at(
                l.name.span(),
                format!("listener {name:?} has no [[listener.route]]: nothing could be served"),
            );
        }
        let mut routes = Vec::new();
        for r in l.routes {
            let path_prefix = match (r.path_prefix, r.grpc_service) {
                (Some(prefix), None) => {
                    if !prefix.get_ref().starts_with('/') {
                        p.at(prefix.span(), "path_prefix must start with /");
                    }
                    prefix.into_inner()
                }
                (None, Some(service)) => {
                    let s = service.get_ref();
                    if s.is_empty() || s.contains('/') {
                        p.at(
                            service.span(),
                            format!("grpc_service {s:?} is not a service name like pkg.Service"),
                        );
                    }
                    format!("/{s}/")
                }
                (None, None) => "/".to_owned(),
                (Some(prefix), Some(_)) => {
                    p.at(
                        prefix.span(),
                        "a route has path_prefix or grpc_service, not both",
                    );
                    prefix.into_inner()
                }
            };
            let cluster = match cluster_index.get(r.cluster.get_ref()) {
                Some(&i) => i,
                None => {
                    p.at(
                        r.cluster.span(),
                        format!("no [[cluster]] named {:?}", r.cluster.get_ref()),
                    );
                    0
                }
            };
            routes.push(Route {
                authority: r.authority.map(|a| a.to_ascii_lowercase()),
                path_prefix,
                cluster,
            });
        }
        listeners.push(Listener {
            name,
            address,
            tls,
            routes,
        });
    }
    if listeners.is_empty() {
        p.at(0..0, "no [[listener]]: the proxy would serve nothing");
    }
    let l = raw.limits;
    if l.max_concurrent_streams == 0 {
        p.at(0..0, "limits.max_concurrent_streams must be at least 1");
    }
    if !(65_535..=(1 << 31) - 1).contains(&l.stream_window)
        || !(65_535..=(1 << 31) - 1).contains(&l.connection_window)
        || !(65_535..=(1 << 31) - 1).contains(&l.upstream_stream_window)
    {
        p.at(
            0..0,
            "limits.stream_window, connection_window and upstream_stream_window must be between 65535 and 2^31-1",
        );
    }
    let breakers = BreakerConfig::from_raw(raw.breakers).unwrap_or_else(|errors| {
        for e in errors {
            p.keyed(e);
        }
        BreakerConfig::default()
    });
    if let Err(e) = raw.retries.check() {
        p.keyed(e);
    }
    if let Err(e) = raw.events.journal() {
        p.keyed(e);
    }
    if let Err(e) = raw.signals.check() {
        p.keyed(e);
    }
    if let Err(e) = raw.export.check() {
        p.keyed(e);
    }
    if let Err(e) = raw.api.check() {
        p.keyed(e.to_string());
    }
    // Loads the JWT keys now, so a missing or bad key file is reported here.
    if let Err(e) = crate::context::Extractor::new(&raw.context) {
        p.keyed(format!("context: {e}"));
    }
    ProxyConfig {
        listeners,
        clusters,
        timeouts: raw.timeouts,
        limits: l,
        breakers,
        context: raw.context,
        retries: raw.retries,
        events: raw.events,
        signals: raw.signals,
        export: raw.export,
        api: raw.api,
    }
}

/// `host:port` with a port number; host an IP, `[v6]` or a DNS name.
fn check_host_port(s: &str) -> Result<(), String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return if a.port() == 0 {
            Err("port 0".into())
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("not HOST:PORT".into());
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{port:?} is not a port"));
    }
    let dns_ok = !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if dns_ok {
        Ok(())
    } else {
        Err(format!("{host:?} is not an IP address or DNS name"))
    }
}

/// The quick mode: one cleartext listener sending everything to one cluster.
pub fn quick(listen: SocketAddr, upstreams: &[String]) -> Result<ProxyConfig, String> {
    for u in upstreams {
        check_host_port(u).map_err(|why| format!("--upstream {u:?}: {why}"))?;
    }
    if upstreams.is_empty() {
        return Err("--upstream needs at least one HOST:PORT".into());
    }
    Ok(ProxyConfig {
        listeners: vec![Listener {
            name: "quick".into(),
            address: listen,
            tls: None,
            routes: vec![Route {
                authority: None,
                path_prefix: "/".into(),
                cluster: 0,
            }],
        }],
        clusters: vec![Cluster {
            name: "upstream".into(),
            endpoints: upstreams.to_vec(),
            subsets: Vec::new(),
            endpoint_subset: vec![0; upstreams.len()],
            connect_timeout: default_connect_timeout(),
            max_connections_per_endpoint: *default_max_connections().get_ref(),
        }],
        timeouts: Timeouts::default(),
        limits: Limits::default(),
        breakers: BreakerConfig::default(),
        context: ContextConfig::default(),
        retries: RetryConfig::default(),
        events: EventsConfig::default(),
        signals: SignalsConfig::default(),
        export: ExportConfig::default(),
        api: ApiConfig::default(),
    })
}

#[cfg(test)]
mod tests;
