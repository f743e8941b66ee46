//! Pull-through metadata: manifests fetched from an upstream, the freshness of upstream
//! tag answers, blobs committed from upstream downloads, and least-recently-used
//! eviction of what can be fetched again.
//!
//! Hosted content (pushed here) is pinned: a blob is an eviction candidate only when
//! every link to it came from an upstream. Access times are kept in memory and flushed
//! in batches, so serving a blob never costs a database write.

use std::collections::HashMap;

use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable};

use super::schema::*;
use super::{Inner, StorageError, Store, now_secs, store_manifest_rows};
use crate::oci::manifest::Manifest;
use crate::oci::{Digest, RepoName, Tag};

/// Which family of manifests a client accepts for a tag: clients that accept image
/// indexes and clients that only take single-platform manifests may get different
/// answers from an upstream, so their tag answers are cached apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AcceptClass {
    Any = 0,
    SingleOnly = 1,
}

/// When an upstream last confirmed what a tag points to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagFreshness {
    pub digest: Digest,
    /// Seconds since the Unix epoch.
    pub validated_at: u64,
}

/// A manifest the upstream served for a repository, verified against its digest.
pub struct FetchedManifest {
    pub repo: RepoName,
    pub digest: Digest,
    pub body: Bytes,
    pub manifest: Manifest,
    /// The tag (and accept class) this answer was for, if fetched by tag.
    pub tag: Option<(Tag, AcceptClass)>,
}

