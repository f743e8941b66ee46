//! Tests of the upstream client: the pure header parsers, then the whole client against
//! in-process loopback servers (token flow, redirects, stalls, breaker, retries).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::testserver::{RawServer, Seen, TestServer, respond, respond_chunked, stall_after};
use super::*;

// ---- pure parsers ----

#[test]
fn rate_limit_header() {
    assert_eq!(parse_rate_limit("100;w=21600"), Some(100));
    assert_eq!(parse_rate_limit(" 7 "), Some(7));
    assert_eq!(parse_rate_limit("0;w=21600"), Some(0));
    assert_eq!(parse_rate_limit(""), None);
    assert_eq!(parse_rate_limit("-1;w=1"), None);
    assert_eq!(parse_rate_limit("many"), None);
}

#[test]
fn retry_after_seconds_and_dates() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(
        parse_retry_after("120", now),
        Some(Duration::from_secs(120))
    );
    assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
    let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
    assert_eq!(
        parse_retry_after(&later, now),
        Some(Duration::from_secs(90))
    );
    let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
    assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
    // Capped, including absurd numbers and far-future dates.
    assert_eq!(
        parse_retry_after("99999999999999999999999", now),
        Some(MAX_RETRY_AFTER)
    );
    assert_eq!(
        parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now),
        Some(MAX_RETRY_AFTER)
    );
    for bad in ["", "soon", "-5", "1.5", "12s"] {
        assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
    }
}

#[test]
fn content_range_start_parsing() {
    assert_eq!(content_range_start("bytes 5-9/10"), Some(5));
    assert_eq!(content_range_start("bytes 0-0/*"), Some(0));
    assert_eq!(content_range_start("bytes 9-5/10"), None);
    assert_eq!(content_range_start("bytes */10"), None);
    assert_eq!(content_range_start("items 1-2/3"), None);
}

#[test]
fn outage_classification() {
    assert!(UpstreamError::Unavailable("x".into()).is_outage());
    assert!(UpstreamError::RateLimited { retry_after: None }.is_outage());
    for e in [
        UpstreamError::NotFound,
        UpstreamError::Denied,
        UpstreamError::Invalid("x".into()),
    ] {
        assert!(!e.is_outage(), "{e}");
    }
    let e = UpstreamError::RateLimited {
        retry_after: Some(Duration::from_secs(30)),
    };
    assert_eq!(
        e.to_string(),
        "rate limited by the upstream (retry after 30s)"
    );
}

// ---- helpers ----

const MANIFEST: &str = r#"{"schemaVersion":2}"#;

fn config(url: &str) -> UpstreamConfig {
    UpstreamConfig {
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
    }
}

fn repo(name: &str) -> RepoName {
    name.parse().expect("repo")
}

fn tag(t: &str) -> Reference {
    t.parse().expect("reference")
}

fn digest_of(content: &[u8]) -> Digest {
    Digest::sha256_of(content)
}

/// Writes a password file with a trailing newline, as editors do.
fn password_file(dir: &tempfile::TempDir, password: &str) -> std::path::PathBuf {
    let path = dir.path().join("password");
    std::fs::write(&path, format!("{password}\n")).expect("write password");
    path
}

/// Awaits `fut`, failing the test (instead of hanging it) if it takes longer than `limit`.
async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .expect("hung: the client's own timeout never fired")
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// A token realm granting `tok-<n>` (n counts grants), without `expires_in` like GHCR.
async fn token_realm() -> TestServer {
    prefixed_token_realm("tok").await
}

/// A token realm granting `<prefix>-<n>`.
async fn prefixed_token_realm(prefix: &'static str) -> TestServer {
    let grants = Arc::new(AtomicUsize::new(0));
    TestServer::start(move |_| {
        let n = grants.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            respond(
                200,
                &[("content-type", "application/json")],
                format!(r#"{{"token":"{prefix}-{n}"}}"#),
            )
        }
    })
    .await
}

