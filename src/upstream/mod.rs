//! The client Outpost uses to talk to upstream registries (Docker Hub, GHCR, Quay, any
//! OCI registry): manifests, blobs and small JSON documents, with the registry token
//! flow, redirects to CDNs, timeouts, one safe retry and a circuit breaker per upstream.
//!
//! This module owns everything about speaking HTTP to an upstream, and it hides it:
//! callers get [`UpstreamError`] classified by who failed and whether serving stale
//! content can help — never a status code or a reqwest type. It stores nothing (the
//! `pullthrough` layer does) and verifies no digest (the caller hashes what it stores).
//! Credentials and tokens never reach a log line or an error message. `user` checks a
//! central-registry user's own credentials and access (never fetching content with them).
//!
//! [`Upstreams`] holds every configured upstream, built once: it finds one by name, alias
//! or registry host, and resolves a requested repository to its [`Namespace`] (`namespace`).

mod breaker;
pub mod challenge;
mod namespace;
mod registry;
mod token;
mod user;

#[cfg(test)]
mod tests;
/// Also serves the pull-through's tests as a fake upstream.
#[cfg(test)]
pub(crate) mod testserver;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use reqwest::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, LINK, RANGE, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use self::breaker::{Admission, Breaker, Refusal};
use self::challenge::Challenge;
use self::token::{AuthHint, BearerRealm, Issued, TokenCache};
use crate::auth::Secret;
use crate::config::UpstreamConfig;
use crate::oci::{Digest, MAX_MANIFEST_BYTES, Reference, RepoName};

pub use self::breaker::BreakerState;
pub use self::namespace::{Namespace, NamespaceError};
pub use self::registry::{Set as UpstreamSet, UpstreamHandle, Upstreams};
pub use self::user::{LoginCheck, PullCheck, UserCredentials};

/// Sent on every upstream request.
pub const USER_AGENT: &str = concat!("outpost/", env!("CARGO_PKG_VERSION"));

/// Largest tag list or referrers index [`Upstream::tags`] and [`Upstream::referrers`] read.
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// The query string of a paginated list (`?n=…&last=…`, escaped), or nothing.
fn page_query(page: &TagsPage) -> String {
    let mut query = Vec::new();
    if let Some(n) = page.n {
        query.push(format!("n={n}"));
    }
    if let Some(last) = &page.last {
        query.push(format!("last={}", escape(last)));
    }
    if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    }
}

/// Longest `Retry-After` obeyed: a bogus date must not shut an upstream out for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Installs rustls' ring provider as the process default (idempotent). reqwest is built
/// without a provider of its own, so anything building a `reqwest::Client` (tests too)
/// calls this first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// What went wrong talking to an upstream, classified for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// 404: the name, manifest or blob is unknown upstream.
    #[error("not found upstream")]
    NotFound,
    /// 401/403, still after the token flow.
    #[error("access denied by the upstream")]
    Denied,
    /// 429 (or the breaker held open by a 429's `Retry-After`).
    #[error("rate limited by the upstream{}", retry_hint(*.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    /// Connect error, timeout, reset, 5xx. The message says which.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// The circuit breaker is open after repeated failures: the upstream is not asked
    /// until `retry_after` has passed (then one probe is let through).
    #[error("upstream unavailable: {message}")]
    CircuitOpen {
        message: String,
        retry_after: Duration,
    },
    /// The upstream broke the protocol (oversized manifest, bad header, 206 missing...),
    /// or its configuration (password file, CA file) cannot be used.
    #[error("upstream answered something invalid: {0}")]
    Invalid(String),
}

fn retry_hint(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(" (retry after {}s)", d.as_secs()),
        None => String::new(),
    }
}

impl UpstreamError {
    /// The upstream cannot answer right now (down, slow, failing or rate-limiting): the
    /// caller may serve what it has (stale).
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unavailable(_)
                | UpstreamError::CircuitOpen { .. }
                | UpstreamError::RateLimited { .. }
        )
    }
}

/// A manifest answer. `body` is empty for HEAD.
#[derive(Debug, Clone)]
pub struct UpstreamManifest {
    /// `Docker-Content-Digest`, when present and a valid digest.
    pub digest: Option<Digest>,
    /// `Content-Type` without parameters.
    pub media_type: Option<String>,
    pub body: Bytes,
}

