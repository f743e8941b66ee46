//! The command-line interface: argument definitions and the commands behind them.
//! Commands return their output as text; only `main` prints and picks exit codes.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::admin::{self, AdminRequest};
use crate::auth::keyring::{self, inventory::Listing};
use crate::auth::{
    Actions, KeyClaims, KeyRequest, Secret, decode_unverified, issue_key, load_signing_key,
    write_issuer_pair,
};
use crate::clientconfig::{
    self, CONTAINERD_DEFAULT_DIR, ContainerdOptions, GeneratedFile, KeyHeader, MirrorUrl,
};
use crate::config::{Config, DEFAULT_TOML, parse_duration};
use crate::metrics::Metrics;
use crate::mirror::{Mirror, progress};
use crate::storage::{StorageError, Store, now_secs};
use crate::upstream::Upstreams;

#[derive(Parser, Debug)]
#[command(
    name = "outpost",
    version,
    about = "A pull-through caching edge mirror for container images",
    after_help = "Examples:\n  outpost serve --config /etc/outpost/outpost.toml\n  \
                  outpost config check --config /etc/outpost/outpost.toml\n  \
                  outpost mirror run --config /etc/outpost/outpost.toml\n\n\
                  Exit status: 0 success; 1 the command ran and found problems (fsck, \
                  a mirrored tag that failed); 2 usage error (command line); 3 invalid or \
                  refused configuration; 4 the command could not run (no store, I/O, \
                  the daemon failed)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the registry.
    ///
    /// Without --config, serves the embedded default (see `outpost config default`).
    ///
    /// Example: outpost serve --config /etc/outpost/outpost.toml
    Serve {
        /// Configuration file [default: the embedded default configuration].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check or print configuration.
    ///
    /// Example: outpost config check --config /etc/outpost/outpost.toml
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Issuer key pairs and signed API keys.
    ///
    /// Example: outpost key issue --signing-key issuer.key --subject ci --repo 'team/**'
    #[command(subcommand)]
    Key(KeyCommand),
    /// Remove blobs, manifests and uploads nothing references.
    ///
    /// Works with the daemon running (through its admin socket) or stopped.
    ///
    /// Example: outpost gc --config /etc/outpost/outpost.toml
    Gc {
        /// Outpost's configuration file (the store it names must exist).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write client configuration that points nodes at this Outpost.
    ///
    /// Example: outpost client-config containerd --config /etc/outpost/outpost.toml
    #[command(subcommand)]
    ClientConfig(ClientConfigCommand),
    /// Mirror chosen repositories of an upstream into the store (the `[[mirror]]` jobs).
    ///
    /// Example: outpost mirror run --config /etc/outpost/outpost.toml
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// Verify every blob's digest and every reference; exits 1 on any problem.
    ///
    /// Works with the daemon running (through its admin socket) or stopped.
    ///
    /// Example: outpost fsck --config /etc/outpost/outpost.toml --repair
    Fsck {
        /// Outpost's configuration file (the store it names must exist).
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
        /// Configuration file to check [default: the embedded default configuration].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    ///
    /// Example: outpost config default > outpost.toml
    Default,
}

#[derive(Subcommand, Debug)]
pub enum MirrorCommand {
    /// Run mirror jobs now: every job, or the ones named. Exits 1 if any selected tag
    /// failed, naming it and why.
    ///
    /// Works with the daemon running (the daemon does the work) or stopped.
    ///
    /// Example: outpost mirror run --config /etc/outpost/outpost.toml apps
    Run {
        /// Outpost's configuration file (the store it names must exist).
        #[arg(long, short)]
        config: PathBuf,
        /// Jobs to run (by name); all when none is given.
        jobs: Vec<String>,
    },
    /// Show each job's last run (start, end, result, tags changed, bytes), its next
    /// scheduled run and its lag.
    ///
    /// Example: outpost mirror status --config /etc/outpost/outpost.toml --json
    Status {
        /// Outpost's configuration file (the store it names must exist).
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Write a new Ed25519 issuer key pair (issuer.key, issuer.pub).
    ///
    /// Example: outpost key generate --out-dir /etc/outpost
    Generate {
        /// Directory to write issuer.key and issuer.pub into (created if missing; existing
        /// files are never overwritten).
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
        /// The issuer's private key (issuer.key from `outpost key generate`).
        #[arg(long)]
        signing_key: PathBuf,
        /// Record the key in the key list of this configuration's store.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Who or what the key is for (a name shown in logs and `key list`).
        #[arg(long)]
        subject: String,
        /// Repository glob the key may act on (repeatable).
        #[arg(long = "repo", required = true)]
        repos: Vec<String>,
        /// Comma-separated actions the key allows: pull, push, delete.
        #[arg(long, default_value = "pull")]
        actions: String,
        /// Lifetime of the key (`90d`, `12h`, `1y`).
        #[arg(long, default_value = "90d")]
        expires: String,
    },
    /// Show a key's claims (not verified).
    ///
    /// Example: outpost key inspect opk1.eyJ2Ijo...
    Inspect {
        /// The API key (`opk1.…`).
        key: String,
    },
    /// Revoke a key by id or by the key itself, durably and at once.
    ///
    /// Works with the daemon running (through its admin socket) or stopped. Ids listed in
    /// `auth.revocation_file` are revoked too: the daemon re-reads that file when it
    /// changes.
    ///
    /// Example: outpost key revoke --config /etc/outpost/outpost.toml 3f2a...
    Revoke {
        /// Outpost's configuration file (the store it names must exist).
        #[arg(long, short)]
        config: PathBuf,
        /// The key's id (from `key list` or `key inspect`), or the key itself.
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
        /// Outpost's configuration file (the store it names must exist).
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object, `{"keys": [...], "warnings": [...]}`, instead of the table.
        #[arg(long)]
        json: bool,
    },
}

// These doc comments are `--help` text, which clap prints verbatim: `<registry>`,
// `[[registry]]` and bare URLs are meant for the terminal, not rustdoc markup.
#[allow(
    rustdoc::invalid_html_tags,
    rustdoc::broken_intra_doc_links,
    rustdoc::bare_urls
)]
#[derive(Subcommand, Debug)]
pub enum ClientConfigCommand {
    /// Write containerd hosts.toml files that pull every configured upstream through Outpost
    ///
    /// For each upstream's name and aliases, DIR/<registry>/hosts.toml names Outpost as a
    /// mirror host with capabilities ["pull", "resolve"] (containerd adds ?ns=<registry> to
    /// each request) and the registry itself as the fallback server (Docker Hub's
    /// registry-1.docker.io for docker.io). Files are replaced atomically, and only when
    /// they differ. With --key-file, each file carries "Authorization: Bearer <key>" for
    /// Outpost and is written mode 0600; the key is never printed.
    ///
    /// Examples:
    ///   outpost client-config containerd --config /etc/outpost/outpost.toml
    ///   outpost client-config containerd --config outpost.toml --stdout
    ///   outpost client-config containerd --config outpost.toml \
    ///       --server https://outpost.site:5443 --key-file /etc/outpost/node.key \
    ///       --ca /etc/containerd/outpost-ca.pem
    #[command(verbatim_doc_comment)]
    Containerd {
        /// Outpost's configuration file, whose upstreams the files are for.
        #[arg(long, short)]
        config: PathBuf,
        /// Directory containerd reads hosts.toml files from: the CRI plugin's registry
        /// config_path, or ctr's --hosts-dir [default: /etc/containerd/certs.d].
        #[arg(long, visible_alias = "out", value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Print the files, each after a line naming its path, instead of writing them
        /// (a key is shown as [REDACTED]).
        #[arg(long, conflicts_with = "dir")]
        stdout: bool,
        /// Outpost's URL as the nodes reach it [default: the config's server.public_url].
        #[arg(long, visible_alias = "mirror-url", value_name = "URL")]
        server: Option<String>,
        /// File holding the node's API key, sent to Outpost as a Bearer header.
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
        /// CA certificate (absolute path on the node) that signed Outpost's certificate.
        #[arg(long, value_name = "PATH")]
        ca: Option<PathBuf>,
        /// Do not verify Outpost's TLS certificate (tests only).
        #[arg(long, conflicts_with = "ca")]
        skip_verify: bool,
    },
    /// Print registries.conf entries that pull every configured upstream through Outpost
    ///
    /// For podman, CRI-O, buildah and skopeo (containers-registries.conf(5), version 2):
    /// per upstream name and alias, a [[registry]] whose mirror is Outpost in the
    /// path-prefix form, <outpost host:port>/<upstream>, with insecure = true when Outpost's
    /// URL is plain http. With --output, the file is replaced atomically, and only when it
    /// differs.
    ///
    /// Examples:
    ///   outpost client-config registries-conf --config /etc/outpost/outpost.toml
    ///   outpost client-config registries-conf --config outpost.toml \
    ///       --output /etc/containers/registries.conf.d/50-outpost.conf
    ///   skopeo --registries-conf 50-outpost.conf inspect docker://docker.io/library/alpine
    #[command(verbatim_doc_comment)]
    RegistriesConf {
        /// Outpost's configuration file, whose upstreams the entries are for.
        #[arg(long, short)]
        config: PathBuf,
        /// Write the entries to this file instead of stdout.
        #[arg(long, short, value_name = "PATH")]
        output: Option<PathBuf>,
        /// Outpost's URL as clients reach it [default: the config's server.public_url].
        #[arg(long, visible_alias = "mirror-url", value_name = "URL")]
        server: Option<String>,
    },
}

/// A value on the command line that cannot be used (a bad `--expires`, an unknown
/// action): exit status 2, like a usage error clap reports.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// An error as the CLI prints it: each cause after the one before, except a cause whose
/// text is already there (many errors embed their source's message), so nothing reads
/// twice.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The exit status for an error a command returned: 2 for usage, 3 for a configuration
/// that is invalid or refused, 4 for everything else (the command could not run: a store
/// that does not exist, I/O, a daemon that failed). 0 and 1 (ran, found problems) come
/// from [`Outcome`].
pub fn exit_status(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<UsageError>().is_some() {
        2
    } else if e.downcast_ref::<crate::config::ConfigErrors>().is_some() {
        3
    } else {
        4
    }
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

/// Loads the configuration file (the embedded default without one). An invalid file is
/// a [`ConfigErrors`](crate::config::ConfigErrors) error, every problem named.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)
            .map_err(|e| anyhow::Error::new(e).context(format!("{}", p.display())))?,
        None => Config::embedded_default()
            .map_err(|e| anyhow::Error::new(e).context("embedded default config"))?,
    })
}

