//! Blob downloads in flight: one upstream fetch per digest, whichever repositories ask
//! for it, written through the store's blob writer and read by every client that asked
//! for it as the bytes arrive.
//!
//! Coalescing is by content, visibility is not: a client of another repository than the
//! leader's joins only after the upstream confirmed (HEAD through that repository) that
//! the repository has the blob, and that repository is linked when the blob commits.
//!
//! The download is a detached task (the *leader*); each client is a *follower* sent
//! ranges of the growing file up to the length the store's writer has published. On success the
//! file is verified and then committed (followers with the file open keep reading it
//! after the rename); on failure followers get an error where the bytes stop. The last
//! byte is only released once the whole blob is verified, so no client ever receives a
//! complete body that failed verification.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use futures_util::Stream;
use tokio::sync::watch;

use super::CacheError;
use crate::oci::{Digest, RepoName};
use crate::storage::{FileRange, GrowingBlob, LinkOrigin, Store, StreamError, WriteError};
use crate::upstream::Upstream;

/// How a download stands.
#[derive(Clone, Debug)]
enum Progress {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes are arriving; the flight's [`GrowingBlob`] says how many are on disk.
    Receiving {
        size: Option<u64>,
    },
    /// Verified: every byte may be served. The commit may still be running.
    Complete {
        size: u64,
    },
    Failed(CacheError),
}

struct Flight {
    progress: watch::Receiver<Progress>,
    /// The bytes on disk, set by the leader before it publishes `Receiving`.
    blob: OnceLock<GrowingBlob>,
    /// The repository the leader downloads for; it is linked by the commit itself.
    origin: RepoName,
    links: Mutex<Links>,
}

/// Other repositories the upstream confirmed while the blob was in flight.
#[derive(Default)]
struct Links {
    waiting: Vec<RepoName>,
    /// Set (with `waiting` taken) by the leader once the blob is committed: from then
    /// on a joining repository links itself.
    committed: bool,
}

impl Flight {
    fn serves(&self, repo: &RepoName) -> bool {
        *repo == self.origin || lock(&self.links).waiting.contains(repo)
    }

    /// Asks for `repo` to be linked when the blob commits. Returns false if it already
    /// has, in which case the caller links it.
    fn link_later(&self, repo: &RepoName) -> bool {
        let mut links = lock(&self.links);
        if links.committed {
            return false;
        }
        // Two clients of one repository may both have been confirmed.
        if !links.waiting.contains(repo) {
            links.waiting.push(repo.clone());
        }
        true
    }

    /// Marks the blob committed and returns the repositories waiting to be linked.
    fn committed(&self) -> Vec<RepoName> {
        let mut links = lock(&self.links);
        links.committed = true;
        std::mem::take(&mut links.waiting)
    }
}

/// No code panics while holding these locks; were one poisoned anyway, refusing every
/// later download until restart would be worse than using it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a flight is keyed by: the blob's digest.
type FlightKey = String;

/// Downloads in flight, by digest.
#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<FlightKey, Arc<Flight>>>,
    /// The leaders' downloads: a clean stop waits for them, so a blob whose last byte a
    /// client already received is committed, not lost (see [`Flights::close`]).
    tasks: tokio_util::task::TaskTracker,
}

/// What a leader needs to run a download.
pub struct Fetch {
    pub store: Store,
    pub upstream: Upstream,
    /// Name at the upstream, and the local name the blob is linked into.
    pub remote: RepoName,
    pub canonical: RepoName,
    pub digest: Digest,
    /// Woken after a commit, so eviction can keep the size budget.
    pub committed: Arc<tokio::sync::Notify>,
}

/// A client's view of a download, once the upstream has answered.
pub struct Follower {
    flight: Arc<Flight>,
    /// The blob's size, when the upstream said.
    pub size: Option<u64>,
    /// Whether this client joined a download another client started.
    pub joined: bool,
}

/// The leader's hold on its flight, released when dropped: after the download ended,
/// and equally when it panicked or its task was cancelled. Either way the key leaves the
/// map, so the next caller starts afresh, and followers get an error rather than
/// waiting for bytes that will never come.
struct Leader {
    flights: Arc<Flights>,
    key: FlightKey,
    flight: Arc<Flight>,
    tx: watch::Sender<Progress>,
    /// Why the download failed; none after success, or when it never returned.
    failure: Option<CacheError>,
}

