//! Live reload (SIGHUP) of the configuration file, through the real binary: the README's
//! "Rotating issuer keys" procedure, step by step, with a blob download in flight across
//! both reloads; an invalid file is refused and the running configuration stays; a
//! setting that needs a restart is named in the log; upstreams are added, changed and
//! removed with a pull-through download in flight.

mod common;

use common::*;
use outpost::oci::Digest;

/// Replaces the `issuer_keys = [...]` line of the config file at `path`.
fn set_issuers(path: &std::path::Path, keys: &[&std::path::Path]) {
    let text = std::fs::read_to_string(path).expect("config");
    let list = keys
        .iter()
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("issuer_keys") {
                format!("issuer_keys = [{list}]")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(path, format!("{text}\n")).expect("write config");
}

async fn pull_status(server: &Server, key: &str) -> u16 {
    client()
        .get(server.url("/v2/team/app/manifests/v1"))
        .bearer_auth(key)
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("pull")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn issuer_keys_rotate_by_reload_with_a_transfer_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = Issuer::new(&dir.path().join("old"));
    let server = Server::start_process(dir.path(), &old, "");
    let old_key = old.issue("ci", &["team/**"], "pull,push", "1h");
    push_image(&server, &old_key, "team/app", "v1", 1).await;
    let big = bytes(7, 24 << 20);
    let (big_digest, status) = push_blob(&server, &old_key, "team/app", &big).await;
    assert_eq!(status, 201);

    // A download in flight: its first bytes, then it waits while the keys rotate.
    let url = server.url(&format!("/v2/team/app/blobs/{big_digest}"));
    let key = old_key.clone();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let download = tokio::spawn(async move {
        let mut resp = client()
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .expect("download");
        let mut got = Vec::new();
        while got.len() < 1 << 20 {
            got.extend(resp.chunk().await.expect("chunk").expect("more"));
        }
        started_tx.send(()).expect("started");
        go_rx.await.expect("go");
        while let Some(chunk) = resp.chunk().await.expect("chunk") {
            got.extend(chunk);
        }
        got
    });
    started_rx.await.expect("download started");

    // 1. Add the new issuer's public key; 2. reload.
    let new = Issuer::new(&dir.path().join("new"));
    let (old_pub, new_pub) = (old.public(), new.public());
    set_issuers(&server.config, &[&old_pub, &new_pub]);
    server.hup();
    let logs = server.wait_for_log("configuration reloaded", 1);
    assert!(logs.contains("auth.issuer_keys"), "{logs}");
    // 3. Issue new keys: they work, and so do the old ones, during the overlap.
    let new_key = new.issue("ci", &["team/**"], "pull,push", "1h");
    assert_eq!(pull_status(&server, &new_key).await, 200);
    assert_eq!(pull_status(&server, &old_key).await, 200);
    push_image(&server, &new_key, "team/app", "v2", 2).await;

    // 4. Retire the old issuer: remove its key and reload. Its keys stop working.
    set_issuers(&server.config, &[&new_pub]);
    server.hup();
    server.wait_for_log("configuration reloaded", 2);
    assert_eq!(pull_status(&server, &old_key).await, 401);
    assert_eq!(pull_status(&server, &new_key).await, 200);

    // The download that started before both reloads completes, byte for byte.
    go_tx.send(()).expect("go");
    let got = download.await.expect("download task");
    assert_eq!(got.len(), big.len());
    assert_eq!(Digest::sha256_of(&got), big_digest);

    // An invalid file is refused; the running configuration stays.
    let good = std::fs::read_to_string(&server.config).expect("config");
    std::fs::write(&server.config, format!("{good}\n[nonsense]\nkey = 1\n")).expect("write");
    server.hup();
    let logs = server.wait_for_log("configuration reload refused", 1);
    assert!(
        logs.contains("nonsense"),
        "the log names the problem: {logs}"
    );
    assert_eq!(pull_status(&server, &new_key).await, 200);
    assert_eq!(pull_status(&server, &old_key).await, 401);

    // A setting that needs a restart is named, not silently ignored.
    std::fs::write(
        &server.config,
        good.replace("body_idle_timeout = \"5s\"", "body_idle_timeout = \"9s\""),
    )
    .expect("write");
    server.hup();
    let logs = server.wait_for_log("configuration reloaded", 3);
    assert!(
        logs.contains("take effect at the next restart") && logs.contains("[server]"),
        "{logs}"
    );
}

async fn manifest_status(server: &Server, repo: &str, tag: &str) -> (u16, String) {
    let r = client()
        .get(server.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("pull");
    let status = r.status().as_u16();
    let code = if status == 200 {
        String::new()
    } else {
        error_code(r).await
    };
    (status, code)
}

/// `[[upstream]]` changes apply on reload: a changed URL takes new pulls to the new
/// registry while a download started before finishes, an added upstream serves at once,
/// a removed one answers NAME_UNKNOWN and leaves the health metrics; the log names each
/// change.
#[tokio::test(flavor = "multi_thread")]
async fn upstreams_change_by_reload_with_a_pull_through_download_in_flight() {
    use common::upstream::{UpstreamOptions, UpstreamRegistry};
    let dir = tempfile::tempdir().expect("tempdir");
    let first = UpstreamRegistry::start(&dir.path().join("first"), UpstreamOptions::default());
    let second = UpstreamRegistry::start(&dir.path().join("second"), UpstreamOptions::default());
    let mut layout = Layout::new(&dir.path().join("v1"));
    let big = 24 << 20;
    let (md, ms, manifest) = layout.image(3, &[big], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, "v1");
    first.push_layout(&layout.dir, "app:v1");
    let mut other = Layout::new(&dir.path().join("v2"));
    let (md2, ms2, _) = other.image(4, &[1000], "amd64");
    other.tag(OCI_MANIFEST, &md2, ms2, "v2");
    second.push_layout(&other.dir, "app:v2");

    let issuer = Issuer::new(&dir.path().join("keys"));
    let site = format!(
        "[[upstream]]\nname = \"site.corp\"\nurl = \"{}\"\n\
         [[access]]\nrepositories = [\"site.corp/**\", \"other.corp/**\"]\nanonymous = [\"pull\"]\n",
        first.url()
    );
    let server = Server::start_process(dir.path(), &issuer, &site);
    assert_eq!(manifest_status(&server, "site.corp/app", "v1").await.0, 200);

    // A pull-through download in flight: its first bytes, then it waits for the reloads.
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest");
    let layer: Digest = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .parse()
        .expect("digest");
    let url = server.url(&format!("/v2/site.corp/app/blobs/{layer}"));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let download = tokio::spawn(async move {
        let mut resp = client().get(url).send().await.expect("download");
        assert_eq!(resp.status(), 200);
        let mut got = Vec::new();
        while got.len() < 1 << 20 {
            got.extend(resp.chunk().await.expect("chunk").expect("more"));
        }
        started_tx.send(()).expect("started");
        go_rx.await.expect("go");
        while let Some(chunk) = resp.chunk().await.expect("chunk") {
            got.extend(chunk);
        }
        got
    });
    started_rx.await.expect("download started");

    // site.corp moves to the second registry; other.corp (the first) is added.
    let text = std::fs::read_to_string(&server.config).expect("config");
    let moved = text.replace(&first.url(), &second.url());
    let added = format!(
        "{moved}\n[[upstream]]\nname = \"other.corp\"\nurl = \"{}\"\n",
        first.url()
    );
    std::fs::write(&server.config, &added).expect("write config");
    server.hup();
    let logs = server.wait_for_log("upstreams reloaded", 1);
    assert!(
        logs.contains(r#"added=["other.corp"]"#) && logs.contains(r#"changed=["site.corp"]"#),
        "{logs}"
    );
    assert_eq!(manifest_status(&server, "site.corp/app", "v2").await.0, 200);
    assert!(
        second
            .request_log()
            .iter()
            .any(|r| r.uri.starts_with("/v2/app/manifests/v2")),
        "the new URL was asked"
    );
    assert_eq!(
        manifest_status(&server, "other.corp/app", "v1").await.0,
        200
    );
    let other_up = r#"outpost_upstream_up{upstream="other.corp"}"#;
    assert!(metrics_text(&server).await.contains(other_up));

    // other.corp is removed again: containerd's `?ns=other.corp` is unknown from now on,
    // and the path form names a (missing) hosted repository, as at a fresh start.
    std::fs::write(&server.config, &moved).expect("write config");
    server.hup();
    let logs = server.wait_for_log("upstreams reloaded", 2);
    assert!(logs.contains(r#"removed=["other.corp"]"#), "{logs}");
    assert_eq!(
        manifest_status(&server, "app", "v1?ns=other.corp").await,
        (404, "NAME_UNKNOWN".to_owned())
    );
    assert_eq!(
        manifest_status(&server, "other.corp/app", "v1").await,
        (404, "MANIFEST_UNKNOWN".to_owned())
    );
    let metrics = metrics_text(&server).await;
    assert!(
        !metrics.contains(other_up) && metrics.contains(r#"upstream="site.corp""#),
        "a removed upstream's health series goes: {metrics}"
    );

    // The download that started before both reloads completes, byte for byte.
    go_tx.send(()).expect("go");
    let got = download.await.expect("download task");
    assert_eq!(Digest::sha256_of(&got), layer);
}

/// `[[mirror]]` changes apply on reload: a removed job's schedule is retired, an added
/// job is scheduled, and `outpost mirror run` / `status` (through the running daemon)
/// know the new job at once.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_jobs_change_by_reload_and_the_daemon_runs_the_new_one() {
    use common::upstream::{UpstreamOptions, UpstreamRegistry};
    let dir = tempfile::tempdir().expect("tempdir");
    let central = UpstreamRegistry::start(&dir.path().join("central"), UpstreamOptions::default());
    let mut layout = Layout::new(&dir.path().join("image"));
    let (md, ms, _) = layout.image(5, &[3000], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, "v3");
    central.push_layout(&layout.dir, "team/app:v3");

    let job = |name: &str| {
        format!(
            "[[mirror]]\nname = \"{name}\"\nupstream = \"central.corp\"\n\
             repositories = [\"team/app\"]\ntags = [\"v*\"]\nschedule = \"0 2 * * *\"\n"
        )
    };
    let base = format!(
        "[[upstream]]\nname = \"central.corp\"\nurl = \"{}\"\n\
         [[access]]\nrepositories = [\"central.corp/**\"]\nanonymous = [\"pull\"]\n",
        central.url()
    );
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start_process(dir.path(), &issuer, &format!("{base}{}", job("old")));
    server.wait_for_log("mirror job scheduled", 1);

    let text = std::fs::read_to_string(&server.config).expect("config");
    std::fs::write(&server.config, text.replace(&job("old"), &job("new"))).expect("write");
    server.hup();
    let logs = server.wait_for_log("mirror jobs reloaded", 1);
    assert!(
        logs.contains(r#"added=["new"]"#) && logs.contains(r#"removed=["old"]"#),
        "{logs}"
    );
    let logs = server.wait_for_log("mirror job scheduled", 2);
    assert!(logs.contains("mirror job schedule retired"), "{logs}");

    let config = server.config.to_str().expect("utf8").to_owned();
    let out = outpost(&["mirror", "run", "--config", &config, "new"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let logs = server.wait_for_log("mirror run started", 1);
    assert!(logs.contains("job=new"), "the daemon ran it: {logs}");
    let r = client()
        .get(server.url("/v2/central.corp/team/app/manifests/v3"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("pull");
    assert_eq!(r.status(), 200);
    let status = outpost(&["mirror", "status", "--config", &config]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("new") && !status.contains("old"),
        "{status}"
    );
}
