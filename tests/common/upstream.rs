//! A real upstream registry: Debian's `docker-registry` (distribution 2.8) on a free
//! loopback port with filesystem storage, optionally behind Docker Hub-style token auth (an
//! in-process token server issuing RS256 JWTs) or htpasswd Basic auth, and optionally
//! serving blobs through a 307 redirect to an in-process "CDN" — as Docker Hub does.
//!
//! Requests are counted from the registry's own access log, so a test sees exactly what
//! reached the upstream. The upstream can be stopped and brought back on the same port with
//! the same data, for offline tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::process::{Daemon, SharedLog, free_port, run_with_timeout};
use super::serve::{self, Body, Conn, HttpServer, RangeAnswer};

/// The `service` the registry expects in tokens, and the token server's default answer.
pub const TOKEN_SERVICE: &str = "outpost-test-upstream";
/// The `iss` of issued tokens.
pub const TOKEN_ISSUER: &str = "outpost-test-token-issuer";

/// How to start an [`UpstreamRegistry`].
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Docker Hub-style token auth: `/v2/` answers 401 `Bearer realm=…,service=…`, and an
    /// in-process token server grants `pull` to anyone and `pull,push` to `token_user`.
    pub token_auth: bool,
    /// With `token_auth`: the user (name, password) whose tokens may also push.
    pub token_user: (String, String),
    /// With `token_auth`: whether anonymous tokens carry `pull`. When false they carry no
    /// access at all, like Docker Hub's anonymous tokens for a private repository.
    pub anonymous_pull: bool,
    /// With `token_auth`: the `expires_in` of token responses; `None` leaves the field out
    /// (clients must then assume 60 s). The JWT itself is valid for 5 minutes either way.
    pub token_expires_in: Option<u64>,
    /// htpasswd Basic auth for every request (the one user may pull and push) instead of
    /// token auth.
    pub htpasswd: Option<(String, String)>,
    /// Blob GETs and HEADs answer 307 to a "CDN" server that serves the storage files.
    pub redirect: bool,
    /// More users, besides `token_user` or the `htpasswd` user: with htpasswd, more lines
    /// in the file (distribution lets every user pull and push everything); with
    /// `token_auth`, users whose tokens carry `pull` only on the repositories they list.
    pub users: Vec<UpstreamUser>,
}

/// A further user of an [`UpstreamRegistry`].
#[derive(Clone, Debug)]
pub struct UpstreamUser {
    pub name: String,
    pub password: String,
    /// With `token_auth`: repository-name prefixes this user may pull (`""` for all).
    pub pull: Vec<String>,
}

impl UpstreamUser {
    pub fn new(name: &str, password: &str, pull: &[&str]) -> UpstreamUser {
        UpstreamUser {
            name: name.to_owned(),
            password: password.to_owned(),
            pull: pull.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            token_auth: false,
            token_user: ("pusher".to_owned(), "pusher-password".to_owned()),
            anonymous_pull: true,
            token_expires_in: Some(300),
            htpasswd: None,
            redirect: false,
            users: Vec::new(),
        }
    }
}

/// One request as docker-registry's access log recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryRequest {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub status: u16,
    pub user_agent: String,
}

/// One request to the token server.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    /// The user that authenticated, `None` for anonymous requests.
    pub user: Option<String>,
    /// The requested scopes, e.g. `repository:library/alpine:pull`.
    pub scopes: Vec<String>,
    pub status: u16,
}

/// One request to the CDN server.
#[derive(Clone, Debug)]
pub struct CdnRequest {
    pub method: String,
    pub path: String,
    pub authorization: bool,
    pub range: Option<String>,
}

/// A running docker-registry (plus token and CDN servers when asked); stopped on drop.
pub struct UpstreamRegistry {
    dir: PathBuf,
    config: PathBuf,
    port: u16,
    opts: UpstreamOptions,
    daemon: Option<Daemon>,
    log: SharedLog,
    token: Option<(HttpServer, Arc<TokenState>)>,
    cdn: Option<(HttpServer, Arc<CdnState>)>,
    syncs: AtomicU64,
}