impl Leader {
    /// Records why the download failed, for followers to get when the leader drops.
    fn fail(&mut self, e: CacheError) {
        self.failure = Some(e);
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Leave the map first: a caller arriving now starts a new download rather than
        // joining this one as it fails.
        let mut running = self.flights.lock();
        if running
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            running.remove(&self.key);
        }
        drop(running);
        let failure = self.failure.take().unwrap_or(CacheError::Abandoned);
        // Once verified, followers keep the verdict: the bytes they read are right even
        // if storing them failed.
        self.tx.send_if_modified(|p| {
            let settled = matches!(p, Progress::Complete { .. } | Progress::Failed(_));
            if !settled {
                *p = Progress::Failed(failure);
            }
            !settled
        });
    }
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FlightKey, Arc<Flight>>> {
        lock(&self.running)
    }

    /// Waits for the downloads running now to finish (commit or fail). Call once no more
    /// requests come: on a clean stop.
    pub async fn close(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Joins the download of `fetch.digest`, starting it if none is running, and waits
    /// until the upstream has answered. Joining a download for another repository first
    /// asks the upstream to confirm this repository has the blob.
    pub async fn follow(self: &Arc<Self>, fetch: Fetch) -> Result<Follower, CacheError> {
        let key = fetch.digest.to_string();
        // A joiner keeps its fetch (for the confirmation); a leader's moves to its task.
        let (flight, joiner) = {
            let mut running = self.lock();
            match running.get(&key) {
                Some(f) => (f.clone(), Some(fetch)),
                None => {
                    let (tx, rx) = watch::channel(Progress::Connecting);
                    let flight = Arc::new(Flight {
                        progress: rx,
                        blob: OnceLock::new(),
                        origin: fetch.canonical.clone(),
                        links: Mutex::default(),
                    });
                    running.insert(key.clone(), flight.clone());
                    let mut leader = Leader {
                        flights: Arc::clone(self),
                        key,
                        flight: flight.clone(),
                        tx,
                        failure: None,
                    };
                    self.tasks.spawn(async move {
                        if let Err(e) = download(&fetch, &leader.flight, &leader.tx).await {
                            tracing::warn!(
                                upstream = fetch.upstream.name(),
                                repo = %fetch.remote,
                                digest = %fetch.digest,
                                error = %e,
                                "blob download failed"
                            );
                            leader.fail(e);
                        }
                        // Dropping the leader ends the flight, as it would on a panic.
                    });
                    (flight, None)
                }
            }
        };
        let joined = joiner.is_some();
        if let Some(fetch) = joiner.filter(|f| !flight.serves(&f.canonical)) {
            // Bytes coming for another repository are not this one's to serve until
            // the upstream says this repository has them.
            fetch
                .upstream
                .head_blob(&fetch.remote, &fetch.digest)
                .await?;
            if !flight.link_later(&fetch.canonical) {
                fetch
                    .store
                    .link_confirmed(&fetch.canonical, &fetch.digest)
                    .await?;
            }
        }
        let mut rx = flight.progress.clone();
        let size = {
            let p = rx
                .wait_for(|p| !matches!(p, Progress::Connecting))
                .await
                .map_err(|_| CacheError::Abandoned)?;
            match &*p {
                Progress::Receiving { size, .. } => *size,
                Progress::Complete { size } => Some(*size),
                Progress::Failed(e) => return Err(e.clone()),
                Progress::Connecting => None,
            }
        };
        Ok(Follower {
            flight,
            size,
            joined,
        })
    }
}

impl Flights {
    /// Waits until downloads of `digest` for any repository that are verified but still
    /// committing have finished, so that a client who has the whole blob and asks again,
    /// through whatever repository, finds it stored.
    pub async fn settle(&self, digest: &Digest) {
        let committing = self
            .lock()
            .get(digest.as_str())
            .filter(|f| matches!(*f.progress.borrow(), Progress::Complete { .. }))
            .map(|f| f.progress.clone());
        if let Some(mut rx) = committing {
            // The leader drops its sender when the commit is over; nothing else ends this.
            let _ = rx.wait_for(|_| false).await;
        }
    }
}

