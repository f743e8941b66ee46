//! One run of mirror jobs: list each repository's tags at the upstream, select, and for
//! every selected tag make sure the store holds its manifest (an index whole, and of its
//! images those of the job's platforms), config and layers, pinned; then flip the tag.
//!
//! Built on the shared pieces only: the upstream comes from the [`Upstreams`] registry
//! (the same client, breaker and token cache as pull-through), and every blob goes
//! through the store's one blob writer. What is already stored is linked, not fetched, so
//! an unchanged tag costs one `HEAD`. A tag flips only after everything it references
//! is committed and verified, so a failed or cut-off run never changes what is served.
//! Mirrored content lives under the canonical name `<upstream>/<repository>`, so both
//! routing forms serve it through pull-through, from the store, online or not.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use super::{MirrorJob, RepoSelector};
use crate::metrics::{Metrics, MirrorLabels, MirrorRunLabels};
use crate::oci::manifest::Manifest;
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::pullthrough::ACCEPT_ANY;
use crate::storage::{
    AcceptClass, FetchedManifest, LinkOrigin, MirrorRunRecord, StorageError, Store, StreamError,
    WriteError, now_secs,
};
use crate::upstream::{Namespace, TagsPage, UpstreamError, UpstreamHandle, Upstreams};

/// Pages of a tag list followed at most (a loop guard against an upstream whose `Link`
/// never ends).
const MAX_TAG_PAGES: usize = 10_000;

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("no mirror job is named {0:?}")]
    UnknownJob(String),
}

/// Why one tag (or a repository's tag list) could not be mirrored.
#[derive(Debug, thiserror::Error)]
enum TagError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream's content failed verification or does not parse.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What one run of one job did.
#[derive(Clone, Debug, Default)]
pub struct JobReport {
    pub job: String,
    pub tags_added: u64,
    pub tags_updated: u64,
    pub tags_unchanged: u64,
    /// Each selected tag (or repository) that failed, with why.
    pub failed: Vec<(String, String)>,
    pub blobs_fetched: u64,
    pub blobs_present: u64,
    pub bytes_fetched: u64,
    pub duration: Duration,
}

impl JobReport {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// The mirror service: runs jobs on demand. Cheap to clone.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    upstreams: Upstreams,
    jobs: Vec<MirrorJob>,
    metrics: Arc<Metrics>,
    /// Jobs running now: a job never overlaps itself.
    running: Mutex<HashSet<String>>,
}

/// State shared by the jobs of one run: each blob is fetched once, however many tags
/// and jobs reference it.
#[derive(Default)]
struct RunState {
    blobs: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<bool>>>>,
}

impl RunState {
    fn blob(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<bool>> {
        let mut blobs = self
            .blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        blobs.entry(digest.clone()).or_default().clone()
    }
}

/// Counts of one tag.
#[derive(Default)]
struct Fetched {
    blobs: u64,
    present: u64,
    bytes: u64,
}

/// The repository a tag is mirrored for.
struct Repo<'a> {
    job: &'a MirrorJob,
    upstream: &'a UpstreamHandle,
    remote: &'a RepoName,
    canonical: &'a RepoName,
}

/// Releases a job's running mark and gauge however its run ends.
struct RunningGuard<'a> {
    inner: &'a Inner,
    job: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut running) = self.inner.running.lock() {
            running.remove(&self.job);
        }
        self.inner
            .metrics
            .mirror_running
            .get_or_create(&MirrorLabels {
                job: self.job.clone(),
            })
            .set(0);
    }
}

impl Mirror {
    pub fn new(
        store: Store,
        upstreams: Upstreams,
        jobs: Vec<MirrorJob>,
        metrics: Arc<Metrics>,
    ) -> Mirror {
        Mirror {
            inner: Arc::new(Inner {
                store,
                upstreams,
                jobs,
                metrics,
                running: Mutex::default(),
            }),
        }
    }

