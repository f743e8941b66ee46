//! HTTP/3 end to end, through the real binary and a real h3 + quinn client: the same API
//! as HTTP/1.1 and HTTP/2 (auth, pulls byte-exact, ranges, a push), `Alt-Svc` on TLS
//! responses, certificate reload on SIGHUP, a download in flight finishing across a
//! graceful stop, and a request answered before its end stopped as RFC 9114 says.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use common::h3client::{H3, TestCert, https_client, read, read_body, stopped};
use common::*;
use http::Method;
use outpost::oci::Digest;

/// The `[server.tls]` section for `cert` on `port`, with HTTP/3 on.
fn tls_section(cert: &TestCert, port: u16) -> String {
    format!(
        "[server.tls]\nlisten = [\"127.0.0.1:{port}\"]\ncert = {:?}\nkey = {:?}\nhttp3 = true\n",
        cert.cert, cert.key
    )
}

/// Copies `from`'s certificate and key over `to`'s files (what an operator's renewal does).
fn replace_cert(to: &TestCert, from: &TestCert) {
    std::fs::copy(&from.cert, &to.cert).expect("copy certificate");
    std::fs::copy(&from.key, &to.key).expect("copy key");
}

/// The real binary in `dir` with an issuer, a certificate and HTTP/3 on a free port.
fn start_tls(dir: &Path) -> (Issuer, TestCert, u16, Server) {
    let issuer = Issuer::new(&dir.join("issuer"));
    let cert = TestCert::new(dir, "server");
    let port = process::free_port();
    let server = Server::start_process(dir, &issuer, &tls_section(&cert, port));
    (issuer, cert, port, server)
}

#[tokio::test(flavor = "multi_thread")]
async fn http3_serves_the_same_api_pulls_byte_exact_and_pushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (issuer, cert, port, server) = start_tls(dir.path());
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let (manifest_digest, manifest, _) = push_image(&server, &key, "team/app", "v1", 1).await;
    let big = bytes(3, 24 << 20);
    let (big_digest, status) = push_blob(&server, &key, "team/app", &big).await;
    assert_eq!(status, 201);
    let udp: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut h3 = H3::connect(udp, &cert.pem())
        .await
        .expect("HTTP/3 connection");
    let bearer = format!("Bearer {key}");
    let auth = [("authorization", bearer.as_str())];

    // The same auth phase: anonymous is challenged, like over HTTP/1.1.
    let r = h3.request(Method::GET, "/v2/", &[], None).await;
    assert_eq!(r.status, 401);
    assert!(r.headers.contains_key("www-authenticate"));
    let r = h3.request(Method::GET, "/v2/", &auth, None).await;
    assert_eq!(r.status, 200);

    // A manifest, byte-exact, with its digest; HEAD has the headers and no body.
    let path = "/v2/team/app/manifests/v1";
    let accept = [auth[0], ("accept", OCI_MANIFEST)];
    let r = h3.request(Method::GET, path, &accept, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, manifest);
    assert_eq!(
        r.headers["docker-content-digest"].to_str().expect("ascii"),
        manifest_digest.as_str()
    );
    let r = h3.request(Method::HEAD, path, &accept, None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(
        r.headers["content-length"],
        manifest.len().to_string().as_str()
    );

    // A 24 MiB blob, byte-exact; a range of it.
    let blob = format!("/v2/team/app/blobs/{big_digest}");
    let r = h3.request(Method::GET, &blob, &auth, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.len());
    assert_eq!(Digest::sha256_of(&r.body), big_digest);
    let ranged = [auth[0], ("range", "bytes=1000-1999")];
    let r = h3.request(Method::GET, &blob, &ranged, None).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, big[1000..2000]);

    // A push: a chunked upload (PATCH, then PUT with the digest) and a manifest.
    let layer = Bytes::from(bytes(9, 5 << 20));
    let layer_digest = Digest::sha256_of(&layer);
    let r = h3
        .request(Method::POST, "/v2/team/app/blobs/uploads/", &auth, None)
        .await;
    assert_eq!(r.status, 202);
    let location = r.headers["location"].to_str().expect("ascii").to_owned();
    let r = h3
        .request(Method::PATCH, &location, &auth, Some(layer.clone()))
        .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let location = r.headers["location"].to_str().expect("ascii").to_owned();
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = h3
        .request(
            Method::PUT,
            &format!("{location}{sep}digest={layer_digest}"),
            &auth,
            None,
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let pushed = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": layer_digest.to_string(), "size": layer.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest.to_string(), "size": layer.len()}],
    })
    .to_string();
    let put = [auth[0], ("content-type", OCI_MANIFEST)];
    let r = h3
        .request(
            Method::PUT,
            "/v2/team/app/manifests/over-h3",
            &put,
            Some(Bytes::from(pushed.clone())),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    // What HTTP/3 pushed, HTTP/1.1 pulls.
    let r = client()
        .get(server.url("/v2/team/app/manifests/over-h3"))
        .bearer_auth(&key)
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .expect("pull");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body"), pushed.as_bytes());
    let r = client()
        .get(server.url(&format!("/v2/team/app/blobs/{layer_digest}")))
        .bearer_auth(&key)
        .send()
        .await
        .expect("pull");
    assert_eq!(r.bytes().await.expect("body"), layer);
    h3.close().await;

    // The same request log: one line per HTTP/3 request, with what was sent.
    let logs = server.wait_for_log("path=/v2/team/app/manifests/over-h3", 2);
    assert!(
        logs.lines().any(|l| l.contains("method=PUT")
            && l.contains("path=/v2/team/app/manifests/over-h3")
            && l.contains("status=201")),
        "{logs}"
    );
    assert!(
        logs.lines().any(|l| l.contains(&format!("path={blob}"))
            && l.contains(&format!("bytes={}", big.len()))
            && l.contains("complete=true")),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_responses_advertise_http3_and_a_reloaded_certificate_is_served_on_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_issuer, cert, port, server) = start_tls(dir.path());
    let renewed = TestCert::new(dir.path(), "renewed");
    let tls_url = format!("https://127.0.0.1:{port}/v2/");
    let alt_svc = format!("h3=\":{port}\"; ma=86400");

    // HTTP/2 and HTTP/1.1 over TLS advertise HTTP/3 on the same port; plain HTTP does not.
    for (http1_only, version) in [
        (false, reqwest::Version::HTTP_2),
        (true, reqwest::Version::HTTP_11),
    ] {
        let r = https_client(&cert.pem(), http1_only)
            .get(&tls_url)
            .send()
            .await
            .expect("https");
        assert_eq!(r.version(), version);
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["alt-svc"], alt_svc.as_str());
    }
    let r = client().get(server.url("/v2/")).send().await.expect("http");
    assert!(r.headers().get("alt-svc").is_none());

    // A renewed certificate, reloaded: new handshakes over TCP and QUIC present it.
    replace_cert(&cert, &renewed);
    server.hup();
    server.wait_for_log("TLS certificates reloaded", 1);
    let udp: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let h3 = H3::connect(udp, &renewed.pem())
        .await
        .expect("renewed over HTTP/3");
    h3.close().await;
    let old = TestCert::new(dir.path(), "unrelated");
    assert!(
        H3::connect(udp, &old.pem()).await.is_err(),
        "an untrusted certificate was accepted"
    );
    let r = https_client(&renewed.pem(), false)
        .get(&tls_url)
        .send()
        .await
        .expect("renewed over HTTP/2");
    assert_eq!(r.status(), 401);
}

