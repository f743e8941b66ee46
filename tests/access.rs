//! Access control end to end, against the real binary: the key list, revocation through
//! the CLI and through the revocation file (also across two processes), expired keys and
//! keys of a removed issuer, immutable tags, what `_catalog`, tag lists and referrers show
//! to whom, and the failed-login throttle. Every test also checks that no key or password
//! it used reached the daemon's logs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::run_with_timeout;
use common::*;
use outpost::oci::Digest;

/// How long a change of the revocation file may take to be noticed (polled every 2 s).
const REVOCATION_DEADLINE: Duration = Duration::from_secs(20);

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Runs the CLI (bounded); returns success, stdout and stderr.
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = run_with_timeout(
        Command::new(outpost_bin()).args(args),
        Duration::from_secs(60),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The id of a key, as `outpost key inspect` shows it.
fn key_id(key: &str) -> String {
    let (ok, out, err) = cli(&["key", "inspect", key]);
    assert!(ok, "key inspect: {err}");
    out.lines()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("id line")
        .trim()
        .to_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// A config like the harness writes, but trusting every issuer in `issuers`.
fn write_config(dir: &Path, issuers: &[PathBuf], extra: &str, port: u16) -> PathBuf {
    let keys: Vec<String> = issuers.iter().map(|p| format!("{p:?}")).collect();
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\npublic_url = \"http://127.0.0.1:{port}\"\n\
         [storage]\npath = {:?}\n[auth]\nissuer_keys = [{}]\n{extra}",
        dir.join("data"),
        keys.join(", ")
    );
    let config = dir.join("outpost.toml");
    std::fs::write(&config, text).expect("write config");
    config
}

async fn get(server: &Server, path: &str, key: Option<&str>) -> reqwest::Response {
    let mut r = client().get(server.url(path));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.expect("send")
}

async fn status(server: &Server, path: &str, key: Option<&str>) -> u16 {
    get(server, path, key).await.status().as_u16()
}

/// Polls until `path` answers `want` to `key`, for at most `timeout`.
async fn wait_for_status(server: &Server, path: &str, key: &str, want: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = status(server, path, Some(key)).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {got}, not {want}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A short-lived `/token` token obtained with `key` as the Basic password.
async fn token(server: &Server, key: &str, scope: &str) -> String {
    let r = client()
        .get(server.url(&format!("/token?service=outpost&scope={scope}")))
        .basic_auth("someone", Some(key))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "token exchange");
    let v: serde_json::Value = r.json().await.expect("json");
    v["token"].as_str().expect("token").to_owned()
}

/// No secret appears in the daemon's logs, nor (for keys and tokens) 16 characters from
/// the middle of one, which would be a truncated or re-encoded copy.
fn assert_no_secrets(server: &Server, secrets: &[&str]) {
    let logs = server.logs();
    assert!(
        logs.contains("listening"),
        "the daemon's logs were not captured; the check would be vacuous"
    );
    for secret in secrets {
        assert!(!logs.contains(secret), "a credential reached the logs");
        if secret.len() >= 64 {
            let mid = secret.len() / 2;
            assert!(
                !logs.contains(&secret[mid - 8..mid + 8]),
                "part of a key or token reached the logs"
            );
        }
    }
}

fn append(path: &Path, line: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open revocation file");
    writeln!(f, "{line}").expect("append");
}

/// `key list` shows every key the store knows, with last use and revocation, and never a
/// key; it works through the running daemon and with the daemon stopped; `key issue
/// --config` records the new key either way, and never needs the store to issue.
#[tokio::test(flavor = "multi_thread")]
async fn key_list_shows_known_and_revoked_keys_with_the_daemon_running_or_stopped() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let mut server = Server::start(dir.path(), &issuer, "");
    let config = path_str(&server.config).to_owned();
    let signing = dir.path().join("keys/issuer.key");

    // Issued with --config while the daemon runs: recorded through the admin socket.
    let (ok, out, err) = cli(&[
        "key",
        "issue",
        "--signing-key",
        path_str(&signing),
        "--subject",
        "deployer",
        "--repo",
        "team/**",
        "--repo",
        "ops/*",
        "--actions",
        "pull",
        "--expires",
        "30d",
        "--config",
        &config,
    ]);
    assert!(ok && err.is_empty(), "issue --config: {err}");
    let issued = out.lines().last().expect("key line").to_owned();
    assert!(
        issued.starts_with("opk1."),
        "the key is the last line alone: {out}"
    );
    assert!(out.contains("recorded"), "{out}");
    let issued_id = key_id(&issued);

    // Not recorded when issued, known once it authenticates.
    let pusher = issuer.issue("pusher", &["team/**"], "pull,push", "1h");
    let pusher_id = key_id(&pusher);
    push_image(&server, &pusher, "team/app", "v1", 1).await;
    let scoped = token(&server, &pusher, "repository:team/app:pull").await;
    assert_eq!(
        status(&server, "/v2/team/app/tags/list", Some(&scoped)).await,
        200
    );

    // An id revoked before its key was ever seen.
    let stranger = "0123456789abcdef0123456789abcdef";
    let (ok, out, err) = cli(&["key", "revoke", "--config", &config, stranger]);
    assert!(ok, "revoke unseen id: {out}{err}");

    let (ok, table, err) = cli(&["key", "list", "--config", &config]);
    assert!(ok, "key list while running: {err}");
    let row = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id} in:\n{table}"))
            .to_owned()
    };
    assert!(table.starts_with("ID "), "{table}");
    let issued_row = row(&issued_id);
    assert!(issued_row.contains("deployer"), "{issued_row}");
    assert!(issued_row.contains("team/**,ops/*"), "{issued_row}");
    assert!(
        issued_row.contains("never") && issued_row.ends_with(" no"),
        "{issued_row}"
    );
    let pusher_row = row(&pusher_id);
    assert!(pusher_row.contains("pusher") && pusher_row.contains("pull,push"));
    assert!(
        !pusher_row.contains("never"),
        "last use recorded: {pusher_row}"
    );
    let stranger_row = row(stranger);
    assert!(!stranger_row.ends_with(" no"), "{stranger_row}");
    assert!(table.contains("3 key(s): 1 revoked, 0 expired"), "{table}");

    // Revoking by id while running refuses the key and the tokens obtained with it.
    let (ok, out, err) = cli(&["key", "revoke", "--config", &config, &pusher_id]);
    assert!(ok, "revoke by id: {out}{err}");
    assert_eq!(
        status(&server, "/v2/team/app/tags/list", Some(&pusher)).await,
        401
    );
    assert_eq!(
        status(&server, "/v2/team/app/tags/list", Some(&scoped)).await,
        401
    );

    let (ok, json, err) = cli(&["key", "list", "--config", &config, "--json"]);
    assert!(ok, "key list --json: {err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let keys = v["keys"].as_array().expect("keys");
    let entry = |id: &str| {
        keys.iter()
            .find(|k| k["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {json}"))
            .clone()
    };
    let p = entry(&pusher_id);
    assert_eq!(p["subject"], "pusher");
    assert_eq!(p["repositories"], serde_json::json!(["team/**"]));
    assert_eq!(p["actions"], serde_json::json!(["pull", "push"]));
    assert_eq!(p["revoked"], true);
    assert!(
        p["last_used"].is_string() && p["expires_at"].is_string(),
        "{p}"
    );
    let i = entry(&issued_id);
    assert_eq!(i["last_used"], serde_json::Value::Null);
    assert_eq!(i["revoked"], false);
    let s = entry(stranger);
    assert_eq!(s["subject"], serde_json::Value::Null);
    assert_eq!(s["revoked"], true);

    // First use of the issued key after the last listing: only the flush at stop
    // records it.
    assert_eq!(
        status(&server, "/v2/team/app/tags/list", Some(&issued)).await,
        200
    );

    // With the daemon stopped, the store is read directly.
    server.stop();
    let (ok, stopped_table, err) = cli(&["key", "list", "--config", &config]);
    assert!(ok, "key list while stopped: {err}");
    let stopped_row = |id: &str| {
        stopped_table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id} in:\n{stopped_table}"))
            .to_owned()
    };
    let pusher_row = stopped_row(&pusher_id);
    assert!(!pusher_row.contains("never") && !pusher_row.ends_with(" no"));
    let issued_row = stopped_row(&issued_id);
    assert!(
        !issued_row.contains("never"),
        "flushed at stop: {issued_row}"
    );

    // Issued with --config while stopped: recorded directly.
    let (ok, out, err) = cli(&[
        "key",
        "issue",
        "--signing-key",
        path_str(&signing),
        "--subject",
        "offline",
        "--repo",
        "team/**",
        "--expires",
        "1h",
        "--config",
        &config,
    ]);
    assert!(ok && err.is_empty(), "issue --config while stopped: {err}");
    let offline = out.lines().last().expect("key line").to_owned();
    let (ok, after, _) = cli(&["key", "list", "--config", &config]);
    assert!(ok && after.contains(&key_id(&offline)) && after.contains("offline"));

    // A store that cannot be used never stops a key from being issued.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    // Never served: any port will do.
    let other_config = write_config(&elsewhere, &[issuer.public()], "", 5000);
    let (ok, out, err) = cli(&[
        "key",
        "issue",
        "--signing-key",
        path_str(&signing),
        "--subject",
        "nostore",
        "--repo",
        "team/**",
        "--expires",
        "1h",
        "--config",
        path_str(&other_config),
    ]);
    assert!(ok, "issue without a store: {err}");
    assert!(
        out.lines().last().is_some_and(|l| l.starts_with("opk1.")),
        "{out}"
    );
    assert!(
        err.contains("warning") && err.contains("not recorded"),
        "{err}"
    );
    assert!(!elsewhere.join("data").exists(), "issuing created no store");

    for output in [&table, &json, &stopped_table, &after] {
        for key in [&issued, &pusher, &offline] {
            assert!(!output.contains(key.as_str()), "key list showed a key");
        }
    }
    assert_no_secrets(&server, &[&issued, &pusher, &scoped]);
}

