//! A real containerd (root only), with its root, state and sockets under a test directory,
//! and `ctr` pulls configured the way an operator configures a mirror: a `hosts.toml` per
//! registry in a hosts directory. Tests of Outpost use the files that
//! `outpost client-config containerd` writes ([`generate_hosts_toml`]), so the product's
//! own output is what containerd reads; [`write_hosts_toml`] is for testing the harness.
//!
//! `ctr` resolves and fetches in its own process (it reads `--hosts-dir` itself) and writes
//! into the daemon's content store. containerd adds `?ns=<registry>` to every request it
//! sends to a mirror host (`/v2/library/x/manifests/v1?ns=docker.io`), and sends no `/v2/`
//! ping first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost::oci::Digest;

use super::process::{Daemon, SharedLog, run_with_timeout};

/// How long one `ctr` command may take.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(120);

/// A running containerd; stopped on drop (mounts under its directory are then undone).
pub struct Containerd {
    dir: PathBuf,
    address: PathBuf,
    daemon: Option<Daemon>,
    log: SharedLog,
}

impl Containerd {
    /// Writes `dir/containerd.toml` and starts containerd with everything under `dir`;
    /// returns once its socket answers. Panics unless running as root.
    pub fn start(dir: &Path) -> Containerd {
        assert!(is_root(), "containerd tests need root");
        std::fs::create_dir_all(dir).expect("create containerd dir");
        let q = |p: PathBuf| toml_str(&p);
        let address = dir.join("containerd.sock");
        // The CRI plugin would want a CNI setup and is not needed to pull; `opt` would
        // default to /opt/containerd.
        let config = format!(
            "version = 2\nroot = {}\nstate = {}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = {}\n[ttrpc]\n  address = {}\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {}\n",
            q(dir.join("root")),
            q(dir.join("state")),
            q(address.clone()),
            q(dir.join("containerd.sock.ttrpc")),
            q(dir.join("opt")),
        );
        let config_path = dir.join("containerd.toml");
        std::fs::write(&config_path, config).expect("write containerd config");
        let log: SharedLog = Arc::default();
        let daemon = Daemon::spawn(
            "containerd",
            Command::new("containerd").arg("--config").arg(&config_path),
            log.clone(),
        );
        let mut c = Containerd {
            dir: dir.to_owned(),
            address,
            daemon: Some(daemon),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if c.address.exists() && c.ctr(&["version"]).status.success() {
                return c;
            }
            let running = c.daemon.as_mut().is_some_and(Daemon::running);
            if !running || Instant::now() > deadline {
                panic!("containerd did not start:\n{}", c.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// Runs `ctr --address <socket> ARGS…` (namespace `default`), bounded by
    /// [`CTR_TIMEOUT`].
    pub fn ctr(&self, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.address)
                .args(args),
            CTR_TIMEOUT,
        )
    }

    /// Fetches `image_ref` (e.g. `docker.io/library/alpine:3`) for linux/amd64 into the
    /// content store, resolving hosts through `hosts_dir` — manifest(s), config and layers,
    /// with no unpacking, so the harness's synthetic images (layers that are not tars) work.
    /// This is `ctr content fetch`: `ctr images pull` would also unpack, which fails for
    /// such images.
    pub fn pull(&self, hosts_dir: &Path, image_ref: &str) -> Output {
        let hosts = hosts_dir.to_str().expect("utf-8 path");
        self.ctr(&[
            "content",
            "fetch",
            "--hosts-dir",
            hosts,
            "--platform",
            "linux/amd64",
            image_ref,
        ])
    }

    /// `ctr images pull`: fetch, register the image and unpack it with the overlayfs
    /// snapshotter — only for images whose layers are real tar archives matching the
    /// config's `diff_ids`.
    pub fn pull_and_unpack(&self, hosts_dir: &Path, image_ref: &str) -> Output {
        let hosts = hosts_dir.to_str().expect("utf-8 path");
        self.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            hosts,
            "--platform",
            "linux/amd64",
            image_ref,
        ])
    }

    /// The bytes of a manifest or blob in the content store, `None` if absent.
    pub fn content(&self, digest: &Digest) -> Option<Vec<u8>> {
        let out = self.ctr(&["content", "get", &digest.to_string()]);
        out.status.success().then_some(out.stdout)
    }

    /// The digests in the content store.
    pub fn content_digests(&self) -> Vec<String> {
        let out = self.ctr(&["content", "ls", "--quiet"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("sha256:"))
            .map(str::to_owned)
            .collect()
    }

    /// Everything containerd printed.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// SIGTERM (SIGKILL after 10 s), then undo any mount left under the directory.
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.terminate(Duration::from_secs(10));
            unmount_under(&self.dir);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `outpost client-config containerd --config CONFIG --dir HOSTS_DIR EXTRA…` (the
/// real binary) and returns its stdout; panics if it fails.
pub fn generate_hosts_toml(config: &Path, hosts_dir: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "client-config",
        "containerd",
        "--config",
        config.to_str().expect("utf-8 path"),
        "--dir",
        hosts_dir.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let out = super::outpost(&args);
    assert!(
        out.status.success(),
        "client-config containerd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Writes `hosts_dir/<registry>/hosts.toml` as an operator would for a pull-only mirror in
/// front of `registry` (Docker Hub's server for `docker.io`, `https://<registry>`
/// otherwise), optionally with a header sent to the mirror. Returns the file's path.
pub fn write_hosts_toml(
    hosts_dir: &Path,
    registry: &str,
    mirror_url: &str,
    header: Option<(&str, &str)>,
) -> PathBuf {
    let server = if registry == "docker.io" {
        "https://registry-1.docker.io".to_owned()
    } else {
        format!("https://{registry}")
    };
    let mut text = format!(
        "server = {}\n\n[host.{mirror}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        toml_quote(&server),
        mirror = toml_quote(mirror_url),
    );
    if let Some((name, value)) = header {
        text.push_str(&format!(
            "\n[host.{}.header]\n  {} = {}\n",
            toml_quote(mirror_url),
            toml_quote(name),
            toml_quote(value)
        ));
    }
    let dir = hosts_dir.join(registry);
    std::fs::create_dir_all(&dir).expect("create hosts dir");
    let file = dir.join("hosts.toml");
    std::fs::write(&file, text).expect("write hosts.toml");
    file
}

fn is_root() -> bool {
    // Without libc: the effective uid is in /proc/self/status ("Uid: real effective …").
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn toml_quote(s: &str) -> String {
    // A TOML basic string has JSON's escapes for everything a path or URL may hold.
    serde_json::to_string(s).expect("json string")
}

fn toml_str(p: &Path) -> String {
    toml_quote(p.to_str().expect("utf-8 path"))
}

/// Unmounts (lazily, deepest first) every mount point under `dir`: snapshots that an
/// interrupted unpack may have left mounted.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = run_with_timeout(
            Command::new("umount").args(["-l", p]),
            Duration::from_secs(10),
        );
    }
}
