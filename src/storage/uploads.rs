//! Blob upload sessions (chunked and monolithic) and their commit into the blob store.
//!
//! An upload's bytes go to `uploads/<id>` through the store's one blob writer; its record
//! (repository, start time) lives in redb so sessions survive a restart. A chunk that
//! fails midway is cut back off the file, so the offset a client is told always covers
//! whole, acknowledged chunks. The running hash is kept between chunks in memory; after
//! a restart the writer re-hashes what the file holds.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::Stream;

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

impl Store {
    /// Opens a new upload session for `repo`.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<String, StorageError> {
        let repo = repo.clone();
        self.blocking(move |i| {
            let id = random_id();
            std::fs::File::create(i.files.upload_path(&id))?;
            let txn = i.db.begin_write()?;
            txn.open_table(UPLOADS)?.insert(
                id.as_str(),
                UploadRecord::encode(now_secs(), repo.as_str()).as_slice(),
            )?;
            txn.commit()?;
            Ok(id)
        })
        .await
    }

    /// The number of bytes received so far, or `None` if `id` is not an upload of `repo`.
    pub async fn upload_offset(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<Option<u64>, StorageError> {
        let (repo, id) = (repo.clone(), id.to_owned());
        self.blocking(move |i| i.upload_offset(&repo, &id)).await
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

    /// Checks that `start` (if given) is the current offset of upload `id` of `repo` and
    /// appends `body`, returning the writer still open after it. On failure the file is
    /// cut back to the old offset and its hash state kept. The caller holds the claim.
    async fn append_checked<S>(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        body: S,
    ) -> Result<BlobWriter, UploadError>
    where
        S: Stream<Item = Result<Bytes, io::Error>> + Send + Unpin,
    {
        let offset = self
            .upload_offset(repo, id)
            .await?
            .ok_or(UploadError::Unknown)?;
        if start.is_some_and(|s| s != offset) {
            return Err(UploadError::OutOfOrder { offset });
        }
        let hasher = self.take_hasher(id, offset);
        let mut writer = self.upload_writer(id, offset, hasher).await?;
        match writer.write_stream(body, None).await {
            Ok(_) => Ok(writer),
            Err(e) => {
                let saved = writer.cut_back().await?;
                self.keep_hasher(id, saved, offset);
                Err(e.into())
            }
        }
    }

    /// Appends a chunk. `start`, when the client sent `Content-Range`, must equal the
    /// current offset. Returns the new offset.
    pub async fn append_upload<S>(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        body: S,
    ) -> Result<u64, UploadError>
    where
        S: Stream<Item = Result<Bytes, io::Error>> + Send + Unpin,
    {
        let _busy = self.claim(id)?;
        let mut writer = self.append_checked(repo, id, start, body).await?;
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
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        digest: &Digest,
        body: S,
    ) -> Result<u64, UploadError>
    where
        S: Stream<Item = Result<Bytes, io::Error>> + Send + Unpin,
    {
        let _busy = self.claim(id)?;
        let writer = self.append_checked(repo, id, start, body).await?;
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

    /// Cancels an upload of `repo`. Returns whether it existed.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<bool, UploadError> {
        let _busy = self.claim(id)?;
        if self.upload_offset(repo, id).await?.is_none() {
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
        if UploadRecord::decode(v.value())?.repo != repo.as_str() {
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