/// Appending a key id to the revocation file refuses that key within a bounded wait,
/// without SIGHUP; a replaced file is noticed too; and revocations loaded from the file
/// are durable, so a restart keeps them even after the file forgot them.
#[tokio::test(flavor = "multi_thread")]
async fn revocation_file_changes_take_effect_while_running_and_stay_revoked() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let file = dir.path().join("revoked-keys");
    std::fs::write(&file, "# revoked API keys\n").expect("write");
    let extra = format!("revocation_file = {file:?}\n");
    let mut server = Server::start(dir.path(), &issuer, &extra);
    let first = issuer.issue("first", &["team/**"], "pull,push", "1h");
    let second = issuer.issue("second", &["team/**"], "pull", "1h");
    push_image(&server, &first, "team/app", "v1", 2).await;
    let path = "/v2/team/app/manifests/v1";
    assert_eq!(status(&server, path, Some(&first)).await, 200);
    assert_eq!(status(&server, path, Some(&second)).await, 200);

    append(&file, &format!("{}  # laptop lost", key_id(&first)));
    wait_for_status(&server, path, &first, 401, REVOCATION_DEADLINE).await;
    assert_eq!(status(&server, path, Some(&second)).await, 200);

    // Replaced the way editors do (new file, rename), now naming only the second key.
    let next = dir.path().join("revoked-keys.new");
    std::fs::write(&next, format!("{}\n", key_id(&second))).expect("write");
    std::fs::rename(&next, &file).expect("rename");
    wait_for_status(&server, path, &second, 401, REVOCATION_DEADLINE).await;
    assert_eq!(
        status(&server, path, Some(&first)).await,
        401,
        "a reload merges: nothing revoked comes back"
    );
    assert_no_secrets(&server, &[&first, &second]);

    server.stop();
    std::fs::write(&file, "").expect("empty the file");
    let mut server = Server::start_with_config(&server.config);
    assert_eq!(status(&server, path, Some(&first)).await, 401, "durable");
    assert_eq!(status(&server, path, Some(&second)).await, 401, "durable");
    let (ok, table, err) = cli(&["key", "list", "--config", path_str(&server.config)]);
    assert!(ok, "{err}");
    assert!(table.contains("2 key(s): 2 revoked"), "{table}");
    assert_no_secrets(&server, &[&first, &second]);
    server.stop();
}

