//! End-to-end tests of the pull-through cache: the real daemon in front of a real
//! docker-registry with Docker Hub-style token auth and a CDN redirect, real skopeo and
//! containerd clients, and the in-process fake upstream for the faults a real server
//! will not produce (resets, lies, stalls, 5xx, 429).

mod common;

use std::time::Duration;

use common::containerd::{Containerd, generate_hosts_toml};
use common::fake::{FakeUpstream, Fault};
use common::upstream::{UpstreamOptions, UpstreamRegistry};
use common::*;
use outpost::oci::Digest;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// An Outpost (in this process) whose `docker.io` upstream is `url`, anonymous pull on it.
fn outpost_for(dir: &std::path::Path, url: &str, upstream_extra: &str, extra: &str) -> Server {
    let issuer = Issuer::new(&dir.join("keys"));
    Server::start(
        dir,
        &issuer,
        &pull_through_config(url, upstream_extra, extra),
    )
}

fn pull_through_config(url: &str, upstream_extra: &str, extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"{url}\"\n{upstream_extra}\n\
         [[access]]\nrepositories = [\"docker.io/**\"]\nanonymous = [\"pull\"]\n{extra}"
    )
}

async fn get(server: &Server, path: &str) -> reqwest::Response {
    client()
        .get(server.url(path))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("send")
}

/// skopeo pulls through Outpost from a token-auth upstream whose blobs come through a
/// CDN redirect, by path prefix (with Docker Hub's `library/` rule) and by `?ns=`;
/// content is byte-identical, the CDN never saw a credential, and the second pull costs
/// the upstream no blob or manifest GET.
#[test]
fn skopeo_pulls_through_token_auth_upstream_with_redirect() {
    let dir = tmp();
    let up = UpstreamRegistry::start(
        &dir.path().join("upstream"),
        UpstreamOptions {
            token_auth: true,
            redirect: true,
            ..UpstreamOptions::default()
        },
    );
    let mut layout = Layout::new(&dir.path().join("src"));
    let (md, ms, _) = layout.image(3, &[400_000, 10], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, "3.20");
    let (id, is) = layout.multi_arch(11);
    layout.tag(OCI_INDEX, &id, is, "multi");
    up.push_layout(&layout.dir, "library/alpine:3.20");
    up.push_layout(&layout.dir, "library/alpine:multi");
    let server = outpost_for(dir.path(), &up.url(), "tag_ttl = \"1h\"", "");

    for (i, reference) in [
        "docker.io/alpine:3.20",
        "docker.io/library/alpine:multi",
        "docker.io/library/alpine:3.20",
    ]
    .iter()
    .enumerate()
    {
        let back = dir.path().join(format!("back-{i}"));
        let tag = reference.rsplit(':').next().expect("tag");
        let out = skopeo(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{}/{reference}", server.addr),
            &format!("oci:{}:{tag}", back.display()),
        ]);
        assert!(
            out.status.success(),
            "pull {reference}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.logs()
        );
        let want = layout_blobs(&layout.dir);
        let got = layout_blobs(&back);
        for (name, content) in &got {
            assert_eq!(
                Some(content),
                want.get(name),
                "{reference}: blob {name} differs"
            );
        }
        let root = if tag == "multi" { &id } else { &md };
        assert!(
            got.contains_key(root.hex()),
            "{reference}: root digest kept"
        );
    }
    assert!(
        !up.cdn_requests().is_empty(),
        "blobs went through the redirect"
    );
    assert!(
        !up.cdn_saw_authorization(),
        "the registry token was sent to the CDN"
    );
    // The third pull (same image as the first, other spelling) was served from the cache:
    // no blob was fetched twice.
    let blob_gets = up.requests("GET", "/blobs/sha256:");
    let distinct = layout_blobs(&layout.dir).len();
    assert!(
        blob_gets <= distinct,
        "{blob_gets} blob GETs upstream for {distinct} distinct blobs"
    );
}

