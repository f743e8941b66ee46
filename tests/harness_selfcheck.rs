//! Checks of the pull-through test harness itself (tests/common): the real upstream with
//! token auth, htpasswd and the CDN redirect; every fault of the fake upstream; containerd
//! pulling through hosts.toml. If one of these fails, the pull-through tests built on the
//! harness cannot be trusted.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::containerd::{Containerd, write_hosts_toml};
use common::fake::{FakeUpstream, Fault};
use common::upstream::{TOKEN_SERVICE, UpstreamOptions, UpstreamRegistry};
use common::*;
use outpost::oci::Digest;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn client_no_redirects() -> reqwest::Client {
    outpost::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// The claims of a JWT, unverified.
fn jwt_claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("JWT payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&json).expect("claims JSON")
}

/// skopeo pushes with the token user and pulls anonymously through the token flow and the
/// CDN redirect; the CDN never sees credentials; the access log counts what happened;
/// the token server grants push only to the push user; stop/restart keeps port and data.
#[tokio::test(flavor = "multi_thread")]
async fn token_auth_upstream_with_cdn_redirect() {
    let dir = tmp();
    let mut up = UpstreamRegistry::start(
        &dir.path().join("upstream"),
        UpstreamOptions {
            token_auth: true,
            redirect: true,
            ..UpstreamOptions::default()
        },
    );
    let mut layout = Layout::new(&dir.path().join("src"));
    let (md, ms, manifest) = layout.image(1, &[300_000, 5], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, "v1");
    up.push_layout(&layout.dir, "library/app:v1");

    let c = client_no_redirects();
    // The challenge names the token server, like Docker Hub's.
    let r = c
        .get(format!("{}/v2/", up.url()))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().expect("ascii");
    let realm = up.token_realm().expect("realm");
    assert!(
        challenge.contains(&format!("realm=\"{realm}\"")) && challenge.contains(TOKEN_SERVICE),
        "{challenge}"
    );

    // Anonymous tokens carry pull only, even when push is asked for.
    let token_url =
        format!("{realm}?service={TOKEN_SERVICE}&scope=repository:library/app:pull,push");
    let r = c.get(&token_url).send().await.expect("send");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["token"], body["access_token"]);
    assert_eq!(body["expires_in"], 300);
    assert!(
        body["issued_at"]
            .as_str()
            .expect("issued_at")
            .ends_with('Z')
    );
    let claims = jwt_claims(body["token"].as_str().expect("token"));
    assert_eq!(claims["access"][0]["actions"], serde_json::json!(["pull"]));
    assert_eq!(claims["aud"], TOKEN_SERVICE);
    let anonymous = body["token"].as_str().expect("token").to_owned();

    // The registry accepts that token for a pull.
    let r = c
        .get(format!("{}/v2/library/app/manifests/v1", up.url()))
        .bearer_auth(&anonymous)
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), manifest.as_slice());

    // The push user gets push; a wrong password gets 401.
    let (user, password) = up.push_credentials().expect("credentials");
    let r = c
        .get(&token_url)
        .basic_auth(&user, Some(&password))
        .send()
        .await
        .expect("send");
    let body: serde_json::Value = r.json().await.expect("json");
    let claims = jwt_claims(body["token"].as_str().expect("token"));
    assert_eq!(
        claims["access"][0]["actions"],
        serde_json::json!(["pull", "push"])
    );
    assert_eq!(claims["sub"], user.as_str());
    let r = c
        .get(&token_url)
        .basic_auth(&user, Some("wrong"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let log = up.token_log();
    assert_eq!(log.last().map(|t| t.status), Some(401));
    assert!(
        log.iter()
            .any(|t| t.user.as_deref() == Some(user.as_str()) && t.status == 200),
        "skopeo's push authenticated at the token server: {log:?}"
    );

    // A blob GET answers 307 to the CDN, at the blob's storage path.
    let layer = Digest::sha256_of(&gzip_stored(&bytes(100, 300_000)));
    let r = c
        .get(format!("{}/v2/library/app/blobs/{layer}", up.url()))
        .bearer_auth(&anonymous)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 307);
    let cdn = up.cdn_url().expect("cdn");
    let hex = layer.hex();
    assert_eq!(
        r.headers()["location"].to_str().expect("ascii"),
        format!(
            "{cdn}/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        )
    );

    // skopeo pulls anonymously, following the redirect, byte-identical.
    let tokens_before = up.token_requests();
    let back = dir.path().join("back");
    let src = format!("docker://{}/library/app:v1", up.host());
    let dst = format!("oci:{}:v1", back.display());
    let out = skopeo(&["copy", "--src-tls-verify=false", &src, &dst]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = layout_blobs(&layout.dir);
    for (name, content) in layout_blobs(&back) {
        assert_eq!(Some(&content), want.get(&name), "blob {name}");
    }
    assert!(
        up.token_requests() > tokens_before,
        "skopeo fetched a token"
    );
    let cdn_log = up.cdn_requests();
    assert!(
        cdn_log
            .iter()
            .any(|r| r.method == "GET" && r.path.ends_with(&format!("{hex}/data"))),
        "{cdn_log:?}"
    );
    assert!(
        !up.cdn_saw_authorization(),
        "credentials followed the redirect"
    );

    // The access log counts every request, the 307s included.
    let blob_gets = up.requests("GET", &format!("/v2/library/app/blobs/{layer}"));
    assert_eq!(blob_gets, 2, "one by hand, one by skopeo");
    assert!(
        up.request_log()
            .iter()
            .any(|r| r.status == 307 && r.uri.contains(hex))
    );
    assert_eq!(up.requests("PUT", "/v2/library/app/manifests/v1"), 1);

    // Stopped: registry, token server and CDN refuse connections; restarted: same port,
    // same data, and the counts go on.
    let url = up.url();
    up.stop();
    for u in [format!("{url}/v2/"), realm.clone(), cdn.clone()] {
        let e = client_no_redirects()
            .get(&u)
            .send()
            .await
            .expect_err("stopped");
        assert!(e.is_connect(), "{u}: {e}");
    }
    up.restart();
    assert_eq!(up.url(), url);
    let r = c
        .get(format!("{url}/v2/library/app/manifests/v1"))
        .bearer_auth(&anonymous)
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "data kept across the restart");
    // By hand, by skopeo, and now after the restart.
    assert_eq!(up.requests("GET", "/v2/library/app/manifests/v1"), 3);
}

/// A private upstream: anonymous tokens carry no access (the registry refuses them), the
/// OAuth2 form POST that containerd uses works for the push user, and `expires_in` can be
/// left out of token responses.
#[tokio::test(flavor = "multi_thread")]
async fn private_token_upstream() {
    let dir = tmp();
    let up = UpstreamRegistry::start(
        dir.path(),
        UpstreamOptions {
            token_auth: true,
            anonymous_pull: false,
            token_expires_in: None,
            ..UpstreamOptions::default()
        },
    );
    let mut layout = Layout::new(&dir.path().join("src"));
    let (md, ms, _) = layout.image(6, &[100], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, "v1");
    up.push_layout(&layout.dir, "team/private:v1");

    let c = client_no_redirects();
    let realm = up.token_realm().expect("realm");
    let scope = "repository:team/private:pull";
    let r = get(
        &c,
        &format!("{realm}?service={TOKEN_SERVICE}&scope={scope}"),
    )
    .await;
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(body.get("expires_in").is_none(), "{body}");
    let anonymous = body["token"].as_str().expect("token").to_owned();
    assert_eq!(
        jwt_claims(&anonymous)["access"][0]["actions"],
        serde_json::json!([])
    );
    let manifest = format!("{}/v2/team/private/manifests/v1", up.url());
    let r = c
        .get(&manifest)
        .bearer_auth(&anonymous)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401, "an anonymous token cannot pull");

    let (user, password) = up.push_credentials().expect("credentials");
    let form = format!(
        "grant_type=password&username={user}&password={password}&service={TOKEN_SERVICE}\
         &scope=repository%3Ateam%2Fprivate%3Apull&client_id=harness"
    );
    let r = c
        .post(&realm)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    let token = body["access_token"].as_str().expect("token");
    // docker-registry 2.8 answers 404 for an OCI manifest unless Accept names its type.
    let r = c
        .get(&manifest)
        .bearer_auth(token)
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "the push user's token pulls");
    let last = up.token_log().pop().expect("logged");
    assert_eq!(
        (last.method.as_str(), last.user.as_deref()),
        ("POST", Some(user.as_str()))
    );
    assert_eq!(last.scopes, ["repository:team/private:pull"]);
}

