//! What scheduled mirroring keeps: blobs linked with [`LinkOrigin::Mirror`] (pinned:
//! eviction only takes blobs whose every link came from pull-through) and the record of
//! each job's last run, for `outpost mirror status`.

use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

use super::schema::{DecodeError, LinkOrigin, MIRROR_RUNS};
use super::{StorageError, Store};
use crate::oci::{Digest, RepoName};

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
