//! In-process tests of the store on temp directories: the blob writer and crash
//! safety, gc, fsck, and eviction order.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use redb::ReadableTable;

use super::schema::*;
use super::*;
use crate::oci::{Algorithm, RepoName};

const HOUR: Duration = Duration::from_secs(3600);

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path(), 1 << 20).expect("open store")
}

fn repo(name: &str) -> RepoName {
    name.parse().expect("repository name")
}

fn body(bytes: &[u8]) -> impl futures_util::Stream<Item = Result<Bytes, io::Error>> + Unpin {
    futures_util::stream::iter(vec![Ok(Bytes::copy_from_slice(bytes))])
}

/// Pushes `content` into `repo` as a hosted blob.
async fn push(store: &Store, repo: &RepoName, content: &[u8]) -> Digest {
    let digest = Digest::sha256_of(content);
    store
        .put_blob(repo, &digest, LinkOrigin::Upload, body(content))
        .await
        .expect("put blob");
    digest
}

/// Stores `content` for `repo` as if downloaded from its upstream.
async fn fetch(store: &Store, repo: &RepoName, content: &[u8]) -> Digest {
    let digest = Digest::sha256_of(content);
    let mut writer = store.blob_writer(digest.algorithm()).await.expect("writer");
    writer
        .write(vec![Bytes::copy_from_slice(content)])
        .await
        .expect("write");
    let verified = writer.verify(&digest).await.expect("verify");
    verified
        .commit(repo, LinkOrigin::Upstream)
        .await
        .expect("commit");
    digest
}

/// Moves the creation time of blob `digest` and of its links `by` into the past.
fn backdate_blob(store: &Store, digest: &Digest, by: Duration) {
    let txn = store.inner.db.begin_write().expect("txn");
    {
        let mut blobs = txn.open_table(BLOBS).expect("blobs");
        let mut rec = BlobRecord::decode(
            blobs
                .get(digest.as_str())
                .expect("get")
                .expect("record")
                .value(),
        )
        .expect("decode");
        rec.created -= by.as_secs();
        blobs
            .insert(digest.as_str(), rec.encode().as_slice())
            .expect("insert");
        let mut links = txn.open_table(REPO_BLOBS).expect("links");
        let mut old = Vec::new();
        for entry in links.iter().expect("iter") {
            let (k, v) = entry.expect("entry");
            let (r, d) = k.value();
            if d == digest.as_str() {
                old.push((r.to_owned(), LinkRecord::decode(v.value()).expect("link")));
            }
        }
        for (r, mut link) in old {
            link.linked_at -= by.as_secs();
            links
                .insert((r.as_str(), digest.as_str()), link.encode().as_slice())
                .expect("insert");
        }
    }
    txn.commit().expect("commit");
}

/// Moves the start of upload `id` `by` into the past, and its last write too unless
/// `touched` (a session written to just now).
fn backdate_upload(store: &Store, id: &str, by: Duration, touched: bool) {
    let txn = store.inner.db.begin_write().expect("txn");
    {
        let mut uploads = txn.open_table(UPLOADS).expect("uploads");
        let (started, owner, r) = {
            let v = uploads.get(id).expect("get").expect("record");
            let rec = UploadRecord::decode(v.value()).expect("decode");
            (rec.started, rec.owner.to_owned(), rec.repo.to_owned())
        };
        let rec = UploadRecord::encode(started - by.as_secs(), &owner, &r);
        uploads.insert(id, rec.as_slice()).expect("insert");
    }
    txn.commit().expect("commit");
    if !touched {
        let file = std::fs::File::options()
            .write(true)
            .open(store.inner.files.upload_path(id))
            .expect("upload file");
        file.set_modified(std::time::SystemTime::now() - by)
            .expect("set mtime");
    }
}

const CI: &str = "key:ci";

fn session<'a>(r: &'a RepoName, id: &'a str) -> Session<'a> {
    Session {
        repo: r,
        id,
        owner: CI,
    }
}

