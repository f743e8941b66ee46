//! The in-memory set of revoked API key ids, and the revocation-list file format.
//!
//! Owns only the set every request consults; making revocations durable is the storage
//! module's job, which loads the persisted ids into this set at start-up. Ids are only
//! ever added while running: a reload merges, so nothing revoked comes back to life
//! until the durable record says so at the next start.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::keys::{API_KEY_PREFIX, decode_unverified};

/// A cheap-to-clone handle on the shared set of revoked key ids.
#[derive(Clone, Debug, Default)]
pub struct RevocationSet {
    ids: Arc<RwLock<HashSet<String>>>,
}

/// A line of a revocation-list file that is neither a key id nor a decodable API key.
/// Refusing the whole file is safer than silently keeping a key the operator meant to
/// revoke. The message never repeats the line, which may hold a whole key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: not a key id (32 hex characters) or an Outpost API key")]
pub struct RevocationLineError {
    pub line: usize,
}

impl RevocationSet {
    pub fn new(initial: impl IntoIterator<Item = String>) -> RevocationSet {
        RevocationSet {
            ids: Arc::new(RwLock::new(initial.into_iter().collect())),
        }
    }

    /// Revokes `id`; true if it was not revoked before.
    pub fn revoke(&self, id: &str) -> bool {
        self.write().insert(id.to_owned())
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.read().contains(id)
    }

    /// Adds every id (for example from [`parse_revocation_file`]); returns how many were new.
    pub fn merge(&self, ids: impl IntoIterator<Item = String>) -> usize {
        let mut set = self.write();
        ids.into_iter().filter(|id| set.insert(id.clone())).count()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Every revoked id, sorted (for listing).
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.read().iter().cloned().collect();
        ids.sort_unstable();
        ids
    }

    // A panic while holding the lock cannot leave a half-inserted id, so poison is moot.
    fn read(&self) -> RwLockReadGuard<'_, HashSet<String>> {
        self.ids.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashSet<String>> {
        self.ids.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Parses a revocation-list file: one key id or whole API key per line (whole keys are
/// reduced to their id), `#` starts a comment, blank lines are ignored. Every bad line is
/// reported, and then no id is returned: at start-up, refusing to run beats running
/// without a revocation the operator meant.
pub fn parse_revocation_file(text: &str) -> Result<Vec<String>, Vec<RevocationLineError>> {
    let (ids, errors) = parse_revocation_lines(text);
    if errors.is_empty() {
        Ok(ids)
    } else {
        Err(errors)
    }
}

/// Like [`parse_revocation_file`], but returns the ids of the good lines along with the
/// bad lines: for a running daemon, revoking what can be read beats revoking nothing
/// (and a line may be bad only because the file is being written).
pub fn parse_revocation_lines(text: &str) -> (Vec<String>, Vec<RevocationLineError>) {
    let mut ids = Vec::new();
    let mut errors = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        // Neither ids nor keys contain `#`, so everything after one is comment.
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let id = if line.starts_with(API_KEY_PREFIX) {
            decode_unverified(line).ok().map(|claims| claims.id)
        } else if line.len() == 32 && line.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some(line.to_ascii_lowercase())
        } else {
            None
        };
        match id {
            Some(id) => ids.push(id),
            None => errors.push(RevocationLineError { line: index + 1 }),
        }
    }
    (ids, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::tests::{issue, signing_key};

    #[test]
    fn revoke_is_shared_between_clones_and_reports_novelty() {
        let set = RevocationSet::new(["a".repeat(32)]);
        let clone = set.clone();
        assert!(set.is_revoked(&"a".repeat(32)));
        assert!(clone.revoke(&"b".repeat(32)));
        assert!(!clone.revoke(&"b".repeat(32)));
        assert!(set.is_revoked(&"b".repeat(32)));
        assert!(!set.is_revoked(&"c".repeat(32)));
        assert_eq!(set.len(), 2);
        assert_eq!(set.merge(["b".repeat(32), "c".repeat(32)]), 1);
        assert_eq!(set.ids(), ["a".repeat(32), "b".repeat(32), "c".repeat(32)]);
    }

    #[test]
    fn file_takes_ids_and_whole_keys_with_comments() {
        let (key, claims) = issue(&signing_key(1), &["**"], "pull", 60);
        let text = format!(
            "# revoked 2024-05-01\n\n  0123456789ABCDEF0123456789abcdef  # laptop lost\n{}\n",
            key.expose()
        );
        assert_eq!(
            parse_revocation_file(&text),
            Ok(vec![
                "0123456789abcdef0123456789abcdef".to_owned(),
                claims.id
            ])
        );
        assert_eq!(parse_revocation_file("# nothing\n\n"), Ok(vec![]));
    }

    #[test]
    fn bad_lines_are_all_reported_without_their_content() {
        let (key, _) = issue(&signing_key(1), &["**"], "pull", 60);
        let truncated = &key.expose()[..40];
        let text = format!("0123456789abcdef0123456789abcdef\nnot-an-id\n{truncated}\n");
        let errors = parse_revocation_file(&text).expect_err("bad lines");
        assert_eq!(
            errors,
            [
                RevocationLineError { line: 2 },
                RevocationLineError { line: 3 }
            ]
        );
        let shown = format!("{} {:?}", errors[1], errors[1]);
        assert!(!shown.contains(&truncated[5..]), "{shown}");
        let (ids, errors) = parse_revocation_lines(&text);
        assert_eq!(ids, ["0123456789abcdef0123456789abcdef"]);
        assert_eq!(errors.len(), 2);
    }
}