/// Two processes with their own data directories and the same issuer keys, token secret
/// and revocation file accept and refuse the same keys, and both refuse a key within a
/// bounded wait once the file names it.
#[tokio::test(flavor = "multi_thread")]
async fn two_processes_accept_and_refuse_the_same_keys() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let foreign = Issuer::new(&dir.path().join("foreign"));
    let file = dir.path().join("revoked-keys");
    std::fs::write(&file, "").expect("write");
    let secret = dir.path().join("token.secret");
    std::fs::write(&secret, "ab".repeat(32)).expect("write");
    let extra = format!("revocation_file = {file:?}\ntoken_secret_file = {secret:?}\n");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).expect("mkdir");
    std::fs::create_dir_all(&b_dir).expect("mkdir");
    let mut a = Server::start_process(&a_dir, &issuer, &extra);
    let mut b = Server::start_process(&b_dir, &issuer, &extra);

    let doomed = issuer.issue("doomed", &["team/**"], "pull", "1h");
    let kept = issuer.issue("kept", &["team/**"], "pull", "1h");
    let outsider = foreign.issue("outsider", &["team/**"], "pull", "1h");
    let doomed_token = token(&a, &doomed, "repository:team/app:pull").await;
    for server in [&a, &b] {
        assert_eq!(status(server, "/v2/", Some(&doomed)).await, 200);
        assert_eq!(status(server, "/v2/", Some(&kept)).await, 200);
        assert_eq!(status(server, "/v2/", Some(&doomed_token)).await, 200);
        assert_eq!(status(server, "/v2/", Some(&outsider)).await, 401);
    }

    append(&file, &key_id(&doomed));
    for server in [&a, &b] {
        wait_for_status(server, "/v2/", &doomed, 401, REVOCATION_DEADLINE).await;
        assert_eq!(status(server, "/v2/", Some(&doomed_token)).await, 401);
        assert_eq!(status(server, "/v2/", Some(&kept)).await, 200);
    }
    for server in [&a, &b] {
        assert_no_secrets(server, &[&doomed, &kept, &outsider, &doomed_token]);
    }
    a.stop();
    b.stop();
}

