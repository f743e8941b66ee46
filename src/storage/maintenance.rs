//! Garbage collection and consistency checking of the store.
//!
//! gc removes what nothing references, but never anything younger than the grace period,
//! so a blob uploaded a moment ago for a manifest still to come survives. fsck re-reads
//! every blob and every reference and reports (or with `repair`, removes) what is wrong.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::time::Duration;

use redb::ReadableTable;

use super::files::hash_file;
use super::schema::*;
use super::{Inner, StorageError, now_secs};
use crate::oci::Digest;
use crate::oci::manifest::Manifest;

/// What a gc run removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub links_removed: u64,
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    pub manifests_removed: u64,
    pub uploads_removed: u64,
    pub stray_files_removed: u64,
}

/// What fsck found.
#[derive(Debug, Default, Clone)]
pub struct FsckReport {
    pub blobs_checked: u64,
    pub manifests_checked: u64,
    /// Problems: each one a line for the operator.
    pub problems: Vec<String>,
    /// Unreferenced blob files (harmless: left by a crash between rename and commit,
    /// removed by gc).
    pub orphans: Vec<String>,
    pub repaired: u64,
}

fn parse_body(rec: &ManifestRecord<'_>) -> Option<Manifest> {
    Manifest::parse(rec.body, Some(rec.media_type)).ok()
}

pub(super) fn gc(
    inner: &Inner,
    grace: Duration,
    upload_timeout: Duration,
) -> Result<GcReport, StorageError> {
    let mut report = GcReport::default();
    let now = now_secs();
    let cutoff = now.saturating_sub(grace.as_secs());
    // Exclusive: no blob is committed or linked while we decide and delete.
    let _guard = inner.commit_lock.write().map_err(|_| StorageError::Task)?;
    let txn = inner.db.begin_write()?;
    let mut doomed_blobs: Vec<(Digest, u64)> = Vec::new();
    let mut doomed_uploads = Vec::new();
    {
        // Mark: blobs each repository's manifests reference, and live manifest bodies.
        let mut live_manifests = HashSet::new();
        let mut referenced: HashSet<(String, String)> = HashSet::new();
        let manifests = txn.open_table(MANIFESTS)?;
        for entry in txn.open_table(REPO_MANIFESTS)?.iter()? {
            let (k, _) = entry?;
            let (repo, digest) = k.value();
            live_manifests.insert(digest.to_owned());
            if let Some(v) = manifests.get(digest)? {
                let rec = ManifestRecord::decode(v.value())?;
                if let Some(m) = parse_body(&rec) {
                    for d in m.config.iter().chain(&m.layers) {
                        referenced.insert((repo.to_owned(), d.digest.to_string()));
                    }
                }
            }
        }
        drop(manifests);
        // Sweep links: unreferenced ones older than the grace period go.
        let mut repo_blobs = txn.open_table(REPO_BLOBS)?;
        let mut linked = HashSet::new();
        let mut dead_links = Vec::new();
        for entry in repo_blobs.iter()? {
            let (k, v) = entry?;
            let (repo, digest) = k.value();
            let link = LinkRecord::decode(v.value())?;
            if referenced.contains(&(repo.to_owned(), digest.to_owned()))
                || link.linked_at >= cutoff
            {
                linked.insert(digest.to_owned());
            } else {
                dead_links.push((repo.to_owned(), digest.to_owned()));
            }
        }
        for (repo, digest) in &dead_links {
            repo_blobs.remove((repo.as_str(), digest.as_str()))?;
        }
        report.links_removed = dead_links.len() as u64;
        // Sweep blob records nobody links any more.
        let mut blobs = txn.open_table(BLOBS)?;
        for entry in blobs.iter()? {
            let (k, v) = entry?;
            let rec = BlobRecord::decode(v.value())?;
            if !linked.contains(k.value())
                && rec.created < cutoff
                && let Ok(d) = k.value().parse::<Digest>()
            {
                doomed_blobs.push((d, rec.size));
            }
        }
        for (d, size) in &doomed_blobs {
            blobs.remove(d.as_str())?;
            report.blobs_removed += 1;
            report.bytes_freed += size;
        }
        // Manifest bodies no repository holds.
        let mut manifests = txn.open_table(MANIFESTS)?;
        let mut dead_manifests = Vec::new();
        for entry in manifests.iter()? {
            let (k, _) = entry?;
            if !live_manifests.contains(k.value()) {
                dead_manifests.push(k.value().to_owned());
            }
        }
        for d in &dead_manifests {
            manifests.remove(d.as_str())?;
        }
        report.manifests_removed = dead_manifests.len() as u64;
        // Abandoned upload sessions.
        let upload_cutoff = now.saturating_sub(upload_timeout.as_secs());
        let mut uploads = txn.open_table(UPLOADS)?;
        for entry in uploads.iter()? {
            let (k, v) = entry?;
            let started = UploadRecord::decode(v.value())?.started;
            if inner.upload_last_activity(k.value(), started) < upload_cutoff {
                doomed_uploads.push(k.value().to_owned());
            }
        }
        for id in &doomed_uploads {
            uploads.remove(id.as_str())?;
        }
        report.uploads_removed = doomed_uploads.len() as u64;
    }
    // Metadata first: once committed, nothing points at the files we delete next. A crash
    // in between leaves only unreferenced files, which the next run removes.
    txn.commit()?;
    for (d, _) in &doomed_blobs {
        inner.files.remove_blob(d)?;
    }
    for id in &doomed_uploads {
        remove_if_exists(&inner.files.upload_path(id))?;
    }
    report.stray_files_removed = remove_strays(inner, grace)?;
    Ok(report)
}

