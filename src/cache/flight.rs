//! Blob downloads in flight: one upstream fetch per (repository, digest), written to a
//! temp file while it is hashed, and read by every client that asked for it as the
//! bytes arrive.
//!
//! The download is a detached task (the *leader*); each client is a *follower* reading
//! the temp file up to the length the leader has published. On success the file is
//! verified and committed (followers with the file open keep reading it after the
//! rename); on failure followers get an error where the bytes stop. The last byte is
//! only released once the whole blob is verified and committed, so no client ever
//! receives a complete body that failed verification.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use super::CacheError;
use crate::oci::{Digest, Hasher, RepoName};
use crate::storage::Store;
use crate::upstream::Upstream;

/// Bytes read from the growing file per chunk.
const CHUNK: usize = 256 * 1024;

/// A stream of body bytes for the HTTP layer.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// How a download stands.
#[derive(Clone, Debug)]
enum Progress {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes `0..written` are in the temp file.
    Receiving {
        size: Option<u64>,
        written: u64,
    },
    /// Verified and committed.
    Complete {
        size: u64,
    },
    Failed(CacheError),
}

struct Flight {
    progress: watch::Receiver<Progress>,
    temp: PathBuf,
    /// Where the file lives once committed.
    committed: PathBuf,
}

/// Downloads in flight, by (repository, digest).
#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<(String, String), Arc<Flight>>>,
}

/// What a leader needs to run a download.
pub struct Fetch {
    pub store: Store,
    pub upstream: Upstream,
    /// Name at the upstream, and the local name the blob is linked into.
    pub remote: RepoName,
    pub canonical: RepoName,
    pub digest: Digest,
    /// Woken after a commit, so eviction can keep the size budget.
    pub committed: Arc<tokio::sync::Notify>,
}

/// A client's view of a download, once the upstream has answered.
pub struct Follower {
    flight: Arc<Flight>,
    /// The blob's size, when the upstream said.
    pub size: Option<u64>,
    /// Whether this client joined a download another client started.
    pub joined: bool,
}

impl Flights {
    /// Joins the download of `fetch.digest` for its repository, starting it if none is
    /// running, and waits until the upstream has answered.
    pub async fn follow(self: &Arc<Self>, fetch: Fetch) -> Result<Follower, CacheError> {
        let key = (fetch.canonical.to_string(), fetch.digest.to_string());
        let (flight, joined) = {
            let mut running = self.running.lock().map_err(|_| CacheError::Internal)?;
            match running.get(&key) {
                Some(f) => (f.clone(), true),
                None => {
                    let (tx, rx) = watch::channel(Progress::Connecting);
                    let flight = Arc::new(Flight {
                        progress: rx,
                        temp: fetch.store.temp_path(),
                        committed: fetch.store.blob_path(&fetch.digest),
                    });
                    running.insert(key.clone(), flight.clone());
                    let this = Arc::clone(self);
                    let temp = flight.temp.clone();
                    tokio::spawn(async move {
                        let result = download(&fetch, &temp, &tx).await;
                        if let Ok(mut running) = this.running.lock() {
                            running.remove(&key);
                        }
                        let _ = tx.send(match result {
                            Ok(size) => Progress::Complete { size },
                            Err(e) => {
                                let _ = tokio::fs::remove_file(&temp).await;
                                tracing::warn!(
                                    upstream = fetch.upstream.name(),
                                    repo = %fetch.remote,
                                    digest = %fetch.digest,
                                    error = %e,
                                    "blob download failed"
                                );
                                Progress::Failed(e)
                            }
                        });
                    });
                    (flight, false)
                }
            }
        };
        let mut rx = flight.progress.clone();
        let size = {
            let p = rx
                .wait_for(|p| !matches!(p, Progress::Connecting))
                .await
                .map_err(|_| CacheError::Internal)?;
            match &*p {
                Progress::Receiving { size, .. } => *size,
                Progress::Complete { size } => Some(*size),
                Progress::Failed(e) => return Err(e.clone()),
                Progress::Connecting => None,
            }
        };
        Ok(Follower {
            flight,
            size,
            joined,
        })
    }
}

