//! Blob downloads in flight: one upstream fetch per (repository, digest), written to a
//! temp file while it is hashed, and read by every client that asked for it as the
//! bytes arrive.
//!
//! The download is a detached task (the *leader*); each client is a *follower* sent
//! ranges of the temp file up to the length the leader has published. On success the
//! file is verified and then committed (followers with the file open keep reading it
//! after the rename); on failure followers get an error where the bytes stop. The last
//! byte is only released once the whole blob is verified, so no client ever receives a
//! complete body that failed verification.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};

use super::CacheError;
use crate::oci::{Digest, Hasher, RepoName};
use crate::storage::{FileRange, Store};
use crate::upstream::{Upstream, UpstreamError};

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
    /// Verified: every byte may be served. The commit may still be running.
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
                        if let Err(e) = result {
                            let _ = tokio::fs::remove_file(&temp).await;
                            tracing::warn!(
                                upstream = fetch.upstream.name(),
                                repo = %fetch.remote,
                                digest = %fetch.digest,
                                error = %e,
                                "blob download failed"
                            );
                            // Once verified, followers keep the verdict: the bytes they
                            // read are right even if storing them failed.
                            tx.send_if_modified(|p| {
                                let verified = matches!(p, Progress::Complete { .. });
                                if !verified {
                                    *p = Progress::Failed(e);
                                }
                                !verified
                            });
                        }
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

impl Flights {
    /// Waits until downloads of `digest` for any repository that are verified but still
    /// committing have finished, so that a client who has the whole blob and asks again,
    /// through whatever repository, finds it stored.
    pub async fn settle(&self, digest: &Digest) {
        let committing: Vec<_> = match self.running.lock() {
            Ok(running) => running
                .iter()
                .filter(|((_, d), f)| {
                    d == digest.as_str()
                        && matches!(*f.progress.borrow(), Progress::Complete { .. })
                })
                .map(|(_, f)| f.progress.clone())
                .collect(),
            Err(_) => return,
        };
        for mut rx in committing {
            // The leader drops its sender when the commit is over; nothing else ends this.
            let _ = rx.wait_for(|_| false).await;
        }
    }
}

/// The leader: fetches, writes, hashes, verifies, commits. Returns the size.
///
/// The network side only receives, gathering what has already arrived into batches of
/// up to [`BATCH`] bytes. Two blocking threads take each batch: one appends it to the
/// temp file and tells followers, the other hashes it. Receiving, writing and hashing
/// overlap, and followers are woken once per batch rather than once per network read.
/// Followers get the last byte as soon as the digest checks out: the commit (fsync,
/// rename, redb) happens after that and is not on any client's path.
async fn download(
    fetch: &Fetch,
    temp: &Path,
    tx: &watch::Sender<Progress>,
) -> Result<u64, CacheError> {
    let resp = fetch.upstream.blob(&fetch.remote, &fetch.digest, 0).await?;
    let file = std::fs::File::create(temp).map_err(CacheError::io)?;
    let size = resp.size;
    tx.send_replace(Progress::Receiving { size, written: 0 });
    let (to_writer, writer_queue) = mpsc::channel::<Batch>(QUEUED_BATCHES);
    let (to_hasher, hasher_queue) = mpsc::channel::<Batch>(QUEUED_BATCHES);
    let writer = {
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || write_file(file, writer_queue, size, &tx))
    };
    let algorithm = fetch.digest.algorithm();
    let hasher = tokio::task::spawn_blocking(move || hash(hasher_queue, algorithm));
    let failure = receive(resp.body, size, &to_writer, &to_hasher).await;
    drop((to_writer, to_hasher));
    let written = writer.await.map_err(|_| CacheError::Internal)?;
    let actual = hasher.await.map_err(|_| CacheError::Internal)?;
    if let Some(e) = failure {
        return Err(e);
    }
    let written = written.map_err(CacheError::io)?;
    if size.is_some_and(|s| s != written) {
        return Err(CacheError::Invalid(format!(
            "upstream sent {written} bytes of an announced {}",
            size.unwrap_or_default()
        )));
    }
    if actual != fetch.digest {
        return Err(CacheError::Invalid(format!(
            "upstream sent content with digest {actual} for {}",
            fetch.digest
        )));
    }
    // Verified: followers may have the last byte while the commit runs.
    tx.send_replace(Progress::Complete { size: written });
    fetch
        .store
        .commit_fetched(&fetch.canonical, temp.to_path_buf(), &fetch.digest, written)
        .await?;
    fetch.committed.notify_one();
    Ok(written)
}

/// Network chunks handed to the writer and hasher threads together.
type Batch = Arc<Vec<Bytes>>;

/// Most bytes gathered into one batch.
const BATCH: usize = 1 << 20;

/// Batches the network side may run ahead of the slower of the two threads.
const QUEUED_BATCHES: usize = 4;

