//! State-changing CLI commands while the daemon runs: they reach it through the admin
//! socket (redb allows one process), and take effect at once.

mod common;

use common::*;

fn run(args: &[&str]) -> (bool, String) {
    let out = outpost(args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_gc_and_fsck_work_while_the_daemon_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = Issuer::new(&dir.path().join("keys"));
    let mut server = Server::start(dir.path(), &issuer, "");
    let config = server.config.to_str().expect("utf8").to_owned();
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let (manifest, _, _) = push_image(&server, &key, "team/app", "v1", 5).await;
    let url = server.url(&format!("/v2/team/app/manifests/{manifest}"));
    let status = |key: String, url: String| async move {
        client()
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .expect("send")
            .status()
    };
    assert_eq!(status(key.clone(), url.clone()).await, 200);

    let (ok, out) = run(&["fsck", "--config", &config]);
    assert!(ok, "fsck while running: {out}");
    assert!(out.contains("0 problem(s)"), "{out}");
    let (ok, out) = run(&["gc", "--config", &config]);
    assert!(ok, "gc while running: {out}");
    assert_eq!(
        status(key.clone(), url.clone()).await,
        200,
        "gc kept referenced content"
    );

    let (ok, out) = run(&["key", "revoke", "--config", &config, &key]);
    assert!(ok, "revoke while running: {out}");
    assert!(out.contains("revoked"), "{out}");
    assert!(!out.contains(&key), "the key is never echoed back");
    assert_eq!(
        status(key.clone(), url.clone()).await,
        401,
        "revocation takes effect on the next request"
    );

    // Durable: still refused after a restart.
    server.stop();
    let server = Server::start_with_config(&server.config);
    let url = server.url(&format!("/v2/team/app/manifests/{manifest}"));
    assert_eq!(status(key.clone(), url).await, 401);
    assert!(
        !server.logs().contains(&key),
        "an API key leaked into the logs"
    );
}

/// Regression (issue 11): `key revoke`, `gc` and `fsck` run from another directory with a
/// relative `storage.path` created an empty store of their own and reported success
/// (`revoked …`, `0 problem(s)`), while the daemon kept accepting the revoked key. Now
/// relative paths are read from the config file's directory, and an admin command never
/// creates a store.
#[tokio::test(flavor = "multi_thread")]
async fn admin_commands_act_on_the_daemons_store_from_any_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let issuer = Issuer::new(&dir.path().join("keys"));
    let config = dir.path().join("outpost.toml");
    let server = Server::start_written(
        |port| {
            let text = format!(
                "[server]\nlisten = [\"127.0.0.1:{port}\"]\npublic_url = \"http://127.0.0.1:{port}\"\n\
                 [storage]\npath = \"data\"\n[auth]\nissuer_keys = [\"keys/issuer.pub\"]\n"
            );
            std::fs::write(&config, text).expect("write config");
            config.clone()
        },
        "info",
    );
    assert!(
        dir.path().join("data/outpost.redb").exists(),
        "the store is beside the config"
    );
    let key = issuer.issue("ci", &["team/**"], "pull", "1h");
    let ping = |key: String| {
        let url = server.url("/v2/");
        async move {
            client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .expect("send")
                .status()
        }
    };
    assert_eq!(ping(key.clone()).await, 200);
    let out = std::process::Command::new(outpost_bin())
        .args([
            "key",
            "revoke",
            "--config",
            config.to_str().expect("utf8"),
            &key,
        ])
        .current_dir(elsewhere.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ping(key).await,
        401,
        "the daemon's store got the revocation"
    );
    assert!(
        !elsewhere.path().join("data").exists(),
        "no store was created where the command ran"
    );

    // A config naming a store that does not exist: refused, nothing created.
    let missing = elsewhere.path().join("missing.toml");
    std::fs::write(
        &missing,
        "[server]\nlisten = [\"127.0.0.1:0\"]\npublic_url = \"http://x\"\n[storage]\npath = \"nowhere\"\n",
    )
    .expect("write");
    let id = "0123456789abcdef0123456789abcdef";
    for args in [&["gc"][..], &["fsck"], &["key", "revoke"]] {
        let mut all = args.to_vec();
        all.extend(["--config", missing.to_str().expect("utf8")]);
        if args[0] == "key" {
            all.push(id);
        }
        let (ok, text) = run(&all);
        assert!(
            !ok,
            "{all:?} succeeded on a store that does not exist: {text}"
        );
        assert!(text.contains("there is no store"), "{text}");
    }
    assert!(!elsewhere.path().join("nowhere").exists());
}
