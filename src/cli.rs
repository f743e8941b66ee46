//! The command-line interface: argument definitions and the commands behind them.
//! Commands return their output as text; only `main` prints and picks exit codes.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::admin::{self, AdminRequest};
use crate::auth::{
    Actions, KeyClaims, KeyRequest, decode_unverified, issue_key, load_signing_key,
    write_issuer_pair,
};
use crate::config::{Config, DEFAULT_TOML, parse_duration};
use crate::keyring::{self, inventory::Listing};
use crate::storage::{StorageError, Store, now_secs};

#[derive(Parser, Debug)]
#[command(
    name = "outpost",
    version,
    about = "A pull-through caching edge mirror for container images"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the registry.
    ///
    /// Example: outpost serve --config /etc/outpost/outpost.toml
    /// Without --config, serves the embedded default (see `outpost config default`).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check or print configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Issuer key pairs and signed API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Remove blobs, manifests and uploads nothing references.
    ///
    /// Works with the daemon running (through its admin socket) or stopped.
    ///
    /// Example: outpost gc --config /etc/outpost/outpost.toml
    Gc {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Verify every blob's digest and every reference; exits 1 on any problem.
    ///
    /// Works with the daemon running (through its admin socket) or stopped.
    ///
    /// Example: outpost fsck --config /etc/outpost/outpost.toml --repair
    Fsck {
        #[arg(long, short)]
        config: PathBuf,
        /// Remove records of missing or corrupt blobs.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a configuration file, reporting every problem at once.
    ///
    /// Example: outpost config check --config /etc/outpost/outpost.toml
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    ///
    /// Example: outpost config default > outpost.toml
    Default,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Write a new Ed25519 issuer key pair (issuer.key, issuer.pub).
    ///
    /// Example: outpost key generate --out-dir /etc/outpost
    Generate {
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Sign a new API key; the key is the last line of output.
    ///
    /// With --config, the key's claims (never the key) are also recorded in that store's
    /// key list, directly or through the running daemon; if that fails, the key is still
    /// issued and a warning says why.
    ///
    /// Example: outpost key issue --signing-key issuer.key --subject ci --repo 'team/**' --actions pull,push --expires 90d
    Issue {
        #[arg(long)]
        signing_key: PathBuf,
        /// Record the key in the key list of this configuration's store.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        subject: String,
        /// Repository glob the key may act on (repeatable).
        #[arg(long = "repo", required = true)]
        repos: Vec<String>,
        #[arg(long, default_value = "pull")]
        actions: String,
        #[arg(long, default_value = "90d")]
        expires: String,
    },
    /// Show a key's claims (not verified).
    ///
    /// Example: outpost key inspect opk1.eyJ2Ijo...
    Inspect { key: String },
    /// Revoke a key by id or by the key itself, durably and at once.
    ///
    /// Works with the daemon running (through its admin socket) or stopped. Ids listed in
    /// `auth.revocation_file` are revoked too: the daemon re-reads that file when it
    /// changes.
    ///
    /// Example: outpost key revoke --config /etc/outpost/outpost.toml 3f2a...
    Revoke {
        #[arg(long, short)]
        config: PathBuf,
        key_or_id: String,
    },
    /// List the known keys: id, subject, repositories, actions, expiry, last use and
    /// whether revoked. Never shows a key.
    ///
    /// A key is known once it has authenticated, or when it was issued with --config.
    /// Revoked ids are listed even if their key was never seen. Works with the daemon
    /// running (through its admin socket) or stopped.
    ///
    /// Example: outpost key list --config /etc/outpost/outpost.toml --json
    List {
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object, `{"keys": [...], "warnings": [...]}`, instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// What a command produced: text for stdout, warnings for stderr, and whether it found
/// problems (exit 1).
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub failed: bool,
}

impl Outcome {
    fn ok(stdout: String) -> Outcome {
        Outcome {
            stdout,
            stderr: String::new(),
            failed: false,
        }
    }
}

pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p).map_err(|e| anyhow::anyhow!("{}:\n{e}", p.display()))?,
        None => Config::embedded_default()
            .map_err(|e| anyhow::anyhow!("embedded default config:\n{e}"))?,
    })
}

/// Runs an admin command on the store: directly when no daemon holds it, else through
/// the running daemon's admin socket.
fn admin(config: &Config, request: AdminRequest) -> anyhow::Result<Outcome> {
    let reply = match Store::open(&config.storage.path, config.storage.db_cache) {
        Ok(store) => admin::execute(&store, config, None, &request)?,
        Err(StorageError::Locked) => admin::request(&admin::socket_path(config), &request)?,
        Err(e) => return Err(e).context("opening the store"),
    };
    Ok(Outcome {
        stdout: reply.output,
        stderr: String::new(),
        failed: reply.failed,
    })
}