fn from(start: u64) -> Option<ChunkRange> {
    Some(ChunkRange { start, len: None })
}

fn tmp_files(dir: &tempfile::TempDir) -> usize {
    std::fs::read_dir(dir.path().join("tmp"))
        .expect("tmp dir")
        .count()
}

// ---- the blob writer ----

#[tokio::test]
async fn a_digest_mismatch_stores_nothing_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("team/app");
    let claimed = Digest::sha256_of(b"what was promised");
    let err = store
        .put_blob(&r, &claimed, LinkOrigin::Upload, body(b"what came"))
        .await
        .expect_err("mismatch");
    assert!(matches!(err, UploadError::DigestMismatch));
    assert!(store.open_blob(&r, &claimed).await.expect("open").is_none());
    assert_eq!(tmp_files(&dir), 0);
}

#[tokio::test]
async fn an_abandoned_writer_removes_its_temp_file() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let mut writer = store.blob_writer(Algorithm::Sha256).await.expect("writer");
    writer
        .write(vec![Bytes::from_static(b"partial")])
        .await
        .expect("write");
    assert_eq!(tmp_files(&dir), 1);
    drop(writer);
    assert_eq!(tmp_files(&dir), 0);
}

#[tokio::test]
async fn a_growing_blob_reads_the_part_file_then_the_committed_blob() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let content = b"layer bytes".to_vec();
    let digest = Digest::sha256_of(&content);
    let mut writer = store.blob_writer(digest.algorithm()).await.expect("writer");
    let mut growing = writer.growing(&digest);
    assert_eq!(growing.written(), 0);
    writer
        .write(vec![Bytes::from(content.clone())])
        .await
        .expect("write");
    assert!(growing.changed().await);
    assert_eq!(growing.written(), content.len() as u64);
    let verified = writer.verify(&digest).await.expect("verify");
    assert!(!growing.changed().await, "the writer has stopped");
    verified
        .commit(&repo("docker.io/library/app"), LinkOrigin::Upstream)
        .await
        .expect("commit");
    // The part file is gone: the handle opens the committed blob.
    let read = std::fs::read(
        dir.path()
            .join("blobs/sha256")
            .join(&digest.hex()[..2])
            .join(digest.hex()),
    )
    .expect("committed file");
    assert_eq!(read, content);
    let mut file = growing.open().await.expect("open");
    let mut back = Vec::new();
    io::Read::read_to_end(&mut file, &mut back).expect("read");
    assert_eq!(back, content);
}

/// An upload continued after a restart (its running hash lost) is re-hashed from what
/// the file holds and completes.
#[tokio::test]
async fn an_upload_resumes_after_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let r = repo("team/app");
    let content = b"first half, second half".to_vec();
    let digest = Digest::sha256_of(&content);
    let id = {
        let store = open(&dir);
        let id = store.start_upload(&r, CI, 8).await.expect("start");
        let offset = store
            .append_upload(&session(&r, &id), from(0), body(&content[..11]))
            .await
            .expect("append");
        assert_eq!(offset, 11);
        id
    };
    let store = open(&dir);
    assert_eq!(
        store.upload_offset(&r, &id, CI).await.expect("offset"),
        Some(11)
    );
    let size = store
        .finish_upload(&session(&r, &id), from(11), &digest, body(&content[11..]))
        .await
        .expect("finish");
    assert_eq!(size, content.len() as u64);
    let handle = store
        .open_blob(&r, &digest)
        .await
        .expect("open")
        .expect("stored");
    assert_eq!(handle.size, content.len() as u64);
    assert_eq!(
        store.upload_offset(&r, &id, CI).await.expect("offset"),
        None
    );
}

