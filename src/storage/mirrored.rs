//! What scheduled mirroring keeps: blobs linked with [`LinkOrigin::Mirror`] (pinned:
//! eviction only takes blobs whose every link came from pull-through), what each job's
//! tags were last mirrored at ([`MirroredTag`], the reason for those pins), and the record
//! of each job's last run, for `outpost mirror status`.
//!
//! Must not fetch anything or decide what a job selects: that is the mirror module's.

use std::collections::{BTreeSet, HashSet};

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::fetched::fetched_manifest_rows;
use super::schema::*;
use super::{AcceptClass, FetchedManifest, StorageError, Store, now_secs};
use crate::oci::manifest::Manifest;
use crate::oci::{Digest, RepoName};

/// Encoding version of a [`MirroredTag`] value.
const TAG_V1: u8 = 1;

/// What a job last made one tag point to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirroredTag {
    /// The digest the tag points to.
    pub digest: String,
    /// Every manifest mirrored for the tag (itself, the selected platforms of an index,
    /// referrers): their blobs stay pinned while the tag is selected.
    pub manifests: Vec<String>,
    /// Tags mirrored along with it (the `sha256-<hex>` referrers tag schema).
    pub tags: Vec<String>,
}

impl MirroredTag {
    fn encode(&self) -> Result<Vec<u8>, StorageError> {
        let mut value = vec![TAG_V1];
        serde_json::to_writer(&mut value, self)
            .map_err(|e| StorageError::Corrupt(format!("mirror tag record: {e}")))?;
        Ok(value)
    }

    fn decode(value: &[u8]) -> Result<MirroredTag, StorageError> {
        match value.split_first() {
            Some((&TAG_V1, json)) => {
                serde_json::from_slice(json).map_err(|_| DecodeError("mirror tag").into())
            }
            _ => Err(DecodeError("mirror tag").into()),
        }
    }
}

/// What releasing a job's tags did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Tags no longer mirrored by the job (unpinned, still served unless pruned).
    pub tags: Vec<String>,
    /// Tags removed from what is served (with `prune`).
    pub pruned: Vec<String>,
    /// Blob links of the repository that lost their pin.
    pub unpinned: u64,
}

/// Encoding version of a [`MirrorRunRecord`] value.
const RUN_V1: u8 = 1;

/// The last run of a mirror job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorRunRecord {
    /// Unix seconds.
    pub started: u64,
    pub ended: u64,
    /// Whether every selected tag was mirrored.
    pub ok: bool,
    pub tags_added: u64,
    pub tags_updated: u64,
    pub tags_unchanged: u64,
    pub tags_failed: u64,
    pub bytes_fetched: u64,
    /// Unix seconds of the last run that ended `ok` (this one or an earlier one).
    pub last_success: Option<u64>,
    /// The last schedule slot (Unix seconds) a scheduled run stood for: a restart
    /// neither repeats it nor forgets a slot missed after it. Absent in older records.
    #[serde(default)]
    pub slot: Option<u64>,
}

