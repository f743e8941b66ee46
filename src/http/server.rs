//! Listeners and connection serving: plain HTTP/1.1 + h2c, and TLS with ALPN. Timeouts
//! (first byte, TLS handshake, headers, write progress), size limits and the connection
//! limit are set here; accept errors back off; graceful drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::FileSender;
use super::deadline::WriteDeadline;
use super::tls::TlsSettings;
use super::zerocopy::{FileQueue, SendfileStream};
use super::{State, handle};

/// Sockets bound by the caller (tests bind `127.0.0.1:0`).
pub struct Listeners {
    pub plain: Vec<TcpListener>,
    pub tls: Vec<TcpListener>,
}

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Serves until `shutdown` is cancelled, then drains connections for at most the
/// configured grace period.
pub async fn serve(
    state: State,
    listeners: Listeners,
    tls: Option<TlsSettings>,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let tracker = TaskTracker::new();
    let limits = Arc::new(Limits::new(state.config.server.max_connections));
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
            tracker.spawn(accept_loop(
                l,
                Some(tls.clone()),
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
        let svc = service_fn(move |mut req: Request<Incoming>| {
            let st = st.clone();
            // HTTP/2 frames may copy small payloads; only HTTP/1.x writes by reference.
            if let Some(queue) = queue.as_ref().filter(|_| req.version() <= Version::HTTP_11) {
                req.extensions_mut()
                    .insert(FileSender::Sendfile(queue.clone()));
            }
            async move { Ok::<_, std::convert::Infallible>(handle(st, req, peer).await) }
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
}

enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

struct Conn {
    io: Io,
    peer: SocketAddr,
    /// Counts the connection against `server.max_connections` until dropped.
    slot: Slot,
}

/// The connection limit and the accept-error backoff, with their rate-limited logs.
struct Limits {
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
struct Slot(Arc<AtomicUsize>);

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
    fn admit(&self) -> Option<Slot> {
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
    tls: Option<TlsSettings>,
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
                        slot,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Some(tls) => {
                let Some(acceptor) = tls.acceptor() else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let _ = tx
                                .send(Conn {
                                    io: Io::Tls(Box::new(s)),
                                    peer,
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
