//! Blob upload sessions (chunked and monolithic) and their commit into the blob store.
//!
//! An upload's bytes go to `uploads/<id>` through the store's one blob writer; its record
//! (repository, owner, start time) lives in redb so sessions survive a restart. A session
//! is private to the principal that opened it: to anyone else it does not exist. A chunk
//! that fails midway (or is not as long as its `Content-Range` says) is cut back off the
//! file, so the offset a client is told always covers whole, acknowledged chunks. The
//! running hash is kept between chunks in memory; after a restart the writer re-hashes
//! what the file holds. A session is idle since the last write to its file; abandoned
//! ones are reaped (by the daemon, and by gc).

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::Stream;
use redb::ReadableTable;

use super::files::random_id;
use super::schema::{LinkOrigin, UPLOADS, UploadRecord};
use super::writer::{BlobWriter, StreamError, WriteError};
use super::{Inner, StorageError, Store, now_secs};
use crate::oci::{Algorithm, Digest, Hasher, RepoName};

/// Why an upload step failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("upload session is unknown")]
    Unknown,
    #[error("chunk does not start at the current offset {offset}")]
    OutOfOrder { offset: u64 },
    #[error("upload session is busy with another request")]
    Busy,
    #[error("uploaded content does not match the digest")]
    DigestMismatch,
    #[error("request body failed: {0}")]
    Body(io::Error),
    /// The chunk's length is not what its `Content-Range` announced.
    #[error("Content-Range announces {expected} bytes, the body had {got}")]
    RangeMismatch { expected: u64, got: u64 },
    /// The principal already holds `limit` open sessions.
    #[error("{limit} upload sessions are already open for this client; finish or cancel one")]
    TooMany { limit: usize },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<io::Error> for UploadError {
    fn from(e: io::Error) -> UploadError {
        UploadError::Storage(StorageError::Io(e))
    }
}

/// Marks an upload id busy for the life of one request.
struct BusyGuard {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.id);
        }
    }
}

impl From<WriteError> for UploadError {
    fn from(e: WriteError) -> UploadError {
        match e {
            WriteError::DigestMismatch { .. } => UploadError::DigestMismatch,
            WriteError::Storage(e) => UploadError::Storage(e),
        }
    }
}

impl From<StreamError<io::Error>> for UploadError {
    fn from(e: StreamError<io::Error>) -> UploadError {
        match e {
            StreamError::Body(e) => UploadError::Body(e),
            StreamError::Write(e) => e.into(),
            // No limit is given for uploads, so this cannot happen; refuse the chunk.
            StreamError::TooLong => UploadError::Body(io::Error::other("body too long")),
        }
    }
}

/// One upload session as a request names it: the repository in the URL, the session id,
/// and the principal asking (see `Principal::session_owner`).
pub struct Session<'a> {
    pub repo: &'a RepoName,
    pub id: &'a str,
    pub owner: &'a str,
}

/// Where a chunk goes, from its `Content-Range`: its first byte, and its length when the
/// header names an end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRange {
    pub start: u64,
    pub len: Option<u64>,
}

impl Store {
    /// Opens a new upload session for `repo`, owned by `owner`, who may hold at most
    /// `limit` open sessions.
    pub async fn start_upload(
        &self,
        repo: &RepoName,
        owner: &str,
        limit: usize,
    ) -> Result<String, UploadError> {
        let (repo, owner) = (repo.clone(), owner.to_owned());
        self.blocking(move |i| {
            let txn = i.db.begin_write()?;
            let id = {
                let mut uploads = txn.open_table(UPLOADS)?;
                let mut open = 0;
                for row in uploads.iter()? {
                    let (_, v) = row?;
                    if UploadRecord::decode(v.value())?.owner == owner {
                        open += 1;
                    }
                }
                if open >= limit {
                    return Ok(Err(UploadError::TooMany { limit }));
                }
                let id = random_id();
                std::fs::File::create(i.files.upload_path(&id))?;
                uploads.insert(
                    id.as_str(),
                    UploadRecord::encode(now_secs(), &owner, repo.as_str()).as_slice(),
                )?;
                id
            };
            txn.commit()?;
            Ok(Ok(id))
        })
        .await?
    }

