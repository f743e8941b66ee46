//! Handlers for repositories routed to an upstream: manifests, blobs, tags and
//! referrers through the pull-through cache. Pushes and deletes never get here (the
//! pipeline refuses them for upstream namespaces).

use std::sync::Arc;

use http::header;
use http::{Response, StatusCode};

use super::State;
use super::body::{self, Body, FileSender};
use super::error::ApiError;
use super::registry::{self, BlobContent, blob_response, builder, finish, hv, manifest_response};
use super::route::Page;
use crate::cache::{BlobAnswer, CacheError, Source, Target};
use crate::oci::{Digest, Reference};
use crate::upstream::{TagsPage, UpstreamError};

type Result<T> = std::result::Result<T, ApiError>;

pub async fn get_manifest(
    state: &State,
    t: &Target<'_>,
    reference: &Reference,
    head: bool,
    accept: Option<&str>,
) -> Result<Response<Body>> {
    let upstream = t.upstream.name();
    let answer = match state.cache.manifest(t, reference, accept).await {
        Ok(a) => a,
        Err(e) => {
            state.metrics.cache_result(upstream, "manifest", "error");
            return Err(manifest_error(e, reference));
        }
    };
    let result = match answer.source {
        Source::Hit => "hit",
        Source::Fetched => "miss",
        Source::Revalidated => "revalidated",
        Source::Stale => "stale",
    };
    state.metrics.cache_result(upstream, "manifest", result);
    if matches!(answer.source, Source::Fetched | Source::Revalidated) {
        learn_anonymous(state, t);
    }
    if answer.coalesced {
        state.metrics.coalesced(upstream);
    }
    manifest_response(answer.manifest, head)
}

/// The central registry just answered Outpost; if Outpost asked without credentials of
/// its own, the repository is served anonymously there: remember it (in the background,
/// off the response path) so that anonymous pulls keep working offline.
fn learn_anonymous(state: &State, t: &Target<'_>) {
    if let Some(central) = &state.central
        && central.is_central(t.upstream.id())
        && central.learns_anonymous()
    {
        let (central, remote) = (central.clone(), t.remote.clone());
        tokio::spawn(async move { central.learn_anonymous(&remote).await });
    }
}

fn manifest_error(e: CacheError, reference: &Reference) -> ApiError {
    match e {
        CacheError::Upstream(UpstreamError::NotFound) => ApiError::new(
            StatusCode::NOT_FOUND,
            crate::oci::ErrorCode::ManifestUnknown,
            format!("manifest {reference} is unknown to the upstream"),
        ),
        other => other.into(),
    }
}

pub async fn get_blob(
    state: &State,
    t: &Target<'_>,
    digest: &Digest,
    head: bool,
    range: Option<&str>,
    sender: &FileSender,
) -> Result<Response<Body>> {
    let upstream = t.upstream.name();
    let answer = match state.cache.blob(t, digest, head).await {
        Ok(a) => a,
        Err(e) => {
            state.metrics.cache_result(upstream, "blob", "error");
            return Err(match e {
                CacheError::Upstream(UpstreamError::NotFound) => ApiError::blob_unknown(),
                other => other.into(),
            });
        }
    };
    let (result, source, size) = match &answer {
        BlobAnswer::Stored(b) => ("hit", "cache", Some(b.size)),
        BlobAnswer::Remote { .. } => ("miss", "upstream", None),
        BlobAnswer::Streaming(f) => ("miss", "upstream", f.size),
    };
    state.metrics.cache_result(upstream, "blob", result);
    if let (false, Some(size)) = (head, size) {
        state.metrics.served_bytes(upstream, source, size);
    }
    if let BlobAnswer::Streaming(f) = &answer
        && f.joined
    {
        state.metrics.coalesced(upstream);
    }
    match answer {
        BlobAnswer::Stored(blob) => {
            let content = BlobContent::File(Arc::new(blob.file));
            blob_response(digest, blob.size, head, range, content, sender)
        }
        BlobAnswer::Remote { size } => {
            blob_response(digest, size, true, range, BlobContent::Empty, sender)
        }
        BlobAnswer::Streaming(follower) => match follower.size {
            Some(size) => {
                let content = BlobContent::Ranges(Box::new(move |start, len| {
                    Box::pin(follower.ranges(start, Some(len)))
                }));
                blob_response(digest, size, head, range, content, sender)
            }
            // No length announced: stream it all, chunked.
            None => finish(
                builder(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header("Docker-Content-Digest", hv(digest.as_str())?),
                sender.body(Box::pin(follower.ranges(0, None))),
            ),
        },
    }
}

/// The tag list, from the upstream; the stored tags when the upstream is down.
pub async fn tags(state: &State, t: &Target<'_>, page: &Page) -> Result<Response<Body>> {
    let upstream_page = TagsPage {
        n: page.n,
        last: page.last.clone(),
    };
    match state.cache.tags(t, &upstream_page).await {
        Ok(doc) => {
            let mut b = builder(StatusCode::OK).header(
                header::CONTENT_TYPE,
                hv(doc.content_type.as_deref().unwrap_or("application/json"))?,
            );
            if let Some(link) = doc.link {
                // The upstream's link names its own path; ours works with any client.
                let link = link.replace(
                    &format!("/v2/{}/", t.remote),
                    &format!("/v2/{}/", t.canonical),
                );
                b = b.header(header::LINK, hv(&link)?);
            }
            finish(b, body::full(doc.body))
        }
        Err(CacheError::Upstream(e)) if e.is_outage() => {
            registry::tags(state, t.canonical, page).await
        }
        Err(CacheError::Upstream(UpstreamError::NotFound)) => Err(ApiError::name_unknown()),
        Err(e) => Err(e.into()),
    }
}

/// Referrers, from the upstream; the stored ones when the upstream is down. A 404 (no
/// referrers API upstream) is passed on so clients fall back to the tag schema.
pub async fn referrers(
    state: &State,
    t: &Target<'_>,
    digest: &Digest,
    artifact_type: Option<&str>,
) -> Result<Response<Body>> {
    match state.cache.referrers(t, digest, artifact_type).await {
        Ok(doc) => {
            let mut b = builder(StatusCode::OK).header(
                header::CONTENT_TYPE,
                hv(doc
                    .content_type
                    .as_deref()
                    .unwrap_or(crate::oci::manifest::OCI_INDEX))?,
            );
            if artifact_type.is_some() {
                b = b.header("OCI-Filters-Applied", "artifactType");
            }
            finish(b, body::full(doc.body))
        }
        Err(CacheError::Upstream(e)) if e.is_outage() => {
            registry::referrers(state, t.canonical, digest, artifact_type).await
        }
        Err(CacheError::Upstream(UpstreamError::NotFound)) => Err(ApiError::manifest_unknown()),
        Err(e) => Err(e.into()),
    }
}
