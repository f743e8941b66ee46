//! A full disk: writes fail with `507` and OCI JSON (never 500), `/readyz` says not ready
//! while writes cannot succeed, the reserve keeps blob data from taking the room metadata
//! commits need, and once space is freed the store recovers by itself (the metadata
//! database is reopened if a commit failed) with nothing lost.
//!
//! Needs root: the data directory is a 64 MiB tmpfs mounted by the test (scripts/test
//! and CI run as root).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use outpost::oci::Digest;

/// A tmpfs mounted at a directory; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let uid = Command::new("id").arg("-u").output().expect("id -u");
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test mounts a tmpfs and needs root (scripts/test and CI run as root)"
        );
        std::fs::create_dir_all(at).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn push_blob(server: &Server, key: &str, content: Vec<u8>) -> reqwest::Response {
    let digest = Digest::sha256_of(&content);
    client()
        .post(server.url(&format!("/v2/team/app/blobs/uploads/?digest={digest}")))
        .bearer_auth(key)
        .header("Content-Type", "application/octet-stream")
        .body(content)
        .send()
        .await
        .expect("push blob")
}

async fn put_manifest(server: &Server, key: &str, tag: &str, body: &[u8]) -> reqwest::Response {
    client()
        .put(server.url(&format!("/v2/team/app/manifests/{tag}")))
        .bearer_auth(key)
        .header("Content-Type", OCI_MANIFEST)
        .body(body.to_vec())
        .send()
        .await
        .expect("put manifest")
}

async fn ready(server: &Server) -> u16 {
    client()
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .status()
        .as_u16()
}

/// Fills the filesystem of `dir` with one file until the disk says no more.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

/// An image manifest of one config and one layer.
fn manifest(config: &Digest, config_size: usize, layer: &Digest, layer_size: usize) -> Vec<u8> {
    serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.to_string(), "size": layer_size}],
    })
    .to_string()
    .into_bytes()
}

/// Regression: after a commit failed with ENOSPC, every later write got 500 ("Previous
/// I/O error occurred. Please close and re-open the database") until a restart, even
/// after space was freed, while `/readyz` said 200.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_answers_507_and_the_store_recovers_once_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let _tmpfs = Tmpfs::mount(&data, "64m");
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start_sections(
        dir.path(),
        &issuer,
        &Sections {
            storage: "reserve = \"4MiB\"",
            ..Sections::default()
        },
    );
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");

    // An image that must survive all of this.
    let config_blob = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = bytes(1, 1 << 20);
    let (config_digest, layer_digest) =
        (Digest::sha256_of(&config_blob), Digest::sha256_of(&layer));
    assert_eq!(
        push_blob(&server, &key, config_blob.clone()).await.status(),
        201
    );
    assert_eq!(push_blob(&server, &key, layer.clone()).await.status(), 201);
    let body = manifest(
        &config_digest,
        config_blob.len(),
        &layer_digest,
        layer.len(),
    );
    assert_eq!(put_manifest(&server, &key, "v1", &body).await.status(), 201);
    assert_eq!(ready(&server).await, 200);

    // Blob data until the reserve stops it: 507 with OCI JSON, never a 500.
    let mut refused = None;
    for seed in 10..40 {
        let r = push_blob(&server, &key, bytes(seed, 8 << 20)).await;
        match r.status().as_u16() {
            201 => continue,
            status => {
                refused = Some((status, r.text().await.expect("body")));
                break;
            }
        }
    }
    let (status, text) = refused.expect("the reserve was never reached");
    assert_eq!(status, 507, "{text}");
    assert!(text.contains("\"errors\""), "{text}");

    // The rest of the disk goes too: metadata commits may now fail, and must say 507.
    let filler = data.join("filler");
    fill(&filler);
    let r = push_blob(&server, &key, bytes(99, 1000)).await;
    assert_eq!(r.status(), 507);
    for i in 0..20 {
        let status = put_manifest(&server, &key, &format!("full-{i}"), &body)
            .await
            .status()
            .as_u16();
        assert!(status == 201 || status == 507, "a tag while full: {status}");
    }
    // A manifest too big for the pages the database has left: its commit fails with
    // ENOSPC inside redb, which then refuses everything until it is reopened.
    let mut big: serde_json::Value = serde_json::from_slice(&body).expect("json");
    big["annotations"] = serde_json::json!({"padding": "x".repeat(3 << 20)});
    let big = big.to_string().into_bytes();
    let r = put_manifest(&server, &key, "big", &big).await;
    assert_eq!(r.status(), 507, "{}", r.text().await.unwrap_or_default());
    assert_eq!(ready(&server).await, 503);

    // Space comes back: writes work again without a restart, and nothing was lost.
    std::fs::remove_file(&filler).expect("free space");
    let mut recovered = false;
    for _ in 0..50 {
        if push_blob(&server, &key, bytes(100, 1000)).await.status() == 201 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "writes work again once space is freed\n{}",
        server.logs()
    );
    assert_eq!(put_manifest(&server, &key, "v2", &body).await.status(), 201);
    assert_eq!(ready(&server).await, 200);
    let r = client()
        .get(server.url("/v2/team/app/manifests/v1"))
        .bearer_auth(&key)
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("get");
    assert_eq!(r.bytes().await.expect("body").as_ref(), body.as_slice());
    let r = client()
        .get(server.url(&format!("/v2/team/app/blobs/{layer_digest}")))
        .bearer_auth(&key)
        .send()
        .await
        .expect("get");
    assert_eq!(r.bytes().await.expect("body").as_ref(), layer.as_slice());
    assert!(!server.logs().contains("status=500"), "{}", server.logs());
}