/// The leader: fetches, writes, verifies, commits. Returns the size.
///
/// The store's blob writer does the work: the network side gathers what has already
/// arrived into batches, one blocking thread appends them to the part file and publishes
/// the length for followers, another hashes them. Followers get the last byte as soon
/// as the digest checks out: the commit (fsync, rename, redb) happens after that and is
/// not on any client's path.
async fn download(
    fetch: &Fetch,
    flight: &Flight,
    tx: &watch::Sender<Progress>,
) -> Result<u64, CacheError> {
    let resp = fetch.upstream.blob(&fetch.remote, &fetch.digest, 0).await?;
    // Dropped on any failure below, the writer removes its part file.
    let mut writer = fetch.store.blob_writer(fetch.digest.algorithm()).await?;
    let size = resp.size;
    // Set once, by this leader, before anyone is told there are bytes to read.
    let _ = flight.blob.set(writer.growing(&fetch.digest));
    tx.send_replace(Progress::Receiving { size });
    let written = match writer.write_stream(resp.body, size).await {
        Ok(n) => n,
        Err(StreamError::Body(e)) => return Err(e.into()),
        Err(StreamError::TooLong) => {
            return Err(CacheError::Invalid(
                "upstream sent more bytes than it announced".into(),
            ));
        }
        Err(StreamError::Write(e)) => return Err(write_error(e)),
    };
    if size.is_some_and(|s| s != written) {
        return Err(CacheError::Invalid(format!(
            "upstream sent {written} bytes of an announced {}",
            size.unwrap_or_default()
        )));
    }
    let verified = writer.verify(&fetch.digest).await.map_err(write_error)?;
    let size = verified.size();
    // Verified: followers may have the last byte while the commit runs.
    tx.send_replace(Progress::Complete { size });
    verified
        .commit(&fetch.canonical, LinkOrigin::Upstream)
        .await?;
    for repo in flight.committed() {
        fetch.store.link_confirmed(&repo, &fetch.digest).await?;
    }
    fetch.committed.notify_one();
    Ok(size)
}

fn write_error(e: WriteError) -> CacheError {
    match e {
        WriteError::DigestMismatch { expected, actual } => CacheError::Invalid(format!(
            "upstream sent content with digest {actual} for {expected}"
        )),
        WriteError::Storage(e) => e.into(),
    }
}