    /// Runs the jobs named (every job when none is), one after the other, sharing
    /// fetched blobs. A job already running is reported as failed, not run twice.
    pub async fn run(&self, names: &[String]) -> Result<Vec<JobReport>, MirrorError> {
        let jobs: Vec<&MirrorJob> = if names.is_empty() {
            self.inner.jobs.iter().collect()
        } else {
            names
                .iter()
                .map(|n| {
                    self.inner
                        .jobs
                        .iter()
                        .find(|j| &j.name == n)
                        .ok_or_else(|| MirrorError::UnknownJob(n.clone()))
                })
                .collect::<Result<_, _>>()?
        };
        let state = RunState::default();
        let mut reports = Vec::new();
        for job in jobs {
            reports.push(self.run_job(job, &state, None).await);
        }
        Ok(reports)
    }

    /// Runs job `name` for schedule slot `slot` (recorded, whether the run succeeds or
    /// not). Returns whether every selected tag was mirrored.
    pub(crate) async fn run_slot(&self, name: &str, slot: u64) -> bool {
        let Some(job) = self.inner.jobs.iter().find(|j| j.name == name) else {
            return false;
        };
        self.run_job(job, &RunState::default(), Some(slot))
            .await
            .ok()
    }

    /// The jobs this service runs.
    pub(crate) fn jobs(&self) -> &[MirrorJob] {
        &self.inner.jobs
    }

    /// The last schedule slot job `name` ran for, from its durable run record.
    pub(crate) async fn last_slot(&self, name: &str) -> Result<Option<u64>, StorageError> {
        Ok(self.previous(name).await?.and_then(|r| r.slot))
    }

