//! HTTP/3: a QUIC endpoint (quinn) on each TLS port, over UDP, serving the same API
//! through the same pipeline as HTTP/1.1 and HTTP/2 ([`super::handle`]: routing, auth,
//! metrics, request log).
//!
//! This module adapts h3's request streams to the pipeline's request and response
//! bodies, counts connections against `server.max_connections`, applies the handshake,
//! header and write-progress timeouts, and drains on shutdown: each connection is sent a
//! GOAWAY, the requests it already started finish within the shutdown grace, then the
//! endpoint closes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h3::server::{RequestResolver, RequestStream};
use http::Method;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::body::RequestBody;
use super::server::{HANDSHAKE_TIMEOUT, Limits, Slot};
use super::tls::TlsSettings;
use super::{State, handle};
use crate::config::ServerConfig;

type Resolver = RequestResolver<h3_quinn::Connection, Bytes>;

/// The QUIC endpoint for `addr` (the UDP port of a TLS listener).
pub fn endpoint(
    addr: SocketAddr,
    tls: &TlsSettings,
    server_config: &ServerConfig,
) -> io::Result<quinn::Endpoint> {
    let crypto = tls.quic()?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // A connection with no packet (not even a keep-alive) for this long is gone.
    let idle = quinn::IdleTimeout::try_from(server_config.body_idle_timeout)
        .map_err(|e| io::Error::other(format!("server.body_idle_timeout: {e}")))?;
    transport.max_idle_timeout(Some(idle));
    server.transport_config(Arc::new(transport));
    quinn::Endpoint::server(server, addr)
}

/// Serves `endpoint` until `shutdown` is cancelled, then drains its connections for at
/// most the configured grace period and closes it.
pub async fn serve(
    state: State,
    endpoint: quinn::Endpoint,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let Some(slot) = limits.admit() else {
            incoming.refuse();
            continue;
        };
        connections.spawn(connection(state.clone(), incoming, slot, shutdown.clone()));
    }
    connections.close();
    let grace = state.config.server.shutdown_grace;
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "HTTP/3 connections still open after the shutdown grace period"
        );
    }
    endpoint.close(H3_NO_ERROR.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// HTTP/3's "no error" code, for closing a connection cleanly.
const H3_NO_ERROR: u32 = 0x100;

async fn connection(
    state: State,
    incoming: quinn::Incoming,
    slot: Slot,
    shutdown: CancellationToken,
) {
    let peer = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "QUIC connection refused");
            return;
        }
    };
    let quic = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "QUIC handshake timed out");
            return;
        }
    };
    let max_header = u64::try_from(state.config.server.max_header_bytes).unwrap_or(u64::MAX);
    let built = h3::server::builder()
        .max_field_section_size(max_header)
        .build(h3_quinn::Connection::new(quic.clone()))
        .await;
    let mut conn = match built {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "HTTP/3 connection setup failed");
            return;
        }
    };
    let requests = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = conn.accept() => a,
        };
        match accepted {
            Ok(Some(resolver)) => {
                requests.spawn(request(state.clone(), resolver, peer));
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "HTTP/3 connection ended");
                break;
            }
        }
    }
    // Drain: the requests started finish; the connection keeps being polled meanwhile
    // (its control stream), refusing new ones. GOAWAY carries the first stream ID *not*
    // processed (RFC 9114 5.2): h3's `shutdown(n)` sends the last accepted ID plus n,
    // so 1, or a client would take its last request for unprocessed and send it again.
    let draining = shutdown.is_cancelled();
    let busy = !requests.is_empty();
    requests.close();
    if draining {
        let _ = conn.shutdown(1).await;
    }
    tokio::select! {
        _ = requests.wait() => {}
        _ = async { while let Ok(Some(_)) = conn.accept().await {} } => requests.wait().await,
    }
    if draining && busy {
        // A finished response may still have bytes in flight, and closing a QUIC
        // connection discards what was not acknowledged: the client, told to go away,
        // closes when it has everything (`serve` bounds the wait by the grace period).
        quic.closed().await;
    }
    quic.close(H3_NO_ERROR.into(), b"");
    drop(slot);
}

/// One request: read its head (within `header_timeout`), run the pipeline, send the
/// response, each write making progress within `body_idle_timeout`.
async fn request(state: State, resolver: Resolver, peer: SocketAddr) {
    let (header_timeout, stall) = (
        state.config.server.header_timeout,
        state.config.server.body_idle_timeout,
    );
    let (req, stream) = match tokio::time::timeout(header_timeout, resolver.resolve_request()).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/3 request refused");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "HTTP/3 request head timed out");
            return;
        }
    };
    let (mut send, recv) = stream.split();
    let bodyless = req.method() == Method::HEAD;
    let req = req.map(|()| BodyExt::boxed(Incoming(recv, false)) as RequestBody);
    let (parts, mut body) = handle(state, req, peer).await.into_parts();
    let bodyless = bodyless || parts.status.as_u16() == 204 || parts.status.as_u16() == 304;
    let head = http::Response::from_parts(parts, ());
    match tokio::time::timeout(stall, send.send_response(head)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/3 response head not sent");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "HTTP/3 response head stalled");
            return;
        }
    }
    if !bodyless {
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) if !d.is_empty() => d,
                    _ => continue,
                },
                Err(e) => {
                    // The client must see an incomplete response, not a short one.
                    tracing::debug!(%peer, error = %e, "HTTP/3 response body failed");
                    send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                    return;
                }
            };
            match tokio::time::timeout(stall, send.send_data(data)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP/3 client went away");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "HTTP/3 client stopped reading");
                    send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                    return;
                }
            }
        }
    }
    // The body is dropped before the stream ends, so the request log line is written
    // with what was sent.
    drop(body);
    if let Err(e) = send.finish().await {
        tracing::debug!(%peer, error = %e, "HTTP/3 response not finished");
    }
}

/// The request body of an HTTP/3 request: the receiving half of its stream, and whether
/// it was read to its end.
struct Incoming(RequestStream<h3_quinn::RecvStream, Bytes>, bool);

impl Drop for Incoming {
    /// A handler that answers without the rest of the request (a GET whose end has not
    /// arrived, a refused upload) asks the client to stop sending with H3_NO_ERROR, as
    /// RFC 9114 4.1 says; left to quinn, the stream would be stopped with code 0.
    fn drop(&mut self) {
        if !self.1 {
            self.0.stop_sending(h3::error::Code::H3_NO_ERROR);
        }
    }
}

impl hyper::body::Body for Incoming {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        match ready!(self.0.poll_recv_data(cx)) {
            Ok(Some(mut buf)) => {
                let data = buf.copy_to_bytes(buf.remaining());
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Ok(None) => {
                self.1 = true;
                Poll::Ready(None)
            }
            Err(e) => Poll::Ready(Some(Err(io::Error::other(e)))),
        }
    }
}
