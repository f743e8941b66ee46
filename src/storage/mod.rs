//! The content store: verified blob files plus the redb metadata that says which
//! repository may serve what (tags, manifests, repository → blob links, upload sessions,
//! referrers, revoked keys, cached central-registry logins).
//!
//! Owns durability. Blob bytes are committed before the metadata that points at them, so
//! a crash at any point leaves either nothing or a whole, verified blob; metadata never
//! names a missing file. All redb work runs on the blocking pool, never on the executor.
//! This module knows nothing of HTTP.
//!
//! Inside: `files` (the on-disk layout, the atomic rename), `writer` (the one blob
//! writer, and readers of a blob still being written), `uploads` (upload sessions),
//! `fetched` (manifests and blob links from upstreams), `upstream_tags` (tag answer
//! freshness), `eviction` (access times, LRU eviction), `maintenance` (gc, fsck),
//! `schema` (every table and value encoding), `keys` and `central` (auth records).

mod central;
mod db;
mod eviction;
mod fetched;
mod files;
mod keys;
mod maintenance;
mod mirrored;
mod schema;
#[cfg(test)]
mod tests;
mod uploads;
mod upstream_tags;
mod writer;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::ReadableTable;

use crate::oci::manifest::Manifest;
use crate::oci::{Digest, Hasher, Reference, RepoName, Tag};
use db::Db;
use files::BlobFiles;
use schema::*;

pub use fetched::FetchedManifest;
pub use files::FileRange;
pub use maintenance::{FsckReport, GcReport};
pub use mirrored::{MirrorRunRecord, MirroredTag};
pub use schema::{CentralDecisionRecord, CentralUserRecord, KeyRecord, LinkOrigin, ReferrerRecord};
pub use uploads::{ChunkRange, Session, UploadError};
pub use upstream_tags::AcceptClass;
pub use writer::{GrowingBlob, StreamError, WriteError};

/// A failure of the store itself (disk, database); always the server's fault.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("metadata database error: {0}")]
    Db(#[from] redb::Error),
    #[error("metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("the metadata database is in use by another process (is the daemon running?)")]
    Locked,
    #[error("storage task failed")]
    Task,
    /// The metadata database is closed after an I/O failure and could not be opened
    /// again yet (the disk still full, or a transaction of the old handle still open).
    #[error("the metadata database is being reopened after an I/O failure")]
    Reopening,
    /// New blob data is refused: the filesystem has less free space than the reserve kept
    /// for metadata commits.
    #[error("only {free} bytes free, below the {reserve}-byte reserve kept for metadata")]
    ReserveReached { free: u64, reserve: u64 },
}

impl StorageError {
    /// Whether this failure is the disk being full, or its aftermath (the client may
    /// retry later, once space is freed).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StorageError::Io(e) => e.kind() == io::ErrorKind::StorageFull,
            StorageError::Db(redb::Error::Io(e)) => e.kind() == io::ErrorKind::StorageFull,
            StorageError::Db(redb::Error::PreviousIo)
            | StorageError::Reopening
            | StorageError::ReserveReached { .. } => true,
            _ => false,
        }
    }
}

