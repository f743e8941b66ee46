//! Pull-through caching: answers manifest and blob requests for upstream
//! repositories from the store when it can, from the upstream when it must, and from the
//! last known answer when the upstream is down.
//!
//! - Manifests by digest are immutable: once stored they never need the upstream again.
//! - A tag answer is trusted for the upstream's `tag_ttl`, then revalidated with a HEAD.
//!   A client waits at most `revalidate_wait` for that; past it, or if the upstream is
//!   down, lying or rate-limiting, the last known answer is served (stale). Only an
//!   upstream saying the tag is gone ends it. Recently confirmed tags are also kept in
//!   memory (`fresh`), so a fresh tag costs no store lookup.
//! - Every upstream fetch is coalesced: one per tag, manifest or blob however many
//!   clients ask at once. Blobs stream to every client as they arrive (`flight`).
//! - A blob is served through repository R only if R's link to it exists or the
//!   upstream confirms R has it; bytes on disk because of another repository are not
//!   enough.
//! - Tag lists and referrers pass through from the upstream; while it is out (down,
//!   failing, rate-limiting), what is stored here is served instead (stale).
//! - Every answer is counted here (`outpost_cache_*`, per upstream), and a manifest the
//!   central registry served to Outpost's anonymous client teaches the central login
//!   service that the repository is anonymous there (a background task, tracked and
//!   waited for by [`PullThrough::close`]).
//!
//! This module knows nothing of HTTP; the `http` layer maps its answers and errors.

mod flight;
mod fresh;
mod singleflight;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::auth::central::CentralAuth;
use crate::clock::Clock;
use crate::metrics::{Metrics, UpstreamLabels};
use crate::oci::manifest::{DOCKER_LIST, DOCKER_MANIFEST, Manifest, OCI_INDEX, OCI_MANIFEST};
use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::storage::{
    AcceptClass, BlobHandle, FetchedManifest, ReferrerRecord, StorageError, Store, StoredManifest,
};
use crate::upstream::{
    BreakerState, TagsPage, Upstream, UpstreamError, UpstreamHandle, UpstreamReferrers,
    UpstreamTags, Upstreams,
};
pub use flight::Follower;
use flight::{Fetch, Flights};
use fresh::FreshTags;
use singleflight::Singleflight;

/// Why a pull-through request could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// What the upstream answered or why it could not be asked.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The upstream's content failed verification; nothing was stored.
    #[error("upstream sent invalid content: {0}")]
    Invalid(String),
    #[error(transparent)]
    Storage(Arc<StorageError>),
    /// The upstream fetch this request waited for died without an answer (it panicked
    /// or was cancelled); the next request starts a new one.
    #[error("the upstream fetch was abandoned")]
    Abandoned,
    /// The manifest is an image of a stored index that was mirrored without it (the
    /// job's platforms left it out), and the upstream cannot be asked.
    #[error(
        "the {platform} image of this index is not mirrored here (the mirror job's \
         platforms leave it out) and the upstream is unreachable"
    )]
    PlatformLeftOut { platform: String },
}

impl CacheError {
    fn is_gone(&self) -> bool {
        matches!(self, CacheError::Upstream(UpstreamError::NotFound))
    }

    /// The upstream cannot answer now (down, failing, rate-limiting, breaker open).
    fn is_outage(&self) -> bool {
        matches!(self, CacheError::Upstream(e) if e.is_outage())
    }
}

impl From<StorageError> for CacheError {
    fn from(e: StorageError) -> CacheError {
        CacheError::Storage(Arc::new(e))
    }
}

/// How a manifest answer was obtained (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// From the store, fresh.
    Hit,
    /// The upstream confirmed the stored answer (or gave a new one) just now.
    Revalidated,
    /// From the upstream, first time.
    Fetched,
    /// From the store although due for revalidation: the upstream could not confirm.
    Stale,
}

/// A manifest ready to serve.
pub struct ManifestAnswer {
    pub manifest: StoredManifest,
    pub source: Source,
    /// Whether this request joined an upstream fetch another request started.
    pub coalesced: bool,
}

/// A page of a tag list.
#[derive(Debug)]
pub enum TagsAnswer {
    /// The upstream's page, its `Link` rewritten to name our canonical path.
    Upstream(UpstreamTags),
    /// The upstream is out: every tag stored here, sorted (the caller pages through them
    /// as through a hosted repository's).
    Stored(Vec<String>),
}

/// The referrers of a manifest.
#[derive(Debug)]
pub enum ReferrersAnswer {
    /// The upstream's referrers index, passed through.
    Upstream(UpstreamReferrers),
    /// The upstream is out: the referrers stored here, filtered by artifact type.
    Stored(Vec<ReferrerRecord>),
}

/// A blob ready to serve.
pub enum BlobAnswer {
    /// Stored and linked to the repository.
    Stored(BlobHandle),
    /// Being downloaded; stream it as it arrives.
    Streaming(Follower),
    /// Not stored; the upstream says it has it (answer to HEAD without downloading).
    Remote { size: u64 },
}

/// An upstream repository a request is for.
pub struct Target<'a> {
    pub upstream: &'a UpstreamHandle,
    /// The name at the upstream (`library/alpine`).
    pub remote: &'a RepoName,
    /// The local, canonical name (`docker.io/library/alpine`).
    pub canonical: &'a RepoName,
}

type TagKey = (String, String, AcceptClass);
type ManifestResult = Result<StoredManifest, CacheError>;

/// The pull-through cache over every configured upstream.
pub struct PullThrough {
    store: Store,
    upstreams: Upstreams,
    tags: Arc<Singleflight<TagKey, ManifestResult>>,
    fresh: FreshTags,
    manifests: Arc<Singleflight<(String, String), ManifestResult>>,
    blobs: Arc<Flights>,
    /// Notified whenever a download is committed.
    committed: Arc<tokio::sync::Notify>,
    metrics: Arc<Metrics>,
    /// The central login service: it learns which repositories the central registry
    /// serves to anyone, from what it serves Outpost's client without credentials.
    learner: Option<Arc<CentralAuth>>,
    /// Background work started by requests (central learning); waited for on close.
    tasks: TaskTracker,
    /// The time tag answers are judged fresh at.
    clock: Clock,
    /// The upstreams whose health gauges the last scrape set.
    exported: std::sync::Mutex<Vec<String>>,
}