/// A key that worked stops working when it expires (the verified-key cache does not keep
/// it alive, nor do tokens obtained with it); a key whose issuer is removed from the
/// config is refused after a restart, while the remaining issuer's keys still work.
#[tokio::test(flavor = "multi_thread")]
async fn expired_keys_and_keys_of_a_removed_issuer_are_refused() {
    let dir = tmp();
    let kept = Issuer::new(&dir.path().join("kept"));
    let retired = Issuer::new(&dir.path().join("retired"));
    let issuers = [kept.public(), retired.public()];
    let mut server =
        Server::start_written(|port| write_config(dir.path(), &issuers, "", port), "info");

    let pusher = kept.issue("pusher", &["team/**"], "pull,push", "1h");
    push_image(&server, &pusher, "team/app", "v1", 3).await;
    let path = "/v2/team/app/manifests/v1";
    let old = retired.issue("old", &["team/**"], "pull", "1h");
    assert_eq!(status(&server, path, Some(&old)).await, 200);

    let brief = kept.issue("brief", &["team/**"], "pull", "3s");
    assert_eq!(status(&server, path, Some(&brief)).await, 200);
    let brief_token = token(&server, &brief, "repository:team/app:pull").await;
    assert_eq!(status(&server, path, Some(&brief_token)).await, 200);
    wait_for_status(&server, path, &brief, 401, Duration::from_secs(10)).await;
    assert_eq!(
        status(&server, path, Some(&brief_token)).await,
        401,
        "a token never outlives its key"
    );
    assert_no_secrets(&server, &[&pusher, &old, &brief, &brief_token]);

    server.stop();
    let mut server = Server::start_written(
        |port| write_config(dir.path(), &[kept.public()], "", port),
        "info",
    );
    let r = get(&server, path, Some(&old)).await;
    assert_eq!(r.status(), 401, "the retired issuer's key");
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    assert_eq!(status(&server, path, Some(&pusher)).await, 200);
    assert_no_secrets(&server, &[&pusher, &old]);
    server.stop();
}

