//! The one way blob bytes reach the store: [`BlobWriter`] appends to a part file on the
//! blobs' filesystem while hashing, [`BlobWriter::verify`] checks the digest, and
//! [`VerifiedBlob::commit`] fsyncs, renames into place, fsyncs the directory and only
//! then links the blob into a repository in redb.
//!
//! Uploads (a session's file under `uploads/`), monolithic pushes and pull-through
//! downloads (a fresh file under `tmp/`) all write here; nothing outside `storage` knows
//! where the files live. Readers of a blob still being written get a [`GrowingBlob`]:
//! how many bytes are on disk so far, and the file (the part file, or the committed blob
//! once renamed — the same bytes under their final name).
//!
//! Appending is a pipeline: the caller hands over batches of chunks, one blocking
//! thread writes them and publishes the new length, another hashes them, so receiving,
//! writing and hashing overlap. A writer opened on a part file that already holds bytes
//! without their hash state re-hashes those bytes first (an upload after a restart, or
//! a download resumed from where it stopped) and then appends.
//!
//! Must not: know HTTP, or let a part file become visible as a blob before its digest
//! checked out. A part file of a download is removed when its writer (or verified blob)
//! is dropped uncommitted; temp files a crash left behind are swept at start-up. A
//! resumable download's part file stays (until gc's grace period) for the next attempt.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::schema::LinkOrigin;
use super::{Inner, StorageError, Store};
use crate::oci::{Algorithm, Digest, Hasher, RepoName};

/// Why writing or verifying a blob failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The bytes written hash to `actual`, not to the digest they were written for.
    #[error("content has digest {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> WriteError {
        WriteError::Storage(StorageError::Io(e))
    }
}

/// Why copying a body into a writer stopped.
#[derive(Debug)]
pub enum StreamError<E> {
    /// The body itself failed.
    Body(E),
    /// The body ran past the limit it was given.
    TooLong,
    Write(WriteError),
}

/// Chunks handed to the writer and hasher threads together.
type Batch = Arc<Vec<Bytes>>;

/// Most bytes gathered into one batch by [`BlobWriter::write_stream`].
const BATCH: usize = 1 << 20;

/// Batches the caller may run ahead of the slower of the two threads.
const QUEUED_BATCHES: usize = 4;

/// Which part file a writer appends to, which decides its fate when dropped uncommitted.
#[derive(Debug)]
enum Part {
    /// A download or monolithic push under `tmp/`: removed unless committed.
    Temp,
    /// Upload session `id` under `uploads/`: kept for the session's next request.
    Upload(String),
    /// A resumable download under `partial/`: kept for the next attempt to resume, unless
    /// its bytes proved wrong.
    Partial,
}

/// A part file that is removed when dropped, unless it belongs to an upload session.
#[derive(Debug)]
struct PartFile {
    path: PathBuf,
    part: Part,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        // Synchronous, so that a failed write has left nothing behind when its error is
        // seen; one unlink is short. Once committed the path no longer exists, and
        // NotFound is the expected answer. A file a failed removal (or a crash) leaves
        // is swept at start-up.
        if matches!(self.part, Part::Temp) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct Pipes {
    to_writer: mpsc::Sender<Batch>,
    to_hasher: mpsc::Sender<Batch>,
    writer: JoinHandle<io::Result<u64>>,
    hasher: JoinHandle<io::Result<Hasher>>,
}

/// A blob being written: see the module doc for the protocol.
pub struct BlobWriter {
    inner: Arc<Inner>,
    file: PartFile,
    /// Length of the part file when this writer opened it.
    start: u64,
    /// The hash state at `start`, if known, to restore when an append is cut back.
    saved: Option<Hasher>,
    pipes: Option<Pipes>,
    /// The length on disk, published by the writer thread.
    written: watch::Receiver<u64>,
}

/// A blob whose bytes are on disk and whose digest checked out, not yet committed.
pub struct VerifiedBlob {
    inner: Arc<Inner>,
    file: PartFile,
    digest: Digest,
    size: u64,
}

/// A reader's view of a blob being written: the length on disk so far and the file.
#[derive(Clone, Debug)]
pub struct GrowingBlob {
    written: watch::Receiver<u64>,
    part: Arc<PathBuf>,
    committed: Arc<PathBuf>,
}

impl Store {
    /// A writer for a new blob under `algorithm`, in a fresh temp file.
    pub async fn blob_writer(&self, algorithm: Algorithm) -> Result<BlobWriter, StorageError> {
        let path = self.inner.files.temp_path();
        let file = PartFile {
            path,
            part: Part::Temp,
        };
        let hasher = HashState::Known(Box::new(Hasher::new(algorithm)));
        BlobWriter::open(self.inner.clone(), file, 0, hasher).await
    }

