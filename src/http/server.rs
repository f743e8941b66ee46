//! Listeners and connection serving: plain HTTP/1.1 + h2c, and TLS with ALPN. Header
//! timeouts and size limits are set here; graceful drain on shutdown.

use std::net::SocketAddr;
use std::time::Duration;

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
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::channel::<Conn>(64);
    for l in listeners.plain {
        tracker.spawn(accept_loop(l, None, conn_tx.clone(), shutdown.clone()));
    }
    if let Some(tls) = tls {
        for l in listeners.tls {
            tracker.spawn(accept_loop(
                l,
                Some(tls.clone()),
                conn_tx.clone(),
                shutdown.clone(),
            ));
        }
    }
    drop(conn_tx);
    let builder = builder(&state);
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
        match conn.io {
            Io::Plain(s) => {
                let io = TokioIo::new(SendfileStream::new(s, files));
                let c = builder.serve_connection(io, svc).into_owned();
                tokio::spawn(graceful.watch(c));
            }
            Io::Tls(s) => {
                let c = builder.serve_connection(TokioIo::new(*s), svc).into_owned();
                tokio::spawn(graceful.watch(c));
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
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsSettings>,
    tx: tokio::sync::mpsc::Sender<Conn>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match &tls {
            None => {
                if tx
                    .send(Conn {
                        io: Io::Plain(stream),
                        peer,
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
