//! Handlers for the distribution API on hosted repositories: manifests, blobs, uploads,
//! tags, referrers and catalog. Each takes validated route data and returns a response
//! or an [`ApiError`]; none of them authenticates (the pipeline did).

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::{self, Body, FileSender, RangeStream, RequestBody};
use super::error::ApiError;
use super::route::Page;
use super::{Ctx, State};
use crate::oci::manifest::OCI_INDEX;
use crate::oci::{Digest, ErrorCode, MAX_MANIFEST_BYTES, Reference, RepoName};
use crate::storage::{ChunkRange, FileRange, LinkOrigin, ReferrerRecord, Session, StoredManifest};

type Result<T> = std::result::Result<T, ApiError>;

pub fn hv(s: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(s).map_err(|_| ApiError::internal("header value is not representable"))
}

pub fn builder(status: StatusCode) -> http::response::Builder {
    Response::builder().status(status)
}

pub fn finish(b: http::response::Builder, body: Body) -> Result<Response<Body>> {
    b.body(body)
        .map_err(|e| ApiError::internal(format!("building response: {e}")))
}

fn upload_location(repo: &RepoName, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

fn range_header(offset: u64) -> String {
    if offset == 0 {
        "0-0".to_owned()
    } else {
        format!("0-{}", offset - 1)
    }
}

/// `202 Accepted` describing an upload session at `offset`.
fn upload_accepted(
    repo: &RepoName,
    id: &str,
    offset: u64,
    status: StatusCode,
) -> Result<Response<Body>> {
    finish(
        builder(status)
            .header(header::LOCATION, hv(&upload_location(repo, id))?)
            .header(header::RANGE, hv(&range_header(offset))?)
            .header("Docker-Upload-UUID", hv(id)?)
            .header(header::CONTENT_LENGTH, "0"),
        body::empty(),
    )
}

fn blob_created(repo: &RepoName, digest: &Digest) -> Result<Response<Body>> {
    finish(
        builder(StatusCode::CREATED)
            .header(header::LOCATION, hv(&format!("/v2/{repo}/blobs/{digest}"))?)
            .header("Docker-Content-Digest", hv(digest.as_str())?)
            .header(header::CONTENT_LENGTH, "0"),
        body::empty(),
    )
}

pub async fn get_manifest(
    state: &State,
    repo: &RepoName,
    reference: &Reference,
    head: bool,
) -> Result<Response<Body>> {
    let m = state
        .store
        .get_manifest(repo, reference)
        .await?
        .ok_or_else(ApiError::manifest_unknown)?;
    manifest_response(m, head)
}

/// `200 OK` with a manifest; HEAD gets the same headers (containerd needs them all).
pub fn manifest_response(m: StoredManifest, head: bool) -> Result<Response<Body>> {
    let b = builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, hv(&m.media_type)?)
        .header(header::CONTENT_LENGTH, m.body.len())
        .header("Docker-Content-Digest", hv(m.digest.as_str())?)
        .header(header::ETAG, hv(&format!("\"{}\"", m.digest))?);
    finish(
        b,
        if head {
            body::empty()
        } else {
            body::full(m.body)
        },
    )
}

pub async fn put_manifest(
    state: &State,
    ctx: &Ctx,
    repo: &RepoName,
    reference: &Reference,
    req: http::Request<RequestBody>,
) -> Result<Response<Body>> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = body::read_limited(
        req.into_body(),
        state.config.server.body_idle_timeout,
        MAX_MANIFEST_BYTES,
    )
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::ManifestInvalid,
            format!("manifest body was not received: {e}"),
        )
    })?
    .ok_or_else(|| ApiError::too_large("manifest", MAX_MANIFEST_BYTES))?;
    let pushed = state
        .hosted
        .put_manifest(repo, reference, bytes, content_type.as_deref())
        .await?;
    let (digest, subject) = (pushed.digest, pushed.subject);
    tracing::debug!(request_id = ctx.id, %digest, "manifest stored");
    let mut b = builder(StatusCode::CREATED)
        .header(
            header::LOCATION,
            hv(&format!("/v2/{repo}/manifests/{digest}"))?,
        )
        .header("Docker-Content-Digest", hv(digest.as_str())?)
        .header(header::CONTENT_LENGTH, "0");
    if let Some(s) = subject {
        b = b.header("OCI-Subject", hv(s.as_str())?);
    }
    finish(b, body::empty())
}