/// containerd pulls through Outpost using the hosts.toml that `outpost client-config
/// containerd` generated from Outpost's own config: it sends `?ns=docker.io`, which routes
/// to the configured docker.io upstream (a local registry here). End to end: the real
/// binary, as a child process.
#[test]
fn containerd_pulls_through_hosts_toml() {
    let dir = tmp();
    let up = UpstreamRegistry::start(
        &dir.path().join("upstream"),
        UpstreamOptions {
            token_auth: true,
            ..UpstreamOptions::default()
        },
    );
    let mut layout = Layout::new(&dir.path().join("src"));
    let (md, ms, _) = layout.image(5, &[200_000], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, "latest");
    up.push_layout(&layout.dir, "library/busybox:latest");
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server =
        Server::start_process(dir.path(), &issuer, &pull_through_config(&up.url(), "", ""));
    let ctrd = Containerd::start(&dir.path().join("containerd"));
    let hosts = dir.path().join("hosts");
    let report = generate_hosts_toml(&server.config, &hosts, &[]);
    assert!(
        report.contains("docker.io/hosts.toml"),
        "client-config report: {report}"
    );
    let out = ctrd.pull(&hosts, "docker.io/library/busybox:latest");
    assert!(
        out.status.success(),
        "ctr pull: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.logs()
    );
    for (name, content) in layout_blobs(&layout.dir) {
        let d: Digest = format!("sha256:{name}").parse().expect("digest");
        assert_eq!(
            ctrd.content(&d).as_deref(),
            Some(content.as_slice()),
            "containerd's copy of {name} differs"
        );
    }
    assert!(
        up.request_log()
            .iter()
            .any(|r| r.user_agent.starts_with("outpost/") && r.uri.contains("library/busybox")),
        "containerd's ?ns=docker.io requests were routed to the docker.io upstream"
    );
}

/// Unknown `ns` values answer 404 NAME_UNKNOWN at once; upstream answers carry
/// `OCI-Namespace`; pushes into an upstream namespace are refused.
#[tokio::test(flavor = "multi_thread")]
async fn namespace_routing_edges() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let img = fake.add_image("library/alpine", "3", 1, &[1000]);
    let server = outpost_for(dir.path(), &fake.url(), "", "");

    let r = get(&server, "/v2/library/alpine/manifests/3?ns=quay.example").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");

    let r = get(&server, "/v2/library/alpine/manifests/3?ns=docker.io").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("OCI-Namespace")
            .and_then(|v| v.to_str().ok()),
        Some("docker.io")
    );
    assert_eq!(
        r.headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok()),
        Some(img.manifest.as_str())
    );
    assert_eq!(
        r.bytes().await.expect("body").as_ref(),
        img.manifest_bytes.as_slice()
    );

    // `ns` never causes an error by itself: on routes without a repository it changes
    // nothing, and `ns` naming Outpost itself means hosted.
    let status = |path: &'static str| {
        let url = server.url(path);
        async move { client().get(url).send().await.expect("send").status() }
    };
    assert_eq!(status("/v2/?ns=docker.io").await, status("/v2/").await);
    let own = format!("/v2/team/none/manifests/x?ns={}", server.addr);
    let r = client().get(server.url(&own)).send().await.expect("send");
    assert_eq!(
        r.status(),
        401,
        "hosted and not public: challenge, not NAME_UNKNOWN"
    );
    assert!(r.headers().get("OCI-Namespace").is_none());

    let issuer = Issuer {
        dir: dir.path().join("keys"),
    };
    let key = issuer.issue("ci", &["**"], "pull,push", "1h");
    let (_, status) = push_blob(&server, &key, "docker.io/library/alpine", b"evil").await;
    assert_eq!(status, 403, "push into an upstream namespace is refused");
}

