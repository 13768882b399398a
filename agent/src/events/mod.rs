//! Events the agent keeps and reports: the durable journal they are written to first.

#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the breaker-trip events of the correlation stage (issue 6) are its first writer"
    )
)]
pub mod journal;
