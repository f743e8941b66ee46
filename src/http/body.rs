//! Request and response bodies: bounded, idle-timed request streams, and blob file
//! ranges sent from disk (in large chunks, or with `sendfile(2)` where the connection
//! allows).

use std::io::{self, Read, Seek, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

use super::zerocopy::FileQueue;
use crate::storage::FileRange;

/// The response body type of every handler.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A request body, whatever carried it: hyper's connection for HTTP/1.1 and HTTP/2, a
/// QUIC stream for HTTP/3.
pub type RequestBody = BoxBody<Bytes, io::Error>;

/// A request body as a stream of chunks, ready for the store.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// Blob files are read in chunks of this size: large enough to amortise the blocking
/// pool round trip, small enough to keep memory per stream modest.
const FILE_CHUNK: usize = 256 * 1024;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// Streams `incoming`, failing if the client stalls longer than `idle` between chunks or
/// sends more than `limit` bytes.
pub fn request_stream(incoming: RequestBody, idle: Duration, limit: Option<u64>) -> ByteStream {
    let state = (incoming, 0u64);
    Box::pin(futures_util::stream::unfold(
        Some(state),
        move |state| async move {
            let (mut body, mut seen) = state?;
            loop {
                let frame = match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => {
                        let e = io::Error::new(
                            io::ErrorKind::TimedOut,
                            "client stalled while sending the body",
                        );
                        return Some((Err(e), None));
                    }
                    Ok(None) => return None,
                    Ok(Some(Err(e))) => return Some((Err(e), None)),
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                seen += data.len() as u64;
                if limit.is_some_and(|l| seen > l) {
                    let e =
                        io::Error::new(io::ErrorKind::FileTooLarge, "request body is too large");
                    return Some((Err(e), None));
                }
                return Some((Ok(data), Some((body, seen))));
            }
        },
    ))
}

/// Reads a whole request body of at most `limit` bytes. `Ok(None)` if it is larger.
pub async fn read_limited(
    incoming: RequestBody,
    idle: Duration,
    limit: usize,
) -> io::Result<Option<Bytes>> {
    let mut stream = request_stream(incoming, idle, Some(limit as u64));
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => buf.extend_from_slice(&c),
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(buf.into()))
}

/// Wraps `body` so that `done(bytes_sent, complete)` runs when it is dropped: after its
/// last frame, or early when the client went away (`complete` is then false).
/// `expected` is what the response promised (its `Content-Length`; 0 for HEAD): hyper
/// stops polling a body once that much is out, so reaching it counts as complete.
pub fn on_done(
    body: Body,
    expected: Option<u64>,
    done: impl FnOnce(u64, bool) + Send + 'static,
) -> Body {
    BodyExt::boxed_unsync(Tracked {
        inner: body,
        bytes: 0,
        expected,
        ended: false,
        done: Some(Box::new(done)),
    })
}

struct Tracked {
    inner: Body,
    bytes: u64,
    expected: Option<u64>,
    /// The inner body said it has no more frames.
    ended: bool,
    done: Option<Box<dyn FnOnce(u64, bool) + Send>>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<io::Result<Frame<Bytes>>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let complete = self.ended
                || hyper::body::Body::is_end_stream(&self.inner)
                || self.expected.is_some_and(|e| self.bytes >= e);
            done(self.bytes, complete);
        }
    }
}

/// File ranges to send, in order: one for a stored blob, a series for a download in
/// flight (each as the bytes become available).
pub type RangeStream = Pin<Box<dyn Stream<Item = io::Result<FileRange>> + Send>>;

/// How this connection sends file bytes: `sendfile(2)` on plain HTTP/1.x (see
/// `zerocopy`), through memory otherwise. The server puts it in each request's
/// extensions; a request without one uses memory.
#[derive(Clone, Default)]
pub enum FileSender {
    #[default]
    Memory,
    Sendfile(FileQueue),
}

impl FileSender {
    pub fn of<B>(req: &http::Request<B>) -> FileSender {
        req.extensions()
            .get::<FileSender>()
            .cloned()
            .unwrap_or_default()
    }

