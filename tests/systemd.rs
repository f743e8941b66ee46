//! The real daemon under a stand-in for systemd: `NOTIFY_SOCKET` names a datagram socket in
//! a temp dir, as systemd's does, and the test checks the notifications the lifecycle
//! sends: READY=1 only once `/v2/` answers, watchdog pings, RELOADING=1 then READY=1 on
//! SIGHUP, STOPPING=1 on SIGTERM, and a clean exit.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Receives notifications until one satisfies `want`, skipping watchdog pings unless
/// they are what is wanted.
fn next_matching(socket: &UnixDatagram, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let n = socket
            .recv(&mut buf)
            .expect("a notification before the timeout");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if want(&msg) {
            return msg;
        }
    }
    panic!("no matching notification within 20s");
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn notifies_systemd_through_the_lifecycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\npublic_url = \"http://127.0.0.1\"\n\
             shutdown_grace = \"2s\"\n[storage]\npath = {:?}\n",
            dir.path().join("data")
        ),
    )
    .expect("write config");

    let mut child = Command::new(outpost_bin())
        .args(["serve", "--config", config.to_str().expect("utf-8 path")])
        .env("NOTIFY_SOCKET", &socket_path)
        // 200 ms: pings every 100 ms, so the test sees some quickly.
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .env("OUTPOST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn outpost serve");
    let pid = child.id();

    let ready = next_matching(&socket, |m| m.contains("READY=1"));
    let addr = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=serving on "))
        .expect("STATUS names the listener")
        .to_owned();
    // READY=1 means serving: the very first request after it succeeds.
    let r = client()
        .get(format!("http://{addr}/v2/"))
        .send()
        .await
        .expect("/v2/ answers once READY=1 was sent");
    assert_eq!(r.status(), 200);

    next_matching(&socket, |m| m == "WATCHDOG=1\n");

    signal(pid, "-HUP");
    let reloading = next_matching(&socket, |m| m.contains("RELOADING=1"));
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "RELOADING=1 carries MONOTONIC_USEC: {reloading:?}"
    );
    next_matching(&socket, |m| m.contains("READY=1"));

    signal(pid, "-TERM");
    next_matching(&socket, |m| m.contains("STOPPING=1"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for outpost") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("outpost did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "clean exit after SIGTERM: {status}");
}
