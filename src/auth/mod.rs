//! Authentication and authorization: principals, signed API keys, short-lived tokens,
//! access policy and revocation.
//!
//! Owns every decision about who a caller is and what they may do. It never sees HTTP
//! types: the HTTP layer hands it header values and gets back a principal or an error.
//! [`Authenticator`] is the facade that layer uses; the submodules hold the parts:
//! `keys` (issuer key files, API key format and verification), `token` (bearer tokens),
//! `policy` (the pure decision function), `revocation` (revoked key ids), `throttle`
//! (failed-authentication rate limiting), `usage` (the last use of keys, batched in
//! memory), `glob` (repository glob semantics) and `central` (the rules of cached
//! central-registry logins).
//!
//! A user name and password that is not an API key belongs to a central-registry user.
//! Checking one needs the network or the database, so [`Authenticator::identify`] hands
//! it back unchecked as [`Identified::CentralLogin`]; `auth::central` checks it and only
//! then makes a [`Principal::Central`]. Keys and tokens stay synchronous and fast.
//!
//! Invariant: `push` and `delete` are only ever granted by a signed API key's own scope,
//! directly or through a token obtained with it; the policy refuses to grant them.

mod access;
mod action;
pub mod central;
mod glob;
pub mod keyring;
mod keys;
mod policy;
mod revocation;
mod secret;
mod throttle;
mod token;
mod usage;

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT;
use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;

pub use access::{Access, AccessError, AccessSettings};
pub use action::{Action, Actions};
pub use central::{CentralLogin, CentralUser};
pub use ed25519_dalek::VerifyingKey;
pub use keys::{
    API_KEY_PREFIX, KeyClaims, KeyError, KeyRequest, KeyVerifier, decode_unverified, issue_key,
    issuer_id, load_signing_key, load_verifying_key, write_issuer_pair,
};
pub use policy::{AccessRule, Identity, Policy, unreachable_rules};
pub use revocation::{RevocationSet, parse_revocation_file, parse_revocation_lines};
pub use secret::Secret;
pub use throttle::{DEFAULT_CAPACITY, DEFAULT_MAX_FAILURES, DEFAULT_WINDOW, FailureThrottle};
pub use token::{TOKEN_PREFIX, TokenClaims, TokenError, TokenSigner};
pub use usage::{KeyUsage, UsedKey};

use crate::oci::RepoName;

/// Most scopes one token carries; more are dropped. Real clients ask for one or two (a
/// mount names two repositories), and the cap keeps tokens well inside header limits.
pub const MAX_TOKEN_SCOPES: usize = 16;

/// Who a request is from, once its credentials checked out.
#[derive(Clone, Debug)]
pub enum Principal {
    Anonymous,
    Key(Arc<KeyClaims>),
    Token(Arc<TokenClaims>),
    /// A central-registry user whose password was checked by `auth::central`.
    Central(Arc<CentralUser>),
}

impl Principal {
    /// A name for logs and token subjects; never a credential.
    pub fn subject(&self) -> &str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::Key(claims) => &claims.subject,
            Principal::Token(claims) => &claims.subject,
            Principal::Central(user) => &user.name,
        }
    }

    /// What kind of caller this is, for logs and spans: `anonymous`, `key`, `token` or
    /// `central`.
    pub fn kind(&self) -> &'static str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::Key(_) => "key",
            Principal::Token(_) => "token",
            Principal::Central(_) => "central",
        }
    }

    /// The id of the API key behind this principal, if any.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Principal::Anonymous | Principal::Central(_) => None,
            Principal::Key(claims) => Some(&claims.id),
            Principal::Token(claims) => claims.key_id.as_deref(),
        }
    }

    /// Who owns the upload sessions this principal opens: the API key (directly or
    /// through a token obtained with it), else the central user or the token's subject.
    /// A session is visible to its owner only.
    pub fn session_owner(&self) -> String {
        if let Some(id) = self.key_id() {
            return format!("key:{id}");
        }
        match self {
            Principal::Anonymous => "anonymous".to_owned(),
            Principal::Key(claims) => format!("key:{}", claims.id),
            Principal::Central(user) => format!("central:{}", user.name),
            Principal::Token(claims) if claims.central => format!("central:{}", claims.subject),
            Principal::Token(claims) => format!("token:{}", claims.subject),
        }
    }

    /// The central-registry user behind this principal (directly, or through a token
    /// issued to one), whose pulls of central repositories need the central registry's
    /// own yes as well.
    pub fn central_user(&self) -> Option<&str> {
        match self {
            Principal::Central(user) => Some(&user.name),
            Principal::Token(claims) if claims.central => Some(&claims.subject),
            _ => None,
        }
    }
}

