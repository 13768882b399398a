//! The proxy's sections: `[[listener]]` (with its routes and TLS files), `[[cluster]]` (with
//! its endpoints and subsets), `[timeouts]` and `[limits]`.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use super::{
    Problems,
    dns::DnsPolicy,
    duration,
    intercept::{Destinations, InterceptError, PASSTHROUGH_CLUSTER, RawDestinations},
    tls::UpstreamTls,
};

/// What is wrong in the proxy's sections.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("a cluster needs a name")]
    ClusterUnnamed,
    #[error("cluster {0:?} is defined twice")]
    ClusterTwice(String),
    #[error("cluster {0:?} has no endpoints")]
    ClusterEmpty(String),
    #[error("subset {0:?} is empty or defined twice")]
    SubsetName(String),
    #[error("endpoint {endpoint:?}: {why}")]
    Endpoint {
        endpoint: String,
        why: HostPortError,
    },
    #[error("endpoint {0:?} is listed twice")]
    EndpointTwice(String),
    #[error("max_connections_per_endpoint must be at least 1")]
    NoConnections,
    #[error("listener {0:?} is defined twice")]
    ListenerTwice(String),
    #[error("two listeners on {0}")]
    AddressTwice(SocketAddr),
    #[error("listener address {address:?} is not IP:PORT ({reason})")]
    ListenerAddress { address: String, reason: String },
    #[error("{} is not a readable file", .0.display())]
    Unreadable(PathBuf),
    /// The TLS files are there but do not make an identity (the rustls or PEM error's text).
    #[error("{0}")]
    Tls(String),
    #[error("cluster {cluster:?}: tls: {why}")]
    UpstreamTls { cluster: String, why: String },
    #[error("listener {0:?} has no [[listener.route]]: nothing could be served")]
    NoRoutes(String),
    #[error("path_prefix must start with /")]
    PathPrefix,
    #[error("grpc_service {0:?} is not a service name like pkg.Service")]
    GrpcService(String),
    #[error("a route has path_prefix or grpc_service, not both")]
    PrefixAndService,
    #[error("no [[cluster]] named {0:?}")]
    NoSuchCluster(String),
    #[error("no [[listener]]: the proxy would serve nothing")]
    NoListeners,
    #[error("limits.max_concurrent_streams must be at least 1")]
    NoStreams,
    #[error(
        "limits.stream_window, connection_window and upstream_stream_window must be between 65535 and 2^31-1"
    )]
    Windows,
    #[error("--upstream {upstream:?}: {why}")]
    QuickUpstream {
        upstream: String,
        why: HostPortError,
    },
    #[error("--upstream needs at least one HOST:PORT")]
    QuickNoUpstream,
    #[error(transparent)]
    Intercept(#[from] InterceptError),
}

/// Why an endpoint is not `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    #[error("port 0")]
    PortZero,
    #[error("not HOST:PORT")]
    NotHostPort,
    #[error("{0:?} is not a port")]
    NotAPort(String),
    #[error("{0:?} is not an IP address or DNS name")]
    BadHost(String),
    #[error("{0:?} is not an SRV name like _grpc._tcp.NAME")]
    BadSrv(String),
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
    /// Index into [`super::AgentConfig::clusters`].
    pub cluster: usize,
}

/// One entry of a cluster's (or subset's) `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    /// As written.
    pub text: String,
    pub source: Source,
    /// Index into the cluster's `subsets` (0 when it has none).
    pub subset: usize,
}

/// Where an entry's endpoints come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// An IP address and port: one endpoint.
    Address(SocketAddr),
    /// A DNS name and port: an endpoint for each address the name has, asked again at its
    /// TTL (Envoy's STRICT_DNS), so a headless service's pods are endpoints each.
    Dns { host: String, port: u16 },
    /// `_service._tcp.NAME`: an endpoint for each address of each SRV target, at its port.
    Srv { name: String },
    /// A file in Prometheus' file_sd format (YAML or JSON), watched: an endpoint for each
    /// target of the groups whose labels include `match_labels`.
    File {
        path: PathBuf,
        match_labels: BTreeMap<String, String>,
    },
}