fn remove_if_exists(path: &std::path::Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn old_enough(path: &std::path::Path, grace: Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= grace)
}

/// Blob files without a record, upload files without a session, and partial downloads
/// nothing has written to, past the grace period.
fn remove_strays(inner: &Inner, grace: Duration) -> Result<u64, StorageError> {
    let txn = inner.db.begin_read()?;
    let blobs = txn.open_table(BLOBS)?;
    let uploads = txn.open_table(UPLOADS)?;
    let (files, strays) = inner.files.list_blobs()?;
    let mut removed = 0;
    for (d, path) in files {
        if blobs.get(d.as_str())?.is_none() && old_enough(&path, grace) {
            remove_if_exists(&path)?;
            removed += 1;
        }
    }
    for path in strays {
        if old_enough(&path, grace) {
            remove_if_exists(&path)?;
            removed += 1;
        }
    }
    for entry in std::fs::read_dir(inner.files.uploads_dir())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if uploads.get(name.as_str())?.is_none() && old_enough(&entry.path(), grace) {
            remove_if_exists(&entry.path())?;
            removed += 1;
        }
    }
    for entry in std::fs::read_dir(inner.files.partial_dir())? {
        let path = entry?.path();
        if old_enough(&path, grace) {
            remove_if_exists(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

pub(super) fn fsck(inner: &Inner, repair: bool) -> Result<FsckReport, StorageError> {
    let mut report = FsckReport::default();
    let txn = inner.db.begin_read()?;
    // Every blob record: file present, right size, right digest.
    let mut good_blobs = BTreeSet::new();
    let mut bad_blobs = Vec::new();
    for entry in txn.open_table(BLOBS)?.iter()? {
        let (k, v) = entry?;
        report.blobs_checked += 1;
        let key = k.value().to_owned();
        let Ok(digest) = key.parse::<Digest>() else {
            report
                .problems
                .push(format!("blob record with invalid digest {key:?}"));
            bad_blobs.push(key);
            continue;
        };
        let rec = match BlobRecord::decode(v.value()) {
            Ok(r) => r,
            Err(e) => {
                report.problems.push(format!("{digest}: {e}"));
                bad_blobs.push(key);
                continue;
            }
        };
        match hash_file(&inner.files.blob_path(&digest), digest.algorithm()) {
            Ok((actual, size)) if actual == digest && size == rec.size => {
                good_blobs.insert(key);
            }
            Ok((actual, size)) => {
                report.problems.push(format!(
                    "{digest}: file content is {actual} ({size} bytes), expected {} bytes",
                    rec.size
                ));
                bad_blobs.push(key);
            }
            Err(e) => {
                report
                    .problems
                    .push(format!("{digest}: blob file unreadable: {e}"));
                bad_blobs.push(key);
            }
        }
    }
    // Links must point at good blobs.
    let mut bad_links = Vec::new();
    for entry in txn.open_table(REPO_BLOBS)?.iter()? {
        let (k, _) = entry?;
        let (repo, digest) = k.value();
        if !good_blobs.contains(digest) {
            report.problems.push(format!(
                "{repo}: links blob {digest} which is missing or bad"
            ));
            bad_links.push((repo.to_owned(), digest.to_owned()));
        }
    }
    // Manifests: body digest, and everything a repository's manifest references.
    let manifests = txn.open_table(MANIFESTS)?;
    let mut good_manifests = BTreeSet::new();
    for entry in manifests.iter()? {
        let (k, v) = entry?;
        report.manifests_checked += 1;
        let key = k.value();
        match ManifestRecord::decode(v.value()) {
            Ok(rec) => {
                let ok = key
                    .parse::<Digest>()
                    .is_ok_and(|d| Digest::of(d.algorithm(), rec.body) == d);
                if ok {
                    good_manifests.insert(key.to_owned());
                } else {
                    report
                        .problems
                        .push(format!("manifest {key}: body does not match its digest"));
                }
            }
            Err(e) => report.problems.push(format!("manifest {key}: {e}")),
        }
    }
    let repo_blobs = txn.open_table(REPO_BLOBS)?;
    let mut repo_manifests: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in txn.open_table(REPO_MANIFESTS)?.iter()? {
        let (k, _) = entry?;
        let (repo, digest) = k.value();
        repo_manifests
            .entry(repo.to_owned())
            .or_default()
            .insert(digest.to_owned());
        if !good_manifests.contains(digest) {
            report.problems.push(format!(
                "{repo}: holds manifest {digest} which is missing or bad"
            ));
            continue;
        }
        if let Some(v) = manifests.get(digest)?
            && let Ok(rec) = ManifestRecord::decode(v.value())
            && let Some(m) = parse_body(&rec)
        {
            for d in m.required_blobs() {
                let linked = repo_blobs.get((repo, d.digest.as_str()))?.is_some();
                if !linked || !good_blobs.contains(d.digest.as_str()) {
                    report.problems.push(format!(
                        "{repo}: manifest {digest} references blob {} which the repository does not hold",
                        d.digest
                    ));
                }
            }
        }
    }
    for entry in txn.open_table(TAGS)?.iter()? {
        let (k, v) = entry?;
        let (repo, tag) = k.value();
        match TagRecord::decode(v.value()) {
            Ok(rec)
                if repo_manifests
                    .get(repo)
                    .is_some_and(|s| s.contains(rec.digest)) => {}
            Ok(rec) => report.problems.push(format!(
                "{repo}:{tag}: points to manifest {} which the repository does not hold",
                rec.digest
            )),
            Err(e) => report.problems.push(format!("{repo}:{tag}: {e}")),
        }
    }
    let (files, strays) = inner.files.list_blobs()?;
    let blobs = txn.open_table(BLOBS)?;
    for (d, _) in files {
        if blobs.get(d.as_str())?.is_none() {
            report.orphans.push(d.to_string());
        }
    }
    for p in strays {
        report
            .problems
            .push(format!("stray file in blob store: {}", p.display()));
    }
    drop((blobs, repo_blobs, manifests, txn));
    if repair && (!bad_blobs.is_empty() || !bad_links.is_empty()) {
        let _guard = inner.commit_lock.write().map_err(|_| StorageError::Task)?;
        let txn = inner.db.begin_write()?;
        {
            let mut blobs = txn.open_table(BLOBS)?;
            for key in &bad_blobs {
                blobs.remove(key.as_str())?;
                report.repaired += 1;
            }
            let mut links = txn.open_table(REPO_BLOBS)?;
            for (repo, digest) in &bad_links {
                links.remove((repo.as_str(), digest.as_str()))?;
                report.repaired += 1;
            }
        }
        txn.commit()?;
        // Corrupt files go only after no record points at them.
        for key in &bad_blobs {
            if let Ok(d) = key.parse::<Digest>() {
                inner.files.remove_blob(&d)?;
            }
        }
    }
    Ok(report)
}