    /// The recorded last run of job `name`.
    async fn previous(&self, name: &str) -> Result<Option<MirrorRunRecord>, StorageError> {
        let store = self.inner.store.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            Ok(store
                .mirror_runs()?
                .into_iter()
                .find(|(j, _)| *j == name)
                .map(|(_, r)| r))
        })
        .await
        .map_err(|_| StorageError::Task)?
    }

    async fn run_job(&self, job: &MirrorJob, state: &RunState, slot: Option<u64>) -> JobReport {
        let inner = &self.inner;
        let mut report = JobReport {
            job: job.name.clone(),
            ..JobReport::default()
        };
        let labels = MirrorLabels {
            job: job.name.clone(),
        };
        let fresh = inner
            .running
            .lock()
            .map(|mut r| r.insert(job.name.clone()))
            .unwrap_or(false);
        if !fresh {
            report
                .failed
                .push(("-".to_owned(), "the job is already running".to_owned()));
            return report;
        }
        let _running = RunningGuard {
            inner,
            job: job.name.clone(),
        };
        inner.metrics.mirror_running.get_or_create(&labels).set(1);
        let started = now_secs();
        let clock = Instant::now();
        tracing::info!(job = %job.name, upstream = %job.upstream, "mirror run started");
        match inner.upstreams.by_name(&job.upstream) {
            Some(upstream) => {
                for selector in &job.repositories {
                    self.mirror_repository(job, upstream, selector, state, &mut report)
                        .await;
                }
            }
            None => report.failed.push((
                job.upstream.clone(),
                "no upstream of that name is configured".to_owned(),
            )),
        }
        report.duration = clock.elapsed();
        self.finish(job, started, slot, &report).await;
        report
    }

    async fn mirror_repository(
        &self,
        job: &MirrorJob,
        upstream: &UpstreamHandle,
        selector: &RepoSelector,
        state: &RunState,
        report: &mut JobReport,
    ) {
        let name = match selector {
            RepoSelector::Name(n) => n,
            RepoSelector::Glob(g) => {
                report.failed.push((
                    g.clone(),
                    "repository globs need the upstream's _catalog, which mirroring does not \
                     read yet; list the repositories"
                        .to_owned(),
                ));
                return;
            }
        };
        let Some((canonical, remote)) = self.names(upstream, name) else {
            report.failed.push((
                name.to_string(),
                "not a repository name of this upstream".to_owned(),
            ));
            return;
        };
        let tags = match list_tags(upstream, &remote).await {
            Ok(t) => t,
            Err(e) => {
                report
                    .failed
                    .push((canonical.to_string(), format!("listing tags: {e}")));
                return;
            }
        };
        let selected = job.tags.select(tags.iter().map(String::as_str));
        let repo = Repo {
            job,
            upstream,
            remote: &remote,
            canonical: &canonical,
        };
        let outcomes: Vec<(String, TagOutcome)> = futures_util::stream::iter(selected)
            .map(|tag| {
                let repo = &repo;
                async move {
                    let outcome = self.mirror_tag(repo, &tag, state).await;
                    (tag, outcome)
                }
            })
            .buffer_unordered(job.concurrency)
            .collect()
            .await;
        for (tag, outcome) in outcomes {
            match outcome {
                Ok((change, fetched)) => {
                    match change {
                        Change::Added => report.tags_added += 1,
                        Change::Updated => report.tags_updated += 1,
                        Change::Unchanged => report.tags_unchanged += 1,
                    }
                    report.blobs_fetched += fetched.blobs;
                    report.blobs_present += fetched.present;
                    report.bytes_fetched += fetched.bytes;
                }
                Err(e) => {
                    tracing::warn!(job = %job.name, repo = %canonical, %tag, error = %e, "mirroring a tag failed");
                    report
                        .failed
                        .push((format!("{canonical}:{tag}"), e.to_string()));
                }
            }
        }
    }

    /// The canonical name and the name at the upstream of a job's repository, as
    /// pull-through names them (Docker Hub's `library/` included).
    fn names(&self, upstream: &UpstreamHandle, name: &RepoName) -> Option<(RepoName, RepoName)> {
        let requested = name.with_prefix(upstream.name()).ok()?;
        let resolved = self.inner.upstreams.resolve(&requested, None).ok()?;
        match resolved.namespace {
            Namespace::Upstream { remote, .. } => Some((resolved.canonical, remote)),
            Namespace::Hosted => None,
        }
    }

    async fn mirror_tag(&self, repo: &Repo<'_>, tag: &str, state: &RunState) -> TagOutcome {
        let store = &self.inner.store;
        let tag: Tag = tag
            .parse()
            .map_err(|_| TagError::Invalid(format!("{tag:?} is not a valid tag")))?;
        let client = repo.upstream.client();
        let before = store
            .tag_freshness(repo.canonical, &tag, AcceptClass::Any)
            .await?
            .map(|f| f.digest);
        let reference = Reference::Tag(tag.clone());
        let head = client
            .manifest(repo.remote, &reference, ACCEPT_ANY, true)
            .await?;
        let mut fetched = Fetched::default();
        let (digest, prefetched) = match head.digest {
            Some(d) => (d, None),
            // No digest announced: the body decides.
            None => {
                let got = client
                    .manifest(repo.remote, &reference, ACCEPT_ANY, false)
                    .await?;
                (Digest::sha256_of(&got.body), Some(got))
            }
        };
        let (body, manifest) = match prefetched {
            Some(got) => parse(&digest, got.body, got.media_type.as_deref())?,
            None => self.manifest(repo, &digest).await?,
        };
        if !manifest.manifests.is_empty() {
            for child in &manifest.manifests {
                let wanted = repo.job.platforms.is_empty()
                    || child.platform.as_ref().is_some_and(|p| {
                        repo.job
                            .platforms
                            .iter()
                            .any(|f| f.matches(&p.os, &p.architecture, p.variant.as_deref()))
                    });
                if !wanted {
                    continue;
                }
                let (child_body, child_manifest) = self.manifest(repo, &child.digest).await?;
                self.blobs(repo, &child_manifest, state, &mut fetched)
                    .await?;
                store
                    .put_fetched_manifest(FetchedManifest {
                        repo: repo.canonical.clone(),
                        digest: child.digest.clone(),
                        body: child_body,
                        manifest: child_manifest,
                        tag: None,
                    })
                    .await?;
            }
        }
        self.blobs(repo, &manifest, state, &mut fetched).await?;
        // Everything the tag references is committed: now it may point here.
        store
            .put_fetched_manifest(FetchedManifest {
                repo: repo.canonical.clone(),
                digest: digest.clone(),
                body,
                manifest,
                tag: Some((tag, AcceptClass::Any)),
            })
            .await?;
        let change = match before {
            None => Change::Added,
            Some(b) if b == digest && fetched.blobs == 0 => Change::Unchanged,
            Some(_) => Change::Updated,
        };
        Ok((change, fetched))
    }

    /// A manifest of the repository by digest: from the store, or fetched and verified.
    async fn manifest(
        &self,
        repo: &Repo<'_>,
        digest: &Digest,
    ) -> Result<(Bytes, Manifest), TagError> {
        let stored = self
            .inner
            .store
            .get_manifest(repo.canonical, &Reference::Digest(digest.clone()))
            .await?;
        if let Some(m) = stored {
            return parse(digest, m.body, Some(&m.media_type));
        }
        let got = repo
            .upstream
            .client()
            .manifest(
                repo.remote,
                &Reference::Digest(digest.clone()),
                ACCEPT_ANY,
                false,
            )
            .await?;
        parse(digest, got.body, got.media_type.as_deref())
    }

    /// Makes sure every blob `manifest` needs is stored and pinned in the repository.
    async fn blobs(
        &self,
        repo: &Repo<'_>,
        manifest: &Manifest,
        state: &RunState,
        fetched: &mut Fetched,
    ) -> Result<(), TagError> {
        let store = &self.inner.store;
        for blob in manifest.required_blobs() {
            let cell = state.blob(&blob.digest);
            let mut done = cell.lock().await;
            if !*done {
                if store.stored_blob_size(&blob.digest).await?.is_some() {
                    fetched.present += 1;
                } else {
                    fetched.bytes += self.fetch_blob(repo, &blob.digest, blob.size).await?;
                    fetched.blobs += 1;
                }
                *done = true;
            } else {
                fetched.present += 1;
            }
            drop(done);
            if !store.pin_blob(repo.canonical, &blob.digest).await? {
                return Err(TagError::Invalid(format!(
                    "blob {} vanished from the store while mirroring",
                    blob.digest
                )));
            }
        }
        Ok(())
    }

    /// Downloads a blob through the store's blob writer, verifies it and commits it
    /// pinned to the repository. Returns its size.
    async fn fetch_blob(
        &self,
        repo: &Repo<'_>,
        digest: &Digest,
        size: u64,
    ) -> Result<u64, TagError> {
        let resp = repo.upstream.client().blob(repo.remote, digest, 0).await?;
        let mut writer = self.inner.store.blob_writer(digest.algorithm()).await?;
        match writer.write_stream(resp.body, Some(size)).await {
            Ok(_) => {}
            Err(StreamError::Body(e)) => return Err(e.into()),
            Err(StreamError::TooLong) => {
                return Err(TagError::Invalid(format!(
                    "upstream sent more than the {size} bytes of blob {digest}"
                )));
            }
            Err(StreamError::Write(e)) => return Err(write_error(e)),
        }
        let verified = writer.verify(digest).await.map_err(write_error)?;
        if verified.size() != size {
            return Err(TagError::Invalid(format!(
                "blob {digest} has {} bytes, the manifest says {size}",
                verified.size()
            )));
        }
        Ok(verified.commit(repo.canonical, LinkOrigin::Mirror).await?)
    }

    /// Records the run durably and in metrics, and logs its summary.
    async fn finish(&self, job: &MirrorJob, started: u64, slot: Option<u64>, report: &JobReport) {
        let inner = &self.inner;
        let labels = MirrorLabels {
            job: job.name.clone(),
        };
        let result = if report.ok() { "ok" } else { "failed" };
        let ended = now_secs();
        let previous = self.previous(&job.name).await.ok().flatten();
        let record = MirrorRunRecord {
            started,
            ended,
            ok: report.ok(),
            tags_added: report.tags_added,
            tags_updated: report.tags_updated,
            tags_unchanged: report.tags_unchanged,
            tags_failed: report.failed.len() as u64,
            bytes_fetched: report.bytes_fetched,
            last_success: if report.ok() {
                Some(ended)
            } else {
                previous.as_ref().and_then(|p| p.last_success)
            },
            slot: slot.or_else(|| previous.as_ref().and_then(|p| p.slot)),
        };
        if let Err(e) = inner.store.record_mirror_run(&job.name, &record).await {
            tracing::warn!(job = %job.name, error = %e, "recording the mirror run failed");
        }
        let m = &inner.metrics;
        m.mirror_runs
            .get_or_create(&MirrorRunLabels {
                job: job.name.clone(),
                result,
            })
            .inc();
        m.mirror_last_duration
            .get_or_create(&labels)
            .set(report.duration.as_secs_f64());
        m.mirror_bytes
            .get_or_create(&labels)
            .inc_by(report.bytes_fetched);
        m.mirror_tags_changed
            .get_or_create(&labels)
            .inc_by(report.tags_added + report.tags_updated);
        m.mirror_tags_failed
            .get_or_create(&labels)
            .inc_by(report.failed.len() as u64);
        if let Some(at) = record.last_success {
            m.mirror_last_success
                .get_or_create(&labels)
                .set(i64::try_from(at).unwrap_or(i64::MAX));
        }
        tracing::info!(
            job = %job.name,
            result,
            tags_added = report.tags_added,
            tags_updated = report.tags_updated,
            tags_unchanged = report.tags_unchanged,
            tags_failed = report.failed.len(),
            blobs_fetched = report.blobs_fetched,
            bytes_fetched = report.bytes_fetched,
            elapsed_ms = report.duration.as_millis() as u64,
            "mirror run finished"
        );
    }
}