/// A crash after the bytes were written but before the commit (the rename, or the
/// metadata after it) leaves nothing visible, and start-up sweeps the temp file.
#[tokio::test]
async fn a_crash_before_commit_leaves_no_visible_blob() {
    let dir = tempfile::tempdir().expect("dir");
    let r = repo("team/app");
    let content = b"whole and verified, never committed";
    let digest = Digest::sha256_of(content);
    let renamed = Digest::sha256_of(b"renamed, never linked");
    {
        let store = open(&dir);
        // Before the rename: a complete temp file.
        std::fs::write(store.inner.files.temp_path(), content).expect("temp file");
        // After the rename, before redb: a blob file no record names.
        let temp = store.inner.files.temp_path();
        std::fs::write(&temp, b"renamed, never linked").expect("temp file");
        store.inner.files.commit(&temp, &renamed).expect("rename");
    }
    assert_eq!(tmp_files(&dir), 1);
    let store = open(&dir);
    assert_eq!(tmp_files(&dir), 0, "start-up sweeps temp files");
    for d in [&digest, &renamed] {
        assert!(store.open_blob(&r, d).await.expect("open").is_none());
        assert_eq!(store.stored_blob_size(d).await.expect("size"), None);
    }
    let report = store.fsck(false).expect("fsck");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.orphans, vec![renamed.to_string()]);
    let gc = store.gc(Duration::ZERO, HOUR).expect("gc");
    assert_eq!(gc.stray_files_removed, 1);
    assert!(store.fsck(false).expect("fsck").orphans.is_empty());
}

// ---- gc ----

#[tokio::test]
async fn gc_removes_an_unreferenced_blob_and_keeps_one_within_grace() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("team/app");
    let old = push(&store, &r, b"pushed long ago, never referenced").await;
    let young = push(&store, &r, b"pushed just now for a manifest to come").await;
    backdate_blob(&store, &old, 2 * HOUR);
    let report = store.gc(HOUR, 24 * HOUR).expect("gc");
    assert_eq!(report.blobs_removed, 1);
    assert_eq!(report.links_removed, 1);
    assert!(store.open_blob(&r, &old).await.expect("open").is_none());
    assert_eq!(store.stored_blob_size(&old).await.expect("size"), None);
    assert!(store.open_blob(&r, &young).await.expect("open").is_some());
    let fsck = store.fsck(false).expect("fsck");
    assert!(
        fsck.problems.is_empty() && fsck.orphans.is_empty(),
        "{fsck:?}"
    );
}

#[tokio::test]
async fn gc_collects_abandoned_uploads_past_the_upload_timeout() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("team/app");
    let abandoned = store.start_upload(&r, CI, 8).await.expect("start");
    store
        .append_upload(&session(&r, &abandoned), None, body(b"half a layer"))
        .await
        .expect("append");
    let active = store.start_upload(&r, CI, 8).await.expect("start");
    backdate_upload(&store, &abandoned, 2 * HOUR, false);
    let report = store.gc(HOUR, HOUR).expect("gc");
    assert_eq!(report.uploads_removed, 1);
    assert_eq!(
        store
            .upload_offset(&r, &abandoned, CI)
            .await
            .expect("offset"),
        None
    );
    assert!(!dir.path().join("uploads").join(&abandoned).exists());
    assert_eq!(
        store.upload_offset(&r, &active, CI).await.expect("offset"),
        Some(0)
    );
}

/// Regression: `upload_timeout` was measured from the session's start, so gc removed a
/// session PATCHed seconds earlier. Idle time runs from the last write; the daemon's
/// reaper and gc agree.
#[tokio::test]
async fn an_upload_written_to_recently_is_not_abandoned() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("team/app");
    let busy = store.start_upload(&r, CI, 8).await.expect("start");
    let idle = store.start_upload(&r, CI, 8).await.expect("start");
    backdate_upload(&store, &busy, 2 * HOUR, true);
    backdate_upload(&store, &idle, 2 * HOUR, false);
    assert_eq!(store.reap_uploads(HOUR).await.expect("reap"), 1);
    assert_eq!(store.gc(HOUR, HOUR).expect("gc").uploads_removed, 0);
    assert_eq!(
        store.upload_offset(&r, &busy, CI).await.expect("offset"),
        Some(0)
    );
    assert_eq!(
        store.upload_offset(&r, &idle, CI).await.expect("offset"),
        None
    );
}

