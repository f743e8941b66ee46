//! The composition root: builds every component once from a validated [`Config`], binds
//! listeners, runs the server, and handles signals and shutdown.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::central::{CentralAuth, CentralRules, DEFAULT_NEGATIVE_TTL};
use crate::auth::keyring;
use crate::auth::{
    Access, AccessSettings, AuthSettings, Authenticator, DEFAULT_CAPACITY, FailureThrottle,
    RevocationSet, load_verifying_key,
};
use crate::config::{Changes, Config, ReloadPlan};
use crate::http::{self, Listeners, TlsSettings};
use crate::metrics::Metrics;
use crate::mirror::{Mirror, Schedules};
use crate::pullthrough::PullThrough;
use crate::storage::Store;
use crate::systemd::Notifier;
use crate::upstream::{UpstreamSet, Upstreams};

/// How often access times are flushed and the size budget checked, at the latest.
const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The configuration in force, which a reload replaces.
pub type Applied = Arc<std::sync::Mutex<Arc<Config>>>;

/// A running server.
pub struct Daemon {
    plain_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Cache upkeep and the admin socket; awaited on stop so the last flush of access
    /// times and the socket's removal finish before the runtime ends.
    background: Vec<tokio::task::JoinHandle<()>>,
    /// Its background work (central learning) is awaited on stop, after the last request.
    pull_through: Arc<PullThrough>,
    /// Cached central logins (`auth.central`), whose client a reload may replace.
    central: Option<Arc<CentralAuth>>,
    /// The mirror service and its schedules, whose jobs a reload may replace.
    mirror: Mirror,
    schedules: Arc<Schedules>,
    tls: Option<TlsSettings>,
    auth: Authenticator,
    store: Store,
    config: Arc<Config>,
    /// The configuration last applied: the start-up one, then each accepted reload's
    /// (shared with the admin socket).
    applied: Applied,
}

/// Removes upload sessions idle for longer than `timeout`, every half of it (between 1 s
/// and 5 minutes), until `shutdown`: abandoned sessions do not wait for `outpost gc`.
async fn reap_uploads(store: Store, timeout: std::time::Duration, shutdown: CancellationToken) {
    let every = (timeout / 2).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(300),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        match store.reap_uploads(timeout).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "abandoned upload sessions removed"),
            Err(e) => tracing::warn!(error = %e, "removing abandoned upload sessions failed"),
        }
    }
}

/// A new configuration, validated whole and ready to apply.
struct Staged {
    config: Config,
    issuers: Vec<ed25519_dalek::VerifyingKey>,
    upstreams: UpstreamSet,
}

/// Loads and validates the configuration at `path` for a reload: its issuer keys, and its
/// upstreams built (credential and CA files read) beside the running ones. The running
/// `auth.central` upstream (its change needs a restart) must still be configured.
fn prepare_reload(path: &Path, upstreams: &Upstreams, running: &Config) -> anyhow::Result<Staged> {
    let config = Config::load(path)?;
    if let Some(central) = &running.auth.central
        && !config.upstreams.iter().any(|u| &u.name == central)
    {
        anyhow::bail!(
            "the new file removes the upstream {central:?}, which auth.central uses \
             (a change of auth.central needs a restart)"
        );
    }
    let staged = upstreams
        .stage(&config)
        .context("setting up upstream clients")?;
    let issuers = load_issuers(&config)?;
    Ok(Staged {
        config,
        issuers,
        upstreams: staged,
    })
}

/// The public keys of `auth.issuer_keys`, each failure naming its file.
fn load_issuers(config: &Config) -> anyhow::Result<Vec<ed25519_dalek::VerifyingKey>> {
    config
        .auth
        .issuer_keys
        .iter()
        .map(|p| {
            load_verifying_key(p).with_context(|| format!("loading issuer key {}", p.display()))
        })
        .collect()
}