/// A blob download in progress. The stream ends with an error item (and nothing after)
/// if the upstream fails or stalls mid-body; the caller verifies the digest.
pub struct UpstreamBlob {
    /// Where the body starts in the blob: the offset asked for, or 0 when the upstream
    /// ignored the `Range` and sent the whole blob.
    pub offset: u64,
    /// `Content-Length` of this response (the remaining bytes when resuming).
    pub size: Option<u64>,
    pub body: Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>,
}

impl std::fmt::Debug for UpstreamBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBlob")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Which page of a tag list to ask for: at most `n` tags after `last`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagsPage {
    pub n: Option<usize>,
    pub last: Option<String>,
}

/// A page of an upstream's tag list, as the upstream sent it.
#[derive(Debug, Clone)]
pub struct UpstreamTags {
    pub content_type: Option<String>,
    /// The raw `Link` header: the next page, at the upstream's path.
    pub link: Option<String>,
    pub body: Bytes,
}

/// An upstream's referrers index of one manifest, as the upstream sent it.
#[derive(Debug, Clone)]
pub struct UpstreamReferrers {
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// A small JSON document's parts.
struct Document {
    content_type: Option<String>,
    link: Option<String>,
    body: Bytes,
}

/// For metrics and health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamHealth {
    pub breaker: BreakerState,
    /// The last `ratelimit-remaining` seen (Docker Hub), if any.
    pub rate_limit_remaining: Option<u64>,
    /// Whether the last attempt to reach it got an answer; `None` before the first.
    pub reachable: Option<bool>,
}

/// A client for one configured upstream. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.inner.name)
            .field("url", &self.inner.base)
            .finish_non_exhaustive()
    }
}

struct Credentials {
    username: String,
    password: Secret,
}

/// Marks "no value" in [`Inner::rate_limit_remaining`].
const NO_RATE_LIMIT: u64 = u64::MAX;

struct Inner {
    /// A digest of the settings and files this client was built from.
    settings: [u8; 32],
    name: String,
    /// Base URL without a trailing slash.
    base: String,
    https: bool,
    client: reqwest::Client,
    credentials: Option<Credentials>,
    connect_timeout: Duration,
    read_timeout: Duration,
    hint: Mutex<AuthHint>,
    tokens: TokenCache,
    breaker: Mutex<Breaker>,
    rate_limit_remaining: AtomicU64,
    /// A revalidation waited in vain (the upstream accepted, then said nothing): until it
    /// answers again, callers serve what they have at once instead of waiting.
    slow: AtomicBool,
    /// The order of the last answer (any status) and of the last failure to get one
    /// (connect error, timeout), from `contacts`; 0 for never. The later one says
    /// whether it is reachable.
    last_answer: AtomicU64,
    last_failure: AtomicU64,
    contacts: AtomicU64,
    /// Unix seconds of the last contact, answered or not (0: never).
    last_contact: AtomicU64,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a single assignment or lookup).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What to present to the upstream.
enum Credential {
    Bearer(Issued),
    Basic,
}

/// One logical request: the method, URL and headers, repeated as the auth flow needs.
struct Call<'a> {
    method: Method,
    url: String,
    /// The repository asked about; `None` for the registry's `_catalog`.
    repo: Option<&'a RepoName>,
    accept: Option<&'a str>,
    /// Sends `Range: bytes=<from>-` when non-zero.
    range_from: u64,
}

impl Call<'_> {
    /// What the call is about, for the log.
    fn target(&self) -> &str {
        self.repo.map_or("_catalog", RepoName::as_str)
    }
}

impl Upstream {
    /// Reads `password_file` (trailing newline trimmed) and the optional `ca` PEM file,
    /// and builds the HTTP client. Reads files, opens no connection.
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, UpstreamError> {
        install_crypto_provider();
        let setup = |msg: String| UpstreamError::Invalid(format!("{}: {msg}", config.name));
        let credentials = read_credentials(config).map_err(setup)?;
        let (roots, ca_pem) = read_ca(config).map_err(setup)?;
        // Everything the client is made of, files included: a reload keeps a client
        // whose settings are unchanged (and with it its breaker, tokens and readings).
        let mut settings = Sha256::new();
        settings.update(format!("{config:?}"));
        if let Some(c) = &credentials {
            settings.update(c.password.expose());
        }
        settings.update(&ca_pem);
        let client = build_client(config, roots).map_err(setup)?;
        Ok(Upstream {
            inner: Arc::new(Inner {
                settings: settings.finalize().into(),
                name: config.name.clone(),
                base: config.url.trim_end_matches('/').to_owned(),
                https: config.url.starts_with("https://"),
                client,
                credentials,
                connect_timeout: config.connect_timeout,
                read_timeout: config.read_timeout,
                hint: Mutex::new(AuthHint::Unknown),
                tokens: TokenCache::default(),
                breaker: Mutex::new(Breaker::new(
                    config.breaker_threshold,
                    config.breaker_cooldown,
                )),
                rate_limit_remaining: AtomicU64::new(NO_RATE_LIMIT),
                slow: AtomicBool::new(false),
                last_answer: AtomicU64::new(0),
                last_failure: AtomicU64::new(0),
                contacts: AtomicU64::new(0),
                last_contact: AtomicU64::new(0),
            }),
        })
    }

