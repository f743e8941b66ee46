//! The HTTP surface: routing, the request pipeline, the one error mapping, token
//! endpoint and listeners.
//!
//! Phases of every request, in order, all in [`handle`]: route → authenticate →
//! authorize → serve → respond → log. Domain modules never see hyper types; this module
//! adapts between them.

mod body;
mod error;
mod registry;
pub mod route;
mod server;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::auth::{AuthError, Authenticator, FailureThrottle, Principal, Scope};
use crate::config::Config;
use crate::oci::ErrorCode;
use crate::storage::Store;
pub use body::Body;
use error::ApiError;
use route::Route;
pub use server::{Listeners, serve};
pub use tls::TlsSettings;

/// Everything a handler can reach; cheap to clone.
#[derive(Clone)]
pub struct State {
    inner: Arc<StateInner>,
}

pub struct StateInner {
    config: Arc<Config>,
    store: Store,
    auth: Authenticator,
    throttle: FailureThrottle,
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
        auth: Authenticator,
        throttle: FailureThrottle,
    ) -> State {
        State {
            inner: Arc::new(StateInner {
                config,
                store,
                auth,
                throttle,
                next_id: AtomicU64::new(1),
            }),
        }
    }
}

/// Per-request context handed to handlers.
pub struct Ctx {
    pub id: u64,
    pub principal: Principal,
}

/// The request pipeline. Never fails: every error becomes an OCI error response.
pub async fn handle(state: State, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let mut route_name = "unrouted";
    let mut subject = String::from("-");
    let result = async {
        let route = route::route(&method, &path, req.uri().query())?;
        route_name = route.name();
        let principal = authenticate(&state, &req, peer)?;
        subject = principal.subject().to_owned();
        authorize(&state, &route, &principal)?;
        let ctx = Ctx { id, principal };
        dispatch(&state, &ctx, route, req).await
    }
    .await;
    let response = match result {
        Ok(r) => r,
        Err(e) => error_response(e),
    };
    let status = response.status().as_u16();
    tracing::info!(
        request_id = id,
        %method,
        path = %path,
        route = route_name,
        principal = %subject,
        status,
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
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

fn authenticate(
    state: &State,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<Principal, ApiError> {
    let header = req.headers().get(header::AUTHORIZATION);
    let Some(value) = header else {
        return Ok(Principal::Anonymous);
    };
    let now = Instant::now();
    if let Err(retry) = state.throttle.check(peer.ip(), now) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyRequests,
            "too many failed authentication attempts",
        )
        .with_header(
            header::RETRY_AFTER,
            HeaderValue::from(retry.as_secs().max(1)),
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| ApiError::from(AuthError::Malformed("authorization header is not ASCII")))?;
    match state.auth.authenticate(Some(value), SystemTime::now()) {
        Ok(p) => {
            state.throttle.record_success(peer.ip());
            Ok(p)
        }
        Err(e) => {
            state.throttle.record_failure(peer.ip(), now);
            Err(challenge(state, ApiError::from(e), None))
        }
    }
}

/// Adds the token-flow challenge to a 401.
fn challenge(state: &State, e: ApiError, scope: Option<String>) -> ApiError {
    let mut value = format!(
        "Bearer realm=\"{}/token\",service=\"{}\"",
        state.config.server.public_url,
        state.auth.service()
    );
    if let Some(scope) = scope {
        value.push_str(&format!(",scope=\"{scope}\""));
    }
    match HeaderValue::from_str(&value) {
        Ok(v) => e.with_header(header::WWW_AUTHENTICATE, v),
        Err(_) => e,
    }
}

fn authorize(state: &State, route: &Route, principal: &Principal) -> Result<(), ApiError> {
    let Some((repo, action)) = route.scope() else {
        // `/v2/` answers 401 to anonymous callers when credentials are possible, so that
        // clients run the token flow (docker, podman, skopeo all expect it).
        if matches!(route, Route::Base)
            && matches!(principal, Principal::Anonymous)
            && state.auth.issuer_count() > 0
        {
            return Err(challenge(
                state,
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    "authentication required",
                ),
                None,
            ));
        }
        return Ok(());
    };
    if state.auth.allowed(principal, repo).contains(action) {
        return Ok(());
    }
    // A push also needs pull (clients check blobs first); ask for both in the challenge.
    let wanted = match action {
        crate::auth::Action::Pull => "pull",
        crate::auth::Action::Push => "pull,push",
        crate::auth::Action::Delete => "delete",
    };
    match principal {
        Principal::Anonymous => Err(challenge(
            state,
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "authentication required",
            ),
            Some(format!("repository:{repo}:{wanted}")),
        )),
        _ => Err(ApiError::denied(format!(
            "{} may not {} {repo}",
            principal.subject(),
            action.as_str()
        ))),
    }
}

async fn dispatch(
    state: &State,
    ctx: &Ctx,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    match route {
        Route::Base => ok_json("{}"),
        Route::Health => ok_json("{\"status\":\"ok\"}"),
        Route::Ready => ok_json("{\"status\":\"ready\"}"),
        Route::Token { scopes } => token(state, ctx, &scopes),
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
            registry::get_blob(state, &repo, &digest, head, range.as_deref()).await
        }
        Route::DeleteBlob { repo, digest } => registry::delete_blob(state, &repo, &digest).await,
        Route::StartUpload {
            repo,
            digest,
            mount,
        } => registry::start_upload(state, ctx, &repo, digest.as_ref(), mount.as_ref(), req).await,
        Route::UploadStatus { repo, id } => registry::upload_status(state, &repo, &id).await,
        Route::PatchUpload { repo, id } => registry::patch_upload(state, &repo, &id, req).await,
        Route::FinishUpload { repo, id, digest } => {
            registry::finish_upload(state, &repo, &id, &digest, req).await
        }
        Route::CancelUpload { repo, id } => registry::cancel_upload(state, &repo, &id).await,
        Route::Tags { repo, page } => registry::tags(state, &repo, &page).await,
        Route::Referrers {
            repo,
            digest,
            artifact_type,
        } => registry::referrers(state, &repo, &digest, artifact_type.as_deref()).await,
    }
}

fn ok_json(body: &'static str) -> Result<Response<Body>, ApiError> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header("Docker-Distribution-API-Version", "registry/2.0")
        .body(body::full(body))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// `GET /token`: exchanges the presented credentials (or none) for a short-lived token
/// limited to the requested scopes that the caller is allowed.
fn token(state: &State, ctx: &Ctx, scopes: &[String]) -> Result<Response<Body>, ApiError> {
    let scopes: Vec<Scope> = scopes.iter().filter_map(|s| Scope::parse(s)).collect();
    let issued = state
        .auth
        .issue_token(&ctx.principal, &scopes, SystemTime::now());
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
