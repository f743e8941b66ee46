//! Mirroring from a real central registry (Debian's docker-registry): what a run fetches,
//! counted in the registry's access log; that an unchanged rerun fetches nothing; and that
//! afterwards, with the central registry stopped, every mirrored tag pulls through Outpost
//! by both routing forms, byte-identical, while unselected tags and platforms are absent.

mod common;

use common::upstream::{UpstreamOptions, UpstreamRegistry};
use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

async fn get(server: &Server, path: &str, accept: &str) -> reqwest::Response {
    client()
        .get(server.url(path))
        .header("Accept", accept)
        .send()
        .await
        .expect("send")
}

fn mirror_run(server: &Server) -> (bool, String) {
    let out = outpost(&[
        "mirror",
        "run",
        "--config",
        server.config.to_str().expect("utf8"),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_run_fetches_the_selection_once_and_serves_it_offline() {
    let dir = tmp();
    let mut up = UpstreamRegistry::start(&dir.path().join("central"), UpstreamOptions::default());
    // team/app: two versions in range, one out of it, and tags that are not versions.
    let mut app = Layout::new(&dir.path().join("app"));
    let mut images = Vec::new();
    for (seed, tag) in [(1, "v1.0.0"), (2, "v1.1.0"), (3, "v2.0.0"), (4, "nightly")] {
        let (digest, size, body) = app.image(seed, &[3000 + seed as usize], "amd64");
        app.tag(OCI_MANIFEST, &digest, size, tag);
        images.push((tag, digest, body));
    }
    for tag in ["v1.0.0", "v1.1.0", "v2.0.0", "nightly"] {
        up.push_layout(&app.dir, &format!("team/app:{tag}"));
    }
    // team/base: a two-platform index, of which the job keeps linux/amd64.
    let mut base = Layout::new(&dir.path().join("base"));
    let (index, index_size) = base.multi_arch(10);
    base.tag(OCI_INDEX, &index, index_size, "v1.5.0");
    up.push_layout(&base.dir, "team/base:v1.5.0");
    let index_body = std::fs::read(base.dir.join("blobs/sha256").join(index.hex())).expect("index");
    let index_json: serde_json::Value = serde_json::from_slice(&index_body).expect("json");
    let child = |arch: &str| {
        index_json["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .find(|m| m["platform"]["architecture"] == arch)
            .and_then(|m| m["digest"].as_str())
            .expect("child")
            .to_owned()
    };
    let (amd64, arm64) = (child("amd64"), child("arm64"));

    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(
        dir.path(),
        &issuer,
        &format!(
            "[[upstream]]\nname = \"central.corp\"\nurl = \"{}\"\n\
             [[access]]\nrepositories = [\"central.corp/**\"]\nanonymous = [\"pull\"]\n\
             [[mirror]]\nname = \"apps\"\nupstream = \"central.corp\"\n\
             repositories = [\"team/app\", \"team/base\"]\ntags = [\"v*\"]\n\
             semver = \">=1.0.0, <2\"\nplatforms = [\"linux/amd64\"]\nconcurrency = 2\n",
            up.url()
        ),
    );
    let blob_gets_before = up.requests("GET", "/blobs/sha256:");
    assert_eq!(blob_gets_before, 0);

    // Through the running daemon (the CLI finds the store in use and asks it).
    let (ok, out) = mirror_run(&server);
    eprintln!("first run:\n{out}");
    assert!(ok, "{out}");
    assert!(out.contains("apps: ok"), "{out}");
    assert!(
        out.contains("3 added, 0 updated, 0 unchanged, 0 failed"),
        "{out}"
    );
    // Two single-platform images (config + layer each) and the amd64 image of the index
    // (config + two layers): 7 blobs, each fetched once; the arm64 image never.
    assert_eq!(up.requests("GET", "/blobs/sha256:"), 7, "{out}");
    assert_eq!(up.requests("GET", &format!("/manifests/{arm64}")), 0);
    assert_eq!(up.requests("GET", &format!("/manifests/{amd64}")), 1);
    assert_eq!(up.requests("GET", "/manifests/nightly"), 0);
    assert_eq!(up.requests("GET", "/manifests/v2.0.0"), 0);

    // An unchanged rerun: one HEAD per selected tag, no blob and no manifest GET.
    let manifest_gets = up.requests("GET", "/manifests/");
    let heads = up.requests("HEAD", "/manifests/");
    let (ok, out) = mirror_run(&server);
    eprintln!("rerun:\n{out}");
    assert!(ok, "{out}");
    assert!(
        out.contains("0 added, 0 updated, 3 unchanged, 0 failed"),
        "{out}"
    );
    assert_eq!(up.requests("GET", "/blobs/sha256:"), 7, "{out}");
    assert_eq!(up.requests("GET", "/manifests/"), manifest_gets);
    assert_eq!(up.requests("HEAD", "/manifests/") - heads, 3);

    let status = outpost(&[
        "mirror",
        "status",
        "--config",
        server.config.to_str().expect("utf8"),
    ]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    eprintln!("status:\n{status}");
    assert!(
        status.contains("apps: last run") && status.contains("ok"),
        "{status}"
    );

    // The central registry goes away: the mirror is what the site has.
    up.stop();
    for (tag, digest, body) in &images[..2] {
        let r = get(
            &server,
            &format!("/v2/central.corp/team/app/manifests/{tag}"),
            OCI_MANIFEST,
        )
        .await;
        assert_eq!(r.status(), 200, "{tag} by path prefix");
        assert_eq!(r.bytes().await.expect("body").as_ref(), body.as_slice());
        let r = get(
            &server,
            &format!("/v2/team/app/manifests/{digest}?ns=central.corp"),
            OCI_MANIFEST,
        )
        .await;
        assert_eq!(r.status(), 200, "{tag} by digest through ?ns=");
        let manifest: serde_json::Value = serde_json::from_slice(body).expect("json");
        let layer = manifest["layers"][0]["digest"].as_str().expect("layer");
        let r = get(
            &server,
            &format!("/v2/team/app/blobs/{layer}?ns=central.corp"),
            "*/*",
        )
        .await;
        assert_eq!(r.status(), 200, "{tag}'s layer");
        let expected =
            std::fs::read(app.dir.join("blobs/sha256").join(&layer[7..])).expect("layer");
        assert_eq!(r.bytes().await.expect("body").as_ref(), expected.as_slice());
    }
    let r = get(
        &server,
        "/v2/central.corp/team/base/manifests/v1.5.0",
        OCI_INDEX,
    )
    .await;
    assert_eq!(r.status(), 200, "the index, whole");
    assert_eq!(
        r.bytes().await.expect("body").as_ref(),
        index_body.as_slice()
    );
    let r = get(
        &server,
        &format!("/v2/central.corp/team/base/manifests/{amd64}"),
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(r.status(), 200, "the selected platform");
    for absent in [
        "/v2/central.corp/team/app/manifests/nightly".to_owned(),
        "/v2/central.corp/team/app/manifests/v2.0.0".to_owned(),
        format!("/v2/central.corp/team/base/manifests/{arm64}"),
    ] {
        let r = get(&server, &absent, OCI_MANIFEST).await;
        assert_ne!(r.status(), 200, "{absent} was not selected");
    }
    // A real client, offline: skopeo copies a mirrored tag byte-identical.
    let dest = dir.path().join("copied");
    let out = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/central.corp/team/app:v1.1.0", server.addr),
        &format!("dir:{}", dest.display()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = std::fs::read(dest.join("manifest.json")).expect("manifest");
    assert_eq!(copied, images[1].2);
}
