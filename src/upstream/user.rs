//! Checks of a central-registry user at the upstream, made with that user's own
//! credentials: are they valid (a login), and may the user (or anyone, anonymously) pull a
//! repository there.
//!
//! These requests only ask; they never fetch content (Outpost fetches with its own
//! credentials) and never touch Outpost's token cache: a token obtained with a user's
//! password is used for one probe and dropped. They go through the upstream's circuit
//! breaker like every other request, so while the central registry is down a check fails
//! at once instead of waiting for a dial timeout. The password goes only into Basic auth
//! towards the registry or its token realm; never into a log line or an error.

use reqwest::header::WWW_AUTHENTICATE;
use reqwest::{Method, StatusCode};

use super::challenge::{self, Challenge};
use super::token::{BearerRealm, parse_token_response, realm_url};
use super::{Inner, Upstream, UpstreamError};
use crate::auth::Secret;
use crate::oci::RepoName;

/// Largest token response read during a check.
const MAX_CHECK_RESPONSE_BYTES: usize = 1024 * 1024;

/// A user's credentials, borrowed for one check.
#[derive(Clone, Copy)]
pub struct UserCredentials<'a> {
    pub user: &'a str,
    pub password: &'a Secret,
}

/// The answer to a login check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginCheck {
    /// The registry accepted the credentials.
    Valid,
    /// The registry (or its token realm) refused them: wrong user or password.
    Rejected,
}

/// The answer to a pull check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullCheck {
    /// The registry answered the repository's tag list: the caller may pull.
    Allowed,
    /// The registry refused the caller this repository (401/403 with valid credentials).
    Denied,
    /// The registry does not know the repository (or hides it from this caller).
    NotFound,
    /// The credentials themselves were refused.
    BadCredentials,
}

/// How the registry wants to be authenticated, from a 401's challenges.
enum Scheme {
    Bearer(BearerRealm),
    Basic,
}

impl Upstream {
    /// Whether Outpost has its own credentials for this upstream. Without them every
    /// request it makes is anonymous, so a success shows anonymous access.
    pub fn has_credentials(&self) -> bool {
        self.inner.credentials.is_some()
    }