pub async fn delete_manifest(
    state: &State,
    repo: &RepoName,
    reference: &Reference,
) -> Result<Response<Body>> {
    state.hosted.delete_manifest(repo, reference).await?;
    finish(
        builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, "0"),
        body::empty(),
    )
}

/// Parses a `Range: bytes=…` header against a blob of `size` bytes. `Ok(None)` means
/// serve the whole blob; `Err` means 416.
pub fn parse_range(value: &str, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let spec = value.trim().strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Err(());
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", "") => return Err(()),
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            if n == 0 || size == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size - 1)
        }
        (s, "") => (s.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (s, e) => {
            let (s, e): (u64, u64) = (s.parse().map_err(|_| ())?, e.parse().map_err(|_| ())?);
            (s, e.min(size.saturating_sub(1)))
        }
    };
    if start >= size || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

pub async fn get_blob(
    state: &State,
    repo: &RepoName,
    digest: &Digest,
    head: bool,
    range: Option<&str>,
    sender: &FileSender,
) -> Result<Response<Body>> {
    let blob = state
        .store
        .open_blob(repo, digest)
        .await?
        .ok_or_else(ApiError::blob_unknown)?;
    let size = blob.size;
    let content = BlobContent::File(Arc::new(blob.file));
    blob_response(digest, size, head, range, content, sender)
}

/// Where a blob answer's bytes come from.
pub enum BlobContent {
    /// A stored file.
    File(Arc<std::fs::File>),
    /// A download in flight; the function makes the file ranges of bytes
    /// `start..start + len` as they arrive.
    Ranges(Box<dyn FnOnce(u64, u64) -> RangeStream + Send>),
    /// No body at all (a HEAD answered from a remote size).
    Empty,
}

/// A blob answer of `size` bytes from `content`, honouring `Range`.
pub fn blob_response(
    digest: &Digest,
    size: u64,
    head: bool,
    range: Option<&str>,
    content: BlobContent,
    sender: &FileSender,
) -> Result<Response<Body>> {
    let base = |status| -> Result<http::response::Builder> {
        Ok(builder(status)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header("Docker-Content-Digest", hv(digest.as_str())?)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::ETAG, hv(&format!("\"{digest}\""))?))
    };
    let (b, start, len) = match range.map(|r| parse_range(r, size)) {
        None | Some(Ok(None)) => (
            base(StatusCode::OK)?.header(header::CONTENT_LENGTH, size),
            0,
            size,
        ),
        Some(Ok(Some((start, end)))) => {
            let len = end - start + 1;
            let b = base(StatusCode::PARTIAL_CONTENT)?
                .header(header::CONTENT_LENGTH, len)
                .header(
                    header::CONTENT_RANGE,
                    hv(&format!("bytes {start}-{end}/{size}"))?,
                );
            (b, start, len)
        }
        Some(Err(())) => {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::RangeInvalid,
                "requested range is not satisfiable",
            )
            .with_header(header::CONTENT_RANGE, hv(&format!("bytes */{size}"))?));
        }
    };
    if head {
        return finish(b, body::empty());
    }
    match content {
        BlobContent::File(file) => finish(
            b,
            sender.file(FileRange {
                file,
                offset: start,
                len,
            }),
        ),
        BlobContent::Ranges(make) => finish(b, sender.body(make(start, len))),
        BlobContent::Empty => finish(b, body::empty()),
    }
}

pub async fn delete_blob(
    state: &State,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Response<Body>> {
    if !state.store.unlink_blob(repo, digest).await? {
        return Err(ApiError::blob_unknown());
    }
    finish(
        builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, "0"),
        body::empty(),
    )
}

