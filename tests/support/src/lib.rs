//! What the end-to-end tests (`tests/`), the benchmarks and the demo (`xtask`) share: child
//! processes that are stopped when dropped ([`supervised`]) and h2load's summary
//! ([`h2load`]). Plain std, so each user keeps its own error style (panics in tests, `anyhow`
//! in xtask).

pub mod cgroup;
pub mod h2load;
pub mod supervised;