/// htpasswd auth: Basic with the right password passes, anything else is 401; skopeo
/// pushes with the credentials.
#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_upstream() {
    let dir = tmp();
    let up = UpstreamRegistry::start(
        dir.path(),
        UpstreamOptions {
            htpasswd: Some(("alice".into(), "s3cret".into())),
            ..UpstreamOptions::default()
        },
    );
    let c = client_no_redirects();
    let base = format!("{}/v2/", up.url());
    let r = c.get(&base).send().await.expect("send");
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .expect("ascii")
            .starts_with("Basic")
    );
    let r = c
        .get(&base)
        .basic_auth("alice", Some("nope"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    let r = c
        .get(&base)
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    let mut layout = Layout::new(&dir.path().join("src"));
    let (md, ms, _) = layout.image(2, &[1000], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, "v1");
    up.push_layout(&layout.dir, "team/app:v1");
    assert_eq!(up.requests("PUT", "/v2/team/app/manifests/v1"), 1);
    let refused = up
        .request_log()
        .iter()
        .filter(|r| r.uri == "/v2/" && r.status == 401)
        .count();
    assert!(refused >= 2, "the 401s are in the access log too");
}

async fn get(c: &reqwest::Client, url: &str) -> reqwest::Response {
    c.get(url).send().await.expect("send")
}

/// Reads a body until it ends or fails: (bytes received, whether it failed).
async fn read_all(mut r: reqwest::Response) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    loop {
        match r.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => return (got, false),
            Err(_) => return (got, true),
        }
    }
}

