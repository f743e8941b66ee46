//! The durable side of API keys, between `auth` (what one process holds in memory) and
//! `storage` (redb): revocations from the revocation file, loaded at start-up, on SIGHUP
//! and whenever the file changes, and written to the store; the keys seen authenticating
//! and their last use, flushed from memory in batches; keys recorded when issued; and the
//! `outpost key list` inventory.
//!
//! Owns no state of its own: it moves ids and claims between the [`Authenticator`]'s
//! in-memory sets and the [`Store`]. Never handles a key, only ids and claims. Store work
//! here is blocking; async callers use [`upkeep`] or `spawn_blocking`.

pub mod inventory;
mod watch;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::auth::{
    Authenticator, KeyClaims, KeyUsage, RevocationSet, UsedKey, parse_revocation_file,
    parse_revocation_lines,
};
use crate::storage::{KeyRecord, StorageError, Store, now_secs};
use inventory::{Listing, Revocation};
pub use watch::{Change, ChangeDetector, FileStamp};

/// How often the revocation file is checked for changes.
pub const REVOCATION_POLL: Duration = Duration::from_secs(2);

/// How often the last use of keys is written to the store, at the latest. Also written
/// once the daemon has drained at stop, and before a listing, so the interval only bounds
/// what a kill -9 loses.
pub const USAGE_FLUSH: Duration = Duration::from_secs(30);

/// The durable record of a key's claims.
pub fn key_record(claims: &KeyClaims, recorded_at: u64, last_used: Option<u64>) -> KeyRecord {
    KeyRecord {
        subject: claims.subject.clone(),
        issuer: claims.issuer.clone(),
        repos: claims.repos.clone(),
        actions: claims.actions.to_string(),
        issued_at: claims.issued_at,
        expires_at: claims.expires_at,
        recorded_at,
        last_used,
    }
}

/// Writes the batched use of keys to the store. Blocking.
pub fn flush_key_usage(usage: &KeyUsage, store: &Store) -> Result<usize, StorageError> {
    usage.flush(|batch: &[UsedKey]| {
        let now = now_secs();
        let mut seen = Vec::new();
        let mut used = Vec::new();
        for u in batch {
            match &u.claims {
                Some(c) => seen.push((u.id.clone(), key_record(c, now, Some(u.last_used)))),
                None => used.push((u.id.clone(), u.last_used)),
            }
        }
        store.record_keys_blocking(&seen, &used)
    })
}

/// Revoked ids for start-up: those in the store plus those in the revocation file, which
/// are recorded in the store first. Every line of the file must be good, so a daemon
/// never runs without a revocation its operator meant. Returns the ids and the stamp of
/// the file as read, for [`upkeep`] to notice later changes. Blocking.
pub fn load_at_start(
    store: &Store,
    file: Option<&Path>,
) -> anyhow::Result<(Vec<String>, Option<FileStamp>)> {
    let mut revoked = store.revoked_keys()?;
    let Some(file) = file else {
        return Ok((revoked, None));
    };
    // Taken before reading, so a write racing with the read counts as a change.
    let stamp = FileStamp::read(file).with_context(|| format!("reading {}", file.display()))?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let ids = parse_revocation_file(&text).map_err(|errs| {
        let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}: {}", file.display(), lines.join("; "))
    })?;
    store
        .revoke_keys_blocking(&ids)
        .context("recording the revocation file's ids")?;
    revoked.extend(ids);
    Ok((revoked, stamp))
}

/// Re-reads the revocation file: its ids take effect at once in `revocations` and are
/// then recorded in the store. Bad lines are logged (by number, never by content) and
/// skipped; the good ones still count. Returns how many ids were new. Blocking.
pub fn reload_revocation_file(
    file: &Path,
    revocations: &RevocationSet,
    store: &Store,
) -> anyhow::Result<usize> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (ids, errors) = parse_revocation_lines(&text);
    for e in &errors {
        tracing::error!(file = %file.display(), error = %e, "revocation file line skipped");
    }
    let added = revocations.merge(ids.iter().cloned());
    store
        .revoke_keys_blocking(&ids)
        .context("recording revoked ids")?;
    Ok(added)
}

