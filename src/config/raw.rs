//! The configuration file exactly as serde reads it, before validation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    pub storage: RawStorage,
    #[serde(default)]
    pub upstream: Vec<RawUpstream>,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub access: Vec<RawAccess>,
    #[serde(default)]
    pub mirror: Vec<RawMirror>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default)]
    pub listen: Vec<String>,
    pub public_url: String,
    pub tls: Option<RawTls>,
    pub header_timeout: Option<String>,
    pub body_idle_timeout: Option<String>,
    pub max_header_bytes: Option<String>,
    pub shutdown_grace: Option<String>,
    pub max_connections: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub listen: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub http3: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub path: PathBuf,
    pub max_size: Option<String>,
    pub gc_grace: Option<String>,
    pub upload_timeout: Option<String>,
    pub db_cache: Option<String>,
    pub reserve: Option<String>,
    pub max_upload_sessions: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub tag_ttl: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub revalidate_wait: Option<String>,
    pub breaker_threshold: Option<u32>,
    pub breaker_cooldown: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(default)]
    pub issuer_keys: Vec<PathBuf>,
    pub central: Option<String>,
    pub central_ttl: Option<String>,
    pub offline_grace: Option<String>,
    pub revocation_file: Option<PathBuf>,
    pub failure_limit: Option<u32>,
    pub failure_window: Option<String>,
    pub token_ttl: Option<String>,
    pub token_secret_file: Option<PathBuf>,
    pub service: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    pub repositories: Vec<String>,
    #[serde(default)]
    pub anonymous: Vec<String>,
    #[serde(default)]
    pub authenticated: Vec<String>,
    #[serde(default)]
    pub users: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub immutable_tags: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirror {
    pub name: String,
    pub upstream: String,
    pub repositories: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub tag_regex: Option<String>,
    pub semver: Option<String>,
    pub keep_newest: Option<usize>,
    #[serde(default)]
    pub platforms: Vec<String>,
    #[serde(default)]
    pub referrers: bool,
    pub schedule: Option<String>,
    pub bandwidth: Option<String>,
    pub concurrency: Option<usize>,
    #[serde(default)]
    pub prune: bool,
    pub jitter: Option<String>,
}
