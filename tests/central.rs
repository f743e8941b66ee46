//! Locally cached central-registry logins, end to end: the real daemon in front of real
//! central registries (Debian's docker-registry with htpasswd, and with RS256 token auth
//! whose token server grants per user), real skopeo with `--creds`, and the registry
//! token flow by hand. Covers online validation, offline grace, restart, per-user
//! decisions, password changes, anonymous learning, and that no password reaches a log.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::upstream::{UpstreamOptions, UpstreamRegistry, UpstreamUser};
use common::*;

const ROBOT: (&str, &str) = ("robot", "robot-secret-pw-1");
const ALICE_PW: &str = "alice-secret-pw-1";
const BOB_PW: &str = "bob-secret-pw-1";

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// An Outpost whose upstream `central.corp` is `central`, with `auth.central` pointing at
/// it; `robot` gives Outpost its own credentials there. `auth` goes into `[auth]`, then
/// `access` follows.
fn outpost(
    dir: &Path,
    central: &UpstreamRegistry,
    robot: bool,
    auth: &str,
    access: &str,
) -> Server {
    let issuer = Issuer::new(&dir.join("keys"));
    let credentials = if robot {
        let file = dir.join("robot.password");
        std::fs::write(&file, format!("{}\n", ROBOT.1)).expect("write password file");
        format!("username = \"{}\"\npassword_file = {file:?}\n", ROBOT.0)
    } else {
        String::new()
    };
    Server::start(
        dir,
        &issuer,
        &format!(
            "central = \"central.corp\"\n{auth}\n\
             [[upstream]]\nname = \"central.corp\"\nurl = \"{}\"\n{credentials}\
             breaker_cooldown = \"1s\"\n{access}",
            central.url()
        ),
    )
}

const TEAM_PULL: &str =
    "[[access]]\nrepositories = [\"central.corp/**\"]\nauthenticated = [\"pull\"]\n";

/// Pushes a small image to the central registry as `repo:tag`.
fn seed(central: &UpstreamRegistry, dir: &Path, repo: &str, tag: &str, n: u64) {
    let mut layout = Layout::new(&dir.join(format!("layout-{n}")));
    let (md, ms, _) = layout.image(n, &[3000], "amd64");
    layout.tag(OCI_MANIFEST, &md, ms, tag);
    central.push_layout(&layout.dir, &format!("{repo}:{tag}"));
}

