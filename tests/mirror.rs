//! Mirroring from a real central registry (Debian's docker-registry): what a run fetches,
//! counted in the registry's access log; that an unchanged rerun fetches nothing; and that
//! afterwards, with the central registry stopped, every mirrored tag pulls through Outpost
//! by both routing forms, byte-identical, while unselected tags and platforms are absent.
//! Also: referrers through the tag schema, repository globs, resuming a cut-off blob with
//! `Range` (the cut is the one fault the registry's CDN stand-in injects), and a daemon
//! killed with SIGKILL in the middle of a run.

mod common;

use common::upstream::{UpstreamOptions, UpstreamRegistry};
use common::*;
use outpost::oci::Digest;

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
    // Not a terminal: progress comes as plain lines, one per tag.
    assert!(
        out.contains("apps: central.corp/team/app:v1.0.0: added"),
        "{out}"
    );
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
    assert!(
        out.contains("blobs: 0 fetched (0 bytes), 7 already stored"),
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
        "/v2/central.corp/team/app/manifests/nightly",
        "/v2/central.corp/team/app/manifests/v2.0.0",
    ] {
        let r = get(&server, absent, OCI_MANIFEST).await;
        assert_ne!(r.status(), 200, "{absent} was not selected");
    }
    // The platform the job left out: a clear 404 naming it, not an outage.
    let r = get(
        &server,
        &format!("/v2/central.corp/team/base/manifests/{arm64}"),
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(r.status(), 404);
    let text = r.text().await.expect("body");
    assert!(
        text.contains("MANIFEST_UNKNOWN") && text.contains("linux/arm64"),
        "{text}"
    );
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
    // And containerd, offline, through the hosts.toml Outpost writes (the `?ns=` form).
    let ctrd = common::containerd::Containerd::start(&dir.path().join("containerd"));
    let hosts = dir.path().join("hosts");
    common::containerd::generate_hosts_toml(&server.config, &hosts, &[]);
    let out = ctrd.pull(&hosts, "central.corp/team/app:v1.0.0");
    assert!(
        out.status.success(),
        "ctr pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&images[0].2).expect("json");
    let layer: Digest = manifest["layers"][0]["digest"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .expect("layer");
    let expected = std::fs::read(app.dir.join("blobs/sha256").join(layer.hex())).expect("layer");
    assert_eq!(
        ctrd.content(&images[0].1).as_deref(),
        Some(images[0].2.as_slice())
    );
    assert_eq!(ctrd.content(&layer).as_deref(), Some(expected.as_slice()));
}

/// Uploads `content` to `repo` of the registry at `base` (POST, then one PUT).
async fn push_blob(base: &str, repo: &str, content: &[u8]) -> String {
    let digest = format!("sha256:{}", hex_sha256(content));
    let r = client()
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("start upload");
    assert_eq!(r.status(), 202);
    let location = r
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .expect("location")
        .to_owned();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = client()
        .put(format!("{location}{sep}digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .body(content.to_vec())
        .send()
        .await
        .expect("push blob");
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    digest
}

/// Puts manifest `body` at `repo:reference`; returns its digest.
async fn push_manifest(
    base: &str,
    repo: &str,
    reference: &str,
    media: &str,
    body: &[u8],
) -> String {
    let r = client()
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("Content-Type", media)
        .body(body.to_vec())
        .send()
        .await
        .expect("push manifest");
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    format!("sha256:{}", hex_sha256(body))
}

fn hex_sha256(content: &[u8]) -> String {
    Digest::sha256_of(content).hex().to_owned()
}

/// An OCI artifact manifest (empty config, one layer of `payload`), optionally with a
/// subject; its blobs pushed to `repo`. Returns the manifest's bytes.
async fn artifact(
    base: &str,
    repo: &str,
    artifact_type: &str,
    payload: &[u8],
    subject: Option<(&str, usize)>,
) -> Vec<u8> {
    let empty = push_blob(base, repo, b"{}").await;
    let layer = push_blob(base, repo, payload).await;
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": artifact_type, "digest": layer, "size": payload.len()}],
    });
    if let Some((digest, size)) = subject {
        m["subject"] =
            serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": size});
    }
    m.to_string().into_bytes()
}

/// With `referrers = true`, against a registry without the referrers API (distribution
/// 2.8): the cosign signature tag, the SBOM listed by the `sha256-<hex>` fallback index
/// and the SBOM's own signature are mirrored with the image; offline, Outpost serves the
/// tags and its referrers API lists the SBOM. The repositories come from a glob, expanded
/// through the registry's `_catalog`; a repository outside it is never touched.
#[tokio::test(flavor = "multi_thread")]
async fn referrers_and_globs_are_mirrored_and_served_offline() {
    let dir = tmp();
    let mut up = UpstreamRegistry::start(&dir.path().join("central"), UpstreamOptions::default());
    let base = up.url();
    let mut app = Layout::new(&dir.path().join("app"));
    let (image, image_size, _) = app.image(21, &[5000], "amd64");
    app.tag(OCI_MANIFEST, &image, image_size, "v1");
    for repo in ["team/app", "team/other", "infra/tool"] {
        up.push_layout(&app.dir, &format!("{repo}:v1"));
    }
    let schema = format!("sha256-{}", image.hex());
    let sig = artifact(
        &base,
        "team/app",
        "application/vnd.dev.cosign.simplesigning.v1+json",
        b"image signature",
        None,
    )
    .await;
    push_manifest(
        &base,
        "team/app",
        &format!("{schema}.sig"),
        OCI_MANIFEST,
        &sig,
    )
    .await;
    let sbom = artifact(
        &base,
        "team/app",
        "application/spdx+json",
        b"{\"spdxVersion\":\"SPDX-2.3\"}",
        Some((&image.to_string(), image_size)),
    )
    .await;
    let sbom_digest = format!("sha256:{}", hex_sha256(&sbom));
    push_manifest(&base, "team/app", &sbom_digest, OCI_MANIFEST, &sbom).await;
    let fallback = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sbom_digest, "size": sbom.len(), "artifactType": "application/spdx+json"}],
    })
    .to_string();
    push_manifest(&base, "team/app", &schema, OCI_INDEX, fallback.as_bytes()).await;
    let sbom_sig = artifact(
        &base,
        "team/app",
        "application/vnd.dev.cosign.simplesigning.v1+json",
        b"sbom signature",
        None,
    )
    .await;
    let sbom_schema = format!("sha256-{}.sig", &sbom_digest[7..]);
    push_manifest(&base, "team/app", &sbom_schema, OCI_MANIFEST, &sbom_sig).await;

    let issuer = Issuer::new(&dir.path().join("keys"));
    let mut server = Server::start(
        dir.path(),
        &issuer,
        &format!(
            "[[upstream]]\nname = \"central.corp\"\nurl = \"{base}\"\n\
             [[access]]\nrepositories = [\"central.corp/**\"]\nanonymous = [\"pull\"]\n\
             [[mirror]]\nname = \"signed\"\nupstream = \"central.corp\"\n\
             repositories = [\"team/*\"]\ntags = [\"v1\"]\nreferrers = true\n"
        ),
    );
    let infra = |up: &UpstreamRegistry| {
        up.requests("GET", "/v2/infra/") + up.requests("HEAD", "/v2/infra/")
    };
    let infra_before = infra(&up);
    let (ok, out) = mirror_run(&server);
    eprintln!("{out}");
    assert!(ok, "{out}");
    assert!(
        out.contains("2 added, 0 updated, 0 unchanged, 0 failed"),
        "{out}"
    );
    assert!(up.requests("GET", "/v2/_catalog") >= 1);
    assert_eq!(infra(&up), infra_before, "outside the glob");
    assert_eq!(up.requests("GET", &format!("/manifests/{sbom_digest}")), 1);

    // An unchanged rerun fetches no blob.
    let blob_gets = up.requests("GET", "/blobs/");
    let (ok, out) = mirror_run(&server);
    assert!(ok, "{out}");
    assert!(
        out.contains("0 added, 0 updated, 2 unchanged, 0 failed"),
        "{out}"
    );
    assert_eq!(up.requests("GET", "/blobs/"), blob_gets);

    up.stop();
    for (tag, body) in [
        (format!("{schema}.sig"), &sig),
        (sbom_schema.clone(), &sbom_sig),
    ] {
        let r = get(
            &server,
            &format!("/v2/central.corp/team/app/manifests/{tag}"),
            OCI_MANIFEST,
        )
        .await;
        assert_eq!(r.status(), 200, "{tag}");
        assert_eq!(r.bytes().await.expect("body").as_ref(), body.as_slice());
    }
    let r = get(
        &server,
        &format!("/v2/central.corp/team/app/manifests/{schema}"),
        OCI_INDEX,
    )
    .await;
    assert_eq!(r.status(), 200, "the fallback index tag");
    let r = get(
        &server,
        &format!("/v2/central.corp/team/app/referrers/{image}"),
        OCI_INDEX,
    )
    .await;
    assert_eq!(r.status(), 200);
    let listed: serde_json::Value = r.json().await.expect("referrers json");
    assert!(
        listed["manifests"]
            .as_array()
            .is_some_and(|m| m.iter().any(|d| d["digest"] == sbom_digest.as_str())),
        "{listed}"
    );
    let sbom_json: serde_json::Value = serde_json::from_slice(&sbom).expect("json");
    let layer = sbom_json["layers"][0]["digest"].as_str().expect("layer");
    let r = get(
        &server,
        &format!("/v2/central.corp/team/app/blobs/{layer}"),
        "*/*",
    )
    .await;
    assert_eq!(r.status(), 200, "the SBOM itself");
    let r = get(
        &server,
        "/v2/central.corp/team/other/manifests/v1",
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(r.status(), 200, "the glob's second repository");
    server.stop();
}

