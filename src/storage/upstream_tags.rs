//! Freshness of upstream tag answers: what an upstream last said a tag points to, for
//! which family of clients, and when it last confirmed it (durable, so a restart causes
//! no storm of revalidations).
//!
//! Owns the `upstream_tags` table. Must not decide when to revalidate (pull-through's
//! policy); it only records and reports answers.

use super::schema::*;
use super::{StorageError, Store, now_secs};
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

impl Store {
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
}
