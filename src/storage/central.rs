//! Durable records of cached central-registry logins: per user, the salted hash of the
//! credential last confirmed online; per user and repository, the central registry's
//! last answer. The empty user name holds what the central registry serves anonymously.
//!
//! Plain reads and writes; the rules about what a record is worth live in
//! `auth::central::rules`, and the caching in front of these tables in `auth::central`.

use redb::ReadableTable;

use super::schema::*;
use super::{StorageError, Store};

impl Store {
    /// The stored credential of central user `user`.
    pub async fn central_user(
        &self,
        user: &str,
    ) -> Result<Option<CentralUserRecord>, StorageError> {
        let user = user.to_owned();
        self.blocking(move |i| {
            let txn = i.db.begin_read()?;
            match txn.open_table(CENTRAL_USERS)?.get(user.as_str())? {
                Some(v) => Ok(Some(CentralUserRecord::decode(v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Stores (replaces) the credential of central user `user`.
    pub async fn put_central_user(
        &self,
        user: &str,
        record: CentralUserRecord,
    ) -> Result<(), StorageError> {
        let user = user.to_owned();
        self.blocking(move |i| {
            let txn = i.db.begin_write()?;
            txn.open_table(CENTRAL_USERS)?
                .insert(user.as_str(), record.encode().as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    /// Deletes the credential of central user `user` if it is still the one with `hash`
    /// (a concurrent login may have stored a newer one). Returns whether it was deleted.
    pub async fn forget_central_user(
        &self,
        user: &str,
        hash: [u8; 32],
    ) -> Result<bool, StorageError> {
        let user = user.to_owned();
        self.blocking(move |i| {
            let txn = i.db.begin_write()?;
            let deleted = {
                let mut table = txn.open_table(CENTRAL_USERS)?;
                let current = match table.get(user.as_str())? {
                    Some(v) => Some(CentralUserRecord::decode(v.value())?.hash),
                    None => None,
                };
                if current == Some(hash) {
                    table.remove(user.as_str())?;
                    true
                } else {
                    false
                }
            };
            txn.commit()?;
            Ok(deleted)
        })
        .await
    }

    /// The central registry's last answer on `user` pulling `repo` (its name there).
    pub async fn central_decision(
        &self,
        user: &str,
        repo: &str,
    ) -> Result<Option<CentralDecisionRecord>, StorageError> {
        let (user, repo) = (user.to_owned(), repo.to_owned());
        self.blocking(move |i| {
            let txn = i.db.begin_read()?;
            match txn
                .open_table(CENTRAL_DECISIONS)?
                .get((user.as_str(), repo.as_str()))?
            {
                Some(v) => Ok(Some(CentralDecisionRecord::decode(v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Records the central registry's answer on `user` pulling `repo`.
    pub async fn put_central_decision(
        &self,
        user: &str,
        repo: &str,
        record: CentralDecisionRecord,
    ) -> Result<(), StorageError> {
        let (user, repo) = (user.to_owned(), repo.to_owned());
        self.blocking(move |i| {
            let txn = i.db.begin_write()?;
            txn.open_table(CENTRAL_DECISIONS)?
                .insert((user.as_str(), repo.as_str()), record.encode().as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_survive_reopening_and_forget_checks_the_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = CentralUserRecord {
            salt: [3; 16],
            hash: [4; 32],
            verified_at: 10,
        };
        {
            let store = Store::open(dir.path(), 1 << 20).expect("open");
            assert_eq!(store.central_user("alice").await.expect("read"), None);
            store
                .put_central_user("alice", record)
                .await
                .expect("write");
            store
                .put_central_decision(
                    "alice",
                    "team/app",
                    CentralDecisionRecord {
                        allowed: true,
                        confirmed_at: 11,
                    },
                )
                .await
                .expect("write");
        }
        let store = Store::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(
            store.central_user("alice").await.expect("read"),
            Some(record)
        );
        assert_eq!(
            store
                .central_decision("alice", "team/app")
                .await
                .expect("read"),
            Some(CentralDecisionRecord {
                allowed: true,
                confirmed_at: 11
            })
        );
        assert_eq!(
            store
                .central_decision("bob", "team/app")
                .await
                .expect("read"),
            None
        );
        assert!(
            !store
                .forget_central_user("alice", [5; 32])
                .await
                .expect("forget"),
            "another credential's hash deletes nothing"
        );
        assert!(
            store
                .forget_central_user("alice", [4; 32])
                .await
                .expect("forget")
        );
        assert_eq!(store.central_user("alice").await.expect("read"), None);
    }
}