/// The leader: fetches, writes, hashes, verifies, commits. Returns the size.
async fn download(
    fetch: &Fetch,
    temp: &PathBuf,
    tx: &watch::Sender<Progress>,
) -> Result<u64, CacheError> {
    let resp = fetch.upstream.blob(&fetch.remote, &fetch.digest, 0).await?;
    let mut file = tokio::fs::File::create(temp)
        .await
        .map_err(CacheError::io)?;
    let size = resp.size;
    tx.send_replace(Progress::Receiving { size, written: 0 });
    let mut hasher = Hasher::new(fetch.digest.algorithm());
    let mut written = 0u64;
    let mut body = resp.body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if size.is_some_and(|s| written + chunk.len() as u64 > s) {
            return Err(CacheError::Invalid(
                "upstream sent more bytes than it announced".into(),
            ));
        }
        file.write_all(&chunk).await.map_err(CacheError::io)?;
        // Wait for the write to land before telling followers the bytes are there.
        file.flush().await.map_err(CacheError::io)?;
        hasher.update(&chunk);
        written += chunk.len() as u64;
        tx.send_replace(Progress::Receiving { size, written });
    }
    if size.is_some_and(|s| s != written) {
        return Err(CacheError::Invalid(format!(
            "upstream sent {written} bytes of an announced {}",
            size.unwrap_or_default()
        )));
    }
    let actual = hasher.finish();
    if actual != fetch.digest {
        return Err(CacheError::Invalid(format!(
            "upstream sent content with digest {actual} for {}",
            fetch.digest
        )));
    }
    drop(file);
    fetch
        .store
        .commit_fetched(&fetch.canonical, temp.clone(), &fetch.digest, written)
        .await?;
    fetch.committed.notify_one();
    Ok(written)
}

impl Follower {
    /// Streams bytes `start..start + len` (or to the end) as the download provides them.
    pub fn stream(self, start: u64, len: Option<u64>) -> ByteStream {
        let end = len.map(|l| start + l);
        let state = ReadState {
            flight: self.flight.clone(),
            rx: self.flight.progress.clone(),
            file: None,
            pos: start,
            end,
        };
        Box::pin(futures_util::stream::unfold(
            Some(state),
            |state| async move {
                let mut state = state?;
                match state.next_chunk().await {
                    Ok(Some(bytes)) => Some((Ok(bytes), Some(state))),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), None)),
                }
            },
        ))
    }
}

struct ReadState {
    flight: Arc<Flight>,
    rx: watch::Receiver<Progress>,
    file: Option<tokio::fs::File>,
    pos: u64,
    end: Option<u64>,
}

impl ReadState {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let (available, done) = match &*self.rx.borrow_and_update() {
                Progress::Connecting => (0, false),
                Progress::Receiving { written, .. } => (*written, false),
                Progress::Complete { size } => (*size, true),
                Progress::Failed(e) => {
                    return Err(io::Error::other(format!("upstream download failed: {e}")));
                }
            };
            // The last byte is held back until the digest is verified and the blob
            // committed, so a client never holds a whole body that turns out wrong.
            let available = if done {
                available
            } else {
                available.saturating_sub(1)
            };
            let limit = self.end.map_or(available, |e| e.min(available));
            if self.pos < limit {
                return self.read(limit).await.map(Some);
            }
            if done || self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            if self.rx.changed().await.is_err() {
                // The leader is gone; its last word decides.
                if let Progress::Complete { .. } = &*self.rx.borrow() {
                    continue;
                }
                return Err(io::Error::other("upstream download was abandoned"));
            }
        }
    }

    async fn read(&mut self, limit: u64) -> io::Result<Bytes> {
        if self.file.is_none() {
            let mut file = match tokio::fs::File::open(&self.flight.temp).await {
                Ok(f) => f,
                // Committed already: the same bytes under their final name.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tokio::fs::File::open(&self.flight.committed).await?
                }
                Err(e) => return Err(e),
            };
            file.seek(io::SeekFrom::Start(self.pos)).await?;
            self.file = Some(file);
        }
        let want = usize::try_from((limit - self.pos).min(CHUNK as u64)).unwrap_or(CHUNK);
        let mut buf = BytesMut::zeroed(want);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no file"))?;
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "download file is shorter than announced",
            ));
        }
        buf.truncate(n);
        self.pos += n as u64;
        Ok(buf.freeze())
    }
}
