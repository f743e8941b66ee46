//! End-to-end tests of the hosted registry: real daemon, real skopeo, raw HTTP for the
//! protocol corners and error paths.

mod common;

use common::*;
use outpost::oci::Digest;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// skopeo pushes a single-arch image and a multi-arch index with an API key and pulls
/// them back byte-identical (through the /token flow: skopeo passes the key as Basic).
/// End to end: the real binary, as a child process.
#[test]
fn skopeo_round_trip_is_byte_identical() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start_process(dir.path(), &issuer, "");
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let creds = format!("ci:{key}");

    let mut layout = Layout::new(&dir.path().join("src"));
    let (md, ms, _) = layout.image(1, &[300_000, 5], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, "v1");
    let (id, is) = layout.multi_arch(7);
    layout.tag(OCI_INDEX, &id, is, "multi");

    for tag in ["v1", "multi"] {
        let src = format!("oci:{}:{tag}", layout.dir.display());
        let dst = format!("docker://{}/team/app:{tag}", server.addr);
        let out = skopeo(&[
            "copy",
            "--all",
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds,
            &src,
            &dst,
        ]);
        assert!(
            out.status.success(),
            "push {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let back = dir.path().join(format!("back-{tag}"));
        let src = format!("docker://{}/team/app:{tag}", server.addr);
        let dst = format!("oci:{}:{tag}", back.display());
        let out = skopeo(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--src-creds",
            &creds,
            &src,
            &dst,
        ]);
        assert!(
            out.status.success(),
            "pull {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = layout_blobs(&back);
        let want = layout_blobs(&layout.dir);
        for (name, content) in &got {
            assert_eq!(
                Some(content),
                want.get(name),
                "blob {name} differs after the round trip"
            );
        }
        let root = if tag == "v1" { &md } else { &id };
        assert!(
            got.contains_key(root.hex()),
            "{tag}: root manifest pulled under its original digest"
        );
    }
    // The multi-arch pull brought both platform images.
    assert!(layout_blobs(&dir.path().join("back-multi")).len() >= 7);
    // The key never appears in the daemon's logs.
    assert!(
        !server.logs().contains(&key),
        "an API key leaked into the logs"
    );
}

/// Regression for the class of bug where any blob on disk was served through any
/// repository: a blob pushed to team/a must be 404 BLOB_UNKNOWN through team/b.
#[tokio::test(flavor = "multi_thread")]
async fn blob_of_other_repository_is_not_served() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(dir.path(), &issuer, "");
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let (_, _, layer) = push_image(&server, &key, "team/a", "v1", 3).await;
    let c = client();
    let own = c
        .get(server.url(&format!("/v2/team/a/blobs/{layer}")))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(own.status(), 200);
    assert_eq!(
        own.bytes().await.expect("body").as_ref(),
        bytes(3, 10_000).as_slice()
    );
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let other = c
            .request(
                method.clone(),
                server.url(&format!("/v2/team/b/blobs/{layer}")),
            )
            .bearer_auth(&key)
            .send()
            .await
            .expect("send");
        assert_eq!(other.status(), 404, "{method} through another repository");
        if method == reqwest::Method::GET {
            assert_eq!(error_code(other).await, "BLOB_UNKNOWN");
        }
    }
}

