//! The `[retries]` section: how many tries a call gets, the budget that bounds them, the
//! backoff between them, and which methods are idempotent (see `proxy::retry`).

use std::time::Duration;

use serde::Deserialize;

/// What is wrong in `[retries]`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RetriesError {
    #[error("retries.max_attempts must be 1..=10")]
    MaxAttempts,
    #[error("retries.budget_ratio must be between 0 and 1")]
    BudgetRatio,
    #[error("retries.backoff_max must be at least backoff_base")]
    Backoff,
    #[error("retries.idempotent_methods: {0:?} must start with / (a :path prefix)")]
    Method(String),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries per call, the first included (1: no retries).
    pub max_attempts: u32,
    pub budget_ratio: f64,
    pub min_concurrent: usize,
    #[serde(with = "super::duration")]
    pub backoff_base: Duration,
    #[serde(with = "super::duration")]
    pub backoff_max: Duration,
    /// `:path` prefixes of idempotent methods (`/pkg.Service/` for a whole service), which
    /// are also retried after a trailers-only UNAVAILABLE.
    pub idempotent_methods: Vec<String>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            budget_ratio: 0.2,
            min_concurrent: 3,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            idempotent_methods: Vec::new(),
        }
    }
}

impl RetryConfig {
    pub fn check(&self) -> Result<(), RetriesError> {
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return Err(RetriesError::MaxAttempts);
        }
        if !(0.0..=1.0).contains(&self.budget_ratio) {
            return Err(RetriesError::BudgetRatio);
        }
        if self.backoff_max < self.backoff_base {
            return Err(RetriesError::Backoff);
        }
        if let Some(m) = self.idempotent_methods.iter().find(|m| !m.starts_with('/')) {
            return Err(RetriesError::Method(m.clone()));
        }
        Ok(())
    }
}
