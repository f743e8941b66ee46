//! Scheduled mirroring of chosen repositories from an upstream (usually the company's
//! central registry), so that a site holds tonight what it will run tomorrow.
//!
//! Built so far: the pure parts every run will use: a validated job ([`MirrorJob`]),
//! which tags a job selects ([`select`]), which platforms of an index it keeps
//! ([`platform`]) and when it runs ([`schedule`]). The engine that fetches through the
//! storage blob writer and the upstream registry is not built yet (issue 9), so a
//! configuration with `[[mirror]]` jobs is refused by `serve` and `config check` (see
//! `Config::unbuilt`).

pub mod platform;
pub mod schedule;
pub mod select;

use std::time::Duration;

use crate::oci::RepoName;
pub use platform::Platform;
pub use schedule::Cron;
pub use select::TagFilter;

/// A repository entry of a job: an explicit name at the upstream, or a glob that needs the
/// upstream's `_catalog` to expand.
#[derive(Clone, Debug)]
pub enum RepoSelector {
    Name(RepoName),
    Glob(String),
}

/// One validated `[[mirror]]` job.
#[derive(Clone, Debug)]
pub struct MirrorJob {
    /// Unique; safe as a metric label and a file name.
    pub name: String,
    /// The configured upstream it mirrors from, by name.
    pub upstream: String,
    pub repositories: Vec<RepoSelector>,
    pub tags: TagFilter,
    /// Empty: every platform of an index.
    pub platforms: Vec<Platform>,
    pub referrers: bool,
    /// `None`: runs only when asked (`outpost mirror run`).
    pub schedule: Option<Cron>,
    /// Each site's runs start up to this long after the scheduled minute.
    pub jitter: Duration,
    /// Bytes per second across the job's transfers.
    pub bandwidth: Option<u64>,
    pub concurrency: usize,
    pub prune: bool,
}

/// Whether a job name is usable as a metric label value and a file name.
pub fn valid_job_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}