/// Immutable tags: the same digest may be pushed again; another digest, a tag delete and
/// a delete of the manifest the tag points to are refused with DENIED naming the rule.
/// Mutable tags, digest-only pushes and repositories outside the rule are unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn immutable_tags_take_one_digest_and_no_delete() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let extra = "[[access]]\nrepositories = [\"team/**\"]\nauthenticated = [\"pull\"]\n\
                 immutable_tags = [\"v*\"]\n";
    let mut server = Server::start(dir.path(), &issuer, extra);
    let key = issuer.issue(
        "release",
        &["team/**", "other/**"],
        "pull,push,delete",
        "1h",
    );
    let c = client();
    let rule = "immutable_tags \"v*\" of access rule 1";
    let denied = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 403);
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["errors"][0]["code"], "DENIED");
        let message = v["errors"][0]["message"]
            .as_str()
            .expect("message")
            .to_owned();
        assert!(
            message.contains(rule),
            "the message names the rule: {message}"
        );
    };

    let (d1, m1, _) = push_image(&server, &key, "team/app", "v1", 10).await;
    let again = push_manifest(&server, &key, "team/app", "v1", OCI_MANIFEST, &m1).await;
    assert_eq!(again.status(), 201, "the same digest again is fine");
    let (d2, m2, _) = push_image(&server, &key, "team/app", "latest", 11).await;
    denied(push_manifest(&server, &key, "team/app", "v1", OCI_MANIFEST, &m2).await).await;
    let r = get(&server, "/v2/team/app/manifests/v1", Some(&key)).await;
    assert_eq!(
        r.headers()["docker-content-digest"],
        d1.as_str(),
        "v1 unchanged"
    );

    let delete = |path: String| c.delete(server.url(&path)).bearer_auth(&key).send();
    denied(
        delete("/v2/team/app/manifests/v1".into())
            .await
            .expect("send"),
    )
    .await;
    denied(
        delete(format!("/v2/team/app/manifests/{d1}"))
            .await
            .expect("send"),
    )
    .await;
    denied(
        delete("/v2/team/app/manifests/v9".into())
            .await
            .expect("send"),
    )
    .await;
    let r = get(&server, &format!("/v2/team/app/manifests/{d1}"), Some(&key)).await;
    assert_eq!(r.status(), 200, "the refused deletes removed nothing");
    let r = get(&server, "/v2/team/app/tags/list", Some(&key)).await;
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["tags"], serde_json::json!(["latest", "v1"]));

    // Mutable tags move and go; digests without an immutable tag go.
    let r = push_manifest(&server, &key, "team/app", "latest", OCI_MANIFEST, &m1).await;
    assert_eq!(r.status(), 201, "a mutable tag moves");
    let r = delete("/v2/team/app/manifests/latest".into())
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    // The same image, annotated: another digest, pushed by digest alone.
    let mut annotated: serde_json::Value = serde_json::from_slice(&m2).expect("json");
    annotated["annotations"] = serde_json::json!({"digest-only": "yes"});
    let body = annotated.to_string();
    let d3 = Digest::sha256_of(body.as_bytes());
    let r = push_manifest(
        &server,
        &key,
        "team/app",
        d3.as_str(),
        OCI_MANIFEST,
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status(), 201, "a digest-only push");
    for d in [&d2, &d3] {
        let r = delete(format!("/v2/team/app/manifests/{d}"))
            .await
            .expect("send");
        assert_eq!(r.status(), 202, "{d} has no immutable tag");
    }

    // No rule covers other/**: v-tags there are ordinary (push_image checks the 201s).
    push_image(&server, &key, "other/app", "v1", 13).await;
    push_image(&server, &key, "other/app", "v1", 14).await;
    let r = delete("/v2/other/app/manifests/v1".into())
        .await
        .expect("send");
    assert_eq!(r.status(), 202);
    assert_no_secrets(&server, &[&key]);
    server.stop();
}

