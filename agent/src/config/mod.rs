//! The agent's configuration: a TOML file (see `deploy/agent.example.toml`), or the quick mode
//! `--listen ADDR --upstream ADDR,...`. Each section is its own module and checks itself with
//! an error type of its own; this module reads the file, runs the sections' checks, and places
//! every problem at its line and column, so that `agent check-config` prints them all at once.
//!
//! The sections own their types, so the stages that use them import them from here, downward:
//! [`proxy`] (listeners, routes, clusters, timeouts, limits, TLS files), [`retries`],
//! [`signals`], [`events`], [`export`], [`api`]; `[breakers]` and `[context]` belong to the
//! breaker engine and the request context, which sit below.

pub mod api;
pub mod dns;
pub mod events;
pub mod export;
pub mod intercept;
pub mod proxy;
pub mod retries;
pub mod signals;
pub mod tls;

use std::{net::SocketAddr, ops::Range, sync::Arc};

use serde::Deserialize;

use self::{
    api::{ApiConfig, ApiConfigError},
    dns::{DnsConfig, DnsError, RawDns},
    events::{EventsConfig, EventsError},
    export::{ExportConfig, ExportError},
    intercept::{InterceptConfig, InterceptError, RawIntercept},
    proxy::{Cluster, Limits, Listener, ProxyError, Timeouts},
    retries::{RetriesError, RetryConfig},
    signals::{SignalsConfig, SignalsError},
};
use crate::{
    breaker::config::{BreakerConfig, BreakersError, RawBreakers},
    context::{ContextConfig, ContextError},
};

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
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
    /// Transparent interception; off without an `[intercept]` section.
    pub intercept: Option<InterceptConfig>,
    /// The resolver of the clusters' DNS names.
    pub dns: DnsConfig,
}

/// One problem in a configuration file, where it is (line 0: no one place, the message names
/// the key).
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    pub kind: ConfigErrorKind,
}

