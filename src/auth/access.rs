//! The one access API the HTTP layer calls, once per phase of a request: who is calling
//! ([`Access::authenticate`]), may they do this ([`Access::authorize`]), what token do
//! they get ([`Access::issue_token`]) and which repositories may they see listed
//! ([`Access::visible`]).
//!
//! Owns the decisions that combine the parts of `auth`: the failed-authentication throttle
//! and its bookkeeping, central-registry logins and the central registry's say on pulls
//! of its repositories, the policy, and the challenge a refused caller gets. Every refusal
//! is one [`AccessError`], classified by who failed, carrying what a response needs (the
//! challenge to send, the time to wait); it never carries a credential. No HTTP types:
//! the caller hands in header bytes and maps the error.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::central::{CentralAuth, CentralError, Puller};
use super::{
    Action, AuthError, Authenticator, FailureThrottle, Identified, IssuedToken, MAX_TOKEN_SCOPES,
    Principal, Scope,
};
use crate::metrics::Metrics;
use crate::oci::{RepoName, Tag};
use crate::upstream::{Namespace, Upstreams};

/// What a refused caller is told to do next: `WWW-Authenticate: Bearer realm=…,
/// service=…[,scope=…]`, so that clients run the token flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// `<public_url>/token`.
    pub realm: String,
    pub service: String,
    /// `repository:<name>:<actions>` when the refusal was about one repository.
    pub scope: Option<String>,
}

impl Challenge {
    /// The `WWW-Authenticate` header value.
    pub fn header_value(&self) -> String {
        let mut value = format!(
            "Bearer realm=\"{}\",service=\"{}\"",
            self.realm, self.service
        );
        if let Some(scope) = &self.scope {
            value.push_str(&format!(",scope=\"{scope}\""));
        }
        value
    }
}

/// Why a request was refused, by who failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AccessError {
    /// The caller must present (other) credentials. `challenge` is `None` only for
    /// credentials so malformed that no flow can help.
    #[error("{message}")]
    Unauthenticated {
        message: String,
        challenge: Option<Challenge>,
    },
    /// The caller is known and may not do this; the message names who, what and why.
    #[error("{0}")]
    Denied(String),
    /// Too many failed authentications from this address.
    #[error("too many failed authentication attempts")]
    Throttled { retry_after: Duration },
    /// Our own failure (the central login records): retrying later may help.
    #[error(transparent)]
    Internal(CentralError),
}

/// Everything [`Access`] is built from.
pub struct AccessSettings {
    pub authenticator: Authenticator,
    pub throttle: FailureThrottle,
    /// Cached central-registry logins, when `auth.central` names an upstream.
    pub central: Option<Arc<CentralAuth>>,
    pub metrics: Arc<Metrics>,
    /// Resolves repository names of token scopes and listings to their upstream.
    pub upstreams: Upstreams,
    /// Base URL clients reach us at: the token realm is `<public_url>/token`.
    pub public_url: String,
}

/// The access service: a cheap-to-clone handle.
#[derive(Clone)]
pub struct Access {
    inner: Arc<AccessSettings>,
}

impl Access {
    pub fn new(settings: AccessSettings) -> Access {
        Access {
            inner: Arc::new(settings),
        }
    }

    /// Whether repositories routed to `upstream` belong to the central registry, whose
    /// own say on pulls counts (see [`Access::authorize`]).
    pub fn is_central(&self, upstream: &str) -> bool {
        self.inner
            .central
            .as_ref()
            .is_some_and(|c| c.is_central(upstream))
    }

    /// The challenge for a refusal, optionally about one repository.
    fn challenge(&self, scope: Option<String>) -> Challenge {
        Challenge {
            realm: format!("{}/token", self.inner.public_url),
            service: self.inner.authenticator.service().to_owned(),
            scope,
        }
    }

    fn unauthenticated(&self, message: impl Into<String>, scope: Option<String>) -> AccessError {
        AccessError::Unauthenticated {
            message: message.into(),
            challenge: Some(self.challenge(scope)),
        }
    }

    /// Maps a refusal of the central registry: of the credentials (401, challenged), of
    /// one pull (403), or our own failure.
    fn central_refusal(&self, e: CentralError) -> AccessError {
        match e {
            CentralError::Storage(_) => AccessError::Internal(e),
            e if e.is_login() => self.unauthenticated(e.to_string(), None),
            e => AccessError::Denied(e.to_string()),
        }
    }