/// `_catalog` lists only what the caller may pull, and pagination never reveals the rest;
/// tag lists and referrers of a repository the caller may not read are refused the same
/// way whether or not it exists (401 anonymous, 403 with a key), and a readable but
/// missing repository is 404.
#[tokio::test(flavor = "multi_thread")]
async fn catalog_tags_and_referrers_show_only_what_the_caller_may_read() {
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let extra = "[[access]]\nrepositories = [\"public/**\"]\nanonymous = [\"pull\"]\n\
                 [[access]]\nrepositories = [\"shared/**\"]\nauthenticated = [\"pull\"]\n";
    let mut server = Server::start(dir.path(), &issuer, extra);
    let admin = issuer.issue("admin", &["**"], "pull,push", "1h");
    let mut subjects = std::collections::HashMap::new();
    for (i, repo) in ["public/app", "shared/app", "team/app", "secret/app"]
        .iter()
        .enumerate()
    {
        let (d, m, _) = push_image(&server, &admin, repo, "v1", 20 + i as u64).await;
        // A signature-like referrer of the image, in the same repository.
        let config =
            serde_json::from_slice::<serde_json::Value>(&m).expect("json")["config"].clone();
        let referrer = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.sig", "config": config, "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": m.len()}})
        .to_string();
        let rd = Digest::sha256_of(referrer.as_bytes());
        let r = push_manifest(
            &server,
            &admin,
            repo,
            rd.as_str(),
            OCI_MANIFEST,
            referrer.as_bytes(),
        )
        .await;
        assert_eq!(r.status(), 201);
        subjects.insert(*repo, d);
    }
    let team = issuer.issue("team", &["team/**"], "pull", "1h");

    // Walks every page (n=1) and checks that no Link names a hidden repository.
    let catalog = |key: Option<String>, hidden: &'static [&'static str]| {
        let server = &server;
        async move {
            let mut seen = Vec::new();
            let mut path = "/v2/_catalog?n=1".to_owned();
            for _ in 0..10 {
                let r = get(server, &path, key.as_deref()).await;
                assert_eq!(r.status(), 200);
                let next = r
                    .headers()
                    .get("link")
                    .map(|l| l.to_str().expect("ascii").to_owned());
                let v: serde_json::Value = r.json().await.expect("json");
                for name in v["repositories"].as_array().expect("list") {
                    seen.push(name.as_str().expect("name").to_owned());
                }
                let Some(next) = next else {
                    return seen;
                };
                path = next
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .expect("link target")
                    .to_owned();
                assert!(
                    !hidden.iter().any(|h| path.contains(h)),
                    "a Link names a hidden repository: {path}"
                );
            }
            panic!("catalog pagination did not end");
        }
    };
    assert_eq!(
        catalog(None, &["secret/", "shared/", "team/"]).await,
        ["public/app"]
    );
    assert_eq!(
        catalog(Some(team.clone()), &["secret/"]).await,
        ["public/app", "shared/app", "team/app"]
    );
    assert_eq!(
        catalog(Some(admin.clone()), &[]).await,
        ["public/app", "secret/app", "shared/app", "team/app"]
    );

    let referrers = |repo: &str| format!("/v2/{repo}/referrers/{}", subjects[repo]);
    let count = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.expect("json");
        v["manifests"].as_array().map(Vec::len)
    };
    // Anonymous.
    assert_eq!(status(&server, "/v2/public/app/tags/list", None).await, 200);
    assert_eq!(
        count(get(&server, &referrers("public/app"), None).await).await,
        Some(1)
    );
    for path in [
        "/v2/team/app/tags/list".to_owned(),
        "/v2/team/missing/tags/list".to_owned(),
        "/v2/shared/app/tags/list".to_owned(),
        referrers("team/app"),
    ] {
        let r = get(&server, &path, None).await;
        assert_eq!(r.status(), 401, "anonymous {path}");
        assert!(r.headers().contains_key("www-authenticate"), "{path}");
    }
    // A key: its scope plus what the policy grants to anyone authenticated.
    for path in ["/v2/team/app/tags/list", "/v2/shared/app/tags/list"] {
        assert_eq!(status(&server, path, Some(&team)).await, 200, "{path}");
    }
    assert_eq!(
        count(get(&server, &referrers("team/app"), Some(&team)).await).await,
        Some(1)
    );
    for path in [
        "/v2/secret/app/tags/list".to_owned(),
        "/v2/secret/missing/tags/list".to_owned(),
        referrers("secret/app"),
    ] {
        let r = get(&server, &path, Some(&team)).await;
        assert_eq!(r.status(), 403, "{path}");
        assert_eq!(error_code(r).await, "DENIED");
    }
    let r = get(&server, "/v2/team/missing/tags/list", Some(&team)).await;
    assert_eq!(r.status(), 404, "readable but missing");
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    assert_no_secrets(&server, &[&admin, &team]);
    server.stop();
}

