//! Blob upload sessions (chunked and monolithic) and their commit into the blob store.
//!
//! An upload's bytes go to `uploads/<id>`; its record (repository, start time) lives in
//! redb so sessions survive a restart. A chunk that fails midway is cut back off the
//! file, so the offset a client is told always covers whole, acknowledged chunks.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use redb::ReadableDatabase;
use tokio::io::AsyncWriteExt;

use super::files::{hash_file, random_id};
use super::schema::{LinkOrigin, UPLOADS, UploadRecord};
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

/// Appends `body` to `file` while hashing; on any failure cuts the file back to `start`.
async fn append_stream<S>(
    path: &Path,
    start: u64,
    hasher: &mut Option<Hasher>,
    body: S,
) -> Result<u64, UploadError>
where
    S: Stream<Item = Result<Bytes, io::Error>> + Send + Unpin,
{
    let mut file = tokio::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .await?;
    let saved = hasher.clone();
    let mut written = 0u64;
    let result = async {
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(UploadError::Body)?;
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            file.write_all(&chunk).await?;
            written += chunk.len() as u64;
        }
        file.flush().await?;
        Ok::<(), UploadError>(())
    }
    .await;
    if let Err(e) = result {
        *hasher = saved;
        file.set_len(start).await?;
        return Err(e);
    }
    Ok(start + written)
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
    /// appends `body`. Returns the new offset with the running hash covering it; on
    /// failure the hash state is kept for the unchanged offset. The caller holds the claim.
    async fn append_checked<S>(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        body: S,
    ) -> Result<(u64, Option<Hasher>), UploadError>
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
        let path = self.inner.files.upload_path(id);
        let mut hasher = self.take_hasher(id, offset);
        match append_stream(&path, offset, &mut hasher, body).await {
            Ok(new_offset) => Ok((new_offset, hasher)),
            Err(e) => {
                self.keep_hasher(id, hasher, offset);
                Err(e)
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
        let (offset, hasher) = self.append_checked(repo, id, start, body).await?;
        self.keep_hasher(id, hasher, offset);
        Ok(offset)
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
        let (size, hasher) = self.append_checked(repo, id, start, body).await?;
        let path = self.inner.files.upload_path(id);
        let actual = match hasher {
            Some(h) if digest.algorithm() == Algorithm::Sha256 => h.finish(),
            _ => {
                let (p, algo) = (path.clone(), digest.algorithm());
                tokio::task::spawn_blocking(move || hash_file(&p, algo).map(|(d, _)| d))
                    .await
                    .map_err(|_| StorageError::Task)??
            }
        };
        if &actual != digest {
            self.discard_upload(id).await?;
            return Err(UploadError::DigestMismatch);
        }
        let (repo, id, digest) = (repo.clone(), id.to_owned(), digest.clone());
        self.blocking(move |i| {
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            i.files.commit(&path, &digest)?;
            i.link(&repo, &digest, Some(size), LinkOrigin::Upload, Some(&id))
        })
        .await?;
        Ok(size)
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
        let path = self.inner.files.temp_path();
        tokio::fs::File::create(&path).await?;
        let mut hasher = Some(Hasher::new(digest.algorithm()));
        let size = match append_stream(&path, 0, &mut hasher, body).await {
            Ok(n) => n,
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(e);
            }
        };
        if hasher.map(Hasher::finish).as_ref() != Some(digest) {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(UploadError::DigestMismatch);
        }
        let (repo, digest) = (repo.clone(), digest.clone());
        self.blocking(move |i| {
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            i.files.commit(&path, &digest)?;
            i.link(&repo, &digest, Some(size), origin, None)
        })
        .await?;
        Ok(size)
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