/// A registry demanding a `tok-` Bearer token from `realm`, serving `MANIFEST` for tags.
async fn bearer_registry(realm: &str) -> TestServer {
    let challenge = format!(r#"Bearer realm="{realm}/token",service="test-registry""#);
    TestServer::start(move |s: Seen| {
        let challenge = challenge.clone();
        async move {
            let authorized = s
                .header("authorization")
                .is_some_and(|a| a.starts_with("Bearer tok-"));
            if !authorized {
                return respond(401, &[("www-authenticate", &challenge)], "");
            }
            respond(
                200,
                &[
                    (
                        "content-type",
                        "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
                    ),
                    (
                        "docker-content-digest",
                        digest_of(MANIFEST.as_bytes()).as_str(),
                    ),
                    ("ratelimit-remaining", "42;w=21600"),
                ],
                MANIFEST,
            )
        }
    })
    .await
}

// ---- token flow ----

#[tokio::test]
async fn token_flow_fetches_once_reuses_and_goes_up_front_for_new_scopes() {
    let realm = token_realm().await;
    let registry = bearer_registry(&realm.url()).await;
    let up = Upstream::new(&config(&registry.url())).expect("upstream");
    let alpine = repo("library/alpine");

    for _ in 0..2 {
        let m = up
            .manifest(
                &alpine,
                &tag("latest"),
                "application/vnd.oci.image.manifest.v1+json",
                false,
            )
            .await
            .expect("manifest");
        assert_eq!(m.body, MANIFEST.as_bytes());
        assert_eq!(m.digest, Some(digest_of(MANIFEST.as_bytes())));
        assert_eq!(
            m.media_type.as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
    }
    // One token for two requests: 401, retry with the token, then the token up front.
    assert_eq!(realm.count("/token"), 1);
    let seen = registry.seen();
    let auth: Vec<Option<&str>> = seen.iter().map(|s| s.header("authorization")).collect();
    assert_eq!(auth, [None, Some("Bearer tok-1"), Some("Bearer tok-1")]);
    assert!(
        seen.iter()
            .all(|s| s.header("user-agent") == Some(USER_AGENT))
    );
    assert!(
        seen.iter()
            .all(|s| s.uri == "/v2/library/alpine/manifests/latest")
    );
    assert_eq!(
        seen[0].header("accept"),
        Some("application/vnd.oci.image.manifest.v1+json")
    );

    let token_req = &realm.seen()[0];
    assert_eq!(
        token_req.uri,
        "/token?service=test-registry&scope=repository%3Alibrary%2Falpine%3Apull"
    );
    assert_eq!(
        token_req.header("authorization"),
        None,
        "anonymous token request"
    );

    // A new scope: the realm is known, so the token comes first and no 401 is paid.
    up.manifest(&repo("library/busybox"), &tag("1"), "*/*", true)
        .await
        .expect("busybox");
    assert_eq!(
        realm.count("/token?service=test-registry&scope=repository%3Alibrary%2Fbusybox"),
        1
    );
    let last = registry.seen().pop().expect("request");
    assert_eq!(last.header("authorization"), Some("Bearer tok-2"));
    assert_eq!(registry.seen().len(), 4);
    assert_eq!(up.health().rate_limit_remaining, Some(42));

    registry.stop().await;
    realm.stop().await;
}

#[tokio::test]
async fn refused_cached_token_is_replaced_once_then_denied() {
    let realm = token_realm().await;
    let challenge = format!(r#"Bearer realm="{}/token",service="s""#, realm.url());
    // Accepts only tok-1 and tok-3: the second request's cached tok-1 is "revoked".
    let calls = Arc::new(AtomicUsize::new(0));
    let registry = TestServer::start(move |s: Seen| {
        let challenge = challenge.clone();
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            match (n, s.header("authorization")) {
                (1, Some("Bearer tok-1")) => respond(200, &[], MANIFEST),
                (_, Some("Bearer tok-2")) => respond(200, &[], MANIFEST),
                _ => respond(401, &[("www-authenticate", &challenge)], ""),
            }
        }
    })
    .await;
    let up = Upstream::new(&config(&registry.url())).expect("upstream");
    let r = repo("a/b");
    up.manifest(&r, &tag("x"), "*/*", false)
        .await
        .expect("first");
    // The cached tok-1 is refused now: fetch tok-2 and retry once.
    up.manifest(&r, &tag("x"), "*/*", false)
        .await
        .expect("second");
    assert_eq!(realm.count("/token"), 2);
    // A freshly fetched token refused is not fetched again: Denied.
    let denied = up.manifest(&repo("c/d"), &tag("x"), "*/*", false).await;
    assert_eq!(denied.map(|_| ()), Err(UpstreamError::Denied));
    assert_eq!(realm.count("/token"), 3);
    assert_eq!(
        up.health().breaker,
        BreakerState::Closed,
        "401 is not an outage"
    );

    registry.stop().await;
    realm.stop().await;
}

/// Regression: a token fetched up front from the remembered realm, refused because the
/// upstream moved to another realm, used to end in Denied instead of asking the new realm.
#[tokio::test]
async fn moved_realm_is_followed() {
    let (old, new) = (
        prefixed_token_realm("old").await,
        prefixed_token_realm("new").await,
    );
    let moved = Arc::new(AtomicBool::new(false));
    let challenges = (
        format!(r#"Bearer realm="{}/token""#, old.url()),
        format!(r#"Bearer realm="{}/token""#, new.url()),
    );
    let flag = moved.clone();
    let registry = TestServer::start(move |s: Seen| {
        let (wanted, challenge) = if flag.load(Ordering::SeqCst) {
            ("Bearer new-", challenges.1.clone())
        } else {
            ("Bearer old-", challenges.0.clone())
        };
        async move {
            if s.header("authorization")
                .is_some_and(|a| a.starts_with(wanted))
            {
                respond(200, &[], MANIFEST)
            } else {
                respond(401, &[("www-authenticate", &challenge)], "")
            }
        }
    })
    .await;
    let up = Upstream::new(&config(&registry.url())).expect("upstream");
    up.manifest(&repo("a"), &tag("t"), "*/*", false)
        .await
        .expect("old realm");
    moved.store(true, Ordering::SeqCst);
    up.manifest(&repo("b"), &tag("t"), "*/*", false)
        .await
        .expect("new realm");
    assert_eq!((old.count("/token"), new.count("/token")), (2, 1));

    registry.stop().await;
    old.stop().await;
    new.stop().await;
}

#[tokio::test]
async fn basic_credentials_go_to_the_realm_and_never_to_the_registry() {
    let realm = TestServer::start(|s: Seen| async move {
        if s.header("authorization") == Some(basic("robot", "s3cret").as_str()) {
            respond(200, &[], r#"{"access_token":"tok-1","expires_in":3600}"#)
        } else {
            respond(401, &[], "")
        }
    })
    .await;
    let registry = bearer_registry(&realm.url()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&registry.url());
    cfg.username = Some("robot".into());
    cfg.password_file = Some(password_file(&dir, "s3cret"));
    let up = Upstream::new(&cfg).expect("upstream");
    assert!(!format!("{up:?}").contains("s3cret"));

    up.manifest(&repo("team/app"), &tag("v1"), "*/*", false)
        .await
        .expect("manifest");
    assert_eq!(realm.count("/token"), 1);
    assert!(registry.seen().iter().all(|s| {
        !s.header("authorization")
            .is_some_and(|a| a.starts_with("Basic"))
    }));

    // Wrong credentials: the realm refuses, and that is Denied, with no secret in it.
    let bad_dir = tempfile::tempdir().expect("tempdir");
    cfg.password_file = Some(password_file(&bad_dir, "wrong-pw"));
    let up = Upstream::new(&cfg).expect("upstream");
    let err = up
        .manifest(&repo("team/app"), &tag("v1"), "*/*", false)
        .await
        .expect_err("denied");
    assert_eq!(err, UpstreamError::Denied);
    assert!(!format!("{err} {err:?}").contains("wrong-pw"));

    registry.stop().await;
    realm.stop().await;
}

#[tokio::test]
async fn basic_challenge_is_answered_with_configured_credentials() {
    let registry = TestServer::start(|s: Seen| async move {
        if s.header("authorization") == Some(basic("u", "p").as_str()) {
            respond(200, &[("content-length", "0")], "")
        } else {
            respond(
                401,
                &[("www-authenticate", r#"Basic realm="Registry Realm""#)],
                "",
            )
        }
    })
    .await;
    let d = digest_of(b"x");
    let anonymous = Upstream::new(&config(&registry.url())).expect("upstream");
    assert_eq!(
        anonymous.head_blob(&repo("a"), &d).await,
        Err(UpstreamError::Denied)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&registry.url());
    cfg.username = Some("u".into());
    cfg.password_file = Some(password_file(&dir, "p"));
    let up = Upstream::new(&cfg).expect("upstream");
    assert_eq!(up.head_blob(&repo("a"), &d).await, Ok(0));
    let before = registry.seen().len();
    // Basic is now sent up front.
    assert_eq!(up.head_blob(&repo("b"), &d).await, Ok(0));
    assert_eq!(registry.seen().len(), before + 1);

    registry.stop().await;
}

// ---- redirects ----

#[tokio::test]
async fn redirect_to_another_port_carries_no_authorization() {
    let content = b"layer bytes".to_vec();
    let cdn_body = content.clone();
    let cdn = TestServer::start(move |_| {
        let body = cdn_body.clone();
        async move { respond(200, &[("content-length", &body.len().to_string())], body) }
    })
    .await;
    let realm = token_realm().await;
    let challenge = format!(r#"Bearer realm="{}/token",service="s""#, realm.url());
    let location = format!("{}/blobs/abc?signature=xyz", cdn.url());
    let registry = TestServer::start(move |s: Seen| {
        let (challenge, location) = (challenge.clone(), location.clone());
        async move {
            if s.header("authorization").is_some() {
                respond(307, &[("location", &location)], "")
            } else {
                respond(401, &[("www-authenticate", &challenge)], "")
            }
        }
    })
    .await;
    let up = Upstream::new(&config(&registry.url())).expect("upstream");
    let blob = up
        .blob(&repo("library/alpine"), &digest_of(&content), 0)
        .await
        .expect("blob");
    assert_eq!(blob.size, Some(content.len() as u64));
    let chunks: Vec<Bytes> = blob.body.map(|c| c.expect("chunk")).collect().await;
    assert_eq!(chunks.concat(), content);

    let at_cdn = cdn.seen();
    assert_eq!(at_cdn.len(), 1);
    assert_eq!(at_cdn[0].uri, "/blobs/abc?signature=xyz");
    assert_eq!(at_cdn[0].header("authorization"), None);
    assert_eq!(at_cdn[0].header("referer"), None);
    assert_eq!(
        registry
            .seen()
            .last()
            .and_then(|s| s.header("authorization").map(str::to_owned)),
        Some("Bearer tok-1".to_owned())
    );

    registry.stop().await;
    realm.stop().await;
    cdn.stop().await;
}

// ---- timeouts ----

#[tokio::test]
async fn stalled_headers_become_unavailable_within_the_timeouts() {
    let server = TestServer::start(|_| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        respond(200, &[], "")
    })
    .await;
    let mut cfg = config(&server.url());
    cfg.connect_timeout = Duration::from_millis(200);
    cfg.read_timeout = Duration::from_millis(300);
    let up = Upstream::new(&cfg).expect("upstream");
    let started = Instant::now();
    let err = within(
        Duration::from_secs(5),
        up.manifest(&repo("a"), &tag("t"), "*/*", false),
    )
    .await
    .expect_err("stalled");
    let elapsed = started.elapsed();
    assert!(
        matches!(&err, UpstreamError::Unavailable(m) if m.contains("no response")),
        "{err}"
    );
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    server.stop().await;
}

#[tokio::test]
async fn stalled_body_ends_the_stream_with_unavailable_and_counts_for_the_breaker() {
    let server = TestServer::start(|_| async {
        stall_after(200, &[("content-length", "100")], &b"0123456789"[..])
    })
    .await;
    let mut cfg = config(&server.url());
    cfg.read_timeout = Duration::from_millis(300);
    cfg.breaker_threshold = 1;
    let up = Upstream::new(&cfg).expect("upstream");
    let mut blob = up
        .blob(&repo("a"), &digest_of(b"x"), 0)
        .await
        .expect("headers");
    assert_eq!(blob.size, Some(100));
    assert_eq!(up.health().breaker, BreakerState::Closed);
    let first = blob.body.next().await.expect("item").expect("first chunk");
    assert_eq!(&first[..], b"0123456789");
    // The consumer being slow is not a stall: only waiting on the upstream counts.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = Instant::now();
    let err = within(Duration::from_secs(5), blob.body.next())
        .await
        .expect("item")
        .expect_err("stall");
    let elapsed = started.elapsed();
    assert!(
        matches!(&err, UpstreamError::Unavailable(m) if m.contains("stalled")),
        "{err}"
    );
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(blob.body.next().await.is_none(), "nothing after the error");
    assert_eq!(up.health().breaker, BreakerState::Open);
    server.stop().await;
}

#[tokio::test]
async fn connection_closed_before_any_response_is_retried_once() {
    // Connection 0 reads the request and closes; later ones answer.
    let server = RawServer::start(|n, mut stream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        if n > 0 {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    })
    .await;
    let up = Upstream::new(&config(&server.url())).expect("upstream");
    let r = up.head_blob(&repo("a"), &digest_of(b"x")).await;
    assert_eq!(r, Ok(0));
    server.stop().await;

    // Always closing: one retry only, then Unavailable.
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let server = RawServer::start(move |_, mut stream| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
        }
    })
    .await;
    let up = Upstream::new(&config(&server.url())).expect("upstream");
    let err = up
        .head_blob(&repo("a"), &digest_of(b"x"))
        .await
        .expect_err("closed");
    assert!(err.is_outage(), "{err}");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    server.stop().await;
}

// ---- breaker ----

#[tokio::test]
async fn breaker_opens_after_threshold_fails_fast_and_one_probe_closes_it() {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let server = TestServer::start(move |_| {
        let ok = flag.load(Ordering::SeqCst);
        async move {
            if ok {
                // Slow enough that a second call arrives while this probe is in flight.
                tokio::time::sleep(Duration::from_millis(300)).await;
                respond(200, &[("content-length", "3")], "abc")
            } else {
                respond(500, &[], "")
            }
        }
    })
    .await;
    let mut cfg = config(&server.url());
    cfg.breaker_threshold = 3;
    cfg.breaker_cooldown = Duration::from_millis(300);
    let up = Upstream::new(&cfg).expect("upstream");
    let (r, d) = (repo("a"), digest_of(b"abc"));
    for _ in 0..3 {
        let err = up.head_blob(&r, &d).await.expect_err("500");
        assert!(
            matches!(&err, UpstreamError::Unavailable(m) if m.contains("500")),
            "{err}"
        );
    }
    assert_eq!(up.health().breaker, BreakerState::Open);
    let started = Instant::now();
    let err = up.head_blob(&r, &d).await.expect_err("open");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(&err, UpstreamError::CircuitOpen { message, retry_after }
            if message.starts_with("circuit open") && !retry_after.is_zero()),
        "{err}"
    );
    assert_eq!(
        server.seen().len(),
        3,
        "fail fast: the upstream is not asked"
    );

    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(up.health().breaker, BreakerState::HalfOpen);
    healthy.store(true, Ordering::SeqCst);
    let probe = tokio::spawn({
        let up = up.clone();
        let (r, d) = (r.clone(), d.clone());
        async move { up.head_blob(&r, &d).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = up.head_blob(&r, &d).await.expect_err("probe in flight");
    assert!(
        matches!(&err, UpstreamError::CircuitOpen { message, retry_after }
            if message.starts_with("circuit open") && !retry_after.is_zero()),
        "{err}"
    );
    assert_eq!(probe.await.expect("join"), Ok(3));
    assert_eq!(up.health().breaker, BreakerState::Closed);
    assert_eq!(server.seen().len(), 4);
    server.stop().await;
}

#[tokio::test]
async fn retry_after_on_429_holds_the_breaker_open() {
    let limited = Arc::new(AtomicBool::new(true));
    let flag = limited.clone();
    let server = TestServer::start(move |_| {
        let limited = flag.load(Ordering::SeqCst);
        async move {
            if limited {
                respond(
                    429,
                    &[("retry-after", "1"), ("ratelimit-remaining", "0;w=21600")],
                    "",
                )
            } else {
                respond(200, &[("content-length", "1")], "")
            }
        }
    })
    .await;
    let mut cfg = config(&server.url());
    cfg.breaker_threshold = 10;
    cfg.breaker_cooldown = Duration::from_millis(10);
    let up = Upstream::new(&cfg).expect("upstream");
    let (r, d) = (repo("a"), digest_of(b"x"));
    assert_eq!(
        up.head_blob(&r, &d).await,
        Err(UpstreamError::RateLimited {
            retry_after: Some(Duration::from_secs(1))
        })
    );
    assert_eq!(up.health().breaker, BreakerState::Open);
    assert_eq!(up.health().rate_limit_remaining, Some(0));
    // Held open although the threshold is far: callers fail fast with the time left.
    match up.head_blob(&r, &d).await {
        Err(UpstreamError::RateLimited {
            retry_after: Some(left),
        }) => assert!(left <= Duration::from_secs(1)),
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(server.seen().len(), 1);
    limited.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(up.head_blob(&r, &d).await, Ok(1));
    assert_eq!(up.health().breaker, BreakerState::Closed);
    server.stop().await;
}

#[tokio::test]
async fn not_found_and_denied_are_not_outages() {
    let server = TestServer::start(|s: Seen| async move {
        if s.uri.contains("missing") {
            respond(404, &[], r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#)
        } else {
            respond(403, &[], "")
        }
    })
    .await;
    let mut cfg = config(&server.url());
    cfg.breaker_threshold = 1;
    let up = Upstream::new(&cfg).expect("upstream");
    for _ in 0..3 {
        let r = up.manifest(&repo("a"), &tag("missing"), "*/*", false).await;
        assert_eq!(r.map(|_| ()), Err(UpstreamError::NotFound));
        let r = up.manifest(&repo("a"), &tag("secret"), "*/*", false).await;
        assert_eq!(r.map(|_| ()), Err(UpstreamError::Denied));
    }
    assert_eq!(up.health().breaker, BreakerState::Closed);
    server.stop().await;
}

// ---- protocol checks ----

#[tokio::test]
async fn oversized_manifests_are_invalid_declared_or_not() {
    let big = Bytes::from(vec![b' '; MAX_MANIFEST_BYTES + 1]);
    let server = TestServer::start(move |s: Seen| {
        let big = big.clone();
        async move {
            if s.uri.ends_with("declared") {
                respond(200, &[("content-length", &big.len().to_string())], big)
            } else {
                // Chunked: the size is only known by reading.
                let half = big.slice(..big.len() / 2);
                let rest = big.slice(big.len() / 2..);
                respond_chunked(200, &[], vec![half, rest])
            }
        }
    })
    .await;
    let up = Upstream::new(&config(&server.url())).expect("upstream");
    for t in ["declared", "chunked"] {
        let err = up
            .manifest(&repo("a"), &tag(t), "*/*", false)
            .await
            .expect_err("too big");
        assert!(
            matches!(&err, UpstreamError::Invalid(m) if m.contains("exceeds")),
            "{t}: {err}"
        );
    }
    assert_eq!(up.health().breaker, BreakerState::Closed);
    server.stop().await;
}

#[tokio::test]
async fn manifest_head_reports_headers_without_body() {
    let d = digest_of(MANIFEST.as_bytes());
    let digest_header = d.to_string();
    let server = TestServer::start(move |s: Seen| {
        let digest_header = digest_header.clone();
        async move {
            assert_eq!(s.method, Method::HEAD);
            respond(
                200,
                &[
                    ("content-type", "application/vnd.oci.image.index.v1+json"),
                    ("content-length", "19"),
                    ("docker-content-digest", &digest_header),
                ],
                "",
            )
        }
    })
    .await;
    let up = Upstream::new(&config(&server.url())).expect("upstream");
    let m = up
        .manifest(&repo("a"), &Reference::Digest(d.clone()), "*/*", true)
        .await
        .expect("head");
    assert_eq!(m.digest, Some(d.clone()));
    assert_eq!(
        m.media_type.as_deref(),
        Some("application/vnd.oci.image.index.v1+json")
    );
    assert!(m.body.is_empty());
    assert_eq!(server.seen()[0].uri, format!("/v2/a/manifests/{d}"));
    server.stop().await;
}

#[tokio::test]
async fn resume_takes_a_206_from_the_offset_or_the_whole_blob() {
    let server = TestServer::start(|s: Seen| async move {
        let range = s.header("range").map(str::to_owned);
        match (s.uri.as_str(), range.as_deref()) {
            (u, Some("bytes=5-")) if u.contains("/good/") => {
                respond(206, &[("content-range", "bytes 5-9/10")], "56789")
            }
            (u, Some("bytes=5-")) if u.contains("/shifted/") => {
                respond(206, &[("content-range", "bytes 0-9/10")], "0123456789")
            }
            _ => respond(200, &[], "0123456789"),
        }
    })
    .await;
    let up = Upstream::new(&config(&server.url())).expect("upstream");
    let d = digest_of(b"0123456789");
    let blob = up.blob(&repo("good/x"), &d, 5).await.expect("206");
    assert_eq!(blob.size, Some(5));
    let rest: Vec<Bytes> = blob.body.map(|c| c.expect("chunk")).collect().await;
    assert_eq!(rest.concat(), b"56789");
    assert_eq!(blob.offset, 5);
    let err = up
        .blob(&repo("shifted/x"), &d, 5)
        .await
        .expect_err("a 206 from elsewhere");
    assert!(matches!(err, UpstreamError::Invalid(_)), "{err}");
    // An upstream that ignores Range sends the whole blob, and says so.
    let whole = up.blob(&repo("ignores/x"), &d, 5).await.expect("200");
    assert_eq!(whole.offset, 0);
    let all: Vec<Bytes> = whole.body.map(|c| c.expect("chunk")).collect().await;
    assert_eq!(all.concat(), b"0123456789");
    server.stop().await;
}

#[tokio::test]
async fn tags_return_content_type_and_link() {
    let server = TestServer::start(|s: Seen| async move {
        assert_eq!(s.uri, "/v2/a/b/tags/list?n=2&last=x");
        respond(
            200,
            &[
                ("content-type", "application/json"),
                ("link", r#"</v2/a/b/tags/list?n=2&last=z>; rel="next""#),
            ],
            r#"{"name":"a/b","tags":["y","z"]}"#,
        )
    })
    .await;
    let up = Upstream::new(&config(&server.url())).expect("upstream");
    let page = TagsPage {
        n: Some(2),
        last: Some("x".into()),
    };
    let doc = up.tags(&repo("a/b"), &page).await.expect("tags");
    assert_eq!(doc.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        doc.link.as_deref(),
        Some(r#"</v2/a/b/tags/list?n=2&last=z>; rel="next""#)
    );
    assert_eq!(doc.body, r#"{"name":"a/b","tags":["y","z"]}"#.as_bytes());
    server.stop().await;
}

/// Query values are escaped here, not by callers: a `last` tag or an artifact type with
/// reserved characters must not change the query's meaning.
#[tokio::test]
async fn tags_and_referrers_escape_their_query() {
    let server = TestServer::start(|_: Seen| async move {
        respond(200, &[("content-type", "application/json")], "{}")
    })
    .await;
    let up = Upstream::new(&config(&server.url())).expect("upstream");
    let d = digest_of(b"subject");
    up.tags(&repo("a/b"), &TagsPage::default())
        .await
        .expect("tags");
    let page = TagsPage {
        n: None,
        last: Some("v1+x&n=9".into()),
    };
    up.tags(&repo("a/b"), &page).await.expect("tags");
    up.referrers(&repo("a/b"), &d, None)
        .await
        .expect("referrers");
    let sbom = up
        .referrers(&repo("a/b"), &d, Some("application/vnd.example+json; v=1"))
        .await
        .expect("referrers");
    assert_eq!(sbom.content_type.as_deref(), Some("application/json"));
    let uris: Vec<String> = server.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(
        uris,
        [
            "/v2/a/b/tags/list".to_owned(),
            "/v2/a/b/tags/list?last=v1%2Bx%26n%3D9".to_owned(),
            format!("/v2/a/b/referrers/{d}"),
            format!(
                "/v2/a/b/referrers/{d}?artifactType=application%2Fvnd.example%2Bjson%3B%20v%3D1"
            ),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_unavailable_fast() {
    // Bind then drop: a loopback port with nothing listening refuses at once.
    let addr = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr")
    };
    let up = Upstream::new(&config(&format!("http://{addr}"))).expect("upstream");
    let err = up
        .head_blob(&repo("a"), &digest_of(b"x"))
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, UpstreamError::Unavailable(m) if m.contains("cannot connect")),
        "{err}"
    );
}

// ---- construction ----

#[test]
fn new_reports_unusable_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config("https://registry.example");
    cfg.username = Some("u".into());
    cfg.password_file = Some(dir.path().join("absent"));
    let err = Upstream::new(&cfg).expect_err("missing password file");
    assert!(
        matches!(&err, UpstreamError::Invalid(m) if m.contains("password_file")),
        "{err}"
    );

    cfg.password_file = Some(password_file(&dir, ""));
    assert!(Upstream::new(&cfg).is_err(), "empty password");

    let mut cfg = config("https://registry.example");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").expect("write");
    cfg.ca = Some(ca);
    let err = Upstream::new(&cfg).expect_err("bad ca");
    assert!(
        matches!(&err, UpstreamError::Invalid(m) if m.contains("ca")),
        "{err}"
    );

    let up = Upstream::new(&config("https://registry.example/")).expect("plain config");
    assert_eq!(
        (up.name(), up.url()),
        ("test.io", "https://registry.example")
    );
}

/// Reachability: unknown before anything was asked; a probe that gets any answer (here
/// a 401) marks it reachable, one that cannot connect marks it unreachable, and the
/// next answer marks it reachable again.
#[tokio::test]
async fn reachability_follows_the_last_answer_or_failure() {
    let server = TestServer::start(|_s: Seen| async move { respond(401, &[], "") }).await;
    let up = Upstream::new(&config(&server.url())).expect("upstream");
    assert_eq!(up.health().reachable, None);
    assert_eq!(up.idle_secs(), None);
    up.probe().await;
    assert_eq!(up.health().reachable, Some(true));
    assert!(up.idle_secs().is_some());

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let gone = Upstream::new(&config(&format!("http://127.0.0.1:{closed}"))).expect("upstream");
    gone.probe().await;
    assert_eq!(gone.health().reachable, Some(false));
    let err = gone
        .manifest(&repo("a/b"), &"v1".parse().expect("ref"), "*/*", true)
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, UpstreamError::Unavailable(_)), "{err}");
    assert_eq!(gone.health().reachable, Some(false));
    server.stop().await;
}
