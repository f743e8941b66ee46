//! The last use of API keys, gathered in memory between flushes.
//!
//! Owns only the batch: every successful authentication with a key (or with a token
//! obtained with one) notes the key here, which costs a map update and no I/O. Whoever
//! makes it durable (the daemon's upkeep, or the admin socket before a listing) takes the
//! batch with [`KeyUsage::flush`]; a failed write puts it back, so nothing is lost to a
//! transient error. Never holds a key, only its verified claims.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use super::KeyClaims;
use super::keys::unix_seconds;

/// Most distinct keys held between two flushes. Only keys with a valid signature get
/// here, so the bound is reached only by an issuer handing out that many; past it, keys
/// not yet in the batch wait for the next flush to be noted.
pub const MAX_PENDING_KEYS: usize = 65_536;

/// One key used since the last flush.
#[derive(Clone, Debug)]
pub struct UsedKey {
    pub id: String,
    /// The key's claims when it authenticated itself; `None` when only tokens obtained
    /// with it were seen (a token carries the key id, not its claims).
    pub claims: Option<Arc<KeyClaims>>,
    /// Seconds since the Unix epoch.
    pub last_used: u64,
}

/// A cheap-to-clone handle on the shared batch.
#[derive(Clone, Debug, Default)]
pub struct KeyUsage {
    inner: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<HashMap<String, Pending>>,
    /// Held for the whole of a flush, so two flushes never interleave and a reader that
    /// flushes before reading the store sees every use noted before it started.
    flushing: Mutex<()>,
}

#[derive(Debug)]
struct Pending {
    claims: Option<Arc<KeyClaims>>,
    last_used: u64,
}

impl KeyUsage {
    /// Notes that the key behind `claims` authenticated at `now`.
    pub fn record(&self, claims: &Arc<KeyClaims>, now: SystemTime) {
        self.note(&claims.id, Some(claims), unix_seconds(now));
    }

    /// Notes that a token obtained with key `id` authenticated at `now`.
    pub fn record_id(&self, id: &str, now: SystemTime) {
        self.note(id, None, unix_seconds(now));
    }

    /// How many keys wait for the next flush.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.batch().len()
    }

    /// Takes the batch and hands it to `write`. If `write` fails, the batch is merged back
    /// (with anything noted meanwhile) and the error returned. Returns how many keys were
    /// written. `write` may block: call from blocking code.
    pub fn flush<E>(&self, write: impl FnOnce(&[UsedKey]) -> Result<(), E>) -> Result<usize, E> {
        let _flushing = lock(&self.inner.flushing);
        let batch: Vec<UsedKey> = std::mem::take(&mut *self.batch())
            .into_iter()
            .map(|(id, p)| UsedKey {
                id,
                claims: p.claims,
                last_used: p.last_used,
            })
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        match write(&batch) {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                for used in batch {
                    self.note(&used.id, used.claims.as_ref(), used.last_used);
                }
                Err(e)
            }
        }
    }

    fn note(&self, id: &str, claims: Option<&Arc<KeyClaims>>, at: u64) {
        let mut pending = self.batch();
        if let Some(p) = pending.get_mut(id) {
            p.last_used = p.last_used.max(at);
            if p.claims.is_none() {
                p.claims = claims.cloned();
            }
            return;
        }
        if pending.len() >= MAX_PENDING_KEYS {
            return;
        }
        pending.insert(
            id.to_owned(),
            Pending {
                claims: claims.cloned(),
                last_used: at,
            },
        );
    }

    fn batch(&self) -> MutexGuard<'_, HashMap<String, Pending>> {
        lock(&self.inner.pending)
    }
}

// Every update leaves the map whole, so a poisoned lock is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::tests::{T0, at, issue, signing_key};

    fn claims() -> Arc<KeyClaims> {
        Arc::new(issue(&signing_key(1), &["team/**"], "pull", 3600).1)
    }

    fn flushed(usage: &KeyUsage) -> Vec<UsedKey> {
        let mut out = Vec::new();
        usage
            .flush(|batch| {
                out.extend_from_slice(batch);
                Ok::<(), ()>(())
            })
            .expect("flush");
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    #[test]
    fn keeps_the_latest_use_and_the_claims_once_known() {
        let usage = KeyUsage::default();
        let c = claims();
        usage.record_id(&c.id, at(T0 + 5));
        usage.record(&c, at(T0 + 3));
        usage.record_id("f".repeat(32).as_str(), at(T0 + 1));
        assert_eq!(usage.pending(), 2);
        let batch = flushed(&usage);
        assert_eq!(batch.len(), 2);
        let key = batch.iter().find(|u| u.id == c.id).expect("the key");
        assert_eq!(key.last_used, T0 + 5);
        assert_eq!(
            key.claims.as_ref().map(|k| k.subject.as_str()),
            Some("ci-runner")
        );
        let token_only = batch.iter().find(|u| u.id != c.id).expect("token use");
        assert!(token_only.claims.is_none());
        assert!(flushed(&usage).is_empty(), "a flush empties the batch");
    }

    #[test]
    fn a_failed_flush_keeps_the_batch() {
        let usage = KeyUsage::default();
        let c = claims();
        usage.record(&c, at(T0));
        assert_eq!(usage.flush(|_| Err("disk full")), Err("disk full"));
        usage.record(&c, at(T0 + 9));
        let batch = flushed(&usage);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].last_used, T0 + 9);
        assert!(batch[0].claims.is_some());
    }

    #[test]
    fn the_batch_is_bounded() {
        let usage = KeyUsage::default();
        for i in 0..MAX_PENDING_KEYS + 10 {
            usage.record_id(&format!("{i:032x}"), at(T0));
        }
        assert_eq!(usage.pending(), MAX_PENDING_KEYS);
        // Keys already in the batch still move forward when full.
        usage.record_id(&format!("{:032x}", 0), at(T0 + 1));
        let batch = flushed(&usage);
        let first = batch.iter().find(|u| u.id == format!("{:032x}", 0));
        assert_eq!(first.map(|u| u.last_used), Some(T0 + 1));
    }
}