    /// Checks a user's credentials: through the registry's token realm (a token request
    /// without a scope, as `docker login` does) or with Basic auth on `/v2/`.
    pub async fn check_login(
        &self,
        creds: UserCredentials<'_>,
    ) -> Result<LoginCheck, UpstreamError> {
        let inner = &self.inner;
        let permit = inner.admit()?;
        let result = async {
            let url = format!("{}/v2/", inner.base);
            let resp = inner.send(|| inner.client.get(&url)).await?;
            if resp.status().is_success() {
                // A registry that lets anyone in cannot tell us who is who.
                return Err(UpstreamError::Invalid(format!(
                    "{}: the registry does not authenticate users, so their credentials \
                     cannot be checked",
                    inner.name
                )));
            }
            let scheme = match inner.auth_scheme(&resp)? {
                Some(s) => s,
                None => return Err(inner.unexpected(&resp)),
            };
            match scheme {
                Scheme::Bearer(realm) => {
                    inner
                        .user_token(&realm, None, Some(creds))
                        .await
                        .map(|t| match t {
                            Some(_) => LoginCheck::Valid,
                            None => LoginCheck::Rejected,
                        })
                }
                Scheme::Basic => {
                    let resp = inner
                        .send(|| {
                            inner
                                .client
                                .get(&url)
                                .basic_auth(creds.user, Some(creds.password.expose()))
                        })
                        .await?;
                    match resp.status() {
                        s if s.is_success() => Ok(LoginCheck::Valid),
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                            Ok(LoginCheck::Rejected)
                        }
                        _ => Err(inner.unexpected(&resp)),
                    }
                }
            }
        }
        .await;
        permit.settle(&result);
        log_check(inner, "login", None, &result);
        result
    }

    /// Checks whether `creds` (or anyone, with `None`) may pull `repo` (its name at the
    /// upstream): asks for the repository's tag list (`?n=1`), with a token for
    /// `repository:<repo>:pull` obtained with those credentials, or with Basic auth.
    pub async fn check_pull(
        &self,
        creds: Option<UserCredentials<'_>>,
        repo: &RepoName,
    ) -> Result<PullCheck, UpstreamError> {
        let inner = &self.inner;
        let permit = inner.admit()?;
        let result = async {
            let url = format!("{}/v2/{repo}/tags/list?n=1", inner.base);
            let probe = |r: reqwest::RequestBuilder| r.header("Accept", "application/json");
            let resp = inner
                .send(|| probe(inner.client.request(Method::GET, &url)))
                .await?;
            if let Some(answer) = pull_answer(resp.status(), false) {
                return Ok(answer);
            }
            let Some(scheme) = inner.auth_scheme(&resp)? else {
                return Err(inner.unexpected(&resp));
            };
            let resp = match scheme {
                Scheme::Bearer(realm) => {
                    let scope = format!("repository:{repo}:pull");
                    let Some(token) = inner.user_token(&realm, Some(&scope), creds).await? else {
                        return Ok(match creds {
                            Some(_) => PullCheck::BadCredentials,
                            None => PullCheck::Denied,
                        });
                    };
                    inner
                        .send(|| probe(inner.client.get(&url)).bearer_auth(token.expose()))
                        .await?
                }
                Scheme::Basic => {
                    let Some(c) = creds else {
                        return Ok(PullCheck::Denied);
                    };
                    let resp = inner
                        .send(|| {
                            probe(inner.client.get(&url))
                                .basic_auth(c.user, Some(c.password.expose()))
                        })
                        .await?;
                    if resp.status() == StatusCode::UNAUTHORIZED {
                        return Ok(PullCheck::BadCredentials);
                    }
                    resp
                }
            };
            pull_answer(resp.status(), true).ok_or_else(|| inner.unexpected(&resp))
        }
        .await;
        permit.settle(&result);
        log_check(inner, "pull", Some(repo), &result);
        result
    }
}

/// The answer a tag-list status gives, if it settles the question. `authenticated` says
/// whether credentials (or a token) were sent; a 401 without them asks for some.
fn pull_answer(status: StatusCode, authenticated: bool) -> Option<PullCheck> {
    match status {
        s if s.is_success() => Some(PullCheck::Allowed),
        StatusCode::NOT_FOUND => Some(PullCheck::NotFound),
        StatusCode::FORBIDDEN => Some(PullCheck::Denied),
        StatusCode::UNAUTHORIZED if authenticated => Some(PullCheck::Denied),
        _ => None,
    }
}

fn log_check<T: std::fmt::Debug>(
    inner: &Inner,
    what: &str,
    repo: Option<&RepoName>,
    result: &Result<T, UpstreamError>,
) {
    // The user is deliberately not logged here: the request log names the principal.
    let repo = repo.map(ToString::to_string).unwrap_or_default();
    match result {
        Ok(answer) => tracing::debug!(
            upstream = %inner.name, check = what, repo, answer = ?answer,
            "central user check"
        ),
        Err(e) => tracing::warn!(
            upstream = %inner.name, check = what, repo, error = %e,
            "central user check failed"
        ),
    }
}

impl Inner {
    /// The scheme a 401 asks for, `None` for another status or no usable challenge.
    /// Outage statuses (5xx, 429) are errors.
    fn auth_scheme(&self, resp: &reqwest::Response) -> Result<Option<Scheme>, UpstreamError> {
        if resp.status() != StatusCode::UNAUTHORIZED {
            return match self.status_error(resp) {
                Some(e) if e.is_outage() => Err(e),
                _ => Ok(None),
            };
        }
        let challenges: Vec<Challenge> = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(challenge::parse)
            .collect();
        let bearer = BearerRealm::from_challenges(&challenges);
        if let Some(realm) = bearer {
            return Ok(Some(Scheme::Bearer(realm)));
        }
        Ok(challenges
            .iter()
            .any(|c| c.scheme == "basic")
            .then_some(Scheme::Basic))
    }