/// 32 concurrent cold requests for one blob cause exactly one upstream GET; every client
/// receives the right bytes, and receives the first bytes while the upstream is still
/// sending (the upstream stalls half-way until every client has them).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_misses_share_one_streaming_download() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let img = fake.add_image("library/big", "1", 2, &[2 << 20]);
    let layer = img.layers[0].clone();
    let path = FakeUpstream::blob_path("library/big", &layer);
    let half = 1 << 20;
    fake.set_fault(&path, Fault::StallAfter(half));
    let server = outpost_for(dir.path(), &fake.url(), "read_timeout = \"60s\"", "");

    let url = server.url(&format!("/v2/docker.io/library/big/blobs/{layer}"));
    let mut tasks = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<usize>(64);
    for _ in 0..32 {
        let (url, tx) = (url.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = match client().get(&url).send().await {
                Ok(r) => r,
                Err(e) => panic!("send: {e:?}"),
            };
            assert_eq!(r.status(), 200);
            let mut body = Vec::new();
            let mut told = false;
            while let Some(chunk) = match r.chunk().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("client error after {} bytes: {e}", body.len());
                    None
                }
            } {
                body.extend_from_slice(&chunk);
                // The last received byte is held back until verification.
                if !told && body.len() >= half - 1 {
                    told = true;
                    let _ = tx.send(body.len()).await;
                }
            }
            body
        }));
    }
    // Every client gets the first half while the upstream is stalled.
    for _ in 0..32 {
        let got = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a client received the first half while the upstream stalled");
        assert!(got.is_some());
    }
    for _ in 0..100 {
        if fake.stalls_reached() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.release_stalls();
    for t in tasks {
        let body = t.await.expect("client task");
        assert_eq!(
            Digest::sha256_of(&body),
            layer,
            "client got wrong bytes ({} bytes)\n{}",
            body.len(),
            server.logs()
        );
    }
    assert_eq!(
        fake.count("GET", &path),
        1,
        "one upstream GET for 32 misses"
    );
    assert!(metric(&server, "outpost_cache_coalesced_requests_total", &[]).await >= 31.0);
}

/// Concurrent cold requests for one tag cause one upstream manifest GET.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_tag_misses_share_one_fetch() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let img = fake.add_image("library/app", "v1", 4, &[100]);
    let path = FakeUpstream::manifest_path("library/app", "v1");
    fake.set_fault(&path, Fault::Delay(Duration::from_millis(300)));
    let server = outpost_for(dir.path(), &fake.url(), "", "");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let url = server.url("/v2/library/app/manifests/v1?ns=docker.io");
        tasks.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.expect("send");
            assert_eq!(r.status(), 200);
            r.bytes().await.expect("body")
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.expect("task").as_ref(),
            img.manifest_bytes.as_slice()
        );
    }
    assert_eq!(fake.count("GET", &path), 1);
}