/// Receives the body into batches for the writer and the hasher. Returns why it
/// stopped early, if it did (a thread that stopped reports its own error).
async fn receive(
    mut body: impl Stream<Item = Result<Bytes, UpstreamError>> + Unpin,
    size: Option<u64>,
    to_writer: &mpsc::Sender<Batch>,
    to_hasher: &mpsc::Sender<Batch>,
) -> Option<CacheError> {
    let mut received = 0u64;
    loop {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut ended = false;
        // Wait for one chunk, then take whatever else has already arrived.
        let mut next = body.next().await;
        loop {
            match next {
                None => {
                    ended = true;
                    break;
                }
                Some(Err(e)) => return Some(CacheError::from(e)),
                Some(Ok(chunk)) => {
                    bytes += chunk.len();
                    batch.push(chunk);
                }
            }
            if bytes >= BATCH {
                break;
            }
            match body.next().now_or_never() {
                Some(n) => next = n,
                None => break,
            }
        }
        received += bytes as u64;
        if size.is_some_and(|s| received > s) {
            return Some(CacheError::Invalid(
                "upstream sent more bytes than it announced".into(),
            ));
        }
        if !batch.is_empty() {
            let batch = Arc::new(batch);
            if to_writer.send(Arc::clone(&batch)).await.is_err()
                || to_hasher.send(batch).await.is_err()
            {
                return None;
            }
        }
        if ended {
            return None;
        }
    }
}

/// The writer thread: appends each batch to `file`, then tells followers. Returns the
/// length written.
fn write_file(
    mut file: std::fs::File,
    mut queue: mpsc::Receiver<Batch>,
    size: Option<u64>,
    tx: &watch::Sender<Progress>,
) -> io::Result<u64> {
    let mut written = 0u64;
    while let Some(batch) = queue.blocking_recv() {
        for chunk in batch.iter() {
            file.write_all(chunk)?;
            written += chunk.len() as u64;
        }
        tx.send_replace(Progress::Receiving { size, written });
    }
    Ok(written)
}

/// The hasher thread: the digest of every batch, in order.
fn hash(mut queue: mpsc::Receiver<Batch>, algorithm: crate::oci::Algorithm) -> Digest {
    let mut hasher = Hasher::new(algorithm);
    while let Some(batch) = queue.blocking_recv() {
        for chunk in batch.iter() {
            hasher.update(chunk);
        }
    }
    hasher.finish()
}

impl Follower {
    /// The file ranges holding bytes `start..start + len` (or to the end), each yielded
    /// as soon as the download has written it.
    pub fn ranges(
        self,
        start: u64,
        len: Option<u64>,
    ) -> impl Stream<Item = io::Result<FileRange>> + Send + 'static {
        let end = len.map(|l| start + l);
        let state = ReadState {
            flight: self.flight.clone(),
            rx: self.flight.progress.clone(),
            file: None,
            pos: start,
            end,
        };
        futures_util::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            match state.next_range().await {
                Ok(Some(range)) => Some((Ok(range), Some(state))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}

struct ReadState {
    flight: Arc<Flight>,
    rx: watch::Receiver<Progress>,
    file: Option<Arc<std::fs::File>>,
    pos: u64,
    end: Option<u64>,
}

impl ReadState {
    async fn next_range(&mut self) -> io::Result<Option<FileRange>> {
        loop {
            let (available, done) = match &*self.rx.borrow_and_update() {
                Progress::Connecting => (0, false),
                Progress::Receiving { written, .. } => (*written, false),
                Progress::Complete { size } => (*size, true),
                Progress::Failed(e) => {
                    return Err(io::Error::other(format!("upstream download failed: {e}")));
                }
            };
            // The last byte is held back until the digest is verified, so a client
            // never holds a whole body that turns out wrong.
            let available = if done {
                available
            } else {
                available.saturating_sub(1)
            };
            let limit = self.end.map_or(available, |e| e.min(available));
            if self.pos < limit {
                let file = self.open().await?;
                let range = FileRange {
                    file,
                    offset: self.pos,
                    len: limit - self.pos,
                };
                self.pos = limit;
                return Ok(Some(range));
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

    /// The download's file, opened on first use: the temp file, or the committed blob
    /// once it has been renamed (the same bytes under their final name).
    async fn open(&mut self) -> io::Result<Arc<std::fs::File>> {
        if let Some(file) = &self.file {
            return Ok(Arc::clone(file));
        }
        let (temp, committed) = (self.flight.temp.clone(), self.flight.committed.clone());
        let file = tokio::task::spawn_blocking(move || match std::fs::File::open(&temp) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::File::open(committed),
            other => other,
        })
        .await
        .map_err(|_| io::Error::other("open task failed"))??;
        let file = Arc::new(file);
        self.file = Some(Arc::clone(&file));
        Ok(file)
    }
}