const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Marks the harness's own log-sync requests, which `request_log` leaves out.
const SYNC_MARK: &str = "outpost-harness-sync=";

impl UpstreamRegistry {
    /// Starts a registry storing its data under `dir/storage` (config, keys and htpasswd
    /// files go in `dir` too).
    pub fn start(dir: &Path, opts: UpstreamOptions) -> UpstreamRegistry {
        assert!(
            !(opts.token_auth && opts.htpasswd.is_some()),
            "token_auth and htpasswd are exclusive"
        );
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).expect("create upstream storage dir");
        let token = opts.token_auth.then(|| start_token_server(&opts));
        let cdn = opts.redirect.then(|| start_cdn(&storage));
        let auth = if let Some((server, _)) = &token {
            let cert = dir.join("token-cert.pem");
            std::fs::write(&cert, &token_key().cert_pem).expect("write token cert");
            format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                server.port(),
                yaml_str(&cert)
            )
        } else if let Some(main) = &opts.htpasswd {
            let file = dir.join("htpasswd");
            write_htpasswd(&file, main, &opts.users);
            format!(
                "auth:\n  htpasswd:\n    realm: {TOKEN_SERVICE}\n    path: {}\n",
                yaml_str(&file)
            )
        } else {
            String::new()
        };
        let middleware = match &cdn {
            // Blob requests answer 307 to `<baseurl><path of the blob under storage>`,
            // e.g. `/docker/registry/v2/blobs/sha256/ab/abcd…/data`.
            Some((server, _)) => format!(
                "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: http://127.0.0.1:{}\n",
                server.port()
            ),
            None => String::new(),
        };
        let config = dir.join("registry.yml");
        let log: SharedLog = Arc::default();
        let mut registry = UpstreamRegistry {
            dir: dir.to_owned(),
            config,
            port: 0,
            opts,
            daemon: None,
            log,
            token,
            cdn,
            syncs: AtomicU64::new(0),
        };
        // The port must be in the config before the process starts; should another process
        // take it in between, try another.
        for attempt in 1..=3 {
            registry.port = free_port();
            // At level info stderr gets a "response completed" line for every request,
            // errors included; the access log (stdout) adds one combined-format line per
            // request — 401s and 307s too — which is what the counters read.
            let text = format!(
                "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:{}\n  secret: outpost-harness-upload-secret\n{auth}{middleware}",
                yaml_str(&storage),
                registry.port
            );
            std::fs::write(&registry.config, text).expect("write registry config");
            match registry.spawn() {
                Ok(()) => return registry,
                Err(e) if attempt < 3 && e.contains("address already in use") => continue,
                Err(e) => panic!("docker-registry did not start: {e}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Spawns the registry with the current config and waits until it listens.
    fn spawn(&mut self) -> Result<(), String> {
        let mark = format!("listening on 127.0.0.1:{}", self.port);
        let first_line = self.log_len();
        let mut daemon = Daemon::spawn(
            "docker-registry",
            Command::new("docker-registry")
                .arg("serve")
                .arg(&self.config),
            self.log.clone(),
        );
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let lines = self.log_lines_since(first_line);
            if lines.iter().any(|l| l.contains(&mark)) {
                // Logged just before Serve; wait for the socket to be sure.
                if super::process::port_open(self.port) {
                    self.daemon = Some(daemon);
                    return Ok(());
                }
            }
            if !daemon.running() || Instant::now() > deadline {
                daemon.kill();
                return Err(lines.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The storage root (what the CDN serves).
    pub fn storage(&self) -> PathBuf {
        self.dir.join("storage")
    }

    pub fn options(&self) -> &UpstreamOptions {
        &self.opts
    }

    /// The credentials that may push (token user or htpasswd user), `None` without auth.
    pub fn push_credentials(&self) -> Option<(String, String)> {
        if self.opts.token_auth {
            Some(self.opts.token_user.clone())
        } else {
            self.opts.htpasswd.clone()
        }
    }

    /// The token endpoint (`http://127.0.0.1:PORT/token`), with token auth.
    pub fn token_realm(&self) -> Option<String> {
        self.token
            .as_ref()
            .map(|(s, _)| format!("http://127.0.0.1:{}/token", s.port()))
    }

    /// `http://127.0.0.1:PORT` of the CDN, with `redirect`.
    pub fn cdn_url(&self) -> Option<String> {
        self.cdn
            .as_ref()
            .map(|(s, _)| format!("http://127.0.0.1:{}", s.port()))
    }

    /// Pushes the OCI layout's image tagged `TAG` to `REPO:TAG` (`reference` is
    /// `REPO:TAG`), with skopeo and the push credentials. Panics with skopeo's output on
    /// failure.
    pub fn push_layout(&self, layout_dir: &Path, reference: &str) {
        let (_, tag) = reference
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{reference}: want REPO:TAG"));
        let src = format!("oci:{}:{tag}", layout_dir.display());
        let dst = format!("docker://{}/{reference}", self.host());
        let creds = self.push_credentials().map(|(u, p)| format!("{u}:{p}"));
        let mut args = vec![
            "--insecure-policy",
            "copy",
            "--all",
            "--dest-tls-verify=false",
        ];
        if let Some(c) = &creds {
            args.extend(["--dest-creds", c]);
        }
        args.extend([src.as_str(), dst.as_str()]);
        let out = run_with_timeout(Command::new("skopeo").args(&args), Duration::from_secs(120));
        assert!(
            out.status.success(),
            "skopeo push to the upstream {reference}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Changes a user's password: with htpasswd, rewrites the file and restarts the
    /// registry (it reads the file at start); with token auth, the token server takes the
    /// new password at once.
    pub fn set_password(&mut self, user: &str, password: &str) {
        if let Some(u) = self.opts.users.iter_mut().find(|u| u.name == user) {
            u.password = password.to_owned();
        } else if let Some(main) = self.opts.htpasswd.as_mut().filter(|m| m.0 == user) {
            main.1 = password.to_owned();
        } else if self.opts.token_user.0 == user {
            self.opts.token_user.1 = password.to_owned();
        } else {
            panic!("no upstream user {user:?}");
        }
        if let Some((_, state)) = &self.token {
            if let Ok(mut users) = state.users.lock() {
                *users = self.opts.users.clone();
            }
            if let Ok(mut main) = state.user.lock() {
                *main = self.opts.token_user.clone();
            }
        }
        if let Some(main) = &self.opts.htpasswd {
            write_htpasswd(&self.dir.join("htpasswd"), main, &self.opts.users);
            self.restart();
        }
    }

    /// SIGTERM the registry (and take the token and CDN servers down): connections to all
    /// of them are refused until [`restart`](Self::restart).
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.terminate(Duration::from_secs(10));
        }
        self.set_side_servers_down(true);
    }

    /// Like [`stop`](Self::stop) with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        self.set_side_servers_down(true);
    }

    /// Starts everything again on the same ports with the same data (stops first if
    /// running).
    pub fn restart(&mut self) {
        self.stop();
        self.set_side_servers_down(false);
        if let Err(e) = self.spawn() {
            panic!("docker-registry did not restart on port {}: {e}", self.port);
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(Daemon::running)
    }

    fn set_side_servers_down(&self, down: bool) {
        if let Some((s, _)) = &self.token {
            s.set_down(down);
        }
        if let Some((s, _)) = &self.cdn {
            s.set_down(down);
        }
    }

    /// Everything the registry printed (both streams, all runs), one line each.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    fn log_len(&self) -> usize {
        self.log.lock().map(|l| l.len()).unwrap_or(0)
    }

    fn log_lines_since(&self, first: usize) -> Vec<String> {
        self.log
            .lock()
            .map(|l| l.get(first..).unwrap_or_default().to_vec())
            .unwrap_or_default()
    }

    /// Every request the registry has answered so far (over all runs), in order, from its
    /// access log. Waits until the log has caught up with requests already answered.
    pub fn request_log(&self) -> Vec<RegistryRequest> {
        self.sync_log();
        self.log
            .lock()
            .map(|l| {
                l.iter()
                    .filter_map(|line| parse_access_line(line))
                    .filter(|r| !r.uri.contains(SYNC_MARK))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many `method` requests whose path-and-query contains `uri_part` the registry
    /// has answered (any status, including 401s and 307s).
    pub fn requests(&self, method: &str, uri_part: &str) -> usize {
        self.request_log()
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.uri.contains(uri_part))
            .count()
    }

    /// docker-registry writes a request's access-log line before it finishes the response
    /// (the logging handler wraps the whole registry), but this process reads the pipe on
    /// its own schedule: send a marker request and wait for its access-log line, after which
    /// every request answered before it is in the log.
    fn sync_log(&self) {
        if self.daemon.is_none() {
            return;
        }
        let n = self.syncs.fetch_add(1, Ordering::SeqCst);
        let uri = format!("/v2/?{SYNC_MARK}{n}");
        if let Err(e) = raw_get(self.port, &uri) {
            eprintln!("upstream log sync: {uri}: {e}; counts may lag");
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            // Only the access log (stdout) counts: stderr has its own reader thread and may
            // show the marker before stdout's earlier lines are in.
            let seen = self
                .log
                .lock()
                .map(|l| {
                    l.iter()
                        .rev()
                        .any(|line| parse_access_line(line).is_some_and(|r| r.uri == uri))
                })
                .unwrap_or(false);
            if seen {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!("upstream log sync: {uri} not logged in time; counts may lag");
    }

    /// Number of requests to the token server.
    pub fn token_requests(&self) -> usize {
        self.token_log().len()
    }

    /// Every request to the token server, in order.
    pub fn token_log(&self) -> Vec<TokenRequest> {
        self.token
            .as_ref()
            .and_then(|(_, s)| s.requests.lock().ok().map(|r| r.clone()))
            .unwrap_or_default()
    }

    /// Cuts the next blob body longer than `bytes` off after `bytes` (with `redirect`).
    pub fn cut_next_blob_after(&self, bytes: u64) {
        if let Some((_, s)) = &self.cdn
            && let Ok(mut c) = s.cut_after.lock()
        {
            *c = Some(bytes);
        }
    }

    /// Makes the CDN answer every GET with the whole file, ignoring `Range`.
    pub fn ignore_range(&self, ignore: bool) {
        if let Some((_, s)) = &self.cdn {
            s.ignore_range.store(ignore, Ordering::SeqCst);
        }
    }

    /// Blob body bytes the CDN has sent so far.
    pub fn cdn_bytes_sent(&self) -> u64 {
        self.cdn
            .as_ref()
            .map_or(0, |(_, s)| s.bytes_sent.load(Ordering::SeqCst))
    }

    /// Every request to the CDN server, in order.
    pub fn cdn_requests(&self) -> Vec<CdnRequest> {
        self.cdn
            .as_ref()
            .and_then(|(_, s)| s.requests.lock().ok().map(|r| r.clone()))
            .unwrap_or_default()
    }

    /// Whether any request to the CDN carried an `Authorization` header (credentials for
    /// the registry must not follow a redirect to another host).
    pub fn cdn_saw_authorization(&self) -> bool {
        self.cdn_requests().iter().any(|r| r.authorization)
    }
}

/// `GET uri` over a fresh connection; the response is read to its end and discarded.
fn raw_get(port: u16, uri: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {uri} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut sink = Vec::new();
    s.read_to_end(&mut sink).map(|_| ())
}

/// Parses a combined-format access-log line:
/// `127.0.0.1 - - [22/Nov/2026:15:08:18 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "skopeo/1.9.3"`.
fn parse_access_line(line: &str) -> Option<RegistryRequest> {
    if line.starts_with("time=") {
        return None;
    }
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once('"')?;
    let mut parts = request.split(' ');
    let (method, uri, proto) = (parts.next()?, parts.next()?, parts.next()?);
    if !proto.starts_with("HTTP/") {
        return None;
    }
    let status = rest.split_whitespace().next()?.parse().ok()?;
    let user_agent = rest
        .trim_end()
        .strip_suffix('"')
        .and_then(|r| r.rsplit_once('"'))
        .map(|(_, ua)| ua.to_owned())
        .unwrap_or_default();
    Some(RegistryRequest {
        method: method.to_owned(),
        uri: uri.to_owned(),
        status,
        user_agent,
    })
}

/// A path as a YAML scalar (a JSON string is valid YAML).
fn yaml_str(path: &Path) -> String {
    serde_json::to_string(path.to_str().expect("utf-8 path")).expect("json string")
}

/// Writes the htpasswd file: the main user, then `users`.
fn write_htpasswd(file: &Path, main: &(String, String), users: &[UpstreamUser]) {
    let mut text = bcrypt_htpasswd(&main.0, &main.1);
    for u in users {
        text.push_str(&bcrypt_htpasswd(&u.name, &u.password));
    }
    std::fs::write(file, text).expect("write htpasswd");
}

/// An htpasswd line with a bcrypt hash, which docker-registry requires (`openssl passwd`
/// cannot make bcrypt; apache2-utils' `htpasswd` can).
fn bcrypt_htpasswd(user: &str, password: &str) -> String {
    let out = run_with_timeout(
        Command::new("htpasswd").args(["-Bbn", user, password]),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "htpasswd -Bbn (apt-get install apache2-utils): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 htpasswd")
}

// ---- Token server ----------------------------------------------------------------------

struct TokenKey {
    der: Vec<u8>,
    cert_pem: String,
    /// The certificate's DER in standard base64: the PEM body without line breaks.
    x5c: String,
}

/// The signing key and its self-signed certificate, made once per test process with the
/// openssl CLI (RSA key generation takes a noticeable fraction of a second).
fn token_key() -> &'static TokenKey {
    static KEY: OnceLock<TokenKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.der");
        let cert = dir.path().join("cert.pem");
        let openssl = |args: &[&std::ffi::OsStr]| {
            let out = run_with_timeout(Command::new("openssl").args(args), Duration::from_secs(60));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "genpkey".as_ref(),
            "-algorithm".as_ref(),
            "RSA".as_ref(),
            "-pkeyopt".as_ref(),
            "rsa_keygen_bits:2048".as_ref(),
            "-outform".as_ref(),
            "DER".as_ref(),
            "-out".as_ref(),
            key.as_os_str(),
        ]);
        openssl(&[
            "req".as_ref(),
            "-x509".as_ref(),
            "-new".as_ref(),
            "-key".as_ref(),
            key.as_os_str(),
            "-keyform".as_ref(),
            "DER".as_ref(),
            "-subj".as_ref(),
            format!("/CN={TOKEN_ISSUER}").as_ref(),
            "-days".as_ref(),
            "30".as_ref(),
            "-out".as_ref(),
            cert.as_os_str(),
        ]);
        let der = std::fs::read(&key).expect("read key");
        let cert_pem = std::fs::read_to_string(&cert).expect("read cert");
        let x5c = cert_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>();
        TokenKey { der, cert_pem, x5c }
    })
}

/// The actions a token holder may have on a repository, by name.
type Grants = dyn Fn(&str) -> Vec<&'static str> + Send;

struct TokenState {
    key: ring::signature::RsaKeyPair,
    user: Mutex<(String, String)>,
    users: Mutex<Vec<UpstreamUser>>,
    anonymous_pull: bool,
    expires_in: Option<u64>,
    requests: Mutex<Vec<TokenRequest>>,
    issued: AtomicU64,
}

fn start_token_server(opts: &UpstreamOptions) -> (HttpServer, Arc<TokenState>) {
    // `openssl genpkey -outform DER` writes PKCS#1 (OpenSSL 3) or PKCS#8, by version.
    let der = &token_key().der;
    let key = ring::signature::RsaKeyPair::from_der(der)
        .or_else(|_| ring::signature::RsaKeyPair::from_pkcs8(der))
        .expect("RSA key");
    let state = Arc::new(TokenState {
        key,
        user: Mutex::new(opts.token_user.clone()),
        users: Mutex::new(opts.users.clone()),
        anonymous_pull: opts.anonymous_pull,
        expires_in: opts.token_expires_in,
        requests: Mutex::default(),
        issued: AtomicU64::new(0),
    });
    let s = state.clone();
    let server = HttpServer::start(
        "upstream-token",
        Arc::new(move |req, _conn| Box::pin(token_handler(s.clone(), req))),
    );
    (server, state)
}

/// Docker Hub's token endpoint: `GET /token?service=…&scope=…` with optional Basic auth,
/// or the OAuth2 form `POST /token` (grant_type=password) that containerd tries first.
async fn token_handler(state: Arc<TokenState>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().as_str().to_owned();
    if req.uri().path() != "/token" {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    let basic = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    let mut params = serve::form_decode(req.uri().query().unwrap_or(""));
    if method == "POST" {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        params.extend(serve::form_decode(&String::from_utf8_lossy(&body)));
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let credentials = basic.or_else(|| match param("grant_type").as_deref() {
        Some("password") => Some((param("username")?, param("password")?)),
        _ => None,
    });
    // GET repeats `scope`; the OAuth2 form separates scopes with spaces.
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    let record = |user: Option<String>, status: u16| {
        if let Ok(mut r) = state.requests.lock() {
            r.push(TokenRequest {
                method: method.clone(),
                user,
                scopes: scopes.clone(),
                status,
            });
        }
    };
    let main = state.user.lock().map(|m| m.clone()).unwrap_or_default();
    let extra = credentials.as_ref().and_then(|(u, p)| {
        state
            .users
            .lock()
            .ok()?
            .iter()
            .find(|x| x.name == *u && x.password == *p)
            .cloned()
    });
    // Per repository name: the actions this caller may have there.
    let (user, allowed): (Option<String>, Box<Grants>) = match (&credentials, extra) {
        (Some((u, p)), _) if *u == main.0 && *p == main.1 => {
            (Some(u.clone()), Box::new(|_| vec!["pull", "push"]))
        }
        (Some((u, _)), Some(x)) => (
            Some(u.clone()),
            Box::new(move |name: &str| {
                if x.pull
                    .iter()
                    .any(|prefix| name.starts_with(prefix.as_str()))
                {
                    vec!["pull"]
                } else {
                    vec![]
                }
            }),
        ),
        (Some((u, _)), None) => {
            record(Some(u.clone()), 401);
            return json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"details": "incorrect username or password"}),
            );
        }
        (None, _) if state.anonymous_pull => (None, Box::new(|_| vec!["pull"])),
        (None, _) => (None, Box::new(|_| vec![])),
    };
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| {
            // `repository:NAME:ACTIONS`; NAME has no ':'.
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            let may = allowed(name);
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|a| kind == "repository" && may.contains(a))
                .collect();
            Some(serde_json::json!({"type": kind, "name": name, "actions": granted}))
        })
        .collect();
    let now = serve::unix_now();
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": user.clone().unwrap_or_default(),
        "aud": param("service").unwrap_or_else(|| TOKEN_SERVICE.to_owned()),
        "exp": now + 300,
        // Some slack for clocks: the registry checks nbf against its own time.
        "nbf": now.saturating_sub(60),
        "iat": now,
        "jti": format!("harness-{}", state.issued.fetch_add(1, Ordering::SeqCst)),
        "access": access,
    });
    let token = sign_jwt(&state.key, &claims);
    record(user, 200);
    let mut body = serde_json::json!({
        "token": token,
        "access_token": token,
        "issued_at": serve::rfc3339(now),
    });
    if let Some(secs) = state.expires_in {
        body["expires_in"] = secs.into();
    }
    json(StatusCode::OK, &body)
}