/// Stored blobs go out through sendfile on plain HTTP/1.1 and through memory on h2c:
/// both byte-identical, whole and in ranges across the 1 MiB chunk boundary, and
/// several responses in a row on one kept-alive connection stay in step.
#[tokio::test(flavor = "multi_thread")]
async fn blob_bytes_are_identical_over_http1_and_h2c() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(dir.path(), &issuer, "");
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let content = bytes(11, 3 * 1024 * 1024 + 4321);
    let (d, status) = push_blob(&server, &key, "team/big", &content).await;
    assert_eq!(status, 201);
    let url = server.url(&format!("/v2/team/big/blobs/{d}"));
    let h1 = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(1)
        .build()
        .expect("client");
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let ranges: [(usize, usize); 3] = [
        (0, content.len() - 1),
        (1024 * 1024 - 7, 2 * 1024 * 1024 + 9),
        (content.len() - 5, content.len() - 1),
    ];
    for (name, c) in [("http/1.1", &h1), ("h2c", &h2)] {
        for round in 0..2 {
            let r = c.get(&url).bearer_auth(&key).send().await.expect("send");
            assert_eq!(r.status(), 200, "{name}");
            let body = r.bytes().await.expect("body");
            assert!(
                body.as_ref() == content.as_slice(),
                "{name} round {round}: whole blob differs"
            );
            for (start, end) in ranges {
                let r = c
                    .get(&url)
                    .bearer_auth(&key)
                    .header("Range", format!("bytes={start}-{end}"))
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 206, "{name}");
                let body = r.bytes().await.expect("body");
                assert!(
                    body.as_ref() == &content[start..=end],
                    "{name}: range {start}-{end} differs"
                );
            }
            let r = c.head(&url).bearer_auth(&key).send().await.expect("send");
            let length = r.headers()["content-length"].to_str().expect("ascii");
            assert_eq!(length, content.len().to_string(), "{name}");
        }
    }
    // Regression (issue 11): every blob sent whole, through sendfile too, and every HEAD
    // was logged `complete=false`. Each body was read to its end, so none may say so.
    let logs = server.logs();
    let blob_lines: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.contains(" request ")
                && (l.contains("route=\"get_blob\"") || l.contains("route=\"head_blob\""))
        })
        .collect();
    // Two clients, two rounds, each: one whole GET, three ranges, one HEAD.
    assert_eq!(blob_lines.len(), 2 * 2 * 5, "{logs}");
    assert!(
        blob_lines.iter().all(|l| l.contains("complete=true")),
        "{logs}"
    );
    // Durations are whole microseconds (issue 12: no float noise such as 0.24952900000000003).
    for line in &blob_lines {
        let us = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("elapsed_us="))
            .unwrap_or_else(|| panic!("no elapsed_us in {line}"));
        assert!(us.parse::<u64>().is_ok(), "{line}");
    }
}

/// Pipelined HTTP/1.1: several requests written at once, answered in order on one
/// connection. The sendfile path queues file ranges per connection, so the bytes of each
/// response must still land in its own body, whatever mix of blobs, ranges, HEADs and
/// manifests comes down the pipe.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_get_their_own_bytes() {
    use std::io::{Read, Write};

    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(dir.path(), &issuer, "");
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let a = bytes(21, 1024 * 1024 + 17);
    let b = bytes(22, 70_000);
    let (da, _) = push_blob(&server, &key, "team/pipe", &a).await;
    let (db, _) = push_blob(&server, &key, "team/pipe", &b).await;
    let (_, manifest, _) = push_image(&server, &key, "team/pipe", "v1", 23).await;

    let requests = [
        ("GET", format!("/v2/team/pipe/blobs/{da}"), None),
        (
            "GET",
            format!("/v2/team/pipe/blobs/{db}"),
            Some("bytes=100-199"),
        ),
        ("HEAD", format!("/v2/team/pipe/blobs/{da}"), None),
        ("GET", "/v2/team/pipe/manifests/v1".to_owned(), None),
        ("GET", format!("/v2/team/pipe/blobs/{db}"), None),
        (
            "GET",
            format!("/v2/team/pipe/blobs/{da}"),
            Some("bytes=1048570-"),
        ),
    ];
    let expected: Vec<Vec<u8>> = vec![
        a.clone(),
        b[100..200].to_vec(),
        Vec::new(),
        manifest.clone(),
        b.clone(),
        a[1_048_570..].to_vec(),
    ];
    let mut wire = String::new();
    for (method, path, range) in &requests {
        wire.push_str(&format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\n\
             Accept: application/vnd.oci.image.manifest.v1+json\r\n",
            server.addr
        ));
        if let Some(r) = range {
            wire.push_str(&format!("Range: {r}\r\n"));
        }
        wire.push_str("\r\n");
    }
    let addr = server.addr.clone();
    let bodies = tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
        conn.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .expect("timeout");
        conn.write_all(wire.as_bytes()).expect("write");
        let mut bodies = Vec::new();
        let mut buf = Vec::new();
        for (method, _, _) in requests {
            // Read until the header block is complete.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 65536];
                let n = conn.read(&mut chunk).expect("read");
                assert!(n > 0, "connection closed early");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            let len = if method == "HEAD" { 0 } else { len };
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 65536];
                let n = conn.read(&mut chunk).expect("read");
                assert!(n > 0, "connection closed early");
                buf.extend_from_slice(&chunk[..n]);
            }
            bodies.push(buf[head_end..head_end + len].to_vec());
            buf.drain(..head_end + len);
        }
        bodies
    })
    .await
    .expect("client");
    for (i, (got, want)) in bodies.iter().zip(&expected).enumerate() {
        assert!(
            got == want,
            "response {i}: {} bytes, wanted {}",
            got.len(),
            want.len()
        );
    }
}