/// Every fault of the fake upstream does what it says, and the counters see each request.
#[tokio::test(flavor = "multi_thread")]
async fn fake_upstream_faults() {
    let fake = FakeUpstream::start();
    let content = bytes(9, 200_000);
    let d = fake.add_blob("library/app", content.clone());
    let path = FakeUpstream::blob_path("library/app", &d);
    let url = format!("{}{path}", fake.url());
    let c = client_no_redirects();

    // Normal GET, HEAD and Range.
    let r = get(&c, &format!("{}/v2/", fake.url())).await;
    assert_eq!(r.status(), 200);
    let r = get(&c, &url).await;
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
    assert_eq!(r.bytes().await.expect("body").as_ref(), content.as_slice());
    let r = c.head(&url).send().await.expect("send");
    assert_eq!(r.headers()["content-length"], "200000");
    let r = c
        .get(&url)
        .header("range", "bytes=150000-")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 150000-199999/200000");
    assert_eq!(r.bytes().await.expect("body").as_ref(), &content[150_000..]);
    let image = fake.add_image("library/app", "v1", 3, &[100]);
    let r = c
        .get(format!(
            "{}{}",
            fake.url(),
            FakeUpstream::manifest_path("library/app", "v1")
        ))
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
    assert_eq!(
        r.bytes().await.expect("body").as_ref(),
        image.manifest_bytes.as_slice()
    );
    assert_eq!(
        get(&c, &format!("{}/v2/library/nope/blobs/{d}", fake.url()))
            .await
            .status(),
        404
    );

    // Reset after N bytes: exactly N bytes arrive, then the connection fails.
    fake.set_fault(&path, Fault::ResetAfter(1000));
    let (got, failed) = read_all(get(&c, &url).await).await;
    assert!(
        failed && got == content[..1000],
        "reset: {} bytes, failed={failed}",
        got.len()
    );

    // Short body: N bytes of a longer Content-Length, then the connection closes.
    fake.set_fault(&path, Fault::ShortBody(500));
    let r = get(&c, &url).await;
    assert_eq!(r.headers()["content-length"], "200000");
    let (got, failed) = read_all(r).await;
    assert!(
        failed && got == content[..500],
        "short: {} bytes",
        got.len()
    );

    // Wrong bytes: same length, different digest.
    fake.set_fault(&path, Fault::WrongBytes);
    let got = get(&c, &url).await.bytes().await.expect("body");
    assert_eq!(got.len(), content.len());
    assert_ne!(Digest::sha256_of(&got), d);

    // Statuses; a limited fault passes after its turns.
    for status in [500, 502, 503] {
        fake.set_fault_times(&path, Fault::status(status), 1);
        assert_eq!(get(&c, &url).await.status(), status);
        assert_eq!(get(&c, &url).await.status(), 200);
    }
    fake.set_fault(&path, Fault::too_many_requests(7));
    let r = get(&c, &url).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");

    // Stall before the headers: nothing comes until released.
    fake.set_fault(&path, Fault::Stall);
    outpost::install_crypto_provider();
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    assert!(
        quick
            .get(&url)
            .send()
            .await
            .expect_err("stalls")
            .is_timeout()
    );
    let stalled = fake.stalls_reached();
    let pending = tokio::spawn({
        let (c, url) = (c.clone(), url.clone());
        async move {
            c.get(&url)
                .send()
                .await
                .expect("send")
                .bytes()
                .await
                .expect("body")
        }
    });
    common::process::wait_until(Duration::from_secs(5), "second stall", || {
        fake.stalls_reached() > stalled
    });
    fake.clear_faults();
    fake.release_stalls();
    assert_eq!(pending.await.expect("join").as_ref(), content.as_slice());

    // Stall after N bytes: the first N arrive, the rest only after release.
    fake.set_fault(&path, Fault::StallAfter(4096));
    let mut r = get(&c, &url).await;
    let mut got = Vec::new();
    while got.len() < 4096 {
        got.extend_from_slice(&r.chunk().await.expect("chunk").expect("more"));
    }
    assert_eq!(got, content[..4096]);
    let next = tokio::time::timeout(Duration::from_millis(300), r.chunk()).await;
    assert!(next.is_err(), "nothing more before the release");
    fake.release_stalls();
    let (rest, failed) = read_all(r).await;
    got.extend(rest);
    assert!(!failed && got == content);

    // Slow: the first chunk arrives long before the last.
    fake.set_fault(
        &path,
        Fault::Slow {
            chunk: 20_000,
            delay: Duration::from_millis(50),
        },
    );
    let start = Instant::now();
    let mut r = get(&c, &url).await;
    let first = r.chunk().await.expect("chunk").expect("some");
    let first_at = start.elapsed();
    let (rest, _) = read_all(r).await;
    let total = start.elapsed();
    assert_eq!([first.to_vec(), rest].concat(), content);
    assert!(
        first_at < total / 2 && total >= Duration::from_millis(450),
        "first chunk after {first_at:?}, all after {total:?}"
    );

    // Delay before answering.
    fake.set_fault(&path, Fault::Delay(Duration::from_millis(300)));
    let start = Instant::now();
    assert_eq!(get(&c, &url).await.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(300));
    fake.clear_faults();

    // Down: connections refused; up: same port, same content. Fresh clients: going down
    // cuts open connections, so a pooled one would fail differently (reset on reuse).
    fake.set_down(true);
    let e = client_no_redirects()
        .get(&url)
        .send()
        .await
        .expect_err("down");
    assert!(e.is_connect(), "{e:?}");
    fake.set_down(false);
    let r = get(&client_no_redirects(), &url).await;
    assert_eq!(r.bytes().await.expect("body").as_ref(), content.as_slice());

    // Every request was counted, by method and path, with its query.
    assert_eq!(fake.count("HEAD", &path), 1);
    assert_eq!(fake.count("GET", &path), 18);
    let _ = get(&c, &format!("{url}?ns=docker.io")).await;
    assert_eq!(fake.count("GET", &path), 19);
    assert_eq!(
        fake.requests()
            .last()
            .and_then(|r| r.query.clone())
            .as_deref(),
        Some("ns=docker.io")
    );
}