/// A central registry whose blobs come through its CDN stand-in (where tests inject
/// cuts), holding `repo:v1` and `repo:v2`: one-layer images of the given (seed, layer
/// size). Returns it and the two manifests' bytes.
fn cdn_central(
    dir: &std::path::Path,
    repo: &str,
    images: [(u64, usize); 2],
) -> (UpstreamRegistry, [Vec<u8>; 2]) {
    let up = UpstreamRegistry::start(
        &dir.join("central"),
        UpstreamOptions {
            redirect: true,
            ..UpstreamOptions::default()
        },
    );
    let mut app = Layout::new(&dir.join("app"));
    let bodies = [("v1", images[0]), ("v2", images[1])].map(|(tag, (seed, size))| {
        let (digest, len, body) = app.image(seed, &[size], "amd64");
        app.tag(OCI_MANIFEST, &digest, len, tag);
        body
    });
    for tag in ["v1", "v2"] {
        up.push_layout(&app.dir, &format!("{repo}:{tag}"));
    }
    (up, bodies)
}

/// Config lines for the central registry at `url` (`central.corp`, anonymous pull) and
/// one `[[mirror]]` job per (name, repository, tag, extra lines).
fn mirror_config(url: &str, jobs: &[(&str, &str, &str, &str)]) -> String {
    let mut text = format!(
        "[[upstream]]\nname = \"central.corp\"\nurl = \"{url}\"\n\
         [[access]]\nrepositories = [\"central.corp/**\"]\nanonymous = [\"pull\"]\n"
    );
    for (name, repo, tag, extra) in jobs {
        text.push_str(&format!(
            "[[mirror]]\nname = \"{name}\"\nupstream = \"central.corp\"\n\
             repositories = [\"{repo}\"]\ntags = [\"{tag}\"]\n{extra}"
        ));
    }
    text
}