impl Source {
    /// Whether discovery gives its endpoints (a DNS name, a file), not the configuration.
    pub fn is_discovered(&self) -> bool {
        !matches!(self, Source::Address(_))
    }
}

#[derive(Clone, Debug)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<EndpointEntry>,
    /// Labelled subsets (`[[cluster.subset]]`, e.g. a canary), each with its own breaker;
    /// endpoints listed without one are in `default`. Empty: one subset, no subset breaker.
    pub subsets: Vec<String>,
    /// How its DNS names are followed.
    pub dns: DnsPolicy,
    /// TLS to its endpoints; None: cleartext HTTP/2 (h2c).
    pub tls: Option<UpstreamTls>,
    pub connect_timeout: Duration,
    /// Connections opened to one endpoint at most; streams beyond what they allow
    /// (the endpoint's SETTINGS_MAX_CONCURRENT_STREAMS) wait for one to finish.
    pub max_connections_per_endpoint: usize,
    /// Original destinations of intercepted connections this cluster serves (its endpoints,
    /// its breakers) instead of the passthrough cluster.
    pub claims: Vec<Destinations>,
    /// Where each claim is in the file (for a claim found twice).
    claim_spans: Vec<std::ops::Range<usize>>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
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
pub(super) struct RawCluster {
    name: Spanned<String>,
    endpoints: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "default_connect_timeout", with = "duration")]
    connect_timeout: Duration,
    #[serde(default = "default_max_connections")]
    max_connections_per_endpoint: Spanned<usize>,
    #[serde(default, rename = "subset")]
    subsets: Vec<RawSubset>,
    #[serde(default)]
    claims: Vec<Spanned<RawDestinations>>,
    #[serde(default)]
    dns: DnsPolicy,
    tls: Option<Spanned<RawUpstreamTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: PathBuf,
    server_name: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubset {
    name: Spanned<String>,
    #[serde(default)]
    endpoints: Vec<Spanned<String>>,
    /// Endpoints from a file_sd file too (or only).
    endpoints_file: Option<Spanned<PathBuf>>,
    /// Of that file, the target groups with these labels.
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_max_connections() -> Spanned<usize> {
    Spanned::new(0..0, 4)
}

/// The clusters, and each one's index by name.
pub(super) fn clusters(
    raw: Vec<RawCluster>,
    p: &mut Problems<'_>,
) -> (Vec<Cluster>, HashMap<String, usize>) {
    let mut clusters = Vec::new();
    let mut cluster_index = HashMap::new();
    for c in raw {
        let name = c.name.get_ref().clone();
        if name.is_empty() {
            p.at(c.name.span(), ProxyError::ClusterUnnamed);
        }
        if cluster_index.insert(name.clone(), clusters.len()).is_some() {
            p.at(c.name.span(), ProxyError::ClusterTwice(name.clone()));
        }
        if c.endpoints.get_ref().is_empty()
            && c.subsets
                .iter()
                .all(|s| s.endpoints.is_empty() && s.endpoints_file.is_none())
        {
            p.at(c.endpoints.span(), ProxyError::ClusterEmpty(name.clone()));
        }
        let mut endpoints: Vec<EndpointEntry> = Vec::new();
        let mut subsets = Vec::new();
        if !c.endpoints.get_ref().is_empty() && !c.subsets.is_empty() {
            subsets.push("default".to_owned());
        }
        let labelled = c.subsets.into_iter().map(|s| {
            let file = s.endpoints_file.map(|f| (f, s.match_labels));
            (Some(s.name), s.endpoints, file)
        });
        let unlabelled = (None, c.endpoints.into_inner(), None);
        for (subset, list, file) in std::iter::once(unlabelled).chain(labelled) {
            if let Some(s) = subset {
                if subsets.contains(s.get_ref()) || s.get_ref().is_empty() {
                    p.at(s.span(), ProxyError::SubsetName(s.get_ref().clone()));
                }
                subsets.push(s.into_inner());
            }
            if let Some((path, match_labels)) = file {
                if path.get_ref().as_os_str().is_empty() {
                    p.at(path.span(), ProxyError::Unreadable(path.get_ref().clone()));
                }
                let text = path.get_ref().display().to_string();
                endpoints.push(EndpointEntry {
                    text,
                    source: Source::File {
                        path: path.into_inner(),
                        match_labels,
                    },
                    subset: subsets.len().saturating_sub(1),
                });
            }
            for e in list {
                let source = match parse_endpoint(e.get_ref()) {
                    Ok(source) => source,
                    Err(why) => {
                        let endpoint = e.get_ref().clone();
                        p.at(e.span(), ProxyError::Endpoint { endpoint, why });
                        continue;
                    }
                };
                if endpoints.iter().any(|x| x.source == source) {
                    p.at(e.span(), ProxyError::EndpointTwice(e.get_ref().clone()));
                }
                endpoints.push(EndpointEntry {
                    text: e.into_inner(),
                    source,
                    subset: subsets.len().saturating_sub(1),
                });
            }
        }
        if let Err(e) = c.dns.check(&name) {
            p.at(c.name.span(), e);
        }
        let tls = c.tls.and_then(|t| {
            let span = t.span();
            t.into_inner().check(&name).map_err(|e| p.at(span, e)).ok()
        });
        let max_conns = *c.max_connections_per_endpoint.get_ref();
        if max_conns == 0 {
            p.at(
                c.max_connections_per_endpoint.span(),
                ProxyError::NoConnections,
            );
        }
        let claim_spans = c.claims.iter().map(Spanned::span).collect();
        let claims = c
            .claims
            .into_iter()
            .map(|d| d.into_inner().check(p))
            .collect();
        clusters.push(Cluster {
            name,
            endpoints,
            subsets,
            dns: c.dns,
            tls,
            connect_timeout: c.connect_timeout,
            max_connections_per_endpoint: max_conns.max(1),
            claims,
            claim_spans,
        });
    }
    (clusters, cluster_index)
}

impl Cluster {
    /// The cluster of intercepted connections no cluster claims: no endpoint to begin with,
    /// each original destination becomes one as it is seen.
    pub fn passthrough() -> Cluster {
        Cluster {
            name: PASSTHROUGH_CLUSTER.to_owned(),
            endpoints: Vec::new(),
            subsets: Vec::new(),
            dns: DnsPolicy::default(),
            tls: None,
            connect_timeout: default_connect_timeout(),
            max_connections_per_endpoint: *default_max_connections().get_ref(),
            claims: Vec::new(),
            claim_spans: Vec::new(),
        }
    }
}

impl RawUpstreamTls {
    /// The files readable, the pair complete, the name a name: and the whole loads now.
    fn check(self, cluster: &str) -> Result<UpstreamTls, ProxyError> {
        let fail = |why: String| ProxyError::UpstreamTls {
            cluster: cluster.to_owned(),
            why,
        };
        let client = match (self.cert, self.key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                return Err(fail(
                    "cert and key go together (a client certificate and its key)".into(),
                ));
            }
        };
        let files = std::iter::once(&self.ca).chain(client.iter().flat_map(|c| [&c.cert, &c.key]));
        for f in files {
            if !f.is_file() {
                return Err(fail(format!("{} is not a readable file", f.display())));
            }
        }
        if let Some(n) = &self.server_name
            && rustls_pki_types::ServerName::try_from(n.as_str()).is_err()
        {
            return Err(fail(format!(
                "server_name {n:?} is not a DNS name or IP address"
            )));
        }
        let tls = UpstreamTls {
            ca: self.ca,
            server_name: self.server_name,
            client,
        };
        super::tls::client_config(&tls).map_err(|e| fail(e.to_string()))?;
        Ok(tls)
    }
}

