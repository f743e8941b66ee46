//! Zero-copy blob responses on plain HTTP/1.x connections: stored blobs and downloads in
//! flight go from the page cache to the socket with `sendfile(2)`, never through user
//! space.
//!
//! hyper only writes `Buf`s, so a file response's body yields *placeholder* chunks: slices
//! of one static buffer that nothing else hands out. For each chunk it queues the file
//! range those bytes stand for on the connection's [`FileQueue`]. The connection's stream,
//! [`SendfileStream`], recognises a placeholder slice by its address and sends the queued
//! file range in its place. hyper writes body chunks in order and, with its queueing write
//! strategy (forced on in the server builder), passes them to the stream by reference
//! without copying, so the queue and the writes stay in step. Every write checks that
//! step: a placeholder slice that does not match the front of the queue fails the
//! connection instead of sending the placeholder's zeros.
//!
//! Only plain HTTP/1.x uses this path (the server marks such requests with
//! [`super::body::FileSender::Sendfile`]). TLS connections and HTTP/2, whose framing may
//! copy small payloads, read the file into memory in chunks instead.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::Frame;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::body::{Body, RangeStream};
use crate::storage::FileRange;

/// Largest chunk one placeholder frame stands for. The static buffer costs address
/// space only: its pages are never touched.
const CHUNK: usize = 1 << 20;

static PLACEHOLDER: [u8; CHUNK] = [0; CHUNK];

/// Where a placeholder slice starts inside [`PLACEHOLDER`], if it is one.
fn placeholder_offset(buf: &[u8]) -> Option<usize> {
    let base = PLACEHOLDER.as_ptr() as usize;
    let start = buf.as_ptr() as usize;
    (!buf.is_empty() && start >= base && start + buf.len() <= base + CHUNK).then(|| start - base)
}

/// A file range one placeholder frame stands for.
struct Region {
    file: Arc<File>,
    offset: u64,
    len: usize,
    sent: usize,
}

/// The file ranges queued on one connection, in the order hyper will write them.
#[derive(Clone, Default)]
pub struct FileQueue(Arc<Mutex<VecDeque<Region>>>);

impl FileQueue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Region>> {
        // A panic while holding the lock cannot leave the queue half-updated: every
        // critical section is a single push, pop or field update.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A response body that sends `ranges` through this queue.
    pub fn body(&self, ranges: RangeStream) -> Body {
        http_body_util::BodyExt::boxed_unsync(PlaceholderBody {
            queue: self.clone(),
            ranges: Some(ranges),
            current: None,
        })
    }
}

struct PlaceholderBody {
    queue: FileQueue,
    /// `None` once the ranges have ended.
    ranges: Option<RangeStream>,
    /// What is left of the range being sent.
    current: Option<FileRange>,
}

impl hyper::body::Body for PlaceholderBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = self.get_mut();
        loop {
            if let Some(range) = this.current.as_mut().filter(|r| r.len > 0) {
                let len = usize::try_from(range.len).map_or(CHUNK, |r| r.min(CHUNK));
                this.queue.lock().push_back(Region {
                    file: Arc::clone(&range.file),
                    offset: range.offset,
                    len,
                    sent: 0,
                });
                range.offset += len as u64;
                range.len -= len as u64;
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                    &PLACEHOLDER[..len],
                )))));
            }
            let Some(ranges) = this.ranges.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(ranges.as_mut().poll_next(cx)) {
                Some(Ok(range)) => this.current = Some(range),
                Some(Err(e)) => {
                    this.ranges = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.ranges = None;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ranges.is_none() && self.current.as_ref().is_none_or(|r| r.len == 0)
    }
}

/// A plain TCP stream that sends queued file ranges in place of placeholder slices.
pub struct SendfileStream {
    stream: TcpStream,
    queue: FileQueue,
}

impl SendfileStream {
    pub fn new(stream: TcpStream, queue: FileQueue) -> SendfileStream {
        SendfileStream { stream, queue }
    }