    /// A writer appending to upload session `id` at `offset` (its current length), with
    /// the running hash state if one is kept. Without it, the existing bytes are
    /// re-hashed under sha256 (the common algorithm; `verify` re-hashes for others).
    pub(super) async fn upload_writer(
        &self,
        id: &str,
        offset: u64,
        hasher: Option<Hasher>,
    ) -> Result<BlobWriter, StorageError> {
        let file = PartFile {
            path: self.inner.files.upload_path(id),
            part: Part::Upload(id.to_owned()),
        };
        let hasher = hasher.map_or(HashState::Rehash(Algorithm::Sha256), |h| {
            HashState::Known(Box::new(h))
        });
        BlobWriter::open(self.inner.clone(), file, offset, hasher).await
    }

    /// Bytes already on disk from an earlier, cut-off resumable download of `digest`.
    pub async fn partial_len(&self, digest: &Digest) -> Result<u64, StorageError> {
        let path = self.inner.files.partial_path(digest);
        tokio::task::spawn_blocking(move || match std::fs::metadata(path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(StorageError::Io(e)),
        })
        .await
        .map_err(|_| StorageError::Task)?
    }

    /// A writer for a resumable download of `digest`, appending at `offset` (what
    /// [`Store::partial_len`] said, or 0 to start over: anything past it is cut off).
    /// The bytes before `offset` are re-hashed, so the digest is checked over the whole
    /// file. The file outlives the writer unless committed or proven wrong.
    pub async fn resumable_writer(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobWriter, StorageError> {
        let file = PartFile {
            path: self.inner.files.partial_path(digest),
            part: Part::Partial,
        };
        let hasher = if offset == 0 {
            HashState::Known(Box::new(Hasher::new(digest.algorithm())))
        } else {
            HashState::Rehash(digest.algorithm())
        };
        BlobWriter::open(self.inner.clone(), file, offset, hasher).await
    }
}

/// The hash of the bytes a part file holds when a writer opens it.
enum HashState {
    Known(Box<Hasher>),
    /// Unknown (lost in a restart, or never kept): read the bytes back under this.
    Rehash(Algorithm),
}

fn algorithm_of(h: &Hasher) -> Algorithm {
    match h {
        Hasher::Sha256(_) => Algorithm::Sha256,
        Hasher::Sha512(_) => Algorithm::Sha512,
    }
}

impl BlobWriter {
    /// Opens `file` for appending at `start` (cutting off anything past it) and starts
    /// the writer and hasher threads. `hasher` says what bytes `0..start` hash to; this
    /// is also how a cut-off download resumes from what is already on disk.
    async fn open(
        inner: Arc<Inner>,
        file: PartFile,
        start: u64,
        hasher: HashState,
    ) -> Result<BlobWriter, StorageError> {
        // New bytes need the reserve free; the check repeats as they are written.
        inner.check_reserve(1)?;
        let (path, create) = (
            file.path.clone(),
            matches!(file.part, Part::Temp | Part::Partial),
        );
        let handle = tokio::task::spawn_blocking(move || {
            let f = std::fs::OpenOptions::new()
                .create(create)
                .append(true)
                .open(&path)?;
            // Anything past `start` was never acknowledged (a cut-off append).
            if f.metadata()?.len() != start {
                f.set_len(start)?;
            }
            Ok::<_, io::Error>(f)
        })
        .await
        .map_err(|_| StorageError::Task)??;
        let (progress, written) = watch::channel(start);
        let (to_writer, writer_queue) = mpsc::channel::<Batch>(QUEUED_BATCHES);
        let (to_hasher, hasher_queue) = mpsc::channel::<Batch>(QUEUED_BATCHES);
        let guard = Arc::clone(&inner);
        let writer = tokio::task::spawn_blocking(move || {
            write_file(handle, writer_queue, start, progress, &guard)
        });
        let (saved, existing) = match hasher {
            HashState::Known(h) => (Some((*h).clone()), Ok(*h)),
            HashState::Rehash(algorithm) => (None, Err((file.path.clone(), algorithm, start))),
        };
        let hasher = tokio::task::spawn_blocking(move || hash(existing, hasher_queue));
        Ok(BlobWriter {
            inner,
            file,
            start,
            saved,
            pipes: Some(Pipes {
                to_writer,
                to_hasher,
                writer,
                hasher,
            }),
            written,
        })
    }

