//! The HTTP surface: routing, the request pipeline, the one error mapping, token
//! endpoint and listeners.
//!
//! Phases of every request, in order, all in [`handle`]: route → authenticate →
//! authorize → serve → respond → log. Domain modules never see hyper types; this module
//! adapts between them.
//!
//! Every access decision (who is calling, may they, which token, what is listed) is made
//! by the `auth::Access` service; this module hands it header bytes and the route's scope
//! and maps its `AccessError` to a response.

mod body;
mod deadline;
mod error;
mod http3;
mod proxy;
mod registry;
pub mod route;
mod server;
mod tls;
mod zerocopy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use tracing::Instrument;

use crate::auth::{Access, Principal};
use crate::config::Config;
use crate::hosted::Hosted;
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::oci::ErrorCode;
use crate::pullthrough::{PullThrough, Target};
use crate::storage::Store;
use crate::upstream::{Namespace, NamespaceError, UpstreamHandle};
pub use body::Body;
use body::FileSender;
use body::RequestBody;
use error::ApiError;
#[cfg(any(fuzzing, test))]
pub(crate) use registry::parse_range;
use route::Route;
pub use server::{Listeners, bind_http3, serve};
pub use tls::TlsSettings;

/// Everything a handler can reach; cheap to clone.
#[derive(Clone)]
pub struct State {
    inner: Arc<StateInner>,
}

pub struct StateInner {
    config: Arc<Config>,
    store: Store,
    access: Access,
    hosted: Hosted,
    cache: Arc<PullThrough>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

impl std::ops::Deref for State {
    type Target = StateInner;
    fn deref(&self) -> &StateInner {
        &self.inner
    }
}

impl State {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        access: Access,
        cache: Arc<PullThrough>,
        metrics: Arc<Metrics>,
    ) -> State {
        State {
            inner: Arc::new(StateInner {
                config,
                hosted: Hosted::new(store.clone(), access.clone()),
                store,
                access,
                cache,
                metrics,
                next_id: AtomicU64::new(1),
            }),
        }
    }
}

/// Per-request context handed to handlers.
pub struct Ctx {
    pub id: u64,
    pub principal: Principal,
    /// The client's address, for the failed-authentication throttle.
    pub peer: SocketAddr,
}

/// The request pipeline. Never fails: every error becomes an OCI error response.
pub async fn handle(state: State, req: Request<RequestBody>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut route_name = "unrouted";
    let mut subject = String::from("-");
    let mut upstream_ns: Option<HeaderValue> = None;
    // Everything logged while this request is served carries these fields; never a
    // credential (the principal is a kind, the subject a name). The span is made once
    // its fields are known (after routing and authentication), in one go: cheaper than
    // recording them one by one on the hot path. A request refused before has a span
    // with what was known.
    let mut span = None;
    let result = async {
        let mut route = route::route(&method, &path, req.uri().query())?;
        route_name = route.name();
        let namespace = resolve(&state, &mut route, req.uri().query())?;
        let upstream_name = match &namespace {
            Namespace::Upstream { upstream, .. } => {
                upstream_ns = HeaderValue::from_str(upstream.name()).ok();
                Some(upstream.name().to_owned())
            }
            Namespace::Hosted => None,
        };
        let principal = authenticate(&state, &req, peer).await?;
        subject = principal.subject().to_owned();
        let served = tracing::info_span!(
            "request",
            id,
            route = route_name,
            repo = route.scope().map(|(r, _)| r.as_str()),
            upstream = upstream_name.as_deref(),
            principal = principal.kind(),
        );
        span = Some(served.clone());
        async {
            authorize(&state, &route, &namespace, &principal).await?;
            let ctx = Ctx {
                id,
                principal,
                peer,
            };
            match namespace {
                Namespace::Hosted => dispatch(&state, &ctx, route, req).await,
                Namespace::Upstream { upstream, remote } => {
                    dispatch_upstream(&state, &upstream, &remote, route, req).await
                }
            }
        }
        .instrument(served)
        .await
    }
    .await;
    let span = span.unwrap_or_else(|| tracing::info_span!("request", id, route = route_name));
    let mut response = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                // The one place a failure of ours is logged, with its cause; the client
                // got the OCI error only.
                let cause = e.cause.as_deref().unwrap_or(&e.message);
                span.in_scope(|| {
                    tracing::warn!(status = e.status.as_u16(), cause, "request failed");
                });
            }
            error_response(e)
        }
    };
    if let Some(ns) = upstream_ns {
        response.headers_mut().insert("OCI-Namespace", ns);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route_name,
            status,
        })
        .inc();
    state
        .metrics
        .request_seconds
        .get_or_create(&RouteLabels { route: route_name })
        .observe(elapsed.as_secs_f64());
    // The request log line is written when the body is done (sent, or abandoned by the
    // client), so it can say how many bytes went out and how long the whole took.
    // Whole microseconds: exact enough for sub-millisecond answers, no float noise.
    let headers_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    let expected = if method == http::Method::HEAD {
        Some(0)
    } else {
        response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    };
    response.map(|b| {
        body::on_done(b, expected, move |bytes, complete| {
            span.in_scope(|| {
                tracing::info!(
                    request_id = id,
                    %method,
                    path = %path,
                    route = route_name,
                    principal = %subject,
                    status,
                    bytes,
                    complete,
                    headers_us,
                    elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "request"
                );
            });
        })
    })
}

