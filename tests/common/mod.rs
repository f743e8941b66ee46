//! Test harness: runs the daemon on 127.0.0.1 with a temp data dir — in this process
//! through the library by default ([`inproc`]), or the real `outpost` binary as a child
//! process where a process is the point ([`Server::start_process`]) — issues keys with the
//! real CLI, builds OCI image layouts on disk, and drives skopeo.
//!
//! For pull-through tests: [`upstream`] runs a real docker-registry (optionally with Docker
//! Hub-style token auth and a CDN redirect), [`fake`] an in-process upstream that misbehaves
//! on demand, and [`containerd`] a real containerd pulling through `hosts.toml`.
#![allow(dead_code)]

pub mod containerd;
pub mod fake;
pub mod h3client;
mod inproc;
pub mod process;
mod serve;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost::oci::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub fn outpost_bin() -> &'static str {
    env!("CARGO_BIN_EXE_outpost")
}

pub fn outpost(args: &[&str]) -> Output {
    Command::new(outpost_bin())
        .args(args)
        .output()
        .expect("run outpost")
}

/// An issuer key pair in a temp dir.
pub struct Issuer {
    pub dir: PathBuf,
}

impl Issuer {
    pub fn new(dir: &Path) -> Issuer {
        let out = outpost(&["key", "generate", "--out-dir", dir.to_str().expect("utf8")]);
        assert!(
            out.status.success(),
            "key generate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Issuer {
            dir: dir.to_owned(),
        }
    }

    pub fn public(&self) -> PathBuf {
        self.dir.join("issuer.pub")
    }

    pub fn issue(&self, subject: &str, repos: &[&str], actions: &str, expires: &str) -> String {
        let key = self.dir.join("issuer.key");
        let mut args = vec![
            "key",
            "issue",
            "--signing-key",
            key.to_str().expect("utf8"),
            "--subject",
            subject,
        ];
        for r in repos {
            args.extend(["--repo", r]);
        }
        args.extend(["--actions", actions, "--expires", expires]);
        let out = outpost(&args);
        assert!(
            out.status.success(),
            "key issue: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf8")
            .lines()
            .last()
            .expect("key line")
            .trim()
            .to_owned()
    }
}

/// How a [`Server`] runs.
enum Runner {
    /// Through the library, in this process (the default).
    InProcess(inproc::InProcess),
    /// The real binary, as a child process: for what only a process shows (kill -9,
    /// signals, two processes on one store, the binary's own logging).
    Process(Child),
    Stopped,
}

/// A running daemon; stopped (in process) or killed (child process) on drop.
pub struct Server {
    runner: Runner,
    pub addr: String,
    pub config: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Writes `dir/outpost.toml` (listening on a port bound here, data in `dir/data`,
    /// trusting `issuer`) plus `extra` TOML, and starts the daemon in this process on
    /// that very listener: no port race.
    pub fn start(dir: &Path, issuer: &Issuer, extra: &str) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("bound address").port();
        let config = write_config(dir, issuer, extra, port);
        Server::in_process(&config, Some(listener), "info")
    }

