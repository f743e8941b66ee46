//! An in-process fake upstream registry for the faults a real server will not produce on
//! demand: connections reset mid-body, stalls, wrong bytes, short bodies, 5xx, 429 with
//! `Retry-After`, slow streaming, and going down and coming back on the same port.
//!
//! It serves the pull side of the distribution API from content the test registers
//! (`/v2/`, manifests by tag and digest, blobs by digest, tag lists; GET and HEAD; `Range`
//! `bytes=N-` and `bytes=N-M`), counts requests per (method, path), and records every
//! request with its query and headers. Faults are set per path at any time and apply to
//! GET and HEAD alike (body faults only matter to GET). It runs on its own thread and
//! runtime, so sync and async tests use it alike; it stops on drop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use outpost::oci::Digest;
use tokio::sync::watch;

use super::serve::{self, Body, BodySender, Conn, HttpServer, RangeAnswer};

/// A misbehaviour for the requests to one path.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status, headers and body instead of the content.
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Send nothing at all — not even headers — until [`FakeUpstream::release_stalls`]
    /// (then answer normally) or until the fake goes down or stops.
    Stall,
    /// Send the headers (full `Content-Length`) and the first N body bytes, then nothing
    /// until [`FakeUpstream::release_stalls`] (then the rest) or until the fake goes down.
    StallAfter(usize),
    /// Send the headers (full `Content-Length`) and the first N body bytes, then close the
    /// connection with a TCP RST.
    ResetAfter(usize),
    /// Send the headers (full `Content-Length`) and the first N body bytes, then close the
    /// connection cleanly (FIN): a body shorter than its `Content-Length`.
    ShortBody(usize),
    /// Right length and headers (`Docker-Content-Digest` included), wrong content: the last
    /// byte is flipped, so only a digest check at the end can notice.
    WrongBytes,
    /// The body in chunks of `chunk` bytes, waiting `delay` before every chunk but the
    /// first (so a reader gets the first bytes at once and the last ones much later).
    Slow { chunk: usize, delay: Duration },
}

impl Fault {
    /// A bare status (500, 502, 503 …) with a short text body.
    pub fn status(status: u16) -> Fault {
        Fault::Status {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: format!("injected {status}"),
        }
    }

    /// 429 with `Retry-After: SECS` and Docker Hub's `TOOMANYREQUESTS` error body.
    pub fn too_many_requests(retry_after_secs: u64) -> Fault {
        Fault::Status {
            status: 429,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("retry-after".into(), retry_after_secs.to_string()),
            ],
            body: r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#.into(),
        }
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct FakeRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

/// What [`FakeUpstream::add_image`] registered.
#[derive(Clone, Debug)]
pub struct FakeImage {
    pub manifest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub config: Digest,
    pub layers: Vec<Digest>,
}

struct FaultEntry {
    fault: Fault,
    /// `None`: until cleared.
    remaining: Option<usize>,
}

#[derive(Default)]
struct Content {
    /// (repo, digest) → bytes.
    blobs: HashMap<(String, String), Bytes>,
    /// (repo, tag or digest) → (media type, bytes).
    manifests: HashMap<(String, String), (String, Bytes)>,
}

struct State {
    content: Mutex<Content>,
    /// Path (or `prefix*`) → fault.
    faults: Mutex<HashMap<String, FaultEntry>>,
    counts: Mutex<HashMap<(String, String), usize>>,
    requests: Mutex<Vec<FakeRequest>>,
    extra_headers: Mutex<Vec<(String, String)>>,
    /// Bumped by `release_stalls`; stalled requests wait for it to change.
    release: watch::Sender<u64>,
    stalls_reached: AtomicUsize,
}

/// A running fake upstream; stopped on drop.
pub struct FakeUpstream {
    server: HttpServer,
    state: Arc<State>,
}

impl FakeUpstream {
    pub fn start() -> FakeUpstream {
        let state = Arc::new(State {
            content: Mutex::default(),
            faults: Mutex::default(),
            counts: Mutex::default(),
            requests: Mutex::default(),
            extra_headers: Mutex::default(),
            release: watch::Sender::new(0),
            stalls_reached: AtomicUsize::new(0),
        });
        let s = state.clone();
        let server = HttpServer::start(
            "fake-upstream",
            Arc::new(move |req, conn| Box::pin(handle(s.clone(), req, conn))),
        );
        FakeUpstream { server, state }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.server.addr().to_string()
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// Registers a blob in `repo`; returns its digest.
    pub fn add_blob(&self, repo: &str, content: impl Into<Bytes>) -> Digest {
        let content = content.into();
        let digest = Digest::sha256_of(&content);
        lock(&self.state.content)
            .blobs
            .insert((repo.to_owned(), digest.to_string()), content);
        digest
    }

    /// Registers a manifest in `repo` under its digest and under `tag` (moving the tag if
    /// it existed); returns the digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        content: impl Into<Bytes>,
    ) -> Digest {
        let content = content.into();
        let digest = Digest::sha256_of(&content);
        let mut c = lock(&self.state.content);
        for reference in [digest.to_string(), tag.to_owned()] {
            c.manifests.insert(
                (repo.to_owned(), reference),
                (media_type.to_owned(), content.clone()),
            );
        }
        digest
    }