/// Runs mirror jobs: in this process when no daemon holds the store, else through the
/// running daemon's admin socket (the daemon does the work).
fn mirror_run(config: &Config, jobs: Vec<String>) -> anyhow::Result<Outcome> {
    if config.mirrors.is_empty() {
        bail!("the configuration has no [[mirror]] jobs");
    }
    let mut display = progress::Display::new();
    let reply = match Store::open(&config.storage.path, config.storage.db_cache) {
        Ok(store) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let upstreams = Upstreams::new(config).context("setting up upstream clients")?;
                let mirror = Mirror::new(
                    store,
                    upstreams,
                    config.mirrors.clone(),
                    Arc::new(Metrics::new()),
                    None,
                );
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let run = async move {
                    let reply = admin::run_mirror(&mirror, &jobs, Some(&tx)).await;
                    drop(tx);
                    reply
                };
                let show = async {
                    while let Some(e) = rx.recv().await {
                        display.show(&e);
                    }
                };
                anyhow::Ok(tokio::join!(run, show).0)
            })?
        }
        Err(StorageError::Locked) => admin::request_with_progress(
            &admin::socket_path(config),
            &AdminRequest::MirrorRun { jobs },
            |e| display.show(e),
        )?,
        Err(e) => return Err(e).context("opening the store"),
    };
    Ok(Outcome {
        stdout: reply.output,
        stderr: String::new(),
        failed: reply.failed,
    })
}