/// Upstreams that reset, lie about the digest or the size: the client never receives a
/// complete body (the last byte waits for verification), nothing is committed, and the next request fetches again and gets the right bytes,
/// after which the blob is served without the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn lying_or_failing_upstream_commits_nothing() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let server = outpost_for(dir.path(), &fake.url(), "breaker_threshold = 100", "");
    let faults = [
        Fault::ResetAfter(100_000),
        Fault::WrongBytes,
        Fault::ShortBody(200_000),
    ];
    for (seed, fault) in faults.into_iter().enumerate() {
        let img = fake.add_image("library/x", "1", 10 + seed as u64, &[300_000]);
        let layer = img.layers[0].clone();
        let path = FakeUpstream::blob_path("library/x", &layer);
        let url = server.url(&format!("/v2/docker.io/library/x/blobs/{layer}"));
        fake.set_fault(&path, fault.clone());
        let complete = match client().get(&url).send().await {
            Ok(r) if r.status() == 200 => match r.bytes().await {
                Ok(b) => Digest::sha256_of(&b) == layer,
                Err(_) => false,
            },
            _ => false,
        };
        assert!(
            !complete,
            "{fault:?}: a bad download was served as complete"
        );
        fake.clear_fault(&path);
        for _ in 0..2 {
            let r = client().get(&url).send().await.expect("send");
            assert_eq!(r.status(), 200, "{fault:?}: after the fault");
            let body = r.bytes().await.expect("body");
            assert_eq!(Digest::sha256_of(&body), layer, "{fault:?}: bytes");
        }
        assert_eq!(
            fake.count("GET", &path),
            2,
            "{fault:?}: fetched again once, then served from the cache"
        );
    }
    // Nothing bad was committed: fsck verifies every stored digest.
    let mut server = server;
    server.stop();
    let out = outpost(&["fsck", "--config", server.config.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "fsck after faults: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With the upstream down (refusing, then stalled), a warm tag and digest still pull:
/// the last known answer is served stale, quickly, and counted.
#[tokio::test(flavor = "multi_thread")]
async fn offline_serves_last_known_answers() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let img = fake.add_image("library/web", "stable", 7, &[50_000]);
    let server = outpost_for(
        dir.path(),
        &fake.url(),
        "tag_ttl = \"1s\"\nrevalidate_wait = \"300ms\"\nconnect_timeout = \"1s\"\n\
         read_timeout = \"2s\"\nbreaker_cooldown = \"1s\"",
        "",
    );
    let tag_url = "/v2/docker.io/library/web/manifests/stable";
    let blob_url = format!("/v2/docker.io/library/web/blobs/{}", img.layers[0]);
    assert_eq!(get(&server, tag_url).await.status(), 200);
    assert_eq!(get(&server, &blob_url).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Refused connections.
    fake.set_down(true);
    for _ in 0..3 {
        let r = get(&server, tag_url).await;
        assert_eq!(r.status(), 200, "stale tag while the upstream is down");
        assert_eq!(
            r.bytes().await.expect("body").as_ref(),
            img.manifest_bytes.as_slice()
        );
    }
    let r = get(
        &server,
        &format!("/v2/docker.io/library/web/manifests/{}", img.manifest),
    )
    .await;
    assert_eq!(r.status(), 200, "digest pull while the upstream is down");
    let r = get(&server, &blob_url).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        Digest::sha256_of(&r.bytes().await.expect("body")),
        img.layers[0]
    );
    // A miss fails fast with a clear error instead of hanging.
    let started = std::time::Instant::now();
    let r = get(&server, "/v2/docker.io/library/web/manifests/other").await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    eprintln!(
        "miss with the upstream down answered in {:?}",
        started.elapsed()
    );
    assert!(
        metric(
            &server,
            "outpost_cache_requests_total{upstream=\"docker.io\",kind=\"manifest\",result=\"stale\"",
            &[]
        )
        .await
            >= 3.0
    );
    assert!(
        metric(&server, "outpost_upstream_up{upstream=\"docker.io\"}", &[]).await < 1.0,
        "breaker open"
    );
    // Regression (issue 12): the 503 an open breaker answers says when to come back.
    // (A request that happens to be the breaker's probe fails on the refused connection
    // instead and re-opens it; the next one is answered by the breaker.)
    let mut retry = None;
    for _ in 0..3 {
        let r = get(&server, "/v2/docker.io/library/web/manifests/another").await;
        assert_eq!(r.status(), 503);
        retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if retry.is_some() {
            break;
        }
    }
    let retry = retry.expect("a Retry-After in seconds from the open breaker");
    assert!((1..=2).contains(&retry), "breaker_cooldown is 1s: {retry}");

    // A stalled (hung) upstream: the client still gets the stale answer.
    fake.set_down(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fake.set_fault("*", Fault::Stall);
    let started = std::time::Instant::now();
    let r = get(&server, tag_url).await;
    assert_eq!(r.status(), 200, "stale tag while the upstream hangs");
    eprintln!(
        "stale answer with a hung upstream took {:?}",
        started.elapsed()
    );
    fake.release_stalls();
    fake.clear_faults();
}

/// The upstream's 429 with Retry-After is passed on when nothing is cached, and opens the
/// breaker: the next miss does not reach the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_is_honoured() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    fake.add_image("library/a", "1", 8, &[100]);
    fake.set_response_headers(&[("ratelimit-remaining", "97;w=21600")]);
    let server = outpost_for(dir.path(), &fake.url(), "", "");
    assert_eq!(
        get(&server, "/v2/docker.io/library/a/manifests/1")
            .await
            .status(),
        200
    );
    assert_eq!(
        metric(
            &server,
            "outpost_upstream_ratelimit_remaining{upstream=\"docker.io\"}",
            &[]
        )
        .await,
        97.0
    );
    fake.set_fault("*", Fault::too_many_requests(120));
    let r = get(&server, "/v2/docker.io/library/a/manifests/2").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("Retry-After").is_some());
    let before = fake.requests().len();
    let r = get(&server, "/v2/docker.io/library/a/manifests/3").await;
    assert!(r.status() == 429 || r.status() == 503, "{}", r.status());
    assert_eq!(
        fake.requests().len(),
        before,
        "no request while rate-limited"
    );
}