    /// Registers an OCI image (a config and layers of the given sizes, content from
    /// `seed`) under `repo:tag`.
    pub fn add_image(&self, repo: &str, tag: &str, seed: u64, layer_sizes: &[usize]) -> FakeImage {
        let layers: Vec<(Digest, usize)> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let blob = super::gzip_stored(&super::bytes(seed * 100 + i as u64, n));
                let len = blob.len();
                (self.add_blob(repo, blob), len)
            })
            .collect();
        let config = serde_json::json!({"architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []}, "seed": seed})
        .to_string();
        let config_len = config.len();
        let config_digest = self.add_blob(repo, config);
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": super::OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest.to_string(), "size": config_len},
            "layers": layers.iter().map(|(d, s)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d.to_string(), "size": s})).collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes();
        let digest = self.add_manifest(repo, tag, super::OCI_MANIFEST, manifest.clone());
        FakeImage {
            manifest: digest,
            manifest_bytes: manifest,
            config: config_digest,
            layers: layers.into_iter().map(|(d, _)| d).collect(),
        }
    }

    /// Forgets a tag or a manifest by digest (then 404 MANIFEST_UNKNOWN).
    pub fn remove_manifest(&self, repo: &str, reference: &str) {
        lock(&self.state.content)
            .manifests
            .remove(&(repo.to_owned(), reference.to_owned()));
    }

    /// Forgets a blob (then 404 BLOB_UNKNOWN).
    pub fn remove_blob(&self, repo: &str, digest: &Digest) {
        lock(&self.state.content)
            .blobs
            .remove(&(repo.to_owned(), digest.to_string()));
    }

    /// `/v2/<repo>/blobs/<digest>`, the key for faults and counts.
    pub fn blob_path(repo: &str, digest: &Digest) -> String {
        format!("/v2/{repo}/blobs/{digest}")
    }

    /// `/v2/<repo>/manifests/<reference>`, the key for faults and counts.
    pub fn manifest_path(repo: &str, reference: &str) -> String {
        format!("/v2/{repo}/manifests/{reference}")
    }

    /// Every request to `path` (exact, without query; or a prefix ending in `*`, `*` alone
    /// for all) meets `fault` until cleared. Replaces the path's previous fault.
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.insert_fault(path, fault, None);
    }

    /// Only the next `times` requests to `path` meet `fault`; later ones are served
    /// normally.
    pub fn set_fault_times(&self, path: &str, fault: Fault, times: usize) {
        self.insert_fault(path, fault, Some(times));
    }

    fn insert_fault(&self, path: &str, fault: Fault, remaining: Option<usize>) {
        let mut faults = lock(&self.state.faults);
        if remaining == Some(0) {
            faults.remove(path);
        } else {
            faults.insert(path.to_owned(), FaultEntry { fault, remaining });
        }
    }

    pub fn clear_fault(&self, path: &str) {
        lock(&self.state.faults).remove(path);
    }

    pub fn clear_faults(&self) {
        lock(&self.state.faults).clear();
    }

    /// Headers added to every non-fault response (e.g. `ratelimit-remaining`).
    pub fn set_response_headers(&self, headers: &[(&str, &str)]) {
        *lock(&self.state.extra_headers) = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// Lets every request held by `Stall` or `StallAfter` go on.
    pub fn release_stalls(&self) {
        self.state.release.send_modify(|g| *g += 1);
    }

    /// How many requests have reached a `Stall`/`StallAfter` point so far (for a
    /// `StallAfter`, once its first bytes were handed to the connection).
    pub fn stalls_reached(&self) -> usize {
        self.state.stalls_reached.load(Ordering::SeqCst)
    }

    /// Down: connections are refused and open ones are cut. Up: serving again on the same
    /// port, with the same content, faults and counters. Returns once done.
    pub fn set_down(&self, down: bool) {
        self.server.set_down(down);
    }

    /// How many `method` requests went to exactly `path` (query ignored).
    pub fn count(&self, method: &str, path: &str) -> usize {
        lock(&self.state.counts)
            .get(&(method.to_ascii_uppercase(), path.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<FakeRequest> {
        lock(&self.state.requests).clone()
    }

    /// Zeroes the counts and the request log.
    pub fn reset_counts(&self) {
        lock(&self.state.counts).clear();
        lock(&self.state.requests).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A test that panicked while holding a lock should not hide its own message behind a
    // poisoning panic here.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The fault for `path`, using up one of a limited fault's turns.
fn take_fault(state: &State, path: &str) -> Option<Fault> {
    let mut faults = lock(&state.faults);
    let key = if faults.contains_key(path) {
        path.to_owned()
    } else {
        faults
            .keys()
            .filter(|k| k.strip_suffix('*').is_some_and(|p| path.starts_with(p)))
            .max_by_key(|k| k.len())?
            .clone()
    };
    let entry = faults.get_mut(&key)?;
    let fault = entry.fault.clone();
    match &mut entry.remaining {
        None => {}
        Some(n) => {
            *n -= 1;
            if *n == 0 {
                faults.remove(&key);
            }
        }
    }
    Some(fault)
}

enum Route {
    Base,
    Manifest(String, String),
    Blob(String, String),
    Tags(String),
    Unknown,
}

fn route(path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return if path == "/v2" {
            Route::Base
        } else {
            Route::Unknown
        };
    };
    if rest.is_empty() {
        return Route::Base;
    }
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        return Route::Tags(repo.to_owned());
    }
    for (marker, blob) in [("/manifests/", false), ("/blobs/", true)] {
        if let Some((repo, reference)) = rest.rsplit_once(marker) {
            return if blob {
                Route::Blob(repo.to_owned(), reference.to_owned())
            } else {
                Route::Manifest(repo.to_owned(), reference.to_owned())
            };
        }
    }
    Route::Unknown
}

async fn handle(state: Arc<State>, req: Request<Incoming>, conn: Conn) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    lock(&state.requests).push(FakeRequest {
        method: method.as_str().to_owned(),
        path: path.clone(),
        query: req.uri().query().map(str::to_owned),
        headers: req.headers().clone(),
    });
    *lock(&state.counts)
        .entry((method.as_str().to_owned(), path.clone()))
        .or_insert(0) += 1;

    let fault = take_fault(&state, &path);
    // The connection is being cut when a wait ends early: the answer goes nowhere.
    let going_down = || error(503, "UNAVAILABLE", "fake going down");
    match &fault {
        Some(Fault::Delay(d)) => {
            tokio::select! {
                _ = tokio::time::sleep(*d) => {}
                _ = conn.closing.cancelled() => return going_down(),
            }
        }
        Some(Fault::Stall) => {
            let released = stall(&state, &conn, None).await;
            if !released {
                return going_down();
            }
        }
        Some(Fault::Status {
            status,
            headers,
            body,
        }) => {
            let mut r = Response::builder().status(*status);
            for (k, v) in headers {
                r = r.header(k, v);
            }
            return r.body(serve::full(body.clone())).expect("response");
        }
        _ => {}
    }
    if method != Method::GET && method != Method::HEAD {
        return error(405, "UNSUPPORTED", "the fake serves GET and HEAD only");
    }

    let (content_type, content, digest) = match route(&path) {
        Route::Base => {
            return with_extra(&state, Response::builder().status(200))
                .header("content-type", "application/json")
                .body(serve::full("{}"))
                .expect("response");
        }
        Route::Tags(repo) => {
            let mut tags: Vec<String> = lock(&state.content)
                .manifests
                .keys()
                .filter(|(r, t)| *r == repo && !t.starts_with("sha256:"))
                .map(|(_, t)| t.clone())
                .collect();
            if tags.is_empty() {
                return error(404, "NAME_UNKNOWN", "repository name not known to registry");
            }
            tags.sort();
            let body = serde_json::json!({"name": repo, "tags": tags}).to_string();
            return with_extra(&state, Response::builder().status(200))
                .header("content-type", "application/json")
                .body(serve::full(body))
                .expect("response");
        }
        Route::Manifest(repo, reference) => {
            let found = lock(&state.content)
                .manifests
                .get(&(repo, reference))
                .cloned();
            let Some((media_type, bytes)) = found else {
                return error(404, "MANIFEST_UNKNOWN", "manifest unknown");
            };
            let digest = Digest::sha256_of(&bytes);
            (media_type, bytes, digest)
        }
        Route::Blob(repo, digest) => {
            let found = lock(&state.content).blobs.get(&(repo, digest)).cloned();
            let Some(bytes) = found else {
                return error(404, "BLOB_UNKNOWN", "blob unknown to registry");
            };
            let digest = Digest::sha256_of(&bytes);
            ("application/octet-stream".to_owned(), bytes, digest)
        }
        Route::Unknown => return error(404, "NOT_FOUND", "no such route"),
    };

    let len = content.len() as u64;
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (status, body) = match serve::range_answer(range, len) {
        RangeAnswer::Full => (200, content),
        RangeAnswer::Partial(start, end) => (206, content.slice(start as usize..=end as usize)),
        RangeAnswer::Unsatisfiable => {
            return Response::builder()
                .status(416)
                .header("content-range", format!("bytes */{len}"))
                .body(serve::empty())
                .expect("response");
        }
    };
    let mut r = with_extra(&state, Response::builder().status(status))
        .header("content-type", content_type)
        .header("docker-content-digest", digest.to_string())
        .header("etag", format!("\"{digest}\""))
        .header("accept-ranges", "bytes")
        .header("content-length", body.len());
    if status == 206 {
        r = r.header(
            "content-range",
            format!("bytes {}-{}/{len}", len - body.len() as u64, len - 1),
        );
    }
    let body = if method == Method::HEAD {
        serve::empty()
    } else {
        faulty_body(state, conn, fault, body)
    };
    r.body(body).expect("response")
}

fn with_extra(
    state: &State,
    mut r: hyper::http::response::Builder,
) -> hyper::http::response::Builder {
    r = r.header("docker-distribution-api-version", "registry/2.0");
    for (k, v) in lock(&state.extra_headers).iter() {
        r = r.header(k, v);
    }
    r
}

fn error(status: u16, code: &str, message: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).expect("status"))
        .header("content-type", "application/json")
        .header("docker-distribution-api-version", "registry/2.0")
        .body(serve::full(
            serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string(),
        ))
        .expect("response")
}