/// The chunk range of an upload request's `Content-Range` (`<start>-<end>`, with an
/// optional `bytes ` prefix and `/<total>` suffix). With a `Content-Length` the two must
/// agree; without one (a chunked body) the body is held to the range's length.
fn chunk_range(req: &http::Request<RequestBody>) -> Result<Option<ChunkRange>> {
    let Some(v) = req.headers().get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::BlobUploadInvalid,
            "invalid Content-Range",
        )
    };
    let s = v.to_str().map_err(|_| bad())?;
    let s = s
        .trim()
        .trim_start_matches("bytes ")
        .trim_start_matches("bytes=");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let start: u64 = a.trim().parse().map_err(|_| bad())?;
    let end: u64 = b
        .trim()
        .split('/')
        .next()
        .unwrap_or("")
        .parse()
        .map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    let len = end - start + 1;
    if let Some(declared) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && declared != len
    {
        return Err(bad());
    }
    Ok(Some(ChunkRange {
        start,
        len: Some(len),
    }))
}

pub async fn start_upload(
    state: &State,
    ctx: &Ctx,
    repo: &RepoName,
    digest: Option<&Digest>,
    mount: Option<&(Digest, Option<RepoName>)>,
    req: http::Request<RequestBody>,
) -> Result<Response<Body>> {
    if let Some((d, Some(from))) = mount {
        // Mount only with read access to the source; otherwise fall back to an upload.
        if state.hosted.mount(&ctx.principal, from, repo, d).await? {
            return blob_created(repo, d);
        }
    }
    if let Some(digest) = digest {
        let stream =
            body::request_stream(req.into_body(), state.config.server.body_idle_timeout, None);
        state
            .store
            .put_blob(repo, digest, LinkOrigin::Upload, stream)
            .await?;
        return blob_created(repo, digest);
    }
    let owner = ctx.principal.session_owner();
    let id = state
        .store
        .start_upload(repo, &owner, state.config.storage.max_upload_sessions)
        .await?;
    upload_accepted(repo, &id, 0, StatusCode::ACCEPTED)
}

pub async fn upload_status(
    state: &State,
    ctx: &Ctx,
    repo: &RepoName,
    id: &str,
) -> Result<Response<Body>> {
    let offset = state
        .store
        .upload_offset(repo, id, &ctx.principal.session_owner())
        .await?
        .ok_or_else(ApiError::upload_unknown)?;
    upload_accepted(repo, id, offset, StatusCode::NO_CONTENT)
}

pub async fn patch_upload(
    state: &State,
    ctx: &Ctx,
    repo: &RepoName,
    id: &str,
    req: http::Request<RequestBody>,
) -> Result<Response<Body>> {
    let range = chunk_range(&req)?;
    let stream = body::request_stream(req.into_body(), state.config.server.body_idle_timeout, None);
    let owner = ctx.principal.session_owner();
    let session = Session {
        repo,
        id,
        owner: &owner,
    };
    let offset = state.store.append_upload(&session, range, stream).await?;
    upload_accepted(repo, id, offset, StatusCode::ACCEPTED)
}

pub async fn finish_upload(
    state: &State,
    ctx: &Ctx,
    repo: &RepoName,
    id: &str,
    digest: &Digest,
    req: http::Request<RequestBody>,
) -> Result<Response<Body>> {
    let range = chunk_range(&req)?;
    let stream = body::request_stream(req.into_body(), state.config.server.body_idle_timeout, None);
    let owner = ctx.principal.session_owner();
    let session = Session {
        repo,
        id,
        owner: &owner,
    };
    state
        .store
        .finish_upload(&session, range, digest, stream)
        .await?;
    blob_created(repo, digest)
}

pub async fn cancel_upload(
    state: &State,
    ctx: &Ctx,
    repo: &RepoName,
    id: &str,
) -> Result<Response<Body>> {
    let owner = ctx.principal.session_owner();
    if !state
        .store
        .cancel_upload(&Session {
            repo,
            id,
            owner: &owner,
        })
        .await?
    {
        return Err(ApiError::upload_unknown());
    }
    finish(builder(StatusCode::NO_CONTENT), body::empty())
}

