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
//!
//! A blob download that is cut off keeps its bytes in the store's partial file and the
//! next attempt resumes with `Range` (the digest is checked over the whole file). With
//! `referrers`, the referrers of each tag (the API, or the `sha256-<hex>` tag schema of
//! registries without it) and their own referrers are mirrored with it. Each tag's
//! record ([`MirroredTag`]) says what it pins; tags that left the selection are
//! released (unpinned, and with `prune` no longer served).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;

use super::bandwidth::Bucket;
use super::progress::{self, Event, Sender};
use super::{MirrorJob, RepoSelector};
use crate::auth::central::CentralAuth;
use crate::metrics::{Metrics, MirrorLabels, MirrorRunLabels};
use crate::oci::manifest::Manifest;
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::pullthrough::ACCEPT_ANY;
use crate::storage::{
    AcceptClass, FetchedManifest, LinkOrigin, MirrorRunRecord, MirroredTag, StorageError, Store,
    StreamError, WriteError, now_secs,
};
use crate::upstream::{
    Namespace, TagsPage, UpstreamError, UpstreamHandle, UpstreamTags, Upstreams,
};

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
    /// A blob transfer broke off; its bytes so far are kept for the next attempt.
    #[error(
        "blob {digest} cut off after {kept} of {size} bytes (kept; the next run resumes): {source}"
    )]
    Cut {
        digest: Digest,
        kept: u64,
        size: u64,
        source: UpstreamError,
    },
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
    /// Bytes of the blobs that were already stored (not fetched).
    pub bytes_present: u64,
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
    /// The configured jobs; a configuration reload replaces them ([`Mirror::set_jobs`]).
    jobs: RwLock<Arc<Vec<MirrorJob>>>,
    metrics: Arc<Metrics>,
    /// The central login service: learns which mirrored repositories are anonymous.
    central: Option<Arc<CentralAuth>>,
    /// Jobs running now: a job never overlaps itself.
    running: Mutex<HashSet<String>>,
    /// Blobs being downloaded, by digest: one writer per partial file, whichever runs
    /// and jobs want the blob.
    fetching: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

impl Inner {
    /// The lock of `digest`'s download, held while it is fetched.
    fn fetch_lock(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self
            .fetching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget locks nobody holds or waits for, so the map stays small.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(digest.clone()).or_default().clone()
    }
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
    present_bytes: u64,
    bytes: u64,
}

/// One job's part of a run.
struct JobCtx<'a> {
    job: &'a MirrorJob,
    upstream: &'a UpstreamHandle,
    state: &'a RunState,
    /// The job's bandwidth cap, shared by all of its transfers.
    bucket: Option<Bucket>,
    progress: Option<&'a Sender>,
}