/// Tag freshness and content survive a restart: a fresh tag is served with no upstream
/// request for content afterwards (the start-up health probe, `GET /v2/`, aside).
#[tokio::test(flavor = "multi_thread")]
async fn freshness_survives_restart() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let img = fake.add_image("library/db", "16", 9, &[20_000]);
    let mut server = outpost_for(dir.path(), &fake.url(), "tag_ttl = \"1h\"", "");
    assert_eq!(
        get(&server, "/v2/docker.io/library/db/manifests/16")
            .await
            .status(),
        200
    );
    let blob = format!("/v2/docker.io/library/db/blobs/{}", img.layers[0]);
    assert_eq!(get(&server, &blob).await.status(), 200);
    server.stop();
    fake.reset_counts();
    let server = Server::start_with_config(&server.config);
    let r = get(&server, "/v2/docker.io/library/db/manifests/16").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.expect("body").as_ref(),
        img.manifest_bytes.as_slice()
    );
    let r = get(&server, &blob).await;
    assert_eq!(
        Digest::sha256_of(&r.bytes().await.expect("body")),
        img.layers[0]
    );
    let content: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path != "/v2/")
        .collect();
    assert!(content.is_empty(), "{content:?}");
}

/// Regression for the class of bug where any blob on disk was served through any
/// repository: a blob cached for docker.io/library/a is served through library/b only
/// after the upstream confirms library/b has it.
#[tokio::test(flavor = "multi_thread")]
async fn cached_blob_of_other_repository_needs_upstream_confirmation() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let img = fake.add_image("library/a", "1", 12, &[10_000]);
    let layer = img.layers[0].clone();
    let server = outpost_for(dir.path(), &fake.url(), "", "");
    let r = get(&server, &format!("/v2/docker.io/library/a/blobs/{layer}")).await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;

    let through_b = format!("/v2/docker.io/library/b/blobs/{layer}");
    let r = get(&server, &through_b).await;
    assert_eq!(r.status(), 404, "library/b does not have it upstream");
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    assert_eq!(
        fake.count("HEAD", &FakeUpstream::blob_path("library/b", &layer)),
        1
    );

    fake.add_blob(
        "library/b",
        common::gzip_stored(&common::bytes(1200, 10_000)),
    );
    let r = get(&server, &through_b).await;
    assert_eq!(r.status(), 200, "confirmed by the upstream");
    assert_eq!(Digest::sha256_of(&r.bytes().await.expect("body")), layer);
    assert_eq!(
        fake.count("GET", &FakeUpstream::blob_path("library/b", &layer)),
        0,
        "served from the stored copy once confirmed"
    );
}