/// The layer's digest and size of a one-layer image manifest.
fn only_layer(manifest: &[u8]) -> (String, u64) {
    let m: serde_json::Value = serde_json::from_slice(manifest).expect("json");
    (
        m["layers"][0]["digest"]
            .as_str()
            .expect("digest")
            .to_owned(),
        m["layers"][0]["size"].as_u64().expect("size"),
    )
}

/// A 64 MiB blob cut off mid-way is resumed with `Range` by the next run: only the
/// missing bytes cross the wire again (counted at the server), and the blob verifies.
/// A server that ignores `Range` is handled: the whole blob comes again and verifies.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_off_blob_is_resumed_with_range_and_verifies() {
    let dir = tmp();
    let (up, [big_body, other_body]) =
        cdn_central(dir.path(), "team/big", [(31, 64 << 20), (32, 8 << 20)]);
    let issuer = Issuer::new(&dir.path().join("keys"));
    let mut server = Server::start(
        dir.path(),
        &issuer,
        &mirror_config(
            &up.url(),
            &[("one", "team/big", "v1", ""), ("two", "team/big", "v2", "")],
        ),
    );
    let run = |job: &str| {
        let out = outpost(&[
            "mirror",
            "run",
            "--config",
            server.config.to_str().expect("utf8"),
            job,
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (layer, layer_size) = only_layer(&big_body);
    const CUT: u64 = 24 << 20;
    up.cut_next_blob_after(CUT);
    let (ok, out) = run("one");
    eprintln!("cut run:\n{out}");
    assert!(!ok, "a cut-off blob fails the tag: {out}");
    assert!(
        out.contains("cut off after") && out.contains(&layer),
        "{out}"
    );

    let before = up.cdn_bytes_sent();
    let (ok, out) = run("one");
    eprintln!("resumed run:\n{out}");
    assert!(ok, "{out}");
    let resent = up.cdn_bytes_sent() - before;
    let missing = layer_size - CUT;
    assert!(
        resent <= missing + (1 << 20),
        "resent {resent} bytes, {missing} were missing"
    );
    let resumed = up
        .cdn_requests()
        .into_iter()
        .filter(|r| r.path.contains(&layer[7..]) && r.method == "GET")
        .filter_map(|r| r.range)
        .collect::<Vec<_>>();
    assert_eq!(resumed.len(), 1, "one resumed request: {resumed:?}");
    let r = get(
        &server,
        &format!("/v2/central.corp/team/big/blobs/{layer}"),
        "*/*",
    )
    .await;
    assert_eq!(r.status(), 200);
    let bytes = r.bytes().await.expect("blob");
    assert_eq!(bytes.len() as u64, layer_size);
    assert_eq!(format!("sha256:{}", hex_sha256(&bytes)), layer);

    // A server that ignores Range: the rerun takes the whole blob and it still verifies.
    let (layer2, layer2_size) = only_layer(&other_body);
    up.cut_next_blob_after(2 << 20);
    let (ok, _) = run("two");
    assert!(!ok);
    up.ignore_range(true);
    let before = up.cdn_bytes_sent();
    let (ok, out) = run("two");
    assert!(ok, "{out}");
    assert_eq!(
        up.cdn_bytes_sent() - before,
        layer2_size,
        "the whole blob, once"
    );
    let r = get(
        &server,
        &format!("/v2/central.corp/team/big/blobs/{layer2}"),
        "*/*",
    )
    .await;
    let bytes = r.bytes().await.expect("blob");
    assert_eq!(format!("sha256:{}", hex_sha256(&bytes)), layer2);
    server.stop();
}

/// kill -9 of the daemon in the middle of a run: after a restart `outpost fsck` is clean,
/// the tag mirrored earlier is served unchanged, the cut-off blob's bytes survived the
/// restart, and the rerun resumes them and finishes the job.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_killed_mid_run_leaves_a_clean_store_and_the_rerun_resumes() {
    let dir = tmp();
    let (up, [small_body, big_body]) =
        cdn_central(dir.path(), "team/app", [(41, 3000), (42, 32 << 20)]);
    let issuer = Issuer::new(&dir.path().join("keys"));
    // The big job is held to 4 MiB/s so that the kill lands mid-blob.
    let mut server = Server::start_process(
        dir.path(),
        &issuer,
        &mirror_config(
            &up.url(),
            &[
                ("small", "team/app", "v1", ""),
                ("big", "team/app", "v2", "bandwidth = \"4MiB\"\n"),
            ],
        ),
    );
    let config = server.config.clone();
    let config_arg = config.to_str().expect("utf8").to_owned();
    let out = outpost(&["mirror", "run", "--config", &config_arg, "small"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["mirror", "run", "--config", &config_arg, "big"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mirror run");
    let partial = dir.path().join("data/partial");
    let (layer, layer_size) = only_layer(&big_body);
    let partial_file = partial.join(format!("sha256-{}", &layer[7..]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::metadata(&partial_file)
        .map(|m| m.len())
        .unwrap_or(0)
        < 6 << 20
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the big blob never got going"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.kill9();
    let _ = cli.wait();
    let kept = std::fs::metadata(&partial_file)
        .expect("partial kept")
        .len();
    assert!(kept > 0 && kept < layer_size, "{kept}");

    let mut server = Server::start_process_with_config(&config);
    let fsck = outpost(&["fsck", "--config", &config_arg]);
    let report = String::from_utf8_lossy(&fsck.stdout).into_owned();
    assert!(
        fsck.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    assert!(report.contains("0 problem(s)"), "{report}");
    let r = get(
        &server,
        "/v2/central.corp/team/app/manifests/v1",
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.expect("body").as_ref(),
        small_body.as_slice()
    );
    assert!(
        std::fs::metadata(&partial_file).is_ok_and(|m| m.len() >= kept),
        "the partial blob survived the restart"
    );

    let before = up.cdn_bytes_sent();
    let out = outpost(&["mirror", "run", "--config", &config_arg, "big"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resent = up.cdn_bytes_sent() - before;
    assert!(
        resent <= layer_size - kept + (1 << 20),
        "resent {resent}, kept {kept}"
    );
    let r = get(
        &server,
        "/v2/central.corp/team/app/manifests/v2",
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(r.bytes().await.expect("body").as_ref(), big_body.as_slice());
    let fsck = outpost(&["fsck", "--config", &config_arg]);
    assert!(String::from_utf8_lossy(&fsck.stdout).contains("0 problem(s)"));
    server.stop();
}

/// Eviction pressure from pull-through never takes mirrored content: under a budget far
/// below what is stored, pulled-through layers are evicted while every blob of the
/// mirrored tag stays, and it pulls byte-identical with the central registry gone.
#[tokio::test(flavor = "multi_thread")]
async fn eviction_pressure_from_pull_through_never_removes_mirrored_content() {
    let dir = tmp();
    let mut up = UpstreamRegistry::start(&dir.path().join("central"), UpstreamOptions::default());
    let mut app = Layout::new(&dir.path().join("app"));
    let (mirrored, size, body) = app.image(51, &[300_000, 200_000], "amd64");
    app.tag(OCI_MANIFEST, &mirrored, size, "v1");
    up.push_layout(&app.dir, "team/app:v1");
    let mut cached = Layout::new(&dir.path().join("cached"));
    let (other, other_size, other_body) = cached.image(52, &[300_000, 300_000, 300_000], "amd64");
    cached.tag(OCI_MANIFEST, &other, other_size, "v1");
    up.push_layout(&cached.dir, "team/cache:v1");

    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(
        dir.path(),
        &issuer,
        &format!(
            "[[upstream]]\nname = \"central.corp\"\nurl = \"{}\"\n\
             [[access]]\nrepositories = [\"central.corp/**\"]\nanonymous = [\"pull\"]\n\
             [[mirror]]\nname = \"apps\"\nupstream = \"central.corp\"\n\
             repositories = [\"team/app\"]\ntags = [\"v1\"]\n",
            up.url()
        ),
    );
    // The budget goes into [storage]: restart on the rewritten file.
    let mut server = server;
    server.stop();
    let text = std::fs::read_to_string(&server.config).expect("config");
    let text = text.replace(
        "gc_grace = \"0s\"",
        "gc_grace = \"0s\"\nmax_size = \"256KiB\"",
    );
    std::fs::write(&server.config, text).expect("write config");
    let mut server = Server::start_with_config(&server.config);
    let (ok, out) = mirror_run(&server);
    assert!(ok, "{out}");

    // Pull-through of another repository, well over the budget.
    let manifest: serde_json::Value = serde_json::from_slice(&other_body).expect("json");
    for layer in manifest["layers"].as_array().expect("layers") {
        let d = layer["digest"].as_str().expect("digest");
        let r = get(
            &server,
            &format!("/v2/central.corp/team/cache/blobs/{d}"),
            "*/*",
        )
        .await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.expect("body");
    }
    let mut evicted = 0.0;
    for _ in 0..100 {
        evicted = metric(&server, "outpost_evicted_blobs_total", &[]).await;
        if evicted >= 3.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        evicted >= 3.0,
        "the pulled-through layers were evicted: {evicted}"
    );

    up.stop();
    let m: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let mut blobs = vec![m["config"]["digest"].as_str().expect("config").to_owned()];
    for l in m["layers"].as_array().expect("layers") {
        blobs.push(l["digest"].as_str().expect("layer").to_owned());
    }
    let r = get(
        &server,
        "/v2/central.corp/team/app/manifests/v1",
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(r.bytes().await.expect("body").as_ref(), body.as_slice());
    for d in blobs {
        let r = get(
            &server,
            &format!("/v2/central.corp/team/app/blobs/{d}"),
            "*/*",
        )
        .await;
        assert_eq!(r.status(), 200, "{d} survived eviction");
        let bytes = r.bytes().await.expect("body");
        assert_eq!(format!("sha256:{}", hex_sha256(&bytes)), d);
    }
    server.stop();
}