impl Follower {
    /// The file ranges holding bytes `start..start + len` (or to the end), each yielded
    /// as soon as the download has written it.
    pub fn ranges(
        self,
        start: u64,
        len: Option<u64>,
    ) -> impl Stream<Item = io::Result<FileRange>> + Send + 'static {
        let end = len.map(|l| start + l);
        let state = ReadState {
            flight: self.flight.clone(),
            rx: self.flight.progress.clone(),
            blob: None,
            growing: true,
            file: None,
            pos: start,
            end,
        };
        futures_util::stream::unfold(Some(state), |state| async move {
            let mut state = state?;
            match state.next_range().await {
                Ok(Some(range)) => Some((Ok(range), Some(state))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}

struct ReadState {
    flight: Arc<Flight>,
    rx: watch::Receiver<Progress>,
    /// This reader's handle on the bytes on disk, once the leader has one.
    blob: Option<GrowingBlob>,
    /// Whether the writer may still publish more bytes.
    growing: bool,
    file: Option<Arc<std::fs::File>>,
    pos: u64,
    end: Option<u64>,
}

impl ReadState {
    async fn next_range(&mut self) -> io::Result<Option<FileRange>> {
        loop {
            let progress = self.rx.borrow_and_update().clone();
            if self.blob.is_none() {
                self.blob = self.flight.blob.get().cloned();
            }
            let (available, done) = match &progress {
                Progress::Connecting => (0, false),
                Progress::Receiving { .. } => {
                    (self.blob.as_mut().map_or(0, |b| b.written()), false)
                }
                Progress::Complete { size } => (*size, true),
                Progress::Failed(e) => {
                    return Err(io::Error::other(format!("upstream download failed: {e}")));
                }
            };
            // The last byte is held back until the digest is verified, so a client
            // never holds a whole body that turns out wrong.
            let available = if done {
                available
            } else {
                available.saturating_sub(1)
            };
            let limit = self.end.map_or(available, |e| e.min(available));
            if self.pos < limit {
                let file = self.open().await?;
                let range = FileRange {
                    file,
                    offset: self.pos,
                    len: limit - self.pos,
                };
                self.pos = limit;
                return Ok(Some(range));
            }
            if done || self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            let more = async {
                match self.blob.as_mut() {
                    Some(blob) if self.growing => blob.changed().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.rx.changed() => if changed.is_err() {
                    // The leader is gone; its last word decides.
                    if let Progress::Complete { .. } = &*self.rx.borrow() {
                        continue;
                    }
                    return Err(io::Error::other("upstream download was abandoned"));
                },
                more = more => if !more {
                    // Every byte is written; only the leader's verdict is still to come.
                    self.growing = false;
                },
            }
        }
    }

    /// The download's file, opened on first use: the part file, or the committed blob
    /// once it has been renamed (the same bytes under their final name).
    async fn open(&mut self) -> io::Result<Arc<std::fs::File>> {
        if let Some(file) = &self.file {
            return Ok(Arc::clone(file));
        }
        let blob = self
            .blob
            .as_ref()
            .ok_or_else(|| io::Error::other("download has no file yet"))?;
        let file = Arc::new(blob.open().await?);
        self.file = Some(Arc::clone(&file));
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;
    use crate::config::UpstreamConfig;
    use crate::upstream::testserver::{TestServer, respond, stall_after};

    fn upstream(url: &str) -> Upstream {
        Upstream::new(&UpstreamConfig {
            name: "test.io".into(),
            url: url.into(),
            aliases: Vec::new(),
            tag_ttl: Duration::from_secs(600),
            username: None,
            password_file: None,
            ca: None,
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(5),
            revalidate_wait: Duration::from_secs(2),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(30),
        })
        .expect("upstream client")
    }

    fn fetch(store: &Store, upstream: &Upstream, repo: &str, digest: &Digest) -> Fetch {
        Fetch {
            store: store.clone(),
            upstream: upstream.clone(),
            remote: repo.parse().expect("remote name"),
            canonical: format!("test.io/{repo}").parse().expect("canonical name"),
            digest: digest.clone(),
            committed: Arc::default(),
        }
    }

    /// Every byte a follower is sent, read from the file ranges it yields.
    /// Upstream GETs the server has seen so far.
    fn count_get(server: &TestServer) -> usize {
        server
            .seen()
            .iter()
            .filter(|s| s.method == http::Method::GET)
            .count()
    }

    async fn read_all(follower: Follower) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut ranges = Box::pin(follower.ranges(0, None));
        while let Some(range) = tokio::time::timeout(Duration::from_secs(10), ranges.next())
            .await
            .map_err(|_| io::Error::other("follower hung"))?
        {
            let range = range?;
            let mut buf = vec![0u8; usize::try_from(range.len).expect("range length")];
            range.file.read_exact_at(&mut buf, range.offset)?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 1 << 20).expect("store");
        (dir, store)
    }

    /// Regression: a download whose leader task was cancelled (here: its runtime shut
    /// down mid-body) stayed in the map, and every later request for the blob joined
    /// the dead download and failed until restart.
    #[test]
    fn a_cancelled_download_does_not_wedge_its_blob() {
        let main = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (_dir, store) = store();
        let blob = vec![7u8; 100_000];
        let digest = Digest::sha256_of(&blob);
        let stalled = main.block_on(TestServer::start(|_| async {
            stall_after(200, &[("content-length", "100000")], vec![7u8; 10])
        }));
        let served = blob.clone();
        let healthy = main.block_on(TestServer::start(move |_| {
            let body = served.clone();
            async move { respond(200, &[], body) }
        }));
        let flights: Arc<Flights> = Arc::default();
        let doomed = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let stalled_client = upstream(&stalled.url());
        let follower = doomed.block_on(async {
            let f = flights
                .follow(fetch(&store, &stalled_client, "a", &digest))
                .await
                .expect("the stalled upstream answers headers");
            assert!(!f.joined);
            f
        });
        // Cancels the leader mid-body.
        drop(doomed);
        main.block_on(async {
            assert!(
                read_all(follower).await.is_err(),
                "a follower of a cancelled download gets an error, not a body"
            );
            let next = flights
                .follow(fetch(&store, &upstream(&healthy.url()), "a", &digest))
                .await
                .expect("a new download starts");
            assert!(!next.joined, "the next request leads a new download");
            assert_eq!(read_all(next).await.expect("body"), blob);
        });
    }

    /// Regression: downloads were coalesced per (repository, digest), so 32 clients over
    /// two repositories of one upstream holding one layer caused 2 upstream transfers.
    /// Now one transfer serves both, and the second repository still needs the
    /// upstream's confirmation (a HEAD through its own name) before it may read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_repositories_share_one_download_of_a_layer() {
        let (_dir, store) = store();
        let blob: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::sha256_of(&blob);
        let served = blob.clone();
        let server = TestServer::start(move |seen| {
            let body = served.clone();
            async move {
                if seen.method == http::Method::HEAD {
                    return respond(200, &[("content-length", &body.len().to_string())], "");
                }
                // Slow enough that every client arrives while the download runs.
                tokio::time::sleep(Duration::from_millis(300)).await;
                respond(200, &[], body)
            }
        })
        .await;
        let client = upstream(&server.url());
        let flights: Arc<Flights> = Arc::default();
        let get = |repo: &'static str| {
            let (flights, fetch) = (flights.clone(), fetch(&store, &client, repo, &digest));
            tokio::spawn(async move {
                let follower = flights.follow(fetch).await?;
                let joined = follower.joined;
                let body = read_all(follower)
                    .await
                    .map_err(|_| CacheError::Abandoned)?;
                Ok::<_, CacheError>((joined, body))
            })
        };
        // The first client, of repository `a`, leads; the others come once its transfer
        // has reached the upstream (a fixed head start flaked on a loaded machine).
        let mut clients = vec![get("a")];
        while count_get(&server) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for i in 1..32 {
            clients.push(get(if i % 2 == 0 { "a" } else { "b" }));
        }
        let mut joined = 0;
        for c in clients {
            let (j, body) = c.await.expect("client task").expect("blob");
            assert!(body == blob, "every client gets the whole blob");
            joined += usize::from(j);
        }
        assert_eq!(joined, 31);
        let seen = server.seen();
        let count = |method: http::Method, prefix: &str| {
            seen.iter()
                .filter(|s| s.method == method && s.uri.starts_with(prefix))
                .count()
        };
        assert_eq!(count(http::Method::GET, "/v2/"), 1, "one upstream transfer");
        assert!(
            count(http::Method::HEAD, "/v2/b/blobs/") >= 1,
            "b was confirmed"
        );
        assert_eq!(count(http::Method::HEAD, "/v2/a/blobs/"), 0);
        for repo in ["test.io/a", "test.io/b"] {
            let repo: RepoName = repo.parse().expect("name");
            assert!(
                store
                    .open_blob(&repo, &digest)
                    .await
                    .expect("store")
                    .is_some(),
                "{repo} is linked once the blob commits"
            );
        }
    }

    /// A repository the upstream does not confirm never reads bytes coming for
    /// another repository.
    #[tokio::test]
    async fn an_unconfirmed_repository_does_not_join_a_download() {
        let (_dir, store) = store();
        let blob = vec![1u8; 1000];
        let digest = Digest::sha256_of(&blob);
        let served = blob.clone();
        let server = TestServer::start(move |seen| {
            let body = served.clone();
            async move {
                if seen.uri.starts_with("/v2/secret/") {
                    return respond(404, &[], "");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                respond(200, &[], body)
            }
        })
        .await;
        let client = upstream(&server.url());
        let flights: Arc<Flights> = Arc::default();
        let leader = {
            let (flights, fetch) = (flights.clone(), fetch(&store, &client, "a", &digest));
            tokio::spawn(async move {
                read_all(flights.follow(fetch).await?)
                    .await
                    .map_err(|_| CacheError::Abandoned)
            })
        };
        while count_get(&server) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let refused = flights
            .follow(fetch(&store, &client, "secret", &digest))
            .await;
        assert!(matches!(
            refused,
            Err(CacheError::Upstream(
                crate::upstream::UpstreamError::NotFound
            ))
        ));
        assert_eq!(leader.await.expect("task").expect("leader's body"), blob);
        let secret: RepoName = "test.io/secret".parse().expect("name");
        assert!(
            store
                .open_blob(&secret, &digest)
                .await
                .expect("store")
                .is_none()
        );
    }
}