/// Every manifest media type, index types first: what we ask upstreams for on behalf of
/// clients that accept indexes.
/// An upstream nobody has asked anything for this long is probed (`GET /v2/`) at the
/// next upkeep, so its `outpost_upstream_up` stays true to life.
const PROBE_AFTER: Duration = Duration::from_secs(60);

pub(crate) const ACCEPT_ANY: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Which answers a client's `Accept` header admits, and what to ask the upstream with.
/// Clients that accept an index (or say nothing) get whatever the tag points to; the
/// rare client that only takes single manifests is asked for with its own list.
pub fn accept_class(accept: Option<&str>) -> (AcceptClass, String) {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return (AcceptClass::Any, ACCEPT_ANY.to_owned());
    };
    let types: Vec<&str> = accept
        .split(',')
        .map(|t| t.split(';').next().unwrap_or("").trim())
        .collect();
    if types
        .iter()
        .any(|t| matches!(*t, "*/*" | OCI_INDEX | DOCKER_LIST))
    {
        return (AcceptClass::Any, ACCEPT_ANY.to_owned());
    }
    let single: Vec<&str> = types
        .into_iter()
        .filter(|t| matches!(*t, OCI_MANIFEST | DOCKER_MANIFEST))
        .collect();
    if single.is_empty() {
        return (AcceptClass::Any, ACCEPT_ANY.to_owned());
    }
    (AcceptClass::SingleOnly, single.join(", "))
}

/// What a detached fetch task needs.
#[derive(Clone)]
struct FetchCtx {
    store: Store,
    client: Upstream,
    remote: RepoName,
    canonical: RepoName,
}

impl PullThrough {
    /// The pull-through cache over `upstreams`, storing into `store`. `central`, the
    /// central login service, learns from what its upstream serves Outpost anonymously.
    pub fn new(
        store: Store,
        upstreams: Upstreams,
        metrics: Arc<Metrics>,
        central: Option<Arc<CentralAuth>>,
    ) -> PullThrough {
        PullThrough {
            store,
            upstreams,
            tags: Arc::default(),
            fresh: FreshTags::default(),
            manifests: Arc::default(),
            blobs: Arc::default(),
            committed: Arc::default(),
            metrics,
            learner: central,
            tasks: TaskTracker::new(),
            clock: Clock::new(),
            exported: std::sync::Mutex::default(),
        }
    }