/// Runs an admin command on the store: directly when no daemon holds it, else through
/// the running daemon's admin socket.
fn admin(config: &Config, request: AdminRequest) -> anyhow::Result<Outcome> {
    // Never create a store here: a command that acted on a new, empty store would report
    // success (a revocation that revokes nothing) while the daemon's store is elsewhere.
    if !config.database_path().exists() {
        bail!(
            "there is no store at {} (no outpost.redb): check storage.path (a relative path \
             is read from the config file's directory); nothing was done",
            config.storage.path.display()
        );
    }
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
                crate::auth::load_verifying_key(p).map_err(|e| {
                    crate::config::ConfigErrors(vec![format!("issuer key {}: {e:#}", p.display())])
                })?;
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
            let actions =
                Actions::parse_list(&actions).map_err(|e| UsageError(format!("--actions: {e}")))?;
            let ttl =
                parse_duration(&expires).map_err(|e| UsageError(format!("--expires: {e}")))?;
            let signing = load_signing_key(&signing_key)?;
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
        Command::ClientConfig(command) => client_config(command),
        Command::Gc { config } => admin(&load_config(Some(&config))?, AdminRequest::Gc),
        Command::Mirror(MirrorCommand::Run { config, jobs }) => {
            mirror_run(&load_config(Some(&config))?, jobs)
        }
        Command::Mirror(MirrorCommand::Status { config, json }) => admin(
            &load_config(Some(&config))?,
            AdminRequest::MirrorStatus { json },
        ),
        Command::Fsck { config, repair } => {
            admin(&load_config(Some(&config))?, AdminRequest::Fsck { repair })
        }
    }
}

