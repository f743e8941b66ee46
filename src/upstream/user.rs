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
        let bearer = challenges
            .iter()
            .filter(|c| c.scheme == "bearer")
            .find_map(|c| {
                Some(BearerRealm {
                    realm: c.param("realm").filter(|r| !r.is_empty())?.to_owned(),
                    service: c.param("service").map(str::to_owned),
                })
            });
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