    /// A token from `realm` for `scope` (none: a plain login), with the user's Basic
    /// credentials or anonymously. `None` when the realm refuses them (401/403).
    async fn user_token(
        &self,
        realm: &BearerRealm,
        scope: Option<&str>,
        creds: Option<UserCredentials<'_>>,
    ) -> Result<Option<Secret>, UpstreamError> {
        let mut url = realm_url(realm, self.https)
            .map_err(|e| UpstreamError::Invalid(format!("{}: {e}", self.name)))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = realm.service.as_deref().filter(|s| !s.is_empty()) {
                q.append_pair("service", service);
            }
            if let Some(scope) = scope {
                q.append_pair("scope", scope);
            }
            if let Some(c) = creds {
                q.append_pair("account", c.user);
            }
        }
        let resp = self
            .send(|| {
                let r = self.client.get(url.clone());
                match creds {
                    Some(c) => r.basic_auth(c.user, Some(c.password.expose())),
                    None => r,
                }
            })
            .await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Ok(None),
            _ => return Err(self.unexpected(&resp)),
        }
        let body = self
            .read_capped(resp, MAX_CHECK_RESPONSE_BYTES, "token response")
            .await?;
        parse_token_response(&body)
            .map(|g| Some(g.token))
            .map_err(|e| UpstreamError::Invalid(format!("{}: {e}", self.name)))
    }

    /// The error for a status that answers nothing here: an outage for 5xx and 429,
    /// otherwise a protocol error.
    fn unexpected(&self, resp: &reqwest::Response) -> UpstreamError {
        match self.status_error(resp) {
            Some(e) if e.is_outage() => e,
            _ => UpstreamError::Invalid(format!(
                "{}: unexpected status {} to a user check",
                self.name,
                resp.status()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::super::testserver::{Seen, TestServer, respond};
    use super::*;
    use crate::config::UpstreamConfig;

    fn upstream(url: &str) -> Upstream {
        Upstream::new(&UpstreamConfig {
            name: "central.test".into(),
            url: url.into(),
            aliases: Vec::new(),
            tag_ttl: std::time::Duration::from_secs(600),
            username: None,
            password_file: None,
            ca: None,
            connect_timeout: std::time::Duration::from_secs(2),
            read_timeout: std::time::Duration::from_secs(5),
            revalidate_wait: std::time::Duration::from_secs(2),
            breaker_threshold: 3,
            breaker_cooldown: std::time::Duration::from_secs(30),
        })
        .expect("upstream")
    }

    fn basic(user: &str, password: &str) -> String {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {encoded}")
    }

    fn repo(name: &str) -> RepoName {
        name.parse().expect("repo")
    }

    const PW: &str = "alice-pw-secret";

    /// A tag-list answer by repository: team/ is readable, secret/ forbidden, the rest
    /// unknown.
    fn tags_answer(uri: &str) -> u16 {
        if uri.starts_with("/v2/team/") {
            200
        } else if uri.starts_with("/v2/secret/") {
            403
        } else {
            404
        }
    }

    #[tokio::test]
    async fn basic_registry_checks_logins_and_pulls() {
        let registry = TestServer::start(|s: Seen| async move {
            if s.header("authorization") != Some(basic("alice", PW).as_str()) {
                return respond(401, &[("www-authenticate", "Basic realm=\"r\"")], "");
            }
            let status = if s.uri == "/v2/" {
                200
            } else {
                tags_answer(&s.uri)
            };
            respond(status, &[], "{}")
        })
        .await;
        let up = upstream(&registry.url());
        let (good, bad) = (Secret::new(PW), Secret::new("wrong-pw-1"));
        let alice = UserCredentials {
            user: "alice",
            password: &good,
        };
        let wrong = UserCredentials {
            user: "alice",
            password: &bad,
        };
        assert_eq!(up.check_login(alice).await, Ok(LoginCheck::Valid));
        assert_eq!(up.check_login(wrong).await, Ok(LoginCheck::Rejected));
        let pull = |c, r: &'static str| {
            let up = up.clone();
            async move { up.check_pull(c, &repo(r)).await }
        };
        assert_eq!(pull(Some(alice), "team/app").await, Ok(PullCheck::Allowed));
        assert_eq!(pull(Some(alice), "secret/app").await, Ok(PullCheck::Denied));
        assert_eq!(pull(Some(alice), "gone/app").await, Ok(PullCheck::NotFound));
        assert_eq!(
            pull(Some(wrong), "team/app").await,
            Ok(PullCheck::BadCredentials)
        );
        assert_eq!(pull(None, "team/app").await, Ok(PullCheck::Denied));
        assert!(
            registry
                .seen()
                .iter()
                .all(|s| s.method == reqwest::Method::GET)
        );
        registry.stop().await;
    }

    #[tokio::test]
    async fn bearer_registry_checks_through_the_realm_with_the_users_credentials() {
        let realm = TestServer::start(|s: Seen| async move {
            match s.header("authorization") {
                Some(a) if a == basic("alice", PW) => respond(200, &[], r#"{"token":"tok-alice"}"#),
                Some(_) => respond(401, &[], ""),
                None => respond(200, &[], r#"{"token":"tok-anonymous"}"#),
            }
        })
        .await;
        let challenge = format!(r#"Bearer realm="{}/token",service="svc""#, realm.url());
        let registry = TestServer::start(move |s: Seen| {
            let challenge = challenge.clone();
            async move {
                if s.header("authorization") != Some("Bearer tok-alice") {
                    return respond(401, &[("www-authenticate", challenge.as_str())], "");
                }
                respond(tags_answer(&s.uri), &[], "{}")
            }
        })
        .await;
        let up = upstream(&registry.url());
        let (good, bad) = (Secret::new(PW), Secret::new("wrong-pw-2"));
        let alice = UserCredentials {
            user: "alice",
            password: &good,
        };
        let wrong = UserCredentials {
            user: "alice",
            password: &bad,
        };
        assert_eq!(up.check_login(alice).await, Ok(LoginCheck::Valid));
        assert_eq!(up.check_login(wrong).await, Ok(LoginCheck::Rejected));
        assert_eq!(
            up.check_pull(Some(alice), &repo("team/app")).await,
            Ok(PullCheck::Allowed)
        );
        assert_eq!(
            up.check_pull(Some(alice), &repo("secret/app")).await,
            Ok(PullCheck::Denied)
        );
        assert_eq!(
            up.check_pull(Some(wrong), &repo("team/app")).await,
            Ok(PullCheck::BadCredentials)
        );
        // An anonymous token without access is refused by the registry: denied.
        assert_eq!(
            up.check_pull(None, &repo("team/app")).await,
            Ok(PullCheck::Denied)
        );
        // The login asked for no scope and named the account; pulls asked for pull.
        let tokens = realm.seen();
        assert!(tokens[0].uri.contains("account=alice") && !tokens[0].uri.contains("scope="));
        assert!(
            tokens
                .iter()
                .any(|t| t.uri.contains("scope=repository%3Ateam%2Fapp%3Apull"))
        );
        registry.stop().await;
        realm.stop().await;
    }

    #[tokio::test]
    async fn outages_are_errors_that_never_show_the_password() {
        let registry =
            TestServer::start(|_| async move { respond(503, &[], "down for maintenance") }).await;
        let up = upstream(&registry.url());
        let password = Secret::new("pw-that-must-not-show");
        let creds = UserCredentials {
            user: "alice",
            password: &password,
        };
        let err = up.check_login(creds).await.expect_err("outage");
        assert!(err.is_outage(), "{err}");
        let err = up
            .check_pull(Some(creds), &repo("team/app"))
            .await
            .expect_err("outage");
        assert!(err.is_outage(), "{err}");
        assert!(!format!("{err} {err:?}").contains("pw-that-must-not-show"));
        registry.stop().await;

        // Nothing listening: unavailable, and the breaker opens after the threshold.
        let gone = upstream("http://127.0.0.1:9");
        for _ in 0..4 {
            let err = gone.check_login(creds).await.expect_err("unreachable");
            assert!(err.is_outage(), "{err}");
        }
        assert_eq!(gone.health().breaker, super::super::BreakerState::Open);
    }
}