fn error_response(e: ApiError) -> Response<Body> {
    let mut b = Response::builder()
        .status(e.status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("Docker-Distribution-API-Version", "registry/2.0");
    for (k, v) in &e.headers {
        b = b.header(k, v);
    }
    b.body(body::full(e.body())).unwrap_or_else(|_| {
        let mut r = Response::new(body::empty());
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

async fn authenticate(
    state: &State,
    req: &Request<RequestBody>,
    peer: SocketAddr,
) -> Result<Principal, ApiError> {
    let header = req.headers().get(header::AUTHORIZATION);
    Ok(state
        .access
        .authenticate(header.map(HeaderValue::as_bytes), peer.ip())
        .await?)
}

/// The authorize phase: the scope comes from the route; repositories of the central
/// registry carry their name there, for its say on pulls.
async fn authorize(
    state: &State,
    route: &Route,
    namespace: &Namespace,
    principal: &Principal,
) -> Result<(), ApiError> {
    let Some((repo, action)) = route.scope() else {
        if matches!(route, Route::Base) {
            state.access.authorize_base(principal)?;
        }
        return Ok(());
    };
    let central = match namespace {
        Namespace::Upstream { upstream, remote } if state.access.is_central(upstream.name()) => {
            Some(remote)
        }
        _ => None,
    };
    Ok(state
        .access
        .authorize(principal, repo, action, central)
        .await?)
}

/// Resolves the route's repository to its namespace, rewriting it to the canonical
/// name that policy and storage use.
fn resolve(state: &State, route: &mut Route, query: Option<&str>) -> Result<Namespace, ApiError> {
    let Some(repo) = route.repo_mut() else {
        return Ok(Namespace::Hosted);
    };
    let query = route::Query::parse(query)?;
    let resolved = state
        .cache
        .upstreams()
        .resolve(repo, query.get("ns"))
        .map_err(|e| match e {
            NamespaceError::UnknownNamespace(_) => {
                ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, e.to_string())
            }
            NamespaceError::Name(n) => ApiError::from(route::RouteError::Name(n)),
        })?;
    *repo = resolved.canonical;
    Ok(resolved.namespace)
}

/// Requests for repositories of an upstream: reads go through the cache; writes are
/// refused (pushes go to hosted repositories).
async fn dispatch_upstream(
    state: &State,
    upstream: &UpstreamHandle,
    remote: &crate::oci::RepoName,
    route: Route,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let header_str = |name| {
        let values: Vec<&str> = req
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    let Some(canonical) = route.scope().map(|(r, _)| r.clone()) else {
        return Err(ApiError::internal("upstream route without a repository"));
    };
    let t = Target {
        upstream,
        remote,
        canonical: &canonical,
    };
    match route {
        Route::GetManifest {
            reference, head, ..
        } => {
            let accept = header_str(header::ACCEPT);
            proxy::get_manifest(state, &t, &reference, head, accept.as_deref()).await
        }
        Route::GetBlob { digest, head, .. } => {
            let range = header_str(header::RANGE);
            let sender = FileSender::of(&req);
            proxy::get_blob(state, &t, &digest, head, range.as_deref(), &sender).await
        }
        Route::Tags { page, .. } => proxy::tags(state, &t, &page).await,
        Route::Referrers {
            digest,
            artifact_type,
            ..
        } => proxy::referrers(state, &t, &digest, artifact_type.as_deref()).await,
        _ => Err(ApiError::denied(format!(
            "{canonical} belongs to an upstream registry; push to a hosted repository instead"
        ))),
    }
}

async fn dispatch(
    state: &State,
    ctx: &Ctx,
    route: Route,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    match route {
        Route::Base => ok_json("{}"),
        Route::Health => ok_json("{\"status\":\"ok\"}"),
        Route::Ready if !state.store.writable() => json(
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"status\":\"not ready\",\"reason\":\"storage is full or failing: writes cannot succeed\"}",
        ),
        Route::Ready => ok_json("{\"status\":\"ready\"}"),
        Route::Metrics => metrics(
            state,
            req.headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok()),
        ),
        Route::Token { scopes } => token(state, ctx, &scopes).await,
        Route::Catalog(page) => registry::catalog(state, ctx, &page).await,
        Route::GetManifest {
            repo,
            reference,
            head,
        } => registry::get_manifest(state, &repo, &reference, head).await,
        Route::PutManifest { repo, reference } => {
            registry::put_manifest(state, ctx, &repo, &reference, req).await
        }
        Route::DeleteManifest { repo, reference } => {
            registry::delete_manifest(state, &repo, &reference).await
        }
        Route::GetBlob { repo, digest, head } => {
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let sender = FileSender::of(&req);
            registry::get_blob(state, &repo, &digest, head, range.as_deref(), &sender).await
        }
        Route::DeleteBlob { repo, digest } => registry::delete_blob(state, &repo, &digest).await,
        Route::StartUpload {
            repo,
            digest,
            mount,
        } => registry::start_upload(state, ctx, &repo, digest.as_ref(), mount.as_ref(), req).await,
        Route::UploadStatus { repo, id } => registry::upload_status(state, ctx, &repo, &id).await,
        Route::PatchUpload { repo, id } => {
            registry::patch_upload(state, ctx, &repo, &id, req).await
        }
        Route::FinishUpload { repo, id, digest } => {
            registry::finish_upload(state, ctx, &repo, &id, &digest, req).await
        }
        Route::CancelUpload { repo, id } => registry::cancel_upload(state, ctx, &repo, &id).await,
        Route::Tags { repo, page } => registry::tags(state, &repo, &page).await,
        Route::Referrers {
            repo,
            digest,
            artifact_type,
        } => registry::referrers(state, &repo, &digest, artifact_type.as_deref()).await,
    }
}

/// `/metrics`: the Prometheus text format, or OpenMetrics when the client's `Accept`
/// asks for it.
fn metrics(state: &State, accept: Option<&str>) -> Result<Response<Body>, ApiError> {
    state.cache.export_health(&state.metrics);
    let openmetrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        // The format follows Accept: a cache between scraper and daemon must know.
        .header(header::VARY, "Accept")
        .body(body::full(state.metrics.encode(openmetrics)))
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn ok_json(body: &'static str) -> Result<Response<Body>, ApiError> {
    json(StatusCode::OK, body)
}

fn json(status: StatusCode, body: &'static str) -> Result<Response<Body>, ApiError> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("Docker-Distribution-API-Version", "registry/2.0")
        .body(body::full(body))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// `GET /token`: exchanges the presented credentials (or none) for a short-lived token
/// limited to the requested scopes that the caller is allowed.
async fn token(state: &State, ctx: &Ctx, scopes: &[String]) -> Result<Response<Body>, ApiError> {
    let issued = state
        .access
        .issue_token(&ctx.principal, scopes, ctx.peer.ip())
        .await?;
    let issued_at = humantime::format_rfc3339_seconds(issued.issued_at).to_string();
    let json = serde_json::json!({
        "token": issued.token.expose(),
        "access_token": issued.token.expose(),
        "expires_in": issued.expires_in,
        "issued_at": issued_at,
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(body::full(json.to_string()))
        .map_err(|e| ApiError::internal(e.to_string()))
}