/// What the credentials of a request turned out to be.
#[derive(Debug)]
pub enum Identified {
    /// Checked here and now: anonymous, an API key or a token.
    Principal(Principal),
    /// A central-registry user name and password, not checked yet: the caller checks
    /// them (online or against the cache) before treating them as a principal.
    CentralLogin(CentralLogin),
}

/// Why credentials were refused. Every variant means the client must present other
/// credentials (HTTP 401); retrying the same ones cannot help. Messages never contain
/// credential material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed credentials: {0}")]
    Malformed(&'static str),
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("credentials have expired")]
    Expired,
    #[error("credentials are not valid yet (issued in the future)")]
    NotYetValid,
    #[error("credentials have been revoked")]
    Revoked,
    #[error("API key was signed by an issuer that is not configured")]
    UnknownIssuer,
}

impl From<KeyError> for AuthError {
    fn from(e: KeyError) -> AuthError {
        match e {
            KeyError::Malformed(reason) => AuthError::Malformed(reason),
            KeyError::UnknownIssuer => AuthError::UnknownIssuer,
            KeyError::Expired => AuthError::Expired,
            KeyError::NotYetValid => AuthError::NotYetValid,
            KeyError::BadSignature | KeyError::InvalidRequest(_) | KeyError::Entropy => {
                AuthError::InvalidCredentials
            }
        }
    }
}

impl From<TokenError> for AuthError {
    fn from(e: TokenError) -> AuthError {
        match e {
            TokenError::Malformed(reason) => AuthError::Malformed(reason),
            TokenError::BadSignature => AuthError::InvalidCredentials,
            TokenError::Expired => AuthError::Expired,
            TokenError::NotYetValid => AuthError::NotYetValid,
        }
    }
}

/// Everything the authenticator is built from, validated by the config module.
pub struct AuthSettings {
    /// Public keys whose API keys are accepted (several, for rotation).
    pub issuers: Vec<VerifyingKey>,
    /// Shared by every process behind one name, so any of them accepts any one's tokens.
    pub token_secret: [u8; 32],
    pub token_ttl: Duration,
    pub policy: Policy,
    /// The `service` named in `WWW-Authenticate` and expected at `/token`.
    pub service: String,
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field(
                "issuers",
                &self.issuers.iter().map(issuer_id).collect::<Vec<_>>(),
            )
            .field("token_secret", &"[REDACTED]")
            .field("token_ttl", &self.token_ttl)
            .field("policy", &self.policy)
            .field("service", &self.service)
            .finish()
    }
}

/// One access request from a token scope, e.g. `repository:team/app:pull,push`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub repo: RepoName,
    pub actions: Actions,
}

impl Scope {
    /// Parses a `repository:<name>:<actions>` scope. Other resource types (such as
    /// `registry:catalog:*`), resource classes and invalid names give `None`; unknown
    /// actions are dropped, as the token spec asks.
    pub fn parse(scope: &str) -> Option<Scope> {
        let (kind, rest) = scope.split_once(':')?;
        if kind != "repository" {
            return None;
        }
        // Repository names cannot contain `:`, so the last one separates the actions.
        let (name, actions) = rest.rsplit_once(':')?;
        Some(Scope {
            repo: name.parse().ok()?,
            actions: actions
                .split(',')
                .filter_map(|a| a.parse::<Action>().ok())
                .collect(),
        })
    }
}

/// A token from [`Authenticator::issue_token`], with what the `/token` answer needs.
#[derive(Debug)]
pub struct IssuedToken {
    pub token: Secret,
    /// Seconds from `issued_at` until the token expires.
    pub expires_in: u64,
    pub issued_at: SystemTime,
}

/// The authentication and authorization facade: a cheap-to-clone handle.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    /// What a reload replaces: the issuer keys, the policy and the token lifetime.
    reloadable: RwLock<Arc<Reloadable>>,
    tokens: TokenSigner,
    service: String,
    revocations: RevocationSet,
    usage: KeyUsage,
}

/// The settings a configuration reload swaps in one step, so a request sees either the
/// old set or the new one, never a mix.
struct Reloadable {
    keys: KeyVerifier,
    token_ttl: Duration,
    policy: Policy,
}

impl Authenticator {
    pub fn new(settings: AuthSettings, revocations: RevocationSet) -> Authenticator {
        Authenticator {
            inner: Arc::new(Inner {
                reloadable: RwLock::new(Arc::new(Reloadable {
                    keys: KeyVerifier::new(settings.issuers),
                    token_ttl: settings.token_ttl,
                    policy: settings.policy,
                })),
                tokens: TokenSigner::new(settings.token_secret),
                service: settings.service,
                revocations,
                usage: KeyUsage::default(),
            }),
        }
    }