/// Records an issued key in the key list of `config`'s store: directly, or through the
/// running daemon. A store that does not exist yet is not created (it would belong to
/// whoever runs this, not to the daemon's user).
fn record_issued(config: &Path, claims: &KeyClaims) -> anyhow::Result<String> {
    let config = load_config(Some(config))?;
    if !config.database_path().exists() {
        bail!(
            "there is no store at {} yet; the key will be listed once it authenticates",
            config.storage.path.display()
        );
    }
    let key_id = claims.id.clone();
    let record = keyring::key_record(claims, now_secs(), None);
    Ok(admin(&config, AdminRequest::RecordKey { key_id, record })?.stdout)
}

/// `outpost key list`: like [`admin`], but a store that does not exist yet lists nothing
/// rather than being created.
fn list_keys(config: &Config, json: bool) -> anyhow::Result<Outcome> {
    if !config.database_path().exists() {
        let mut listing = Listing::default();
        listing.warnings.push(format!(
            "there is no store at {} yet",
            config.storage.path.display()
        ));
        let now = now_secs();
        return Ok(Outcome::ok(if json {
            listing.json(now)
        } else {
            listing.table(now)
        }));
    }
    admin(config, AdminRequest::ListKeys { json })
}

/// Runs every command except `serve`.
pub fn run(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Serve { .. } => bail!("serve is run by main"),
        Command::Config(ConfigCommand::Default) => Ok(Outcome::ok(DEFAULT_TOML.to_owned())),
        Command::Config(ConfigCommand::Check { config }) => {
            let c = load_config(config.as_deref())?;
            for p in &c.auth.issuer_keys {
                crate::auth::load_verifying_key(p)
                    .with_context(|| format!("issuer key {}", p.display()))?;
            }
            Ok(Outcome::ok(format!(
                "configuration is valid: {} upstream(s), {} access rule(s), {} mirror job(s)\n",
                c.upstreams.len(),
                c.access.len(),
                c.mirrors.len()
            )))
        }
        Command::Key(KeyCommand::Generate { out_dir }) => {
            std::fs::create_dir_all(&out_dir)?;
            let (private, public) = write_issuer_pair(&out_dir)?;
            Ok(Outcome::ok(format!(
                "wrote {} (keep secret) and {} (list it in [auth] issuer_keys)\n",
                private.display(),
                public.display()
            )))
        }
        Command::Key(KeyCommand::Issue {
            signing_key,
            config,
            subject,
            repos,
            actions,
            expires,
        }) => {
            let signing = load_signing_key(&signing_key)?;
            let actions = Actions::parse_list(&actions)?;
            let ttl = parse_duration(&expires).map_err(|e| anyhow::anyhow!(e))?;
            let (key, claims) = issue_key(
                &signing,
                &KeyRequest {
                    subject,
                    repos,
                    actions,
                    ttl,
                },
                SystemTime::now(),
            )?;
            let (recorded, warning) = match config.map(|c| record_issued(&c, &claims)) {
                None => (String::new(), String::new()),
                Some(Ok(note)) => (note, String::new()),
                Some(Err(e)) => (
                    String::new(),
                    format!("outpost: warning: the key was not recorded in the key list: {e:#}\n"),
                ),
            };
            // The key stays the last line of stdout, alone: scripts take it from there.
            Ok(Outcome {
                stdout: format!(
                    "id: {}\nsubject: {}\nexpires: {}\n{recorded}{}\n",
                    claims.id,
                    claims.subject,
                    fmt_time(claims.expires_at),
                    key.expose()
                ),
                stderr: warning,
                failed: false,
            })
        }
        Command::Key(KeyCommand::Inspect { key }) => {
            let c = decode_unverified(key.trim())?;
            Ok(Outcome::ok(format!(
                "id: {}\nsubject: {}\nissuer: {}\nrepositories: {}\nactions: {}\nissued: {}\nexpires: {}\n(signature not verified)\n",
                c.id,
                c.subject,
                c.issuer,
                c.repos.join(", "),
                c.actions,
                fmt_time(c.issued_at),
                fmt_time(c.expires_at)
            )))
        }
        Command::Key(KeyCommand::Revoke { config, key_or_id }) => {
            let config = load_config(Some(&config))?;
            let arg = key_or_id.trim();
            let id = match decode_unverified(arg) {
                Ok(claims) => claims.id,
                Err(_)
                    if !arg.is_empty()
                        && arg.len() <= 64
                        && arg.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    arg.to_owned()
                }
                Err(_) => bail!("not a key or key id"),
            };
            admin(&config, AdminRequest::Revoke { key_id: id })
        }
        Command::Key(KeyCommand::List { config, json }) => {
            list_keys(&load_config(Some(&config))?, json)
        }
        Command::Gc { config } => admin(&load_config(Some(&config))?, AdminRequest::Gc),
        Command::Fsck { config, repair } => {
            admin(&load_config(Some(&config))?, AdminRequest::Fsck { repair })
        }
    }
}

fn fmt_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}