    /// A body made of `ranges`.
    pub fn body(&self, ranges: RangeStream) -> Body {
        match self {
            FileSender::Memory => read_body(ranges),
            FileSender::Sendfile(queue) => queue.body(ranges),
        }
    }

    /// A body of one file range.
    pub fn file(&self, range: FileRange) -> Body {
        self.body(Box::pin(futures_util::stream::iter([Ok(range)])))
    }
}

/// Reads `ranges` into memory chunk by chunk on the blocking pool.
fn read_body(ranges: RangeStream) -> Body {
    let stream = futures_util::stream::unfold(Some((ranges, None)), |state| async move {
        let (mut ranges, current) = state?;
        let mut range: FileRange = match current {
            Some(r) => r,
            None => match ranges.next().await? {
                Ok(r) => r,
                Err(e) => return Some((Err(e), None)),
            },
        };
        let want = range.len.min(FILE_CHUNK as u64);
        let (file, offset) = (Arc::clone(&range.file), range.offset);
        let result = tokio::task::spawn_blocking(move || {
            // `read_to_end` fills spare capacity without zeroing it first.
            let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(FILE_CHUNK));
            (&*file).seek(SeekFrom::Start(offset))?;
            (&*file).take(want).read_to_end(&mut buf)?;
            if (buf.len() as u64) < want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file is shorter than recorded",
                ));
            }
            Ok(Bytes::from(buf))
        })
        .await
        .unwrap_or_else(|_| Err(io::Error::other("read task failed")));
        match result {
            Ok(bytes) => {
                range.offset += want;
                range.len -= want;
                let next = (range.len > 0).then_some(range);
                Some((Ok(Frame::data(bytes)), Some((ranges, next))))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// What `on_done` reported: bytes sent and whether the body finished.
    type Seen = Arc<Mutex<Option<(u64, bool)>>>;

    fn recorder() -> (Seen, impl FnOnce(u64, bool) + Send) {
        let seen = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&seen);
        (seen, move |bytes, complete| {
            *sink.lock().expect("lock") = Some((bytes, complete));
        })
    }

    #[tokio::test]
    async fn on_done_reports_bytes_and_whether_the_body_was_finished() {
        let (seen, done) = recorder();
        let body = on_done(full(&b"0123456789"[..]), None, done);
        let collected = body.collect().await.expect("collect").to_bytes();
        assert_eq!(collected.len(), 10);
        assert_eq!(*seen.lock().expect("lock"), Some((10, true)));

        // A streamed body abandoned after its first chunk.
        let (seen, done) = recorder();
        let chunks = || {
            futures_util::stream::iter([
                Ok(Bytes::from_static(b"abc")),
                Ok(Bytes::from_static(b"def")),
            ])
        };
        let mut body = on_done(stream_of(chunks()), Some(6), done);
        let first = body.frame().await.expect("frame").expect("ok");
        assert_eq!(first.into_data().expect("data").len(), 3);
        drop(body);
        assert_eq!(*seen.lock().expect("lock"), Some((3, false)));

        // Regression (issue 11): a body whose promised length went out is complete even
        // though hyper never polled for its end (sendfile bodies were logged incomplete).
        let (seen, done) = recorder();
        let mut body = on_done(stream_of(chunks()), Some(6), done);
        for _ in 0..2 {
            body.frame().await.expect("frame").expect("ok");
        }
        drop(body);
        assert_eq!(*seen.lock().expect("lock"), Some((6, true)));

        // A HEAD answer promises nothing: complete without a byte.
        let (seen, done) = recorder();
        drop(on_done(stream_of(chunks()), Some(0), done));
        assert_eq!(*seen.lock().expect("lock"), Some((0, true)));
    }

    fn stream_of(chunks: impl Stream<Item = io::Result<Bytes>> + Send + 'static) -> Body {
        BodyExt::boxed_unsync(StreamBody::new(chunks.map(|c| c.map(Frame::data))))
    }
}