/// `outpost client-config`: generates the files, then writes or prints them.
fn client_config(command: ClientConfigCommand) -> anyhow::Result<Outcome> {
    match command {
        ClientConfigCommand::Containerd {
            config,
            dir,
            stdout,
            server,
            key_file,
            ca,
            skip_verify,
        } => {
            let config = load_config(Some(&config))?;
            let mut warnings = String::new();
            let mirror = mirror_url(server.as_deref(), &config, &mut warnings)?;
            let key = match &key_file {
                Some(path) => Some(
                    read_key_file(path, &mut warnings)
                        .map_err(|e| UsageError(format!("--key-file: {e:#}")))?,
                ),
                None => None,
            };
            let header = match (&key, stdout) {
                (None, _) => KeyHeader::None,
                (Some(_), true) => KeyHeader::Redacted,
                (Some((key, _)), false) => KeyHeader::Key(key),
            };
            if key.is_some() && mirror.is_plain_http() {
                warnings.push_str(
                    "outpost: warning: the key goes to Outpost over plain http, readable on the way\n",
                );
            }
            if (ca.is_some() || skip_verify) && mirror.is_plain_http() {
                warnings.push_str(
                    "outpost: warning: --ca and --skip-verify do nothing for a plain http mirror\n",
                );
            }
            let files = clientconfig::containerd_hosts(
                &config,
                &ContainerdOptions {
                    mirror: mirror.clone(),
                    key: header,
                    ca,
                    skip_verify,
                },
            )?;
            let dir = dir.unwrap_or_else(|| PathBuf::from(CONTAINERD_DEFAULT_DIR));
            if stdout {
                if key.is_some() {
                    warnings.push_str(
                        "outpost: the key is shown as [REDACTED]; write the files to put it in\n",
                    );
                }
                let shown: Vec<String> = files
                    .iter()
                    .map(|f| format!("# ==> {} <==\n{}", dir.join(&f.path).display(), f.contents))
                    .collect();
                return Ok(Outcome {
                    stdout: shown.join("\n"),
                    stderr: warnings,
                    failed: false,
                });
            }
            let (mut report, written) = install(&dir, &files)?;
            let with_key = match &key {
                Some((_, Some(id))) => format!(", with the Authorization header of key {id}"),
                Some((_, None)) => ", with the Authorization header".to_owned(),
                None => String::new(),
            };
            report.push_str(&format!(
                "{} hosts.toml file(s) for mirror {mirror}{with_key}: {written} written, {} unchanged\n",
                files.len(),
                files.len() - written,
            ));
            Ok(Outcome {
                stdout: report,
                stderr: warnings,
                failed: false,
            })
        }
        ClientConfigCommand::RegistriesConf {
            config,
            output,
            server,
        } => {
            let config = load_config(Some(&config))?;
            let mut warnings = String::new();
            let mirror = mirror_url(server.as_deref(), &config, &mut warnings)?;
            let text = clientconfig::registries_conf(&config, &mirror)?;
            let Some(path) = output else {
                return Ok(Outcome {
                    stdout: text,
                    stderr: warnings,
                    failed: false,
                });
            };
            let file = GeneratedFile {
                path: path.clone(),
                contents: text,
                secret: false,
            };
            let verb = if write_if_changed(&path, &file)? {
                "wrote"
            } else {
                "unchanged"
            };
            Ok(Outcome {
                stdout: format!("{verb} {}\n", path.display()),
                stderr: warnings,
                failed: false,
            })
        }
    }
}