/// The daemon's key upkeep, until `shutdown`: polls the revocation file every
/// [`REVOCATION_POLL`] and reloads it when it changed; flushes the use of keys every
/// [`USAGE_FLUSH`]. The last flush is the daemon's, after its requests have drained
/// ([`flush_key_usage`]).
pub async fn upkeep(
    auth: Authenticator,
    store: Store,
    file: Option<PathBuf>,
    initial: Option<FileStamp>,
    shutdown: CancellationToken,
) {
    let mut detector = ChangeDetector::new(initial);
    let mut flushed = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REVOCATION_POLL) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Some(file) = &file {
            // Off the executor: even a `stat` can hang on a network mount.
            let (file, set, s, d) = (
                file.clone(),
                auth.revocations().clone(),
                store.clone(),
                detector.clone(),
            );
            match tokio::task::spawn_blocking(move || poll_revocation_file(&file, d, &set, &s))
                .await
            {
                Ok(d) => detector = d,
                Err(e) => tracing::error!(error = %e, "checking the revocation file failed"),
            }
        }
        if flushed.elapsed() >= USAGE_FLUSH {
            let (usage, s) = (auth.key_usage().clone(), store.clone());
            match tokio::task::spawn_blocking(move || flush_key_usage(&usage, &s)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "recording the last use of keys failed"),
                Err(e) => tracing::warn!(error = %e, "recording the last use of keys failed"),
            }
            flushed = Instant::now();
        }
    }
}

/// Reloads the revocation file if it changed since `detector` last looked; returns the
/// detector, updated. Blocking.
fn poll_revocation_file(
    file: &Path,
    mut detector: ChangeDetector,
    revocations: &RevocationSet,
    store: &Store,
) -> ChangeDetector {
    let stamp = match FileStamp::read(file) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot check the revocation file");
            return detector;
        }
    };
    match detector.observe(stamp) {
        Change::Unchanged => {}
        Change::Removed => tracing::warn!(
            file = %file.display(),
            "revocation file removed; every revocation stays in force"
        ),
        Change::Modified => match reload_revocation_file(file, revocations, store) {
            Ok(added) => tracing::info!(added, "revocation file changed; reloaded"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "revocation file reload failed"),
        },
    }
    detector
}

/// Records a newly issued key in the store's key list. Blocking.
pub fn record_issued(store: &Store, id: &str, record: &KeyRecord) -> Result<(), StorageError> {
    store.record_keys_blocking(&[(id.to_owned(), record.clone())], &[])
}

