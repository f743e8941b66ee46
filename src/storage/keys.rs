//! Durable records of API keys: revoked ids in bulk (the revocation file) with the time of
//! revocation, and the keys this store knows of, with their claims and last use.
//!
//! Holds claims only, never a key, so no record can be turned back into a credential.
//! Last-use times arrive in batches (the daemon flushes what it gathered in memory), so
//! authenticating a request never costs a database write. Claims are signed and never
//! change for an id, so a record, once written, only ever has its last use moved forward.

use std::collections::BTreeMap;

use redb::ReadableTable;

use super::schema::*;
use super::{StorageError, Store, now_secs};

impl Store {
    /// Durably records every id in `ids` as revoked, in one transaction, keeping the
    /// original time of those already revoked. Returns how many were new. Blocking.
    pub fn revoke_keys_blocking(&self, ids: &[String]) -> Result<usize, StorageError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let now = now_secs();
        let txn = self.inner.db.begin_write()?;
        let mut new = 0;
        {
            let mut table = txn.open_table(REVOKED_KEYS)?;
            for id in ids {
                if table.get(id.as_str())?.is_none() {
                    table.insert(id.as_str(), now)?;
                    new += 1;
                }
            }
        }
        // A file re-read with nothing new is the common case: no commit, no fsync.
        if new == 0 {
            txn.abort()?;
        } else {
            txn.commit()?;
        }
        Ok(new)
    }

    /// Every revoked key id with when it was revoked (seconds since the epoch), in id
    /// order. Blocking.
    pub fn revoked_keys_with_times(&self) -> Result<Vec<(String, u64)>, StorageError> {
        let txn = self.inner.db.begin_read()?;
        let mut out = Vec::new();
        for entry in txn.open_table(REVOKED_KEYS)?.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_owned(), v.value()));
        }
        Ok(out)
    }

    /// Merges what was learned about keys, in one transaction: `seen` are keys with their
    /// claims (recorded if new, else only their last use moves forward); `used` are ids
    /// used at a time (through a token), which only move the last use of keys already
    /// known. Last use never goes backwards, so batches may arrive in any order. Blocking.
    pub fn record_keys_blocking(
        &self,
        seen: &[(String, KeyRecord)],
        used: &[(String, u64)],
    ) -> Result<(), StorageError> {
        if seen.is_empty() && used.is_empty() {
            return Ok(());
        }
        let txn = self.inner.db.begin_write()?;
        {
            let mut table = txn.open_table(KNOWN_KEYS)?;
            for (id, record) in seen {
                let existing = match table.get(id.as_str())? {
                    Some(v) => Some(KeyRecord::decode(v.value())?),
                    None => None,
                };
                let merged = match existing {
                    None => record.clone(),
                    Some(mut old) => {
                        let later = old.last_used.max(record.last_used);
                        if later == old.last_used {
                            continue;
                        }
                        old.last_used = later;
                        old
                    }
                };
                table.insert(id.as_str(), merged.encode().as_slice())?;
            }
            for (id, at) in used {
                let Some(mut old) = (match table.get(id.as_str())? {
                    Some(v) => Some(KeyRecord::decode(v.value())?),
                    None => None,
                }) else {
                    continue;
                };
                if old.last_used.is_some_and(|t| t >= *at) {
                    continue;
                }
                old.last_used = Some(*at);
                table.insert(id.as_str(), old.encode().as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every known key with its record, in id order. Blocking.
    pub fn known_keys_blocking(&self) -> Result<BTreeMap<String, KeyRecord>, StorageError> {
        let txn = self.inner.db.begin_read()?;
        let mut out = BTreeMap::new();
        for entry in txn.open_table(KNOWN_KEYS)?.iter()? {
            let (k, v) = entry?;
            out.insert(k.value().to_owned(), KeyRecord::decode(v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(subject: &str, last_used: Option<u64>) -> KeyRecord {
        KeyRecord {
            subject: subject.to_owned(),
            issuer: "0123456789abcdef".to_owned(),
            repos: vec!["team/**".to_owned()],
            actions: "pull".to_owned(),
            issued_at: 10,
            expires_at: 1000,
            recorded_at: 20,
            last_used,
        }
    }

    fn id(c: char) -> String {
        c.to_string().repeat(32)
    }

    #[test]
    fn records_merge_and_last_use_only_moves_forward() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20).expect("open");
        store
            .record_keys_blocking(&[(id('a'), record("ci", None))], &[])
            .expect("record");
        // A later sighting moves the last use; the first claims and recording time stay.
        let mut later = record("other", Some(50));
        later.recorded_at = 40;
        store
            .record_keys_blocking(&[(id('a'), later)], &[(id('b'), 60)])
            .expect("record");
        store
            .record_keys_blocking(&[(id('a'), record("ci", Some(30)))], &[(id('a'), 45)])
            .expect("record");
        let known = store.known_keys_blocking().expect("list");
        assert_eq!(
            known.len(),
            1,
            "a use through a token of an unknown key is dropped"
        );
        let a = &known[&id('a')];
        assert_eq!((a.subject.as_str(), a.recorded_at), ("ci", 20));
        assert_eq!(a.last_used, Some(50));
        store
            .record_keys_blocking(&[], &[(id('a'), 70)])
            .expect("record");
        assert_eq!(
            store.known_keys_blocking().expect("list")[&id('a')].last_used,
            Some(70)
        );
    }

    #[test]
    fn bulk_revocation_keeps_first_times_and_counts_new_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20).expect("open");
        assert!(store.revoke_key_blocking(&id('a')).expect("revoke"));
        let first = store.revoked_keys_with_times().expect("list")[0].1;
        assert_eq!(
            store
                .revoke_keys_blocking(&[id('a'), id('b'), id('b')])
                .expect("revoke"),
            1
        );
        let all = store.revoked_keys_with_times().expect("list");
        assert_eq!(
            all.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>(),
            [id('a'), id('b')]
        );
        assert_eq!(all[0].1, first);
        assert_eq!(store.revoke_keys_blocking(&[]).expect("nothing"), 0);
    }
}
