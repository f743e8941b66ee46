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