/// A session answers only to the principal that opened it; to anyone else it does not
/// exist (so nothing can be appended to, finished or cancelled by them).
#[tokio::test]
async fn upload_sessions_are_private_to_their_owner() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("team/app");
    let id = store.start_upload(&r, CI, 8).await.expect("start");
    let other = Session {
        repo: &r,
        id: &id,
        owner: "key:other",
    };
    assert_eq!(
        store
            .upload_offset(&r, &id, "key:other")
            .await
            .expect("offset"),
        None
    );
    assert!(matches!(
        store.append_upload(&other, None, body(b"x")).await,
        Err(UploadError::Unknown)
    ));
    assert!(!store.cancel_upload(&other).await.expect("cancel"));
    assert_eq!(
        store.upload_offset(&r, &id, CI).await.expect("offset"),
        Some(0)
    );
}

/// Regression: sessions were unbounded (10,000 opened in 5 s from one key). One
/// principal holds at most `limit`; a finished or cancelled one frees its slot.
#[tokio::test]
async fn a_principal_may_hold_only_so_many_open_sessions() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("team/app");
    let first = store.start_upload(&r, CI, 2).await.expect("start");
    store.start_upload(&r, CI, 2).await.expect("start");
    assert!(matches!(
        store.start_upload(&r, CI, 2).await,
        Err(UploadError::TooMany { limit: 2 })
    ));
    store
        .start_upload(&r, "key:other", 2)
        .await
        .expect("another key's own");
    assert!(
        store
            .cancel_upload(&session(&r, &first))
            .await
            .expect("cancel")
    );
    store
        .start_upload(&r, CI, 2)
        .await
        .expect("a slot was freed");
}

/// Regression: a chunked PATCH with `Content-Range: 10-19` and a 1000-byte body was
/// accepted. A chunk must be exactly as long as its range; otherwise nothing is appended.
#[tokio::test]
async fn a_chunk_longer_or_shorter_than_its_range_appends_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("team/app");
    let id = store.start_upload(&r, CI, 8).await.expect("start");
    let s = session(&r, &id);
    let range = |start, len| {
        Some(ChunkRange {
            start,
            len: Some(len),
        })
    };
    assert_eq!(
        store
            .append_upload(&s, range(0, 10), body(&[1; 10]))
            .await
            .expect("exact"),
        10
    );
    for (len, sent) in [(10, 1000), (10, 5)] {
        let got = store
            .append_upload(&s, range(10, len), body(&vec![2; sent]))
            .await;
        assert!(
            matches!(got, Err(UploadError::RangeMismatch { expected: 10, .. })),
            "{sent} bytes for a 10-byte range: {got:?}"
        );
        assert_eq!(
            store.upload_offset(&r, &id, CI).await.expect("offset"),
            Some(10)
        );
    }
}

// ---- fsck ----

#[tokio::test]
async fn fsck_finds_a_corrupted_blob_and_repair_removes_it() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("team/app");
    let digest = push(&store, &r, b"the original bytes").await;
    let good = push(&store, &r, b"an untouched blob").await;
    std::fs::write(store.inner.files.blob_path(&digest), b"bit rot").expect("corrupt");
    let report = store.fsck(false).expect("fsck");
    assert_eq!(report.blobs_checked, 2);
    assert!(
        report.problems.iter().any(|p| p.contains(digest.as_str())),
        "{:?}",
        report.problems
    );
    assert_eq!(report.repaired, 0);
    let repaired = store.fsck(true).expect("fsck --repair");
    assert_eq!(repaired.repaired, 2, "the blob record and its link");
    assert!(store.open_blob(&r, &digest).await.expect("open").is_none());
    assert!(!store.inner.files.blob_path(&digest).exists());
    assert!(store.open_blob(&r, &good).await.expect("open").is_some());
    let after = store.fsck(false).expect("fsck");
    assert!(after.problems.is_empty(), "{:?}", after.problems);
}