/// An RS256 JWT whose header names the key by `x5c` (the self-signed certificate that the
/// registry's `rootcertbundle` lists).
fn sign_jwt(key: &ring::signature::RsaKeyPair, claims: &serde_json::Value) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [token_key().x5c]});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .expect("RS256 sign");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(serve::full(body.to_owned()))
        .expect("response")
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(serve::full(body.to_string()))
        .expect("response")
}

// ---- CDN -------------------------------------------------------------------------------

struct CdnState {
    root: PathBuf,
    requests: Mutex<Vec<CdnRequest>>,
    /// Faults a real server will not produce: the next GET of a body longer than this
    /// is cut off (connection reset) after this many bytes, once.
    cut_after: Mutex<Option<u64>>,
    /// Answer every GET with the whole file, as if `Range` were unknown.
    ignore_range: std::sync::atomic::AtomicBool,
    /// Body bytes sent (GET), whole or cut.
    bytes_sent: AtomicU64,
}

fn start_cdn(root: &Path) -> (HttpServer, Arc<CdnState>) {
    let state = Arc::new(CdnState {
        root: root.to_owned(),
        requests: Mutex::default(),
        cut_after: Mutex::default(),
        ignore_range: Default::default(),
        bytes_sent: AtomicU64::new(0),
    });
    let s = state.clone();
    let server = HttpServer::start(
        "upstream-cdn",
        Arc::new(move |req, conn| Box::pin(cdn_handler(s.clone(), req, conn))),
    );
    (server, state)
}

