//! Listeners and connection serving: plain HTTP/1.1 + h2c, TLS with ALPN, and the HTTP/3
//! endpoints (`http3`) beside them. Timeouts (first byte, TLS handshake, headers, write
//! progress), size limits and the connection limit (shared by all three) are set here;
//! accept errors back off; graceful drain on shutdown. TLS responses advertise HTTP/3
//! (`Alt-Svc`) when it is served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Request, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::{FileSender, RequestBody};
use super::deadline::WriteDeadline;
use super::tls::TlsSettings;
use super::zerocopy::{FileQueue, SendfileStream};
use super::{State, handle, http3};

/// Sockets bound by the caller (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub plain: Vec<TcpListener>,
    pub tls: Vec<TcpListener>,
}

/// How long a TLS handshake may take before the connection is dropped.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn builder(state: &State) -> auto::Builder<TokioExecutor> {
    let cfg = &state.config.server;
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Body chunks are queued and written by reference, never copied: the zero-copy
        // path (`zerocopy`) relies on it.
        .writev(true)
        .header_read_timeout(cfg.header_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// The HTTP/3 endpoints for `listeners`' TLS ports (UDP), when `server.tls.http3` is on.
pub fn bind_http3(
    state: &State,
    listeners: &Listeners,
    tls: Option<&TlsSettings>,
) -> std::io::Result<Vec<quinn::Endpoint>> {
    let (Some(tls), Some(true)) = (tls, state.config.server.tls.as_ref().map(|t| t.http3)) else {
        return Ok(Vec::new());
    };
    listeners
        .tls
        .iter()
        .map(|l| {
            let addr = l.local_addr()?;
            http3::endpoint(addr, tls, &state.config.server)
                .map_err(|e| std::io::Error::new(e.kind(), format!("HTTP/3 on UDP {addr}: {e}")))
        })
        .collect()
}

/// Serves until `shutdown` is cancelled, then drains connections for at most the
/// configured grace period. `quic` are the HTTP/3 endpoints ([`bind_http3`]).
pub async fn serve(
    state: State,
    listeners: Listeners,
    tls: Option<TlsSettings>,
    quic: Vec<quinn::Endpoint>,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let tracker = TaskTracker::new();
    let limits = Arc::new(Limits::new(state.config.server.max_connections));
    // HTTP/3 drains on its own, at the same time as the TCP connections below.
    let http3_tasks = TaskTracker::new();
    let mut alt_svc = std::collections::HashMap::new();
    for endpoint in quic {
        if let Ok(addr) = endpoint.local_addr() {
            // Clients that learn of HTTP/3 from a TLS response try it on the same port.
            let value = format!("h3=\":{}\"; ma=86400", addr.port());
            if let Ok(v) = HeaderValue::from_str(&value) {
                alt_svc.insert(addr.port(), v);
            }
        }
        http3_tasks.spawn(http3::serve(
            state.clone(),
            endpoint,
            limits.clone(),
            shutdown.clone(),
        ));
    }
    http3_tasks.close();
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Conn>(64);
    for l in listeners.plain {
        tracker.spawn(accept_loop(
            l,
            None,
            conn_tx.clone(),
            limits.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(tls) = tls {
        for l in listeners.tls {
            let alt = l
                .local_addr()
                .ok()
                .and_then(|a| alt_svc.get(&a.port()).cloned());
            tracker.spawn(accept_loop(
                l,
                Some((tls.clone(), alt)),
                conn_tx.clone(),
                limits.clone(),
                shutdown.clone(),
            ));
        }
    }
    drop(conn_tx);
    let builder = builder(&state);
    let (first_byte, stall) = (
        state.config.server.header_timeout,
        state.config.server.body_idle_timeout,
    );
    while let Some(conn) = conn_rx.recv().await {
        let st = state.clone();
        let peer = conn.peer;
        let files = FileQueue::default();
        let queue = matches!(conn.io, Io::Plain(_)).then(|| files.clone());
        let alt_svc = conn.alt_svc;
        let svc = service_fn(move |req: Request<Incoming>| {
            let st = st.clone();
            let mut req =
                req.map(|b| BodyExt::boxed(b.map_err(std::io::Error::other)) as RequestBody);
            // HTTP/2 frames may copy small payloads; only HTTP/1.x writes by reference.
            if let Some(queue) = queue.as_ref().filter(|_| req.version() <= Version::HTTP_11) {
                req.extensions_mut()
                    .insert(FileSender::Sendfile(queue.clone()));
            }
            let alt_svc = alt_svc.clone();
            async move {
                let mut response = handle(st, req, peer).await;
                if let Some(v) = alt_svc {
                    response.headers_mut().insert(http::header::ALT_SVC, v);
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let (builder, watcher, slot) = (builder.clone(), graceful.watcher(), conn.slot);
        match conn.io {
            Io::Plain(s) => {
                tokio::spawn(async move {
                    // A connection that never speaks is closed (hyper's header timeout
                    // only starts at the first byte).
                    let mut probe = [0u8; 1];
                    if tokio::time::timeout(first_byte, s.peek(&mut probe))
                        .await
                        .is_err()
                    {
                        tracing::debug!(%peer, "closed a connection that sent nothing");
                        return;
                    }
                    let io = WriteDeadline::new(SendfileStream::new(s, files), stall);
                    let c = builder.serve_connection(TokioIo::new(io), svc).into_owned();
                    let _ = watcher.watch(c).await;
                    drop(slot);
                });
            }
            Io::Tls(s) => {
                tokio::spawn(async move {
                    let io = WriteDeadline::new(*s, stall);
                    let c = builder.serve_connection(TokioIo::new(io), svc).into_owned();
                    let _ = watcher.watch(c).await;
                    drop(slot);
                });
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    let grace = state.config.server.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "connections still open after the shutdown grace period"
        );
    }
    http3_tasks.wait().await;
}

enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

struct Conn {
    io: Io,
    peer: SocketAddr,
    /// The `Alt-Svc` value its responses carry (TLS, with HTTP/3 on its port).
    alt_svc: Option<HeaderValue>,
    /// Counts the connection against `server.max_connections` until dropped.
    slot: Slot,
}

/// The connection limit and the accept-error backoff, with their rate-limited logs.
pub(super) struct Limits {
    max: usize,
    open: Arc<AtomicUsize>,
    refused: AtomicU64,
    /// When a refusal was last logged.
    logged: RateLimit,
    /// When an accept error was last logged (apart, so one cannot hide the other).
    accept_logged: RateLimit,
}

/// At most one log line per [`LOG_EVERY`].
#[derive(Default)]
struct RateLimit(std::sync::Mutex<Option<Instant>>);

impl RateLimit {
    /// Whether a line may be written now.
    fn due(&self) -> bool {
        let Ok(mut last) = self.0.lock() else {
            return false;
        };
        let now = Instant::now();
        if last.is_some_and(|l| now.duration_since(l) < LOG_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// One open connection's place under the limit.
pub(super) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// At most one log line per this long for refused connections and accept errors.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Limits {
    fn new(max: usize) -> Limits {
        Limits {
            max,
            open: Arc::default(),
            refused: AtomicU64::new(0),
            logged: RateLimit::default(),
            accept_logged: RateLimit::default(),
        }
    }

    /// A slot for a new connection, or `None` (counted, logged now and then) at the limit.
    pub(super) fn admit(&self) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if self.logged.due() {
                tracing::warn!(
                    limit = self.max,
                    refused_total = refused,
                    "connection limit reached (server.max_connections): new connections are closed at once"
                );
            }
            return None;
        }
        Some(Slot(self.open.clone()))
    }
}

/// Accept-error backoff: 10 ms, doubling to 1 s; reset by the next accepted connection.
const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: TcpListener,
    tls: Option<(TlsSettings, Option<HeaderValue>)>,
    tx: tokio::sync::mpsc::Sender<Conn>,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = BACKOFF_START;
                a
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning and flooding the log.
                if limits.accept_logged.due() {
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "accept failed");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let Some(slot) = limits.admit() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        match &tls {
            None => {
                if tx
                    .send(Conn {
                        io: Io::Plain(stream),
                        peer,
                        alt_svc: None,
                        slot,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Some((tls, alt_svc)) => {
                let acceptor = tls.acceptor();
                let (tx, alt_svc) = (tx.clone(), alt_svc.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let _ = tx
                                .send(Conn {
                                    io: Io::Tls(Box::new(s)),
                                    peer,
                                    alt_svc,
                                    slot,
                                })
                                .await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}