/// containerd fetches an image through hosts.toml from the real registry as a plain-http
/// mirror, byte-identical, sending `?ns=docker.io` on every request; from the fake, the
/// hosts.toml header arrives too.
#[test]
fn containerd_pulls_through_hosts_toml() {
    let dir = tmp();
    let up = UpstreamRegistry::start(&dir.path().join("upstream"), UpstreamOptions::default());
    let mut layout = Layout::new(&dir.path().join("src"));
    let (md, ms, manifest) = layout.image(4, &[50_000, 10], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, "v1");
    up.push_layout(&layout.dir, "library/app:v1");

    let ctd = Containerd::start(&dir.path().join("containerd"));
    let hosts = dir.path().join("hosts");
    write_hosts_toml(&hosts, "docker.io", &up.url(), None);
    let out = ctd.pull(&hosts, "docker.io/library/app:v1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ctd.content(&md).as_deref(), Some(manifest.as_slice()));
    for (name, content) in layout_blobs(&layout.dir) {
        let d: Digest = format!("sha256:{name}").parse().expect("digest");
        assert_eq!(ctd.content(&d), Some(content), "blob {name}");
    }
    let from_containerd: Vec<_> = up
        .request_log()
        .into_iter()
        .filter(|r| r.user_agent.starts_with("containerd/"))
        .collect();
    assert!(from_containerd.len() >= 4, "{from_containerd:?}");
    assert!(
        from_containerd
            .iter()
            .all(|r| r.uri.ends_with("?ns=docker.io")),
        "{from_containerd:?}"
    );

    let fake = FakeUpstream::start();
    let image = fake.add_image("library/fake", "v2", 5, &[3000]);
    let fake_hosts = dir.path().join("fake-hosts");
    write_hosts_toml(
        &fake_hosts,
        "docker.io",
        &fake.url(),
        Some(("Authorization", "Bearer k1")),
    );
    let out = ctd.pull(&fake_hosts, "docker.io/library/fake:v2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ctd.content(&image.manifest),
        Some(image.manifest_bytes.clone())
    );
    let requests = fake.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.query.as_deref(), Some("ns=docker.io"), "{r:?}");
        assert_eq!(r.headers["authorization"], "Bearer k1", "{r:?}");
        assert_ne!(r.path, "/v2/", "containerd sends no ping to a mirror");
    }
}
