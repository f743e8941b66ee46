//! Configuration: the TOML file's raw serde shape, and its validation into an immutable
//! [`Config`].
//!
//! Loading is pure: it reads no other file and opens no port, so `outpost config check`
//! and `outpost serve` run the very same function. Unknown keys are errors (a security
//! daemon must not silently ignore a misspelled rule), and every problem is reported at
//! once rather than one per run.

mod raw;
mod reload;
mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::{AccessRule, Actions, Policy};
use crate::mirror::select::FilterSpec;
use crate::mirror::{MirrorJob, RepoSelector, TagFilter, valid_job_name};
use crate::oci::RepoName;

pub use reload::{Changes, ReloadPlan};
pub use units::{parse_duration, parse_size};

/// The embedded default configuration.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Default `storage.reserve`: room for many metadata commits, small beside any disk.
const DEFAULT_RESERVE: u64 = 64 << 20;

/// Every problem found in a configuration file.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub auth: AuthConfig,
    /// Access rules in file order (first match wins), and the policy compiled from them.
    pub access: Vec<AccessRule>,
    pub policy: Policy,
    pub mirrors: Vec<MirrorJob>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// Base URL clients reach us at, without a trailing slash.
    pub public_url: String,
    pub tls: Option<TlsConfig>,
    /// How long a client may take to send request headers.
    pub header_timeout: Duration,
    /// How long a request body may stall between two reads.
    pub body_idle_timeout: Duration,
    /// Largest request head accepted.
    pub max_header_bytes: usize,
    /// How long in-flight requests get to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub http3: bool,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub path: PathBuf,
    pub max_size: Option<u64>,
    /// Unreferenced blobs younger than this are never collected (uploads in progress).
    pub gc_grace: Duration,
    /// Upload sessions idle for longer than this are abandoned and collected.
    pub upload_timeout: Duration,
    /// Page cache redb may use, in bytes.
    pub db_cache: usize,
    /// Free space kept for metadata commits: new blob data is refused (507) below it.
    pub reserve: u64,
    /// Open upload sessions one principal may hold; more are refused with 429.
    pub max_upload_sessions: usize,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: String,
    pub aliases: Vec<String>,
    pub tag_ttl: Duration,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// How long establishing a connection (TCP and TLS) may take.
    pub connect_timeout: Duration,
    /// How long the upstream may stay silent: before response headers, and between two
    /// reads of a body.
    pub read_timeout: Duration,
    /// How long a client waits for a due tag revalidation before the last known answer
    /// is served (stale); the revalidation itself goes on in the background.
    pub revalidate_wait: Duration,
    /// Consecutive failures that open the circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker refuses requests before one probe is let through.
    pub breaker_cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub issuer_keys: Vec<PathBuf>,
    /// The upstream (by name) whose users may log in here.
    pub central: Option<String>,
    /// How long a central user's login or repository decision is used before the central
    /// registry is asked again (while it answers).
    pub central_ttl: Duration,
    /// How long cached central decisions hold, since their last confirmation, while the
    /// central registry cannot answer.
    pub offline_grace: Duration,
    pub revocation_file: Option<PathBuf>,
    /// Failed authentications one client address may make per `failure_window` before
    /// it is refused (429) until the window ends.
    pub failure_limit: u32,
    pub failure_window: Duration,
    pub token_ttl: Duration,
    /// File holding the HMAC secret for `/token` tokens; several processes behind one
    /// name share it. Defaults to `token.secret` in the storage directory.
    pub token_secret_file: Option<PathBuf>,
    pub service: String,
}

impl Config {
    /// Parses and validates a configuration file's text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        Validator::default().config(raw)
    }

    /// Reads and validates the file at `path`. Relative paths in it are read from the
    /// file's own directory, so a command run from anywhere acts on the same store and
    /// files as the daemon.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))?;
        let mut config = Config::from_toml(&text)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        config.resolve_paths(dir.unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Makes every relative path of the file relative to `base` instead.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.storage.path);
        if let Some(tls) = &mut self.server.tls {
            fix(&mut tls.cert);
            fix(&mut tls.key);
        }
        for u in &mut self.upstreams {
            u.password_file.iter_mut().for_each(fix);
            u.ca.iter_mut().for_each(fix);
        }
        self.auth.issuer_keys.iter_mut().for_each(fix);
        self.auth.revocation_file.iter_mut().for_each(fix);
        self.auth.token_secret_file.iter_mut().for_each(fix);
    }

    /// The embedded default.
    pub fn embedded_default() -> Result<Config, ConfigErrors> {
        Config::from_toml(DEFAULT_TOML)
    }

    /// The redb database file.
    pub fn database_path(&self) -> PathBuf {
        self.storage.path.join("outpost.redb")
    }

    /// Where the `/token` HMAC secret lives.
    pub fn token_secret_path(&self) -> PathBuf {
        self.auth
            .token_secret_file
            .clone()
            .unwrap_or_else(|| self.storage.path.join("token.secret"))
    }
}

