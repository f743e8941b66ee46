//! The command line as a newcomer meets it: every command's `--help` describes every
//! option and shows an example, and exit statuses tell a usage error, a bad
//! configuration and a failure to run apart. Error text never repeats itself.

mod common;

use common::outpost;

/// Every leaf command, as its words.
const COMMANDS: &[&[&str]] = &[
    &["serve"],
    &["gc"],
    &["fsck"],
    &["config", "check"],
    &["config", "default"],
    &["key", "generate"],
    &["key", "issue"],
    &["key", "inspect"],
    &["key", "revoke"],
    &["key", "list"],
    &["client-config", "containerd"],
    &["client-config", "registries-conf"],
    &["mirror", "run"],
    &["mirror", "status"],
    &["config"],
    &["key"],
    &["client-config"],
    &["mirror"],
];

/// Regression: `--config` and several other options showed an empty description, and
/// group commands had no example.
#[test]
fn every_command_describes_every_option_and_shows_an_example() {
    for words in COMMANDS {
        let mut args = words.to_vec();
        args.push("--help");
        let out = outpost(&args);
        assert!(out.status.success(), "{words:?}");
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            help.contains("Example"),
            "{words:?} has no example:\n{help}"
        );
        let lines: Vec<&str> = help
            .lines()
            .skip_while(|l| !l.starts_with("Options:") && !l.starts_with("Arguments:"))
            .collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !t.starts_with('-') || !line.starts_with("  ") {
                continue;
            }
            let same_line = t.trim_end().contains("  ");
            let next = lines.get(i + 1).map_or("", |n| n.trim());
            assert!(
                same_line || (!next.is_empty() && !next.starts_with('-')),
                "{words:?}: option without a description: {line:?}\n{help}"
            );
        }
    }
}

/// Regression: usage errors and runtime errors both exited 2, and an error whose cause
/// embeds its source printed the source twice (`File exists …: File exists …`).
#[test]
fn exit_statuses_tell_usage_configuration_and_runtime_errors_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name).to_str().expect("utf8").to_owned();

    let out = outpost(&["serve", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "usage");
    let out = outpost(&[
        "key",
        "issue",
        "--signing-key",
        "k",
        "--subject",
        "a",
        "--repo",
        "a/**",
        "--expires",
        "soon",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad option value is a usage error"
    );

    std::fs::write(
        path("bad.toml"),
        "[server]\nlisten = [\"127.0.0.1:0\"]\nbogus = 1\n",
    )
    .expect("write");
    let out = outpost(&["config", "check", "--config", &path("bad.toml")]);
    assert_eq!(out.status.code(), Some(3), "invalid configuration");

    std::fs::write(
        path("ok.toml"),
        "[server]\nlisten = [\"127.0.0.1:0\"]\npublic_url = \"http://x:5000\"\n\
         [storage]\npath = \"nowhere\"\n",
    )
    .expect("write");
    let out = outpost(&["gc", "--config", &path("ok.toml")]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "no store: the command could not run"
    );

    let keys = path("keys");
    assert!(
        outpost(&["key", "generate", "--out-dir", &keys])
            .status
            .success()
    );
    let out = outpost(&["key", "generate", "--out-dir", &keys]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("File exists").count(), 1, "{err}");
}

/// With `OUTPOST_LOG_FORMAT=json` every line the daemon writes to stderr is one JSON
/// object with the level, the message and the event's fields (for log shippers).
#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\npublic_url = \"http://x:5000\"\n\
             [storage]\npath = {:?}\n",
            dir.path().join("data")
        ),
    )
    .expect("write");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["serve", "--config", config.to_str().expect("utf8")])
        .env("OUTPOST_LOG_FORMAT", "json")
        .env_remove("JOURNAL_STREAM")
        .env("OUTPOST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
    {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let message = v["message"].as_str().unwrap_or_default().to_owned();
        assert_eq!(v["level"], "INFO", "{line}");
        if message == "listening" {
            assert!(
                v["addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1:")),
                "{line}"
            );
            seen.push(message);
            break;
        }
        seen.push(message);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        seen.first().map(String::as_str),
        Some("outpost starting"),
        "{seen:?}"
    );
    assert_eq!(
        seen.last().map(String::as_str),
        Some("listening"),
        "{seen:?}"
    );
}