/// Static files from the registry's storage root, by path; GET and HEAD, with `Range`.
async fn cdn_handler(state: Arc<CdnState>, req: Request<Incoming>, conn: Conn) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Ok(mut r) = state.requests.lock() {
        r.push(CdnRequest {
            method: req.method().as_str().to_owned(),
            path: path.clone(),
            authorization: req.headers().contains_key(hyper::header::AUTHORIZATION),
            range: range.clone(),
        });
    }
    let head = req.method() == hyper::Method::HEAD;
    if !head && req.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD");
    }
    let relative = path.trim_start_matches('/');
    if relative.split('/').any(|c| c == ".." || c == ".") {
        return text(StatusCode::BAD_REQUEST, "bad path");
    }
    let Ok(content) = tokio::fs::read(state.root.join(relative)).await else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let len = content.len() as u64;
    let range = range.filter(|_| !state.ignore_range.load(Ordering::SeqCst));
    let (status, body, content_range) = match serve::range_answer(range.as_deref(), len) {
        RangeAnswer::Full => (StatusCode::OK, content, None),
        RangeAnswer::Partial(start, end) => (
            StatusCode::PARTIAL_CONTENT,
            content[start as usize..=end as usize].to_vec(),
            Some(format!("bytes {start}-{end}/{len}")),
        ),
        RangeAnswer::Unsatisfiable => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{len}"))
                .body(serve::empty())
                .expect("response");
        }
    };
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/octet-stream")
        .header("accept-ranges", "bytes")
        .header("content-length", body.len());
    if let Some(cr) = content_range {
        response = response.header("content-range", cr);
    }
    if head {
        return response.body(serve::empty()).expect("response");
    }
    let cut = state
        .cut_after
        .lock()
        .ok()
        .and_then(|mut c| c.take_if(|at| (*at as usize) < body.len()));
    let Some(at) = cut else {
        state
            .bytes_sent
            .fetch_add(body.len() as u64, Ordering::SeqCst);
        return response.body(serve::full(body)).expect("response");
    };
    // The promised length never arrives: the connection is reset mid-body.
    state.bytes_sent.fetch_add(at, Ordering::SeqCst);
    conn.reset_on_close();
    let (tx, stream) = serve::channel_body();
    tokio::spawn(async move {
        let prefix = bytes::Bytes::copy_from_slice(&body[..at as usize]);
        let _ = tx.send(Ok(hyper::body::Frame::data(prefix))).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = tx
            .send(Err(std::io::Error::other("cut off by the test")))
            .await;
    });
    response.body(stream).expect("response")
}