/// Collects every validation error while building a [`Config`].
#[derive(Default)]
struct Validator {
    errors: Vec<String>,
}

impl Validator {
    fn err(&mut self, msg: impl Into<String>) {
        self.errors.push(msg.into());
    }

    fn duration(&mut self, field: &str, value: Option<&str>, default: Duration) -> Duration {
        match value.map(parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                self.err(format!("{field}: {e}"));
                default
            }
        }
    }

    fn size(&mut self, field: &str, value: Option<&str>) -> Option<u64> {
        match value.map(parse_size) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                self.err(format!("{field}: {e}"));
                None
            }
        }
    }

    fn addrs(&mut self, field: &str, values: &[String]) -> Vec<SocketAddr> {
        values
            .iter()
            .filter_map(|v| match v.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.err(format!(
                        "{field}: {v:?} is not an address like 0.0.0.0:5000"
                    ));
                    None
                }
            })
            .collect()
    }

    fn actions(&mut self, field: &str, names: &[String]) -> Actions {
        match Actions::from_names(names.iter().map(String::as_str)) {
            Ok(a) => a,
            Err(e) => {
                self.err(format!("{field}: {e}"));
                Actions::NONE
            }
        }
    }

    fn config(mut self, raw: raw::RawConfig) -> Result<Config, ConfigErrors> {
        let server = self.server(raw.server);
        let storage = self.storage(raw.storage);
        let upstreams: Vec<UpstreamConfig> = raw
            .upstream
            .into_iter()
            .enumerate()
            .map(|(i, u)| self.upstream(i, u))
            .collect();
        self.check_upstream_names(&upstreams);
        let auth = self.auth(raw.auth, &upstreams);
        let access: Vec<AccessRule> = raw
            .access
            .into_iter()
            .enumerate()
            .map(|(i, a)| self.access_rule(i, a))
            .collect();
        self.errors.extend(
            crate::auth::unreachable_rules(&access)
                .iter()
                .map(ToString::to_string),
        );
        let policy = match Policy::new(access.clone()) {
            Ok(p) => p,
            Err(errors) => {
                self.errors.extend(errors.iter().map(ToString::to_string));
                Policy::default_deny()
            }
        };
        let mirrors = self.mirrors(raw.mirror, &upstreams);
        if self.errors.is_empty() {
            Ok(Config {
                server,
                storage,
                upstreams,
                auth,
                access,
                policy,
                mirrors,
            })
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    fn server(&mut self, raw: raw::RawServer) -> ServerConfig {
        let listen = self.addrs("server.listen", &raw.listen);
        let public_url = raw.public_url.trim_end_matches('/').to_owned();
        if !(public_url.starts_with("http://") || public_url.starts_with("https://")) {
            self.err(format!(
                "server.public_url: {:?} must start with http:// or https://",
                raw.public_url
            ));
        }
        let tls = raw.tls.map(|t| TlsConfig {
            listen: self.addrs("server.tls.listen", &t.listen),
            cert: t.cert,
            key: t.key,
            http3: t.http3,
        });
        if listen.is_empty() && tls.as_ref().is_none_or(|t| t.listen.is_empty()) {
            self.err("server: no listen address (server.listen or server.tls.listen)");
        }
        let max_header_bytes = self
            .size("server.max_header_bytes", raw.max_header_bytes.as_deref())
            .unwrap_or(64 << 10);
        if max_header_bytes < 8192 {
            self.err("server.max_header_bytes: must be at least 8KiB");
        }
        ServerConfig {
            listen,
            public_url,
            tls,
            header_timeout: self.duration(
                "server.header_timeout",
                raw.header_timeout.as_deref(),
                Duration::from_secs(30),
            ),
            body_idle_timeout: self.duration(
                "server.body_idle_timeout",
                raw.body_idle_timeout.as_deref(),
                Duration::from_secs(60),
            ),
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                raw.shutdown_grace.as_deref(),
                Duration::from_secs(30),
            ),
            max_connections: match raw.max_connections {
                None => 4096,
                Some(n @ 1..=1_000_000) => n,
                Some(_) => {
                    self.err("server.max_connections: must be 1 to 1000000");
                    4096
                }
            },
        }
    }

    fn storage(&mut self, raw: raw::RawStorage) -> StorageConfig {
        let db_cache = self
            .size("storage.db_cache", raw.db_cache.as_deref())
            .unwrap_or(32 << 20);
        StorageConfig {
            path: raw.path,
            max_size: self.size("storage.max_size", raw.max_size.as_deref()),
            gc_grace: self.duration(
                "storage.gc_grace",
                raw.gc_grace.as_deref(),
                Duration::from_secs(3600),
            ),
            upload_timeout: self.duration(
                "storage.upload_timeout",
                raw.upload_timeout.as_deref(),
                Duration::from_secs(24 * 3600),
            ),
            db_cache: usize::try_from(db_cache).unwrap_or(usize::MAX),
            reserve: self
                .size("storage.reserve", raw.reserve.as_deref())
                .unwrap_or(DEFAULT_RESERVE),
            max_upload_sessions: match raw.max_upload_sessions {
                None => 64,
                Some(n @ 1..=100_000) => n,
                Some(_) => {
                    self.err("storage.max_upload_sessions: must be 1 to 100000");
                    64
                }
            },
        }
    }

    fn upstream(&mut self, i: usize, raw: raw::RawUpstream) -> UpstreamConfig {
        let field = format!("upstream[{i}] ({})", raw.name);
        // The name is used as a repository path component (path-prefix routing), so it
        // must satisfy the name grammar: a host without a port.
        if raw.name.contains('/') || raw.name.parse::<RepoName>().is_err() {
            self.err(format!(
                "{field}: name must be a registry host usable as a repository path \
                 component (lowercase, no port, no '/'); put host:port forms in aliases"
            ));
        }
        if !(raw.url.starts_with("https://") || raw.url.starts_with("http://")) {
            self.err(format!("{field}.url: must start with https:// or http://"));
        }
        UpstreamConfig {
            tag_ttl: self.duration(
                &format!("{field}.tag_ttl"),
                raw.tag_ttl.as_deref(),
                Duration::from_secs(600),
            ),
            name: raw.name,
            url: raw.url.trim_end_matches('/').to_owned(),
            aliases: raw.aliases,
            username: raw.username,
            password_file: raw.password_file,
            ca: raw.ca,
            connect_timeout: self.duration(
                &format!("{field}.connect_timeout"),
                raw.connect_timeout.as_deref(),
                Duration::from_secs(5),
            ),
            read_timeout: self.duration(
                &format!("{field}.read_timeout"),
                raw.read_timeout.as_deref(),
                Duration::from_secs(30),
            ),
            revalidate_wait: self.duration(
                &format!("{field}.revalidate_wait"),
                raw.revalidate_wait.as_deref(),
                Duration::from_secs(2),
            ),
            breaker_threshold: raw.breaker_threshold.unwrap_or(3).max(1),
            breaker_cooldown: self.duration(
                &format!("{field}.breaker_cooldown"),
                raw.breaker_cooldown.as_deref(),
                Duration::from_secs(30),
            ),
        }
    }

    fn check_upstream_names(&mut self, upstreams: &[UpstreamConfig]) {
        let mut seen = BTreeMap::new();
        for (i, u) in upstreams.iter().enumerate() {
            for ns in std::iter::once(&u.name).chain(&u.aliases) {
                if let Some(first) = seen.insert(ns.clone(), i) {
                    self.err(format!(
                        "upstream[{i}]: {ns:?} is already the name or alias of upstream[{first}]"
                    ));
                }
            }
        }
    }

    fn auth(&mut self, raw: raw::RawAuth, upstreams: &[UpstreamConfig]) -> AuthConfig {
        if let Some(central) = &raw.central
            && !upstreams.iter().any(|u| &u.name == central)
        {
            self.err(format!("auth.central: no upstream is named {central:?}"));
        }
        let failure_limit = raw
            .failure_limit
            .unwrap_or(crate::auth::DEFAULT_MAX_FAILURES);
        if failure_limit == 0 {
            self.err("auth.failure_limit: must be at least 1");
        }
        let failure_window = self.duration(
            "auth.failure_window",
            raw.failure_window.as_deref(),
            crate::auth::DEFAULT_WINDOW,
        );
        if failure_window.is_zero() {
            self.err("auth.failure_window: must be longer than 0s");
        }
        AuthConfig {
            failure_limit,
            failure_window,
            issuer_keys: raw.issuer_keys,
            central_ttl: self.duration(
                "auth.central_ttl",
                raw.central_ttl.as_deref(),
                Duration::from_secs(300),
            ),
            offline_grace: self.duration(
                "auth.offline_grace",
                raw.offline_grace.as_deref(),
                Duration::from_secs(7 * 86400),
            ),
            token_ttl: self.duration(
                "auth.token_ttl",
                raw.token_ttl.as_deref(),
                Duration::from_secs(300),
            ),
            central: raw.central,
            revocation_file: raw.revocation_file,
            token_secret_file: raw.token_secret_file,
            service: raw.service.unwrap_or_else(|| "outpost".to_owned()),
        }
    }

    fn access_rule(&mut self, i: usize, raw: raw::RawAccess) -> AccessRule {
        let field = format!("access[{i}]");
        let anonymous = self.actions(&format!("{field}.anonymous"), &raw.anonymous);
        let authenticated = self.actions(&format!("{field}.authenticated"), &raw.authenticated);
        let users = raw
            .users
            .into_iter()
            .map(|(user, acts)| {
                let a = self.actions(&format!("{field}.users.{user}"), &acts);
                (user, a)
            })
            .collect();
        AccessRule {
            repositories: raw.repositories,
            anonymous,
            authenticated,
            users,
            immutable_tags: raw.immutable_tags,
        }
    }

    fn mirrors(
        &mut self,
        raw: Vec<raw::RawMirror>,
        upstreams: &[UpstreamConfig],
    ) -> Vec<MirrorJob> {
        let mut seen = std::collections::BTreeSet::new();
        let mut jobs = Vec::new();
        for m in raw {
            if !seen.insert(m.name.clone()) {
                self.err(format!("mirror {:?}: another job has this name", m.name));
            }
            if let Some(job) = self.mirror(m, upstreams) {
                jobs.push(job);
            }
        }
        jobs
    }

    fn mirror(&mut self, raw: raw::RawMirror, upstreams: &[UpstreamConfig]) -> Option<MirrorJob> {
        let field = format!("mirror {:?}", raw.name);
        let before = self.errors.len();
        if !valid_job_name(&raw.name) {
            self.err(format!(
                "{field}: name must be 1-64 characters of a-z, 0-9, '-', '_', '.' (it is a \
                 metric label), starting with a letter or digit"
            ));
        }
        if !upstreams.iter().any(|u| u.name == raw.upstream) {
            self.err(format!(
                "{field}.upstream: no upstream is named {:?}",
                raw.upstream
            ));
        }
        if raw.repositories.is_empty() {
            self.err(format!(
                "{field}.repositories: is empty; list the repositories to mirror"
            ));
        }
        let mut repositories = Vec::new();
        for r in &raw.repositories {
            if r.contains(['*', '?', '[']) {
                match globset::GlobBuilder::new(r).literal_separator(true).build() {
                    Ok(_) => repositories.push(RepoSelector::Glob(r.clone())),
                    Err(e) => self.err(format!(
                        "{field}.repositories: {r:?} is not a valid glob: {e}"
                    )),
                }
            } else {
                match r.parse::<RepoName>() {
                    Ok(name) => repositories.push(RepoSelector::Name(name)),
                    Err(e) => self.err(format!("{field}.repositories: {r:?}: {e}")),
                }
            }
        }
        let tags = TagFilter::new(FilterSpec {
            tags: &raw.tags,
            tag_regex: raw.tag_regex.as_deref(),
            semver: raw.semver.as_deref(),
            keep_newest: raw.keep_newest,
        })
        .map_err(|errors| {
            for e in errors {
                self.err(format!("{field}.{e}"));
            }
        })
        .ok();
        let platforms = raw
            .platforms
            .iter()
            .filter_map(|p| {
                p.parse()
                    .map_err(|e| self.err(format!("{field}.platforms: {e}")))
                    .ok()
            })
            .collect();
        let schedule = raw.schedule.as_deref().and_then(|s| {
            s.parse()
                .map_err(|e| self.err(format!("{field}.schedule: {e}")))
                .ok()
        });
        let jitter = self.duration(
            &format!("{field}.jitter"),
            raw.jitter.as_deref(),
            Duration::from_secs(30 * 60),
        );
        if jitter > Duration::from_secs(86_400) {
            self.err(format!("{field}.jitter: at most 24h"));
        }
        let bandwidth = self.size(
            &format!("{field}.bandwidth"),
            raw.bandwidth
                .as_deref()
                .map(|b| b.trim().trim_end_matches("/s")),
        );
        if bandwidth == Some(0) {
            self.err(format!("{field}.bandwidth: must be more than 0"));
        }
        let concurrency = raw.concurrency.unwrap_or(4);
        if !(1..=64).contains(&concurrency) {
            self.err(format!("{field}.concurrency: must be 1 to 64"));
        }
        let tags = tags?;
        (self.errors.len() == before).then_some(MirrorJob {
            name: raw.name,
            upstream: raw.upstream,
            repositories,
            tags,
            platforms,
            referrers: raw.referrers,
            schedule,
            jitter,
            bandwidth,
            concurrency,
            prune: raw.prune,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default().expect("default config must validate");
        assert_eq!(c.upstreams.len(), 3);
    }

    #[test]
    fn product_example_is_valid() {
        let text = r#"
[server]
listen = ["0.0.0.0:5000"]
public_url = "http://outpost.site:5000"
[storage]
path = "/var/lib/outpost"
max_size = "50GiB"
[[upstream]]
name = "docker.io"
url = "https://registry-1.docker.io"
tag_ttl = "10m"
[[upstream]]
name = "central.corp"
url = "https://central.corp:5000"
aliases = ["central.corp:5000"]
[auth]
issuer_keys = ["/etc/outpost/issuer.pub"]
central = "central.corp"
central_ttl = "2m"
offline_grace = "7d"
[[access]]
repositories = ["docker.io/**"]
anonymous = ["pull"]
[[access]]
repositories = ["central.corp/team/**"]
authenticated = ["pull"]
users = { "alice" = ["pull"] }
immutable_tags = ["v*"]
[[mirror]]
name = "apps"
upstream = "central.corp"
repositories = ["team/app", "team/worker"]
tags = ["v*"]
bandwidth = "10MiB/s"
"#;
        let c = Config::from_toml(text).expect("valid");
        assert_eq!(c.storage.max_size, Some(50 << 30));
        assert_eq!(c.upstreams[1].aliases, ["central.corp:5000"]);
        assert_eq!(c.mirrors[0].bandwidth, Some(10 << 20));
        assert_eq!(c.auth.central.as_deref(), Some("central.corp"));
        assert_eq!(c.auth.central_ttl, Duration::from_secs(120));
        assert_eq!(c.auth.offline_grace, Duration::from_secs(7 * 86400));
    }

    #[test]
    fn reports_every_error_at_once() {
        let text = r#"
[server]
listen = ["nowhere"]
public_url = "ftp://x"
[storage]
path = "/tmp/x"
max_size = "lots"
[[upstream]]
name = "central.corp:5000"
url = "central"
[auth]
issuer_keys = []
central = "missing"
[[access]]
repositories = ["**"]
anonymous = ["push"]
"#;
        let errors = Config::from_toml(text).expect_err("invalid").0;
        let joined = errors.join("\n");
        for needle in [
            "server.listen",
            "public_url",
            "max_size",
            "upstream[0]",
            "url",
            "auth.central",
            "push",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
        }
    }

    #[test]
    fn failure_throttle_is_configurable() {
        let base =
            "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\n[storage]\npath=\"x\"\n";
        let c = Config::from_toml(base).expect("defaults");
        assert_eq!(c.auth.failure_limit, crate::auth::DEFAULT_MAX_FAILURES);
        assert_eq!(c.auth.failure_window, crate::auth::DEFAULT_WINDOW);
        let c = Config::from_toml(&format!(
            "{base}[auth]\nfailure_limit = 3\nfailure_window = \"10m\"\n"
        ))
        .expect("valid");
        assert_eq!(c.auth.failure_limit, 3);
        assert_eq!(c.auth.failure_window, Duration::from_secs(600));
        let e = Config::from_toml(&format!(
            "{base}[auth]\nfailure_limit = 0\nfailure_window = \"0s\"\n"
        ))
        .expect_err("zero");
        let shown = e.to_string();
        assert!(
            shown.contains("auth.failure_limit") && shown.contains("auth.failure_window"),
            "{shown}"
        );
    }

    const BASE: &str = "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\n\
        [storage]\npath=\"x\"\n[[upstream]]\nname=\"central.corp\"\nurl=\"https://c\"\n";

    #[test]
    fn mirror_jobs_are_validated_into_typed_jobs() {
        let c = Config::from_toml(&format!(
            "{BASE}[[mirror]]\nname=\"apps\"\nupstream=\"central.corp\"\n\
             repositories=[\"team/app\", \"base/*\"]\ntags=[\"v*\"]\nsemver=\">=1.2, <2\"\n\
             keep_newest=3\nplatforms=[\"linux/amd64\", \"linux/arm64/v8\"]\nreferrers=true\n\
             schedule=\"0 2 * * *\"\nbandwidth=\"10MiB/s\"\nprune=true\n"
        ))
        .expect("valid job");
        let job = &c.mirrors[0];
        assert_eq!(job.name, "apps");
        assert!(matches!(&job.repositories[0], RepoSelector::Name(n) if n.as_str() == "team/app"));
        assert!(matches!(&job.repositories[1], RepoSelector::Glob(g) if g == "base/*"));
        assert_eq!(job.platforms.len(), 2);
        assert_eq!(
            job.schedule.as_ref().map(ToString::to_string).as_deref(),
            Some("0 2 * * *")
        );
        assert_eq!(job.bandwidth, Some(10 << 20));
        assert_eq!(
            (job.concurrency, job.jitter),
            (4, Duration::from_secs(1800))
        );
        assert!(job.prune && job.referrers);
        assert_eq!(
            job.tags
                .select(["v1.1.0", "v1.2.0", "v1.3.0", "v1.9.0", "v2.0.0", "1.5.0"]),
            vec!["v1.2.0", "v1.3.0", "v1.9.0"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        );
    }

    /// Regression: `config check` accepted `schedule = "every now and then"`.
    #[test]
    fn every_bad_mirror_key_is_named() {
        let e = Config::from_toml(&format!(
            "{BASE}[[mirror]]\nname=\"Apps!\"\nupstream=\"nowhere\"\nrepositories=[\"Team/App\"]\n\
             tag_regex=\"(\"\nsemver=\"about 1\"\nplatforms=[\"linux\"]\n\
             schedule=\"every now and then\"\nbandwidth=\"fast\"\nconcurrency=0\njitter=\"soon\"\n\
             [[mirror]]\nname=\"empty\"\nupstream=\"central.corp\"\nrepositories=[]\n\
             [[mirror]]\nname=\"empty\"\nupstream=\"central.corp\"\nrepositories=[\"a/b\"]\ntags=[\"*\"]\n"
        ))
        .expect_err("invalid jobs")
        .to_string();
        for needle in [
            "mirror \"Apps!\": name",
            ".upstream: no upstream",
            ".repositories: \"Team/App\"",
            ".tag_regex:",
            ".semver:",
            ".platforms:",
            ".schedule:",
            ".bandwidth:",
            ".concurrency:",
            ".jitter:",
            "mirror \"empty\".repositories: is empty",
            "mirror \"empty\".no tag filter",
            "another job has this name",
        ] {
            assert!(e.contains(needle), "{needle:?} missing in:\n{e}");
        }
    }

    /// Regression (issue 11): `key revoke`, `gc` and `fsck` run from another directory
    /// with a relative `storage.path` opened a store of their own and reported success.
    #[test]
    fn relative_paths_are_read_from_the_config_files_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("outpost.toml");
        std::fs::write(
            &file,
            "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\n\
             [storage]\npath=\"data\"\n[auth]\nissuer_keys=[\"keys/issuer.pub\", \"/abs/k.pub\"]\n\
             revocation_file=\"revoked\"\n",
        )
        .expect("write");
        let c = Config::load(&file).expect("valid");
        assert_eq!(c.storage.path, dir.path().join("data"));
        assert_eq!(
            c.auth.issuer_keys,
            vec![
                dir.path().join("keys/issuer.pub"),
                PathBuf::from("/abs/k.pub")
            ]
        );
        assert_eq!(c.auth.revocation_file, Some(dir.path().join("revoked")));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = "[server]\nlisten=[\"127.0.0.1:0\"]\npublic_url=\"http://x\"\nlisen=1\n[storage]\npath=\"x\"\n";
        let e = Config::from_toml(text).expect_err("unknown key");
        assert!(e.to_string().contains("lisen"), "{e}");
    }
}
