//! Locally cached central-registry logins: checks a central user's
//! password and per-repository access at the central registry, remembers the answers
//! durably, and answers from them while the central registry is unreachable.
//!
//! Owns the state and the I/O around the pure rules of `auth::central`: an in-memory view
//! of the `central_users` and `central_decisions` tables (read through on a miss, written
//! through on every online answer), a short in-memory memory of refused credentials, and
//! locks so that concurrent requests cause one online check per login or per user and
//! repository.
//! The user's credentials are used only to ask the central registry about that user;
//! content is always fetched with Outpost's own upstream credentials (`pullthrough`).
//!
//! What is stored: the user name, a salted PBKDF2-HMAC-SHA256 of the credential
//! (per-record random salt; never the password), when it was last confirmed, and per
//! repository the central registry's last answer and when. The empty user name holds the repositories
//! the central registry serves anonymously. Nothing here logs a password; metrics count
//! outcomes under fixed labels, never a user name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use subtle::ConstantTimeEq;

mod rules;

use crate::metrics::Metrics;
use crate::oci::RepoName;
use crate::storage::{CentralDecisionRecord, CentralUserRecord, StorageError, Store, now_secs};
use crate::upstream::{LoginCheck, PullCheck, Upstream, UserCredentials};
pub use rules::{CentralLogin, CentralRules, CentralUser, DEFAULT_NEGATIVE_TTL, valid_user_name};
use rules::{
    Decision, LoginStep, Offline, RepoStep, cached_allows, credential_hash, credential_key,
    credential_matches, judge_login, judge_repo, new_salt,
};

/// The user-name key of anonymous decisions (no central user has an empty name).
const ANONYMOUS: &str = "";

/// Entries kept in each in-memory map before it is trimmed; the database still has all.
const MAX_CACHED: usize = 50_000;

/// Refused credentials remembered at most, so a password-guessing client cannot grow memory.
const MAX_REJECTED: usize = 10_000;

/// How often a learned anonymous repository is written again at most (its confirmation
/// time), so that busy pull-through does not write on every manifest.
const LEARN_EVERY: u64 = 60;

/// Why a central user or one of their pulls was refused. Messages name the user and the
/// repository, never a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CentralError {
    #[error("invalid user name or password")]
    BadCredentials,
    #[error(
        "the central registry {registry} cannot be reached (or gave no usable answer) to \
         check these credentials, and they are not known here"
    )]
    Unverifiable { registry: String },
    #[error(
        "the cached login of {user} has expired: the central registry {registry} has not \
         confirmed it within offline_grace and cannot be reached"
    )]
    LoginExpired { user: String, registry: String },
    #[error("the central registry {registry} does not let {user} pull {repo}")]
    Denied {
        user: String,
        registry: String,
        repo: String,
    },
    #[error(
        "cannot confirm with the central registry {registry} that {user} may pull {repo}: \
         it cannot be reached and no cached decision holds"
    )]
    Unconfirmed {
        user: String,
        registry: String,
        repo: String,
    },
    #[error("central login records: {0}")]
    Storage(String),
}

impl CentralError {
    /// Whether this refuses the credentials themselves (401) rather than one pull (403).
    pub fn is_login(&self) -> bool {
        matches!(
            self,
            CentralError::BadCredentials
                | CentralError::Unverifiable { .. }
                | CentralError::LoginExpired { .. }
        )
    }
}

impl From<StorageError> for CentralError {
    fn from(e: StorageError) -> CentralError {
        CentralError::Storage(e.to_string())
    }
}