    /// A handle for readers of the bytes written so far. Once `digest` is committed the
    /// handle opens the committed file instead of the part file.
    pub fn growing(&self, digest: &Digest) -> GrowingBlob {
        GrowingBlob {
            written: self.written.clone(),
            part: Arc::new(self.file.path.clone()),
            committed: Arc::new(self.inner.files.blob_path(digest)),
        }
    }

    /// Appends one batch of chunks. After an error the writer takes no more bytes.
    pub async fn write(&mut self, batch: Vec<Bytes>) -> Result<(), WriteError> {
        if batch.is_empty() {
            return Ok(());
        }
        let Some(pipes) = &self.pipes else {
            return Err(io::Error::other("blob writer failed earlier").into());
        };
        let batch = Arc::new(batch);
        if pipes.to_writer.send(Arc::clone(&batch)).await.is_err()
            || pipes.to_hasher.send(batch).await.is_err()
        {
            // A thread stopped early: its own error says why.
            return Err(match self.drain().await {
                Err(e) => e,
                Ok(_) => StorageError::Task.into(),
            });
        }
        Ok(())
    }

    /// Appends `body` in batches of whatever has already arrived (up to 1 MiB), so the
    /// threads are woken once per batch rather than once per chunk. Fails with
    /// [`StreamError::TooLong`] as soon as more than `limit` bytes arrived. Returns the
    /// number of bytes appended.
    pub async fn write_stream<S, E>(
        &mut self,
        mut body: S,
        limit: Option<u64>,
    ) -> Result<u64, StreamError<E>>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
    {
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
                    Some(Err(e)) => {
                        // What arrived before the failure is kept: a resumable download
                        // continues after it. (An upload cuts it back; a temp file goes.)
                        let _ = self.write(batch).await;
                        return Err(StreamError::Body(e));
                    }
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
            if limit.is_some_and(|l| received > l) {
                return Err(StreamError::TooLong);
            }
            self.write(batch).await.map_err(StreamError::Write)?;
            if ended {
                return Ok(received);
            }
        }
    }

    /// Stops the threads and returns the part file's length and the hash state.
    async fn drain(&mut self) -> Result<(u64, Hasher), WriteError> {
        let pipes = self
            .pipes
            .take()
            .ok_or_else(|| io::Error::other("blob writer failed earlier"))?;
        drop((pipes.to_writer, pipes.to_hasher));
        let written = pipes.writer.await.map_err(|_| StorageError::Task)?;
        let hasher = pipes.hasher.await.map_err(|_| StorageError::Task)?;
        Ok((written?, hasher?))
    }

    /// Waits for every byte to be written and checks the whole part file against
    /// `digest`. On a mismatch a temp file is removed; an upload's file is left to its
    /// session.
    pub async fn verify(mut self, digest: &Digest) -> Result<VerifiedBlob, WriteError> {
        let (size, hasher) = self.drain().await?;
        let actual = if algorithm_of(&hasher) == digest.algorithm() {
            hasher.finish()
        } else {
            let existing = Err((self.file.path.clone(), digest.algorithm(), size));
            let (_, never) = mpsc::channel::<Batch>(1);
            tokio::task::spawn_blocking(move || hash(existing, never))
                .await
                .map_err(|_| StorageError::Task)??
                .finish()
        };
        if &actual != digest {
            if matches!(self.file.part, Part::Partial) {
                // Bytes that hash wrong must not be resumed from.
                let path = self.file.path.clone();
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
            }
            return Err(WriteError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let BlobWriter { inner, file, .. } = self;
        Ok(VerifiedBlob {
            inner,
            file,
            digest: digest.clone(),
            size,
        })
    }

    /// Stops a resumable download that was cut off, once every byte handed over is on
    /// disk. Returns the part file's length: where the next attempt resumes.
    pub async fn keep_partial(mut self) -> Result<u64, WriteError> {
        Ok(self.drain().await?.0)
    }

    /// Ends an append that went well: the new length and the hash state covering it.
    /// If this fails the writer can still be cut back.
    pub(super) async fn pause(&mut self) -> Result<(u64, Hasher), WriteError> {
        self.drain().await
    }

    /// Length of the part file when this writer opened it.
    pub(super) fn start(&self) -> u64 {
        self.start
    }

    /// Ends an append that failed: cuts the part file back to where this writer began
    /// and returns the hash state for that length, if it was known.
    pub(super) async fn cut_back(mut self) -> Result<Option<Hasher>, StorageError> {
        let _ = self.drain().await;
        let (path, start) = (self.file.path.clone(), self.start);
        tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)?
                .set_len(start)
        })
        .await
        .map_err(|_| StorageError::Task)??;
        Ok(self.saved.take())
    }
}