    /// Who sent `authorization` (the raw header value; `None`: anonymous). Failed
    /// attempts count against `peer` and, past the limit, are refused before any
    /// credential is looked at. Central-registry users are checked here (cached, or
    /// online when due).
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        peer: IpAddr,
    ) -> Result<Principal, AccessError> {
        let Some(value) = authorization else {
            return Ok(Principal::Anonymous);
        };
        let metrics = &self.inner.metrics;
        let throttle = &self.inner.throttle;
        if let Err(retry_after) = throttle.check(peer, Instant::now()) {
            metrics.auth_result("throttled");
            return Err(AccessError::Throttled { retry_after });
        }
        let value = std::str::from_utf8(value)
            .ok()
            .filter(|v| v.is_ascii())
            .ok_or_else(|| AccessError::Unauthenticated {
                message: AuthError::Malformed("authorization header is not ASCII").to_string(),
                challenge: None,
            })?;
        let result = match self
            .inner
            .authenticator
            .identify(Some(value), SystemTime::now())
        {
            Ok(Identified::Principal(p)) => Ok(p),
            Ok(Identified::CentralLogin(login)) => match &self.inner.central {
                Some(central) => match central.login(&login).await {
                    Ok(user) => Ok(Principal::Central(Arc::new(user))),
                    Err(e) => Err(self.central_refusal(e)),
                },
                None => Err(self.unauthenticated(AuthError::InvalidCredentials.to_string(), None)),
            },
            Err(e) => Err(self.unauthenticated(e.to_string(), None)),
        };
        match result {
            Ok(p) => {
                throttle.record_success(peer);
                metrics.auth_result("accepted");
                Ok(p)
            }
            Err(e @ AccessError::Unauthenticated { .. }) => {
                throttle.record_failure(peer, Instant::now());
                metrics.auth_result("rejected");
                Err(e)
            }
            // Our own failure (the login records), not the caller's.
            Err(e) => Err(e),
        }
    }

    /// `/v2/`: anonymous callers are asked for credentials whenever credentials are
    /// possible, so that clients run the token flow (docker, podman and skopeo expect it).
    pub fn authorize_base(&self, principal: &Principal) -> Result<(), AccessError> {
        let credentials_possible =
            self.inner.authenticator.issuer_count() > 0 || self.inner.central.is_some();
        if matches!(principal, Principal::Anonymous) && credentials_possible {
            return Err(self.unauthenticated("authentication required", None));
        }
        Ok(())
    }

    /// Whether `principal` may do `action` on `repo` (its canonical name). `central` is
    /// the repository's name at the central registry when it belongs there: pulls of it
    /// then also need the central registry's (remembered) yes, except for API keys and
    /// their tokens, which carry their issuer's grant.
    pub async fn authorize(
        &self,
        principal: &Principal,
        repo: &RepoName,
        action: Action,
        central: Option<&RepoName>,
    ) -> Result<(), AccessError> {
        // A push also needs pull (clients check blobs first); ask for both.
        let wanted = match action {
            Action::Pull => "pull",
            Action::Push => "pull,push",
            Action::Delete => "delete",
        };
        let needs_credentials = || {
            self.unauthenticated(
                "authentication required",
                Some(format!("repository:{repo}:{wanted}")),
            )
        };
        if !self.permits(principal, repo, action) {
            self.inner.metrics.auth_result("denied");
            return Err(match principal {
                Principal::Anonymous => needs_credentials(),
                _ => AccessError::Denied(format!(
                    "{} may not {} {repo}",
                    principal.subject(),
                    action.as_str()
                )),
            });
        }
        let (Some(central_auth), Some(remote)) = (&self.inner.central, central) else {
            return Ok(());
        };
        let Some(who) = puller(principal).filter(|_| action == Action::Pull) else {
            return Ok(());
        };
        match central_auth.may_pull(who, remote).await {
            Ok(()) => Ok(()),
            Err(_) if matches!(principal, Principal::Anonymous) => Err(needs_credentials()),
            Err(e) => Err(self.central_refusal(e)),
        }
    }

    /// What the policy and the principal's own grants allow, without the central
    /// registry's say: for checks on hosted repositories (the source of a mount).
    pub fn permits(&self, principal: &Principal, repo: &RepoName, action: Action) -> bool {
        self.inner
            .authenticator
            .allowed(principal, repo)
            .contains(action)
    }

    /// Whether `repo` (a canonical name) may be listed to `principal` (`_catalog`): it may
    /// pull it, and for repositories of the central registry a remembered positive answer
    /// of the central registry exists (listing never asks it).
    pub async fn visible(&self, principal: &Principal, repo: &RepoName) -> bool {
        if !self.permits(principal, repo, Action::Pull) {
            return false;
        }
        let Some(central) = &self.inner.central else {
            return true;
        };
        let Ok(resolved) = self.inner.upstreams.resolve(repo, None) else {
            return false;
        };
        let Namespace::Upstream { upstream, remote } = resolved.namespace else {
            return true;
        };
        if !central.is_central(upstream.name()) {
            return true;
        }
        match puller(principal) {
            None => true,
            Some(who) => central.may_list(who, &remote).await,
        }
    }

    /// A token for the requested `scopes` (`repository:<name>:<actions>`; others and the
    /// excess over [`MAX_TOKEN_SCOPES`] are dropped), granting what the caller may do. For
    /// a central user, pulls of central repositories are granted only where the central
    /// registry agrees (asked now if its answer is due); a password refused there counts
    /// as a failed authentication from `peer`.
    pub async fn issue_token(
        &self,
        principal: &Principal,
        scopes: &[String],
        peer: IpAddr,
    ) -> Result<IssuedToken, AccessError> {
        let mut scopes: Vec<Scope> = scopes
            .iter()
            .filter_map(|s| Scope::parse(s))
            .take(MAX_TOKEN_SCOPES)
            .collect();
        if let (Some(central), Principal::Central(user)) = (&self.inner.central, principal) {
            let mut kept = Vec::with_capacity(scopes.len());
            for scope in scopes {
                let asks_pull = scope.actions.contains(Action::Pull)
                    && self.permits(principal, &scope.repo, Action::Pull);
                let Some(remote) = self
                    .central_remote(central, &scope.repo)
                    .filter(|_| asks_pull)
                else {
                    kept.push(scope);
                    continue;
                };
                match central.may_pull(Puller::User(user), &remote).await {
                    Ok(()) => kept.push(scope),
                    Err(e @ CentralError::BadCredentials) => {
                        // The password changed centrally: a failed login like any other.
                        self.inner.throttle.record_failure(peer, Instant::now());
                        return Err(self.unauthenticated(e.to_string(), None));
                    }
                    Err(e @ CentralError::Storage(_)) => return Err(AccessError::Internal(e)),
                    // Refused there: the token grants nothing on this repository.
                    Err(_) => {}
                }
            }
            scopes = kept;
        }
        Ok(self
            .inner
            .authenticator
            .issue_token(principal, &scopes, SystemTime::now()))
    }

    /// The name at the central registry of `repo`, when it belongs there.
    fn central_remote(&self, central: &CentralAuth, repo: &RepoName) -> Option<RepoName> {
        match self.inner.upstreams.resolve(repo, None).ok()?.namespace {
            Namespace::Upstream { upstream, remote } if central.is_central(upstream.name()) => {
                Some(remote)
            }
            _ => None,
        }
    }

    /// The immutable-tag rule protecting `tag` of `repo`, if any.
    pub fn immutable_rule(&self, repo: &RepoName, tag: &Tag) -> Option<String> {
        self.inner.authenticator.immutable_rule(repo, tag)
    }
}

