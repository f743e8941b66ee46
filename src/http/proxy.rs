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
use crate::oci::{Digest, Reference};
use crate::pullthrough::{BlobAnswer, CacheError, ReferrersAnswer, TagsAnswer, Target};
use crate::upstream::{TagsPage, UpstreamError};

type Result<T> = std::result::Result<T, ApiError>;

pub async fn get_manifest(
    state: &State,
    t: &Target<'_>,
    reference: &Reference,
    head: bool,
    accept: Option<&str>,
) -> Result<Response<Body>> {
    let answer = state
        .cache
        .manifest(t, reference, accept)
        .await
        .map_err(|e| manifest_error(e, reference))?;
    manifest_response(answer.manifest, head)
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
    let answer = state
        .cache
        .blob(t, digest, head)
        .await
        .map_err(|e| match e {
            CacheError::Upstream(UpstreamError::NotFound) => ApiError::blob_unknown(),
            other => other.into(),
        })?;
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

/// The tag list: the upstream's page, or the stored tags paged here.
pub async fn tags(state: &State, t: &Target<'_>, page: &Page) -> Result<Response<Body>> {
    let upstream_page = TagsPage {
        n: page.n,
        last: page.last.clone(),
    };
    match state.cache.tags(t, &upstream_page).await {
        Ok(TagsAnswer::Upstream(tags)) => {
            let mut b = builder(StatusCode::OK).header(
                header::CONTENT_TYPE,
                hv(tags.content_type.as_deref().unwrap_or("application/json"))?,
            );
            if let Some(link) = tags.link {
                b = b.header(header::LINK, hv(&link)?);
            }
            finish(b, body::full(tags.body))
        }
        Ok(TagsAnswer::Stored(stored)) => registry::tags_response(t.canonical, stored, page),
        Err(CacheError::Upstream(UpstreamError::NotFound)) => Err(ApiError::name_unknown()),
        Err(e) => Err(e.into()),
    }
}

/// Referrers: the upstream's index, or one made of the stored referrers. A 404 (no
/// referrers API upstream) is passed on so clients fall back to the tag schema.
pub async fn referrers(
    state: &State,
    t: &Target<'_>,
    digest: &Digest,
    artifact_type: Option<&str>,
) -> Result<Response<Body>> {
    match state.cache.referrers(t, digest, artifact_type).await {
        Ok(ReferrersAnswer::Upstream(referrers)) => {
            let mut b = builder(StatusCode::OK).header(
                header::CONTENT_TYPE,
                hv(referrers
                    .content_type
                    .as_deref()
                    .unwrap_or(crate::oci::manifest::OCI_INDEX))?,
            );
            if artifact_type.is_some() {
                b = b.header("OCI-Filters-Applied", "artifactType");
            }
            finish(b, body::full(referrers.body))
        }
        Ok(ReferrersAnswer::Stored(stored)) => {
            registry::referrers_response(stored, artifact_type.is_some())
        }
        Err(CacheError::Upstream(UpstreamError::NotFound)) => Err(ApiError::manifest_unknown()),
        Err(e) => Err(e.into()),
    }
}