/// What is wrong, by section.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigErrorKind {
    #[error("cannot read: {0}")]
    Read(String),
    /// Not TOML, or not the shape of a section (an unknown key, a wrong type).
    #[error("{0}")]
    Syntax(String),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// `[breakers]`.
    #[error(transparent)]
    Breakers(#[from] BreakersError),
    #[error(transparent)]
    Retries(#[from] RetriesError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error(transparent)]
    Signals(#[from] SignalsError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Api(#[from] ApiConfigError),
    #[error(transparent)]
    Intercept(#[from] InterceptError),
    /// `[dns]`, `[cluster.dns]`.
    #[error(transparent)]
    Dns(#[from] DnsError),
    /// `[context]`: a JWT key that cannot be loaded, a bad header name.
    #[error(transparent)]
    Context(#[from] ContextConfigError),
}

/// A `[context]` problem: the request context's own [`ContextError`], shared so that
/// [`ConfigErrorKind`] can be `Clone` and `PartialEq` (it holds the `io::Error` or the
/// `InvalidHeaderName` it came from, which are neither). Displays as `context: ` and the error;
/// its source is the error's.
#[derive(Clone, Debug)]
pub struct ContextConfigError(Arc<ContextError>);

impl ContextConfigError {
    pub fn error(&self) -> &ContextError {
        &self.0
    }
}

impl From<ContextError> for ContextConfigError {
    fn from(e: ContextError) -> Self {
        Self(Arc::new(e))
    }
}

impl std::fmt::Display for ContextConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "context: {}", self.0)
    }
}

impl std::error::Error for ContextConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

/// The same error, or two that say the same, down to their causes.
impl PartialEq for ContextConfigError {
    fn eq(&self, other: &Self) -> bool {
        fn said(e: &ContextError) -> (String, Option<String>) {
            use std::error::Error as _;
            (e.to_string(), e.source().map(ToString::to_string))
        }
        Arc::ptr_eq(&self.0, &other.0) || said(&self.0) == said(&other.0)
    }
}

impl ConfigError {
    /// The problem, without its place.
    pub fn message(&self) -> String {
        self.kind.to_string()
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.kind
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
    listeners: Vec<proxy::RawListener>,
    #[serde(default, rename = "cluster")]
    clusters: Vec<proxy::RawCluster>,
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
    intercept: Option<RawIntercept>,
    #[serde(default)]
    dns: RawDns,
}

/// Durations as text: "10s", "250ms", "5m".
pub(crate) mod duration {
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

/// The problems found so far, placed in the file's text.
pub(crate) struct Problems<'a> {
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Problems<'_> {
    /// A problem with no one place in the file (the message names the key).
    pub(crate) fn keyed(&mut self, kind: impl Into<ConfigErrorKind>) {
        self.errors.push(ConfigError {
            line: 0,
            column: 0,
            kind: kind.into(),
        });
    }

    pub(crate) fn at(&mut self, span: Range<usize>, kind: impl Into<ConfigErrorKind>) {
        let (line, column) = position(self.text, span.start);
        self.errors.push(ConfigError {
            line,
            column,
            kind: kind.into(),
        });
    }
}

/// Parses and validates a configuration file's text.
pub fn parse(text: &str) -> Result<AgentConfig, Vec<ConfigError>> {
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let (line, column) = e.span().map_or((1, 1), |s| position(text, s.start));
            return Err(vec![ConfigError {
                line,
                column,
                kind: ConfigErrorKind::Syntax(e.message().trim().to_owned()),
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
pub fn load(path: &std::path::Path) -> Result<AgentConfig, ConfigErrors> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        path: shown.clone(),
        errors: vec![ConfigError {
            line: 0,
            column: 0,
            kind: ConfigErrorKind::Read(e.to_string()),
        }],
    })?;
    parse(&text).map_err(|errors| ConfigErrors {
        path: shown,
        errors,
    })
}

/// Each section checks itself; what it finds is placed in the file.
fn validate(raw: RawConfig, p: &mut Problems<'_>) -> AgentConfig {
    let (mut clusters, cluster_index) = proxy::clusters(raw.clusters, p);
    let intercept = raw.intercept.map(|i| i.check(p));
    proxy::check_claims(&clusters, intercept.is_some(), p);
    if intercept.is_some() {
        // Last, so that the configured clusters keep their indexes.
        clusters.push(Cluster::passthrough());
    }
    let listeners = proxy::listeners(raw.listeners, &cluster_index, intercept.is_some(), p);
    raw.limits.check(p);
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
        p.keyed(e);
    }
    let dns = raw.dns.check().unwrap_or_else(|errors| {
        for e in errors {
            p.keyed(e);
        }
        DnsConfig::default()
    });
    // Loads the JWT keys now, so a missing or bad key file is reported here.
    if let Err(e) = crate::context::Extractor::new(&raw.context) {
        p.keyed(ContextConfigError::from(e));
    }
    AgentConfig {
        listeners,
        clusters,
        timeouts: raw.timeouts,
        limits: raw.limits,
        breakers,
        context: raw.context,
        retries: raw.retries,
        events: raw.events,
        signals: raw.signals,
        export: raw.export,
        api: raw.api,
        intercept,
        dns,
    }
}

/// The quick mode: one cleartext listener sending everything to one cluster.
pub fn quick(listen: SocketAddr, upstreams: &[String]) -> Result<AgentConfig, ProxyError> {
    let (listeners, clusters) = proxy::quick(listen, upstreams)?;
    Ok(AgentConfig {
        listeners,
        clusters,
        timeouts: Timeouts::default(),
        limits: Limits::default(),
        breakers: BreakerConfig::default(),
        context: ContextConfig::default(),
        retries: RetryConfig::default(),
        events: EventsConfig::default(),
        signals: SignalsConfig::default(),
        export: ExportConfig::default(),
        api: ApiConfig::default(),
        intercept: None,
        dns: DnsConfig::default(),
    })
}

#[cfg(test)]
mod tests;