/// Under a small max_size, least-recently-used upstream blobs are evicted to keep the
/// budget; a hosted (pushed) image is pinned and stays byte-identical; an evicted blob
/// is fetched again on demand.
#[tokio::test(flavor = "multi_thread")]
async fn eviction_keeps_budget_and_pins_hosted_content() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let server = outpost_for(
        dir.path(),
        &fake.url(),
        "",
        "[[access]]\nrepositories = [\"team/**\"]\nanonymous = [\"pull\"]",
    );
    // The budget is set in the config file: rewrite it with max_size and restart.
    let mut server = server;
    server.stop();
    let text = std::fs::read_to_string(&server.config).expect("config");
    let text = text.replace(
        "gc_grace = \"0s\"",
        "gc_grace = \"0s\"\nmax_size = \"1MiB\"",
    );
    std::fs::write(&server.config, text).expect("write config");
    let server = Server::start_with_config(&server.config);

    let issuer = Issuer {
        dir: dir.path().join("keys"),
    };
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let (hosted_manifest, hosted_body, hosted_layer) =
        push_image(&server, &key, "team/app", "v1", 77).await;

    let mut layers = Vec::new();
    for seed in 0..4u64 {
        let img = fake.add_image(&format!("library/img{seed}"), "1", 20 + seed, &[400_000]);
        let url = format!("/v2/docker.io/library/img{seed}/blobs/{}", img.layers[0]);
        let r = get(&server, &url).await;
        assert_eq!(
            Digest::sha256_of(&r.bytes().await.expect("body")),
            img.layers[0]
        );
        layers.push((url, img.layers[0].clone(), seed));
    }
    // Eviction runs after each download; wait (bounded) for the budget to hold.
    let blobs_dir = dir.path().join("data/blobs");
    let mut total = u64::MAX;
    let mut evicted = 0.0;
    for _ in 0..100 {
        total = dir_size(&blobs_dir);
        evicted = metric(&server, "outpost_evicted_blobs_total", &[]).await;
        if total <= 1 << 20 && evicted >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(total <= 1 << 20, "stored {total} bytes over a 1 MiB budget");
    assert!(evicted >= 2.0, "evictions counted: {evicted}");

    // The hosted image is intact.
    let r = get(
        &server,
        &format!("/v2/team/app/manifests/{hosted_manifest}"),
    )
    .await;
    assert_eq!(
        r.bytes().await.expect("body").as_ref(),
        hosted_body.as_slice()
    );
    let r = get(&server, &format!("/v2/team/app/blobs/{hosted_layer}")).await;
    assert_eq!(
        Digest::sha256_of(&r.bytes().await.expect("body")),
        hosted_layer
    );

    // The oldest upstream blob was evicted and comes back on demand.
    let (url, digest, seed) = &layers[0];
    let path = FakeUpstream::blob_path(&format!("library/img{seed}"), digest);
    let before = fake.count("GET", &path);
    let r = get(&server, url).await;
    assert_eq!(Digest::sha256_of(&r.bytes().await.expect("body")), *digest);
    assert_eq!(
        fake.count("GET", &path),
        before + 1,
        "refetched after eviction"
    );
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Regression: the cause of a 5xx was never logged (the request line had the status
/// only). Now the failure is logged once, inside the request's span, with its cause.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_request_logs_its_cause_once_in_its_span() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    fake.add_image("library/gone", "1", 1, &[1000]);
    let server = outpost_for(dir.path(), &fake.url(), "connect_timeout = \"1s\"", "");
    fake.set_down(true);
    let r = get(&server, "/v2/docker.io/library/gone/manifests/1").await;
    assert_eq!(r.status(), 503);
    let logs = server.logs();
    let failures: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("outpost::http: request failed"))
        .collect();
    assert_eq!(failures.len(), 1, "{logs}");
    let line = failures[0];
    for field in [
        "request{id=",
        "route=\"get_manifest\"",
        "repo=\"docker.io/library/gone\"",
        "upstream=\"docker.io\"",
        "principal=\"anonymous\"",
        "status=503",
        "cause=",
        "Connection refused",
    ] {
        assert!(line.contains(field), "{field} missing in: {line}");
    }
}