/// Applies `n`/`last` to a sorted list; returns the page and whether more follow.
fn paginate(items: Vec<String>, page: &Page) -> (Vec<String>, bool) {
    let after: Vec<String> = match &page.last {
        Some(last) => items.into_iter().filter(|t| t > last).collect(),
        None => items,
    };
    match page.n {
        Some(n) if after.len() > n => (after.into_iter().take(n).collect(), true),
        _ => (after, false),
    }
}

fn list_response(
    path: &str,
    key: &str,
    name: Option<&RepoName>,
    items: Vec<String>,
    page: &Page,
) -> Result<Response<Body>> {
    let (items, more) = paginate(items, page);
    let mut json = serde_json::json!({ key: items });
    if let Some(name) = name {
        json["name"] = serde_json::Value::String(name.to_string());
    }
    let mut b = builder(StatusCode::OK).header(header::CONTENT_TYPE, "application/json");
    if let (true, Some(n), Some(last)) = (more, page.n, items.last()) {
        b = b.header(
            header::LINK,
            hv(&format!("<{path}?n={n}&last={last}>; rel=\"next\""))?,
        );
    }
    finish(b, body::full(json.to_string()))
}

pub async fn tags(state: &State, repo: &RepoName, page: &Page) -> Result<Response<Body>> {
    let tags = state
        .store
        .tags(repo)
        .await?
        .ok_or_else(ApiError::name_unknown)?;
    tags_response(repo, tags, page)
}

/// One page of `tags`, the sorted tags of `repo`.
pub(super) fn tags_response(
    repo: &RepoName,
    tags: Vec<String>,
    page: &Page,
) -> Result<Response<Body>> {
    list_response(
        &format!("/v2/{repo}/tags/list"),
        "tags",
        Some(repo),
        tags,
        page,
    )
}

pub async fn catalog(state: &State, ctx: &Ctx, page: &Page) -> Result<Response<Body>> {
    let mut visible = Vec::new();
    for name in state.store.repositories().await? {
        let Ok(repo) = name.parse::<RepoName>() else {
            continue;
        };
        if state.access.visible(&ctx.principal, &repo).await {
            visible.push(name);
        }
    }
    list_response("/v2/_catalog", "repositories", None, visible, page)
}

pub async fn referrers(
    state: &State,
    repo: &RepoName,
    digest: &Digest,
    artifact_type: Option<&str>,
) -> Result<Response<Body>> {
    let all = state.store.referrers(repo, digest).await?;
    let manifests: Vec<_> = all
        .into_iter()
        .filter(|r| artifact_type.is_none_or(|a| r.artifact_type.as_deref() == Some(a)))
        .collect();
    referrers_response(manifests, artifact_type.is_some())
}

/// The referrers index of `manifests`; `filtered` when they were chosen by artifact type.
pub(super) fn referrers_response(
    manifests: Vec<ReferrerRecord>,
    filtered: bool,
) -> Result<Response<Body>> {
    let json =
        serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    let mut b = builder(StatusCode::OK).header(header::CONTENT_TYPE, OCI_INDEX);
    if filtered {
        b = b.header("OCI-Filters-Applied", "artifactType");
    }
    finish(b, body::full(json.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        for bad in [
            "bytes=100-",
            "bytes=5-1",
            "bytes=a-b",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=-0",
            "bytes=-",
        ] {
            assert_eq!(parse_range(bad, 100), Err(()), "{bad}");
        }
    }

    #[test]
    fn pagination_is_lexical_and_resumable() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let page = Page {
            n: Some(2),
            last: None,
        };
        assert_eq!(
            paginate(items.clone(), &page),
            (vec!["a".into(), "b".into()], true)
        );
        let page = Page {
            n: Some(2),
            last: Some("b".into()),
        };
        assert_eq!(
            paginate(items.clone(), &page),
            (vec!["c".into(), "d".into()], false)
        );
        let page = Page {
            n: Some(0),
            last: None,
        };
        assert_eq!(paginate(items, &page).0, Vec::<String>::new());
    }
}