/// Writes each file under `dir` when it differs; returns one line per file saying what
/// happened, and how many were written.
fn install(dir: &Path, files: &[GeneratedFile]) -> anyhow::Result<(String, usize)> {
    let mut report = String::new();
    let mut written = 0;
    for f in files {
        let path = dir.join(&f.path);
        let changed = write_if_changed(&path, f)?;
        written += usize::from(changed);
        let verb = if changed { "wrote" } else { "unchanged" };
        report.push_str(&format!("{verb} {}\n", path.display()));
    }
    Ok((report, written))
}

/// Outpost's URL for clients: `--server`, else the config's `public_url`, which may name
/// only this machine (the embedded default's `localhost`): then a warning says so.
fn mirror_url(
    server: Option<&str>,
    config: &Config,
    warnings: &mut String,
) -> anyhow::Result<MirrorUrl> {
    let mirror = match server {
        Some(url) => MirrorUrl::parse(url).map_err(|e| UsageError(format!("--server: {e:#}")))?,
        None => MirrorUrl::parse(&config.server.public_url)
            .map_err(|e| crate::config::ConfigErrors(vec![format!("server.public_url: {e:#}")]))?,
    };
    if server.is_none() && mirror.is_loopback() {
        warnings.push_str(&format!(
            "outpost: warning: server.public_url {mirror} names this machine only; give \
             --server with the URL other nodes reach Outpost at\n"
        ));
    }
    Ok(mirror)
}

/// Reads a node's API key (surrounding whitespace dropped) and, when it has the format of
/// an Outpost key, its id; warns (never showing the key) when it does not, or has expired.
fn read_key_file(path: &Path, warnings: &mut String) -> anyhow::Result<(Secret, Option<String>)> {
    let text = Secret::new(
        fs::read_to_string(path)
            .with_context(|| format!("reading the key file {}", path.display()))?,
    );
    let key = Secret::new(text.expose().trim());
    clientconfig::check_key(&key).with_context(|| format!("key file {}", path.display()))?;
    let id = match decode_unverified(key.expose()) {
        Ok(claims) => {
            if claims.expires_at <= now_secs() {
                warnings.push_str(&format!(
                    "outpost: warning: key {} expired at {}; Outpost will refuse it\n",
                    claims.id,
                    fmt_time(claims.expires_at)
                ));
            }
            Some(claims.id)
        }
        Err(_) => {
            warnings.push_str(&format!(
                "outpost: warning: {} does not hold an Outpost API key; it is sent as it is\n",
                path.display()
            ));
            None
        }
    };
    Ok((key, id))
}

/// Writes `file` at `path` unless it already holds exactly that (and, for a secret, is
/// readable by its owner only). Atomic: a temp file in the same directory, fsync, rename,
/// fsync of the directory, so containerd never reads half a file. Returns whether it wrote.
fn write_if_changed(path: &Path, file: &GeneratedFile) -> anyhow::Result<bool> {
    let mode = if file.secret { 0o600 } else { 0o644 };
    if let Ok(meta) = fs::metadata(path)
        && meta.is_file()
        && (!file.secret || meta.permissions().mode() & 0o077 == 0)
        && fs::read(path).is_ok_and(|old| old == file.contents.as_bytes())
    {
        return Ok(false);
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce)
        .map_err(|e| anyhow::anyhow!("no randomness for a temp name: {e}"))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(nonce)));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have taken bits from 0644; a secret's 0600 it cannot widen.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(file.contents.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(true)
}

fn fmt_time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}