/// Regression: with the upstream hung (connections accepted, never answered), every
/// expired tag waited the whole revalidation wait (2 s each for two tags in a row).
/// After one revalidation waits in vain, later stale tags are answered at once (here:
/// before the client's own 3 s timeout, while the wait is 5 s), until the upstream
/// answers again.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_upstream_is_waited_for_once_not_for_every_tag() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let tags = ["a", "b", "c"];
    for (i, tag) in tags.iter().enumerate() {
        fake.add_image("library/hung", tag, 40 + i as u64, &[1000]);
    }
    let server = outpost_for(
        dir.path(),
        &fake.url(),
        "tag_ttl = \"1s\"\nrevalidate_wait = \"5s\"\nread_timeout = \"60s\"",
        "",
    );
    let url = |tag: &str| format!("/v2/docker.io/library/hung/manifests/{tag}");
    for tag in tags {
        assert_eq!(get(&server, &url(tag)).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for tag in tags {
        fake.set_fault(
            &FakeUpstream::manifest_path("library/hung", tag),
            Fault::Stall,
        );
    }
    // The first expired tag waits the revalidation wait, then is served stale.
    assert_eq!(get(&server, &url("a")).await.status(), 200);
    // The next ones do not wait for the hung upstream.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    for tag in ["b", "c"] {
        let r = impatient
            .get(server.url(&url(tag)))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{tag} waited for the hung upstream: {e}"));
        assert_eq!(r.status(), 200, "{tag} served stale");
    }
    let logs = server.logs();
    assert_eq!(
        logs.matches("did not answer a revalidation in time")
            .count(),
        1,
        "{logs}"
    );
    // The upstream answers again: revalidations go through and the mark is gone.
    fake.release_stalls();
    for tag in tags {
        fake.clear_fault(&FakeUpstream::manifest_path("library/hung", tag));
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/manifests/a"))
        .count();
    assert_eq!(get(&server, &url("a")).await.status(), 200);
    let after = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/manifests/a"))
        .count();
    assert!(
        after > before,
        "revalidated against the upstream once it answers"
    );
}

const UP: &str = "outpost_upstream_up{upstream=\"docker.io\"}";

/// Regression: `outpost_upstream_up` followed only the circuit breaker, so an upstream
/// that refused every connection showed 1 until the breaker opened. It follows whether
/// the upstream answers.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_up_follows_reachability_not_only_the_breaker() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    fake.add_image("library/up", "1", 61, &[1000]);
    fake.add_image("library/up", "2", 62, &[1000]);
    let server = outpost_for(
        dir.path(),
        &fake.url(),
        "breaker_threshold = 100\nconnect_timeout = \"1s\"",
        "",
    );
    assert_eq!(
        metric(&server, UP, &[]).await,
        1.0,
        "nothing known yet: the breaker is closed"
    );
    assert_eq!(
        get(&server, "/v2/docker.io/library/up/manifests/1")
            .await
            .status(),
        200
    );
    assert_eq!(metric(&server, UP, &[]).await, 1.0);
    fake.set_down(true);
    assert_eq!(
        get(&server, "/v2/docker.io/library/up/manifests/2")
            .await
            .status(),
        503
    );
    assert_eq!(
        metric(&server, UP, &[]).await,
        0.0,
        "unreachable, though the breaker is closed"
    );
    fake.set_down(false);
    assert_eq!(
        get(&server, "/v2/docker.io/library/up/manifests/2")
            .await
            .status(),
        200
    );
    assert_eq!(metric(&server, UP, &[]).await, 1.0);
}

/// Regression: `outpost_upstream_up` said 1 for the first minute after start, whatever
/// the upstream, until the first idle probe. The probe runs at start.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_unreachable_at_start_is_down_without_a_request() {
    let dir = tmp();
    // Nothing listens on port 1: every connection is refused at once.
    let server = outpost_for(dir.path(), "http://127.0.0.1:1", "", "");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metric(&server, UP, &[]).await != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "still up 10 s after start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
