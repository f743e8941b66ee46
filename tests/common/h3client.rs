//! HTTP/3 and HTTPS clients for tests and benches: a real h3 + quinn client trusting a
//! test certificate, reqwest over TLS (HTTP/1.1 or HTTP/2 by ALPN), and self-signed
//! certificates made with the openssl CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, Method, Request, StatusCode};

/// A self-signed certificate for `localhost` and `127.0.0.1`, and its key (P-256).
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCert {
    /// Writes `dir/<name>.pem` and `dir/<name>.key`.
    pub fn new(dir: &Path, name: &str) -> TestCert {
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestCert { cert, key }
    }

    pub fn pem(&self) -> Vec<u8> {
        std::fs::read(&self.cert).expect("read certificate")
    }
}

fn roots(ca_pem: &[u8]) -> rustls::RootCertStore {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("PEM certificate")).expect("root");
    }
    roots
}

/// An HTTPS client (reqwest) trusting `ca_pem`: HTTP/2 by ALPN, or HTTP/1.1 only.
pub fn https_client(ca_pem: &[u8], http1_only: bool) -> reqwest::Client {
    outpost::install_crypto_provider();
    let b = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem).expect("certificate")]);
    let b = if http1_only { b.http1_only() } else { b };
    b.build().expect("https client")
}

/// One response, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

pub type Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// An HTTP/3 connection to the daemon.
pub struct H3 {
    endpoint: quinn::Endpoint,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    driver: tokio::task::JoinHandle<()>,
    authority: String,
}

impl H3 {
    /// Connects to `addr` (UDP), checking the server's certificate against `ca_pem`.
    pub async fn connect(addr: SocketAddr, ca_pem: &[u8]) -> Result<H3, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(ca_pem))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        // Room for a fast loopback transfer (the default window suits 100 Mbit/s links).
        transport.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
        transport.receive_window(quinn::VarInt::from_u32(64 << 20));
        config.transport_config(Arc::new(transport));
        let bind: SocketAddr = "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?;
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
        let connecting = endpoint
            .connect_with(config, addr, "localhost")
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| "QUIC handshake timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(H3 {
            endpoint,
            send,
            driver,
            authority: format!("localhost:{}", addr.port()),
        })
    }

    /// Sends a request's head and leaves its stream open for a body.
    pub async fn open(&mut self, method: Method, path: &str, headers: &[(&str, &str)]) -> Stream {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.authority));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(()).expect("request");
        self.send.send_request(req).await.expect("send request")
    }

    /// Sends a request with `body` (and finishes it); the response is read by the caller.
    pub async fn start(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Stream {
        let mut stream = self.open(method, path, headers).await;
        if let Some(body) = body {
            // In pieces, as a client streaming a layer would.
            for chunk in body.chunks(1 << 20) {
                let sent = stream.send_data(Bytes::copy_from_slice(chunk)).await;
                if stopped(sent) {
                    return stream;
                }
            }
        }
        stopped(stream.finish().await);
        stream
    }

    /// One request, its response read whole.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Reply {
        let mut stream = self.start(method, path, headers, body).await;
        read(&mut stream).await
    }

    pub async fn close(self) {
        self.endpoint.close(quinn::VarInt::from_u32(0x100), b"done");
        self.driver.abort();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Whether the server stopped the request with H3_NO_ERROR: it answers without the rest
/// of the request (RFC 9114 4.1), and the response is still to be read. Any other error
/// fails the test.
pub fn stopped(sent: Result<(), h3::error::StreamError>) -> bool {
    match sent {
        Ok(()) => false,
        Err(h3::error::StreamError::RemoteTerminate { code, .. })
            if code == h3::error::Code::H3_NO_ERROR =>
        {
            true
        }
        Err(e) => panic!("sending the request: {e}"),
    }
}

/// Reads the response of `stream` whole.
pub async fn read(stream: &mut Stream) -> Reply {
    let response = stream.recv_response().await.expect("response head");
    Reply {
        status: response.status(),
        headers: response.headers().clone(),
        body: read_body(stream).await,
    }
}

/// Reads the rest of the response body of `stream`.
pub async fn read_body(stream: &mut Stream) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.expect("response body") {
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            body.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
    body
}