/// `From` impls routing redb's error types into a store error type through
/// [`StorageError`], so transaction code can use `?` directly.
macro_rules! from_redb {
    ($target:ty: $($t:ty),*) => {$(
        impl From<$t> for $target {
            fn from(e: $t) -> $target {
                StorageError::Db(e.into()).into()
            }
        }
    )*};
}
from_redb!(
    StorageError: redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
from_redb!(
    PutManifestError: redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<DecodeError> for StorageError {
    fn from(e: DecodeError) -> StorageError {
        StorageError::Corrupt(e.to_string())
    }
}

impl From<redb::DatabaseError> for StorageError {
    fn from(e: redb::DatabaseError) -> StorageError {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StorageError::Locked,
            other => StorageError::Db(other.into()),
        }
    }
}

/// Why a manifest could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum PutManifestError {
    #[error("manifest references blob {0} which is not in the repository")]
    BlobUnknown(Digest),
    #[error("index references manifest {0} which is not in the repository")]
    ManifestUnknown(Digest),
    #[error("tag is immutable ({0}) and already points to another manifest")]
    Immutable(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What became of a request to delete a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestDeletion {
    Deleted,
    /// The repository holds no such manifest.
    Unknown,
    /// Nothing was deleted: `tag` points to the manifest and may not go, under `rule`.
    Protected {
        tag: String,
        rule: String,
    },
}

/// A manifest as served: exact bytes, digest and media type.
#[derive(Clone, Debug)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

/// An open blob file for serving.
#[derive(Debug)]
pub struct BlobHandle {
    pub file: std::fs::File,
    pub size: u64,
}

/// Everything needed to store one manifest.
pub struct PutManifest {
    pub repo: RepoName,
    pub tag: Option<Tag>,
    pub digest: Digest,
    pub body: Bytes,
    pub manifest: Manifest,
    /// When set, the tag may only be (re)written with the digest it already has.
    pub immutable_rule: Option<String>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    files: BlobFiles,
    /// Running hash state of upload sessions, by id, with the offset it covers. Lost on
    /// restart, in which case the upload file is re-hashed when it completes.
    hashers: Mutex<HashMap<String, (Hasher, u64)>>,
    /// Upload ids with a request in progress; a second concurrent request is refused.
    busy: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Held shared while a blob file is committed and linked, exclusively while garbage
    /// collection deletes files, so gc never removes a blob that a commit just reused.
    commit_lock: RwLock<()>,
    /// Blob digests served since the last flush, with when (milliseconds).
    access: Mutex<HashMap<String, u64>>,
    /// Free bytes kept for metadata commits (0: none).
    reserve: AtomicU64,
}

impl Inner {
    /// Refuses new blob data while less than `1/divisor` of the reserve is free: a new
    /// blob needs the whole reserve free, one being written may eat into half of it.
    fn check_reserve(&self, divisor: u64) -> Result<(), StorageError> {
        let reserve = self.reserve.load(Ordering::Relaxed);
        if reserve == 0 {
            return Ok(());
        }
        let free = self.files.free_bytes()?;
        if free < reserve / divisor {
            return Err(StorageError::ReserveReached { free, reserve });
        }
        Ok(())
    }
}

/// The manifest digest a stored tag record points to.
fn tag_target(record: &[u8]) -> Result<Digest, DecodeError> {
    TagRecord::decode(record)?
        .digest
        .parse()
        .map_err(|_| DecodeError("tag"))
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Store {
    /// Opens (creating if needed) the store rooted at `root`. Blocking; call at start-up.
    pub fn open(root: &Path, db_cache: usize) -> Result<Store, StorageError> {
        std::fs::create_dir_all(root)?;
        let files = BlobFiles::open(root)?;
        let db = Db::open(&root.join("outpost.redb"), db_cache)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let version = meta.get("schema_version")?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(StorageError::Corrupt(format!(
                        "database schema version {other} is not supported (expected {SCHEMA_VERSION})"
                    )));
                }
            }
            // Create every table so read transactions never meet a missing one.
            txn.open_table(BLOBS)?;
            txn.open_table(REPO_BLOBS)?;
            txn.open_table(MANIFESTS)?;
            txn.open_table(REPO_MANIFESTS)?;
            txn.open_table(TAGS)?;
            txn.open_table(REFERRERS)?;
            txn.open_table(REPOS)?;
            txn.open_table(UPLOADS)?;
            txn.open_table(REVOKED_KEYS)?;
            txn.open_table(KNOWN_KEYS)?;
            txn.open_table(MIRROR_RUNS)?;
            txn.open_table(MIRROR_TAGS)?;
            txn.open_table(UPSTREAM_TAGS)?;
            txn.open_table(BLOB_ACCESS)?;
            txn.open_table(CENTRAL_USERS)?;
            txn.open_table(CENTRAL_DECISIONS)?;
        }
        txn.commit()?;
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                files,
                hashers: Mutex::new(HashMap::new()),
                busy: Arc::default(),
                commit_lock: RwLock::new(()),
                access: Mutex::default(),
                reserve: AtomicU64::new(0),
            }),
        })
    }

    /// Keeps `bytes` free on the blobs' filesystem for metadata commits: new blob data
    /// is refused below it (see [`StorageError::ReserveReached`]).
    pub fn set_reserve(&self, bytes: u64) {
        self.inner.reserve.store(bytes, Ordering::Relaxed);
    }

    /// Whether writes can be expected to succeed: the metadata database works and the
    /// free space is above the reserve. What `/readyz` reports.
    pub fn writable(&self) -> bool {
        self.inner.db.healthy() && self.inner.check_reserve(1).is_ok()
    }

    /// Runs blocking store work off the async executor.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StorageError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|_| StorageError::Task)?
    }

    /// Size of `digest` if repository `repo` may serve it.
    /// Opens `digest` for reading if repository `repo` may serve it.
    pub async fn open_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<BlobHandle>, StorageError> {
        let (repo, digest) = (repo.clone(), digest.clone());
        self.blocking(move |i| {
            let Some(size) = i.linked_blob(&repo, &digest)? else {
                return Ok(None);
            };
            i.record_access(&digest);
            match std::fs::File::open(i.files.blob_path(&digest)) {
                Ok(file) => Ok(Some(BlobHandle { file, size })),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::Corrupt(
                    format!("blob {digest} is recorded but its file is missing"),
                )),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Links an existing blob into `repo` (cross-repository mount). The caller has checked
    /// read access to the source; this checks that the source really holds the blob.
    pub async fn mount_blob(
        &self,
        from: &RepoName,
        to: &RepoName,
        digest: &Digest,
    ) -> Result<bool, StorageError> {
        let (from, to, digest) = (from.clone(), to.clone(), digest.clone());
        self.blocking(move |i| {
            if i.linked_blob(&from, &digest)?.is_none() {
                return Ok(false);
            }
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            i.link(&to, &digest, None, LinkOrigin::Upload, None)?;
            Ok(true)
        })
        .await
    }

    /// Removes `repo`'s link to a blob. Returns whether there was one.
    pub async fn unlink_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, StorageError> {
        let (repo, digest) = (repo.clone(), digest.clone());
        self.blocking(move |i| {
            let txn = i.db.begin_write()?;
            let removed = txn
                .open_table(REPO_BLOBS)?
                .remove((repo.as_str(), digest.as_str()))?
                .is_some();
            txn.commit()?;
            Ok(removed)
        })
        .await
    }

    /// The manifest `reference` names in `repo`.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, StorageError> {
        let (repo, reference) = (repo.clone(), reference.clone());
        self.blocking(move |i| i.get_manifest(&repo, &reference))
            .await
    }

    /// Stores a validated manifest, checking in the same transaction that every blob and
    /// child manifest it references is in the repository.
    pub async fn put_manifest(&self, put: PutManifest) -> Result<(), PutManifestError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.put_manifest(put))
            .await
            .map_err(|_| StorageError::Task)?
    }

    /// Removes a manifest from `repo`, with the tags pointing at it and its referrer entry
    /// — unless `protected` names a rule for one of those tags, in which case nothing is
    /// removed. Decided in the deleting transaction, so no tag can slip in between.
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        protected: impl Fn(&str) -> Option<String> + Send + 'static,
    ) -> Result<ManifestDeletion, StorageError> {
        let (repo, digest) = (repo.clone(), digest.clone());
        self.blocking(move |i| i.delete_manifest(&repo, &digest, &protected))
            .await
    }

    /// The digest `tag` points to in `repo`.
    /// Removes a tag (not the manifest). Returns whether it existed.
    pub async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, StorageError> {
        let (repo, tag) = (repo.clone(), tag.clone());
        self.blocking(move |i| {
            let txn = i.db.begin_write()?;
            let removed = txn
                .open_table(TAGS)?
                .remove((repo.as_str(), tag.as_str()))?
                .is_some();
            txn.commit()?;
            Ok(removed)
        })
        .await
    }

    /// All tags of `repo` in lexical order, or `None` if the repository is unknown.
    pub async fn tags(&self, repo: &RepoName) -> Result<Option<Vec<String>>, StorageError> {
        let repo = repo.clone();
        self.blocking(move |i| {
            let txn = i.db.begin_read()?;
            if txn.open_table(REPOS)?.get(repo.as_str())?.is_none() {
                return Ok(None);
            }
            let tags = txn.open_table(TAGS)?;
            let mut out = Vec::new();
            for entry in tags.range((repo.as_str(), "")..)? {
                let (k, _) = entry?;
                let (r, t) = k.value();
                if r != repo.as_str() {
                    break;
                }
                out.push(t.to_owned());
            }
            Ok(Some(out))
        })
        .await
    }

    /// Manifests in `repo` whose subject is `subject`.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<Vec<ReferrerRecord>, StorageError> {
        let (repo, subject) = (repo.clone(), subject.clone());
        self.blocking(move |i| {
            let txn = i.db.begin_read()?;
            let table = txn.open_table(REFERRERS)?;
            let mut out = Vec::new();
            for entry in table.range((repo.as_str(), subject.as_str(), "")..)? {
                let (k, v) = entry?;
                let (r, s, _) = k.value();
                if r != repo.as_str() || s != subject.as_str() {
                    break;
                }
                out.push(ReferrerRecord::decode(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    /// Every repository that holds anything, in lexical order.
    pub async fn repositories(&self) -> Result<Vec<String>, StorageError> {
        self.blocking(|i| {
            let txn = i.db.begin_read()?;
            let mut out = Vec::new();
            for entry in txn.open_table(REPOS)?.iter()? {
                out.push(entry?.0.value().to_owned());
            }
            Ok(out)
        })
        .await
    }

    /// Whether `repo` holds anything.
    /// Durably records a revoked API key id. Returns whether it was new. Blocking.
    pub fn revoke_key_blocking(&self, id: &str) -> Result<bool, StorageError> {
        let txn = self.inner.db.begin_write()?;
        let new = txn
            .open_table(REVOKED_KEYS)?
            .insert(id, now_secs())?
            .is_none();
        txn.commit()?;
        Ok(new)
    }

    /// Every revoked key id.
    pub fn revoked_keys(&self) -> Result<Vec<String>, StorageError> {
        let txn = self.inner.db.begin_read()?;
        let mut out = Vec::new();
        for entry in txn.open_table(REVOKED_KEYS)?.iter()? {
            out.push(entry?.0.value().to_owned());
        }
        Ok(out)
    }

    /// Collects unreferenced blobs and manifests, and abandoned uploads. Blocking.
    pub fn gc(
        &self,
        grace: std::time::Duration,
        upload_timeout: std::time::Duration,
    ) -> Result<GcReport, StorageError> {
        maintenance::gc(&self.inner, grace, upload_timeout)
    }

    /// Verifies every blob's digest and every reference. Blocking.
    pub fn fsck(&self, repair: bool) -> Result<FsckReport, StorageError> {
        maintenance::fsck(&self.inner, repair)
    }
}

/// Writes a manifest's body, its link into `repo`, its referrer entry and the repository
/// row, inside the caller's transaction. Hosted pushes and upstream fetches share it.
fn store_manifest_rows(
    txn: &redb::WriteTransaction,
    repo: &RepoName,
    digest: &Digest,
    body: &[u8],
    manifest: &Manifest,
    now: u64,
) -> Result<(), StorageError> {
    let r = repo.as_str();
    let mut manifests = txn.open_table(MANIFESTS)?;
    if manifests.get(digest.as_str())?.is_none() {
        manifests.insert(
            digest.as_str(),
            ManifestRecord::encode(&manifest.media_type, body).as_slice(),
        )?;
    }
    txn.open_table(REPO_MANIFESTS)?
        .insert((r, digest.as_str()), now)?;
    if let Some(subject) = &manifest.subject {
        let rec = ReferrerRecord {
            media_type: manifest.media_type.clone(),
            digest: digest.to_string(),
            size: body.len() as u64,
            artifact_type: manifest.artifact_type.clone(),
            annotations: manifest.annotations.clone(),
        };
        txn.open_table(REFERRERS)?.insert(
            (r, subject.digest.as_str(), digest.as_str()),
            rec.encode().as_slice(),
        )?;
    }
    let mut repos = txn.open_table(REPOS)?;
    if repos.get(r)?.is_none() {
        repos.insert(r, now)?;
    }
    Ok(())
}

impl Inner {
    fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let txn = self.db.begin_read()?;
        if txn
            .open_table(REPO_BLOBS)?
            .get((repo.as_str(), digest.as_str()))?
            .is_none()
        {
            return Ok(None);
        }
        self.stored_size(&txn, digest)
    }

    /// Size of `digest` if its file is stored, whichever repository links it.
    fn stored_size(
        &self,
        txn: &redb::ReadTransaction,
        digest: &Digest,
    ) -> Result<Option<u64>, StorageError> {
        match txn.open_table(BLOBS)?.get(digest.as_str())? {
            Some(v) => Ok(Some(BlobRecord::decode(v.value())?.size)),
            None => Ok(None),
        }
    }

    /// Records a committed blob file (if `size` is given) and links it into `repo`,
    /// closing the upload session `upload` in the same transaction. The caller holds
    /// `commit_lock` shared.
    fn link(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: Option<u64>,
        origin: LinkOrigin,
        upload: Option<&str>,
    ) -> Result<(), StorageError> {
        let now = now_secs();
        let txn = self.db.begin_write()?;
        {
            let mut blobs = txn.open_table(BLOBS)?;
            if let Some(size) = size
                && blobs.get(digest.as_str())?.is_none()
            {
                blobs.insert(
                    digest.as_str(),
                    BlobRecord { size, created: now }.encode().as_slice(),
                )?;
            }
            let mut links = txn.open_table(REPO_BLOBS)?;
            let key = (repo.as_str(), digest.as_str());
            let existing = match links.get(key)? {
                Some(v) => Some(LinkRecord::decode(v.value())?.origin),
                None => None,
            };
            // A pin (upload or mirror) is never lowered by a pull-through confirmation,
            // and a mirror never turns an upload into something evictable.
            if existing.is_none_or(|e| e == LinkOrigin::Upstream) {
                links.insert(
                    key,
                    LinkRecord {
                        origin,
                        linked_at: now,
                    }
                    .encode()
                    .as_slice(),
                )?;
            }
            drop(links);
            let mut repos = txn.open_table(REPOS)?;
            if repos.get(repo.as_str())?.is_none() {
                repos.insert(repo.as_str(), now)?;
            }
            if let Some(id) = upload {
                txn.open_table(UPLOADS)?.remove(id)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, StorageError> {
        let txn = self.db.begin_read()?;
        let digest = match reference {
            Reference::Digest(d) => {
                if txn
                    .open_table(REPO_MANIFESTS)?
                    .get((repo.as_str(), d.as_str()))?
                    .is_none()
                {
                    return Ok(None);
                }
                d.clone()
            }
            Reference::Tag(t) => {
                let tags = txn.open_table(TAGS)?;
                let Some(v) = tags.get((repo.as_str(), t.as_str()))? else {
                    return Ok(None);
                };
                tag_target(v.value())?
            }
        };
        let manifests = txn.open_table(MANIFESTS)?;
        let Some(v) = manifests.get(digest.as_str())? else {
            return Err(StorageError::Corrupt(format!(
                "manifest {digest} is linked but missing"
            )));
        };
        let rec = ManifestRecord::decode(v.value())?;
        Ok(Some(StoredManifest {
            media_type: rec.media_type.to_owned(),
            body: Bytes::copy_from_slice(rec.body),
            digest,
        }))
    }

    fn put_manifest(&self, put: PutManifest) -> Result<(), PutManifestError> {
        let repo = put.repo.as_str();
        let now = now_secs();
        let txn = self.db.begin_write()?;
        {
            let repo_blobs = txn.open_table(REPO_BLOBS)?;
            let blobs = txn.open_table(BLOBS)?;
            for d in put.manifest.required_blobs() {
                let linked = repo_blobs.get((repo, d.digest.as_str()))?.is_some();
                let present = blobs.get(d.digest.as_str())?.is_some();
                if !(linked && present) {
                    return Err(PutManifestError::BlobUnknown(d.digest.clone()));
                }
            }
            let repo_manifests = txn.open_table(REPO_MANIFESTS)?;
            for child in &put.manifest.manifests {
                if repo_manifests.get((repo, child.digest.as_str()))?.is_none() {
                    return Err(PutManifestError::ManifestUnknown(child.digest.clone()));
                }
            }
            let mut tags = txn.open_table(TAGS)?;
            if let Some(tag) = &put.tag {
                let existing = match tags.get((repo, tag.as_str()))? {
                    Some(v) => Some(tag_target(v.value()).map_err(StorageError::from)?),
                    None => None,
                };
                if let (Some(rule), Some(existing)) = (&put.immutable_rule, existing)
                    && existing != put.digest
                {
                    return Err(PutManifestError::Immutable(rule.clone()));
                }
                tags.insert(
                    (repo, tag.as_str()),
                    TagRecord::encode(now, put.digest.as_str()).as_slice(),
                )?;
            }
            drop(repo_manifests);
            store_manifest_rows(&txn, &put.repo, &put.digest, &put.body, &put.manifest, now)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        protected: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ManifestDeletion, StorageError> {
        let r = repo.as_str();
        let txn = self.db.begin_write()?;
        let refused = 'delete: {
            if txn
                .open_table(REPO_MANIFESTS)?
                .remove((r, digest.as_str()))?
                .is_none()
            {
                break 'delete Some(ManifestDeletion::Unknown);
            }
            let mut tags = txn.open_table(TAGS)?;
            let mut doomed = Vec::new();
            for entry in tags.range((r, "")..)? {
                let (k, v) = entry?;
                let (kr, t) = k.value();
                if kr != r {
                    break;
                }
                if TagRecord::decode(v.value())?.digest == digest.as_str() {
                    doomed.push(t.to_owned());
                }
            }
            if let Some((tag, rule)) = doomed
                .iter()
                .find_map(|t| protected(t).map(|rule| (t.clone(), rule)))
            {
                break 'delete Some(ManifestDeletion::Protected { tag, rule });
            }
            for t in doomed {
                tags.remove((r, t.as_str()))?;
            }
            let subject = match txn.open_table(MANIFESTS)?.get(digest.as_str())? {
                Some(v) => {
                    let rec = ManifestRecord::decode(v.value())?;
                    Manifest::parse(rec.body, Some(rec.media_type))
                        .ok()
                        .and_then(|m| m.subject)
                        .map(|s| s.digest)
                }
                None => None,
            };
            if let Some(subject) = subject {
                txn.open_table(REFERRERS)?
                    .remove((r, subject.as_str(), digest.as_str()))?;
            }
            None
        };
        if let Some(outcome) = refused {
            txn.abort()?;
            return Ok(outcome);
        }
        txn.commit()?;
        Ok(ManifestDeletion::Deleted)
    }
}
