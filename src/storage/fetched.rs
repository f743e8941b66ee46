//! Content fetched from an upstream: manifests the upstream served for a repository, and
//! links of stored blobs into a repository the upstream confirmed holds them.
//!
//! A repository may read a blob only through a link; bytes stored for another
//! repository are not enough. Blob bytes themselves are written by the writer module.

use bytes::Bytes;
use redb::ReadableTable;

use super::schema::*;
use super::upstream_tags::AcceptClass;
use super::{StorageError, Store, now_secs, store_manifest_rows};
use crate::oci::manifest::Manifest;
use crate::oci::{Digest, RepoName, Tag};

/// A manifest the upstream served for a repository, verified against its digest.
pub struct FetchedManifest {
    pub repo: RepoName,
    pub digest: Digest,
    pub body: Bytes,
    pub manifest: Manifest,
    /// The tag (and accept class) this answer was for, if fetched by tag.
    pub tag: Option<(Tag, AcceptClass)>,
}

impl Store {
    /// Size of `digest` if its file is stored, whichever repository holds it.
    pub async fn stored_blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let digest = digest.clone();
        self.blocking(move |i| i.stored_size(&i.db.begin_read()?, &digest))
            .await
    }

    /// Links a stored blob into `repo` because the upstream confirmed `repo` has it.
    /// Returns false if the blob is not stored (any more).
    pub async fn link_confirmed(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<bool, StorageError> {
        self.link_stored(repo, digest, LinkOrigin::Upstream).await
    }

    /// Links a stored blob into `repo` with `origin`. Returns false if the blob is not
    /// stored (any more).
    pub(super) async fn link_stored(
        &self,
        repo: &RepoName,
        digest: &Digest,
        origin: LinkOrigin,
    ) -> Result<bool, StorageError> {
        let (repo, digest) = (repo.clone(), digest.clone());
        self.blocking(move |i| {
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            if i.stored_size(&i.db.begin_read()?, &digest)?.is_none() {
                return Ok(false);
            }
            i.link(&repo, &digest, None, origin, None)?;
            Ok(true)
        })
        .await
    }

    /// Stores a manifest fetched from an upstream, links it into the repository and,
    /// when fetched by tag, records the tag answer as validated now. Blobs it references
    /// that are already stored are linked too: the upstream's manifest for the
    /// repository is its answer that the repository holds them.
    pub async fn put_fetched_manifest(&self, put: FetchedManifest) -> Result<(), StorageError> {
        self.blocking(move |i| {
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            let txn = i.db.begin_write()?;
            fetched_manifest_rows(&txn, &put, now_secs())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

/// The rows of [`Store::put_fetched_manifest`], in the caller's transaction.
pub(super) fn fetched_manifest_rows(
    txn: &redb::WriteTransaction,
    put: &FetchedManifest,
    now: u64,
) -> Result<(), StorageError> {
    let r = put.repo.as_str();
    store_manifest_rows(txn, &put.repo, &put.digest, &put.body, &put.manifest, now)?;
    let blobs = txn.open_table(BLOBS)?;
    let mut links = txn.open_table(REPO_BLOBS)?;
    for d in put.manifest.required_blobs() {
        let key = (r, d.digest.as_str());
        if blobs.get(d.digest.as_str())?.is_some() && links.get(key)?.is_none() {
            let link = LinkRecord {
                origin: LinkOrigin::Upstream,
                linked_at: now,
            };
            links.insert(key, link.encode().as_slice())?;
        }
    }
    if let Some((tag, class)) = &put.tag {
        let record = TagRecord::encode(now, put.digest.as_str());
        txn.open_table(UPSTREAM_TAGS)?
            .insert((r, tag.as_str(), *class as u8), record.as_slice())?;
        if *class == AcceptClass::Any {
            txn.open_table(TAGS)?
                .insert((r, tag.as_str()), record.as_slice())?;
        }
    }
    Ok(())
}
