//! The `[breakers]` section of the configuration. Defaults (every key is optional):
//!
//! | key | default | |
//! |---|---|---|
//! | `enabled` | true | all breakers off when false |
//! | `priority_header` | `x-priority` | its value names the call's priority class |
//! | `resource_exhausted` | `ignore` | `upstream`, `client` or `ignore`: who RESOURCE_EXHAUSTED counts against |
//! | `max_clients` | 10000 | client breakers kept at most (idle closed ones are dropped first) |
//! | `max_methods` | 256 | method breakers per cluster and class |
//! | `[breakers.policy]` | see [`Policy`] | policy of every scope |
//! | `[breakers.endpoint]`, `.subset`, `.cluster`, `.method`, `.client` | | that scope's changes |
//! | `[[breakers.class]]` `name`, `[breakers.class.policy]` | | a priority class and its changes |
//!
//! Built in, below what is written: the cluster and method scopes trip on a failure ratio of
//! 0.8 over at least 50 calls and not on consecutive failures (they cover many endpoints, one
//! bad endpoint should eject itself, not the cluster); the client scope trips on 10
//! consecutive client faults or half of at least 10 calls.

use serde::Deserialize;

use super::{
    classify::Attribution,
    policy::{Policy, PolicyError, PolicyOverrides},
};

/// Declares [`Scope`] from one list, so that its variants, [`Scope::ALL`], [`Scope::COUNT`]
/// and the names cannot disagree: a scope is added by adding its line, and nowhere else (the
/// matches on scopes below are exhaustive, so the compiler asks for the rest).
macro_rules! scopes {
    ($($variant:ident => $name:literal),+ $(,)?) => {
        /// What a breaker guards, each with its own policy.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
        pub enum Scope {
            $(#[serde(rename = $name)] $variant,)+
        }

        impl Scope {
            /// How many scopes there are.
            pub const COUNT: usize = [$($name),+].len();

            /// Every scope, in declaration order: each at its [`index`](Self::index).
            pub const ALL: [Scope; Scope::COUNT] = [$(Scope::$variant),+];

            /// The scope's name, in the configuration, the breaker names and the API.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Scope::$variant => $name,)+
                }
            }
        }
    };
}

scopes! {
    Endpoint => "endpoint",
    Subset => "subset",
    Cluster => "cluster",
    Method => "method",
    Client => "client",
}

impl Scope {
    /// Where the scope is in [`Scope::ALL`] and in a class's policies
    /// ([`BreakerConfig::policies`]): the variants are numbered in the order declared, the
    /// order `ALL` lists them in.
    pub const fn index(self) -> usize {
        self as usize
    }

    fn defaults(self) -> PolicyOverrides {
        match self {
            Scope::Endpoint | Scope::Subset => PolicyOverrides::default(),
            Scope::Cluster | Scope::Method => PolicyOverrides {
                consecutive_failures: Some(0),
                failure_ratio: Some(0.8),
                min_requests: Some(50),
                ..PolicyOverrides::default()
            },
            Scope::Client => PolicyOverrides {
                consecutive_failures: Some(10),
                failure_ratio: Some(0.5),
                min_requests: Some(10),
                ..PolicyOverrides::default()
            },
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBreakers {
    enabled: Option<bool>,
    priority_header: Option<String>,
    resource_exhausted: Attribution,
    max_clients: Option<usize>,
    max_methods: Option<usize>,
    /// Seeds the open-period jitter (tests; random otherwise).
    seed: Option<u64>,
    policy: PolicyOverrides,
    endpoint: PolicyOverrides,
    subset: PolicyOverrides,
    cluster: PolicyOverrides,
    method: PolicyOverrides,
    client: PolicyOverrides,
    #[serde(rename = "class")]
    classes: Vec<RawClass>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: String,
    #[serde(default)]
    policy: PolicyOverrides,
}

/// What is wrong in `[breakers]`; each names the key.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BreakersError {
    #[error("breakers.priority_header {0:?} is not a header name")]
    PriorityHeader(String),
    #[error("breakers.class {0:?} is empty or defined twice")]
    Class(String),
    /// `[breakers.policy]` itself, on the built-in policy.
    #[error("breakers.policy: {0}")]
    Policy(PolicyError),
    /// The policy of one scope and class, made of the built-in scope defaults,
    /// `[breakers.policy]`, the scope's and the class's changes.
    #[error("breakers ({} scope, class {class:?}): {problem}", scope.as_str())]
    ScopePolicy {
        scope: Scope,
        class: String,
        problem: PolicyError,
    },
}

/// The validated breaker settings.
#[derive(Clone, Debug)]
pub struct BreakerConfig {
    pub priority_header: http::HeaderName,
    /// Class names; 0 is `default`, which calls with no (or an unknown) class get.
    pub classes: Vec<String>,
    /// Per class, per scope (in [`Scope::ALL`] order): the policy, None when off.
    pub policies: Vec<[Option<Policy>; Scope::COUNT]>,
    pub resource_exhausted: Attribution,
    pub max_clients: usize,
    pub max_methods: usize,
    pub seed: Option<u64>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        // The defaults are valid: built from an empty section they cannot fail.
        Self::from_raw(RawBreakers::default()).unwrap_or_else(|_| Self {
            priority_header: http::HeaderName::from_static("x-priority"),
            classes: vec!["default".into()],
            policies: vec![[None; Scope::COUNT]],
            resource_exhausted: Attribution::Ignore,
            max_clients: 10_000,
            max_methods: 256,
            seed: None,
        })
    }
}

impl BreakerConfig {
    pub fn policy(&self, class: usize, scope: Scope) -> Option<Policy> {
        self.policies.get(class).and_then(|p| p[scope.index()])
    }