    /// The number of bytes received so far, or `None` if `id` is not an upload of `repo`
    /// that `owner` opened.
    pub async fn upload_offset(
        &self,
        repo: &RepoName,
        id: &str,
        owner: &str,
    ) -> Result<Option<u64>, StorageError> {
        let (repo, id, owner) = (repo.clone(), id.to_owned(), owner.to_owned());
        self.blocking(move |i| i.upload_offset(&repo, &id, &owner))
            .await
    }

    /// Removes upload sessions idle (no byte written) for longer than `timeout`, files
    /// and records. Returns how many.
    pub async fn reap_uploads(&self, timeout: std::time::Duration) -> Result<u64, StorageError> {
        self.blocking(move |i| i.reap_uploads(timeout)).await
    }

    fn claim(&self, id: &str) -> Result<BusyGuard, UploadError> {
        let set = self.inner.busy.clone();
        let mut guard = set.lock().map_err(|_| UploadError::Busy)?;
        if !guard.insert(id.to_owned()) {
            return Err(UploadError::Busy);
        }
        drop(guard);
        Ok(BusyGuard {
            set,
            id: id.to_owned(),
        })
    }

    fn take_hasher(&self, id: &str, offset: u64) -> Option<Hasher> {
        let mut map = self.inner.hashers.lock().ok()?;
        match map.remove(id) {
            Some((h, at)) if at == offset => Some(h),
            // Offset 0 needs no history: start a fresh sha256 (the common algorithm).
            _ if offset == 0 => Some(Hasher::new(Algorithm::Sha256)),
            _ => None,
        }
    }

    /// Keeps the running hash of upload `id`, valid up to `offset`.
    fn keep_hasher(&self, id: &str, hasher: Option<Hasher>, offset: u64) {
        if let (Some(h), Ok(mut map)) = (hasher, self.inner.hashers.lock()) {
            map.insert(id.to_owned(), (h, offset));
        }
    }

    /// Checks that the chunk's range (if given) starts at the current offset of upload
    /// `id` of `repo` (opened by `owner`) and appends `body`, which must then hold exactly
    /// the range's length; returns the writer still open after it. On failure the file
    /// is cut back to the old offset and its hash state kept. The caller holds the claim.
    async fn append_checked<S>(
        &self,
        session: &Session<'_>,
        range: Option<ChunkRange>,
        body: S,
    ) -> Result<BlobWriter, UploadError>
    where
        S: Stream<Item = Result<Bytes, io::Error>> + Send + Unpin,
    {
        let id = session.id;
        let offset = self
            .upload_offset(session.repo, id, session.owner)
            .await?
            .ok_or(UploadError::Unknown)?;
        if range.is_some_and(|r| r.start != offset) {
            return Err(UploadError::OutOfOrder { offset });
        }
        let expected = range.and_then(|r| r.len);
        let hasher = self.take_hasher(id, offset);
        let mut writer = self.upload_writer(id, offset, hasher).await?;
        let failure = match writer.write_stream(body, expected).await {
            Ok(got) if expected.is_some_and(|e| e != got) => UploadError::RangeMismatch {
                expected: expected.unwrap_or_default(),
                got,
            },
            Ok(_) => return Ok(writer),
            Err(StreamError::TooLong) => UploadError::RangeMismatch {
                expected: expected.unwrap_or_default(),
                got: expected.unwrap_or_default() + 1,
            },
            Err(e) => e.into(),
        };
        let saved = writer.cut_back().await?;
        self.keep_hasher(id, saved, offset);
        Err(failure)
    }

    /// Appends a chunk. Its range, when the client sent `Content-Range`, must start at
    /// the current offset and match the body's length. Returns the new offset.
    pub async fn append_upload<S>(
        &self,
        session: &Session<'_>,
        range: Option<ChunkRange>,
        body: S,
    ) -> Result<u64, UploadError>
    where
        S: Stream<Item = Result<Bytes, io::Error>> + Send + Unpin,
    {
        let id = session.id;
        let _busy = self.claim(id)?;
        let mut writer = self.append_checked(session, range, body).await?;
        match writer.pause().await {
            Ok((offset, hasher)) => {
                self.keep_hasher(id, Some(hasher), offset);
                Ok(offset)
            }
            Err(e) => {
                let offset = writer.start();
                let saved = writer.cut_back().await?;
                self.keep_hasher(id, saved, offset);
                Err(e.into())
            }
        }
    }