/// Reads `N` random bytes kept as hex in `path`, creating them (mode 0600) on first
/// start: the `/token` HMAC secret, and this site's instance id.
fn persistent_random<const N: usize>(path: &Path, what: &str) -> anyhow::Result<[u8; N]> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let raw =
                hex::decode(text.trim()).with_context(|| format!("{what} file is not hex"))?;
            raw.try_into().map_err(|_| {
                anyhow::anyhow!("{what} in {} must be {N} bytes of hex", path.display())
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut value = [0u8; N];
            getrandom::fill(&mut value)
                .map_err(|e| anyhow::anyhow!("no entropy for the {what}: {e}"))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(hex::encode(value).as_bytes())?;
            f.sync_all()?;
            Ok(value)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Cached central-registry logins, when `auth.central` names an upstream. It shares that
/// upstream's client (and so its circuit breaker) with the pull-through cache.
fn central_auth(
    config: &Config,
    upstreams: &Upstreams,
    store: &Store,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Option<Arc<CentralAuth>>> {
    let Some(name) = &config.auth.central else {
        return Ok(None);
    };
    let central = upstreams
        .by_name(name)
        .with_context(|| format!("auth.central: no upstream is named {name:?}"))?;
    let rules = CentralRules {
        ttl: config.auth.central_ttl,
        negative_ttl: DEFAULT_NEGATIVE_TTL,
        offline_grace: config.auth.offline_grace,
    };
    let client = central.client().clone();
    let central = CentralAuth::new(client, store.clone(), rules, metrics.clone())
        .map_err(|e| anyhow::anyhow!("no entropy for central login records: {e}"))?;
    Ok(Some(Arc::new(central)))
}

/// What a newcomer needs to see at start: where data lives, which upstreams and mirror
/// jobs are configured, and what anonymous callers may do.
fn log_summary(config: &Config) {
    let names = |list: Vec<String>| {
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join(", ")
        }
    };
    let upstreams = names(
        config
            .upstreams
            .iter()
            .map(|u| format!("{} ({})", u.name, u.url))
            .collect(),
    );
    let mirrors = names(
        config
            .mirrors
            .iter()
            .map(|m| match &m.schedule {
                Some(s) => format!("{} (from {}, at \"{s}\" UTC)", m.name, m.upstream),
                None => format!("{} (from {}, on demand)", m.name, m.upstream),
            })
            .collect(),
    );
    let anonymous = names(
        config
            .access
            .iter()
            .filter(|r| !r.anonymous.is_empty())
            .map(|r| format!("{} on {}", r.anonymous, r.repositories.join(" ")))
            .collect(),
    );
    tracing::info!(
        data = %config.storage.path.display(),
        upstreams = %upstreams,
        mirror_jobs = %mirrors,
        anonymous = %anonymous,
        "serving"
    );
}

async fn bind_all(addrs: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a}"))?,
        );
    }
    Ok(out)
}

