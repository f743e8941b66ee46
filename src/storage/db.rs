//! The metadata database handle. After an I/O failure of a commit (the disk full,
//! typically) redb latches the error and refuses every later transaction until the
//! database is closed and opened again; [`Db`] notices, and the next transaction reopens
//! it, so the store recovers by itself once space is back. Nothing committed is lost:
//! redb commits atomically, and opening repairs what a failed commit left.
//!
//! Must not: hold a transaction itself, or decide what a failure means to a client.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use redb::{Database, ReadTransaction, ReadableDatabase, TransactionError, WriteTransaction};

use super::StorageError;

/// The database, reopened when redb asks for it.
pub(super) struct Db {
    path: PathBuf,
    cache: usize,
    /// `None` while a reopen failed (the disk still full): every transaction fails until
    /// the next attempt succeeds.
    current: RwLock<Option<Arc<Database>>>,
    /// A transaction met a latched I/O failure: the next one reopens the database first.
    broken: AtomicBool,
}

impl Db {
    /// Opens (creating if needed) the database at `path` with `cache` bytes of cache.
    pub fn open(path: &Path, cache: usize) -> Result<Db, StorageError> {
        let db = open(path, cache)?;
        Ok(Db {
            path: path.to_owned(),
            cache,
            current: RwLock::new(Some(Arc::new(db))),
            broken: AtomicBool::new(false),
        })
    }

    pub fn begin_read(&self) -> Result<ReadTransaction, StorageError> {
        self.with(|db| db.begin_read())
    }

    pub fn begin_write(&self) -> Result<WriteTransaction, StorageError> {
        self.with(|db| db.begin_write())
    }

    /// Whether transactions can be expected to work: false after a latched failure until
    /// a reopen succeeded.
    pub fn healthy(&self) -> bool {
        !self.broken.load(Ordering::SeqCst)
    }

    /// Runs `begin` on the current database, reopening it first when it is broken, and
    /// once more when `begin` reports a latched failure.
    fn with<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, TransactionError>,
    ) -> Result<T, StorageError> {
        if self.broken.load(Ordering::SeqCst) {
            self.reopen()?;
        }
        let first = begin(self.current()?.as_ref());
        match first {
            Err(e) if latched(&e) => {
                self.broken.store(true, Ordering::SeqCst);
                tracing::warn!(error = %e, "the metadata database latched an I/O error; reopening it");
                self.reopen()?;
                Ok(begin(self.current()?.as_ref())?)
            }
            other => Ok(other?),
        }
    }

    fn current(&self) -> Result<Arc<Database>, StorageError> {
        self.current
            .read()
            .map_err(|_| StorageError::Task)?
            .clone()
            .ok_or(StorageError::Reopening)
    }

    /// Closes and opens the database again, if it is still broken. Fails (and stays
    /// broken, for the next caller to try) while the file cannot be opened, for example
    /// because repairing it needs space the disk does not have.
    fn reopen(&self) -> Result<(), StorageError> {
        let mut current = self.current.write().map_err(|_| StorageError::Task)?;
        if !self.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(old) = current.take() {
            // Transactions keep the file open until they end; the new handle can only be
            // opened once the last of them has.
            drop(old);
        }
        match open(&self.path, self.cache) {
            Ok(db) => {
                *current = Some(Arc::new(db));
                self.broken.store(false, Ordering::SeqCst);
                tracing::info!("the metadata database was reopened");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "reopening the metadata database failed; retrying with the next request");
                Err(match e {
                    // A transaction of the old handle is still open.
                    StorageError::Locked => StorageError::Reopening,
                    other => other,
                })
            }
        }
    }
}

fn open(path: &Path, cache: usize) -> Result<Database, StorageError> {
    Ok(Database::builder().set_cache_size(cache).create(path)?)
}

/// Whether `e` is redb refusing work after an earlier I/O failure, which only a reopen
/// clears.
fn latched(e: &TransactionError) -> bool {
    matches!(
        e,
        TransactionError::Storage(
            redb::StorageError::PreviousIo | redb::StorageError::Corrupted(_)
        )
    )
}