    /// The base URL requests go to.
    #[cfg(test)]
    pub fn url(&self) -> &str {
        &self.inner.base
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether `other` was built from the same settings and files as this client.
    pub fn same_settings(&self, other: &Upstream) -> bool {
        self.inner.settings == other.inner.settings
    }

    /// GET or HEAD `/v2/<repo>/manifests/<reference>` with `Accept: <accept>`. `repo` is
    /// the path at the upstream (`library/alpine`).
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &str,
        head: bool,
    ) -> Result<UpstreamManifest, UpstreamError> {
        let call = Call {
            method: if head { Method::HEAD } else { Method::GET },
            url: self.inner.url(repo, &format!("manifests/{reference}")),
            repo: Some(repo),
            accept: Some(accept),
            range_from: 0,
        };
        let inner = &self.inner;
        inner
            .run(&call, |resp| async move {
                let headers = resp.headers();
                let digest = header_str(headers, "docker-content-digest")
                    .and_then(|d| d.trim().parse::<Digest>().ok());
                let media_type = header_str(headers, CONTENT_TYPE.as_str())
                    .map(|c| c.split(';').next().unwrap_or(c).trim().to_owned())
                    .filter(|c| !c.is_empty());
                if head {
                    return Ok(UpstreamManifest {
                        digest,
                        media_type,
                        body: Bytes::new(),
                    });
                }
                let body = inner
                    .read_capped(resp, MAX_MANIFEST_BYTES, "manifest")
                    .await?;
                Ok(UpstreamManifest {
                    digest,
                    media_type,
                    body,
                })
            })
            .await
    }

    /// GET `/v2/<repo>/blobs/<digest>` from byte `offset`, following redirects (CDNs).
    /// With `offset > 0` sends `Range: bytes=<offset>-` and takes a 206 starting there, or
    /// a 200 with the whole blob (an upstream that ignores `Range`: see
    /// [`UpstreamBlob::offset`]).
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<UpstreamBlob, UpstreamError> {
        let call = Call {
            method: Method::GET,
            url: self.inner.url(repo, &format!("blobs/{digest}")),
            repo: Some(repo),
            accept: None,
            range_from: offset,
        };
        let inner = &self.inner;
        inner
            .run(&call, |resp| async move {
                let offset = inner.check_range(&resp, offset)?;
                Ok(UpstreamBlob {
                    offset,
                    size: content_length(resp.headers()),
                    body: Box::pin(body_stream(
                        inner.clone(),
                        resp,
                        repo.clone(),
                        digest.clone(),
                    )),
                })
            })
            .await
    }

    /// HEAD a blob: its size when the upstream has it in that repository.
    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64, UpstreamError> {
        let call = Call {
            method: Method::HEAD,
            url: self.inner.url(repo, &format!("blobs/{digest}")),
            repo: Some(repo),
            accept: None,
            range_from: 0,
        };
        let inner = &self.inner;
        inner
            .run(&call, |resp| async move {
                content_length(resp.headers()).ok_or_else(|| {
                    UpstreamError::Invalid(format!(
                        "{}: blob HEAD without Content-Length",
                        inner.name
                    ))
                })
            })
            .await
    }

    /// GET `/v2/<repo>/tags/list`, one `page` of it. The body is capped at
    /// [`MAX_DOCUMENT_BYTES`].
    pub async fn tags(
        &self,
        repo: &RepoName,
        page: &TagsPage,
    ) -> Result<UpstreamTags, UpstreamError> {
        let tail = format!("tags/list{}", page_query(page));
        let doc = self.document(repo, &tail).await?;
        Ok(UpstreamTags {
            content_type: doc.content_type,
            link: doc.link,
            body: doc.body,
        })
    }

