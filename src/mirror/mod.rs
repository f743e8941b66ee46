//! Scheduled mirroring of chosen repositories from an upstream (usually the company's
//! central registry), so that a site holds tonight what it will run tomorrow.
//!
//! - [`MirrorJob`]: a validated job; [`select`]: which tags it selects; [`platform`]:
//!   which images of an index it keeps; [`schedule`]: when it runs (pure).
//! - `run`: the engine ([`Mirror`]): one run of jobs on demand (`outpost mirror run`,
//!   through the daemon when it runs), on the shared upstream registry and the store's
//!   one blob writer.
//! - this file: the texts `outpost mirror run` and `status` print.
//!
//! - `scheduler`: runs jobs with a `schedule` in the daemon (cron in UTC, the site's
//!   jitter, one catch-up run for missed slots, retries with backoff), and re-plans
//!   them when a configuration reload changes the jobs.
//!
//! - `bandwidth`: the job's token bucket; `progress`: live progress events and their
//!   display for `outpost mirror run`.

mod bandwidth;
pub mod platform;
pub mod progress;
mod run;
pub mod schedule;
mod scheduler;
pub mod select;

use std::time::Duration;

use crate::oci::RepoName;
use crate::storage::MirrorRunRecord;
pub use platform::Platform;
pub use run::{JobReport, Mirror};
pub use schedule::Cron;
pub(crate) use scheduler::Schedules;
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

/// What `outpost mirror run` prints: one block per job, then whether all went well.
pub fn summary(reports: &[JobReport]) -> (String, bool) {
    let mut out = String::new();
    let mut failed = false;
    for r in reports {
        out.push_str(&format!(
            "{}: {} — tags: {} added, {} updated, {} unchanged, {} failed; blobs: {} fetched \
             ({} bytes), {} already stored ({} bytes skipped); {:.1}s\n",
            r.job,
            if r.ok() { "ok" } else { "FAILED" },
            r.tags_added,
            r.tags_updated,
            r.tags_unchanged,
            r.failed.len(),
            r.blobs_fetched,
            r.bytes_fetched,
            r.blobs_present,
            r.bytes_present,
            r.duration.as_secs_f64()
        ));
        for (what, why) in &r.failed {
            out.push_str(&format!("  failed {what}: {why}\n"));
        }
        failed |= !r.ok();
    }
    (out, failed)
}

/// When job `job` runs next by its schedule (Unix seconds), at `now`, for the site whose
/// instance id is `instance`; `None` without a schedule.
fn next_scheduled(
    job: &MirrorJob,
    instance: &str,
    run: Option<&MirrorRunRecord>,
    now: u64,
) -> Option<u64> {
    let cron = job.schedule.as_ref()?;
    let offset = schedule::jitter_offset(instance, &job.name, job.jitter).as_secs();
    scheduler::next_run(cron, offset, run.and_then(|r| r.slot), now).map(|p| p.at)
}

/// What `outpost mirror status` prints for the configured `jobs` and their recorded
/// runs: per job last start and end, result, bytes, tags changed, the next scheduled run
/// (known once the daemon has given the site its `instance` id) and lag (the age of the
/// last successful run) at `now` (Unix seconds).
pub fn status(
    jobs: &[MirrorJob],
    runs: &[(String, MirrorRunRecord)],
    instance: Option<&str>,
    now: u64,
    json: bool,
) -> String {
    let find = |name: &str| runs.iter().find(|(j, _)| j == name).map(|(_, r)| r);
    let next =
        |job: &MirrorJob| instance.and_then(|i| next_scheduled(job, i, find(&job.name), now));
    let date = |at: u64| httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(at));
    if json {
        let list: Vec<serde_json::Value> = jobs
            .iter()
            .map(|j| {
                let run = find(&j.name);
                serde_json::json!({
                    "job": j.name,
                    "upstream": j.upstream,
                    "schedule": j.schedule.as_ref().map(ToString::to_string),
                    "last_run": run,
                    "next_run": next(j),
                    "lag_seconds": run.and_then(|r| r.last_success).map(|s| now.saturating_sub(s)),
                })
            })
            .collect();
        return format!("{}\n", serde_json::Value::Array(list));
    }
    let mut out = String::new();
    for j in jobs {
        let planned = match (&j.schedule, next(j)) {
            (None, _) => "runs on demand only".to_owned(),
            (Some(_), Some(at)) => format!("next run {}", date(at)),
            (Some(_), None) => "next run known once the daemon has started".to_owned(),
        };
        match find(&j.name) {
            None => out.push_str(&format!("{}: never run; {planned}\n", j.name)),
            Some(r) => out.push_str(&format!(
                "{}: last run {} ({}s ago, took {}s): {}; tags {} added, {} updated, {} \
                 unchanged, {} failed; {} bytes fetched; lag {}; {planned}\n",
                j.name,
                date(r.started),
                now.saturating_sub(r.ended),
                r.ended.saturating_sub(r.started),
                if r.ok { "ok" } else { "FAILED" },
                r.tags_added,
                r.tags_updated,
                r.tags_unchanged,
                r.tags_failed,
                r.bytes_fetched,
                r.last_success
                    .map(|s| format!("{}s", now.saturating_sub(s)))
                    .unwrap_or_else(|| "never succeeded".to_owned())
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// `mirror status` names the next scheduled run: the cron slot plus this site's
    /// jitter offset (none here), and says so for a job that only runs on demand.
    #[test]
    fn status_names_the_next_scheduled_run() {
        let c = Config::from_toml(
            "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\n\
             [storage]\npath=\"x\"\n[[upstream]]\nname=\"central.corp\"\nurl=\"https://c\"\n\
             [[mirror]]\nname=\"nightly\"\nupstream=\"central.corp\"\nrepositories=[\"a/b\"]\n\
             tags=[\"*\"]\nschedule=\"0 2 * * *\"\njitter=\"0s\"\n\
             [[mirror]]\nname=\"manual\"\nupstream=\"central.corp\"\nrepositories=[\"a/b\"]\n\
             tags=[\"*\"]\n",
        )
        .expect("config");
        let text = status(&c.mirrors, &[], Some("site"), 0, false);
        assert!(
            text.contains("nightly: never run; next run Thu, 01 Jan 1970 02:00:00 GMT"),
            "{text}"
        );
        assert!(
            text.contains("manual: never run; runs on demand only"),
            "{text}"
        );
        let unknown = status(&c.mirrors, &[], None, 0, false);
        assert!(
            unknown.contains("known once the daemon has started"),
            "{unknown}"
        );
        let json = status(&c.mirrors, &[], Some("site"), 0, true);
        assert!(json.contains("\"next_run\":7200"), "{json}");
    }
}
