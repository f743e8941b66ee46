//! A tiny in-process HTTP/1.1 server on `127.0.0.1:0` for the upstream client's tests:
//! a handler closure per server, a log of every request seen, and a raw TCP variant for
//! connection-level faults. Dropping a server stops its accept loop and every connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl TestServer {
    /// Starts serving `handler` on a fresh loopback port.
    pub async fn start<H, Fut>(handler: H) -> TestServer
    where
        H: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let log = seen.clone();
        let task = tokio::spawn(async move {
            // Owned here: aborting this task drops the set, which aborts every connection.
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let handler = handler.clone();
                let log = log.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let s = Seen {
                            method: req.method().clone(),
                            uri: req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            headers: req.headers().clone(),
                        };
                        log.lock().expect("log").push(s.clone());
                        let fut = handler(s);
                        async move { Ok::<_, std::convert::Infallible>(fut.await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestServer { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }

    /// Requests whose path starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.uri.starts_with(prefix))
            .count()
    }

    /// Stops the server and waits until its tasks are gone.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback TCP server handing each accepted connection, numbered from 0, to `handler`.
pub struct RawServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RawServer {
    pub async fn start<H, Fut>(handler: H) -> RawServer
    where
        H: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let mut n = 0;
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(handler(n, stream));
                n += 1;
            }
        });
        RawServer { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A complete response.
pub fn respond(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let body = Full::new(body.into())
        .map_err(|never| match never {})
        .boxed();
    with_headers(status, headers, body)
}

/// A complete response sent in chunked encoding (no `Content-Length`).
pub fn respond_chunked(
    status: u16,
    headers: &[(&str, &str)],
    chunks: Vec<Bytes>,
) -> Response<Body> {
    let frames = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Frame::data(c))));
    with_headers(status, headers, BodyExt::boxed(StreamBody::new(frames)))
}

/// A response that sends `first` and then never another byte.
pub fn stall_after(
    status: u16,
    headers: &[(&str, &str)],
    first: impl Into<Bytes>,
) -> Response<Body> {
    let frames = futures_util::stream::iter([Ok(Frame::data(first.into()))])
        .chain(futures_util::stream::pending());
    with_headers(status, headers, BodyExt::boxed(StreamBody::new(frames)))
}

fn with_headers(status: u16, headers: &[(&str, &str)], body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).expect("status");
    for (name, value) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            http::HeaderValue::from_str(value).expect("header value"),
        );
    }
    r
}