/// Claims only with interception on, none twice; the passthrough cluster's name kept free.
pub(super) fn check_claims(clusters: &[Cluster], intercept: bool, p: &mut Problems<'_>) {
    let mut seen: HashMap<String, ()> = HashMap::new();
    for c in clusters {
        if intercept && c.name == PASSTHROUGH_CLUSTER {
            p.keyed(ProxyError::Intercept(InterceptError::ReservedName));
        }
        for (claim, span) in c.claims.iter().zip(&c.claim_spans) {
            if !intercept {
                p.at(
                    span.clone(),
                    ProxyError::Intercept(InterceptError::ClaimsWithoutIntercept),
                );
            }
            let ports: Vec<_> = if claim.ports.is_empty() {
                vec![None]
            } else {
                claim.ports.iter().copied().map(Some).collect()
            };
            for port in ports {
                let key = match port {
                    Some(port) => format!("{} port {port}", claim.net),
                    None => format!("{} (every port)", claim.net),
                };
                if seen.insert(key.clone(), ()).is_some() {
                    p.at(
                        span.clone(),
                        ProxyError::Intercept(InterceptError::ClaimedTwice(key)),
                    );
                }
            }
        }
    }
}

/// The listeners, their routes pointing into the clusters by `cluster_index`.
pub(super) fn listeners(
    raw: Vec<RawListener>,
    cluster_index: &HashMap<String, usize>,
    intercept: bool,
    p: &mut Problems<'_>,
) -> Vec<Listener> {
    let mut listeners = Vec::new();
    let mut names = HashMap::new();
    let mut addresses = HashMap::new();
    for l in raw {
        let name = l.name.get_ref().clone();
        if names.insert(name.clone(), ()).is_some() {
            p.at(l.name.span(), ProxyError::ListenerTwice(name.clone()));
        }
        let address = match l.address.get_ref().parse::<SocketAddr>() {
            Ok(a) => {
                if addresses.insert(a, ()).is_some() {
                    p.at(l.address.span(), ProxyError::AddressTwice(a));
                }
                a
            }
            Err(e) => {
                let error = ProxyError::ListenerAddress {
                    address: l.address.get_ref().clone(),
                    reason: e.to_string(),
                };
                p.at(l.address.span(), error);
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        };
        let tls = l.tls.map(|t| t.check(p));
        if l.routes.is_empty() {
            p.at(l.name.span(), ProxyError::NoRoutes(name.clone()));
        }
        let routes = l
            .routes
            .into_iter()
            .map(|r| r.check(cluster_index, p))
            .collect();
        listeners.push(Listener {
            name,
            address,
            tls,
            routes,
        });
    }
    // With interception the intercept listener serves; explicit listeners are optional.
    if listeners.is_empty() && !intercept {
        p.at(0..0, ProxyError::NoListeners);
    }
    listeners
}

impl RawTls {
    /// The files, loaded now: a bad chain or key is reported here, not at the first client.
    fn check(self, p: &mut Problems<'_>) -> TlsFiles {
        let mut readable = true;
        for file in [&self.cert, &self.key] {
            if !file.get_ref().is_file() {
                readable = false;
                p.at(file.span(), ProxyError::Unreadable(file.get_ref().clone()));
            }
        }
        let span = self.cert.span();
        let files = TlsFiles {
            cert: self.cert.into_inner(),
            key: self.key.into_inner(),
        };
        if readable && let Err(e) = super::tls::server_config(&files) {
            p.at(span, ProxyError::Tls(e.to_string()));
        }
        files
    }
}

impl RawRoute {
    fn check(self, cluster_index: &HashMap<String, usize>, p: &mut Problems<'_>) -> Route {
        let path_prefix = match (self.path_prefix, self.grpc_service) {
            (Some(prefix), None) => {
                if !prefix.get_ref().starts_with('/') {
                    p.at(prefix.span(), ProxyError::PathPrefix);
                }
                prefix.into_inner()
            }
            (None, Some(service)) => {
                let s = service.get_ref();
                if s.is_empty() || s.contains('/') {
                    p.at(service.span(), ProxyError::GrpcService(s.clone()));
                }
                format!("/{s}/")
            }
            (None, None) => "/".to_owned(),
            (Some(prefix), Some(_)) => {
                p.at(prefix.span(), ProxyError::PrefixAndService);
                prefix.into_inner()
            }
        };
        let cluster = match cluster_index.get(self.cluster.get_ref()) {
            Some(&i) => i,
            None => {
                let error = ProxyError::NoSuchCluster(self.cluster.get_ref().clone());
                p.at(self.cluster.span(), error);
                0
            }
        };
        Route {
            authority: self.authority.map(|a| a.to_ascii_lowercase()),
            path_prefix,
            cluster,
        }
    }
}

impl Limits {
    pub(super) fn check(&self, p: &mut Problems<'_>) {
        if self.max_concurrent_streams == 0 {
            p.at(0..0, ProxyError::NoStreams);
        }
        let window = 65_535..=(1 << 31) - 1;
        if !window.contains(&self.stream_window)
            || !window.contains(&self.connection_window)
            || !window.contains(&self.upstream_stream_window)
        {
            p.at(0..0, ProxyError::Windows);
        }
    }
}

/// An endpoint entry: `IP:PORT` (`[v6]:PORT`), `NAME:PORT`, or an SRV name
/// `_service._tcp.NAME` (no port: the records give it).
pub fn parse_endpoint(s: &str) -> Result<Source, HostPortError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return if a.port() == 0 {
            Err(HostPortError::PortZero)
        } else {
            Ok(Source::Address(a))
        };
    }
    if s.starts_with('_') && !s.contains(':') {
        let mut labels = s.trim_end_matches('.').split('.');
        let service = labels.next().unwrap_or("");
        let proto = labels.next().unwrap_or("");
        let rest: Vec<&str> = labels.collect();
        let ok = service.len() > 1
            && proto == "_tcp"
            && !rest.is_empty()
            && rest.iter().all(|l| dns_label(l));
        return if ok {
            Ok(Source::Srv { name: s.to_owned() })
        } else {
            Err(HostPortError::BadSrv(s.to_owned()))
        };
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(HostPortError::NotHostPort);
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(HostPortError::NotAPort(port.to_owned())),
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if !name.is_empty() && name.split('.').all(dns_label) {
        Ok(Source::Dns {
            host: host.to_owned(),
            port,
        })
    } else {
        Err(HostPortError::BadHost(host.to_owned()))
    }
}