/// A mount needs read access to the source: without it the registry answers 202 (a
/// plain upload session) and does not link the blob.
#[tokio::test(flavor = "multi_thread")]
async fn mount_without_read_access_to_source_does_not_link() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(dir.path(), &issuer, "");
    let owner = issuer.issue("owner", &["secret/**"], "pull,push", "1h");
    let (_, _, layer) = push_image(&server, &owner, "secret/app", "v1", 4).await;
    let intruder = issuer.issue("intruder", &["mine/**"], "pull,push", "1h");
    let c = client();
    let r = c
        .post(server.url(&format!(
            "/v2/mine/app/blobs/uploads/?mount={layer}&from=secret/app"
        )))
        .bearer_auth(&intruder)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202, "mount must fall back to an upload");
    let r = c
        .head(server.url(&format!("/v2/mine/app/blobs/{layer}")))
        .bearer_auth(&intruder)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404, "the blob must not have been linked");
    // With read access the same mount succeeds.
    let both = issuer.issue("both", &["secret/**", "mine/**"], "pull,push", "1h");
    let r = c
        .post(server.url(&format!(
            "/v2/mine/app/blobs/uploads/?mount={layer}&from=secret/app"
        )))
        .bearer_auth(&both)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    let r = c
        .head(server.url(&format!("/v2/mine/app/blobs/{layer}")))
        .bearer_auth(&both)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_upload_with_out_of_order_chunk_and_status() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(dir.path(), &issuer, "");
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let c = client();
    let content = bytes(9, 100_000);
    let r = c
        .post(server.url("/v2/team/app/blobs/uploads/"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().expect("ascii").to_owned();
    let url = server.url(&location);
    let r = c
        .patch(&url)
        .bearer_auth(&key)
        .header("Content-Range", "0-59999")
        .header("Content-Type", "application/octet-stream")
        .body(content[..60_000].to_vec())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-59999");
    // A chunk that does not start at the current offset is refused with 416.
    let r = c
        .patch(&url)
        .bearer_auth(&key)
        .header("Content-Range", "70000-79999")
        .body(content[70_000..80_000].to_vec())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 416);
    let r = c.get(&url).bearer_auth(&key).send().await.expect("send");
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["range"],
        "0-59999",
        "the refused chunk left no trace"
    );
    let r = c
        .patch(&url)
        .bearer_auth(&key)
        .header("Content-Range", "60000-99999")
        .body(content[60_000..].to_vec())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    // Wrong digest at the end: DIGEST_INVALID and nothing stored.
    let wrong = Digest::sha256_of(b"something else");
    let r = c
        .put(format!("{url}?digest={wrong}"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c
        .head(server.url(&format!("/v2/team/app/blobs/{wrong}")))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);

    // A fresh chunked upload completed correctly.
    let r = c
        .post(server.url("/v2/team/app/blobs/uploads/"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    let url = server.url(r.headers()["location"].to_str().expect("ascii"));
    let r = c
        .patch(&url)
        .bearer_auth(&key)
        .body(content[..50_000].to_vec())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    let d = Digest::sha256_of(&content);
    let r = c
        .put(format!("{url}?digest={d}"))
        .bearer_auth(&key)
        .body(content[50_000..].to_vec())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    let r = c
        .get(server.url(&format!("/v2/team/app/blobs/{d}")))
        .bearer_auth(&key)
        .header("Range", "bytes=10-19")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(r.bytes().await.expect("body").as_ref(), &content[10..20]);
    let r = c
        .get(server.url(&format!("/v2/team/app/blobs/{d}")))
        .bearer_auth(&key)
        .header("Range", "bytes=100000-")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 416);
    // Unknown upload sessions.
    let r = c
        .get(server.url("/v2/team/app/blobs/uploads/0123456789abcdef0123456789abcdef"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn manifest_errors_and_content_management() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(dir.path(), &issuer, "");
    let key = issuer.issue("ci", &["team/**"], "pull,push,delete", "1h");
    let c = client();
    // A manifest whose blobs are not in the repository.
    let missing = Digest::sha256_of(b"missing");
    let body = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": missing.to_string(), "size": 7},
        "layers": []
    })
    .to_string();
    let r = push_manifest(
        &server,
        &key,
        "team/app",
        "v1",
        OCI_MANIFEST,
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    let r = push_manifest(&server, &key, "team/app", "v1", OCI_MANIFEST, b"{not json").await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    // A reference that cannot be a tag: invalid to push (400), unknown to fetch (404),
    // as the distribution-spec conformance suites expect.
    let r = push_manifest(&server, &key, "team/app", "-bad", OCI_MANIFEST, b"{}").await;
    assert_eq!(r.status(), 400);
    let r = client()
        .get(server.url("/v2/team/app/manifests/-bad"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let big = vec![b' '; 4 * 1024 * 1024 + 1];
    let r = push_manifest(&server, &key, "team/app", "v1", OCI_MANIFEST, &big).await;
    assert_eq!(r.status(), 413);
    let r = push_manifest(
        &server,
        &key,
        "team/app",
        &format!("sha256:{}", "0".repeat(64)),
        OCI_MANIFEST,
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // Hostile names and digests.
    for path in [
        "/v2/team/..%2Fetc/manifests/v1",
        "/v2/Team/app/manifests/v1",
        "/v2/team/app/blobs/sha256:zz",
    ] {
        let r = c
            .get(server.url(path))
            .bearer_auth(&key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{path}");
    }

    // Tags, pagination and Link.
    let mut digests = Vec::new();
    for (i, tag) in ["c", "a", "b", "d"].iter().enumerate() {
        digests.push(
            push_image(&server, &key, "team/app", tag, 20 + i as u64)
                .await
                .0,
        );
    }
    let r = c
        .get(server.url("/v2/team/app/tags/list?n=2"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    let link = r.headers()["link"].to_str().expect("ascii").to_owned();
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(link, "</v2/team/app/tags/list?n=2&last=b>; rel=\"next\"");
    let r = c
        .get(server.url("/v2/team/app/tags/list?n=2&last=b"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert!(r.headers().get("link").is_none());
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["tags"], serde_json::json!(["c", "d"]));
    let r = c
        .get(server.url("/v2/team/nothing/tags/list"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");

    // HEAD carries digest, length and type.
    let r = c
        .head(server.url("/v2/team/app/manifests/a"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digests[1].as_str());
    assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
    assert!(
        r.headers()["content-length"]
            .to_str()
            .expect("ascii")
            .parse::<u64>()
            .expect("number")
            > 100
    );

    // Referrers with artifactType filtering.
    let subject = &digests[0];
    let (cfg, st) = push_blob(&server, &key, "team/app", b"{}").await;
    assert_eq!(st, 201);
    for (i, at) in [
        "application/vnd.example.sig",
        "application/vnd.example.sbom",
    ]
    .iter()
    .enumerate()
    {
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": at,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cfg.to_string(), "size": 2},
            "layers": [], "annotations": {"n": i.to_string()},
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": 10}
        })
        .to_string();
        let d = Digest::sha256_of(m.as_bytes());
        let r = push_manifest(
            &server,
            &key,
            "team/app",
            d.as_str(),
            OCI_MANIFEST,
            m.as_bytes(),
        )
        .await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["oci-subject"], subject.as_str());
    }
    let r = c
        .get(server.url(&format!("/v2/team/app/referrers/{subject}")))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["manifests"].as_array().map(Vec::len), Some(2));
    let r = c
        .get(server.url(&format!(
            "/v2/team/app/referrers/{subject}?artifactType=application/vnd.example.sbom"
        )))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["manifests"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );

    // Deletes: tag, manifest by digest, blob.
    let r = c
        .delete(server.url("/v2/team/app/manifests/d"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    let r = c
        .delete(server.url(&format!("/v2/team/app/manifests/{}", digests[1])))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    let r = c
        .get(server.url("/v2/team/app/manifests/a"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404, "deleting a manifest removes its tags");
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = c
        .delete(server.url(&format!("/v2/team/app/blobs/{cfg}")))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    let r = c
        .get(server.url(&format!("/v2/team/app/blobs/{cfg}")))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_refused_when_they_should_be() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let other = Issuer::new(&dir.path().join("other"));
    let server = Server::start(dir.path(), &issuer, "");
    let c = client();
    let content = b"layer";
    let d = Digest::sha256_of(content);
    let post = |key: Option<String>, repo: &str| {
        let mut r = c
            .post(server.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")))
            .body(content.to_vec());
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    // Anonymous: 401 with a token-flow challenge naming the scope.
    let r = post(None, "team/app").await.expect("send");
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let realm = format!(
        "Bearer realm=\"http://{}/token\",service=\"outpost\"",
        server.addr
    );
    assert!(challenge.starts_with(&realm), "{challenge}");
    assert!(
        challenge.contains("scope=\"repository:team/app:pull,push\""),
        "{challenge}"
    );
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    // Wrong issuer, tampered payload, expired: 401.
    let foreign = other.issue("ci", &["team/**"], "pull,push", "1h");
    let good = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let mut tampered = good.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let short = issuer.issue("ci", &["team/**"], "pull,push", "1s");
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    for (what, key) in [
        ("foreign issuer", &foreign),
        ("tampered", &tampered),
        ("expired", &short),
    ] {
        let r = post(Some(key.clone()), "team/app").await.expect("send");
        assert_eq!(r.status(), 401, "{what}");
        let body = r.text().await.expect("body");
        assert!(!body.contains(key.as_str()), "{what}: the key was echoed");
    }
    // Out of scope, and pull-only pushing: 403 DENIED.
    let r = post(Some(good.clone()), "prod/app").await.expect("send");
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    let pull_only = issuer.issue("reader", &["team/**"], "pull", "1h");
    let r = post(Some(pull_only), "team/app").await.expect("send");
    assert_eq!(r.status(), 403);
    // The good key works, as Bearer and as a Basic password.
    let r = post(Some(good.clone()), "team/app").await.expect("send");
    assert_eq!(r.status(), 201);
    let r = c
        .head(server.url(&format!("/v2/team/app/blobs/{d}")))
        .basic_auth("anyone", Some(&good))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    // The token flow: Basic at /token, scoped token for the repository only.
    let r = c
        .get(server.url("/token?service=outpost&scope=repository:team/app:pull"))
        .basic_auth("ci", Some(&good))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    let token = v["token"].as_str().expect("token").to_owned();
    let r = c
        .head(server.url(&format!("/v2/team/app/blobs/{d}")))
        .bearer_auth(&token)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = post(Some(token), "team/app").await.expect("send");
    assert_eq!(r.status(), 403, "a pull token cannot push");
    let logs = server.logs();
    for secret in [&good, &foreign, &tampered] {
        assert!(
            !logs.contains(secret.as_str()),
            "a key leaked into the logs"
        );
    }
}

#[test]
fn config_granting_push_to_anonymous_is_rejected() {
    let dir = tmp();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\n[storage]\npath=\"d\"\n\
         [[access]]\nrepositories=[\"**\"]\nanonymous=[\"pull\",\"push\"]\n",
    )
    .expect("write");
    let out = outpost(&["config", "check", "--config", path.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("push"), "{err}");
}

/// Upload sessions over HTTP: the status answers a pull-scoped token of the principal
/// that opened the session (the newer conformance suite asks with one) and nobody else;
/// a chunked PATCH whose body is longer than its `Content-Range` is refused with 416 and
/// appends nothing; one key holds at most `storage.max_upload_sessions` sessions (429).
#[tokio::test(flavor = "multi_thread")]
async fn upload_sessions_answer_their_owner_and_hold_to_ranges_and_limits() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start_sections(
        dir.path(),
        &issuer,
        &Sections {
            storage: "max_upload_sessions = 2",
            ..Sections::default()
        },
    );
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let other = issuer.issue("other", &["team/**"], "pull,push", "1h");
    let c = client();
    let start = |key: String| {
        let c = c.clone();
        let url = server.url("/v2/team/app/blobs/uploads/");
        async move { c.post(url).bearer_auth(key).send().await.expect("send") }
    };
    let r = start(key.clone()).await;
    assert_eq!(r.status(), 202);
    let url = server.url(r.headers()["location"].to_str().expect("ascii"));

    // A pull token obtained with the same key reads the status (regression: 403).
    let r = c
        .get(server.url("/token?service=outpost&scope=repository:team/app:pull"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("token");
    let token = r.json::<serde_json::Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let r = c.get(&url).bearer_auth(&token).send().await.expect("send");
    assert_eq!(r.status(), 204, "the owner's pull token reads the status");
    for who in [&other, &token] {
        let r = c
            .patch(&url)
            .bearer_auth(who)
            .body(vec![1u8; 10])
            .send()
            .await
            .expect("send");
        assert!(
            [403, 404].contains(&r.status().as_u16()),
            "only the owner's push may write: {}",
            r.status()
        );
    }
    let r = c.get(&url).bearer_auth(&other).send().await.expect("send");
    assert_eq!(r.status(), 404, "another key does not see the session");
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");

    // Chunked (no Content-Length) with a range of 10 bytes and 1000 bytes of body.
    let chunked =
        reqwest::Body::wrap_stream(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
            bytes::Bytes::from(vec![7u8; 1000]),
        )]));
    let r = c
        .patch(&url)
        .bearer_auth(&key)
        .header("Content-Range", "0-9")
        .body(chunked)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 416);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    let r = c.get(&url).bearer_auth(&key).send().await.expect("send");
    assert_eq!(r.headers()["range"], "0-0", "nothing was appended");

    assert_eq!(start(key.clone()).await.status(), 202);
    let r = start(key.clone()).await;
    assert_eq!(r.status(), 429, "a third session for the same key");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    assert_eq!(
        start(other.clone()).await.status(),
        202,
        "another key's own"
    );
    let r = c.delete(&url).bearer_auth(&key).send().await.expect("send");
    assert_eq!(r.status(), 204);
    assert_eq!(
        start(key).await.status(),
        202,
        "the cancelled session freed a slot"
    );
}