    /// Swaps in new issuer keys, policy and token lifetime (a configuration reload).
    /// Keys already verified are verified again against the new issuers; tokens issued
    /// before stay valid until they expire (they carry their own grants).
    pub fn reload(&self, issuers: Vec<VerifyingKey>, policy: Policy, token_ttl: Duration) {
        let next = Arc::new(Reloadable {
            keys: KeyVerifier::new(issuers),
            token_ttl,
            policy,
        });
        *self
            .inner
            .reloadable
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
    }

    /// The current reloadable settings.
    fn current(&self) -> Arc<Reloadable> {
        self.inner
            .reloadable
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Identifies the caller from the `Authorization` header value, if any: `Bearer` with
    /// an API key or a token, or `Basic` whose password is an API key (the user name is
    /// ignored). No header means anonymous. Central-registry credentials are refused here;
    /// callers that can check them use [`Authenticator::identify`]. Tests only: the
    /// request pipeline identifies (see `Access::authenticate`).
    #[cfg(test)]
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        now: SystemTime,
    ) -> Result<Principal, AuthError> {
        match self.identify(authorization, now)? {
            Identified::Principal(p) => Ok(p),
            Identified::CentralLogin(_) => Err(AuthError::InvalidCredentials),
        }
    }

    /// Like [`Authenticator::authenticate`], but a `Basic` user name and password that is
    /// not an API key comes back unchecked as [`Identified::CentralLogin`].
    pub fn identify(
        &self,
        authorization: Option<&str>,
        now: SystemTime,
    ) -> Result<Identified, AuthError> {
        let principal = |p: Result<Principal, AuthError>| p.map(Identified::Principal);
        let Some(header) = authorization else {
            return Ok(Identified::Principal(Principal::Anonymous));
        };
        let (scheme, credentials) = header
            .trim()
            .split_once([' ', '\t'])
            .ok_or(AuthError::Malformed("no credentials after the scheme"))?;
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            if credentials.starts_with(API_KEY_PREFIX) {
                principal(self.api_key(credentials, now))
            } else if credentials.starts_with(TOKEN_PREFIX) {
                principal(self.token(credentials, now))
            } else {
                Err(AuthError::InvalidCredentials)
            }
        } else if scheme.eq_ignore_ascii_case("basic") {
            self.basic(credentials, now)
        } else {
            Err(AuthError::InvalidCredentials)
        }
    }

    /// What `principal` may do on `repo`. `push` and `delete` come only from an API key's
    /// own scope (or a token obtained with one), never from the policy.
    pub fn allowed(&self, principal: &Principal, repo: &RepoName) -> Actions {
        let current = self.current();
        let policy = &current.policy;
        // The policy refuses write grants when built; masking here keeps the invariant
        // local and obvious.
        let read_only = |a: Actions| a.intersect(Actions::PULL);
        match principal {
            Principal::Anonymous => read_only(policy.grants(Identity::Anonymous, repo)),
            Principal::Key(claims) => {
                read_only(policy.grants(Identity::Authenticated { user: None }, repo))
                    .union(claims.grants(repo))
            }
            Principal::Token(claims) => claims
                .grants_for(repo)
                .union(read_only(policy.grants(Identity::Anonymous, repo))),
            Principal::Central(user) => read_only(policy.grants(
                Identity::Authenticated {
                    user: Some(&user.name),
                },
                repo,
            )),
        }
    }

    /// Issues a token granting, per scope, what was asked for and is allowed (possibly
    /// nothing: docker clients ask anonymously first). The token never outlives the
    /// credential it was obtained with. At most [`MAX_TOKEN_SCOPES`] scopes count.
    pub fn issue_token(
        &self,
        principal: &Principal,
        scopes: &[Scope],
        now: SystemTime,
    ) -> IssuedToken {
        let issued_at = keys::unix_seconds(now);
        let ttl = self.current().token_ttl.as_secs().max(1);
        let mut expires_at = issued_at.saturating_add(ttl);
        match principal {
            Principal::Anonymous | Principal::Central(_) => {}
            Principal::Key(claims) => expires_at = expires_at.min(claims.expires_at),
            Principal::Token(claims) => expires_at = expires_at.min(claims.expires_at),
        }

        let mut grants: Vec<(RepoName, Actions)> = Vec::new();
        for scope in scopes.iter().take(MAX_TOKEN_SCOPES) {
            let granted = scope
                .actions
                .intersect(self.allowed(principal, &scope.repo));
            if granted.is_empty() {
                continue;
            }
            match grants.iter_mut().find(|(r, _)| *r == scope.repo) {
                Some((_, existing)) => *existing = existing.union(granted),
                None => grants.push((scope.repo.clone(), granted)),
            }
        }

        let claims = TokenClaims {
            subject: principal.subject().to_owned(),
            key_id: principal.key_id().map(str::to_owned),
            central: principal.central_user().is_some(),
            grants,
            issued_at,
            expires_at,
        };
        IssuedToken {
            token: self.inner.tokens.issue(&claims),
            expires_in: expires_at.saturating_sub(issued_at),
            issued_at: now,
        }
    }

    /// See [`Policy::immutable_rule`].
    pub fn immutable_rule(&self, repo: &RepoName, tag: &crate::oci::Tag) -> Option<String> {
        self.current().policy.immutable_rule(repo, tag)
    }

    pub fn service(&self) -> &str {
        &self.inner.service
    }

    pub fn revocations(&self) -> &RevocationSet {
        &self.inner.revocations
    }

    /// Keys that authenticated since the last flush of this batch.
    pub fn key_usage(&self) -> &KeyUsage {
        &self.inner.usage
    }

    pub fn issuer_count(&self) -> usize {
        self.current().keys.issuer_count()
    }

    fn api_key(&self, key: &str, now: SystemTime) -> Result<Principal, AuthError> {
        let claims = self.current().keys.verify(key, now)?;
        if self.inner.revocations.is_revoked(&claims.id) {
            return Err(AuthError::Revoked);
        }
        self.inner.usage.record(&claims, now);
        Ok(Principal::Key(claims))
    }

    fn token(&self, token: &str, now: SystemTime) -> Result<Principal, AuthError> {
        let claims = self.inner.tokens.verify(token, now)?;
        if let Some(id) = &claims.key_id {
            if self.inner.revocations.is_revoked(id) {
                return Err(AuthError::Revoked);
            }
            self.inner.usage.record_id(id, now);
        }
        Ok(Principal::Token(Arc::new(claims)))
    }

    fn basic(&self, credentials: &str, now: SystemTime) -> Result<Identified, AuthError> {
        let decoded = Zeroizing::new(
            STANDARD_PAD_INDIFFERENT
                .decode(credentials)
                .map_err(|_| AuthError::Malformed("Basic credentials are not base64"))?,
        );
        let text = std::str::from_utf8(&decoded)
            .map_err(|_| AuthError::Malformed("Basic credentials are not UTF-8"))?;
        let (user, password) = text
            .split_once(':')
            .ok_or(AuthError::Malformed("Basic credentials have no password"))?;
        if password.starts_with(API_KEY_PREFIX) {
            self.api_key(password, now).map(Identified::Principal)
        } else {
            self.central_user(user, password)
        }
    }

    /// A password that is not an API key belongs to a central-registry user;
    /// `auth::central` checks it.
    fn central_user(&self, user: &str, password: &str) -> Result<Identified, AuthError> {
        if !central::valid_user_name(user) || password.is_empty() {
            return Err(AuthError::InvalidCredentials);
        }
        Ok(Identified::CentralLogin(CentralLogin {
            user: user.to_owned(),
            password: Secret::new(password),
        }))
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.current().keys)
            .field("service", &self.inner.service)
            .field("revoked", &self.inner.revocations.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::keys::tests::{T0, at, issue, signing_key};
    use super::*;

    fn repo(name: &str) -> RepoName {
        name.parse().expect("valid name")
    }

    fn acts(s: &str) -> Actions {
        Actions::parse_list(s).expect("valid actions")
    }

    fn pull_push() -> Actions {
        acts("pull,push")
    }

    /// Anonymous pull of `docker.io/**`; authenticated pull of `team/**`.
    pub(crate) fn authenticator(revocations: RevocationSet) -> Authenticator {
        let policy = Policy::new(vec![
            AccessRule {
                repositories: vec!["docker.io/**".to_owned()],
                anonymous: Actions::PULL,
                ..AccessRule::default()
            },
            AccessRule {
                repositories: vec!["team/**".to_owned()],
                authenticated: Actions::PULL,
                immutable_tags: vec!["v*".to_owned()],
                ..AccessRule::default()
            },
        ])
        .expect("valid policy");
        Authenticator::new(
            AuthSettings {
                issuers: vec![signing_key(1).verifying_key()],
                token_secret: [9; 32],
                token_ttl: Duration::from_secs(300),
                policy,
                service: "outpost.test".to_owned(),
            },
            revocations,
        )
    }

    fn bearer(secret: &str) -> String {
        format!("Bearer {secret}")
    }

    fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    #[test]
    fn no_header_is_anonymous_with_policy_grants_only() {
        let auth = authenticator(RevocationSet::default());
        let who = auth.authenticate(None, at(T0)).expect("anonymous");
        assert!(matches!(who, Principal::Anonymous));
        assert_eq!(who.subject(), "anonymous");
        assert_eq!(who.key_id(), None);
        assert_eq!(
            auth.allowed(&who, &repo("docker.io/library/alpine")),
            Actions::PULL
        );
        assert_eq!(auth.allowed(&who, &repo("team/app")), Actions::NONE);
    }

    #[test]
    fn bearer_key_grants_its_scope_plus_authenticated_policy() {
        let auth = authenticator(RevocationSet::default());
        let (key, claims) = issue(&signing_key(1), &["hosted/**"], "pull,push", 3600);
        let who = auth
            .authenticate(Some(&bearer(key.expose())), at(T0))
            .expect("valid key");
        assert_eq!(who.subject(), "ci-runner");
        assert_eq!(who.key_id(), Some(claims.id.as_str()));
        assert_eq!(auth.allowed(&who, &repo("hosted/app")), pull_push());
        assert_eq!(auth.allowed(&who, &repo("team/app")), Actions::PULL);
        assert_eq!(auth.allowed(&who, &repo("docker.io/x")), Actions::PULL);
        assert_eq!(auth.allowed(&who, &repo("elsewhere/app")), Actions::NONE);
    }

    #[test]
    fn pull_only_key_cannot_push() {
        let auth = authenticator(RevocationSet::default());
        let (key, _) = issue(&signing_key(1), &["team/**"], "pull", 3600);
        let who = auth
            .authenticate(Some(&bearer(key.expose())), at(T0))
            .expect("valid key");
        let granted = auth.allowed(&who, &repo("team/app"));
        assert!(!granted.contains(Action::Push) && !granted.contains(Action::Delete));
    }

    #[test]
    fn out_of_scope_repo_gets_nothing() {
        let auth = authenticator(RevocationSet::default());
        let (key, _) = issue(&signing_key(1), &["hosted/app"], "pull,push,delete", 3600);
        let who = auth
            .authenticate(Some(&bearer(key.expose())), at(T0))
            .expect("valid key");
        assert_eq!(auth.allowed(&who, &repo("hosted/other")), Actions::NONE);
        assert_eq!(auth.allowed(&who, &repo("hosted/app/sub")), Actions::NONE);
    }

    #[test]
    fn expired_and_foreign_keys_are_refused() {
        let auth = authenticator(RevocationSet::default());
        let (key, _) = issue(&signing_key(1), &["**"], "pull", 60);
        assert_eq!(
            auth.authenticate(Some(&bearer(key.expose())), at(T0 + 60))
                .map(|_| ()),
            Err(AuthError::Expired)
        );
        let (foreign, _) = issue(&signing_key(2), &["**"], "pull", 60);
        assert_eq!(
            auth.authenticate(Some(&bearer(foreign.expose())), at(T0))
                .map(|_| ()),
            Err(AuthError::UnknownIssuer)
        );
    }

    #[test]
    fn tampered_key_is_refused() {
        let auth = authenticator(RevocationSet::default());
        let (key, _) = issue(&signing_key(1), &["team/app"], "pull", 3600);
        let (payload, signature) = key
            .expose()
            .strip_prefix(API_KEY_PREFIX)
            .and_then(|r| r.split_once('.'))
            .expect("segments");
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .expect("b64");
        let widened = String::from_utf8(json)
            .expect("utf8")
            .replace("team/app", "**");
        let tampered = format!(
            "{API_KEY_PREFIX}{}.{signature}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(widened)
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(&tampered)), at(T0))
                .map(|_| ()),
            Err(AuthError::InvalidCredentials)
        );
    }

    #[test]
    fn revoked_key_and_its_tokens_are_refused() {
        let revocations = RevocationSet::default();
        let auth = authenticator(revocations.clone());
        let (key, claims) = issue(&signing_key(1), &["hosted/**"], "pull,push", 3600);
        let header = bearer(key.expose());
        let who = auth.authenticate(Some(&header), at(T0)).expect("valid");
        let scope = Scope::parse("repository:hosted/app:pull").expect("scope");
        let token = auth.issue_token(&who, &[scope], at(T0));
        let token_header = bearer(token.token.expose());
        auth.authenticate(Some(&token_header), at(T0))
            .expect("token valid before revocation");

        assert!(revocations.revoke(&claims.id));
        assert_eq!(
            auth.authenticate(Some(&header), at(T0)).map(|_| ()),
            Err(AuthError::Revoked)
        );
        assert_eq!(
            auth.authenticate(Some(&basic("x", key.expose())), at(T0))
                .map(|_| ()),
            Err(AuthError::Revoked)
        );
        assert_eq!(
            auth.authenticate(Some(&token_header), at(T0)).map(|_| ()),
            Err(AuthError::Revoked)
        );
        assert!(auth.revocations().is_revoked(&claims.id));
    }

    #[test]
    fn successful_key_and_token_use_is_noted_for_the_key_list() {
        let revocations = RevocationSet::default();
        let auth = authenticator(revocations.clone());
        let (key, claims) = issue(&signing_key(1), &["hosted/**"], "pull", 3600);
        let (expired, _) = issue(&signing_key(1), &["hosted/**"], "pull", 10);
        let _ = auth.authenticate(Some(&bearer(expired.expose())), at(T0 + 20));
        assert_eq!(auth.key_usage().pending(), 0, "a refused key is not noted");
        let who = auth
            .authenticate(Some(&bearer(key.expose())), at(T0 + 1))
            .expect("valid");
        let token = auth.issue_token(&who, &[], at(T0 + 1)).token;
        auth.authenticate(Some(&bearer(token.expose())), at(T0 + 7))
            .expect("token valid");
        let mut batch = Vec::new();
        auth.key_usage()
            .flush(|b| {
                batch.extend_from_slice(b);
                Ok::<(), ()>(())
            })
            .expect("flush");
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].id, claims.id);
        assert_eq!(
            batch[0].last_used,
            T0 + 7,
            "the token's use counts for its key"
        );
        assert!(batch[0].claims.is_some());
        revocations.revoke(&claims.id);
        let _ = auth.authenticate(Some(&bearer(key.expose())), at(T0 + 8));
        assert_eq!(auth.key_usage().pending(), 0, "a revoked key is not noted");
    }

    #[test]
    fn token_grants_requested_and_allowed_for_its_repo_only() {
        let auth = authenticator(RevocationSet::default());
        let (key, _) = issue(&signing_key(1), &["hosted/**"], "pull,push", 3600);
        let who = auth
            .authenticate(Some(&bearer(key.expose())), at(T0))
            .expect("valid");
        let scopes = [
            Scope::parse("repository:hosted/app:pull,push,delete").expect("scope"),
            Scope::parse("repository:elsewhere/app:pull").expect("scope"),
        ];
        let issued = auth.issue_token(&who, &scopes, at(T0));
        assert_eq!(issued.expires_in, 300);
        let token_who = auth
            .authenticate(Some(&bearer(issued.token.expose())), at(T0 + 10))
            .expect("valid token");
        assert_eq!(token_who.subject(), "ci-runner");
        assert_eq!(auth.allowed(&token_who, &repo("hosted/app")), pull_push());
        assert_eq!(
            auth.allowed(&token_who, &repo("hosted/other")),
            Actions::NONE
        );
        assert_eq!(
            auth.allowed(&token_who, &repo("elsewhere/app")),
            Actions::NONE
        );
        // Anonymous policy grants still apply to token holders.
        assert_eq!(
            auth.allowed(&token_who, &repo("docker.io/x")),
            Actions::PULL
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(issued.token.expose())), at(T0 + 300))
                .map(|_| ()),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn anonymous_token_is_issued_with_whatever_is_allowed() {
        let auth = authenticator(RevocationSet::default());
        let scopes = [
            Scope::parse("repository:docker.io/library/alpine:pull,push").expect("scope"),
            Scope::parse("repository:team/app:pull").expect("scope"),
        ];
        let issued = auth.issue_token(&Principal::Anonymous, &scopes, at(T0));
        let who = auth
            .authenticate(Some(&bearer(issued.token.expose())), at(T0))
            .expect("valid token");
        assert_eq!(who.key_id(), None);
        assert_eq!(
            auth.allowed(&who, &repo("docker.io/library/alpine")),
            Actions::PULL
        );
        assert_eq!(auth.allowed(&who, &repo("team/app")), Actions::NONE);
    }

    #[test]
    fn token_never_outlives_its_key() {
        let auth = authenticator(RevocationSet::default());
        let (key, _) = issue(&signing_key(1), &["hosted/**"], "pull", 100);
        let who = auth
            .authenticate(Some(&bearer(key.expose())), at(T0 + 40))
            .expect("valid");
        let issued = auth.issue_token(&who, &[], at(T0 + 40));
        assert_eq!(issued.expires_in, 60);
        // Nor does a token obtained with a token.
        let token_who = auth
            .authenticate(Some(&bearer(issued.token.expose())), at(T0 + 50))
            .expect("valid");
        let again = auth.issue_token(&token_who, &[], at(T0 + 50));
        assert_eq!(again.expires_in, 50);
    }

    #[test]
    fn basic_with_key_password_works_and_other_passwords_do_not() {
        let auth = authenticator(RevocationSet::default());
        let (key, claims) = issue(&signing_key(1), &["hosted/**"], "pull,push", 3600);
        for user in ["", "anything", "ci-runner"] {
            let who = auth
                .authenticate(Some(&basic(user, key.expose())), at(T0))
                .expect("key as password");
            assert_eq!(who.key_id(), Some(claims.id.as_str()));
            assert_eq!(auth.allowed(&who, &repo("hosted/app")), pull_push());
        }
        assert_eq!(
            auth.authenticate(Some(&basic("alice", "hunter2")), at(T0))
                .map(|_| ()),
            Err(AuthError::InvalidCredentials)
        );
    }

    #[test]
    fn basic_with_a_plain_password_is_a_central_login_checked_elsewhere() {
        let auth = authenticator(RevocationSet::default());
        match auth.identify(Some(&basic("alice", "hunter2")), at(T0)) {
            Ok(Identified::CentralLogin(login)) => {
                assert_eq!(login.user, "alice");
                assert_eq!(login.password.expose(), "hunter2");
            }
            other => panic!("expected a central login, got {other:?}"),
        }
        // Keys stay principals; names or passwords no central user can have are refused.
        let (key, _) = issue(&signing_key(1), &["**"], "pull", 60);
        assert!(matches!(
            auth.identify(Some(&basic("x", key.expose())), at(T0)),
            Ok(Identified::Principal(Principal::Key(_)))
        ));
        for (user, password) in [("", "pw"), ("alice", ""), ("a\u{1}b", "pw")] {
            assert_eq!(
                auth.identify(Some(&basic(user, password)), at(T0))
                    .map(|_| ()),
                Err(AuthError::InvalidCredentials),
                "{user:?}"
            );
        }
    }

    #[test]
    fn central_user_gets_policy_pulls_only_and_tokens_name_the_user() {
        let mut private = AccessRule {
            repositories: vec!["central.corp/private/**".to_owned()],
            ..AccessRule::default()
        };
        private.users.insert("alice".to_owned(), Actions::PULL);
        let policy = Policy::new(vec![
            AccessRule {
                repositories: vec!["central.corp/team/**".to_owned()],
                authenticated: Actions::PULL,
                ..AccessRule::default()
            },
            private,
        ])
        .expect("valid policy");
        let auth = Authenticator::new(
            AuthSettings {
                issuers: vec![],
                token_secret: [9; 32],
                token_ttl: Duration::from_secs(300),
                policy,
                service: "outpost.test".to_owned(),
            },
            RevocationSet::default(),
        );
        let user = |name: &str| {
            Principal::Central(Arc::new(CentralUser {
                name: name.to_owned(),
                password: Secret::new("pw"),
            }))
        };
        let (alice, bob) = (user("alice"), user("bob"));
        assert_eq!(alice.subject(), "alice");
        assert_eq!(alice.key_id(), None);
        assert_eq!(alice.central_user(), Some("alice"));
        assert_eq!(
            auth.allowed(&alice, &repo("central.corp/team/app")),
            Actions::PULL
        );
        assert_eq!(
            auth.allowed(&alice, &repo("central.corp/private/app")),
            Actions::PULL
        );
        assert_eq!(
            auth.allowed(&bob, &repo("central.corp/private/app")),
            Actions::NONE
        );
        assert_eq!(auth.allowed(&alice, &repo("hosted/app")), Actions::NONE);

        let scopes =
            [Scope::parse("repository:central.corp/team/app:pull,push,delete").expect("scope")];
        let issued = auth.issue_token(&alice, &scopes, at(T0));
        let held = auth
            .authenticate(Some(&bearer(issued.token.expose())), at(T0 + 1))
            .expect("valid token");
        assert_eq!(held.subject(), "alice");
        assert_eq!(held.central_user(), Some("alice"));
        assert_eq!(held.key_id(), None);
        assert_eq!(
            auth.allowed(&held, &repo("central.corp/team/app")),
            Actions::PULL,
            "central users never get push or delete"
        );
        // A token obtained with that token is still the central user's.
        let again = auth.issue_token(&held, &scopes, at(T0 + 2));
        let held = auth
            .authenticate(Some(&bearer(again.token.expose())), at(T0 + 3))
            .expect("valid token");
        assert_eq!(held.central_user(), Some("alice"));
        // An anonymous token is not a central user's, whatever its subject says.
        let anonymous = auth.issue_token(&Principal::Anonymous, &[], at(T0));
        let held = auth
            .authenticate(Some(&bearer(anonymous.token.expose())), at(T0))
            .expect("valid token");
        assert_eq!(held.central_user(), None);
    }

    #[test]
    fn other_credentials_are_refused() {
        let auth = authenticator(RevocationSet::default());
        for header in [
            "Bearer sometoken",
            "Digest abc",
            "Token opk1.x.y",
            "Basic !!!notbase64",
            "Bearer",
            "",
        ] {
            assert!(
                auth.authenticate(Some(header), at(T0)).is_err(),
                "{header:?}"
            );
        }
        assert_eq!(
            auth.authenticate(Some("Digest abc"), at(T0)).map(|_| ()),
            Err(AuthError::InvalidCredentials)
        );
    }

    #[test]
    fn scheme_is_case_insensitive() {
        let auth = authenticator(RevocationSet::default());
        let (key, _) = issue(&signing_key(1), &["**"], "pull", 3600);
        let header = format!("bearer  {}", key.expose());
        auth.authenticate(Some(&header), at(T0))
            .expect("lowercase scheme");
    }

    #[test]
    fn no_error_ever_shows_the_credential() {
        let revocations = RevocationSet::default();
        let auth = authenticator(revocations.clone());
        let (key, _) = issue(&signing_key(1), &["**"], "pull", 60);
        let (foreign, _) = issue(&signing_key(2), &["**"], "pull", 60);
        let (revoked, revoked_claims) = issue(&signing_key(1), &["**"], "pull", 60);
        revocations.revoke(&revoked_claims.id);
        let token = auth.issue_token(&Principal::Anonymous, &[], at(T0)).token;
        let mut bad_sig = key.expose().to_owned();
        bad_sig.pop();
        bad_sig.push(if key.expose().ends_with('A') {
            'B'
        } else {
            'A'
        });

        let cases: Vec<(String, String, SystemTime)> = vec![
            (bearer(key.expose()), key.expose().to_owned(), at(T0 + 61)),
            (
                bearer(foreign.expose()),
                foreign.expose().to_owned(),
                at(T0),
            ),
            (
                bearer(revoked.expose()),
                revoked.expose().to_owned(),
                at(T0),
            ),
            (bearer(&bad_sig), bad_sig.clone(), at(T0)),
            (
                bearer(&format!("{}x", token.expose())),
                token.expose().to_owned(),
                at(T0),
            ),
            (
                bearer(token.expose()),
                token.expose().to_owned(),
                at(T0 + 1000),
            ),
            (
                basic("alice", "hunter2-secret"),
                "hunter2-secret".to_owned(),
                at(T0),
            ),
            (
                basic("alice", &format!("{}zz", key.expose())),
                key.expose().to_owned(),
                at(T0),
            ),
            (
                "Bearer opaque-secret".to_owned(),
                "opaque-secret".to_owned(),
                at(T0),
            ),
            (
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode("secret-no-colon")
                ),
                "secret-no-colon".to_owned(),
                at(T0),
            ),
        ];
        for (header, secret, now) in cases {
            let err = auth.authenticate(Some(&header), now).expect_err("refused");
            let shown = format!("{err} {err:?}");
            // No fragment of the credential long enough to matter may appear.
            for window in secret.as_bytes().windows(12) {
                let fragment = std::str::from_utf8(window).expect("ascii");
                assert!(!shown.contains(fragment), "{shown} shows part of {header}");
            }
            assert!(!shown.contains(&header), "{shown}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let auth = authenticator(RevocationSet::default());
        let shown = format!("{auth:?}");
        assert!(shown.contains("outpost.test"), "{shown}");
        let (key, _) = issue(&signing_key(1), &["**"], "pull", 60);
        let who = auth
            .authenticate(Some(&bearer(key.expose())), at(T0))
            .expect("valid");
        let issued = auth.issue_token(&who, &[], at(T0));
        let shown = format!("{who:?} {issued:?}");
        assert!(!shown.contains(&key.expose()[5..20]), "{shown}");
        assert!(!shown.contains(&issued.token.expose()[5..20]), "{shown}");
        let settings = AuthSettings {
            issuers: vec![],
            token_secret: [0x5a; 32],
            token_ttl: Duration::from_secs(1),
            policy: Policy::default_deny(),
            service: "s".to_owned(),
        };
        let shown = format!("{settings:?}");
        assert!(
            shown.contains("[REDACTED]") && !shown.contains("90, 90"),
            "{shown}"
        );
    }

    #[test]
    fn scope_parsing() {
        assert_eq!(
            Scope::parse("repository:team/app:pull,push"),
            Some(Scope {
                repo: repo("team/app"),
                actions: pull_push()
            })
        );
        assert_eq!(
            Scope::parse("repository:team/app:pull,admin,*").map(|s| s.actions),
            Some(acts("pull,delete"))
        );
        assert_eq!(
            Scope::parse("repository:team/app:").map(|s| s.actions),
            Some(Actions::NONE)
        );
        for bad in [
            "registry:catalog:*",
            "repository(plugin):team/app:pull",
            "repository:Team/App:pull",
            "repository:team/app",
            "",
        ] {
            assert_eq!(Scope::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn facade_accessors() {
        let auth = authenticator(RevocationSet::new(["a".repeat(32)]));
        assert_eq!(auth.service(), "outpost.test");
        assert_eq!(auth.issuer_count(), 1);
        assert!(auth.revocations().is_revoked(&"a".repeat(32)));
        let tag = "v1".parse().expect("tag");
        assert_eq!(
            auth.immutable_rule(&repo("team/app"), &tag),
            Some("immutable_tags \"v*\" of access rule 2".to_owned())
        );
        assert_eq!(auth.immutable_rule(&repo("docker.io/x"), &tag), None);
    }
}