/// A stop (SIGTERM) drains HTTP/3 like the other protocols: a download in flight finishes
/// byte-exact, then the process exits.
#[tokio::test(flavor = "multi_thread")]
async fn an_http3_download_in_flight_finishes_across_a_graceful_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (issuer, cert, port, mut server) = start_tls(dir.path());
    let key = issuer.issue("ci", &["team/**"], "pull,push", "1h");
    let big = bytes(5, 32 << 20);
    let (digest, status) = push_blob(&server, &key, "team/app", &big).await;
    assert_eq!(status, 201);
    let udp: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut h3 = H3::connect(udp, &cert.pem())
        .await
        .expect("HTTP/3 connection");
    let bearer = format!("Bearer {key}");
    let mut stream = h3
        .start(
            Method::GET,
            &format!("/v2/team/app/blobs/{digest}"),
            &[("authorization", bearer.as_str())],
            None,
        )
        .await;
    // Wait until the response has started, then stop the daemon while the rest of the
    // body is held back by flow control.
    let head = stream.recv_response().await.expect("response head");
    assert_eq!(head.status(), 200);
    server.term();
    server.wait_for_log("shutting down", 1);
    let body = read_body(&mut stream).await;
    assert_eq!(body.len(), big.len());
    assert_eq!(Digest::sha256_of(&body), digest);
    h3.close().await;
    server.stop();
}

/// Regression guard: a GET answered before the client had finished its request stream
/// had the stream stopped with code 0 (quinn's default), which h3 clients report as an
/// error; RFC 9114 4.1 wants H3_NO_ERROR, after which the response stands.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_answered_before_its_end_is_stopped_with_h3_no_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_issuer, cert, port, server) = start_tls(dir.path());
    let udp: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut h3 = H3::connect(udp, &cert.pem())
        .await
        .expect("HTTP/3 connection");
    // The head only: the request's end never comes.
    let mut stream = h3.open(Method::GET, "/v2/", &[]).await;
    let r = read(&mut stream).await;
    assert_eq!(r.status, 401);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // `stopped` fails the test on any error but H3_NO_ERROR.
        if stopped(stream.send_data(Bytes::from_static(b"x")).await) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server never stopped the request"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    h3.close().await;
    drop(server);
}