    /// Completes an upload with an optional final chunk, verifies `digest`, commits the
    /// blob and links it into `repo`. On a digest mismatch the session is discarded.
    pub async fn finish_upload<S>(
        &self,
        session: &Session<'_>,
        range: Option<ChunkRange>,
        digest: &Digest,
        body: S,
    ) -> Result<u64, UploadError>
    where
        S: Stream<Item = Result<Bytes, io::Error>> + Send + Unpin,
    {
        let (repo, id) = (session.repo, session.id);
        let _busy = self.claim(id)?;
        let writer = self.append_checked(session, range, body).await?;
        let verified = match writer.verify(digest).await {
            Ok(v) => v,
            Err(WriteError::DigestMismatch { .. }) => {
                self.discard_upload(id).await?;
                return Err(UploadError::DigestMismatch);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(verified.commit(repo, LinkOrigin::Upload).await?)
    }

    /// Stores a whole blob sent in one request (`POST ?digest=`, or a mirror download).
    pub async fn put_blob<S>(
        &self,
        repo: &RepoName,
        digest: &Digest,
        origin: LinkOrigin,
        body: S,
    ) -> Result<u64, UploadError>
    where
        S: Stream<Item = Result<Bytes, io::Error>> + Send + Unpin,
    {
        // Dropped on any failure, the writer removes its temp file.
        let mut writer = self.blob_writer(digest.algorithm()).await?;
        writer.write_stream(body, None).await?;
        let verified = writer.verify(digest).await?;
        Ok(verified.commit(repo, origin).await?)
    }

    /// Cancels an upload. Returns whether it existed (for its owner).
    pub async fn cancel_upload(&self, session: &Session<'_>) -> Result<bool, UploadError> {
        let id = session.id;
        let _busy = self.claim(id)?;
        if self
            .upload_offset(session.repo, id, session.owner)
            .await?
            .is_none()
        {
            return Ok(false);
        }
        self.discard_upload(id).await?;
        Ok(true)
    }

    async fn discard_upload(&self, id: &str) -> Result<(), StorageError> {
        if let Ok(mut map) = self.inner.hashers.lock() {
            map.remove(id);
        }
        let id = id.to_owned();
        self.blocking(move |i| i.remove_upload(&id)).await
    }
}

impl Inner {
    pub(super) fn upload_offset(
        &self,
        repo: &RepoName,
        id: &str,
        owner: &str,
    ) -> Result<Option<u64>, StorageError> {
        // Ids are our own hex; anything else cannot name a session (and must not reach
        // the filesystem).
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(UPLOADS)?;
        let Some(v) = table.get(id)? else {
            return Ok(None);
        };
        let record = UploadRecord::decode(v.value())?;
        // Someone else's session does not exist, for this caller.
        if record.repo != repo.as_str() || !(record.owner.is_empty() || record.owner == owner) {
            return Ok(None);
        }
        match std::fs::metadata(self.files.upload_path(id)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn remove_upload(&self, id: &str) -> Result<(), StorageError> {
        let txn = self.db.begin_write()?;
        txn.open_table(UPLOADS)?.remove(id)?;
        txn.commit()?;
        match std::fs::remove_file(self.files.upload_path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

impl Inner {
    /// When upload `id` was last written to: its file's modification time, or its start
    /// when the file is gone or unreadable.
    pub(super) fn upload_last_activity(&self, id: &str, started: u64) -> u64 {
        std::fs::metadata(self.files.upload_path(id))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(started, |d| d.as_secs().max(started))
    }

    fn reap_uploads(&self, timeout: std::time::Duration) -> Result<u64, StorageError> {
        let cutoff = now_secs().saturating_sub(timeout.as_secs());
        let mut idle = Vec::new();
        {
            let txn = self.db.begin_read()?;
            for row in txn.open_table(UPLOADS)?.iter()? {
                let (k, v) = row?;
                let rec = UploadRecord::decode(v.value())?;
                if self.upload_last_activity(k.value(), rec.started) < cutoff {
                    idle.push(k.value().to_owned());
                }
            }
        }
        for id in &idle {
            self.remove_upload(id)?;
        }
        Ok(idle.len() as u64)
    }
}