/// The repository a tag is mirrored for.
struct Repo<'a> {
    ctx: &'a JobCtx<'a>,
    remote: &'a RepoName,
    canonical: &'a RepoName,
    /// Every tag the upstream lists (for the referrers tag schema).
    tags: &'a HashSet<String>,
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
        central: Option<Arc<CentralAuth>>,
    ) -> Mirror {
        Mirror {
            inner: Arc::new(Inner {
                store,
                upstreams,
                jobs: RwLock::new(Arc::new(jobs)),
                metrics,
                central,
                running: Mutex::default(),
                fetching: Mutex::default(),
            }),
        }
    }

    /// Runs the jobs named (every job when none is), one after the other, sharing
    /// fetched blobs, telling `progress` as it goes. A job already running is reported
    /// as failed, not run twice.
    pub async fn run(
        &self,
        names: &[String],
        progress: Option<&Sender>,
    ) -> Result<Vec<JobReport>, MirrorError> {
        let configured = self.jobs();
        let jobs: Vec<&MirrorJob> = if names.is_empty() {
            configured.iter().collect()
        } else {
            names
                .iter()
                .map(|n| {
                    configured
                        .iter()
                        .find(|j| &j.name == n)
                        .ok_or_else(|| MirrorError::UnknownJob(n.clone()))
                })
                .collect::<Result<_, _>>()?
        };
        self.release_removed_jobs().await;
        let state = RunState::default();
        let mut reports = Vec::new();
        for job in jobs {
            reports.push(self.run_job(job, &state, None, progress).await);
        }
        Ok(reports)
    }

    /// Releases what jobs that are no longer configured had mirrored: their tags stay
    /// served, their content is unpinned (their `prune` setting left with them).
    pub(crate) async fn release_removed_jobs(&self) {
        let held = match self.inner.store.mirror_holders().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "reading mirrored tags failed");
                return;
            }
        };
        let jobs = self.jobs();
        for (job, repo) in held {
            if jobs.iter().any(|j| j.name == job) {
                continue;
            }
            let Ok(name) = repo.parse::<RepoName>() else {
                continue;
            };
            match self
                .inner
                .store
                .release_mirrored_tags(&job, &name, Vec::new(), false)
                .await
            {
                Ok(r) => tracing::info!(
                    job = %job, repo = %name, released = r.tags.len(), unpinned_blobs = r.unpinned,
                    "a mirror job left the configuration: its tags stay served, unpinned"
                ),
                Err(e) => {
                    tracing::warn!(job = %job, repo = %name, error = %e, "releasing mirrored tags failed")
                }
            }
        }
    }

    /// Runs job `name` for schedule slot `slot` (recorded, whether the run succeeds or
    /// not). Returns whether every selected tag was mirrored.
    pub(crate) async fn run_slot(&self, name: &str, slot: u64) -> bool {
        let jobs = self.jobs();
        let Some(job) = jobs.iter().find(|j| j.name == name) else {
            return false;
        };
        self.run_job(job, &RunState::default(), Some(slot), None)
            .await
            .ok()
    }

    /// The jobs this service runs now. A run keeps the jobs it started with.
    pub(crate) fn jobs(&self) -> Arc<Vec<MirrorJob>> {
        self.inner
            .jobs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs `jobs` from now on (a configuration reload); runs in progress finish with
    /// the settings they started with.
    pub(crate) fn set_jobs(&self, jobs: Vec<MirrorJob>) {
        *self
            .inner
            .jobs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(jobs);
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

    async fn run_job(
        &self,
        job: &MirrorJob,
        state: &RunState,
        slot: Option<u64>,
        progress: Option<&Sender>,
    ) -> JobReport {
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
        progress::send(progress, || Event::Started {
            job: job.name.clone(),
        });
        match inner.upstreams.by_name(&job.upstream) {
            Some(upstream) => {
                let ctx = JobCtx {
                    job,
                    upstream: &upstream,
                    state,
                    bucket: job.bandwidth.map(Bucket::new),
                    progress,
                };
                self.mirror_job(&ctx, &mut report).await;
            }
            None => report.failed.push((
                job.upstream.clone(),
                "no upstream of that name is configured".to_owned(),
            )),
        }
        report.duration = clock.elapsed();
        self.finish(job, started, slot, &report).await;
        progress::send(progress, || Event::Finished {
            job: job.name.clone(),
            ok: report.ok(),
        });
        report
    }

    /// Every repository of the job, then the release of what it no longer mirrors.
    async fn mirror_job(&self, ctx: &JobCtx<'_>, report: &mut JobReport) {
        let job = ctx.job;
        let mut names: Vec<RepoName> = Vec::new();
        let mut complete = true;
        let mut catalog: Option<Vec<String>> = None;
        for selector in &job.repositories {
            match selector {
                RepoSelector::Name(n) => names.push(n.clone()),
                RepoSelector::Glob(g) => {
                    if catalog.is_none() {
                        let client = ctx.upstream.client();
                        let listed =
                            list_all(|p| async move { client.catalog(&p).await }, "repositories")
                                .await;
                        match listed {
                            Ok(c) => catalog = Some(c),
                            Err(e) => {
                                complete = false;
                                report.failed.push((g.clone(), catalog_refused(ctx, &e)));
                                continue;
                            }
                        }
                    }
                    let matched = glob_matches(g, catalog.as_deref().unwrap_or_default());
                    if matched.is_empty() {
                        tracing::warn!(job = %job.name, glob = %g, "no repository of the upstream's catalog matches");
                    }
                    names.extend(matched);
                }
            }
        }
        names.sort();
        names.dedup();
        let mut done = HashSet::new();
        for name in &names {
            match self.mirror_repository(ctx, name, report).await {
                Some(canonical) => {
                    done.insert(canonical.to_string());
                }
                None => complete = false,
            }
        }
        // Repositories the job held tags in and no longer selects: release them all,
        // but only when the selection is known in full (a catalog or listing that failed
        // says nothing about what left).
        if !complete {
            return;
        }
        let held = match self.inner.store.mirror_holders().await {
            Ok(h) => h
                .into_iter()
                .filter(|(j, _)| *j == job.name)
                .map(|(_, r)| r),
            Err(e) => {
                tracing::warn!(job = %job.name, error = %e, "reading mirrored repositories failed");
                return;
            }
        };
        for repo in held.filter(|r| !done.contains(r)) {
            if let Ok(repo) = repo.parse::<RepoName>() {
                self.release(job, &repo, Vec::new()).await;
            }
        }
    }

    /// Mirrors the selected tags of one repository. Returns its canonical name when its
    /// tags could be listed (the selection is known), `None` otherwise.
    async fn mirror_repository(
        &self,
        ctx: &JobCtx<'_>,
        name: &RepoName,
        report: &mut JobReport,
    ) -> Option<RepoName> {
        let job = ctx.job;
        let Some((canonical, remote)) = self.names(ctx.upstream, name) else {
            report.failed.push((
                name.to_string(),
                "not a repository name of this upstream".to_owned(),
            ));
            return None;
        };
        let client = ctx.upstream.client();
        let at = &remote;
        let tags = match list_all(|p| async move { client.tags(at, &p).await }, "tags").await {
            Ok(t) => t,
            Err(e) => {
                report
                    .failed
                    .push((canonical.to_string(), format!("listing tags: {e}")));
                return None;
            }
        };
        self.learn_anonymous(ctx.upstream, &remote).await;
        let all: HashSet<String> = tags.iter().cloned().collect();
        let selected = job.tags.select(tags.iter().map(String::as_str));
        progress::send(ctx.progress, || Event::Selected {
            job: job.name.clone(),
            tags: selected.len() as u64,
        });
        let repo = Repo {
            ctx,
            remote: &remote,
            canonical: &canonical,
            tags: &all,
        };
        let outcomes: Vec<(String, TagOutcome)> = futures_util::stream::iter(selected.clone())
            .map(|tag| {
                let repo = &repo;
                async move {
                    let outcome = self.mirror_tag(repo, &tag).await;
                    (tag, outcome)
                }
            })
            .buffer_unordered(job.concurrency)
            .collect()
            .await;
        for (tag, outcome) in outcomes {
            let shown = format!("{canonical}:{tag}");
            match outcome {
                Ok((change, fetched)) => {
                    let word = match change {
                        Change::Added => {
                            report.tags_added += 1;
                            "added"
                        }
                        Change::Updated => {
                            report.tags_updated += 1;
                            "updated"
                        }
                        Change::Unchanged => {
                            report.tags_unchanged += 1;
                            "unchanged"
                        }
                    };
                    report.blobs_fetched += fetched.blobs;
                    report.blobs_present += fetched.present;
                    report.bytes_present += fetched.present_bytes;
                    report.bytes_fetched += fetched.bytes;
                    progress::send(ctx.progress, || Event::Tag {
                        job: job.name.clone(),
                        tag: shown,
                        outcome: word.to_owned(),
                    });
                }
                Err(e) => {
                    tracing::warn!(job = %job.name, repo = %canonical, %tag, error = %e, "mirroring a tag failed");
                    progress::send(ctx.progress, || Event::Tag {
                        job: job.name.clone(),
                        tag: shown.clone(),
                        outcome: format!("failed: {e}"),
                    });
                    report.failed.push((shown, e.to_string()));
                }
            }
        }
        self.release(job, &canonical, selected).await;
        Some(canonical)
    }

    /// Releases the tags of `repo` that `job` no longer selects (`keep` is what it does).
    async fn release(&self, job: &MirrorJob, repo: &RepoName, keep: Vec<String>) {
        match self
            .inner
            .store
            .release_mirrored_tags(&job.name, repo, keep, job.prune)
            .await
        {
            Ok(r) if !r.tags.is_empty() => tracing::info!(
                job = %job.name,
                %repo,
                released = ?r.tags,
                pruned = ?r.pruned,
                unpinned_blobs = r.unpinned,
                "tags left the job's selection"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(job = %job.name, %repo, error = %e, "releasing mirrored tags failed");
            }
        }
    }

    /// When the job mirrors from the central registry of logins, learns whether it
    /// serves `remote` anonymously, so anonymous pulls of mirrored content are judged
    /// offline on fresh knowledge.
    async fn learn_anonymous(&self, upstream: &UpstreamHandle, remote: &RepoName) {
        let Some(central) = &self.inner.central else {
            return;
        };
        if !central.is_central(upstream.name()) {
            return;
        }
        if !upstream.client().has_credentials() {
            // The tag list was just served to Outpost's anonymous client.
            central.learn_anonymous(remote).await;
        } else {
            central.ask_anonymous(remote).await;
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

    async fn mirror_tag(&self, repo: &Repo<'_>, tag: &str) -> TagOutcome {
        let store = &self.inner.store;
        let job = repo.ctx.job;
        let tag: Tag = tag
            .parse()
            .map_err(|_| TagError::Invalid(format!("{tag:?} is not a valid tag")))?;
        let before = store
            .tag_freshness(repo.canonical, &tag, AcceptClass::Any)
            .await?
            .map(|f| f.digest);
        let mut fetched = Fetched::default();
        let (digest, prefetched) = self.resolve(repo, &tag).await?;
        let (body, manifest) = match prefetched {
            Some(got) => got,
            None => self.manifest(repo, &digest).await?,
        };
        let mut record = MirroredTag {
            digest: digest.to_string(),
            manifests: vec![digest.to_string()],
            tags: Vec::new(),
        };
        for child in &manifest.manifests {
            let wanted = job.platforms.is_empty()
                || child.platform.as_ref().is_some_and(|p| {
                    job.platforms
                        .iter()
                        .any(|f| f.matches(&p.os, &p.architecture, p.variant.as_deref()))
                });
            if wanted {
                self.store_manifest(repo, &child.digest, &mut fetched)
                    .await?;
                record.manifests.push(child.digest.to_string());
            }
        }
        self.blobs(repo, &manifest, &mut fetched).await?;
        let mut extra_tags = Vec::new();
        if job.referrers {
            self.referrers(repo, &digest, &mut record, &mut extra_tags, &mut fetched)
                .await?;
        }
        record.tags = extra_tags.iter().map(|(t, _)| t.clone()).collect();
        // Everything the tag references is committed: now it may point here.
        store
            .flip_mirrored_tag(
                &job.name,
                FetchedManifest {
                    repo: repo.canonical.clone(),
                    digest: digest.clone(),
                    body,
                    manifest,
                    tag: Some((tag, AcceptClass::Any)),
                },
                extra_tags,
                record,
            )
            .await?;
        let change = match before {
            None => Change::Added,
            Some(b) if b == digest && fetched.blobs == 0 => Change::Unchanged,
            Some(_) => Change::Updated,
        };
        Ok((change, fetched))
    }

    /// What `tag` points to at the upstream: one `HEAD`, or a `GET` (whose body is then
    /// kept) when the upstream names no digest.
    async fn resolve(
        &self,
        repo: &Repo<'_>,
        tag: &Tag,
    ) -> Result<(Digest, Option<(Bytes, Manifest)>), TagError> {
        let client = repo.ctx.upstream.client();
        let reference = Reference::Tag(tag.clone());
        let head = client
            .manifest(repo.remote, &reference, ACCEPT_ANY, true)
            .await?;
        if let Some(d) = head.digest {
            return Ok((d, None));
        }
        let got = client
            .manifest(repo.remote, &reference, ACCEPT_ANY, false)
            .await?;
        let digest = Digest::sha256_of(&got.body);
        let parsed = parse(&digest, got.body, got.media_type.as_deref())?;
        Ok((digest, Some(parsed)))
    }

    /// Stores manifest `digest` of the repository, untagged, with every blob it needs:
    /// a selected platform's image, or a referrer. Returns the manifest.
    async fn store_manifest(
        &self,
        repo: &Repo<'_>,
        digest: &Digest,
        fetched: &mut Fetched,
    ) -> Result<Manifest, TagError> {
        let (body, manifest) = self.manifest(repo, digest).await?;
        self.blobs(repo, &manifest, fetched).await?;
        self.inner
            .store
            .put_fetched_manifest(FetchedManifest {
                repo: repo.canonical.clone(),
                digest: digest.clone(),
                body,
                manifest: manifest.clone(),
                tag: None,
            })
            .await?;
        Ok(manifest)
    }

    /// Mirrors the referrers of `subject` and, one level down, theirs (the signatures of
    /// an SBOM): through the referrers API, and through the `sha256-<hex>` tag schema
    /// (`sha256-<hex>` index, `.sig`, `.att`, `.sbom`) that registries without the API
    /// and cosign use. Adds what it stored to `record` and the schema tags it found to
    /// `extra_tags`.
    async fn referrers(
        &self,
        repo: &Repo<'_>,
        subject: &Digest,
        record: &mut MirroredTag,
        extra_tags: &mut Vec<(String, Digest)>,
        fetched: &mut Fetched,
    ) -> Result<(), TagError> {
        let client = repo.ctx.upstream.client();
        let mut level = vec![subject.clone()];
        for _depth in 0..2 {
            let mut found: Vec<Digest> = Vec::new();
            for subject in &level {
                match client.referrers(repo.remote, subject, None).await {
                    Ok(r) => found.extend(index_children(&r.body)?),
                    // No referrers API (distribution 2.8): the tag schema below.
                    Err(UpstreamError::NotFound) => {}
                    Err(e) => return Err(e.into()),
                }
                let base = format!("{}-{}", subject.algorithm().as_str(), subject.hex());
                for suffix in ["", ".sig", ".att", ".sbom"] {
                    let name = format!("{base}{suffix}");
                    if !repo.tags.contains(&name) {
                        continue;
                    }
                    let tag: Tag = name
                        .parse()
                        .map_err(|_| TagError::Invalid(format!("{name:?} is not a valid tag")))?;
                    let (digest, _) = self.resolve(repo, &tag).await?;
                    let manifest = self.store_manifest(repo, &digest, fetched).await?;
                    if suffix.is_empty() {
                        // The fallback index lists the referrers.
                        found.extend(manifest.manifests.iter().map(|m| m.digest.clone()));
                    } else {
                        found.push(digest.clone());
                    }
                    record.manifests.push(digest.to_string());
                    extra_tags.push((name, digest));
                }
            }
            let mut next = Vec::new();
            for digest in found {
                if next.contains(&digest) {
                    continue;
                }
                // One stored through its tag above is not fetched again; either way its
                // own referrers are looked for next.
                if !record.manifests.contains(&digest.to_string()) {
                    self.store_manifest(repo, &digest, fetched).await?;
                    record.manifests.push(digest.to_string());
                }
                next.push(digest);
            }
            level = next;
        }
        Ok(())
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
            .ctx
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
        fetched: &mut Fetched,
    ) -> Result<(), TagError> {
        let store = &self.inner.store;
        for blob in manifest.required_blobs() {
            let cell = repo.ctx.state.blob(&blob.digest);
            let mut done = cell.lock().await;
            if !*done {
                match self.fetch_blob(repo, &blob.digest, blob.size).await? {
                    Some(bytes) => {
                        fetched.bytes += bytes;
                        fetched.blobs += 1;
                        progress::send(repo.ctx.progress, || Event::Blob {
                            job: repo.ctx.job.name.clone(),
                        });
                    }
                    None => {
                        fetched.present += 1;
                        fetched.present_bytes += blob.size;
                    }
                }
                *done = true;
            } else {
                fetched.present += 1;
                fetched.present_bytes += blob.size;
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

    /// Downloads a blob that is not stored yet through the store's blob writer, resuming
    /// what an earlier attempt left, verifies it and commits it pinned to the
    /// repository. Returns the bytes received, or `None` when it was stored already.
    async fn fetch_blob(
        &self,
        repo: &Repo<'_>,
        digest: &Digest,
        size: u64,
    ) -> Result<Option<u64>, TagError> {
        let store = &self.inner.store;
        let lock = self.inner.fetch_lock(digest);
        let _fetching = lock.lock().await;
        if store.stored_blob_size(digest).await?.is_some() {
            return Ok(None);
        }
        let mut received = 0;
        let mut resume = true;
        loop {
            let have = if resume {
                store.partial_len(digest).await?
            } else {
                0
            };
            // More than the blob holds cannot be a prefix of it.
            let have = if have > size { 0 } else { have };
            let (writer, start) = if have == size && size > 0 {
                // Complete on disk already (cut off before it was verified).
                (store.resumable_writer(digest, have).await?, have)
            } else {
                let resp = repo
                    .ctx
                    .upstream
                    .client()
                    .blob(repo.remote, digest, have)
                    .await?;
                let start = resp.offset;
                if start < have {
                    tracing::info!(%digest, have, "the upstream ignored Range: fetching the whole blob");
                }
                let mut writer = store.resumable_writer(digest, start).await?;
                let body = Box::pin(self.paced(repo.ctx, resp.body));
                match writer.write_stream(body, Some(size - start)).await {
                    Ok(n) => received += n,
                    Err(StreamError::Body(source)) => {
                        let kept = writer.keep_partial().await.map_err(write_error)?;
                        return Err(TagError::Cut {
                            digest: digest.clone(),
                            kept,
                            size,
                            source,
                        });
                    }
                    Err(StreamError::TooLong) => {
                        return Err(TagError::Invalid(format!(
                            "upstream sent more than the {size} bytes of blob {digest}"
                        )));
                    }
                    Err(StreamError::Write(e)) => return Err(write_error(e)),
                }
                (writer, start)
            };
            match writer.verify(digest).await {
                Ok(verified) if verified.size() != size => {
                    return Err(TagError::Invalid(format!(
                        "blob {digest} has {} bytes, the manifest says {size}",
                        verified.size()
                    )));
                }
                Ok(verified) => {
                    verified.commit(repo.canonical, LinkOrigin::Mirror).await?;
                    return Ok(Some(received));
                }
                // What an earlier attempt left was not a prefix of the blob (the writer
                // removed it): fetch the whole blob once more.
                Err(WriteError::DigestMismatch { .. }) if start > 0 && resume => {
                    tracing::warn!(%digest, start, "a resumed blob did not verify: fetching it whole");
                    resume = false;
                }
                Err(e) => return Err(write_error(e)),
            }
        }
    }

    /// `body`, held to the job's bandwidth cap and counted for progress.
    fn paced<'a>(
        &self,
        ctx: &'a JobCtx<'a>,
        body: impl futures_util::Stream<Item = Result<Bytes, UpstreamError>> + Send + 'a,
    ) -> impl futures_util::Stream<Item = Result<Bytes, UpstreamError>> + Send + 'a {
        body.then(move |chunk| async move {
            if let Ok(c) = &chunk {
                if let Some(bucket) = &ctx.bucket {
                    bucket.take(c.len()).await;
                }
                progress::send(ctx.progress, || Event::Bytes {
                    job: ctx.job.name.clone(),
                    bytes: c.len() as u64,
                });
            }
            chunk
        })
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
        // A reload removed the job while it ran: what the run pinned is released now,
        // not at the next reload or start.
        if !self.jobs().iter().any(|j| j.name == job.name) {
            self.release_removed_jobs().await;
        }
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

/// Every entry of a paginated list (`tags` of a tag list, `repositories` of the
/// catalog), following the upstream's `Link` pagination.
async fn list_all<F, Fut>(mut fetch: F, field: &str) -> Result<Vec<String>, TagError>
where
    F: FnMut(TagsPage) -> Fut,
    Fut: std::future::Future<Output = Result<UpstreamTags, UpstreamError>>,
{
    let mut items = Vec::new();
    let mut page = TagsPage::default();
    for _ in 0..MAX_TAG_PAGES {
        let got = fetch(page.clone()).await?;
        let list: serde_json::Value = serde_json::from_slice(&got.body)
            .map_err(|e| TagError::Invalid(format!("{field} list: {e}")))?;
        let fresh: Vec<String> = match list.get(field) {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(serde_json::Value::Null) | None => Vec::new(),
            Some(_) => return Err(TagError::Invalid(format!("{field} list is not a list"))),
        };
        let next = got.link.as_deref().and_then(next_page);
        let last = fresh.last().cloned();
        items.extend(fresh);
        match (next, last) {
            (Some(n), Some(last)) if page.last.as_ref() != Some(&last) => {
                page = TagsPage {
                    n: n.n,
                    last: Some(n.last.unwrap_or(last)),
                };
            }
            _ => return Ok(items),
        }
    }
    Ok(items)
}

/// Why a glob could not be expanded, for the operator.
fn catalog_refused(ctx: &JobCtx<'_>, e: &TagError) -> String {
    match e {
        TagError::Upstream(UpstreamError::NotFound | UpstreamError::Denied) => format!(
            "repository globs need the upstream's _catalog, and {} does not serve it to \
             Outpost ({e}); list the repositories explicitly",
            ctx.upstream.name()
        ),
        _ => format!("reading the upstream's _catalog for a repository glob: {e}"),
    }
}

/// The repositories of `catalog` that `glob` matches (`*` within a path segment, `**`
/// across segments).
fn glob_matches(glob: &str, catalog: &[String]) -> Vec<RepoName> {
    let Ok(matcher) = globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
    else {
        return Vec::new();
    };
    catalog
        .iter()
        .filter(|r| matcher.is_match(r.as_str()))
        .filter_map(|r| r.parse().ok())
        .collect()
}

/// The manifests a referrers index (or an image index) lists.
fn index_children(body: &[u8]) -> Result<Vec<Digest>, TagError> {
    #[derive(Deserialize)]
    struct Index {
        #[serde(default)]
        manifests: Vec<Descriptor>,
    }
    #[derive(Deserialize)]
    struct Descriptor {
        digest: String,
    }
    let index: Index = serde_json::from_slice(body)
        .map_err(|e| TagError::Invalid(format!("referrers index: {e}")))?;
    index
        .manifests
        .into_iter()
        .map(|d| {
            d.digest
                .parse()
                .map_err(|_| TagError::Invalid(format!("referrers index names {:?}", d.digest)))
        })
        .collect()
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

    /// Stores tag `v1` of `central.corp/team/app` (an image of one config blob) as
    /// mirrored and pinned by job `job`; returns the repository.
    async fn pinned_by(store: &Store, job: &str) -> RepoName {
        let repo: RepoName = "central.corp/team/app".parse().expect("repo");
        let config = Bytes::from_static(b"{\"architecture\":\"amd64\"}");
        let digest = Digest::sha256_of(&config);
        let mut writer = store.blob_writer(digest.algorithm()).await.expect("writer");
        writer.write(vec![config.clone()]).await.expect("write");
        let verified = writer.verify(&digest).await.expect("verify");
        verified
            .commit(&repo, LinkOrigin::Mirror)
            .await
            .expect("commit");
        let body = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
             \"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\
             \"digest\":\"{digest}\",\"size\":{}}},\"layers\":[]}}",
            config.len()
        );
        let manifest = Manifest::parse(body.as_bytes(), None).expect("manifest");
        let top = Digest::sha256_of(body.as_bytes());
        store
            .flip_mirrored_tag(
                job,
                FetchedManifest {
                    repo: repo.clone(),
                    digest: top.clone(),
                    body: Bytes::from(body),
                    manifest,
                    tag: Some(("v1".parse().expect("tag"), AcceptClass::Any)),
                },
                Vec::new(),
                MirroredTag {
                    digest: top.to_string(),
                    manifests: vec![top.to_string()],
                    tags: Vec::new(),
                },
            )
            .await
            .expect("flip");
        assert_eq!(store.evict(0).await.expect("evict").evicted_blobs, 0);
        repo
    }

    /// Regression guard: a job removed from the configuration kept its pins forever.
    /// The next run (or daemon start) releases them: the tag stays, its blob is evictable.
    #[tokio::test]
    async fn a_job_removed_from_the_configuration_releases_its_pins() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path(), 1 << 20).expect("store");
        let repo = pinned_by(&store, "gone").await;

        let config = crate::config::Config::from_toml(
            "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\n[storage]\npath=\"x\"\n",
        )
        .expect("config");
        let upstreams = Upstreams::new(&config).expect("upstreams");
        let mirror = Mirror::new(
            store.clone(),
            upstreams,
            Vec::new(),
            Arc::new(Metrics::new()),
            None,
        );
        mirror.release_removed_jobs().await;
        assert!(store.mirror_holders().await.expect("holders").is_empty());
        let tag = Reference::Tag("v1".parse().expect("tag"));
        assert!(
            store
                .get_manifest(&repo, &tag)
                .await
                .expect("get")
                .is_some(),
            "still served"
        );
        assert_eq!(
            store.evict(0).await.expect("evict").evicted_blobs,
            1,
            "no longer pinned"
        );
    }

    /// Regression: a reload released the pins of removed jobs only as it applied, so a
    /// run of a removed job still in progress then pinned what it mirrored until the
    /// next reload or start. The run's end releases them.
    #[tokio::test]
    async fn a_run_of_a_job_removed_while_it_ran_releases_its_pins_when_it_ends() {
        use crate::upstream::testserver::{Seen, TestServer, respond};

        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let asked = Arc::new(tokio::sync::Notify::new());
        let (gate, told) = (release.clone(), asked.clone());
        // The central registry holds the run's first request until the test lets it go.
        let server = TestServer::start(move |_: Seen| {
            let (gate, told) = (gate.clone(), told.clone());
            async move {
                told.notify_one();
                drop(gate.acquire().await);
                respond(503, &[], "down")
            }
        })
        .await;
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(dir.path(), 1 << 20).expect("store");
        pinned_by(&store, "nightly").await;
        let config = crate::config::Config::from_toml(&format!(
            "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\n[storage]\npath=\"x\"\n\
             [[upstream]]\nname=\"central.corp\"\nurl=\"{}\"\n\
             [[mirror]]\nname=\"nightly\"\nupstream=\"central.corp\"\n\
             repositories=[\"team/app\"]\ntags=[\"v*\"]\n",
            server.url()
        ))
        .expect("config");
        let upstreams = Upstreams::new(&config).expect("upstreams");
        let mirror = Mirror::new(
            store.clone(),
            upstreams,
            config.mirrors.clone(),
            Arc::new(Metrics::new()),
            None,
        );
        let run = {
            let mirror = mirror.clone();
            tokio::spawn(async move { mirror.run(&["nightly".to_owned()], None).await })
        };
        asked.notified().await;
        mirror.set_jobs(Vec::new());
        release.add_permits(1_000);
        let reports = run.await.expect("run task").expect("ran");
        assert!(!reports[0].ok(), "the registry answered 503");
        assert!(
            store.mirror_holders().await.expect("holders").is_empty(),
            "the removed job's pins were released when its run ended"
        );
        assert_eq!(store.evict(0).await.expect("evict").evicted_blobs, 1);
        server.stop().await;
    }

    #[test]
    fn next_pages_come_from_the_link_header() {
        let page = next_page(r#"</v2/team/app/tags/list?n=2&last=v1.0%2B1>; rel="next""#)
            .expect("a next page");
        assert_eq!(page.n, Some(2));
        assert_eq!(page.last.as_deref(), Some("v1.0+1"));
        assert!(next_page("garbage").is_none());
    }
}