    /// GET `/v2/<repo>/referrers/<digest>`, filtered by `artifact_type` when given (an
    /// upstream may ignore the filter). The body is capped at [`MAX_DOCUMENT_BYTES`].
    pub async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<UpstreamReferrers, UpstreamError> {
        let tail = match artifact_type {
            Some(a) => format!("referrers/{digest}?artifactType={}", escape(a)),
            None => format!("referrers/{digest}"),
        };
        let doc = self.document(repo, &tail).await?;
        Ok(UpstreamReferrers {
            content_type: doc.content_type,
            body: doc.body,
        })
    }

    /// GET `/v2/_catalog`, one `page` of it: the repositories the upstream lists (many
    /// registries refuse this to robots, or answer 404). The body is capped at
    /// [`MAX_DOCUMENT_BYTES`].
    pub async fn catalog(&self, page: &TagsPage) -> Result<UpstreamTags, UpstreamError> {
        let url = format!("{}/v2/_catalog{}", self.inner.base, page_query(page));
        let doc = self.get_document(None, url).await?;
        Ok(UpstreamTags {
            content_type: doc.content_type,
            link: doc.link,
            body: doc.body,
        })
    }

    /// GET a small JSON document at `/v2/<repo>/<tail>`, `tail` already escaped.
    async fn document(&self, repo: &RepoName, tail: &str) -> Result<Document, UpstreamError> {
        self.get_document(Some(repo), self.inner.url(repo, tail))
            .await
    }

    /// GET a small JSON document at `url`, about `repo`.
    async fn get_document(
        &self,
        repo: Option<&RepoName>,
        url: String,
    ) -> Result<Document, UpstreamError> {
        let call = Call {
            method: Method::GET,
            url,
            repo,
            accept: None,
            range_from: 0,
        };
        let inner = &self.inner;
        inner
            .run(&call, |resp| async move {
                let content_type =
                    header_str(resp.headers(), CONTENT_TYPE.as_str()).map(str::to_owned);
                let link = header_str(resp.headers(), LINK.as_str()).map(str::to_owned);
                let body = inner
                    .read_capped(resp, MAX_DOCUMENT_BYTES, "document")
                    .await?;
                Ok(Document {
                    content_type,
                    link,
                    body,
                })
            })
            .await
    }

    /// Marks the upstream slow: a caller waited for an answer in vain. Cleared by the
    /// next answer it gives (to the revalidation still running, say).
    pub fn mark_slow(&self) {
        self.inner.slow.store(true, Ordering::Relaxed);
    }

    /// Whether the upstream is marked slow (see [`Upstream::mark_slow`]).
    pub fn is_slow(&self) -> bool {
        self.inner.slow.load(Ordering::Relaxed)
    }

    /// Breaker state, reachability and the last `ratelimit-remaining` seen.
    pub fn health(&self) -> UpstreamHealth {
        let remaining = self.inner.rate_limit_remaining.load(Ordering::Relaxed);
        let answer = self.inner.last_answer.load(Ordering::Relaxed);
        let failure = self.inner.last_failure.load(Ordering::Relaxed);
        UpstreamHealth {
            breaker: lock(&self.inner.breaker).state(Instant::now()),
            rate_limit_remaining: (remaining != NO_RATE_LIMIT).then_some(remaining),
            reachable: (answer != 0 || failure != 0).then_some(answer > failure),
        }
    }

    /// Seconds since the upstream was last asked anything (answered or not); `None` if
    /// never.
    pub fn idle_secs(&self) -> Option<u64> {
        let last = self.inner.last_contact.load(Ordering::Relaxed);
        (last != 0).then(|| unix_now().saturating_sub(last))
    }

    /// Asks `GET /v2/` without credentials, only to learn whether the upstream answers
    /// (any status counts): keeps `outpost_upstream_up` true to life while no client
    /// asks. Bypasses the breaker, which judges real requests.
    pub async fn probe(&self) {
        let inner = &self.inner;
        let url = format!("{}/v2/", inner.base);
        let timeout = inner.connect_timeout + inner.read_timeout;
        let answered = inner.client.get(url).timeout(timeout).send().await.is_ok();
        inner.contact(answered);
    }
}

/// The current Unix time in seconds.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_credentials(config: &UpstreamConfig) -> Result<Option<Credentials>, String> {
    match (&config.username, &config.password_file) {
        (None, None) => Ok(None),
        (Some(_), None) => Err("username is set but password_file is not".into()),
        (None, Some(_)) => Err("password_file is set but username is not".into()),
        (Some(username), Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read password_file {}: {e}", path.display()))?;
            let password = text.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(format!("password_file {} is empty", path.display()));
            }
            Ok(Some(Credentials {
                username: username.clone(),
                password: Secret::new(password),
            }))
        }
    }
}