#[tokio::test]
async fn fsck_finds_metadata_naming_a_missing_blob_and_repair_drops_it() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("team/app");
    let digest = push(&store, &r, b"a file that will vanish").await;
    std::fs::remove_file(store.inner.files.blob_path(&digest)).expect("remove");
    let report = store.fsck(false).expect("fsck");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(digest.as_str()) && p.contains("unreadable")),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.starts_with("team/app: links blob")),
        "{:?}",
        report.problems
    );
    store.fsck(true).expect("fsck --repair");
    assert_eq!(store.stored_blob_size(&digest).await.expect("size"), None);
    assert!(store.open_blob(&r, &digest).await.expect("open").is_none());
    let after = store.fsck(false).expect("fsck");
    assert!(after.problems.is_empty(), "{:?}", after.problems);
}

// ---- eviction ----

/// Eviction goes by last use, not by age: the older blob, used since, stays.
#[tokio::test]
async fn eviction_removes_the_least_recently_used_blob_first() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("docker.io/library/app");
    let a = fetch(&store, &r, &[b'a'; 1000]).await;
    // A is also much older, so evicting the oldest first would take it.
    backdate_blob(&store, &a, HOUR);
    // Access times have millisecond resolution.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = fetch(&store, &r, &[b'b'; 1000]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(store.open_blob(&r, &a).await.expect("open").is_some());
    let report = store.evict(1000).await.expect("evict");
    assert_eq!(report.stored_bytes, 2000);
    assert_eq!(report.evicted_blobs, 1);
    assert!(
        store.open_blob(&r, &a).await.expect("open").is_some(),
        "A was used last"
    );
    assert!(
        store.open_blob(&r, &b).await.expect("open").is_none(),
        "B goes"
    );
    assert!(!store.inner.files.blob_path(&b).exists());
}

#[tokio::test]
async fn eviction_never_removes_hosted_blobs() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let hosted_repo = repo("team/app");
    let upstream_repo = repo("docker.io/library/app");
    let hosted = push(&store, &hosted_repo, &[b'h'; 1000]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let fetched = fetch(&store, &upstream_repo, &[b'u'; 1000]).await;
    // Also pinned: an upstream blob that was pushed into a hosted repository too.
    let shared = fetch(&store, &upstream_repo, &[b's'; 1000]).await;
    assert!(
        store
            .mount_blob(&upstream_repo, &hosted_repo, &shared)
            .await
            .expect("mount")
    );
    let report = store.evict(0).await.expect("evict");
    assert_eq!(report.evicted_blobs, 1);
    assert!(
        store
            .open_blob(&hosted_repo, &hosted)
            .await
            .expect("open")
            .is_some()
    );
    assert!(
        store
            .open_blob(&upstream_repo, &fetched)
            .await
            .expect("open")
            .is_none()
    );
    assert!(
        store
            .open_blob(&upstream_repo, &shared)
            .await
            .expect("open")
            .is_some()
    );
}

/// Mirrored content is pinned: a blob pulled through first and then pinned by a mirror
/// job, and one a mirror fetched, survive eviction to a zero budget; the pull-through
/// blob beside them goes. The run record survives a restart.
#[tokio::test]
async fn eviction_never_removes_mirrored_blobs_and_mirror_runs_are_durable() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let mirrored = repo("central.corp/team/app");
    let other = repo("docker.io/library/app");
    let pulled_then_pinned = fetch(&store, &mirrored, &[b'p'; 1000]).await;
    assert!(
        store
            .pin_blob(&mirrored, &pulled_then_pinned)
            .await
            .expect("pin")
    );
    let digest = Digest::sha256_of(&[b'm'; 1000]);
    let mut writer = store.blob_writer(digest.algorithm()).await.expect("writer");
    writer
        .write(vec![Bytes::from_static(&[b'm'; 1000])])
        .await
        .expect("write");
    let verified = writer.verify(&digest).await.expect("verify");
    verified
        .commit(&mirrored, LinkOrigin::Mirror)
        .await
        .expect("commit");
    let cached = fetch(&store, &other, &[b'c'; 1000]).await;
    assert!(
        !store
            .pin_blob(&mirrored, &Digest::sha256_of(b"never stored"))
            .await
            .expect("pin")
    );

    let report = store.evict(0).await.expect("evict");
    assert_eq!(report.evicted_blobs, 1);
    for d in [&pulled_then_pinned, &digest] {
        assert!(store.open_blob(&mirrored, d).await.expect("open").is_some());
    }
    assert!(
        store
            .open_blob(&other, &cached)
            .await
            .expect("open")
            .is_none()
    );

    let record = MirrorRunRecord {
        started: 10,
        ended: 20,
        ok: true,
        tags_added: 3,
        last_success: Some(20),
        ..MirrorRunRecord::default()
    };
    store
        .record_mirror_run("apps", &record)
        .await
        .expect("record");
    drop(store);
    let store = open(&dir);
    assert_eq!(
        store.mirror_runs().expect("runs"),
        vec![("apps".to_owned(), record)]
    );
}