/// Who `principal` is to the central registry; `None` for API keys (and tokens obtained
/// with one), which carry their issuer's grant and need no central check.
fn puller(principal: &Principal) -> Option<Puller<'_>> {
    match principal {
        Principal::Key(_) => None,
        Principal::Token(claims) if claims.key_id.is_some() => None,
        Principal::Token(claims) if claims.central => Some(Puller::TokenOf(&claims.subject)),
        Principal::Token(_) | Principal::Anonymous => Some(Puller::Anonymous),
        Principal::Central(user) => Some(Puller::User(user)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::tests::signing_key;
    use crate::auth::{Actions, KeyRequest, RevocationSet, Secret, issue_key};

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));
    const OTHER_PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 8));

    fn repo(name: &str) -> RepoName {
        name.parse().expect("valid name")
    }

    /// The auth module's test authenticator (anonymous pull of `docker.io/**`,
    /// authenticated pull of `team/**`), with two failed authentications per minute per
    /// address.
    fn access() -> Access {
        let authenticator = crate::auth::tests::authenticator(RevocationSet::default());
        let config = crate::config::Config::from_toml(
            "[server]\nlisten = [\"127.0.0.1:5000\"]\npublic_url = \"http://outpost.test:5000\"\n\
             [storage]\npath = \"/nonexistent\"\n",
        )
        .expect("valid config");
        Access::new(AccessSettings {
            authenticator,
            throttle: FailureThrottle::new(2, Duration::from_secs(60), 100),
            central: None,
            metrics: Arc::new(Metrics::new()),
            upstreams: Upstreams::new(&config).expect("no upstreams to build"),
            public_url: config.server.public_url.clone(),
        })
    }

    fn key(repos: &[&str], actions: &str) -> Secret {
        let req = KeyRequest {
            subject: "ci-runner".to_owned(),
            repos: repos.iter().map(|r| (*r).to_owned()).collect(),
            actions: Actions::parse_list(actions).expect("valid actions"),
            ttl: Duration::from_secs(3600),
        };
        issue_key(&signing_key(1), &req, SystemTime::now())
            .expect("key issued")
            .0
    }

    fn bearer(secret: &str) -> Vec<u8> {
        format!("Bearer {secret}").into_bytes()
    }

    fn expect_challenge(e: AccessError, scope: Option<&str>) {
        match e {
            AccessError::Unauthenticated {
                challenge: Some(c), ..
            } => {
                assert_eq!(c.realm, "http://outpost.test:5000/token");
                assert_eq!(c.service, "outpost.test");
                assert_eq!(c.scope.as_deref(), scope);
            }
            other => panic!("expected a challenged 401, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn failed_logins_throttle_their_address_only() {
        let access = access();
        let good = key(&["hosted/**"], "pull");
        for _ in 0..2 {
            let e = access
                .authenticate(Some(b"Bearer opk_garbage"), PEER)
                .await
                .expect_err("bad key refused");
            expect_challenge(e, None);
        }
        // Past the limit even a good key is refused before it is looked at.
        let e = access
            .authenticate(Some(&bearer(good.expose())), PEER)
            .await
            .expect_err("throttled");
        assert!(
            matches!(e, AccessError::Throttled { retry_after } if retry_after > Duration::ZERO),
            "{e:?}"
        );
        // Another address is unaffected.
        let who = access
            .authenticate(Some(&bearer(good.expose())), OTHER_PEER)
            .await
            .expect("other address");
        assert_eq!(who.subject(), "ci-runner");
    }

    #[tokio::test]
    async fn a_success_clears_earlier_failures_of_the_address() {
        let access = access();
        let good = key(&["hosted/**"], "pull");
        assert!(access.authenticate(Some(b"Bearer x"), PEER).await.is_err());
        assert!(
            access
                .authenticate(Some(&bearer(good.expose())), PEER)
                .await
                .is_ok()
        );
        // One more failure is the first of a new count, not the second of the old one.
        assert!(access.authenticate(Some(b"Bearer x"), PEER).await.is_err());
        assert!(
            access
                .authenticate(Some(&bearer(good.expose())), PEER)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn non_ascii_credentials_are_refused_without_a_challenge_or_a_count() {
        let access = access();
        for _ in 0..3 {
            let e = access
                .authenticate(Some("Bearer \u{e9}".as_bytes()), PEER)
                .await
                .expect_err("refused");
            assert!(
                matches!(
                    e,
                    AccessError::Unauthenticated {
                        challenge: None,
                        ..
                    }
                ),
                "{e:?}"
            );
        }
        let good = key(&["hosted/**"], "pull");
        assert!(
            access
                .authenticate(Some(&bearer(good.expose())), PEER)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn refusals_challenge_anonymous_callers_and_deny_known_ones() {
        let access = access();
        let anonymous = Principal::Anonymous;
        expect_challenge(
            access.authorize_base(&anonymous).expect_err("401 on /v2/"),
            None,
        );
        let e = access
            .authorize(&anonymous, &repo("team/app"), Action::Pull, None)
            .await
            .expect_err("anonymous may not pull team/app");
        expect_challenge(e, Some("repository:team/app:pull"));
        let e = access
            .authorize(&anonymous, &repo("hosted/app"), Action::Push, None)
            .await
            .expect_err("anonymous may not push");
        expect_challenge(e, Some("repository:hosted/app:pull,push"));
        assert!(
            access
                .authorize(
                    &anonymous,
                    &repo("docker.io/library/alpine"),
                    Action::Pull,
                    None
                )
                .await
                .is_ok()
        );

        let good = key(&["hosted/**"], "pull");
        let who = access
            .authenticate(Some(&bearer(good.expose())), PEER)
            .await
            .expect("key");
        assert!(access.authorize_base(&who).is_ok());
        match access
            .authorize(&who, &repo("hosted/app"), Action::Push, None)
            .await
        {
            Err(AccessError::Denied(m)) => assert_eq!(m, "ci-runner may not push hosted/app"),
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_token_grants_only_the_allowed_part_of_repository_scopes() {
        let access = access();
        let good = key(&["hosted/**"], "pull,push");
        let who = access
            .authenticate(Some(&bearer(good.expose())), PEER)
            .await
            .expect("key");
        let scopes = [
            "repository:hosted/app:pull,push".to_owned(),
            "repository:team/app:pull,push".to_owned(),
            "repository:elsewhere/app:pull".to_owned(),
            "registry:catalog:*".to_owned(),
        ];
        let issued = access
            .issue_token(&who, &scopes, PEER)
            .await
            .expect("token");
        let holder = access
            .authenticate(Some(&bearer(issued.token.expose())), PEER)
            .await
            .expect("token authenticates");
        let Principal::Token(claims) = holder else {
            panic!("expected a token principal");
        };
        assert_eq!(
            claims.grants,
            vec![
                (
                    repo("hosted/app"),
                    Actions::parse_list("pull,push").expect("ok")
                ),
                (repo("team/app"), Actions::PULL),
            ]
        );
        assert_eq!(claims.subject, "ci-runner");
    }
}
