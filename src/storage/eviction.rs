//! When blobs were last used, and least-recently-used eviction of what can be fetched
//! again to keep the store within its size budget.
//!
//! Hosted content (pushed here) is pinned: a blob is an eviction candidate only when
//! every link to it came from an upstream. Access times are kept in memory and flushed
//! in batches, so serving a blob never costs a database write. Unlinked blobs are gc's
//! business, not eviction's.

use std::collections::HashMap;

use redb::ReadableTable;

use super::schema::*;
use super::{Inner, StorageError, Store};
use crate::oci::Digest;

/// What one eviction pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EvictReport {
    pub stored_bytes: u64,
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
}

impl Store {
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