impl Store {
    /// Stores the manifest a mirrored tag points to and flips the tag (plus the extra
    /// `tags` of `record`, pointing to their own manifests, already stored) and records
    /// what job `job` mirrored for it, in one transaction. The caller stored and pinned
    /// everything the tag references first, so a tag never points to missing content.
    pub async fn flip_mirrored_tag(
        &self,
        job: &str,
        put: FetchedManifest,
        extra_tags: Vec<(String, Digest)>,
        record: MirroredTag,
    ) -> Result<(), StorageError> {
        let job = job.to_owned();
        let value = record.encode()?;
        self.blocking(move |i| {
            let now = now_secs();
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            let txn = i.db.begin_write()?;
            fetched_manifest_rows(&txn, &put, now)?;
            {
                let r = put.repo.as_str();
                let mut tags = txn.open_table(TAGS)?;
                let mut validated = txn.open_table(UPSTREAM_TAGS)?;
                for (tag, digest) in &extra_tags {
                    let rec = TagRecord::encode(now, digest.as_str());
                    tags.insert((r, tag.as_str()), rec.as_slice())?;
                    validated.insert((r, tag.as_str(), AcceptClass::Any as u8), rec.as_slice())?;
                }
                if let Some((tag, _)) = &put.tag {
                    txn.open_table(MIRROR_TAGS)?
                        .insert((job.as_str(), r, tag.as_str()), value.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// The platform of manifest `digest` when it is an image of an index tagged in
    /// `repo` that was stored without it (a mirror job's `platforms` left it out), as
    /// `os/arch[/variant]`. Looked up only when such a pull cannot be served otherwise.
    pub async fn left_out_platform(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<String>, StorageError> {
        let (repo, digest) = (repo.clone(), digest.clone());
        self.blocking(move |i| {
            let txn = i.db.begin_read()?;
            let r = repo.as_str();
            if txn
                .open_table(REPO_MANIFESTS)?
                .get((r, digest.as_str()))?
                .is_some()
            {
                return Ok(None);
            }
            let manifests = txn.open_table(MANIFESTS)?;
            let mut seen = HashSet::new();
            for row in txn.open_table(TAGS)?.range((r, "")..)? {
                let (k, v) = row?;
                if k.value().0 != r {
                    break;
                }
                let tagged = TagRecord::decode(v.value())?.digest.to_owned();
                if !seen.insert(tagged.clone()) {
                    continue;
                }
                let Some(m) = manifests.get(tagged.as_str())? else {
                    continue;
                };
                let rec = ManifestRecord::decode(m.value())?;
                let Ok(index) = Manifest::parse(rec.body, Some(rec.media_type)) else {
                    continue;
                };
                if let Some(child) = index.manifests.iter().find(|c| c.digest == digest) {
                    return Ok(Some(child.platform.as_ref().map_or_else(
                        || "unknown".to_owned(),
                        |p| match &p.variant {
                            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                            None => format!("{}/{}", p.os, p.architecture),
                        },
                    )));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Every job that holds mirrored tags, with the repositories it holds them in.
    pub async fn mirror_holders(&self) -> Result<Vec<(String, String)>, StorageError> {
        self.blocking(|i| {
            let txn = i.db.begin_read()?;
            let mut out = BTreeSet::new();
            for row in txn.open_table(MIRROR_TAGS)?.iter()? {
                let (k, _) = row?;
                let (j, r, _) = k.value();
                out.insert((j.to_owned(), r.to_owned()));
            }
            Ok(out.into_iter().collect())
        })
        .await
    }

    /// Releases the tags of `repo` that job `job` mirrored and no longer selects (`keep`
    /// is its selection now). Their content is unpinned unless a tag that some job still
    /// mirrors in `repo` needs it; with `prune` the tags (and the tags that came with
    /// them, unless still needed) are no longer served either. One transaction.
    pub async fn release_mirrored_tags(
        &self,
        job: &str,
        repo: &RepoName,
        keep: Vec<String>,
        prune: bool,
    ) -> Result<Released, StorageError> {
        let (job, repo) = (job.to_owned(), repo.clone());
        self.blocking(move |i| {
            let _guard = i.commit_lock.read().map_err(|_| StorageError::Task)?;
            let txn = i.db.begin_write()?;
            let mut out = Released::default();
            {
                let r = repo.as_str();
                let keep: HashSet<&str> = keep.iter().map(String::as_str).collect();
                let mut table = txn.open_table(MIRROR_TAGS)?;
                let mut gone: Vec<(String, MirroredTag)> = Vec::new();
                let mut still: Vec<MirroredTag> = Vec::new();
                for row in table.iter()? {
                    let (k, v) = row?;
                    let (j, kr, t) = k.value();
                    if kr != r {
                        continue;
                    }
                    let rec = MirroredTag::decode(v.value())?;
                    if j == job && !keep.contains(t) {
                        gone.push((t.to_owned(), rec));
                    } else {
                        still.push(rec);
                    }
                }
                if gone.is_empty() {
                    return Ok(out);
                }
                for (t, _) in &gone {
                    table.remove((job.as_str(), r, t.as_str()))?;
                }
                if prune {
                    let needed: HashSet<&str> = still
                        .iter()
                        .flat_map(|s| s.tags.iter().map(String::as_str))
                        .collect();
                    let mut tags = txn.open_table(TAGS)?;
                    let mut validated = txn.open_table(UPSTREAM_TAGS)?;
                    for (t, rec) in &gone {
                        let mine = std::iter::once(t).chain(rec.tags.iter());
                        for tag in mine.filter(|x| !needed.contains(x.as_str())) {
                            tags.remove((r, tag.as_str()))?;
                            for class in [AcceptClass::Any, AcceptClass::SingleOnly] {
                                validated.remove((r, tag.as_str(), class as u8))?;
                            }
                            out.pruned.push(tag.clone());
                        }
                    }
                }
                out.tags = gone.into_iter().map(|(t, _)| t).collect();
                let pinned = referenced_blobs(&txn.open_table(MANIFESTS)?, &still)?;
                let mut links = txn.open_table(REPO_BLOBS)?;
                let mut unpin = Vec::new();
                for row in links.range((r, "")..)? {
                    let (k, v) = row?;
                    let (kr, d) = k.value();
                    if kr != r {
                        break;
                    }
                    let link = LinkRecord::decode(v.value())?;
                    if link.origin == LinkOrigin::Mirror && !pinned.contains(d) {
                        unpin.push((d.to_owned(), link.linked_at));
                    }
                }
                for (d, linked_at) in unpin {
                    let link = LinkRecord {
                        origin: LinkOrigin::Upstream,
                        linked_at,
                    };
                    links.insert((r, d.as_str()), link.encode().as_slice())?;
                    out.unpinned += 1;
                }
            }
            txn.commit()?;
            Ok(out)
        })
        .await
    }

    /// Links a stored blob into `repo` as mirrored content (pinned). `false` when the
    /// blob is not stored.
    pub async fn pin_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, StorageError> {
        self.link_stored(repo, digest, LinkOrigin::Mirror).await
    }

    /// Records the last run of mirror job `job`.
    pub async fn record_mirror_run(
        &self,
        job: &str,
        record: &MirrorRunRecord,
    ) -> Result<(), StorageError> {
        let mut value = vec![RUN_V1];
        serde_json::to_writer(&mut value, record)
            .map_err(|e| StorageError::Corrupt(format!("mirror run record: {e}")))?;
        let job = job.to_owned();
        self.blocking(move |i| {
            let txn = i.db.begin_write()?;
            txn.open_table(MIRROR_RUNS)?
                .insert(job.as_str(), value.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// The last run of every mirror job that has run, by job name.
    pub fn mirror_runs(&self) -> Result<Vec<(String, MirrorRunRecord)>, StorageError> {
        let txn = self.inner.db.begin_read()?;
        let mut out = Vec::new();
        for entry in txn.open_table(MIRROR_RUNS)?.iter()? {
            let (k, v) = entry?;
            let record = match v.value().split_first() {
                Some((&RUN_V1, json)) => serde_json::from_slice(json)
                    .map_err(|_| StorageError::from(DecodeError("mirror run")))?,
                _ => return Err(DecodeError("mirror run").into()),
            };
            out.push((k.value().to_owned(), record));
        }
        Ok(out)
    }
}

/// Every blob the stored manifests of `tags` reference.
fn referenced_blobs(
    manifests: &impl ReadableTable<&'static str, &'static [u8]>,
    tags: &[MirroredTag],
) -> Result<HashSet<String>, StorageError> {
    let mut blobs = HashSet::new();
    let digests: HashSet<&str> = tags
        .iter()
        .flat_map(|t| t.manifests.iter().map(String::as_str))
        .collect();
    for d in digests {
        let Some(v) = manifests.get(d)? else {
            continue;
        };
        let rec = ManifestRecord::decode(v.value())?;
        let m = Manifest::parse(rec.body, Some(rec.media_type))
            .map_err(|e| StorageError::Corrupt(format!("manifest {d}: {e}")))?;
        blobs.extend(m.required_blobs().map(|b| b.digest.to_string()));
    }
    Ok(blobs)
}