/// The certificates of `ca`, and the file's bytes.
fn read_ca(config: &UpstreamConfig) -> Result<(Vec<reqwest::Certificate>, Vec<u8>), String> {
    let Some(path) = &config.ca else {
        return Ok((Vec::new(), Vec::new()));
    };
    let pem = std::fs::read(path).map_err(|e| format!("cannot read ca {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("ca {} is not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("ca {} holds no certificate", path.display()));
    }
    Ok((certs, pem))
}

fn build_client(
    config: &UpstreamConfig,
    roots: Vec<reqwest::Certificate>,
) -> Result<reqwest::Client, String> {
    let builder = || {
        let b = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(config.connect_timeout)
            // The default redirect policy (at most 10 hops) drops Authorization, Cookie and
            // Proxy-Authorization whenever the host, port or scheme changes: a CDN never
            // sees the registry's credentials. No Referer either.
            .referer(false)
            .tcp_keepalive(Duration::from_secs(60));
        // No reqwest read_timeout: it also runs while the *consumer* is not reading a
        // body, so a slow client downstream would look like a stalled upstream. Stalls
        // are timed in `send` and `next_chunk`, only while we wait on the upstream.
        #[cfg(test)]
        let b = b.no_proxy(); // tests talk to loopback whatever the environment says
        b
    };
    match builder().tls_certs_merge(roots.clone()).build() {
        Ok(c) => Ok(c),
        // No system trust store: a plain-http upstream still works (redirects to https
        // then need `ca`); an https one cannot.
        Err(e) if config.url.starts_with("http://") => {
            tracing::warn!(
                upstream = %config.name,
                error = %error_chain(&e),
                "no system CA certificates; https redirects will only trust `ca`"
            );
            builder()
                .tls_certs_only(roots)
                .build()
                .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))
        }
        Err(e) => Err(format!("cannot build the HTTP client: {}", error_chain(&e))),
    }
}

impl Inner {
    fn url(&self, repo: &RepoName, tail: &str) -> String {
        format!("{}/v2/{repo}/{tail}", self.base)
    }

    /// Records whether a call reached the upstream: an answer of any status, or a
    /// failure to get one (refused, reset, timed out).
    fn note_reach<T>(&self, answered: bool, result: &Result<T, UpstreamError>) {
        if answered || matches!(result, Err(UpstreamError::Unavailable(_))) {
            self.contact(answered);
        }
    }

    /// Records one contact with the upstream, answered or not.
    fn contact(&self, answered: bool) {
        let order = self.contacts.fetch_add(1, Ordering::Relaxed) + 1;
        let last = if answered {
            &self.last_answer
        } else {
            &self.last_failure
        };
        last.store(order, Ordering::Relaxed);
        self.last_contact.store(unix_now(), Ordering::Relaxed);
    }