/// What mirroring one tag did, or why it failed.
type TagOutcome = Result<(Change, Fetched), TagError>;

/// How a tag's mirror changed.
enum Change {
    Added,
    Updated,
    Unchanged,
}

fn write_error(e: WriteError) -> TagError {
    match e {
        WriteError::DigestMismatch { .. } => TagError::Invalid(e.to_string()),
        WriteError::Storage(s) => TagError::Storage(s),
    }
}

/// Verifies a manifest's bytes against `digest` and parses them.
fn parse(
    digest: &Digest,
    body: Bytes,
    media_type: Option<&str>,
) -> Result<(Bytes, Manifest), TagError> {
    let actual = Digest::of(digest.algorithm(), &body);
    if &actual != digest {
        return Err(TagError::Invalid(format!(
            "manifest {digest} has digest {actual}"
        )));
    }
    let manifest = Manifest::parse(&body, media_type)
        .or_else(|_| Manifest::parse(&body, None))
        .map_err(|e| TagError::Invalid(format!("manifest {digest}: {e}")))?;
    Ok((body, manifest))
}

/// A tag list page as registries send it.
#[derive(Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// Every tag of `remote`, following the `Link` pagination of the upstream.
async fn list_tags(upstream: &UpstreamHandle, remote: &RepoName) -> Result<Vec<String>, TagError> {
    let mut tags = Vec::new();
    let mut page = TagsPage {
        n: None,
        last: None,
    };
    for _ in 0..MAX_TAG_PAGES {
        let got = upstream.client().tags(remote, &page).await?;
        let list: TagList = serde_json::from_slice(&got.body)
            .map_err(|e| TagError::Invalid(format!("tag list: {e}")))?;
        let fresh = list.tags.unwrap_or_default();
        let next = got.link.as_deref().and_then(next_page);
        let last = fresh.last().cloned();
        tags.extend(fresh);
        match (next, last) {
            (Some(n), Some(last)) if page.last.as_ref() != Some(&last) => {
                page = TagsPage {
                    n: n.n,
                    last: Some(n.last.unwrap_or(last)),
                };
            }
            _ => return Ok(tags),
        }
    }
    Ok(tags)
}

/// The `n` and `last` of a `Link: </v2/…/tags/list?n=…&last=…>; rel="next"` header.
fn next_page(link: &str) -> Option<TagsPage> {
    let target = link.split(';').next()?.trim();
    let target = target.strip_prefix('<')?.strip_suffix('>')?;
    let query = target.split_once('?')?.1;
    let mut page = TagsPage {
        n: None,
        last: None,
    };
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("n", v)) => page.n = v.parse().ok(),
            Some(("last", v)) => page.last = Some(percent_decode(v)),
            _ => {}
        }
    }
    Some(page)
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_pages_come_from_the_link_header() {
        let page = next_page(r#"</v2/team/app/tags/list?n=2&last=v1.0%2B1>; rel="next""#)
            .expect("a next page");
        assert_eq!(page.n, Some(2));
        assert_eq!(page.last.as_deref(), Some("v1.0+1"));
        assert!(next_page("garbage").is_none());
    }
}
