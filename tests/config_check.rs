//! `outpost config check` on mirror jobs: every key is validated, each problem named, and
//! every valid key accepted.

mod common;

use common::outpost;

const BASE: &str = "[server]\nlisten = [\"127.0.0.1:0\"]\npublic_url = \"http://127.0.0.1\"\n\
    [storage]\npath = \"data\"\n[[upstream]]\nname = \"central.corp\"\nurl = \"https://central.corp\"\n";

fn check(dir: &std::path::Path, text: &str) -> (bool, String) {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, text).expect("write config");
    let out = outpost(&["config", "check", "--config", path.to_str().expect("utf8")]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Regression: `config check` accepted `schedule = "every now and then"`, and mirror jobs
/// were parsed but never ran. Every key of a job is validated and, once valid, accepted
/// (each one works: tests/mirror.rs).
#[test]
fn mirror_jobs_are_validated_and_every_valid_key_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, err) = check(
        dir.path(),
        &format!(
            "{BASE}[[mirror]]\nname = \"apps\"\nupstream = \"central.corp\"\n\
             repositories = [\"team/app\"]\ntags = [\"v*\"]\nschedule = \"every now and then\"\n"
        ),
    );
    assert!(!ok);
    assert!(err.contains("mirror \"apps\".schedule"), "{err}");

    let (ok, err) = check(
        dir.path(),
        &format!(
            "{BASE}[[mirror]]\nname = \"apps\"\nupstream = \"central.corp\"\n\
             repositories = [\"team/app\", \"team/tools-*\"]\ntags = [\"v*\"]\n\
             schedule = \"0 2 * * *\"\nbandwidth = \"10MiB/s\"\nreferrers = true\nprune = true\n"
        ),
    );
    assert!(ok, "{err}");
}
