//! Live reload (SIGHUP) of the configuration file, through the real binary: the README's
//! "Rotating issuer keys" procedure, step by step, with a blob download in flight across
//! both reloads; an invalid file is refused and the running configuration stays; a
//! setting that needs a restart is named in the log.

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
