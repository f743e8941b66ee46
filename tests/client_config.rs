//! `outpost client-config`: the files the real binary writes (atomically, once, a key
//! kept private and never printed), and real clients using them: containerd's `ctr` with
//! the generated `hosts.toml` and its key header, skopeo with the generated
//! `registries.conf`, each pulling through Outpost from a fake upstream.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use common::containerd::{Containerd, generate_hosts_toml};
use common::fake::FakeUpstream;
use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A config file naming `docker.io` and `central.test` (alias `central.test:5000`); only
/// read by `client-config`, never served.
fn write_config(dir: &Path, public_url: &str) -> std::path::PathBuf {
    let path = dir.join("outpost.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\npublic_url = \"{public_url}\"\n\
             [storage]\npath = \"{}\"\n\
             [[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\n\
             [[upstream]]\nname = \"central.test\"\nurl = \"https://central.test:5000\"\n\
             aliases = [\"central.test:5000\"]\n",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    path
}

fn run(args: &[&str]) -> (String, String, i32) {
    let out = outpost(args);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

fn read_toml(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).expect("read generated file");
    toml::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not TOML ({e}):\n{text}", path.display()))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Every file under `dir`, recursively (to find leftover temp files).
fn all_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir") {
        let e = e.expect("entry");
        if e.path().is_dir() {
            out.extend(all_files(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out.sort();
    out
}

/// One hosts.toml per upstream name and alias; a second run rewrites nothing (same inode),
/// a file changed by hand is put back; the documented `--out`/`--mirror-url` spellings work.
#[test]
fn containerd_files_are_written_once_per_registry_host() {
    let dir = tmp();
    let config = write_config(dir.path(), "http://outpost.test:5000");
    let hosts = dir.path().join("certs.d");
    let c = config.to_str().expect("utf8");
    let h = hosts.to_str().expect("utf8");

    let (stdout, stderr, code) = run(&[
        "client-config",
        "containerd",
        "--config",
        c,
        "--out",
        h,
        "--mirror-url",
        "http://mirror.test:5000/",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let expected = [
        hosts.join("central.test/hosts.toml"),
        hosts.join("central.test:5000/hosts.toml"),
        hosts.join("docker.io/hosts.toml"),
    ];
    for p in &expected {
        assert!(
            stdout.contains(&format!("wrote {}\n", p.display())),
            "{stdout}"
        );
        assert_eq!(mode(p), 0o644, "{}", p.display());
    }
    assert!(stdout.contains("3 written, 0 unchanged"), "{stdout}");
    let names: Vec<String> = expected.iter().map(|p| p.display().to_string()).collect();
    assert_eq!(all_files(&hosts), names, "no temp file is left behind");

    let hub = read_toml(&expected[2]);
    assert_eq!(hub["server"].as_str(), Some("https://registry-1.docker.io"));
    let mirror = &hub["host"]["http://mirror.test:5000"];
    assert_eq!(
        mirror["capabilities"],
        toml::Value::Array(vec!["pull".into(), "resolve".into()])
    );
    assert!(mirror.get("header").is_none());
    let alias = read_toml(&expected[1]);
    assert_eq!(alias["server"].as_str(), Some("https://central.test:5000"));

    // Again, with the mirror URL from the config: every file differs, so all are written.
    let (stdout, stderr, code) = run(&["client-config", "containerd", "--config", c, "--dir", h]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("3 written, 0 unchanged"), "{stdout}");
    assert!(
        read_toml(&expected[2])["host"]
            .get("http://outpost.test:5000")
            .is_some()
    );

    // Unchanged input: nothing is replaced.
    let inodes: Vec<u64> = expected
        .iter()
        .map(|p| std::fs::metadata(p).expect("metadata").ino())
        .collect();
    let (stdout, _, code) = run(&["client-config", "containerd", "--config", c, "--dir", h]);
    assert_eq!(code, 0);
    assert!(stdout.contains("0 written, 3 unchanged"), "{stdout}");
    for (p, ino) in expected.iter().zip(&inodes) {
        assert!(
            stdout.contains(&format!("unchanged {}\n", p.display())),
            "{stdout}"
        );
        assert_eq!(std::fs::metadata(p).expect("metadata").ino(), *ino);
    }

    // A file edited by hand is the one put back.
    std::fs::write(&expected[0], "server = \"https://elsewhere\"\n").expect("edit");
    let (stdout, _, _) = run(&["client-config", "containerd", "--config", c, "--dir", h]);
    assert!(
        stdout.contains(&format!("wrote {}\n", expected[0].display())),
        "{stdout}"
    );
    assert!(stdout.contains("1 written, 2 unchanged"), "{stdout}");

    // --stdout and --dir exclude each other; a mirror URL with a path is refused.
    let (_, stderr, code) = run(&[
        "client-config",
        "containerd",
        "--config",
        c,
        "--dir",
        h,
        "--stdout",
    ]);
    assert_ne!(code, 0, "{stderr}");
    let (_, stderr, code) = run(&[
        "client-config",
        "containerd",
        "--config",
        c,
        "--dir",
        h,
        "--server",
        "http://outpost.test/v2",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("without a path"), "{stderr}");
}

/// With `--key-file`, every file carries the Bearer header and is mode 0600, also when an
/// existing 0644 file is replaced; the key is never printed, `--stdout` shows it redacted;
/// a key file that cannot be a header is refused without showing it.
#[test]
fn containerd_key_header_stays_private() {
    let dir = tmp();
    let config = write_config(dir.path(), "https://outpost.test:5443");
    let issuer = Issuer::new(&dir.path().join("keys"));
    let key = issuer.issue("edge-1", &["docker.io/**"], "pull", "1h");
    let key_file = dir.path().join("node.key");
    std::fs::write(&key_file, format!("{key}\n")).expect("write key");
    let hosts = dir.path().join("certs.d");
    let (c, h, k) = (
        config.to_str().expect("utf8"),
        hosts.to_str().expect("utf8"),
        key_file.to_str().expect("utf8"),
    );

    // A file written without the key first, so one is replaced with a tighter mode.
    let (_, stderr, code) = run(&["client-config", "containerd", "--config", c, "--dir", h]);
    assert_eq!(code, 0, "{stderr}");
    let hub = hosts.join("docker.io/hosts.toml");
    assert_eq!(mode(&hub), 0o644);

    let ca = "/etc/containerd/outpost ca.pem";
    let (stdout, stderr, code) = run(&[
        "client-config",
        "containerd",
        "--config",
        c,
        "--dir",
        h,
        "--key-file",
        k,
        "--ca",
        ca,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stdout.contains(&key) && !stderr.contains(&key),
        "{stdout}{stderr}"
    );
    let claims = outpost::decode_unverified(&key).expect("key");
    assert!(
        stdout.contains(&claims.id),
        "the report names the key's id: {stdout}"
    );
    for p in all_files(&hosts) {
        let p = Path::new(&p);
        assert_eq!(mode(p), 0o600, "{}", p.display());
        let t = read_toml(p);
        let host = &t["host"]["https://outpost.test:5443"];
        assert_eq!(
            host["header"]["Authorization"].as_str(),
            Some(format!("Bearer {key}").as_str())
        );
        assert_eq!(host["ca"].as_str(), Some(ca));
    }

    // The same files again: unchanged, still 0600.
    let (stdout, _, _) = run(&[
        "client-config",
        "containerd",
        "--config",
        c,
        "--dir",
        h,
        "--key-file",
        k,
        "--ca",
        ca,
    ]);
    assert!(stdout.contains("0 written, 3 unchanged"), "{stdout}");
    assert_eq!(mode(&hub), 0o600);

    let (stdout, stderr, code) = run(&[
        "client-config",
        "containerd",
        "--config",
        c,
        "--stdout",
        "--key-file",
        k,
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stdout.contains(&key) && !stderr.contains(&key),
        "{stdout}{stderr}"
    );
    assert!(
        stdout.contains("# ==> /etc/containerd/certs.d/docker.io/hosts.toml <==\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Authorization = \"Bearer [REDACTED]\""),
        "{stdout}"
    );
    assert_eq!(stdout.matches("# ==> ").count(), 3, "{stdout}");

    let secret_part = "s3cr3t-part";
    std::fs::write(&key_file, format!("{key} {secret_part}\n")).expect("write key");
    let (_, stderr, code) = run(&[
        "client-config",
        "containerd",
        "--config",
        c,
        "--dir",
        h,
        "--key-file",
        k,
    ]);
    assert_eq!(code, 2);
    assert!(
        !stderr.contains(secret_part) && !stderr.contains(&key),
        "{stderr}"
    );
}

/// `registries-conf` prints the entries, or writes them once with `--output`.
#[test]
fn registries_conf_is_printed_or_written_once() {
    let dir = tmp();
    let config = write_config(dir.path(), "http://outpost.test:5000");
    let c = config.to_str().expect("utf8");
    let (printed, stderr, code) = run(&["client-config", "registries-conf", "--config", c]);
    assert_eq!(code, 0, "{stderr}");
    let t: toml::Table = toml::from_str(&printed).expect("TOML");
    let entries: Vec<(String, String, bool)> = t["registry"]
        .as_array()
        .expect("registries")
        .iter()
        .map(|r| {
            let m = &r["mirror"][0];
            (
                r["prefix"].as_str().unwrap_or_default().to_owned(),
                m["location"].as_str().unwrap_or_default().to_owned(),
                m["insecure"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let want = |p: &str, l: &str| (p.to_owned(), l.to_owned(), true);
    assert_eq!(
        entries,
        [
            want("docker.io", "outpost.test:5000/docker.io"),
            want("central.test", "outpost.test:5000/central.test"),
            want("central.test:5000", "outpost.test:5000/central.test"),
        ]
    );

    let out = dir
        .path()
        .join("containers/registries.conf.d/50-outpost.conf");
    let o = out.to_str().expect("utf8");
    let (stdout, _, code) = run(&["client-config", "registries-conf", "--config", c, "-o", o]);
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("wrote {o}\n"));
    assert_eq!(std::fs::read_to_string(&out).expect("read"), printed);
    assert_eq!(mode(&out), 0o644);
    let (stdout, _, _) = run(&["client-config", "registries-conf", "--config", c, "-o", o]);
    assert_eq!(stdout, format!("unchanged {o}\n"));
    let (stdout, _, _) = run(&[
        "client-config",
        "registries-conf",
        "--config",
        c,
        "-o",
        o,
        "--server",
        "https://outpost.test:5443",
    ]);
    assert_eq!(stdout, format!("wrote {o}\n"));
    let text = std::fs::read_to_string(&out).expect("read");
    assert!(!text.contains("insecure"), "{text}");
    assert!(
        text.contains("location = \"outpost.test:5443/docker.io\""),
        "{text}"
    );
}

/// containerd pulls an image that only authenticated callers may pull, through the
/// hosts.toml that `client-config containerd --key-file` generated: the header reaches
/// Outpost (an anonymous request is refused), and the bytes are the upstream's.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_with_the_key_of_generated_hosts_toml() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let image = fake.add_image("library/app", "v1", 21, &[30_000, 10]);
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(
        dir.path(),
        &issuer,
        &format!(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"{}\"\n\
             [[access]]\nrepositories = [\"docker.io/**\"]\nauthenticated = [\"pull\"]\n",
            fake.url()
        ),
    );
    let key = issuer.issue("edge-1", &["docker.io/**"], "pull", "1h");
    let key_file = dir.path().join("node.key");
    std::fs::write(&key_file, &key).expect("write key");

    let anonymous = client()
        .get(server.url("/v2/library/app/manifests/v1?ns=docker.io"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("send");
    assert_eq!(anonymous.status(), 401, "only a key may pull");

    let ctrd = Containerd::start(&dir.path().join("containerd"));
    let hosts = dir.path().join("hosts");
    let report = generate_hosts_toml(
        &server.config,
        &hosts,
        &["--key-file", key_file.to_str().expect("utf8")],
    );
    assert!(!report.contains(&key), "{report}");
    let out = ctrd.pull(&hosts, "docker.io/library/app:v1");
    assert!(
        out.status.success(),
        "ctr pull: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.logs()
    );
    assert_eq!(
        ctrd.content(&image.manifest),
        Some(image.manifest_bytes.clone())
    );
    for d in image.layers.iter().chain([&image.config]) {
        let stored = ctrd.content(d).expect("blob in containerd");
        assert_eq!(outpost::oci::Digest::sha256_of(&stored), *d);
    }
    assert!(fake.count("GET", &FakeUpstream::manifest_path("library/app", "v1")) >= 1);
}

/// skopeo with the generated registries.conf resolves `docker.io/…`, `central.test/…` and
/// the alias `central.test:5000/…` through Outpost's path-prefix form: each inspect is
/// answered by Outpost (its cache counters move; the fake upstream sees Outpost's
/// fetches), and nothing else could answer, as these hosts do not exist.
#[tokio::test(flavor = "multi_thread")]
async fn skopeo_resolves_through_generated_registries_conf() {
    let dir = tmp();
    let fake = FakeUpstream::start();
    let hub = fake.add_image("library/alpine", "3", 31, &[5000]);
    let app = fake.add_image("team/app", "v1", 32, &[6000]);
    let issuer = Issuer::new(&dir.path().join("keys"));
    let server = Server::start(
        dir.path(),
        &issuer,
        &format!(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"{url}\"\n\
             [[upstream]]\nname = \"central.test\"\nurl = \"{url}\"\n\
             aliases = [\"central.test:5000\"]\n\
             [[access]]\nrepositories = [\"docker.io/**\", \"central.test/**\"]\n\
             anonymous = [\"pull\"]\n",
            url = fake.url()
        ),
    );
    let conf = dir.path().join("registries.conf");
    let out = outpost(&[
        "client-config",
        "registries-conf",
        "--config",
        server.config.to_str().expect("utf8"),
        "--output",
        conf.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (reference, upstream, image) in [
        ("docker.io/library/alpine:3", "docker.io", &hub),
        ("central.test/team/app:v1", "central.test", &app),
        ("central.test:5000/team/app:v1", "central.test", &app),
    ] {
        let before = cache_requests(&server, upstream).await;
        let out = skopeo(&[
            "--registries-conf",
            conf.to_str().expect("utf8"),
            "inspect",
            // Tag lists come from the registry itself, never from a mirror.
            "--no-tags",
            &format!("docker://{reference}"),
        ]);
        assert!(
            out.status.success(),
            "inspect {reference}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.logs()
        );
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(
            shown["Digest"].as_str(),
            Some(image.manifest.to_string().as_str())
        );
        assert!(
            cache_requests(&server, upstream).await > before,
            "{reference} was not answered by Outpost"
        );
        let (repo, tag) = reference
            .split_once('/')
            .and_then(|(_, r)| r.rsplit_once(':'))
            .expect("repo:tag");
        assert!(
            fake.count("GET", &FakeUpstream::manifest_path(repo, tag)) >= 1,
            "{reference}: Outpost fetched it from the upstream"
        );
    }
}

/// Sum of `outpost_cache_requests_total` for `upstream`.
async fn cache_requests(server: &Server, upstream: &str) -> f64 {
    let label = format!("upstream=\"{upstream}\"");
    metric(server, "outpost_cache_requests_total{", &[&label]).await
}