/// Everything `outpost key list` shows. With the daemon running, `daemon` is its
/// authenticator: its pending key use is flushed first, and its in-memory revocations
/// count. With the daemon stopped, the revocation file (if any) is read for ids no daemon
/// has loaded yet. Blocking.
pub fn listing(
    store: &Store,
    daemon: Option<&Authenticator>,
    revocation_file: Option<&Path>,
) -> Result<Listing, StorageError> {
    let mut warnings = Vec::new();
    let mut extra: Vec<String> = Vec::new();
    match daemon {
        Some(auth) => {
            if let Err(e) = flush_key_usage(auth.key_usage(), store) {
                warnings.push(format!("recent key use could not be recorded: {e}"));
            }
            extra = auth.revocations().ids();
        }
        None => {
            if let Some(file) = revocation_file {
                match std::fs::read_to_string(file) {
                    Ok(text) => {
                        let (ids, errors) = parse_revocation_lines(&text);
                        extra = ids;
                        for e in errors {
                            warnings.push(format!("{}: {e}", file.display()));
                        }
                    }
                    Err(e) => {
                        warnings.push(format!("revocation file {} not read: {e}", file.display()))
                    }
                }
            }
        }
    }
    let revoked = store
        .revoked_keys_with_times()?
        .into_iter()
        .map(|(id, at)| (id, Revocation::At(at)))
        .chain(extra.into_iter().map(|id| (id, Revocation::Listed)));
    let mut listing = Listing::new(store.known_keys_blocking()?, revoked);
    listing.warnings = warnings;
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: char) -> String {
        c.to_string().repeat(32)
    }

    fn store(dir: &Path) -> Store {
        Store::open(&dir.join("data"), 1 << 20).expect("open store")
    }

    #[test]
    fn a_running_reload_applies_good_lines_records_them_and_skips_bad_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let file = dir.path().join("revoked");
        std::fs::write(&file, format!("{}\nhalf-written-line\n", id('a'))).expect("write");
        let set = RevocationSet::default();
        assert_eq!(
            reload_revocation_file(&file, &set, &store).expect("reload"),
            1
        );
        assert!(set.is_revoked(&id('a')));
        assert_eq!(store.revoked_keys().expect("read"), [id('a')]);
        assert_eq!(
            reload_revocation_file(&file, &set, &store).expect("again"),
            0
        );
        std::fs::remove_file(&file).expect("remove");
        assert!(reload_revocation_file(&file, &set, &store).is_err());
        assert!(
            set.is_revoked(&id('a')),
            "a missing file revokes nothing back"
        );
    }

    #[test]
    fn start_up_refuses_a_bad_file_and_records_a_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        store.revoke_key_blocking(&id('s')).expect("revoke");
        let file = dir.path().join("revoked");
        std::fs::write(&file, "not-an-id\n").expect("write");
        let err = load_at_start(&store, Some(&file)).expect_err("bad line");
        assert!(err.to_string().contains("line 1"), "{err}");
        std::fs::write(&file, format!("# ok\n{}\n", id('f'))).expect("write");
        let (mut ids, stamp) = load_at_start(&store, Some(&file)).expect("good file");
        ids.sort();
        assert_eq!(ids, [id('f'), id('s')]);
        assert_eq!(stamp, FileStamp::read(&file).expect("stat"));
        assert_eq!(store.revoked_keys().expect("read").len(), 2, "recorded");
        let (ids, stamp) = load_at_start(&store, None).expect("no file");
        assert_eq!((ids.len(), stamp), (2, None));
    }

    #[test]
    fn a_stopped_listing_marks_ids_only_the_file_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        store.revoke_key_blocking(&id('b')).expect("revoke");
        let file = dir.path().join("revoked");
        std::fs::write(&file, format!("{}\n{}\nbad\n", id('a'), id('b'))).expect("write");
        let shown = listing(&store, None, Some(&file)).expect("listing");
        let revoked: Vec<_> = shown
            .rows
            .iter()
            .map(|r| (r.id.clone(), r.revoked))
            .collect();
        assert_eq!(revoked.len(), 2);
        assert_eq!(revoked[0], (id('a'), Some(Revocation::Listed)));
        assert!(matches!(revoked[1].1, Some(Revocation::At(_))));
        assert_eq!(shown.warnings.len(), 1, "the bad line is reported");
        let missing = listing(&store, None, Some(&dir.path().join("nowhere"))).expect("listing");
        assert!(
            missing.warnings[0].contains("not read"),
            "{:?}",
            missing.warnings
        );
    }

    #[test]
    fn flushing_usage_records_claims_and_token_uses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path());
        let usage = KeyUsage::default();
        let request = crate::auth::KeyRequest {
            subject: "ci-runner".to_owned(),
            repos: vec!["team/**".to_owned()],
            actions: crate::auth::Actions::PULL,
            ttl: Duration::from_secs(3600),
        };
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let (_, claims) = crate::auth::issue_key(&signing, &request, std::time::SystemTime::now())
            .expect("issued");
        let claims = std::sync::Arc::new(claims);
        usage.record_id(&claims.id, std::time::UNIX_EPOCH + Duration::from_secs(500));
        usage.record_id(&id('9'), std::time::UNIX_EPOCH + Duration::from_secs(600));
        assert_eq!(flush_key_usage(&usage, &store).expect("flush"), 2);
        assert!(
            store.known_keys_blocking().expect("read").is_empty(),
            "no claims yet"
        );
        usage.record(&claims, std::time::UNIX_EPOCH + Duration::from_secs(700));
        flush_key_usage(&usage, &store).expect("flush");
        let known = store.known_keys_blocking().expect("read");
        let k = &known[&claims.id];
        assert_eq!((k.subject.as_str(), k.last_used), ("ci-runner", Some(700)));
        assert_eq!(k.repos, ["team/**"]);
        assert_eq!(flush_key_usage(&usage, &store).expect("empty"), 0);
    }
}