/// `skopeo inspect` through Outpost with `--creds user:pass`; whether it worked, and
/// skopeo's stderr.
fn inspect(server: &Server, creds: Option<(&str, &str)>, reference: &str) -> (bool, String) {
    let image = format!("docker://{}/central.corp/{reference}", server.addr);
    let creds = creds.map(|(u, p)| format!("{u}:{p}"));
    let mut args = vec!["inspect", "--tls-verify=false"];
    match &creds {
        Some(c) => args.extend(["--creds", c.as_str()]),
        None => args.push("--no-creds"),
    }
    args.push(&image);
    let out = skopeo(&args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// `GET /token` for a pull of `central.corp/<repo>` with Basic credentials: the status and
/// the token, if any.
async fn token(server: &Server, user: &str, password: &str, repo: &str) -> (u16, Option<String>) {
    let r = client()
        .get(server.url(&format!(
            "/token?service=outpost&scope=repository:central.corp/{repo}:pull"
        )))
        .header("Authorization", basic(user, password))
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    (status, body["token"].as_str().map(str::to_owned))
}

/// The claims inside an Outpost token (`opt1.<payload>.<mac>`).
fn token_claims(token: &str) -> serde_json::Value {
    let payload = token
        .strip_prefix("opt1.")
        .and_then(|t| t.split('.').next())
        .expect("an Outpost token");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    serde_json::from_slice(&json).expect("JSON payload")
}

/// `GET /v2/central.corp/<repo>/manifests/<tag>` with an `Authorization` header (or none):
/// status and body.
async fn manifest(
    server: &Server,
    authorization: Option<&str>,
    repo: &str,
    tag: &str,
) -> (u16, String) {
    let mut r = client()
        .get(server.url(&format!("/v2/central.corp/{repo}/manifests/{tag}")))
        .header("Accept", OCI_MANIFEST);
    if let Some(a) = authorization {
        r = r.header("Authorization", a);
    }
    let r = r.send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// The repositories `_catalog` lists to the caller (nothing if refused).
async fn catalog(server: &Server, authorization: Option<&str>) -> Vec<String> {
    let mut r = client().get(server.url("/v2/_catalog"));
    if let Some(a) = authorization {
        r = r.header("Authorization", a);
    }
    let body: serde_json::Value = r
        .send()
        .await
        .expect("send")
        .json()
        .await
        .unwrap_or_default();
    body["repositories"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_no_secret(logs: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!logs.contains(s), "a password reached the logs: {s:?}");
    }
}

fn refused(status: u16) -> bool {
    status == 401 || status == 403
}

/// htpasswd central registry: a user logs in through Outpost with skopeo and by the token
/// flow; wrong passwords are refused online and offline; with the registry stopped, the
/// cached user keeps pulling until `offline_grace` after the last confirmation, then is
/// refused; unknown credentials offline get a clear 401.
#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_users_log_in_and_keep_pulling_offline_until_the_grace_ends() {
    let dir = tmp();
    let mut central = UpstreamRegistry::start(
        &dir.path().join("central"),
        UpstreamOptions {
            htpasswd: Some((ROBOT.0.to_owned(), ROBOT.1.to_owned())),
            users: vec![UpstreamUser::new("alice", ALICE_PW, &[""])],
            ..UpstreamOptions::default()
        },
    );
    seed(&central, dir.path(), "team/app", "v1", 1);
    let server = outpost(
        dir.path(),
        &central,
        true,
        "central_ttl = \"1s\"\noffline_grace = \"4s\"",
        TEAM_PULL,
    );

    // skopeo: the token flow against Outpost, with the user's password.
    let (ok, err) = inspect(&server, Some(("alice", ALICE_PW)), "team/app:v1");
    assert!(ok, "skopeo inspect as alice: {err}\n{}", server.logs());
    let copy_to = dir.path().join("copy");
    let out = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        &format!("alice:{ALICE_PW}"),
        &format!("docker://{}/central.corp/team/app:v1", server.addr),
        &format!("oci:{}:v1", copy_to.display()),
    ]);
    assert!(
        out.status.success(),
        "skopeo copy as alice: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Content came with Outpost's own credentials: the registry saw the robot fetch it.
    assert!(
        central
            .request_log()
            .iter()
            .any(|r| r.user_agent.starts_with("outpost/") && r.uri.contains("/blobs/")),
        "Outpost fetched the blobs itself"
    );

    // The token flow by hand: the token names the user.
    let (status, t) = token(&server, "alice", ALICE_PW, "team/app").await;
    assert_eq!(status, 200);
    let t = t.expect("a token");
    let claims = token_claims(&t);
    assert_eq!(claims["sub"], "alice", "{claims}");
    let (status, body) = manifest(&server, Some(&format!("Bearer {t}")), "team/app", "v1").await;
    assert_eq!(status, 200, "{body}");

    // Wrong password online: refused, by skopeo and by hand.
    let (ok, _) = inspect(&server, Some(("alice", "wrong-password-1")), "team/app:v1");
    assert!(!ok, "a wrong password was accepted online");
    assert_eq!(
        token(&server, "alice", "wrong-password-1", "team/app")
            .await
            .0,
        401
    );

    // Basic on /v2/ also works; after the TTL it confirms the login online, just before
    // the registry goes away.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = manifest(&server, Some(&basic("alice", ALICE_PW)), "team/app", "v1").await;
    assert_eq!(status, 200, "{body}");
    let confirmed = Instant::now();
    central.stop();

    // Offline, within the grace: skopeo and the token flow still work for alice.
    let (ok, err) = inspect(&server, Some(("alice", ALICE_PW)), "team/app:v1");
    assert!(ok, "offline within the grace: {err}\n{}", server.logs());
    let (status, t) = token(&server, "alice", ALICE_PW, "team/app").await;
    assert_eq!(status, 200);
    let (status, _) = manifest(
        &server,
        Some(&format!("Bearer {}", t.expect("token"))),
        "team/app",
        "v1",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        confirmed.elapsed() < Duration::from_secs(4),
        "the offline checks above must run within the grace to mean anything"
    );

    // Wrong and unknown credentials offline: a clear 401.
    let (status, _) = manifest(
        &server,
        Some(&basic("alice", "wrong-password-2")),
        "team/app",
        "v1",
    )
    .await;
    assert_eq!(status, 401, "a wrong password was accepted offline");
    let (status, body) = manifest(
        &server,
        Some(&basic("carol", "carol-pw-1")),
        "team/app",
        "v1",
    )
    .await;
    assert_eq!(status, 401);
    assert!(body.contains("cannot be reached"), "{body}");

    // Past the grace, alice is refused too (bounded wait).
    let deadline = confirmed + Duration::from_secs(20);
    let refused_at = loop {
        let (status, body) =
            manifest(&server, Some(&basic("alice", ALICE_PW)), "team/app", "v1").await;
        if refused(status) {
            assert!(body.contains("expired"), "{body}");
            break confirmed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "alice still pulls long past the grace"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        refused_at >= Duration::from_secs(2),
        "refused after {refused_at:?}, before the grace could have ended"
    );
    let (ok, _) = inspect(&server, Some(("alice", ALICE_PW)), "team/app:v1");
    assert!(!ok, "skopeo still pulls past the grace");

    let text = metrics_text(&server).await;
    for label in [
        "central_online",
        "central_cached",
        "central_denied",
        "central_offline_refused",
    ] {
        assert!(
            text.contains(&format!(
                "outpost_auth_decisions_total{{result=\"{label}\"}}"
            )),
            "no {label} in\n{text}"
        );
    }
    assert!(!text.contains("alice"), "a user name in the metrics");
    assert_no_secret(
        &server.logs(),
        &[
            ALICE_PW,
            ROBOT.1,
            "wrong-password-1",
            "wrong-password-2",
            "carol-pw-1",
        ],
    );
}

/// A password changed centrally stops working as soon as the central registry answers
/// again: the online refusal deletes the cached hash, so the old password does not come
/// back while the registry is offline, even within the grace.
#[tokio::test(flavor = "multi_thread")]
async fn a_password_changed_centrally_is_refused_once_the_registry_answers() {
    let dir = tmp();
    let mut central = UpstreamRegistry::start(
        &dir.path().join("central"),
        UpstreamOptions {
            htpasswd: Some((ROBOT.0.to_owned(), ROBOT.1.to_owned())),
            users: vec![UpstreamUser::new("alice", ALICE_PW, &[""])],
            ..UpstreamOptions::default()
        },
    );
    seed(&central, dir.path(), "team/app", "v1", 2);
    let mut server = outpost(
        dir.path(),
        &central,
        true,
        "central_ttl = \"1s\"\noffline_grace = \"1h\"",
        TEAM_PULL,
    );
    let old = basic("alice", ALICE_PW);
    assert_eq!(manifest(&server, Some(&old), "team/app", "v1").await.0, 200);

    central.set_password("alice", "alice-new-pw-2");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The registry may still be coming up; a bounded wait for its verdict.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = manifest(&server, Some(&old), "team/app", "v1").await;
        if status == 401 && body.contains("invalid user name or password") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old password still works online: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The refusal deleted the cached hash for good: with the registry down and Outpost
    // restarted (so no in-memory memory of the refusal helps), the old password is
    // still refused, though the grace of its last confirmation has hours to run.
    central.stop();
    server.stop();
    let mut server = Server::start_with_config(&server.config);
    let (status, body) = manifest(&server, Some(&old), "team/app", "v1").await;
    assert_eq!(status, 401, "the old password came back offline: {body}");

    // The new password works once the registry answers, and then offline too.
    let new = basic("alice", "alice-new-pw-2");
    central.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while manifest(&server, Some(&new), "team/app", "v1").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the new password is not accepted online"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    central.stop();
    assert_eq!(manifest(&server, Some(&new), "team/app", "v1").await.0, 200);
    assert_eq!(manifest(&server, Some(&old), "team/app", "v1").await.0, 401);
    let logs = server.logs();
    server.stop();
    assert_no_secret(&logs, &[ALICE_PW, "alice-new-pw-2", ROBOT.1]);
}

/// Token-auth central registry whose token server grants per user: a user without access
/// to a repository is refused even after another user cached it; decisions and logins
/// survive an Outpost restart and serve pulls while the registry is down.
#[tokio::test(flavor = "multi_thread")]
async fn token_auth_decisions_are_per_user_and_survive_restart_offline() {
    let dir = tmp();
    let mut central = UpstreamRegistry::start(
        &dir.path().join("central"),
        UpstreamOptions {
            token_auth: true,
            token_user: (ROBOT.0.to_owned(), ROBOT.1.to_owned()),
            anonymous_pull: false,
            users: vec![
                UpstreamUser::new("alice", ALICE_PW, &["team/"]),
                UpstreamUser::new("bob", BOB_PW, &["other/"]),
            ],
            ..UpstreamOptions::default()
        },
    );
    seed(&central, dir.path(), "team/app", "v1", 3);
    seed(&central, dir.path(), "other/thing", "v1", 4);
    let mut server = outpost(
        dir.path(),
        &central,
        true,
        "offline_grace = \"1h\"",
        TEAM_PULL,
    );

    let (ok, err) = inspect(&server, Some(("alice", ALICE_PW)), "team/app:v1");
    assert!(ok, "alice pulls team/app: {err}\n{}", server.logs());
    // The token server saw alice's own check, not only the robot.
    assert!(
        central
            .token_log()
            .iter()
            .any(|t| t.user.as_deref() == Some("alice") && t.status == 200),
        "alice's credentials were checked at the central registry"
    );

    // bob's credentials are valid, but not for team/app, which alice has cached.
    let (ok, _) = inspect(&server, Some(("bob", BOB_PW)), "team/app:v1");
    assert!(!ok, "bob pulled team/app");
    let (status, t) = token(&server, "bob", BOB_PW, "team/app").await;
    assert_eq!(status, 200, "bob may log in");
    let (status, body) = manifest(
        &server,
        Some(&format!("Bearer {}", t.expect("token"))),
        "team/app",
        "v1",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = manifest(&server, Some(&basic("bob", BOB_PW)), "team/app", "v1").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("DENIED") && body.contains("does not let bob pull team/app"),
        "refused by the central registry's decision, not the policy: {body}"
    );
    let (ok, err) = inspect(&server, Some(("bob", BOB_PW)), "other/thing:v1");
    assert!(ok, "bob pulls other/thing: {err}");
    let (status, _) = manifest(
        &server,
        Some(&basic("alice", ALICE_PW)),
        "other/thing",
        "v1",
    )
    .await;
    assert_eq!(status, 403, "alice pulled other/thing");
    assert_eq!(
        token(&server, "alice", "wrong-password-3", "team/app")
            .await
            .0,
        401
    );

    // _catalog lists, of the central repositories stored here, only those the central
    // registry is remembered to serve to the caller.
    assert_eq!(
        catalog(&server, Some(&basic("alice", ALICE_PW))).await,
        ["central.corp/team/app"]
    );
    assert_eq!(
        catalog(&server, Some(&basic("bob", BOB_PW))).await,
        ["central.corp/other/thing"]
    );
    assert!(catalog(&server, None).await.is_empty());

    let (_, t) = token(&server, "alice", ALICE_PW, "team/app").await;
    let claims = token_claims(&t.expect("token"));
    assert_eq!(claims["sub"], "alice", "{claims}");

    // Restart Outpost with the central registry down: the cached login and decisions hold.
    server.stop();
    central.stop();
    let server = Server::start_with_config(&server.config);
    let (ok, err) = inspect(&server, Some(("alice", ALICE_PW)), "team/app:v1");
    assert!(
        ok,
        "alice offline after a restart: {err}\n{}",
        server.logs()
    );
    let (ok, _) = inspect(&server, Some(("bob", BOB_PW)), "team/app:v1");
    assert!(!ok, "bob pulled team/app offline");
    let (ok, err) = inspect(&server, Some(("bob", BOB_PW)), "other/thing:v1");
    assert!(ok, "bob offline after a restart: {err}");
    let (status, body) = manifest(
        &server,
        Some(&basic("alice", "wrong-password-4")),
        "team/app",
        "v1",
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = manifest(
        &server,
        Some(&basic("carol", "carol-pw-2")),
        "team/app",
        "v1",
    )
    .await;
    assert_eq!(status, 401);
    assert_no_secret(
        &server.logs(),
        &[
            ALICE_PW,
            BOB_PW,
            ROBOT.1,
            "wrong-password-3",
            "wrong-password-4",
            "carol-pw-2",
        ],
    );
}

/// A token-auth central registry that serves anyone pull, holding `public/app:v1` and
/// `public/other:v1` (images of seeds `n` and `n + 1`).
fn public_central(dir: &Path, n: u64) -> UpstreamRegistry {
    let central = UpstreamRegistry::start(
        &dir.join("central"),
        UpstreamOptions {
            token_auth: true,
            token_user: (ROBOT.0.to_owned(), ROBOT.1.to_owned()),
            anonymous_pull: true,
            ..UpstreamOptions::default()
        },
    );
    seed(&central, dir, "public/app", "v1", n);
    seed(&central, dir, "public/other", "v1", n + 1);
    central
}

/// Without credentials of its own, Outpost learns on pull-through which repositories the
/// central registry serves anonymously, so anonymous pulls of them keep working offline;
/// a repository never seen is refused offline.
#[tokio::test(flavor = "multi_thread")]
async fn anonymously_served_repositories_are_learned_and_work_offline() {
    let dir = tmp();
    let mut central = public_central(dir.path(), 5);
    let server = outpost(
        dir.path(),
        &central,
        false,
        "offline_grace = \"1h\"",
        "[[access]]\nrepositories = [\"central.corp/public/**\"]\nanonymous = [\"pull\"]\n",
    );
    let (ok, err) = inspect(&server, None, "public/app:v1");
    assert!(ok, "anonymous pull online: {err}\n{}", server.logs());
    central.stop();
    let (ok, err) = inspect(&server, None, "public/app:v1");
    assert!(ok, "anonymous pull offline: {err}\n{}", server.logs());
    let (status, _) = manifest(&server, None, "public/other", "v1").await;
    assert_eq!(status, 401, "a repository never seen is refused offline");
}

/// A mirror run teaches the central login service which mirrored repositories the
/// central registry serves anonymously, even when Outpost mirrors with credentials of its
/// own: after the run, with the central registry gone, anonymous pulls of the mirrored
/// repository work, while a repository the run never saw is still refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_run_learns_which_mirrored_repositories_are_anonymous() {
    let dir = tmp();
    let mut central = public_central(dir.path(), 7);
    let server = outpost(
        dir.path(),
        &central,
        true,
        "offline_grace = \"1h\"",
        "[[access]]\nrepositories = [\"central.corp/public/**\"]\nanonymous = [\"pull\"]\n\
         [[mirror]]\nname = \"public\"\nupstream = \"central.corp\"\n\
         repositories = [\"public/app\"]\ntags = [\"v1\"]\n",
    );
    let out = common::outpost(&[
        "mirror",
        "run",
        "--config",
        server.config.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    central.stop();
    let (status, _) = manifest(&server, None, "public/app", "v1").await;
    assert_eq!(status, 200, "learned at mirror time\n{}", server.logs());
    let (status, _) = manifest(&server, None, "public/other", "v1").await;
    assert_eq!(status, 401, "a repository never seen is refused offline");
}
