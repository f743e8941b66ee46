//! Crash durability: SIGKILL the daemon while pushes are in flight, at several points,
//! restart, and check that every acknowledged push is intact, nothing partial is served,
//! and `outpost fsck` is clean.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn kill9_during_pushes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = Issuer::new(&dir.path().join("keys"));
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let mut acknowledged = Vec::new();
    let mut server = Server::start_process(dir.path(), &issuer, "");
    // Several rounds: each kills the daemon after a different amount of concurrent work.
    for round in 0..4u64 {
        let addr = server.addr.clone();
        let mut pushes = Vec::new();
        for i in 0..6u64 {
            let key = key.clone();
            let seed = round * 100 + i;
            let content = bytes(seed, 200_000 + (seed as usize % 7) * 50_000);
            let url = format!(
                "http://{addr}/v2/team/app{i}/blobs/uploads/?digest={}",
                outpost::oci::Digest::sha256_of(&content)
            );
            pushes.push(tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .bearer_auth(key)
                    .body(content.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 201 => Some((format!("team/app{i}"), content)),
                    _ => None,
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5 + round * 15)).await;
        server.kill9();
        for p in pushes {
            if let Ok(Some(done)) = p.await {
                acknowledged.push(done);
            }
        }
        // Restart on the same data; start-up sweeps temp files.
        server = Server::start_process_with_config(&server.config);
        let c = client();
        for (repo, content) in &acknowledged {
            let d = outpost::oci::Digest::sha256_of(content);
            let r = c
                .get(server.url(&format!("/v2/{repo}/blobs/{d}")))
                .bearer_auth(&key)
                .send()
                .await
                .expect("send");
            assert_eq!(r.status(), 200, "acknowledged blob {d} in {repo} lost");
            assert_eq!(
                r.bytes().await.expect("body").as_ref(),
                content.as_slice(),
                "blob {d} corrupted"
            );
        }
    }
    assert!(
        !acknowledged.is_empty(),
        "no push was acknowledged; the test exercised nothing"
    );
    server.stop();
    let out = outpost(&["fsck", "--config", server.config.to_str().expect("utf8")]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fsck found problems:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("0 problem(s)"), "{report}");
    assert!(
        std::fs::read_dir(dir.path().join("data/tmp"))
            .expect("tmp dir")
            .next()
            .is_none(),
        "temp files were not swept"
    );
}