/// Who is pulling a central repository.
#[derive(Clone, Copy, Debug)]
pub enum Puller<'a> {
    Anonymous,
    /// A user who presented their password with this request: the central registry can
    /// be asked with it.
    User(&'a CentralUser),
    /// A token issued to this user: only cached decisions count (a token carries no
    /// password to ask with, and tokens are short-lived).
    TokenOf(&'a str),
}

/// A keyed digest of a credential and the stored hash it matched.
type VerifiedCredential = ([u8; 32], [u8; 32]);

/// Cached central-registry logins for one central upstream. Build once, share.
pub struct CentralAuth {
    /// The central upstream's client; a configuration reload that changes the upstream
    /// replaces it.
    upstream: std::sync::RwLock<Upstream>,
    /// The central upstream's name: requests routed there are central repositories.
    name: String,
    store: Store,
    rules: CentralRules,
    metrics: Arc<Metrics>,
    users: Mutex<HashMap<String, Option<CentralUserRecord>>>,
    decisions: Mutex<HashMap<(String, String), Option<Decision>>>,
    /// Credentials the central registry refused lately: keyed digest → until (Unix seconds).
    rejected: Mutex<HashMap<[u8; 32], u64>>,
    /// Credentials that matched a stored hash in this process: user → (keyed digest of
    /// the credential, the stored hash it matched). Spares the slow hash on every request.
    verified: Mutex<HashMap<String, VerifiedCredential>>,
    /// Process-random key of the `rejected` and `verified` digests.
    process_key: [u8; 16],
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CentralAuth {
    /// `upstream` is the client of the central upstream (requests routed to an upstream
    /// of its name are central repositories).
    pub fn new(
        upstream: Upstream,
        store: Store,
        rules: CentralRules,
        metrics: Arc<Metrics>,
    ) -> Result<CentralAuth, getrandom::Error> {
        Ok(CentralAuth {
            name: upstream.name().to_owned(),
            upstream: std::sync::RwLock::new(upstream),
            store,
            rules,
            metrics,
            users: Mutex::default(),
            decisions: Mutex::default(),
            rejected: Mutex::default(),
            verified: Mutex::default(),
            process_key: new_salt()?,
            locks: Mutex::default(),
        })
    }

    /// Whether the upstream named `name` is the central registry.
    pub fn is_central(&self, name: &str) -> bool {
        name == self.name
    }

    /// The central upstream's client now.
    fn upstream(&self) -> Upstream {
        self.upstream
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Uses `client` for the central registry from now on (a reload changed its
    /// upstream's settings; the name stays).
    pub fn replace_client(&self, client: Upstream) {
        *self
            .upstream
            .write()
            .unwrap_or_else(PoisonError::into_inner) = client;
    }

    /// The central registry's name, for messages.
    pub fn registry(&self) -> &str {
        &self.name
    }

    /// Checks a central user's credentials: against the stored hash while its
    /// confirmation is fresh, otherwise at the central registry; while that cannot
    /// answer, a matching stored credential holds until `offline_grace` after its last
    /// confirmation. An online refusal of the stored credential deletes it.
    pub async fn login(&self, login: &CentralLogin) -> Result<CentralUser, CentralError> {
        let user = login.user.as_str();
        let password = login.password.expose();
        let accepted = || CentralUser {
            name: login.user.clone(),
            password: login.password.clone(),
        };
        if self.recently_rejected(user, password, now_secs()) {
            self.count("central_denied");
            return Err(CentralError::BadCredentials);
        }
        if self.login_step(user, password).await?.1 == LoginStep::Accept {
            self.count("central_cached");
            return Ok(accepted());
        }
        // One online check per user at a time; whoever waited looks again first.
        let _guard = self.check_lock(user).await;
        let (matching, step) = self.login_step(user, password).await?;
        if step == LoginStep::Accept {
            self.count("central_cached");
            return Ok(accepted());
        }
        let creds = UserCredentials {
            user,
            password: &login.password,
        };
        match self.upstream().check_login(creds).await {
            Ok(LoginCheck::Valid) => {
                let salt = match matching {
                    Some(r) => r.salt,
                    None => new_salt().map_err(|e| CentralError::Storage(e.to_string()))?,
                };
                let record = CentralUserRecord {
                    salt,
                    hash: stored_hash(salt, user, password).await?,
                    verified_at: now_secs(),
                };
                self.set_user(user, Some(record));
                if let Err(e) = self.store.put_central_user(user, record).await {
                    tracing::warn!(error = %e, "storing a central login failed; it holds until restart");
                }
                self.count("central_online");
                Ok(accepted())
            }
            Ok(LoginCheck::Rejected) => {
                if let Some(record) = matching {
                    self.invalidate(user, record).await;
                }
                self.remember_rejected(user, password);
                self.count("central_denied");
                Err(CentralError::BadCredentials)
            }
            Err(_) => match step {
                LoginStep::Revalidate { offline_ok: true } => {
                    self.count("central_cached");
                    Ok(accepted())
                }
                LoginStep::Revalidate { offline_ok: false } => {
                    self.count("central_offline_refused");
                    Err(CentralError::LoginExpired {
                        user: user.to_owned(),
                        registry: self.registry().to_owned(),
                    })
                }
                LoginStep::Verify | LoginStep::Accept => {
                    self.count("central_offline_refused");
                    Err(CentralError::Unverifiable {
                        registry: self.registry().to_owned(),
                    })
                }
            },
        }
    }

    /// Whether `who` may pull `remote` (the repository's name at the central registry),
    /// as far as the central registry is concerned: from a remembered answer while it is
    /// fresh, otherwise by asking (users who sent their password, and anonymous callers);
    /// while the central registry cannot answer, a positive answer holds until
    /// `offline_grace` after its last confirmation. A user is also allowed what the
    /// central registry is known to serve anonymously when it cannot be asked.
    pub async fn may_pull(&self, who: Puller<'_>, remote: &RepoName) -> Result<(), CentralError> {
        let repo = remote.as_str();
        let key = match who {
            Puller::Anonymous => ANONYMOUS,
            Puller::User(u) => u.name.as_str(),
            Puller::TokenOf(name) => name,
        };
        let now = now_secs();
        if let Puller::TokenOf(name) = who {
            return self.token_may_pull(name, remote, now).await;
        }
        if let Some(known) = self.known(key, repo, now).await? {
            return known;
        }
        // One online check per user and repository at a time; whoever waited looks again.
        let _guard = self.check_lock(&format!("{key}\0{repo}")).await;
        let offline = match judge_repo(self.decision(key, repo).await?, now_secs(), &self.rules) {
            RepoStep::Known(_) => {
                return self.known(key, repo, now_secs()).await?.unwrap_or(Ok(()));
            }
            RepoStep::Ask { offline } => offline,
        };
        let creds = match who {
            Puller::User(u) => Some(UserCredentials {
                user: &u.name,
                password: &u.password,
            }),
            _ => None,
        };
        match self.upstream().check_pull(creds, remote).await {
            Ok(PullCheck::Allowed) => {
                self.record(key, repo, true).await;
                self.count("central_online");
                Ok(())
            }
            Ok(PullCheck::Denied | PullCheck::NotFound) => {
                self.record(key, repo, false).await;
                self.count("central_denied");
                Err(self.denied(key, repo))
            }
            Ok(PullCheck::BadCredentials) => {
                // The password changed since the login was confirmed.
                if let Puller::User(u) = who
                    && let Some(record) = self.user_record(&u.name).await?
                    && self.matches(&record, &u.name, u.password.expose()).await
                {
                    self.invalidate(&u.name, record).await;
                }
                self.count("central_denied");
                Err(CentralError::BadCredentials)
            }
            Err(_) => {
                if offline == Offline::Allow
                    || (key != ANONYMOUS && self.anonymous_allows(repo, now_secs()).await?)
                {
                    self.count("central_cached");
                    Ok(())
                } else {
                    self.count("central_offline_refused");
                    Err(CentralError::Unconfirmed {
                        user: display_user(key).to_owned(),
                        registry: self.registry().to_owned(),
                        repo: repo.to_owned(),
                    })
                }
            }
        }
    }

    /// Records that the central registry just served `remote` to an anonymous request
    /// (pull-through without credentials of Outpost's own), so anonymous pulls of it keep
    /// working while the central registry is unreachable.
    pub async fn learn_anonymous(&self, remote: &RepoName) {
        let repo = remote.as_str();
        let now = now_secs();
        let known = match self.decision(ANONYMOUS, repo).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading a central decision failed");
                return;
            }
        };
        if known.is_some_and(|d| d.allowed && now < d.confirmed_at.saturating_add(LEARN_EVERY)) {
            return;
        }
        self.record(ANONYMOUS, repo, true).await;
    }

    /// Asks the central registry whether it serves `remote` to anyone and remembers the
    /// answer (a mirror run does this for each repository it mirrors with credentials of
    /// its own, so anonymous pulls of mirrored content are judged on fresh knowledge
    /// while the central registry is unreachable). No answer changes nothing.
    pub async fn ask_anonymous(&self, remote: &RepoName) {
        match self.upstream().check_pull(None, remote).await {
            Ok(PullCheck::Allowed) => self.record(ANONYMOUS, remote.as_str(), true).await,
            Ok(PullCheck::Denied | PullCheck::NotFound) => {
                self.record(ANONYMOUS, remote.as_str(), false).await;
            }
            Ok(PullCheck::BadCredentials) | Err(_) => {}
        }
    }

    /// Whether `remote` may be listed (`_catalog`) to `who`: only from remembered
    /// answers, the caller's own or the anonymous ones, within `offline_grace`. Listing
    /// never asks the central registry, so a repository the caller has not pulled yet
    /// stays unlisted until they do.
    pub async fn may_list(&self, who: Puller<'_>, remote: &RepoName) -> bool {
        let repo = remote.as_str();
        let now = now_secs();
        let own = match who {
            Puller::Anonymous => None,
            Puller::User(u) => Some(u.name.as_str()),
            Puller::TokenOf(name) => Some(name),
        };
        let allows = |key| async move {
            self.decision(key, repo)
                .await
                .is_ok_and(|d| cached_allows(d, now, &self.rules))
        };
        match own {
            Some(user) => allows(user).await || allows(ANONYMOUS).await,
            None => allows(ANONYMOUS).await,
        }
    }

    /// A token holder's pull: the user's stored login must still stand (not refused
    /// online since) within its grace, and a remembered positive decision (the user's own,
    /// or anonymous) must hold. Never asks the central registry.
    async fn token_may_pull(
        &self,
        user: &str,
        remote: &RepoName,
        now: u64,
    ) -> Result<(), CentralError> {
        let repo = remote.as_str();
        let login_stands = self.user_record(user).await?.is_some_and(|r| {
            now < r
                .verified_at
                .saturating_add(self.rules.offline_grace.as_secs())
        });
        if !login_stands {
            self.count("central_offline_refused");
            return Err(CentralError::LoginExpired {
                user: user.to_owned(),
                registry: self.registry().to_owned(),
            });
        }
        if cached_allows(self.decision(user, repo).await?, now, &self.rules)
            || self.anonymous_allows(repo, now).await?
        {
            self.count("central_cached");
            return Ok(());
        }
        self.count("central_denied");
        Err(self.denied(user, repo))
    }

    /// The remembered answer when it is recent enough to use without asking (counted).
    async fn known(
        &self,
        key: &str,
        repo: &str,
        now: u64,
    ) -> Result<Option<Result<(), CentralError>>, CentralError> {
        Ok(
            match judge_repo(self.decision(key, repo).await?, now, &self.rules) {
                RepoStep::Known(true) => {
                    self.count("central_cached");
                    Some(Ok(()))
                }
                RepoStep::Known(false) => {
                    self.count("central_denied");
                    Some(Err(self.denied(key, repo)))
                }
                RepoStep::Ask { .. } => None,
            },
        )
    }

    async fn anonymous_allows(&self, repo: &str, now: u64) -> Result<bool, CentralError> {
        Ok(cached_allows(
            self.decision(ANONYMOUS, repo).await?,
            now,
            &self.rules,
        ))
    }

    /// The stored credential of `user` if `password` matches it, and what to do.
    async fn login_step(
        &self,
        user: &str,
        password: &str,
    ) -> Result<(Option<CentralUserRecord>, LoginStep), CentralError> {
        let matching = match self.user_record(user).await? {
            Some(r) if self.matches(&r, user, password).await => Some(r),
            _ => None,
        };
        let step = judge_login(matching.map(|r| r.verified_at), now_secs(), &self.rules);
        Ok((matching, step))
    }

    fn denied(&self, key: &str, repo: &str) -> CentralError {
        CentralError::Denied {
            user: display_user(key).to_owned(),
            registry: self.registry().to_owned(),
            repo: repo.to_owned(),
        }
    }

    fn count(&self, result: &'static str) {
        self.metrics.auth_result(result);
    }

    /// Deletes a stored credential the central registry refused (if it is still the one
    /// stored), so that it no longer works offline either.
    async fn invalidate(&self, user: &str, record: CentralUserRecord) {
        {
            let mut users = lock(&self.users);
            if users.get(user).and_then(|r| r.as_ref()).map(|r| r.hash) == Some(record.hash) {
                users.insert(user.to_owned(), None);
            }
        }
        match self.store.forget_central_user(user, record.hash).await {
            Ok(_) => tracing::info!(
                user,
                registry = self.registry(),
                "central registry refused a cached login; it was deleted"
            ),
            Err(e) => tracing::warn!(error = %e, "deleting a refused central login failed"),
        }
    }

    async fn user_record(&self, user: &str) -> Result<Option<CentralUserRecord>, CentralError> {
        if let Some(r) = lock(&self.users).get(user) {
            return Ok(*r);
        }
        let record = self.store.central_user(user).await?;
        let mut users = lock(&self.users);
        // A concurrent login may have stored a newer record meanwhile: keep that.
        Ok(*users.entry(user.to_owned()).or_insert(record))
    }

    fn set_user(&self, user: &str, record: Option<CentralUserRecord>) {
        let mut users = lock(&self.users);
        if users.len() >= MAX_CACHED {
            users.clear();
        }
        users.insert(user.to_owned(), record);
    }

    async fn decision(&self, user: &str, repo: &str) -> Result<Option<Decision>, CentralError> {
        let key = (user.to_owned(), repo.to_owned());
        if let Some(d) = lock(&self.decisions).get(&key) {
            return Ok(*d);
        }
        let stored = self
            .store
            .central_decision(user, repo)
            .await?
            .map(|r| Decision {
                allowed: r.allowed,
                confirmed_at: r.confirmed_at,
            });
        let mut decisions = lock(&self.decisions);
        if decisions.len() >= MAX_CACHED {
            decisions.clear();
        }
        Ok(*decisions.entry(key).or_insert(stored))
    }

    /// Remembers an answer of the central registry, in memory and durably.
    async fn record(&self, user: &str, repo: &str, allowed: bool) {
        let decision = Decision {
            allowed,
            confirmed_at: now_secs(),
        };
        {
            let mut decisions = lock(&self.decisions);
            if decisions.len() >= MAX_CACHED {
                decisions.clear();
            }
            decisions.insert((user.to_owned(), repo.to_owned()), Some(decision));
        }
        let record = CentralDecisionRecord {
            allowed,
            confirmed_at: decision.confirmed_at,
        };
        if let Err(e) = self.store.put_central_decision(user, repo, record).await {
            tracing::warn!(error = %e, "storing a central decision failed; it holds until restart");
        }
    }

    fn rejected_key(&self, user: &str, password: &str) -> [u8; 32] {
        credential_key(&self.process_key, user, password)
    }

    /// Whether `user`/`password` made `record`'s hash: from memory if this process has
    /// matched them before, otherwise with the slow hash on the blocking pool.
    async fn matches(&self, record: &CentralUserRecord, user: &str, password: &str) -> bool {
        let quick = credential_key(&self.process_key, user, password);
        if lock(&self.verified)
            .get(user)
            .is_some_and(|(k, h)| *h == record.hash && bool::from(k.ct_eq(&quick)))
        {
            return true;
        }
        let (salt, hash) = (record.salt, record.hash);
        let (user_owned, password) = (user.to_owned(), Zeroizing::new(password.to_owned()));
        let matched = tokio::task::spawn_blocking(move || {
            credential_matches(&salt, &hash, &user_owned, &password)
        })
        .await
        .unwrap_or(false);
        if matched {
            let mut verified = lock(&self.verified);
            if verified.len() >= MAX_CACHED {
                verified.clear();
            }
            verified.insert(user.to_owned(), (quick, record.hash));
        }
        matched
    }

    fn recently_rejected(&self, user: &str, password: &str, now: u64) -> bool {
        let key = self.rejected_key(user, password);
        lock(&self.rejected)
            .get(&key)
            .is_some_and(|&until| now < until)
    }

    fn remember_rejected(&self, user: &str, password: &str) {
        let key = self.rejected_key(user, password);
        let now = now_secs();
        let mut rejected = lock(&self.rejected);
        if rejected.len() >= MAX_REJECTED {
            rejected.retain(|_, until| now < *until);
            if rejected.len() >= MAX_REJECTED {
                rejected.clear();
            }
        }
        rejected.insert(key, now.saturating_add(self.rules.negative_ttl.as_secs()));
    }

    /// The lock serializing online checks of one key: a user name for logins, a user
    /// name and repository for pulls.
    async fn check_lock(&self, user: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let mutex = {
            let mut locks = lock(&self.locks);
            if locks.len() >= 1024 {
                locks.retain(|_, m| Arc::strong_count(m) > 1);
            }
            locks.entry(user.to_owned()).or_default().clone()
        };
        mutex.lock_owned().await
    }
}

/// The slow stored hash of a credential, computed on the blocking pool.
async fn stored_hash(salt: [u8; 16], user: &str, password: &str) -> Result<[u8; 32], CentralError> {
    let (user, password) = (user.to_owned(), Zeroizing::new(password.to_owned()));
    tokio::task::spawn_blocking(move || credential_hash(&salt, &user, &password))
        .await
        .map_err(|e| CentralError::Storage(e.to_string()))
}

fn display_user(key: &str) -> &str {
    if key == ANONYMOUS { "anonymous" } else { key }
}