    /// Every breaker off.
    pub fn disable(&mut self) {
        for per_scope in &mut self.policies {
            *per_scope = [None; Scope::COUNT];
        }
    }

    /// The class a call's priority header value names.
    pub fn class_of(&self, value: Option<&[u8]>) -> usize {
        value
            .and_then(|v| self.classes.iter().position(|c| c.as_bytes() == v))
            .unwrap_or(0)
    }

    /// Every problem, each naming the key.
    pub fn from_raw(raw: RawBreakers) -> Result<Self, Vec<BreakersError>> {
        let mut errors = Vec::new();
        let header = raw.priority_header.as_deref().unwrap_or("x-priority");
        let priority_header = http::HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes())
            .unwrap_or_else(|_| {
                errors.push(BreakersError::PriorityHeader(header.to_owned()));
                http::HeaderName::from_static("x-priority")
            });
        let all_on = raw.enabled.unwrap_or(true);
        let mut classes = vec!["default".to_owned()];
        let mut class_overrides = vec![PolicyOverrides::default()];
        for c in raw.classes {
            if c.name.is_empty() || classes.contains(&c.name) && c.name != "default" {
                errors.push(BreakersError::Class(c.name));
                continue;
            }
            if c.name == "default" {
                class_overrides[0] = c.policy;
            } else {
                classes.push(c.name);
                class_overrides.push(c.policy);
            }
        }
        let base = raw.policy.apply(&Policy::default());
        let mut policies = Vec::new();
        for (name, class) in classes.iter().zip(&class_overrides) {
            let mut per_scope = [None; Scope::COUNT];
            for scope in Scope::ALL {
                let scoped = match scope {
                    Scope::Endpoint => &raw.endpoint,
                    Scope::Subset => &raw.subset,
                    Scope::Cluster => &raw.cluster,
                    Scope::Method => &raw.method,
                    Scope::Client => &raw.client,
                };
                let on = all_on
                    && class
                        .enabled
                        .or(scoped.enabled)
                        .or(raw.policy.enabled)
                        .unwrap_or(true);
                let policy = scope
                    .defaults()
                    .apply(&Policy::default())
                    .and_then(|p| raw.policy.apply(&p))
                    .and_then(|p| scoped.apply(&p))
                    // A class changes the upstream scopes; a client is one client whatever
                    // the priority of its calls.
                    .and_then(|p| {
                        if scope == Scope::Client {
                            Ok(p)
                        } else {
                            class.apply(&p)
                        }
                    });
                match policy {
                    Ok(p) => per_scope[scope.index()] = on.then_some(p),
                    Err(problem) => errors.push(BreakersError::ScopePolicy {
                        scope,
                        class: name.clone(),
                        problem,
                    }),
                }
            }
            policies.push(per_scope);
        }
        if let Err(e) = base {
            errors.insert(0, BreakersError::Policy(e));
        }
        errors.dedup();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            priority_header,
            classes,
            policies,
            resource_exhausted: raw.resource_exhausted,
            max_clients: raw.max_clients.unwrap_or(10_000),
            max_methods: raw.max_methods.unwrap_or(256),
            seed: raw.seed,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Policies are indexed by [`Scope::index`]: ALL must hold every scope at its own index.
    #[test]
    fn every_scope_is_at_its_index() {
        for (i, scope) in Scope::ALL.into_iter().enumerate() {
            assert_eq!(scope.index(), i, "{scope:?}");
        }
        assert_eq!(Scope::ALL.len(), Scope::COUNT);
    }

    #[test]
    fn scopes_serialize_as_their_names() {
        for scope in Scope::ALL {
            let json = serde_json::to_string(&scope).unwrap();
            assert_eq!(json, format!("\"{}\"", scope.as_str()));
        }
    }

    fn errors(text: &str) -> Vec<BreakersError> {
        let raw: RawBreakers = toml::from_str(text).unwrap();
        BreakerConfig::from_raw(raw).unwrap_err()
    }

    #[test]
    fn errors_are_typed_and_name_the_key() {
        assert_eq!(
            errors("priority_header = \"bad header\""),
            [BreakersError::PriorityHeader("bad header".into())]
        );
        let e = errors("[[class]]\nname = \"a\"\n[[class]]\nname = \"a\"\n[[class]]\nname = \"a\"");
        assert_eq!(e, [BreakersError::Class("a".into())], "reported once");
        assert_eq!(
            e[0].to_string(),
            "breakers.class \"a\" is empty or defined twice"
        );

        let e = errors("[endpoint]\nfailure_ratio = 1.5");
        assert_eq!(
            e,
            [BreakersError::ScopePolicy {
                scope: Scope::Endpoint,
                class: "default".into(),
                problem: PolicyError::Ratio {
                    key: "failure_ratio",
                    value: 1.5
                },
            }]
        );
        assert_eq!(
            e[0].to_string(),
            "breakers (endpoint scope, class \"default\"): failure_ratio must be between 0 and 1, \
             not 1.5"
        );

        let e = errors("[policy]\nbuckets = 0");
        assert_eq!(e[0], BreakersError::Policy(PolicyError::Buckets(0)));
        assert_eq!(
            e[0].to_string(),
            "breakers.policy: buckets must be 1..=1000, not 0"
        );
        assert_eq!(e.len(), 1 + Scope::COUNT, "{e:?}");
    }
}