fn dns_label(l: &str) -> bool {
    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The quick mode's listener and cluster: one cleartext listener sending everything to one
/// cluster.
pub(super) fn quick(
    listen: SocketAddr,
    upstreams: &[String],
) -> Result<(Vec<Listener>, Vec<Cluster>), ProxyError> {
    let mut endpoints = Vec::new();
    for u in upstreams {
        let source = parse_endpoint(u).map_err(|why| ProxyError::QuickUpstream {
            upstream: u.clone(),
            why,
        })?;
        endpoints.push(EndpointEntry {
            text: u.clone(),
            source,
            subset: 0,
        });
    }
    if upstreams.is_empty() {
        return Err(ProxyError::QuickNoUpstream);
    }
    let listener = Listener {
        name: "quick".into(),
        address: listen,
        tls: None,
        routes: vec![Route {
            authority: None,
            path_prefix: "/".into(),
            cluster: 0,
        }],
    };
    let cluster = Cluster {
        name: "upstream".into(),
        endpoints,
        subsets: Vec::new(),
        dns: DnsPolicy::default(),
        tls: None,
        connect_timeout: default_connect_timeout(),
        max_connections_per_endpoint: *default_max_connections().get_ref(),
        claims: Vec::new(),
        claim_spans: Vec::new(),
    };
    Ok((vec![listener], vec![cluster]))
}