    /// Waits for background work started by requests: downloads still committing, and
    /// central learning. Call once no more requests come.
    pub async fn close(&self) {
        self.blobs.close().await;
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The upstreams this pull-through serves (where requested repositories resolve).
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    fn ctx(&self, t: &Target<'_>) -> FetchCtx {
        FetchCtx {
            store: self.store.clone(),
            client: t.upstream.client().clone(),
            remote: t.remote.clone(),
            canonical: t.canonical.clone(),
        }
    }

    /// The manifest `reference` names in the target repository.
    pub async fn manifest(
        &self,
        t: &Target<'_>,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<ManifestAnswer, CacheError> {
        let answer = match reference {
            Reference::Digest(d) => self.manifest_by_digest(t, d).await,
            Reference::Tag(tag) => self.manifest_by_tag(t, tag, accept).await,
        };
        let upstream = t.upstream.name();
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                self.metrics.cache_result(upstream, "manifest", "error");
                return Err(e);
            }
        };
        let result = match answer.source {
            Source::Hit => "hit",
            Source::Fetched => "miss",
            Source::Revalidated => "revalidated",
            Source::Stale => "stale",
        };
        self.metrics.cache_result(upstream, "manifest", result);
        if answer.coalesced {
            self.metrics.coalesced(upstream);
        }
        // Only the request whose own client fetched may teach: one that joined another's
        // fetch may hold a different client (a reload between them changes credentials).
        if !answer.coalesced && matches!(answer.source, Source::Fetched | Source::Revalidated) {
            self.learn_anonymous(t);
        }
        Ok(answer)
    }

    /// The upstream just answered Outpost's request without credentials of Outpost's own.
    /// If it is the central registry, the repository is served anonymously there: the
    /// central login service remembers it (off the response path) so that anonymous
    /// pulls of it keep working while the central registry is unreachable.
    fn learn_anonymous(&self, t: &Target<'_>) {
        // Judged by the client that asked: a reload may give the upstream credentials.
        if let Some(central) = &self.learner
            && central.is_central(t.upstream.name())
            && !t.upstream.client().has_credentials()
        {
            let (central, remote) = (central.clone(), t.remote.clone());
            self.tasks
                .spawn(async move { central.learn_anonymous(&remote).await });
        }
    }

    async fn manifest_by_digest(
        &self,
        t: &Target<'_>,
        digest: &Digest,
    ) -> Result<ManifestAnswer, CacheError> {
        let reference = Reference::Digest(digest.clone());
        if let Some(manifest) = self.store.get_manifest(t.canonical, &reference).await? {
            return Ok(ManifestAnswer {
                manifest,
                source: Source::Hit,
                coalesced: false,
            });
        }
        let ctx = self.ctx(t);
        let key = (t.canonical.to_string(), digest.to_string());
        let waiter = self.manifests.join(key, move || async move {
            fetch_manifest(&ctx, &reference, ACCEPT_ANY, None).await
        });
        let coalesced = waiter.joined;
        let manifest = match waiter.wait().await.unwrap_or(Err(CacheError::Abandoned)) {
            Ok(m) => m,
            Err(e) if e.is_outage() => {
                return Err(
                    match self.store.left_out_platform(t.canonical, digest).await? {
                        Some(platform) => CacheError::PlatformLeftOut { platform },
                        None => e,
                    },
                );
            }
            Err(e) => return Err(e),
        };
        Ok(ManifestAnswer {
            manifest,
            source: Source::Fetched,
            coalesced,
        })
    }

    async fn manifest_by_tag(
        &self,
        t: &Target<'_>,
        tag: &Tag,
        accept: Option<&str>,
    ) -> Result<ManifestAnswer, CacheError> {
        let (class, upstream_accept) = accept_class(accept);
        let ctx = self.ctx(t);
        let key = (t.canonical.to_string(), tag.to_string(), class);
        let ttl = t.upstream.tag_ttl().as_secs();
        if let Some(manifest) = self.fresh.get(&key, ttl, self.clock.now_secs()) {
            return Ok(ManifestAnswer {
                manifest,
                source: Source::Hit,
                coalesced: false,
            });
        }
        let known = self.store.tag_freshness(t.canonical, tag, class).await?;
        let stored = match &known {
            Some(f) => {
                self.store
                    .get_manifest(t.canonical, &Reference::Digest(f.digest.clone()))
                    .await?
            }
            None => None,
        };
        if let (Some(f), Some(manifest)) = (&known, &stored)
            && self.clock.now_secs() < f.validated_at.saturating_add(ttl)
        {
            self.fresh.put(key, manifest.clone(), f.validated_at);
            return Ok(ManifestAnswer {
                manifest: manifest.clone(),
                source: Source::Hit,
                coalesced: false,
            });
        }
        let known_digest = stored.as_ref().map(|m| m.digest.clone());
        let accepted = upstream_accept.clone();
        let asked = tag.clone();
        let waiter = self.tags.join(key.clone(), move || async move {
            resolve_tag(&ctx, &asked, class, &upstream_accept, known_digest).await
        });
        let coalesced = waiter.joined;
        let Some(stale) = stored else {
            let manifest = match waiter.wait().await.unwrap_or(Err(CacheError::Abandoned)) {
                Ok(m) => m,
                Err(e) if e.is_outage() => {
                    // Nothing stored for clients like this one, but maybe for others:
                    // serve that answer if this client accepts its media type.
                    let other = self.other_class_answer(t, tag, class, &accepted).await?;
                    let Some(manifest) = other else {
                        return Err(e);
                    };
                    tracing::info!(
                        upstream = t.upstream.name(),
                        repo = %t.canonical,
                        error = %e,
                        "serving the stale answer stored for other clients' Accept"
                    );
                    return Ok(ManifestAnswer {
                        manifest,
                        source: Source::Stale,
                        coalesced,
                    });
                }
                Err(e) => return Err(e),
            };
            self.fresh.put(key, manifest.clone(), self.clock.now_secs());
            return Ok(ManifestAnswer {
                manifest,
                source: Source::Fetched,
                coalesced,
            });
        };
        // While the upstream is known to hang, stale answers go out at once; the
        // revalidation still runs, and its answer clears the mark.
        let client = t.upstream.client();
        let wait = if client.is_slow() {
            Duration::ZERO
        } else {
            t.upstream.revalidate_wait()
        };
        let outcome = tokio::time::timeout(wait, waiter.wait()).await;
        match outcome {
            Ok(Some(Ok(manifest))) => {
                self.fresh.put(key, manifest.clone(), self.clock.now_secs());
                Ok(ManifestAnswer {
                    manifest,
                    source: Source::Revalidated,
                    coalesced,
                })
            }
            Ok(Some(Err(e))) if e.is_gone() => {
                self.fresh.forget(&key);
                Err(e)
            }
            Ok(Some(Err(e))) => {
                tracing::info!(
                    upstream = t.upstream.name(),
                    repo = %t.canonical,
                    error = %e,
                    "serving stale tag"
                );
                Ok(ManifestAnswer {
                    manifest: stale,
                    source: Source::Stale,
                    coalesced,
                })
            }
            Ok(None) | Err(_) => {
                if !client.is_slow() {
                    client.mark_slow();
                    tracing::warn!(
                        upstream = t.upstream.name(),
                        "the upstream did not answer a revalidation in time: serving stale \
                         tags at once until it answers again"
                    );
                }
                tracing::info!(
                    upstream = t.upstream.name(),
                    repo = %t.canonical,
                    "tag revalidation is slow; serving stale tag"
                );
                Ok(ManifestAnswer {
                    manifest: stale,
                    source: Source::Stale,
                    coalesced,
                })
            }
        }
    }

    /// The answer stored for `tag` for the other accept class, if its media type is one
    /// this client accepts (`accepted`: the list asked of the upstream for its class).
    async fn other_class_answer(
        &self,
        t: &Target<'_>,
        tag: &Tag,
        class: AcceptClass,
        accepted: &str,
    ) -> Result<Option<StoredManifest>, CacheError> {
        let other = match class {
            AcceptClass::Any => AcceptClass::SingleOnly,
            AcceptClass::SingleOnly => AcceptClass::Any,
        };
        let Some(f) = self.store.tag_freshness(t.canonical, tag, other).await? else {
            return Ok(None);
        };
        let manifest = self
            .store
            .get_manifest(t.canonical, &Reference::Digest(f.digest))
            .await?;
        Ok(manifest.filter(|m| {
            class == AcceptClass::Any || accepted.split(", ").any(|a| a == m.media_type)
        }))
    }

    /// The blob `digest` of the target repository. With `head`, a blob that is not
    /// stored is only asked about, not downloaded.
    pub async fn blob(
        &self,
        t: &Target<'_>,
        digest: &Digest,
        head: bool,
    ) -> Result<BlobAnswer, CacheError> {
        let upstream = t.upstream.name();
        let answer = match self.find_blob(t, digest, head).await {
            Ok(a) => a,
            Err(e) => {
                self.metrics.cache_result(upstream, "blob", "error");
                return Err(e);
            }
        };
        let (result, source, size) = match &answer {
            BlobAnswer::Stored(b) => ("hit", "cache", Some(b.size)),
            BlobAnswer::Remote { .. } => ("miss", "upstream", None),
            BlobAnswer::Streaming(f) => ("miss", "upstream", f.size),
        };
        self.metrics.cache_result(upstream, "blob", result);
        if let (false, Some(size)) = (head, size) {
            self.metrics.served_bytes(upstream, source, size);
        }
        if let BlobAnswer::Streaming(f) = &answer
            && f.joined
        {
            self.metrics.coalesced(upstream);
        }
        Ok(answer)
    }

    async fn find_blob(
        &self,
        t: &Target<'_>,
        digest: &Digest,
        head: bool,
    ) -> Result<BlobAnswer, CacheError> {
        if let Some(handle) = self.store.open_blob(t.canonical, digest).await? {
            return Ok(BlobAnswer::Stored(handle));
        }
        let ctx = self.ctx(t);
        self.blobs.settle(digest).await;
        // Look again: a download for this repository may have committed between the
        // first look and the settling (regression: the blob was then asked of the
        // upstream, which, offline, failed a pull of a blob just served).
        if let Some(handle) = self.store.open_blob(t.canonical, digest).await? {
            return Ok(BlobAnswer::Stored(handle));
        }
        if self.store.stored_blob_size(digest).await?.is_some() {
            // Stored for another repository: serve it here only once the upstream
            // confirms this repository has it.
            ctx.client.head_blob(t.remote, digest).await?;
            if self.store.link_confirmed(t.canonical, digest).await?
                && let Some(handle) = self.store.open_blob(t.canonical, digest).await?
            {
                return Ok(BlobAnswer::Stored(handle));
            }
        }
        if head {
            let size = ctx.client.head_blob(t.remote, digest).await?;
            return Ok(BlobAnswer::Remote { size });
        }
        let follower = self
            .blobs
            .follow(Fetch {
                store: ctx.store,
                upstream: ctx.client,
                remote: ctx.remote,
                canonical: ctx.canonical,
                digest: digest.clone(),
                committed: self.committed.clone(),
            })
            .await?;
        Ok(BlobAnswer::Streaming(follower))
    }

    /// Sets the per-upstream health gauges (called when metrics are scraped).
    pub fn export_health(&self, metrics: &Metrics) {
        let upstreams = self.upstreams.all();
        // Only upstreams configured now have series (a reload may have removed one).
        let mut exported = self
            .exported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for gone in exported
            .iter()
            .filter(|n| !upstreams.iter().any(|u| u.name() == n.as_str()))
        {
            let label = UpstreamLabels {
                upstream: gone.clone(),
            };
            metrics.upstream_up.remove(&label);
            metrics.ratelimit_remaining.remove(&label);
        }
        *exported = upstreams.iter().map(|u| u.name().to_owned()).collect();
        drop(exported);
        for u in upstreams {
            let label = UpstreamLabels {
                upstream: u.name().to_owned(),
            };
            let health = u.client().health();
            let up = i64::from(
                health.breaker == BreakerState::Closed
                    && health.reachable != Some(false)
                    && !u.client().is_slow(),
            );
            metrics.upstream_up.get_or_create(&label).set(up);
            if let Some(remaining) = health.rate_limit_remaining {
                let remaining = i64::try_from(remaining).unwrap_or(i64::MAX);
                metrics
                    .ratelimit_remaining
                    .get_or_create(&label)
                    .set(remaining);
            }
        }
    }

    /// Probes each upstream nobody asked anything for [`PROBE_AFTER`], so that
    /// `outpost_upstream_up` says whether it is reachable now, not when it last was.
    async fn probe_idle_upstreams(&self) {
        for u in self.upstreams.all() {
            let client = u.client();
            if client
                .idle_secs()
                .is_none_or(|idle| idle >= PROBE_AFTER.as_secs())
            {
                client.probe().await;
            }
        }
    }

    /// Background upkeep until `shutdown`: probes idle upstreams (at start too, so that
    /// `outpost_upstream_up` is true from the first minute), flushes blob access times,
    /// and with a size budget evicts least-recently-used upstream content after downloads
    /// and at least every `interval`.
    pub async fn maintain(
        &self,
        budget: Option<u64>,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            // A hung upstream's probe never holds up a stop.
            tokio::select! {
                () = self.probe_idle_upstreams() => {}
                () = shutdown.cancelled() => {}
            }
            let stopping = tokio::select! {
                _ = self.committed.notified() => false,
                _ = tokio::time::sleep(interval) => false,
                _ = shutdown.cancelled() => true,
            };
            if let Err(e) = self.store.flush_access().await {
                tracing::warn!(error = %e, "flushing blob access times failed");
            }
            if stopping {
                return;
            }
            if let Some(budget) = budget {
                match self.store.evict(budget).await {
                    Ok(r) if r.evicted_blobs > 0 => {
                        self.metrics.evicted_blobs.inc_by(r.evicted_blobs);
                        self.metrics.evicted_bytes.inc_by(r.evicted_bytes);
                        let left = r.stored_bytes - r.evicted_bytes;
                        self.metrics
                            .stored_bytes
                            .set(i64::try_from(left).unwrap_or(i64::MAX));
                        tracing::info!(
                            evicted_blobs = r.evicted_blobs,
                            evicted_bytes = r.evicted_bytes,
                            stored_bytes = r.stored_bytes - r.evicted_bytes,
                            budget,
                            "evicted least recently used upstream blobs"
                        );
                    }
                    Ok(r) => {
                        self.metrics
                            .stored_bytes
                            .set(i64::try_from(r.stored_bytes).unwrap_or(i64::MAX));
                    }
                    Err(e) => tracing::warn!(error = %e, "eviction failed"),
                }
            }
        }
    }

    /// A page of the target repository's tag list: the upstream's, or while it is out,
    /// the tags stored here. A repository the upstream does not know is unknown, and so is
    /// one it cannot answer for that has nothing stored here.
    pub async fn tags(&self, t: &Target<'_>, page: &TagsPage) -> Result<TagsAnswer, CacheError> {
        let answer = match t.upstream.client().tags(t.remote, page).await {
            Ok(mut tags) => {
                // The upstream's link names its own path; ours works with any client.
                tags.link = tags.link.map(|link| {
                    link.replace(
                        &format!("/v2/{}/", t.remote),
                        &format!("/v2/{}/", t.canonical),
                    )
                });
                Ok(TagsAnswer::Upstream(tags))
            }
            Err(e) if e.is_outage() => match self.store.tags(t.canonical).await {
                Ok(Some(stored)) => {
                    tracing::info!(
                        upstream = t.upstream.name(),
                        repo = %t.canonical,
                        error = %e,
                        "serving stored tags"
                    );
                    Ok(TagsAnswer::Stored(stored))
                }
                // Nothing of it stored here either: unknown, as a hosted repository would be.
                Ok(None) => Err(UpstreamError::NotFound.into()),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        };
        self.count_document(t, "tags", &answer, |a| matches!(a, TagsAnswer::Stored(_)));
        answer
    }

    /// The referrers of `digest` in the target repository: the upstream's, or while it is
    /// out, the ones stored here. An upstream without the referrers API answers
    /// `NotFound`, which the caller passes on (clients then use the tag schema).
    pub async fn referrers(
        &self,
        t: &Target<'_>,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ReferrersAnswer, CacheError> {
        let client = t.upstream.client();
        let answer = match client.referrers(t.remote, digest, artifact_type).await {
            Ok(referrers) => Ok(ReferrersAnswer::Upstream(referrers)),
            Err(e) if e.is_outage() => match self.store.referrers(t.canonical, digest).await {
                Ok(all) => {
                    tracing::info!(
                        upstream = t.upstream.name(),
                        repo = %t.canonical,
                        error = %e,
                        "serving stored referrers"
                    );
                    let wanted = |r: &ReferrerRecord| {
                        artifact_type.is_none_or(|a| r.artifact_type.as_deref() == Some(a))
                    };
                    Ok(ReferrersAnswer::Stored(
                        all.into_iter().filter(wanted).collect(),
                    ))
                }
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        };
        self.count_document(t, "referrers", &answer, |a| {
            matches!(a, ReferrersAnswer::Stored(_))
        });
        answer
    }

    /// Counts a tag list or referrers answer: passed through (`miss`), stored (`stale`)
    /// or failed.
    fn count_document<A>(
        &self,
        t: &Target<'_>,
        kind: &'static str,
        answer: &Result<A, CacheError>,
        stored: impl Fn(&A) -> bool,
    ) {
        let result = match answer {
            Ok(a) if stored(a) => "stale",
            Ok(_) => "miss",
            Err(_) => "error",
        };
        self.metrics.cache_result(t.upstream.name(), kind, result);
    }
}

/// Asks the upstream what `tag` points to now. With a `known` digest, a HEAD that
/// confirms it is enough.
async fn resolve_tag(
    ctx: &FetchCtx,
    tag: &Tag,
    class: AcceptClass,
    accept: &str,
    known: Option<Digest>,
) -> ManifestResult {
    let reference = Reference::Tag(tag.clone());
    if let Some(known) = known {
        match ctx
            .client
            .manifest(&ctx.remote, &reference, accept, true)
            .await
        {
            Ok(head) if head.digest.as_ref() == Some(&known) => {
                ctx.store
                    .confirm_tag(&ctx.canonical, tag, class, &known)
                    .await?;
                if let Some(m) = ctx
                    .store
                    .get_manifest(&ctx.canonical, &Reference::Digest(known))
                    .await?
                {
                    return Ok(m);
                }
            }
            Ok(_) => {}
            Err(UpstreamError::NotFound) => {
                ctx.store.forget_upstream_tag(&ctx.canonical, tag).await?;
                return Err(UpstreamError::NotFound.into());
            }
            Err(e) => return Err(e.into()),
        }
    }
    let result = fetch_manifest(ctx, &reference, accept, Some((tag.clone(), class))).await;
    if let Err(e) = &result
        && e.is_gone()
    {
        ctx.store.forget_upstream_tag(&ctx.canonical, tag).await?;
    }
    result
}

/// GETs a manifest, verifies it against the digest asked for or announced, and stores it.
async fn fetch_manifest(
    ctx: &FetchCtx,
    reference: &Reference,
    accept: &str,
    tag: Option<(Tag, AcceptClass)>,
) -> ManifestResult {
    let resp = ctx
        .client
        .manifest(&ctx.remote, reference, accept, false)
        .await?;
    let body = resp.body;
    let digest = match (reference, &resp.digest) {
        (Reference::Digest(d), _) => {
            let actual = Digest::of(d.algorithm(), &body);
            if &actual != d {
                return Err(CacheError::Invalid(format!(
                    "manifest {d} has digest {actual}"
                )));
            }
            actual
        }
        (Reference::Tag(_), Some(announced)) => {
            let actual = Digest::of(announced.algorithm(), &body);
            if &actual != announced {
                return Err(CacheError::Invalid(format!(
                    "manifest announced as {announced} has digest {actual}"
                )));
            }
            actual
        }
        (Reference::Tag(_), None) => Digest::sha256_of(&body),
    };
    let manifest = Manifest::parse(&body, resp.media_type.as_deref())
        .or_else(|_| Manifest::parse(&body, None))
        .map_err(|e| CacheError::Invalid(format!("manifest {digest}: {e}")))?;
    let stored = StoredManifest {
        digest: digest.clone(),
        media_type: manifest.media_type.clone(),
        body: body.clone(),
    };
    ctx.store
        .put_fetched_manifest(FetchedManifest {
            repo: ctx.canonical.clone(),
            digest,
            body,
            manifest,
            tag,
        })
        .await?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use bytes::Bytes;

    use super::*;
    use crate::config::Config;
    use crate::upstream::testserver::{Seen, TestServer, respond};

    #[test]
    fn accept_classes() {
        assert_eq!(accept_class(None).0, AcceptClass::Any);
        assert_eq!(accept_class(Some("*/*")).0, AcceptClass::Any);
        let containerd = "application/vnd.docker.distribution.manifest.v2+json, \
            application/vnd.docker.distribution.manifest.list.v2+json, \
            application/vnd.oci.image.manifest.v1+json, \
            application/vnd.oci.image.index.v1+json, */*";
        assert_eq!(accept_class(Some(containerd)).0, AcceptClass::Any);
        let (class, up) = accept_class(Some(
            "application/vnd.docker.distribution.manifest.v2+json; q=0.9",
        ));
        assert_eq!(class, AcceptClass::SingleOnly);
        assert_eq!(up, DOCKER_MANIFEST);
        assert_eq!(accept_class(Some("text/html")).0, AcceptClass::Any);
    }

    const SBOM: &str = "application/vnd.example.sbom";

    /// An image manifest and an SBOM whose subject it is, as an upstream serves them.
    fn manifests() -> (Bytes, Bytes) {
        let config = Digest::sha256_of(b"{}");
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[]}}"#
        );
        let subject = Digest::sha256_of(image.as_bytes());
        let sbom = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{SBOM}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config}","size":2}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{subject}","size":{}}}}}"#,
            image.len()
        );
        (Bytes::from(image), Bytes::from(sbom))
    }

    /// A fake upstream serving repository `a/b` (tag `v1`, its SBOM, a tag list with a
    /// next page and a referrers index); while `down`, it answers 503 to everything.
    async fn upstream(down: Arc<AtomicBool>) -> TestServer {
        let (image, sbom) = manifests();
        let subject = Digest::sha256_of(&image);
        let sbom_digest = Digest::sha256_of(&sbom);
        TestServer::start(move |s: Seen| {
            let (down, image, sbom) = (down.clone(), image.clone(), sbom.clone());
            let (subject, sbom_digest) = (subject.clone(), sbom_digest.clone());
            async move {
                if down.load(Ordering::SeqCst) {
                    return respond(503, &[], "down");
                }
                let manifest = |body: Bytes| {
                    let digest = Digest::sha256_of(&body).to_string();
                    respond(
                        200,
                        &[
                            ("content-type", OCI_MANIFEST),
                            ("docker-content-digest", &digest),
                        ],
                        body,
                    )
                };
                match s.uri.as_str() {
                    "/v2/a/b/tags/list?n=1" => respond(
                        200,
                        &[
                            ("content-type", "application/json"),
                            ("link", r#"</v2/a/b/tags/list?n=1&last=v1>; rel="next""#),
                        ],
                        r#"{"name":"a/b","tags":["v1"]}"#,
                    ),
                    "/v2/a/b/manifests/v1" => manifest(image),
                    u if u == format!("/v2/a/b/manifests/{sbom_digest}") => manifest(sbom),
                    u if u.starts_with(&format!("/v2/a/b/referrers/{subject}")) => {
                        respond(200, &[("content-type", OCI_INDEX)], "{\"manifests\":[]}")
                    }
                    _ => respond(404, &[], "{}"),
                }
            }
        })
        .await
    }

    fn pull_through(url: &str, dir: &std::path::Path) -> (PullThrough, Arc<Metrics>) {
        let config = Config::from_toml(&format!(
            r#"
            [server]
            listen = ["127.0.0.1:5000"]
            public_url = "http://outpost.site:5000"
            [storage]
            path = "{}"
            [[upstream]]
            name = "up.example"
            url = "{url}"
            "#,
            dir.display()
        ))
        .expect("valid config");
        let upstreams = Upstreams::new(&config).expect("upstreams");
        let store = Store::open(dir, 1 << 20).expect("store");
        let metrics = Arc::new(Metrics::new());
        let pt = PullThrough::new(store, upstreams, metrics.clone(), None);
        (pt, metrics)
    }

    fn name(s: &str) -> RepoName {
        s.parse().expect("repo name")
    }

    fn counted(metrics: &Metrics, kind: &str, result: &str) -> bool {
        metrics.encode(true).contains(&format!(
            "outpost_cache_requests_total{{upstream=\"up.example\",kind=\"{kind}\",result=\"{result}\"}} 1"
        ))
    }

    /// Tag lists and referrers pass through while the upstream answers (the tags `Link`
    /// rewritten to our path), and are served from the store, counted stale, while it is
    /// out; a repository with nothing stored stays unknown.
    #[tokio::test]
    async fn tags_and_referrers_fall_back_to_the_store_while_the_upstream_is_out() {
        let down = Arc::new(AtomicBool::new(false));
        let server = upstream(down.clone()).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (pt, metrics) = pull_through(&server.url(), dir.path());
        let handle = pt
            .upstreams()
            .by_name("up.example")
            .expect("configured")
            .clone();
        let (remote, canonical) = (name("a/b"), name("up.example/a/b"));
        let t = Target {
            upstream: &handle,
            remote: &remote,
            canonical: &canonical,
        };
        let (image, sbom) = manifests();
        let subject = Digest::sha256_of(&image);

        let page = TagsPage {
            n: Some(1),
            last: None,
        };
        match pt.tags(&t, &page).await.expect("tags") {
            TagsAnswer::Upstream(tags) => assert_eq!(
                tags.link.as_deref(),
                Some(r#"</v2/up.example/a/b/tags/list?n=1&last=v1>; rel="next""#)
            ),
            other => panic!("expected the upstream's page, got {other:?}"),
        }
        assert!(counted(&metrics, "tags", "miss"));
        let referrers = pt.referrers(&t, &subject, None).await.expect("referrers");
        assert!(matches!(referrers, ReferrersAnswer::Upstream(_)));

        // Store the tag and the SBOM, as pulls through Outpost do.
        let v1: Reference = "v1".parse().expect("tag");
        pt.manifest(&t, &v1, None).await.expect("image");
        let sbom_ref = Reference::Digest(Digest::sha256_of(&sbom));
        pt.manifest(&t, &sbom_ref, None).await.expect("sbom");

        down.store(true, Ordering::SeqCst);
        match pt.tags(&t, &page).await.expect("stored tags") {
            TagsAnswer::Stored(tags) => assert_eq!(tags, ["v1"]),
            other => panic!("expected the stored tags, got {other:?}"),
        }
        assert!(counted(&metrics, "tags", "stale"));
        for (filter, expected) in [(None, 1), (Some(SBOM), 1), (Some("other/type"), 0)] {
            match pt.referrers(&t, &subject, filter).await.expect("stored") {
                ReferrersAnswer::Stored(r) => assert_eq!(r.len(), expected, "{filter:?}"),
                other => panic!("expected the stored referrers, got {other:?}"),
            }
        }
        let unknown = name("up.example/never/pulled");
        let remote = name("never/pulled");
        let t = Target {
            upstream: &handle,
            remote: &remote,
            canonical: &unknown,
        };
        let err = pt.tags(&t, &page).await.expect_err("nothing stored");
        assert!(err.is_gone(), "{err}");
        server.stop().await;
    }

    /// An upstream that answers "unknown" is not out: nothing stored is served instead.
    #[tokio::test]
    async fn an_upstream_404_is_passed_on_not_replaced_by_stored_tags() {
        let server = upstream(Arc::new(AtomicBool::new(false))).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (pt, metrics) = pull_through(&server.url(), dir.path());
        let handle = pt
            .upstreams()
            .by_name("up.example")
            .expect("configured")
            .clone();
        let (remote, canonical) = (name("a/b"), name("up.example/a/b"));
        let t = Target {
            upstream: &handle,
            remote: &remote,
            canonical: &canonical,
        };
        let v1: Reference = "v1".parse().expect("tag");
        pt.manifest(&t, &v1, None).await.expect("image");
        // The fake knows only `?n=1`: any other page is a 404.
        let err = pt
            .tags(&t, &TagsPage::default())
            .await
            .expect_err("unknown upstream");
        assert!(err.is_gone(), "{err}");
        assert!(counted(&metrics, "tags", "error"));
        let err = pt
            .referrers(&t, &Digest::sha256_of(b"nothing"), None)
            .await
            .expect_err("no referrers API");
        assert!(err.is_gone(), "{err}");
        server.stop().await;
    }

    /// A pull-through over the fake upstream of [`upstream`], and repository `a/b` of it.
    struct Fixture {
        down: Arc<AtomicBool>,
        server: TestServer,
        _dir: tempfile::TempDir,
        pt: PullThrough,
        upstream: UpstreamHandle,
        remote: RepoName,
        canonical: RepoName,
    }

    impl Fixture {
        async fn new() -> Fixture {
            let down = Arc::new(AtomicBool::new(false));
            let server = upstream(down.clone()).await;
            let dir = tempfile::tempdir().expect("tempdir");
            let (pt, _) = pull_through(&server.url(), dir.path());
            let upstream = pt
                .upstreams()
                .by_name("up.example")
                .expect("upstream")
                .clone();
            Fixture {
                down,
                server,
                _dir: dir,
                pt,
                upstream,
                remote: name("a/b"),
                canonical: name("up.example/a/b"),
            }
        }

        fn target(&self) -> Target<'_> {
            Target {
                upstream: &self.upstream,
                remote: &self.remote,
                canonical: &self.canonical,
            }
        }
    }

    /// A tag answer is trusted for the upstream's `tag_ttl` (no upstream request), then
    /// revalidated with one HEAD; while the upstream is out past the TTL, the last answer
    /// is served stale. Time moves under tokio's paused clock: no sleeping.
    #[tokio::test]
    async fn tag_answers_are_trusted_for_the_ttl_then_revalidated_with_head() {
        let f = Fixture::new().await;
        let (down, server, pt) = (&f.down, &f.server, &f.pt);
        let t = f.target();
        let v1 = Reference::Tag("v1".parse().expect("tag"));
        let manifest_requests = |method: &str| {
            server
                .seen()
                .iter()
                .filter(|s| s.method.as_str() == method && s.uri == "/v2/a/b/manifests/v1")
                .count()
        };
        let ask = || pt.manifest(&t, &v1, None);
        assert_eq!(ask().await.expect("first").source, Source::Fetched);
        assert_eq!(manifest_requests("GET"), 1);

        // Within the TTL (10 minutes by default): from the store, nothing asked.
        let advance = |d: Duration| async move {
            tokio::time::pause();
            tokio::time::advance(d).await;
            tokio::time::resume();
        };
        advance(Duration::from_secs(9 * 60)).await;
        assert_eq!(ask().await.expect("fresh").source, Source::Hit);
        assert_eq!(
            (manifest_requests("GET"), manifest_requests("HEAD")),
            (1, 0)
        );

        // Past it: one HEAD confirms the stored digest; no GET.
        advance(Duration::from_secs(2 * 60)).await;
        assert_eq!(ask().await.expect("due").source, Source::Revalidated);
        assert_eq!(
            (manifest_requests("GET"), manifest_requests("HEAD")),
            (1, 1)
        );
        assert_eq!(ask().await.expect("confirmed").source, Source::Hit);
        assert_eq!(manifest_requests("HEAD"), 1);

        // Past it again with the upstream out: the last answer, stale.
        down.store(true, Ordering::SeqCst);
        advance(Duration::from_secs(11 * 60)).await;
        assert_eq!(ask().await.expect("stale").source, Source::Stale);
    }

    /// Regression (issue 11): offline, a client asking only for OCI manifests got 503
    /// although the answer stored for other clients is exactly that type. Now it gets
    /// that answer, stale; a client that accepts no stored type still gets the error.
    #[tokio::test]
    async fn offline_a_stored_answer_of_an_accepted_type_serves_other_accept_headers() {
        let f = Fixture::new().await;
        let (down, pt) = (&f.down, &f.pt);
        let t = f.target();
        let v1 = Reference::Tag("v1".parse().expect("tag"));
        let first = pt.manifest(&t, &v1, None).await.expect("fetched");
        down.store(true, Ordering::SeqCst);
        let oci_only = pt
            .manifest(&t, &v1, Some(OCI_MANIFEST))
            .await
            .expect("the stored OCI manifest");
        assert_eq!(oci_only.source, Source::Stale);
        assert_eq!(oci_only.manifest.digest, first.manifest.digest);
        let docker_only = pt.manifest(&t, &v1, Some(DOCKER_MANIFEST)).await;
        assert!(
            matches!(&docker_only, Err(e) if e.is_outage()),
            "a type the client does not accept is not served"
        );
    }

    /// A pull-through service over `up.example` at `url` that is also the central
    /// registry, learning from Outpost's anonymous client; with that central login
    /// service and the upstream's (anonymous) handle.
    fn with_central(
        url: &str,
        dir: &std::path::Path,
    ) -> (PullThrough, Arc<CentralAuth>, UpstreamHandle) {
        use crate::auth::central::{CentralRules, DEFAULT_NEGATIVE_TTL};

        let (plain, metrics) = pull_through(url, dir);
        let anonymous = plain.upstreams().by_name("up.example").expect("configured");
        let rules = CentralRules {
            ttl: Duration::from_secs(60),
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            offline_grace: Duration::from_secs(3600),
        };
        let central = Arc::new(
            CentralAuth::new(
                anonymous.client().clone(),
                plain.store.clone(),
                rules,
                metrics.clone(),
            )
            .expect("central"),
        );
        let pt = PullThrough::new(
            plain.store.clone(),
            plain.upstreams().clone(),
            metrics,
            Some(central.clone()),
        );
        (pt, central, anonymous)
    }

    /// Reloads `up.example` (at `url`) with credentials, as SIGHUP does; returns its new
    /// handle.
    fn give_credentials(upstreams: &Upstreams, url: &str, dir: &std::path::Path) -> UpstreamHandle {
        let password = dir.join("password");
        std::fs::write(&password, "secret").expect("password");
        let reloaded = Config::from_toml(&format!(
            "[server]\nlisten = [\"127.0.0.1:5000\"]\npublic_url = \"http://outpost.site:5000\"\n\
             [storage]\npath = {dir:?}\n[[upstream]]\nname = \"up.example\"\nurl = \"{url}\"\n\
             username = \"site\"\npassword_file = {password:?}\n"
        ))
        .expect("valid config");
        upstreams.install(upstreams.stage(&reloaded).expect("staged"));
        let with_credentials = upstreams.by_name("up.example").expect("configured");
        assert!(with_credentials.client().has_credentials());
        with_credentials
    }

    /// A manifest the central registry serves Outpost's anonymous client teaches the
    /// central login service that the repository is anonymous there; the lesson is a
    /// tracked task that `close` waits for.
    #[tokio::test]
    async fn central_learning_is_done_when_close_returns() {
        use crate::auth::central::Puller;

        let server = upstream(Arc::new(AtomicBool::new(false))).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (pt, central, handle) = with_central(&server.url(), dir.path());
        let (remote, canonical) = (name("a/b"), name("up.example/a/b"));
        let t = Target {
            upstream: &handle,
            remote: &remote,
            canonical: &canonical,
        };
        assert!(!central.may_list(Puller::Anonymous, &remote).await);
        let v1: Reference = "v1".parse().expect("tag");
        pt.manifest(&t, &v1, None).await.expect("image");
        pt.close().await;
        assert!(central.may_list(Puller::Anonymous, &remote).await);
        server.stop().await;
    }

    /// Regression guard: whether the central upstream was fetched from anonymously was
    /// decided once, at start. After a reload gave it credentials, what Outpost's
    /// authenticated client fetched would have been learned as served to anyone.
    #[tokio::test]
    async fn a_central_upstream_given_credentials_by_a_reload_teaches_nothing_anonymous() {
        use crate::auth::central::Puller;

        let server = upstream(Arc::new(AtomicBool::new(false))).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (pt, central, _) = with_central(&server.url(), dir.path());
        let with_credentials = give_credentials(pt.upstreams(), &server.url(), dir.path());

        let (remote, canonical) = (name("a/b"), name("up.example/a/b"));
        let t = Target {
            upstream: &with_credentials,
            remote: &remote,
            canonical: &canonical,
        };
        let v1: Reference = "v1".parse().expect("tag");
        pt.manifest(&t, &v1, None).await.expect("image");
        pt.close().await;
        assert!(!central.may_list(Puller::Anonymous, &remote).await);
        server.stop().await;
    }

    /// Regression: a request that joined another's fetch taught what that fetch got.
    /// Fetches are shared by repository, not by client, so an anonymous client that
    /// joined a fetch made with credentials (a reload between the two took them away)
    /// recorded a private central repository as served to anyone.
    #[tokio::test]
    async fn a_request_joining_a_fetch_made_with_credentials_teaches_nothing_anonymous() {
        use crate::auth::central::Puller;

        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (image, _) = manifests();
        let gate = release.clone();
        let server = TestServer::start(move |s: Seen| {
            let (gate, image) = (gate.clone(), image.clone());
            async move {
                if s.uri == "/v2/" {
                    return respond(200, &[], "{}");
                }
                if s.uri != "/v2/a/b/manifests/v1" {
                    return respond(404, &[], "{}");
                }
                // Held until the test lets it go, so the second request joins.
                drop(gate.acquire().await);
                let digest = Digest::sha256_of(&image).to_string();
                respond(
                    200,
                    &[
                        ("content-type", OCI_MANIFEST),
                        ("docker-content-digest", &digest),
                    ],
                    image,
                )
            }
        })
        .await;
        let dir = tempfile::tempdir().expect("temp dir");
        let (pt, central, anonymous) = with_central(&server.url(), dir.path());
        let with_credentials = give_credentials(pt.upstreams(), &server.url(), dir.path());
        assert!(!anonymous.client().has_credentials());
        let pt = Arc::new(pt);

        let (remote, canonical) = (name("a/b"), name("up.example/a/b"));
        let v1: Reference = "v1".parse().expect("tag");
        let ask = |handle: UpstreamHandle| {
            let (pt, remote, canonical, v1) =
                (pt.clone(), remote.clone(), canonical.clone(), v1.clone());
            tokio::spawn(async move {
                let t = Target {
                    upstream: &handle,
                    remote: &remote,
                    canonical: &canonical,
                };
                pt.manifest(&t, &v1, None).await
            })
        };
        let leader = ask(with_credentials.clone());
        while server.count("/v2/a/b/manifests/v1") == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let follower = ask(anonymous.clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
        release.add_permits(1);
        let led = leader.await.expect("leader task").expect("image");
        let joined = follower.await.expect("follower task").expect("image");
        assert!(!led.coalesced);
        assert!(joined.coalesced, "the anonymous request joined the fetch");
        assert_eq!(joined.source, Source::Fetched);
        pt.close().await;
        assert!(!central.may_list(Puller::Anonymous, &remote).await);
        server.stop().await;
    }
}