/// An image manifest of `blobs` (the first is its config), stored for `repo`.
fn image_manifest(repo: &RepoName, blobs: &[&Digest], sizes: u64) -> FetchedManifest {
    let layers: Vec<serde_json::Value> = blobs[1..]
        .iter()
        .map(|d| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": sizes}))
        .collect();
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blobs[0].to_string(), "size": sizes},
        "layers": layers,
    })
    .to_string();
    let manifest = crate::oci::manifest::Manifest::parse(body.as_bytes(), None).expect("manifest");
    FetchedManifest {
        repo: repo.clone(),
        digest: Digest::sha256_of(body.as_bytes()),
        body: Bytes::from(body),
        manifest,
        tag: None,
    }
}

/// Mirrors `tag` of `repo` for job `job` to an image of the given blobs (stored, pinned).
async fn mirror_tag(store: &Store, job: &str, repo: &RepoName, tag: &str, blobs: &[&Digest]) {
    for d in blobs {
        assert!(store.pin_blob(repo, d).await.expect("pin"));
    }
    let mut put = image_manifest(repo, blobs, 1000);
    let record = MirroredTag {
        digest: put.digest.to_string(),
        manifests: vec![put.digest.to_string()],
        tags: vec![],
    };
    put.tag = Some((tag.parse().expect("tag"), AcceptClass::Any));
    store
        .flip_mirrored_tag(job, put, Vec::new(), record)
        .await
        .expect("flip");
}

/// Regression: a pull-through confirmation of a blob a mirror job had pinned rewrote its
/// link as a pull-through one, and eviction could then take mirrored content.
#[tokio::test]
async fn a_pull_through_confirmation_never_unpins_mirrored_content() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let mirrored = repo("central.corp/team/app");
    let blob = fetch(&store, &mirrored, &[b'x'; 1000]).await;
    assert!(store.pin_blob(&mirrored, &blob).await.expect("pin"));
    assert!(store.link_confirmed(&mirrored, &blob).await.expect("link"));
    assert_eq!(store.evict(0).await.expect("evict").evicted_blobs, 0);
    assert!(
        store
            .open_blob(&mirrored, &blob)
            .await
            .expect("open")
            .is_some()
    );
}