    /// The breaker's permission for one call.
    fn admit(&self) -> Result<Permit<'_>, UpstreamError> {
        match lock(&self.breaker).admit(Instant::now()) {
            Ok(admission) => Ok(Permit {
                inner: self,
                admission,
                settled: false,
            }),
            Err(Refusal::Open {
                retry_in,
                rate_limited: true,
            }) => Err(UpstreamError::RateLimited {
                retry_after: Some(retry_in),
            }),
            Err(Refusal::Open { retry_in, .. }) => Err(UpstreamError::CircuitOpen {
                message: format!(
                    "circuit open for {} after repeated failures; next attempt in {}s",
                    self.name,
                    retry_in.as_secs() + 1
                ),
                retry_after: retry_in + Duration::from_secs(1),
            }),
            // A probe decides within the read timeout; ask clients to come back after a
            // second rather than hold them.
            Err(Refusal::Probing) => Err(UpstreamError::CircuitOpen {
                message: format!(
                    "circuit open for {}: half-open, a probe request is in flight",
                    self.name
                ),
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Runs one call through the breaker, the auth flow and the status mapping; `finish`
    /// turns a successful response into the result.
    async fn run<'a, T, F, Fut>(&'a self, call: &Call<'_>, finish: F) -> Result<T, UpstreamError>
    where
        F: FnOnce(reqwest::Response) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>> + 'a,
    {
        let started = Instant::now();
        let permit = match self.admit() {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(
                    upstream = %self.name, repo = call.target(), error = %e,
                    "upstream call refused"
                );
                return Err(e);
            }
        };
        let mut status = None;
        let result = async {
            let resp = self.call(call).await?;
            status = Some(resp.status().as_u16());
            if let Some(e) = self.status_error(&resp) {
                return Err(e);
            }
            finish(resp).await
        }
        .await;
        permit.settle(&result);
        if status.is_some() {
            // The upstream answered: whatever it said, it is not hung.
            self.slow.store(false, Ordering::Relaxed);
        }
        self.note_reach(status.is_some(), &result);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(_) | Err(UpstreamError::NotFound | UpstreamError::Denied) => tracing::debug!(
                upstream = %self.name, repo = call.target(), method = %call.method, status, elapsed_ms,
                "upstream request"
            ),
            Err(e) => tracing::warn!(
                upstream = %self.name, repo = call.target(), method = %call.method, status, elapsed_ms,
                error = %e, "upstream request failed"
            ),
        }
        result
    }

    /// Sends `call`, answering one auth challenge: a Bearer challenge with a token for
    /// `repository:<repo>:pull`, a Basic one with the configured credentials.
    async fn call(&self, call: &Call<'_>) -> Result<reqwest::Response, UpstreamError> {
        let scope = match call.repo {
            Some(repo) => format!("repository:{repo}:pull"),
            None => "registry:catalog:*".to_owned(),
        };
        let sent = self.upfront_credential(&scope).await?;
        let resp = self.send(|| self.request(call, sent.as_ref())).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenges: Vec<Challenge> = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(challenge::parse)
            .collect();
        match self.answer(&challenges, &scope, sent.as_ref()).await? {
            Some(next) => self.send(|| self.request(call, Some(&next))).await,
            None => Ok(resp),
        }
    }

    /// What to send before any challenge, from what this upstream asked for last time.
    async fn upfront_credential(&self, scope: &str) -> Result<Option<Credential>, UpstreamError> {
        let hint = lock(&self.hint).clone();
        Ok(match hint {
            AuthHint::Bearer(realm) => Some(Credential::Bearer(
                self.tokens
                    .get_or_fetch(scope, None, || self.fetch_token(&realm, scope))
                    .await?,
            )),
            AuthHint::Basic if self.credentials.is_some() => Some(Credential::Basic),
            AuthHint::Basic | AuthHint::Unknown => None,
        })
    }

    /// The credential answering a 401's challenges, or None when retrying cannot help.
    async fn answer(
        &self,
        challenges: &[Challenge],
        scope: &str,
        sent: Option<&Credential>,
    ) -> Result<Option<Credential>, UpstreamError> {
        let bearer = BearerRealm::from_challenges(challenges);
        if let Some(realm) = bearer {
            let hint = AuthHint::Bearer(realm.clone());
            let same_realm = std::mem::replace(&mut *lock(&self.hint), hint.clone()) == hint;
            let reject = match sent {
                // Fetched from this realm for this very request and refused: another
                // fetch will not help.
                Some(Credential::Bearer(issued)) if issued.fetched && same_realm => {
                    return Ok(None);
                }
                // Cached (perhaps revoked), or from a realm the upstream no longer uses.
                Some(Credential::Bearer(issued)) => Some(&issued.token),
                _ => None,
            };
            let issued = self
                .tokens
                .get_or_fetch(scope, reject, || self.fetch_token(&realm, scope))
                .await?;
            return Ok(Some(Credential::Bearer(issued)));
        }
        if challenges.iter().any(|c| c.scheme == "basic") && self.credentials.is_some() {
            *lock(&self.hint) = AuthHint::Basic;
            if !matches!(sent, Some(Credential::Basic)) {
                return Ok(Some(Credential::Basic));
            }
        }
        Ok(None)
    }

    fn request(&self, call: &Call<'_>, credential: Option<&Credential>) -> reqwest::RequestBuilder {
        let mut r = self.client.request(call.method.clone(), &call.url);
        if let Some(accept) = call.accept {
            r = r.header(ACCEPT, accept);
        }
        if call.range_from > 0 {
            r = r.header(RANGE, format!("bytes={}-", call.range_from));
        }
        match (credential, &self.credentials) {
            (Some(Credential::Bearer(issued)), _) => r.bearer_auth(issued.token.expose()),
            (Some(Credential::Basic), Some(c)) => {
                r.basic_auth(&c.username, Some(c.password.expose()))
            }
            _ => r,
        }
    }

    /// Sends a request until response headers arrive, within connect plus read timeout.
    /// A request that failed to connect, or whose connection was reset before any
    /// response byte (a stale pooled connection), is sent once more; all our requests are
    /// GET or HEAD, so that is safe. Nothing is retried once a response has begun.
    async fn send(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        let limit = self.connect_timeout + self.read_timeout;
        let mut retried = false;
        loop {
            match tokio::time::timeout(limit, build().send()).await {
                Err(_) => {
                    return Err(UpstreamError::Unavailable(format!(
                        "{}: no response within {}",
                        self.name,
                        humantime::format_duration(limit)
                    )));
                }
                Ok(Ok(resp)) => {
                    self.note_rate_limit(resp.headers());
                    return Ok(resp);
                }
                Ok(Err(e)) if !retried && is_retryable(&e) => {
                    tracing::debug!(
                        upstream = %self.name, error = %error_chain(&e),
                        "connection failed before any response; retrying once"
                    );
                    retried = true;
                }
                Ok(Err(e)) => return Err(self.transport_error(&e)),
            }
        }
    }

    fn note_rate_limit(&self, headers: &HeaderMap) {
        if let Some(n) = header_str(headers, "ratelimit-remaining").and_then(parse_rate_limit) {
            self.rate_limit_remaining
                .store(n.min(NO_RATE_LIMIT - 1), Ordering::Relaxed);
        }
    }

    /// Maps a non-success status to an error (None for 2xx). A `Retry-After` on 429 or
    /// 503 holds the breaker open until then.
    fn status_error(&self, resp: &reqwest::Response) -> Option<UpstreamError> {
        let status = resp.status();
        let retry_after = || {
            header_str(resp.headers(), RETRY_AFTER.as_str())
                .and_then(|v| parse_retry_after(v, SystemTime::now()))
        };
        let hold = |delay: Option<Duration>, rate_limited: bool| {
            if let Some(d) = delay {
                lock(&self.breaker).hold(Instant::now(), d, rate_limited);
            }
        };
        Some(match status {
            s if s.is_success() => return None,
            StatusCode::NOT_FOUND => UpstreamError::NotFound,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => UpstreamError::Denied,
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = retry_after();
                hold(retry_after, true);
                UpstreamError::RateLimited { retry_after }
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                let delay = retry_after();
                hold(delay, false);
                UpstreamError::Unavailable(format!(
                    "{}: answered {status}{}",
                    self.name,
                    retry_hint(delay)
                ))
            }
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                UpstreamError::Unavailable(format!("{}: answered {status}", self.name))
            }
            _ => UpstreamError::Invalid(format!("{}: unexpected status {status}", self.name)),
        })
    }

    /// A blob answer must be 200 from the start, or 206 from exactly `offset`.
    fn check_range(&self, resp: &reqwest::Response, offset: u64) -> Result<u64, UpstreamError> {
        let invalid = |m: String| UpstreamError::Invalid(format!("{}: {m}", self.name));
        let status = resp.status();
        if status == StatusCode::OK {
            // The whole blob: asked for, or the upstream ignores `Range`.
            return Ok(0);
        }
        if offset == 0 {
            return Err(invalid(format!("blob GET answered {status}, expected 200")));
        }
        if status != StatusCode::PARTIAL_CONTENT {
            return Err(invalid(format!(
                "asked for bytes={offset}- and got {status} instead of 206"
            )));
        }
        match header_str(resp.headers(), CONTENT_RANGE.as_str()).and_then(content_range_start) {
            Some(start) if start == offset => Ok(offset),
            Some(start) => Err(invalid(format!(
                "asked for bytes={offset}- and got a range starting at {start}"
            ))),
            None => Err(invalid("206 without a valid Content-Range".into())),
        }
    }

    /// The next body chunk, or an error if the upstream stays silent for `read_timeout`.
    /// The timer runs only while we wait on the upstream, not while the consumer is busy.
    async fn next_chunk(
        &self,
        resp: &mut reqwest::Response,
    ) -> Result<Option<Bytes>, UpstreamError> {
        match tokio::time::timeout(self.read_timeout, resp.chunk()).await {
            Err(_) => Err(UpstreamError::Unavailable(format!(
                "{}: body stalled for {}",
                self.name,
                humantime::format_duration(self.read_timeout)
            ))),
            Ok(Err(e)) => Err(self.transport_error(&e)),
            Ok(Ok(chunk)) => Ok(chunk),
        }
    }

    /// Reads a whole body of at most `cap` bytes; more is a protocol violation.
    async fn read_capped(
        &self,
        mut resp: reqwest::Response,
        cap: usize,
        what: &str,
    ) -> Result<Bytes, UpstreamError> {
        let too_big = |n: u64| {
            UpstreamError::Invalid(format!(
                "{}: {what} of {n} bytes exceeds the limit of {cap}",
                self.name
            ))
        };
        let declared = content_length(resp.headers());
        if let Some(n) = declared.filter(|&n| n > cap as u64) {
            return Err(too_big(n));
        }
        let mut buf = BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
        while let Some(chunk) = self.next_chunk(&mut resp).await? {
            if buf.len() + chunk.len() > cap {
                return Err(too_big((buf.len() + chunk.len()) as u64));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    fn transport_error(&self, e: &reqwest::Error) -> UpstreamError {
        let chain = error_chain(e);
        let name = &self.name;
        if e.is_timeout() {
            UpstreamError::Unavailable(format!("{name}: timed out: {chain}"))
        } else if e.is_connect() {
            UpstreamError::Unavailable(format!("{name}: cannot connect: {chain}"))
        } else if e.is_redirect() || e.is_builder() {
            UpstreamError::Invalid(format!("{name}: {chain}"))
        } else {
            UpstreamError::Unavailable(format!("{name}: connection failed: {chain}"))
        }
    }
}

/// The breaker's permission for one call; reports the outcome once. Dropped unsettled
/// (the caller went away), it frees the probe slot instead of counting a failure.
struct Permit<'a> {
    inner: &'a Inner,
    admission: Admission,
    settled: bool,
}

impl Permit<'_> {
    fn settle<T>(mut self, result: &Result<T, UpstreamError>) {
        self.settled = true;
        let mut breaker = lock(&self.inner.breaker);
        match result {
            Err(e) if e.is_outage() => breaker.failure(Instant::now(), self.admission),
            // 404, 401/403 and protocol errors: the upstream is there and answering.
            _ => breaker.success(self.admission),
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled {
            lock(&self.inner.breaker).abandon(self.admission);
        }
    }
}

/// A blob body as a stream of chunks; a mid-body failure is reported to the breaker and
/// ends the stream after one error item.
fn body_stream(
    inner: Arc<Inner>,
    resp: reqwest::Response,
    repo: RepoName,
    digest: Digest,
) -> impl Stream<Item = Result<Bytes, UpstreamError>> + Send {
    let state = Some((inner, resp, repo, digest));
    futures_util::stream::unfold(state, |state| async move {
        let (inner, mut resp, repo, digest) = state?;
        match inner.next_chunk(&mut resp).await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some((inner, resp, repo, digest)))),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(
                    upstream = %inner.name, repo = %repo, digest = %digest, error = %e,
                    "upstream blob body failed"
                );
                lock(&inner.breaker).failure(Instant::now(), Admission::Normal);
                Some((Err(e), None))
            }
        }
    })
}