/// What one eviction pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EvictReport {
    pub stored_bytes: u64,
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
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
        let (repo, digest) = (repo.clone(), digest.clone());
        self.blocking(move |i| {
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            if i.stored_size(&i.db.begin_read()?, &digest)?.is_none() {
                return Ok(false);
            }
            i.link(&repo, &digest, None, LinkOrigin::Upstream, None)?;
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
            let now = now_secs();
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            let txn = i.db.begin_write()?;
            {
                let r = put.repo.as_str();
                store_manifest_rows(&txn, &put.repo, &put.digest, &put.body, &put.manifest, now)?;
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
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// The last upstream answer for a tag, if any.
    pub async fn tag_freshness(
        &self,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
    ) -> Result<Option<TagFreshness>, StorageError> {
        let (repo, tag) = (repo.clone(), tag.clone());
        self.blocking(move |i| {
            let txn = i.db.begin_read()?;
            let table = txn.open_table(UPSTREAM_TAGS)?;
            let Some(v) = table.get((repo.as_str(), tag.as_str(), class as u8))? else {
                return Ok(None);
            };
            let rec = TagRecord::decode(v.value())?;
            let digest = rec
                .digest
                .parse()
                .map_err(|_| StorageError::Corrupt("upstream tag digest".into()))?;
            Ok(Some(TagFreshness {
                digest,
                validated_at: rec.updated,
            }))
        })
        .await
    }

    /// Records that the upstream confirmed `tag` still points to `digest`.
    pub async fn confirm_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
        class: AcceptClass,
        digest: &Digest,
    ) -> Result<(), StorageError> {
        let (repo, tag, digest) = (repo.clone(), tag.clone(), digest.clone());
        self.blocking(move |i| {
            let txn = i.db.begin_write()?;
            txn.open_table(UPSTREAM_TAGS)?.insert(
                (repo.as_str(), tag.as_str(), class as u8),
                TagRecord::encode(now_secs(), digest.as_str()).as_slice(),
            )?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// Forgets a tag the upstream says no longer exists.
    pub async fn forget_upstream_tag(
        &self,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<(), StorageError> {
        let (repo, tag) = (repo.clone(), tag.clone());
        self.blocking(move |i| {
            let txn = i.db.begin_write()?;
            {
                let mut fresh = txn.open_table(UPSTREAM_TAGS)?;
                for class in [AcceptClass::Any, AcceptClass::SingleOnly] {
                    fresh.remove((repo.as_str(), tag.as_str(), class as u8))?;
                }
                txn.open_table(TAGS)?
                    .remove((repo.as_str(), tag.as_str()))?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// Writes the access times gathered since the last flush in one transaction.
    pub async fn flush_access(&self) -> Result<usize, StorageError> {
        self.blocking(|i| i.flush_access()).await
    }

    /// Evicts least-recently-used upstream-only blobs until at most `budget` bytes of
    /// blobs are stored. Hosted blobs are never evicted.
    pub async fn evict(&self, budget: u64) -> Result<EvictReport, StorageError> {
        self.blocking(move |i| i.evict(budget)).await
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

impl Inner {
    /// Notes that `digest` was just used. In memory only, until the next flush.
    pub(super) fn record_access(&self, digest: &Digest) {
        if let Ok(mut map) = self.access.lock() {
            map.insert(digest.to_string(), now_millis());
        }
    }

    fn flush_access(&self) -> Result<usize, StorageError> {
        let batch: HashMap<String, u64> = match self.access.lock() {
            Ok(mut map) => std::mem::take(&mut *map),
            Err(_) => return Err(StorageError::Task),
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(BLOB_ACCESS)?;
            for (digest, at) in &batch {
                table.insert(digest.as_str(), *at)?;
            }
        }
        txn.commit()?;
        Ok(batch.len())
    }

    fn evict(&self, budget: u64) -> Result<EvictReport, StorageError> {
        self.flush_access()?;
        // Exclusive: no commit may link a blob while its eviction is decided.
        let _guard = self.commit_lock.write().map_err(|_| StorageError::Task)?;
        let txn = self.db.begin_write()?;
        let mut report = EvictReport::default();
        let mut doomed = Vec::new();
        {
            let mut blobs = txn.open_table(BLOBS)?;
            let mut sizes: HashMap<String, (u64, u64)> = HashMap::new();
            for entry in blobs.iter()? {
                let (k, v) = entry?;
                let rec = BlobRecord::decode(v.value())?;
                report.stored_bytes += rec.size;
                sizes.insert(k.value().to_owned(), (rec.size, rec.created));
            }
            if report.stored_bytes <= budget {
                return Ok(report);
            }
            // Blobs with any hosted link are pinned; collect each blob's links.
            let mut links = txn.open_table(REPO_BLOBS)?;
            let mut pinned = std::collections::HashSet::new();
            let mut holders: HashMap<String, Vec<String>> = HashMap::new();
            for entry in links.iter()? {
                let (k, v) = entry?;
                let (repo, digest) = k.value();
                if LinkRecord::decode(v.value())?.origin != LinkOrigin::Upstream {
                    pinned.insert(digest.to_owned());
                }
                holders
                    .entry(digest.to_owned())
                    .or_default()
                    .push(repo.to_owned());
            }
            let mut access = txn.open_table(BLOB_ACCESS)?;
            let mut candidates = Vec::new();
            for (digest, (size, created)) in &sizes {
                if pinned.contains(digest) || !holders.contains_key(digest) {
                    // Unlinked blobs are gc's business (grace period for uploads).
                    continue;
                }
                let used = access.get(digest.as_str())?.map(|v| v.value());
                let used = used.unwrap_or(created.saturating_mul(1000));
                candidates.push((used, digest.clone(), *size));
            }
            candidates.sort();
            let mut stored = report.stored_bytes;
            for (_, digest, size) in candidates {
                if stored <= budget {
                    break;
                }
                for repo in holders.get(&digest).into_iter().flatten() {
                    links.remove((repo.as_str(), digest.as_str()))?;
                }
                blobs.remove(digest.as_str())?;
                access.remove(digest.as_str())?;
                stored -= size;
                report.evicted_blobs += 1;
                report.evicted_bytes += size;
                doomed.push(digest);
            }
        }
        txn.commit()?;
        // The metadata no longer names these files; removing them can only fail to free
        // space, never leave metadata pointing at nothing. fsck and gc sweep leftovers.
        for digest in doomed {
            if let Ok(d) = digest.parse::<Digest>()
                && let Err(e) = self.files.remove_blob(&d)
            {
                tracing::warn!(%digest, error = %e, "evicted blob file could not be removed");
            }
        }
        Ok(report)
    }
}