    /// Like [`Server::start`], with lines of the test's own in `[server]` and `[storage]`.
    pub fn start_sections(dir: &Path, issuer: &Issuer, sections: &Sections) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("bound address").port();
        let config = write_config_sections(dir, issuer, port, sections);
        Server::in_process(&config, Some(listener), "info")
    }

    /// Like [`Server::start`], but runs the real binary as a child process. The port is
    /// picked free up front and bound again by the child (a short race other processes
    /// could win, acceptable where a process is the point).
    pub fn start_process(dir: &Path, issuer: &Issuer, extra: &str) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = write_config(dir, issuer, extra, port);
        Server::process_with_log(&config, "info")
    }

    /// Binds `127.0.0.1:0` and starts in this process on that listener, with the config
    /// file `write(port)` writes (it returns the file's path); logs captured at `filter`.
    pub fn start_written(write: impl FnOnce(u16) -> PathBuf, filter: &str) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("bound address").port();
        let config = write(port);
        Server::in_process(&config, Some(listener), filter)
    }

    /// Runs the real binary on `config` (a restart of a [`Server::start_process`] one).
    pub fn start_process_with_config(config: &Path) -> Server {
        Server::process_with_log(config, "info")
    }

    /// Starts the daemon in this process on the addresses `config` names (a restart).
    pub fn start_with_config(config: &Path) -> Server {
        Server::in_process(config, None, "info")
    }

    /// Like [`Server::start_with_config`], capturing logs at `filter` (for example
    /// `debug`, to check what the most verbose logs say).
    pub fn start_with_log(config: &Path, filter: &str) -> Server {
        Server::in_process(config, None, filter)
    }

    fn in_process(config: &Path, listener: Option<std::net::TcpListener>, filter: &str) -> Server {
        let log = Arc::new(Mutex::new(String::new()));
        match inproc::InProcess::start(config, listener, filter, log.clone()) {
            Ok((daemon, addr)) => Server {
                runner: Runner::InProcess(daemon),
                addr,
                config: config.to_owned(),
                log,
            },
            Err(e) => panic!(
                "server did not start: {e}\n{}",
                log.lock().map(|l| l.clone()).unwrap_or_default()
            ),
        }
    }

    /// Runs the real binary on `config` with `OUTPOST_LOG` set to `filter`.
    pub fn process_with_log(config: &Path, filter: &str) -> Server {
        let mut child = Command::new(outpost_bin())
            .args(["serve", "--config", config.to_str().expect("utf8")])
            .env("OUTPOST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening addr=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start: {}",
                    log.lock().map(|l| l.clone()).unwrap_or_default()
                );
            }
        };
        Server {
            runner: Runner::Process(child),
            addr,
            config: config.to_owned(),
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn logs(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The child process's id ([`Server::start_process`]); `None` in process.
    pub fn pid(&self) -> Option<u32> {
        match &self.runner {
            Runner::Process(c) => Some(c.id()),
            _ => None,
        }
    }

    /// SIGHUP to the child process ([`Server::start_process`]): reload.
    pub fn hup(&self) {
        self.signal("-HUP");
    }

    /// SIGTERM to the child process, without waiting for it to stop (see [`Server::stop`]).
    pub fn term(&self) {
        self.signal("-TERM");
    }

    fn signal(&self, sig: &str) {
        match &self.runner {
            Runner::Process(c) => {
                let status = Command::new("kill")
                    .args([sig, &c.id().to_string()])
                    .status()
                    .expect("kill");
                assert!(status.success(), "kill {sig} failed");
            }
            _ => panic!("signals need a child process: use start_process"),
        }
    }

    /// Waits (bounded) until the log holds `needle` `count` times or more.
    pub fn wait_for_log(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            if logs.matches(needle).count() >= count {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} x{count} never logged:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to clean up, like a power cut for the process. Only a child
    /// process can be killed so ([`Server::start_process`]).
    pub fn kill9(&mut self) {
        match std::mem::replace(&mut self.runner, Runner::Stopped) {
            Runner::Process(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Runner::InProcess(_) => panic!("kill -9 needs a child process: use start_process"),
            Runner::Stopped => {}
        }
    }

    /// A clean stop: SIGTERM for a child process, the same drain in process.
    pub fn stop(&mut self) {
        let runner = std::mem::replace(&mut self.runner, Runner::Stopped);
        if let Runner::InProcess(mut daemon) = runner {
            daemon.stop();
            return;
        }
        if let Runner::Process(mut c) = runner {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.runner, Runner::Stopped) {
            Runner::Process(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Runner::InProcess(mut daemon) => daemon.stop(),
            Runner::Stopped => {}
        }
    }
}

/// Writes `dir/outpost.toml` for a daemon on `127.0.0.1:<port>`.
fn write_config(dir: &Path, issuer: &Issuer, extra: &str, port: u16) -> PathBuf {
    write_config_sections(
        dir,
        issuer,
        port,
        &Sections {
            extra,
            ..Sections::default()
        },
    )
}

/// Lines a test adds to the sections of the config file it starts a daemon with.
#[derive(Default)]
pub struct Sections<'a> {
    /// Into `[server]` (a `body_idle_timeout` here replaces the default of 5 s).
    pub server: &'a str,
    /// Into `[storage]` (a `gc_grace` here replaces the default of 0 s).
    pub storage: &'a str,
    /// After `[auth]`: more of it, then any further sections.
    pub extra: &'a str,
}

/// `dir/outpost.toml` listening on `port`, data in `dir/data`, trusting `issuer`, with
/// the test's `sections`.
fn write_config_sections(dir: &Path, issuer: &Issuer, port: u16, sections: &Sections) -> PathBuf {
    let config = dir.join("outpost.toml");
    let idle = if sections.server.contains("body_idle_timeout") {
        ""
    } else {
        "body_idle_timeout = \"5s\"\n"
    };
    let grace = if sections.storage.contains("gc_grace") {
        ""
    } else {
        "gc_grace = \"0s\"\n"
    };
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\npublic_url = \"http://127.0.0.1:{port}\"\n{idle}{}\n\
         [storage]\npath = {:?}\n{grace}{}\n[auth]\nissuer_keys = [{:?}]\n{}",
        sections.server,
        dir.join("data"),
        sections.storage,
        issuer.public(),
        sections.extra
    );
    std::fs::write(&config, text).expect("write config");
    config
}

/// Deterministic pseudo-random bytes (xorshift), so content differs per seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Wraps `data` in a valid gzip stream of stored (uncompressed) deflate blocks, so
/// clients recognise layers as compressed and copy them unchanged.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(65_535).collect()
    };
    for (i, chunk) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// An OCI image layout on disk.
pub struct Layout {
    pub dir: PathBuf,
    pub entries: Vec<serde_json::Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("mkdir");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
        Layout {
            dir: dir.to_owned(),
            entries: Vec::new(),
        }
    }

    pub fn put_blob(&self, content: &[u8]) -> (Digest, usize) {
        let d = Digest::sha256_of(content);
        std::fs::write(self.dir.join("blobs/sha256").join(d.hex()), content).expect("write blob");
        (d, content.len())
    }

    /// Writes an image (config + layers of the given sizes) and returns its manifest.
    pub fn image(&self, seed: u64, layer_sizes: &[usize], arch: &str) -> (Digest, usize, Vec<u8>) {
        let layers: Vec<serde_json::Value> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let (d, s) = self.put_blob(&gzip_stored(&bytes(seed * 100 + i as u64, n)));
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": s})
            })
            .collect();
        let config = serde_json::json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}, "seed": seed});
        let (cd, cs) = self.put_blob(config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": cs},
            "layers": layers,
        });
        let body = manifest.to_string().into_bytes();
        let (md, ms) = self.put_blob(&body);
        (md, ms, body)
    }

    pub fn tag(&mut self, media_type: &str, digest: &Digest, size: usize, tag: &str) {
        self.entries.push(serde_json::json!({
            "mediaType": media_type, "digest": digest.to_string(), "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }));
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.entries});
        std::fs::write(self.dir.join("index.json"), index.to_string()).expect("write index");
    }

    /// A multi-arch index over two images; returns its digest and size.
    pub fn multi_arch(&self, seed: u64) -> (Digest, usize) {
        let (a, asz, _) = self.image(seed, &[2048, 70_000], "amd64");
        let (b, bsz, _) = self.image(seed + 1, &[4096], "arm64");
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": a.to_string(), "size": asz, "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": OCI_MANIFEST, "digest": b.to_string(), "size": bsz, "platform": {"os": "linux", "architecture": "arm64"}},
            ]
        });
        self.put_blob(index.to_string().as_bytes())
    }
}