/// After `failure_limit` failed logins from one address, the next attempt is 429 with
/// Retry-After, even with a good key, while another address is unaffected. Neither the
/// passwords nor the keys reach the logs, even at debug level.
#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_throttled_per_address() {
    const LIMIT: usize = 3;
    let dir = tmp();
    let issuer = Issuer::new(&dir.path().join("keys"));
    let extra = format!("failure_limit = {LIMIT}\nfailure_window = \"1m\"\n");
    // At debug level: the strictest test of what reaches the logs.
    let mut server = Server::start_written(
        |port| write_config(dir.path(), &[issuer.public()], &extra, port),
        "debug",
    );
    let good = issuer.issue("ci", &["team/**"], "pull", "1h");
    let passwords: Vec<String> = (0..LIMIT + 1)
        .map(|i| format!("hunter{i}-correct-horse-battery"))
        .collect();
    let c = client();

    for password in &passwords[..LIMIT] {
        let r = c
            .get(server.url("/v2/"))
            .basic_auth("alice", Some(password))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 401, "a wrong password");
    }
    let r = c
        .get(server.url("/v2/"))
        .basic_auth("alice", Some(&passwords[LIMIT]))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 429, "attempt {} is throttled", LIMIT + 1);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    assert_eq!(
        status(&server, "/v2/", Some(&good)).await,
        429,
        "the address is refused whatever it presents"
    );
    assert_eq!(
        status(&server, "/v2/", None).await,
        401,
        "no credentials, no attempt: the challenge, not 429"
    );

    // Another loopback address is counted apart.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let r = other
        .get(server.url("/v2/"))
        .bearer_auth(&good)
        .send()
        .await;
    assert_eq!(r.expect("send from 127.0.0.2").status(), 200);
    let r = other
        .get(server.url("/v2/"))
        .basic_auth("bob", Some(&passwords[0]))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);

    let mut secrets: Vec<&str> = passwords.iter().map(String::as_str).collect();
    secrets.push(&good);
    assert_no_secrets(&server, &secrets);
    server.stop();
}