/// Percent-encodes a query value: everything but RFC 3986's unreserved characters.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, CONTENT_LENGTH.as_str()).and_then(|v| v.trim().parse().ok())
}

/// The first byte of `Content-Range: bytes <start>-<end>/<total>`.
fn content_range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes ")?;
    let (start, rest) = range.split_once('-')?;
    let (end, _total) = rest.split_once('/')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    (start <= end).then_some(start)
}

/// Docker Hub's `ratelimit-remaining: 100;w=21600` → 100.
pub fn parse_rate_limit(value: &str) -> Option<u64> {
    value.split(';').next()?.trim().parse().ok()
}

/// `Retry-After` as delay-seconds or an HTTP date (relative to `now`), at most
/// [`MAX_RETRY_AFTER`]. A date in the past is zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits but too large for u64 is still "a very long time".
        Duration::from_secs(value.parse().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Whether a failed send may be repeated: the connection could not be made (but did not
/// time out), or it died before any response byte arrived.
fn is_retryable(e: &reqwest::Error) -> bool {
    if e.is_timeout() {
        return false;
    }
    if e.is_connect() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// An error and its causes on one line, without the URL (a CDN redirect URL can carry a
/// signature in its query).
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = String::new();
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        let text = match err.downcast_ref::<reqwest::Error>() {
            Some(re) if re.url().is_some() => strip_url(re),
            _ => err.to_string(),
        };
        if !text.is_empty() && !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        current = err.source();
    }
    out
}

/// A reqwest error's own message without its URL.
fn strip_url(e: &reqwest::Error) -> String {
    let text = e.to_string();
    match e.url() {
        Some(url) => text
            .replace(&format!(" for url ({url})"), "")
            .replace(url.as_str(), "<url>"),
        None => text,
    }
}