impl Daemon {
    /// Opens the store, binds the configured addresses and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        let plain = bind_all(&config.server.listen).await?;
        let tls = match &config.server.tls {
            Some(t) => bind_all(&t.listen).await?,
            None => Vec::new(),
        };
        Daemon::start_with(config, Listeners { plain, tls }).await
    }

    /// Starts serving on listeners the caller bound.
    pub async fn start_with(config: Config, listeners: Listeners) -> anyhow::Result<Daemon> {
        let config = Arc::new(config);
        let root = config.storage.path.clone();
        let cache = config.storage.db_cache;
        let store = tokio::task::spawn_blocking(move || Store::open(&root, cache))
            .await
            .context("opening the store")?
            .with_context(|| format!("opening the store in {}", config.storage.path.display()))?;
        store.set_reserve(config.storage.reserve);
        // The revocation file's ids are recorded in the store as they are loaded.
        let (revoked, revocation_stamp) = tokio::task::spawn_blocking({
            let (store, file) = (store.clone(), config.auth.revocation_file.clone());
            move || keyring::load_at_start(&store, file.as_deref())
        })
        .await
        .context("loading revocations")??;
        let issuers = load_issuers(&config)?;
        let auth = Authenticator::new(
            AuthSettings {
                issuers,
                token_secret: persistent_random(&config.token_secret_path(), "token secret")?,
                token_ttl: config.auth.token_ttl,
                policy: config.policy.clone(),
                service: config.auth.service.clone(),
            },
            RevocationSet::new(revoked),
        );
        let tls = match &config.server.tls {
            Some(t) => Some(TlsSettings::load(&t.cert, &t.key)?),
            None => None,
        };
        let plain_addrs = listeners
            .plain
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect::<Vec<_>>();
        let tls_addrs = listeners
            .tls
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect::<Vec<_>>();
        let throttle = FailureThrottle::new(
            config.auth.failure_limit,
            config.auth.failure_window,
            DEFAULT_CAPACITY,
        );
        let metrics = Arc::new(Metrics::new());
        let upstreams = Upstreams::new(&config).context("setting up upstream clients")?;
        let central = central_auth(&config, &upstreams, &store, &metrics)?;
        let cache = Arc::new(PullThrough::new(
            store.clone(),
            upstreams.clone(),
            metrics.clone(),
            central.clone(),
        ));
        let mirror = Mirror::new(
            store.clone(),
            upstreams.clone(),
            config.mirrors.clone(),
            metrics.clone(),
            central.clone(),
        );
        let shutdown = CancellationToken::new();
        // This site's stable id: it places the site in each mirror job's jitter window,
        // so a fleet spreads out and a site keeps its slot.
        let instance = hex::encode(persistent_random::<16>(
            &config.storage.path.join("instance.id"),
            "instance id",
        )?);
        let schedules = Arc::new(Schedules::new(mirror.clone(), instance, shutdown.clone()));
        let scheduling = tokio::spawn({
            let (schedules, shutdown) = (schedules.clone(), shutdown.clone());
            async move {
                schedules.apply().await;
                shutdown.cancelled().await;
                schedules.wait().await;
            }
        });
        let applied: Applied = Arc::new(std::sync::Mutex::new(config.clone()));
        let maintenance = tokio::spawn({
            let (cache, shutdown) = (cache.clone(), shutdown.clone());
            let budget = config.storage.max_size;
            async move { cache.maintain(budget, MAINTENANCE_INTERVAL, shutdown).await }
        });
        let reaper = tokio::spawn(reap_uploads(
            store.clone(),
            config.storage.upload_timeout,
            shutdown.clone(),
        ));
        let keys = tokio::spawn(keyring::upkeep(
            auth.clone(),
            store.clone(),
            config.auth.revocation_file.clone(),
            revocation_stamp,
            shutdown.clone(),
        ));
        let admin = tokio::spawn({
            let path = crate::admin::socket_path(&config);
            let (store, applied, mirror) = (store.clone(), applied.clone(), mirror.clone());
            let (auth, shutdown) = (auth.clone(), shutdown.clone());
            async move {
                if let Err(e) =
                    crate::admin::serve(path, store, applied, auth, mirror, shutdown).await
                {
                    tracing::error!(error = %e, "admin socket failed; CLI commands need the daemon stopped");
                }
            }
        });
        let access = Access::new(AccessSettings {
            authenticator: auth.clone(),
            throttle,
            central: central.clone(),
            metrics: metrics.clone(),
            upstreams,
            public_url: config.server.public_url.clone(),
        });
        let state = http::State::new(
            config.clone(),
            store.clone(),
            access,
            cache.clone(),
            metrics,
        );
        let quic = http::bind_http3(&state, &listeners, tls.as_ref())?;
        let http3_addrs = quic
            .iter()
            .filter_map(|e| e.local_addr().ok())
            .collect::<Vec<_>>();
        let task = tokio::spawn(http::serve(
            state,
            listeners,
            tls.clone(),
            quic,
            shutdown.clone(),
        ));
        for a in &plain_addrs {
            tracing::info!(addr = %a, tls = false, "listening");
        }
        for a in &tls_addrs {
            tracing::info!(addr = %a, tls = true, "listening");
        }
        for a in &http3_addrs {
            tracing::info!(addr = %a, protocol = "HTTP/3 (QUIC, UDP)", "listening");
        }
        log_summary(&config);
        Ok(Daemon {
            plain_addrs,
            tls_addrs,
            shutdown,
            task,
            background: vec![maintenance, admin, keys, scheduling, reaper],
            pull_through: cache,
            central,
            mirror,
            schedules,
            tls,
            auth,
            store,
            applied,
            config,
        })
    }

    /// Addresses of the plain HTTP listeners.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.plain_addrs
    }

    /// Addresses of the TLS listeners.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    /// Reloads (SIGHUP): the configuration file `source`, if the daemon was started from
    /// one, then the TLS certificates and the revocation file (which is also re-read on
    /// its own whenever it changes). A new configuration is validated whole first; an
    /// invalid one is refused and logged, and the running one stays. Of a valid one,
    /// issuer keys, `[[access]]` rules, `auth.token_ttl`, upstreams and mirror jobs apply
    /// at once (requests, transfers and mirror runs in flight finish as they started);
    /// other changed settings are logged as waiting for a restart.
    pub async fn reload(&self, source: Option<&Path>) {
        if let Some(path) = source {
            self.reload_config(path).await;
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificates reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; keeping the old certificates")
                }
            }
        }
        if let Some(file) = self.config.auth.revocation_file.clone() {
            let (set, store) = (self.auth.revocations().clone(), self.store.clone());
            let done = tokio::task::spawn_blocking(move || {
                keyring::reload_revocation_file(&file, &set, &store)
            })
            .await;
            match done {
                Ok(Ok(added)) => tracing::info!(added, "revocation list reloaded"),
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "revocation list reload failed")
                }
                Err(e) => tracing::error!(error = %e, "revocation list reload failed"),
            }
        }
    }

    /// Reads, validates and applies the configuration file at `path` (see [`Daemon::reload`]).
    async fn reload_config(&self, path: &Path) {
        let upstreams = self.pull_through.upstreams().clone();
        let loaded = {
            let path = path.to_owned();
            let upstreams = upstreams.clone();
            let running = self
                .applied
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            tokio::task::spawn_blocking(move || prepare_reload(&path, &upstreams, &running)).await
        };
        let staged = match loaded {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                tracing::error!(
                    config = %path.display(),
                    error = %crate::cli::error_text(&e),
                    "configuration reload refused; the running configuration stays"
                );
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed");
                return;
            }
        };
        let jobs = {
            let mut applied = self
                .applied
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let new = staged.config;
            let plan = ReloadPlan::new(&applied, &new);
            self.auth
                .reload(staged.issuers, new.policy.clone(), new.auth.token_ttl);
            let changes = staged.upstreams.changes(&upstreams);
            upstreams.install(staged.upstreams);
            if let Some(central) = &self.central
                && changes.changed.iter().any(|n| n == central.registry())
                && let Some(handle) = upstreams.by_name(central.registry())
            {
                central.replace_client(handle.client().clone());
            }
            if !changes.is_empty() {
                tracing::info!(
                    added = ?changes.added,
                    changed = ?changes.changed,
                    removed = ?changes.removed,
                    "upstreams reloaded: new requests use the new settings, requests in flight finish with the old"
                );
            }
            let jobs = Changes::between(
                &applied.mirrors,
                &new.mirrors,
                |j| &j.name,
                |a, b| format!("{a:?}") == format!("{b:?}"),
            );
            if !jobs.is_empty() {
                self.mirror.set_jobs(new.mirrors.clone());
                tracing::info!(
                    added = ?jobs.added,
                    changed = ?jobs.changed,
                    removed = ?jobs.removed,
                    "mirror jobs reloaded: runs in progress finish with the old settings"
                );
            }
            if !plan.restart.is_empty() {
                tracing::warn!(
                    changed = ?plan.restart,
                    "configuration reload: these settings changed and take effect at the next restart"
                );
            }
            tracing::info!(
                config = %path.display(),
                applied = ?plan.applied,
                issuer_keys = new.auth.issuer_keys.len(),
                "configuration reloaded"
            );
            // What waits for a restart keeps its running value: only what was applied moves.
            let mut next = (**applied).clone();
            next.auth.issuer_keys = new.auth.issuer_keys.clone();
            next.auth.token_ttl = new.auth.token_ttl;
            next.access = new.access.clone();
            next.policy = new.policy.clone();
            next.upstreams = new.upstreams.clone();
            next.mirrors = new.mirrors.clone();
            *applied = Arc::new(next);
            jobs
        };
        if !jobs.is_empty() {
            self.schedules.apply().await;
        }
    }

    /// Stops accepting, drains connections (bounded by the grace period) and returns.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        // Downloads still committing get the grace period too; one that cannot finish in
        // it is abandoned (its temp file is swept at the next start).
        if tokio::time::timeout(self.config.server.shutdown_grace, self.pull_through.close())
            .await
            .is_err()
        {
            tracing::warn!("downloads still running at shutdown were abandoned");
        }
        for task in self.background {
            let _ = task.await;
        }
        // After the drain, so the last requests' use of keys is recorded too.
        let (usage, store) = (self.auth.key_usage().clone(), self.store.clone());
        match tokio::task::spawn_blocking(move || keyring::flush_key_usage(&usage, &store)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "recording the last use of keys failed"),
            Err(e) => tracing::warn!(error = %e, "recording the last use of keys failed"),
        }
    }

    /// Serves until SIGTERM or SIGINT; SIGHUP reloads. Tells systemd (when it started us
    /// with `Type=notify`) that we are ready, reloading and stopping, and pings its watchdog.
    #[cfg(unix)]
    pub async fn run_until_signalled(self, source: Option<&Path>) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        // Handlers first: after READY=1, `systemctl reload` may send SIGHUP at once, and
        // SIGHUP's default action would end the process.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        // `start` returned, so the store is open and the listeners are bound.
        let notifier = Notifier::from_env();
        let serving = self.serving_status();
        notifier.ready(&serving);
        let watchdog_stop = CancellationToken::new();
        let watchdog = notifier.spawn_watchdog(watchdog_stop.clone());
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    notifier.reloading("reloading the configuration, TLS certificates and revocation list");
                    self.reload(source).await;
                    notifier.ready(&serving);
                }
            }
        }
        tracing::info!("shutting down");
        notifier.stopping("draining connections");
        self.stop().await;
        watchdog_stop.cancel();
        if let Some(watchdog) = watchdog {
            let _ = watchdog.await;
        }
        Ok(())
    }

    /// The `STATUS=` line systemd shows while we serve.
    fn serving_status(&self) -> String {
        let addrs = |list: &[SocketAddr]| {
            list.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let tls = if self.config.server.tls.as_ref().is_some_and(|t| t.http3) {
            "TLS and HTTP/3"
        } else {
            "TLS"
        };
        match (self.plain_addrs.is_empty(), self.tls_addrs.is_empty()) {
            (false, true) => format!("serving on {}", addrs(&self.plain_addrs)),
            (true, false) => format!("serving {tls} on {}", addrs(&self.tls_addrs)),
            _ => format!(
                "serving on {}; {tls} on {}",
                addrs(&self.plain_addrs),
                addrs(&self.tls_addrs)
            ),
        }
    }
}
