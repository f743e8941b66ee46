//! Blob throughput over HTTP/3, HTTP/2 and HTTP/1.1 (all three over TLS), from one
//! Outpost process, in one run: `cargo bench --bench protocols`.
//!
//! The release binary serves a BLOB_MIB MiB blob (default 256) pushed over plain HTTP;
//! each protocol then downloads it RUNS times (default 5) one after another on one
//! connection, and PARALLEL (default 4) downloads at once (HTTP/3 and HTTP/2 as streams of
//! one connection, as their clients do; HTTP/1.1 over as many connections). Printed per
//! protocol: the median single-download rate, the aggregate parallel rate (MiB/s), and
//! the server's CPU time per GiB sent (from /proc). Every download's length is checked,
//! and the first one's digest. Without `--bench` (under `cargo test --all-targets`) it is
//! a smoke run on an 8 MiB blob.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::h3client::{H3, TestCert, https_client};
use common::*;
use futures_util::StreamExt;
use http::Method;
use outpost::oci::Digest;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The server's user + system CPU time so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Http3,
    Http2,
    Http11,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Http3 => "HTTP/3 (QUIC)",
            Protocol::Http2 => "HTTP/2 + TLS",
            Protocol::Http11 => "HTTP/1.1 + TLS",
        }
    }
}

struct Target {
    udp: SocketAddr,
    https: String,
    ca: Vec<u8>,
    bearer: String,
    path: String,
}

/// `count` downloads at once over `protocol`; the bytes of each, and the first's digest.
async fn download(t: &Target, protocol: Protocol, count: usize) -> (Vec<usize>, Digest) {
    let auth = [("authorization", t.bearer.as_str())];
    match protocol {
        Protocol::Http3 => {
            let mut h3 = H3::connect(t.udp, &t.ca).await.expect("HTTP/3 connection");
            let mut streams = Vec::new();
            for _ in 0..count {
                streams.push(h3.start(Method::GET, &t.path, &auth, None).await);
            }
            let bodies = futures_util::future::join_all(
                streams
                    .iter_mut()
                    .map(|s| async move { common::h3client::read(s).await.body }),
            )
            .await;
            h3.close().await;
            let digest = Digest::sha256_of(&bodies[0]);
            (bodies.iter().map(Vec::len).collect(), digest)
        }
        Protocol::Http2 | Protocol::Http11 => {
            let one = https_client(&t.ca, protocol == Protocol::Http11);
            let clients: Vec<reqwest::Client> = (0..count)
                .map(|_| match protocol {
                    // One client per download: one connection each.
                    Protocol::Http11 => https_client(&t.ca, true),
                    _ => one.clone(),
                })
                .collect();
            let bodies = futures_util::future::join_all(clients.iter().map(|c| async move {
                let r = c
                    .get(format!("{}{}", t.https, t.path))
                    .header("authorization", &t.bearer)
                    .send()
                    .await
                    .expect("GET");
                let version = r.version();
                let mut body = Vec::new();
                let mut stream = r.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    body.extend_from_slice(&chunk.expect("body"));
                }
                (version, body)
            }))
            .await;
            let expected = match protocol {
                Protocol::Http11 => reqwest::Version::HTTP_11,
                _ => reqwest::Version::HTTP_2,
            };
            assert!(bodies.iter().all(|(v, _)| *v == expected), "protocol");
            let digest = Digest::sha256_of(&bodies[0].1);
            (bodies.iter().map(|(_, b)| b.len()).collect(), digest)
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs it too, as a smoke
    // check that the bench still works, on a small blob.
    let bench = std::env::args().any(|a| a == "--bench");
    let blob_mib = env_or("BLOB_MIB", if bench { 256 } else { 8 });
    let runs = env_or("RUNS", if bench { 5 } else { 1 });
    let parallel = env_or("PARALLEL", 4);
    if !bench {
        println!("smoke run (no --bench): figures are not meaningful");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let issuer = Issuer::new(&dir.path().join("issuer"));
        let cert = TestCert::new(dir.path(), "server");
        let port = process::free_port();
        let tls = format!(
            "[server.tls]\nlisten = [\"127.0.0.1:{port}\"]\ncert = {:?}\nkey = {:?}\nhttp3 = true\n",
            cert.cert, cert.key
        );
        let server = Server::start_process(dir.path(), &issuer, &tls);
        let pid = server.pid().expect("child process");
        let key = issuer.issue("bench", &["bench/**"], "pull,push", "1h");
        let blob = bytes(11, blob_mib << 20);
        let (digest, status) = push_blob(&server, &key, "bench/blob", &blob).await;
        assert_eq!(status, 201, "push");
        drop(blob);
        let target = Target {
            udp: format!("127.0.0.1:{port}").parse().expect("addr"),
            https: format!("https://127.0.0.1:{port}"),
            ca: cert.pem(),
            bearer: format!("Bearer {key}"),
            path: format!("/v2/bench/blob/blobs/{digest}"),
        };
        println!(
            "blob {blob_mib} MiB, {runs} sequential downloads (median), {parallel} at once; \
             outpost {}, {} CPUs",
            std::path::Path::new(outpost_bin())
                .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .map_or_else(|_| outpost_bin().into(), |p| p.display().to_string()),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "{:<16} | {:>17} | {:>19} | {:>18}",
            "protocol",
            "single, MiB/s",
            format!("parallel x{parallel}, MiB/s"),
            "server CPU s / GiB"
        );
        for protocol in [Protocol::Http3, Protocol::Http2, Protocol::Http11] {
            // A warming download, which also checks the digest.
            let (lens, first) = download(&target, protocol, 1).await;
            assert_eq!(first, digest, "{} digest", protocol.name());
            assert_eq!(lens, vec![blob_mib << 20]);
            let cpu_before = cpu(pid);
            let mut rates = Vec::new();
            let mut sent = 0usize;
            for _ in 0..runs {
                let started = Instant::now();
                let (lens, _) = download(&target, protocol, 1).await;
                rates.push(lens[0] as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64());
                sent += lens[0];
            }
            let started = Instant::now();
            let (lens, _) = download(&target, protocol, parallel).await;
            let elapsed = started.elapsed().as_secs_f64();
            assert!(lens.iter().all(|l| *l == blob_mib << 20), "length");
            let total: usize = lens.iter().sum();
            sent += total;
            let cpu_per_gib = (cpu(pid) - cpu_before).as_secs_f64() / (sent as f64 / (1u64 << 30) as f64);
            rates.sort_by(f64::total_cmp);
            println!(
                "{:<16} | {:>17.0} | {:>19.0} | {:>18.2}",
                protocol.name(),
                rates[rates.len() / 2],
                total as f64 / (1 << 20) as f64 / elapsed,
                cpu_per_gib
            );
        }
        drop(server);
    });
}