pub fn skopeo(args: &[&str]) -> Output {
    Command::new("skopeo")
        .args(["--insecure-policy"])
        .args(args)
        .output()
        .expect("skopeo must be installed (apt-get install skopeo)")
}

/// Every file under `blobs/` of a layout, by name, with contents.
pub fn layout_blobs(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .expect("read layout")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

pub fn client() -> reqwest::Client {
    // reqwest is built without a crypto provider of its own (see `outpost::install_crypto_provider`).
    outpost::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Pushes a blob monolithically with a key; returns the status.
pub async fn push_blob(
    server: &Server,
    key: &str,
    repo: &str,
    content: &[u8],
) -> (Digest, reqwest::StatusCode) {
    let d = Digest::sha256_of(content);
    let r = client()
        .post(server.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")))
        .bearer_auth(key)
        .body(content.to_vec())
        .send()
        .await
        .expect("send");
    (d, r.status())
}

/// Pushes a manifest; returns the response.
pub async fn push_manifest(
    server: &Server,
    key: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> reqwest::Response {
    client()
        .put(server.url(&format!("/v2/{repo}/manifests/{reference}")))
        .bearer_auth(key)
        .header("Content-Type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .expect("send")
}

/// Pushes a small image (config + one layer) into `repo` under `tag`.
pub async fn push_image(
    server: &Server,
    key: &str,
    repo: &str,
    tag: &str,
    seed: u64,
) -> (Digest, Vec<u8>, Digest) {
    let layer = bytes(seed, 10_000);
    let (ld, st) = push_blob(server, key, repo, &layer).await;
    assert_eq!(st, 201, "layer push");
    let config = format!("{{\"seed\":{seed}}}");
    let (cd, st) = push_blob(server, key, repo, config.as_bytes()).await;
    assert_eq!(st, 201, "config push");
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld.to_string(), "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    let r = push_manifest(server, key, repo, tag, OCI_MANIFEST, &manifest).await;
    assert_eq!(
        r.status(),
        201,
        "manifest push: {}",
        r.text().await.unwrap_or_default()
    );
    (Digest::sha256_of(&manifest), manifest, ld)
}

/// The daemon's `/metrics` page.
pub async fn metrics_text(server: &Server) -> String {
    client()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body")
}

/// The sum of the values of the metric lines that start with `prefix` and contain every
/// one of `labels` (e.g. `upstream="docker.io"`).
pub async fn metric(server: &Server, prefix: &str, labels: &[&str]) -> f64 {
    metrics_text(server)
        .await
        .lines()
        .filter(|l| l.starts_with(prefix) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The OCI error code of a JSON error body.
pub async fn error_code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.expect("error body is JSON");
    v["errors"][0]["code"]
        .as_str()
        .expect("errors[0].code")
        .to_owned()
}