    /// Sends the front region's bytes for a placeholder slice that starts `at` bytes into
    /// its frame and is `len` long.
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        at: usize,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let mut queue = self.queue.lock();
        let Some(region) = queue.front_mut() else {
            return Poll::Ready(Err(out_of_step()));
        };
        if region.sent != at || region.len - region.sent != len {
            return Poll::Ready(Err(out_of_step()));
        }
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let mut offset = region.offset + region.sent as u64;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.stream, &*region.file, Some(&mut offset), len)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file is shorter than recorded",
                    )));
                }
                Ok(n) => {
                    region.sent += n;
                    if region.sent == region.len {
                        queue.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

fn out_of_step() -> io::Error {
    io::Error::other("zero-copy body out of step with the connection's writes")
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match placeholder_offset(buf) {
            Some(at) => this.poll_sendfile(cx, at, buf.len()),
            None => Pin::new(&mut this.stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs
            .iter()
            .position(|b| !b.is_empty())
            .unwrap_or(bufs.len());
        let Some(head) = bufs.get(first) else {
            return Poll::Ready(Ok(0));
        };
        if let Some(at) = placeholder_offset(head) {
            return this.poll_sendfile(cx, at, head.len());
        }
        // Ordinary bytes (headers, small bodies) up to the next placeholder go in one writev.
        let end = bufs[first..]
            .iter()
            .position(|b| placeholder_offset(b).is_some())
            .map_or(bufs.len(), |i| first + i);
        Pin::new(&mut this.stream).poll_write_vectored(cx, &bufs[first..end])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn placeholder_slices_are_recognised_and_others_are_not() {
        assert_eq!(placeholder_offset(&PLACEHOLDER[..10]), Some(0));
        assert_eq!(placeholder_offset(&PLACEHOLDER[5..10]), Some(5));
        assert_eq!(placeholder_offset(&[0u8; 16]), None);
        assert_eq!(placeholder_offset(&PLACEHOLDER[..0]), None);
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    /// Headers, a file range larger than one chunk, and trailing bytes arrive in order
    /// and byte-identical, through writes that mix ordinary and placeholder slices.
    #[tokio::test]
    async fn file_ranges_are_sent_in_place_of_placeholders() {
        let mut tmp = tempfile::tempfile().expect("tempfile");
        let content: Vec<u8> = (0..(CHUNK * 2 + 12_345)).map(|i| (i % 251) as u8).collect();
        tmp.write_all(&content).expect("write");
        let file = Arc::new(tmp);
        let (server, mut client) = pair().await;
        let queue = FileQueue::default();
        let mut stream = SendfileStream::new(server, queue.clone());
        let offset = 100u64;
        let len = content.len() as u64 - 200;
        let range = FileRange { file, offset, len };
        let mut body = queue.body(Box::pin(futures_util::stream::iter([Ok(range)])));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            got
        });
        stream.write_all(b"HEAD\r\n").await.expect("head");
        while let Some(frame) = body.frame().await {
            let data = frame.expect("frame").into_data().expect("data");
            let slices = [IoSlice::new(b"-"), IoSlice::new(&data)];
            // Write the prefix byte, then the placeholder until it is all sent.
            let mut done = 0;
            while done < 1 + data.len() {
                let n = if done == 0 {
                    std::future::poll_fn(|cx| {
                        Pin::new(&mut stream).poll_write_vectored(cx, &slices)
                    })
                    .await
                } else {
                    let rest = &data[done - 1..];
                    std::future::poll_fn(|cx| {
                        Pin::new(&mut stream).poll_write_vectored(cx, &[IoSlice::new(rest)])
                    })
                    .await
                }
                .expect("write");
                done += n;
            }
        }
        stream.write_all(b"END").await.expect("tail");
        stream.shutdown().await.expect("shutdown");
        drop(stream);
        let got = reader.await.expect("reader");
        let mut want = b"HEAD\r\n".to_vec();
        let range = &content[offset as usize..(offset + len) as usize];
        for chunk in range.chunks(CHUNK) {
            want.push(b'-');
            want.extend_from_slice(chunk);
        }
        want.extend_from_slice(b"END");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes differ");
        assert!(queue.lock().is_empty());
    }

    #[tokio::test]
    async fn a_placeholder_without_a_queued_range_fails_instead_of_sending_zeros() {
        let (server, _client) = pair().await;
        let mut stream = SendfileStream::new(server, FileQueue::default());
        let err = stream
            .write_all(&PLACEHOLDER[..64])
            .await
            .expect_err("out of step");
        assert_eq!(err.kind(), io::ErrorKind::Other);
    }
}