impl VerifiedBlob {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes the blob durable and links it into `repo`: fsync, rename into place, fsync
    /// the directory, then one redb transaction (which also closes an upload session).
    /// If the blob is already stored, the new copy is dropped and the stored one linked.
    pub async fn commit(self, repo: &RepoName, origin: LinkOrigin) -> Result<u64, StorageError> {
        let repo = repo.clone();
        let VerifiedBlob {
            inner,
            file,
            digest,
            size,
        } = self;
        let worker = Arc::clone(&inner);
        tokio::task::spawn_blocking(move || {
            let i = &worker;
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            i.files.commit(&file.path, &digest)?;
            let upload = match &file.part {
                Part::Upload(id) => Some(id.as_str()),
                Part::Temp | Part::Partial => None,
            };
            i.link(&repo, &digest, Some(size), origin, upload)?;
            if origin == LinkOrigin::Upstream {
                i.record_access(&digest);
            }
            Ok(size)
        })
        .await
        .map_err(|_| StorageError::Task)?
    }
}

impl GrowingBlob {
    /// Bytes on disk so far; marks them seen for [`GrowingBlob::changed`].
    pub fn written(&mut self) -> u64 {
        *self.written.borrow_and_update()
    }

    /// Waits until more bytes than last seen are on disk. Returns false once the writer
    /// has stopped: no more bytes will come.
    pub async fn changed(&mut self) -> bool {
        self.written.changed().await.is_ok()
    }

    /// Opens the blob's file: the part file while it exists, else the committed blob
    /// (renamed from it). Blocking work runs off the executor.
    pub async fn open(&self) -> io::Result<std::fs::File> {
        let (part, committed) = (Arc::clone(&self.part), Arc::clone(&self.committed));
        tokio::task::spawn_blocking(move || match std::fs::File::open(&*part) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::File::open(&*committed),
            other => other,
        })
        .await
        .map_err(|_| io::Error::other("open task failed"))?
    }
}

/// The writer thread: appends each batch, then publishes the new length. Stops with
/// `StorageFull` once the free space falls to half the reserve, so that a blob being
/// written never takes the room metadata commits need.
fn write_file(
    mut file: std::fs::File,
    mut queue: mpsc::Receiver<Batch>,
    start: u64,
    progress: watch::Sender<u64>,
    inner: &Inner,
) -> io::Result<u64> {
    let mut len = start;
    while let Some(batch) = queue.blocking_recv() {
        if let Err(e) = inner.check_reserve(2) {
            return Err(io::Error::new(io::ErrorKind::StorageFull, e.to_string()));
        }
        for chunk in batch.iter() {
            file.write_all(chunk)?;
            len += chunk.len() as u64;
        }
        progress.send_replace(len);
    }
    Ok(len)
}

/// The hasher thread: the hash state of the bytes already in the file (given, or read
/// back as `(path, algorithm, length)`), updated with every batch in order.
fn hash(
    existing: Result<Hasher, (PathBuf, Algorithm, u64)>,
    mut queue: mpsc::Receiver<Batch>,
) -> io::Result<Hasher> {
    let mut hasher = match existing {
        Ok(h) => h,
        Err((path, algorithm, len)) => {
            let mut hasher = Hasher::new(algorithm);
            let mut file = std::fs::File::open(path)?.take(len);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            hasher
        }
    };
    while let Some(batch) = queue.blocking_recv() {
        for chunk in batch.iter() {
            hasher.update(chunk);
        }
    }
    Ok(hasher)
}