/// Waits for `release_stalls` (true), or for the connection to go away or the fake to go
/// down (false).
async fn stall(state: &State, conn: &Conn, tx: Option<&BodySender>) -> bool {
    let mut release = state.release.subscribe();
    state.stalls_reached.fetch_add(1, Ordering::SeqCst);
    let closed = async {
        match tx {
            Some(tx) => tx.closed().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        changed = release.changed() => changed.is_ok(),
        _ = closed => false,
        _ = conn.closing.cancelled() => false,
    }
}

/// Lets hyper write what it was handed before the connection is cut, so the client really
/// receives the bytes before the fault.
const FLUSH_PAUSE: Duration = Duration::from_millis(100);

fn faulty_body(state: Arc<State>, conn: Conn, fault: Option<Fault>, content: Bytes) -> Body {
    let fault = match fault {
        None | Some(Fault::Delay(_) | Fault::Stall | Fault::Status { .. }) => {
            return serve::full(content);
        }
        Some(Fault::WrongBytes) => {
            let mut wrong = content.to_vec();
            if let Some(last) = wrong.last_mut() {
                *last ^= 0xff;
            }
            return serve::full(wrong);
        }
        Some(f) => f,
    };
    let (tx, body) = serve::channel_body();
    tokio::spawn(async move {
        let send = |b: Bytes| {
            let tx = tx.clone();
            async move { tx.send(Ok(Frame::data(b))).await.is_ok() }
        };
        let split = |n: usize| {
            (
                content.slice(..n.min(content.len())),
                content.slice(n.min(content.len())..),
            )
        };
        match fault {
            Fault::StallAfter(n) => {
                let (head, tail) = split(n);
                if !head.is_empty() && !send(head).await {
                    return;
                }
                tokio::time::sleep(FLUSH_PAUSE).await;
                if stall(&state, &conn, Some(&tx)).await && !tail.is_empty() {
                    send(tail).await;
                }
            }
            Fault::ResetAfter(n) => {
                let (head, _) = split(n);
                if !head.is_empty() && !send(head).await {
                    return;
                }
                tokio::time::sleep(FLUSH_PAUSE).await;
                conn.reset_on_close();
                let _ = tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected reset",
                    )))
                    .await;
            }
            Fault::ShortBody(n) => {
                let (head, _) = split(n);
                if !head.is_empty() && !send(head).await {
                    return;
                }
                tokio::time::sleep(FLUSH_PAUSE).await;
                // Dropping the sender ends the body before its Content-Length: hyper then
                // closes the connection.
            }
            Fault::Slow { chunk, delay } => {
                for (i, piece) in content.chunks(chunk.max(1)).enumerate() {
                    if i > 0 {
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = conn.closing.cancelled() => return,
                        }
                    }
                    if !send(content.slice_ref(piece)).await {
                        return;
                    }
                }
            }
            Fault::Delay(_) | Fault::Stall | Fault::Status { .. } | Fault::WrongBytes => {}
        }
    });
    body
}