/// Tags that leave a job's selection keep being served but lose their pins (their blobs
/// become evictable, the kept tag's do not); with `prune` they are no longer served.
#[tokio::test]
async fn tags_that_leave_the_selection_are_unpinned_and_removed_only_with_prune() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("central.corp/team/app");
    let shared = fetch(&store, &r, &[b's'; 1000]).await;
    let old = fetch(&store, &r, &[b'o'; 1000]).await;
    let new = fetch(&store, &r, &[b'n'; 1000]).await;
    mirror_tag(&store, "apps", &r, "v1", &[&shared, &old]).await;
    mirror_tag(&store, "apps", &r, "v2", &[&shared, &new]).await;
    let tag = |t: &str| crate::oci::Reference::Tag(t.parse().expect("tag"));

    let released = store
        .release_mirrored_tags("apps", &r, vec!["v2".into()], false)
        .await
        .expect("release");
    assert_eq!(released.tags, vec!["v1"]);
    assert!(released.pruned.is_empty());
    assert_eq!(released.unpinned, 1, "only v1's own blob loses its pin");
    assert!(
        store
            .get_manifest(&r, &tag("v1"))
            .await
            .expect("get")
            .is_some()
    );
    let evicted = store.evict(0).await.expect("evict");
    assert_eq!(evicted.evicted_blobs, 1);
    assert!(store.open_blob(&r, &old).await.expect("open").is_none());
    for d in [&shared, &new] {
        assert!(store.open_blob(&r, d).await.expect("open").is_some());
    }

    let released = store
        .release_mirrored_tags("apps", &r, Vec::new(), true)
        .await
        .expect("prune");
    assert_eq!(
        (released.tags.clone(), released.pruned),
        (vec!["v2".to_owned()], vec!["v2".to_owned()])
    );
    assert!(
        store
            .get_manifest(&r, &tag("v2"))
            .await
            .expect("get")
            .is_none()
    );
    assert_eq!(store.evict(0).await.expect("evict").evicted_blobs, 2);
    assert!(store.mirror_holders().await.expect("holders").is_empty());
}

/// A resumable download that was cut off keeps its bytes across a restart, resumes from
/// them (the digest is checked over the whole file), and gc removes an abandoned one only
/// after its grace period.
#[tokio::test]
async fn a_cut_off_download_resumes_after_a_restart_and_gc_removes_abandoned_ones() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir);
    let r = repo("central.corp/team/app");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let digest = Digest::sha256_of(&content);
    let mut writer = store.resumable_writer(&digest, 0).await.expect("writer");
    let cut = futures_util::stream::iter(vec![
        Ok(Bytes::copy_from_slice(&content[..100_000])),
        Err(io::Error::other("connection reset")),
    ]);
    assert!(matches!(
        writer.write_stream(cut, None).await,
        Err(StreamError::Body(_))
    ));
    assert_eq!(writer.keep_partial().await.expect("keep"), 100_000);
    drop(store);

    let store = open(&dir);
    assert_eq!(store.partial_len(&digest).await.expect("len"), 100_000);
    let mut writer = store
        .resumable_writer(&digest, 100_000)
        .await
        .expect("resume");
    writer
        .write_stream(body(&content[100_000..]), None)
        .await
        .map_err(|_| "write")
        .expect("rest");
    let verified = writer
        .verify(&digest)
        .await
        .expect("the whole file verifies");
    assert_eq!(verified.size(), 300_000);
    verified
        .commit(&r, LinkOrigin::Mirror)
        .await
        .expect("commit");
    assert_eq!(store.partial_len(&digest).await.expect("len"), 0);

    // A prefix that is not the blob's is removed when it fails to verify.
    let other = Digest::sha256_of(b"another blob");
    let mut writer = store.resumable_writer(&other, 0).await.expect("writer");
    writer
        .write(vec![Bytes::from_static(b"garbage")])
        .await
        .expect("write");
    assert!(matches!(
        writer.verify(&other).await,
        Err(WriteError::DigestMismatch { .. })
    ));
    assert_eq!(store.partial_len(&other).await.expect("len"), 0);

    // An abandoned partial file: kept within the grace period, then removed.
    let third = Digest::sha256_of(b"third");
    let mut writer = store.resumable_writer(&third, 0).await.expect("writer");
    writer
        .write(vec![Bytes::from_static(b"thi")])
        .await
        .expect("write");
    writer.keep_partial().await.expect("keep");
    store.gc(HOUR, HOUR).expect("gc");
    assert_eq!(store.partial_len(&third).await.expect("len"), 3);
    store.gc(Duration::ZERO, HOUR).expect("gc");
    assert_eq!(store.partial_len(&third).await.expect("len"), 0);
}
