//! A small HTTP server for the harness's in-process peers (the fake upstream, the token
//! server, the CDN): its own thread and tokio runtime, so sync and async tests use it alike;
//! bound to 127.0.0.1; able to go down (listener closed, connections cut) and come back on
//! the same port; stopped on drop, without waiting for handlers that stall on purpose.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub type Body = UnsyncBoxBody<Bytes, io::Error>;
pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>, Conn) -> HandlerFuture + Send + Sync>;

/// Frames for a body produced by a task: see [`channel_body`].
pub type BodySender = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

/// What a handler may do to the connection it answers on.
#[derive(Clone)]
pub struct Conn {
    reset: Arc<AtomicBool>,
    /// Cancelled when the server goes down or stops: handlers that stall on purpose end then.
    pub closing: CancellationToken,
}

impl Conn {
    /// When the connection ends (for example because the body yields an error), close it
    /// with a TCP RST (SO_LINGER 0) rather than a FIN.
    pub fn reset_on_close(&self) {
        self.reset.store(true, Ordering::SeqCst);
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// A body fed by a task through a channel; when the receiving side is dropped (the
/// connection closed), `BodySender::closed` resolves and sends fail.
pub fn channel_body() -> (BodySender, Body) {
    let (tx, mut rx) = mpsc::channel(1);
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (tx, StreamBody::new(stream).boxed_unsync())
}

enum Command {
    Down(std::sync::mpsc::Sender<()>),
    Up(std::sync::mpsc::Sender<io::Result<()>>),
}

/// A running server; stopped on drop.
pub struct HttpServer {
    addr: SocketAddr,
    stop: CancellationToken,
    commands: mpsc::UnboundedSender<Command>,
    finished: std::sync::mpsc::Receiver<()>,
}

const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpServer {
    /// Binds 127.0.0.1:0 and serves HTTP/1.1 and h2c with `handler` on a new thread.
    pub fn start(name: &str, handler: Handler) -> HttpServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let (commands, rx) = mpsc::unbounded_channel();
        let (finished_tx, finished) = std::sync::mpsc::channel();
        let token = stop.clone();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(accept_loop(listener, handler, token, rx));
                // Drops the connection tasks, including handlers stalled on purpose.
                rt.shutdown_timeout(Duration::from_secs(1));
                let _ = finished_tx.send(());
            })
            .expect("spawn server thread");
        HttpServer {
            addr,
            stop,
            commands,
            finished,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Down: the listener is closed (connections are refused) and open connections are cut.
    /// Up: listening again on the same port. Returns once done.
    pub fn set_down(&self, down: bool) {
        if down {
            let (tx, rx) = std::sync::mpsc::channel();
            if self.commands.send(Command::Down(tx)).is_ok() {
                rx.recv_timeout(COMMAND_TIMEOUT)
                    .expect("server did not go down in time");
            }
            // A process being spawned by another thread holds a copy of the listening
            // socket until its exec; meanwhile the kernel still accepts connections (and
            // resets them later). Return only once the port really refuses.
            let deadline = Instant::now() + COMMAND_TIMEOUT;
            while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
                .is_ok()
            {
                assert!(
                    Instant::now() < deadline,
                    "{} still accepts connections",
                    self.addr
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            self.commands
                .send(Command::Up(tx))
                .expect("server thread has stopped");
            rx.recv_timeout(COMMAND_TIMEOUT)
                .expect("server did not come back up in time")
                .unwrap_or_else(|e| panic!("rebind {}: {e}", self.addr));
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.cancel();
        // Bounded: a server thread that does not finish in time is left to the process exit.
        let _ = self.finished.recv_timeout(Duration::from_secs(5));
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    handler: Handler,
    stop: CancellationToken,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let addr = listener.local_addr().expect("local addr");
    let mut listener = Some(TcpListener::from_std(listener).expect("tokio listener"));
    // Connections of the current "up" period; cancelled when going down.
    let mut period = stop.child_token();
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            command = commands.recv() => match command {
                None => break,
                Some(Command::Down(ack)) => {
                    listener = None;
                    period.cancel();
                    period = stop.child_token();
                    let _ = ack.send(());
                }
                Some(Command::Up(ack)) => {
                    let result = match listener {
                        Some(_) => Ok(()),
                        None => rebind(addr).await.map(|l| listener = Some(l)),
                    };
                    let _ = ack.send(result);
                }
            },
            accepted = accept => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_connection(stream, handler.clone(), period.clone()));
                }
            }
        }
    }
}

/// Binds `addr` again, retrying briefly should the kernel still hold it.
async fn rebind(addr: SocketAddr) -> io::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

async fn serve_connection(stream: TcpStream, handler: Handler, closing: CancellationToken) {
    let reset = Arc::new(AtomicBool::new(false));
    let conn = Conn {
        reset: reset.clone(),
        closing: closing.clone(),
    };
    let io = TokioIo::new(ResettableStream {
        inner: stream,
        reset,
    });
    let service = hyper::service::service_fn(move |req| {
        let response = handler(req, conn.clone());
        async move { Ok::<_, Infallible>(response.await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::select! {
        _ = builder.serve_connection(io, service) => {}
        _ = closing.cancelled() => {}
    }
}

/// A TCP stream that, once flagged, closes with RST instead of FIN.
struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// How to answer a request's `Range` header for a body of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No (usable) Range header: the whole body, 200.
    Full,
    /// `start..=end`, 206.
    Partial(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// Parses the single-range forms registries see: `bytes=N-` and `bytes=N-M`. Anything else
/// (suffix ranges, several ranges) is ignored, as RFC 9110 allows.
pub fn range_answer(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Full;
    };
    let Some((start, end)) = spec.split_once('-') else {
        return RangeAnswer::Full;
    };
    let Ok(start) = start.trim().parse::<u64>() else {
        return RangeAnswer::Full;
    };
    let end = match end.trim() {
        "" => len.saturating_sub(1),
        e => match e.parse::<u64>() {
            Ok(e) if e >= start => e.min(len.saturating_sub(1)),
            _ => return RangeAnswer::Full,
        },
    };
    if start >= len {
        RangeAnswer::Unsatisfiable
    } else {
        RangeAnswer::Partial(start, end)
    }
}

/// Decodes `application/x-www-form-urlencoded` text (a query string or a form body).
pub fn form_decode(text: &str) -> Vec<(String, String)> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    fn unescape(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = match bytes.get(i..i + 3) {
                Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| h << 4 | l),
                _ => None,
            };
            match (escaped, bytes[i]) {
                (Some(b), _) => {
                    out.push(b);
                    i += 3;
                }
                (None, b'+') => {
                    out.push(b' ');
                    i += 1;
                }
                (None, b) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 UTC time (`2024-05-01T12:00:00Z`) of Unix seconds.
pub fn rfc3339(secs: u64) -> String {
    // Days to civil date: Howard Hinnant's algorithm.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
